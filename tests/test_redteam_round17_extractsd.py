"""Round 17 red team: `extract` from single-file Stable Diffusion checkpoints to one kohya `.safetensors` file,
as sd-scripts' extract_lora_from_models.py writes it (lora_unet_ / lora_te*_ names, alphas, ss_* metadata), checked
by loading it with diffusers' own kohya reader against a numpy float64 reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from redteam_fixtures import run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sd_fixtures import _clip_config, _randomized, _single_file, _unet
from transformers import CLIPTextModelWithProjection

import lorafuse


def _pair(tmp_path: Path, family: str) -> tuple[Path, Path]:
    """A base single-file checkpoint and a fine-tune that moved every UNet and text-encoder weight (not the VAE)."""
    clip = _randomized(CLIPTextModelWithProjection(_clip_config()), 2)
    base = {k: v.contiguous() for k, v in _single_file(family, {family: _randomized(_unet(family), 1)}, clip, clip,
                                                       False).items()}
    g = torch.Generator().manual_seed(9)
    ft = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.ndim >= 2 and not k.startswith("first_stage") else v
          for k, v in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(ft, str(tmp_path / "ft.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "ft.safetensors"


def _best(delta: np.ndarray, k: int) -> np.ndarray:
    """The best rank-k approximation of `delta` (a conv kernel flattened to out x in*kh*kw, as kohya does)."""
    d = delta.astype(np.float64).reshape(delta.shape[0], -1)
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    return ((u[:, :k] * s[:k]) @ vt[:k]).reshape(delta.shape)


def _fused_unet(family: str, lora: Path, base: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The base UNet (diffusers' converter) and that UNet with `lora` loaded by diffusers' kohya reader, fused."""
    unet = _unet(family)
    ub = convert_ldm_unet_checkpoint(load_file(str(base)), dict(unet.config))
    unet.load_state_dict(ub)
    return ub, _fused(unet, family, lora)


def _fused(unet: UNet2DConditionModel, family: str, lora: Path) -> dict[str, torch.Tensor]:
    """`unet`'s weights with `lora` loaded by diffusers' kohya reader and fused."""
    cls = StableDiffusionPipeline if family == "sd1" else StableDiffusionXLPipeline
    sd, alphas = cls.lora_state_dict(str(lora), unet_config=unet.config)
    unet.load_lora_adapter(sd, prefix="unet", network_alphas=alphas)
    unet.fuse_lora()
    return {k.replace(".base_layer.", "."): v for k, v in unet.state_dict().items() if "lora_" not in k}


def _check_unet(family: str, tmp_path: Path, rank: int, conv: int | None = None) -> None:
    base, ft = _pair(tmp_path, family)
    out = tmp_path / "lora.safetensors"
    extra = [] if conv is None else ["--conv-rank", str(conv)]
    code, _, err = run_cli(["extract", str(base), str(ft), "-o", str(out), "--rank", str(rank), *extra])
    assert code == 0, err
    with safe_open(str(out), "np") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert all(k.startswith(("lora_unet_", "lora_te")) for k in keys)
    assert meta["ss_network_dim"] == str(rank) and float(meta["ss_network_alpha"]) == rank  # alpha = dim: scale 1
    assert meta["ss_network_module"] == "networks.lora"  # what sd-scripts' extract writes, and UIs read
    assert meta["ss_base_model_version"] == ("sd_v1" if family == "sd1" else "sdxl_base_v1-0")
    k_conv = rank if conv is None else conv
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": str(k_conv), "conv_alpha": str(float(k_conv))}
    ub, got = _fused_unet(family, out, base)
    uf = convert_ldm_unet_checkpoint(load_file(str(ft)), dict(_unet(family).config))
    matrices = [k for k, v in ub.items() if k.endswith(".weight") and v.ndim >= 2]
    assert len(matrices) > 100
    for k in matrices:  # every UNet layer of the fine-tune got its best rank-K delta, at scale 1
        want = _best((uf[k] - ub[k]).numpy(), k_conv if max(ub[k].shape[2:], default=1) > 1 else rank)
        np.testing.assert_allclose((got[k] - ub[k]).double().numpy(), want, atol=2e-5, err_msg=k)


def test_extract_sd1_single_file_to_kohya_loads_in_diffusers(tmp_path: Path) -> None:
    _check_unet("sd1", tmp_path, 2, conv=3)


def test_extract_sdxl_single_file_to_kohya_loads_in_diffusers(tmp_path: Path) -> None:
    _check_unet("sdxl", tmp_path, 3)


def test_extract_sdxl_kohya_text_encoders_named_and_exact(tmp_path: Path) -> None:
    """CLIP-L is lora_te1_, OpenCLIP-G lora_te2_ (its unfused layers; the fused in_proj is a note), at full rank
    exact; the VAE and embeddings are left out with notes, never silently; Python's extract names them the same."""
    base, ft = _pair(tmp_path, "sdxl")
    out = tmp_path / "x.safetensors"
    res = lorafuse.extract(base, ft, out, rank=64)
    b, f = load_file(str(base)), load_file(str(ft))
    lora = load_file(str(out))
    pairs = {"lora_te1_text_model_encoder_layers_1_self_attn_q_proj":
             "conditioner.embedders.0.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight",
             "lora_te2_text_model_encoder_layers_0_mlp_fc1": "conditioner.embedders.1.model.transformer.resblocks.0."
             "mlp.c_fc.weight",
             "lora_te2_text_model_encoder_layers_1_self_attn_out_proj": "conditioner.embedders.1.model.transformer."
             "resblocks.1.attn.out_proj.weight"}
    for name, key in pairs.items():
        up, down = lora[name + ".lora_up.weight"].double(), lora[name + ".lora_down.weight"].double()
        scale = float(lora[name + ".alpha"]) / down.shape[0]
        np.testing.assert_allclose((scale * up @ down).numpy(), (f[key] - b[key]).double().numpy(), atol=1e-5)
    assert {m.name for m in res.modules} == {k[: -len(".lora_up.weight")] for k in lora if k.endswith("lora_up.weight")}
    assert any("in_proj_weight" in n for n in res.notes)
    assert not any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q") for k in lora)


def test_extract_sd_kohya_min_diff_and_include(tmp_path: Path) -> None:
    """--min-diff leaves the barely moved text encoder out (kohya's min_diff), and --include keeps its meaning."""
    base, ft = _pair(tmp_path, "sd1")
    t = load_file(str(ft))
    b = load_file(str(base))
    for k in t:
        if k.startswith("cond_stage_model."):
            t[k] = b[k] + 1e-4 * torch.sign(torch.randn(b[k].shape)) if b[k].ndim >= 2 else b[k]
    save_file(t, str(ft))
    out = tmp_path / "m.safetensors"
    code, _, err = run_cli(["extract", str(base), str(ft), "-o", str(out), "--rank", "2", "--min-diff", "0.001"])
    assert code == 0, err
    keys = list(load_file(str(out)))
    assert keys and not any(k.startswith("lora_te") for k in keys)
    out2 = tmp_path / "i.safetensors"
    code, _, err = run_cli(["extract", str(base), str(ft), "-o", str(out2), "--rank", "2", "--include", "attn2"])
    assert code == 0, err
    names = {k.split(".")[0] for k in load_file(str(out2))}
    assert names and all("attn2" in n for n in names)


def test_extract_sd_kohya_dry_run_and_left_out_modules_are_notes(tmp_path: Path) -> None:
    """The dry run planned the checkpoint's own names in a kohya file ('not a kohya module name': a traceback-free
    but false refusal); it now lists the kohya modules the run writes. A changed VAE weight and an embedding kept
    whole (--embeddings full) are notes, never silently dropped."""
    base, ft = _pair(tmp_path, "sd1")
    t = load_file(str(ft))
    t["first_stage_model.decoder.conv_in.weight"] += 1.0
    save_file(t, str(ft))
    out = tmp_path / "d.safetensors"
    code, plan, err = run_cli(["extract", str(base), str(ft), "-o", str(out), "--rank", "2", "--dry-run", "--json"])
    assert code == 0 and not out.exists(), err
    code, rep, err = run_cli(["extract", str(base), str(ft), "-o", str(out), "--rank", "2", "--embeddings", "full",
                              "--json"])
    assert code == 0, err
    written = {k.split(".")[0] for k in load_file(str(out))}
    assert {m["name"] for m in json.loads(plan)["modules"]} == written
    notes = " ".join(json.loads(rep)["notes"])
    assert "first_stage_model.decoder.conv_in" in notes and "token_embedding" in notes, notes
    assert "lora_unet_conv_in" in written and not any("first_stage" in n for n in written)


def test_extract_sdxl_refiner_openclip_is_lora_te2(tmp_path: Path) -> None:
    """The SDXL refiner holds OpenCLIP-G alone, as conditioner.embedders.0.model.: diffusers' refiner pipeline
    loads it as text_encoder_2, so its kohya names are lora_te2_ (not lora_te1_), exact at full rank."""
    rng = np.random.default_rng(0)
    p = "conditioner.embedders.0.model.transformer.resblocks.0."
    shapes = {p + "mlp.c_fc.weight": (16, 8), p + "attn.out_proj.weight": (8, 8),
              "model.diffusion_model.input_blocks.4.1.proj_in.weight": (16, 16)}
    b = {k: torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for k, s in shapes.items()}
    f = {k: v + 0.1 for k, v in b.items()}
    save_file(b, str(tmp_path / "r.safetensors"))
    save_file(f, str(tmp_path / "rf.safetensors"))
    out = tmp_path / "x.safetensors"
    code, _, err = run_cli(["extract", str(tmp_path / "r.safetensors"), str(tmp_path / "rf.safetensors"), "-o",
                            str(out), "--rank", "8"])
    assert code == 0, err
    lora = load_file(str(out))
    assert {k.split(".")[0] for k in lora} == {"lora_te2_text_model_encoder_layers_0_mlp_fc1",
                                               "lora_te2_text_model_encoder_layers_0_self_attn_out_proj",
                                               "lora_unet_input_blocks_4_1_proj_in"}
    up, down = lora["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"].double(), \
        lora["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"].double()
    scale = float(lora["lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha"]) / down.shape[0]
    np.testing.assert_allclose((scale * up @ down).numpy(), np.full((16, 8), 0.1), atol=1e-5)


def test_extract_diffusers_unet_folders_to_kohya(tmp_path: Path) -> None:
    """`lorafuse extract base/unet ft/unet -o lora.safetensors` was refused ('conv_in: not a diffusers module name
    ... not a kohya module name'): a diffusers UNet component folder now gives a kohya file too (SD 1.x diffusers
    paths, SDXL LDM paths, from its config.json), which diffusers loads with each module's best rank-4 delta. (One
    rank throughout: diffusers' kohya reader names the alpha_pattern of SD 1.x attention modules in its legacy
    processor form, so a file whose modules' alphas differ there loads them at the wrong scale in diffusers.)"""
    for family in ("sd1", "sdxl"):
        unet = _randomized(_unet(family), 1)
        unet.save_pretrained(tmp_path / family / "base")
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        unet.save_pretrained(tmp_path / family / "ft")
        tuned = {k: v.clone() for k, v in unet.state_dict().items()}
        out = tmp_path / family / "lora.safetensors"
        code, _, err = run_cli(["extract", str(tmp_path / family / "base"), str(tmp_path / family / "ft"), "-o",
                                str(out), "--rank", "4", "-q"])
        assert code == 0, err
        with safe_open(str(out), "np") as f:
            names = {k.split(".")[0] for k in f.keys()}
            assert f.metadata()["ss_base_model_version"] == ("sd_v1" if family == "sd1" else "sdxl_base_v1-0")
        assert ("lora_unet_input_blocks_4_1_proj_in" in names) == (family == "sdxl"), sorted(names)[:5]
        loaded = _unet(family)
        before = _randomized(_unet(family), 1).state_dict()
        loaded.load_state_dict(before)
        got = _fused(loaded, family, out)
        matrices = [k for k, v in tuned.items() if k.endswith(".weight") and v.ndim >= 2]
        assert len(matrices) > 100
        for k in matrices:
            want = _best((tuned[k] - before[k]).numpy(), 4)
            np.testing.assert_allclose((got[k] - before[k]).double().numpy(), want, atol=2e-5, err_msg=f"{family} {k}")


def test_extracted_adapter_saves_beside_its_single_file_checkpoints(tmp_path: Path) -> None:
    """`res = lorafuse.extract("sd.safetensors", "ft.safetensors", rank=2); res.adapter.save("lora.safetensors")`
    was refused ('output lora.safetensors is inside the input folder .'): the adapter's sources were the single
    files' folder, not the files. It saves there now (the kohya file, the same as extract's own), and saving over
    either checkpoint is still refused."""
    base, ft = _pair(tmp_path, "sd1")
    peft = lorafuse.extract(base, ft, rank=2, progress=False).adapter.save(tmp_path / "peft")  # a PEFT folder
    assert (Path(peft) / "adapter_model.safetensors").is_file()
    res = lorafuse.extract(base, ft, tmp_path / "a.safetensors", rank=2, progress=False)
    written = res.adapter.save(tmp_path / "b.safetensors")
    assert Path(written) == tmp_path / "b.safetensors"
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(written))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    size = base.stat().st_size
    with pytest.raises(lorafuse.errors.LorafuseError):
        res.adapter.save(base, overwrite=True)
    assert base.stat().st_size == size
