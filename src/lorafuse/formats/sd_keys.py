"""Module names and base keys of Stable Diffusion 1.x / 2.x, SDXL and their text encoders.

Three naming schemes meet here:

* kohya names: `lora_unet_<path with _>`, `lora_te_` (SD 1.x/2.x text encoder), `lora_te1_` (CLIP-L of
  SDXL, SD3 and Flux), `lora_te2_` (OpenCLIP-G of SDXL, CLIP-G of SD3), `lora_te3_` (T5-XXL of SD3 and
  Flux). kohya's SD 1.x UNet uses diffusers paths (`down_blocks_0_attentions_0_...`); its SDXL UNet is
  the LDM/SGM one (`input_blocks_4_1_...`). Text-encoder paths are transformers' (`text_model_encoder_
  layers_0_self_attn_q_proj`, `encoder_block_0_layer_0_SelfAttention_q`).
* diffusers / PEFT names with a component prefix: `unet.down_blocks.0...`, `text_encoder.text_model...`,
  `text_encoder_2...` (OpenCLIP-G / CLIP-G, or T5 in a Flux pipeline), `text_encoder_3...` (T5 in SD3).
* checkpoint keys: LDM single files (`model.diffusion_model.input_blocks...`, `cond_stage_model.
  transformer...` (CLIP-L), `cond_stage_model.model...` (OpenCLIP-H, SD 2.x), `conditioner.embedders.0.
  transformer...` / `.1.model...` (SDXL)), ComfyUI / SD3 single files (`text_encoders.clip_l.
  transformer...`, `.clip_g.`, `.t5xxl.`), diffusers pipeline folders (`unet/...`, `text_encoder/...`)
  and bare component files (`down_blocks...`, `input_blocks...`, `text_model...`, `encoder.block...`).

Every module and key is reduced to a canonical pair (slot, path): slot is `unet`, `te1` (the first or
only CLIP), `te2` (the second CLIP) or `te3` (T5); path is the diffusers UNet path or transformers'
text-encoder path. OpenCLIP's fused `attn.in_proj_weight` gives q/k/v thirds (Target.base_rows); its
`text_projection` is stored transposed and is never a target.

The UNet's diffusers <-> LDM map is generated from a structure table (levels, which of them have
attention, layers per block, SDXL's added embedding) in `UNET_LAYOUTS`, block by block, plus sub-name
tables for the inside of a ResNet block, a down/upsampler and the top-level layers; attention blocks keep
the same inner paths in both namings.

kohya names are never split on `_` by guesswork. With checkpoint keys (`match_modules`), every key's
module is written in its kohya form(s) and kohya names are looked up in that index. Without keys
(`to_diffusers`, `guess_family`), a name is cut into path components with a table of the multi-word
components of these models (`down_blocks`, `to_q`, `self_attn`, `wi_0`, ...; longest match first), and the
result must then pass a grammar of the model's module paths, or the name is refused.

Flux transformer modules are delegated to `lorafuse.formats.flux_keys` (imported lazily; absent, they
are simply not recognised).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType

from lorafuse.errors import AdapterNote, LorafuseValueError, ShapeMismatchError, UnsupportedError, warn
from lorafuse.formats.targets import Target

Rows = tuple[int, int] | None
Conversion = list[tuple[str, Rows]]

# --------------------------------------------------------------------------------------------------
# UNet structure


@dataclass(frozen=True)
class UnetLayout:
    """The block structure of a Stable Diffusion UNet, enough to name every layer both ways."""

    attention: tuple[bool, ...]  # per down level (highest resolution first): has transformer blocks
    layers_per_block: int  # ResNet blocks per down level (up levels have one more)
    add_embedding: bool  # SDXL's added text/time conditioning MLP (LDM `label_emb`)


UNET_LAYOUTS: dict[str, UnetLayout] = {
    # SD 1.x and 2.x: 4 levels (channel mults 1, 2, 4, 4), cross-attention on the first three.
    "sd1": UnetLayout(attention=(True, True, True, False), layers_per_block=2, add_embedding=False),
    # SDXL: 3 levels (channel mults 1, 2, 4), no attention on the first, transformer depth 2 and 10.
    "sdxl": UnetLayout(attention=(False, True, True), layers_per_block=2, add_embedding=True),
}

# Inside a block: diffusers sub-path -> LDM sub-path, per block kind. None: the same path in both.
_BLOCK_SUBNAMES: dict[str, dict[str, str] | None] = {
    "resnet": {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"},
    "downsampler": {"conv": "op"},
    "upsampler": {"conv": "conv"},
    "leaf": {"": ""},
    "attention": None,
}
# Inner paths of a diffusers Transformer2DModel block (checked only when converting names without keys).
_ATTENTION_PATH = re.compile(r"(norm|proj_in|proj_out|transformer_blocks\.\d+\.(norm[123]|"
                             r"attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))")
# Layers outside the down/mid/up blocks: diffusers path -> LDM path.
_TOP_LEVEL = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_ADD_EMBEDDING = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_MID_BLOCK = (("mid_block.resnets.0", "middle_block.0", "resnet"),
              ("mid_block.attentions.0", "middle_block.1", "attention"),
              ("mid_block.resnets.1", "middle_block.2", "resnet"))
_DIFFUSERS_ROOTS = frozenset({"down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "conv_norm_out",
                              "time_embedding", "add_embedding"})
_LDM_ROOTS = frozenset({"input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out"})
_MAX_BLOCK_DEPTH = 4  # components of the longest block prefix (down_blocks.0.resnets.1)


def _unet_blocks(layout: UnetLayout) -> Iterator[tuple[str, str, str]]:
    """(diffusers block prefix, LDM block prefix, kind) for every block of the layout."""
    per = layout.layers_per_block
    levels = len(layout.attention)
    for diffusers, ldm in _TOP_LEVEL.items():
        yield diffusers, ldm, "leaf"
    if layout.add_embedding:
        for diffusers, ldm in _ADD_EMBEDDING.items():
            yield diffusers, ldm, "leaf"
    for level, attn in enumerate(layout.attention):
        for j in range(per):
            i = 1 + level * (per + 1) + j
            yield f"down_blocks.{level}.resnets.{j}", f"input_blocks.{i}.0", "resnet"
            if attn:
                yield f"down_blocks.{level}.attentions.{j}", f"input_blocks.{i}.1", "attention"
        if level < levels - 1:
            yield f"down_blocks.{level}.downsamplers.0", f"input_blocks.{1 + level * (per + 1) + per}.0", "downsampler"
    yield from _MID_BLOCK
    for up, attn in enumerate(reversed(layout.attention)):
        for j in range(per + 1):
            i = up * (per + 1) + j
            yield f"up_blocks.{up}.resnets.{j}", f"output_blocks.{i}.0", "resnet"
            if attn:
                yield f"up_blocks.{up}.attentions.{j}", f"output_blocks.{i}.1", "attention"
        if up < levels - 1:  # after the last ResNet block (and its attention, if any)
            ldm = f"output_blocks.{up * (per + 1) + per}.{2 if attn else 1}"
            yield f"up_blocks.{up}.upsamplers.0", ldm, "upsampler"


def _split_block(path: str, blocks: Container[str]) -> tuple[str, str] | None:
    """(block prefix, rest) for the longest prefix of `path` (whole components) that is in `blocks`."""
    parts = path.split(".")
    for n in range(min(_MAX_BLOCK_DEPTH, len(parts)), 0, -1):
        head = ".".join(parts[:n])
        if head in blocks:
            return head, ".".join(parts[n:])
    return None


def _map_sub(kind: str, rest: str, to_ldm: bool, strict: bool) -> str | None:
    table = _BLOCK_SUBNAMES[kind]
    if table is None:  # attention: same inner path
        return rest if rest and (not strict or _ATTENTION_PATH.fullmatch(rest)) else None
    if not to_ldm:
        table = {v: k for k, v in table.items()}
    return table.get(rest)


class UnetMap:
    """diffusers <-> LDM module paths of one UNet layout (paths without `.weight`)."""

    def __init__(self, layout: UnetLayout) -> None:
        blocks = list(_unet_blocks(layout))
        self.to_ldm_blocks = {d: (ldm, kind) for d, ldm, kind in blocks}
        self.to_diffusers_blocks = {ldm: (d, kind) for d, ldm, kind in blocks}

    def ldm(self, path: str, strict: bool = False) -> str | None:
        """The LDM path of a diffusers UNet path (`down_blocks.1.resnets.0.conv1` -> `input_blocks.4.0.in_layers.2`)."""
        return self._convert(path, self.to_ldm_blocks, True, strict)

    def diffusers(self, path: str, strict: bool = False) -> str | None:
        """The diffusers path of an LDM UNet path; None when the layout has no such layer."""
        return self._convert(path, self.to_diffusers_blocks, False, strict)

    @staticmethod
    def _convert(path: str, blocks: Mapping[str, tuple[str, str]], to_ldm: bool, strict: bool) -> str | None:
        found = _split_block(path, blocks)
        if found is None:
            return None
        head, rest = found
        other, kind = blocks[head]
        sub = _map_sub(kind, rest, to_ldm, strict)
        if sub is None:
            return None
        return f"{other}.{sub}" if sub else other


_UNET_MAPS: dict[str, UnetMap] = {family: UnetMap(layout) for family, layout in UNET_LAYOUTS.items()}


def unet_ldm_path(path: str, family: str) -> str | None:
    """The LDM/SGM path of a diffusers UNet module path for `family` ("sd1" or "sdxl"), or None."""
    return _unet_map(family).ldm(path)


def unet_diffusers_path(path: str, family: str) -> str | None:
    """The diffusers path of an LDM/SGM UNet module path for `family` ("sd1" or "sdxl"), or None."""
    return _unet_map(family).diffusers(path)


def _unet_map(family: str) -> UnetMap:
    try:
        return _UNET_MAPS[family]
    except KeyError:
        raise LorafuseValueError(f"unknown UNet family {family!r}; expected one of {sorted(_UNET_MAPS)}") from None


def _layout_of_blocks(heads: set[str], ldm: bool) -> str | None:
    """The family whose layout has every observed block prefix; the smallest such layout on a tie."""
    fits = [(len(m.to_ldm_blocks), family) for family, m in _UNET_MAPS.items()
            if heads <= (m.to_diffusers_blocks.keys() if ldm else m.to_ldm_blocks.keys())]
    return min(fits)[1] if fits else None


# --------------------------------------------------------------------------------------------------
# Text encoders

# OpenCLIP (LDM single files) -> transformers CLIP, inside `transformer.resblocks.N.` / `text_model.encoder.layers.N.`.
_OPENCLIP_LAYER = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                   "ln_1": "layer_norm1", "ln_2": "layer_norm2"}
_OPENCLIP_FUSED = {"attn.in_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}
_OPENCLIP_TOP = {"token_embedding": "text_model.embeddings.token_embedding", "ln_final": "text_model.final_layer_norm"}
_OPENCLIP_LAYERS = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")

_CLIP_PATH = re.compile(r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12]|"
                        r"layer_norm[12])|text_model\.(embeddings\.(token|position)_embedding|final_layer_norm)|"
                        r"text_projection")
_T5_PATH = re.compile(r"encoder\.block\.\d+\.layer\.0\.(SelfAttention\.(q|k|v|o|relative_attention_bias)|"
                      r"layer_norm)|encoder\.block\.\d+\.layer\.1\.(DenseReluDense\.(wi|wi_0|wi_1|wo)|layer_norm)|"
                      r"encoder\.(final_layer_norm|embed_tokens)|shared")

# --------------------------------------------------------------------------------------------------
# Slots, prefixes and tokens

_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "te1", "lora_te1_": "te1", "lora_te2_": "te2",
                   "lora_te3_": "te3"}
_KOHYA_PREFIX_RE = re.compile(r"lora_(unet|te[123]?)_")
# Multi-word path components, per slot: kohya names are cut into components with these (longest first).
_WORDS: dict[str, frozenset[str]] = {
    "unet": frozenset({
        "down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block",
        "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in", "proj_out", "conv_in", "conv_out",
        "conv_norm_out", "conv_shortcut", "time_emb_proj", "time_embedding", "linear_1", "linear_2",
        "add_embedding", "time_embed", "label_emb", "in_layers", "out_layers", "emb_layers", "skip_connection"}),
    "clip": frozenset({
        "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "layer_norm1", "layer_norm2",
        "final_layer_norm", "token_embedding", "position_embedding", "text_projection"}),
    "t5": frozenset({"wi_0", "wi_1", "layer_norm", "final_layer_norm", "relative_attention_bias", "embed_tokens"}),
}
_SLOT_WORDS = {"unet": "unet", "te1": "clip", "te2": "clip", "te3": "t5"}
_MAX_WORD_PARTS = 3

# What a module path (after any prefix) is, by its first one or two components.
_ROOTS_2 = {"encoder.block": "t5", "encoder.final_layer_norm": "t5", "encoder.embed_tokens": "t5",
            "encoder.layers": "clip", "transformer.resblocks": "openclip"}
_ROOTS_1 = {**{r: "diffusers" for r in _DIFFUSERS_ROOTS}, **{r: "ldm" for r in _LDM_ROOTS},
            "text_model": "clip", "text_projection": "clip", "embeddings": "clip", "final_layer_norm": "clip",
            "shared": "t5", "token_embedding": "openclip", "ln_final": "openclip"}
# Checkpoint key prefix -> {layout of what follows -> slot}. "" is a bare component file.
_KEY_PREFIXES: dict[str, dict[str, str]] = {
    "model.diffusion_model.": {"ldm": "unet"},
    "unet/": {"diffusers": "unet"},
    "cond_stage_model.transformer.": {"clip": "te1"},
    "cond_stage_model.model.": {"openclip": "te1"},
    "conditioner.embedders.0.transformer.": {"clip": "te1"},
    "conditioner.embedders.0.model.": {"openclip": "te2"},  # SDXL refiner: OpenCLIP-G only
    "conditioner.embedders.1.model.": {"openclip": "te2"},
    "text_encoders.clip_l.transformer.": {"clip": "te1"},
    "text_encoders.clip_g.transformer.": {"clip": "te2"},
    "text_encoders.t5xxl.transformer.": {"t5": "te3"},
    "text_encoder/": {"clip": "te1"},
    "text_encoder_2/": {"clip": "te2", "t5": "te3"},
    "text_encoder_3/": {"t5": "te3"},
    "": {"ldm": "unet", "diffusers": "unet", "clip": "te1", "t5": "te3"},
}
_PREFIX_ORDER = sorted(_KEY_PREFIXES, key=len, reverse=True)
# diffusers component prefix of a module name -> {layout -> slot}.
_COMPONENTS: dict[str, dict[str, str]] = {
    "unet.": {"diffusers": "unet"},
    "text_encoder.": {"clip": "te1"},
    "text_encoder_2.": {"clip": "te2", "t5": "te3"},
    "text_encoder_3.": {"t5": "te3"},
}
_TE_NAME_PREFIXES = ("lora_te", "text_encoder")
_FAMILIES = ("sd1", "sdxl", "flux")


def _root_kind(path: str) -> str | None:
    parts = path.split(".", 2)
    return _ROOTS_2.get(".".join(parts[:2])) or _ROOTS_1.get(parts[0])


def _clip_path(path: str) -> str:
    """transformers' CLIP path with its `text_model.` (transformers 5 drops it from CLIPTextModel)."""
    return path if path.startswith(("text_model.", "text_projection")) else "text_model." + path


def _clip_short(path: str) -> str:
    return path[len("text_model."):] if path.startswith("text_model.") else path


def _tokenize(rest: str, words: frozenset[str]) -> str:
    """A kohya path (`down_blocks_0_attentions_0_proj_in`) as a dotted path, joining multi-word components."""
    atoms = rest.split("_")
    out: list[str] = []
    i = 0
    while i < len(atoms):
        for n in range(min(_MAX_WORD_PARTS, len(atoms) - i), 0, -1):
            word = "_".join(atoms[i:i + n])
            if n == 1 or word in words:
                out.append(word)
                i += n
                break
    return ".".join(out)


@functools.lru_cache(maxsize=1)
def _flux() -> ModuleType | None:
    """lorafuse.formats.flux_keys when it exists (its import errors are not hidden)."""
    if importlib.util.find_spec("lorafuse.formats.flux_keys") is None:
        return None
    return importlib.import_module("lorafuse.formats.flux_keys")


def _is_flux(name: str) -> bool:
    if name.startswith(_TE_NAME_PREFIXES):
        return False
    flux = _flux()
    return bool(flux is not None and flux.is_flux_module(name))


# --------------------------------------------------------------------------------------------------
# Names without keys


@dataclass(frozen=True)
class _Parsed:
    slot: str
    path: str  # diffusers UNet path or transformers text-encoder path (LDM UNet paths already converted)
    ldm: str | None = None  # the LDM path the name was written with, when it was


def _parse_kohya(module: str) -> _Parsed | None:
    m = _KOHYA_PREFIX_RE.match(module)
    if m is None:
        return None
    slot = _KOHYA_PREFIXES[m.group(0)]
    path = _tokenize(module[m.end():], _WORDS[_SLOT_WORDS[slot]])
    return _checked(slot, path)


def _split_diffusers(module: str) -> tuple[str, str] | None:
    """(slot, path) of a component-prefixed diffusers module name, without checking the path."""
    for prefix, slots in _COMPONENTS.items():
        if module.startswith(prefix):
            path = module[len(prefix):]
            slot = slots.get(_root_kind(path) or "")
            if slot is None:
                return None
            return slot, (path if slot in ("unet", "te3") else _clip_path(path))
    return None


def _parse_diffusers(module: str) -> _Parsed | None:
    found = _split_diffusers(module)
    return None if found is None else _checked(*found)


def _checked(slot: str, path: str) -> _Parsed | None:
    """The parsed name when `path` is a layer of the slot's models (LDM UNet paths read as SDXL, then SD1)."""
    if slot == "te3":
        return _Parsed(slot, path) if _T5_PATH.fullmatch(path) else None
    if slot != "unet":
        path = _clip_path(path)
        return _Parsed(slot, path) if _CLIP_PATH.fullmatch(path) else None
    if _root_kind(path) == "ldm":
        for family in ("sdxl", "sd1"):  # kohya's LDM-named UNet is SDXL's
            converted = _UNET_MAPS[family].diffusers(path, strict=True)
            if converted is not None:
                return _Parsed(slot, converted, ldm=path)
        return None
    known = any(m.ldm(path, strict=True) is not None for m in _UNET_MAPS.values())
    return _Parsed(slot, path) if known else None


def _parse_any(module: str) -> _Parsed | None:
    """A kohya (lora_...) or diffusers module name's slot and path, None for a name that is no known layer."""
    return _parse_kohya(module) if module.startswith("lora_") else _parse_diffusers(module)


def model_part(module: str) -> str | None:
    """What a kohya or diffusers module name is a layer of: 'flux' (a Flux transformer), 'unet' (an SD 1.x/2.x
    or SDXL UNet) or 'text' (a text encoder); None for a name that is no known layer."""
    if _is_flux(module):
        return "flux"
    parsed = _parse_any(module)
    return None if parsed is None else "unet" if parsed.slot == "unet" else "text"


def _parse(module: str) -> _Parsed:
    parsed = _parse_any(module)
    if parsed is None:
        raise UnsupportedError(f"module {module!r} is not a layer of an SD 1.x/2.x or SDXL UNet or of a "
                               "CLIP / OpenCLIP / T5 text encoder that lorafuse knows")
    return parsed


def _component(slot: str, family: str | None) -> str:
    if slot == "te3":
        return "text_encoder_2" if family == "flux" else "text_encoder_3"
    return {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}[slot]


def to_diffusers(module: str, shape: tuple[int, ...], *, family: str | None = None) -> Conversion:
    """The diffusers module name (component-prefixed) of a kohya or diffusers module name, with the rows of
    its delta it takes (always all rows here; Flux's fused modules give several entries).

    T5 (`lora_te3_`) goes to `text_encoder_3` (SD3) unless `family` is "flux" (`text_encoder_2`).
    Raises UnsupportedError for a name that is not a known layer, or a text encoder `family` has not (to_kohya's
    rule: a second CLIP, `lora_te2_`, is SDXL's; SD 1.x has no T5)."""
    if _is_flux(module):
        flux = _flux()
        assert flux is not None
        return list(flux.to_diffusers(module, shape))
    parsed = _parse(module)
    _check_text_encoder(module, parsed.slot, family)
    return [(f"{_component(parsed.slot, family)}.{parsed.path}", None)]


def _check_text_encoder(module: str, slot: str, family: str | None) -> None:
    """Refuse a text-encoder module of a slot `family`'s pipeline has not (None: any family)."""
    if family is not None and ((slot == "te2" and family != "sdxl") or (slot == "te3" and family == "sd1")):
        what = "a second CLIP text encoder (SDXL's CLIP-G)" if slot == "te2" else "a T5 text encoder"
        raise UnsupportedError(f"module {module!r} is a layer of {what}, and family {family!r} has no such text "
                               "encoder: its pipeline would load it nowhere")


def to_kohya(modules: Mapping[str, tuple[int, ...]], family: str) -> dict[str, Conversion]:
    """kohya module name -> the diffusers modules it is made of (with the rows of the kohya delta each
    fills), for diffusers-named modules. sd1: `lora_unet_` + diffusers path, `lora_te_`; sdxl: `lora_unet_`
    + LDM path, `lora_te1_` / `lora_te2_`; flux: Flux transformer names from flux_keys, `lora_te1_`; T5
    (text_encoder_3, or Flux's text_encoder_2) is `lora_te3_` for sdxl and flux. Raises UnsupportedError for
    a module the family has no kohya name for, LorafuseValueError for an unknown family."""
    if family not in _FAMILIES:
        raise LorafuseValueError(f"unknown family {family!r}; expected one of {', '.join(_FAMILIES)}")
    out: dict[str, Conversion] = {}
    flux_modules = {m: s for m, s in modules.items() if _is_flux(m)}
    if flux_modules:
        flux = _flux()
        if family != "flux" or flux is None:
            raise UnsupportedError(f"Flux module {next(iter(flux_modules))!r} cannot be named for family {family!r}")
        out.update(flux.to_kohya(flux_modules, family))
    for module in modules:
        if module in flux_modules:
            continue
        name = _kohya_name(module, family)
        if name in out:
            raise UnsupportedError(f"modules {out[name][0][0]!r} and {module!r} both have the kohya name {name!r}")
        out[name] = [(module, None)]
    return out


def _kohya_name(module: str, family: str) -> str:
    parsed = _parse_diffusers(module)
    if parsed is None:
        raise UnsupportedError(f"module {module!r} is not a diffusers module name (unet., text_encoder., "
                               "text_encoder_2., text_encoder_3. + a known layer)")
    path = parsed.path
    if parsed.slot == "unet":
        if family == "flux":
            raise UnsupportedError(f"module {module!r} is a UNet layer; family 'flux' has none")
        if family == "sdxl":
            ldm = _UNET_MAPS["sdxl"].ldm(path, strict=True)
            if ldm is None:
                raise UnsupportedError(f"module {module!r} is not a layer of the SDXL UNet")
            path = ldm
        elif _UNET_MAPS["sd1"].ldm(path, strict=True) is None:
            raise UnsupportedError(f"module {module!r} is not a layer of the SD 1.x/2.x UNet")
        return "lora_unet_" + path.replace(".", "_")
    prefix = {"te1": "lora_te_" if family == "sd1" else "lora_te1_", "te2": "lora_te2_", "te3": "lora_te3_"}
    if (parsed.slot == "te2" and family != "sdxl") or (parsed.slot == "te3" and family == "sd1"):
        raise UnsupportedError(f"module {module!r}: family {family!r} has no such text encoder")
    return prefix[parsed.slot] + path.replace(".", "_")


def guess_family(names: Iterable[str]) -> str:
    """"sd1", "sdxl" or "flux" for a set of module names (kohya or diffusers), from names that one family alone
    has: Flux if any name is a Flux transformer layer in Flux's own naming (kohya / BFL / ComfyUI,
    `flux_keys.is_flux_own_name`); else the UNet layouts that have every UNet layer named (SDXL when both do and
    the names are LDM ones, as kohya writes SDXL, or when the text encoders say so); else the text encoders
    (`lora_te_` -> sd1, `lora_te1_` / `lora_te2_` / a second CLIP -> sdxl, a T5 as `text_encoder_2` -> flux).
    Names that are no known layer are ignored. Raises LorafuseValueError when the names fit no family or
    several, and when the guess would rest on names Flux shares with other models: its diffusers names
    (`transformer.transformer_blocks.0.attn.to_q` is SD3's, QwenImage's, HunyuanVideo's too) or a kohya T5
    (`lora_te3_`: SD3's text_encoder_3 or Flux's text_encoder_2)."""
    layouts = set(_UNET_MAPS)
    saw_unet = saw_ldm = False
    votes: set[str] = set()
    shared: str | None = None  # the first name that Flux shares with another model
    for name in names:
        if _is_flux(name):
            flux = _flux()
            assert flux is not None
            if flux.is_flux_own_name(name):
                return "flux"
            shared = shared or name
            continue
        parsed = _parse_any(name)
        if parsed is None:
            continue
        if parsed.slot == "unet":
            saw_unet = True
            saw_ldm |= parsed.ldm is not None
            layouts &= {f for f, m in _UNET_MAPS.items() if _fits(m, parsed)}
        elif parsed.slot == "te3" and name.startswith("lora_te3_"):
            shared = shared or name
        elif (vote := _te_vote(name, parsed.slot)) is not None:
            votes.add(vote)
    candidates = layouts if saw_unet else votes
    if len(candidates) > 1 and saw_ldm:
        candidates &= {"sdxl"}  # kohya names its SDXL UNet with LDM paths, its SD1 UNet with diffusers ones
    if len(candidates) > 1 and votes:
        candidates &= votes
    if len(candidates) == 1 and (shared is None or candidates == {"flux"}):
        return candidates.pop()
    if shared is not None:
        raise _shared_name_error(shared)
    why = "several fit: " + ", ".join(sorted(candidates)) if candidates else "they fit none"
    options = " or ".join(f"--family {f}" for f in sorted(candidates))
    advice = f"name it: {options} (Python: family=...)" if candidates else "name it with --family if it is one of them"
    raise LorafuseValueError(f"cannot tell the model family (sd1, sdxl, flux) from the module names: {why}; "
                             f"{advice} (lorafuse knows the layers of SD 1.x/2.x, SDXL, Flux and their text "
                             "encoders, not SD3's lora_unet_joint_blocks_..., QwenImage's, ...)")


def _shared_name_error(name: str) -> LorafuseValueError:
    """The refusal to guess a family from `name`, a name that Flux shares with other models."""
    if name.startswith("lora_te3_"):
        what = (f"{name!r} is a T5 layer, which kohya names lora_te3_ for SD3 (diffusers text_encoder_3) and for Flux "
                "(text_encoder_2)")
    else:
        what = (f"{name!r} is a diffusers name that Flux shares with SD3, QwenImage, HunyuanVideo and other "
                "diffusers transformers (transformer_blocks.N.attn.to_q, single_transformer_blocks.N.proj_mlp, "
                "x_embedder, ...), and lorafuse knows the kohya names of Flux only (lora_unet_double_blocks_...; "
                "not SD3's lora_unet_joint_blocks_..., nor QwenImage's)")
    return LorafuseValueError(f"cannot tell Flux from other models by the module names: {what}; if it is a Flux "
                              "LoRA, name the family: --family flux (Python: family='flux')")


def unet_misfit(names: Iterable[str], family: str) -> str | None:
    """The first UNet module name (kohya or diffusers) that is no layer of `family`'s UNet ("sd1", "sdxl"), or
    None (names that are no known layer, Flux's and the text encoders' are not looked at)."""
    m = _UNET_MAPS[family]
    for name in names:
        if _is_flux(name):
            continue
        parsed = _parse_any(name)
        if parsed is not None and parsed.slot == "unet" and not _fits(m, parsed):
            return name
    return None


def _fits(m: UnetMap, parsed: _Parsed) -> bool:
    if parsed.ldm is not None:
        return m.diffusers(parsed.ldm, strict=True) == parsed.path
    return m.ldm(parsed.path, strict=True) is not None


def _te_vote(name: str, slot: str) -> str | None:
    """The family a text-encoder name points to, if it points to one (a T5: Flux's as text_encoder_2 only;
    text_encoder_3 is SD3's, lora_te3_ SD3's or Flux's)."""
    if slot == "te3":
        return "flux" if name.startswith("text_encoder_2.") else None
    if slot == "te2" or name.startswith("lora_te1_"):
        return "sdxl"
    return "sd1" if name.startswith("lora_te_") else None


# --------------------------------------------------------------------------------------------------
# Matching modules to checkpoint keys


@dataclass(frozen=True)
class _Hit:
    key: str
    rows: Rows


class _KeyIndex:
    """Every weight of a checkpoint under its canonical (slot, path) and under its kohya names."""

    def __init__(self, keys: Mapping[str, tuple[int, ...]]) -> None:
        self.keys = keys
        self.by_path: dict[tuple[str, str], list[_Hit]] = {}
        self.by_kohya: dict[tuple[str, str], list[_Hit]] = {}
        unet: dict[tuple[str, str], list[tuple[str, str]]] = {}  # (prefix, ldm|diffusers) -> [(path, key)]
        for key, shape in keys.items():
            found = _classify_key(key)
            if found is None:
                continue
            prefix, kind, slot, path = found
            if slot == "unet":
                unet.setdefault((prefix, kind), []).append((path, key))
            elif kind == "openclip":
                self._add_openclip(slot, path, key, shape)
            elif kind == "clip":
                clip = _clip_path(path)
                self._add(slot, clip, _Hit(key, None), (clip, _clip_short(clip)))
            else:
                self._add(slot, path, _Hit(key, None), (path,))
        for (_, kind), entries in unet.items():
            self._add_unet(kind, entries)

    def _add(self, slot: str, path: str | None, hit: _Hit, kohya_paths: Iterable[str]) -> None:
        """Index `hit` under its canonical path (None: it has none) and under the kohya forms of `kohya_paths`."""
        if path is not None:
            self.by_path.setdefault((slot, path), []).append(hit)
        for p in set(kohya_paths):
            self.by_kohya.setdefault((slot, p.replace(".", "_")), []).append(hit)

    def _add_unet(self, kind: str, entries: list[tuple[str, str]]) -> None:
        ldm = kind == "ldm"
        heads = {h[0] for path, _ in entries if (h := _split_block(path, _ALL_BLOCKS[kind])) is not None}
        family = _layout_of_blocks(heads, ldm)
        m = _UNET_MAPS[family] if family else None
        for path, key in entries:
            other = None if m is None else (m.diffusers(path) if ldm else m.ldm(path))
            # an LDM layer that no layout places is reachable by its own (kohya) name only
            self._add("unet", other if ldm else path, _Hit(key, None), [p for p in (path, other) if p])

    def _add_openclip(self, slot: str, path: str, key: str, shape: tuple[int, ...]) -> None:
        if path in _OPENCLIP_TOP:
            clip = _OPENCLIP_TOP[path]
            self._add(slot, clip, _Hit(key, None), (clip, _clip_short(clip)))
            return
        m = _OPENCLIP_LAYERS.fullmatch(path)
        if m is None:
            return
        layer, sub = m.groups()
        base = f"text_model.encoder.layers.{layer}."
        if sub in _OPENCLIP_LAYER:
            clip = base + _OPENCLIP_LAYER[sub]
            self._add(slot, clip, _Hit(key, None), (clip, _clip_short(clip)))
        elif sub in _OPENCLIP_FUSED and shape and shape[0] % len(_OPENCLIP_FUSED[sub]) == 0:
            parts = _OPENCLIP_FUSED[sub]
            n = shape[0] // len(parts)
            for i, part in enumerate(parts):
                clip = base + part
                self._add(slot, clip, _Hit(key, (i * n, (i + 1) * n)), (clip, _clip_short(clip)))

    def lookup(self, module: str) -> list[_Hit] | None:
        if module + ".weight" in self.keys:
            return [_Hit(module + ".weight", None)]
        m = _KOHYA_PREFIX_RE.match(module)
        if m is not None:
            return self.by_kohya.get((_KOHYA_PREFIXES[m.group(0)], module[m.end():]))
        found = _split_diffusers(module)
        return None if found is None else self.by_path.get(found)


_ALL_BLOCKS: dict[str, set[str]] = {
    "diffusers": set().union(*(m.to_ldm_blocks for m in _UNET_MAPS.values())),
    "ldm": set().union(*(m.to_diffusers_blocks for m in _UNET_MAPS.values())),
}


def _classify_key(key: str) -> tuple[str, str, str, str] | None:
    """(prefix, layout, slot, module path) of a weight key, or None for anything that is not one."""
    if key.endswith(".weight"):
        module = key[: -len(".weight")]
    elif key.endswith(".in_proj_weight"):
        module = key[: -len("_weight")]
    else:
        return None
    for prefix in _PREFIX_ORDER:
        if module.startswith(prefix):
            path = module[len(prefix):]
            kind = _root_kind(path)
            slot = _KEY_PREFIXES[prefix].get(kind or "")
            return (prefix, kind, slot, path) if kind and slot else None
    return None  # pragma: no cover  ("" matches every key)


def _fits_shape(delta: tuple[int, ...], base: tuple[int, ...]) -> bool:
    """Same shape, or a 2-D delta and a 1x1 conv weight (either way round)."""
    if tuple(delta) == tuple(base):
        return True
    pair = sorted((tuple(delta), tuple(base)), key=len)
    return len(pair[0]) == 2 and len(pair[1]) == 4 and pair[1][:2] == pair[0] and pair[1][2:] == (1, 1)


def _target(module: str, shape: tuple[int, ...], hit: _Hit, base: tuple[int, ...]) -> Target:
    lands = base if hit.rows is None else (hit.rows[1] - hit.rows[0], *base[1:])
    if not _fits_shape(shape, lands):
        where = "" if hit.rows is None else f" (rows {hit.rows[0]}:{hit.rows[1]}, shape {lands})"
        raise ShapeMismatchError(f"module {module!r} has delta shape {tuple(shape)} but its base weight "
                                 f"{hit.key!r} has shape {tuple(base)}{where}")
    return Target(hit.key, hit.rows)


def match_modules(modules: Mapping[str, tuple[int, ...]],
                  keys: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, list[Target]], list[str]]:
    """Every module (kohya or diffusers name) -> its targets among `keys` (checkpoint tensor name ->
    shape), and the modules that found none. A name that matches a key whose shape does not fit raises
    ShapeMismatchError; a name that matches several keys raises UnsupportedError."""
    flux_modules = {m: s for m, s in modules.items() if _is_flux(m)}
    matched: dict[str, list[Target]] = {}
    unmatched: list[str] = []
    if flux_modules:
        flux = _flux()
        assert flux is not None
        flux_matched, flux_unmatched = flux.match_modules(flux_modules, keys)
        matched.update(flux_matched)
        unmatched.extend(flux_unmatched)
    index = _KeyIndex(keys)
    for module, shape in modules.items():
        if module in flux_modules:
            continue
        hits = index.lookup(module)
        if not hits:
            unmatched.append(module)
            continue
        if len(hits) > 1:
            raise UnsupportedError(f"module {module!r} matches several base keys: "
                                   f"{', '.join(sorted(h.key for h in hits)[:4])}")
        matched[module] = [_target(module, shape, hits[0], tuple(keys[hits[0].key]))]
    return matched, unmatched


def unet_folder_family(config: Mapping[str, object]) -> str | None:
    """"sdxl" or "sd1" (SD 1.x / 2.x) for a diffusers UNet component folder's config.json (UNet2DConditionModel;
    SDXL's has the text_time added embedding), else None."""
    if config.get("_class_name") != "UNet2DConditionModel":
        return None
    return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd1"


def checkpoint_kohya_names(keys: Mapping[str, tuple[int, ...]], sdxl: bool | None = None) -> dict[str, str]:
    """Checkpoint module (a weight key less `.weight`) -> its kohya name, for the UNet and text-encoder layers of
    a single-file SD 1.x / 2.x or SDXL checkpoint (`keys`: every tensor name -> shape), as sd-scripts'
    extract_lora_from_models.py names them: `lora_unet_` + the diffusers path (SD 1.x / 2.x UNet) or the LDM path
    (SDXL), `lora_te_` (the one text encoder of SD 1.x / 2.x) or `lora_te1_` / `lora_te2_` (SDXL's CLIP-L /
    OpenCLIP-G; the refiner's OpenCLIP-G alone is `lora_te2_`) + transformers' CLIP path. A name is given only
    where match_modules leads it back to that key, whole, and in a text encoder only to the layers kohya's
    networks.lora adapts (CLIPAttention's q/k/v/out_proj, CLIPMLP's fc1/fc2: diffusers' kohya reader names no
    other): the VAE, OpenCLIP's fused in_proj, text_projection and the embeddings have none. `sdxl`: whether the
    UNet is SDXL's (a UNet component folder's, by unet_folder_family; None: SGM keys, conditioner.*, say it)."""
    sdxl = any(k.startswith("conditioner.embedders.") for k in keys) if sdxl is None else sdxl
    index = _KeyIndex(keys)
    unet: dict[tuple[str, str], list[str]] = {}  # (prefix, ldm|diffusers) -> UNet paths
    candidates: dict[str, str] = {}
    for key in keys:
        found = _classify_key(key) if key.endswith(".weight") else None
        if found is None:
            continue
        prefix, kind, slot, path = found
        if slot == "unet":
            unet.setdefault((prefix, kind), []).append(path)
            continue
        te = "lora_te_" if slot == "te1" and not sdxl else f"lora_{slot}_"
        clip = _clip_path(path) if kind == "clip" else _openclip_clip_path(path)
        if clip is not None and slot in ("te1", "te2") and _KOHYA_TE_LAYER.fullmatch(clip):
            candidates[key[: -len(".weight")]] = te + clip.replace(".", "_")
    m = _UNET_MAPS["sdxl" if sdxl else "sd1"]  # the SDXL refiner's UNet too: its own LDM paths
    for (prefix, kind), paths in unet.items():
        ldm = kind == "ldm"
        for path in paths:
            named = (path if ldm else m.ldm(path)) if sdxl else (m.diffusers(path) if ldm else path)
            if named is not None:
                candidates[prefix + path] = "lora_unet_" + named.replace(".", "_")
    return {module: name for module, name in candidates.items()
            if [(h.key, h.rows) for h in index.lookup(name) or []] == [(module + ".weight", None)]}


_KOHYA_TE_LAYER = re.compile(r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")


def _openclip_clip_path(path: str) -> str | None:
    """transformers' CLIP path of an OpenCLIP layer (`transformer.resblocks.N.mlp.c_fc` -> `text_model.encoder.
    layers.N.mlp.fc1`), None for one it has no unfused layer of."""
    m = _OPENCLIP_LAYERS.fullmatch(path)
    if m is None or m.group(2) not in _OPENCLIP_LAYER:
        return None
    return f"text_model.encoder.layers.{m.group(1)}.{_OPENCLIP_LAYER[m.group(2)]}"


def unmatched_hint(module: str, keys: Mapping[str, tuple[int, ...]]) -> str:
    """Why module (kohya or diffusers name) found no target among `keys` where the base has the layer in a form
    lorafuse does not merge into, else '': an OpenCLIP `text_projection` of a single file (x @ P, stored
    transposed to the Linear layer that transformers / diffusers name)."""
    if not module.endswith("text_projection"):
        return ""
    parsed = _parse_any(module)
    if parsed is None or parsed.path != "text_projection":
        return ""
    key = next((p + "text_projection" for p in _PREFIX_ORDER
                if _KEY_PREFIXES[p].get("openclip") == parsed.slot and p + "text_projection" in keys), None)
    if key is None:
        return ""
    return (f" (the base holds it as {key!r} {tuple(keys[key])}, open_clip's projection, stored transposed to the "
            "Linear layer the module names (x @ P): lorafuse does not merge into it; a diffusers pipeline folder "
            f"({_component(parsed.slot, None)}/text_projection.weight) takes this LoRA)")


__all__ = ["UNET_LAYOUTS", "UnetLayout", "UnetMap", "checkpoint_kohya_names", "guess_family", "match_modules",
           "model_part", "to_diffusers", "unet_folder_family",
           "to_kohya",
           "unet_diffusers_path", "unet_ldm_path", "unmatched_hint"]


# Kernel sizes of the UNet convolutions of SD 1.x/2.x and SDXL, by the end of the module name (diffusers
# and LDM paths, '.' or '_'): LyCORIS stores a LoHa / LoKr of a convolution without Tucker cores with its
# kernel flattened into the columns, so the file alone does not say it was a convolution.
_UNET_NAME = re.compile(r"^(lora_unet_|unet\.)")
_KERNELS: tuple[tuple[re.Pattern[str], tuple[int, int]], ...] = (
    (re.compile(r"(resnets[._]\d+[._]conv[12]|conv_in|conv_out|(down|up)samplers[._]0[._]conv|in_layers[._]2|"
                r"out_layers[._]3|[._]op|input_blocks[._]0[._]0|[._]out[._]2|output_blocks[._]\d+[._][12][._]conv)$"),
     (3, 3)),
    (re.compile(r"(conv_shortcut|skip_connection)$"), (1, 1)),
)


# A transformer block's proj_in / proj_out is a 1x1 convolution in SD 1.x and a Linear in SD 2.x and SDXL:
# the UNet's cross-attention context size tells them apart (768, CLIP ViT-L, in SD 1.x; 1024 and 2048 after).
_PROJ = re.compile(r"[._]proj_(in|out)$")
_CONTEXT = re.compile(r"[._]attn2[._]to_[kv]$")
SD1_CONTEXT = 768


def unet_context_size(shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The UNet's cross-attention context size (attn2.to_k / to_v input features) among `shapes` (module ->
    delta shape), or None when no such module is there."""
    for name, shape in shapes.items():
        if _UNET_NAME.match(name) and _CONTEXT.search(name) and len(shape) >= 2:
            return int(shape[1])
    return None


def is_unet_proj(name: str) -> bool:
    """Whether `name` is a UNet transformer's proj_in / proj_out (a 1x1 convolution in SD 1.x only)."""
    return _UNET_NAME.match(name) is not None and _PROJ.search(name) is not None


def flattened_conv_shape(name: str, shape: tuple[int, ...], context: int | None = None) -> tuple[int, ...]:
    """(out, in, kh, kw) for a 2-D (out, in*kh*kw) delta of a known UNet convolution, else `shape`. `context`,
    the UNet's cross-attention context size (unet_context_size), makes proj_in / proj_out the 1x1
    convolutions they are in SD 1.x when it is 768."""
    if len(shape) != 2 or not _UNET_NAME.match(name):
        return shape
    for pattern, (kh, kw) in _KERNELS:
        if pattern.search(name) and shape[1] % (kh * kw) == 0:
            return (shape[0], shape[1] // (kh * kw), kh, kw)
    if context == SD1_CONTEXT and is_unet_proj(name):
        return (shape[0], shape[1], 1, 1)
    return shape


# LyCORIS's own wrapper (lycoris.create_lycoris) names a module 'lycoris_' + its path in any model, and stores a
# LoHa / LoKr of a convolution without Tucker cores with its kernel flattened: exactly as one of a Linear layer.
_GENERIC = "lycoris_"


def kernel_unknown(name: str, shape: tuple[int, ...]) -> bool:
    """Whether a LoHa / LoKr delta of `shape` (as read, or as flattened_conv_shape restored it) may be a
    convolution's with a kernel that nothing tells: a 2-D delta of a generic LyCORIS module ('lycoris_...', a
    layer of any model), which may as well be a Linear layer's."""
    return len(shape) == 2 and name.startswith(_GENERIC)


def note_unknown_kernels(label: str, names: Sequence[str]) -> None:
    """The AdapterNote for LoHa / LoKr modules written as 2-D LoRA factors whose kernel is unknown (kernel_unknown):
    right for a Linear layer, unloadable for a convolution."""
    if not names:
        return
    from lorafuse._terminal import plural

    shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
    warn(f"{label}: {plural(len(names), 'LoHa / LoKr module')} ({shown}) written as 2-D LoRA factors: "
         "LyCORIS stores a Linear layer and a convolution without Tucker cores alike (the kernel flattened "
         "into the columns) and a generic 'lycoris_' name does not say which layer it is, so the kernel "
         "size is unknown. LyCORIS loads 2-D factors onto a Linear layer only; for a convolution, apply "
         "the adapter to its base instead (apply takes the shape from the base weight), or combine it with "
         "an adapter that gives the module its 4-D shape", AdapterNote)
