"""Measures of any update through its structure: norms, inner products, spectra, a structured
randomized SVD, and the batching of stored LoRA factors for the backend.

Stored LoRA factors go to the backend (`lorafuse.backends.get_backend()`, looked up at call time) in
batches bounded in work and memory, so Python runs its signal handlers between calls.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from lorafuse.backends import FactorPair, get_backend
from lorafuse.errors import LorafuseError, ShapeMismatchError
from lorafuse.model.best import pad_terms
from lorafuse.model.limits import MAX_CORE_RANK, check_dense, check_work, elements
from lorafuse.model.lora import LoraUpdate
from lorafuse.model.lycoris import LycorisUpdate
from lorafuse.model.structure import Delta, structure_inner
from lorafuse.model.tucker import TuckerFactor
from lorafuse.model.update import Update, nonfinite_factors


def is_stored_lora(u: Update) -> bool:
    """A LoRA whose factors are stored as they are used (the core's batched kernels take them)."""
    return isinstance(u, LoraUpdate) and not isinstance(u.A, TuckerFactor)


def where_of(u: Update) -> str:
    w = getattr(u, "where", "") or (u.A.where if isinstance(u, LoraUpdate) and isinstance(u.A, TuckerFactor) else "")
    return w or f"module {u.name!r}"


def structure(u: Update) -> Delta:
    """The unscaled 2-D delta of any update, in its structure (float64 copies of the stored tensors,
    nothing larger)."""
    return u.structure()


def frobenius_sq(u: Update) -> float:
    """||delta||_F^2 (scale included) from the structure."""
    return u.scale * u.scale * structure(u).fro2(where_of(u))


def inner(u: Update, v: Update) -> float:
    """<delta_u, delta_v>_F (scales included) of two updates of the same 2-D shape."""
    x, y = structure(u), structure(v)
    if (x.m, x.n) != (y.m, y.n):
        raise ShapeMismatchError(f"module {u.name!r}: deltas of 2-D shapes ({x.m}, {x.n}) and ({y.m}, {y.n}) have "
                                 "no inner product")
    return u.scale * v.scale * structure_inner(x, y, where_of(u))


def spectrum(u: Update) -> np.ndarray:
    """The singular values of the delta (scale included), descending; at most MAX_CORE_RANK of them."""
    return abs(u.scale) * structure(u).svals(where_of(u))[:MAX_CORE_RANK]


def structured_svd(terms: Sequence[tuple[float, Update]], k: int, split: str = "B", seed: int = 0,
                   oversample: int = 10, power_iters: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A near-optimal rank-k approximation (B (out x k), A (k x in*kh*kw), float32) of sum_i c_i * delta_i
    for (c_i, update_i) (c_i multiplies the unscaled delta: weight times scale), by a randomized range
    finder with power iterations as the core's (float64 here), every product through the structures:
    memory of the order of the result, never an exact factorization. `split` puts the singular values
    on B ('B') or their square roots on both ('sqrt')."""
    parts = [(float(c), structure(u)) for c, u in terms]
    where = where_of(terms[0][1])
    m, n = parts[0][1].m, parts[0][1].n
    if any((s.m, s.n) != (m, n) for _, s in parts):
        raise ShapeMismatchError(f"{where}: the deltas to combine have different 2-D shapes")
    width = min(k + oversample, m, n)
    check_dense(where, "the randomized SVD of these deltas", (m + n, width))
    check_work(where, "the randomized SVD of these deltas",
                (2 * power_iters + 2) * sum(s.mul_cost(width) for _, s in parts))

    def mul(x: np.ndarray) -> np.ndarray:
        return sum((c * s.mul(x) for c, s in parts), np.zeros((m, x.shape[1])))

    def tmul(y: np.ndarray) -> np.ndarray:
        return sum((c * s.tmul(y) for c, s in parts), np.zeros((n, y.shape[1])))

    def basis(x: np.ndarray) -> np.ndarray:
        return np.linalg.qr(x)[0]

    q = basis(mul(np.random.default_rng(seed).standard_normal((n, width))))
    for _ in range(power_iters):
        q = basis(mul(basis(tmul(q))))
    qz, rz = np.linalg.qr(tmul(q))  # Q^T D = (D^T Q)^T = rz^T qz^T
    u, sv, vt = np.linalg.svd(rz.T, full_matrices=False)
    kk = min(k, len(sv))
    left, right, sv = q @ u[:, :kk], qz @ vt[:kk].T, sv[:kk]
    if split == "sqrt":
        root = np.sqrt(sv)
        b, a = left * root, (right * root).T
    else:
        b, a = left * sv, right.T
    return pad_terms(b.astype(np.float32), a.astype(np.float32), min(k, m, n))


# ----------------------------------------------------------------------------- batches for the backend

CORE_BATCH_FLOPS = 1 << 32  # work of one call into the core (a fraction of a second): signals run between calls
CORE_BATCH_ELEMENTS = 1 << 25  # factor elements one batch holds (128 MiB of float32)
CORE_BATCH_MODULES = 256


def batches(costs: Sequence[tuple[float, int]], max_flops: float = CORE_BATCH_FLOPS,
            max_elements: int = CORE_BATCH_ELEMENTS, max_items: int = CORE_BATCH_MODULES) -> Iterator[tuple[int, int]]:
    """[start, stop) ranges of items, each (flops, elements), a batch at most the budgets (or one item):
    Python runs its signal handlers (Ctrl-C, SIGTERM) between the calls into the core, and only one
    batch's factors exist at a time."""
    start, flops, elements = 0, 0.0, 0
    for i, (f, e) in enumerate(costs):
        if i > start and (flops + f > max_flops or elements + e > max_elements or i - start >= max_items):
            yield start, i
            start, flops, elements = i, 0.0, 0
        flops += f
        elements += e
    if start < len(costs):
        yield start, len(costs)


def factor_cost(u: Update) -> tuple[float, int]:
    """(flops, elements) of an SVD through the exact factorization (`stored_factors`) of any update."""
    if isinstance(u, LycorisUpdate):
        k, count = u.rank, u._factor_shape()[0]
    else:
        k = u.rank
        count = k * (u.delta_shape[0] + elements(u.delta_shape[1:]))
    return 12.0 * k * count + 10.0 * k ** 3, count


def lora_cost(u: LoraUpdate, passes: float = 2.0) -> tuple[float, int]:
    """(flops, elements) of a core pass over a stored LoRA's factors (about passes * r^2 * (out + in))."""
    rows, cols = u.delta_shape[0], elements(u.delta_shape[1:])
    return passes * u.rank * u.rank * (rows + cols) + u.rank ** 3, u.rank * (rows + cols)


def frobenius_norms(updates: Mapping[str, Update], threads: int = 0) -> dict[str, float]:
    """||delta||_F of every update: stored LoRAs through the core in batches, the others through
    their structure, one module at a time. A module whose factors hold NaN gets nan; one whose factors
    hold Inf (and no NaN) what numpy float64 gives for its dense delta: inf, or nan where an Inf meets a 0
    or an Inf of the other sign (the Gram form, inf - inf, would say nan either way)."""
    sq: dict[str, float] = {}  # of the unscaled delta: |scale| multiplies the root (scale^2 could overflow)
    stored = [(n, u) for n, u in updates.items() if is_stored_lora(u)]
    for n, u in updates.items():
        if not is_stored_lora(u):
            sq[n] = structure(u).fro2(where_of(u))
    for i0, i1 in batches([lora_cost(u) for _, u in stored]):  # type: ignore[arg-type]
        chunk = stored[i0:i1]
        values = get_backend().frobenius_sq([FactorPair(*u.factors(threads)) for _, u in chunk], threads)
        for (n, _), s in zip(chunk, values):
            sq[n] = float(s)
    norms = {n: abs(u.scale) * math.sqrt(max(sq[n], 0.0)) for n, u in updates.items()}
    for n, v in norms.items():
        if not math.isfinite(v):  # the error path only: the factors are read again
            norms[n] = _nonfinite_norm(updates[n], v, threads)
    return norms


_DENSE_CHECK = 1 << 24  # elements of a LoHa / LoKr delta _nonfinite_norm forms (128 MiB of float64)


def _nonfinite_norm(u: Update, gram: float, threads: int) -> float:
    """The norm of a module whose Gram-form norm `gram` is not finite: nan when its factors hold NaN; when they
    hold Inf, the norm of its dense float64 delta (a stored LoRA's row block by row block; a LoHa / LoKr's
    whole, up to _DENSE_CHECK elements, else `gram`); `gram` when they are finite (the norm overflows)."""
    held = nonfinite_factors(u)
    if "NaN" in held:
        return math.nan
    if not held:
        return gram
    with np.errstate(over="ignore", invalid="ignore"):
        if not is_stored_lora(u):
            if elements(u.delta_shape) > _DENSE_CHECK:
                return gram
            try:
                return float(np.sqrt(np.sum(np.square(u.delta()))))
            except LorafuseError:  # a structure too large to form
                return gram
        b, a = u.factors(threads)
        a64 = a.astype(np.float64)
        step = max(1, (1 << 22) // max(1, a64.shape[1]))
        total = 0.0
        for r0 in range(0, b.shape[0], step):
            d = (b[r0 : r0 + step].astype(np.float64) @ a64) * u.scale
            total += float(np.sum(np.square(d)))
    return math.sqrt(total)
