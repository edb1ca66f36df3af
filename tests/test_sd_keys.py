"""SD 1.x/2.x, SDXL and text-encoder naming (lorafuse.formats.sd_keys) against diffusers and transformers.

References: diffusers' own single-file converters (`convert_ldm_unet_checkpoint`,
`convert_open_clip_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_sd3_t5_checkpoint_to_diffusers`) on
checkpoints built here, and diffusers' kohya LoRA loader (`lora_state_dict` + `load_lora_into_unet` /
`load_lora_into_text_encoder`, which injects PEFT layers) on kohya state dicts built here for tiny models
with the real block structures. Each kohya module gets its own lora_up value, so where diffusers put it
is observed module by module.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_sd3_t5_checkpoint_to_diffusers,
)
from sd_fixtures import (
    HIDDEN,
    Shapes,
    _clip_config,
    _hf_clip,
    _kohya_unet_name,
    _layers,
    _ldm_unet,
    _openclip_ldm,
    _randomized,
    _reference,
    _single_file,
    _unet,
    _weights,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from lorafuse.errors import LorafuseValueError, ShapeMismatchError, UnsupportedError
from lorafuse.formats import sd_keys
from lorafuse.formats.sd_keys import (
    guess_family,
    match_modules,
    to_diffusers,
    to_kohya,
    unet_diffusers_path,
    unet_ldm_path,
)
from lorafuse.formats.targets import Target

# ---------------------------------------------------------------------------------------------- models








@pytest.fixture(scope="module")
def unets() -> dict[str, UNet2DConditionModel]:
    return {f: _randomized(_unet(f), i) for i, f in enumerate(("sd1", "sdxl"))}


@pytest.fixture(scope="module")
def clip_l() -> CLIPTextModel:
    return _randomized(CLIPTextModel(_clip_config()), 11)


@pytest.fixture(scope="module")
def clip_g() -> CLIPTextModelWithProjection:
    return _randomized(CLIPTextModelWithProjection(_clip_config()), 12)


@pytest.fixture(scope="module")
def t5() -> T5EncoderModel:
    return _randomized(T5EncoderModel(T5Config(vocab_size=20, d_model=HIDDEN, d_kv=4, d_ff=16, num_layers=2,
                                               num_heads=2, feed_forward_proj="gated-gelu")), 13)












def _shapes(tensors: dict[str, torch.Tensor]) -> Shapes:
    return {k: tuple(v.shape) for k, v in tensors.items()}


# ---------------------------------------------------------------------------------------------- UNet map


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_ldm_map_round_trips_through_diffusers_converter(unets, family):
    unet = unets[family]
    ldm = _ldm_unet(unet, family)
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    original = unet.state_dict()
    assert set(back) == set(original)
    for key, value in original.items():
        assert torch.equal(back[key], value), key


def test_ldm_map_refuses_layers_outside_the_layout():
    assert unet_ldm_path("down_blocks.0.attentions.0.proj_in", "sdxl") is None  # SDXL level 0: no attention
    assert unet_ldm_path("down_blocks.3.resnets.0.conv1", "sdxl") is None
    assert unet_diffusers_path("output_blocks.2.1.conv", "sd1") == "up_blocks.0.upsamplers.0.conv"
    assert unet_diffusers_path("output_blocks.2.2.conv", "sdxl") == "up_blocks.0.upsamplers.0.conv"
    assert unet_diffusers_path("output_blocks.2.1.proj_in", "sdxl") == "up_blocks.0.attentions.2.proj_in"
    with pytest.raises(LorafuseValueError, match="sd3"):
        unet_ldm_path("conv_in", "sd3")


# ---------------------------------------------------------------------------------------------- kohya names




def _kohya_state(names: dict[str, tuple[int, ...]]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A rank-1 kohya state dict; module i's lora_up is filled with i + 1 (its fingerprint)."""
    sd: dict[str, torch.Tensor] = {}
    marks = {}
    for i, (name, shape) in enumerate(names.items()):
        tail = (1,) * (len(shape) - 2)
        sd[name + ".lora_down.weight"] = torch.ones((1, *shape[1:]))
        sd[name + ".lora_up.weight"] = torch.full((shape[0], 1, *tail), float(i + 1))
        sd[name + ".alpha"] = torch.tensor(1.0)
        marks[name] = float(i + 1)
    return sd, marks


def _module(modules: dict[str, torch.nn.Module], path: str) -> torch.nn.Module | None:
    """The submodule at `path` (a CLIP path with or without text_model.)."""
    return modules.get(path) or modules.get(path.removeprefix("text_model."))


def _lora_b_value(modules: dict[str, torch.nn.Module], path: str) -> float | None:
    """The fill value of the lora_B that diffusers injected at `path`."""
    mod = _module(modules, path)
    if mod is None or not hasattr(mod, "lora_B") or len(mod.lora_B) != 1:
        return None
    w = next(iter(mod.lora_B.values())).weight
    return float(w.flatten()[0]) if bool((w == w.flatten()[0]).all()) else None


def _injected(model: torch.nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if hasattr(m, "lora_B") and len(m.lora_B) > 0}


CASES = {  # case -> (family, UNet naming in the kohya file, text-encoder prefixes)
    "sd1": ("sd1", "diffusers", ("lora_te_",)),
    "sdxl": ("sdxl", "ldm", ("lora_te1_", "lora_te2_")),
    "sdxl-diffusers-paths": ("sdxl", "diffusers", ("lora_te1_", "lora_te2_")),  # OneTrainer-style SDXL names
}


def _full_kohya(case: str, unets, clip_l, clip_g) -> tuple[Shapes, dict[str, torch.nn.Module]]:
    """A kohya LoRA on every Linear / Conv2d of the UNet and the text encoders, and the models by component."""
    family, naming, te_prefixes = CASES[case]
    names = {_kohya_unet_name(p, family, naming): s for p, s in _layers(unets[family]).items()}
    tes = [clip_l] if family == "sd1" else [clip_l, clip_g]
    for prefix, te in zip(te_prefixes, tes):
        names.update({prefix + _hf_clip(p).replace(".", "_"): s for p, s in _layers(te).items()})
    components = {"unet": unets[family], "text_encoder": clip_l, "text_encoder_2": clip_g}
    return names, components


@pytest.mark.parametrize("case", list(CASES))
def test_to_diffusers_agrees_with_diffusers_kohya_loader(case, unets, clip_l, clip_g):
    family = CASES[case][0]
    names, components = _full_kohya(case, unets, clip_l, clip_g)
    if case == "sdxl-diffusers-paths":  # diffusers' key heuristics mangle this spelling (add.embedding.linear)
        names = {n: s for n, s in names.items() if "add_embedding" not in n}
    sd, marks = _kohya_state(names)
    fresh = {"unet": _unet(family), "text_encoder": CLIPTextModel(_clip_config()),
             "text_encoder_2": CLIPTextModelWithProjection(_clip_config())}
    mixin = StableDiffusionLoraLoaderMixin if family == "sd1" else StableDiffusionXLLoraLoaderMixin
    state, alphas = mixin.lora_state_dict(dict(sd), unet_config=fresh["unet"].config)
    mixin.load_lora_into_unet(state, alphas, fresh["unet"])
    for comp in ("text_encoder",) if family == "sd1" else ("text_encoder", "text_encoder_2"):
        mixin.load_lora_into_text_encoder(state, alphas, fresh[comp], prefix=comp)
    seen: dict[str, set[str]] = {c: set() for c in fresh}
    loaded = {c: dict(m.named_modules()) for c, m in fresh.items()}
    original = {c: dict(m.named_modules()) for c, m in components.items()}
    for name, shape in names.items():
        ((target, rows),) = to_diffusers(name, shape)
        assert rows is None
        comp, path = target.split(".", 1)
        assert _lora_b_value(loaded[comp], path) == marks[name], f"{name} -> {target}"
        assert tuple(_module(original[comp], path).weight.shape) == shape
        seen[comp].add(path)
    for comp, model in fresh.items():  # nothing injected that to_diffusers did not name
        assert {_hf_clip(p) if comp != "unet" else p for p in _injected(model)} == seen[comp], comp


@pytest.mark.parametrize("case", list(CASES))
def test_to_kohya_inverts_to_diffusers(case, unets, clip_l, clip_g):
    family, naming, _ = CASES[case]
    names, _ = _full_kohya(case, unets, clip_l, clip_g)
    diffusers = {to_diffusers(n, s)[0][0]: s for n, s in names.items()}
    assert len(diffusers) == len(names)
    back = to_kohya(diffusers, family)
    if naming == ("ldm" if family == "sdxl" else "diffusers"):  # kohya's own naming: an exact inverse
        assert back == {n: [(to_diffusers(n, s)[0][0], None)] for n, s in names.items()}
    else:  # SDXL named with diffusers paths: written back with kohya's LDM paths, same modules
        assert sorted(d for conv in back.values() for d, _ in conv) == sorted(diffusers)
        assert all(k.startswith(("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks",
                                 "lora_unet_time_embed", "lora_unet_label_emb", "lora_unet_out_", "lora_te"))
                   for k in back)
    assert guess_family(names) == family
    assert guess_family(diffusers) == family


def test_text_encoder_names(t5):
    assert to_diffusers("lora_te_text_model_encoder_layers_0_self_attn_out_proj", (8, 8)) == [
        ("text_encoder.text_model.encoder.layers.0.self_attn.out_proj", None)]
    assert to_diffusers("lora_te2_text_projection", (8, 8)) == [("text_encoder_2.text_projection", None)]
    for path, shape in _layers(t5).items():
        name = "lora_te3_" + path.replace(".", "_")
        assert to_diffusers(name, shape) == [(f"text_encoder_3.{path}", None)]
        assert to_diffusers(name, shape, family="flux") == [(f"text_encoder_2.{path}", None)]
        assert to_kohya({f"text_encoder_2.{path}": shape}, "flux") == {name: [(f"text_encoder_2.{path}", None)]}
        assert to_kohya({f"text_encoder_3.{path}": shape}, "sdxl") == {name: [(f"text_encoder_3.{path}", None)]}
    # lora_te3_ is SD3's T5 (text_encoder_3) as well as Flux's (text_encoder_2): no guess; Flux's diffusers slot is
    with pytest.raises(LorafuseValueError, match="lora_te3_ for SD3"):
        guess_family(["lora_te3_encoder_block_0_layer_0_SelfAttention_q"])
    assert guess_family(["text_encoder_2.encoder.block.0.layer.0.SelfAttention.q"]) == "flux"
    assert guess_family(["lora_te_text_model_encoder_layers_0_mlp_fc1"]) == "sd1"
    assert guess_family(["lora_te2_text_model_encoder_layers_0_mlp_fc1"]) == "sdxl"


def test_unknown_and_ambiguous_names_are_refused():
    for bad in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_z",
                "lora_unet_down_blocks_7_resnets_0_conv1", "lora_te_text_model_encoder_layers_0_mlp_fc3",
                "unet.down_blocks.0.resnets.0.conv9", "vae.decoder.conv_in"):
        with pytest.raises(UnsupportedError, match=re.escape(repr(bad))):
            to_diffusers(bad, (4, 4))
    with pytest.raises(UnsupportedError, match="SDXL"):
        to_kohya({"unet.down_blocks.0.attentions.0.proj_in": (8, 8)}, "sdxl")  # SDXL level 0 has no attention
    with pytest.raises(UnsupportedError, match="text encoder"):
        to_kohya({"text_encoder_2.text_model.encoder.layers.0.mlp.fc1": (16, 8)}, "sd1")
    with pytest.raises(LorafuseValueError, match="family"):
        to_kohya({}, "sd3")
    with pytest.raises(LorafuseValueError, match="several fit"):  # these layers exist in both layouts
        guess_family(["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"])
    with pytest.raises(LorafuseValueError, match="fit none"):  # SD1-only and SDXL-only layers together
        guess_family(["unet.down_blocks.3.resnets.0.conv1", "unet.add_embedding.linear_1"])


# ---------------------------------------------------------------------------------------------- matching




def _folder(family: str, unets, clip_l, clip_g) -> dict[str, torch.Tensor]:
    """A diffusers pipeline folder's tensors, component-prefixed (transformers 5 layout for CLIP-L)."""
    tensors = _weights(unets[family], lambda k: "unet/" + k)
    tensors.update(_weights(clip_l, lambda k: "text_encoder/" + k))
    if family == "sdxl":
        tensors.update(_weights(clip_g, lambda k: "text_encoder_2/" + k))
    return tensors




LAYOUTS = ["sd1-single", "sd2-single", "sd1-folder", "sdxl-single", "sdxl-folder", "sdxl-diffusers-paths-single"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_full_kohya_lora_finds_every_key(layout, unets, clip_l, clip_g):
    case = layout.rsplit("-", 1)[0].replace("sd2", "sd1")
    family = CASES[case][0]
    openclip = layout.startswith("sd2")
    names, components = _full_kohya(case, unets, clip_l, clip_g)
    if family == "sd1":  # a 2-D delta lands on SD1's 1x1 conv proj_in / proj_out
        names = {n: (s[:2] if n.endswith(("proj_in", "proj_out")) else s) for n, s in names.items()}
    tensors = (_folder(family, unets, clip_l, clip_g) if layout.endswith("folder")
               else _single_file(family, unets, clip_l, clip_g, openclip))
    matched, unmatched = match_modules(names, _shapes(tensors))
    ref = _reference(family, tensors, components, openclip)
    # open_clip stores text_projection transposed (x @ P): never a target
    assert unmatched == (["lora_te2_text_projection"] if layout.startswith("sdxl") and "single" in layout else [])
    assert set(matched) == set(names) - set(unmatched)
    for name, shape in names.items():
        if name in unmatched:
            continue
        ((target, rows),) = to_diffusers(name, shape)
        (t,) = matched[name]
        assert t.delta_rows is None
        lands = tensors[t.key] if t.base_rows is None else tensors[t.key][t.base_rows[0]:t.base_rows[1]]
        assert torch.equal(lands, ref[target + ".weight"]), f"{name} -> {t}"
        assert (t.base_rows is not None) == t.key.endswith(".in_proj_weight")


def test_openclip_in_proj_rows(clip_g):
    tensors = _openclip_ldm(clip_g, "conditioner.embedders.1.model.")
    modules = {f"text_encoder_2.text_model.encoder.layers.1.self_attn.{p}_proj": (HIDDEN, HIDDEN) for p in "qkvo"
               if p != "o"}
    modules["lora_te2_text_model_encoder_layers_1_self_attn_out_proj"] = (HIDDEN, HIDDEN)
    modules["lora_te2_text_projection"] = (HIDDEN, HIDDEN)  # stored transposed in open_clip: never a target
    matched, unmatched = match_modules(modules, _shapes(tensors))
    key = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    assert matched["text_encoder_2.text_model.encoder.layers.1.self_attn.q_proj"] == [Target(key, (0, HIDDEN))]
    assert matched["text_encoder_2.text_model.encoder.layers.1.self_attn.k_proj"] == [Target(key, (HIDDEN, 2 * HIDDEN))]
    assert matched["text_encoder_2.text_model.encoder.layers.1.self_attn.v_proj"] == [
        Target(key, (2 * HIDDEN, 3 * HIDDEN))]
    assert matched["lora_te2_text_model_encoder_layers_1_self_attn_out_proj"] == [
        Target("conditioner.embedders.1.model.transformer.resblocks.1.attn.out_proj.weight")]
    assert unmatched == ["lora_te2_text_projection"]


@pytest.mark.parametrize("where", ["single", "sd3-folder", "flux-folder", "bare"])
def test_t5_keys(where, t5, clip_l):
    prefix = {"single": "text_encoders.t5xxl.transformer.", "sd3-folder": "text_encoder_3/",
              "flux-folder": "text_encoder_2/", "bare": ""}[where]
    tensors = _weights(t5, lambda k: prefix + k)
    tensors.update(_weights(clip_l, lambda k: ("text_encoders.clip_l.transformer." if where == "single"
                                               else "text_encoder/" if prefix else "") + _hf_clip(k)))
    if where == "single":
        ref = {"text_encoder_3." + k: v for k, v in convert_sd3_t5_checkpoint_to_diffusers(tensors).items()}
        ref.update({"text_encoder." + k: v for k, v in convert_ldm_clip_checkpoint(
            tensors, remove_prefix="text_encoders.clip_l.transformer.").items()})
    else:
        ref = {("text_encoder_3." if where != "flux-folder" else "text_encoder_2.") + k: v
               for k, v in t5.state_dict().items()}
        ref.update({"text_encoder." + _hf_clip(k): v for k, v in clip_l.state_dict().items()})
    names = {"lora_te3_" + p.replace(".", "_"): s for p, s in _layers(t5).items()}
    names.update({"lora_te1_" + _hf_clip(p).replace(".", "_"): s for p, s in _layers(clip_l).items()})
    matched, unmatched = match_modules(names, _shapes(tensors))
    assert unmatched == []
    family = "flux" if where == "flux-folder" else None
    for name, shape in names.items():
        ((target, _),) = to_diffusers(name, shape, family=family)
        (t,) = matched[name]
        assert t.base_rows is None and torch.equal(tensors[t.key], ref[target + ".weight"]), name
        # diffusers names find the same key
        assert match_modules({target: shape}, _shapes(tensors))[0] == {target: [t]}


def test_unmatched_and_shape_mismatch(unets, clip_l, clip_g):
    keys = _shapes(_single_file("sdxl", unets, clip_l, clip_g, openclip=False))
    modules = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (16, 8),
               "lora_unet_input_blocks_1_1_proj_in": (8, 8),  # SDXL level 0 has no attention
               "lora_unet_something_else": (4, 4), "unet.down_blocks.2.attentions.0.proj_in": (16, 16),
               "lora_te3_encoder_block_0_layer_0_SelfAttention_q": (8, 8)}  # no T5 in this file
    matched, unmatched = match_modules(modules, keys)
    assert matched == {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": [
            Target("model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight")],
        "unet.down_blocks.2.attentions.0.proj_in": [Target("model.diffusion_model.input_blocks.7.1.proj_in.weight")]}
    assert unmatched == ["lora_unet_input_blocks_1_1_proj_in", "lora_unet_something_else",
                         "lora_te3_encoder_block_0_layer_0_SelfAttention_q"]
    bad = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (16, 16)}
    with pytest.raises(ShapeMismatchError, match=r"attn2_to_k.*\(16, 16\).*attn2\.to_k\.weight.*\(16, 8\)"):
        match_modules(bad, keys)
    bad = {"lora_te2_text_model_encoder_layers_0_self_attn_v_proj": (HIDDEN, 4)}
    with pytest.raises(ShapeMismatchError, match=r"\(8, 4\).*in_proj_weight.*\(24, 8\).*rows 16:24"):
        match_modules(bad, keys)
    conv = {"lora_unet_input_blocks_1_0_in_layers_2": (8, 8)}  # a 3x3 conv is not a 2-D delta
    with pytest.raises(ShapeMismatchError, match=r"\(8, 8, 3, 3\)"):
        match_modules(conv, keys)


def test_two_checkpoints_in_one_key_set_are_ambiguous(unets):
    keys = _shapes({**_weights(unets["sd1"], lambda k: "unet/" + k), **_weights(unets["sd1"])})
    with pytest.raises(UnsupportedError, match="several base keys"):
        match_modules({"lora_unet_conv_in": (8, 4, 3, 3)}, keys)


def test_flux_modules_are_delegated(monkeypatch, t5):
    """Flux transformer names go to flux_keys (a stand-in here); Flux's text encoders stay with sd_keys."""
    calls: list[tuple[str, object]] = []
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    split = [(f"transformer.transformer_blocks.0.attn.to_{p}", (4 * i, 4 * i + 4)) for i, p in enumerate("qkv")]

    def match(modules, keys):
        calls.append(("match", dict(modules)))
        return {qkv: [Target(f"transformer/{n[len('transformer.'):]}.weight", None, r) for n, r in split]}, []

    fake = SimpleNamespace(
        is_flux_module=lambda name: "double_blocks" in name or name.startswith("transformer."),
        is_flux_own_name=lambda name: "double_blocks" in name,
        to_diffusers=lambda module, shape: calls.append(("to_diffusers", module)) or split,
        to_kohya=lambda modules, family: calls.append(("to_kohya", dict(modules))) or {qkv: split},
        match_modules=match)
    monkeypatch.setattr(sd_keys, "_flux", lambda: fake)
    t5_q = "encoder.block.0.layer.0.SelfAttention.q"
    keys = {f"text_encoder_2/{t5_q}.weight": (8, 8), "transformer/transformer_blocks.0.attn.to_q.weight": (4, 8)}
    modules = {qkv: (12, 8), "lora_te3_" + t5_q.replace(".", "_"): (8, 8)}
    matched, unmatched = match_modules(modules, keys)
    assert calls == [("match", {qkv: (12, 8)})] and unmatched == []
    assert matched["lora_te3_" + t5_q.replace(".", "_")] == [Target(f"text_encoder_2/{t5_q}.weight")]
    assert len(matched[qkv]) == 3
    assert to_diffusers(qkv, (12, 8)) == split
    diffusers = {n: (4, 8) for n, _ in split} | {f"text_encoder_2.{t5_q}": (8, 8)}
    assert to_kohya(diffusers, "flux") == {qkv: split, "lora_te3_" + t5_q.replace(".", "_"): [
        (f"text_encoder_2.{t5_q}", None)]}
    assert guess_family([qkv, "lora_te1_text_model_encoder_layers_0_mlp_fc1"]) == "flux"
    with pytest.raises(UnsupportedError, match="Flux"):
        to_kohya(diffusers, "sdxl")
