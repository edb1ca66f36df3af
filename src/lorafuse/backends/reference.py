"""The 'reference' backend: every operation in numpy float64, written for clarity, not speed.

It is the test oracle of tests/test_backend_ops.py (every other backend is compared with it)
and a way to run a whole command without the compiled core's kernels (LORAFUSE_BACKEND=reference).
The semantics are those of the C++ core (cpp/src/*.cpp, the binding docstrings):

- dtype conversion: decoding is exact; F32 -> F16 / BF16 rounds to nearest even (overflow to
  Inf, a NaN becomes the quiet NaN of its sign, 0x7E00 / (bits >> 16) | 0x0040); F8_E4M3 is the
  'fn' variant (no Inf; S.1111.111 is NaN), F8_E5M2 the top byte of a binary16.
- merge_batch: W (as float32) + each stage in order, in float64; a DoRA stage scales every row
  (or column, `column_norm`) i of the sum so far by magnitude[i] / ||row i of W + its own delta||
  (PEFT's DoRA merge: the norm never includes the stages before it); the result is rounded to
  float32, then to the output dtype, written into `out`. A job is flagged when a value is NaN,
  Inf or overflows the output dtype.
- factored_svd / dense_svd: the exact truncated SVD of the float64 product (float64 matrix);
  the entry of largest magnitude of each left singular vector positive (first on ties); split
  'B' puts S on B, 'sqrt' sqrt(S) on both; B, A padded with zeros to k. The number of singular
  values follows the cpu backend's path choice (factored: all min(R, out, in) on the exact
  path, min(k, R, out, in) otherwise; dense: min(k, out, in)). Where the cpu backend is
  randomized, this one still returns the optimum (Eckart-Young): compare within a factor.
- task_merge: PEFT merge_utils (magnitude pruning keeps the int(density * numel) largest |t|,
  ties lowest index first; random pruning draws the core's counter-based stream, so its masks
  are the same bits; ties / sum merged in float64, rounded once to float32).
- extract_svd: the exact SVD of D = f32(w_ft) - f32(w_base) in float64, the leading
  l = min(k + oversample, out, in) singular values; a zero singular value gets a zero column
  of B / row of A; D = 0 gives zeros.

The numerics live in lorafuse.backends.reference_math; this module runs the jobs.
Argument checks are lighter than the cpu backend's (no limits on ranks or threads; `threads`
is ignored); errors on data (non-finite inputs, shapes that do not fit, unknown names) are the
same classes with the same messages.
"""

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
from lorafuse.backends.pages import check_no_overlap
from lorafuse.backends.reference_math import (
    ITEMSIZE,
    OVERFLOW,
    WRITABLE,
    check_dtype,
    check_rank,
    check_ranks,
    check_split,
    dense_is_exact,
    f32,
    factored_is_exact,
    from_float32,
    magnitude_keep,
    random_keep,
    raw_f32,
    shape_str,
    to_float32,
    truncated,
)
from lorafuse.errors import DtypeError, LorafuseValueError, NonFiniteError, ShapeMismatchError

# ---------------------------------------------------------------- the backend


class ReferenceBackend:
    name = "reference"

    def to_float32(self, raw: np.ndarray, dtype: str, threads: int = 0) -> np.ndarray:
        return to_float32(raw, dtype)

    def from_float32(self, x: np.ndarray, dtype: str, threads: int = 0) -> np.ndarray:
        return from_float32(x, dtype)

    def convert_into(self, jobs: Sequence[ConvertJob], threads: int = 0) -> None:
        checked = []
        for i, (raw, dtype, out, transpose) in enumerate(jobs):
            what = f"convert_into: job {i}"
            if not isinstance(raw, np.ndarray) or not isinstance(out, np.ndarray):
                raise LorafuseValueError(f"{what}: raw and out must be numpy arrays")
            if raw.ndim != 2:
                raise ShapeMismatchError(f"{what} {shape_str(raw)} must be 2-D")
            if out.dtype != np.float32 or not out.flags.c_contiguous:
                raise DtypeError(f"{what}: the output must be a C-contiguous float32 numpy array")
            if not out.flags.writeable:
                raise LorafuseValueError(f"{what}: the output must be writable")
            want = raw.shape[::-1] if transpose else raw.shape
            if out.shape != want:
                raise ShapeMismatchError(f"{what} {shape_str(raw)} does not fit the output {shape_str(out)}"
                                         f"{' (transposed)' if transpose else ''}")
            checked.append((to_float32(raw, dtype), out, transpose))
        for x, out, transpose in checked:
            out[...] = x.T if transpose else x

    # ---- merge

    @staticmethod
    def _stage_delta(name: str, stage: tuple, rows: int, cols: int, wshape: str) -> np.ndarray:
        first = stage[0]
        if not isinstance(first, str):
            kind, factors = "lowrank", (stage[0], stage[1])
        else:
            kind, factors = first, tuple(stage[1])
        if kind == "lowrank":
            b, a = f32(factors[0], f"{name}: B"), f32(factors[1], f"{name}: A")
            if b.ndim != 2 or a.ndim != 2 or b.shape[0] != rows or a.shape[1] != cols or b.shape[1] != a.shape[0]:
                raise ShapeMismatchError(f"{name}: factors B {shape_str(b)} and A {shape_str(a)} do not fit the base "
                                         f"weight {wshape}")
            return b.astype(np.float64) @ a.astype(np.float64)
        if kind == "hadamard":
            b1, a1, b2, a2 = (f32(f, f"{name}: LoHa {w}") for f, w in zip(factors, ("B1", "A1", "B2", "A2")))
            if (b1.shape[0] != rows or b2.shape[0] != rows or a1.shape[1] != cols or a2.shape[1] != cols
                    or b1.shape[1] != a1.shape[0] or b2.shape[1] != a2.shape[0]):
                raise ShapeMismatchError(f"{name}: LoHa factors B1 {shape_str(b1)}, A1 {shape_str(a1)}, B2 "
                                         f"{shape_str(b2)}, A2 {shape_str(a2)} do not fit the base weight {wshape}")
            return (b1.astype(np.float64) @ a1.astype(np.float64)) * (b2.astype(np.float64) @ a2.astype(np.float64))
        if kind == "kron":
            w1, w2 = f32(factors[0], f"{name}: LoKr W1"), f32(factors[1], f"{name}: LoKr W2")
            offset = int(factors[2]) if len(factors) == 3 else 0
            full = np.kron(w1.astype(np.float64), w2.astype(np.float64))
            fits = (offset >= 0 and rows <= full.shape[0] - offset) if len(factors) == 3 else full.shape[0] == rows
            if not fits or full.shape[1] != cols:
                raise ShapeMismatchError(f"{name}: LoKr factors W1 {shape_str(w1)} and W2 {shape_str(w2)} do not fit "
                                         f"the base weight {wshape}")
            return full[offset : offset + rows]
        raise LorafuseValueError(f"{name}: unknown stage kind '{kind}' (expected 'lowrank', 'hadamard' or 'kron')")

    def sketch_fold(self, jobs: Sequence[SketchJob], threads: int = 0) -> None:
        checked = [_sketch_checked(i, job) for i, job in enumerate(jobs)]
        for job, terms in checked:
            x = job.x.astype(np.float64)
            for a, b, c in terms:
                if job.side == "range":
                    job.acc[...] += b @ (c * (a @ x))
                else:
                    job.acc[...] += a.T @ (c * (b.T @ x))

    def merge_batch(self, jobs: Sequence[MergeJob], threads: int = 0) -> list[bool]:
        for job in jobs:  # refused as the 'cpu' backend refuses it
            check_no_overlap(job)
        flags = []
        for job in jobs:
            name, w, w_dtype, out, out_dtype, stages = job
            w32 = raw_f32(w, w_dtype, f"{name}: base weight")
            check_dtype(out_dtype)
            if out.dtype.itemsize != ITEMSIZE[out_dtype]:
                raise DtypeError(f"{name}: output: buffer item size {out.dtype.itemsize} does not match dtype "
                                 f"{out_dtype}")
            if not out.flags.writeable:
                raise LorafuseValueError(f"{name}: output buffer is read-only")
            if w.ndim != 2 or out.shape != w.shape:
                raise ShapeMismatchError(f"{name}: base weight {shape_str(w)} and output {shape_str(out)} must be "
                                         "equal 2-D shapes")
            if out_dtype not in WRITABLE:
                raise DtypeError(f"{name}: cannot write output dtype {out_dtype}")
            rows, cols = w.shape
            base = w32.astype(np.float64)
            t = base
            for stage in stages:
                delta = self._stage_delta(name, tuple(stage), rows, cols, shape_str(w))
                t = t + delta
                magnitude, column_norm = stage[2], bool(stage[3])
                if magnitude is None:
                    continue
                m = f32(magnitude, f"{name}: DoRA magnitude").astype(np.float64)
                if m.shape != ((cols,) if column_norm else (rows,)):
                    raise ShapeMismatchError(f"{name}: DoRA magnitude {shape_str(magnitude)} does not fit the base "
                                             f"weight {shape_str(w)}")
                own = base + delta  # the base weight and this stage's delta alone
                with np.errstate(divide="ignore", invalid="ignore"):
                    if column_norm:
                        t = t * (m / np.linalg.norm(own, axis=0))[None, :]
                    else:
                        t = t * (m / np.linalg.norm(own, axis=1))[:, None]
            with np.errstate(over="ignore", invalid="ignore"):
                t32 = t.astype(np.float32)
                flags.append(not bool((np.abs(t32) < OVERFLOW[out_dtype]).all()))
            out[...] = from_float32(t32, out_dtype).view(out.dtype)
        return flags

    # ---- norms

    def frobenius_sq(self, pairs: Sequence[FactorPair], threads: int = 0) -> np.ndarray:
        values = []
        for b, a in pairs:
            b, a = f32(b, "B"), f32(a, "A")
            if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
                raise ShapeMismatchError(f"B {shape_str(b)} and A {shape_str(a)} cannot be multiplied")
            values.append(float(np.sum((b.astype(np.float64) @ a.astype(np.float64)) ** 2)))
        return np.asarray(values, dtype=np.float64)

    def inner(self, jobs: Sequence[InnerJob], threads: int = 0) -> np.ndarray:
        values = []
        for job in jobs:
            b1, a1, b2, a2 = (f32(x, what) for x, what in zip(job, ("B1", "A1", "B2", "A2")))
            if (b1.shape[1] != a1.shape[0] or b2.shape[1] != a2.shape[0] or b1.shape[0] != b2.shape[0]
                    or a1.shape[1] != a2.shape[1]):
                raise ShapeMismatchError(f"factors B1 {shape_str(b1)}, A1 {shape_str(a1)}, B2 {shape_str(b2)}, A2 "
                                         f"{shape_str(a2)} do not describe two deltas of one shape")
            d1 = b1.astype(np.float64) @ a1.astype(np.float64)
            d2 = b2.astype(np.float64) @ a2.astype(np.float64)
            values.append(float(np.sum(d1 * d2)))
        return np.asarray(values, dtype=np.float64)

    # ---- SVD

    def factored_svd(self, jobs: Sequence[FactorJob], ranks: Sequence[int], split: str = "B", threads: int = 0,
                     mode: str = "exact", seed: int = 0, oversample: int = 10,
                     power_iters: int = 4) -> list[SvdResult]:
        check_split(split)
        factored_is_exact(1, 1, 1, 1, mode, oversample, power_iters)  # refuses an unknown mode
        ranks = check_ranks(ranks, len(jobs), "factored_svd")
        results = []
        for (name, b, a), k in zip(jobs, ranks):
            k = check_rank(k, name)
            b, a = f32(b, f"{name}: B"), f32(a, f"{name}: A")
            if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
                raise ShapeMismatchError(f"{name}: factors B {shape_str(b)} and A {shape_str(a)} cannot be multiplied "
                                         "(need B (out, R) and A (R, in))")
            out, r, in_ = b.shape[0], b.shape[1], a.shape[1]
            exact = factored_is_exact(out, in_, r, k, mode, oversample, power_iters)
            s_len = max(0, min(out, r, in_)) if exact else max(0, min(out, r, in_, k))
            if not (np.isfinite(b).all() and np.isfinite(a).all()):
                raise NonFiniteError(f"{name}: input holds NaN or Inf")
            results.append(truncated(b.astype(np.float64) @ a.astype(np.float64), k, s_len, split, kmax=r))
        return results

    def factored_svd_lists(self, jobs: Sequence[FactorListJob], ranks: Sequence[int], split: str = "B",
                           threads: int = 0, mode: str = "exact", seed: int = 0, oversample: int = 10,
                           power_iters: int = 4,
                           release: Sequence[Sequence[bool] | None] | None = None) -> list[SvdResult]:
        del release  # a memory hint of the compiled core: no effect on any result
        stacked = []
        for name, pairs, weights in jobs:
            if len(pairs) != len(weights) or not pairs:
                raise LorafuseValueError(f"{name}: {len(pairs)} factor pairs and {len(weights)} weights "
                                         "(need one weight per pair, at least one pair)")
            for i, (bi, ai) in enumerate(pairs):
                if np.ndim(bi) != 2 or np.ndim(ai) != 2 or np.shape(bi)[1] != np.shape(ai)[0] or \
                        np.shape(bi)[0] != np.shape(pairs[0][0])[0] or np.shape(ai)[1] != np.shape(pairs[0][1])[1]:
                    first = f"B {np.shape(pairs[0][0])} and A {np.shape(pairs[0][1])}"
                    raise ShapeMismatchError(f"{name}: pair {i}: B {np.shape(bi)} and A {np.shape(ai)} do not fit "
                                             f"the first pair's {first}")
            b = np.hstack([float(w) * f32(bi, f"{name}: B").astype(np.float64) for (bi, _), w in zip(pairs, weights)])
            a = np.vstack([f32(ai, f"{name}: A").astype(np.float64) for _, ai in pairs])
            stacked.append(FactorJob(name, b.astype(np.float32), a.astype(np.float32)))
        return self.factored_svd(stacked, ranks, split, threads, mode, seed, oversample, power_iters)

    def factored_svd_is_exact(self, out: int, in_: int, r: int, k: int, mode: str = "auto",
                              oversample: int = 10, power_iters: int = 4) -> bool:
        return factored_is_exact(out, in_, r, k, mode, oversample, power_iters)

    def dense_svd(self, jobs: Sequence[DenseJob], ranks: Sequence[int], split: str = "B", seed: int = 0,
                  oversample: int = 10, power_iters: int = 4, threads: int = 0) -> list[SvdResult]:
        check_split(split)
        ranks = check_ranks(ranks, len(jobs), "dense_svd")
        results = []
        for (name, d), k in zip(jobs, ranks):
            k = check_rank(k, name)
            d = f32(d, f"{name}: D")
            if d.ndim != 2:
                raise ShapeMismatchError(f"{name}: D {shape_str(d)} must be 2-D (out, in)")
            if not np.isfinite(d).all():
                raise NonFiniteError(f"{name}: input holds NaN or Inf")
            results.append(truncated(d.astype(np.float64), k, max(0, min(d.shape[0], d.shape[1], k)), split))
        return results

    def dense_svd_is_exact(self, out: int, in_: int, k: int, oversample: int = 10) -> bool:
        return dense_is_exact(out, in_, k, oversample)

    # ---- task merge

    def task_merge(self, jobs: Sequence[TaskMergeJob], weights: Sequence[Sequence[float]], prune: str = "none",
                   density: float = 1.0, rescale: bool = False, merge: str = "sum", majority: str = "total",
                   seed: int = 0, threads: int = 0) -> list[np.ndarray]:
        if prune not in ("none", "magnitude", "random"):
            raise LorafuseValueError(f"unknown prune method '{prune}' (expected 'none', 'magnitude' or 'random')")
        if merge not in ("sum", "ties"):
            raise LorafuseValueError(f"unknown merge method '{merge}' (expected 'sum' or 'ties')")
        if majority not in ("total", "frequency"):
            raise LorafuseValueError(f"unknown majority sign method '{majority}' (expected 'total' or 'frequency')")
        density = float(density)
        if not (density >= 0.0) or not np.isfinite(density):
            raise LorafuseValueError(f"task_merge: density must be >= 0 (a finite number), got {density!r}")
        pruning = prune != "none" and density < 1.0
        scale = pruning and prune == "random" and rescale
        if scale and density == 0.0:
            raise LorafuseValueError("task_merge: random pruning with density 0 and rescale divides by zero "
                                     "(PEFT would return NaN)")
        if len(weights) != len(jobs):
            raise LorafuseValueError(f"task_merge: {len(weights)} weight lists for {len(jobs)} items")
        for (name, tensors), w in zip(jobs, weights):  # checks first, in job order, like the core
            if len(tensors) == 0:
                raise LorafuseValueError(f"{name}: task_merge needs at least one tensor")
            if len(w) != len(tensors):
                raise ShapeMismatchError(f"{name}: {len(w)} weights for {len(tensors)} tensors")
            for j, t in enumerate(tensors):
                f32(t, f"{name}: task tensor {j}")
                if t.shape != tensors[0].shape:
                    raise ShapeMismatchError(f"{name}: task tensor {j} has shape {shape_str(t)}, task tensor 0 has "
                                             f"{shape_str(tensors[0])}")
        for name, tensors in jobs:
            for j, t in enumerate(tensors):
                if not np.isfinite(t).all():
                    raise NonFiniteError(f"{name}: task tensor {j} holds NaN or Inf")
        results = []
        for (name, tensors), w in zip(jobs, weights):
            p = np.stack([t.reshape(-1) for t in tensors]).astype(np.float32)
            if pruning:
                for j in range(len(tensors)):
                    if prune == "magnitude":
                        p[j] = np.where(magnitude_keep(p[j], density), p[j], np.float32(0))
                    else:
                        keep = random_keep(seed, name, j, p.shape[1], density)
                        kept = (p[j].astype(np.float64) / density).astype(np.float32) if scale else p[j]
                        p[j] = np.where(keep, kept, np.float32(0))
            p64 = p.astype(np.float64)
            wv = np.asarray([float(x) for x in w], dtype=np.float64)[:, None]
            if merge == "sum":
                merged = np.sum(wv * p64, axis=0)
            else:
                stat = p64.sum(axis=0) if majority == "total" else np.sign(p64).sum(axis=0)
                sign = np.where(stat >= 0.0, 1.0, -1.0)
                agree = p64 * sign > 0.0
                merged = np.sum(np.where(agree, wv * p64, 0.0), axis=0) / np.maximum(1, agree.sum(axis=0))
            with np.errstate(over="ignore"):
                out = merged.astype(np.float32).reshape(tensors[0].shape)
            if not np.isfinite(out).all():
                raise NonFiniteError(f"{name}: merged result overflows float32")
            results.append(out)
        return results

    # ---- extract

    def extract_svd(self, jobs: Sequence[ExtractJob], ranks: Sequence[int], oversample: int = 10,
                    power_iters: int = 2, seed: int = 0, threads: int = 0) -> list[ExtractResult]:
        ranks = check_ranks(ranks, len(jobs), "extract_svd")
        results = []
        for (name, w_base, base_dtype, w_ft, ft_dtype), k in zip(jobs, ranks):
            k = check_rank(k, name)
            if w_base.ndim != 2 or w_ft.shape != w_base.shape:
                raise ShapeMismatchError(f"{name}: base weight {shape_str(w_base)} and fine-tuned weight "
                                         f"{shape_str(w_ft)} must be equal 2-D shapes (out, in)")
            base = raw_f32(w_base, base_dtype, f"{name}: base weight")
            ft = raw_f32(w_ft, ft_dtype, f"{name}: fine-tuned weight")
            bad_base, bad_ft = not np.isfinite(base).all(), not np.isfinite(ft).all()
            if bad_base or bad_ft:
                what = ("the base and the fine-tuned weight hold" if bad_base and bad_ft
                        else "the base weight holds" if bad_base else "the fine-tuned weight holds")
                raise NonFiniteError(f"{name}: {what} NaN or Inf")
            with np.errstate(over="ignore", invalid="ignore"):
                if not np.isfinite(ft - base).all():
                    raise NonFiniteError(f"{name}: W_ft - W_base overflows float32")
            d = ft.astype(np.float64) - base.astype(np.float64)
            out, in_ = d.shape
            ll = max(0, min(k + oversample, out, in_))
            frob_sq = float(np.sum(d * d))
            if frob_sq == 0.0:
                zero = SvdResult(np.zeros((out, k), np.float32), np.zeros((k, in_), np.float32), np.zeros(ll))
            else:
                zero = truncated(d, k, ll, "B", zero_null=True)
            results.append(ExtractResult(zero.b, zero.a, zero.s, frob_sq))
        return results


def _sketch_checked(i: int, job: SketchJob) -> tuple[SketchJob, list[tuple[np.ndarray, np.ndarray, float]]]:
    """A sketch_fold job after the cpu backend's checks, with its terms' factors in float64 (coefficients
    rounded to float32, as there)."""
    what = f"sketch_fold: job {i}"
    terms, side, x, acc = job
    if side not in ("range", "corange"):
        raise LorafuseValueError(f"{what}: side must be 'range' or 'corange', got {side!r}")
    f32(x, f"{what}: the operand")
    if not isinstance(acc, np.ndarray) or acc.dtype != np.float64:
        raise DtypeError(f"{what}: the accumulator must be a float64 numpy array")
    if not acc.flags.c_contiguous or not acc.flags.writeable:
        raise LorafuseValueError(f"{what}: the accumulator must be C-contiguous and writable")
    if x.ndim != 2 or acc.ndim != 2 or acc.shape[1] != x.shape[1]:
        raise ShapeMismatchError(f"{what}: the accumulator {shape_str(acc)} and the operand {shape_str(x)} must be "
                                 "2-D with as many columns")
    inn, out = (acc.shape[0], x.shape[0]) if side == "corange" else (x.shape[0], acc.shape[0])
    out_terms = []
    for k, (a_raw, a_dtype, b_raw, b_dtype, coef) in enumerate(terms):
        tw = f"{what}: term {k}"
        a = raw_f32(a_raw, a_dtype, f"{tw}: A").astype(np.float64)
        b = raw_f32(b_raw, b_dtype, f"{tw}: B").astype(np.float64)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[1] != inn or b.shape[0] != out:
            raise ShapeMismatchError(f"{tw}: A {shape_str(a)} and B {shape_str(b)} do not fit the operand "
                                     f"{shape_str(x)} and the accumulator {shape_str(acc)}")
        with np.errstate(over="ignore"):
            c = float(np.float32(coef))
        if not np.isfinite(c):
            raise LorafuseValueError(f"{tw}: the coefficient must be finite in float32, got {coef}")
        out_terms.append((a, b, c))
    return job, out_terms
