"""Round 7 red team, area `comfy`: LoRA files in ComfyUI's layout (`diffusion_model.` + the original model's module
path, as ComfyUI, ai-toolkit and musubi-tuner write them) and musubi-tuner's kohya names, onto the bases people run.

References: diffusers 0.42's own converters (`lora_conversion_utils`) on tiny randomly-initialised diffusers
transformers; merged weights compared in numpy float64.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
from redteam_fixtures import run_cli
from safetensors.numpy import load_file as np_load
from safetensors.torch import save_file
from sd_fixtures import lora_file

import lorafuse
from lorafuse.errors import LorafuseError

FLUX = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=True,
            axes_dims_rope=(2, 2, 4))
HIDDEN = 16
# BFL layer -> (out, in) of a tiny Flux.1 (hidden 16, MLP 64).
FLUX_BFL = {
    "double_blocks.0.img_attn.qkv": (48, 16), "double_blocks.0.img_attn.proj": (16, 16),
    "double_blocks.0.img_mlp.0": (64, 16), "double_blocks.0.img_mlp.2": (16, 64),
    "double_blocks.0.img_mod.lin": (96, 16), "double_blocks.0.txt_attn.qkv": (48, 16),
    "single_blocks.0.linear1": (112, 16), "single_blocks.0.linear2": (16, 80),
    "single_blocks.0.modulation.lin": (48, 16), "final_layer.adaLN_modulation.1": (32, 16),
    "img_in": (16, 4), "time_in.in_layer": (16, 256),
}


def _factors(shapes: Mapping[str, tuple[int, int]], seed: int, rank: int = 2) -> dict[str, tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(seed)
    return {m: (rng.standard_normal((rank, i)).astype(np.float32), rng.standard_normal((o, rank)).astype(np.float32))
            for m, (o, i) in shapes.items()}


def _comfy_file(path: Path, factors: Mapping[str, tuple[np.ndarray, ...]], names: tuple[str, str],
                alpha: float | None = None, prefix: str = "diffusion_model.") -> Path:
    return lora_file(path, factors, prefix, names, alpha)  # ComfyUI's prefix by default


@pytest.fixture(scope="module")
def flux_base(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    torch.manual_seed(0)
    sd = {k: v.detach().float().contiguous() for k, v in FluxTransformer2DModel(**FLUX).state_dict().items()}
    path = tmp_path_factory.mktemp("flux") / "flux_diffusers.safetensors"
    save_file(sd, str(path))
    return path, {k: v.numpy().astype(np.float64) for k, v in sd.items()}


def _reference_merge(weights: Mapping[str, np.ndarray], converted: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """W + B @ A of diffusers' converted state dict (its kohya converter bakes alpha / r into the factors)."""
    out = {}
    for k, a in converted.items():
        if ".lora_A." not in k:
            continue
        b = converted[k.replace(".lora_A.", ".lora_B.")]
        key = k.removeprefix("transformer.").replace(".lora_A.weight", ".weight")
        out[key] = weights[key] + b.double().numpy() @ a.double().numpy()
    return out


def _check_merged(out: Path, weights: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> None:
    got = np_load(str(out))
    assert want
    for key, w in weights.items():
        expect = want.get(key, w)
        assert np.allclose(got[key].astype(np.float64), expect, rtol=1e-5, atol=1e-5), key


@pytest.mark.parametrize("names,alpha", [(("lora_A.weight", "lora_B.weight"), None),
                                         (("lora_A.weight", "lora_B.weight"), 1.0),
                                         (("lora_down.weight", "lora_up.weight"), 4.0)])
def test_flux_comfyui_layout_applies_as_diffusers_reads_it(tmp_path, flux_base, names, alpha):
    """`diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight` (ComfyUI / ai-toolkit / musubi Flux LoRAs) merged
    into a diffusers Flux transformer: diffusers' Flux loader reads this layout as kohya's (`diffusion_model.` ->
    `lora_unet_`, its `_convert_kohya_flux_lora_to_diffusers`). Round 6 refused the file."""
    base, weights = flux_base
    factors = _factors(FLUX_BFL, 1)
    lora = _comfy_file(tmp_path / "comfy.safetensors", factors, names, alpha)
    kohya = {}
    for m, (a, b) in factors.items():
        kohya[f"lora_unet_{m.replace('.', '_')}.lora_down.weight"] = torch.from_numpy(a)
        kohya[f"lora_unet_{m.replace('.', '_')}.lora_up.weight"] = torch.from_numpy(b)
        kohya[f"lora_unet_{m.replace('.', '_')}.alpha"] = torch.tensor(alpha if alpha is not None else 2.0)
    # diffusers' converter hard-codes Flux.1's 3072 hidden for linear1 (merged by hand below: q | k | v | mlp)
    linear1 = [k for k in kohya if "linear1" in k]
    for k in linear1:
        del kohya[k]
    want = _reference_merge(weights, _convert_kohya_flux_lora_to_diffusers(dict(kohya)))
    # diffusers skips final_layer / time_in: merged by hand (documented: lorafuse merges every module)
    s = (alpha if alpha is not None else 2.0) / 2
    a, b = factors["single_blocks.0.linear1"]
    d = s * (b.astype(np.float64) @ a.astype(np.float64))
    for i, part in enumerate(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")):
        key = f"single_transformer_blocks.0.{part}.weight"
        want[key] = weights[key] + d[i * HIDDEN:(i + 1) * HIDDEN if i < 3 else None]
    a, b = factors["time_in.in_layer"]
    key = "time_text_embed.timestep_embedder.linear_1.weight"
    want[key] = weights[key] + s * (b.astype(np.float64) @ a.astype(np.float64))
    a, b = factors["final_layer.adaLN_modulation.1"]
    d = s * (b.astype(np.float64) @ a.astype(np.float64))
    want["norm_out.linear.weight"] = weights["norm_out.linear.weight"] + np.concatenate([d[HIDDEN:], d[:HIDDEN]])
    out = tmp_path / "merged.safetensors"
    lorafuse.apply(base, [lora], out=out)
    _check_merged(out, weights, want)


def test_flux_comfyui_layout_converts_to_diffusers_names(tmp_path):
    """convert --to peft of a ComfyUI Flux LoRA writes diffusers' names, with the deltas diffusers' converter gives."""
    factors = _factors(FLUX_BFL, 2)
    lora = _comfy_file(tmp_path / "comfy.safetensors", factors, ("lora_A.weight", "lora_B.weight"), 1.0)
    out = tmp_path / "peft.safetensors"
    lorafuse.convert(lora, out, to="peft")
    got = np_load(str(out))
    kohya = {}
    for m, (a, b) in factors.items():
        kohya[f"lora_unet_{m.replace('.', '_')}.lora_down.weight"] = torch.from_numpy(a)
        kohya[f"lora_unet_{m.replace('.', '_')}.lora_up.weight"] = torch.from_numpy(b)
        kohya[f"lora_unet_{m.replace('.', '_')}.alpha"] = torch.tensor(1.0)
    # diffusers 0.42.1 merges final_layer without its alpha (checked by hand below) and hard-codes Flux.1's
    # 3072 hidden for linear1
    ref = _convert_kohya_flux_lora_to_diffusers({k: v for k, v in kohya.items()
                                                 if "linear1" not in k and "final_layer" not in k})
    ad = lorafuse.load(out)
    for k in ref:
        if ".lora_A." not in k:
            continue
        module = "transformer." + k.replace(".lora_A.weight", "").removeprefix("transformer.")
        want = ref[k.replace(".lora_A.", ".lora_B.")].double().numpy() @ ref[k].double().numpy()
        u = ad.updates[module]
        have = u.scale * _product(got, module)
        assert np.allclose(have, want, atol=1e-5), module
    a, b = factors["final_layer.adaLN_modulation.1"]
    d = 0.5 * (b.astype(np.float64) @ a.astype(np.float64))
    m = "transformer.norm_out.linear"
    have = ad.updates[m].scale * _product(got, m)
    assert np.allclose(have, np.concatenate([d[HIDDEN:], d[:HIDDEN]]), atol=1e-5)


def _product(tensors: Mapping[str, np.ndarray], module: str) -> np.ndarray:
    return tensors[module + ".lora_B.weight"].astype(np.float64) @ tensors[module + ".lora_A.weight"].astype(np.float64)


def test_comfyui_layout_two_spellings_of_one_factor_refused(tmp_path):
    """A file holding both `X.lora_A.weight` and `X.lora_down.weight` names one factor twice: refused, naming both."""
    f = tmp_path / "twice.safetensors"
    save_file({"diffusion_model.img_in.lora_A.weight": torch.ones(2, 16),
               "diffusion_model.img_in.lora_down.weight": torch.ones(2, 16),
               "diffusion_model.img_in.lora_B.weight": torch.ones(16, 2)}, str(f))
    code, out, err = run_cli(["info", str(f)])
    assert code != 0 and "Traceback" not in err
    assert "lora_A.weight" in err and "lora_down.weight" in err


def test_comfyui_layout_unknown_part_refused_with_reason(tmp_path):
    """`.diff` (a full-weight difference ComfyUI also stores) is not read: refused, naming the tensor."""
    f = tmp_path / "diff.safetensors"
    save_file({"diffusion_model.img_in.lora_A.weight": torch.ones(2, 4),
               "diffusion_model.img_in.lora_B.weight": torch.ones(16, 2),
               "diffusion_model.img_in.diff": torch.ones(16, 4)}, str(f))
    with pytest.raises(LorafuseError, match=r"img_in.*diff"):
        lorafuse.load(f)


# ------------------------------------------------------------------------------------------------------------ Wan

WAN_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                  text_dim=12, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=8, added_kv_proj_dim=16, rope_max_seq_len=32)
# original (Wan's own code) module path -> (out, in) in the tiny model above
WAN_ORIGINAL = {
    **{f"blocks.{i}.{a}.{p}": (16, 16) for i in range(2) for a in ("self_attn", "cross_attn") for p in "qkvo"},
    **{f"blocks.{i}.cross_attn.{p}": (16, 16) for i in range(2) for p in ("k_img", "v_img")},
    **{f"blocks.{i}.ffn.0": (32, 16) for i in range(2)}, **{f"blocks.{i}.ffn.2": (16, 32) for i in range(2)},
}
WAN_GLOBAL = {"time_projection.1": (96, 16), "head.head": (16, 16), "text_embedding.0": (16, 12),
              "text_embedding.2": (16, 16), "time_embedding.0": (16, 16), "time_embedding.2": (16, 16),
              "img_emb.proj.1": (8, 8), "img_emb.proj.3": (16, 8)}


@pytest.fixture(scope="module")
def wan_base(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    sd = {k: v.detach().float().contiguous() for k, v in WanTransformer3DModel(**WAN_CONFIG).state_dict().items()}
    folder = tmp_path_factory.mktemp("wan") / "pipe"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "WanPipeline", "transformer": ["diffusers", '
                                             '"WanTransformer3DModel"]}')
    (folder / "transformer" / "config.json").write_text('{"_class_name": "WanTransformer3DModel"}')
    save_file(sd, str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    return folder, {k: v.numpy().astype(np.float64) for k, v in sd.items()}


def _musubi_file(path: Path, factors: Mapping[str, tuple[np.ndarray, ...]], alpha: float) -> Path:
    tensors = {}
    for m, (a, b) in factors.items():
        name = "lora_unet_" + m.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = torch.from_numpy(a)
        tensors[f"{name}.lora_up.weight"] = torch.from_numpy(b)
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def test_wan_musubi_names_apply_onto_diffusers_folder(tmp_path, wan_base):
    """musubi-tuner's Wan LoRA (`lora_unet_blocks_0_self_attn_q`) merged into a diffusers Wan pipeline folder:
    diffusers' `_convert_musubi_wan_lora_to_diffusers` is the reference. Round 6 left every module unmatched."""
    from diffusers.loaders.lora_conversion_utils import _convert_musubi_wan_lora_to_diffusers

    folder, weights = wan_base
    factors = _factors(WAN_ORIGINAL, 3)
    lora = _musubi_file(tmp_path / "musubi.safetensors", factors, 1.0)
    want = _reference_merge(weights, _convert_musubi_wan_lora_to_diffusers(dict(np_load_torch(lora))))
    out = tmp_path / "merged"
    lorafuse.apply(folder, [lora], out=out)
    _check_merged(out / "transformer" / "diffusion_pytorch_model.safetensors", weights, want)


@pytest.mark.parametrize("names,alpha", [(("lora_A.weight", "lora_B.weight"), None),
                                         (("lora_down.weight", "lora_up.weight"), 8.0)])
def test_wan_comfyui_layout_applies_onto_diffusers_folder(tmp_path, wan_base, names, alpha):
    """`diffusion_model.blocks.0.self_attn.q.lora_A.weight` (ComfyUI / ai-toolkit Wan LoRAs, with the layers outside
    the blocks) merged into a diffusers Wan folder as diffusers' `_convert_non_diffusers_wan_lora_to_diffusers`
    reads it (alpha: only on block layers, where diffusers reads it)."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers

    folder, weights = wan_base
    blocks, outside = _factors(WAN_ORIGINAL, 4), _factors(WAN_GLOBAL, 5)
    lora = tmp_path / "comfy.safetensors"
    tensors = dict(np_load_torch(_comfy_file(tmp_path / "b.safetensors", blocks, names, alpha)))
    tensors.update(np_load_torch(_comfy_file(tmp_path / "o.safetensors", outside, names)))
    save_file(tensors, str(lora))
    want = _reference_merge(weights, _convert_non_diffusers_wan_lora_to_diffusers(dict(tensors)))
    assert len(want) == len(WAN_ORIGINAL) + len(WAN_GLOBAL)
    out = tmp_path / "merged"
    lorafuse.apply(folder, [lora], out=out)
    _check_merged(out / "transformer" / "diffusion_pytorch_model.safetensors", weights, want)


def test_wan_diffusers_names_in_comfyui_layout_apply(tmp_path, wan_base):
    """ai-toolkit writes Wan LoRAs with diffusers' paths under `diffusion_model.` (`diffusion_model.blocks.0.attn1.to_q
    .lora_A.weight`): the same weights."""
    folder, weights = wan_base
    shapes = {"blocks.0.attn1.to_q": (16, 16), "blocks.1.ffn.net.0.proj": (32, 16), "proj_out": (16, 16)}
    factors = _factors(shapes, 6)
    lora = _comfy_file(tmp_path / "aitk.safetensors", factors, ("lora_A.weight", "lora_B.weight"))
    want = {f"{m}.weight": weights[f"{m}.weight"] + b.astype(np.float64) @ a.astype(np.float64)
            for m, (a, b) in factors.items()}
    out = tmp_path / "merged"
    lorafuse.apply(folder, [lora], out=out)
    _check_merged(out / "transformer" / "diffusion_pytorch_model.safetensors", weights, want)


def np_load_torch(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# --------------------------------------------------------------------------------------------------- HunyuanVideo

HV_CONFIG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                 num_single_layers=1, num_refiner_layers=1, mlp_ratio=4.0, patch_size=1, patch_size_t=1,
                 qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
                 rope_axes_dim=(2, 2, 4))
# HunyuanVideo's original module paths (its own code, ComfyUI, musubi-tuner) -> (out, in) in the tiny model
HV_ORIGINAL = {
    "double_blocks.0.img_attn_qkv": (48, 16), "double_blocks.0.img_attn_proj": (16, 16),
    "double_blocks.0.img_mlp.fc1": (64, 16), "double_blocks.0.img_mlp.fc2": (16, 64),
    "double_blocks.0.img_mod.linear": (96, 16), "double_blocks.0.txt_attn_qkv": (48, 16),
    "double_blocks.0.txt_attn_proj": (16, 16), "double_blocks.0.txt_mlp.fc1": (64, 16),
    "double_blocks.0.txt_mlp.fc2": (16, 64), "double_blocks.0.txt_mod.linear": (96, 16),
    "single_blocks.0.linear2": (16, 80), "single_blocks.0.modulation.linear": (48, 16),
    "time_in.mlp.0": (16, 256), "time_in.mlp.2": (16, 16), "guidance_in.mlp.0": (16, 256),
    "vector_in.in_layer": (16, 8),
}


@pytest.fixture(scope="module")
def hv_base(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(**HV_CONFIG)
    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("hv") / "hunyuan_video.safetensors"
    save_file(sd, str(path))
    return path, {k: v.numpy().astype(np.float64) for k, v in sd.items()}


@pytest.mark.parametrize("layout", ["comfyui", "musubi"])
def test_hunyuan_video_mlp_and_modulation_apply_onto_diffusers(tmp_path, hv_base, layout):
    """HunyuanVideo LoRAs name its MLP / modulation / embedder layers `img_mlp.fc1`, `img_mod.linear`,
    `modulation.linear`, `time_in.mlp.0`: merged into a diffusers HunyuanVideo transformer as diffusers'
    `_convert_hunyuan_video_lora_to_diffusers` reads them (round 6 merged only the attention layers)."""
    from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers

    base, weights = hv_base
    factors = _factors(HV_ORIGINAL, 7)
    if layout == "comfyui":
        lora = _comfy_file(tmp_path / "hv.safetensors", factors, ("lora_A.weight", "lora_B.weight"))
    else:
        lora = _musubi_file(tmp_path / "hv.safetensors", factors, 2.0)  # alpha = rank: scale 1
    original = {f"{m}.lora_{n}.weight": torch.from_numpy(t) for m, (a, b) in factors.items()
                for n, t in (("A", a), ("B", b))}
    want = _reference_merge(weights, _convert_hunyuan_video_lora_to_diffusers(original))
    assert len(want) == 20  # the qkv layers land on three weights each
    out = tmp_path / "merged.safetensors"
    lorafuse.apply(base, [lora], out=out)
    _check_merged(out, weights, want)


# --------------------------------------------------------------------------------------------------------- Flux.2

FLUX2_CONFIG = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                    num_attention_heads=2, joint_attention_dim=12, timestep_guidance_channels=16,
                    axes_dims_rope=(2, 2, 2, 2))
# Flux.2's BFL paths (ComfyUI, ai-toolkit) -> (out, in) of the tiny model (hidden 16, SwiGLU MLP 48)
FLUX2_BFL = {
    "double_blocks.0.img_attn.qkv": (48, 16), "double_blocks.0.img_attn.proj": (16, 16),
    "double_blocks.0.txt_attn.qkv": (48, 16), "double_blocks.0.txt_attn.proj": (16, 16),
    "double_blocks.0.img_mlp.0": (96, 16), "double_blocks.0.img_mlp.2": (16, 48),
    "double_blocks.0.txt_mlp.0": (96, 16), "double_blocks.0.txt_mlp.2": (16, 48),
    "single_blocks.0.linear1": (144, 16), "single_blocks.0.linear2": (16, 64),
    "img_in": (16, 4), "txt_in": (16, 12), "time_in.in_layer": (16, 16), "time_in.out_layer": (16, 16),
    "guidance_in.in_layer": (16, 16), "single_stream_modulation.lin": (48, 16),
    "double_stream_modulation_img.lin": (96, 16), "double_stream_modulation_txt.lin": (96, 16),
    "final_layer.linear": (4, 16),
}


@pytest.mark.parametrize("names,alpha", [(("lora_A.weight", "lora_B.weight"), None),
                                         (("lora_down.weight", "lora_up.weight"), 1.0)])
def test_flux2_comfyui_layout_applies_onto_diffusers_flux2(tmp_path, names, alpha):
    """A Flux.2 LoRA in ComfyUI's layout (Flux.1's words, SwiGLU MLP widths, fused single-block projection, shared
    modulation) merged into a diffusers Flux2 transformer as diffusers' `_convert_non_diffusers_flux2_lora_to_diffusers`
    reads it: round 6 had no Flux.2 table (MLP / linear1 / modulation / time_in found no weight)."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_flux2_lora_to_diffusers

    torch.manual_seed(0)
    sd = {k: v.detach().float().contiguous() for k, v in Flux2Transformer2DModel(**FLUX2_CONFIG).state_dict().items()}
    base = tmp_path / "flux2.safetensors"
    save_file(sd, str(base))
    weights = {k: v.numpy().astype(np.float64) for k, v in sd.items()}
    factors = _factors(FLUX2_BFL, 8)
    lora = _comfy_file(tmp_path / "f2.safetensors", factors, names, alpha)
    s = 1.0 if alpha is None else alpha / 2
    scaled = {f"diffusion_model.{m}.lora_{n}.weight": torch.from_numpy(t * (s if n == "B" else 1.0))
              for m, (a, b) in factors.items() for n, t in (("A", a), ("B", b))}
    want = _reference_merge(weights, _convert_non_diffusers_flux2_lora_to_diffusers(scaled))
    assert len(want) == len(FLUX2_BFL) + 4  # two qkv layers on three weights each
    out = tmp_path / "merged.safetensors"
    lorafuse.apply(base, [lora], out=out)
    _check_merged(out, weights, want)


def test_flux2_final_layer_halves_swapped_as_the_base_converter_swaps_them(tmp_path):
    """`final_layer.adaLN_modulation.1` is (shift | scale) in Flux.2's BFL files and (scale | shift) in diffusers'
    `norm_out.linear` (`convert_flux2_transformer_checkpoint_to_diffusers` swaps the base weight's halves), so its
    delta lands swapped (diffusers 0.42.1's LoRA converter does not swap: a bug this test does not follow)."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    torch.manual_seed(0)
    sd = {k: v.detach().float().contiguous() for k, v in Flux2Transformer2DModel(**FLUX2_CONFIG).state_dict().items()}
    base = tmp_path / "flux2.safetensors"
    save_file(sd, str(base))
    w = sd["norm_out.linear.weight"].double()
    bfl = {"final_layer.adaLN_modulation.1.weight": torch.cat([w[HIDDEN:], w[:HIDDEN]])}
    assert torch.equal(convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl))["norm_out.linear.weight"], w)
    (a, b), = _factors({"final_layer.adaLN_modulation.1": (32, 16)}, 9).values()
    lora = _comfy_file(tmp_path / "f.safetensors", {"final_layer.adaLN_modulation.1": (a, b)},
                       ("lora_A.weight", "lora_B.weight"))
    d = b.astype(np.float64) @ a.astype(np.float64)
    merged_bfl = {"final_layer.adaLN_modulation.1.weight": bfl["final_layer.adaLN_modulation.1.weight"]
                  + torch.from_numpy(d)}
    want = convert_flux2_transformer_checkpoint_to_diffusers(merged_bfl)["norm_out.linear.weight"].numpy()
    out = tmp_path / "merged.safetensors"
    lorafuse.apply(base, [lora], out=out)
    assert np.allclose(np_load(str(out))["norm_out.linear.weight"].astype(np.float64), want, atol=1e-5)


def test_flux_comfyui_layout_lokr_splits_over_q_k_v(tmp_path, flux_base):
    """A LyCORIS LoKr in ComfyUI's layout (`diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1` / `lokr_w2`) on a
    fused BFL layer: the Kronecker delta (both halves full: scale 1) lands by thirds of its rows on to_q / to_k /
    to_v of a diffusers Flux transformer."""
    base, weights = flux_base
    rng = np.random.default_rng(10)
    w1, w2 = rng.standard_normal((3, 2)).astype(np.float32), rng.standard_normal((16, 8)).astype(np.float32)
    lora = tmp_path / "lokr.safetensors"
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1": torch.from_numpy(w1),
               "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w2": torch.from_numpy(w2)}, str(lora))
    d = np.kron(w1.astype(np.float64), w2.astype(np.float64))
    want = {f"transformer_blocks.0.attn.{p}.weight": weights[f"transformer_blocks.0.attn.{p}.weight"]
            + d[i * HIDDEN:(i + 1) * HIDDEN] for i, p in enumerate(("to_q", "to_k", "to_v"))}
    out = tmp_path / "merged.safetensors"
    lorafuse.apply(base, [lora], out=out)
    _check_merged(out, weights, want)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_flux_comfyui_layout_lands_whole_on_a_bfl_checkpoint(tmp_path, prefix):
    """Onto a BFL single file or a ComfyUI checkpoint every module lands whole on its own weight, alpha / r applied."""
    rng = np.random.default_rng(11)
    weights = {f"{prefix}{m}.weight": rng.standard_normal(s).astype(np.float32) for m, s in FLUX_BFL.items()}
    base = tmp_path / "flux1.safetensors"
    save_file({k: torch.from_numpy(v) for k, v in weights.items()}, str(base))
    factors = _factors(FLUX_BFL, 12)
    lora = _comfy_file(tmp_path / "comfy.safetensors", factors, ("lora_A.weight", "lora_B.weight"), 3.0)
    want = {f"{prefix}{m}.weight": weights[f"{prefix}{m}.weight"].astype(np.float64)
            + 1.5 * (b.astype(np.float64) @ a.astype(np.float64)) for m, (a, b) in factors.items()}
    out = tmp_path / "merged.safetensors"
    lorafuse.apply(base, [lora], out=out)
    _check_merged(out, {k: v.astype(np.float64) for k, v in weights.items()}, want)


def test_comfyui_text_encoder_keys_refused_with_their_layout_named(tmp_path):
    """A ComfyUI file whose denoiser part is read but which also holds `text_encoders.qwen25_7b.transformer...` factors
    (a text encoder lorafuse does not name; clip_l / clip_g / t5xxl are read since round 9) is refused, the reason
    naming that layout (not a bare "not a kohya LoRA tensor")."""
    f = tmp_path / "with_te.safetensors"
    save_file({"diffusion_model.img_in.lora_A.weight": torch.ones(2, 4),
               "diffusion_model.img_in.lora_B.weight": torch.ones(16, 2),
               "text_encoders.qwen25_7b.transformer.model.layers.0.self_attn.q_proj.lora_A.weight":
                   torch.ones(2, 8),
               "text_encoders.qwen25_7b.transformer.model.layers.0.self_attn.q_proj.lora_B.weight":
                   torch.ones(8, 2)}, str(f))
    code, _, err = run_cli(["info", str(f)])
    assert code != 0 and "Traceback" not in err
    assert "text-encoder LoRA layout" in err and "text_encoders." in err


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", ""])
def test_wan_diffusers_lora_applies_onto_an_original_wan_checkpoint(tmp_path, prefix):
    """A diffusers Wan LoRA (`transformer.blocks.0.attn1.to_q`, what diffusers' trainers save) merged into Wan's
    original single file / ComfyUI checkpoint (`model.diffusion_model.blocks.0.self_attn.q.weight`): what diffusers'
    own `convert_wan_transformer_to_diffusers` gives for the merged file is its conversion of the base plus the delta.
    Round 6 found no target."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    rng = np.random.default_rng(13)
    shapes = {**WAN_ORIGINAL, **WAN_GLOBAL}
    original = {f"{prefix}{m}.weight": torch.from_numpy(rng.standard_normal(s).astype(np.float32))
                for m, s in shapes.items()}
    base = tmp_path / "wan_original.safetensors"
    save_file(original, str(base))
    as_diffusers = convert_wan_transformer_to_diffusers({k: v.double() for k, v in original.items()})
    factors = {f"transformer.{k.removesuffix('.weight')}": f
               for k, f in zip(sorted(as_diffusers),
                               _factors({k: tuple(as_diffusers[k].shape) for k in sorted(as_diffusers)}, 14).values())}
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({f"{m}.lora_{n}.weight": torch.from_numpy(t) for m, (a, b) in factors.items()
               for n, t in (("A", a), ("B", b))}, str(lora))
    out = tmp_path / "merged.safetensors"
    lorafuse.apply(base, [lora], out=out, dtype="fp32")
    merged = {k: torch.from_numpy(v.astype(np.float64)) for k, v in np_load(str(out)).items()}
    got = convert_wan_transformer_to_diffusers(merged)
    assert set(got) == set(as_diffusers)
    for k, w in as_diffusers.items():
        a, b = factors[f"transformer.{k.removesuffix('.weight')}"]
        want = w.numpy() + b.astype(np.float64) @ a.astype(np.float64)
        assert np.allclose(got[k].numpy(), want, rtol=1e-5, atol=1e-5), k


def test_flux2_diffusers_lora_applies_onto_a_bfl_flux2_checkpoint(tmp_path):
    """A diffusers Flux.2 LoRA (`transformer.transformer_blocks.0.ff.linear_in`, `single_transformer_blocks.0.attn
    .to_qkv_mlp_proj`, `time_guidance_embed...`, q / k / v on thirds of `img_attn.qkv`) merged into a BFL / ComfyUI
    Flux.2 checkpoint: diffusers' `convert_flux2_transformer_checkpoint_to_diffusers` of the merged file is its
    conversion of the base plus each delta."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    rng = np.random.default_rng(15)
    shapes = {**FLUX2_BFL, "final_layer.adaLN_modulation.1": (32, 16)}
    prefix = "model.diffusion_model."
    original = {f"{prefix}{m}.weight": torch.from_numpy(rng.standard_normal(s).astype(np.float32))
                for m, s in shapes.items()}
    base = tmp_path / "flux2_bfl.safetensors"
    save_file(original, str(base))

    def to_diffusers(sd):
        return convert_flux2_transformer_checkpoint_to_diffusers({k.removeprefix(prefix): v for k, v in sd.items()})

    as_diffusers = to_diffusers({k: v.double() for k, v in original.items()})
    names = sorted(as_diffusers)
    factors = dict(zip((f"transformer.{k.removesuffix('.weight')}" for k in names),
                       _factors({k: tuple(as_diffusers[k].shape) for k in names}, 16).values()))
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({f"{m}.lora_{n}.weight": torch.from_numpy(t) for m, (a, b) in factors.items()
               for n, t in (("A", a), ("B", b))}, str(lora))
    out = tmp_path / "merged.safetensors"
    lorafuse.apply(base, [lora], out=out, dtype="fp32")
    got = to_diffusers({k: torch.from_numpy(v.astype(np.float64)) for k, v in np_load(str(out)).items()})
    for k, w in as_diffusers.items():
        a, b = factors[f"transformer.{k.removesuffix('.weight')}"]
        assert np.allclose(got[k].numpy(), w.numpy() + b.astype(np.float64) @ a.astype(np.float64), atol=1e-5), k
