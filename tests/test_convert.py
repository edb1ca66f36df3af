"""`lorafuse convert`: kohya <-> diffusers / PEFT naming of diffusion LoRAs, and LoHa / LoKr -> LoRA.

References: diffusers itself (its kohya converters in `*Pipeline.lora_state_dict`, and its loaders that
inject the LoRA into tiny UNets / text encoders / Flux transformers built here, whose PEFT layers give
each module's delta), numpy float64 on the factors, the `safetensors` package for the files (and their
bytes for the round trips), and numpy's SVD for the Eckart-Young optimum of LoHa / LoKr deltas.
"""

from __future__ import annotations

import copy
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import LorafuseValueError, MissingModuleError, OutputError, UnsupportedError

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

# ----------------------------------------------------------------------------- tiny models

SD1_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D",
                "CrossAttnUpBlock2D"), cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4)
# SDXL's structure (3 levels, attention on the last two, 2 layers per block, added time/text embedding).
SDXL_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16, 16),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                 attention_head_dim=2, norm_num_groups=4, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=4 * 6 + 8)
CLIP = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=50,
            max_position_embeddings=10, bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=8)
FLUX = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=True,
            axes_dims_rope=(2, 2, 4))
H = 16  # the tiny Flux transformer's width


def _build(cls, **kw):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return cls(**kw).eval()


@pytest.fixture(scope="module")
def sd1_models():
    return _build(UNet2DConditionModel, **SD1_UNET), _build(CLIPTextModel, config=CLIPTextConfig(**CLIP))


@pytest.fixture(scope="module")
def sdxl_models():
    return (_build(UNet2DConditionModel, **SDXL_UNET), _build(CLIPTextModel, config=CLIPTextConfig(**CLIP)),
            _build(CLIPTextModelWithProjection, config=CLIPTextConfig(**CLIP)))


@pytest.fixture(scope="module")
def flux_model():
    return _build(FluxTransformer2DModel, **FLUX)


def weights_of(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy().copy() for k, v in model.state_dict().items()}


def peft_deltas(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Module name -> delta of the LoRA layer diffusers / PEFT injected there (scale included)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, BaseTunerLayer):
            (adapter,) = m.active_adapters
            out[name] = m.get_delta_weight(adapter).detach().double().numpy()
    return out


# ----------------------------------------------------------------------------- kohya files


def kohya_file(path: Path, modules: dict[str, tuple[int, ...]], dtype: str = "F32", seed: int = 0,
               alpha_dtype: str | None = None, metadata: dict[str, str] | None = None,
               alphas: dict[str, float | None] | None = None, dims: tuple[int, int] | None = None,
               ) -> dict[str, torch.Tensor]:
    """A kohya LoRA file as sd-scripts writes it (safetensors' save_file); modules: name -> delta shape.
    Rank 2 + i % 3 (with dims: sd-scripts' network_dim, and conv_dim for kxk convolutions); alpha 0.5 + i % 4,
    none for every fourth module (alpha = r), or as `alphas` says."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for i, (name, shape) in enumerate(modules.items()):
        r = 2 + i % 3 if dims is None else dims[1] if len(shape) == 4 and shape[2] > 1 else dims[0]
        out, fan_in, kernel = shape[0], shape[1], tuple(shape[2:])
        sd[f"{name}.lora_down.weight"] = (torch.randn((r, fan_in, *kernel), generator=g) / fan_in ** 0.5).to(
            DTYPES[dtype])
        sd[f"{name}.lora_up.weight"] = torch.randn((out, r, *([1] * len(kernel))), generator=g).to(DTYPES[dtype])
        alpha = (alphas or {}).get(name, None if i % 4 == 3 else 0.5 + i % 4)
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha, dtype=DTYPES[alpha_dtype or dtype])
    save_file(sd, str(path), metadata=metadata)
    return sd


def kohya_delta(sd: dict[str, torch.Tensor], name: str) -> np.ndarray:
    down = sd[f"{name}.lora_down.weight"].double().numpy()
    up = sd[f"{name}.lora_up.weight"].double().numpy()
    r = down.shape[0]
    alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else r
    return (alpha / r * (up.reshape(up.shape[0], r) @ down.reshape(r, -1))).reshape(up.shape[0], *down.shape[1:])


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def kohya_name(prefix: str, path: str) -> str:
    return prefix + path.replace(".", "_")


# SD 1.x: kohya names are the diffusers paths with '_' (UNet 1x1 proj_in, a 3x3 LoCon, attention, MLP).
SD1_UNET_MODULES = {
    "down_blocks.0.attentions.0.proj_in": (8, 8, 1, 1),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (8, 8),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (8, 8),
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj": (64, 8),
    "down_blocks.0.resnets.0.conv1": (8, 8, 3, 3),
    "down_blocks.1.resnets.0.time_emb_proj": (16, 32),
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0": (8, 8),
}
CLIP_MODULES = {
    "text_model.encoder.layers.0.self_attn.q_proj": (8, 8),
    "text_model.encoder.layers.0.mlp.fc1": (16, 8),
}


def sd1_modules() -> dict[str, tuple[int, ...]]:
    return {**{kohya_name("lora_unet_", p): s for p, s in SD1_UNET_MODULES.items()},
            **{kohya_name("lora_te_", p): s for p, s in CLIP_MODULES.items()}}


# SDXL: kohya names its UNet with LDM / SGM paths. (LDM path, diffusers path, shape in the tiny UNet)
SDXL_UNET_MODULES = [
    ("input_blocks.4.1.transformer_blocks.0.attn1.to_q", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
     (16, 16)),
    ("input_blocks.7.1.proj_in", "down_blocks.2.attentions.0.proj_in", (16, 16)),
    ("input_blocks.1.0.in_layers.2", "down_blocks.0.resnets.0.conv1", (8, 8, 3, 3)),
    ("input_blocks.2.0.emb_layers.1", "down_blocks.0.resnets.1.time_emb_proj", (8, 32)),
    ("middle_block.1.transformer_blocks.0.attn2.to_k", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
     (16, 8)),
    ("output_blocks.0.1.transformer_blocks.0.ff.net.2", "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
     (16, 64)),
    ("output_blocks.3.0.skip_connection", "up_blocks.1.resnets.0.conv_shortcut", (16, 32, 1, 1)),
]


def sdxl_modules() -> dict[str, tuple[int, ...]]:
    return {**{kohya_name("lora_unet_", ldm): s for ldm, _, s in SDXL_UNET_MODULES},
            kohya_name("lora_te1_", "text_model.encoder.layers.0.self_attn.k_proj"): (8, 8),
            kohya_name("lora_te2_", "text_model.encoder.layers.0.mlp.fc2"): (8, 16),
            kohya_name("lora_te2_", "text_model.encoder.layers.0.self_attn.v_proj"): (8, 8)}


# Flux: kohya names are BFL paths with '_'; img_attn_qkv / txt_attn_qkv / linear1 are fused layers, and
# final_layer.adaLN_modulation.1 is (shift | scale) where diffusers' norm_out.linear is (scale | shift).
FLUX_MODULES = {
    "lora_unet_double_blocks_0_img_attn_qkv": (3 * H, H),
    "lora_unet_double_blocks_0_img_attn_proj": (H, H),
    "lora_unet_double_blocks_0_txt_attn_qkv": (3 * H, H),
    "lora_unet_double_blocks_0_img_mlp_0": (4 * H, H),
    "lora_unet_double_blocks_0_txt_mod_lin": (6 * H, H),
    "lora_unet_single_blocks_0_linear2": (H, 5 * H),
    "lora_unet_final_layer_adaLN_modulation_1": (2 * H, H),
    "lora_unet_final_layer_linear": (4, H),
    "lora_unet_time_in_in_layer": (H, 256),
}
LINEAR1 = {"lora_unet_single_blocks_0_linear1": (7 * H, H)}  # q | k | v (H each) | mlp (4H)
# What each kohya Flux layer is in the tiny diffusers transformer: [(module, kohya rows)], written out
# from the BFL reference code's layout.
FLUX_LAYOUT = {
    "lora_unet_double_blocks_0_img_attn_qkv": [(f"transformer_blocks.0.attn.to_{x}", (i * H, (i + 1) * H))
                                               for i, x in enumerate("qkv")],
    "lora_unet_double_blocks_0_img_attn_proj": [("transformer_blocks.0.attn.to_out.0", None)],
    "lora_unet_double_blocks_0_txt_attn_qkv": [(f"transformer_blocks.0.attn.add_{x}_proj", (i * H, (i + 1) * H))
                                               for i, x in enumerate("qkv")],
    "lora_unet_double_blocks_0_img_mlp_0": [("transformer_blocks.0.ff.net.0.proj", None)],
    "lora_unet_double_blocks_0_txt_mod_lin": [("transformer_blocks.0.norm1_context.linear", None)],
    "lora_unet_single_blocks_0_linear2": [("single_transformer_blocks.0.proj_out", None)],
    "lora_unet_final_layer_linear": [("proj_out", None)],
    "lora_unet_time_in_in_layer": [("time_text_embed.timestep_embedder.linear_1", None)],
    "lora_unet_single_blocks_0_linear1": [("single_transformer_blocks.0.attn.to_q", (0, H)),
                                          ("single_transformer_blocks.0.attn.to_k", (H, 2 * H)),
                                          ("single_transformer_blocks.0.attn.to_v", (2 * H, 3 * H)),
                                          ("single_transformer_blocks.0.proj_mlp", (3 * H, 7 * H))],
}


def flux_expected(sd: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """diffusers module (no component) -> its delta, from the kohya factors and FLUX_LAYOUT."""
    out: dict[str, np.ndarray] = {}
    for name in {k.split(".")[0] for k in sd}:
        d = kohya_delta(sd, name)
        if name == "lora_unet_final_layer_adaLN_modulation_1":
            out["norm_out.linear"] = np.concatenate([d[H:], d[:H]])  # swap shift and scale
            continue
        for module, rows in FLUX_LAYOUT[name]:
            out[module] = d if rows is None else d[rows[0]:rows[1]]
    return out


# ----------------------------------------------------------------------------- kohya -> peft vs diffusers


def diffusers_conversion(pipeline, path: Path, **kwargs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:  # type: ignore[no-untyped-def]
    """component.module -> (lora_A, lora_B) as diffusers converts a kohya file: its pipeline's
    lora_state_dict, then its own key conversions to PEFT names. (Its loaders lose the alphas of attention
    modules and the text encoders' attention LoRAs of such files, so the scales are checked against the
    kohya alphas, with diffusers loading our file.)"""
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    state, _ = pipeline.lora_state_dict(str(path), **kwargs)
    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        part = {k[len(comp) + 1:]: v for k, v in state.items() if k.startswith(comp + ".")}
        if not part:
            continue
        part = (convert_unet_state_dict_to_peft(part) if comp == "unet"
                else convert_state_dict_to_peft(convert_state_dict_to_diffusers(
                    part, original_type=StateDictType.DIFFUSERS_OLD), original_type=StateDictType.DIFFUSERS))
        for key in part:
            if key.endswith(".lora_A.weight"):
                name = key[: -len(".lora_A.weight")]
                out[f"{comp}.{name}"] = (part[key], part[name + ".lora_B.weight"])
    assert 2 * len(out) == len(state)
    return out


def check_against_diffusers(models, pipeline, kohya: Path, ours: Path, expected: dict[str, np.ndarray],  # type: ignore[no-untyped-def]
                            **kwargs) -> None:
    """Our file has the modules and factors that diffusers' kohya conversion gives, and diffusers loading
    our file (its lora_adapter_metadata for the scales) injects LoRA layers whose deltas are `expected`
    (component.path -> float64 delta from the kohya factors and alphas); fused, W + delta."""
    theirs = diffusers_conversion(pipeline, kohya, **kwargs)
    tensors, _ = read(ours)
    assert sorted(theirs) == sorted(expected) == sorted(k[: -len(".lora_A.weight")] for k in tensors
                                                        if k.endswith(".lora_A.weight"))
    for name, (a, b) in theirs.items():
        assert torch.equal(tensors[name + ".lora_A.weight"], a) and torch.equal(tensors[name + ".lora_B.weight"], b)
    unet, *tes = models
    encoders = dict(zip(["text_encoder", "text_encoder_2"], tes))
    loaded = {"unet": copy.deepcopy(unet), **{n: copy.deepcopy(t) for n, t in encoders.items()}}
    state, alphas, meta = pipeline.lora_state_dict(str(ours), return_lora_metadata=True, **kwargs)
    assert alphas is None and meta is not None
    pipeline.load_lora_into_unet(state, alphas, unet=loaded["unet"], metadata=meta)
    for n in encoders:
        pipeline.load_lora_into_text_encoder(state, alphas, text_encoder=loaded[n], prefix=n, metadata=meta)
    # transformers >= 5 has no text_model level in CLIPTextModel's module names (it has in ...WithProjection)
    mine = {f"{c}.{k}".replace(".text_model.", ".", 1): v for c, m in loaded.items() for k, v in peft_deltas(m).items()}
    flat = {k.replace(".text_model.", ".", 1): v for k, v in expected.items()}
    assert sorted(mine) == sorted(flat)
    before = {"unet": weights_of(unet), **{n: weights_of(t) for n, t in encoders.items()}}
    for m in loaded.values():
        for layer in m.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.merge()
    for name, d in flat.items():
        np.testing.assert_allclose(mine[name], d.reshape(mine[name].shape), rtol=1e-5, atol=1e-6, err_msg=name)
        comp, path = name.split(".", 1)
        if comp != "unet" and hasattr(loaded[comp], "text_model"):
            path = "text_model." + path
        w0 = before[comp][path + ".weight"]
        merged = loaded[comp].get_submodule(path).base_layer.weight.detach().double().numpy()
        np.testing.assert_allclose(merged, w0 + d.reshape(w0.shape), rtol=1e-5, atol=1e-6, err_msg=name)


def test_sd1_kohya_to_peft_matches_diffusers(tmp_path, sd1_models):
    kohya = tmp_path / "sd1.safetensors"
    sd = kohya_file(kohya, sd1_modules(), "F32")
    out = tmp_path / "sd1_peft.safetensors"
    report = lorafuse.convert(kohya, out, to="peft")
    assert report.family == "sd1" and report.modules_out == len(sd1_modules())
    expected = {**{f"unet.{p}": kohya_delta(sd, kohya_name("lora_unet_", p)) for p in SD1_UNET_MODULES},
                **{f"text_encoder.{p}": kohya_delta(sd, kohya_name("lora_te_", p)) for p in CLIP_MODULES}}
    tensors, meta = read(out)
    assert sorted(tensors) == sorted(f"{m}.lora_{x}.weight" for m in expected for x in "AB")
    check_against_diffusers(sd1_models, StableDiffusionPipeline, kohya, out, expected)


def test_sdxl_kohya_to_peft_matches_diffusers(tmp_path, sdxl_models):
    kohya = tmp_path / "sdxl.safetensors"
    sd = kohya_file(kohya, sdxl_modules(), "F32", seed=1)
    out = tmp_path / "sdxl_peft.safetensors"
    assert lorafuse.convert(kohya, out, to="peft").family == "sdxl"
    expected = {f"unet.{d}": kohya_delta(sd, kohya_name("lora_unet_", ldm)) for ldm, d, _ in SDXL_UNET_MODULES}
    expected["text_encoder.text_model.encoder.layers.0.self_attn.k_proj"] = kohya_delta(
        sd, "lora_te1_text_model_encoder_layers_0_self_attn_k_proj")
    for path in ("mlp.fc2", "self_attn.v_proj"):
        expected[f"text_encoder_2.text_model.encoder.layers.0.{path}"] = kohya_delta(
            sd, kohya_name("lora_te2_", f"text_model.encoder.layers.0.{path}"))
    check_against_diffusers(sdxl_models, StableDiffusionXLPipeline, kohya, out, expected,
                            unet_config=sdxl_models[0].config)


def test_flux_kohya_to_peft_matches_diffusers(tmp_path, flux_model):
    kohya = tmp_path / "flux.safetensors"
    # diffusers ignores final_layer alphas (its converter says "TODO: alphas"): give those alpha = rank
    sd = kohya_file(kohya, FLUX_MODULES, "F32", seed=2, alphas={"lora_unet_final_layer_adaLN_modulation_1": None,
                                                                "lora_unet_final_layer_linear": None})
    out = tmp_path / "flux_peft.safetensors"
    report = lorafuse.convert(kohya, out, to="peft")
    assert report.family == "flux"
    assert report.split["lora_unet_double_blocks_0_img_attn_qkv"] == [
        f"transformer.transformer_blocks.0.attn.to_{x}" for x in "qkv"]
    expected = flux_expected(sd)
    # diffusers' kohya Flux converter (scales folded into the factors). Its loader drops the modules it
    # leaves without the 'transformer.' prefix (final_layer, time_in), so its output is read directly.
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    converted = _convert_kohya_flux_lora_to_diffusers(dict(sd))
    theirs = {k[: -len(".lora_A.weight")].removeprefix("transformer."):
              converted[k.replace(".lora_A.", ".lora_B.")].double().numpy() @ v.double().numpy()
              for k, v in converted.items() if k.endswith(".lora_A.weight")}
    model = copy.deepcopy(flux_model)
    state, alphas, meta = FluxPipeline.lora_state_dict(str(out), return_alphas=True, return_lora_metadata=True)
    FluxPipeline.load_lora_into_transformer(state, alphas, transformer=model, metadata=meta)
    mine = peft_deltas(model)
    model.fuse_lora()
    assert sorted(mine) == sorted(theirs) == sorted(expected)
    w0 = weights_of(flux_model)
    for name, d in expected.items():
        np.testing.assert_allclose(mine[name], d, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(theirs[name], d, rtol=1e-5, atol=1e-6, err_msg=name)
        fused = model.get_submodule(name).base_layer.weight.detach().double().numpy()
        np.testing.assert_allclose(fused, w0[name + ".weight"] + d, rtol=1e-5, atol=1e-6, err_msg=name)
    # A qkv split keeps the factors' bytes: A shared, B's rows.
    tensors, _ = read(out)
    for i, x in enumerate("qkv"):
        key = f"transformer.transformer_blocks.0.attn.to_{x}"
        assert torch.equal(tensors[key + ".lora_A.weight"],
                           sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"])
        assert torch.equal(tensors[key + ".lora_B.weight"],
                           sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"][i * H:(i + 1) * H])


def test_flux_linear1_splits_into_q_k_v_and_mlp(tmp_path, flux_model):
    """diffusers' own kohya converter hard-codes Flux.1's widths for linear1; on the tiny model the
    reference is the BFL layout and diffusers' loader on our file."""
    kohya = tmp_path / "linear1.safetensors"
    sd = kohya_file(kohya, LINEAR1, "BF16", seed=3)
    out = tmp_path / "linear1_peft.safetensors"
    lorafuse.convert(kohya, out, to="peft")
    model = copy.deepcopy(flux_model)
    state, alphas, meta = FluxPipeline.lora_state_dict(str(out), return_alphas=True, return_lora_metadata=True)
    FluxPipeline.load_lora_into_transformer(state, alphas, transformer=model, metadata=meta)
    mine = peft_deltas(model)
    expected = flux_expected(sd)
    assert sorted(mine) == sorted(expected)
    for name, d in expected.items():
        np.testing.assert_allclose(mine[name], d, rtol=1e-5, atol=1e-6, err_msg=name)


# ----------------------------------------------------------------------------- bit-identical round trips


def sd_scripts_hashes(path: Path) -> tuple[str, str]:
    """sd-scripts' sshs_model_hash (sha256 of the data after the header) and sshs_legacy_hash (first
    8 hex digits of the sha256 of bytes 0x100000..0x110000 of the file), written here from their
    definition for a file that holds only ss_* metadata."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return hashlib.sha256(raw[8 + n:]).hexdigest(), hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]


META = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "0.5",
        "ss_training_comment": "héllo / ünïcode", "ss_network_args": json.dumps({"conv_dim": "4"}),
        "modelspec.title": "round trip"}


@pytest.mark.parametrize("family, dtype, alpha_dtype", [
    ("sd1", "F16", None), ("sd1", "F32", None), ("sdxl", "BF16", "F32"), ("sdxl", "F16", "F16"),
    ("flux", "BF16", None), ("flux", "F32", "F16")])
def test_kohya_to_peft_to_kohya_is_bit_identical(tmp_path, family, dtype, alpha_dtype):
    modules = {"sd1": sd1_modules, "sdxl": sdxl_modules, "flux": lambda: {**FLUX_MODULES, **LINEAR1}}[family]()
    src = tmp_path / "in.safetensors"
    names = list(modules)
    alphas = {n: 0.5 if i % 4 != 3 else None for i, n in enumerate(names)}  # network_alpha 0.5, some absent
    kohya_file(src, modules, dtype, seed=4, alpha_dtype=alpha_dtype, metadata=META, alphas=alphas, dims=(4, 2))
    # sd-scripts' hashes, as a file it wrote carries them
    model_hash, legacy = sd_scripts_hashes(src)
    sd, _ = read(src)
    save_file(sd, str(src), metadata={**META, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy})
    peft = tmp_path / "peft.safetensors"
    assert main(["convert", str(src), "--to", "peft", "-o", str(peft), "-q"]) == 0
    tensors, meta = read(peft)
    assert all(k.split(".")[0] in ("unet", "text_encoder", "text_encoder_2", "transformer") for k in tensors)
    assert {k: meta[k] for k in META} == META  # kohya's metadata travels in the diffusers file
    back = tmp_path / "back.safetensors"
    assert main(["convert", str(peft), "--to", "kohya", "-o", str(back), "-q"]) == 0
    # The same bytes but for lorafuse's mark (a "lorafuse_version" metadata entry, last): the same header
    # entries in the same order, the same data buffer.
    (header, data), (src_header, src_data) = _unmarked(back.read_bytes()), _unmarked(src.read_bytes())
    assert header == src_header and data == src_data
    assert read(back)[1]["lorafuse_version"] == lorafuse.__version__ and "lorafuse_version" not in read(src)[1]


def _unmarked(raw: bytes) -> tuple[list[tuple[str, object]], bytes]:
    """A safetensors file's header as ordered (key, value) pairs, without lorafuse's metadata mark and record
    (the `lorafuse.*` keys, issue #16), and its data buffer."""
    (n,) = struct.unpack("<Q", raw[:8])
    pairs = json.loads(raw[8:8 + n], object_pairs_hook=lambda p: p)
    out = []
    for key, value in pairs:
        if key == "__metadata__":
            marks = [(k, v) for k, v in value if k == "lorafuse_version"]
            assert marks in ([], [value[-1]])  # at most one, the last entry
            value = [(k, v) for k, v in value if k != "lorafuse_version" and not k.startswith("lorafuse.")]
        out.append((key, value))
    return out, raw[8 + n:]


def test_peft_to_kohya_to_peft_keeps_every_delta(tmp_path):
    """A diffusers Flux LoRA with independent q / k / v LoRAs (as diffusers trains them) and no proj_mlp:
    to kohya, the fused qkv / linear1 are block-diagonal (rank 3r) with zero rows for proj_mlp; back, every
    delta is the same, exactly."""
    g = torch.Generator().manual_seed(5)
    parts = {"transformer.transformer_blocks.0.attn.to_q": 2, "transformer.transformer_blocks.0.attn.to_k": 3,
             "transformer.transformer_blocks.0.attn.to_v": 2, "transformer.transformer_blocks.0.attn.to_out.0": 4,
             "transformer.single_transformer_blocks.0.attn.to_q": 2,
             "transformer.single_transformer_blocks.0.attn.to_k": 2,
             "transformer.single_transformer_blocks.0.attn.to_v": 2, "transformer.norm_out.linear": 2}
    state = {}
    for m, r in parts.items():
        rows = 2 * H if m.endswith("norm_out.linear") else H
        state[f"{m}.lora_A.weight"] = torch.randn(r, H, generator=g).to(torch.bfloat16)
        state[f"{m}.lora_B.weight"] = torch.randn(rows, r, generator=g).to(torch.bfloat16)
    src = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(state, str(src), metadata={"format": "pt"})  # no lora_adapter_metadata: diffusers' scale is 1
    kohya = tmp_path / "kohya.safetensors"
    report = lorafuse.convert(src, kohya, to="kohya", family="flux")  # diffusers names alone are SD3's too
    assert report.family == "flux" and set(report.fused) == {"lora_unet_double_blocks_0_img_attn_qkv",
                                                             "lora_unet_single_blocks_0_linear1"}
    k, _ = read(kohya)
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert k[f"{qkv}.lora_down.weight"].shape == (7, H) and k[f"{qkv}.lora_up.weight"].shape == (3 * H, 7)
    linear1 = kohya_delta(k, "lora_unet_single_blocks_0_linear1")
    assert linear1.shape == (7 * H, H) and not linear1[3 * H:].any()  # Flux.1's MLP width: zero rows
    b = {m: state[f"{m}.lora_B.weight"].double().numpy() @ state[f"{m}.lora_A.weight"].double().numpy()
         for m in parts}
    np.testing.assert_array_equal(kohya_delta(k, qkv), np.concatenate(
        [b[f"transformer.transformer_blocks.0.attn.to_{x}"] for x in "qkv"]))
    norm = b["transformer.norm_out.linear"]
    np.testing.assert_array_equal(kohya_delta(k, "lora_unet_final_layer_adaLN_modulation_1"),
                                  np.concatenate([norm[H:], norm[:H]]))
    again = tmp_path / "again.safetensors"
    lorafuse.convert(kohya, again, to="peft")
    got = lorafuse.load(again)
    assert sorted(got.updates) == sorted(parts)
    back, _ = read(again)
    for m, r in parts.items():  # the same factors, bit for bit (rank r each, not the fused rank)
        np.testing.assert_array_equal(got[m].delta(), b[m], err_msg=m)
        assert got[m].rank == r and got[m].scale == 1.0
        for x in "AB":
            assert torch.equal(back[f"{m}.lora_{x}.weight"], state[f"{m}.lora_{x}.weight"]), m


def test_peft_to_kohya_of_a_file_diffusers_saved(tmp_path, sd1_models):
    """A LoRA that diffusers itself saves (save_lora_weights, with its lora_adapter_metadata, ranks and
    alphas differing per module) converts to kohya with the same deltas."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(sd1_models[0])
    cfg = LoraConfig(r=4, lora_alpha=2.0, init_lora_weights=False,
                     target_modules=["to_q", "to_k", "proj_in", "conv1", "time_emb_proj"],
                     rank_pattern={"^down_blocks.0.resnets.0.conv1": 2},
                     alpha_pattern={"^down_blocks.0.attentions.0.proj_in": 8.0})
    unet.add_adapter(cfg)
    expected = {f"unet.{k}": v for k, v in peft_deltas(unet).items()}
    meta_cfg = {k: v for k, v in unet.peft_config["default"].to_dict().items() if k in (
        "r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "use_rslora", "use_dora", "lora_bias")}
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet),
                                              unet_lora_adapter_metadata=meta_cfg)
    src = tmp_path / "pytorch_lora_weights.safetensors"
    kohya = tmp_path / "k.safetensors"
    lorafuse.convert(src, kohya, to="kohya", family="sd1")
    k, _ = read(kohya)
    assert sorted({n.split(".")[0] for n in k}) == sorted(kohya_name("lora_", n) for n in expected)
    for name, d in expected.items():
        np.testing.assert_allclose(kohya_delta(k, kohya_name("lora_", name)), d.reshape(
            kohya_delta(k, kohya_name("lora_", name)).shape), rtol=1e-6, atol=1e-7, err_msg=name)


# ----------------------------------------------------------------------------- LoHa / LoKr -> LoRA


def loha_tensors(g: torch.Generator, out: int, cols: int, r: int, alpha: float, name: str) -> dict[str, torch.Tensor]:
    return {f"{name}.hada_w1_a": torch.randn(out, r, generator=g),
            f"{name}.hada_w1_b": torch.randn(r, cols, generator=g),
            f"{name}.hada_w2_a": torch.randn(out, r, generator=g),
            f"{name}.hada_w2_b": torch.randn(r, cols, generator=g),
            f"{name}.alpha": torch.tensor(alpha)}


def loha_delta(t: dict[str, torch.Tensor], name: str) -> np.ndarray:
    """LyCORIS' LoHa: (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r (r = w1_b's rows)."""
    m = {k.split(".", 1)[1]: v.double().numpy() for k, v in t.items() if k.startswith(name + ".")}
    return (m["hada_w1_a"] @ m["hada_w1_b"]) * (m["hada_w2_a"] @ m["hada_w2_b"]) * float(m["alpha"]) / m[
        "hada_w1_b"].shape[0]


def lokr_delta(t: dict[str, torch.Tensor], name: str) -> np.ndarray:
    """LyCORIS' LoKr with a full w1 and a factored w2: kron(w1, w2_a @ w2_b) * alpha / r."""
    m = {k.split(".", 1)[1]: v.double().numpy() for k, v in t.items() if k.startswith(name + ".")}
    return np.kron(m["lokr_w1"], m["lokr_w2_a"] @ m["lokr_w2_b"]) * float(m["alpha"]) / m["lokr_w2_b"].shape[0]


def best_rank(d: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k], float(np.sqrt(np.sum(s[:k] ** 2) / np.sum(s ** 2)))


def test_loha_and_lokr_become_their_best_rank_k_lora(tmp_path, capsys):
    g = torch.Generator().manual_seed(6)
    attn = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"  # a 3x3 conv: LyCORIS flattens its kernel
    lokr = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    plain = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    t = {**loha_tensors(g, 16, 24, 3, 2.0, attn), **loha_tensors(g, 8, 8 * 9, 3, 1.5, conv),
         f"{lokr}.lokr_w1": torch.randn(4, 2, generator=g), f"{lokr}.lokr_w2_a": torch.randn(8, 2, generator=g),
         f"{lokr}.lokr_w2_b": torch.randn(2, 6, generator=g), f"{lokr}.alpha": torch.tensor(1.0),
         f"{plain}.lora_down.weight": torch.randn(8, 8, generator=g),
         f"{plain}.lora_up.weight": torch.randn(8, 8, generator=g),
         f"{plain}.alpha": torch.tensor(4.0)}
    src = tmp_path / "lyco.safetensors"
    save_file(t, str(src))
    out = tmp_path / "lora.safetensors"
    assert main(["convert", str(src), "--to", "kohya", "--rank", "4", "--conv-rank", "2", "-o", str(out),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    k, _ = read(out)
    for name, d, rank in ((attn, loha_delta(t, attn), 4), (conv, loha_delta(t, conv), 2),
                          (lokr, lokr_delta(t, lokr), 4)):
        optimum, kept = best_rank(d, rank)
        got = kohya_delta(k, name)
        assert k[f"{name}.lora_down.weight"].shape[0] == rank
        np.testing.assert_allclose(got.reshape(d.shape), optimum, rtol=1e-4, atol=1e-5 * np.abs(d).max(), err_msg=name)
        row = next(m for m in report["modules"] if m["name"] == name)
        assert row["rank"] == rank and row["fro_kept"] == pytest.approx(kept, rel=1e-5)
    assert k[f"{conv}.lora_down.weight"].shape == (2, 8, 3, 3) and k[f"{conv}.lora_up.weight"].shape == (8, 2, 1, 1)
    # The plain LoRA module is copied as it is: --rank does not resize it.
    for part in ("lora_down.weight", "lora_up.weight", "alpha"):
        assert torch.equal(k[f"{plain}.{part}"], t[f"{plain}.{part}"])
    assert {m["name"] for m in report["modules"]} == {attn, conv, lokr}
    # Without --rank: refused, saying to pass it; nothing written.
    refused = tmp_path / "refused.safetensors"
    assert main(["convert", str(src), "--to", "peft", "-o", str(refused)]) == 1
    assert "--rank" in capsys.readouterr().err and not refused.exists()


# ----------------------------------------------------------------------------- the diffusers file format


def test_diffusers_file_keeps_every_scale(tmp_path):
    """Mixed ranks and alphas (F16 alpha 0.3 is not a round number) read back with the same scales, and
    diffusers' LoraConfig from the file's metadata gives the same scaling per module."""
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    src = tmp_path / "k.safetensors"
    kohya_file(src, sd1_modules(), "F16", seed=7, alpha_dtype="F16",
               alphas={kohya_name("lora_te_", "text_model.encoder.layers.0.mlp.fc1"): 0.3})
    out = tmp_path / "p.safetensors"
    lorafuse.convert(src, out, to="peft")
    assert lorafuse.detect_format(out) == "diffusers"
    a, b = lorafuse.load(src), lorafuse.load(out)
    _, meta = read(out)
    flat = json.loads(meta["lora_adapter_metadata"])
    for kname, u in a.updates.items():
        comp = "unet" if kname.startswith("lora_unet_") else "text_encoder"
        path = kname.removeprefix("lora_unet_" if comp == "unet" else "lora_te_")
        dname = next(n for n in b.updates if n.replace(".", "_").endswith(path) and n.startswith(comp + "."))
        assert b[dname].scale == u.scale and b[dname].rank == u.rank
        cfg = LoraConfig(**{k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(comp + ".")})
        module = dname.split(".", 1)[1].removeprefix("text_model.")  # transformers >= 5 flattens CLIP
        r = cfg.rank_pattern.get(get_pattern_key(cfg.rank_pattern.keys(), module), cfg.r)
        alpha = cfg.alpha_pattern.get(get_pattern_key(cfg.alpha_pattern.keys(), module), cfg.lora_alpha)
        assert r == u.rank and alpha / r == u.scale, dname


# ----------------------------------------------------------------------------- errors and the CLI


def test_errors(tmp_path, capsys):
    src = tmp_path / "k.safetensors"
    kohya_file(src, {**sd1_modules(), "lora_unet_not_a_layer_of_any_unet": (8, 8)})
    with pytest.raises(MissingModuleError, match="lora_unet_not_a_layer_of_any_unet"):
        lorafuse.convert(src, tmp_path / "o.safetensors", to="peft", family="sd1")
    assert not (tmp_path / "o.safetensors").exists()
    good = tmp_path / "good.safetensors"
    kohya_file(good, sd1_modules())
    with pytest.raises(OutputError, match="would overwrite the input"):
        lorafuse.convert(good, good, to="kohya")
    with pytest.raises(LorafuseValueError, match=".safetensors"):
        lorafuse.convert(good, tmp_path / "folder", to="peft")
    with pytest.raises(LorafuseValueError, match="to must be"):
        lorafuse.convert(good, tmp_path / "x.safetensors", to="onnx")
    # A diffusers module that has no kohya name in the family named
    peft = tmp_path / "p.safetensors"
    lorafuse.convert(good, peft, to="peft")
    with pytest.raises((MissingModuleError, UnsupportedError), match="flux"):
        lorafuse.convert(peft, tmp_path / "f.safetensors", to="kohya", family="flux")
    # A PEFT folder (an LLM adapter) is not a diffusion LoRA
    folder = tmp_path / "llm"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    save_file({"base_model.model.model.layers.0.q_proj.lora_A.weight": torch.zeros(2, 4),
               "base_model.model.model.layers.0.q_proj.lora_B.weight": torch.zeros(4, 2)},
              str(folder / "adapter_model.safetensors"))
    assert main(["convert", str(folder), "--to", "kohya", "-o", str(tmp_path / "l.safetensors")]) == 1
    assert "diffusion LoRA" in capsys.readouterr().err
    assert main(["convert", str(good), "--to", "kohya", "-o", str(good)]) == 1
    assert "would overwrite the input" in capsys.readouterr().err


def test_diffusers_reader_refuses_what_it_cannot_read(tmp_path):
    a, b = torch.zeros(2, 8), torch.zeros(8, 2)
    cases = [
        ({"unet.conv_in.lora_A.weight": a, "unet.conv_in.lora_B.weight": b},
         {"lora_adapter_metadata": "{not json"}, lorafuse.FormatError, "not valid JSON"),
        ({"unet.conv_in.lora_A.weight": a, "unet.conv_in.lora_B.weight": b},
         {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 4})}, lorafuse.ShapeMismatchError,
         "r=4 but the tensors have rank 2"),
        ({"unet.conv_in.lora_A.weight": a, "unet.conv_in.lora_B.weight": b,
          "unet.conv_in.lora_magnitude_vector": torch.ones(8)}, None, UnsupportedError, "DoRA"),
        ({"unet.conv_in.lora_A.weight": a}, None, lorafuse.FormatError,
         "no lora_B half: 'unet.conv_in.lora_B.weight' is not in"),
        ({"unet.conv_in.lora_A.weight": a, "unet.conv_in.lora_B.weight": torch.zeros(8, 3)}, None,
         lorafuse.ShapeMismatchError,
         r"lora_A.weight' \(2, 8\) and 'unet.conv_in.lora_B.weight' \(8, 3\) are not LoRA factors of one rank"),
    ]
    for i, (tensors, meta, error, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.safetensors"
        save_file(tensors, str(path), metadata=meta)
        with pytest.raises(error, match=message):
            lorafuse.load(path)


def test_help_teaches(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = capsys.readouterr().out
    for needle in ("--to", "--rank", "--conv-rank", "examples:", "lorafuse convert", "lorafuse resize",
                   "load_lora_weights"):
        assert needle in text
