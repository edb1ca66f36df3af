"""kohya LoRA / LoCon files (sd-scripts' `networks/lora.py`) and the LyCORIS files that use the same
naming: one `.safetensors` file.

Keys are `<module>.<part>` with module names such as `lora_unet_down_blocks_0_attentions_0_proj_in`,
`lora_te1_text_model_...` or, for LyCORIS on a generic model, `lycoris_<path>`:
- LoRA / LoCon: `lora_down.weight` (r x in, or r x in x kh x kw), `lora_up.weight` (out x r [x 1 x 1]),
  `alpha` (a scalar of any float dtype); scale = alpha / r, alpha missing or 0 means alpha = r.
  LoCon with Tucker: `lora_mid.weight` (r, r, kh, kw) between a 1x1 `lora_down` and `lora_up`; it is
  contracted into lora_down at load time (the delta is exactly rank r), giving a plain update.
  DyLoRA files (sd-scripts' `networks/dylora.py`, LyCORIS `dylora`) hold the same tensors and read as
  LoRA (LyCORIS writes a conv DyLoRA's lora_up as (out, r): it is read as (out, r, 1, 1)).
- LoHa (`hada_*`) and LoKr (`lokr_*`): `model.lycoris.LohaUpdate` / `LokrUpdate`, read by
  `formats.lycoris_keys`.
- DoRA: `dora_scale`, on any of the above (`formats.lycoris_keys.dora_magnitude`).
Other LyCORIS algorithms (full diff, norms, OFT / BOFT, IA3, GLoRA, bias, T-LoRA) are refused with
UnsupportedError. A file may mix LoRA, LoHa and LoKr modules.

The file's `__metadata__` (`ss_*` training metadata and anything else) and, per module, the dtype of
its `.alpha` tensor (None: the module had none) are the adapter's `KohyaState` (model.state:
`Adapter.state`), written back as read. LoHa / LoKr modules are written as the pieces they were read as,
with alpha = scale * r (kohya_module_tensors).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from lorafuse._terminal import short
from lorafuse.backends import get_backend
from lorafuse.errors import FormatError, ShapeMismatchError, UnsupportedError
from lorafuse.formats.lycoris_keys import (
    LOHA_PARTS,
    LOKR_PARTS,
    UNSUPPORTED_PARTS,
    dora_magnitude,
    loha_update,
    lokr_update,
    scale_rank,
    unsupported_algorithm,
)
from lorafuse.formats.streaming import WritePlan, specs_of, stream_with, write_adapter
from lorafuse.formats.util import (
    COMFY_TEXT_ENCODERS,
    COMFY_TEXT_WHY,
    ORIGINAL_PREFIXES,
    ORIGINAL_WHY,
    most_common,
    safetensors_keys,
)
from lorafuse.io.checkpoint import loads_json
from lorafuse.io.dtypes import WRITABLE_FLOATS
from lorafuse.io.manifest import mark_metadata
from lorafuse.io.provenance import Provenance, stamp
from lorafuse.io.safetensors import SafetensorsFile, TensorSpec, encode_header
from lorafuse.io.tensor import Tensor
from lorafuse.model import Adapter, FormatSpec, Kind, LoraUpdate, LycorisUpdate, TuckerFactor, Update, register
from lorafuse.model.arithmetic import restated_config
from lorafuse.model.layout import is_kxk
from lorafuse.model.names import check_module_name
from lorafuse.model.state import KohyaState, as_kohya, metadata_of

PREFIXES = ("lora_", "lycoris_")
LORA_PARTS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
COMMON_PARTS = ("alpha", "dora_scale")
KNOWN_PARTS = frozenset((*LORA_PARTS, *COMMON_PARTS, *LOHA_PARTS, *LOKR_PARTS, *UNSUPPORTED_PARTS))
# Parts that make a file a kohya / LyCORIS file when a module name carries one of PREFIXES.
_SIGNATURE_PARTS = KNOWN_PARTS - {"alpha", "weight"}
# safetensors' own writer orders tensors by dtype (widest first), then name; kohya's hashes assume it.
_DTYPE_ORDER = {"F64": 0, "F32": 1, "BF16": 2, "F16": 3, "F8_E4M3": 4, "F8_E5M2": 5}


def is_kohya(path: str | os.PathLike[str]) -> bool:
    """A `.safetensors` file with kohya LoRA or LyCORIS keys. Reads the header only."""
    return has_kohya_keys(safetensors_keys(path))


def has_kohya_keys(keys: Iterable[str]) -> bool:
    """Tensor names of a kohya LoRA or LyCORIS file."""
    return any(_is_signature(k) for k in keys)


def _is_signature(key: str) -> bool:
    if key.endswith((".lora_down.weight", ".lora_up.weight")):
        return True
    module, _, part = key.partition(".")
    if module.startswith(PREFIXES) and part in _SIGNATURE_PARTS:
        return True
    original = original_key(key)  # a checkpoint's own `diffusion_model.<path>.weight` is no adapter's
    return original is not None and original[1] in _ORIGINAL_SIGNATURE


# ComfyUI's layout (ai-toolkit, musubi-tuner, ComfyUI's own saves): `diffusion_model.<original module path>.<part>`,
# the parts as PEFT names them (lora_A / lora_B) or as kohya does. Read as kohya names: the module is `lora_unet_` +
# the path with '_' for '.', as diffusers' loaders (Flux's `_convert_kohya_flux_lora_to_diffusers`, musubi-tuner's
# Wan converter) and sd-scripts read the same modules; the part as kohya spells it.
ORIGINAL_PARTS: dict[str, str] = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                                  **{p: p for p in KNOWN_PARTS}}
_ORIGINAL_SUFFIXES = sorted(ORIGINAL_PARTS, key=len, reverse=True)  # the longest first: 'lora_A.weight' < 'weight'
KOHYA_DENOISER = "lora_unet_"
# What makes a file of that layout an adapter: LoRA / LoHa / LoKr factors (a module's `weight`, `b1.weight`, ... may be
# a checkpoint's own tensor under the same prefix).
_ORIGINAL_SIGNATURE = frozenset(("lora_down.weight", "lora_up.weight", *LOHA_PARTS, *LOKR_PARTS))


# ComfyUI's text encoders, as ComfyUI saves and loads their LoRAs (`text_encoders.clip_l.transformer.text_model.encoder
# .layers.0.self_attn.q_proj.lora_up.weight`): read as kohya's names of the same paths, as sd-scripts spells them
# (lora_te1_ CLIP-L, lora_te2_ CLIP-G, lora_te3_ T5-XXL) and diffusers' Flux loader reads `clip_l` (as `lora_te_`).
_COMFY_TEXT_PREFIXES = {"text_encoders.clip_l.transformer.": "lora_te1_",
                        "text_encoders.clip_g.transformer.": "lora_te2_",
                        "text_encoders.t5xxl.transformer.": "lora_te3_"}
# ComfyUI's layout prefix -> the kohya prefix of the module names it is read under
_LAYOUT_PREFIXES: dict[str, str] = {**{p: KOHYA_DENOISER for p in ORIGINAL_PREFIXES}, **_COMFY_TEXT_PREFIXES}


def original_key(key: str) -> tuple[str, str] | None:
    """(kohya module name, kohya part) of a ComfyUI-layout key (`diffusion_model.double_blocks.0.img_attn.qkv.lora_A
    .weight` -> `lora_unet_double_blocks_0_img_attn_qkv`, `lora_down.weight`; `text_encoders.clip_l.transformer.<path>`
    -> `lora_te1_<path>`); None for any other key."""
    split = _original_split(key)
    if split is None:
        return None
    prefix, path, part = split
    return _LAYOUT_PREFIXES[prefix] + path.replace(".", "_"), ORIGINAL_PARTS[part]


_ORIGINAL_PREFIXES_LONGEST = sorted(_LAYOUT_PREFIXES, key=len, reverse=True)  # `model.diffusion_model.` first


def _original_split(key: str) -> tuple[str, str, str] | None:
    """(prefix, module path, part as written) of a ComfyUI-layout key: (`diffusion_model.`,
    `double_blocks.0.img_attn.qkv`, `lora_A.weight`); None for any other key."""
    prefix = next((p for p in _ORIGINAL_PREFIXES_LONGEST if key.startswith(p)), None)
    if prefix is None:
        return None
    rest = key[len(prefix):]
    part = next((s for s in _ORIGINAL_SUFFIXES if rest.endswith("." + s) and len(rest) > len(s) + 1), None)
    return None if part is None else (prefix, rest[: -len(part) - 1], part)


_PEFT_SPELLING = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}


def _in_layout(tensors: dict[str, Tensor], name: str, layout: tuple[str, bool] | None) -> dict[str, Tensor]:
    """A module's tensors under the keys of the layout it was read in (KohyaState.layouts): a ComfyUI-layout file
    goes through resize, combine or arithmetic in its own layout, which its readers (ComfyUI, diffusers' family
    converters) know, not as kohya names some of them do not."""
    if layout is None:
        return tensors
    stem, peft = layout
    out: dict[str, Tensor] = {}
    for key, t in tensors.items():
        part = key[len(name) + 1:]
        out[f"{stem}.{_PEFT_SPELLING.get(part, part) if peft else part}"] = t
    return out


def _kohya_key(key: str) -> tuple[str, str] | None:
    """(module, part) of a kohya / LyCORIS key, or of a ComfyUI-layout one read as kohya; None for anything else."""
    module, _, part = key.partition(".")
    return (module, part) if _native(key) else original_key(key)


def _native(key: str) -> bool:
    """Whether `key` is a kohya / LyCORIS key as kohya names them (`lora_<module>.<part>`)."""
    module, _, part = key.partition(".")
    return part in KNOWN_PARTS and module.startswith(PREFIXES)


def load_kohya(path: str | os.PathLike[str]) -> Adapter:
    p = Path(path)
    with SafetensorsFile(p) as f:  # views handed out keep the mapping alive
        tensors = {key: Tensor(f.raw(key), f.info(key).dtype) for key in f.keys()}
        metadata = dict(f.metadata)
    parts: dict[str, dict[str, Tensor]] = {}
    named: dict[tuple[str, str], str] = {}  # (module, part) -> the key it was read from
    layouts: dict[str, tuple[str, bool]] = {}  # a ComfyUI-layout module -> (its key stem, lora_A / lora_B spelling)
    for key, t in tensors.items():
        hit = _kohya_key(key)
        if hit is None:
            why = f": {ORIGINAL_WHY}" if key.startswith(ORIGINAL_PREFIXES) else (
                f": {COMFY_TEXT_WHY}" if key.startswith(COMFY_TEXT_ENCODERS) else "")
            raise FormatError(f"{p}: tensor {short(key)} is not a kohya LoRA tensor "
                              f"(lora_<module>.lora_down.weight / .lora_up.weight / .alpha) nor a LyCORIS one{why}")
        module, part = hit
        check_module_name(module, f"{p}: tensor {short(key)}")
        split = None if _native(key) else _original_split(key)
        if split is not None:
            layouts.setdefault(module, (split[0] + split[1], split[2] in _PEFT_SPELLING.values()))
        if (module, part) in named:
            raise FormatError(f"{p}: tensors {short(named[module, part])} and {short(key)} are both the {part} of "
                              f"module {module!r}")
        named[module, part] = key
        parts.setdefault(module, {})[part] = t
    read = {m: _module_update(p, m, d) for m, d in parts.items()}
    # SD 1.x's proj_in / proj_out are 1x1 convolutions: the UNet's context size, over the whole file, says so
    from lorafuse.formats.sd_keys import unet_context_size

    context = unet_context_size({m: tuple(u.delta_shape) for m, u in read.items()})
    updates: dict[str, Update] = {m: _with_dora(p, m, _unflattened(u, context), parts[m]) for m, u in read.items()}
    alpha_dtypes = {m: (d["alpha"].dtype if "alpha" in d else None) for m, d in parts.items()}
    forms = {m: (tuple(d["alpha"].shape), _alpha_number(d["alpha"])) for m, d in parts.items() if "alpha" in d}
    forms = {m: f for m, f in forms.items() if f[0] != () or f[1] == 0}  # as written back (_kept_alpha)
    unused = {m: float(parts[m]["alpha"].f32().reshape(-1)[0]) for m, u in updates.items()
              if isinstance(u, LycorisUpdate) and "alpha" in parts[m] and scale_rank(u.algo, u.tensors) is None}
    # config: r, lora_alpha, rank_pattern, alpha_pattern stating every module's rank and scale, as a result of
    # arithmetic states them: state_dict() with it is the adapter (Adapter.from_state_dict(x.state_dict(), x.config))
    return Adapter(updates=updates, config=restated_config({}, updates), format="kohya", path=p,
                   state=KohyaState(metadata, alpha_dtypes, unused, forms, layouts, _conv_dora(updates, parts)),
                   provenance=Provenance.from_metadata(metadata))


def _conv_dora(updates: Mapping[str, Update], parts: Mapping[str, Mapping[str, Tensor]]) -> frozenset[str]:
    """The modules whose dora_scale is stored (out, 1, 1, 1), a convolution's, while their delta reads 2-D."""
    return frozenset(m for m, u in updates.items() if "dora_scale" in parts[m] and len(u.delta_shape) == 2
                     and len(parts[m]["dora_scale"].shape) == 4 and not u.magnitude_on_columns)


def _algorithm(where: str, module: str, parts: Mapping[str, Tensor]) -> str:
    """'lora', 'loha' or 'lokr'; UnsupportedError for other LyCORIS algorithms or a mix of them."""
    other = unsupported_algorithm(parts)
    if other is not None:
        algo, names = other
        raise UnsupportedError(f"{where} is a LyCORIS {algo} module ({', '.join(names)}); lorafuse reads "
                               "LoRA / LoCon, LoHa, LoKr, DoRA and DyLoRA modules only")
    found = {algo: sorted(k for k in parts if k in keys)
             for algo, keys in (("lora", LORA_PARTS), ("loha", LOHA_PARTS), ("lokr", LOKR_PARTS))}
    present = [a for a, ks in found.items() if ks]
    if len(present) > 1:
        lyco = next(a for a in present if a != "lora")
        key = f"{module}.{found[lyco][0]}"
        raise UnsupportedError(f"{where} has the LyCORIS tensor {key!r} together with "
                               f"{' and '.join(', '.join(found[a]) for a in present if a != lyco)}; "
                               "a module holds the tensors of one algorithm (LoRA, LoHa or LoKr)")
    return present[0] if present else "lora"


def _alpha(where: str, alpha: Tensor | None) -> float | None:
    """The alpha value, or None when missing or 0 (both mean alpha = r)."""
    if alpha is None:
        return None
    if int(np.prod(alpha.shape)) != 1 or any(d != 1 for d in alpha.shape):
        raise FormatError(f"{where}: alpha must be a scalar, got shape {alpha.shape}")
    if alpha.dtype == "BOOL":
        raise FormatError(f"{where}: alpha has dtype BOOL")
    value = _alpha_number(alpha)
    if not np.isfinite(value):
        raise FormatError(f"{where}: alpha is {value}")
    return None if value == 0.0 else value


def _alpha_number(alpha: Tensor) -> float:
    """An `.alpha` tensor's one value, exactly (the dtypes numpy holds as numbers read as they are)."""
    exact = alpha.dtype in ("F64", "F32", "F16") or not alpha.is_float
    return float((alpha.raw if exact else alpha.f32()).reshape(-1)[0])


# The rank of the factors of a 1-D / 3-D convolution (LyCORIS adapts Conv1d and Conv3d layers too), no 2-D one's,
# in the parts LyCORIS gives the kernel.
_OTHER_CONVOLUTIONS = {3: "1-D", 5: "3-D"}
_KERNEL_PARTS = (*LORA_PARTS, "hada_t1", "hada_t2", "lokr_w2", "lokr_t2", "dora_scale")


def _other_convolution(where: str, parts: Mapping[str, Tensor]) -> None:
    """Refuse the factors of a 1-D or 3-D convolution by name (LoCon lora_down (r, in, k), a Tucker core
    (r, r, kd, kh, kw), a LoKr lokr_w2 (c, d, k), ...), before the shape checks of the 2-D ones call them misfits."""
    odd = [(n.removesuffix(".weight"), t.shape) for n, t in parts.items()
           if n in _KERNEL_PARTS and len(t.shape) in _OTHER_CONVOLUTIONS]
    if not odd:
        return
    items = [f"{n} {s}" for n, s in odd]
    listing = items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"
    lora = "LoRA " if all(n.startswith("lora_") for n, _ in odd) else ""
    what = f"are not {lora}factors" if len(odd) > 1 else f"is not a {lora}factor"
    raise ShapeMismatchError(f"{where}: {listing} {what} of a Linear layer or "
                             f"a 2-D convolution but a {_OTHER_CONVOLUTIONS[len(odd[0][1])]} convolution's (LyCORIS "
                             "adapts Conv1d and Conv3d layers too), which lorafuse does not read")


def _module_update(path: Path, module: str, parts: dict[str, Tensor]) -> Update:
    where = f"{path}: module {module!r}"
    algo = _algorithm(where, module, parts)
    _other_convolution(where, parts)
    alpha = _alpha(where, parts.get("alpha"))
    if algo == "loha":
        return loha_update(where, module, parts, alpha)
    if algo == "lokr":
        return lokr_update(where, module, parts, alpha)
    return _lora_update(where, module, parts, alpha)


def _unflattened(u: Update, context: int | None) -> Update:
    """A LoHa / LoKr of a UNet convolution stored with its kernel flattened, given its 4-D shape back (from the
    layer's name; for proj_in / proj_out, the UNet's context size `context`: sd_keys.unet_context_size)."""
    if not isinstance(u, LycorisUpdate):
        return u
    from lorafuse.formats.sd_keys import flattened_conv_shape

    shape = flattened_conv_shape(u.name, tuple(u.delta_shape), context)
    return u.with_shape(shape) if shape != tuple(u.delta_shape) else u


def _with_dora(path: Path, module: str, u: Update, parts: dict[str, Tensor]) -> Update:
    """`u` with the DoRA magnitude of the module's `dora_scale`, if it has one."""
    dora = parts.get("dora_scale")
    if dora is None:
        return u
    where = f"{path}: module {module!r}"
    magnitude, on_columns = dora_magnitude(where, dora, tuple(u.delta_shape))
    u.magnitude, u.magnitude_on_columns = magnitude, on_columns
    return u


def _lora_update(where: str, module: str, p: dict[str, Tensor], alpha: float | None) -> LoraUpdate:
    down, up, mid = p.get("lora_down.weight"), p.get("lora_up.weight"), p.get("lora_mid.weight")
    if down is None or up is None:
        have = ", ".join(f"{n} {p[n].shape}" for n in (*LORA_PARTS, "alpha", "dora_scale") if n in p)
        raise FormatError(f"{where} has no {'lora_down.weight' if down is None else 'lora_up.weight'} "
                          f"(only {have})")
    for t, n in ((down, "lora_down.weight"), (up, "lora_up.weight"), (mid, "lora_mid.weight")):
        if t is not None and not t.is_float:
            raise FormatError(f"{where}: {n} has non-float dtype {t.dtype}")
    rank = down.shape[0] if down.shape else 0
    if len(down.shape) in (2, 4) and len(up.shape) in (2, len(down.shape)) and rank == 0:
        raise ShapeMismatchError(f"{where}: lora_down {down.shape} has rank 0 (a zero-rank adapter)")
    if len(down.shape) == 4 and len(up.shape) == 2:  # LyCORIS DyLoRA on a conv: lora_up (out, r)
        up = Tensor(up.raw.reshape(*up.shape, 1, 1), up.dtype)
    ok = (len(down.shape) in (2, 4) and len(up.shape) == len(down.shape) and rank > 0
          and up.shape[1] == rank and all(d == 1 for d in up.shape[2:]))
    if not ok and len(up.shape) == len(down.shape) == 4 and up.shape[1] == rank > 0:
        raise ShapeMismatchError(f"{where}: lora_down {down.shape} and lora_up {up.shape} are not LoRA factors: "
                                 f"lora_up has a {up.shape[2]}x{up.shape[3]} kernel, but a LoCon lora_up is a 1x1 "
                                 "convolution (out, r, 1, 1) (the kernel is lora_down's, or lora_mid's with Tucker)")
    if not ok:
        raise ShapeMismatchError(f"{where}: lora_down {down.shape} and lora_up {up.shape} are not LoRA factors "
                                 "of one rank")
    scale = 1.0 if alpha is None else alpha / rank
    if mid is not None:
        return LoraUpdate(module, _tucker_down(where, down, up, mid), up, scale, "conv")
    kind: Kind = "conv" if len(down.shape) == 4 else "linear"
    return LoraUpdate(module, down, up, scale, kind)


def _tucker_down(where: str, down: Tensor, up: Tensor, mid: Tensor) -> Tensor:
    """LoCon Tucker: lora_mid (r, r, kh, kw) contracted with a 1x1 lora_down (r, in, 1, 1) into a
    lora_down of shape (r, in, kh, kw) (float64, stored as float32) whenever it is read; the delta is unchanged."""
    r = down.shape[0]
    if not (len(down.shape) == 4 and down.shape[2:] == (1, 1) and len(mid.shape) == 4
            and mid.shape[:2] == (r, r) and min(mid.shape) > 0):
        raise ShapeMismatchError(f"{where}: lora_mid {mid.shape} does not fit lora_down {down.shape} and lora_up "
                                 f"{up.shape} (a Tucker LoCon has lora_down (r, in, 1, 1), lora_mid (r, r, kh, kw), "
                                 "lora_up (out, r, 1, 1))")
    # Kept as stored: contracted (in tiles, checked against a size cap) only when its values are read;
    # norms, spectra and inner products go through the core (model.spectral).
    return TuckerFactor(mid, down, where)


def _same_number(text: str, value: float) -> bool:
    try:
        return float(text) == value
    except ValueError:
        return False


def kohya_metadata(adapter: Adapter) -> dict[str, str]:
    """The input's metadata with the rank keys (when present) set from the updates, as sd-scripts means
    them: ss_network_dim / ss_network_alpha the rank and alpha of the linear and 1x1 modules, and
    ss_network_args' conv_dim / conv_alpha those of the kxk convolutions (str(int), str(float), as
    resize_lora.py writes them), or "Dynamic" where the modules differ (resize_lora.py's dynamic methods);
    a value that already says the most common number is kept (a file read and written back keeps its bytes).
    conv_dim / conv_alpha change with the others, or in the output of an operation that chooses ranks (resize,
    combine, extract). use_tucker goes when no module keeps a Tucker core."""
    meta = metadata_of(adapter.state)
    updates = list(adapter.updates.values())
    if not updates:
        return meta
    before = (meta.get("ss_network_dim"), meta.get("ss_network_alpha"))
    _rank_keys(meta, _network_modules(updates))
    _lora_network_metadata(meta, updates)
    # conv_dim / conv_alpha follow where the ranks changed or were chosen anew (resize, combine, extract: also
    # when only the convolutions' changed); a file read and written back keeps its bytes
    changed = before != (meta.get("ss_network_dim"), meta.get("ss_network_alpha"))
    _conv_args(meta, updates, changed or _makes_network(adapter) or _computed(adapter))
    return meta


def _computed(adapter: Adapter) -> bool:
    """Whether `adapter` was computed in memory from other adapters (arithmetic: a + b, c * a, to_rank), whose
    ranks are its own, not those its inputs' metadata states."""
    return adapter.path is None and bool(adapter.derived_from)


def _holds(text: str, values: list[float]) -> bool:
    """Whether a rank key's text still says what the modules have: the value most of them (more than half)
    have, or "Dynamic" over values that differ."""
    if text == "Dynamic":
        return len(set(values)) > 1
    top = most_common(values)
    return _same_number(text, top) and 2 * values.count(top) > len(values)


def _dynamic_or(values: list[float], as_int: bool) -> str:
    """The one value of `values` as kohya writes it (str(int) or str(float)), or "Dynamic" where they differ."""
    if len(set(values)) > 1:
        return "Dynamic"
    return str(int(values[0])) if as_int else str(values[0])


def _network_modules(updates: list[Update]) -> list[Update]:
    """The modules ss_network_dim / ss_network_alpha describe: the linear and 1x1 ones (all, where every module
    is a kxk convolution)."""
    return [u for u in updates if not is_kxk(u.delta_shape)] or updates


def _ranked(updates: list[Update]) -> list[Update]:
    """The modules that have a network rank (not a LoKr of two full halves)."""
    return [u for u in updates if network_rank(u) is not None]


def _ranks(updates: list[Update]) -> list[float]:
    """The network ranks of modules that have one (_ranked), as floats."""
    return [float(r) for u in updates if (r := network_rank(u)) is not None]


def _network_texts(ranks: list[float], alphas: list[float]) -> tuple[str, str]:
    """ss_network_dim and ss_network_alpha of modules of these ranks and alphas: the rank and the most common
    alpha, or "Dynamic" for both where the ranks differ (resize_lora.py's dynamic methods)."""
    if len(set(ranks)) > 1:
        return "Dynamic", "Dynamic"
    return str(int(ranks[0])), str(most_common(alphas))


def _rank_keys(meta: dict[str, str], updates: list[Update]) -> None:
    """ss_network_dim / ss_network_alpha, where present, set from `updates` unless what they say still holds (a
    file read and written back)."""
    updates = _ranked(updates)
    if not updates:
        return
    ranks = _ranks(updates)
    alphas = [written_alpha(u) for u in updates]  # as the F32 .alpha tensors will hold them
    for key, values, text in zip(("ss_network_dim", "ss_network_alpha"), (ranks, alphas),
                                 _network_texts(ranks, alphas)):
        old = meta.get(key)
        if old is not None and not _holds(old, values):
            meta[key] = text


def _conv_args(meta: dict[str, str], updates: list[Update], ranks_changed: bool) -> None:
    """ss_network_args' conv_dim / conv_alpha from the kxk convolutions where the ranks changed, unless what they
    say still holds, and use_tucker dropped when no module keeps a Tucker core (where the args are kohya's JSON
    object)."""
    try:
        args = loads_json(meta.get("ss_network_args", ""), "ss_network_args")
    except FormatError:  # absent, or not JSON kohya wrote: left as it is
        return
    if not isinstance(args, dict):
        return
    before = dict(args)
    convs = _ranked([u for u in updates if is_kxk(u.delta_shape)])
    for key, values, as_int in (("conv_dim", _ranks(convs), True),
                                ("conv_alpha", [written_alpha(u) for u in convs], False)):
        if ranks_changed and key in args and convs and not _holds(str(args[key]), values):
            args[key] = _dynamic_or(values, as_int)
    tucker = any(isinstance(u, LoraUpdate) and isinstance(u.A, TuckerFactor) for u in updates)
    if "use_tucker" in args and not tucker:
        args.pop("use_tucker")
    if args != before:
        meta["ss_network_args"] = json.dumps(args)


def _lora_network_metadata(meta: dict[str, str], updates: list[Update]) -> None:
    """A LyCORIS file whose LoHa / LoKr modules all became LoRA (combine, resize, convert) is now a
    plain LoRA: ss_network_module says so and ss_network_args loses the LyCORIS algorithm."""
    if not meta.get("ss_network_module", "").startswith("lycoris") or not all(
            isinstance(u, LoraUpdate) and u.magnitude is None for u in updates):
        return
    meta["ss_network_module"] = "networks.lora"
    try:
        args = loads_json(meta.get("ss_network_args", ""), "ss_network_args")
    except FormatError:  # not JSON kohya wrote: left as it is
        return
    if isinstance(args, dict) and "algo" in args:
        args.pop("algo")
        meta["ss_network_args"] = json.dumps(args)


def kohya_tensors(adapter: Adapter) -> dict[str, Tensor]:
    """The file's tensors, in the order safetensors' writer uses (dtype widest first, then name).
    `.alpha` is written in the dtype it was read in (KohyaState.alpha_dtypes) when that holds
    scale * rank exactly, else as F32; a module read without `.alpha` gets none while its scale is 1.
    A scale whose alpha would not read back (0, which kohya reads as alpha = rank, or one that float32
    makes 0 or inf) goes into lora_up instead, with alpha = rank: the file reads back to the same delta.
    A DoRA magnitude is written as LyCORIS' `dora_scale`."""
    out: dict[str, Tensor] = {}
    for name, u in adapter.updates.items():
        out.update(kohya_module_tensors(adapter, name, u))
    if adapter.full:
        raise UnsupportedError(f"{adapter.label}: full tensors ({', '.join(sorted(adapter.full)[:3])}) "
                               "cannot be stored in a kohya LoRA file")
    return dict(sorted(out.items(), key=lambda kv: (_DTYPE_ORDER.get(kv[1].dtype, 9), kv[0])))


def kohya_module_tensors(adapter: Adapter, name: str, u: Update) -> dict[str, Tensor]:
    """One module's tensors in the file (see kohya_tensors); `adapter` gives the label and the alpha dtypes."""
    where = f"{adapter.label}: module {name!r}"
    if not name.startswith(PREFIXES) or "." in name:
        raise UnsupportedError(f"{where}: not a kohya module name (lora_unet_..., lora_te_...); "
                               "the kohya format cannot name it")
    state = as_kohya(adapter.state)
    recorded = state.alpha_dtypes
    alpha_dtype = recorded[name] if name in recorded else "F32"
    form = state.alpha_forms.get(name)
    if isinstance(u, LycorisUpdate):
        out = _lycoris_module_tensors(where, name, u, alpha_dtype, state.unused_alphas.get(name, 1.0), form)
    else:
        out = _lora_module_tensors(where, name, u, alpha_dtype, form)
    if u.magnitude is not None:
        out[name + ".dora_scale"] = _dora_scale(where, u, name in state.conv_dora)
    return _in_layout(out, name, state.layouts.get(name))


def _lora_module_tensors(where: str, name: str, u: LoraUpdate, alpha_dtype: str | None,
                         form: AlphaForm | None = None) -> dict[str, Tensor]:
    if u.bias is not None:
        raise UnsupportedError(f"{where} has a lora_B bias; the kohya format cannot store it")
    if u.laid_as(False).transposed or u.kind == "embedding":  # (fan_in_fan_out alone: the same factors)
        raise UnsupportedError(f"{where} is a transposed ({u.kind}) update; the kohya format stores "
                               "lora_down (r x in) and lora_up (out x r) only")
    if not _alpha_reads_back(u.scale, u.rank):
        up, scale = _folded(where, u.B, u.scale, "lora_up"), 1.0
    else:  # a negative scale's sign goes into lora_up (exactly): alpha stays positive (_signed)
        up, scale = _signed(u.B, u.scale), abs(u.scale)
    out: dict[str, Tensor] = {name + ".lora_down.weight": u.A, name + ".lora_up.weight": up}
    alpha = _kept_alpha(form, scale, u.rank, alpha_dtype)
    alpha = _alpha_tensor(scale, u.rank, alpha_dtype) if alpha is None else alpha
    if alpha is not None:
        out[name + ".alpha"] = alpha
    return out


def _lycoris_module_tensors(where: str, name: str, u: LycorisUpdate, alpha_dtype: str | None,
                            unused_alpha: float, form: AlphaForm | None = None) -> dict[str, Tensor]:
    """A LoHa's / LoKr's pieces as they were read (hada_* / lokr_*), and `.alpha` = scale * r, r the rank LyCORIS
    divides alpha by (formats.lycoris_keys.scale_rank). A scale alpha cannot carry (a LoKr of two full halves,
    whose scale LyCORIS fixes at 1; a scale whose alpha would not read back) goes into the first half's first
    piece (hada_w1_a, lokr_w1 or lokr_w1_a: the delta is linear in it), rounded once to its dtype; the alpha of
    a LoKr of two full halves is the one read (`unused_alpha`, KohyaState.unused_alphas), which no reader uses."""
    rank = scale_rank(u.algo, u.tensors)
    parts = dict(u.tensors)
    scale = u.scale
    first = next(k for k in ("hada_w1_a", "lokr_w1", "lokr_w1_a") if k in parts)
    if rank is None or not _alpha_reads_back(scale, rank):
        if scale != 1.0:
            parts[first] = _folded(where, parts[first], scale, first)
        scale = 1.0
    else:  # a negative scale's sign goes into the first piece (exactly): alpha stays positive (_signed)
        parts[first], scale = _signed(parts[first], scale), abs(scale)
    out = {f"{name}.{part}": t for part, t in parts.items()}
    alpha = _kept_alpha(form, scale, rank, alpha_dtype)
    if alpha is None:
        alpha = _alpha_tensor(unused_alpha, 1, alpha_dtype) if rank is None else _alpha_tensor(scale, rank, alpha_dtype)
    if alpha is not None:
        out[name + ".alpha"] = alpha
    return out


def _alpha_reads_back(scale: float, rank: int) -> bool:
    """Whether an `.alpha` of scale * rank reads back as that scale: kohya's loaders (and lorafuse's) take
    alpha 0 as alpha = rank, and read alpha as float32, where a tiny value is 0 and a huge one inf."""
    value = scale * rank
    with np.errstate(over="ignore", under="ignore"):
        as_read = np.float32(value)
    return value != 0 and as_read != 0 and bool(np.isfinite(as_read))


def _signed(t: Tensor, scale: float) -> Tensor:
    """Factor `t` with the sign of `scale`: -t, exactly and in its own dtype (the sign bit flipped), for a
    negative scale, so that `.alpha` = |scale| * rank is positive. diffusers' kohya converters (Flux, Wan, Qwen,
    ...) split alpha / rank between the factors by doubling one half until it passes the other, which never ends
    for a negative alpha; sd-scripts and ComfyUI read the file the same either way."""
    if scale >= 0:
        return t
    raw = t.copy()
    if raw.dtype.kind == "f":
        return Tensor(-raw, t.dtype)
    return Tensor(raw ^ raw.dtype.type(1 << (8 * raw.itemsize - 1)), t.dtype)  # BF16 / F8 travel as uint


def _folded(where: str, t: Tensor, scale: float, what: str) -> Tensor:
    """Factor `t` (named `what`) times `scale`, in its dtype (F32 for one lorafuse does not write): for a scale
    whose alpha would not read back (_alpha_reads_back), the scale goes into a factor and alpha is the rank.
    Scale 0 gives a zero factor (kohya reads alpha 0 as alpha = rank: full strength). A product that its dtype
    cannot hold (beyond its largest value, or lost below its smallest: `1e-50 * a`) is refused, naming the
    module, never written as Inf or zeros."""
    with np.errstate(over="ignore", under="ignore"):
        b64 = t.f32().astype(np.float64) * scale
        b = b64.astype(np.float32)
    if not np.isfinite(b).all():
        raise UnsupportedError(f"{where}: scale {scale:.4g} times {what} is beyond float32's range: the kohya "
                               "format cannot store this module")
    if t.dtype == "F64":
        return Tensor.from_array(b64)
    out = Tensor.from_array(b)
    out = out.to(t.dtype) if t.dtype in WRITABLE_FLOATS and t.dtype != "F32" else out
    _refuse_lost_fold(where, b64, out, scale, what)
    return out


def _refuse_lost_fold(where: str, want: np.ndarray, out: Tensor, scale: float, what: str) -> None:
    """Refuse (UnsupportedError naming the module) a folded factor `out` that does not hold `want` (its float64
    product): Inf beyond its dtype's largest value, or most of its norm lost below the dtype's smallest one
    (kohya reads `.alpha` as float32, so that a scale alpha cannot hold goes into the factor whole)."""
    total = float(np.linalg.norm(want))
    if scale == 0 or not total > 0:
        return
    with np.errstate(over="ignore", invalid="ignore"):
        held = out.f32().astype(np.float64)
        lost = float(np.linalg.norm(held - want)) / total
    if np.isfinite(held).all() and lost <= 2.0**-4:
        return
    why = (f"beyond the largest {out.dtype} value" if not np.isfinite(held).all()
           else f"below the smallest {out.dtype} value ({min(lost, 1.0):.0%} of its norm lost)")
    raise UnsupportedError(f"{where}: scale {scale:.4g}, which its .alpha cannot hold as float32 (as kohya reads "
                           f"it), goes into {what}, and the product is {why}: the kohya format cannot store this "
                           "module (write it as a PEFT or diffusers adapter, whose config holds any scale)")


def network_rank(u: Update) -> int | None:
    """The rank kohya's metadata (ss_network_dim, conv_dim) means for a module: a LoRA's r, a LoHa's / LoKr's
    lora_dim (the r of scale = alpha / r; None for a LoKr of two full halves, which has none)."""
    return scale_rank(u.algo, u.tensors) if isinstance(u, LycorisUpdate) else u.rank


def written_alpha(u: Update) -> float:
    """The alpha the file holds for `u` as float32 reads it: scale * rank, or the rank when the scale goes
    into a factor (_folded; 1 for a LoKr of two full halves)."""
    rank = network_rank(u)
    if rank is None:
        return 1.0
    if not _alpha_reads_back(u.scale, rank):
        return float(rank)
    return float(np.float32(abs(u.scale) * rank))  # a negative scale's sign goes into a factor (_signed)


AlphaForm = tuple[tuple[int, ...], float]  # an `.alpha`'s shape and value as read (KohyaState.alpha_forms)


def _kept_alpha(form: AlphaForm | None, scale: float, rank: int | None, dtype: str | None) -> Tensor | None:
    """The `.alpha` as it was read when stored as 0 or not as a scalar (KohyaState.alpha_forms), where it still
    reads as the module's `scale` over `rank` (0: alpha = rank; rank None: a LoKr of two full halves, whose alpha
    no reader uses), so that a file goes through lorafuse unchanged; None: write it anew (_alpha_tensor)."""
    if form is None or dtype not in ("F64", "F32", "F16", "BF16"):
        return None
    shape, value = form
    if rank is not None and (1.0 if value == 0 else value / rank) != scale:
        return None
    t = _alpha_tensor(value, 1, dtype)
    return None if t is None or t.dtype != dtype else Tensor(t.raw.reshape(shape), dtype)


def _alpha_tensor(scale: float, rank: int, dtype: str | None) -> Tensor | None:
    """The alpha scale * rank as a scalar of `dtype` if it holds the value exactly, else F32;
    None (no tensor) for dtype None and scale 1."""
    value = scale * rank
    if dtype is None and scale == 1.0:
        return None
    if dtype == "F64":
        return Tensor(np.array(value, dtype=np.float64), "F64")
    if dtype in ("F16", "BF16"):
        with np.errstate(over="ignore"):
            t = Tensor(get_backend().from_float32(np.array([value], dtype=np.float32), dtype, 1).reshape(()), dtype)
        if float(t.f32().reshape(-1)[0]) == value:
            return t
    return Tensor(np.array(value, dtype=np.float32), "F32")


def _dora_scale(where: str, u: Update, conv: bool = False) -> Tensor:
    """LyCORIS' dora_scale: (out, 1) / (out, 1, 1, 1) per output row (a convolution's: `u` is one, or `conv`
    says the file stored it so), (1, in) per column."""
    m = u.magnitude
    assert m is not None
    rows, cols = u.delta_shape[0], int(np.prod(u.delta_shape[1:], dtype=np.int64))
    count = cols if u.magnitude_on_columns else rows
    if int(np.prod(m.shape, dtype=np.int64)) != count:
        raise ShapeMismatchError(f"{where}: DoRA magnitude {m.shape} does not have one value per "
                                 f"{'column' if u.magnitude_on_columns else 'row'} of {tuple(u.delta_shape)}")
    if u.magnitude_on_columns:
        if u.kind == "conv":
            raise UnsupportedError(f"{where}: per-column DoRA of a convolution has no dora_scale layout")
        shape: tuple[int, ...] = (1, count)
    else:
        shape = (count, 1, 1, 1) if u.kind == "conv" or conv else (count, 1)
    return Tensor(np.ascontiguousarray(m.raw).reshape(shape), m.dtype)


_LEGACY_START, _LEGACY_LENGTH = 0x100000, 0x10000
# Placeholders of the hashes' lengths (sha256 hex, its first 8 digits): the header is written before the data
# it hashes, and rewritten in place once the data is complete (formats.streaming).
_HASH_PLACEHOLDERS = ("0" * 64, "0" * 8)


def kohya_hashes(specs: Sequence[TensorSpec], metadata: Mapping[str, str],
                 data: Iterable[bytes | memoryview]) -> tuple[str, str]:
    """sd-scripts' (sshs_model_hash, sshs_legacy_hash) of a file with tensors `specs` whose data buffer is
    the concatenation of `data`: the sha256 of the data buffer, and the first 8 hex digits of the sha256 of
    bytes 0x100000..0x110000 of the file written with only ss_* metadata. One pass over the data."""
    header, _ = encode_header(specs, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    model = hashlib.sha256()
    window = bytearray(_byte_window(header, 0))
    pos = len(header)
    for chunk in data:
        model.update(chunk)
        window += _byte_window(chunk, pos)
        pos += len(chunk)
    return model.hexdigest(), hashlib.sha256(bytes(window)).hexdigest()[:8]


def _byte_window(chunk: bytes | memoryview, pos: int) -> bytes:
    """The bytes of `chunk` (at file offset `pos`) inside the legacy hash's window."""
    lo, hi = max(_LEGACY_START - pos, 0), min(_LEGACY_START + _LEGACY_LENGTH - pos, len(chunk))
    return bytes(chunk[lo:hi]) if lo < hi else b""


# Operations whose output is a new network, for which sd-scripts' merge / svd_merge / resize / extract scripts
# write the minimum network metadata and the model hashes whatever the input had.
_MAKES_NETWORK = ("combine", "resize", "extract")


def _makes_network(adapter: Adapter) -> bool:
    """Whether `adapter` was made by an operation that chooses ranks anew (_MAKES_NETWORK)."""
    return adapter.provenance is not None and adapter.provenance.operation in _MAKES_NETWORK


def _minimum_network_metadata(meta: dict[str, str], adapter: Adapter) -> None:
    """sd-scripts' minimum network metadata (ss_network_module, ss_network_dim, ss_network_alpha) where the
    metadata lacks it: the rank and (most common) alpha of the linear and 1x1 modules, or "Dynamic" where their
    ranks differ, as kohya_metadata writes them."""
    updates = list(adapter.updates.values())
    if not updates:
        return
    groups = _ranked(_network_modules(updates))
    if not groups:
        return
    dim, alpha = _network_texts(_ranks(groups), [written_alpha(u) for u in groups])
    meta.setdefault("ss_network_module", "networks.lora")
    meta.setdefault("ss_network_dim", dim)
    meta.setdefault("ss_network_alpha", alpha)


def kohya_plan(adapter: Adapter) -> WritePlan:
    """What save_kohya writes for `adapter` (its updates may be a layout's placeholders: formats.streaming):
    the header in safetensors' order, the metadata with lorafuse's mark and the adapter's provenance
    (io.provenance: `lorafuse.*` keys; those the input carried are dropped); sd-scripts' hashes, when the
    metadata has them or the adapter was made by combine, resize or extract (as sd-scripts' scripts write
    them, with the minimum network metadata), computed from the written data when it is complete."""
    specs = specs_of(kohya_tensors(adapter))
    meta = kohya_metadata(adapter)
    made = _makes_network(adapter)
    if made:
        _minimum_network_metadata(meta, adapter)
    meta, finish = own_hashes(specs, meta, adapter, made)
    return WritePlan(adapter.label, list(adapter.updates), specs, meta,
                     functools.partial(kohya_module_tensors, adapter), finish=finish)


STALE_HASH_KEYS = ("modelspec.hash_sha256",)  # an input's claim of its own weights' sha256, not recomputed


def own_hashes(specs: Sequence[TensorSpec], metadata: Mapping[str, str], adapter: Adapter, made: bool = False
               ) -> tuple[dict[str, str], Callable[[Callable[[], Iterator[memoryview]]], dict[str, str]] | None]:
    """The metadata of a file written with tensors `specs` (lorafuse's mark and the adapter's provenance added)
    with no hash that describes another file: sd-scripts' sshs_model_hash / sshs_legacy_hash, when the metadata
    has them or `made`, as same-length placeholders that the returned `finish` replaces by the written data's
    (formats.streaming.WritePlan), and an input's modelspec.hash_sha256 (the input's weights') dropped."""
    meta = {k: v for k, v in metadata.items() if k not in STALE_HASH_KEYS}
    hashed = made or "sshs_model_hash" in meta or "sshs_legacy_hash" in meta
    if hashed:
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = _HASH_PLACEHOLDERS
    meta = mark_metadata(stamp(meta, adapter.provenance))

    def with_hashes(data: Callable[[], Iterator[memoryview]]) -> dict[str, str]:
        final = dict(meta)
        final["sshs_model_hash"], final["sshs_legacy_hash"] = kohya_hashes(specs, meta, data())
        return final

    return meta, with_hashes if hashed else None


def save_kohya(adapter: Adapter, out: str | os.PathLike[str], inputs: Sequence[Path] = (),
               overwrite: bool = False) -> Path:
    """Write `adapter` as one kohya `.safetensors` file, atomically. Factors keep their stored dtype;
    `.alpha` equals scale * rank, so each module's scale is kept (see kohya_tensors for its dtype, when
    it is left out, and the scales that go into lora_up instead: 0 among them). LoHa / LoKr updates are
    refused: convert them to LoRA first. sd-scripts' model hashes in the metadata, when present, are
    recomputed for the tensors written. The metadata gets
    lorafuse's mark (`lorafuse_version`); an existing file without it is refused unless `overwrite`."""
    return write_adapter(kohya_plan(adapter), adapter.updates, out, inputs, overwrite)


def _sniff(path: Path, keys: list[str]) -> bool:
    return has_kohya_keys(keys)


def _save(adapter: Adapter, out: str | os.PathLike[str], overwrite: bool) -> Path:
    return save_kohya(adapter, out, adapter.sources(), overwrite=overwrite)


FORMAT = register(FormatSpec("kohya", _sniff, load_kohya, _save, "a kohya LoRA .safetensors file", priority=10,
                             open_stream=stream_with(kohya_plan)))
