"""convert: kohya <-> diffusers/PEFT naming of diffusion LoRAs (lossless), and LoHa / LoKr -> LoRA.

kohya -> peft: every kohya module is renamed with `sd_keys.to_diffusers`; a fused kohya module
(Flux `img_attn_qkv`, `linear1`) becomes several diffusers modules, each taking its rows of B
and the same A. The output is a diffusers LoRA file (formats.diffusers) that records the kohya
family, alpha tensors and metadata, so converting it back gives the same file byte for byte.

peft -> kohya: `sd_keys.to_kohya` says which diffusers modules make each kohya module. One
module is renamed; several are fused: when their A (and scale) are the same, B's rows are stacked
and the rank stays r; otherwise B is block-diagonal and A stacked (the ranks add), exact but where
the parts' scales have ratios that are no binary fractions (`_block_diagonal`: float32 rounding).
The family whose names are used is guessed from names one family alone has (`sd_keys.guess_family`):
Flux's diffusers names are SD3's, QwenImage's, ... too.

LoHa / LoKr modules become their best rank-k LoRA (Eckart-Young, `LycorisUpdate.to_lora`), k
from `rank` (`conv_rank` for kxk convolutions, k > 1), its factors rounded once to the input's factor
dtype (resize's rule); plain LoRA modules are kept as they are.

-> gguf: an LLM LoRA (PEFT) as the GGUF LoRA adapter llama.cpp loads (`llama-cli --lora X.gguf`), with the
tensor names, orientation, scale and metadata of llama.cpp's convert_lora_to_gguf.py (formats.gguf).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from lorafuse._terminal import plural
from lorafuse._validate import check_optional_rank, check_path, check_text, check_threads, full_rank
from lorafuse.errors import (
    AdapterNote,
    FormatError,
    LorafuseError,
    LorafuseValueError,
    MissingModuleError,
    NonFiniteError,
    ShapeMismatchError,
    UnsupportedError,
    warn,
)
from lorafuse.formats import load
from lorafuse.formats.diffusers import save_diffusers, split_name
from lorafuse.io.atomic import check_output, check_output_path, output_file
from lorafuse.io.hub import check_spec
from lorafuse.io.manifest import ADAPTER
from lorafuse.io.provenance import adapter_input, record
from lorafuse.io.tensor import Tensor
from lorafuse.model import Adapter, LoraUpdate, Update
from lorafuse.model.arithmetic import restated_config
from lorafuse.model.layout import factor_dtypes, factors_dtype, is_kxk, rounded
from lorafuse.model.state import DiffusersState, KohyaState, as_kohya, metadata_of
from lorafuse.model.update import holds_nonfinite, nonfinite_words

if TYPE_CHECKING:
    from lorafuse.formats.gguf import GgufPlan

TARGETS = ("peft", "kohya", "gguf")
FAMILIES = ("sd1", "sdxl", "flux", "flux2", "wan")
Rows = tuple[int, int] | None


@dataclass
class LycorisReport:
    """One LoHa / LoKr module turned into a rank-k LoRA."""

    name: str
    algo: str  # 'loha' or 'lokr'
    shape: tuple[int, ...]
    rank: int
    fro_kept: float  # ||best rank-k||_F / ||delta||_F, from the singular values


@dataclass
class ConvertReport:
    out: Path
    to: str
    family: str | None
    modules_in: int
    modules_out: int
    split: dict[str, list[str]] = field(default_factory=dict)  # input module -> the modules it became
    fused: dict[str, list[str]] = field(default_factory=dict)  # output module -> the modules it came from
    lycoris: list[LycorisReport] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)  # each output module's rank, in output order
    seconds: float = 0.0  # wall time of the run, the writing included
    notes: list[str] = field(default_factory=list)  # what the run decided for the user (the AdapterReport shape)
    # --to gguf: the --arch choice, the tensor type, adapter.lora.alpha, the modules whose scale was folded
    # into lora_b (module -> factor) and the Q8_0 tensors written F16
    arch: str | None = None
    gguf_type: str | None = None
    alpha: float | None = None
    folded: dict[str, float] = field(default_factory=dict)
    fallback: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- naming


def _sd_keys():
    from lorafuse.formats import sd_keys

    return sd_keys


def _naming(family: str) -> ModuleType:
    """The module that names the family's modules: formats.flux2_names for Flux.2, formats.wan_names for Wan, else
    formats.sd_keys."""
    if family == "flux2":
        from lorafuse.formats import flux2_names

        return flux2_names
    if family == "wan":
        from lorafuse.formats import wan_names

        return wan_names
    return _sd_keys()


def _evidence(adapter: Adapter) -> dict[str, str | None]:
    """What each module says of Flux.1 or Flux.2 (formats.flux2_names: 'flux', 'flux2', 'either', 'differs')."""
    from lorafuse.formats import flux2_names

    if adapter.format == "kohya":
        return {n: flux2_names.kohya_evidence(n, tuple(u.delta_shape)) for n, u in adapter.updates.items()}
    return {n: flux2_names.diffusers_evidence(n) for n in adapter.updates}


def _first(evidence: dict[str, str | None], *kinds: str | None) -> str | None:
    return next((n for n, e in evidence.items() if e in kinds), None)


def _shape_of(adapter: Adapter, name: str) -> str:
    return f"{name!r} {tuple(adapter.updates[name].delta_shape)}"


def _flux_generation(adapter: Adapter, family: str | None) -> str | None:
    """Flux.1 ('flux') or Flux.2 ('flux2') where the modules are Flux-worded (None where they are not): `family` as
    given, refused where a module is the other family's alone; else from the layers (or MLP widths) one of them
    alone has; refused where none does and a module takes another diffusers name in each (`time_in.in_layer`: Flux.1's
    `time_text_embed...`, Flux.2's `time_guidance_embed...`), naming it and --family."""
    evidence = _evidence(adapter)
    one, two = _first(evidence, "flux"), _first(evidence, "flux2")
    if family in ("flux", "flux2"):
        other, alone, given = (two, "Flux.2", "Flux.1") if family == "flux" else (one, "Flux.1", "Flux.2")
        if other is not None:
            fit = "flux2" if family == "flux" else "flux"
            raise UnsupportedError(f"{adapter.label}: family {family!r} does not fit its modules: "
                                   f"{_shape_of(adapter, other)} is no layer (or width) of {given}, a layer of "
                                   f"{alone} alone; --family {fit} (Python: family={fit!r}) names it")
        return family
    if family is not None or (one is None and two is None and _first(evidence, "differs") is None):
        return None
    if one is not None and two is not None:
        raise UnsupportedError(f"{adapter.label}: its modules are of two models: {_shape_of(adapter, one)} is a layer "
                               f"(or width) of Flux.1 alone, {_shape_of(adapter, two)} of Flux.2 alone; nothing "
                               "was written")
    if one is not None or two is not None:
        return "flux" if two is None else "flux2"
    differs = _first(evidence, "differs")
    assert differs is not None
    raise LorafuseValueError(f"{adapter.label}: cannot tell Flux.1 from Flux.2 by its modules: {differs!r} is a layer "
                             "of both under other diffusers names (Flux.1: time_text_embed..., Flux.2: "
                             "time_guidance_embed...) and no module is a layer one of them alone has; name the family: "
                             "--family flux or --family flux2 (Python: family='flux' / 'flux2')")


def _family(adapter: Adapter, family: str | None) -> str:
    """The family whose names the output takes: `family` as given (refused where the modules are another
    family's layers: a UNet module for flux, a Flux transformer module for sd1 / sdxl, a Flux.2 one for flux; the
    names would not be the family's), else the one the input recorded, else the guess from names one family alone
    has (sd_keys.guess_family: refused for Flux's diffusers names, which SD3, QwenImage, ... share), Flux.1 and
    Flux.2 told apart by `_flux_generation`."""
    if family is not None:
        if family not in FAMILIES:
            raise LorafuseValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
        if family == "flux2":
            return _flux2_family(adapter)
        if family == "wan":
            return _wan_family(adapter)
        if family == "flux":
            _flux_generation(adapter, family)
        other = "unet" if family == "flux" else "flux"
        name = next((n for n in adapter.updates if _sd_keys().model_part(n) == other), None)
        if name is not None:
            what = "an SD 1.x / SDXL UNet (Flux has none)" if other == "unet" else "a Flux transformer"
            raise UnsupportedError(f"{adapter.label}: family {family!r} does not fit its modules: {name!r} is a layer "
                                   f"of {what}; leave --family out (family=None) to take the family its names say")
        misfit = _sd_keys().unet_misfit(adapter.updates, family) if family != "flux" else None
        if misfit is not None:
            unet = "SD 1.x/2.x" if family == "sd1" else "SDXL"
            raise UnsupportedError(f"{adapter.label}: family {family!r} does not fit its modules: {misfit!r} is not a "
                                   f"layer of the {unet} UNet; leave --family out (family=None) to take the family "
                                   "its names say")
        return family
    record = adapter.state.kohya if isinstance(adapter.state, DiffusersState) else None
    if isinstance(record, dict) and record.get("family") in FAMILIES:
        return str(record["family"])
    if adapter.format == "kohya":
        generation = _flux_generation(adapter, None)
        if generation == "flux2":
            return _flux2_family(adapter)
    try:
        guessed = str(_sd_keys().guess_family(list(adapter.updates)))
    except LorafuseValueError as e:
        raise LorafuseValueError(f"{adapter.label}: {e}{_family_hint(adapter)}") from None
    if guessed == "flux" and adapter.format == "kohya":
        _flux_generation(adapter, None)  # refused where Flux.1 and Flux.2 would name a module apart
    return guessed


def _family_hint(adapter: Adapter) -> str:
    """What to add to a failed guess where a module is a layer of Flux.2 or Wan, whose names convert takes only when
    told (Flux.2's diffusers names, Wan's names: other models share them)."""
    from lorafuse.formats import wan_names

    own = _first(_evidence(adapter), "flux2")
    if own is not None:
        return (f"; {own!r} is a diffusers layer of Flux.2: if it is a Flux.2 LoRA, name the family: --family flux2 "
                "(Python: family='flux2')")
    wan = next((n for n in adapter.updates if wan_names.diffusers_path(n) is not None), None)
    if wan is not None:
        return (f"; {wan!r} is a layer of Wan 2.1 / 2.2 (as musubi-tuner, ComfyUI or diffusers name it), whose names "
                "other models share: if it is a Wan LoRA, name the family: --family wan (Python: family='wan')")
    return ""


def _wan_family(adapter: Adapter) -> str:
    """'wan', refused where a module is no layer of Wan's tables (formats.dit_keys.WAN)."""
    from lorafuse.formats import wan_names

    misfit = next((n for n in adapter.updates if wan_names.diffusers_path(n) is None), None)
    if misfit is not None:
        raise UnsupportedError(f"{adapter.label}: family 'wan' does not fit its modules: "
                               f"{_shape_of(adapter, misfit)} is no layer of the Wan 2.1 / 2.2 transformer that "
                               "lorafuse names (blocks.N.self_attn.q, cross_attn.k_img, ffn.0, head.head, ...: "
                               "formats.dit_keys.WAN); leave --family out "
                               "(family=None) to take the family its names say")
    return "wan"


def _flux2_family(adapter: Adapter) -> str:
    """'flux2', refused where a module is no layer of Flux.2 (a UNet's, a text encoder's, Flux.1's alone)."""
    _flux_generation(adapter, "flux2")
    evidence = _evidence(adapter)
    misfit = _first(evidence, None)
    if misfit is not None:
        raise UnsupportedError(f"{adapter.label}: family 'flux2' does not fit its modules: "
                               f"{_shape_of(adapter, misfit)} is no layer of the Flux.2 transformer that lorafuse "
                               "names (its text encoder's neither); leave --family out (family=None) to take the "
                               "family its names say")
    return "flux2"


def _refuse_lycoris_names(adapter: Adapter) -> None:
    """Refuse a file named by LyCORIS's own wrapper (create_lycoris: 'lycoris_' + a layer's path in any model, its
    dots turned into '_'): no family's kohya names, so no diffusers name follows from them."""
    generic = [n for n in adapter.updates if n.startswith("lycoris_")]
    if not generic:
        return
    which = (f"modules {generic[0]!r} and {len(generic) - 1} more carry" if len(generic) > 1
             else f"module {generic[0]!r} carries")
    raise UnsupportedError(f"{adapter.label}: {which} the names LyCORIS's own wrapper "
                           "gives a layer of any model (create_lycoris: 'lycoris_' + its path, dots turned into '_'), "
                           "not kohya's lora_unet_ / lora_te_ names of an SD / SDXL / Flux layer, so no diffusers "
                           "name follows from them; convert --to peft reads kohya names (apply merges this file into "
                           "its base)")


def _unmapped_error(adapter: Adapter, names: list[str], what: str, why: str | None = None) -> MissingModuleError:
    shown = ", ".join(f"{n!r} {tuple(adapter.updates[n].delta_shape)}" for n in names[:5])
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return MissingModuleError(f"{adapter.label}: {plural(len(names), 'module', verb=('has', 'have'))} no {what} "
                              f"name: {shown}{more}; {'' if why is None else why + '; '}"
                              "nothing was written")


# ----------------------------------------------------------------------------- LoHa / LoKr -> LoRA


def _conv_shape(u: Update, context: int | None) -> tuple[int, ...]:
    """The 4-D shape of a flattened LoHa / LoKr convolution of a UNet (from the layer's name, and for proj_in /
    proj_out the UNet's context size), else its own."""
    from lorafuse.formats.sd_keys import flattened_conv_shape

    return flattened_conv_shape(u.name, tuple(u.delta_shape), context)


def lycoris_to_lora(adapter: Adapter, rank: int | None, conv_rank: int | None = None,
                    threads: int = 0) -> tuple[Adapter, list[LycorisReport]]:
    """Every LoHa / LoKr module replaced by its best rank-k LoRA (k = rank, or conv_rank for kxk
    convolutions with k > 1; default rank); LoRA modules are kept. Without rank, LyCORIS input is refused.
    A LoHa / LoKr of a UNet convolution stored flattened (no Tucker core) gets its kernel back from the
    layer's name, so the LoRA has conv factors (A: k x in x kh x kw) as kohya and diffusers store them."""
    rank, conv_rank = check_optional_rank(rank), check_optional_rank(conv_rank, "conv_rank")
    threads = check_threads(threads)
    lycoris = [n for n, u in adapter.updates.items() if not isinstance(u, LoraUpdate)]
    if not lycoris:
        if rank is not None or conv_rank is not None:
            raise _unused_rank(adapter, "conv_rank" if rank is None else "rank")
        return adapter, []
    if rank is None:
        shown = ", ".join(repr(n) for n in lycoris[:3]) + (", ..." if len(lycoris) > 3 else "")
        raise UnsupportedError(f"{adapter.label}: {plural(len(lycoris), 'module', verb=('is', 'are'))} LoHa / "
                               f"LoKr ({shown}); converting "
                               "them to LoRA loses information: pass --rank K (and --conv-rank K for kxk "
                               "convolutions; Python: rank=K, conv_rank=K) to keep their best rank-K approximation")
    conv_k = conv_rank if conv_rank is not None else rank
    from lorafuse.formats.sd_keys import is_unet_proj, unet_context_size

    context = unet_context_size({n: tuple(u.delta_shape) for n, u in adapter.updates.items()})
    unsure = [n for n in lycoris if context is None and is_unet_proj(n) and len(adapter.updates[n].delta_shape) == 2]
    if unsure:
        warn(f"{adapter.label}: {plural(len(unsure), 'LoHa / LoKr module')} ({unsure[0]}, ...) of a "
             "transformer's proj_in / proj_out, stored flattened, written as Linear factors (SD 2.x, SDXL); "
             "in SD 1.x these layers are 1x1 convolutions, which the adapter tells only through its "
             "cross-attention modules (attn2.to_k, none here): for SD 1.x convert an adapter that has "
             "them", AdapterNote)
    shapes = {name: _conv_shape(adapter.updates[name], context) for name in lycoris}
    if conv_rank is not None and not any(is_kxk(shape) for shape in shapes.values()):
        raise _unused_rank(adapter, "conv_rank", lycoris=True)
    _refuse_cut_dora(adapter, {n: (full_rank(conv_k if is_kxk(s) else rank, s), is_kxk(s)) for n, s in shapes.items()})
    out_dtype = _lora_dtype(adapter)
    updates: dict[str, Update] = dict(adapter.updates)
    reports: list[LycorisReport] = []
    for name in lycoris:
        u = adapter.updates[name]
        shape = shapes[name]
        if shape != tuple(u.delta_shape):
            u = u.with_shape(shape)  # type: ignore[union-attr]
        k = full_rank(conv_k if is_kxk(shape) else rank, shape)  # at most min(out, in * kh * kw)
        lora = u.to_lora(k, threads)  # type: ignore[union-attr]
        try:  # computed in float32, rounded once; a delta the input's dtype cannot hold is refused, never zeroed
            updates[name] = rounded(lora, out_dtype, threads, refuse_underflow=True, advice=_FP32_ADVICE)
        except (NonFiniteError, UnsupportedError) as e:
            raise type(e)(f"{adapter.label}: {e}") from None
        reports.append(LycorisReport(name, str(getattr(u, "algo", type(u).__name__)), shape, lora.rank,
                                     _kept(u, lora, threads)))
    from lorafuse.formats.sd_keys import kernel_unknown, note_unknown_kernels

    note_unknown_kernels(adapter.label, [n for n in lycoris if kernel_unknown(n, tuple(updates[n].delta_shape))])
    out = Adapter(updates=updates, full=dict(adapter.full), config=restated_config(adapter.config, updates),
                  format=adapter.format, path=adapter.path, full_origin=dict(adapter.full_origin),
                  state=copy.deepcopy(adapter.state))
    return out, reports


def _refuse_cut_dora(adapter: Adapter, ranks: dict[str, tuple[int, bool]]) -> None:
    """Refuse a DoRA LoHa / LoKr module whose rank-k LoRA would not be exact (k below the rank of its delta): its
    magnitude was trained for the whole delta, so a cut delta is no approximation of the merged weight (as resize
    refuses DoRA). A k that keeps the delta exactly is fine. `ranks`: module -> (k, whether a kxk convolution)."""
    for name, (k, kxk) in ranks.items():
        u = adapter.updates[name]
        if u.magnitude is not None and k < u.rank:
            flag = "--conv-rank" if kxk else "--rank"
            raise UnsupportedError(
                f"{adapter.label}: module {name!r} is DoRA (dora_scale) on a {getattr(u, 'algo', 'LyCORIS')} "
                f"update of shape {tuple(u.delta_shape)} and rank {u.rank}; its rank cannot be reduced to {k} "
                f"independently of the magnitude vector (as resize refuses): pass {flag} {u.rank} or more "
                f"(Python: {flag[2:].replace('-', '_')}=) for its exact LoRA, or merge it into the base with `apply`")


_FP32_ADVICE = ("convert writes the LoRA of a LoHa / LoKr module in the input's factor dtype and has no --dtype: "
                "first make the adapter a float32 LoRA with lorafuse resize --rank K --dtype fp32 (Python: "
                "lorafuse.resize(..., rank=K, dtype='fp32')), then convert that")


def _lora_dtype(adapter: Adapter) -> str:
    """The dtype of the LoRA factors that LoHa / LoKr modules become: the adapter's factor dtype when all its
    factors share one of F32 / F16 / BF16, else F32, with a note (resize's rule; convert has no --dtype)."""
    found = factor_dtypes(adapter.updates.values())
    out = factors_dtype(found)
    if found and found != [out]:
        warn(f"{adapter.label}: its factors are {' and '.join(found)}, so the LoRA factors of its LoHa / "
             f"LoKr modules are {out} (lorafuse resize --dtype rounds factors to another dtype)",
             AdapterNote)
    return out


def _unused_rank(adapter: Adapter, option: str, lycoris: bool = False) -> LorafuseValueError:
    """The refusal of --rank / --conv-rank (`option`) where it cannot act (as --arch off --to gguf is refused): convert
    keeps LoRA modules as they are and gives only LoHa / LoKr modules a rank (--conv-rank: those of kxk
    convolutions), so the option would change nothing, and the output would record it as used. `lycoris`: the
    adapter has LoHa / LoKr modules, none of them a kxk convolution."""
    flag = "--" + option.replace("_", "-")
    given = f"{flag} (Python: {option}=)"
    if lycoris:
        return LorafuseValueError(f"{adapter.label}: {given} applies to LoHa / LoKr kxk convolutions (k > 1), and none "
                                  "of its LoHa / LoKr modules is one (--rank sets all their ranks): leave it out")
    which = "LoHa / LoKr kxk convolutions (k > 1)" if option == "conv_rank" else "LoHa / LoKr modules"
    return LorafuseValueError(f"{adapter.label}: {given} applies to {which}, which convert turns into their best "
                              "rank-K LoRA, and it has no LoHa / LoKr module: its LoRA modules are written with the "
                              f"ranks they have; leave {flag} out (lorafuse resize changes a LoRA's rank)")


def _kept(u: Update, lora: LoraUpdate, threads: int) -> float:
    """Fraction of ||delta||_F that the rank-k LoRA keeps: sqrt(S_1^2 + .. + S_k^2) / ||S|| for the
    singular values S of the delta, since the best rank-k approximation holds exactly the leading k.
    Both norms come from the structure (no dense delta, no exact factorization and no second SVD)."""
    from lorafuse.model.spectral import frobenius_sq

    total, kept = frobenius_sq(u), frobenius_sq(lora)
    return min(1.0, float(np.sqrt(max(kept, 0.0) / total))) if total > 0 else 1.0


# ----------------------------------------------------------------------------- kohya -> peft


def _take_rows(u: LoraUpdate, rows: list[Rows], name: str) -> LoraUpdate:
    """A plain update named `name` whose B is the concatenation of B's row ranges `rows` (None: all
    rows), in order; A and the bytes of B are unchanged."""
    if rows == [None]:
        return LoraUpdate(name, u.A, u.B, u.scale, u.kind)
    n = u.B.shape[0]
    spans = [(0, n) if r is None else r for r in rows]
    for start, stop in spans:
        if not 0 <= start < stop <= n:
            raise ShapeMismatchError(f"module {u.name!r}: rows [{start}, {stop}) of its delta "
                                     f"{tuple(u.delta_shape)} for {name!r} are out of range")
    raw = u.B.raw[spans[0][0]:spans[0][1]] if len(spans) == 1 else np.concatenate([u.B.raw[a:b] for a, b in spans])
    return LoraUpdate(name, u.A, Tensor(np.ascontiguousarray(raw), u.B.dtype), u.scale, u.kind)


def _plain(adapter: Adapter, name: str) -> LoraUpdate:
    u = adapter.updates[name]
    if isinstance(u, LoraUpdate):  # PEFT's fan_in_fan_out: the same factors on a torch Linear (PEFT ignores it)
        u = u.laid_as(False)
    if not isinstance(u, LoraUpdate):
        raise UnsupportedError(f"{adapter.label}: module {name!r} is a LoHa / LoKr update; pass --rank K (Python: "
                               "rank=K) to convert it to LoRA first")
    why = ("has a DoRA magnitude (dora_scale)" if u.magnitude is not None else
           "has a bias (lora_B bias)" if u.bias is not None else
           "is an embedding LoRA" if u.kind == "embedding" else
           "is stored transposed (fan_in_fan_out)" if u.transposed else
           None if u.is_plain() else "is not a plain LoRA")
    if why is not None:
        raise UnsupportedError(f"{adapter.label}: module {name!r} {why}; convert handles plain LoRA / LoCon modules")
    return u


def kohya_to_peft(adapter: Adapter, family: str | None = None) -> tuple[Adapter, dict[str, list[str]]]:
    """A kohya adapter renamed to diffusers module names (fused modules split); the kohya config
    (metadata, alphas) is kept under config['kohya'] so `peft_to_kohya` can rebuild the file."""
    fam = _family(adapter, family)
    sd_keys = _naming(fam)
    updates: dict[str, Update] = {}
    source: dict[str, str] = {}
    split: dict[str, list[str]] = {}
    unmapped: list[str] = []
    why: list[str] = []  # the first unmapped module's reason
    for name in adapter.updates:
        u = _plain(adapter, name)
        try:
            targets = sd_keys.to_diffusers(name, tuple(u.delta_shape), family=fam)
        except UnsupportedError as e:
            targets = []
            why = why or [str(e)]
        except ShapeMismatchError as e:  # a fused layer's rows that do not split as the layer does: name the file
            raise ShapeMismatchError(f"{adapter.label}: {e}") from None
        if not targets:
            unmapped.append(name)
            continue
        rows_of: dict[str, list[Rows]] = {}
        for target, rows in targets:  # a target listed twice takes both row ranges, in order
            rows_of.setdefault(target, []).append(rows)
        parts = _unstacked({target: _take_rows(u, rows_list, target) for target, rows_list in rows_of.items()})
        for target, part in parts.items():
            if target in updates:
                raise FormatError(f"{adapter.label}: modules {source[target]!r} and {name!r} both name the "
                                  f"diffusers module {target!r}")
            updates[target] = part
            source[target] = name
        if len(rows_of) > 1 or targets[0][1] is not None:
            split[name] = list(parts)
    if unmapped:
        raise _unmapped_error(adapter, unmapped, "diffusers", why[0] if why else None)
    record: dict[str, object] = {"family": fam, "config": as_kohya(adapter.state).record_config()}
    state = DiffusersState(metadata_of(adapter.state), kohya=record)
    return Adapter(updates=updates, format="diffusers", state=state), split


def _unstacked(parts: dict[str, LoraUpdate]) -> dict[str, LoraUpdate]:
    """The parts of a split fused module, each keeping only the rank directions its rows use: when every
    column of the shared B is nonzero in exactly one part (a block-diagonal B, as `peft_to_kohya` makes
    from separate q / k / v LoRAs), part i keeps B_i's columns and A's matching rows; a part whose rows
    are all zero is left out. Exact, and fusing back gives the same B and A. Otherwise the parts are kept
    whole (A shared)."""
    if len(parts) < 2:
        return parts
    used = {t: np.any(u.B.raw.reshape(u.B.shape[0], u.rank) != 0, axis=0) for t, u in parts.items()}
    owners = np.sum(np.stack(list(used.values())), axis=0)
    if not np.all(owners == 1):
        return parts
    out: dict[str, LoraUpdate] = {}
    for t, u in parts.items():
        cols = np.flatnonzero(used[t])
        if len(cols) == 0:
            continue
        a = Tensor(np.ascontiguousarray(u.A.raw[cols]), u.A.dtype)
        b = Tensor(np.ascontiguousarray(u.B.raw[:, cols]), u.B.dtype)
        out[t] = LoraUpdate(t, a, b, u.scale, u.kind)
    return out


# ----------------------------------------------------------------------------- peft -> kohya


def _concat(tensors: list[Tensor], axis: int) -> Tensor:
    """Raw concatenation when the dtypes agree (bit exact), else in float32."""
    if len({t.dtype for t in tensors}) == 1:
        return Tensor(np.ascontiguousarray(np.concatenate([t.raw for t in tensors], axis=axis)), tensors[0].dtype)
    return Tensor.from_array(np.concatenate([t.f32() for t in tensors], axis=axis))


def _same_a(parts: list[LoraUpdate]) -> bool:
    a0 = parts[0]
    return all(p.A.dtype == a0.A.dtype and p.A.shape == a0.A.shape and p.scale == a0.scale and p.kind == a0.kind
               and p.B.dtype == a0.B.dtype and np.array_equal(p.A.raw, a0.A.raw) for p in parts[1:])


@dataclass(frozen=True)
class _Piece:
    """Rows [src) of a diffusers module's delta that fill rows [dst) of the kohya module's delta."""

    update: LoraUpdate
    src: tuple[int, int]
    dst: tuple[int, int]


def _pieces(name: str, parts: list[tuple[LoraUpdate, Rows]], label: str) -> tuple[list[_Piece], int]:
    """Where each part's rows go (a module listed twice gives its rows in order), and the rows reached."""
    used: dict[str, int] = {}
    pieces: list[_Piece] = []
    for u, rows in parts:
        start = used.get(u.name, 0)
        dst = rows if rows is not None else (0, u.B.shape[0])
        stop = start + dst[1] - dst[0]
        if stop > u.B.shape[0] or dst[0] < 0 or dst[1] <= dst[0]:
            raise ShapeMismatchError(f"{label}: kohya module {name!r}: {u.name!r} (lora_B {u.B.shape}) cannot fill "
                                     f"rows [{dst[0]}, {dst[1]}) of it")
        used[u.name] = stop
        pieces.append(_Piece(u, (start, stop), dst))
    short = [(p.update, used[p.update.name]) for p in pieces if used[p.update.name] != p.update.B.shape[0]]
    if short:
        u, n = short[0]
        raise ShapeMismatchError(f"{label}: kohya module {name!r} takes {n} of the {u.B.shape[0]} rows of "
                                 f"{u.name!r} (lora_B {u.B.shape})")
    order = sorted(pieces, key=lambda p: p.dst)
    for before, after in zip(order, order[1:]):
        if after.dst[0] < before.dst[1]:
            raise ShapeMismatchError(f"{label}: kohya module {name!r}: {before.update.name!r} and "
                                     f"{after.update.name!r} both fill rows from {after.dst[0]}")
    return pieces, max(p.dst[1] for p in pieces)


def _fuse(name: str, parts: list[tuple[LoraUpdate, Rows]], total: int | None, label: str) -> LoraUpdate:
    """One kohya module from diffusers modules that fill its rows (exact); rows no module fills are zero.
    `total` is the kohya delta's row count (default: the last row filled)."""
    if len(parts) == 1 and parts[0][1] is None and total in (None, parts[0][0].B.shape[0]):
        u = parts[0][0]
        return LoraUpdate(name, u.A, u.B, u.scale, u.kind)
    pieces, reached = _pieces(name, parts, label)
    rows = max(reached, total or 0)
    ups = list({p.update.name: p.update for p in pieces}.values())
    if len({u.A.shape[1:] for u in ups}) != 1 or len({u.kind for u in ups}) != 1:
        raise ShapeMismatchError(f"{label}: kohya module {name!r}: its parts have different inputs: "
                                 + ", ".join(f"{u.name!r} lora_A {u.A.shape}" for u in ups))
    if _same_a(ups):  # one A: stack B's rows, rank r
        first = ups[0]
        b = np.zeros((rows, *first.B.shape[1:]), dtype=first.B.raw.dtype)  # +0.0 in every float format
        for p in pieces:
            b[p.dst[0]:p.dst[1]] = p.update.B.raw[p.src[0]:p.src[1]]
        return LoraUpdate(name, first.A, Tensor(b, first.B.dtype), first.scale, first.kind)
    return _block_diagonal(name, pieces, ups, rows)


def _block_diagonal(name: str, pieces: list[_Piece], ups: list[LoraUpdate], rows: int) -> LoraUpdate:
    """B = blockdiag(c_i B_i) over the rows each part fills, A = [A_1; ...; A_n], c_i = s_i / s for the fused
    module's one scale s. Parts with one scale and one dtype keep their bytes (c_i = 1). Otherwise s is a part's
    scale that makes every c_i B_i exact (`_common_scale`): in the parts' dtype (ratios that are powers of two),
    else in float32 (lora_up written F32); where none does (ratios like 1/3), s is the first nonzero scale and
    c_i B_i is rounded to float32: the delta is exact to float32 rounding."""
    scale = next((u.scale for u in ups if u.scale != 0), 0.0)
    keep_bytes = all(u.scale == scale for u in ups) and len({u.B.dtype for u in ups}) == 1
    dtype = ups[0].B.dtype
    if not keep_bytes:
        scale, dtype = _common_scale(ups, scale)
    col: dict[str, int] = {}
    for u in ups:
        col[u.name] = sum(v.rank for v in ups[: ups.index(u)])
    first = ups[0].B
    b = np.zeros((rows, sum(u.rank for u in ups), *first.shape[2:]),
                 dtype=first.raw.dtype if keep_bytes else np.float32)
    for p in pieces:
        u, c = p.update, col[p.update.name]
        if keep_bytes:
            block = u.B.raw[p.src[0]:p.src[1]]
        else:
            factor = u.scale / scale if scale else 0.0
            with np.errstate(over="ignore"):  # checked below, naming the parts
                block = (u.B.f32()[p.src[0]:p.src[1]].astype(np.float64) * factor).astype(np.float32)
            if not np.isfinite(block).all() and np.isfinite(u.B.f32()).all():
                raise LorafuseValueError(
                    f"module {name!r}: its part {u.name!r} has scale {u.scale:g} and the fused module {scale:g} (its "
                    f"first nonzero part's): lora_B of {u.name!r} times {factor:g} is beyond float32's range, so the "
                    "parts cannot share one scale")
        b[p.dst[0]:p.dst[1], c:c + u.rank] = block
    b_t = Tensor(b, first.dtype) if keep_bytes else Tensor.from_array(b).to(dtype)  # exact: _common_scale checked
    return LoraUpdate(name, _concat([u.A for u in ups], 0), b_t, scale, ups[0].kind)


def _binary_ratio(s_i: float, s: float) -> float | None:
    """s_i / s when it is a binary fraction of at most 29 significant bits (so c * B is exact in float64 for any
    float32 B), else None."""
    if not (np.isfinite(s_i) and np.isfinite(s)) or s == 0:
        return None
    q = Fraction(s_i) / Fraction(s)
    n, d = abs(q.numerator), q.denominator
    odd = n >> ((n & -n).bit_length() - 1) if n else 0
    return float(q) if d & (d - 1) == 0 and odd.bit_length() <= 29 else None


def _holds(values: np.ndarray, dtype: str) -> bool:
    """Every float64 value is exactly a `dtype` (F32, F16, BF16) value."""
    with np.errstate(over="ignore", invalid="ignore"):
        f32 = values.astype(np.float32)
        return bool(np.array_equal(f32, values) and (
            dtype == "F32" or np.array_equal(Tensor.from_array(f32).to(dtype).f32(), f32)))


def _common_scale(ups: list[LoraUpdate], first: float) -> tuple[float, str]:
    """The fused module's scale s and lora_up's dtype, for parts whose scales (or lora_up dtypes) differ: the
    first part's scale s for which every (s_i / s) B_i is exact in the parts' one lora_up dtype (F32, F16 or BF16),
    else the first for which they all are in float32 (F32); else `first` (F32, rounded)."""
    target = factors_dtype(u.B.dtype for u in ups)  # their one dtype if F32 / F16 / BF16, else F32
    exact_f32: float | None = None
    for s in dict.fromkeys(u.scale for u in ups if u.scale != 0):
        ratios = [c for u in ups if (c := _binary_ratio(u.scale, s)) is not None]
        if len(ratios) != len(ups):
            continue
        folded = [u.B.f32().astype(np.float64) * c for u, c in zip(ups, ratios)]
        if all(_holds(f, target) for f in folded):
            return s, target
        if exact_f32 is None and all(_holds(f, "F32") for f in folded):
            exact_f32 = s
    return (first if exact_f32 is None else exact_f32), "F32"


def _kohya_rows(sd_keys: object, shapes: dict[str, tuple[int, ...]], family: str) -> dict[str, int]:
    """Rows of each kohya delta where the naming knows them (a fused layer given in part): Flux's transformer
    modules only (its text encoders' are renamed whole)."""
    fn = getattr(sd_keys, "to_kohya_shapes", None)
    if fn is None and family == "flux":
        from lorafuse.formats import flux_keys

        fn = flux_keys.to_kohya_shapes
        shapes = {n: s for n, s in shapes.items() if sd_keys.model_part(n) == "flux"}  # type: ignore[attr-defined]
    if fn is None:
        return {}
    return {k: int(v[0]) for k, v in fn(shapes, family).items()}


def peft_to_kohya(adapter: Adapter, family: str | None = None) -> tuple[Adapter, dict[str, list[str]]]:
    """A diffusers-named adapter as kohya modules (`sd_keys.to_kohya`), fused where kohya fuses."""
    fam = _family(adapter, family)
    sd_keys = _naming(fam)
    plain = {n: _plain(adapter, n) for n in adapter.updates}
    unnamed = [n for n in plain if not split_name(n)[0]]
    if unnamed:
        raise _unmapped_error(adapter, unnamed, "component prefix (unet., text_encoder., transformer. ...) and so "
                              "no kohya")
    shapes = {n: tuple(u.delta_shape) for n, u in plain.items()}
    unknown = {n: why for n, shape in shapes.items() if (why := _unknown(sd_keys, n, shape, fam)) is not None}
    if unknown:
        raise _unmapped_error(adapter, list(unknown), f"kohya ({fam})", next(iter(unknown.values())) or None)
    try:
        mapping = sd_keys.to_kohya(shapes, fam)
        totals = _kohya_rows(sd_keys, shapes, fam)
    except UnsupportedError as e:
        raise _unnamed(adapter, sd_keys, shapes, fam, e) from None
    except ShapeMismatchError as e:  # parts of one fused layer that do not fit together: name the file
        raise ShapeMismatchError(f"{adapter.label}: {e}") from None
    used: dict[str, str] = {}
    updates: dict[str, Update] = {}
    fused: dict[str, list[str]] = {}
    for kname, parts in mapping.items():
        for d, _ in parts:
            if d not in plain:
                raise MissingModuleError(f"{adapter.label}: kohya module {kname!r} needs {d!r}, which the adapter "
                                         "does not have")
            if used.get(d, kname) != kname:
                raise FormatError(f"{adapter.label}: {d!r} lands in two kohya modules, {used[d]!r} and {kname!r}")
            used[d] = kname
        updates[kname] = _fuse(kname, [(plain[d], rows) for d, rows in parts], totals.get(kname), adapter.label)
        if len({d for d, _ in parts}) > 1:
            fused[kname] = list(dict.fromkeys(d for d, _ in parts))
    unmapped = [n for n in plain if n not in used]
    if unmapped:
        raise _unmapped_error(adapter, unmapped, "kohya")
    _check_read_back(adapter, sd_keys, {k: tuple(u.delta_shape) for k, u in updates.items()}, mapping, fam)
    return Adapter(updates=updates, format="kohya", state=_kohya_state(adapter, list(updates))), fused


def _check_read_back(adapter: Adapter, sd_keys: object, shapes: dict[str, tuple[int, ...]],
                     mapping: dict[str, list[tuple[str, Rows]]], family: str) -> None:
    """Refuse a kohya module that the kohya names of `family` would not name back as the diffusers modules it was
    made of (a fused layer whose parts have other widths than the family's: Flux.1's linear1 from a proj_mlp other
    than 4 x hidden), so that convert never writes a file that its own reader, and kohya's, take for another layer
    or refuse. `shapes`: each kohya module's delta shape; `mapping`: its diffusers parts."""
    for kname, parts in mapping.items():
        made = list(dict.fromkeys(d for d, _ in parts))
        what = (f"{adapter.label}: {', '.join(f'{d!r} {_shape(adapter, d)}' for d in made)} "
                f"{'make' if len(made) > 1 else 'makes'} the kohya ({family}) module {kname!r} of shape "
                f"{shapes[kname]}")
        try:
            back = {n for n, _ in sd_keys.to_diffusers(kname, shapes[kname], family=family)}  # type: ignore[attr-defined]
        except (UnsupportedError, ShapeMismatchError) as e:
            them = "them" if len(made) > 1 else "it"
            raise ShapeMismatchError(f"{what}, which kohya's names do not read back as {them}: "
                                     f"{str(e).removesuffix('; nothing was written')}; nothing was written") from None
        lost = [d for d in made if d not in back]
        if lost:
            raise ShapeMismatchError(f"{what}, which reads back as {sorted(back)}, not as {lost[0]!r}; nothing was "
                                     "written")


def _shape(adapter: Adapter, name: str) -> tuple[int, ...]:
    return tuple(adapter.updates[name].delta_shape)


def _unnamed(adapter: Adapter, sd_keys: object, shapes: dict[str, tuple[int, ...]], family: str,
             error: UnsupportedError) -> LorafuseError:
    """Every module that has no kohya name in `family` (each tried alone), or the naming's own error."""
    bad: list[tuple[str, str]] = []
    for n, shape in shapes.items():
        try:
            sd_keys.to_kohya({n: shape}, family)  # type: ignore[attr-defined]
        except UnsupportedError as e:
            bad.append((n, str(e)))
    if not bad:
        return error
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return MissingModuleError(f"{adapter.label}: {plural(len(bad), 'module', verb=('has', 'have'))} no kohya "
                              f"name for family {family!r}: "
                              + "; ".join(why for _, why in bad[:5]) + more + "; nothing was written "
                              "(--family, Python: family=, names another family)")


def _unknown(sd_keys: object, name: str, shape: tuple[int, ...], family: str) -> str | None:
    """None for a diffusers name the naming knows (a layer of the family's models), else why not ('' where the
    naming gives no reason)."""
    try:
        return None if sd_keys.to_diffusers(name, shape, family=family) else ""  # type: ignore[attr-defined]
    except UnsupportedError as e:
        return str(e)


def _kohya_state(adapter: Adapter, modules: list[str]) -> KohyaState:
    """The kohya reader's state back (alpha dtypes, a ComfyUI-layout file's keys) when the adapter came from a
    kohya file, with the metadata the adapter carries. The keys come back where the record names one for every
    module written (`modules`), each a key of that module (the file keeps one key layout, as arithmetic does)."""
    from lorafuse.formats.kohya import original_key

    record = adapter.state.kohya if isinstance(adapter.state, DiffusersState) else None
    config = record.get("config") if isinstance(record, dict) else None
    state = KohyaState.from_record_config(config, metadata_of(adapter.state))
    if not all(m in state.layouts and original_key(f"{state.layouts[m][0]}.lora_down.weight") ==
               (m, "lora_down.weight") for m in modules):
        state.layouts = {}
    if isinstance(record, dict) and record.get("family") == "sd1":  # SD 1.x's lora_te1_ comes back as lora_te_
        te = {k: "lora_te_" + k.removeprefix("lora_te1_") for k in state.alpha_dtypes if k.startswith("lora_te1_")}
        state.alpha_dtypes.update({new: state.alpha_dtypes[old] for old, new in te.items()
                                   if new not in state.alpha_dtypes})
        forms = {k: "lora_te_" + k.removeprefix("lora_te1_") for k in state.alpha_forms if k.startswith("lora_te1_")}
        state.alpha_forms.update({new: state.alpha_forms[old] for old, new in forms.items()
                                  if new not in state.alpha_forms})
    return state


# ----------------------------------------------------------------------------- the operation


def _check_out(out: Path, to: str = "peft") -> None:
    if to == "gguf":
        from lorafuse.formats.gguf import SUFFIX

        if out.suffix.lower() != SUFFIX:
            raise LorafuseValueError(f"output {out}: --to gguf (Python: to='gguf') writes one .gguf file; give a name "
                                     "ending in .gguf")
        return
    if out.suffix.lower() != ".safetensors":  # the user's name is kept: STYLE.SAFETENSORS stays so
        raise LorafuseValueError(f"output {out}: convert writes one .safetensors file; give a name ending in "
                                 ".safetensors (diffusers' load_lora_weights(folder) looks for "
                                 "pytorch_lora_weights.safetensors)")


def output_path(out: str | os.PathLike[str], to: str, adapter: Adapter) -> Path:
    """Where `convert` writes for the name `out` with --to gguf: `out` itself, or inside it when it names a
    folder (a name ending in /, an existing folder), as the input's name with .gguf."""
    from lorafuse.formats.gguf import SUFFIX

    if to != "gguf":
        raise LorafuseValueError(f"output_path is for --to gguf, not {to!r} (ops.outputs.adapter_output)")
    first = adapter.path
    stem = "adapter" if first is None else (first.resolve().name if first.name in ("", ".", "..") else first.name)
    stem = stem[: -len(".safetensors")] if stem.lower().endswith(".safetensors") else stem
    return output_file(out, stem + SUFFIX, adapter.sources(), SUFFIX)


def convert(adapter: str | os.PathLike[str] | Adapter, out: str | os.PathLike[str], to: str = "peft",
            rank: int | None = None, conv_rank: int | None = None, family: str | None = None,
            threads: int = 0, overwrite: bool = False, *, arch: str | None = None,
            base_config: str | os.PathLike[str] | None = None, gguf_type: str | None = None) -> ConvertReport:
    """Convert a diffusion LoRA between kohya and diffusers/PEFT naming and write it to `out` (one
    .safetensors file): `to='peft'` writes a diffusers LoRA file (what `save_lora_weights` writes and
    `load_lora_weights` reads), `to='kohya'` a kohya LoRA file. LoHa / LoKr modules need `rank`
    (`conv_rank` for kxk convolutions) and become their best rank-k LoRA; LoRA modules are kept.
    `family` ('sd1', 'sdxl', 'flux', 'flux2', 'wan') overrides the guess from the module names. `out` may be new,
    empty or a file lorafuse wrote; another file is refused (before any work) unless `overwrite`.

    `to='gguf'` writes an LLM LoRA (PEFT) as a GGUF LoRA adapter for llama.cpp (one .gguf file, see
    formats.gguf): `arch` ('llama', 'mistral', 'qwen2', 'qwen3', 'gemma', 'gemma2', 'gemma3', 'phi3'; default from
    `base_config`, the base model's config.json or its folder, which Llama / Mistral q_proj / k_proj LoRAs
    need for their head counts) and `gguf_type` ('f32', the default as in llama.cpp's converter, 'f16',
    'bf16', 'q8_0')."""
    start = time.perf_counter()
    s = prepare_convert(adapter, out, to, rank, conv_rank, family, threads, overwrite, arch=arch,
                        base_config=base_config, gguf_type=gguf_type)
    if s.gguf is not None:
        from lorafuse.formats.gguf import write_gguf

        write_gguf(s.result, s.gguf, s.out, s.inputs, overwrite=overwrite, threads=s.threads)
        return dataclasses.replace(s.report, seconds=time.perf_counter() - start)
    # the file records how it was made (io.provenance; GGUF keeps llama.cpp's converter's keys and the mark only)
    made = record("convert", [adapter_input(adapter)], {"to": to, "rank": rank, "conv_rank": conv_rank,
                                                         "family": family})
    result = dataclasses.replace(s.result, provenance=made)
    if s.to == "peft":
        save_diffusers(result, s.out, s.inputs, overwrite=overwrite)
    else:
        from lorafuse.formats.kohya import save_kohya

        save_kohya(result, s.out, s.inputs, overwrite=overwrite)
    return dataclasses.replace(s.report, seconds=time.perf_counter() - start)


@dataclass
class ConvertSetup:
    """What convert writes, decided before the first byte (prepare_convert): the output path and target, the
    converted adapter (LoHa / LoKr modules already LoRA, names already converted), the report to give once
    written, the files it must not replace, the GGUF plan (--to gguf), the checked threads, and what
    `overwrite` replaces at the output (io.atomic.check_output's note)."""

    out: Path
    to: str
    result: Adapter
    report: ConvertReport
    inputs: list[Path]
    gguf: GgufPlan | None = None
    threads: int = 0
    replaces: str | None = None


def prepare_convert(adapter: str | os.PathLike[str] | Adapter, out: str | os.PathLike[str], to: str = "peft",
                    rank: int | None = None, conv_rank: int | None = None, family: str | None = None,
                    threads: int = 0, overwrite: bool = False, *, arch: str | None = None,
                    base_config: str | os.PathLike[str] | None = None,
                    gguf_type: str | None = None) -> ConvertSetup:
    """Everything convert does before it writes (its arguments' meaning: convert): the options and the
    output checked, the adapter read, LoHa / LoKr modules turned into LoRA and the names converted, in
    memory (what is written depends on the factors: fused modules share A or not). Writes nothing."""
    out = check_path(out, "out")
    if not isinstance(adapter, Adapter):
        check_spec(adapter, "adapter")
    if base_config is not None:
        check_spec(base_config, "base_config")
    if check_text(to, "to", TARGETS) not in TARGETS:
        raise LorafuseValueError(f"to must be one of {', '.join(TARGETS)}, got {to!r}")
    for name, value, choices in (("family", family, FAMILIES), ("arch", arch, ()), ("gguf_type", gguf_type, ())):
        if value is not None:  # an array or a list: refused before a choice is looked up with it
            check_text(value, name, choices)
    rank, conv_rank = check_optional_rank(rank), check_optional_rank(conv_rank, "conv_rank")
    threads = check_threads(threads)
    given = [n for n, v in (("arch", arch), ("base_config", base_config), ("gguf_type", gguf_type)) if v is not None]
    if to != "gguf" and given:
        raise LorafuseValueError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to --to gguf only "
                                 "(Python: to='gguf')")
    if to == "gguf" and family is not None:
        raise LorafuseValueError("family applies to diffusion LoRAs (--to peft / kohya), not to --to gguf (Python: "
                                 "to='gguf')")
    out = Path(out)
    a = adapter if isinstance(adapter, Adapter) else load(adapter)
    check_output_path(out, a.sources())  # the current folder, an input: refused first
    _check_out(out, to)  # then a name convert cannot write, before what is there is judged (no --overwrite advice)
    replaces = check_output(out, a.sources(), folder=False, overwrite=overwrite, kind=ADAPTER)
    if to == "gguf":
        return _to_gguf(a, out, rank, conv_rank, threads, arch, base_config, gguf_type, replaces)
    if a.format not in ("kohya", "diffusers"):
        raise UnsupportedError(f"{a.label}: a {a.format} adapter; convert handles diffusion LoRAs: kohya / LyCORIS "
                               ".safetensors files and diffusers LoRA files (<component>.<module>.lora_A.weight)")
    if a.full:
        raise UnsupportedError(f"{a.label}: full tensors ({', '.join(sorted(a.full)[:3])}) cannot be converted")
    for name, u in a.updates.items():  # a faithful copy of a NaN would be a broken adapter written as new
        if holds_nonfinite(u):
            raise NonFiniteError(f"{a.label}: module {name!r} {nonfinite_words(u)}; nothing was written")
    if to == "peft" and a.format == "kohya":
        _refuse_lycoris_names(a)  # before its LoHa / LoKr modules are factorized
    n_in = len(a.updates)
    a, reports = lycoris_to_lora(a, rank, conv_rank, threads)
    inputs = [a.path] if a.path is not None else []
    split: dict[str, list[str]] = {}
    fused: dict[str, list[str]] = {}
    fam: str | None = None
    if family is not None and a.format == ("diffusers" if to == "peft" else "kohya"):
        raise LorafuseValueError(f"family applies where the names change (kohya -> peft, diffusers -> kohya): "
                                 f"{a.label} is a {a.format} file already, written --to {to} with its own names; "
                                 "leave --family out")
    if to == "peft":
        if a.format == "kohya":
            fam = _family(a, family)
            result, split = kohya_to_peft(a, fam)
        else:
            result = a
    else:
        if a.format == "diffusers":
            fam = _family(a, family)
            result, fused = peft_to_kohya(a, fam)
        else:
            result = a
    report = ConvertReport(out, to, fam, n_in, len(result.updates), split, fused, reports,
                           {n: u.rank for n, u in result.updates.items()})
    return ConvertSetup(out, to, result, report, inputs, threads=threads, replaces=replaces)


def _to_gguf(a: Adapter, out: Path, rank: int | None, conv_rank: int | None, threads: int, arch: str | None,
             base_config: str | os.PathLike[str] | None, gguf_type: str | None,
             replaces: str | None) -> ConvertSetup:
    """--to gguf: a PEFT adapter only (refused first, before --rank is asked for); LoHa / LoKr to LoRA first (with
    rank), every other refusal in the plan."""
    from lorafuse.formats.gguf import DEFAULT_TYPE, plan_gguf

    if a.format != "peft":
        what = {"kohya": "kohya / LyCORIS file", "diffusers": "diffusers LoRA file"}.get(a.format,
                                                                                         f"{a.format} adapter")
        raise UnsupportedError(f"{a.label}: a {what} (a diffusion LoRA); --to gguf takes a PEFT LoRA folder "
                               "(adapter_config.json + adapter_model.safetensors) of an LLM, for llama.cpp")
    n_in = len(a.updates)
    a, reports = lycoris_to_lora(a, rank, conv_rank, threads)
    plan = plan_gguf(a, arch, base_config, DEFAULT_TYPE if gguf_type is None else gguf_type)
    inputs = a.sources() + ([plan.base_config] if plan.base_config is not None else [])
    ranks = {m.base: a.updates[m.module].rank for m in plan.modules}
    report = ConvertReport(out, "gguf", None, n_in, len(plan.modules), lycoris=reports, ranks=ranks,
                           notes=list(plan.notes), arch=plan.arch, gguf_type=plan.gguf_type, alpha=plan.alpha,
                           folded=dict(plan.folded), fallback=list(plan.fallback))
    return ConvertSetup(out, "gguf", a, report, inputs, plan, threads, replaces)


__all__ = ["ConvertReport", "ConvertSetup", "LycorisReport", "convert", "kohya_to_peft", "lycoris_to_lora",
           "output_path", "peft_to_kohya", "prepare_convert"]
