"""Method svd: the best rank-k approximation of D = sum_i c_i B_i A_i, a group of modules per call.

Per module one of four routes, all giving the result of the core's factored SVD of the stacked factors:
- stacked: [c_i B_i] and [A_i] stacked and passed as they are (the exact path where it is cheap);
- lists: a module whose stack (inputs and copy) would take over a quarter of the group's bytes, whose stacked
  call would take the randomized SVD, and whose inputs are float32 LoRA factors: the backend's
  factored_svd_lists on the per-adapter (B_i, A_i) with weights c_i, nothing stacked or formed. Every product
  of the range finder goes term by term. The terms within the first group's bytes of a module's inputs stay
  resident while it runs (they count in its working bytes); the pages of the terms past them, mapped from a
  file, leave the resident set right after their part of each product (the `release` flags), so memory stays
  flat in the number of adapters while a module that fits is not faulted in again at every product.
  Same sketch as the stacked call; the result differs from it by float32 rounding only (w_i applied to A_i X,
  not stored in B);
- dense: a module whose stacked rank R reaches min(out, in), whose stack would take over a quarter of the
  group's bytes and that does not take the lists route (the exact SVD, or non-float32 inputs) accumulates D =
  sum_i c_i B_i A_i in float32, a few adapters at a time (memory of one dense delta whatever the number of
  adapters), then takes through the backend the same exact or randomized SVD the stacked call would have taken
  (the same sketch, seeded by seed and module name). The accumulation is a float32 GEMM by numpy's BLAS, in
  row blocks: 3-4x faster than the backend's merge_batch (a kernel fused for apply's low ranks);
- structured: LoHa / LoKr / Tucker terms whose exact factorizations would be large take a randomized SVD
  whose every product goes through their structure.
"""

from __future__ import annotations

import math

import numpy as np

from lorafuse.backends import DenseJob, FactorJob, FactorListJob
from lorafuse.errors import NonFiniteError, UnsupportedError
from lorafuse.io.pages import releasable, release_pages
from lorafuse.model import LoraUpdate
from lorafuse.model.layout import largest_exponent
from lorafuse.model.spectral import factor_cost, is_stored_lora, structured_svd
from lorafuse.ops.combine.context import Context, Output
from lorafuse.ops.combine.terms import Term, dense_shape, input_arrays, stack

OVERSAMPLE = 10  # the core's default oversampling of factored_svd and dense_svd
# A module whose terms' factors or products (c_i B_i A_i) reach beyond 2^+-SAFE_EXP is folded with every term's
# factors brought to about 1 by powers of two (exact), its weights times 2^-e, and the result times 2^e: the core's
# float32 products (Gram matrices, QR) of factors of 1e-25 would underflow to zeros, of 1e25 overflow.
SAFE_EXP = 40


def _keep(ctx: Context) -> int:
    """Bytes of a lists-route module's inputs kept resident while it runs (the rest is dropped as used); they
    count in its working bytes, so a group's resident inputs stay within the group's bytes too."""
    return ctx.options.group_bytes


def _mode(ctx: Context) -> str:
    return "exact" if ctx.options.exact else "auto"


def _stacked_elements(terms: list[Term]) -> int:
    return sum(factor_cost(t.update)[1] for t in terms)


def _float32_lora(terms: list[Term]) -> bool:
    """Plain LoRA terms whose stored factors are float32 (used as they are: no converted copy)."""
    return all(isinstance(u, LoraUpdate) and is_stored_lora(u) and getattr(u.A, "dtype", None) == "F32"
               and u.B.dtype == "F32" for u in (t.update for t in terms))


def route(name: str, terms: list[Term], ctx: Context) -> str:
    """'structured', 'lists', 'dense' or 'stacked' (see the module docstring)."""
    elements = _stacked_elements(terms)
    if (_mode(ctx) != "exact" and elements > ctx.structured_above
            and not all(is_stored_lora(t.update) for t in terms)):
        return "structured"
    if 2 * 4 * elements <= ctx.options.group_bytes // 4:  # a stack that leaves room for more modules
        return "stacked"
    out, inn = dense_shape(terms[0].update)
    r = sum(t.update.rank for t in terms)
    if _float32_lora(terms) and not ctx.backend.factored_svd_is_exact(out, inn, r, ctx.ranks[name], _mode(ctx)):
        return "lists"
    return "dense" if r >= min(out, inn) else "stacked"


def working_bytes(name: str, terms: list[Term], ctx: Context) -> int:
    """Bytes a module holds while its group runs: its stack (inputs and copies), or its dense delta."""
    r = route(name, terms, ctx)
    out, inn = dense_shape(terms[0].update)
    if r == "dense":
        return 4 * out * inn + ctx.options.group_bytes // 4
    if r == "lists":  # the range finder's blocks (sketch width k + oversample), the inputs kept resident, a term
        width = min(ctx.ranks[name] + OVERSAMPLE, out, inn)
        inputs = 4 * _stacked_elements(terms)
        return 4 * 8 * (out + inn) * width + min(inputs, _keep(ctx)) + 4 * max(factor_cost(t.update)[1] for t in terms)
    if r == "structured":
        return 4 * ctx.ranks[name] * (out + inn)
    return 2 * 4 * _stacked_elements(terms)


def _rescaled(terms: list[Term], threads: int, release: bool) -> tuple[list[Term], int]:
    """(terms, e): plain LoRA terms whose factors or products are beyond 2^+-SAFE_EXP, as terms of factors near 1
    (each scaled by a power of two, exact) and weights times 2^-e, whose sum times 2^e is the module's; else the
    terms as they are and e = 0."""
    if not all(isinstance(t.update, LoraUpdate) and t.update.bias is None and t.update.magnitude is None
               for t in terms):
        return terms, 0
    exps = []
    for t in terms:  # one term's float32 factors at a time (a 16-bit input's are a converted copy)
        b, a = t.update.stored_factors(threads)
        exps.append((largest_exponent(b), largest_exponent(a)))
        del b, a
        if release:  # a mapped file's pages leave the resident set again (memory flat in the number of adapters)
            release_pages(input_arrays([t]))
    products = [eb + ea + math.frexp(t.coef)[1] for t, (eb, ea) in zip(terms, exps) if t.coef != 0]
    if not products or (all(abs(x) <= SAFE_EXP for e in exps for x in e) and abs(max(products)) <= SAFE_EXP):
        return terms, 0
    e = max(products)
    scaled = []
    for t, (eb, ea) in zip(terms, exps):
        b, a = t.update.stored_factors(threads)
        scaled.append(Term(math.ldexp(t.coef, eb + ea - e), t.update.with_factors(np.ldexp(b, -eb), np.ldexp(a, -ea))))
    return scaled, e


def _unscaled(name: str, b: np.ndarray, a: np.ndarray, e: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The factors of a module folded by _rescaled times 2^e (on B, or half on each with split 'sqrt'); refused,
    naming the module, where float32 cannot hold them (their delta would be written as zeros, a part of it, or
    Inf)."""
    eb = e if split == "B" else e // 2
    wide = (np.ldexp(b.astype(np.float64), eb), np.ldexp(a.astype(np.float64), e - eb))
    with np.errstate(over="ignore"):
        narrow = tuple(x.astype(np.float32) for x in wide)
    for w, n in zip(wide, narrow):
        norm = float(np.linalg.norm(w))
        lost = float(np.linalg.norm(n.astype(np.float64) - w)) / norm if norm > 0 else 0.0
        if not np.isfinite(n).all():  # (the core's words where its factors overflow)
            top = float(np.max(np.linalg.norm(wide[0], axis=0) * np.linalg.norm(wide[1], axis=1)))
            raise NonFiniteError(f"{name}: the low-rank factors do not fit float32: the largest singular value is "
                                 f"{top:.3g} (float32 holds up to {float(np.finfo(np.float32).max):.3g})")
        if lost > 2.0**-4:
            how = (" even as square roots on both factors" if split == "sqrt" else
                   " with them on B (--split sqrt, split='sqrt', puts their square roots on both factors)")
            raise UnsupportedError(f"module {name!r}: the combined delta's singular values are below float32's "
                                   f"range{how}: the factors (B {tuple(b.shape)}, A {tuple(a.shape)}) would lose "
                                   f"{min(lost, 1.0):.0%} of the delta")
    return narrow[0], narrow[1]


def run(group: list[tuple[str, list[Term]]], ctx: Context) -> list[Output]:
    scales: dict[str, int] = {}
    rescued: list[tuple[str, list[Term]]] = []
    for name, terms in group:
        terms, scales[name] = _rescaled(terms, ctx.options.threads, ctx.release)
        rescued.append((name, terms))
    outs = _run(rescued, ctx)
    for i, (name, update, rnd) in enumerate(outs):
        if scales[name] and isinstance(update, LoraUpdate):
            b, a = _unscaled(name, *update.stored_factors(ctx.options.threads), scales[name], ctx.options.split)
            outs[i] = (name, update.with_factors(b, a, scale=update.scale), rnd)
    return outs


def _run(group: list[tuple[str, list[Term]]], ctx: Context) -> list[Output]:
    opts, be = ctx.options, ctx.backend
    done: dict[str, Output] = {}
    stacked: list[tuple[str, list[Term]]] = []
    lists: list[tuple[str, list[Term]]] = []
    for name, terms in group:
        r = route(name, terms, ctx)
        if r == "structured":
            b, a = structured_svd([(t.coef, t.update) for t in terms], ctx.ranks[name], opts.split, opts.seed)
            done[name] = (name, terms[0].update.with_factors(b, a), True)
        elif r == "dense":
            done[name] = _dense(name, terms, ctx)
        elif r == "lists":
            lists.append((name, terms))
        else:
            stacked.append((name, terms))
    # One backend call for the lists and the stacked modules (a stack is a list of one pair of weight 1: the
    # same bits as factored_svd), so that all of them share the threads, the most expensive first.
    jobs: list[FactorListJob] = []
    release: list[list[bool] | None] = []
    randomized: list[bool] = []
    for n, ts in lists:
        job, flags = _list_job(n, ts, ctx)
        jobs.append(job)
        release.append(flags)
        randomized.append(True)
    for n, ts in stacked:
        b, a = stack(ts, opts.threads)
        jobs.append(FactorListJob(n, [(b, a)], [1.0]))
        release.append(None)
        randomized.append(not be.factored_svd_is_exact(b.shape[0], a.shape[1], b.shape[1], ctx.ranks[n], _mode(ctx)))
    if jobs:
        modules = lists + stacked
        results = be.factored_svd_lists(jobs, [ctx.ranks[n] for n, _ in modules], opts.split, opts.threads,
                                        mode=_mode(ctx), seed=opts.seed, release=release)
        for (n, ts), res, rnd in zip(modules, results, randomized):
            done[n] = (n, ts[0].update.with_factors(res.b, res.a), rnd)
    return [done[n] for n, _ in group]


def _accumulate(d: np.ndarray, b: np.ndarray, a: np.ndarray, block_bytes: int) -> None:
    """d += b @ a in float32, a block of rows at a time (a temporary of at most block_bytes)."""
    rows = max(1, block_bytes // max(1, 4 * d.shape[1]))
    tmp = np.empty((min(rows, d.shape[0]), d.shape[1]), dtype=np.float32)
    with np.errstate(all="ignore"):  # a NaN or Inf is refused by the SVD, naming the module
        for r0 in range(0, d.shape[0], rows):
            r1 = min(d.shape[0], r0 + rows)
            np.matmul(b[r0:r1], a, out=tmp[: r1 - r0])
            d[r0:r1] += tmp[: r1 - r0]


def _dense(name: str, terms: list[Term], ctx: Context) -> Output:
    """D = sum_i c_i B_i A_i accumulated in float32 a chunk of adapters at a time, then the SVD the stacked
    call would take: exact where it would be exact, else the randomized one with the same sketch."""
    opts, be = ctx.options, ctx.backend
    out, inn = dense_shape(terms[0].update)
    d = np.zeros((out, inn), dtype=np.float32)
    chunk_bytes = max(1, ctx.options.group_bytes // 4)
    start = 0
    while start < len(terms):
        stop, size = start, 0
        while stop < len(terms) and (stop == start or size + 4 * factor_cost(terms[stop].update)[1] <= chunk_bytes):
            size += 4 * factor_cost(terms[stop].update)[1]
            stop += 1
        b, a = stack(terms[start:stop], opts.threads)
        _accumulate(d, b, a, chunk_bytes)
        del b, a
        if ctx.release:
            release_pages(input_arrays(terms[start:stop]))
        start = stop
    k = ctx.ranks[name]
    r = sum(t.update.rank for t in terms)
    exact = be.factored_svd_is_exact(out, inn, r, k, _mode(ctx))
    if exact == be.dense_svd_is_exact(out, inn, k, OVERSAMPLE):
        res = be.dense_svd([DenseJob(name, d)], [k], opts.split, opts.seed, threads=opts.threads)[0]
    else:  # the factored path's choice differs from dense_svd's: D as exact factors D @ I (or I @ D)
        eye = np.eye(min(out, inn), dtype=np.float32)
        job = FactorJob(name, d, eye) if inn <= out else FactorJob(name, eye, d)
        res = be.factored_svd([job], [k], opts.split, opts.threads, mode="exact" if exact else "randomized",
                              seed=opts.seed)[0]
    return name, terms[0].update.with_factors(res.b, res.a), not exact


def _list_job(name: str, terms: list[Term], ctx: Context) -> tuple[FactorListJob, list[bool]]:
    """A module of the lists route: its per-adapter factors and weights, nothing stacked, and per pair whether
    its pages may be dropped after each use (read-only views of a file mapping only)."""
    pairs = [t.update.stored_factors(ctx.options.threads) for t in terms]
    # Dropping a term's pages after each product makes the next product fault them in again (a third of the
    # time at 128 adapters), so the terms within the first _keep bytes stay resident until the group is done
    # (groups.stream drops them then) and only the terms past them are dropped as they are used.
    keep = _keep(ctx)
    ends = np.cumsum([b.nbytes + a.nbytes for b, a in pairs])
    flags = [bool(end > keep) and ctx.release and releasable(b) and releasable(a) for end, (b, a) in zip(ends, pairs)]
    return FactorListJob(name, pairs, [t.coef for t in terms]), flags
