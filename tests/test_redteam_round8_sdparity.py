"""Red-team round 8, SD parity: Stable Diffusion / SDXL single-file checkpoints, kohya LoRA / LoCon files and
sd-scripts' expectations, each checked against an independent reference (numpy float64) or the promise that a
failure is one line naming the file, the module and the shapes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft_fixtures import peft_folder_delta
from redteam_fixtures import run_cli
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as save_torch

import lorafuse
from lorafuse.errors import ShapeMismatchError

pytestmark = pytest.mark.filterwarnings("ignore")


def _one_line(err: str, verb: str) -> str:
    err = err.strip()
    assert err.startswith(f"lorafuse {verb}: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- 1. OpenCLIP text towers of single files

# An SDXL single file's second text encoder and an SD 2.x file's only one are open_clip towers, whose MLP layers are
# called c_fc / c_proj like GPT-2's transformers Conv1D layers, but are torch Linear layers (out x in).
OPENCLIP = {
    "sdxl": "conditioner.embedders.1.model.transformer.resblocks.0.",
    "sd2": "cond_stage_model.model.transformer.resblocks.0.",
}


def _single_file(tmp: Path, family: str, width: int, seed: int) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """A base and a fine-tuned single-file checkpoint (no config.json, as such files come) and the differences."""
    rng = np.random.default_rng(seed)
    clip = OPENCLIP[family]
    shapes = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (16, 16),
              clip + "mlp.c_fc.weight": (width, 8), clip + "mlp.c_proj.weight": (8, width),
              clip + "attn.out_proj.weight": (8, 8)}
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    base[clip + "attn.in_proj_weight"] = rng.standard_normal((24, 8)).astype(np.float32)
    ft = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in base.items()}
    save_file(base, str(tmp / f"{family}.safetensors"))
    save_file(ft, str(tmp / f"{family}_ft.safetensors"))
    return tmp / f"{family}.safetensors", tmp / f"{family}_ft.safetensors", {
        k: ft[k].astype(np.float64) - base[k] for k in shapes}


@pytest.mark.parametrize("family", ["sdxl", "sd2"])
@pytest.mark.parametrize("width", [32, 8])  # the real 4x MLP, and a square one
def test_extract_from_an_sdxl_or_sd2_single_file_reads_openclip_mlps_as_linear(tmp_path: Path, family: str,
                                                                              width: int) -> None:
    """`lorafuse extract sdxl.safetensors sdxl_ft.safetensors` stopped on the first OpenCLIP MLP layer ('cannot tell
    whether ... c_fc.weight is a torch Linear or a transformers Conv1D without config.json'): no SDXL or SD 2.x
    single file could be extracted without --exclude. open_clip's c_fc / c_proj are torch Linear layers: each
    difference is extracted exactly at full rank (float64 reference), and apply merges the adapter back."""
    base, ft, deltas = _single_file(tmp_path, family, width, 1)
    out = tmp_path / "x"
    code, _, err = run_cli(["extract", str(base), str(ft), "--rank", "16", "-o", str(out), "-q"])
    assert code == 0, err
    for key, d in deltas.items():
        np.testing.assert_allclose(peft_folder_delta(out, key.removesuffix(".weight")), d, atol=1e-5 * np.abs(d).max(),
                                   err_msg=key)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is False, cfg
    merged = tmp_path / "merged.safetensors"
    code, _, err = run_cli(["apply", str(base), str(out), "-o", str(merged), "-q"])
    assert code == 0, err
    got, b = load_file(str(merged)), load_file(str(base))
    for key, d in deltas.items():
        np.testing.assert_allclose(got[key], b[key] + d, atol=2e-5 * np.abs(b[key] + d).max(), err_msg=key)


def test_a_peft_lora_on_a_square_openclip_mlp_merges_into_a_single_file(tmp_path: Path) -> None:
    """A PEFT adapter on an OpenCLIP c_fc whose weight is square (nothing in its shape tells Linear from Conv1D)
    was refused by apply without config.json; it is a torch Linear: W + (alpha / r) B A, float64 reference."""
    base, _, _ = _single_file(tmp_path, "sdxl", 8, 2)
    module = OPENCLIP["sdxl"] + "mlp.c_fc"
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((2, 8)).astype(np.float32), rng.standard_normal((8, 2)).astype(np.float32)
    (tmp_path / "ad").mkdir()
    save_file({f"base_model.model.{module}.lora_A.weight": a, f"base_model.model.{module}.lora_B.weight": b},
              str(tmp_path / "ad" / "adapter_model.safetensors"))
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["c_fc"]}))
    merged = tmp_path / "merged.safetensors"
    code, _, err = run_cli(["apply", str(base), str(tmp_path / "ad"), "-o", str(merged), "-q"])
    assert code == 0, err
    w = load_file(str(base))[module + ".weight"].astype(np.float64)
    want = w + 2.0 * (b.astype(np.float64) @ a)
    np.testing.assert_allclose(load_file(str(merged))[module + ".weight"], want, atol=2e-6 * np.abs(want).max())


# ----------------------------------------------------------------------------- 2. extract of a single file to one file


@pytest.mark.parametrize("family", ["sdxl", "sd2"])
def test_extract_of_a_single_file_to_a_safetensors_name_says_why_it_cannot(tmp_path: Path, family: str) -> None:
    """kohya's extract_lora_from_models.py writes a kohya file from two single-file checkpoints. This was refused
    (lorafuse named the modules as the checkpoint does); since round 17 it writes that kohya file (lora_unet_ /
    lora_te_ / lora_te2_ names), saying so, and the fused OpenCLIP in_proj is a note."""
    base, ft, _ = _single_file(tmp_path, family, 32, 4)
    out = tmp_path / "lora.safetensors"
    code, _, err = run_cli(["extract", str(base), str(ft), "--rank", "2", "-o", str(out)])
    assert code == 0 and out.exists(), err
    assert "kohya" in err and "in_proj_weight" in err, err
    te = "lora_te2_" if family == "sdxl" else "lora_te_"
    names = {k.split(".")[0] for k in load_file(str(out))}
    assert names == {te + "text_model_encoder_layers_0_" + m for m in ("mlp_fc1", "mlp_fc2", "self_attn_out_proj")} | {
        "lora_unet_" + ("input_blocks_1_1" if family == "sdxl" else "down_blocks_0_attentions_0")
        + "_transformer_blocks_0_attn1_to_q"}, names


# ----------------------------------------------------------------------------- 3. LoCon kernels


@pytest.mark.parametrize("down, up", [((4, 8, 3, 3), (8, 4, 3, 3)), ((4, 8, 1, 1), (8, 4, 3, 3)),
                                      ((4, 8, 3, 1), (8, 4, 1, 3))])
def test_a_locon_lora_up_with_a_kernel_is_refused_naming_the_kernel(tmp_path: Path, down: tuple[int, ...],
                                                                    up: tuple[int, ...]) -> None:
    """A LoCon file whose lora_up holds a kxk kernel (up(down(x)) would widen the kernel: no merge into the layer)
    was refused as 'not LoRA factors of one rank' although both have rank 4: the refusal says the kernel is the
    problem, with both shapes and the module."""
    n = "lora_unet_down_blocks_0_resnets_0_conv1"
    save_torch({f"{n}.lora_down.weight": torch.randn(*down), f"{n}.lora_up.weight": torch.randn(*up),
                f"{n}.alpha": torch.tensor(4.0)}, str(tmp_path / "k.safetensors"))
    with pytest.raises(ShapeMismatchError) as e:
        lorafuse.load(tmp_path / "k.safetensors")
    msg = str(e.value)
    assert n in msg and str(up) in msg and str(down) in msg and f"{up[2]}x{up[3]} kernel" in msg, msg
    assert "one rank" not in msg, msg


# ----------------------------------------------------------------------------- 4. an F16 fine-tune of an F32 base


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> BF16 bits, round to nearest even (torch's own rounding: an independent reference)."""
    return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


@pytest.mark.parametrize("ft_dtype", ["F16", "BF16"])
def test_an_untouched_layer_of_a_half_precision_fine_tune_is_unchanged(tmp_path: Path, ft_dtype: str) -> None:
    """SD 1.5's base is an F32 file and most fine-tunes are F16: a layer the fine-tune did not train (typically the
    whole text encoder) is the base rounded to F16. extract wrote a LoRA of that rounding noise for every such layer
    (kohya's extract_lora_from_models.py skips such a text encoder by --min_diff). A weight that is exactly the
    base rounded to the fine-tuned dtype is unchanged (no module, counted, with a note); a trained layer is still
    extracted, its difference exact at full rank against float64."""
    rng = np.random.default_rng(5)
    te = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    unet = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    base = {te: rng.standard_normal((8, 8)).astype(np.float32),
            unet: rng.standard_normal((16, 16, 1, 1)).astype(np.float32)}
    trained = (base[unet] + 0.1 * rng.standard_normal(base[unet].shape)).astype(np.float32)
    if ft_dtype == "F16":
        ft = {te: base[te].astype(np.float16), unet: trained.astype(np.float16)}
        ft_values = {k: v.astype(np.float64) for k, v in ft.items()}
        save_file(ft, str(tmp_path / "ft.safetensors"))
    else:
        bits = {te: _bf16(base[te]), unet: _bf16(trained)}
        torch_ft = {k: torch.from_numpy(v.view(np.int16).copy()).view(torch.bfloat16) for k, v in bits.items()}
        ft_values = {k: v.double().numpy() for k, v in torch_ft.items()}
        save_torch(torch_ft, str(tmp_path / "ft.safetensors"))
    save_file(base, str(tmp_path / "base.safetensors"))
    out = tmp_path / "x"
    code, said, err = run_cli(["extract", str(tmp_path / "base.safetensors"), str(tmp_path / "ft.safetensors"),
                               "--rank", "16", "-o", str(out)])
    assert code == 0, err
    names = set(load_file(str(out / "adapter_model.safetensors")))
    assert not any("q_proj" in n for n in names), sorted(names)
    assert "1 unchanged" in said and "rounded" in err, (said, err)
    d = (ft_values[unet] - base[unet]).reshape(16, 16)
    np.testing.assert_allclose(peft_folder_delta(out, unet.removesuffix(".weight")), d, atol=1e-5 * np.abs(d).max())


def test_a_layer_changed_below_the_half_precision_step_is_still_extracted(tmp_path: Path) -> None:
    """Only an exact match counts: a fine-tuned F16 weight one F16 step off the base's rounding somewhere is a
    change, extracted (float64 reference), not a rounding."""
    rng = np.random.default_rng(6)
    key = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    base = rng.standard_normal((8, 8)).astype(np.float32)
    ft = base.astype(np.float16)
    ft[3, 5] = np.nextafter(ft[3, 5], np.float16(np.inf))
    save_file({key: base}, str(tmp_path / "base.safetensors"))
    save_file({key: ft}, str(tmp_path / "ft.safetensors"))
    out = tmp_path / "x"
    code, _, err = run_cli(["extract", str(tmp_path / "base.safetensors"), str(tmp_path / "ft.safetensors"),
                            "--rank", "8", "-o", str(out), "-q"])
    assert code == 0, err
    d = ft.astype(np.float64) - base
    np.testing.assert_allclose(peft_folder_delta(out, key.removesuffix(".weight")), d, atol=1e-4 * np.abs(d).max())


def test_nan_in_a_rounded_copy_is_still_refused(tmp_path: Path) -> None:
    """A base weight holding NaN, copied rounded into the fine-tuned model, is not 'unchanged': refused as every
    NaN is, naming the module."""
    key = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    base = np.random.default_rng(7).standard_normal((8, 8)).astype(np.float32)
    base[0, 0] = np.nan
    save_file({key: base}, str(tmp_path / "base.safetensors"))
    save_file({key: base.astype(np.float16)}, str(tmp_path / "ft.safetensors"))
    code, _, err = run_cli(["extract", str(tmp_path / "base.safetensors"), str(tmp_path / "ft.safetensors"),
                            "--rank", "2", "-o", str(tmp_path / "x")])
    msg = _one_line(err, "extract")
    assert code == 1 and "NaN" in msg and "q_proj" in msg, msg


def test_a_half_precision_copy_of_the_base_is_refused_saying_it_is_only_rounded(tmp_path: Path) -> None:
    """An F16 copy of an F32 base holds no fine-tuning: refused as a checkpoint that does not differ (PEFT would
    refuse an adapter of no module), the message saying the weights are the base rounded; nothing is written."""
    rng = np.random.default_rng(8)
    base = {"a.weight": rng.standard_normal((8, 8)).astype(np.float32), "a.bias": np.zeros(8, np.float32)}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file({k: v.astype(np.float16) for k, v in base.items()}, str(tmp_path / "ft.safetensors"))
    code, _, err = run_cli(["extract", str(tmp_path / "base.safetensors"), str(tmp_path / "ft.safetensors"),
                            "--rank", "2", "-o", str(tmp_path / "x")])
    msg = _one_line(err, "extract")
    assert code == 1 and "differs" in msg and "rounded" in msg and not (tmp_path / "x").exists(), msg
