"""The merge stages of one `MergeJob` for the backend (`get_backend().merge_batch`).

A stage is a `LowRankStage(B, A, magnitude, column_norm)`, which adds B @ A (consecutive
plain LoRA updates stack into one GEMM), or a `FactorStage(kind, factors, magnitude,
column_norm)` for the structured updates:
- `FactorStage("hadamard", (B1, A1, B2, A2))`: adds (B1 @ A1) * (B2 @ A2), a LoHa delta;
- `FactorStage("kron", (W1, W2[, row_offset]))`: adds rows row_offset.. of kron(W1, W2), a LoKr delta;
every coefficient folded into the first array. A DoRA stage (magnitude set) rescales rows
(or columns) of everything before it, so each is a stage of its own, in order.

Updates that land on rows of a fused weight have their row factors sliced (the rows of
their delta that go there) and padded with zero rows (the rows of the weight they miss).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lorafuse.backends import FactorStage, LowRankStage, Stage
from lorafuse.model import LycorisUpdate
from lorafuse.ops.resolve import Contribution

ROW_FACTORS = {"lowrank": (0,), "hadamard": (0, 2)}  # which arrays hold one row per output row

__all__ = ["ROW_FACTORS", "Stage", "build_stages", "on_columns", "slice_rows", "stage_arrays"]


def on_columns(c: Contribution) -> bool:
    """Whether a DoRA update normalizes columns of the stored base weight (not rows)."""
    return c.update.transposed or c.update.magnitude_on_columns


def _place_rows(x: np.ndarray, c: Contribution, rows: int) -> np.ndarray:
    """Rows delta_rows of x, placed at base_rows of a zero matrix of `rows` rows."""
    if c.delta_rows is not None:
        x = x[c.delta_rows[0] : c.delta_rows[1]]
    if c.base_rows is None and x.shape[0] == rows:
        return np.ascontiguousarray(x)
    out = np.zeros((rows, x.shape[1]), dtype=np.float32)
    lo = c.base_rows[0] if c.base_rows is not None else 0
    out[lo : lo + x.shape[0]] = x
    return out


def _stage_of(c: Contribution, rows: int, threads: int) -> tuple[str, tuple[np.ndarray, ...]]:
    u = c.update
    if isinstance(u, LycorisUpdate):
        kind, arrays = u.merge_stage(c.coef, threads)
        if not c.mapped:
            return kind, tuple(arrays)
        if kind in ROW_FACTORS:
            return kind, tuple(_place_rows(x, c, rows) if i in ROW_FACTORS[kind] else x
                               for i, x in enumerate(arrays))
        # a Kronecker product cut into row ranges: through its exact factorization instead
    b, a = u.factors(threads)
    b = (b * np.float32(c.coef)).astype(np.float32, copy=False)
    return "lowrank", (_place_rows(b, c, rows) if c.mapped else b, a)


def build_stages(contribs: Sequence[Contribution], rows: int, threads: int) -> list[Stage]:
    stages: list[Stage] = []
    bs: list[np.ndarray] = []
    as_: list[np.ndarray] = []

    def flush() -> None:
        if bs:
            stages.append(LowRankStage(np.ascontiguousarray(np.concatenate(bs, axis=1)),
                                       np.ascontiguousarray(np.concatenate(as_, axis=0))))
            bs.clear()
            as_.clear()

    for c in contribs:
        kind, arrays = _stage_of(c, rows, threads)
        m = c.update.magnitude
        if kind == "lowrank" and m is None:
            bs.append(arrays[0])
            as_.append(arrays[1])
            continue
        flush()
        magnitude = None if m is None else m.f32(threads).reshape(-1)
        if kind == "lowrank":
            stages.append(LowRankStage(arrays[0], arrays[1], magnitude, on_columns(c)))
        else:
            stages.append(FactorStage(kind, tuple(arrays), magnitude, on_columns(c)))
    flush()
    return stages


def stage_arrays(stage: Stage) -> tuple[np.ndarray, ...]:
    """Every array a stage reads (factors and magnitude), e.g. to test them for NaN / Inf."""
    factors = (stage.b, stage.a) if isinstance(stage, LowRankStage) else stage.factors
    arrays = tuple(x for x in factors if isinstance(x, np.ndarray))
    return arrays if stage.magnitude is None else (*arrays, stage.magnitude)


def slice_rows(stage: Stage, r0: int, r1: int) -> Stage:
    """The stage for rows [r0, r1) of the job."""
    if stage.column_norm:  # column norms need the whole matrix: such jobs are never split
        return stage
    m = None if stage.magnitude is None else stage.magnitude[r0:r1]
    if isinstance(stage, LowRankStage):
        return LowRankStage(stage.b[r0:r1], stage.a, m, False)
    kind, arrays = stage.kind, stage.factors
    if kind == "kron":  # the kernel takes the offset of the first row into kron(W1, W2)
        return FactorStage(kind, (arrays[0], arrays[1], r0), m, False)
    rows = ROW_FACTORS[kind]
    return FactorStage(kind, tuple(x[r0:r1] if i in rows else x for i, x in enumerate(arrays)), m, False)
