"""Flux.1 names and base-key matching (lorafuse.formats.flux_keys) against diffusers' own converters.

* The BFL layout the tables describe is checked with diffusers' `convert_flux_transformer_checkpoint_to_diffusers`:
  a BFL state dict built from a diffusers `FluxTransformer2DModel`'s keys with our tables must convert back
  to exactly the model's keys and tensors (fused q|k|v, linear1's q|k|v|mlp, norm_out's shift/scale swap).
  That converter hard-codes Flux.1's width (3072), so this runs on a model of the real width built on the
  meta device, with one value per row (the converter only moves rows).
* kohya names and row splits are checked with diffusers' `_convert_kohya_flux_lora_to_diffusers` on a
  synthetic kohya LoRA with every module sd-scripts trains, dense deltas compared per diffusers module.
* match_modules is checked by merging deltas through its targets into BFL, ComfyUI and diffusers-folder
  keys of a tiny model and comparing the results through the (verified) BFL <-> diffusers layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

from lorafuse.errors import LorafuseValueError, MissingModuleError, ShapeMismatchError, UnsupportedError
from lorafuse.formats.flux_keys import (
    bfl_module,
    is_flux_module,
    kohya_module,
    match_modules,
    to_diffusers,
    to_kohya,
    to_kohya_shapes,
)
from lorafuse.formats.targets import Target

TINY = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=True,
            axes_dims_rope=(2, 2, 4))
# QK-norm scales are no LoRA targets (not in flux_keys' tables) but the BFL file has them.
NORMS = [
    (r"^transformer_blocks\.(\d+)\.attn\.norm_q$", r"double_blocks.\1.img_attn.norm.query_norm"),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_k$", r"double_blocks.\1.img_attn.norm.key_norm"),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_added_q$", r"double_blocks.\1.txt_attn.norm.query_norm"),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_added_k$", r"double_blocks.\1.txt_attn.norm.key_norm"),
    (r"^single_transformer_blocks\.(\d+)\.attn\.norm_q$", r"single_blocks.\1.norm.query_norm"),
    (r"^single_transformer_blocks\.(\d+)\.attn\.norm_k$", r"single_blocks.\1.norm.key_norm"),
]


@pytest.fixture(scope="module")
def tiny() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TINY)
    return {k: v.detach().double() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def real_shapes() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of a Flux.1 transformer of the real width, two blocks of each kind (no memory)."""
    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=True)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def linear_modules(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """diffusers module name (with component) -> weight shape, for every 2-D weight of the transformer."""
    return {"transformer." + k[: -len(".weight")]: s for k, s in shapes.items()
            if k.endswith(".weight") and len(s) == 2}


def to_bfl(tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A BFL state dict from a diffusers one, assembled through to_kohya's row layout (weights and biases);
    `shapes` are the weights' true shapes (the tensors may be narrower, see real_shapes)."""
    modules = linear_modules(shapes)
    layout, fused_shapes = to_kohya(modules), to_kohya_shapes(modules)
    out: dict[str, torch.Tensor] = {}
    for kohya, parts in layout.items():
        path, rows_total = bfl_module(kohya), fused_shapes[kohya][0]
        for param in ("weight", "bias"):
            first = tensors[f"{parts[0][0][len('transformer.'):]}.{param}"]
            fused = torch.full((rows_total, *first.shape[1:]), float("nan"), dtype=first.dtype)
            cursor: dict[str, int] = {}
            for name, rows in parts:
                src = tensors[f"{name[len('transformer.'):]}.{param}"]
                a, b = rows or (0, rows_total)
                start = cursor.get(name, 0)
                fused[a:b] = src[start:start + b - a]
                cursor[name] = start + b - a
            assert not torch.isnan(fused).any(), f"{kohya}: rows left unfilled"
            out[f"{path}.{param}"] = fused
    for key, t in tensors.items():
        for pattern, repl in NORMS:
            if re.match(pattern, key[: -len(".weight")]):
                out[re.sub(pattern, repl, key[: -len(".weight")]) + ".scale"] = t
    return out


def row_ids(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """One distinct value per row of every tensor, as a column (bias, norm: a vector)."""
    out, start = {}, 0
    for key, s in shapes.items():
        ids = torch.arange(start, start + s[0], dtype=torch.float64)
        out[key] = ids[:, None] if len(s) == 2 else ids
        start += s[0]
    return out


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_bfl_layout_converts_back_with_diffusers(real_shapes, prefix):
    tensors = row_ids(real_shapes)
    bfl = {prefix + k: v for k, v in to_bfl(tensors, real_shapes).items()}
    checkpoint = dict(bfl)
    converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    assert checkpoint == {}  # the converter used every key we wrote
    assert sorted(converted) == sorted(tensors)
    for key, t in tensors.items():
        assert torch.equal(converted[key], t), key


def kohya_modules(bfl: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """What sd-scripts names a LoRA on every Linear of a BFL state dict: lora_unet_ + the path with '_'."""
    return {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): tuple(t.shape)
            for k, t in bfl.items() if k.endswith(".weight")}


def kohya_lora(modules: Mapping[str, tuple[int, ...]], seed: int,
               sparse: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Random kohya LoRA tensors; modules in `sparse` get a block-diagonal lora_up (a split_qkv LoRA)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for i, (name, (out, fan_in)) in enumerate(modules.items()):
        parts = 4 if "linear1" in name else 3
        rank = parts if name in sparse else 2 + i % 3
        up = torch.randn(out, rank, generator=g)
        if name in sparse:
            h = fan_in
            bounds = [0, h, 2 * h, 3 * h, out][: parts + 1] if parts == 4 else [0, out // 3, 2 * out // 3, out]
            mask = torch.zeros(out, rank)
            for p in range(parts):
                mask[bounds[p]:bounds[p + 1], p] = 1
            up = up * mask
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, fan_in, generator=g)
        sd[f"{name}.lora_up.weight"] = up
        # diffusers ignores final_layer alphas (its converter says "TODO: alphas"): give those alpha = rank
        alpha = float(rank) if "final_layer" in name else 0.5 + i % 4
        if i % 5 != 1:  # some modules without .alpha (alpha = rank)
            sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


def our_deltas(lora: Mapping[str, torch.Tensor], modules: Mapping[str, tuple[int, ...]],
               probe: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """diffusers module -> dense delta from to_diffusers' row splits: B[rows] @ A * scale, rows concatenated
    (times `probe` when given)."""
    out: dict[str, list[np.ndarray]] = {}
    for name, shape in modules.items():
        down = lora[f"{name}.lora_down.weight"].double().numpy()
        up = lora[f"{name}.lora_up.weight"].double().numpy()
        alpha = lora.get(f"{name}.alpha")
        scale = (down.shape[0] if alpha is None else float(alpha)) / down.shape[0]
        right = down if probe is None else down @ probe
        for target, rows in to_diffusers(name, shape):
            a, b = rows or (0, shape[0])
            out.setdefault(target, []).append(up[a:b] @ right * scale)
    return {k: np.concatenate(v) for k, v in out.items()}


def their_deltas(lora: Mapping[str, torch.Tensor]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """diffusers module (with 'transformer.') -> (lora_B, lora_A) from diffusers' kohya Flux converter."""
    converted = _convert_kohya_flux_lora_to_diffusers(dict(lora))
    names = {k[: -len(".lora_A.weight")] for k in converted if k.endswith(".lora_A.weight")}
    assert len(converted) == 2 * len(names)
    return {(n if n.startswith("transformer.") else "transformer." + n):
            (converted[n + ".lora_B.weight"].double().numpy(), converted[n + ".lora_A.weight"].double().numpy())
            for n in names}


def test_kohya_names_and_splits_match_diffusers(tiny):
    bfl = to_bfl(tiny, {k: tuple(v.shape) for k, v in tiny.items()})
    # diffusers splits linear1 with Flux.1's fixed widths (3072 x 3 + 12288): tested at that size below
    modules = {k: s for k, s in kohya_modules(bfl).items() if not k.endswith("_linear1")}
    assert all(is_flux_module(m) for m in modules)
    lora = kohya_lora(modules, seed=1, sparse=("lora_unet_double_blocks_1_txt_attn_qkv",))
    theirs = their_deltas(lora)
    ours = our_deltas(lora, modules)
    linear1_parts = re.compile(r"single_transformer_blocks\.\d+\.(attn|proj_mlp)")
    expected = {m for m in linear_modules({k: tuple(v.shape) for k, v in tiny.items()})
                if not linear1_parts.search(m)}
    assert sorted(ours) == sorted(theirs) == sorted(expected)
    for name, (b, a) in theirs.items():
        np.testing.assert_allclose(ours[name], b @ a, rtol=1e-5, atol=1e-6, err_msg=name)
        assert ours[name].shape == tuple(tiny[name[len("transformer."):] + ".weight"].shape)


@pytest.mark.parametrize("sparse", [False, True])
def test_linear1_split_matches_diffusers(sparse):
    name = "lora_unet_single_blocks_7_linear1"
    modules = {name: (3 * 3072 + 12288, 3072)}
    lora = kohya_lora(modules, seed=2, sparse=(name,) if sparse else ())
    theirs = their_deltas(lora)
    # the deltas are 21504 x 3072: compare them on a random probe (D1 X = D2 X for a Gaussian X means D1 = D2,
    # with probability 1)
    probe = np.random.default_rng(4).standard_normal((3072, 2))
    ours = our_deltas(lora, modules, probe)
    assert sorted(ours) == sorted(theirs) == sorted(
        f"transformer.single_transformer_blocks.7.{p}"
        for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))
    for n, (b, a) in theirs.items():
        np.testing.assert_allclose(ours[n], b @ (a @ probe), rtol=1e-5, atol=1e-5, err_msg=n)


def test_to_kohya_inverts_to_diffusers(tiny):
    shapes = {k: tuple(v.shape) for k, v in tiny.items()}
    diffusers_shapes = linear_modules(shapes)
    kohya = kohya_modules(to_bfl(tiny, shapes))
    forward = {k: to_diffusers(k, s) for k, s in kohya.items()}
    used = {n for entries in forward.values() for n, _ in entries}
    assert used == set(diffusers_shapes)  # every diffusers linear is part of exactly the kohya layers
    assert to_kohya(diffusers_shapes) == forward
    assert to_kohya_shapes(diffusers_shapes) == kohya
    for k in kohya:
        assert kohya_module(k) == k
        assert all(kohya_module(n) == k for n, _ in forward[k])
    # a LoRA on some parts of a fused layer: the others are left out, the kohya shape stays whole
    partial = {n: s for n, s in diffusers_shapes.items() if not n.endswith(("to_v", "proj_mlp"))}
    got = to_kohya(partial)
    for k, entries in forward.items():
        assert got[k] == [(n, r) for n, r in entries if n in partial]
    assert to_kohya_shapes(partial) == kohya  # Flux's 4 x hidden MLP width stands in for a missing proj_mlp


def merge(weights: Mapping[str, np.ndarray], deltas: Mapping[str, np.ndarray],
          targets: Mapping[str, list[Target]]) -> dict[str, np.ndarray]:
    """W[base_rows] += delta[delta_rows] for every target (the meaning of Target)."""
    out = {k: v.copy() for k, v in weights.items()}
    for module, ts in targets.items():
        for t in ts:
            w = out[t.key]
            a, b = t.base_rows or (0, w.shape[0])
            c, d = t.delta_rows or (0, deltas[module].shape[0])
            assert b - a == d - c, (module, t)
            w[a:b] += deltas[module][c:d]
    return out


def test_match_modules_on_bfl_comfyui_and_diffusers_keys(tiny):
    shapes = {k: tuple(v.shape) for k, v in tiny.items()}
    diffusers = {"transformer/" + k: v.numpy() for k, v in tiny.items()}
    bfl = {k: v.numpy() for k, v in to_bfl(tiny, shapes).items()}
    comfy = {"model.diffusion_model." + k: v for k, v in bfl.items()}
    others = {"text_encoder/text_model.encoder.layers.0.self_attn.q_proj.weight": (8, 8),
              "vae/conv_in.weight": (4, 3, 3, 3)}

    kohya = kohya_modules(bfl)
    rng = np.random.default_rng(3)
    kohya_deltas = {k: rng.standard_normal(s) for k, s in kohya.items()}
    # the same update in diffusers names: each kohya delta split as to_diffusers says
    parts: dict[str, list[np.ndarray]] = {}
    for k, s in kohya.items():
        for n, rows in to_diffusers(k, s):
            a, b = rows or (0, s[0])
            parts.setdefault(n, []).append(kohya_deltas[k][a:b])
    peft_deltas = {n: np.concatenate(p) for n, p in parts.items()}
    peft = {n: d.shape for n, d in peft_deltas.items()}

    def merged(modules, deltas, weights):
        keys = {**{k: v.shape for k, v in weights.items()}, **others}
        te = "lora_te1_text_model_encoder_layers_0_mlp_fc1"
        targets, unmatched = match_modules({**modules, te: (8, 8)}, keys)
        assert unmatched == [te]
        assert set(targets) == set(modules)
        return merge(weights, deltas, targets)

    on_diffusers = merged(kohya, kohya_deltas, diffusers)
    assert all(not np.allclose(on_diffusers[k], diffusers[k]) for k in diffusers if k.endswith(".weight") and
               diffusers[k].ndim == 2)  # every linear got its part
    back_to_bfl = to_bfl({k[len("transformer/"):]: torch.from_numpy(v) for k, v in on_diffusers.items()}, shapes)
    on_bfl = merged(kohya, kohya_deltas, bfl)
    for k in bfl:
        np.testing.assert_allclose(on_bfl[k], back_to_bfl[k].numpy(), rtol=1e-12, atol=1e-12, err_msg=k)
    result = merged(peft, peft_deltas, bfl)
    for k in bfl:
        np.testing.assert_allclose(result[k], on_bfl[k], rtol=1e-12, atol=1e-12, err_msg=k)
    for modules, deltas in ((kohya, kohya_deltas), (peft, peft_deltas)):
        result = merged(modules, deltas, comfy)
        for k in bfl:
            np.testing.assert_allclose(result[f"model.diffusion_model.{k}"], on_bfl[k], rtol=1e-12, atol=1e-12)
    result = merged(peft, peft_deltas, diffusers)
    for k in diffusers:
        np.testing.assert_allclose(result[k], on_diffusers[k], rtol=1e-12, atol=1e-12, err_msg=k)


def test_match_modules_accepts_other_spellings_and_1x1_shapes(tiny):
    keys = {"transformer/" + k: tuple(v.shape) for k, v in tiny.items()}
    modules = {
        "diffusion_model.double_blocks.0.img_attn.qkv": (48, 16),  # ComfyUI-style LoRA name
        "lora_transformer_single_transformer_blocks_1_attn_to_k": (16, 16),  # "mixture" kohya-style diffusers name
        "single_transformer_blocks.1.proj_out": (16, 80, 1, 1),  # bare diffusers name, a 1x1 delta
    }
    targets, unmatched = match_modules(modules, keys)
    assert unmatched == []
    assert [t.key for t in targets["diffusion_model.double_blocks.0.img_attn.qkv"]] == [
        f"transformer/transformer_blocks.0.attn.to_{c}.weight" for c in "qkv"]
    assert targets["lora_transformer_single_transformer_blocks_1_attn_to_k"] == [
        Target("transformer/single_transformer_blocks.1.attn.to_k.weight")]
    assert targets["single_transformer_blocks.1.proj_out"] == [
        Target("transformer/single_transformer_blocks.1.proj_out.weight")]


def test_match_modules_errors_and_unmatched(tiny):
    shapes = {k: tuple(v.shape) for k, v in tiny.items()}
    bfl = {k: tuple(v.shape) for k, v in to_bfl(tiny, shapes).items()}
    diffusers = {"transformer/" + k: s for k, s in shapes.items()}

    with pytest.raises(ShapeMismatchError, match=r"lora_unet_double_blocks_0_img_attn_qkv.*\(48, 8\).*"
                                                 r"double_blocks\.0\.img_attn\.qkv\.weight.*\(48, 16\)"):
        match_modules({"lora_unet_double_blocks_0_img_attn_qkv": (48, 8)}, bfl)
    with pytest.raises(ShapeMismatchError, match=r"img_attn_qkv.*\(45, 16\).*"
                                                 r"transformer_blocks\.0\.attn\.to_q\.weight"):
        match_modules({"lora_unet_double_blocks_0_img_attn_qkv": (45, 16)}, diffusers)
    with pytest.raises(ShapeMismatchError, match=r"attn\.to_q.*\(16, 8\).*"
                                                 r"single_blocks\.0\.linear1\.weight.*\(112, 16"):
        match_modules({"transformer.single_transformer_blocks.0.attn.to_q": (16, 8)}, bfl)
    with pytest.raises(ShapeMismatchError, match="linear"):
        match_modules({"lora_unet_img_in": (16, 4, 3, 3)}, bfl)
    broken = {k: s for k, s in diffusers.items() if "transformer_blocks.0.attn.to_k." not in k}
    with pytest.raises(MissingModuleError, match=r"to_k\.weight"):
        match_modules({"lora_unet_double_blocks_0_img_attn_qkv": (48, 16)}, broken)

    # no guidance embedder (Flux schnell), no such block, a SD module: unmatched, in input order
    schnell = {k: s for k, s in bfl.items() if not k.startswith("guidance_in.")}
    modules = {"lora_unet_guidance_in_in_layer": (16, 256), "lora_unet_double_blocks_5_img_mlp_0": (64, 16),
               "lora_unet_down_blocks_0_attentions_0_proj_in": (320, 320), "lora_unet_img_in": (16, 4)}
    targets, unmatched = match_modules(modules, schnell)
    assert unmatched == list(modules)[:3]
    assert targets == {"lora_unet_img_in": [Target("img_in.weight")]}


@pytest.mark.parametrize("name, flux", [
    ("lora_unet_double_blocks_18_txt_mod_lin", True),
    ("lora_unet_single_blocks_37_modulation_lin", True),
    ("lora_unet_time_in_out_layer", True),
    ("lora_unet_final_layer_adaLN_modulation_1", True),
    ("diffusion_model.single_blocks.0.linear2", True),
    ("transformer.time_text_embed.guidance_embedder.linear_1", True),
    ("lora_transformer_transformer_blocks_3_ff_context_net_0_proj", True),
    ("lora_unet_down_blocks_0_attentions_0_proj_in", False),
    ("lora_unet_input_blocks_4_1_proj_in", False),
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", False),
    ("unet.down_blocks.0.attentions.0.proj_in", False),
    ("transformer.transformer_blocks.0.attn1.to_q", False),  # PixArt
    ("lora_unet_double_blocks_0_img_attn_norm_query_norm", False),  # a norm, not a Linear
    ("lora_unet_double_blocks_01_img_mlp_0", False),
])
def test_is_flux_module(name, flux):
    assert is_flux_module(name) is flux


def test_naming_errors():
    with pytest.raises(UnsupportedError, match="lora_unet_down_blocks_0"):
        to_diffusers("lora_unet_down_blocks_0_attentions_0_proj_in", (320, 320))
    with pytest.raises(ShapeMismatchError, match=r"lora_unet_double_blocks_0_img_attn_qkv.*47"):
        to_diffusers("lora_unet_double_blocks_0_img_attn_qkv", (47, 16))
    with pytest.raises(ShapeMismatchError, match=r"linear1.*\(40, 16\)"):
        to_diffusers("lora_unet_single_blocks_0_linear1", (40, 16))
    with pytest.raises(ShapeMismatchError, match="adaLN_modulation.*33"):
        to_diffusers("lora_unet_final_layer_adaLN_modulation_1", (33, 16))
    with pytest.raises(LorafuseValueError, match="sdxl"):
        to_kohya({"transformer.x_embedder": (16, 4)}, family="sdxl")
    with pytest.raises(UnsupportedError, match="already a kohya"):
        to_kohya({"lora_unet_img_in": (16, 4)})
    with pytest.raises(LorafuseValueError, match="same layer"):
        to_kohya({"transformer.x_embedder": (16, 4), "x_embedder": (16, 4)})
    with pytest.raises(ShapeMismatchError, match="q, k, v"):
        to_kohya({"transformer.transformer_blocks.0.attn.to_q": (16, 16),
                  "transformer.transformer_blocks.0.attn.to_k": (12, 16)})
    with pytest.raises(ShapeMismatchError, match="input sizes"):
        to_kohya({"transformer.single_transformer_blocks.0.attn.to_q": (16, 16),
                  "transformer.single_transformer_blocks.0.proj_mlp": (64, 8)})
