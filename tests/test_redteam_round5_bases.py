"""Red-team round 5, quantized / MoE / fused bases.

1. `apply --dtype` converts plain float8 tensors (no scale, no quantization config) the adapters do not touch, as
   it converts every other float tensor; a float8 tensor with scale-like tensors lorafuse does not know beside
   it (ComfyUI "scaled fp8" `scale_weight`) is refused instead of being read as values.
2. AutoFP8 / vLLM per-tensor FP8 (`quant_method: fp8` without weight_block_size, `weight_scale` + `input_scale`)
   is read as what it is, W = codes * weight_scale, and merged; a weight whose scale is missing says what is
   beside it.
3. A fused-experts LoRA made for another number of experts says so.
4. transformers 5's 3-D FP8 experts: `<param>_scale_inv` / `<param>_activation_scale` are companions, not
   parameters; refusing such a weight speaks of its shape, not of an unknown scale.

References: float64 in torch / numpy, torch's own float8 conversions, transformers' FP8 loader (dequantize=True) on
the same checkpoint under its names, real PEFT adapters of transformers' Qwen3-MoE.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from redteam_fixtures import PREFIX, peft_folder, read_torch
from safetensors.torch import save_file

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import ShapeMismatchError, UnsupportedError

F8 = torch.float8_e4m3fn
UP, DOWN, GATE, Q = ("model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj",
                     "model.layers.0.self_attn.q_proj")
RANK = 2  # peft_folder's default rank and alpha


read = read_torch


def delta64(adapter: Path, module: str) -> torch.Tensor:
    """scale * B @ A of a peft_folder module, in float64 (alpha = r: scale 1)."""
    t = read(adapter / "adapter_model.safetensors")
    a, b = t[f"{PREFIX}{module}.lora_A.weight"], t[f"{PREFIX}{module}.lora_B.weight"]
    return b.double() @ a.double()


def ulp(x: torch.Tensor, mantissa: int) -> torch.Tensor:
    """The spacing of floats with `mantissa` stored bits at |x| (normal range)."""
    e = torch.floor(torch.log2(x.abs().clamp_min(2.0**-126)))
    return torch.pow(2.0, e - mantissa)


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------- 1. --dtype and plain float8


def plain_f8_base(path: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {f"{UP}.weight": torch.randn(64, 32, generator=g).to(F8),
               f"{DOWN}.weight": torch.randn(32, 64, generator=g).to(F8),
               f"{GATE}.weight": (torch.randn(64, 32, generator=g) * 1000).to(torch.float8_e5m2),
               "model.norm.weight": torch.randn(32, generator=g)}
    save_file(tensors, str(path))
    return tensors


@pytest.mark.parametrize(("dtype", "torch_dtype", "mantissa"), [("bf16", torch.bfloat16, 7),
                                                                ("fp16", torch.float16, 10),
                                                                ("fp32", torch.float32, 23)])
def test_dtype_converts_untouched_plain_float8(tmp_path, capsys, dtype, torch_dtype, mantissa):
    """Every float tensor is written in --dtype: the untouched float8 ones too (exactly: every e4m3 / e5m2 value is
    a bf16 / fp16 / fp32 value), the merged one rounded once from the float32 merge."""
    base = tmp_path / "base.safetensors"
    src = plain_f8_base(base)
    adapter = peft_folder(tmp_path / "ad", {UP: (64, 32)}, seed=1)
    argv = ["apply", base, adapter, "--dtype", dtype, "-o", tmp_path / "out.safetensors"]
    code, out, err = run(capsys, *argv, "--dry-run", "--json")
    assert code == 0, err
    assert json.loads(out)["dtypes"] == {{"bf16": "BF16", "fp16": "F16", "fp32": "F32"}[dtype]: 4}
    assert run(capsys, *argv)[0] == 0
    got = read(tmp_path / "out.safetensors")
    assert {k: v.dtype for k, v in got.items()} == dict.fromkeys(src, torch_dtype)
    for key in (f"{DOWN}.weight", f"{GATE}.weight"):  # torch's own float8 -> float32 conversion, exact in every dtype
        assert torch.equal(got[key].double(), src[key].double()), key
    torch.testing.assert_close(got["model.norm.weight"].double(), src["model.norm.weight"].to(torch_dtype).double(),
                               rtol=0, atol=0)
    w, d = src[f"{UP}.weight"].double(), delta64(adapter, UP)
    ref = w + d
    # one rounding to the dtype, plus (fp32) the float32 merge's own few roundings of its terms
    t = read(adapter / "adapter_model.safetensors")
    terms = t[f"{PREFIX}{UP}.lora_B.weight"].double().abs() @ t[f"{PREFIX}{UP}.lora_A.weight"].double().abs()
    bound = ulp(torch.maximum(torch.maximum(w.abs(), terms), ref.abs()), mantissa) * (4 if mantissa == 23 else 1)
    assert ((got[f"{UP}.weight"].double() - ref).abs() <= bound).all()


def test_dtype_refuses_untouched_scaled_fp8(tmp_path, capsys):
    """A ComfyUI "scaled fp8" weight (`scale_weight` beside it) that --dtype would convert is refused, naming the
    scale, and nothing is written; without --dtype it is copied as it is."""
    g = torch.Generator().manual_seed(2)
    base = tmp_path / "scaled.safetensors"
    codes = torch.randn(32, 64, generator=g).to(F8)
    save_file({f"{DOWN}.weight": codes, f"{DOWN}.scale_weight": torch.tensor([0.02]),
               f"{UP}.weight": torch.randn(64, 32, generator=g)}, str(base))
    adapter = peft_folder(tmp_path / "ad", {UP: (64, 32)}, seed=3)
    out = tmp_path / "out.safetensors"
    for dry in ([], ["--dry-run"]):
        code, _, err = run(capsys, "apply", base, adapter, "--dtype", "bf16", "-o", out, *dry)
        assert code == 1 and not out.exists()
        assert (f"UnsupportedError: {base}: {DOWN}.weight is a F8_E4M3 weight with {DOWN}.scale_weight beside it"
                in err)
        assert "lorafuse will not write as BF16 (dtype) codes whose scale it does not know" in err
    assert run(capsys, "apply", base, adapter, "-o", out)[0] == 0
    got = read(out)
    assert torch.equal(got[f"{DOWN}.weight"].view(torch.uint8), codes.view(torch.uint8))


# ---------------------------------------------------------------- 2. AutoFP8 / vLLM per-tensor FP8


AUTOFP8 = {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}
PROJS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")


def autofp8_base(folder: Path, inv_names: bool = False) -> dict[str, torch.Tensor]:
    """A one-layer Llama in AutoFP8's layout: every projection F8_E4M3 with a 0-d F32 `weight_scale` (amax / 448)
    and `input_scale`; with inv_names, the same tensors under transformers' fp8 names (`weight_scale_inv`,
    `activation_scale`). Returns the tensors (AutoFP8 names)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        v = v.detach().float()
        if any(k.endswith(p + ".weight") for p in PROJS):
            s = (v.abs().max() / 448).reshape(())
            tensors[k] = (v / s).clamp(-448, 448).to(F8)
            tensors[k + "_scale"] = s
            tensors[k.removesuffix("weight") + "input_scale"] = torch.tensor(0.0125)
        else:
            tensors[k] = v
    names = {"weight_scale": "weight_scale_inv", "input_scale": "activation_scale"} if inv_names else {}
    folder.mkdir(parents=True)
    save_file({k.rpartition(".")[0] + "." + names.get(k.rpartition(".")[2], k.rpartition(".")[2]): v
               for k, v in tensors.items()}, str(folder / "model.safetensors"))
    config = cfg.to_dict()
    config["quantization_config"] = {**AUTOFP8, "dequantize": True} if inv_names else AUTOFP8
    (folder / "config.json").write_text(json.dumps(config))
    return tensors


@pytest.fixture(scope="module")
def autofp8(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    pytest.importorskip("transformers")
    tmp = tmp_path_factory.mktemp("autofp8")
    base = autofp8_base(tmp / "base")
    adapter = peft_folder(tmp / "ad", {"model.layers.0.self_attn.q_proj": (32, 32),
                                       "model.layers.0.mlp.up_proj": (64, 32)}, seed=6)
    return tmp / "base", adapter, base


MERGED = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj")


def test_autofp8_info_says_weight_scale(autofp8, capsys):
    base_dir, _, src = autofp8
    code, out, _ = run(capsys, "info", "--json", base_dir)
    info = json.loads(out)
    assert code == 0 and info["quantization"]["supported"] is True
    assert info["quantization"]["scheme"] == "float8 e4m3, per tensor, weight_scale (AutoFP8 / vLLM layout)"
    assert info["parameters"] == sum(v.numel() for k, v in src.items() if not k.endswith("_scale"))


def test_autofp8_keeps_fp8(autofp8, tmp_path):
    """Default: merged weights quantized again with a fresh per-tensor weight_scale amax / 448 (its shape and dtype
    kept), within half an e4m3 ulp of the float64 merge; input_scale, the other weights and their scales and the
    quantization_config copied byte for byte."""
    base_dir, adapter, src = autofp8
    report = lorafuse.apply(base_dir, [adapter], out=tmp_path / "keep", progress=False)
    assert sorted(report.requantized) == sorted(m + ".weight" for m in MERGED)
    got = read(tmp_path / "keep")
    assert set(got) == set(src)
    for m in MERGED:
        ref = src[m + ".weight"].double() * src[m + ".weight_scale"].double() + delta64(adapter, m)
        codes, scale = got[m + ".weight"], got[m + ".weight_scale"]
        assert codes.dtype == F8 and scale.dtype == torch.float32 and scale.shape == ()
        assert math.isclose(float(scale), float(ref.abs().max()) / 448, rel_tol=1e-6)
        back = codes.double() * scale.double()
        assert ((back - ref).abs() <= ref.abs() / 16 + float(scale) * 2.0**-10).all()
    for k in src:
        if k.rpartition(".")[0] not in MERGED or k.endswith("input_scale"):
            assert torch.equal(got[k].reshape(-1).view(torch.uint8), src[k].reshape(-1).view(torch.uint8)), k
    assert json.loads((tmp_path / "keep" / "config.json").read_text())["quantization_config"] == AUTOFP8


def test_autofp8_dtype_matches_transformers(autofp8, tmp_path):
    """--dtype fp32: every weight written dequantized, codes * weight_scale (+ the delta), the scales and the
    quantization_config dropped. Against transformers' own FP8 loader (dequantize=True) reading the same tensors
    under its names: transformers reads AutoFP8's `weight_scale` under no name of its own (it would load the codes
    with scale 1), so its per-tensor `weight_scale_inv` layout is the reference for the arithmetic."""
    from transformers import AutoModelForCausalLM

    base_dir, adapter, src = autofp8
    lorafuse.apply(base_dir, [adapter], out=tmp_path / "fp32", dtype="fp32", progress=False)
    got = read(tmp_path / "fp32")
    assert not any(k.endswith(("_scale", "input_scale")) for k in got)
    assert "quantization_config" not in json.loads((tmp_path / "fp32" / "config.json").read_text())
    autofp8_base(tmp_path / "tf", inv_names=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "tf", dtype=torch.float32).state_dict()
    for p in PROJS:
        key = f"model.layers.0.{p}.weight"
        ref = src[key].double() * src[key + "_scale"].double()
        assert got[key].dtype == torch.float32
        if key.removesuffix(".weight") in MERGED:
            ref = ref + delta64(adapter, key.removesuffix(".weight"))
            torch.testing.assert_close(got[key].double(), ref, rtol=3e-7, atol=1e-7)
            torch.testing.assert_close(got[key].double(), theirs[key].double() + delta64(adapter, key[:-7]),
                                       rtol=3e-7, atol=1e-7)
        else:  # the float32 product, as transformers computes it
            assert torch.equal(got[key], theirs[key]), key
            torch.testing.assert_close(got[key].double(), ref, rtol=2.0**-24, atol=0)


def test_fp8_block_config_with_weight_scale_names_what_is_there(tmp_path):
    """`weight_block_size` says transformers' block layout (`weight_scale_inv`), the weights carry `weight_scale`:
    refused, saying what is beside the weight."""
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    g = torch.Generator().manual_seed(8)
    w = torch.randn(64, 32, generator=g)
    s = (w.abs().max() / 448).reshape(())
    save_file({f"{UP}.weight": (w / s).to(F8), f"{UP}.weight_scale": s, f"{UP}.input_scale": torch.tensor(0.01)},
              str(base_dir / "model.safetensors"))
    (base_dir / "config.json").write_text(json.dumps(
        {"model_type": "llama", "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}))
    adapter = peft_folder(tmp_path / "ad", {UP: (64, 32)}, seed=9)
    with pytest.raises(UnsupportedError) as e:
        lorafuse.apply(base_dir, [adapter], out=tmp_path / "out", progress=False)
    assert (f"no {UP}.weight_scale_inv beside it, so the scale of its codes is unknown (beside it: {UP}.input_scale, "
            f"{UP}.weight_scale): lorafuse will not read these codes") in str(e.value)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 4. transformers 5's 3-D FP8 experts


def fp8_experts_base(folder: Path) -> dict[str, torch.Tensor]:
    experts = "model.layers.0.mlp.experts"
    g = torch.Generator().manual_seed(10)
    tensors = {f"{experts}.gate_up_proj": torch.randn(2, 256, 128, generator=g).to(F8),
               f"{experts}.gate_up_proj_scale_inv": torch.rand(2, 2, 1, generator=g),
               f"{experts}.gate_up_proj_activation_scale": torch.ones(2),
               f"{Q}.weight": torch.randn(128, 128, generator=g).to(F8),
               f"{Q}.weight_scale_inv": torch.full((1, 1), 0.01)}
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "static"}}))
    return tensors


def test_fp8_experts_scales_are_not_parameters(tmp_path, capsys):
    fp8_experts_base(tmp_path / "base")
    code, out, _ = run(capsys, "info", "--json", tmp_path / "base")
    assert code == 0 and json.loads(out)["parameters"] == 2 * 256 * 128 + 128 * 128


def test_fp8_experts_refusal_speaks_of_the_shape(tmp_path):
    """--dtype would dequantize the 3-D experts, which lorafuse does not read: refused for their shape (their scale is
    right there); without --dtype they are copied byte for byte with their scales."""
    src = fp8_experts_base(tmp_path / "base")
    adapter = peft_folder(tmp_path / "ad", {Q: (128, 128)}, seed=11)
    with pytest.raises(UnsupportedError) as e:
        lorafuse.apply(tmp_path / "base", [adapter], out=tmp_path / "bf16", dtype="bf16", progress=False)
    msg = str(e.value)
    assert ("model.layers.0.mlp.experts.gate_up_proj (F8_E4M3 [2, 256, 128]) is quantized with fp8 (float8 e4m3, "
            "block 128x128, weight_scale_inv; from config.json quantization_config), but the weight has 3 dimensions "
            "(lorafuse reads 2-D float8 weights only): lorafuse will not read these codes") in msg
    assert "scale" not in msg.partition(", but ")[2]
    lorafuse.apply(tmp_path / "base", [adapter], out=tmp_path / "keep", progress=False)
    got = read(tmp_path / "keep")
    for k in src:
        if not k.startswith(Q):
            assert torch.equal(got[k].reshape(-1).view(torch.uint8), src[k].reshape(-1).view(torch.uint8)), k


# ---------------------------------------------------------------- 3. fused-experts LoRA for another expert count


def qwen3_moe_adapter(folder: Path, experts: int, r: int) -> None:
    """A real PEFT target_parameters LoRA on the fused gate_up_proj of a Qwen3-MoE with `experts` experts."""
    peft = pytest.importorskip("peft")
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(**MOE, num_experts=experts)
    model = peft.get_peft_model(Qwen3MoeForCausalLM(cfg), peft.LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=[], target_parameters=["mlp.experts.gate_up_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder)


MOE = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 24, "moe_intermediate_size": 12,
       "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
       "num_experts_per_tok": 2}


def test_expert_count_split_base(tmp_path):
    """An 8-expert adapter (r=4: lora_A has 32 rows) on a 4-expert base stored one weight per expert: 32 rows read as
    4 experts of rank 8 would fit, but the config's r says 8 experts."""
    pytest.importorskip("peft")
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Qwen3MoeForCausalLM(Qwen3MoeConfig(**MOE, num_experts=4)).save_pretrained(tmp_path / "base")
    qwen3_moe_adapter(tmp_path / "ad", 8, 4)
    with pytest.raises(ShapeMismatchError) as e:
        lorafuse.apply(tmp_path / "base", [tmp_path / "ad"], out=tmp_path / "out", progress=False)
    assert ("its factors hold r * E = 32 rows: with r=4 (adapter_config.json) that is 8 experts, but base parameter "
            "'model.layers.0.mlp.experts.gate_up_proj' has 4: the adapter was made for a model with 8 experts"
            in str(e.value))
    assert "experts of rank" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_expert_count_fused_base(tmp_path):
    """An 8-expert adapter (r=3: 24 rows) on a fused [5, 24, 16] gate_up_proj: 24 rows split in 5 experts fit no
    rank, and the message says the adapter holds 8 experts."""
    qwen3_moe_adapter(tmp_path / "ad", 8, 3)
    base = tmp_path / "base"
    base.mkdir()
    rng = np.random.default_rng(12)
    save_file({"model.layers.0.mlp.experts.gate_up_proj": torch.from_numpy(rng.standard_normal((5, 24, 16),
                                                                                                dtype=np.float32)),
               "model.layers.0.mlp.experts.down_proj": torch.zeros(5, 16, 12)}, str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    with pytest.raises(ShapeMismatchError) as e:
        lorafuse.apply(base, [tmp_path / "ad"], out=tmp_path / "out", progress=False)
    msg = str(e.value)
    assert "fits none of the base's targeted parameters" in msg
    assert ("its factors hold r * E = 24 rows: with r=3 (adapter_config.json) that is 8 experts, but base parameter "
            "'model.layers.0.mlp.experts.gate_up_proj' has 5") in msg
