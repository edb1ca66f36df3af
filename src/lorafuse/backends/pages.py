"""Checks the backends make on the memory a caller hands them.

Which arrays' pages may be dropped from the resident set (MADV_DONTNEED) and read again unchanged: read-only,
C-contiguous views of an open mmap (a file's pages come back from the file). Anonymous or writable memory would
come back as zeros, so the backends honour a caller's `release` flag only for these (io.pages drops them). And a
merge's output may be its base weight itself (in place) but overlap no other input (check_no_overlap)."""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from typing import Any

import numpy as np

from lorafuse.errors import LorafuseValueError


def mapping_of(arr: np.ndarray) -> mmap.mmap | None:
    """The mmap an array is a view of (through views and memoryviews), or None."""
    base: object = arr
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return base if isinstance(base, mmap.mmap) else None


def releasable(arr: np.ndarray) -> bool:
    """Whether `arr` is a read-only, C-contiguous view of an open mmap: the only memory whose pages may be
    dropped (MADV_DONTNEED) and read again unchanged; never anonymous or writable memory, which it would zero."""
    if not hasattr(mmap, "MADV_DONTNEED") or not isinstance(arr, np.ndarray) or arr.flags.writeable \
            or not arr.flags.c_contiguous:
        return False
    m = mapping_of(arr)
    return m is not None and not m.closed


def honoured(jobs: Sequence[Any], release: Sequence[Sequence[bool] | None]) -> list[list[bool] | None]:
    """A caller's per-pair release flags (factored_svd_lists), kept only for pairs whose B and A are both
    releasable: a flag on anything else (an array in memory, a writable mapping) is a hint the core must not
    follow, since dropping those pages would zero the caller's data."""
    out: list[list[bool] | None] = []
    for job, flags in zip(jobs, release):
        if flags is None:
            out.append(None)
            continue
        pairs = list(job.pairs)
        out.append([bool(f) is True and i < len(pairs) and releasable(pairs[i][0]) and releasable(pairs[i][1])
                    if isinstance(f, bool) else f  # a non-bool flag: the core refuses it, naming the job
                    for i, f in enumerate(flags)])
    out.extend(list(r) if r is not None else None for r in release[len(jobs):])
    return out


def _same_buffer(x: np.ndarray, y: np.ndarray) -> bool:
    return (x.__array_interface__["data"][0] == y.__array_interface__["data"][0] and x.shape == y.shape
            and x.strides == y.strides and x.dtype.itemsize == y.dtype.itemsize)


def check_no_overlap(job: Any) -> None:
    """A merge job's `out` may be its `w` exactly (in place) but may not otherwise share memory with `w` or
    with a stage's arrays: rows written before they are read would give wrong results. LorafuseValueError."""
    if not isinstance(job, tuple) or len(job) != 6:
        return  # the core refuses it, naming the job
    name, w, _, out, _, stages = job  # a MergeJob or a plain tuple of its fields, as the core takes
    if not isinstance(out, np.ndarray):
        return
    others = [("w", w)] if isinstance(w, np.ndarray) and not _same_buffer(out, w) else []
    for i, stage in enumerate(stages if isinstance(stages, (list, tuple)) else ()):
        fields = getattr(stage, "_fields", None) or [f"field {k + 1}" for k in range(len(stage))] \
            if isinstance(stage, tuple) else []
        for field, value in zip(fields, stage):
            for arr in _arrays(value):  # a FactorStage's factors are a tuple of arrays
                others.append((f"stage {i + 1}'s {field}", arr))
    for what, arr in others:
        if np.may_share_memory(out, arr):
            raise LorafuseValueError(f"merge job {name!r}: out overlaps {what} (out may be w itself, in place, "
                                     "but no other input)")


def _arrays(value: object) -> list[np.ndarray]:
    """The numpy arrays in `value`: itself, or inside a tuple / list (one level deeper per nesting)."""
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, (tuple, list)):
        return [a for v in value for a in _arrays(v)]
    return []
