"""Why a merge gave NaN or Inf: the NonFiniteError apply raises for the jobs the backend flagged.

The error path only (inputs read again, jobs computed again in float32). The causes, in order: the
first found among the flagged jobs is raised, naming every job it explains.

0. an input holds NaN or Inf: the base weight (or the full tensor an adapter replaces it with), an
   adapter's factors, or its DoRA magnitude;
1. a DoRA stage whose W + its own delta has a row (or column) of norm 0, or one so small that
   magnitude / norm is beyond float32: its scale is not finite there (PEFT's merge gives NaN or Inf
   there too);
2. finite inputs whose float32 result is not finite: W + scale * B A overflows float32 (an Inf minus
   an Inf, or times 0, on the way is a NaN);
3. a float32 result that is finite, but overflows the output dtype (F16 / BF16) when rounded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lorafuse.backends import Backend, MergeJob
from lorafuse.backends.reference import ReferenceBackend
from lorafuse.errors import NonFiniteError
from lorafuse.model.update import beyond_float32, nonfinite_factors
from lorafuse.ops.resolve import Contribution, TokenRows
from lorafuse.ops.stages import CoreStage

__all__ = ["ALLOW", "Flagged", "kept_as_read", "nonfinite_error", "overflow_error"]

LARGEST = {"F16": "65504", "BF16": "3.39e38", "F32": "3.40e38"}
ALLOW = "pass --allow-nonfinite (Python: allow_nonfinite=True) to write them anyway"

INPUT, DORA, FLOAT32, NARROW = range(4)  # the causes, in the order they are looked for


@dataclass(frozen=True)
class Flagged:
    """A merge job the backend flagged, with what it was made of."""

    job: MergeJob
    contribs: Sequence[Contribution]  # the output tensor's contributions (OutTensor.updates)
    r0: int  # the job's first row in its tensor
    replaced: bool  # the job starts from a full tensor of an adapter (modules_to_save), not the base weight
    # a quantized base weight: its companions (scales, absmax, ...), each 'key (shard)', that it is dequantized with
    companions: tuple[str, ...] = ()
    # the rows adapters replace in the tensor (PEFT trainable tokens: OutTensor.token_rows), for the job's rows
    token_rows: Sequence[TokenRows] = ()


def _shown(names: Sequence[str]) -> str:
    return ", ".join(names[:5]) + (" and more" if len(names) > 5 else "")


def _indices(idx: np.ndarray, what: str) -> str:
    """'row 3' / 'rows 0, 3, 5 and 2 more'."""
    shown = ", ".join(str(int(i)) for i in idx[:5])
    return f"{what}{'s' if len(idx) > 1 else ''} {shown}{f' and {len(idx) - 5} more' if len(idx) > 5 else ''}"


def _held(x: np.ndarray) -> str:
    """'NaN', 'Inf' or 'NaN and Inf': what a float32 array holds besides numbers."""
    nan, inf = bool(np.isnan(x).any()), bool(np.isinf(x).any())
    return " and ".join(w for w, held in (("NaN", nan), ("Inf", inf)) if held) or "Inf"


def _wide(job: MergeJob, backend: Backend, threads: int) -> np.ndarray:
    """The job's input weight as read: float64 for an F64 one (whose finite values may lie beyond float32),
    else float32."""
    if job.w_dtype == "F64":
        return np.asarray(job.w).view(np.float64)
    return backend.to_float32(job.w, job.w_dtype, threads)


def kept_as_read(f: Flagged, backend: Backend, threads: int) -> bool:
    """Whether a flagged job only converts a weight to the output dtype (--dtype: no delta, no rows replaced, not
    quantized) and its NaN / Inf are exactly the ones the weight holds as read (an attention mask's -inf, say):
    such a tensor is written as torch's .to(dtype) writes it, as a weight not converted is copied with them;
    a finite value that overflows the output dtype is still refused."""
    job = f.job
    if job.stages or f.replaced or f.companions or f.token_rows or job.out_dtype not in LARGEST:
        return False
    out = backend.to_float32(job.out, job.out_dtype, threads)
    bad = ~np.isfinite(out)
    w = _wide(job, backend, threads)
    return bool(np.array_equal(bad, ~np.isfinite(w)) and np.array_equal(out[bad], w[bad], equal_nan=True))


def _input_cause(f: Flagged, w32: np.ndarray, wide: np.ndarray | None = None) -> str | None:
    """Which input of the job holds NaN or Inf, or None (`wide`: the F64 weight as read, whose finite values
    beyond float32's range are said to be so)."""
    if wide is not None and np.isfinite(wide).all() and not np.isfinite(w32).all():
        return (f"its base weight (F64) holds finite values beyond float32's range (largest finite "
                f"{LARGEST['F32']}; {float(np.abs(wide).max()):.4g} here), and lorafuse computes and writes at most "
                "float32")
    if not np.isfinite(w32).all():
        rows = f.r0 + np.flatnonzero(~np.isfinite(w32.reshape(len(w32), -1)).all(axis=1))
        for t in f.token_rows:  # rows whose values are not finite, or not in the weight's dtype (PEFT casts them)
            if np.isin(rows, t.indices).all():
                return (f"{t.source}: its trainable token rows (trainable_token_indices) hold NaN or Inf, or values "
                        f"beyond the weight's dtype {f.job.w_dtype}, in {_indices(rows, 'row')}")
        if f.replaced:
            return "the adapter's full tensor that replaces it (modules_to_save) holds NaN or Inf"
        if f.companions:  # a quantized weight: its codes, or the scales they are multiplied by
            return (f"its base weight, dequantized from its codes and {', '.join(f.companions)}, holds NaN or Inf "
                    "(a NaN code, or a scale / absmax that is NaN, Inf or too large)")
        return "its base weight holds NaN or Inf"
    for c in f.contribs:
        held = nonfinite_factors(c.update)
        if held:
            said = beyond_float32(c.update) or f"holds {held} in its factors"  # (an F64 file's, widened to Inf)
            return f"{c.source}: module {c.update.name!r} {said}"
        m = c.update.magnitude
        if m is not None and not np.isfinite(m.f32()).all():
            return f"{c.source}: module {c.update.name!r} holds NaN or Inf in its DoRA magnitude"
    return None


def _dora_cause(f: Flagged, w32: np.ndarray) -> str | None:
    """The DoRA stage of the job whose scale magnitude / ||W + its own delta|| (by row, or by column) is not
    a float32 somewhere (a zero norm, say), naming its module and those rows / columns; or None."""
    stages: list[CoreStage] = [st for st in f.job.stages if st.magnitude is not None]
    doras = [c for c in f.contribs if c.update.magnitude is not None]  # one stage each, in order (ops.stages)
    if not stages or len(stages) != len(doras):
        return None
    w64 = w32.astype(np.float64)
    rows, cols = w64.shape
    for st, c in zip(stages, doras):
        delta = ReferenceBackend._stage_delta(f.job.name, tuple(st), rows, cols, str(w64.shape))
        axis = 0 if st.column_norm else 1
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            norms = np.linalg.norm(w64 + delta, axis=axis)
            scale = (np.asarray(st.magnitude, dtype=np.float64) / norms).astype(np.float32)
        bad = np.flatnonzero(~np.isfinite(scale))
        if len(bad) == 0:
            continue
        where = _indices(bad if st.column_norm else bad + f.r0, "column" if st.column_norm else "row")
        zero = bool((norms[bad] == 0).all())
        norm = "0" if zero else f"0 or below {float(norms[bad].max()):.3g}"
        what = "is not finite" if zero else "overflows float32"
        return (f"{c.source}: module {c.update.name!r} is DoRA, and W + its delta has norm {norm} in {where} of "
                f"{f.job.name}: its magnitude / norm {what} there (PEFT's merge gives NaN or Inf there too)")
    return None


def _cause(f: Flagged, backend: Backend, threads: int) -> tuple[int, str, str]:
    """(cause, what it is for this job, what its result holds: 'NaN', 'Inf' or 'NaN and Inf')."""
    job = f.job
    w32 = backend.to_float32(job.w, job.w_dtype, threads)
    found = _input_cause(f, w32, _wide(job, backend, threads) if job.w_dtype == "F64" else None)
    if found is not None:
        return INPUT, found, ""
    if job.out_dtype == "F32":
        out32 = job.out.view(np.float32)
    else:  # the job again, into float32: was its result finite before it was rounded?
        out32 = np.empty(job.out.shape, dtype=np.float32)
        backend.merge_batch([MergeJob(job.name, job.w, job.w_dtype, out32, "F32", job.stages)], threads)
    if np.isfinite(out32).all():
        return NARROW, "", "Inf"
    held = _held(out32)
    found = _dora_cause(f, w32)
    if found is not None:
        return DORA, found, held
    return FLOAT32, "", held


def overflow_error(names: Sequence[str], dtypes: dict[str, str], narrow: bool, held: str = "Inf") -> NonFiniteError:
    """Finite inputs whose result is not finite: in float32 already (`held`: what it holds), or only once
    rounded to the output dtypes (`narrow`)."""
    if narrow:
        return NonFiniteError(
            f"Inf in the output {_shown([f'{n} ({dtypes[n]}, largest finite {LARGEST[dtypes[n]]})' for n in names])}: "
            f"the merged values, finite in float32, overflow when rounded to the output dtype; {ALLOW}, or choose a "
            "wider --dtype")
    nan = "; an Inf minus an Inf, or times 0, on the way is NaN" if "NaN" in held else ""
    return NonFiniteError(
        f"{held} in the output {_shown(names)}: the inputs are finite but W + scale * B A overflows float32 "
        f"(largest finite {LARGEST['F32']}{nan}): a huge scale or weight?; {ALLOW}")


def nonfinite_error(flagged: Sequence[Flagged], backend: Backend, threads: int) -> NonFiniteError:
    """The error for merge jobs the backend flagged (a result not finite, or beyond its output dtype)."""
    causes: dict[int, tuple[str, list[str], set[str]]] = {}
    for f in flagged:
        cause, detail, held = _cause(f, backend, threads)
        first, names, helds = causes.setdefault(cause, (detail, [], set()))
        if f.job.name not in names:
            names.append(f.job.name)
        helds.update(held.split(" and ") if held else ())
    cause = min(causes)
    detail, names, helds = causes[cause]
    held = " and ".join(h for h in ("NaN", "Inf") if h in helds)
    if cause == INPUT:
        merged = any(f.job.stages for f in flagged if f.job.name in names)
        what = "the merged weights of" if merged else "the output (converted to the output dtype, not merged)"
        return NonFiniteError(f"NaN or Inf in {what} {_shown(names)}: {detail}; {ALLOW}")
    if cause == DORA:
        return NonFiniteError(f"{held} in the output {_shown(names)}: {detail}; {ALLOW}")
    return overflow_error(names, {f.job.name: f.job.out_dtype for f in flagged}, cause == NARROW, held)
