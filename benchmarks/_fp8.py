"""bench_apply.py --fp8: the TinyLlama-shaped case as a block-scaled FP8 checkpoint (DeepSeek-V3 /
transformers `fp8` layout: F8_E4M3 `weight` + F32 `weight_scale_inv` per 128x128 block), merged by
lorafuse (keeping FP8: dequantize, merge in float32, quantize again with fresh scales) and by a torch
script doing the same on the same files (the peer: what a user writes today).

The FP8 base is converted from the bench's bf16 base, shard by shard: every linear weight of the
decoder layers gets scales amax / 448 per block (1 for an all-zero block, as transformers'
Fp8Quantize); embeddings, norms and lm_head stay bf16 (transformers' modules_to_not_convert).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

BLOCK = 128
FP8_MAX = 448.0
QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
TORCH_CHILD_COMMAND = "_fp8-torch-child"
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _is_linear(name: str) -> bool:
    return name.endswith(".weight") and ".layers." in name and name.rsplit(".", 2)[-2] in LINEAR


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (out, in) -> (float8_e4m3fn codes, float32 scale_inv per 128x128 block), vectorized."""
    rows, cols = w.shape
    nr, nc = -(-rows // BLOCK), -(-cols // BLOCK)
    padded = torch.zeros(nr * BLOCK, nc * BLOCK, dtype=torch.float32)
    padded[:rows, :cols] = w
    blocks = padded.view(nr, BLOCK, nc, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    codes = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes.view(nr * BLOCK, nc * BLOCK)[:rows, :cols].contiguous(), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows, cols = codes.shape
    s = scale.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
    return codes.to(torch.float32) * s


def _shards(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors"]


def convert_base(bf16_dir: Path, out_dir: Path) -> None:
    """The bf16 bench base as block-scaled FP8 (one shard in memory at a time)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    for shard in _shards(bf16_dir):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(bf16_dir / shard), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if _is_linear(name):
                    codes, scale = quantize(t.to(torch.float32))
                    tensors[name], tensors[name[: -len("weight")] + "weight_scale_inv"] = codes, scale
                else:
                    tensors[name] = t
        save_file(tensors, str(out_dir / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in tensors})
    if (bf16_dir / "model.safetensors.index.json").exists():
        (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((bf16_dir / "config.json").read_text())
    config["quantization_config"] = QUANT_CONFIG
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))


def torch_child(base_dir: str, adapter_dir: str, out_dir: str, threads: int) -> int:
    """The peer: dequantize -> merge (float32, W + alpha/r * B @ A) -> quantize again, with torch, per shard."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    base, out = Path(base_dir), Path(out_dir)
    out.mkdir(parents=True)
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    scale = float(cfg["lora_alpha"]) / float(cfg["r"])
    lora = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    merged = 0
    for shard in _shards(base):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(base / shard), "pt") as f:
            names = list(f.keys())
            for name in names:
                if name.endswith("weight_scale_inv") and name in tensors:
                    continue
                t = f.get_tensor(name)
                scale_name = name[: -len("weight")] + "weight_scale_inv" if name.endswith(".weight") else ""
                a_key = f"base_model.model.{name[: -len('.weight')]}.lora_A.weight"
                if scale_name in names and a_key in lora:
                    w = dequantize(t, f.get_tensor(scale_name))
                    b = lora[a_key.replace("lora_A", "lora_B")]
                    w += scale * (b.to(torch.float32) @ lora[a_key].to(torch.float32))
                    tensors[name], tensors[scale_name] = quantize(w)
                    merged += 1
                else:
                    tensors[name] = t
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
    for side in ("config.json", "model.safetensors.index.json", "generation_config.json"):
        if (base / side).exists():
            shutil.copy(base / side, out / side)
    print(f"torch fp8 merge: {merged} weights in {time.perf_counter() - t0:.2f} s", flush=True)
    return 0 if merged else 3


def check(base_fp8: Path, adapter: Path, outputs: dict[str, Path], layers: int) -> bool:
    """Both outputs, dequantized, against the float64 merge of the dequantized base: the relative Frobenius
    error must be within FP8's (about 2-3%), the scales must match the merged blocks' amax / 448."""
    from safetensors import safe_open

    def get(folder: Path, name: str) -> torch.Tensor:
        for shard in _shards(folder):
            with safe_open(str(folder / shard), "pt") as f:
                if name in f.keys():
                    return f.get_tensor(name)
        raise KeyError(name)

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    lscale = float(cfg["lora_alpha"]) / float(cfg["r"])
    ok = True
    print("\ncorrectness (FP8): dequantized output vs float64 merge of the dequantized base")
    for module in ("model.layers.0.self_attn.q_proj", f"model.layers.{layers - 1}.mlp.down_proj"):
        name = f"{module}.weight"
        w = dequantize(get(base_fp8, name), get(base_fp8, module + ".weight_scale_inv")).double()
        with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
            a = f.get_tensor(f"base_model.model.{module}.lora_A.weight").double()
            b = f.get_tensor(f"base_model.model.{module}.lora_B.weight").double()
        exact = w + lscale * (b @ a)
        for label, out in outputs.items():
            codes, s = get(out, name), get(out, module + ".weight_scale_inv")
            if codes.dtype != torch.float8_e4m3fn or s.dtype != torch.float32:
                print(f"  {label:<10} {name}: WRONG dtypes {codes.dtype} / {s.dtype}")
                ok = False
                continue
            back = dequantize(codes, s).double()
            rel = float((back - exact).norm() / exact.norm())
            ok &= rel < 0.05
            err = float((back - exact).abs().max())
            print(f"  {label:<10} {name}: relative error {rel:.4f}, max |error| {err:.3e}")
    print(f"  merge: {'OK' if ok else 'MISMATCH'}")
    return ok
