"""`lorafuse convert ADAPTER --to gguf`: PEFT LoRAs of tiny Llama / Mistral / Qwen2 / Qwen3 / Gemma models as
GGUF LoRA adapters for llama.cpp.

References: real PEFT (each LoRA layer's own factors and `scaling`, the delta computed from them in float64,
as PEFT's get_delta_weight does), gguf's own reader, dequantize and quantize (llama.cpp's gguf-py), and the
rules of llama.cpp's convert_lora_to_gguf.py / llama-adapter.cpp written out here: names `blk.N.attn_q.weight
.lora_a` / `.lora_b`, lora_a = lora_A (r x in), lora_b = lora_B (out x r), token_embd's lora_a = A^T, the
scale alpha / r with r from lora_b, LlamaModel.permute on the rows of Llama / Mistral q_proj and k_proj.
With LORAFUSE_LLAMA_CPP set to a llama.cpp checkout (holding convert_lora_to_gguf.py) the converter itself
runs too, and every tensor and key must equal ours.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

import lorafuse  # noqa: E402
from lorafuse.cli import main  # noqa: E402
from lorafuse.errors import LorafuseValueError, MissingModuleError, UnsupportedError  # noqa: E402
from lorafuse.ops.convert import convert  # noqa: E402

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODELS = {  # --arch -> (config class, model class, extra config, general.architecture)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, "llama"),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}, "llama"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": False}, "qwen2"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16, "tie_word_embeddings": False}, "qwen3"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}, "gemma"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16}, "gemma2"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16}, "gemma3"),
}
# gguf names of the HF modules (llama.cpp's TensorNameMap, written out)
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


@dataclass
class Made:
    base: Path  # the base model's folder (config.json + weights)
    adapter: Path  # PEFT adapter folder
    deltas: dict[str, np.ndarray]  # module -> PEFT's delta (float64, the base weight's layout)
    factors: dict[str, tuple[np.ndarray, np.ndarray]]  # module -> (lora_A, lora_B) as stored, float32 values
    config: dict[str, object]  # the base's config.json


def _gguf_name(module: str) -> str:
    if module == "lm_head":
        return "output.weight"
    if module == "model.embed_tokens":
        return "token_embd.weight"
    parts = module.split(".")
    return f"blk.{parts[2]}.{GGUF_NAMES[parts[-1]]}.weight"


@torch.no_grad()
def make(tmp: Path, arch: str, targets: list[str], *, dtype: torch.dtype = torch.float32, seed: int = 0,
         config: dict[str, object] | None = None, **lora: object) -> Made:
    """A tiny model of `arch` saved as a base, and a PEFT LoRA on `targets` with random factors."""
    cfg_cls, model_cls, extra, _ = MODELS[arch]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(**{**SMALL, **extra, **(config or {})})
    model = getattr(transformers, model_cls)(cfg).eval()
    base, adapter = tmp / "base", tmp / "adapter"
    model.save_pretrained(base)
    lora_cfg = LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": targets, **lora})  # type: ignore[arg-type]
    pm = get_peft_model(model, lora_cfg)
    for name, p in pm.named_parameters():
        if any(f".{k}." in name for k in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")):
            p.copy_(torch.randn(p.shape) * 0.1)
        elif "lora_magnitude_vector" in name:
            p.mul_(1.1)
    pm = pm.to(dtype)
    pm.save_pretrained(adapter)
    deltas: dict[str, np.ndarray] = {}
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, layer in pm.named_modules():
        if not isinstance(layer, LoraLayer) or "default" not in layer.scaling:
            continue
        module = name.removeprefix("base_model.model.")
        scale = layer.scaling["default"]
        if "default" in layer.lora_embedding_A:  # PEFT's Embedding: delta = (B @ A)^T * scaling
            a_t, b_t = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
            delta = (b_t.double() @ a_t.double()).T * scale
        else:
            a_t, b_t = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            delta = (b_t.double() @ a_t.double()) * scale
        deltas[module] = delta.numpy()
        factors[module] = (a_t.float().numpy(), b_t.float().numpy())
    return Made(base, adapter, deltas, factors, json.loads((base / "config.json").read_text()))


def read(path: Path) -> tuple[dict[str, object], dict[str, tuple[str, np.ndarray, np.ndarray]]]:
    """(metadata key -> value, tensor -> (type name, dequantized float32 values, raw data)) of a GGUF file."""
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in r.tensors:
        raw = np.asarray(t.data)
        values = gguf.quants.dequantize(raw, t.tensor_type).reshape(tuple(int(n) for n in reversed(t.shape)))
        tensors[t.name] = (t.tensor_type.name, values.astype(np.float32), raw)
    return meta, tensors


def permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (convert_hf_to_gguf.py) on the rows of a matrix."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def heads_of(made: Made, module: str, arch: str) -> int | None:
    if MODELS[arch][3] != "llama" or module.rsplit(".", 1)[-1] not in ("q_proj", "k_proj"):
        return None
    cfg = made.config
    return int(cfg["num_attention_heads"] if module.endswith("q_proj") else cfg["num_key_value_heads"])  # type: ignore[arg-type]


def gguf_deltas(tensors: dict[str, tuple[str, np.ndarray, np.ndarray]], alpha: float) -> dict[str, np.ndarray]:
    """Each base tensor's delta as llama.cpp applies it: scale = alpha / r, r = lora_b's ne[0] (its columns);
    token_embd: rows of lora_a times lora_b^T (llm_build_inp_embd)."""
    out = {}
    for name in {n.rsplit(".", 1)[0] for n in tensors}:
        a = tensors[name + ".lora_a"][1].astype(np.float64)
        b = tensors[name + ".lora_b"][1].astype(np.float64)
        scale = float(np.float32(alpha)) / b.shape[1] if alpha != 0 else 1.0
        out[name] = scale * (a @ b.T if name == "token_embd.weight" else b @ a)
    return out


def check_deltas(made: Made, arch: str, path: Path, atol: float = 1e-6) -> dict[str, object]:
    """Every module's delta from the GGUF file equals PEFT's (q / k rows permuted as llama.cpp's base is)."""
    meta, tensors = read(path)
    got = gguf_deltas(tensors, float(meta["adapter.lora.alpha"]))  # type: ignore[arg-type]
    assert set(got) == {_gguf_name(m) for m in made.deltas}
    for module, delta in made.deltas.items():
        heads = heads_of(made, module, arch)
        want = permute(delta, heads) if heads else delta
        np.testing.assert_allclose(got[_gguf_name(module)], want, rtol=0, atol=atol * np.abs(want).max(),
                                   err_msg=module)
    return meta


def expected_metadata(made: Made, gguf_arch: str, alpha: float, path: Path) -> dict[str, object]:
    """The keys convert_lora_to_gguf.py writes, in its order (ModelBase.prepare_metadata and the LoRA
    model's set_type / set_gguf_parameters), plus lorafuse's mark."""
    w = gguf.GGUFWriter(None, gguf_arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    for name, (_, values, _) in read(path)[1].items():  # the converter's parameter count, from the tensors
        w.add_tensor_info(name, values.shape, np.dtype(np.float32), values.nbytes)
    meta = gguf.Metadata.load(None, made.adapter, None, w.get_total_parameter_count()[0])
    meta.set_gguf_meta_model(w)
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    out = {k: v.value for k, v in w.kv_data[0].items()}
    out["lorafuse_version"] = lorafuse.__version__
    return out


# ----------------------------------------------------------------------------- the architectures


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"])
def test_every_module_and_the_metadata_as_llama_cpp_writes_them(arch, tmp_path):
    # Gemma / Gemma 2: llama.cpp's output is the token embedding, so neither lm_head nor embed_tokens
    targets = ATTN_MLP + (["embed_tokens", "lm_head"] if arch not in ("gemma", "gemma2") else [])
    made = make(tmp_path, arch, targets)
    out = tmp_path / "lora.gguf"
    rep = convert(made.adapter, out, to="gguf", base_config=made.base)
    assert rep.arch == arch and rep.gguf_type == "f32" and rep.alpha == 16.0 and not rep.folded
    meta, tensors = read(out)
    # names: two tensors per module, lora_a before lora_b; shapes as llama-adapter.cpp checks them
    names = [n for n in tensors]
    assert len(names) == 2 * len(made.deltas)
    assert all(a.endswith(".lora_a") and b == a[:-1] + "b" for a, b in zip(names[::2], names[1::2]))
    for module, (a, b) in made.factors.items():
        name = _gguf_name(module)
        ga, gb = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        assert ga[0] == gb[0] == "F32"
        heads = heads_of(made, module, arch)
        if module == "model.embed_tokens":  # lora_embedding_A (r x vocab) transposed, lora_embedding_B (dim x r)
            np.testing.assert_array_equal(ga[1], a.T)
            np.testing.assert_array_equal(gb[1], b)
        else:  # exact: f32 in, f32 out
            np.testing.assert_array_equal(ga[1], a)
            np.testing.assert_array_equal(gb[1], permute(b, heads) if heads else b)
    check_deltas(made, arch, out)
    expected = expected_metadata(made, MODELS[arch][3], 16.0, out)
    assert meta == expected and list(meta) == list(expected)
    assert list(meta)[:3] == ["general.architecture", "general.type", "adapter.type"]
    assert meta["general.architecture"] == MODELS[arch][3] and meta["general.type"] == "adapter"
    assert meta["adapter.type"] == "lora" and meta["general.quantization_version"] == 2


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_types(gguf_type, dtype, tmp_path):
    """f32: exact; f16 / bf16: each value rounded once (to nearest even) from the stored one; q8_0: gguf's own
    quantization of it (rows of 32), within half a step of its block; rows of r = 8 elements fall back to f16."""
    made = make(tmp_path, "llama", ATTN_MLP + ["embed_tokens"], dtype=dtype)
    out = tmp_path / "lora.gguf"
    rep = convert(made.adapter, out, to="gguf", base_config=made.base, gguf_type=gguf_type)
    _, tensors = read(out)
    for module, (a, b) in made.factors.items():
        name = _gguf_name(module)
        heads = heads_of(made, module, "llama")
        want = {"lora_a": a.T if module == "model.embed_tokens" else a,
                "lora_b": permute(b, heads) if heads else b}
        for part, x in want.items():
            kind, got, raw = tensors[f"{name}.{part}"]
            x = np.ascontiguousarray(x, dtype=np.float32)
            if gguf_type == "f32":
                assert kind == "F32"
                np.testing.assert_array_equal(got, x)
            elif gguf_type == "f16" or (gguf_type == "q8_0" and x.shape[-1] % 32):
                assert kind == "F16"
                np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))
            elif gguf_type == "bf16":
                assert kind == "BF16"
                np.testing.assert_array_equal(got, torch.from_numpy(x).to(torch.bfloat16).float().numpy())
            else:
                assert kind == "Q8_0"
                q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
                np.testing.assert_array_equal(raw.reshape(-1), q.reshape(-1))
                blocks = x.reshape(-1, 32)
                d = np.abs(blocks).max(axis=1, keepdims=True) / 127  # the block's step; stored as f16
                d16 = d.astype(np.float16).astype(np.float32)
                err = np.abs(got.reshape(-1, 32) - blocks)
                assert np.all(err <= 0.5 * d + 127 * np.abs(d16 - d) + 1e-12)  # half a step + the f16 step's error
    if gguf_type == "q8_0":  # lora_b (out x 8) and token_embd's lora_a (vocab x 8): f16, as the converter does
        assert len(rep.fallback) == len(made.factors) + 1 and any("F16" in n for n in rep.notes)
    tol = {"f32": 1e-6, "f16": 2e-3, "bf16": 2e-2, "q8_0": 3e-2}[gguf_type]
    check_deltas(made, "llama", out, atol=tol)


def test_gemma3_attention_and_mlp(tmp_path):
    made = make(tmp_path, "gemma3", ATTN_MLP)
    out = tmp_path / "g3.gguf"
    convert(made.adapter, out, to="gguf", base_config=made.base / "config.json")
    meta = check_deltas(made, "gemma3", out)
    assert meta["general.architecture"] == "gemma3"


# ----------------------------------------------------------------------------- scales: one alpha per file


def test_rank_and_alpha_patterns_are_folded_into_lora_b(tmp_path):
    made = make(tmp_path, "qwen2", ATTN_MLP, r=8, lora_alpha=16, rank_pattern={"v_proj": 4, "down_proj": 12},
                alpha_pattern={"o_proj": 3, "down_proj": 40})
    out = tmp_path / "lora.gguf"
    rep = convert(made.adapter, out, to="gguf", arch="qwen2")
    meta = check_deltas(made, "qwen2", out)
    assert meta["adapter.lora.alpha"] == 16.0 and rep.alpha == 16.0
    # v_proj: alpha 16 at r 4 is alpha / r in llama.cpp too; o_proj and down_proj are not
    assert set(rep.folded) == {f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.o_proj", "mlp.down_proj")}
    assert rep.folded["model.layers.0.self_attn.o_proj"] == pytest.approx(3 / 16)
    assert any("folded into lora_b" in n for n in rep.notes)


def test_rslora(tmp_path):
    made = make(tmp_path, "llama", ATTN_MLP, use_rslora=True, rank_pattern={"gate_proj": 2})
    out = tmp_path / "lora.gguf"
    rep = convert(made.adapter, out, to="gguf", base_config=made.base)
    check_deltas(made, "llama", out)
    assert rep.alpha == pytest.approx(16 * np.sqrt(8), rel=1e-7)  # most modules: alpha / sqrt(8) = alpha' / 8
    assert set(rep.folded) == {f"model.layers.{i}.mlp.gate_proj" for i in range(2)}


# ----------------------------------------------------------------------------- refusals


def test_refusals(tmp_path):
    dora = make(tmp_path / "dora", "qwen2", ["q_proj", "v_proj"], use_dora=True)
    with pytest.raises(UnsupportedError, match=r"DoRA.*self_attn\.q_proj"):
        convert(dora.adapter, tmp_path / "x.gguf", to="gguf", arch="qwen2")
    bias = make(tmp_path / "bias", "qwen2", ["q_proj"], lora_bias=True)
    with pytest.raises(UnsupportedError, match="lora_B bias"):
        convert(bias.adapter, tmp_path / "x.gguf", to="gguf", arch="qwen2")
    saved = make(tmp_path / "saved", "qwen2", ["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(UnsupportedError, match=r"full tensors \('lm_head.weight'.*modules_to_save"):
        convert(saved.adapter, tmp_path / "x.gguf", to="gguf", arch="qwen2")
    gemma = make(tmp_path / "gemma", "gemma", ["q_proj", "lm_head"])
    with pytest.raises(UnsupportedError, match=r"'lm_head'.*ignored in base model"):
        convert(gemma.adapter, tmp_path / "x.gguf", to="gguf", arch="gemma")
    tied = make(tmp_path / "tied", "qwen2", ["q_proj", "lm_head"], config={"tie_word_embeddings": True})
    with pytest.raises(UnsupportedError, match=r"'lm_head'.*tie_word_embeddings"):
        convert(tied.adapter, tmp_path / "x.gguf", to="gguf", base_config=tied.base)
    head3 = make(tmp_path / "head3", "gemma3", ["q_proj", "lm_head"])  # Gemma 3 ties by default
    with pytest.raises(UnsupportedError, match=r"'lm_head'.*tie_word_embeddings"):
        convert(head3.adapter, tmp_path / "x.gguf", to="gguf", base_config=head3.base)
    for arch in ("gemma", "gemma2"):  # llama.cpp would apply token_embd's LoRA to the tied output and abort
        emb = make(tmp_path / arch, arch, ["q_proj", "embed_tokens"])
        with pytest.raises(UnsupportedError, match=r"'model.embed_tokens'.*GGML_ASSERT"):
            convert(emb.adapter, tmp_path / "x.gguf", to="gguf", base_config=emb.base)
    tied_emb = make(tmp_path / "tied_emb", "qwen2", ["q_proj", "embed_tokens"], config={"tie_word_embeddings": True})
    with pytest.raises(UnsupportedError, match=r"'model.embed_tokens'.*tie_word_embeddings.*GGML_ASSERT"):
        convert(tied_emb.adapter, tmp_path / "x.gguf", to="gguf", base_config=tied_emb.base)
    with pytest.raises(LorafuseValueError, match=r"embedding LoRA needs --base-config"):
        convert(tied_emb.adapter, tmp_path / "x.gguf", to="gguf", arch="qwen2")
    emb3 = make(tmp_path / "emb3", "gemma3", ["q_proj", "embed_tokens"])
    with pytest.raises(UnsupportedError, match=r"'model.embed_tokens'.*Gemma 3"):
        convert(emb3.adapter, tmp_path / "x.gguf", to="gguf", base_config=emb3.base)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".x.gguf*"))


def test_unknown_modules_conv_and_options(tmp_path):
    rng = np.random.default_rng(0)
    odd = lorafuse.Adapter.from_state_dict({
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.standard_normal((4, 64), np.float32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": rng.standard_normal((64, 4), np.float32),
        "base_model.model.model.layers.0.mlp.router.lora_A.weight": rng.standard_normal((4, 64), np.float32),
        "base_model.model.model.layers.0.mlp.router.lora_B.weight": rng.standard_normal((8, 4), np.float32),
    })
    with pytest.raises(MissingModuleError, match=r"'model.layers.0.mlp.router' \(8, 64\)"):
        convert(odd, tmp_path / "x.gguf", to="gguf", arch="qwen2")
    conv = lorafuse.Adapter.from_state_dict({
        "base_model.model.model.layers.0.conv.lora_A.weight": rng.standard_normal((4, 3, 3, 3), np.float32),
        "base_model.model.model.layers.0.conv.lora_B.weight": rng.standard_normal((8, 4, 1, 1), np.float32),
    })
    with pytest.raises(UnsupportedError, match=r"convolution LoRA \('model.layers.0.conv'\)"):
        convert(conv, tmp_path / "x.gguf", to="gguf", arch="qwen2")
    made = make(tmp_path / "m", "llama", ["q_proj", "v_proj"])
    with pytest.raises(LorafuseValueError, match=r"q_proj.*head counts.*--base-config"):
        convert(made.adapter, tmp_path / "x.gguf", to="gguf", arch="llama")  # llama q / k need the heads
    with pytest.raises(LorafuseValueError, match=r"--arch \(llama, mistral, qwen2"):
        convert(made.adapter, tmp_path / "x.gguf", to="gguf")
    with pytest.raises(LorafuseValueError, match="does not match"):
        convert(made.adapter, tmp_path / "x.gguf", to="gguf", arch="qwen2", base_config=made.base)
    with pytest.raises(LorafuseValueError, match=r"\.gguf"):
        convert(made.adapter, tmp_path / "x.safetensors", to="gguf", base_config=made.base)
    with pytest.raises(LorafuseValueError, match="gguf only"):
        convert(made.adapter, tmp_path / "x.safetensors", to="kohya", arch="llama")
    # an in-memory adapter (no folder, no model card): general.name from the output's name
    names = {"model.layers.1.self_attn.v_proj": (4, 64, 32), "model.layers.0.mlp.down_proj": (4, 96, 64)}
    mem = lorafuse.Adapter.from_state_dict({
        f"base_model.model.{m}.lora_{ab}.weight": rng.standard_normal((r, i) if ab == "A" else (o, r), np.float32)
        for m, (r, i, o) in names.items() for ab in "AB"})
    rep = convert(mem, tmp_path / "mem.gguf", to="gguf", arch="qwen3", gguf_type="f16")
    meta, tensors = read(tmp_path / "mem.gguf")
    assert meta["general.name"] == "mem" and meta["general.architecture"] == "qwen3" and rep.alpha == 4.0
    assert set(tensors) == {"blk.1.attn_v.weight.lora_a", "blk.1.attn_v.weight.lora_b",
                            "blk.0.ffn_down.weight.lora_a", "blk.0.ffn_down.weight.lora_b"}
    # v_proj alone needs no head count
    only_v = make(tmp_path / "v", "mistral", ["v_proj"])
    convert(only_v.adapter, tmp_path / "v.gguf", to="gguf", arch="mistral")
    check_deltas(only_v, "mistral", tmp_path / "v.gguf")


# ----------------------------------------------------------------------------- the command line


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli(tmp_path, capsys):
    made = make(tmp_path, "llama", ATTN_MLP + ["embed_tokens", "lm_head"])
    code, out, err = _run(capsys, "convert", made.adapter, "--to", "gguf", "--base-config", made.base,
                          "--gguf-type", "bf16", "-o", f"{tmp_path}/outs/")
    assert code == 0, err
    written = tmp_path / "outs" / "adapter.gguf"  # a folder name: the input's name with .gguf
    assert f"wrote {written}" in out and "bf16 GGUF LoRA for llama.cpp (llama)" in out
    assert "note: left out 2 saved base weights" in err  # PEFT's copies of the LoRA'd embedding / lm_head
    check_deltas(made, "llama", written, atol=2e-2)
    api = tmp_path / "api.gguf"
    convert(made.adapter, api, to="gguf", base_config=made.base, gguf_type="bf16")
    assert read(api)[0] == read(written)[0]
    assert all(np.array_equal(x[2], y[2]) for x, y in zip(read(api)[1].values(), read(written)[1].values()))
    code, out, _ = _run(capsys, "convert", made.adapter, "--to", "gguf", "--base-config", made.base, "-o",
                        tmp_path / "j.gguf", "--json")
    report = json.loads(out)
    assert code == 0 and report["arch"] == "llama" and report["alpha"] == 16 and report["gguf_type"] == "f32"
    assert report["ranks"]["blk.0.attn_q.weight"] == 8 and report["folded"] == {}


def test_an_earlier_gguf_output_is_replaced_and_other_files_are_not(tmp_path, capsys):
    """Outputs follow the project's rules: an earlier lorafuse GGUF output is replaced without --overwrite;
    a GGUF file lorafuse did not write (no mark), a damaged one, or another file is refused with exit 1 and
    left as it was."""
    made = make(tmp_path, "qwen2", ATTN_MLP)
    out = tmp_path / "x.gguf"
    assert _run(capsys, "convert", made.adapter, "--to", "gguf", "--arch", "qwen2", "-o", out)[0] == 0
    first = out.read_bytes()
    code, _, err = _run(capsys, "convert", made.adapter, "--to", "gguf", "--arch", "qwen2", "--gguf-type", "f16",
                        "-o", out)
    assert code == 0, err
    assert out.read_bytes() != first and read(out)[0]["general.type"] == "adapter"
    foreign = tmp_path / "foreign.gguf"  # a GGUF file without lorafuse's mark
    w = gguf.GGUFWriter(str(foreign), "qwen2")
    w.add_string("general.type", "adapter")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(first[: len(first) // 2])
    for victim in (foreign, damaged):
        before = victim.read_bytes()
        code, _, err = _run(capsys, "convert", made.adapter, "--to", "gguf", "--arch", "qwen2", "-o", victim)
        assert code == 1 and "--overwrite" in err, err
        assert victim.read_bytes() == before


@pytest.mark.parametrize(("extra", "code", "message"), [
    (["--arch", "llama"], 2, "head counts"),  # LorafuseValueError: bad arguments
    ([], 2, "needs the base model's architecture"),
    (["--arch", "gemma", "--base-config", "BASE"], 2, "does not match"),
    (["--arch", "gemma"], 1, "UnsupportedError"),  # lm_head: llama.cpp's gemma has no output tensor
    (["--arch", "falcon"], 2, "invalid choice"),
    (["--base-config", "BASE", "--gguf-type", "q4_0"], 2, "invalid choice"),
    (["--base-config", "BASE", "--family", "sd1"], 2, "family"),
])
def test_cli_errors(extra, code, message, tmp_path, capsys):
    made = make(tmp_path, "llama", ["q_proj", "lm_head"])
    argv = ["convert", made.adapter, "--to", "gguf", "-o", tmp_path / "x.gguf",
            *[made.base if a == "BASE" else a for a in extra]]
    try:
        got, _, err = _run(capsys, *argv)
    except SystemExit as e:  # argparse
        got, err = int(e.code or 0), capsys.readouterr().err
    assert got == code and message in err
    assert not (tmp_path / "x.gguf").exists()


def test_cli_refusal_exit_1(tmp_path, capsys):
    made = make(tmp_path, "qwen2", ["q_proj"], use_dora=True)
    code, _, err = _run(capsys, "convert", made.adapter, "--to", "gguf", "--arch", "qwen2", "-o", tmp_path / "x.gguf")
    assert code == 1 and "UnsupportedError" in err and "DoRA" in err and "model.layers.0.self_attn.q_proj" in err


def test_cli_gguf_options_need_to_gguf(tmp_path, capsys):
    made = make(tmp_path, "qwen2", ["q_proj"])
    code, _, err = _run(capsys, "convert", made.adapter, "--to", "kohya", "--arch", "qwen2", "-o",
                        tmp_path / "x.safetensors")
    assert code == 2 and "--arch: for --to gguf only" in err


def test_help_shows_the_gguf_example(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = capsys.readouterr().out
    assert "--to gguf --base-config" in text and "--gguf-type" in text and "--arch" in text


# ----------------------------------------------------------------------------- llama.cpp's own converter


LLAMA_CPP = os.environ.get("LORAFUSE_LLAMA_CPP")


@pytest.mark.skipif(not LLAMA_CPP, reason="set LORAFUSE_LLAMA_CPP to a llama.cpp checkout to run its converter")
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("gguf_type", ["f32", "bf16", "q8_0"])
def test_same_file_as_convert_lora_to_gguf(arch, gguf_type, tmp_path):
    targets = ATTN_MLP + (["embed_tokens", "lm_head"] if arch != "gemma2" else [])
    made = make(tmp_path, arch, targets, dtype=torch.bfloat16)
    ref = tmp_path / "ref.gguf"
    script = Path(str(LLAMA_CPP)) / "convert_lora_to_gguf.py"
    subprocess.run([sys.executable, str(script), "--base", str(made.base), "--outtype", gguf_type, "--outfile",
                    str(ref), str(made.adapter)], check=True, capture_output=True)
    out = tmp_path / "ours.gguf"
    convert(made.adapter, out, to="gguf", base_config=made.base, gguf_type=gguf_type)
    meta_ref, tensors_ref = read(ref)
    meta, tensors = read(out)
    assert meta.pop("lorafuse_version") == lorafuse.__version__
    assert list(meta.items()) == list(meta_ref.items())
    assert list(tensors) == list(tensors_ref)
    for name, (kind, _, raw) in tensors.items():
        assert kind == tensors_ref[name][0] and np.array_equal(raw, tensors_ref[name][2]), name
    shutil.rmtree(tmp_path)


# ----------------------------------------------------------------------------- llama.cpp itself

# The base model as a GGUF, by llama.cpp's own converter (its conversion package and gguf-py, in a process of
# their own); no tokenizer: 'no_vocab' with vocab_size dummy tokens, which llama.cpp loads.
_BASE_TO_GGUF = """
import sys
from pathlib import Path
root, base, out = sys.argv[1:]
sys.path[:0] = [root + "/gguf-py", root]
import gguf
from conversion import get_model_class
import json
cls = get_model_class(json.loads((Path(base) / "config.json").read_text())["architectures"][0])
class NoVocab(cls):
    model_arch = cls.model_arch
    def set_vocab(self):
        self.gguf_writer.add_tokenizer_model("no_vocab")
        self.gguf_writer.add_vocab_size(self.hparams["vocab_size"])
NoVocab(Path(base), gguf.LlamaFileType.ALL_F32, Path(out), eager=True).write()
"""


def _llama_cpp_logits(llama_cpp, model: Path, lora: Path | None, tokens: list[int]) -> np.ndarray:
    """The last token's logits from llama.cpp (llama-cpp-python's bindings of its C API)."""
    m = llama_cpp.llama_model_load_from_file(str(model).encode(), llama_cpp.llama_model_default_params())
    assert m, f"llama.cpp could not load {model}"
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = 64
    ctx = llama_cpp.llama_init_from_model(m, params)
    try:
        if lora is not None:
            adapter = llama_cpp.llama_adapter_lora_init(m, str(lora).encode())
            assert adapter, f"llama.cpp could not load the LoRA {lora}"
            adapters, scales = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter), (ctypes.c_float * 1)(1.0)
            assert llama_cpp.llama_set_adapters_lora(ctx, adapters, 1, scales) == 0
        ids = (llama_cpp.llama_token * len(tokens))(*tokens)  # kept alive: the batch points into it
        batch = llama_cpp.llama_batch_get_one(ids, len(tokens))
        assert llama_cpp.llama_decode(ctx, batch) == 0
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(m))
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).astype(np.float64)
    finally:
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(m)


@pytest.mark.skipif(not LLAMA_CPP, reason="set LORAFUSE_LLAMA_CPP to a llama.cpp checkout (and install "
                    "llama-cpp-python) to run the adapters in llama.cpp")
@pytest.mark.parametrize(("arch", "gguf_type", "lora", "tol"), [
    ("llama", "f32", {}, 2e-3),
    ("llama", "q8_0", {}, 2e-2),
    ("mistral", "f32", {"use_rslora": True, "rank_pattern": {"v_proj": 4}, "alpha_pattern": {"o_proj": 5}}, 2e-3),
    ("qwen2", "f32", {}, 2e-3),
    ("qwen3", "bf16", {}, 2e-2),
    ("gemma2", "f32", {}, 2e-3),
])
def test_llama_cpp_gives_peft_logits(arch, gguf_type, lora, tol, tmp_path):
    """llama.cpp loads the file (llama_adapter_lora_init) and its logits with the LoRA are PEFT's, to float32
    kernel accuracy (the base alone differs from transformers about as much), while the LoRA moves them by O(1)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    gemma = arch.startswith("gemma")
    config = {"query_pre_attn_scalar": 16, "tie_word_embeddings": True} if gemma else {"tie_word_embeddings": False}
    targets = ATTN_MLP + ([] if gemma else ["embed_tokens", "lm_head"])
    made = make(tmp_path, arch, targets, config=config, **lora)
    base_gguf = tmp_path / "base.gguf"
    subprocess.run([sys.executable, "-c", _BASE_TO_GGUF, str(LLAMA_CPP), str(made.base), str(base_gguf)],
                   check=True, capture_output=True)
    out = tmp_path / "lora.gguf"
    convert(made.adapter, out, to="gguf", base_config=made.base, gguf_type=gguf_type)
    tokens = [3, 17, 42, 99, 5, 77, 12, 64]
    model = getattr(transformers, MODELS[arch][1]).from_pretrained(made.base, attn_implementation="eager")
    peft_model = peft.PeftModel.from_pretrained(model, made.adapter).eval()
    with torch.no_grad():
        want = peft_model(torch.tensor([tokens])).logits[0, -1].double().numpy()
        with peft_model.disable_adapter():
            base = peft_model(torch.tensor([tokens])).logits[0, -1].double().numpy()
    got = _llama_cpp_logits(llama_cpp, base_gguf, out, tokens)
    got_base = _llama_cpp_logits(llama_cpp, base_gguf, None, tokens)
    scale = np.abs(want).max()
    assert np.abs(want - base).max() > 0.1 * scale  # the LoRA matters
    assert np.abs(got_base - base).max() < tol * scale
    assert np.abs(got - want).max() < tol * scale
