"""similarity: exact cosine similarity of adapters' deltas, from the factors alone.

<B1 A1, B2 A2>_F = sum((B1^T B2) * (A1 A2^T)) per module, summed over modules (a module
missing from one adapter contributes 0 to the inner product and its own norm to the other's).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from lorafuse import _core
from lorafuse.adapter import Adapter
from lorafuse.errors import LorafuseValueError, ShapeMismatchError
from lorafuse.formats import load


def gram(adapters: Sequence[str | os.PathLike[str] | Adapter], threads: int = 0) -> np.ndarray:
    """G[i, j] = <delta_i, delta_j>_F over all modules, in float64."""
    loaded = [a if isinstance(a, Adapter) else load(a) for a in adapters]
    n = len(loaded)
    factors = [{name: u.stored_factors(threads) for name, u in a.updates.items()} for a in loaded]
    items, where, coefs = [], [], []
    for i in range(n):
        for j in range(i, n):
            for name, u in loaded[i].updates.items():
                v = loaded[j].updates.get(name)
                if v is None:
                    continue
                if (tuple(u.delta_shape), u.transposed) != (tuple(v.delta_shape), v.transposed):
                    raise ShapeMismatchError(f"module {name!r}: {loaded[i].label} has shape {tuple(u.delta_shape)}, "
                                             f"{loaded[j].label} has {tuple(v.delta_shape)}")
                (b1, a1), (b2, a2) = factors[i][name], factors[j][name]
                items.append((b1, a1, b2, a2))
                where.append((i, j))
                coefs.append(u.scale * v.scale)  # applied in float64, not folded into the float32 factors
    values = (_core.factored_inner(items, threads) * np.asarray(coefs)) if items else np.zeros(0)
    g = np.zeros((n, n))
    for (i, j), v in zip(where, values):
        g[i, j] += v
    return np.triu(g) + np.triu(g, 1).T


def similarity(adapters: Sequence[str | os.PathLike[str] | Adapter], threads: int = 0) -> np.ndarray:
    """Cosine similarity matrix of the adapters' deltas (all modules together)."""
    if len(adapters) < 1:
        raise LorafuseValueError("similarity needs at least one adapter")
    g = gram(adapters, threads)
    norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = g / np.outer(norms, norms)
    return np.where(np.outer(norms, norms) > 0, cos, 0.0)
