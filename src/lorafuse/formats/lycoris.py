"""LyCORIS LoHa and LoKr updates, read from kohya-named `.safetensors` files (formats.kohya).

The semantics are those of the modules LyCORIS 4.x trains (`lycoris/modules/loha.py`, `lokr.py`,
`lycoris/functional/*.py`), on the 2-D view of the base weight (out x in*kh*kw):

LoHa   delta = scale * (w1_a @ w1_b) * (w2_a @ w2_b)              (elementwise product)
       Tucker (`hada_t1`, `hada_t2`, conv kh x kw): each half is the core contracted with
       w_a (r x out) on its first index and w_b (r x in) on its second; scale = alpha / r,
       r = hada_w1_b.shape[0].
LoKr   delta = scale * kron(w1, w2), w1 = `lokr_w1` or `lokr_w1_a @ lokr_w1_b` (a x b),
       w2 = `lokr_w2` ((c, d) or (c, d, kh, kw)), `lokr_w2_a @ lokr_w2_b`, or the Tucker rebuild of
       `lokr_t2` with `lokr_w2_a` (r x c) and `lokr_w2_b` (r x d); out = a*c, in*kh*kw = b*d*kh*kw.
       scale = alpha / r with r the rank of the factored half (or halves, which share it); 1 when
       both halves are full matrices, whatever alpha says.

alpha missing or 0 means alpha = r (scale 1), as in LyCORIS and kohya's sd-scripts.

The scale is applied once, as in LyCORIS's forward pass (what a model was trained with) and in
the stable-diffusion web UIs. LyCORIS 4.1's `get_diff_weight` / `merge_to` for LoHa and LoKr
multiply by it a second time; lorafuse does not reproduce that.

A LoHa without Tucker cores, and a LoKr whose w2 is factored without a core, store the kernel of a
convolution flattened into their columns (LyCORIS does it that way): such an update has the 2-D
shape (out, in*kh*kw), and `with_shape` gives it the base weight's 4-D shape once that is known.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from lorafuse import _core
from lorafuse.adapter import Kind, LoraUpdate
from lorafuse.errors import FormatError, ShapeMismatchError, UnsupportedError
from lorafuse.io.tensor import Tensor

Algo = Literal["loha", "lokr"]
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
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
MAX_DELTA_ELEMENTS = 1 << 32  # a larger delta (16 GiB in float32) is a corrupt or hostile file

# One half of a LoHa / LoKr: (B, A) with B (rows x r) and A (r x cols), or (None, W) for a full W.
Half = tuple["np.ndarray | None", np.ndarray]


@dataclass
class LycorisUpdate:
    """One module's LoHa or LoKr update; used like `LoraUpdate` (scale, delta_shape, rank, factors,
    delta) where that makes sense.

    `tensors` holds the pieces as stored (memory-mapped), named by their key suffix (`hada_w1_a`,
    `lokr_w2`, ...). `magnitude` is a DoRA `dora_scale`: one value per row of the 2-D base weight,
    or per column when `magnitude_on_columns` (LyCORIS `wd_on_out=False` on a Linear). LyCORIS
    divides by the norm plus float32 eps; lorafuse divides by the norm alone.
    """

    name: str
    algo: Algo
    kind: Kind
    shape: tuple[int, ...]
    scale: float
    tensors: dict[str, Tensor]
    magnitude: Tensor | None = None
    magnitude_on_columns: bool = False
    transposed: ClassVar[bool] = False
    bias: ClassVar[None] = None

    # ---- the LoraUpdate-like interface -------------------------------------------------------------

    @property
    def delta_shape(self) -> tuple[int, ...]:
        return self.shape

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64))

    @property
    def rank(self) -> int:
        """Rank of the exact factorization `stored_factors` returns (at most min(out, in*kh*kw))."""
        k1, k2 = (min(rows, cols) if r is None else min(r, rows, cols) for rows, cols, r in self._half_dims())
        if self.algo == "loha":
            return min(k1 * k2, self.rows, self.cols)
        return k1 * k2

    def is_plain(self) -> bool:
        return self.magnitude is None

    def stored_factors(self, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """An exact factorization (B, A) of the 2-D delta without the scale, float32: B (out x k),
        A (k x in*kh*kw). LoHa: Khatri-Rao products of the halves (k = r1*r2), or the dense delta
        beside an identity when r1*r2 >= min(out, cols). LoKr: kron(B1, B2), kron(A1, A2) of each
        half's factors, a full half W (m x n) taken as (I_m, W) if m <= n else (W, I_n)."""
        (b1, a1), (b2, a2) = self._halves(threads, np.float32)
        if self.algo == "lokr":
            f1, f2 = _factor(b1, a1), _factor(b2, a2)
            return np.ascontiguousarray(np.kron(f1[0], f2[0])), np.ascontiguousarray(np.kron(f1[1], f2[1]))
        assert b1 is not None and b2 is not None
        r1, r2 = b1.shape[1], b2.shape[1]
        if r1 * r2 >= min(self.rows, self.cols):
            return _factor(None, _dense(b1, a1) * _dense(b2, a2))
        b = (b1[:, :, None] * b2[:, None, :]).reshape(self.rows, r1 * r2)
        a = (a1[:, None, :] * a2[None, :, :]).reshape(r1 * r2, self.cols)
        return np.ascontiguousarray(b), np.ascontiguousarray(a)

    def factors(self, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The same as `stored_factors` (a LyCORIS update is never transposed)."""
        return self.stored_factors(threads)

    def merge_stage(self, coef: float, threads: int = 0) -> tuple[str, tuple[np.ndarray, ...]]:
        """Arrays for the core's merge kernel, float32, C-contiguous, 2-D, with `coef` folded into
        the first: ("hadamard", (B1, A1, B2, A2)) for delta_2d = (B1 @ A1) * (B2 @ A2), or
        ("kron", (W1, W2)) for delta_2d = kron(W1, W2). `coef` is the whole coefficient of the
        unscaled delta: the user's weight times `self.scale` (as `Contribution.coef`)."""
        c = np.float32(coef)
        (b1, a1), (b2, a2) = self._halves(threads, np.float32)
        if self.algo == "loha":
            assert b1 is not None and b2 is not None
            return "hadamard", tuple(np.ascontiguousarray(x, dtype=np.float32) for x in (b1 * c, a1, b2, a2))
        w1 = (_dense(b1, a1) * float(coef)).astype(np.float32)
        w2 = _dense(b2, a2).astype(np.float32)
        return "kron", (np.ascontiguousarray(w1), np.ascontiguousarray(w2))

    def delta(self) -> np.ndarray:
        """The dense delta in float64, scale included, in the base weight's shape."""
        (b1, a1), (b2, a2) = self._halves(0, np.float64)
        h1, h2 = _dense(b1, a1), _dense(b2, a2)
        d = h1 * h2 if self.algo == "loha" else np.kron(h1, h2)
        return (self.scale * d).reshape(self.shape)

    def with_factors(self, b: np.ndarray, a: np.ndarray, scale: float = 1.0) -> LoraUpdate:
        """A plain LoraUpdate of this module with stored factors B (out x k) and A (k x in*kh*kw),
        laid out as kohya stores a LoRA of this shape (conv: A (k, in, kh, kw), B (out, k, 1, 1))."""
        k = a.shape[0]
        a_t = Tensor.from_array(np.ascontiguousarray(a, dtype=np.float32).reshape((k, *self.shape[1:])))
        b_shape = (self.rows, k, 1, 1) if len(self.shape) == 4 else (self.rows, k)
        b_t = Tensor.from_array(np.ascontiguousarray(b, dtype=np.float32).reshape(b_shape))
        return LoraUpdate(self.name, a_t, b_t, scale, self.kind)

    def to_lora(self, rank: int, threads: int = 0) -> LoraUpdate:
        """The best rank-`rank` approximation of the delta (Eckart-Young, through the exact
        factorization), as a LoraUpdate with scale 1. A DoRA magnitude is kept."""
        b, a = self.stored_factors(threads)
        b = np.ascontiguousarray(b * np.float32(self.scale), dtype=np.float32)
        ((b2, a2, _),) = _core.factored_svd([(self.name, b, a)], [rank], "B", threads)
        lora = self.with_factors(b2, a2, 1.0)
        return dataclasses.replace(lora, magnitude=self.magnitude, magnitude_on_columns=self.magnitude_on_columns)

    def with_shape(self, shape: tuple[int, ...]) -> LycorisUpdate:
        """This update laid onto a base weight of `shape` with the same 2-D view (out, in*kh*kw):
        gives a flattened conv kernel back its shape."""
        shape = tuple(int(s) for s in shape)
        same_2d = len(shape) >= 2 and shape[0] == self.rows and int(np.prod(shape[1:], dtype=np.int64)) == self.cols
        if not same_2d or (len(self.shape) > 2 and shape != self.shape) or len(shape) not in (2, 4):
            raise ShapeMismatchError(f"module {self.name!r}: a {self.algo} update of shape {self.shape} cannot "
                                     f"be laid onto a weight of shape {shape}")
        kind: Kind = "conv" if len(shape) == 4 else "linear"
        return dataclasses.replace(self, shape=shape, kind=kind)

    # ---- the halves, from the stored tensors -------------------------------------------------------

    def _half_dims(self) -> tuple[tuple[int, int, int | None], tuple[int, int, int | None]]:
        """(rows, cols, rank or None for a full matrix) of each half's 2-D matrix."""
        s = {k: t.shape for k, t in self.tensors.items()}

        def cols(shape: tuple[int, ...]) -> int:
            return int(np.prod(shape[1:], dtype=np.int64))

        if self.algo == "loha":
            r1, r2 = s["hada_w1_b"][0], s["hada_w2_b"][0]
            return (self.rows, self.cols, r1), (self.rows, self.cols, r2)
        if "lokr_w1" in s:
            first: tuple[int, int, int | None] = (s["lokr_w1"][0], s["lokr_w1"][1], None)
        else:
            first = (s["lokr_w1_a"][0], s["lokr_w1_b"][1], s["lokr_w1_b"][0])
        c = self.rows // first[0]
        if "lokr_w2" in s:
            return first, (c, cols(s["lokr_w2"]), None)
        r2 = s["lokr_t2"][0] if "lokr_t2" in s else s["lokr_w2_b"][0]
        return first, (c, self.cols // first[1], r2)

    def _halves(self, threads: int, dtype: type) -> tuple[Half, Half]:
        t = self.tensors

        def m(key: str) -> np.ndarray:
            return t[key].f32(threads).astype(dtype, copy=False)

        def flat(x: np.ndarray) -> np.ndarray:
            return x.reshape(x.shape[0], -1)

        def tucker(core: str, w_a: str, w_b: str) -> Half:
            return np.ascontiguousarray(m(w_a).T), _contract(m(core), m(w_b)).astype(dtype)

        if self.algo == "loha":
            if "hada_t1" in t:
                return tucker("hada_t1", "hada_w1_a", "hada_w1_b"), tucker("hada_t2", "hada_w2_a", "hada_w2_b")
            return (m("hada_w1_a"), flat(m("hada_w1_b"))), (m("hada_w2_a"), flat(m("hada_w2_b")))
        first: Half = (None, m("lokr_w1")) if "lokr_w1" in t else (m("lokr_w1_a"), m("lokr_w1_b"))
        if "lokr_w2" in t:
            second: Half = (None, flat(m("lokr_w2")))
        elif "lokr_t2" in t:
            second = tucker("lokr_t2", "lokr_w2_a", "lokr_w2_b")
        else:
            second = (m("lokr_w2_a"), flat(m("lokr_w2_b")))
        return first, second


def _contract(core: np.ndarray, w_b: np.ndarray) -> np.ndarray:
    """A Tucker core (r, r', kh, kw) contracted with w_b (r', in) on its second index, in float64:
    the A factor (r x in*kh*kw) of a half whose B is w_a^T."""
    a = np.einsum("ijhw,jc->ichw", core.astype(np.float64), w_b.astype(np.float64))
    return a.reshape(core.shape[0], -1)


def _dense(b: np.ndarray | None, a: np.ndarray) -> np.ndarray:
    """A half as a dense float64 matrix."""
    if b is None:
        return a.astype(np.float64, copy=False)
    return b.astype(np.float64) @ a.astype(np.float64)


def _factor(b: np.ndarray | None, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact float32 factors of a half with at most min(rows, cols) columns in B."""
    rows = a.shape[0] if b is None else b.shape[0]
    if b is not None and b.shape[1] < min(rows, a.shape[1]):
        return b.astype(np.float32, copy=False), a.astype(np.float32, copy=False)
    w = _dense(b, a).astype(np.float32)
    if w.shape[0] <= w.shape[1]:
        return np.eye(w.shape[0], dtype=np.float32), w
    return w, np.eye(w.shape[1], dtype=np.float32)


# ----------------------------------------------------------------------------- reading


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


def _check_size(where: str, u: LycorisUpdate) -> LycorisUpdate:
    """Refuse an empty delta, and one (or an exact factorization) too large for any real module."""
    if min(u.shape) == 0:
        raise ShapeMismatchError(f"{where}: the {u.algo} delta has shape {u.shape}, with an empty dimension")
    n = int(np.prod(u.shape, dtype=np.float64))
    if n > MAX_DELTA_ELEMENTS:
        raise ShapeMismatchError(f"{where}: a delta of shape {u.shape} ({n} elements) is larger than any real "
                                 f"module (at most {MAX_DELTA_ELEMENTS} elements)")
    factors = u.rank * (u.rows + u.cols)
    if factors > MAX_DELTA_ELEMENTS:
        raise ShapeMismatchError(f"{where}: the exact factorization of a {u.algo} delta of shape {u.shape} has "
                                 f"rank {u.rank} ({factors} elements); at most {MAX_DELTA_ELEMENTS} are supported")
    return u


def loha_update(where: str, name: str, parts: Mapping[str, Tensor], alpha: float | None) -> LycorisUpdate:
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
    return _check_size(where, LycorisUpdate(name, "loha", kind, shape, _scale(alpha, rank), dict(own)))


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


def lokr_update(where: str, name: str, parts: Mapping[str, Tensor], alpha: float | None) -> LycorisUpdate:
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
    u = LycorisUpdate(name, "lokr", kind, shape, _scale(alpha, r1 if r1 is not None else r2), dict(own))
    return _check_size(where, u)


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


__all__ = ["LOHA_PARTS", "LOKR_PARTS", "UNSUPPORTED_PARTS", "LycorisUpdate", "dora_magnitude", "loha_update",
           "lokr_update", "unsupported_algorithm"]
