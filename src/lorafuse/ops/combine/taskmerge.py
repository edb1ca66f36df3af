"""PEFT's element-wise task merges: on the factors (linear, ties, dare_*, magnitude_prune) or on the
dense deltas followed by a rank-k SVD (the *_svd methods)."""

from __future__ import annotations

import math

import numpy as np

from lorafuse.backends import DenseJob, TaskMergeJob
from lorafuse.errors import ShapeMismatchError, UnsupportedError
from lorafuse.model import Update
from lorafuse.model.arithmetic import FLOAT32_MAX
from lorafuse.model.layout import refuse_lost_directions
from lorafuse.model.limits import check_dense
from lorafuse.model.spectral import frobenius_sq
from lorafuse.ops.combine.context import Context, Output
from lorafuse.ops.combine.terms import Term, Terms, dense_shape

DENSE_OVERSAMPLE = 10  # dense_svd's oversampling (its exact/randomized choice: dense_svd_is_exact)

# method -> (prune, rescale, merge) of the element-wise task merge
TASK = {
    "linear": ("none", False, "sum"),
    "ties": ("magnitude", False, "ties"),
    "dare_linear": ("random", True, "sum"),
    "dare_ties": ("random", True, "ties"),
    "magnitude_prune": ("magnitude", False, "sum"),
}
TASK.update({m + "_svd": TASK[m] for m in ("ties", "dare_linear", "dare_ties", "magnitude_prune")})


def _task_args(method: str, density: float | None) -> tuple[str, bool, str, float]:
    prune, rescale, merge = TASK[method]
    return prune, rescale, merge, 1.0 if density is None else float(density)


# ---- on the factors -------------------------------------------------------------------------------------


def check_equal_ranks(method: str, by_module: Terms) -> None:
    """PEFT merges the A and the B stacks element by element: every module needs one rank."""
    for n, ts in by_module.items():
        ranks = {t.update.rank for t in ts}
        if len(ranks) != 1:
            raise ShapeMismatchError(
                f"module {n!r}: method {method!r} needs equal ranks (as PEFT), got {sorted(ranks)}; "
                "use svd or cat for adapters of different ranks"
            )


def factorwise_bytes(name: str, terms: list[Term], ctx: Context) -> int:
    out, inn = dense_shape(terms[0].update)
    return 4 * terms[0].update.rank * (out + inn) * (len(terms) + 1)


def run_factorwise(group: list[tuple[str, list[Term]]], ctx: Context) -> list[Output]:
    """PEFT's linear / ties / dare / magnitude_prune on the factors: A and B merged separately, with weights
    sign(c_i) sqrt|c_i| on A and sqrt|c_i| on B."""
    o = ctx.options
    prune, rescale, merge, dens = _task_args(o.method, o.density)
    a_items, b_items, a_weights, b_weights = [], [], [], []
    for n, ts in group:
        factors = [t.update.stored_factors(o.threads) for t in ts]
        a_items.append(TaskMergeJob(n + ".lora_A", [a for _, a in factors]))
        b_items.append(TaskMergeJob(n + ".lora_B", [b for b, _ in factors]))
        a_weights.append([math.copysign(math.sqrt(abs(t.coef)), t.coef) if t.coef else 0.0 for t in ts])
        b_weights.append([math.sqrt(abs(t.coef)) for t in ts])
    be = ctx.backend
    merged_a = be.task_merge(a_items, a_weights, prune, dens, rescale, merge, o.majority_sign, o.seed, o.threads)
    merged_b = be.task_merge(b_items, b_weights, prune, dens, rescale, merge, o.majority_sign, o.seed, o.threads)
    return [(n, ts[0].update.with_factors(b, a), False) for (n, ts), a, b in zip(group, merged_a, merged_b)]


# ---- on the dense deltas ---------------------------------------------------------------------------------


def check_dense_terms(method: str, by_module: Terms) -> None:
    """Refuse, before any work, a module whose dense delta would be too large to form."""
    for n, ts in by_module.items():
        for t in ts:
            shape = t.update.delta_shape
            check_dense(getattr(t.update, "where", "") or f"module {n!r}", f"method {method!r} (its dense delta)",
                        (shape[0], int(np.prod(shape[1:], dtype=np.int64))))


def dense_delta(u: Update, threads: int = 0) -> np.ndarray:
    """s B A in float32, as the *_svd methods form it before weighting it (an overflow gives Inf, which
    task_merge refuses, naming the module)."""
    b, a = u.stored_factors(threads)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.ascontiguousarray((b * np.float32(u.scale)) @ a)


def dense_overflow(u: Update, method: str) -> str:
    """Why a *_svd method cannot form one finite input's dense delta s B A in float32 (dense_delta holds Inf or
    NaN), or '' when it can. The deltas are formed before they are weighted (as PEFT forms them), so no weight
    helps. The error path only."""
    if np.isfinite(dense_delta(u)).all():
        return ""
    with np.errstate(over="ignore", invalid="ignore"):
        norm = math.sqrt(max(frobenius_sq(u), 0.0))
    return (f"method {method!r} forms its dense delta s B A (scale {u.scale:g}, Frobenius norm {norm:.3g}) in "
            f"float32 (largest value {FLOAT32_MAX:.3g}) before weighting it, as PEFT does, and it overflows there: a "
            "smaller weight does not help; use svd or cat (they weight the factors first), or scale the adapter "
            "down first (lorafuse.load(path) * c, saved)")


def dense_bytes(name: str, terms: list[Term], ctx: Context) -> int:
    out, inn = dense_shape(terms[0].update)
    return 4 * out * inn * (len(terms) + 1)


def run_dense_svd(group: list[tuple[str, list[Term]]], ctx: Context) -> list[Output]:
    """PEFT's *_svd methods: merge the dense deltas s_i B_i A_i with weights w_i, then rank k (exact or
    randomized by dense_svd's rule)."""
    o, be = ctx.options, ctx.backend
    prune, rescale, merge, dens = _task_args(o.method, o.density)
    items, ws = [], []
    for n, ts in group:
        deltas = []
        for i, t in enumerate(ts):
            deltas.append(dense_delta(t.update, o.threads))
            _refuse_underflow(n, i, t.update, deltas[-1], o.method)
        _refuse_tiny_weights(n, [t.weight for t in ts], deltas, o.method)
        items.append(TaskMergeJob(n, deltas))
        ws.append([t.weight for t in ts])
    merged = be.task_merge(items, ws, prune, dens, rescale, merge, o.majority_sign, o.seed, o.threads)
    del items
    ranks = [ctx.ranks[n] for n, _ in group]
    results = be.dense_svd([DenseJob(n, d) for (n, _), d in zip(group, merged)], ranks, o.split, o.seed,
                           oversample=DENSE_OVERSAMPLE, threads=o.threads)
    for (n, _), res in zip(group, results):
        refuse_lost_directions(f"module {n!r}", res.b, res.a, res.s, o.split)
    return [(n, ts[0].update.with_factors(res.b, res.a),
             not be.dense_svd_is_exact(d.shape[0], d.shape[1], k, DENSE_OVERSAMPLE))
            for (n, ts), d, k, res in zip(group, merged, ranks, results)]


def _refuse_tiny_weights(name: str, weights: list[float], deltas: list[np.ndarray], method: str) -> None:
    """Refuse (UnsupportedError naming the module) weights that bring every weighted dense delta below 2^-100,
    where float32 keeps few bits of the values, or none (weights of 1e-50): the method would merge zeros."""
    tops = [abs(w) * float(max(d.max(), -d.min())) if d.size else 0.0 for w, d in zip(weights, deltas)]
    if not tops or not all(math.isfinite(x) for x in tops) or max(tops) == 0 or max(tops) >= 2.0**-100:
        return  # (NaN and Inf are task_merge's to refuse, naming the module)
    raise UnsupportedError(f"module {name!r}: method {method!r} weights the float32 dense deltas s B A "
                           f"{tuple(deltas[0].shape)} before merging them, as PEFT does, and weights "
                           f"{', '.join(f'{w:g}' for w in weights)} bring their values to at most {max(tops):.3g}, "
                           "below float32's range: use svd or cat (they weight the factors), or larger weights")


def _refuse_underflow(name: str, i: int, u: Update, delta: np.ndarray, method: str) -> None:
    """Refuse (UnsupportedError naming the module) an input whose float32 dense delta s B A lost most of its norm
    below float32's smallest values (factors of 1e-25: their products are 1e-50): the method would merge zeros."""
    exact = math.sqrt(max(frobenius_sq(u), 0.0))
    if not 0 < exact < 2.0**-60:  # (a larger delta keeps its values in float32's normal range)
        return
    held = float(np.linalg.norm(delta.astype(np.float64)))
    if held >= (1.0 - 2.0**-4) * exact:
        return
    raise UnsupportedError(f"adapter {i + 1}, module {name!r}: method {method!r} forms its dense delta s B A "
                           f"{tuple(delta.shape)} (scale {u.scale:g}, Frobenius norm {exact:.3g}) in float32 before "
                           f"weighting it, as PEFT does, and {1.0 - held / exact:.0%} of it falls below float32's "
                           "smallest value (1.4e-45) there: use svd or cat (they weight the factors first), or scale "
                           "the adapter up first (lorafuse.load(path) * c, saved)")
