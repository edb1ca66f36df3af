"""The operations every backend provides, declared once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from lorafuse.backends.jobs import (
    ConvertJob,
    DenseJob,
    ExtractJob,
    ExtractResult,
    FactorJob,
    FactorListJob,
    FactorPair,
    InnerJob,
    MergeJob,
    SketchJob,
    SvdResult,
    TaskMergeJob,
)


class Backend(Protocol):
    """A place the math runs: 'cpu' (the compiled C++ core), 'reference' (numpy float64, the
    test oracle), 'cuda' (lorafuse._cuda, one GPU). `threads` 0 means all hardware threads; backends that do not
    use host threads ignore it."""

    name: str

    def to_float32(self, raw: np.ndarray, dtype: str, threads: int = 0) -> np.ndarray:
        """Raw elements of safetensors dtype `dtype` (BF16 as uint16, F8 as uint8) as float32."""
        ...

    def from_float32(self, x: np.ndarray, dtype: str, threads: int = 0) -> np.ndarray:
        """float32 rounded to F32/F16/BF16 (nearest even); BF16 comes back as uint16."""
        ...

    def convert_into(self, jobs: Sequence[ConvertJob], threads: int = 0) -> None:
        """Each job's raw 2-D tensor as float32 into its `out` (transposed with `transpose`); every job is checked
        before any is converted."""
        ...

    def sketch_fold(self, jobs: Sequence[SketchJob], threads: int = 0) -> None:
        """Each job's acc += sum_i c_i B_i (A_i x) ('range') or sum_i c_i A_i^T (B_i^T x) ('corange'), from the
        terms' factors as stored: each term's products in float32 (c_i rounded to float32, applied to the inner
        product), the job's sum over its terms in float32, added to acc once; every job is checked before any
        is run."""
        ...

    def merge_batch(self, jobs: Sequence[MergeJob], threads: int = 0) -> list[bool]:
        """Fused W' = W + sum of stages (+ DoRA) into each job's out; per job, whether the output
        holds a NaN or Inf (or overflowed its dtype)."""
        ...

    def frobenius_sq(self, pairs: Sequence[FactorPair], threads: int = 0) -> np.ndarray:
        """||B A||_F^2 per pair, float64, from the factors."""
        ...

    def inner(self, jobs: Sequence[InnerJob], threads: int = 0) -> np.ndarray:
        """<B1 A1, B2 A2>_F per job, float64, from the factors."""
        ...

    def factored_svd(self, jobs: Sequence[FactorJob], ranks: Sequence[int], split: str = "B", threads: int = 0,
                     mode: str = "exact", seed: int = 0, oversample: int = 10,
                     power_iters: int = 4) -> list[SvdResult]:
        """Best rank-k factors of D = B A without forming D (see DESIGN.md, combine svd)."""
        ...

    def factored_svd_lists(self, jobs: Sequence[FactorListJob], ranks: Sequence[int], split: str = "B",
                           threads: int = 0, mode: str = "exact", seed: int = 0, oversample: int = 10,
                           power_iters: int = 4,
                           release: Sequence[Sequence[bool] | None] | None = None) -> list[SvdResult]:
        """factored_svd of sum_i w_i B_i A_i from per-adapter factors; the path is the one
        factored_svd_is_exact(out, in, sum r_i, k, mode) names; the randomized path stacks nothing.
        release: per job None or one flag per pair, True only where B_i and A_i are read-only views of a file
        mapping (io.pages.releasable): their pages then leave the resident set after each use (results unchanged)."""
        ...

    def factored_svd_is_exact(self, out: int, in_: int, r: int, k: int, mode: str = "auto",
                              oversample: int = 10, power_iters: int = 4) -> bool:
        """Whether factored_svd takes its exact path for a job of this shape."""
        ...

    def dense_svd(self, jobs: Sequence[DenseJob], ranks: Sequence[int], split: str = "B", seed: int = 0,
                  oversample: int = 10, power_iters: int = 4, threads: int = 0) -> list[SvdResult]:
        """Best rank-k factors of dense matrices (exact or randomized, seeded by seed and name)."""
        ...

    def dense_svd_is_exact(self, out: int, in_: int, k: int, oversample: int = 10) -> bool:
        """Whether dense_svd takes its exact path for a job of this shape."""
        ...

    def task_merge(self, jobs: Sequence[TaskMergeJob], weights: Sequence[Sequence[float]], prune: str = "none",
                   density: float = 1.0, rescale: bool = False, merge: str = "sum", majority: str = "total",
                   seed: int = 0, threads: int = 0) -> list[np.ndarray]:
        """PEFT merge_utils semantics per job; the merged float32 tensor per job."""
        ...

    def extract_svd(self, jobs: Sequence[ExtractJob], ranks: Sequence[int], oversample: int = 10,
                    power_iters: int = 2, seed: int = 0, threads: int = 0) -> list[ExtractResult]:
        """Rank-k factors of w_ft - w_base by a streamed randomized SVD."""
        ...
