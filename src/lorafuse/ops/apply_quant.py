"""apply on a quantized base: which weights are quantized, what each becomes, and the row-block math.

A checkpoint whose quantization lorafuse cannot honour is refused before any work (io.quant). The
quantized weights are found, and each scheme bound to its weight, before adapters are matched
(`scan_quant`: a packed bitsandbytes 4-bit weight is matched by its real shape). Then either the
quantization is kept (FP8's default, or --requantize): a merged weight is dequantized row block by row
block, merged in float32 and quantized again with fresh scales (its companions are written right after
it, from those blocks: `QuantScheme.finish`), an untouched one is copied byte for byte with its
companions; or it is not (--dtype, and bitsandbytes' default): every quantized weight is written
dequantized (merged or not) in --dtype or the dtype it was quantized from, the companions are dropped and
config.json loses its quantization_config.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from lorafuse._threads import outcome, started
from lorafuse.backends import get_backend
from lorafuse.errors import LorafuseError, NonFiniteError, UnsupportedError
from lorafuse.io.checkpoint import Checkpoint
from lorafuse.io.quant import Quantization, QuantScheme, detect_checkpoint, quant_extras, refusal, relative
from lorafuse.io.safetensors import SafetensorsFile

F8_DTYPES = ("F8_E4M3", "F8_E5M2")
_PLAIN_SIBLINGS = ("weight", "bias")


@dataclass(frozen=True)
class QuantRef:
    """A quantized weight of the base: its scheme (bound to the weight), its companions (role -> (shard,
    key)), whether the output keeps the quantization (requantize) or is a float dtype, and the weight's real
    shape (a packed 4-bit weight is stored as [bytes, 1]) and the float dtype it was quantized from (None:
    not recorded), and its name (what messages call it)."""

    scheme: QuantScheme
    companions: dict[str, tuple[str, str]]
    requantize: bool
    shape: tuple[int, ...] = ()
    dtype: str | None = None
    name: str = ""

    @property
    def cols(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else 1


@dataclass
class QuantPlan:
    """What apply does with a quantized checkpoint's tensors."""

    quantization: Quantization
    weights: dict[str, QuantRef] = field(default_factory=dict)  # every quantized weight that is rewritten
    companions: dict[str, str] = field(default_factory=dict)  # companion key -> its weight's key
    dropped: set[str] = field(default_factory=set)  # tensors left out of the output (--dtype)
    config_removals: list[str] = field(default_factory=list)
    requantize: bool = False  # the quantization is kept (requantized weights, companions, quantization_config)


@dataclass
class _Found:
    """A tensor with companions of the scheme beside it (or a float8 one): its bound scheme, or why not."""

    present: dict[str, str]  # role -> key
    bound: QuantScheme | None
    why: str | None


@dataclass
class QuantScan:
    """A checkpoint's quantization (None: not quantized) and every quantized weight found, read before
    adapters are matched: matching needs the real shapes (`shapes`)."""

    quantization: Quantization | None
    found: dict[str, _Found] = field(default_factory=dict)

    def shapes(self, ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
        """key -> real shape of every quantized weight whose stored shape is not its real one."""
        out = {}
        for key, f in self.found.items():
            if f.bound is not None:
                shape = f.bound.logical_shape(tuple(ckpt.info(key).shape))
                if shape != tuple(ckpt.info(key).shape):
                    out[key] = shape
        return out


def _siblings(keys: list[str]) -> dict[str, list[str]]:
    """module prefix -> the last name parts of its tensors ('x.weight' -> 'x': ['weight', ...])."""
    out: dict[str, list[str]] = {}
    for k in keys:
        prefix, _, last = k.rpartition(".")
        out.setdefault(prefix, []).append(last)
    return out


def _unknown_siblings(key: str, siblings: dict[str, list[str]], known: tuple[str, ...]) -> list[str]:
    """The tensors of the key's module other than itself, its weight, its bias and `known` names."""
    prefix, _, own = key.rpartition(".")
    return sorted(f"{prefix}.{n}" if prefix else n for n in siblings.get(prefix, [])
                  if n != own and n not in _PLAIN_SIBLINGS and n not in known)


def check_unscaled_f8(ckpt: Checkpoint, changed: set[str], dtype: str | None = None) -> None:
    """A checkpoint that is not quantized: a float8 tensor that is merged, or converted (every one of them, with
    a `dtype`), is taken as values (plain float8) unless tensors beside it look like scales lorafuse does not
    know (a ComfyUI "scaled fp8" `scale_weight`: then refused)."""
    siblings: dict[str, list[str]] | None = None
    keys = set(changed) if dtype is None else set(changed) | set(ckpt.keys())
    for key in sorted(keys):
        if key not in ckpt or ckpt.info(key).dtype not in F8_DTYPES:
            continue
        siblings = siblings if siblings is not None else _siblings(ckpt.keys())
        extra = _unknown_siblings(key, siblings, ())
        if extra:
            merged = key in changed
            raise UnsupportedError(
                f"{ckpt.location}: {key} is a {ckpt.info(key).dtype} weight with {', '.join(extra[:4])} beside it, "
                "which look like quantization scales lorafuse does not know, and there is no quantization_config "
                "in config.json to say what they mean: lorafuse will not "
                f"{'merge into' if merged else f'write as {dtype} (dtype)'} codes whose scale it does not know; "
                + ("merge into the 16-bit base instead, or put the checkpoint's config.json beside it" if merged else
                   "leave the dtype out (the float8 tensors it does not merge are then copied as they are), or "
                   "merge into the 16-bit base instead"))


def scan_quant(ckpt: Checkpoint, config: Mapping[str, object]) -> QuantScan:
    """The checkpoint's quantization and its quantized weights, each scheme bound to its weight (reading the
    weight's quant state where the scheme keeps one there; an unreadable one raises, naming the file)."""
    q = detect_checkpoint(ckpt, config)
    scan = QuantScan(q)
    if q is None or q.scheme is None:
        return scan
    scheme = q.scheme
    files: dict[str, SafetensorsFile] = {}
    siblings: dict[str, list[str]] | None = None

    def raw(key: str) -> tuple[np.ndarray, str]:
        shard = ckpt.shard_of[key]
        if shard not in files:
            files[shard] = ckpt.open(shard)
        return files[shard].raw(key), ckpt.info(key).dtype

    try:
        for key in ckpt.keys():
            info = ckpt.info(key)
            present = {role: k for role, k in scheme.companions(key).items() if k in ckpt}
            if not present and (scheme.is_companion(key) or not scheme.may_be_weight(key, tuple(info.shape),
                                                                                       info.dtype)):
                continue  # not a quantized weight (a norm, a bias, an unquantized lm_head, a companion itself)
            why = scheme.check(key, info.shape, info.dtype,
                               {role: (ckpt.info(k).dtype, ckpt.info(k).shape) for role, k in present.items()})
            if why is not None and not present:  # say what is beside it instead (another format's scales?)
                siblings = siblings if siblings is not None else _siblings(ckpt.keys())
                others = _unknown_siblings(key, siblings, ())
                if others:
                    why += f" (beside it: {', '.join(others[:4])}{' and more' if len(others) > 4 else ''})"
            bound = None
            if why is None:

                def read(role: str, key: str = key, present: dict[str, str] = present) -> tuple[np.ndarray, str]:
                    if role == "weight":
                        return raw(key)
                    return raw(present[role])  # KeyError: the weight has no such companion

                try:
                    bound = scheme.bind(key, tuple(info.shape), info.dtype, read)
                except LorafuseError as e:
                    raise type(e)(f"{ckpt.location}: {e}") from None
            scan.found[key] = _Found(present, bound, why)
    finally:
        for f in files.values():
            f.close()
    return scan


def check_scan(ckpt: Checkpoint, scan: QuantScan, dtype: str | None, requantize: bool | None) -> None:
    """Refusals that must come before adapters are matched: a quantization lorafuse cannot honour (its tensors'
    names and shapes mean nothing to the matcher), and a quantized weight lorafuse cannot read when its real
    shape is unknown without reading it (a packed 4-bit weight) or when every quantized weight is rewritten
    (a dequantized output)."""
    q = scan.quantization
    if q is None:
        return
    if q.scheme is None:
        raise refusal(q, ckpt.location)
    keep = dtype is None and (q.scheme.requantize_by_default if requantize is None else requantize)
    for key, found in scan.found.items():
        if found.why is not None and (not keep or q.scheme.packed):
            raise unreadable(ckpt, q, key, found.why)


def unreadable(ckpt: Checkpoint, q: Quantization, key: str, why: str) -> UnsupportedError:
    """The refusal of a quantized weight lorafuse cannot read: the file, the weight, its dtype and shape, the
    quantization and `why` (QuantScheme.check's reason: a missing or misshapen scale, a shape lorafuse does not
    read, ...)."""
    info = ckpt.info(key)
    return UnsupportedError(f"{ckpt.location}: {key} ({info.dtype} {list(info.shape)}) is quantized with "
                            f"{q.describe()}, but {why}: lorafuse will not read these codes; merge into the 16-bit "
                            "base instead")


def plan_quant(ckpt: Checkpoint, config: Mapping[str, object], changed: set[str], dtype: str | None,
               requantize: bool | None = None, scan: QuantScan | None = None) -> QuantPlan | None:
    """None for a checkpoint that is not quantized; else what happens to each quantized weight, refusing
    (UnsupportedError naming the file and the method) whatever lorafuse cannot honour.

    The quantization is kept (merged weights requantized, the rest copied with their companions) when
    `requantize` says so, or, when it is None, when no `dtype` is given and the scheme keeps it by default
    (FP8); else every quantized weight is written dequantized in `dtype`, or the dtype it was quantized
    from (bitsandbytes' quant_state; the config's torch_dtype; BF16), and the companions and the
    quantization_config are dropped."""
    where = str(ckpt.location)
    scan = scan if scan is not None else scan_quant(ckpt, config)
    q = scan.quantization
    if q is None:
        check_unscaled_f8(ckpt, changed, dtype)
        return None
    if q.scheme is None:
        raise refusal(q, where)
    scheme = q.scheme
    keep = dtype is None and (scheme.requantize_by_default if requantize is None else requantize)
    plan = QuantPlan(q, requantize=keep)
    siblings = _siblings(ckpt.keys())
    known = tuple(q.dropped_suffixes)
    # the quantized weights and their companions are known: several parameters of one module (fused experts
    # `experts.gate_up_proj`, `experts.down_proj`) are each other's siblings
    claimed = set(scan.found) | {k for f in scan.found.values() for k in f.present.values()}
    fallback = _config_dtype(config)
    for key, found in scan.found.items():
        info = ckpt.info(key)
        present = found.present
        touched = key in changed or not keep
        why = found.why
        if why is None and touched:
            extra = [k for k in _unknown_siblings(key, siblings, known) if k not in claimed]
            if extra:
                why = f"{', '.join(extra[:4])} beside it, which lorafuse does not know (scales its codes may need)"
        for k in present.values():
            plan.companions[k] = key
        if why is not None:
            if touched:
                raise unreadable(ckpt, q, key, why)
            continue  # an untouched weight kept as it is, with whatever is beside it
        if not touched:
            continue
        bound = found.bound
        assert bound is not None
        if keep and not bound.writable:
            raise UnsupportedError(f"{where}: lorafuse reads {key} ({bound.name}) but cannot write it quantized: "
                                   "leave --requantize out (or pass --dtype bf16, fp16, fp32) to write the merged "
                                   "model unquantized")
        plan.weights[key] = QuantRef(bound, {r: (ckpt.shard_of[k], k) for r, k in present.items()}, keep,
                                     bound.logical_shape(tuple(info.shape)), bound.logical_dtype() or fallback, key)
    orphans = sorted(k for k in ckpt.keys() if scheme.is_companion(k) and k not in plan.companions)
    if orphans:
        raise UnsupportedError(f"{where}: {', '.join(orphans[:4])}{' and more' if len(orphans) > 4 else ''} belong "
                               f"to {q.describe()} weights that are not there (or not readable): lorafuse will not "
                               "write a model whose quantization it does not understand; merge into the 16-bit base "
                               "instead")
    if not keep:
        plan.dropped = {k for k in plan.companions}
        plan.dropped |= quant_extras(ckpt.keys(), q)
        plan.config_removals = [k for k in ("quantization_config", "compression_config") if k in config]
    return plan


def copy_ref(ckpt: Checkpoint, config: Mapping[str, object], scan: QuantScan, key: str,
             dtype: str | None) -> QuantRef | None:
    """How a quantized weight `key` is read where it is written under another name too (an lm_head untied from a
    quantized input embedding): dequantized, in `dtype`, the dtype it was quantized from or the config's, as a
    layer of its own that the quantization does not cover (transformers' quantizers leave the output layer
    unquantized). None when `key` is no quantized weight; refused, naming it, when its codes cannot be read."""
    found = scan.found.get(key)
    q = scan.quantization
    if found is None or q is None:
        return None
    if found.bound is None:
        raise unreadable(ckpt, q, key, found.why or "its companions cannot be read")
    shape = found.bound.logical_shape(tuple(ckpt.info(key).shape))
    return QuantRef(found.bound, {r: (ckpt.shard_of[k], k) for r, k in found.present.items()}, False, shape,
                    dtype or found.bound.logical_dtype() or _config_dtype(config) or "BF16", key)


def _config_dtype(config: Mapping[str, object]) -> str | None:
    """The model's float dtype from config.json (torch_dtype / dtype), as a safetensors name."""
    for k in ("torch_dtype", "dtype"):
        v = config.get(k)
        if isinstance(v, str) and v in _TORCH_DTYPES:
            return _TORCH_DTYPES[v]
    return None


_TORCH_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


# ---------------------------------------------------------------- row blocks


def piece_rows(scheme: QuantScheme, shape: tuple[int, ...], rows: int, chunk_bytes: int) -> int:
    """Rows per piece of a quantized weight: about chunk_bytes of float32, a multiple of the scheme's block
    rows (a whole tensor when the scale is per tensor: its amax needs every row)."""
    align = max(1, scheme.row_align(shape))
    cols = max(1, int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1)
    step = max(1, chunk_bytes // (4 * cols)) // align * align
    return min(rows, max(align, step))


def dequantize_rows(ref: QuantRef, raw: np.ndarray, r0: int, r1: int,
                    raw_of: Callable[[str, str], tuple[np.ndarray, str]], threads: int) -> np.ndarray:
    """Rows [r0, r1) of a quantized weight (its whole stored codes `raw`) as float32 (rows x cols);
    raw_of(shard, key) -> (raw, dtype)."""
    comps = {role: raw_of(shard, key) for role, (shard, key) in ref.companions.items()}
    return ref.scheme.read_rows(raw, comps, r0, r1, ref.shape, threads)


@dataclass
class QuantError:
    """Requantization error of one weight, accumulated over its row blocks (vs the float32 merged result).
    Elements whose merged or requantized value is NaN / Inf (written only with --allow-nonfinite, from non-finite
    inputs: a finite merge that does not survive requantization is refused, see requantize_rows) have no error:
    they are counted in `nonfinite`, and the errors are over the other elements."""

    max_abs: float = 0.0
    err_sq: float = 0.0
    ref_sq: float = 0.0
    nonfinite: int = 0

    def add(self, merged: np.ndarray, back: np.ndarray) -> None:
        """Rows of the float32 merge and of its requantized value."""
        with np.errstate(invalid="ignore", over="ignore"):
            diff = (back - merged).ravel()
        m = merged.ravel()
        if not (np.isfinite(diff).all() and np.isfinite(m).all()):
            keep = np.isfinite(diff) & np.isfinite(m)
            self.nonfinite += int(keep.size - np.count_nonzero(keep))
            diff, m = diff[keep], m[keep]
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.abs(diff).max()))
            self.err_sq += _sum_sq(diff)
            self.ref_sq += _sum_sq(m)

    def merge(self, other: QuantError) -> None:
        self.max_abs = max(self.max_abs, other.max_abs)
        self.err_sq += other.err_sq
        self.ref_sq += other.ref_sq
        self.nonfinite += other.nonfinite

    def as_dict(self) -> dict[str, float]:
        """max_abs_error, rel_fro_error (over the finite elements) and nonfinite_values (how many are NaN / Inf
        in the merge or its requantized value)."""
        return {"max_abs_error": self.max_abs, "rel_fro_error": relative(self.err_sq, self.ref_sq),
                "nonfinite_values": self.nonfinite}


def _sum_sq(x: np.ndarray) -> float:
    """sum(x^2) of a float32 vector through a float32 dot product, scaled by its largest value (no overflow)."""
    top = float(np.abs(x).max()) if x.size else 0.0
    if top == 0.0:
        return 0.0
    y = x * np.float32(1.0 / top) if top < 1e30 else (x.astype(np.float64) / top).astype(np.float32)
    return float(np.dot(y, y)) * top * top


def requantize_rows(ref: QuantRef, merged: np.ndarray, r0: int, shape: tuple[int, ...],
                    companion_dtypes: Mapping[str, str], threads: int,
                    error: QuantError) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Merged float32 rows -> (codes, role -> companion rows), adding the rows' error to `error`.

    Split into row blocks (multiples of the scheme's block rows) on `threads` threads (0: all cores):
    numpy releases the GIL in the element-wise work."""
    align = max(1, ref.scheme.row_align(shape))
    rows = merged.shape[0]
    n = min(threads or os.cpu_count() or 1, max(1, rows // align), max(1, merged.size >> 18))
    step = -(-rows // n) if n > 1 else rows
    step = -(-step // align) * align
    bounds = [(a, min(a + step, rows)) for a in range(0, rows, step)] or [(0, rows)]

    def one(a: int, b: int) -> tuple[np.ndarray, dict[str, np.ndarray], QuantError]:
        part = merged[a:b]
        codes, comps = ref.scheme.quantize(part, r0 + a, shape, companion_dtypes, 0)
        back = ref.scheme.dequantize(codes, {r: (c, companion_dtypes[r]) for r, c in comps.items()}, 0,
                                     (part.shape[0], *shape[1:]), 0)
        _check_requantized(ref, part, back)
        err = QuantError()
        err.add(part, back)
        return codes, comps, err

    if len(bounds) == 1:
        results = [one(*bounds[0])]
    else:  # (a piece whose thread cannot start, a process or thread limit, is done here: _threads.started)
        with ThreadPoolExecutor(max_workers=len(bounds), thread_name_prefix="lorafuse-quant") as pool:
            results = [outcome(r) for r in [started(pool, one, a, b) for a, b in bounds]]
    for _, _, e in results:
        error.merge(e)
    if len(results) == 1:
        return results[0][0], results[0][1]
    codes = np.concatenate([c for c, _, _ in results])
    comps = {role: np.concatenate([cs[role].reshape(-1) for _, cs, _ in results]) for role in results[0][1]}
    return codes, comps


# The largest finite value of the float dtypes a requantized weight is computed in (dequantized to) by its loader.
_LARGEST = {"F16": 65504.0, "BF16": 3.3895313892515355e38}


def _check_requantized(ref: QuantRef, merged: np.ndarray, back: np.ndarray) -> None:
    """NonFiniteError naming the weight when finite merged rows do not survive requantization: their scale
    overflows its dtype (an LLM.int8 row beyond float16, which bitsandbytes rounds the weight to before
    quantizing; an FP8 block scale beyond F16 / BF16), or the requantized values overflow the dtype the loader
    dequantizes them to (a bitsandbytes 4-bit quant state's float16). The quantized formats have no Inf: such a
    row would read back as NaN or Inf, so this is refused even with --allow-nonfinite. Merged rows that are
    already NaN / Inf (--allow-nonfinite) are written as the format can hold them, and counted (QuantError)."""
    if not merged.size:
        return
    m_hi, m_lo = float(merged.max()), float(merged.min())  # NaN propagates: one pass each, no temporaries
    if not (math.isfinite(m_hi) and math.isfinite(m_lo)):
        return
    b_hi, b_lo = float(back.max()), float(back.min())
    if not (math.isfinite(b_hi) and math.isfinite(b_lo)):
        where = "its requantized values are NaN or Inf (a scale beyond its dtype)"
    elif ref.dtype in _LARGEST and max(b_hi, -b_lo) > _LARGEST[ref.dtype]:
        backend = get_backend()  # beyond the largest finite value: Inf once rounded, unless just below the threshold
        rounded = backend.to_float32(backend.from_float32(np.ascontiguousarray(back, dtype=np.float32), ref.dtype),
                                     ref.dtype)
        if np.isfinite(rounded).all():
            return
        where = f"its requantized values overflow {ref.dtype}, the dtype it is dequantized to"
    else:
        return
    raise NonFiniteError(
        f"{ref.name or 'a requantized weight'}: the merged values (largest |value| {max(m_hi, -m_lo):.6g}) do not "
        f"fit {ref.scheme.name}: {where}; the quantized format cannot hold them (--allow-nonfinite does not apply): "
        "write the merged model unquantized with --dtype fp32 (Python: dtype='fp32'), or scale the adapter down")
