"""Reading LyCORIS modules from their kohya-named tensors (formats.kohya): the parts of each algorithm,
every shape checked, into the data model's LohaUpdate / LokrUpdate; a DoRA `dora_scale`; the LyCORIS
algorithms lorafuse does not read, by their parts.

alpha missing or 0 means alpha = r (scale 1), as in LyCORIS and kohya's sd-scripts. LoKr: scale =
alpha / r with r the rank of the factored half (or halves, which share it); 1 when both halves are
full matrices, whatever alpha says. The semantics of the updates: model.lycoris.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import numpy as np

from lorafuse.errors import FormatError, ShapeMismatchError, UnsupportedError
from lorafuse.io.tensor import Tensor
from lorafuse.model.limits import MAX_DELTA_ELEMENTS
from lorafuse.model.lycoris import LOHA_PARTS, LOKR_PARTS, LohaUpdate, LokrUpdate, LycorisUpdate
from lorafuse.model.names import Kind

# Tensors of the LyCORIS algorithms lorafuse does not read, and the algorithm each belongs to.
UNSUPPORTED_PARTS: dict[str, str] = {
    "diff": "full (diff)", "diff_b": "full (diff)",
    "w_norm": "norm (w_norm / b_norm)", "b_norm": "norm (w_norm / b_norm)",
    "oft_blocks": "OFT / BOFT", "oft_diag": "OFT / BOFT", "rescale": "OFT / BOFT",
    "on_input": "IA3", "weight": "IA3",
    "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA", "b2.weight": "GLoRA", "bm.weight": "GLoRA",
    "bias_indices": "bias (bias_indices / bias_values)", "bias_values": "bias (bias_indices / bias_values)",
    "bias_size": "bias (bias_indices / bias_values)",
    "lambda_layer": "T-LoRA", "q_layer.weight": "T-LoRA", "p_layer.weight": "T-LoRA",
    "lokr_t1": "LoKr with a Tucker w1 (lokr_t1)",
}

_L = TypeVar("_L", bound=LycorisUpdate)

def _listing(parts: Mapping[str, Tensor], names: tuple[str, ...]) -> str:
    return ", ".join(f"{n} {parts[n].shape}" for n in names if n in parts)


def _check_float(where: str, parts: Mapping[str, Tensor]) -> None:
    for n, t in parts.items():
        if not t.is_float:
            raise FormatError(f"{where}: {n} has non-float dtype {t.dtype}")


def _scale(alpha: float | None, rank: int | None) -> float:
    """alpha / r; 1 when there is no factored half (rank None) or no alpha (None or 0: alpha = r)."""
    if rank is None or alpha is None or alpha == 0.0:
        return 1.0
    return alpha / rank


def _check_size(where: str, u: _L) -> _L:
    """Refuse an empty delta, and one too large for any real module. (What an operation forms from it,
    such as an exact factorization, is checked against MAX_DENSE_ELEMENTS when it is formed.)"""
    if min(u.shape) == 0:
        raise ShapeMismatchError(f"{where}: the {u.algo} delta has shape {u.shape}, with an empty dimension")
    n = int(np.prod(u.shape, dtype=np.float64))
    if n > MAX_DELTA_ELEMENTS:
        raise ShapeMismatchError(f"{where}: a delta of shape {u.shape} ({n} elements) is larger than any real "
                                 f"module (at most {MAX_DELTA_ELEMENTS} elements)")
    return u


def loha_update(where: str, name: str, parts: Mapping[str, Tensor], alpha: float | None) -> LohaUpdate:
    """A LoHa module from its pieces (`hada_*`), every shape checked; `where` names file and module."""
    own = {k: parts[k] for k in LOHA_PARTS if k in parts}
    _check_float(where, own)
    halves = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    missing = [k for k in halves if k not in own]
    if missing:
        raise FormatError(f"{where}: a LoHa needs hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b; "
                          f"{', '.join(missing)} missing (has {_listing(own, LOHA_PARTS)})")
    cores = [k for k in ("hada_t1", "hada_t2") if k in own]
    if len(cores) == 1:
        raise FormatError(f"{where}: a Tucker LoHa needs both hada_t1 and hada_t2; only {_listing(own, LOHA_PARTS)}")
    shapes = {k: t.shape for k, t in own.items()}
    problem = _loha_tucker_problem(shapes) if cores else _loha_problem(shapes)
    if problem:
        raise ShapeMismatchError(f"{where}: LoHa tensors do not fit together ({_listing(own, LOHA_PARTS)}): "
                                 f"{problem}")
    w1a, w1b = shapes["hada_w1_a"], shapes["hada_w1_b"]
    if cores:
        rank, shape = w1b[0], (w1a[1], w1b[1], *shapes["hada_t1"][2:])
    else:
        rank, shape = w1b[0], (w1a[0], *w1b[1:])
    kind: Kind = "conv" if len(shape) == 4 else "linear"
    return _check_size(where, LohaUpdate(name, "loha", kind, shape, _scale(alpha, rank), dict(own), where=where))


def _loha_problem(s: Mapping[str, tuple[int, ...]]) -> str | None:
    for i in ("1", "2"):
        a, b = s[f"hada_w{i}_a"], s[f"hada_w{i}_b"]
        if len(a) != 2 or len(b) not in (2, 4):
            return f"hada_w{i}_a must be (out, r) and hada_w{i}_b (r, in) or (r, in, kh, kw)"
        if a[1] != b[0] or a[1] == 0:
            return f"hada_w{i}_a has {a[1]} columns but hada_w{i}_b {b[0]} rows (the rank must match and be > 0)"
    if s["hada_w1_b"][0] != s["hada_w2_b"][0]:
        return f"the halves have ranks {s['hada_w1_b'][0]} and {s['hada_w2_b'][0]}"
    if s["hada_w1_a"][0] != s["hada_w2_a"][0] or s["hada_w1_b"][1:] != s["hada_w2_b"][1:]:
        return "the halves have different shapes"
    return None


def _loha_tucker_problem(s: Mapping[str, tuple[int, ...]]) -> str | None:
    for i in ("1", "2"):
        a, b, t = s[f"hada_w{i}_a"], s[f"hada_w{i}_b"], s[f"hada_t{i}"]
        if len(a) != 2 or len(b) != 2 or len(t) != 4:
            return f"hada_t{i} must be (r, r, kh, kw), hada_w{i}_a (r, out) and hada_w{i}_b (r, in)"
        if t[0] != a[0] or t[1] != b[0] or t[0] == 0 or t[1] == 0:
            return f"hada_t{i} {t} does not fit hada_w{i}_a {a} and hada_w{i}_b {b}"
    if s["hada_t1"][:2] != s["hada_t2"][:2]:
        return f"the halves have ranks {s['hada_t1'][:2]} and {s['hada_t2'][:2]}"
    if (s["hada_w1_a"][1], s["hada_w1_b"][1], s["hada_t1"][2:]) != (s["hada_w2_a"][1], s["hada_w2_b"][1],
                                                                     s["hada_t2"][2:]):
        return "the halves have different shapes"
    return None


def lokr_update(where: str, name: str, parts: Mapping[str, Tensor], alpha: float | None) -> LokrUpdate:
    """A LoKr module from its pieces (`lokr_*`), every shape checked; `where` names file and module."""
    own = {k: parts[k] for k in LOKR_PARTS if k in parts}
    _check_float(where, own)
    have = _listing(own, LOKR_PARTS)
    for i in ("1", "2"):
        full, pair = f"lokr_w{i}" in own, [k for k in (f"lokr_w{i}_a", f"lokr_w{i}_b") if k in own]
        if full == bool(pair) or len(pair) == 1:
            raise FormatError(f"{where}: a LoKr needs lokr_w{i} or both lokr_w{i}_a and lokr_w{i}_b (has {have})")
    if "lokr_t2" in own and "lokr_w2" in own:
        raise FormatError(f"{where}: lokr_t2 (a Tucker core) needs lokr_w2_a and lokr_w2_b, not lokr_w2 "
                          f"(has {have})")
    shapes = {k: t.shape for k, t in own.items()}
    first = _lokr_first(shapes)
    second = _lokr_second(shapes)
    problem = first if isinstance(first, str) else second if isinstance(second, str) else None
    if problem is None:
        assert not isinstance(first, str) and not isinstance(second, str)
        (a, b, r1), (c, d, kernel, r2) = first, second
        if r1 is not None and r2 is not None and r1 != r2:
            problem = f"the factored halves have ranks {r1} and {r2}"
    if problem is not None:
        raise ShapeMismatchError(f"{where}: LoKr tensors do not fit together ({have}): {problem}")
    shape = (a * c, b * d, *kernel)
    kind: Kind = "conv" if len(shape) == 4 else "linear"
    u = LokrUpdate(name, "lokr", kind, shape, _scale(alpha, r1 if r1 is not None else r2), dict(own), where=where)
    return _check_size(where, u)


def scale_rank(algo: str, parts: Mapping[str, Tensor]) -> int | None:
    """The r of a LyCORIS module's scale = alpha / r, from its stored pieces (checked by loha_update /
    lokr_update): a LoHa's rank, a LoKr's factored half's rank, None for a LoKr of two full halves (scale 1,
    whatever alpha says)."""
    shapes = {k: t.shape for k, t in parts.items()}
    if algo == "loha":
        return shapes["hada_w1_b"][0]
    first, second = _lokr_first(shapes), _lokr_second(shapes)
    assert not isinstance(first, str) and not isinstance(second, str)
    return first[2] if first[2] is not None else second[3]


def _lokr_first(s: Mapping[str, tuple[int, ...]]) -> tuple[int, int, int | None] | str:
    """(a, b, rank or None) of w1, or what is wrong."""
    if "lokr_w1" in s:
        w = s["lokr_w1"]
        return (w[0], w[1], None) if len(w) == 2 and min(w) > 0 else "lokr_w1 must be a non-empty (a, b) matrix"
    wa, wb = s["lokr_w1_a"], s["lokr_w1_b"]
    if len(wa) != 2 or len(wb) != 2 or wa[1] != wb[0] or min(*wa, *wb) == 0:
        return "lokr_w1_a must be (a, r) and lokr_w1_b (r, b) with one r > 0"
    return wa[0], wb[1], wa[1]


def _lokr_second(s: Mapping[str, tuple[int, ...]]) -> tuple[int, int, tuple[int, ...], int | None] | str:
    """(c, d, kernel, rank or None) of w2, or what is wrong."""
    if "lokr_w2" in s:
        w = s["lokr_w2"]
        if len(w) not in (2, 4) or min(w) == 0:
            return "lokr_w2 must be a non-empty (c, d) or (c, d, kh, kw) tensor"
        return w[0], w[1], tuple(w[2:]), None
    wa, wb = s["lokr_w2_a"], s["lokr_w2_b"]
    if "lokr_t2" in s:
        t = s["lokr_t2"]
        if len(t) != 4 or len(wa) != 2 or len(wb) != 2 or t[0] != wa[0] or t[1] != wb[0] or min(*t, *wa, *wb) == 0:
            return "lokr_t2 must be (r, r, kh, kw) with lokr_w2_a (r, c) and lokr_w2_b (r, d)"
        if t[0] != t[1]:
            return f"lokr_t2 {t} is not square in its ranks"
        return wa[1], wb[1], tuple(t[2:]), t[0]
    if len(wa) != 2 or len(wb) not in (2, 4) or wa[1] != wb[0] or min(*wa, *wb) == 0:
        return "lokr_w2_a must be (c, r) and lokr_w2_b (r, d) or (r, d, kh, kw) with one r > 0"
    return wa[0], wb[1], tuple(wb[2:]), wa[1]


def dora_magnitude(where: str, t: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, bool]:
    """A LyCORIS `dora_scale` as (magnitude, on_columns) for an update of `shape`: (out, 1[, 1, 1])
    (`wd_on_out=True`) gives one value per output row; (1, in) (`wd_on_out=False`, Linear) one per
    column. The merge is W' = m / ||W + dW|| * (W + dW), the norm over each row (or column);
    LyCORIS adds float32 eps to that norm, lorafuse does not. Per-input-channel norms of a
    convolution ((1, in, 1, 1)) are refused."""
    if not t.is_float:
        raise FormatError(f"{where}: dora_scale has non-float dtype {t.dtype}")
    rows, cols = shape[0], int(np.prod(shape[1:], dtype=np.int64))
    s = t.shape
    flat = Tensor(t.raw.reshape(-1), t.dtype)
    if len(s) in (2, 4) and s[0] == rows and all(x == 1 for x in s[1:]):
        return flat, False
    if len(s) == 4 and s[0] == 1 and all(x == 1 for x in s[2:]):
        raise UnsupportedError(f"{where}: dora_scale {s} normalizes each input channel of a convolution "
                               "(LyCORIS wd_on_out=False); lorafuse supports DoRA per output channel only there")
    if len(s) == 2 and s[0] == 1 and len(shape) == 2 and s[1] == cols:
        return flat, True
    raise ShapeMismatchError(f"{where}: dora_scale {s} fits neither the output rows (({rows}, 1) or "
                             f"({rows}, 1, 1, 1)) nor the input columns ((1, {cols})) of an update of shape {shape}")


def unsupported_algorithm(parts: Mapping[str, Tensor]) -> tuple[str, list[str]] | None:
    """The first LyCORIS algorithm lorafuse does not read among a module's parts, and its parts."""
    found = [p for p in parts if p in UNSUPPORTED_PARTS]
    if not found:
        return None
    algo = UNSUPPORTED_PARTS[found[0]]
    return algo, sorted(p for p in found if UNSUPPORTED_PARTS[p] == algo)



__all__ = ["LOHA_PARTS", "LOKR_PARTS", "UNSUPPORTED_PARTS", "dora_magnitude", "loha_update", "lokr_update",
           "unsupported_algorithm"]
