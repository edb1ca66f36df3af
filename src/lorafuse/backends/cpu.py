"""The 'cpu' backend: the compiled C++ core (chosen per CPU by lorafuse._core)."""

from __future__ import annotations

from collections.abc import Sequence

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
from lorafuse.backends.native import core
from lorafuse.backends.pages import check_no_overlap, honoured


class CpuBackend:
    name = "cpu"

    def to_float32(self, raw: np.ndarray, dtype: str, threads: int = 0) -> np.ndarray:
        return core.to_float32(raw, dtype, threads)

    def from_float32(self, x: np.ndarray, dtype: str, threads: int = 0) -> np.ndarray:
        return core.from_float32(x, dtype, threads)

    def convert_into(self, jobs: Sequence[ConvertJob], threads: int = 0) -> None:
        core.convert_into(list(jobs), threads)

    def sketch_fold(self, jobs: Sequence[SketchJob], threads: int = 0) -> None:
        core.sketch_fold(list(jobs), threads)

    def merge_batch(self, jobs: Sequence[MergeJob], threads: int = 0) -> list[bool]:
        for j in jobs:
            check_no_overlap(j)
        return list(core.merge_batch(list(jobs), threads)) if jobs else []

    def frobenius_sq(self, pairs: Sequence[FactorPair], threads: int = 0) -> np.ndarray:
        return core.factored_frobenius_sq(list(pairs), threads)

    def inner(self, jobs: Sequence[InnerJob], threads: int = 0) -> np.ndarray:
        return core.factored_inner(list(jobs), threads)

    def factored_svd(self, jobs: Sequence[FactorJob], ranks: Sequence[int], split: str = "B", threads: int = 0,
                     mode: str = "exact", seed: int = 0, oversample: int = 10,
                     power_iters: int = 4) -> list[SvdResult]:
        out = core.factored_svd(list(jobs), list(ranks), split, threads, mode=mode, seed=seed,
                                oversample=oversample, power_iters=power_iters)
        return [SvdResult(*r) for r in out]

    def factored_svd_lists(self, jobs: Sequence[FactorListJob], ranks: Sequence[int], split: str = "B",
                           threads: int = 0, mode: str = "exact", seed: int = 0, oversample: int = 10,
                           power_iters: int = 4,
                           release: Sequence[Sequence[bool] | None] | None = None) -> list[SvdResult]:
        extra = {} if release is None else {"release": honoured(jobs, release)}
        out = core.factored_svd_lists(list(jobs), list(ranks), split, threads, mode=mode, seed=seed,
                                      oversample=oversample, power_iters=power_iters, **extra)
        return [SvdResult(*r) for r in out]

    def factored_svd_is_exact(self, out: int, in_: int, r: int, k: int, mode: str = "auto",
                              oversample: int = 10, power_iters: int = 4) -> bool:
        return bool(core.factored_svd_is_exact(out, in_, r, k, mode, oversample, power_iters))

    def dense_svd(self, jobs: Sequence[DenseJob], ranks: Sequence[int], split: str = "B", seed: int = 0,
                  oversample: int = 10, power_iters: int = 4, threads: int = 0) -> list[SvdResult]:
        out = core.dense_svd(list(jobs), list(ranks), split, seed, oversample, power_iters, threads)
        return [SvdResult(*r) for r in out]

    def dense_svd_is_exact(self, out: int, in_: int, k: int, oversample: int = 10) -> bool:
        return bool(core.dense_svd_is_exact(out, in_, k, oversample))

    def task_merge(self, jobs: Sequence[TaskMergeJob], weights: Sequence[Sequence[float]], prune: str = "none",
                   density: float = 1.0, rescale: bool = False, merge: str = "sum", majority: str = "total",
                   seed: int = 0, threads: int = 0) -> list[np.ndarray]:
        return list(core.task_merge(list(jobs), list(weights), prune, density, rescale, merge, majority, seed,
                                    threads))

    def extract_svd(self, jobs: Sequence[ExtractJob], ranks: Sequence[int], oversample: int = 10,
                    power_iters: int = 2, seed: int = 0, threads: int = 0) -> list[ExtractResult]:
        out = core.extract_svd(list(jobs), list(ranks), oversample, power_iters, seed, threads)
        return [ExtractResult(b, a, s, float(f)) for b, a, s, f in out]
