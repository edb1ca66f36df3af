"""Round 17 red team, output dtypes: `apply --dtype` converts every float tensor of the base, merged or not.

A tensor that is only converted (no adapter touches it) keeps the NaN / Inf it holds as read, as torch's
`.to(dtype)` does and as a copy without --dtype keeps them (an attention mask's -inf, a NaN buffer), instead of
stopping the run; a finite value that overflows the output dtype is still refused, naming the tensor and not
calling it merged; an F64 weight whose finite values lie beyond float32 is said to be so, not called NaN / Inf."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import lorafuse
from lorafuse.errors import NonFiniteError

Q = "model.layers.0.self_attn.q_proj"


def _base(folder: Path, dtype: torch.dtype, extra: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    tensors = {f"{Q}.weight": torch.randn(16, 16, generator=g, dtype=torch.float64).to(dtype),
               "model.norm.weight": torch.ones(16, dtype=dtype), **extra}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32"}))
    return folder


def _adapter(folder: Path) -> Path:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    save_file({f"base_model.model.{Q}.lora_A.weight": torch.randn(2, 16, generator=g),
               f"base_model.model.{Q}.lora_B.weight": torch.randn(16, 2, generator=g)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))
    return folder


def _reference_merge(base: Path, adapter: Path, dtype: torch.dtype) -> torch.Tensor:
    w = load_file(str(base / "model.safetensors"))[f"{Q}.weight"].double()
    t = load_file(str(adapter / "adapter_model.safetensors"))
    delta = t[f"base_model.model.{Q}.lora_B.weight"].double() @ t[f"base_model.model.{Q}.lora_A.weight"].double()
    return (w + 2.0 * delta).to(dtype)


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dtype_converts_an_unmerged_mask_holding_inf_and_nan_as_torch_does(tmp_path: Path, dtype: str,
                                                                          torch_dtype: torch.dtype) -> None:
    mask = torch.tensor([[0.0, float("-inf")], [float("inf"), float("nan")], [-0.0, 3.0]])
    base = _base(tmp_path / "base", torch.float32, {"model.causal_mask": mask, "model.position_ids": torch.arange(4)})
    adapter = _adapter(tmp_path / "a")
    lorafuse.apply(str(base), [str(adapter)], out=str(tmp_path / "out"), dtype=dtype, progress=False)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = mask.to(torch_dtype)
    assert out["model.causal_mask"].dtype == torch_dtype
    got_mask = out["model.causal_mask"]
    assert torch.equal(got_mask.isnan(), want.isnan())  # (a NaN's payload is the converter's own, as torch's is)
    keep = ~want.isnan()
    assert torch.equal(got_mask[keep].view(torch.int16), want[keep].view(torch.int16))  # -0.0 and +-inf too
    assert torch.equal(out["model.position_ids"], torch.arange(4))
    got, ref = out[f"{Q}.weight"], _reference_merge(base, adapter, torch_dtype)
    assert got.dtype == torch_dtype
    assert (got.float() - ref.float()).abs().max().item() <= ref.float().abs().max().item() * 2.0**-7


def test_a_finite_unmerged_value_beyond_f16_is_refused_naming_it_not_as_merged(tmp_path: Path) -> None:
    base = _base(tmp_path / "base", torch.bfloat16,
                 {"model.embed_tokens.weight": torch.full((4, 16), 1e6, dtype=torch.bfloat16)})
    with pytest.raises(NonFiniteError) as e:
        lorafuse.apply(str(base), [str(_adapter(tmp_path / "a"))], out=str(tmp_path / "out"), dtype="fp16",
                       progress=False)
    assert "model.embed_tokens.weight" in str(e.value) and "65504" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_an_unmerged_f64_weight_beyond_float32_is_not_called_merged_nor_nan(tmp_path: Path) -> None:
    big = np.ones((4, 16))
    big[1, 2] = 1e300
    base = _base(tmp_path / "base", torch.float64, {"model.embed_tokens.weight": torch.from_numpy(big)})
    with pytest.raises(NonFiniteError) as e:
        lorafuse.apply(str(base), [str(_adapter(tmp_path / "a"))], out=str(tmp_path / "out"), dtype="fp32",
                       progress=False)
    said = str(e.value)
    assert "model.embed_tokens.weight" in said and "beyond float32" in said and "1e+300" in said
    assert "merged weights" not in said and "holds NaN or Inf" not in said


def test_a_merged_f64_weight_beyond_float32_is_said_to_be_finite_beyond_float32(tmp_path: Path) -> None:
    base = _base(tmp_path / "base", torch.float64, {})
    w = load_file(str(base / "model.safetensors"))
    w[f"{Q}.weight"][0, 0] = -1e200
    save_file(w, str(base / "model.safetensors"))
    with pytest.raises(NonFiniteError) as e:
        lorafuse.apply(str(base), [str(_adapter(tmp_path / "a"))], out=str(tmp_path / "out"), progress=False)
    said = str(e.value)
    assert f"{Q}.weight" in said and "beyond float32" in said and "holds NaN or Inf" not in said


KOHYA = "lora_unet_down_blocks_0_attentions_0_proj_in"


def _kohya(path: Path, algo: str, dtype: torch.dtype) -> Path:
    g = torch.Generator().manual_seed(2)
    if algo == "lora":
        parts = {"lora_down.weight": (2, 8), "lora_up.weight": (8, 2)}
    else:
        parts = {"hada_w1_a": (8, 2), "hada_w1_b": (2, 8), "hada_w2_a": (8, 2), "hada_w2_b": (2, 8)}
    tensors = {f"{KOHYA}.{k}": torch.randn(*s, generator=g).to(dtype) for k, s in parts.items()}
    tensors[f"{KOHYA}.alpha"] = torch.tensor(2.0, dtype=dtype)
    save_file(tensors, str(path))
    return path


def _kohya_delta(path: Path) -> np.ndarray:
    t = {k.split(".", 1)[1]: v.double().numpy() for k, v in load_file(str(path)).items()}
    scale = float(np.float32(t["alpha"])) / 2
    if "lora_up.weight" in t:
        return t["lora_up.weight"] @ t["lora_down.weight"] * scale
    return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * scale


@pytest.mark.parametrize("algo", ["lora", "loha"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_scale_no_kohya_alpha_holds_is_refused_not_written_as_zero_factors(tmp_path: Path, algo: str,
                                                                            dtype: torch.dtype) -> None:
    a = lorafuse.load(str(_kohya(tmp_path / "k.safetensors", algo, dtype)))
    out = tmp_path / "out.safetensors"
    with pytest.raises(lorafuse.UnsupportedError) as e:
        (a * 1e-50).save(str(out))
    assert KOHYA in str(e.value) and "1e-50" in str(e.value)
    assert not out.exists()


@pytest.mark.parametrize("algo", ["lora", "loha"])
def test_scales_a_kohya_alpha_cannot_hold_but_a_factor_can_still_save_exactly(tmp_path: Path, algo: str) -> None:
    src = _kohya(tmp_path / "k.safetensors", algo, torch.float32)
    a = lorafuse.load(str(src))
    for c in (0.0, -3.0, 2.0**-140):  # alpha 0 reads as alpha = rank; a subnormal alpha does not read back
        out = tmp_path / f"out{c}.safetensors"
        (c * a).save(str(out))
        want = _kohya_delta(src) * c
        got = _kohya_delta(out)
        assert np.abs(got - want).max() <= np.abs(want).max() * 2.0**-20 + 0.0


def _biased_adapter(folder: Path, bias: torch.Tensor) -> Path:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    save_file({f"base_model.model.{Q}.lora_A.weight": torch.randn(2, 16, generator=g),
               f"base_model.model.{Q}.lora_B.weight": torch.randn(16, 2, generator=g),
               f"base_model.model.{Q}.lora_B.bias": bias}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"], "lora_bias": True}))
    return folder


@pytest.mark.parametrize("where", ["base", "adapter"])
def test_a_non_finite_merged_bias_says_which_input_holds_it(tmp_path: Path, where: str) -> None:
    bad = torch.zeros(16)
    bad[3] = float("nan") if where == "base" else float("inf")
    base = _base(tmp_path / "base", torch.float16,
                 {f"{Q}.bias": (bad if where == "base" else torch.zeros(16)).half()})
    adapter = _biased_adapter(tmp_path / "a", bad if where == "adapter" else torch.ones(16))
    with pytest.raises(NonFiniteError) as e:
        lorafuse.apply(str(base), [str(adapter)], out=str(tmp_path / "out"), progress=False)
    said = str(e.value)
    assert f"{Q}.bias" in said and "[16]" in said and "--allow-nonfinite" in said
    assert ("base bias" in said) if where == "base" else ("lora_B.bias" in said and str(adapter) in said)
    assert not (tmp_path / "out").exists()
