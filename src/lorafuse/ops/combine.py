"""combine: many adapters -> one adapter (PEFT's add_weighted_adapter, method for method).

Notation: adapter i has stored factors B_i (out x r_i), A_i (r_i x in), scale s_i and user
weight w_i; c_i = w_i * s_i. Modules missing from some adapters combine from the ones
that have them. Every output has scale 1 (r = lora_alpha per module).

- cat:    B' = [B_1 ... B_n], A' = [c_1 A_1; ...; c_n A_n]  (exact, rank sum r_i)
- svd:    the best rank-k approximation of D = sum_i c_i B_i A_i, computed from the
          stacked factors (QR of each stack, SVD of the small core), never forming D.
          With many adapters (stacked rank R in the hundreds) that costs O(R^2) per
          module, so unless exact=True a module switches to a randomized SVD taken
          through the factors (O(R), a constant time per adapter) where the cost model
          finds it 1.5x cheaper; those modules are listed in Adapter.randomized
- linear, ties, dare_linear, dare_ties, magnitude_prune: PEFT's factor-wise merge: the
          A stack with weights sign(c_i) sqrt|c_i| and the B stack with sqrt|c_i| are
          merged separately (equal ranks required)
- *_svd:  PEFT's merge of the dense deltas s_i B_i A_i with weights w_i, then rank k by
          (randomized) SVD
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lorafuse import _core
from lorafuse._validate import (
    check_float,
    check_optional_rank,
    check_rank,
    check_seed,
    check_threads,
    check_weights,
    full_rank,
)
from lorafuse.adapter import Adapter, LoraUpdate, Update
from lorafuse.errors import LorafuseValueError, ShapeMismatchError, UnsupportedError
from lorafuse.formats import load
from lorafuse.formats.lycoris import batches, check_dense, factor_cost, is_stored_lora, structured_svd
from lorafuse.io.safetensors import raise_if_inputs_changed

EXACT = ("cat", "svd")
FACTORWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DENSE_SVD = ("ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = EXACT + FACTORWISE + DENSE_SVD

# method -> (prune, rescale, merge) of the element-wise task merge
_TASK = {
    "linear": ("none", False, "sum"),
    "ties": ("magnitude", False, "ties"),
    "dare_linear": ("random", True, "sum"),
    "dare_ties": ("random", True, "ties"),
    "magnitude_prune": ("magnitude", False, "sum"),
}
_DENSE_OVERSAMPLE = 10  # dense_svd's oversampling (its exact/randomized choice: _core.dense_svd_is_exact)

_TASK.update({m + "_svd": _TASK[m] for m in ("ties", "dare_linear", "dare_ties", "magnitude_prune")})


@dataclass
class _Term:
    weight: float
    update: Update

    @property
    def coef(self) -> float:
        return self.weight * self.update.scale


def _as_adapters(adapters: Sequence[str | os.PathLike[str] | Adapter]) -> list[Adapter]:
    return [a if isinstance(a, Adapter) else load(a) for a in adapters]


def _check_linear(adapters: Sequence[Adapter], what: str) -> None:
    """DoRA and lora_bias do not add linearly, and full tensors cannot be combined: refuse them."""
    for a in adapters:
        for name, u in a.updates.items():
            if u.magnitude is not None:
                raise UnsupportedError(
                    f"{a.label}: module {name!r} is DoRA; {what} is defined for plain LoRA only "
                    "(a DoRA update is not a sum of low-rank deltas). Merge it into the base with `apply` instead."
                )
            if u.bias is not None:
                raise UnsupportedError(f"{a.label}: module {name!r} has a lora_B bias, which {what} cannot carry")
        extra = [k for k in a.full if not a.full_origin.get(k, k).endswith(".base_layer.weight")]
        if extra:
            raise UnsupportedError(
                f"{a.label}: modules_to_save tensors ({', '.join(sorted(extra)[:3])}) cannot be combined; "
                "merge them with `apply`"
            )


def _flattened_as(u: Update, shape: tuple[int, ...]) -> Update | None:
    """A LoHa / LoKr stored with a conv kernel flattened (out, in*kh*kw), laid onto the 4-D `shape` of the
    same module in another adapter; None when that is not what differs."""
    if isinstance(u, LoraUpdate) or len(u.delta_shape) != 2 or len(shape) != 4:
        return None
    if u.delta_shape[0] != shape[0] or u.delta_shape[1] != int(np.prod(shape[1:])):
        return None
    return u.with_shape(shape)


def _terms_by_module(adapters: Sequence[Adapter], weights: Sequence[float]) -> dict[str, list[_Term]]:
    """Module -> the (weight, update) of every adapter that has it, checking the layouts agree. A LoHa /
    LoKr stored with its conv kernel flattened takes the 4-D shape another adapter gives the module."""
    gathered: dict[str, list[tuple[str, _Term]]] = {}
    for a, w in zip(adapters, weights):
        for name, u in a.updates.items():
            gathered.setdefault(name, []).append((a.label, _Term(w, u)))
    out: dict[str, list[_Term]] = {}
    for name, items in gathered.items():
        conv = next((tuple(t.update.delta_shape) for _, t in items if len(t.update.delta_shape) == 4), None)
        terms = [_Term(t.weight, (_flattened_as(t.update, conv) if conv else None) or t.update) for _, t in items]
        first = terms[0].update
        for (label, _), t in zip(items, terms):
            u = t.update
            if (tuple(first.delta_shape), first.kind, first.transposed) != (tuple(u.delta_shape), u.kind,
                                                                           u.transposed):
                raise ShapeMismatchError(
                    f"module {name!r}: {label} has a {u.kind} update of shape {tuple(u.delta_shape)}"
                    f"{' (transposed)' if u.transposed else ''}, another adapter has a {first.kind} update "
                    f"of shape {tuple(first.delta_shape)}{' (transposed)' if first.transposed else ''}"
                )
        out[name] = terms
    return out


def _stack(terms: list[_Term], threads: int, coef_on: str = "B") -> tuple[np.ndarray, np.ndarray]:
    """[c_i B_i] and [A_i] (coef_on='B'), or [B_i] and [c_i A_i] (coef_on='A'). Filled in place one
    term at a time: besides the result, only one term's factors (a LoKr's or LoHa's exact
    factorization can be large) exist at a time."""
    b, a = terms[0].update.stored_factors(threads)
    widths = [b.shape[1]] + [t.update.rank for t in terms[1:]]
    out_b = np.empty((b.shape[0], sum(widths)), dtype=np.float32)
    out_a = np.empty((sum(widths), a.shape[1]), dtype=np.float32)
    at = 0
    for i, t in enumerate(terms):
        if i:
            b, a = t.update.stored_factors(threads)
        c = np.float32(t.coef)
        out_b[:, at:at + b.shape[1]] = b * c if coef_on == "B" else b
        out_a[at:at + a.shape[0]] = a * c if coef_on == "A" else a
        at += b.shape[1]
        del b, a
    return out_b, out_a


def _result(template: Adapter, updates: dict[str, LoraUpdate], adapters: Sequence[Adapter]) -> Adapter:
    config = {k: v for k, v in template.config.items()
              if k not in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora")}
    targets = [a.config.get("target_modules") for a in adapters]
    if targets and all(isinstance(t, list) for t in targets):
        config["target_modules"] = sorted({m for t in targets for m in t})  # type: ignore[union-attr]
    elif targets and all(isinstance(t, str) for t in targets):
        config["target_modules"] = "|".join(dict.fromkeys(f"({t})" for t in targets))
    else:
        config["target_modules"] = sorted({n.rsplit(".", 1)[-1] for n in updates})
    return Adapter(updates=updates, config=config, format=template.format,
                   derived_from=list(dict.fromkeys(p for a in adapters for p in a.sources())))


def weighted_cat(terms: Sequence[tuple[float, Adapter]]) -> Adapter:
    """sum_i w_i * adapter_i, exactly: factors concatenated, scale 1."""
    adapters = [a for _, a in terms]
    _check_linear(adapters, "adapter arithmetic")
    by_module = _terms_by_module(adapters, [w for w, _ in terms])
    updates = {}
    for name, ts in by_module.items():
        b, a = _stack(ts, 0, coef_on="A")
        updates[name] = ts[0].update.with_factors(b, a)
    return _result(adapters[0], updates, adapters)


def scaled(adapter: Adapter, c: float) -> Adapter:
    """c * adapter: the same factors with every scale multiplied by c (exact, rank unchanged)."""
    _check_linear([adapter], "adapter arithmetic")
    updates: dict[str, Update] = {n: dataclasses.replace(u, scale=u.scale * c) for n, u in adapter.updates.items()}
    return Adapter(updates=updates, config=dict(adapter.config), format=adapter.format,
                   derived_from=adapter.sources())


def _check_rank(rank: int | None, name: str = "rank") -> int | None:
    return check_optional_rank(rank, name)


def _check_split(split: str) -> None:
    if split not in ("B", "sqrt"):
        raise LorafuseValueError(f"split must be 'B' (singular values on B, like PEFT) or 'sqrt', got {split!r}")


def truncate(adapter: Adapter, rank: int, split: str = "B", threads: int = 0) -> Adapter:
    """The best rank-`rank` approximation of every module's delta (exact: QR + SVD of the small core)."""
    rank = check_rank(rank)
    threads = check_threads(threads)
    _check_split(split)
    _check_linear([adapter], "rank truncation")
    names = list(adapter.updates)
    updates: dict[str, LoraUpdate] = {}
    # groups of modules bounded by the size of their exact factorizations (a LoKr's or LoHa's can be large)
    costs = [(0.0, factor_cost(adapter.updates[n])[1]) for n in names]
    for start, stop in batches(costs, math.inf, SVD_GROUP_ELEMENTS, SVD_GROUP):
        items = [(n, *_stack([_Term(1.0, adapter.updates[n])], threads)) for n in names[start:stop]]
        # at most each module's full rank min(out, in): never an output padded to an absurd rank
        results = _core.factored_svd(items, [min(rank, b.shape[0], a.shape[1]) for _, b, a in items], split,
                                     threads)
        updates.update({n: adapter.updates[n].with_factors(b2, a2) for (n, _, _), (b2, a2, _) in zip(items, results)})
    raise_if_inputs_changed(adapter.sources())  # its file shrank or changed while read: refuse the result
    return _result(adapter, updates, [adapter])


def combine(
    adapters: Sequence[str | os.PathLike[str] | Adapter],
    weights: Sequence[float] | None = None,
    *,
    method: str = "svd",
    rank: int | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    seed: int = 0,
    split: str = "B",
    threads: int = 0,
    exact: bool = False,
    conv_rank: int | None = None,
) -> Adapter:
    """Combine adapters into one (see the module docstring for each method's formula).

    `rank` is the output rank of the svd methods (default: the largest input rank, as PEFT);
    `conv_rank` that of kxk convolutions with k > 1 (kohya's `--new_conv_rank`; default: `rank`).
    LoHa / LoKr inputs enter through an exact
    factorization of their delta (Khatri-Rao / Kronecker factors), so svd gives the best rank-k
    approximation of the summed deltas; they need `rank` when no plain LoRA sets the default.
    `exact=True` keeps method svd on the exact path for every module, however many adapters
    are stacked (by default modules with a large stacked rank use a randomized SVD through
    the factors; they are listed in the result's `randomized`).
    `density` (0..1) is required by the ties / dare / magnitude_prune methods; DARE's random
    masks come from `seed` and the module name, so results do not depend on thread count.
    """
    if method not in METHODS:
        raise LorafuseValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not adapters:
        raise LorafuseValueError("combine needs at least one adapter")
    threads = check_threads(threads)
    seed = check_seed(seed)
    rank = _check_rank(rank)
    conv_rank = _check_rank(conv_rank, "conv_rank")
    if density is not None:
        density = check_float(density, "density", 0.0, 1.0)
    loaded = _as_adapters(adapters)
    ws = [1.0] * len(loaded) if weights is None else check_weights(weights, len(loaded))
    _check_split(split)
    if majority_sign not in ("total", "frequency"):
        raise LorafuseValueError(f"majority_sign must be 'total' or 'frequency', got {majority_sign!r}")
    needs_density = method in _TASK and _TASK[method][0] != "none"
    if needs_density:
        if density is None:
            raise LorafuseValueError(f"method {method!r} needs a density between 0 and 1, got {density!r}")
    elif density is not None:
        raise LorafuseValueError(f"method {method!r} takes no density")
    if (rank is not None or conv_rank is not None) and method not in ("svd",) + DENSE_SVD:
        raise LorafuseValueError(f"method {method!r} takes no rank (it is defined by the inputs)")
    lycoris = [(a.label, n) for a in loaded for n, u in a.updates.items() if not isinstance(u, LoraUpdate)]
    if lycoris and method not in ("cat", "svd") + DENSE_SVD:
        label, name = lycoris[0]
        raise UnsupportedError(f"{label}: module {name!r} is a LoHa / LoKr update; method {method!r} merges LoRA "
                               "factors element by element, which a LoHa / LoKr does not have (use svd, cat or a "
                               "*_svd method)")
    _check_linear(loaded, f"combine --method {method}")

    by_module = _terms_by_module(loaded, ws)
    names = list(by_module)
    updates: dict[str, LoraUpdate] = {}
    randomized: list[str] = []
    ranks = _output_ranks(by_module, rank, conv_rank) if method in ("svd",) + DENSE_SVD else {}
    if method == "cat":
        for n in names:
            b, a = _stack(by_module[n], threads, coef_on="A")
            updates[n] = by_module[n][0].update.with_factors(b, a)
    elif method == "svd":
        updates, randomized = _factored_svd(by_module, ranks, split, "exact" if exact else "auto", seed, threads)
    elif method in FACTORWISE:
        updates = _factorwise(method, by_module, density, majority_sign, seed, threads)
    else:
        updates, randomized = _dense_svd(method, by_module, ranks, density, majority_sign, seed, split, threads)
    # An input file truncated or rewritten while it was read leaves zeros in what was read: refuse the result.
    raise_if_inputs_changed([p for a in loaded for p in a.sources()])
    result = _result(loaded[0], updates, loaded)
    result.randomized = randomized
    return result


SVD_GROUP = 64  # modules per call into the core: only one group's stacked factors exist at a time
SVD_GROUP_ELEMENTS = 1 << 25  # and at most this many stacked factor elements (or one module)
STRUCTURED_ABOVE = 1 << 24  # stacked exact factorizations (elements) above which LyCORIS terms go structured


def _factored_svd(by_module: dict[str, list[_Term]], ranks: dict[str, int], split: str, mode: str, seed: int,
                  threads: int) -> tuple[dict[str, LoraUpdate], list[str]]:
    """Method svd, a group of modules per call (the modules of a group spread over the threads)."""
    updates: dict[str, LoraUpdate] = {}
    randomized: list[str] = []
    # A module with LoHa / LoKr / Tucker terms whose exact factorizations would be large takes a randomized
    # SVD whose every product goes through their structure (memory of the order of the result).
    costs_of = {n: sum(factor_cost(t.update)[1] for t in ts) for n, ts in by_module.items()}
    for n, ts in by_module.items():
        if mode != "exact" and costs_of[n] > STRUCTURED_ABOVE and not all(is_stored_lora(t.update) for t in ts):
            b, a = structured_svd([(t.coef, t.update) for t in ts], ranks[n], split, seed)
            updates[n] = ts[0].update.with_factors(b, a)
            randomized.append(n)
    names = [n for n in by_module if n not in updates]
    # Groups bounded by the size of their stacked exact factorizations (a LoKr's or LoHa's can be large).
    costs = [(0.0, costs_of[n]) for n in names]
    for start, stop in batches(costs, math.inf, SVD_GROUP_ELEMENTS, SVD_GROUP):
        group = names[start:stop]
        items = [(n, *_stack(by_module[n], threads)) for n in group]
        results = _core.factored_svd(items, [ranks[n] for n in group], split, threads, mode=mode, seed=seed)
        updates.update({n: by_module[n][0].update.with_factors(b2, a2) for n, (b2, a2, _) in zip(group, results)})
        randomized += [n for n, b, a in items
                       if not _core.factored_svd_is_exact(b.shape[0], a.shape[1], b.shape[1], ranks[n], mode)]
    order = list(by_module)
    return {n: updates[n] for n in order}, sorted(randomized, key=order.index)


def _is_kxk_conv(u: Update) -> bool:
    shape = tuple(u.delta_shape)
    return len(shape) == 4 and shape[2] * shape[3] > 1


def _output_ranks(by_module: dict[str, list[_Term]], rank: int | None, conv_rank: int | None) -> dict[str, int]:
    """Each module's output rank: `conv_rank` for kxk convolutions (k > 1), `rank` for the rest. A default
    is the largest rank among the plain LoRA inputs (PEFT's rule); `conv_rank` defaults to `rank`."""
    lora_ranks = [t.update.rank for ts in by_module.values() for t in ts if isinstance(t.update, LoraUpdate)]
    default = rank if rank is not None else max(lora_ranks, default=None)
    conv_default = conv_rank if conv_rank is not None else default
    out: dict[str, int] = {}
    for n, ts in by_module.items():
        k = conv_default if _is_kxk_conv(ts[0].update) else default
        if k is None:
            raise LorafuseValueError(f"module {n!r}: LoHa / LoKr inputs have no LoRA rank to default to; "
                                     "pass rank (--rank, and --conv-rank for kxk convolutions)")
        out[n] = full_rank(k, tuple(ts[0].update.delta_shape))  # a rank above min(out, in) adds only zeros
    return out


def _task_args(method: str, density: float | None) -> tuple[str, bool, str, float]:
    prune, rescale, merge = _TASK[method]
    return prune, rescale, merge, 1.0 if density is None else float(density)


def _factorwise(method: str, by_module: dict[str, list[_Term]], density: float | None, majority: str, seed: int,
                threads: int) -> dict[str, LoraUpdate]:
    """PEFT's linear / ties / dare / magnitude_prune on the factors: A and B merged separately."""
    prune, rescale, merge, dens = _task_args(method, density)
    a_items, b_items, a_weights, b_weights = [], [], [], []
    for n, ts in by_module.items():
        ranks = {t.update.rank for t in ts}
        if len(ranks) != 1:
            raise ShapeMismatchError(
                f"module {n!r}: method {method!r} needs equal ranks (as PEFT), got {sorted(ranks)}; "
                "use svd or cat for adapters of different ranks"
            )
        factors = [t.update.stored_factors(threads) for t in ts]
        a_items.append((n + ".lora_A", [a for _, a in factors]))
        b_items.append((n + ".lora_B", [b for b, _ in factors]))
        a_weights.append([math.copysign(math.sqrt(abs(t.coef)), t.coef) if t.coef else 0.0 for t in ts])
        b_weights.append([math.sqrt(abs(t.coef)) for t in ts])
    merged_a = _core.task_merge(a_items, a_weights, prune, dens, rescale, merge, majority, seed, threads)
    merged_b = _core.task_merge(b_items, b_weights, prune, dens, rescale, merge, majority, seed, threads)
    return {n: ts[0].update.with_factors(b, a)
            for (n, ts), a, b in zip(by_module.items(), merged_a, merged_b)}


def _dense_svd(method: str, by_module: dict[str, list[_Term]], ranks: dict[str, int], density: float | None,
               majority: str,
               seed: int, split: str, threads: int) -> tuple[dict[str, LoraUpdate], list[str]]:
    """PEFT's *_svd methods: merge the dense deltas s_i B_i A_i with weights w_i, then rank k.

    Modules are processed in groups so only a few dense deltas exist at a time. Returns the
    updates and the modules whose rank-k step was randomized."""
    prune, rescale, merge, dens = _task_args(method, density)
    out: dict[str, LoraUpdate] = {}
    randomized: list[str] = []
    names = list(by_module)
    group = max(1, 2 * _core.resolve_threads(threads))  # the workers that really run: at most 4 per core
    for start in range(0, len(names), group):
        chunk = names[start : start + group]
        items, ws = [], []
        for n in chunk:
            deltas = []
            for t in by_module[n]:
                shape = t.update.delta_shape
                check_dense(getattr(t.update, "where", "") or f"module {n!r}", f"method {method!r} (its dense delta)",
                            (shape[0], int(np.prod(shape[1:], dtype=np.int64))))
                b, a = t.update.stored_factors(threads)
                deltas.append(np.ascontiguousarray((b * np.float32(t.update.scale)) @ a))
            items.append((n, deltas))
            ws.append([t.weight for t in by_module[n]])
        merged = _core.task_merge(items, ws, prune, dens, rescale, merge, majority, seed, threads)
        results = _core.dense_svd([(n, d) for n, d in zip(chunk, merged)], [ranks[n] for n in chunk], split, seed,
                                  oversample=_DENSE_OVERSAMPLE, threads=threads)
        for n, d, (b2, a2, _) in zip(chunk, merged, results):
            out[n] = by_module[n][0].update.with_factors(b2, a2)
            if not _core.dense_svd_is_exact(d.shape[0], d.shape[1], ranks[n], _DENSE_OVERSAMPLE):
                randomized.append(n)
    return out, randomized
