"""How often does a merge give the correctly rounded BF16 weight? PEFT against lorafuse, K = 1 and 3 adapters.

A small random Llama-shaped base in BF16 (transformers, save_pretrained as safetensors) and three
PEFT LoRA adapters (rank 16, lora_alpha 32, every linear module, A and B float32 random, B scaled so
that |scale_k B_k A_k| is about --scale x |W|, i.e. a few to a few dozen BF16 ulps of W) are merged

  (a) by PEFT: PeftModel.from_pretrained(base in bf16, adapter 1) + load_adapter for the others +
      merge_and_unload(adapter_names=[all K]), defaults (safe_merge=False, adapters autocast to fp32);
  (b) by lorafuse: `lorafuse apply BASE A1 [A2 A3] -o OUT` in a child process.

Each tool's merged weights (the targeted ones) are compared to the reference
W + sum_k scale_k B_k A_k computed in float64 from the very tensors both tools read, then rounded
to BF16 once, to nearest even, by hand (numpy: torch's float64 -> bfloat16 cast goes through
float32 and can round twice). Printed per K and tool, over every merged (targeted) weight: the
share of values equal to that correctly rounded merge; the largest distance from it in BF16 ulps
of the result (adjacent BF16 values are 1 apart: a result near 0 after cancellation, where the
spacing is tiny, can be thousands of ulps off while off by little in absolute terms); and the
largest |merged - exact| in units of the BF16 spacing at |W| + sum_k |dW_k|, a bound on every
partial sum a merge goes through, so the scale its arithmetic works at (one correct rounding: at
most 0.5). No timings.

    python benchmarks/bench_rounding.py [--seed 0] [--layers 2] [--scale 0.1]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 16, 32
N_ADAPTERS = (1, 3)


def round_to_bf16(x: np.ndarray):  # -> torch.Tensor (bfloat16)
    """float64 -> BF16, rounded once to nearest, ties to even (finite values in BF16's range)."""
    import torch

    x = np.asarray(x, dtype=np.float64)
    _, e = np.frexp(x)  # |x| in [2^(e-1), 2^e)
    q = np.maximum(e - 8, -133)  # exponent of the BF16 spacing there (8 significant bits; -133: subnormals)
    r = np.ldexp(np.rint(np.ldexp(x, -q)), q)  # np.rint: half to even; all three steps exact
    if not np.isfinite(r).all() or np.abs(r).max(initial=0) > 3.3895313892515355e38:
        raise OverflowError("value outside BF16's finite range")
    return torch.from_numpy(r.astype(np.float32)).to(torch.bfloat16)  # r is a BF16 value: both casts exact


def check_rounding() -> None:
    """round_to_bf16 agrees with torch's float32 -> BF16 (correctly rounded) and beats float64 -> BF16."""
    import torch

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1 << 16, generator=g) * torch.exp2(torch.randint(-40, 40, (1 << 16,), generator=g).float())
    x[:4] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2.0**-130])  # ties, a subnormal
    assert torch.equal(round_to_bf16(x.double().numpy()).view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
    just_above_tie = np.array([1 + 2**-8 + 2**-40])
    assert round_to_bf16(just_above_tie).item() == 1 + 2**-7  # torch's float64 cast gives 1.0 here


def ulp_index(t):  # torch bf16 tensor -> np.ndarray[int32]
    """Map BF16 values onto consecutive integers (+0 and -0 both 0): the distance in ulps is a difference."""
    import torch

    b = t.detach().contiguous().view(torch.int16).numpy().astype(np.int32)
    return np.where(b < 0, -(b & 0x7FFF), b)


def build_base(directory: Path, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)  # safetensors


def build_adapters(base_dir: Path, directories: list[Path], scale: float, seed: int) -> None:
    """Real PEFT adapters saved with save_pretrained; B's magnitude set per module from W's std."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.0)
    model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed)
    for directory in directories:
        for module in model.modules():
            if not hasattr(module, "lora_A") or "default" not in module.lora_A:
                continue
            w_std = module.get_base_layer().weight.float().std().item()
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            # std(scaling * B @ A) = scaling * c * sqrt(r) for standard normal A, B: make it scale * std(W)
            c = scale * w_std / (module.scaling["default"] * RANK**0.5)
            with torch.no_grad():
                a.copy_(torch.randn(a.shape, generator=g, dtype=torch.float32))
                b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float32) * c)
        model.save_pretrained(directory)


def read_adapter(directory: Path) -> dict[str, tuple]:
    """{base weight name: (A, B)} from the adapter file as saved (float32)."""
    from safetensors.torch import load_file

    state = load_file(str(directory / "adapter_model.safetensors"))
    pairs = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            b = state[module + ".lora_B.weight"]
            assert a.dtype == b.dtype and str(a.dtype) == "torch.float32", (key, a.dtype)
            pairs[module.removeprefix("base_model.model.") + ".weight"] = (a, b)
    return pairs


def reference(base: dict, adapters: list[dict]) -> dict:
    """{name: (exact, rounded, magnitude)}: W + sum_k (alpha/r) B_k A_k in float64 (each product exact, the
    sums to 2^-53 relative), that rounded to BF16 once, and |W| + sum_k |(alpha/r) B_k A_k|, which bounds
    every partial sum a merge goes through."""
    out = {}
    for name in adapters[0]:
        acc = base[name].double()
        mag = acc.abs()
        for pairs in adapters:
            a, b = pairs[name]
            delta = (ALPHA / RANK) * (b.double() @ a.double())
            acc, mag = acc + delta, mag + delta.abs()
        out[name] = (acc.numpy(), round_to_bf16(acc.numpy()), mag.numpy())
    return out


def bf16_spacing(x: np.ndarray) -> np.ndarray:
    """The distance between adjacent BF16 values at |x| (x float64)."""
    return np.ldexp(1.0, np.maximum(np.frexp(x)[1] - 8, -133))


def merge_peft(base_dir: Path, adapter_dirs: list[Path]) -> dict:
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    names = [f"a{i}" for i in range(len(adapter_dirs))]
    model = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name=names[0])
    for name, directory in zip(names[1:], adapter_dirs[1:]):
        model.load_adapter(directory, adapter_name=name)
    for module in model.modules():  # PEFT's defaults keep the float32 adapter weights in float32
        if hasattr(module, "lora_A") and names[0] in module.lora_A:
            assert all(module.lora_A[n].weight.dtype == torch.float32 for n in names)
            assert module.get_base_layer().weight.dtype == torch.bfloat16
    merged = model.merge_and_unload(adapter_names=names)  # merges names[0], names[1], ... in turn
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def merge_lorafuse(base_dir: Path, adapter_dirs: list[Path], out: Path) -> dict:
    from safetensors.torch import load_file

    cmd = [sys.executable, "-m", "lorafuse", "apply", str(base_dir), *map(str, adapter_dirs), "-o", str(out), "-q"]
    subprocess.run(cmd, check=True)
    return load_file(str(out / "model.safetensors"))


def score(merged: dict, ref: dict) -> tuple[int, int, int, float]:
    """(values, values equal to the correctly rounded merge, largest distance from it in ulps of the
    result, largest |merged - exact| in BF16 ulps at |W| + sum_k |dW_k|: one correct rounding is <= 0.5)."""
    import torch

    n = same = worst = 0
    worst_w = 0.0
    for name, (exact, r, magnitude) in ref.items():
        m = merged[name]
        assert m.dtype == torch.bfloat16 and m.shape == r.shape, (name, m.dtype, m.shape)
        d = np.abs(ulp_index(m) - ulp_index(r))
        n, same, worst = n + d.size, same + int((d == 0).sum()), max(worst, int(d.max()))
        err = np.abs(m.double().numpy() - exact) / bf16_spacing(magnitude)
        worst_w = max(worst_w, float(err.max()))
    return n, same, worst, worst_w


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--scale", type=float, default=0.1, help="std(delta of one adapter) / std(W), per module")
    args = p.parse_args()

    import warnings

    import peft
    import torch
    import transformers
    from safetensors.torch import load_file

    import lorafuse

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    torch.set_num_threads(2)
    check_rounding()
    with tempfile.TemporaryDirectory(prefix="bench_rounding_") as tmp:
        root = Path(tmp)
        base_dir, dirs = root / "base", [root / f"adapter{i}" for i in range(max(N_ADAPTERS))]
        build_base(base_dir, args.layers, 256, 688, 4, 2, args.seed)
        build_adapters(base_dir, dirs, args.scale, args.seed + 1)
        base = load_file(str(base_dir / "model.safetensors"))
        adapters = [read_adapter(d) for d in dirs]
        names = list(adapters[0])
        ratio = np.mean(
            [
                ((ALPHA / RANK) * (adapters[0][k][1] @ adapters[0][k][0])).abs().mean().item()
                / base[k].float().abs().mean().item()
                for k in names
            ]
        )
        print(
            f"seed {args.seed}, {args.layers} layers (hidden 256, intermediate 688), {len(names)} merged weights, "
            f"rank {RANK}, alpha {ALPHA}; mean|dW|/mean|W| per adapter {ratio:.3f}"
        )
        print(
            "reference: W + sum_k scale B_k A_k in float64, rounded once to bf16 (nearest even); "
            f"PEFT {peft.__version__} merge_and_unload in bf16, lorafuse {lorafuse.__version__} apply"
        )
        print()
        row = "{:>2}  {:<9} {:>9}  {:>17}  {:>7}  {:>9}  {:>28}"
        print(
            row.format("K", "tool", "values", "correctly rounded", "not", "max error", "max error / ulp(|W|+sum|dW|)")
        )
        for k in N_ADAPTERS:
            ref = reference(base, adapters[:k])
            results = {
                "PEFT": merge_peft(base_dir, dirs[:k]),
                "lorafuse": merge_lorafuse(base_dir, dirs[:k], root / f"lorafuse_{k}"),
            }
            for tool, merged in results.items():
                n, same, worst, worst_w = score(merged, ref)
                print(row.format(k, tool, n, f"{100 * same / n:.4f}%", n - same, f"{worst} ulp", f"{worst_w:.3f}"))


if __name__ == "__main__":
    main()
