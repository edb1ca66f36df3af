"""Build a small Llama-shaped bf16 checkpoint and a PEFT LoRA adapter for it, with numpy only.

    python examples/make_example.py ex
    lorafuse apply ex/base ex/adapter -o ex/merged
    lorafuse info ex/adapter
    python examples/make_example.py ex --check    # compares ex/merged with a numpy float64 merge

The files are what transformers' save_pretrained and PEFT's save_pretrained write:
config.json + model.safetensors, adapter_config.json + adapter_model.safetensors.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lorafuse import _core
from lorafuse.io.safetensors import SafetensorsFile, save_file

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 512, 1408, 4, 8, 2, 4096
RANK, ALPHA = 16, 32
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shapes() -> dict[str, tuple[int, ...]]:
    head = HIDDEN // HEADS
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out |= {
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * head, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * head, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN),
            p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        }
    return out | {"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}


def build(root: Path) -> None:
    rng = np.random.default_rng(0)
    base, adapter = root / "base", root / "adapter"
    base.mkdir(parents=True, exist_ok=True)
    adapter.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, shape in shapes().items():
        x = np.ones(shape, np.float32) if len(shape) == 1 else rng.normal(0, 0.02, shape).astype(np.float32)
        tensors[name] = ("BF16", _core.from_float32(x, "BF16"))
    save_file(tensors, base / "model.safetensors", {"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }
    (base / "config.json").write_text(json.dumps(config, indent=2))
    lora = {}
    for name, shape in shapes().items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in TARGETS:
            lora[f"base_model.model.{module}.lora_A.weight"] = ("F32", rng.normal(0, 0.02, (RANK, shape[1])).astype(np.float32))
            lora[f"base_model.model.{module}.lora_B.weight"] = ("F32", rng.normal(0, 0.02, (shape[0], RANK)).astype(np.float32))
    save_file(lora, adapter / "adapter_model.safetensors", {"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0,
        "target_modules": list(TARGETS), "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
        "bias": "none", "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": str(base),
    }
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    print(f"wrote {base} and {adapter}")


def check(root: Path) -> None:
    """Compare ex/merged with a float64 numpy merge rounded to bf16."""
    exact = total = 0
    worst = 0.0
    with SafetensorsFile(root / "base" / "model.safetensors") as b, \
         SafetensorsFile(root / "adapter" / "adapter_model.safetensors") as a, \
         SafetensorsFile(root / "merged" / "model.safetensors") as m:
        for name in b.keys():
            w = _core.to_float32(b.raw(name), "BF16").astype(np.float64)
            delta = np.zeros_like(w)
            module = "base_model.model." + name.removesuffix(".weight")
            if module + ".lora_A.weight" in a:
                delta = (ALPHA / RANK) * (a.raw(module + ".lora_B.weight").astype(np.float64)
                                          @ a.raw(module + ".lora_A.weight").astype(np.float64))
            ref = w + delta
            got = m.raw(name)
            exact += int(np.count_nonzero(got == _core.from_float32(ref.astype(np.float32), "BF16")))
            total += got.size
            # error in bf16 ulps at the scale of the operands (float32 sums are exact to that scale)
            scale = np.maximum(np.maximum(np.abs(w), np.abs(delta)), np.abs(ref)).astype(np.float32)
            ulp = np.spacing(scale).astype(np.float64) * 65536
            err = np.abs(_core.to_float32(got, "BF16").astype(np.float64) - ref)
            worst = max(worst, float(np.max(err / ulp)))
    print(f"{exact / total:.4%} of values equal the float64 merge rounded to bf16; "
          f"max error {worst:.2f} bf16 ulp of max(|W|, |dW|)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--check", action="store_true", help="check root/merged instead of building inputs")
    args = ap.parse_args()
    check(args.root) if args.check else build(args.root)
