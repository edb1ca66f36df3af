"""Flux.1 module names: kohya / BFL / diffusers, and where a module's delta lands in a checkpoint.

Three namings of one transformer:

* BFL (black-forest-labs' reference code, single-file checkpoints): `double_blocks.{i}.img_attn.qkv`,
  `single_blocks.{i}.linear1`, `final_layer.adaLN_modulation.1`, ...; ComfyUI files put
  `model.diffusion_model.` in front. kohya (sd-scripts' `networks/lora_flux.py`) names a LoRA module
  `lora_unet_` + the BFL path with `_` for `.`; ComfyUI-style LoRAs use `diffusion_model.` + the BFL path.
* diffusers (`FluxTransformer2DModel`): `transformer_blocks.{i}.attn.to_q`,
  `single_transformer_blocks.{i}.proj_mlp`, `norm_out.linear`, ...; a pipeline folder's keys are
  `transformer/<tensor>`, PEFT / diffusers LoRA modules are `transformer.<path>`, and the "mixture"
  kohya-style files use `lora_transformer_` + the path with `_`.

BFL fuses layers that diffusers keeps apart: `img_attn.qkv` = to_q | to_k | to_v (thirds of the rows),
`single_blocks.{i}.linear1` = to_q | to_k | to_v | proj_mlp (hidden, hidden, hidden, the rest; hidden is
the layer's input size), and `final_layer.adaLN_modulation.1` is (shift | scale) where diffusers'
`norm_out.linear` is (scale | shift): diffusers' own single-file converter swaps the halves.
All other layers map whole, with the same row order (the modulation layers `img_mod.lin`, `txt_mod.lin`,
`modulation.lin` included).

Row ranges are in the conventions of `lorafuse.formats.targets`; a list of `(diffusers module, rows)`
pairs from `to_diffusers` / `to_kohya` reads: the diffusers module's delta is the concatenation, in list
order, of the fused (kohya) delta's row ranges listed for it.

Everything is driven by the tables below (one row per BFL layer of a block kind); parsing a name is a
regex on the block prefix plus dict lookups, and matching looks keys up in the checkpoint's own dict.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from lorafuse.errors import LorafuseValueError, MissingModuleError, ShapeMismatchError, UnsupportedError
from lorafuse.formats.targets import Target
from lorafuse.formats.util import ORIGINAL_PREFIXES

Rows = tuple[int, int]
Shape = tuple[int, ...]
Split = Literal["whole", "thirds", "qkv_mlp", "swap_halves"]
# whole: one diffusers layer, same rows.  thirds: q | k | v.  qkv_mlp: q | k | v (input size each) | mlp.
# swap_halves: BFL (shift | scale) = diffusers (scale | shift) swapped.

FLUX_MLP_RATIO = 4  # Flux.1's MLP width / hidden size: only used for the rows of a linear1 with no proj_mlp part


@dataclass(frozen=True)
class _Layer:
    bfl: str  # path inside the block (or the model, for global layers), dotted
    split: Split
    diffusers: tuple[str, ...]  # the diffusers layers it is made of, in row order
    widths: tuple[int, int] | None = None  # (out, in) in units of the hidden size, where Flux.1's MLP sets them
    alias: bool = False  # HunyuanVideo's original name of the same diffusers layer: read, never written


# HunyuanVideo (`HunyuanVideoTransformer3DModel`) is Flux.1's transformer under other words for some layers
# (diffusers' `_convert_hunyuan_video_lora_to_diffusers`): `img_mlp.fc1`, `img_mod.linear`, `modulation.linear`,
# `time_in.mlp.0`, ... are the `alias` rows below (musubi-tuner's `lora_unet_double_blocks_0_img_mlp_fc1`, ComfyUI's
# `diffusion_model.double_blocks.0.img_mlp.fc1`); its `img_attn_qkv` / `img_attn_proj` spell Flux's own kohya names.
# One row per trainable Linear of a BFL DoubleStreamBlock / SingleStreamBlock / the model outside blocks.
_DOUBLE: tuple[_Layer, ...] = (
    _Layer("img_attn.qkv", "thirds", ("attn.to_q", "attn.to_k", "attn.to_v")),
    _Layer("img_attn.proj", "whole", ("attn.to_out.0",)),
    _Layer("img_mlp.0", "whole", ("ff.net.0.proj",), (4, 1)),
    _Layer("img_mlp.2", "whole", ("ff.net.2",), (1, 4)),
    _Layer("img_mod.lin", "whole", ("norm1.linear",)),
    _Layer("txt_attn.qkv", "thirds", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    _Layer("txt_attn.proj", "whole", ("attn.to_add_out",)),
    _Layer("txt_mlp.0", "whole", ("ff_context.net.0.proj",), (4, 1)),
    _Layer("txt_mlp.2", "whole", ("ff_context.net.2",), (1, 4)),
    _Layer("txt_mod.lin", "whole", ("norm1_context.linear",)),
    _Layer("img_mlp.fc1", "whole", ("ff.net.0.proj",), (4, 1), alias=True),
    _Layer("img_mlp.fc2", "whole", ("ff.net.2",), (1, 4), alias=True),
    _Layer("img_mod.linear", "whole", ("norm1.linear",), alias=True),
    _Layer("txt_mlp.fc1", "whole", ("ff_context.net.0.proj",), (4, 1), alias=True),
    _Layer("txt_mlp.fc2", "whole", ("ff_context.net.2",), (1, 4), alias=True),
    _Layer("txt_mod.linear", "whole", ("norm1_context.linear",), alias=True),
)
_SINGLE: tuple[_Layer, ...] = (
    _Layer("linear1", "qkv_mlp", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), (7, 1)),
    _Layer("linear2", "whole", ("proj_out",), (1, 5)),
    _Layer("modulation.lin", "whole", ("norm.linear",)),
    _Layer("modulation.linear", "whole", ("norm.linear",), alias=True),
)
_GLOBAL: tuple[_Layer, ...] = (
    _Layer("img_in", "whole", ("x_embedder",)),
    _Layer("txt_in", "whole", ("context_embedder",)),
    _Layer("time_in.in_layer", "whole", ("time_text_embed.timestep_embedder.linear_1",)),
    _Layer("time_in.out_layer", "whole", ("time_text_embed.timestep_embedder.linear_2",)),
    _Layer("vector_in.in_layer", "whole", ("time_text_embed.text_embedder.linear_1",)),
    _Layer("vector_in.out_layer", "whole", ("time_text_embed.text_embedder.linear_2",)),
    _Layer("guidance_in.in_layer", "whole", ("time_text_embed.guidance_embedder.linear_1",)),
    _Layer("guidance_in.out_layer", "whole", ("time_text_embed.guidance_embedder.linear_2",)),
    _Layer("final_layer.linear", "whole", ("proj_out",)),
    _Layer("final_layer.adaLN_modulation.1", "swap_halves", ("norm_out.linear",)),
    _Layer("time_in.mlp.0", "whole", ("time_text_embed.timestep_embedder.linear_1",), alias=True),
    _Layer("time_in.mlp.2", "whole", ("time_text_embed.timestep_embedder.linear_2",), alias=True),
    _Layer("guidance_in.mlp.0", "whole", ("time_text_embed.guidance_embedder.linear_1",), alias=True),
    _Layer("guidance_in.mlp.2", "whole", ("time_text_embed.guidance_embedder.linear_2",), alias=True),
    _Layer("txt_in.input_embedder", "whole", ("context_embedder.proj_in",), alias=True),
    _Layer("txt_in.t_embedder.mlp.0", "whole", ("context_embedder.time_text_embed.timestep_embedder.linear_1",),
           alias=True),
    _Layer("txt_in.t_embedder.mlp.2", "whole", ("context_embedder.time_text_embed.timestep_embedder.linear_2",),
           alias=True),
    _Layer("txt_in.c_embedder.linear_1", "whole", ("context_embedder.time_text_embed.text_embedder.linear_1",),
           alias=True),
    _Layer("txt_in.c_embedder.linear_2", "whole", ("context_embedder.time_text_embed.text_embedder.linear_2",),
           alias=True),
)
# HunyuanVideo's token refiner (its `txt_in`, diffusers' `context_embedder`), one row per Linear of a refiner block:
# `remap_txt_in_` of `_convert_hunyuan_video_lora_to_diffusers` (q | k | v thirds of the rows, as its double blocks';
# `adaLN_modulation.1` is (gate_msa | gate_mlp) in both, no halves swapped).
_REFINER: tuple[_Layer, ...] = (
    _Layer("self_attn_qkv", "thirds", ("attn.to_q", "attn.to_k", "attn.to_v"), alias=True),
    _Layer("self_attn_proj", "whole", ("attn.to_out.0",), alias=True),
    _Layer("mlp.fc1", "whole", ("ff.net.0.proj",), alias=True),
    _Layer("mlp.fc2", "whole", ("ff.net.2",), alias=True),
    _Layer("adaLN_modulation.1", "whole", ("norm_out.linear",), alias=True),
)
# (BFL block list, diffusers block list, layers of one block)
_BLOCKS: tuple[tuple[str, str, tuple[_Layer, ...]], ...] = (
    ("double_blocks", "transformer_blocks", _DOUBLE),
    ("single_blocks", "single_transformer_blocks", _SINGLE),
    ("txt_in.individual_token_refiner.blocks", "context_embedder.token_refiner.refiner_blocks", _REFINER),
)

KOHYA_PREFIX = "lora_unet_"
DIFFUSERS_COMPONENT = "transformer"  # component folder / PEFT prefix of the Flux transformer in a pipeline


@dataclass(frozen=True)
class _Site:
    """One fused (BFL) layer of one model: its BFL path, split rule and full diffusers paths."""

    bfl: str
    split: Split
    diffusers: tuple[str, ...]
    widths: tuple[int, int] | None = None
    alias: bool = False

    @property
    def kohya(self) -> str:
        return KOHYA_PREFIX + self.bfl.replace(".", "_")


@dataclass(frozen=True)
class _Vocab:
    """How one naming (BFL or diffusers paths, with one separator) spells the layers."""

    block: re.Pattern[str]  # <block list><sep><index><sep><rest>
    in_block: dict[tuple[str, str], tuple[_Layer, int | None]]  # (block list, rest) -> layer, piece
    outside: dict[str, tuple[_Layer, int | None]]  # global path -> layer, piece


def _entries(layers: tuple[_Layer, ...], sep: str, diffusers: bool) -> dict[str, tuple[_Layer, int | None]]:
    out: dict[str, tuple[_Layer, int | None]] = {}
    for layer in layers:
        if diffusers and layer.alias:  # a diffusers name reads as Flux's own layer
            continue
        names = [(d, p) for p, d in enumerate(layer.diffusers)] if diffusers else [(layer.bfl, None)]
        for path, piece in names:
            spelled = path.replace(".", sep)
            if spelled in out:
                raise AssertionError(f"flux_keys table: {spelled!r} spelled twice")  # pragma: no cover
            out[spelled] = (layer, piece)
    return out


def _vocab(sep: str, diffusers: bool) -> _Vocab:
    lists = [(d if diffusers else b).replace(".", sep) for b, d, _ in _BLOCKS]
    block = re.compile(rf"^({'|'.join(map(re.escape, lists))}){re.escape(sep)}(0|[1-9][0-9]*){re.escape(sep)}(.+)$")
    in_block = {(lst, rest): hit for lst, (_, _, layers) in zip(lists, _BLOCKS)
                for rest, hit in _entries(layers, sep, diffusers).items()}
    return _Vocab(block, in_block, _entries(_GLOBAL, sep, diffusers))


_BFL_DOT, _BFL_US = _vocab(".", False), _vocab("_", False)
_DIF_DOT, _DIF_US = _vocab(".", True), _vocab("_", True)
_BLOCK_LISTS = {lst.replace(".", sep): (b, d) for b, d, _ in _BLOCKS for lst in (b, d) for sep in (".", "_")}
# Module-name spellings: (prefix, vocabulary). The first that parses wins.
_FORMS: tuple[tuple[str, _Vocab], ...] = (
    (KOHYA_PREFIX, _BFL_US),
    ("lora_transformer_", _DIF_US),
    (DIFFUSERS_COMPONENT + ".", _DIF_DOT),
    ("model.diffusion_model.", _BFL_DOT),
    ("diffusion_model.", _BFL_DOT),
    ("", _DIF_DOT),
    ("", _BFL_DOT),
)
# Checkpoint layouts: (prefix of every key, BFL layout?). BFL single files, ComfyUI files, diffusers
# pipeline folders ('transformer/<key>') and a bare diffusers transformer.
_LAYOUTS: tuple[tuple[str, bool], ...] = (
    ("", True),
    ("model.diffusion_model.", True),
    ("diffusion_model.", True),
    (DIFFUSERS_COMPONENT + "/", False),
    ("", False),
)


def _site(layer: _Layer, block: tuple[str, str, str] | None) -> _Site:
    if block is None:
        return _Site(layer.bfl, layer.split, layer.diffusers, layer.widths, layer.alias)
    bfl_list, dif_list, index = block
    return _Site(f"{bfl_list}.{index}.{layer.bfl}", layer.split,
                 tuple(f"{dif_list}.{index}.{d}" for d in layer.diffusers), layer.widths, layer.alias)


def _lookup(path: str, vocab: _Vocab) -> tuple[_Site, int | None] | None:
    m = vocab.block.match(path)
    if m:
        lst, index, rest = m.groups()
        hit = vocab.in_block.get((lst, rest))
        return None if hit is None else (_site(hit[0], (*_BLOCK_LISTS[lst], index)), hit[1])
    hit = vocab.outside.get(path)
    return None if hit is None else (_site(hit[0], None), hit[1])


@lru_cache(maxsize=65536)
def _parse(name: str) -> tuple[_Site, int | None] | None:
    """The fused layer a module name belongs to, and which diffusers part it is (None: the whole
    fused layer, i.e. a kohya / BFL name)."""
    for prefix, vocab in _FORMS:
        if name.startswith(prefix):
            hit = _lookup(name[len(prefix):], vocab)
            if hit is not None:
                return hit
    return None


def is_flux_module(name: str) -> bool:
    """A Flux.1 transformer module name: kohya (`lora_unet_double_blocks_0_img_attn_qkv`), BFL / ComfyUI
    (`diffusion_model.single_blocks.0.linear1`), diffusers / PEFT (`transformer.transformer_blocks.0.attn.to_q`,
    with or without the component) or `lora_transformer_...`. Other models share the diffusers names (see
    `is_flux_own_name`): they read as Flux here, where checkpoint keys decide what they land on."""
    return _parse(name) is not None


# Prefixes of Flux's own namings: kohya (sd-scripts' lora_flux) and ComfyUI spell BFL paths after them.
_OWN_PREFIXES = (KOHYA_PREFIX, *ORIGINAL_PREFIXES)


def is_flux_own_name(name: str) -> bool:
    """A Flux module name in Flux's own (BFL) naming, kohya / ComfyUI / BFL block paths: what tells a Flux LoRA
    from another model's. The diffusers names do not: every Flux diffusers path is some other diffusers
    transformer's too (checked against all of diffusers 0.42's: `transformer_blocks.N.attn.to_q`, `.ff.net.0.proj`,
    `.norm1.linear` in SD3, QwenImage, HunyuanVideo, AuraFlow, ...; `single_transformer_blocks.N.proj_mlp`,
    `.norm.linear`, `x_embedder`, `time_text_embed.guidance_embedder` in HunyuanVideo, Chroma, Bria, ...), and
    neither does a bare BFL global (`img_in`, `txt_in`: QwenImage's diffusers paths)."""
    hit = _parse(name)
    if hit is None or hit[1] is not None:  # not Flux's, or a diffusers path (it names one part of a BFL layer)
        return False
    return name.startswith(_OWN_PREFIXES) or _BFL_DOT.block.match(name) is not None


def bfl_module(name: str) -> str | None:
    """The BFL path (`double_blocks.0.img_attn.qkv`) of the layer a Flux module is, or is part of."""
    hit = _parse(name)
    return None if hit is None else hit[0].bfl


def kohya_module(name: str) -> str | None:
    """The kohya name (`lora_unet_double_blocks_0_img_attn_qkv`) of the layer a Flux module is, or is part of."""
    hit = _parse(name)
    return None if hit is None else hit[0].kohya


def is_alias(name: str) -> bool:
    """A HunyuanVideo word for a Flux layer (`img_mlp.fc1`, `modulation.linear`, `time_in.mlp.0`): read, never
    written, and no layer of Flux.1 or Flux.2 under that name."""
    hit = _parse(name)
    return hit is not None and hit[0].alias


# ---------------------------------------------------------------------------------------------- rows


def _as_2d(shape: Shape, what: str) -> tuple[int, int]:
    """(out, in) of a linear weight or delta; a (out, in, 1, 1) one counts as (out, in)."""
    dims = tuple(int(d) for d in shape)
    if len(dims) == 2 or (len(dims) == 4 and dims[2:] == (1, 1)):
        return dims[0], dims[1]
    raise ShapeMismatchError(f"{what} has shape {dims}: Flux layers are linear, expected (out, in) "
                             "or (out, in, 1, 1)")


def _segments(site: _Site, out: int, fan_in: int, what: str) -> list[tuple[int, Rows]]:
    """The fused layer's rows [0, out) as (diffusers part, fused rows), in each part's own row order."""
    if site.split == "whole":
        return [(0, (0, out))]
    if site.split == "swap_halves":
        if out % 2:
            raise ShapeMismatchError(f"{what} has {out} rows: {site.bfl} is (shift | scale), an even count")
        h = out // 2
        return [(0, (h, out)), (0, (0, h))]
    if site.split == "thirds":
        if out % 3:
            raise ShapeMismatchError(f"{what} has {out} rows: {site.bfl} is q | k | v, a multiple of 3")
        h = out // 3
        return [(p, (p * h, (p + 1) * h)) for p in range(3)]
    if out <= 3 * fan_in:  # qkv_mlp: q, k, v have the input (hidden) size, the MLP part the rest
        raise ShapeMismatchError(f"{what} has shape ({out}, {fan_in}): {site.bfl} is q | k | v | mlp with "
                                 f"q, k, v of hidden size = input size {fan_in}, so more than {3 * fan_in} rows")
    return [(p, (p * fan_in, (p + 1) * fan_in)) for p in range(3)] + [(3, (3 * fan_in, out))]


def _with_part_rows(segments: list[tuple[int, Rows]]) -> list[tuple[int, Rows, Rows]]:
    """(part, fused rows, rows inside that part's own weight) per segment."""
    filled: dict[int, int] = {}
    out = []
    for part, (a, b) in segments:
        start = filled.get(part, 0)
        filled[part] = start + b - a
        out.append((part, (a, b), (start, start + b - a)))
    return out


def _rows_or_none(rows: Rows, total: int) -> Rows | None:
    return None if rows == (0, total) else rows


def _check_flux1_widths(module: str, site: _Site, out: int, fan_in: int) -> None:
    """Refuse an MLP-bearing layer whose delta is not Flux.1's width: Flux.2 (and its Klein models) name these
    layers alike in kohya / BFL files, but their SwiGLU MLP (ratio 3) gives other widths and other diffusers
    layers (`attn.to_qkv_mlp_proj`, `attn.to_out`, `ff.linear_in`, `ff.linear_out`), which Flux.1's names would miss."""
    if site.widths is None:
        return
    w_out, w_in = site.widths
    if out * w_in == fan_in * w_out:
        return
    hidden = fan_in // w_in
    raise ShapeMismatchError(
        f"module {module!r} has shape ({out}, {fan_in}) where Flux.1's {site.bfl} has ({w_out * hidden}, "
        f"{w_in * hidden}) ({w_out} x, {w_in} x the hidden size): it is another model's layer under Flux's names "
        "(Flux.2's SwiGLU MLP, ratio 3, has other widths and diffusers layers, attn.to_qkv_mlp_proj, ff.linear_in, "
        "...: convert --family flux2 names a Flux.2 LoRA's); nothing was written")


def _diffusers_name(path: str) -> str:
    return f"{DIFFUSERS_COMPONENT}.{path}"


def _parse_or_raise(module: str) -> tuple[_Site, int | None]:
    hit = _parse(module)
    if hit is None:
        raise UnsupportedError(f"module {module!r} is not a Flux transformer module (kohya "
                               "lora_unet_double_blocks_..., BFL double_blocks..., or diffusers "
                               "transformer.transformer_blocks...)")
    return hit


# ------------------------------------------------------------------------------------------ naming


def to_diffusers(module: str, shape: Shape) -> list[tuple[str, Rows | None]]:
    """The diffusers modules (`transformer.<path>`) a Flux module's delta of `shape` lands on, with the rows
    of the delta each takes (None = all). A fused kohya / BFL layer gives several entries; a diffusers
    name gives itself. Raises UnsupportedError for a non-Flux name, ShapeMismatchError for a shape that
    cannot be split as the layer is."""
    site, part = _parse_or_raise(module)
    if site.alias:
        raise UnsupportedError(f"module {module!r} is HunyuanVideo's {site.bfl} (diffusers' "
                               f"{', '.join(site.diffusers)}), which apply merges; convert names Flux.1's layers, and "
                               "Flux.1's kohya names would name its diffusers names back as Flux's layers (or as "
                               "none), so it is not converted")
    if part is not None:
        _as_2d(shape, f"module {module!r}")
        return [(_diffusers_name(site.diffusers[part]), None)]
    out, fan_in = _as_2d(shape, f"module {module!r}")
    _check_flux1_widths(module, site, out, fan_in)
    segments = _segments(site, out, fan_in, f"module {module!r}")
    return [(_diffusers_name(site.diffusers[p]), _rows_or_none(rows, out)) for p, rows in segments]


@dataclass(frozen=True)
class _Group:
    site: _Site
    parts: dict[int, tuple[str, tuple[int, int]]]  # part -> (module name as given, 2-D shape)
    shape: tuple[int, int]  # the fused (kohya) delta's shape


def _fused_shape(site: _Site, parts: dict[int, tuple[str, tuple[int, int]]]) -> tuple[int, int]:
    ins = {s[1] for _, s in parts.values()}
    if len(ins) != 1:
        listing = ", ".join(f"{n} {s}" for n, s in parts.values())
        raise ShapeMismatchError(f"{site.kohya}: its parts have different input sizes: {listing}")
    fan_in = ins.pop()
    rows = {p: s[0] for p, (_, s) in parts.items()}
    if site.split in ("whole", "swap_halves"):
        return rows[0], fan_in
    h = fan_in if site.split == "qkv_mlp" else next(iter(rows.values()))
    bad = [parts[p] for p, r in rows.items() if p < 3 and r != h]
    if bad:
        listing = ", ".join(f"{n} {s}" for n, s in parts.values())
        raise ShapeMismatchError(f"{site.kohya}: q, k, v parts must have {h} rows each: {listing}")
    mlp = rows.get(3, FLUX_MLP_RATIO * fan_in) if site.split == "qkv_mlp" else 0
    return 3 * h + mlp, fan_in


def _groups(modules: Mapping[str, Shape], family: str) -> dict[str, _Group]:
    if family != "flux":
        raise LorafuseValueError(f"flux_keys.to_kohya: family must be 'flux', got {family!r}")
    parts: dict[str, tuple[_Site, dict[int, tuple[str, tuple[int, int]]]]] = {}
    for name, shape in modules.items():
        site, part = _parse_or_raise(name)
        if part is None:
            raise UnsupportedError(f"module {name!r} is already a kohya / BFL name; "
                                   "to_kohya takes diffusers names")
        have = parts.setdefault(site.kohya, (site, {}))[1]
        if part in have:
            raise LorafuseValueError(f"modules {have[part][0]!r} and {name!r} name the same layer "
                                     f"{site.diffusers[part]}")
        have[part] = (name, _as_2d(shape, f"module {name!r}"))
    return {k: _Group(site, p, _fused_shape(site, p)) for k, (site, p) in parts.items()}


def to_kohya(modules: Mapping[str, Shape], family: str = "flux") -> dict[str, list[tuple[str, Rows | None]]]:
    """kohya module name -> the given diffusers-named modules it is made of, each with the rows of the kohya
    delta it fills (None = all), in the order of `to_diffusers`. A fused layer whose parts are not all
    given (a LoRA on to_q and to_k only) lists the given ones; the other rows of the kohya delta are zero.
    The kohya delta's full shape is `to_kohya_shapes(modules)[name]`."""
    out: dict[str, list[tuple[str, Rows | None]]] = {}
    for kohya, g in _groups(modules, family).items():
        rows, fan_in = g.shape
        segments = _segments(g.site, rows, fan_in, kohya)
        out[kohya] = [(g.parts[p][0], _rows_or_none(r, rows)) for p, r in segments if p in g.parts]
    return out


def to_kohya_shapes(modules: Mapping[str, Shape], family: str = "flux") -> dict[str, tuple[int, int]]:
    """kohya module name -> the (out, in) shape of its delta, for the diffusers-named `modules`. A linear1
    given without its proj_mlp part gets Flux.1's MLP width (4 x hidden)."""
    return {kohya: g.shape for kohya, g in _groups(modules, family).items()}


# ----------------------------------------------------------------------------------------- matching


def _layout_keys(site: _Site, part: int | None, prefix: str, bfl: bool) -> list[tuple[int | None, str]]:
    """(diffusers part or None, checkpoint key) that the module needs in one layout."""
    if bfl:
        return [(None, f"{prefix}{site.bfl}.weight")]
    parts = range(len(site.diffusers)) if part is None else (part,)
    return [(p, f"{prefix}{site.diffusers[p]}.weight") for p in parts]


def _mismatch(module: str, shape: Shape, key: str, base: Shape, why: str) -> ShapeMismatchError:
    return ShapeMismatchError(f"module {module!r} with delta shape {tuple(shape)} does not fit {key!r} of shape "
                              f"{tuple(base)}: {why}")


def _fit_whole(module: str, shape: Shape, key: str, keys: Mapping[str, Shape]) -> list[Target]:
    """A module onto one weight of the same layer (kohya on BFL, diffusers on diffusers)."""
    base = keys[key]
    d, b = _as_2d(shape, f"module {module!r}"), _as_2d(base, f"base weight {key!r}")
    if d != b:
        raise _mismatch(module, shape, key, base, "the shapes differ")
    return [Target(key)]


def _fused_onto_parts(module: str, shape: Shape, site: _Site, found: list[tuple[int | None, str]],
                      keys: Mapping[str, Shape]) -> list[Target]:
    """A kohya / BFL module onto the separate diffusers weights of its parts."""
    out, fan_in = _as_2d(shape, f"module {module!r}")
    key_of = dict(found)
    first = found[0][1]
    what = f"module {module!r} (for {first!r} of shape {tuple(keys[first])})"
    segments = _with_part_rows(_segments(site, out, fan_in, what))
    filled = {p: r[1] for p, _, r in segments}  # rows each part's weight receives in all
    for p, n in filled.items():
        key = key_of[p]
        b_out, b_in = _as_2d(keys[key], f"base weight {key!r}")
        if (b_out, b_in) != (n, fan_in):
            raise _mismatch(module, shape, key, keys[key], f"its part {site.diffusers[p]} is ({n}, {fan_in})")
    return [Target(key_of[p], _rows_or_none(part_rows, filled[p]), _rows_or_none(rows, out))
            for p, rows, part_rows in segments]


def _part_onto_fused(module: str, shape: Shape, site: _Site, part: int, key: str,
                     keys: Mapping[str, Shape]) -> list[Target]:
    """A diffusers-named module onto the rows of the fused BFL weight it is part of."""
    base = keys[key]
    b_out, b_in = _as_2d(base, f"base weight {key!r}")
    out, fan_in = _as_2d(shape, f"module {module!r}")
    what = f"base weight {key!r} (for module {module!r} of shape {tuple(shape)})"
    segments = [s for s in _with_part_rows(_segments(site, b_out, b_in, what)) if s[0] == part]
    n = segments[-1][2][1]
    if (out, fan_in) != (n, b_in):
        raise _mismatch(module, shape, key, base, f"{site.diffusers[part]} is ({n}, {b_in}) of {site.bfl}")
    return [Target(key, _rows_or_none(rows, b_out), _rows_or_none(part_rows, out))
            for _, rows, part_rows in segments]


def _match_one(module: str, shape: Shape, site: _Site, part: int | None,
               keys: Mapping[str, Shape]) -> list[Target] | None:
    for prefix, bfl in _LAYOUTS:
        need = _layout_keys(site, part, prefix, bfl)
        present = [k in keys for _, k in need]
        if not any(present):
            continue
        if not all(present):
            missing = [k for (_, k), ok in zip(need, present) if not ok]
            raise MissingModuleError(f"module {module!r}: the checkpoint has {need[present.index(True)][1]!r} "
                                     f"but not {', '.join(map(repr, missing))}")
        if part is None and not bfl:  # kohya / BFL name onto diffusers weights
            return _fused_onto_parts(module, shape, site, need, keys)
        if part is not None and bfl:  # diffusers name onto a fused BFL weight
            return _part_onto_fused(module, shape, site, part, need[0][1], keys)
        return _fit_whole(module, shape, need[0][1], keys)  # the same layer in both namings
    return None


def match_modules(modules: Mapping[str, Shape],
                  keys: Mapping[str, Shape]) -> tuple[dict[str, list[Target]], list[str]]:
    """Every Flux module (any naming) -> its targets among `keys` (tensor name -> shape of a BFL single file,
    a ComfyUI file or a diffusers folder with `transformer/` keys), and the modules with no target
    (non-Flux names included, in input order). Raises ShapeMismatchError when a found weight does not
    fit the module, MissingModuleError when only some weights of a fused layer are there."""
    index = keys if isinstance(keys, dict) else dict(keys)
    found: dict[str, list[Target]] = {}
    unmatched: list[str] = []
    for module, shape in modules.items():
        hit = _parse(module)
        targets = None if hit is None else _match_one(module, shape, hit[0], hit[1], index)
        if targets is None:
            unmatched.append(module)
        else:
            found[module] = targets
    return found, unmatched


__all__ = [
    "DIFFUSERS_COMPONENT",
    "FLUX_MLP_RATIO",
    "KOHYA_PREFIX",
    "bfl_module",
    "is_alias",
    "is_flux_module",
    "is_flux_own_name",
    "kohya_module",
    "match_modules",
    "to_diffusers",
    "to_kohya",
    "to_kohya_shapes",
]
