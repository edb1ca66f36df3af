"""Round 16 red team: `lorafuse convert` between kohya, diffusers / PEFT and LyCORIS layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from redteam_fixtures import run_cli
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import lorafuse
from lorafuse.errors import ShapeMismatchError

RNG = np.random.default_rng(16)


def _factors(out: int, fan_in: int, rank: int = 2) -> tuple[np.ndarray, np.ndarray]:
    return (RNG.standard_normal((rank, fan_in)).astype(np.float32),
            RNG.standard_normal((out, rank)).astype(np.float32))


def _diffusers_flux(path: Path, mlp_rows: int, hidden: int = 16) -> Path:
    """A diffusers Flux LoRA of one single block: attn.to_q (hidden rows) and proj_mlp (`mlp_rows` rows; Flux.1's is
    4 x hidden), alpha 4 at rank 2."""
    tensors: dict[str, np.ndarray] = {}
    for module, rows in (("transformer.single_transformer_blocks.0.attn.to_q", hidden),
                         ("transformer.single_transformer_blocks.0.proj_mlp", mlp_rows)):
        a, b = _factors(rows, hidden)
        tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = a, b
    meta = {"transformer.r": 2, "transformer.lora_alpha": 4}
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(meta)})
    return path


def _deltas(path: Path) -> dict[str, np.ndarray]:
    adapter = lorafuse.load(path)
    return {n: np.asarray(u.delta(), np.float64) for n, u in adapter.updates.items()}


# ---- diffusers -> kohya writes only kohya modules that read back as the layers they came from


def test_flux_linear1_of_other_mlp_width_is_refused_not_written(tmp_path: Path) -> None:
    """A proj_mlp of 2 x hidden rows fused into Flux.1's linear1 made a (80, 16) kohya module that lorafuse's own
    kohya reader (and Flux.1, whose linear1 is 7 x hidden) refuses: the file could not be converted back or merged."""
    src = _diffusers_flux(tmp_path / "flux.safetensors", mlp_rows=32)
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(["convert", str(src), "-o", str(out), "--to", "kohya", "--family", "flux"])
    assert code == 1, err
    assert "proj_mlp" in err and "lora_unet_single_blocks_0_linear1" in err and "(80, 16)" in err, err
    assert "Traceback" not in err
    assert not out.exists()
    with pytest.raises(ShapeMismatchError, match="linear1"):
        lorafuse.convert(src, tmp_path / "py.safetensors", to="kohya", family="flux")
    assert not (tmp_path / "py.safetensors").exists()


def test_flux_linear1_of_flux_width_still_round_trips(tmp_path: Path) -> None:
    src = _diffusers_flux(tmp_path / "flux.safetensors", mlp_rows=64)
    kohya, back = tmp_path / "k.safetensors", tmp_path / "back.safetensors"
    assert run_cli(["convert", str(src), "-o", str(kohya), "--to", "kohya", "--family", "flux"])[0] == 0
    up = load_file(str(kohya))["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert up.shape == (112, 4)  # two lora_A: block-diagonal
    assert run_cli(["convert", str(kohya), "-o", str(back), "--to", "peft"])[0] == 0
    ref, got = _deltas(src), _deltas(back)
    for name, delta in ref.items():
        np.testing.assert_allclose(got[name], delta, rtol=0, atol=1e-6)


# ---- kohya -> peft -> kohya gives the same file back for ComfyUI's layout too (cli.md: "bit for bit")


def _comfy_flux(path: Path) -> dict[str, np.ndarray]:
    """A ComfyUI-layout Flux LoRA: one module spelled lora_A / lora_B (F16, no alpha), one lora_down / lora_up with
    an alpha, and a CLIP-L text-encoder module."""
    qkv_a, qkv_b = _factors(48, 16)
    proj_a, proj_b = _factors(16, 16)
    te_a, te_b = _factors(8, 8)
    dm = "diffusion_model.double_blocks.0.img_attn."
    te = "text_encoders.clip_l.transformer.text_model.encoder.layers.0."
    tensors = {f"{dm}qkv.lora_A.weight": qkv_a.astype(np.float16), f"{dm}qkv.lora_B.weight": qkv_b.astype(np.float16),
               f"{dm}proj.lora_down.weight": proj_a, f"{dm}proj.lora_up.weight": proj_b,
               f"{dm}proj.alpha": np.array(1.0, np.float32),
               f"{te}self_attn.q_proj.lora_A.weight": te_a, f"{te}self_attn.q_proj.lora_B.weight": te_b}
    save_file(tensors, str(path), metadata={"ss_network_dim": "2"})
    return tensors


def test_comfyui_layout_comes_back_from_peft_with_its_keys(tmp_path: Path) -> None:
    """The ComfyUI file went through --to peft and came back --to kohya under sd-scripts' names (lora_unet_...,
    lora_te1_...) instead of its own keys: not the same tensors, although `convert --to kohya` of the file itself, and
    resize / combine, keep them."""
    src = tmp_path / "comfy.safetensors"
    tensors = _comfy_flux(src)
    mid, back = tmp_path / "mid.safetensors", tmp_path / "back.safetensors"
    assert run_cli(["convert", str(src), "-o", str(mid), "--to", "peft"])[0] == 0
    assert run_cli(["convert", str(mid), "-o", str(back), "--to", "kohya"])[0] == 0
    got = load_file(str(back))
    assert sorted(got) == sorted(tensors)
    for key, value in tensors.items():
        assert got[key].dtype == value.dtype and np.array_equal(got[key], value), key


def test_comfyui_layout_record_naming_other_modules_is_not_used(tmp_path: Path) -> None:
    """A record whose key stems do not name the modules (edited, or from another file) is not trusted: the kohya
    names are written."""
    src = tmp_path / "comfy.safetensors"
    _comfy_flux(src)
    mid, back = tmp_path / "mid.safetensors", tmp_path / "back.safetensors"
    assert run_cli(["convert", str(src), "-o", str(mid), "--to", "peft"])[0] == 0
    with safe_open(str(mid), "np") as f:
        meta = dict(f.metadata())
    record = json.loads(meta["lorafuse_kohya"])
    layouts = record["config"].setdefault("kohya_layouts", {})
    layouts["lora_unet_double_blocks_0_img_attn_proj"] = ["diffusion_model.double_blocks.9.img_attn.proj", False]
    meta["lorafuse_kohya"] = json.dumps(record)
    state = {k: v for k, v in load_file(str(mid)).items()}
    save_file(state, str(mid), metadata=meta)
    assert run_cli(["convert", str(mid), "-o", str(back), "--to", "kohya", "--overwrite"])[0] == 0
    keys = set(load_file(str(back)))
    assert "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight" in keys
    assert not any(k.startswith("diffusion_model.double_blocks.9") for k in keys)


# ---- kohya -> peft: a text encoder the family's pipeline has not is refused, not written under another component


def _kohya_module(path: Path, module: str, out: int = 8, fan_in: int = 8) -> Path:
    a, b = _factors(out, fan_in)
    save_file({f"{module}.lora_down.weight": a, f"{module}.lora_up.weight": b,
               f"{module}.alpha": np.array(2.0, np.float32)}, str(path))
    return path


@pytest.mark.parametrize(("module", "family"), [
    ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", "flux"),  # Flux's text_encoder_2 is its T5
    ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", "sd1"),  # SD 1.x has one text encoder
    ("lora_te3_encoder_block_0_layer_0_SelfAttention_q", "sd1"),
])
def test_text_encoder_the_family_has_not_is_refused(tmp_path: Path, module: str, family: str) -> None:
    """A CLIP-G module given --family flux was written as text_encoder_2.text_model... (Flux's text_encoder_2 is a
    T5: diffusers' Flux pipeline loads it nowhere); --family sd1 wrote text_encoder_2 / text_encoder_3 modules, which
    an SD 1.x pipeline skips. The other direction (diffusers -> kohya) refuses these already."""
    src = _kohya_module(tmp_path / "te.safetensors", module)
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(["convert", str(src), "-o", str(out), "--to", "peft", "--family", family])
    assert code == 1, err
    assert module in err and "(8, 8)" in err and f"family {family!r} has no such text encoder" in err, err
    assert not out.exists()


def test_text_encoders_of_the_family_still_convert(tmp_path: Path) -> None:
    cases = [("lora_te3_encoder_block_0_layer_0_SelfAttention_q", "flux",
              "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q"),
             ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", "sdxl",
              "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj")]
    for i, (module, family, name) in enumerate(cases):
        src = _kohya_module(tmp_path / f"te{i}.safetensors", module)
        out = tmp_path / f"out{i}.safetensors"
        assert run_cli(["convert", str(src), "-o", str(out), "--to", "peft", "--family", family])[0] == 0
        got = load_file(str(out))
        ref = load_file(str(src))
        np.testing.assert_array_equal(got[f"{name}.lora_A.weight"], ref[f"{module}.lora_down.weight"])
        np.testing.assert_array_equal(got[f"{name}.lora_B.weight"], ref[f"{module}.lora_up.weight"])


def test_diffusers_text_encoder_the_family_has_not_names_the_reason(tmp_path: Path) -> None:
    """The other direction keeps its reason (a guard: the check moved into the naming shared by both)."""
    a, b = _factors(8, 8)
    src = tmp_path / "d.safetensors"
    save_file({"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": a,
               "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": b}, str(src))
    out = tmp_path / "k.safetensors"
    code, _, err = run_cli(["convert", str(src), "-o", str(out), "--to", "kohya", "--family", "sd1"])
    assert code == 1 and "family 'sd1' has no such text encoder" in err and "(8, 8)" in err, err
    assert not out.exists()
