"""Round 6 red team, model families: LoRAs of Flux.2 and HunyuanVideo written under the same kohya words as
Flux.1's (`lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_0_linear1`), and ComfyUI-layout
LoRAs (`diffusion_model.<original path>.lora_A.weight`).

Flux.2's MLP-bearing layers (img_mlp.0 / .2, linear1, linear2) have other widths (SwiGLU, ratio 3) and other
diffusers layers (`ff.linear_in`, `attn.to_qkv_mlp_proj`, `attn.to_out`) than Flux.1's: convert wrote them under
Flux.1's diffusers names, which diffusers' Flux2 model does not have. Its attention layers, and HunyuanVideo's
(musubi-tuner), are Flux.1's layer for layer. References: diffusers 0.42's own LoRA loaders (`Flux2Pipeline`'s kohya
converter, `HunyuanVideoPipeline`'s original-format converter) fused into tiny models in float64, and numpy."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_np
from safetensors.torch import save_file
from sd_fixtures import kohya_unet_lora, tiny_flux2

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import LorafuseError, MissingModuleError

H = 16  # the tiny transformers' hidden size
R = 4


def _delta(lora: dict[str, torch.Tensor], module: str) -> np.ndarray:
    down = lora[f"lora_unet_{module}.lora_down.weight"].double().numpy()
    up = lora[f"lora_unet_{module}.lora_up.weight"].double().numpy()
    return float(lora[f"lora_unet_{module}.alpha"]) / R * (up @ down)


def _pipeline(tmp: Path, model: torch.nn.Module, pipeline: str) -> Path:
    folder = tmp / "pipe"
    model.save_pretrained(str(folder / "transformer"))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": pipeline, "_diffusers_version": "0.42.1",
        "transformer": ["diffusers", type(model).__name__]}))
    return folder


def _fused(model_cls: type, folder: Path, state: dict[str, torch.Tensor], pipeline_cls: type) -> dict[str, np.ndarray]:
    """The transformer's weights after diffusers loads `state` (its own conversion) and fuses it, float64."""
    m = model_cls.from_pretrained(str(folder / "transformer")).double()
    sd = pipeline_cls.lora_state_dict({k: v.double() for k, v in state.items()})
    pipeline_cls.load_lora_into_transformer(sd, transformer=m)
    m.fuse_lora()
    m.unload_lora()
    return {k: v.numpy() for k, v in m.state_dict().items()}


def _merged(folder: Path, adapter: Path, out: Path) -> dict[str, np.ndarray]:
    lorafuse.apply(folder, [adapter], out=out, dtype="fp32")
    return load_np(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))


def _close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for k, w in want.items():
        np.testing.assert_allclose(got[k].astype(np.float64), w, rtol=1e-5, atol=1e-5, err_msg=k)


# ----------------------------------------------------------------------------------------------- Flux.2


# Flux.2's kohya (sd-scripts / musubi-tuner) modules with its widths: SwiGLU MLP of ratio 3
FLUX2_ATTN = {"double_blocks_0_img_attn_qkv": (3 * H, H), "double_blocks_0_img_attn_proj": (H, H),
              "double_blocks_0_txt_attn_qkv": (3 * H, H), "double_blocks_0_txt_attn_proj": (H, H)}
FLUX2_MLP = {"double_blocks_0_img_mlp_0": (6 * H, H), "double_blocks_0_img_mlp_2": (H, 3 * H),
             "double_blocks_0_txt_mlp_0": (6 * H, H), "double_blocks_0_txt_mlp_2": (H, 3 * H),
             "single_blocks_0_linear1": (9 * H, H), "single_blocks_0_linear2": (H, 4 * H)}


@pytest.mark.parametrize("module", list(FLUX2_MLP))
def test_a_flux2_kohya_mlp_layer_is_not_converted_under_flux1_names(tmp_path: Path, module: str,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Flux.2's `lora_unet_single_blocks_0_linear1` (9 x hidden rows) became Flux.1's to_q / to_k / to_v / proj_mlp
    (6 x hidden rows of 'MLP'), `img_mlp_0` became `ff.net.0.proj`: names diffusers' Flux2 model does not have (it
    has attn.to_qkv_mlp_proj, ff.linear_in), so the written file loaded as nothing. Now refused under Flux.1's names
    (--family flux), naming Flux.2 (round 8: without --family the widths tell Flux.2, whose names convert writes:
    tests/test_redteam_round8_dit.py)."""
    src = tmp_path / "flux2.safetensors"
    save_file(kohya_unet_lora({**FLUX2_ATTN, module: FLUX2_MLP[module]}), str(src))
    out = tmp_path / "peft.safetensors"
    with pytest.raises(LorafuseError, match=rf"lora_unet_{module}.*Flux\.1.*Flux\.2"):
        lorafuse.convert(src, out, to="peft", family="flux")
    assert not out.exists()
    assert main(["convert", str(src), "--to", "peft", "--family", "flux", "-o", str(out)]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Flux.2" in err and not out.exists()


def test_a_flux2_kohya_attention_lora_converts_to_names_flux2_loads(tmp_path: Path) -> None:
    """Flux.2's attention layers are Flux.1's (q | k | v thirds, proj): the converted file, loaded by diffusers'
    Flux2Pipeline, fuses to what diffusers' own kohya Flux.2 loader gives from the original file; and `apply` onto
    the Flux.2 pipeline folder matches it too."""
    from diffusers import Flux2Pipeline, Flux2Transformer2DModel

    folder = _pipeline(tmp_path, tiny_flux2(), "Flux2Pipeline")
    lora = kohya_unet_lora(FLUX2_ATTN, alpha=4.0)
    src = tmp_path / "attn.safetensors"
    save_file(lora, str(src))
    want = _fused(Flux2Transformer2DModel, folder, lora, Flux2Pipeline)
    out = tmp_path / "peft.safetensors"
    lorafuse.convert(src, out, to="peft")
    from safetensors.torch import load_file

    _close(_fused(Flux2Transformer2DModel, folder, load_file(str(out)), Flux2Pipeline), want)
    _close(_merged(folder, src, tmp_path / "merged"), want)


def _lands_whole(tmp_path: Path, base: dict[str, np.ndarray], keys: dict[str, str],
                 modules: dict[str, tuple[int, int]], seed: int, alpha: float) -> dict[str, np.ndarray]:
    """`base` saved as one file, a kohya LoRA of `modules` applied to it in float32: each module's weight
    (`keys[module]`) is W + alpha / r * up @ down; the merged file's tensors returned."""
    from safetensors.numpy import save_file as save_np

    ckpt = tmp_path / "base.safetensors"
    save_np(base, str(ckpt))
    lora = kohya_unet_lora(modules, seed=seed, alpha=alpha)
    src = tmp_path / "lora.safetensors"
    save_file(lora, str(src))
    out = tmp_path / "merged.safetensors"
    lorafuse.apply(ckpt, [src], out=out, dtype="fp32")
    got = load_np(str(out))
    for m, key in keys.items():
        np.testing.assert_allclose(got[key], base[key] + _delta(lora, m), rtol=1e-5, atol=1e-5, err_msg=key)
    return got


def test_a_flux2_kohya_lora_applies_whole_onto_a_flux2_bfl_file(tmp_path: Path) -> None:
    """A BFL-layout Flux.2 file has the kohya names' own layers (linear1 fused, img_mlp.0 SwiGLU-wide): every module
    lands whole, W + alpha / r * up @ down, which the Flux.1 width check must leave alone."""
    rng = np.random.default_rng(0)
    modules = {**FLUX2_ATTN, **FLUX2_MLP}
    keys = {m: re.sub(r"_(attn|mlp)_(qkv|proj|\d)$", r"_\1.\2",
                      re.sub(r"^(double|single)_blocks_(\d+)_", r"\1_blocks.\2.", m)) + ".weight" for m in modules}
    base = {keys[m]: rng.standard_normal(shape).astype(np.float32) for m, shape in modules.items()}
    base["final_layer.linear.weight"] = rng.standard_normal((4, H)).astype(np.float32)
    got = _lands_whole(tmp_path, base, keys, modules, seed=3, alpha=3.0)
    np.testing.assert_array_equal(got["final_layer.linear.weight"], base["final_layer.linear.weight"])


# ------------------------------------------------------------------------------------------ HunyuanVideo


def _hunyuan():  # type: ignore[no-untyped-def]
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 2, 4)).eval()


# musubi-tuner's HunyuanVideo LoRA: lora_unet_ + the original model's paths with '_' (its attention layers' words are
# Flux's; its MLP and modulation layers are fc1 / fc2 / mod.linear / modulation.linear, Flux's mlp.0 / mod.lin / ...)
HV_ATTN = {"double_blocks_0_img_attn_qkv": (3 * H, H), "double_blocks_0_img_attn_proj": (H, H),
           "double_blocks_0_txt_attn_qkv": (3 * H, H), "double_blocks_0_txt_attn_proj": (H, H),
           "single_blocks_0_linear1": (7 * H, H), "single_blocks_0_linear2": (H, 5 * H)}
HV_OTHER = {"double_blocks_0_img_mlp_fc1": (4 * H, H), "double_blocks_0_img_mlp_fc2": (H, 4 * H),
            "double_blocks_0_img_mod_linear": (6 * H, H), "single_blocks_0_modulation_linear": (3 * H, H)}


def _hv_original(module: str) -> str:
    """musubi's kohya module -> the original HunyuanVideo path (what its diffusion_model. files name)."""
    path = re.sub(r"^(double|single)_blocks_(\d+)_", r"\1_blocks.\2.", module)
    for a, b in (("mlp_fc", "mlp.fc"), ("mod_linear", "mod.linear"), ("modulation_linear", "modulation.linear")):
        path = path.replace(a, b)
    return path


def test_a_musubi_hunyuanvideo_attention_lora_applies_as_diffusers_loads_it(tmp_path: Path) -> None:
    """Its attention layers are Flux's layer for layer (qkv thirds, linear1 = q | k | v | mlp by the hidden size):
    `apply` onto a diffusers HunyuanVideo folder gives what diffusers' HunyuanVideo loader fuses from the same LoRA
    in the original layout (double blocks; its single-block converter hard-codes hidden 3072, so those by numpy)."""
    from diffusers import HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

    folder = _pipeline(tmp_path, _hunyuan(), "HunyuanVideoPipeline")
    lora = kohya_unet_lora(HV_ATTN)
    src = tmp_path / "musubi.safetensors"
    save_file(lora, str(src))
    double = {}
    for m in HV_ATTN:
        if m.startswith("double"):
            a = lora[f"lora_unet_{m}.lora_down.weight"].double()
            double[f"diffusion_model.{_hv_original(m)}.lora_A.weight"] = a
            double[f"diffusion_model.{_hv_original(m)}.lora_B.weight"] = (
                lora[f"lora_unet_{m}.lora_up.weight"].double() * float(lora[f"lora_unet_{m}.alpha"]) / R)
    want = _fused(HunyuanVideoTransformer3DModel, folder, double, HunyuanVideoPipeline)
    l1 = _delta(lora, "single_blocks_0_linear1")
    for i, part in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
        want[f"single_transformer_blocks.0.{part}.weight"] += l1[i * H:(i + 1) * H]
    want["single_transformer_blocks.0.proj_mlp.weight"] += l1[3 * H:]
    want["single_transformer_blocks.0.proj_out.weight"] += _delta(lora, "single_blocks_0_linear2")
    _close(_merged(folder, src, tmp_path / "merged"), want)
    peft = tmp_path / "peft.safetensors"  # convert's "flux names" are HunyuanVideo's diffusers names too
    lorafuse.convert(src, peft, to="peft")
    m = HunyuanVideoTransformer3DModel.from_pretrained(str(folder / "transformer")).double()
    state, meta = HunyuanVideoPipeline.lora_state_dict(str(peft), return_lora_metadata=True)
    HunyuanVideoPipeline.load_lora_into_transformer(state, transformer=m, metadata=meta)
    m.fuse_lora()
    m.unload_lora()
    _close({k: v.numpy() for k, v in m.state_dict().items()}, want)


def test_a_full_musubi_hunyuanvideo_lora_is_refused_by_convert_and_applied_on_its_original_file(
        tmp_path: Path) -> None:
    """Its MLP / modulation layers have no Flux name (img_mlp_fc1, img_mod_linear, modulation_linear): refused by
    convert, naming them, nothing written, never a silent drop; onto the original single-file layout
    (double_blocks.0.img_attn_qkv.weight, img_mlp.fc1.weight, ...) every module lands whole. (Onto a diffusers
    HunyuanVideo folder they merge since round 7: tests/test_redteam_round7_comfy.py, against diffusers.)"""
    lora = kohya_unet_lora({**HV_ATTN, **HV_OTHER}, seed=5)
    src = tmp_path / "musubi.safetensors"
    save_file(lora, str(src))
    peft = tmp_path / "peft.safetensors"
    with pytest.raises(MissingModuleError, match="modulation_linear"):
        lorafuse.convert(src, peft, to="peft")
    assert not peft.exists()
    rng = np.random.default_rng(1)
    base = {_hv_original(m) + ".weight": rng.standard_normal(s).astype(np.float32)
            for m, s in {**HV_ATTN, **HV_OTHER}.items()}
    from safetensors.numpy import save_file as save_np

    ckpt = tmp_path / "hunyuan_video.safetensors"
    save_np(base, str(ckpt))
    merged = tmp_path / "merged.safetensors"
    lorafuse.apply(ckpt, [src], out=merged, dtype="fp32")
    got = load_np(str(merged))
    for m in {**HV_ATTN, **HV_OTHER}:
        key = _hv_original(m) + ".weight"
        np.testing.assert_allclose(got[key], base[key] + _delta(lora, m), rtol=1e-5, atol=1e-5, err_msg=key)


# -------------------------------------------------------------------------------------- ComfyUI layout


@pytest.mark.parametrize(("key", "module"), [
    ("diffusion_model.double_blocks.0.img_attn.qkv", "lora_unet_double_blocks_0_img_attn_qkv"),  # Flux (ComfyUI)
    ("diffusion_model.blocks.0.self_attn.q", "lora_unet_blocks_0_self_attn_q"),  # Wan (musubi-tuner)
    ("diffusion_model.double_blocks.0.img_attn_qkv", "lora_unet_double_blocks_0_img_attn_qkv")])  # HunyuanVideo
def test_a_comfyui_layout_lora_reads_as_the_kohya_module_in_both_spellings(tmp_path: Path, key: str,
                                                                            module: str) -> None:
    """`diffusion_model.<path>.lora_A.weight` files (ComfyUI, ai-toolkit, musubi) were refused; round 7 reads
    them as diffusers does: the kohya module `lora_unet_<path with _>`, the same from the lora_down / lora_up /
    alpha spelling (tests/test_redteam_round7_comfy.py checks the merges against diffusers)."""
    down, up = torch.randn(R, H), torch.randn(3 * H, R)
    src = tmp_path / "comfy.safetensors"
    save_file({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up}, str(src))
    spelled = tmp_path / "comfy_down.safetensors"
    save_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(float(R))},
              str(spelled))
    want = (up.double() @ down.double()).numpy()
    for path in (src, spelled):
        a = lorafuse.load(path)
        assert a.format == "kohya" and list(a.updates) == [module]
        np.testing.assert_allclose(np.asarray(a.updates[module].delta(), dtype=np.float64), want, rtol=1e-5,
                                   atol=1e-5, err_msg=str(path))


# ------------------------------------------------------------------- diffusers LoRAs of other transformers

# diffusers 0.42 transformers whose LoRA names (diffusers' own module paths) the Flux / SD tables do not know
OTHERS = {
    "wan": ("WanTransformer3DModel", "WanPipeline", dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32)),
    "ltx": ("LTXVideoTransformer3DModel", "LTXPipeline", dict(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=1, caption_channels=16)),
    "qwenimage": ("QwenImageTransformer2DModel", "QwenImagePipeline", dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(2, 2, 4))),
}


def _other_lora(tmp: Path, family: str) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """(pipeline folder, the LoRA diffusers' save_lora_weights writes on every Linear, diffusers' fused weights)."""
    import diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model_name, pipeline_name, kw = OTHERS[family]
    model_cls, pipeline = getattr(diffusers, model_name), getattr(diffusers, pipeline_name)
    torch.manual_seed(0)
    folder = _pipeline(tmp, model_cls(**kw).eval(), pipeline_name)
    m = model_cls.from_pretrained(str(folder / "transformer"))
    linears = [n for n, x in m.named_modules() if isinstance(x, torch.nn.Linear)]
    config = LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, target_modules=linears)
    m.add_adapter(config)
    pipeline.save_lora_weights(str(tmp / "lora"), transformer_lora_layers=get_peft_model_state_dict(m),
                               transformer_lora_adapter_metadata=config.to_dict())
    src = tmp / "lora" / "pytorch_lora_weights.safetensors"
    ref = model_cls.from_pretrained(str(folder / "transformer")).double()
    state, meta = pipeline.lora_state_dict(str(src), return_lora_metadata=True)
    pipeline.load_lora_into_transformer(state, transformer=ref, metadata=meta)
    ref.fuse_lora()
    ref.unload_lora()
    return folder, src, {k: v.numpy() for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("family", list(OTHERS))
def test_a_diffusers_lora_of_another_transformer_applies_onto_its_pipeline_folder(tmp_path: Path, family: str) -> None:
    """The file diffusers' own pipeline writes for a Wan / LTX-Video / QwenImage transformer was refused onto that
    pipeline's folder: "module 'transformer.blocks.0.attn1.to_k' (the base has 'transformer/blocks.0.attn1.to_k.weight',
    which ends like it: the same layer in another layout?)". Now every module lands on its own weight, as diffusers'
    load_lora_weights + fuse_lora gives."""
    folder, src, want = _other_lora(tmp_path, family)
    _close(_merged(folder, src, tmp_path / "merged"), want)


def test_a_diffusers_lora_applies_onto_the_transformer_file_alone(tmp_path: Path) -> None:
    """A checkpoint of the one model (the transformer's diffusion_pytorch_model.safetensors, no component folders):
    `transformer.<path>` lands on `<path>.weight`, as diffusers' load_lora_adapter(prefix='transformer') reads it."""
    folder, src, want = _other_lora(tmp_path, "wan")
    out = tmp_path / "merged.safetensors"
    lorafuse.apply(folder / "transformer" / "diffusion_pytorch_model.safetensors", [src], out=out, dtype="fp32")
    _close(load_np(str(out)), want)


def test_a_musubi_qwenimage_kohya_lora_applies_onto_its_pipeline_folder(tmp_path: Path) -> None:
    """musubi-tuner names a QwenImage LoRA `lora_unet_` + the diffusers path with '_' (`lora_unet_transformer_blocks_0_
    attn_to_q`, `lora_unet_img_in`); diffusers' QwenImage loader reads it. Onto the pipeline folder it was refused
    (the underscore spelling looked for `transformer/` in the name); now it lands as diffusers fuses it."""
    import diffusers

    model_name, pipeline_name, kw = OTHERS["qwenimage"]
    model_cls, pipeline = getattr(diffusers, model_name), getattr(diffusers, pipeline_name)
    torch.manual_seed(0)
    folder = _pipeline(tmp_path, model_cls(**kw).eval(), pipeline_name)
    m = model_cls.from_pretrained(str(folder / "transformer"))
    shapes = {n: tuple(x.weight.shape) for n, x in m.named_modules() if isinstance(x, torch.nn.Linear)}
    lora = kohya_unet_lora({n.replace(".", "_"): s for n, s in shapes.items()}, seed=7, alpha=1.0)
    src = tmp_path / "musubi.safetensors"
    save_file(lora, str(src))
    want = _fused(model_cls, folder, lora, pipeline)
    assert sum(not np.array_equal(want[n + ".weight"], m.state_dict()[n + ".weight"].double().numpy())
               for n in shapes) == len(shapes) == 20
    _close(_merged(folder, src, tmp_path / "merged"), want)


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model."])
def test_an_sd3_kohya_lora_applies_onto_an_sd3_single_file(tmp_path: Path, prefix: str) -> None:
    """sd-scripts names an SD3 / SD3.5 LoRA `lora_unet_` + the single file's MMDiT path with '_'
    (`lora_unet_joint_blocks_0_x_block_attn_qkv`); the single file (and ComfyUI's) keeps it under
    `model.diffusion_model.`. Refused before ("found no target"); now each module lands whole on its weight."""
    rng = np.random.default_rng(0)
    modules = {"joint_blocks_0_x_block_attn_qkv": (3 * H, H), "joint_blocks_0_context_block_mlp_fc1": (4 * H, H),
               "joint_blocks_0_x_block_adaLN_modulation_1": (6 * H, H)}
    paths = {"joint_blocks_0_x_block_attn_qkv": "joint_blocks.0.x_block.attn.qkv",
             "joint_blocks_0_context_block_mlp_fc1": "joint_blocks.0.context_block.mlp.fc1",
             "joint_blocks_0_x_block_adaLN_modulation_1": "joint_blocks.0.x_block.adaLN_modulation.1"}
    base = {f"{prefix}{paths[m]}.weight": rng.standard_normal(s).astype(np.float32) for m, s in modules.items()}
    base[f"{prefix}x_embedder.proj.weight"] = rng.standard_normal((H, 4, 2, 2)).astype(np.float32)
    _lands_whole(tmp_path, base, {m: f"{prefix}{paths[m]}.weight" for m in modules}, modules, seed=2, alpha=1.0)


def test_a_lycoris_flux2_lokr_applies_onto_the_flux2_pipeline_folder(tmp_path: Path) -> None:
    """LyCORIS wraps the diffusers Flux2 transformer and names `lycoris_transformer_blocks_0_attn_to_q` (diffusers'
    Flux2 loader reads it, `_convert_lycoris_flux2_lokr_to_diffusers`): onto the pipeline folder it was refused;
    now each LoKr lands on `transformer/<path>`, W + kron(w1, w2) (both halves full: scale 1)."""
    folder = _pipeline(tmp_path, tiny_flux2(), "Flux2Pipeline")
    g = torch.Generator().manual_seed(0)
    modules = {"transformer_blocks_0_attn_to_q": ("transformer_blocks.0.attn.to_q", 4),
               "single_transformer_blocks_0_attn_to_qkv_mlp_proj": ("single_transformer_blocks.0.attn.to_qkv_mlp_proj",
                                                                    36)}
    lora = {}
    for m, (_, rows) in modules.items():
        lora[f"lycoris_{m}.lokr_w1"] = torch.randn(4, 4, generator=g)
        lora[f"lycoris_{m}.lokr_w2"] = torch.randn(rows, 4, generator=g)
    src = tmp_path / "lokr.safetensors"
    save_file(lora, str(src))
    base = load_np(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    got = _merged(folder, src, tmp_path / "merged")
    for m, (path, _) in modules.items():
        key = path + ".weight"
        delta = np.kron(lora[f"lycoris_{m}.lokr_w1"].double().numpy(), lora[f"lycoris_{m}.lokr_w2"].double().numpy())
        np.testing.assert_allclose(got[key], base[key] + delta, rtol=1e-5, atol=1e-5, err_msg=key)
