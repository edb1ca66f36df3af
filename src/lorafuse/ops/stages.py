"""The merge stages of one `MergeJob` for the backend (`get_backend().merge_batch`).

A stage is a `LowRankStage(B, A, magnitude, column_norm)`, which adds B @ A (consecutive
plain LoRA updates stack into one GEMM), or a `FactorStage(kind, factors, magnitude,
column_norm)` for the structured updates:
- `FactorStage("hadamard", (B1, A1, B2, A2))`: adds (B1 @ A1) * (B2 @ A2), a LoHa delta;
- `FactorStage("kron", (W1, W2[, row_offset]))`: adds rows row_offset.. of kron(W1, W2), a LoKr delta;
every coefficient folded into the first array. A DoRA stage (magnitude set) rescales rows
(or columns) of everything before it, by its magnitude over the norm of W + its own delta
(PEFT's, whatever the stages before it), so each is a stage of its own, in order.

Updates that land on rows of a weight (an expert of a fused [E, out, in] tensor, the q block of
a fused qkv_proj, a text encoder's q on an OpenCLIP in_proj_weight) become a `RowBlock`: the
rows [lo, hi) they cover and the contributions, whose factors are read only when a row piece
of the job that meets those rows is computed (`slice_rows`). A piece outside the block gets no
stage from it (None), so an expert's update costs nothing on the other experts' rows, and
`row_pieces` cuts a weight's rows at every block's edges so that no piece pads a block with
zero rows it does not cover. Memory stays that of one piece's factors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lorafuse.backends import FactorStage, LowRankStage
from lorafuse.backends import Stage as CoreStage
from lorafuse.model import LycorisUpdate
from lorafuse.ops.resolve import Contribution

ROW_FACTORS = {"lowrank": (0,), "hadamard": (0, 2)}  # which arrays hold one row per output row

__all__ = ["ROW_FACTORS", "CoreStage", "RowBlock", "Stage", "build_stages", "on_columns", "row_pieces",
           "slice_rows", "slice_stages"]


@dataclass(frozen=True)
class RowBlock:
    """Plain contributions that all land on rows [lo, hi) of the job's weight, read lazily."""

    lo: int
    hi: int
    contribs: tuple[Contribution, ...]
    threads: int


Stage = CoreStage | RowBlock  # what build_stages gives; slice_rows turns it into the backend's stage


def on_columns(c: Contribution) -> bool:
    """Whether a DoRA update normalizes columns of the stored base weight (not rows)."""
    return c.update.transposed or c.update.magnitude_on_columns


def _rows_of(c: Contribution, rows: int) -> tuple[int, int]:
    """The rows of the weight a contribution covers."""
    if c.base_rows is not None:
        return c.base_rows
    if c.delta_rows is not None:
        return 0, c.delta_rows[1] - c.delta_rows[0]
    return 0, rows


def _stage_of(c: Contribution, threads: int) -> tuple[str, tuple[np.ndarray, ...]]:
    """The stage arrays of a contribution; for a mapped one, its row factors hold only the rows of
    its delta that land on the weight (delta_rows), as many as the rows it covers."""
    u = c.update
    arrays: tuple[np.ndarray, ...]
    # c.coef is a float32 (apply_plan refuses larger ones); a product beyond float32 is Inf here, which the
    # merge flags and apply's error names (an overflow of finite inputs), without numpy's warning
    if isinstance(u, LycorisUpdate):
        with np.errstate(over="ignore"):
            kind, found = u.merge_stage(c.coef, threads)
        arrays = tuple(found)
        if not c.mapped or kind in ROW_FACTORS:
            if c.delta_rows is not None:
                lo, hi = c.delta_rows
                arrays = tuple(x[lo:hi] if i in ROW_FACTORS[kind] else x for i, x in enumerate(arrays))
            return kind, arrays
        # a Kronecker product cut into row ranges: through its exact factorization instead
    b, a = u.factors(threads)
    with np.errstate(over="ignore"):
        b = (b * np.float32(c.coef)).astype(np.float32, copy=False)
    if c.delta_rows is not None:
        b = b[c.delta_rows[0] : c.delta_rows[1]]
    return "lowrank", (b, a)


def build_stages(contribs: Sequence[Contribution], rows: int, threads: int) -> list[Stage]:
    """The stages of a weight of `rows` rows, in order: plain whole-weight LoRA updates stacked into
    one GEMM, mapped ones grouped by the rows they cover into RowBlocks (read per piece), structured
    and DoRA updates each a stage of its own. Additions commute, so plain stages may be regrouped
    between two DoRA stages (which rescale everything before them)."""
    stages: list[Stage] = []
    bs: list[np.ndarray] = []
    as_: list[np.ndarray] = []
    blocks: dict[tuple[int, int], list[Contribution]] = {}

    def flush() -> None:
        if bs:
            stages.append(LowRankStage(np.ascontiguousarray(np.concatenate(bs, axis=1)),
                                       np.ascontiguousarray(np.concatenate(as_, axis=0))))
            bs.clear()
            as_.clear()
        for (lo, hi), cs in blocks.items():
            stages.append(RowBlock(lo, hi, tuple(cs), threads))
        blocks.clear()

    for c in contribs:
        lo, hi = _rows_of(c, rows)
        if c.mapped and (lo, hi) != (0, rows):
            if c.update.magnitude is not None:  # resolve refuses these; never scale part of a weight
                raise AssertionError("a DoRA update on part of a weight")
            blocks.setdefault((lo, hi), []).append(c)
            continue
        kind, arrays = _stage_of(c, threads)
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


def row_pieces(contribs: Sequence[Contribution], rows: int, step: int) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) of at most `step` rows covering a weight of `rows` rows, cut at the edges
    of every row block (so that a piece meets a block wholly or not at all, and pads nothing)."""
    cuts = {0, rows}
    for c in contribs:
        if c.mapped:
            lo, hi = _rows_of(c, rows)
            cuts.update((min(max(lo, 0), rows), min(max(hi, 0), rows)))
    edges = sorted(cuts)
    step = max(1, step)
    return [(r, min(r + step, hi)) for lo, hi in zip(edges, edges[1:]) for r in range(lo, hi, step)]


def _block_rows(block: RowBlock, r0: int, r1: int) -> list[CoreStage]:
    """The stages of a row block for rows [r0, r1) of the job (which meet the block): the block's
    rows sliced, and placed in zero rows where the piece reaches past the block."""
    a, b = max(block.lo, r0), min(block.hi, r1)
    top, n = a - r0, r1 - r0

    def place(x: np.ndarray) -> np.ndarray:
        x = x[a - block.lo : b - block.lo]
        if x.shape[0] == n:
            return np.ascontiguousarray(x)
        out = np.zeros((n, x.shape[1]), dtype=np.float32)
        out[top : top + x.shape[0]] = x
        return out

    stages: list[CoreStage] = []
    bs: list[np.ndarray] = []
    as_: list[np.ndarray] = []
    for c in block.contribs:
        kind, arrays = _stage_of(c, block.threads)
        if kind == "lowrank":
            bs.append(place(arrays[0]))
            as_.append(arrays[1])
        else:
            rows = ROW_FACTORS[kind]
            stages.append(FactorStage(kind, tuple(place(x) if i in rows else x for i, x in enumerate(arrays))))
    if bs:
        stages.insert(0, LowRankStage(np.ascontiguousarray(np.concatenate(bs, axis=1)),
                                      np.ascontiguousarray(np.concatenate(as_, axis=0))))
    return stages


def slice_rows(stage: CoreStage, r0: int, r1: int) -> CoreStage:
    """A backend stage for rows [r0, r1) of the job."""
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


def slice_stages(stages: Sequence[Stage], r0: int, r1: int) -> list[CoreStage]:
    """The backend stages for rows [r0, r1) of the job, in order: a row block that meets none of
    those rows gives none."""
    out: list[CoreStage] = []
    for st in stages:
        if not isinstance(st, RowBlock):
            out.append(slice_rows(st, r0, r1))
        elif st.lo < r1 and r0 < st.hi:
            out += _block_rows(st, r0, r1)
    return out
