"""Round 8 red team, DiT families (Flux.1, Flux.2, Wan, HunyuanVideo, SD3, ComfyUI's `diffusion_model.` layout) across
convert / apply / info.

Flux.2 LoRAs are written under Flux.1's kohya words. convert had no Flux.2 family: a Flux.2 file holding only attention
and `time_in` (or `guidance_in`) modules was written under Flux.1's diffusers names (`time_text_embed...`, where
Flux.2's model has `time_guidance_embed...`), a wrong model that diffusers' Flux2 loader matches nothing of. Now the
family is told from the layers and MLP widths one of them alone has, given as `--family flux2`, or refused, naming the
ambiguity and the option. References: diffusers 0.42's Flux2 loader (`Flux2Pipeline.lora_state_dict`:
`_convert_kohya_flux2_lora_to_diffusers`, `_convert_non_diffusers_flux2_lora_to_diffusers`) fused into a tiny
`Flux2Transformer2DModel` in float64, and its state dict's names and shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sd_fixtures import kohya_unet_lora, tiny_flux2

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import LorafuseError

H = 16
R = 4
ALPHA = 2.0


# Flux.2's modules under kohya's words (musubi-tuner / sd-scripts), with its shapes: SwiGLU MLP of ratio 3
ATTN = {"double_blocks_0_img_attn_qkv": (3 * H, H), "double_blocks_0_img_attn_proj": (H, H),
        "double_blocks_0_txt_attn_qkv": (3 * H, H), "double_blocks_0_txt_attn_proj": (H, H)}
TIME = {"time_in_in_layer": (H, 8), "time_in_out_layer": (H, H)}
GUIDANCE = {"guidance_in_in_layer": (H, 8), "guidance_in_out_layer": (H, H)}
MLP = {"double_blocks_0_img_mlp_0": (6 * H, H), "double_blocks_0_img_mlp_2": (H, 3 * H),
       "double_blocks_0_txt_mlp_0": (6 * H, H), "double_blocks_0_txt_mlp_2": (H, 3 * H),
       "single_blocks_0_linear1": (9 * H, H), "single_blocks_0_linear2": (H, 4 * H)}
MODULATION = {"single_stream_modulation_lin": (3 * H, H), "double_stream_modulation_img_lin": (6 * H, H),
              "double_stream_modulation_txt_lin": (6 * H, H)}
EMBED = {"img_in": (H, 4), "txt_in": (H, 12), "final_layer_linear": (4, H)}


def _comfy(modules: dict[str, tuple[int, int]], seed: int = 1) -> dict[str, torch.Tensor]:
    """The same modules in ComfyUI / ai-toolkit's layout (`diffusion_model.<path>.lora_A.weight`, alpha baked into A,
    as ai-toolkit writes them: no alpha key)."""
    from lorafuse.formats.dit_keys import FLUX2

    out: dict[str, torch.Tensor] = {}
    for k, v in kohya_unet_lora(modules, seed, ALPHA, R).items():
        if k.endswith(".alpha"):
            continue
        module, part = k[len("lora_unet_"):].split(".", 1)
        path = _dotted(module, FLUX2)
        out[f"diffusion_model.{path}.{'lora_A' if 'down' in part else 'lora_B'}.weight"] = (
            v * (ALPHA / R) if "down" in part else v)
    return out


def _dotted(spelled: str, family: object) -> str:
    """The dotted original path of a kohya-spelled one, from the tables (`double_blocks_0_img_mlp_0` ->
    `double_blocks.0.img_mlp.0`)."""
    table = {"double_blocks_0_img_attn_qkv": "double_blocks.0.img_attn.qkv",
             "double_blocks_0_img_attn_proj": "double_blocks.0.img_attn.proj",
             "double_blocks_0_txt_attn_qkv": "double_blocks.0.txt_attn.qkv",
             "double_blocks_0_txt_attn_proj": "double_blocks.0.txt_attn.proj",
             "double_blocks_0_img_mlp_0": "double_blocks.0.img_mlp.0", "double_blocks_0_img_mlp_2":
             "double_blocks.0.img_mlp.2", "double_blocks_0_txt_mlp_0": "double_blocks.0.txt_mlp.0",
             "double_blocks_0_txt_mlp_2": "double_blocks.0.txt_mlp.2", "single_blocks_0_linear1":
             "single_blocks.0.linear1", "single_blocks_0_linear2": "single_blocks.0.linear2",
             "time_in_in_layer": "time_in.in_layer", "time_in_out_layer": "time_in.out_layer",
             "guidance_in_in_layer": "guidance_in.in_layer", "guidance_in_out_layer": "guidance_in.out_layer",
             "single_stream_modulation_lin": "single_stream_modulation.lin",
             "double_stream_modulation_img_lin": "double_stream_modulation_img.lin",
             "double_stream_modulation_txt_lin": "double_stream_modulation_txt.lin",
             "img_in": "img_in", "txt_in": "txt_in", "final_layer_linear": "final_layer.linear"}
    return table[spelled]


def _loaded_and_fused(pipeline: type, m: torch.nn.Module,
                      state: dict[str, torch.Tensor] | Path) -> dict[str, np.ndarray]:
    """The tiny transformer `m` (float64) after `pipeline`'s LoRA loader reads `state` (a file: with its metadata,
    as load_lora_weights reads it) and fuses it."""
    metadata = None
    if isinstance(state, Path):
        sd, metadata = pipeline.lora_state_dict(str(state), return_lora_metadata=True)  # type: ignore[attr-defined]
    else:
        sd = pipeline.lora_state_dict(state)  # type: ignore[attr-defined]
    pipeline.load_lora_into_transformer({k: v.double() for k, v in sd.items()},  # type: ignore[attr-defined]
                                        transformer=m, metadata=metadata)
    m.fuse_lora()  # type: ignore[operator]
    m.unload_lora()  # type: ignore[operator]
    return {k: v.numpy() for k, v in m.state_dict().items()}


def _fused(state: dict[str, torch.Tensor] | Path) -> dict[str, np.ndarray]:
    """The tiny Flux.2 transformer's weights after diffusers' Flux2 loader reads `state` and fuses it (float64)."""
    from diffusers import Flux2Pipeline

    return _loaded_and_fused(Flux2Pipeline, tiny_flux2().double(), state)


def _changed(got: dict[str, np.ndarray]) -> set[str]:
    base = {k: v.double().numpy() for k, v in tiny_flux2().state_dict().items()}
    return {k for k, v in got.items() if not np.allclose(v, base[k], rtol=0, atol=1e-9)}


def _close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for k, w in want.items():
        np.testing.assert_allclose(got[k], w, rtol=1e-6, atol=1e-6, err_msg=k)


def _names(path: Path) -> set[str]:
    with safe_open(str(path), "np") as f:
        return {k.rsplit(".lora_", 1)[0] for k in f.keys()}


def _flux2_layers() -> dict[str, tuple[int, ...]]:
    return {k[: -len(".weight")]: tuple(v.shape) for k, v in tiny_flux2().state_dict().items() if k.endswith(".weight")}


# ------------------------------------------------------------------------------- the lead: Flux.2 attention + time_in


@pytest.mark.parametrize("extra", [TIME, GUIDANCE], ids=["time_in", "guidance_in"])
def test_flux2_attention_and_time_in_is_not_written_under_flux1_names(tmp_path: Path, extra: dict,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A Flux.2 LoRA of attention and `time_in` (or `guidance_in`) only: every name is Flux.1's too, and `time_in`
    takes another diffusers name in each family (Flux.1 `time_text_embed`, Flux.2 `time_guidance_embed`). It was
    written under Flux.1's names, which diffusers' Flux2 model does not have. Now refused, naming the module and
    --family; nothing written."""
    src = tmp_path / "flux2.safetensors"
    save_file(kohya_unet_lora({**ATTN, **extra}), str(src))
    out = tmp_path / "peft.safetensors"
    with pytest.raises(LorafuseError, match=r"in_layer.*--family flux2"):
        lorafuse.convert(src, out, to="peft")
    assert not out.exists()
    assert main(["convert", str(src), "--to", "peft", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "flux2.safetensors" in err and "--family" in err and not out.exists()


@pytest.mark.parametrize("extra", [TIME, GUIDANCE], ids=["time_in", "guidance_in"])
def test_flux2_family_names_time_in_as_diffusers_flux2_loader(tmp_path: Path, extra: dict) -> None:
    """--family flux2 writes Flux.2's diffusers names: diffusers' Flux2 loader fuses the converted file into exactly
    what its own kohya Flux.2 converter gives from the original (time_guidance_embed changed, every module landing)."""
    lora = kohya_unet_lora({**ATTN, **extra})
    src = tmp_path / "flux2.safetensors"
    save_file(lora, str(src))
    out = tmp_path / "peft.safetensors"
    rep = lorafuse.convert(src, out, to="peft", family="flux2")
    assert rep.family == "flux2"
    layers = _flux2_layers()
    assert {n.removeprefix("transformer.") for n in _names(out)} <= set(layers)
    if extra is TIME:  # diffusers' kohya Flux.2 converter maps time_in, not guidance_in
        want = _fused(lora)
    else:  # its ai-toolkit converter maps guidance_in
        want = _fused(_comfy({**ATTN, **extra}))
    got = _fused(out)
    _close(got, want)
    assert any("time_guidance_embed" in k for k in _changed(got))


def test_flux2_mlp_widths_tell_flux2_and_every_layer_lands_in_diffusers_flux2(tmp_path: Path) -> None:
    """A Flux.2 kohya file with its SwiGLU MLP widths (only Flux.2 has them), `time_in` and embedders: the family is
    Flux.2 without --family, and the converted file fuses into diffusers' Flux2 model as diffusers' own kohya Flux.2
    converter reads the original. Round 6 refused every MLP-bearing module."""
    modules = {**ATTN, **MLP, **TIME, **EMBED}
    lora = kohya_unet_lora(modules)
    src = tmp_path / "flux2.safetensors"
    save_file(lora, str(src))
    out = tmp_path / "peft.safetensors"
    rep = lorafuse.convert(src, out, to="peft")
    assert rep.family == "flux2"
    layers = _flux2_layers()
    names = {n.removeprefix("transformer.") for n in _names(out)}
    assert names <= set(layers)
    assert "single_transformer_blocks.0.attn.to_qkv_mlp_proj" in names and "transformer_blocks.0.ff.linear_in" in names
    got = _fused(out)
    _close(got, _fused(lora))
    assert len(_changed(got)) == 8 + 6 + 2 + 3  # q, k, v, proj x2; the MLP layers; time_in; img / txt in, final


def test_flux2_comfyui_file_with_modulation_converts_as_diffusers_loader_reads_it(tmp_path: Path) -> None:
    """ComfyUI / ai-toolkit's Flux.2 layout with the shared modulation layers (Flux.2's alone): converted without
    --family to Flux.2's names, fusing as diffusers' `_convert_non_diffusers_flux2_lora_to_diffusers` reads it."""
    state = _comfy({**ATTN, **MODULATION, **GUIDANCE, **MLP})
    src = tmp_path / "comfy.safetensors"
    save_file(state, str(src))
    out = tmp_path / "peft.safetensors"
    assert lorafuse.convert(src, out, to="peft").family == "flux2"
    _close(_fused(out), _fused(state))


def test_flux2_peft_back_to_kohya_is_the_same_file(tmp_path: Path) -> None:
    """kohya -> peft -> kohya of a Flux.2 file gives back the same tensors (the family recorded in the peft file)."""
    lora = kohya_unet_lora({**ATTN, **MLP, **MODULATION, **TIME})
    src = tmp_path / "flux2.safetensors"
    save_file(lora, str(src))
    peft, back = tmp_path / "peft.safetensors", tmp_path / "back.safetensors"
    lorafuse.convert(src, peft, to="peft")
    assert lorafuse.convert(peft, back, to="kohya").family == "flux2"
    got = load_file(str(back))
    assert set(got) == set(lora)
    for k, v in lora.items():
        assert torch.equal(got[k], v), k


def test_a_diffusers_flux2_lora_takes_flux2_kohya_names_not_flux1s(tmp_path: Path) -> None:
    """A diffusers Flux.2 LoRA (ff.linear_in, to_qkv_mlp_proj, time_guidance_embed) --to kohya: --family flux2 writes
    the kohya names diffusers' kohya Flux.2 converter reads back to the same model; --family flux (Flux.1) is refused
    naming Flux.2; without --family the error names --family flux2."""
    lora = kohya_unet_lora({**ATTN, **MLP, **TIME})
    src = tmp_path / "flux2.safetensors"
    save_file(lora, str(src))
    peft = tmp_path / "peft.safetensors"
    lorafuse.convert(src, peft, to="peft")
    plain = tmp_path / "plain.safetensors"  # the same LoRA as a diffusers file that records no family
    with safe_open(str(peft), "pt") as f:
        config = (f.metadata() or {})["lora_adapter_metadata"]
    save_file(load_file(str(peft)), str(plain), metadata={"format": "pt", "lora_adapter_metadata": config})
    out = tmp_path / "kohya.safetensors"
    with pytest.raises(LorafuseError, match=r"family 'flux'.*Flux\.2.*--family flux2"):
        lorafuse.convert(plain, out, to="kohya", family="flux")
    with pytest.raises(LorafuseError, match=r"--family flux2"):
        lorafuse.convert(plain, out, to="kohya")
    assert not out.exists()
    lorafuse.convert(plain, out, to="kohya", family="flux2")
    assert {k.split(".")[0] for k in load_file(str(out))} == {k.split(".")[0] for k in lora}
    _close(_fused(out), _fused(lora))


def test_flux1_and_flux2_layers_in_one_file_are_refused(tmp_path: Path) -> None:
    """Flux.1's per-block modulation (img_mod.lin) beside Flux.2's shared one: a file of two models; and --family
    flux2 on a Flux.1 file (its img_mod.lin is no Flux.2 layer) is refused, not written under Flux.2's names."""
    src = tmp_path / "mixed.safetensors"
    save_file(kohya_unet_lora({**ATTN, "double_blocks_0_img_mod_lin": (6 * H, H), **MODULATION}), str(src))
    out = tmp_path / "peft.safetensors"
    with pytest.raises(LorafuseError, match=r"img_mod_lin.*Flux\.1.*stream_modulation.*Flux\.2"):
        lorafuse.convert(src, out, to="peft")
    flux1 = tmp_path / "flux1.safetensors"
    save_file(kohya_unet_lora({**ATTN, **TIME, "double_blocks_0_img_mod_lin": (6 * H, H)}), str(flux1))
    with pytest.raises(LorafuseError, match=r"family 'flux2' does not fit.*img_mod_lin"):
        lorafuse.convert(flux1, out, to="peft", family="flux2")
    assert not out.exists()
    rep = lorafuse.convert(flux1, out, to="peft")  # Flux.1's modulation tells Flux.1: time_in is time_text_embed
    assert rep.family == "flux" and "transformer.time_text_embed.timestep_embedder.linear_1" in _names(out)


# ----------------------------------------------------------------------------------------------------------- Wan

WAN_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                  text_dim=12, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=8, added_kv_proj_dim=16, rope_max_seq_len=32)
# musubi-tuner's kohya names of the tiny model's layers -> (out, in)
WAN_BLOCKS = {**{f"blocks_{i}_{a}_{p}": (16, 16) for i in range(2) for a in ("self_attn", "cross_attn")
                 for p in ("q", "k", "v", "o", *(("k_img", "v_img") if a == "cross_attn" else ()))},
              **{f"blocks_{i}_ffn_0": (32, 16) for i in range(2)}, **{f"blocks_{i}_ffn_2": (16, 32) for i in range(2)}}
WAN_GLOBAL = {"time_projection.1": (96, 16), "head.head": (16, 16), "text_embedding.0": (16, 12),
              "text_embedding.2": (16, 16), "time_embedding.0": (16, 16), "time_embedding.2": (16, 16),
              "img_emb.proj.1": (8, 8), "img_emb.proj.3": (16, 8)}


def _wan() -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(**WAN_CONFIG).eval()


def _wan_fused(state: dict[str, torch.Tensor] | Path) -> dict[str, np.ndarray]:
    """The tiny Wan transformer after diffusers' Wan loader reads `state` (a file: with its metadata) and fuses it."""
    from diffusers import WanPipeline

    return _loaded_and_fused(WanPipeline, _wan().double(), state)


def test_wan_musubi_lora_converts_with_family_wan_as_diffusers_reads_it(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """musubi-tuner's Wan LoRA (`lora_unet_blocks_0_self_attn_q`): convert had no Wan family (refused, its error naming
    no file and no way on). Now --family wan writes diffusers' Wan names: the file fuses into diffusers' Wan model as
    its own musubi converter reads the original; without --family the error names the file and --family wan."""
    lora = kohya_unet_lora(WAN_BLOCKS)
    src = tmp_path / "wan.safetensors"
    save_file(lora, str(src))
    out = tmp_path / "peft.safetensors"
    assert main(["convert", str(src), "--to", "peft", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "wan.safetensors" in err and "--family wan" in err and not out.exists()
    assert lorafuse.convert(src, out, to="peft", family="wan").family == "wan"
    _close(_wan_fused(out), _wan_fused(lora))
    back = tmp_path / "back.safetensors"
    assert lorafuse.convert(out, back, to="kohya").family == "wan"
    got = load_file(str(back))
    assert set(got) == set(lora) and all(torch.equal(got[k], v) for k, v in lora.items())


def test_wan_layers_outside_the_blocks_convert_and_a_flux_file_is_no_wan(tmp_path: Path) -> None:
    """Wan's layers outside the blocks (time_projection, head, text / time / image embedders) in ComfyUI's layout:
    --family wan names them as diffusers' `_convert_non_diffusers_wan_lora_to_diffusers` does; a Flux file under
    --family wan is refused, naming the module, not written."""
    g = torch.Generator().manual_seed(3)
    state: dict[str, torch.Tensor] = {}
    for path, (o, i) in {**WAN_GLOBAL, "blocks.0.self_attn.q": (16, 16), "blocks.1.ffn.0": (32, 16)}.items():
        state[f"diffusion_model.{path}.lora_A.weight"] = torch.randn(R, i, generator=g)
        state[f"diffusion_model.{path}.lora_B.weight"] = torch.randn(o, R, generator=g)
    src = tmp_path / "comfy_wan.safetensors"
    save_file(state, str(src))
    out = tmp_path / "peft.safetensors"
    lorafuse.convert(src, out, to="peft", family="wan")
    _close(_wan_fused(out), _wan_fused(state))
    flux = tmp_path / "flux.safetensors"
    save_file(kohya_unet_lora(ATTN), str(flux))
    with pytest.raises(LorafuseError, match=r"family 'wan' does not fit.*double_blocks_0"):
        lorafuse.convert(flux, tmp_path / "x.safetensors", to="peft", family="wan")
    assert not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------------------------------ errors name the file


def _np_lora(path: Path, modules: dict[str, tuple[int, int]], a: str = "lora_down", b: str = "lora_up") -> Path:
    g = torch.Generator().manual_seed(5)
    state: dict[str, torch.Tensor] = {}
    for m, (o, i) in modules.items():
        state[f"{m}.{a}.weight"] = torch.randn(R, i, generator=g)
        state[f"{m}.{b}.weight"] = torch.randn(o, R, generator=g)
    save_file(state, str(path))
    return path


@pytest.mark.parametrize("modules, to, family, words", [
    ({"lora_unet_double_blocks_0_img_attn_qkv": (3 * H + 1, H)}, "peft", None, "multiple of 3"),
    ({"lora_unet_final_layer_adaLN_modulation_1": (2 * H + 1, H)}, "peft", None, "even count"),
    ({"lora_unet_joint_blocks_0_x_block_attn_qkv": (3 * H, H)}, "peft", None, "cannot tell the model family"),
    ({"transformer.transformer_blocks.0.attn.to_q": (H, H), "transformer.transformer_blocks.0.attn.to_k": (H + 1, H)},
     "kohya", "flux", "q, k, v parts"),
    ({"transformer.transformer_blocks.0.attn.to_q": (H, H), "transformer.transformer_blocks.0.attn.to_k": (H, H + 1)},
     "kohya", "flux", "different input sizes"),
], ids=["qkv-rows", "adaln-rows", "sd3-guess", "qkv-parts-rows", "qkv-parts-inputs"])
def test_convert_errors_of_dit_layers_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    modules: dict, to: str, family: str | None, words: str) -> None:
    """A Flux fused layer whose rows do not split as the layer does (q | k | v thirds, the final (shift | scale)
    halves), parts of one fused layer that do not fit together, and a family that cannot be guessed (SD3's kohya
    names): the one-line error named the module but not the file it came from. Now it names both; nothing written."""
    peft = to == "kohya"
    src = _np_lora(tmp_path / "mylora.safetensors", modules, *(("lora_A", "lora_B") if peft else ()))
    out = tmp_path / "out.safetensors"
    args = ["convert", str(src), "--to", to, "-o", str(out)] + (["--family", family] if family else [])
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "mylora.safetensors" in err and words in err and not out.exists()
