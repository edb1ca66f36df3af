"""Typed jobs for the backend operations.

Each job is a NamedTuple: typed and named on the Python side, and still a tuple, so the
compiled backend receives it without a conversion. Factors are float32, C-contiguous.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class FactorJob(NamedTuple):
    """One module's update B @ A, for factored_svd: B (out x R), A (R x in)."""

    name: str
    b: np.ndarray
    a: np.ndarray


class FactorListJob(NamedTuple):
    """One module's update sum_i w_i B_i @ A_i from per-adapter factors (B_i (out x r_i), A_i (r_i x in)),
    for factored_svd_lists: the same result as factored_svd on the stacked (w_i B_i, A_i), without the
    caller stacking anything."""

    name: str
    pairs: Sequence[tuple[np.ndarray, np.ndarray]]
    weights: Sequence[float]


class ConvertJob(NamedTuple):
    """A 2-D raw tensor (safetensors dtype `dtype`: BF16 as uint16, F8 as uint8) widened to float32 into `out`
    (float32, C-contiguous, writable): of raw's shape, or of its transpose with `transpose`, for convert_into."""

    raw: np.ndarray
    dtype: str
    out: np.ndarray
    transpose: bool


class DenseJob(NamedTuple):
    """One module's dense matrix D (out x in), for dense_svd."""

    name: str
    d: np.ndarray


class TaskMergeJob(NamedTuple):
    """One module's tensors t_1..t_n (float32, one shape), for task_merge."""

    name: str
    tensors: list[np.ndarray]


class ExtractJob(NamedTuple):
    """One module's base and fine-tuned weights (raw 2-D buffers of one shape: BF16 as uint16,
    F8 as uint8), for extract_svd: D = w_ft - w_base."""

    name: str
    w_base: np.ndarray
    base_dtype: str
    w_ft: np.ndarray
    ft_dtype: str


class FactorPair(NamedTuple):
    """B (out x r) and A (r x in), for frobenius_sq."""

    b: np.ndarray
    a: np.ndarray


class InnerJob(NamedTuple):
    """Two updates of one shape, for inner: <B1 A1, B2 A2>_F."""

    b1: np.ndarray
    a1: np.ndarray
    b2: np.ndarray
    a2: np.ndarray


class LowRankStage(NamedTuple):
    """delta = B @ A (the scale already folded into B); DoRA magnitude optional."""

    b: np.ndarray
    a: np.ndarray
    magnitude: np.ndarray | None = None
    column_norm: bool = False


class FactorStage(NamedTuple):
    """A structured stage: kind 'lowrank' (B, A), 'hadamard' (B1, A1, B2, A2: LoHa,
    (B1 A1) * (B2 A2)) or 'kron' (W1, W2[, row_offset]: LoKr, rows of kron(W1, W2))."""

    kind: str
    factors: tuple
    magnitude: np.ndarray | None = None
    column_norm: bool = False


Stage = LowRankStage | FactorStage


class MergeJob(NamedTuple):
    """out = round(W + stage_1 + ... + stage_n) for one 2-D base weight, fused (apply).
    w and out are raw buffers of their dtypes (BF16 as uint16); out is written in place."""

    name: str
    w: np.ndarray
    w_dtype: str
    out: np.ndarray
    out_dtype: str
    stages: list[Stage]


class SvdResult(NamedTuple):
    """Rank-k factors B2 (out x k), A2 (k x in) and the singular values S (float64)."""

    b: np.ndarray
    a: np.ndarray
    s: np.ndarray


class ExtractResult(NamedTuple):
    """B (out x k) = U_k S_k, A (k x in) = V_k^T, S the computed singular values (float64),
    frob_sq = ||D||_F^2."""

    b: np.ndarray
    a: np.ndarray
    s: np.ndarray
    frob_sq: float


class SketchTerm(NamedTuple):
    """One adapter's term c B A of a module, for sketch_fold: its factors as stored (raw elements of safetensors
    dtypes, BF16 as uint16, F8 as uint8; C-contiguous): A (r x in), B (out x r)."""

    a: np.ndarray
    a_dtype: str
    b: np.ndarray
    b_dtype: str
    coef: float


class SketchJob(NamedTuple):
    """One module's sketch accumulators folded over a chunk of adapters, for sketch_fold. side 'range': x (in x w,
    float32), acc (out x w, float64) += sum_i c_i B_i (A_i x); side 'corange': x (out x w), acc (in x w) +=
    sum_i c_i A_i^T (B_i^T x)."""

    terms: Sequence[SketchTerm]
    side: str
    x: np.ndarray
    acc: np.ndarray
