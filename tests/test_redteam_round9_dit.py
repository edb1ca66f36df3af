"""Round 9 red team, area `dit`: LoRA files of diffusion transformers and their text encoders as they are published,
in `convert` and `apply`.

* ai-toolkit's Wan files name diffusers' paths under ComfyUI's prefix (`diffusion_model.blocks.0.attn1.to_q`): convert
  --family wan refused them, and apply onto an original / ComfyUI Wan checkpoint found no target.
* HunyuanVideo's token refiner (`txt_in.individual_token_refiner.blocks.0.self_attn_qkv`, `txt_in.t_embedder.mlp.0`,
  ...) found no target in a diffusers HunyuanVideo transformer (`context_embedder.token_refiner...`).
* ComfyUI's text-encoder keys (`text_encoders.clip_l.transformer.<path>`, as ComfyUI saves a LoRA of Flux, SD3, SDXL)
  were refused, and an unread text encoder's were explained as diffusers' save_lora_adapter files.

References: diffusers 0.42's own converters (`lora_conversion_utils`) and loaders on tiny diffusers transformers, and
merges computed in numpy float64.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from redteam_fixtures import run_cli
from safetensors import safe_open
from safetensors.numpy import load_file as np_load
from safetensors.torch import load_file, save_file
from sd_fixtures import lora_file

import lorafuse
from lorafuse.errors import LorafuseError

R = 4


def _factors(shapes: Mapping[str, tuple[int, ...]], seed: int, rank: int = R) -> dict[str, tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(seed)
    return {m: (rng.standard_normal((rank, s[1])).astype(np.float32),
                rng.standard_normal((s[0], rank)).astype(np.float32)) for m, s in shapes.items()}


def _peft_deltas(path: Path) -> dict[str, np.ndarray]:
    """(alpha / r) B @ A per module of a diffusers LoRA file, its scales read from `lora_adapter_metadata` (the
    per-component PEFT configs diffusers' load_lora_weights reads), in float64."""
    with safe_open(str(path), "np") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        t = {k: f.get_tensor(k).astype(np.float64) for k in f.keys()}
    out = {}
    for k in t:
        if not k.endswith(".lora_A.weight"):
            continue
        module = k.removesuffix(".lora_A.weight")
        comp, path_ = module.split(".", 1)
        r = meta[f"{comp}.rank_pattern"].get(path_, meta[f"{comp}.r"])
        alpha = meta[f"{comp}.alpha_pattern"].get(path_, meta[f"{comp}.lora_alpha"])
        out[module] = (alpha / r) * (t[f"{module}.lora_B.weight"] @ t[k])
    return out


def _check_merged(got: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray],
                  want: Mapping[str, np.ndarray]) -> None:
    assert want and set(want) <= set(base)
    assert set(got) == set(base)
    for k, w in base.items():
        np.testing.assert_allclose(got[k].astype(np.float64), want.get(k, w), rtol=1e-5, atol=1e-5, err_msg=k)


# ------------------------------------------------------------------------------------------------------------ Wan

WAN_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                  text_dim=12, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=8, added_kv_proj_dim=16, rope_max_seq_len=32)


def _wan() -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(**WAN_CONFIG).eval()


def _wan_linears() -> dict[str, tuple[int, ...]]:
    """Every LoRA-able Linear of the tiny diffusers Wan (its LoRA module paths -> weight shape)."""
    return {k.removesuffix(".weight"): tuple(v.shape) for k, v in _wan().state_dict().items()
            if k.endswith(".weight") and v.ndim == 2}


@pytest.mark.parametrize("names,alpha", [(("lora_A.weight", "lora_B.weight"), None),
                                         (("lora_down.weight", "lora_up.weight"), 8.0)])
def test_wan_aitoolkit_diffusers_paths_convert_to_the_file_diffusers_loads(tmp_path: Path, names: tuple[str, str],
                                                                          alpha: float | None) -> None:
    """ai-toolkit's Wan LoRA (`diffusion_model.blocks.0.attn1.to_q.lora_A.weight`: diffusers' paths under ComfyUI's
    prefix, every Linear of the model) with --family wan: the diffusers file (`transformer.blocks.0.attn1.to_q`) with
    the same factors and scales, which diffusers' Wan loader fuses into the model as a float64 merge says. Round 8
    refused it ('no layer of the Wan 2.1 / 2.2 transformer'); diffusers' own Wan loader refuses the input file."""
    from diffusers import WanPipeline

    shapes = _wan_linears()
    factors = _factors(shapes, 1)
    lora = lora_file(tmp_path / "aitk_wan.safetensors", factors, "diffusion_model.", names, alpha)
    with pytest.raises(ValueError):  # diffusers reads no ai-toolkit Wan file: lorafuse's output is what it reads
        WanPipeline.lora_state_dict(str(lora))
    out = tmp_path / "pytorch_lora_weights.safetensors"
    code, _, err = run_cli(["convert", str(lora), "--to", "peft", "--family", "wan", "-o", str(out)])
    assert code == 0, err
    scale = 1.0 if alpha is None else alpha / R
    got = _peft_deltas(out)
    assert set(got) == {f"transformer.{m}" for m in shapes}
    for m, (a, b) in factors.items():
        np.testing.assert_allclose(got[f"transformer.{m}"], scale * (b.astype(np.float64) @ a.astype(np.float64)),
                                   rtol=1e-12, atol=0, err_msg=m)
    with safe_open(str(out), "pt") as f:  # the factors themselves are copied, bit for bit
        for m, (a, b) in factors.items():
            assert np.array_equal(f.get_tensor(f"transformer.{m}.lora_A.weight").numpy(), a), m
            assert np.array_equal(f.get_tensor(f"transformer.{m}.lora_B.weight").numpy(), b), m

    model = _wan().double()
    base = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    sd, metadata = WanPipeline.lora_state_dict(str(out), return_lora_metadata=True)
    WanPipeline.load_lora_into_transformer({k: v.double() for k, v in sd.items()}, transformer=model,
                                           metadata=metadata)
    model.fuse_lora()
    model.unload_lora()
    fused = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    want = {f"{m}.weight": base[f"{m}.weight"] + scale * (b.astype(np.float64) @ a.astype(np.float64))
            for m, (a, b) in factors.items()}
    _check_merged(fused, base, want)


def test_wan_aitoolkit_file_converted_back_is_musubi_tuners_file(tmp_path: Path) -> None:
    """The diffusers file convert wrote from an ai-toolkit Wan file, converted back to kohya, holds musubi-tuner's
    names (`lora_unet_blocks_0_self_attn_q`), which diffusers' `_convert_musubi_wan_lora_to_diffusers` reads as the
    same deltas."""
    from diffusers.loaders.lora_conversion_utils import _convert_musubi_wan_lora_to_diffusers

    shapes = {k: s for k, s in _wan_linears().items() if k.startswith("blocks.")}
    factors = _factors(shapes, 2)
    lora = lora_file(tmp_path / "aitk_wan.safetensors", factors, "diffusion_model.")
    peft = tmp_path / "peft.safetensors"
    kohya = tmp_path / "kohya.safetensors"
    assert run_cli(["convert", str(lora), "--to", "peft", "--family", "wan", "-o", str(peft)])[0] == 0
    code, _, err = run_cli(["convert", str(peft), "--to", "kohya", "-o", str(kohya)])
    assert code == 0, err
    converted = _convert_musubi_wan_lora_to_diffusers(load_file(str(kohya)))
    got = {k.removeprefix("transformer.").removesuffix(".lora_A.weight"):
           converted[k.replace("lora_A", "lora_B")].double().numpy() @ v.double().numpy()
           for k, v in converted.items() if k.endswith(".lora_A.weight")}
    assert set(got) == set(shapes)
    for m, (a, b) in factors.items():
        np.testing.assert_allclose(got[m], b.astype(np.float64) @ a.astype(np.float64), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", ""])
def test_wan_aitoolkit_diffusers_paths_apply_onto_an_original_wan_checkpoint(tmp_path: Path, prefix: str) -> None:
    """ai-toolkit's Wan LoRA (`diffusion_model.blocks.0.attn1.to_q`) merged into Wan's original single file / ComfyUI
    checkpoint (`model.diffusion_model.blocks.0.self_attn.q.weight`): diffusers' `convert_wan_transformer_to_diffusers`
    of the merged file is its conversion of the base plus each delta. Round 8 found no target for any module."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    rng = np.random.default_rng(3)
    original_shapes = {"blocks.0.self_attn.q": (16, 16), "blocks.0.cross_attn.k_img": (16, 16),
                       "blocks.1.ffn.0": (32, 16), "blocks.1.ffn.2": (16, 32), "time_projection.1": (96, 16),
                       "head.head": (16, 16), "text_embedding.0": (16, 12), "img_emb.proj.1": (8, 8)}
    original = {f"{prefix}{m}.weight": torch.from_numpy(rng.standard_normal(s).astype(np.float32))
                for m, s in original_shapes.items()}
    base = tmp_path / "wan_original.safetensors"
    save_file(original, str(base))
    as_diffusers = convert_wan_transformer_to_diffusers({k: v.double() for k, v in original.items()})
    shapes = {k.removesuffix(".weight"): tuple(v.shape) for k, v in as_diffusers.items()}
    factors = _factors(shapes, 4)
    lora = lora_file(tmp_path / "aitk_wan.safetensors", factors, "diffusion_model.")
    out = tmp_path / "merged.safetensors"
    lorafuse.apply(base, [lora], out=out, dtype="fp32")
    merged = {k: torch.from_numpy(v.astype(np.float64)) for k, v in np_load(str(out)).items()}
    got = convert_wan_transformer_to_diffusers(merged)
    assert set(got) == set(as_diffusers)
    for k, w in as_diffusers.items():
        a, b = factors[k.removesuffix(".weight")]
        np.testing.assert_allclose(got[k].numpy(), w.numpy() + b.astype(np.float64) @ a.astype(np.float64),
                                   rtol=1e-5, atol=1e-5, err_msg=k)


# --------------------------------------------------------------------------------------------------- HunyuanVideo

HV_CONFIG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                 num_single_layers=1, num_refiner_layers=2, mlp_ratio=4.0, patch_size=1, patch_size_t=1,
                 qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
                 rope_axes_dim=(2, 2, 4))
# HunyuanVideo's token refiner (`txt_in`) under its original paths -> (out, in) in the tiny model
HV_REFINER = {
    **{f"txt_in.individual_token_refiner.blocks.{i}.{p}": s for i in range(2)
       for p, s in (("self_attn_qkv", (48, 16)), ("self_attn_proj", (16, 16)), ("mlp.fc1", (64, 16)),
                    ("mlp.fc2", (16, 64)), ("adaLN_modulation.1", (32, 16)))},
    "txt_in.input_embedder": (16, 16), "txt_in.t_embedder.mlp.0": (16, 256), "txt_in.t_embedder.mlp.2": (16, 16),
    "txt_in.c_embedder.linear_1": (16, 16), "txt_in.c_embedder.linear_2": (16, 16),
    "double_blocks.0.img_attn_qkv": (48, 16),
}


@pytest.fixture(scope="module")
def hv_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    sd = {k: v.detach().float().contiguous()
          for k, v in HunyuanVideoTransformer3DModel(**HV_CONFIG).state_dict().items()}
    path = tmp_path_factory.mktemp("hv") / "hunyuan_video.safetensors"
    save_file(sd, str(path))
    return path, {k: v.numpy().astype(np.float64) for k, v in sd.items()}


@pytest.mark.parametrize("layout", ["comfyui", "musubi"])
def test_hunyuan_video_token_refiner_applies_onto_diffusers(tmp_path: Path, hv_base: tuple[Path, dict],
                                                            layout: str) -> None:
    """A HunyuanVideo LoRA on its token refiner (`txt_in.individual_token_refiner.blocks.0.self_attn_qkv`,
    `txt_in.t_embedder.mlp.0`, `txt_in.c_embedder.linear_1`, ...) merged into a diffusers HunyuanVideo transformer as
    diffusers' `_convert_hunyuan_video_lora_to_diffusers` names it (`context_embedder.token_refiner.refiner_blocks.0
    .attn.to_q`, `context_embedder.time_text_embed.timestep_embedder.linear_1`, ...; the qkv rows in thirds, as its
    lora_B split: its lora_A split is its own bug, A is shared). Round 8 left the refiner modules unmatched."""
    from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers

    base, weights = hv_base
    factors = _factors(HV_REFINER, 5, rank=3)
    if layout == "comfyui":
        lora = lora_file(tmp_path / "hv.safetensors", factors, "diffusion_model.")
    else:
        lora = tmp_path / "hv.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for m, (a, b) in factors.items():
            name = "lora_unet_" + m.replace(".", "_")
            tensors |= {f"{name}.lora_down.weight": torch.from_numpy(a), f"{name}.lora_up.weight": torch.from_numpy(b),
                        f"{name}.alpha": torch.tensor(3.0)}
        save_file(tensors, str(lora))
    original = {f"{m}.lora_{n}.weight": torch.from_numpy(t) for m, (a, b) in factors.items()
                for n, t in (("A", a), ("B", b))}
    converted = _convert_hunyuan_video_lora_to_diffusers(dict(original))
    want = {}
    for k, b in converted.items():
        if ".lora_B." not in k:
            continue
        key = k.removeprefix("transformer.").replace(".lora_B.weight", ".weight")
        stem = k.removeprefix("transformer.").removesuffix(".lora_B.weight")
        qkv = stem.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
        a = converted[k.replace(".lora_B.", ".lora_A.")].double().numpy()
        if qkv:  # diffusers chunks lora_A into thirds too (rank 1 of 3 here); the delta's A is the whole one
            fused = next(m for m in factors if m.endswith(("self_attn_qkv", "img_attn_qkv"))
                         and _hv_block(m) == _hv_block(stem))
            a = factors[fused][0].astype(np.float64)
        want[key] = weights[key] + b.double().numpy() @ a
    assert len(want) == 5 + 2 * (3 + 4) + 3  # outside + 2 refiner blocks + the double block's q, k, v
    out = tmp_path / "merged.safetensors"
    lorafuse.apply(base, [lora], out=out)
    _check_merged(np_load(str(out)), weights, want)


def _hv_block(path: str) -> str:
    """Which block a HunyuanVideo module path (original or diffusers) is in: 'refiner 0', 'double 0'."""
    parts = path.split(".")
    for i, p in enumerate(parts):
        if p in ("blocks", "refiner_blocks"):
            return f"refiner {parts[i + 1]}"
        if p in ("double_blocks", "transformer_blocks"):
            return f"double {parts[i + 1]}"
    return path


def test_hunyuan_video_token_refiner_convert_is_refused_naming_it(tmp_path: Path) -> None:
    """convert --to peft refuses HunyuanVideo's refiner modules as it refuses its other original-only words (Flux.1's
    diffusers names would name them back as Flux's layers), naming the module and what merges it; nothing is
    written."""
    factors = _factors({"txt_in.individual_token_refiner.blocks.0.self_attn_qkv": (48, 16)}, 6)
    lora = lora_file(tmp_path / "hv.safetensors", factors, "diffusion_model.")
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(["convert", str(lora), "--to", "peft", "--family", "flux", "-o", str(out)])
    assert code != 0 and "Traceback" not in err
    assert "individual_token_refiner" in err and "HunyuanVideo" in err
    assert not out.exists()


# -------------------------------------------------------------------------------------- ComfyUI text encoders

CLIP_L = {"text_model.encoder.layers.0.self_attn.q_proj": (8, 8),
          "text_model.encoder.layers.0.self_attn.k_proj": (8, 8),
          "text_model.encoder.layers.0.self_attn.out_proj": (8, 8), "text_model.encoder.layers.1.mlp.fc1": (32, 8)}
CLIP_G = {"text_model.encoder.layers.0.self_attn.v_proj": (12, 12), "text_model.encoder.layers.0.mlp.fc2": (12, 48)}
T5 = {"encoder.block.0.layer.0.SelfAttention.q": (6, 10), "encoder.block.0.layer.1.DenseReluDense.wi": (20, 10)}
FLUX_BFL = {"double_blocks.0.img_attn.proj": (16, 16), "double_blocks.0.img_attn.qkv": (48, 16)}


def _comfy_te_file(path: Path, parts: Mapping[str, Mapping[str, tuple[int, int]]], seed: int,
                   names: tuple[str, str] = ("lora_down.weight", "lora_up.weight"),
                   alpha: float | None = None) -> tuple[Path, dict[str, tuple[np.ndarray, ...]]]:
    """A ComfyUI LoRA file: prefix (`diffusion_model.`, `text_encoders.clip_l.transformer.`) -> its modules."""
    factors = _factors({f"{p}{m}": s for p, mods in parts.items() for m, s in mods.items()}, seed)
    return lora_file(path, factors, "", names, alpha), factors


def _diffusers_flux_deltas(path: Path) -> dict[str, np.ndarray]:
    """B @ A per module of diffusers' Flux loader's reading of a file (its kohya converter bakes alpha / r into the
    factors; its text-encoder keys are in diffusers' old layout, `to_q_lora.down`, mapped key by key to PEFT's as its
    text-encoder loader maps them)."""
    from diffusers import FluxPipeline
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
    )

    sd = FluxPipeline.lora_state_dict(str(path))
    out = {k: v for k, v in sd.items() if k.startswith("transformer.")}
    for k, v in sd.items():
        if k.startswith("text_encoder."):
            old = StateDictType.DIFFUSERS_OLD if "_lora." in k else None
            one = convert_state_dict_to_diffusers({k.removeprefix("text_encoder."): v}, original_type=old)
            out |= {f"text_encoder.{k2}": v2 for k2, v2 in convert_state_dict_to_peft(one).items()}
    return {k.removesuffix(".lora_A.weight"): out[k.replace("lora_A", "lora_B")].double().numpy()
            @ out[k].double().numpy() for k in out if k.endswith(".lora_A.weight")}


def test_comfyui_flux_lora_with_clip_l_converts_as_diffusers_flux_loader_reads_it(tmp_path: Path) -> None:
    """A Flux LoRA as ComfyUI saves it, with its CLIP-L (`diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight`,
    `text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_up.weight`, alphas): convert
    --to peft gives every module, name and delta, that diffusers' Flux loader reads from the same file. Round 8
    refused the file (its text-encoder layout)."""
    lora, _ = _comfy_te_file(tmp_path / "comfy_flux.safetensors",
                             {"diffusion_model.": FLUX_BFL, "text_encoders.clip_l.transformer.": CLIP_L}, 7,
                             alpha=2.0)
    out = tmp_path / "pytorch_lora_weights.safetensors"
    code, _, err = run_cli(["convert", str(lora), "--to", "peft", "-o", str(out)])
    assert code == 0, err
    got, want = _peft_deltas(out), _diffusers_flux_deltas(lora)
    assert set(got) == set(want)
    assert any(k.startswith("text_encoder.") for k in want)
    for k, w in want.items():
        np.testing.assert_allclose(got[k], w, rtol=1e-6, atol=1e-7, err_msg=k)


def _folder(path: Path, components: Mapping[str, Mapping[str, np.ndarray]], index: Mapping[str, list[str]]) -> Path:
    path.mkdir()
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline", **index}))
    for comp, weights in components.items():
        (path / comp).mkdir()
        (path / comp / "config.json").write_text(json.dumps({"architectures": [index[comp][1]]}))
        name = "diffusion_pytorch_model" if comp == "transformer" else "model"
        save_file({k: torch.from_numpy(v) for k, v in weights.items()}, str(path / comp / f"{name}.safetensors"))
    return path


@pytest.mark.parametrize("names,alpha", [(("lora_A.weight", "lora_B.weight"), None),
                                         (("lora_down.weight", "lora_up.weight"), 8.0)])
def test_comfyui_sd3_text_encoder_loras_apply_onto_each_text_encoder(tmp_path: Path, names: tuple[str, str],
                                                                     alpha: float | None) -> None:
    """An SD3 LoRA as ComfyUI saves its text encoders (`text_encoders.clip_l` / `clip_g` / `t5xxl.transformer.<path>`)
    merged into an SD3 pipeline folder: each onto its own encoder (text_encoder, text_encoder_2, text_encoder_3), as
    W + (alpha / r) B @ A in float64. Round 8 refused the file."""
    rng = np.random.default_rng(8)
    encoders = {"text_encoder": CLIP_L, "text_encoder_2": CLIP_G, "text_encoder_3": T5}
    components = {c: {f"{m}.weight": rng.standard_normal(s).astype(np.float32) for m, s in mods.items()}
                  for c, mods in encoders.items()}
    components["transformer"] = {"transformer_blocks.0.attn.to_q.weight": rng.standard_normal((16, 16))
                                 .astype(np.float32)}
    index = {"transformer": ["diffusers", "SD3Transformer2DModel"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_3": ["transformers", "T5EncoderModel"]}
    folder = _folder(tmp_path / "sd3", components, index)
    prefixes = {"text_encoder": "text_encoders.clip_l.transformer.",
                "text_encoder_2": "text_encoders.clip_g.transformer.",
                "text_encoder_3": "text_encoders.t5xxl.transformer."}
    lora, factors = _comfy_te_file(tmp_path / "comfy_sd3.safetensors",
                                   {prefixes[c]: mods for c, mods in encoders.items()}, 9, names, alpha)
    out = tmp_path / "merged"
    code, _, err = run_cli(["apply", str(folder), str(lora), "-o", str(out)])
    assert code == 0, err
    scale = 1.0 if alpha is None else alpha / R
    for comp, mods in encoders.items():
        base = {k: v.astype(np.float64) for k, v in components[comp].items()}
        want = {}
        for m in mods:
            a, b = factors[prefixes[comp] + m]
            want[f"{m}.weight"] = base[f"{m}.weight"] + scale * (b.astype(np.float64) @ a.astype(np.float64))
        _check_merged(np_load(str(out / comp / "model.safetensors")), base, want)


def test_comfyui_clip_l_lora_applies_onto_a_comfyui_checkpoint(tmp_path: Path) -> None:
    """ComfyUI's CLIP-L LoRA keys onto a ComfyUI-style single file holding the same encoder
    (`text_encoders.clip_l.transformer.text_model...weight`): merged by name."""
    rng = np.random.default_rng(10)
    weights = {f"text_encoders.clip_l.transformer.{m}.weight": rng.standard_normal(s).astype(np.float32)
               for m, s in CLIP_L.items()}
    weights["model.diffusion_model.double_blocks.0.img_attn.proj.weight"] = rng.standard_normal((16, 16)).astype(
        np.float32)
    base = tmp_path / "flux_comfy.safetensors"
    save_file({k: torch.from_numpy(v) for k, v in weights.items()}, str(base))
    lora, factors = _comfy_te_file(tmp_path / "te.safetensors", {"text_encoders.clip_l.transformer.": CLIP_L}, 11,
                                   ("lora_A.weight", "lora_B.weight"))
    out = tmp_path / "merged.safetensors"
    lorafuse.apply(base, [lora], out=out)
    f64 = {k: v.astype(np.float64) for k, v in weights.items()}
    want = {f"{m}.weight": f64[f"{m}.weight"] + b.astype(np.float64) @ a.astype(np.float64)
            for m, (a, b) in factors.items()}
    _check_merged(np_load(str(out)), f64, want)


def test_comfyui_text_encoder_lora_resized_keeps_its_keys(tmp_path: Path) -> None:
    """resize writes a ComfyUI text-encoder LoRA back under the keys it was read with (ComfyUI reads those), rank 2 of
    the same deltas' best rank-2 approximation."""
    lora, factors = _comfy_te_file(tmp_path / "te.safetensors",
                                   {"text_encoders.clip_l.transformer.": CLIP_L, "diffusion_model.": FLUX_BFL}, 12,
                                   ("lora_A.weight", "lora_B.weight"))
    out = tmp_path / "r2.safetensors"
    code, _, err = run_cli(["resize", str(lora), "--rank", "2", "-o", str(out)])
    assert code == 0, err
    got = load_file(str(out))
    assert {k.rsplit(".lora_", 1)[0] for k in got if ".lora_" in k} == set(factors)
    for m, (a, b) in factors.items():
        delta = b.astype(np.float64) @ a.astype(np.float64)
        u, s, vt = np.linalg.svd(delta)
        best = (u[:, :2] * s[:2]) @ vt[:2]
        a2, b2 = got[f"{m}.lora_A.weight"].double().numpy(), got[f"{m}.lora_B.weight"].double().numpy()
        alpha = float(got[f"{m}.alpha"]) if f"{m}.alpha" in got else 2.0
        np.testing.assert_allclose((alpha / 2) * (b2 @ a2), best, rtol=1e-4, atol=1e-4, err_msg=m)


def test_an_unread_comfyui_text_encoder_is_named_as_that_layout(tmp_path: Path) -> None:
    """A ComfyUI LoRA of a text encoder lorafuse has no names for (`text_encoders.qwen25_7b.transformer...`, as
    ComfyUI saves HunyuanVideo 1.5's / QwenImage's) is refused naming ComfyUI's text-encoder layout, not as a
    component-less diffusers save_lora_adapter file, which it is not."""
    lora = lora_file(tmp_path / "qwen_te.safetensors",
                      _factors({"text_encoders.qwen25_7b.transformer.model.layers.0.self_attn.q_proj": (8, 8)}, 13),
                      "")
    code, _, err = run_cli(["convert", str(lora), "--to", "peft", "-o", str(tmp_path / "o.safetensors")])
    assert code != 0 and "Traceback" not in err
    assert "ComfyUI's text-encoder LoRA layout" in err and "save_lora_adapter" not in err
    with pytest.raises(LorafuseError, match="text-encoder LoRA layout"):
        lorafuse.load(lora)


# ------------------------------------------------------------------------------------------------------- Lumina 2

LUMINA_D = 8
# one Lumina 2 block under its original paths -> (out, in); `attention.qkv` is q | k | v of grouped-query attention,
# whose rows diffusers' converter splits as Lumina-Image-2.0's (2304 | 768 | 768), whatever the input size
LUMINA_BLOCK = {"attention.qkv": (3840, LUMINA_D), "attention.out": (LUMINA_D, LUMINA_D),
                "feed_forward.w1": (24, LUMINA_D), "feed_forward.w2": (LUMINA_D, 24), "feed_forward.w3": (24, LUMINA_D),
                "adaLN_modulation.1": (4 * LUMINA_D, LUMINA_D)}
LUMINA = {**{f"{b}.{k}": s for b in ("layers.0", "layers.1", "noise_refiner.0") for k, s in LUMINA_BLOCK.items()},
          **{f"context_refiner.0.{k}": s for k, s in LUMINA_BLOCK.items() if not k.startswith("adaLN")}}


@pytest.mark.parametrize("layout", ["comfyui", "sd-scripts"])
def test_lumina2_lora_applies_onto_a_diffusers_lumina2_transformer(tmp_path: Path, layout: str) -> None:
    """A Lumina 2 LoRA under its original paths (`diffusion_model.layers.0.attention.qkv.lora_A.weight`, or sd-scripts'
    `lora_unet_layers_0_attention_qkv`) merged into a diffusers Lumina 2 transformer (`layers.0.attn.to_q`, ...) as
    diffusers' `_convert_non_diffusers_lumina2_lora_to_diffusers` names and splits it (grouped-query q | k | v rows,
    `feed_forward.w1` -> `linear_1`, `adaLN_modulation.1` -> `norm1.linear`), in float64. Round 8 matched none."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lumina2_lora_to_diffusers

    factors = _factors(LUMINA, 14, rank=2)
    original = {f"diffusion_model.{m}.lora_{n}.weight": torch.from_numpy(t) for m, (a, b) in factors.items()
                for n, t in (("A", a), ("B", b))}
    converted = _convert_non_diffusers_lumina2_lora_to_diffusers(dict(original))
    rng = np.random.default_rng(15)
    weights = {k.removeprefix("transformer.").replace(".lora_A.weight", ".weight"):
               rng.standard_normal((converted[k.replace("lora_A", "lora_B")].shape[0], v.shape[1])).astype(np.float32)
               for k, v in converted.items() if ".lora_A." in k}
    weights["time_caption_embed.caption_embedder.1.weight"] = rng.standard_normal((LUMINA_D, 4)).astype(np.float32)
    base = tmp_path / "lumina2_transformer.safetensors"
    save_file({k: torch.from_numpy(v) for k, v in weights.items()}, str(base))
    if layout == "comfyui":
        lora = lora_file(tmp_path / "lumina.safetensors", factors, "diffusion_model.")
    else:
        lora = tmp_path / "lumina.safetensors"
        save_file({f"lora_unet_{m.replace('.', '_')}.{p}": t for m, (a, b) in factors.items()
                   for p, t in (("lora_down.weight", torch.from_numpy(a)), ("lora_up.weight", torch.from_numpy(b)),
                                ("alpha", torch.tensor(2.0)))}, str(lora))
    f64 = {k: v.astype(np.float64) for k, v in weights.items()}
    want = {k.removeprefix("transformer.").replace(".lora_A.weight", ".weight"):
            f64[k.removeprefix("transformer.").replace(".lora_A.weight", ".weight")]
            + converted[k.replace("lora_A", "lora_B")].double().numpy() @ v.double().numpy()
            for k, v in converted.items() if ".lora_A." in k}
    assert len(want) == 3 * 8 + 7  # q, k, v, out, w1, w2, w3, adaLN per block; the context refiner has no adaLN
    out = tmp_path / "merged.safetensors"
    lorafuse.apply(base, [lora], out=out)
    _check_merged(np_load(str(out)), f64, want)


def test_lumina2_qkv_that_does_not_stack_to_the_weights_is_refused_naming_them(tmp_path: Path) -> None:
    """A Lumina 2 `attention.qkv` LoRA whose rows are not the rows of `to_q` + `to_k` + `to_v` is refused, naming the
    module, its shape and the weights' shapes; nothing is written."""
    rng = np.random.default_rng(16)
    weights = {"layers.0.attn.to_q.weight": (32, 8), "layers.0.attn.to_k.weight": (16, 8),
               "layers.0.attn.to_v.weight": (16, 8), "time_caption_embed.caption_embedder.1.weight": (8, 4)}
    base = tmp_path / "lumina2.safetensors"
    save_file({k: torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for k, s in weights.items()}, str(base))
    lora = lora_file(tmp_path / "lumina.safetensors", _factors({"layers.0.attention.qkv": (96, 8)}, 17),
                      "diffusion_model.")
    out = tmp_path / "merged.safetensors"
    code, _, err = run_cli(["apply", str(base), str(lora), "-o", str(out)])
    assert code != 0 and "Traceback" not in err
    assert "lora_unet_layers_0_attention_qkv" in err and "(96, 8)" in err and "layers.0.attn.to_k.weight" in err
    assert not out.exists()


def test_lumina2_layers_outside_the_blocks_land_where_the_single_file_converter_puts_them(tmp_path: Path) -> None:
    """Lumina 2's layers outside the blocks (`t_embedder.mlp.0`, `cap_embedder.1`, `final_layer.adaLN_modulation.1`,
    `final_layer.linear`, `x_embedder`) merged into a diffusers Lumina 2 transformer: the weight diffusers' single-file
    `convert_lumina2_to_diffusers` makes of each original weight takes that module's delta, in float64."""
    from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers

    rng = np.random.default_rng(18)
    shapes = {"t_embedder.mlp.0": (8, 256), "t_embedder.mlp.2": (8, 8), "cap_embedder.1": (8, 4),
              "final_layer.adaLN_modulation.1": (8, 8), "final_layer.linear": (16, 8), "x_embedder": (8, 16)}
    original = {f"{m}.weight": torch.from_numpy(rng.standard_normal(s)) for m, s in shapes.items()}
    marked = {k: torch.full((1, 1), float(i)) for i, k in enumerate(original)}  # which original weight is which
    where = {k: next(o for o, t in marked.items() if torch.equal(t, v))
             for k, v in convert_lumina2_to_diffusers(dict(marked)).items()}
    weights = {k: original[o].float().numpy() for k, o in where.items()}
    base = tmp_path / "lumina2_transformer.safetensors"
    save_file({k: torch.from_numpy(v) for k, v in weights.items()}, str(base))
    factors = _factors(shapes, 19)
    lora = lora_file(tmp_path / "lumina.safetensors", factors, "diffusion_model.")
    out = tmp_path / "merged.safetensors"
    lorafuse.apply(base, [lora], out=out)
    f64 = {k: v.astype(np.float64) for k, v in weights.items()}
    want = {k: f64[k] + factors[o.removesuffix(".weight")][1].astype(np.float64)
            @ factors[o.removesuffix(".weight")][0].astype(np.float64) for k, o in where.items()}
    _check_merged(np_load(str(out)), f64, want)
