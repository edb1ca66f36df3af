"""LyCORIS LoHa and LoKr updates: one class per algorithm (LohaUpdate, LokrUpdate) under LycorisUpdate.

The semantics are those of the modules LyCORIS 4.x trains (`lycoris/modules/loha.py`, `lokr.py`,
`lycoris/functional/*.py`), on the 2-D view of the base weight (out x in*kh*kw):

LoHa   delta = scale * (w1_a @ w1_b) * (w2_a @ w2_b)              (elementwise product)
       Tucker (`hada_t1`, `hada_t2`, conv kh x kw): each half is the core contracted with
       w_a (r x out) on its first index and w_b (r x in) on its second; scale = alpha / r.
LoKr   delta = scale * kron(w1, w2), w1 = `lokr_w1` or `lokr_w1_a @ lokr_w1_b` (a x b),
       w2 = `lokr_w2` ((c, d) or (c, d, kh, kw)), `lokr_w2_a @ lokr_w2_b`, or the Tucker rebuild of
       `lokr_t2` with `lokr_w2_a` (r x c) and `lokr_w2_b` (r x d); out = a*c, in*kh*kw = b*d*kh*kw.

The scale is applied once, as in LyCORIS's forward pass. A LoHa without Tucker cores, and a LoKr
whose w2 is factored without a core, store the kernel of a convolution flattened into their
columns: such an update has the 2-D shape (out, in*kh*kw), and `with_shape` gives it the base
weight's 4-D shape once that is known. Norms, spectra and rank reductions go through the structure
(model.structure), never through a dense delta; what is formed densely is checked first
(model.limits).

`LycorisUpdate(name, algo, ...)` still builds the class of `algo` ('loha' -> LohaUpdate, 'lokr' ->
LokrUpdate), so code written against the one-class form keeps working.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from lorafuse.backends import FactorJob, get_backend
from lorafuse.errors import LorafuseValueError, ShapeMismatchError
from lorafuse.io.tensor import Tensor
from lorafuse.model import limits
from lorafuse.model.best import hadamard_best, kron_best, pad_terms
from lorafuse.model.half import Half, factored_half, tucker_half
from lorafuse.model.limits import MAX_CORE_RANK, check_dense, f64, steps
from lorafuse.model.lora import LoraUpdate, new_factors
from lorafuse.model.names import Kind
from lorafuse.model.structure import Delta, Hadamard, Kronecker, dense64, dense_blocks

Algo = Literal["loha", "lokr"]
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
HalfDims = tuple[tuple[int, int, "int | None"], tuple[int, int, "int | None"]]


@dataclass
class LycorisUpdate:
    """One module's LoHa or LoKr update, with the protocol of every update (name, kind, scale,
    delta_shape, rank, stored_factors / factors, delta, structure, stored_tensors, with_factors).

    `tensors` holds the pieces as stored (memory-mapped), named by their key suffix (`hada_w1_a`,
    `lokr_w2`, ...). `magnitude` is a DoRA `dora_scale`: one value per row of the 2-D base weight,
    or per column when `magnitude_on_columns` (LyCORIS `wd_on_out=False` on a Linear). LyCORIS
    divides by the norm plus float32 eps; lorafuse divides by the norm alone. `where` names the
    file and module in messages.
    """

    name: str
    algo: Algo
    kind: Kind
    shape: tuple[int, ...]
    scale: float
    tensors: dict[str, Tensor]
    magnitude: Tensor | None = None
    magnitude_on_columns: bool = False
    where: str = ""
    transposed: ClassVar[bool] = False
    bias: ClassVar[None] = None
    ALGO: ClassVar[str] = ""
    PARTS: ClassVar[tuple[str, ...]] = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> LycorisUpdate:
        if cls is LycorisUpdate:  # the one-class constructor: the class of its algorithm
            algo = args[1] if len(args) > 1 else kwargs.get("algo")
            cls = _CLASSES.get(algo)  # type: ignore[arg-type,assignment]
            if cls is None:
                raise LorafuseValueError(f"LyCORIS algorithm must be one of {', '.join(_CLASSES)}, got {algo!r}")
        return object.__new__(cls)

    def __post_init__(self) -> None:
        if self.algo != self.ALGO:
            raise LorafuseValueError(f"a {type(self).__name__} has algo {self.ALGO!r}, not {self.algo!r}")

    # ---- the update protocol ----------------------------------------------------------------------

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
    def label(self) -> str:
        return self.where or f"module {self.name!r}"

    def stored_tensors(self) -> list[Tensor]:
        """The tensors kept from the file: the pieces, then the DoRA magnitude."""
        return list(self.tensors.values()) + ([self.magnitude] if self.magnitude is not None else [])

    def _term_counts(self) -> tuple[int, int]:
        k1, k2 = (min(rows, cols) if r is None else min(r, rows, cols) for rows, cols, r in self._half_dims())
        return k1, k2

    def _dense_plan(self) -> bool:
        """Whether the exact factorization is the dense delta beside an identity (fewer elements than
        the Khatri-Rao / Kronecker one)."""
        raise NotImplementedError

    @property
    def rank(self) -> int:
        """Rank of the exact factorization `stored_factors` returns (at most min(out, in*kh*kw))."""
        if self._dense_plan():
            return min(self.rows, self.cols)
        k1, k2 = self._term_counts()
        return k1 * k2

    def _factor_shape(self) -> tuple[int, int]:
        """(elements, widest dimension) of the exact factorization `stored_factors` would form."""
        if self._dense_plan():
            return self.rows * self.cols + min(self.rows, self.cols) ** 2, max(self.rows, self.cols)
        return self.rank * (self.rows + self.cols), self.rank

    def is_plain(self) -> bool:
        return self.magnitude is None

    def structure(self) -> Delta:
        """The unscaled 2-D delta in its structure (float64 copies of the stored tensors, nothing larger)."""
        raise NotImplementedError

    def stored_factors(self, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """An exact factorization (B, A) of the 2-D delta without the scale, float32: B (out x k),
        A (k x in*kh*kw) (the subclass says which), or the dense delta beside an identity when that
        is smaller. Refused (UnsupportedError) past MAX_DENSE_ELEMENTS, before anything is allocated."""
        dense = self._dense_plan()
        if dense:
            check_dense(self.label, f"the exact factorization of this {self.algo} (its dense delta)",
                        (self.rows, self.cols))
        else:
            check_dense(self.label, f"the exact factorization of this {self.algo} (rank {self.rank})",
                        (self.rank, self.rows + self.cols))
        s = self.structure()
        if dense:
            w = np.empty((self.rows, self.cols), dtype=np.float32)
            for c0, c1, o0, o1, x in dense_blocks(s):
                w[o0:o1, c0:c1] = x
            if self.rows <= self.cols:
                return np.eye(self.rows, dtype=np.float32), w
            return w, np.eye(self.cols, dtype=np.float32)
        return self._exact_factors(s)

    def _exact_factors(self, s: Delta) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def factors(self, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The same as `stored_factors` (a LyCORIS update is never transposed)."""
        return self.stored_factors(threads)

    def merge_stage(self, coef: float, threads: int = 0) -> tuple[str, tuple[np.ndarray, ...]]:
        """Arrays for the core's merge kernel, float32, C-contiguous, 2-D, with `coef` (the user's
        weight times `self.scale`) folded into the first."""
        raise NotImplementedError

    def delta(self) -> np.ndarray:
        """The dense delta in float64, scale included, in the base weight's shape (for small modules,
        reports and tests; refused past MAX_DENSE_ELEMENTS)."""
        check_dense(self.label, f"the dense delta of this {self.algo}", (self.rows, self.cols))
        s = self.structure()
        if isinstance(s, Kronecker):
            check_dense(self.label, "the first LoKr half", (s.h1.m, s.h1.n))
            check_dense(self.label, "the second LoKr half", (s.h2.m, s.h2.n))
            d = np.kron(dense64(s.h1), dense64(s.h2))
        else:
            d = np.empty((self.rows, self.cols))
            for c0, c1, o0, o1, x in dense_blocks(s):
                d[o0:o1, c0:c1] = x
        return (self.scale * d).reshape(self.shape)

    def with_factors(self, b: np.ndarray, a: np.ndarray, scale: float = 1.0) -> LoraUpdate:
        """A plain LoraUpdate of this module with stored factors B (out x k) and A (k x in*kh*kw),
        laid out as kohya stores a LoRA of this shape (conv: A (k, in, kh, kw), B (out, k, 1, 1)). The update
        holds copies of `b` and `a`: a later write to them does not change it."""
        b_tail = (1, 1) if len(self.shape) == 4 else ()
        b32, a32 = new_factors(self.name, b, a, tuple(self.shape[1:]), self.rows, b_tail)
        k = a32.shape[0]
        a_t = Tensor.from_array(a32.reshape((k, *self.shape[1:])))
        b_shape = (self.rows, k, 1, 1) if len(self.shape) == 4 else (self.rows, k)
        b_t = Tensor.from_array(b32.reshape(b_shape))
        return LoraUpdate(self.name, a_t, b_t, scale, self.kind)

    def _best(self, s: Delta, k: int, split: str = "B") -> tuple[np.ndarray, np.ndarray]:
        """The best rank-k factors of the unscaled delta through the structure (split: as best_factors)."""
        raise NotImplementedError

    def _core_svd_first(self, s: Delta) -> bool:
        """Whether to_lora goes through the backend's SVD of the exact factorization."""
        return False

    def to_lora(self, rank: int, threads: int = 0) -> LoraUpdate:
        """The best rank-`rank` approximation of the delta (Eckart-Young) as a LoraUpdate with scale 1,
        the singular values on B. A DoRA magnitude is kept. LoKr: from the SVDs of its halves (the
        singular triplets of a Kronecker product are the products of theirs); LoHa: through the
        backend's QR + SVD of the exact factorization, or, when that is large, through the Gram
        matrices of its Khatri-Rao factors, building the result in tiles."""
        s = self.structure()
        k = min(rank, self.rank)
        if self._core_svd_first(s):
            fb, fa = self.stored_factors(threads)
            fb = np.ascontiguousarray(fb * np.float32(self.scale))
            ((b, a, _),) = get_backend().factored_svd([FactorJob(self.name, fb, fa)], [k], "B", threads)
        else:
            b, a = self._best(s, k)
            b = b.astype(np.float64) * self.scale
        b, a = pad_terms(np.asarray(b, dtype=np.float32), np.asarray(a, dtype=np.float32), k)
        lora = self.with_factors(b, a, 1.0)
        return dataclasses.replace(lora, magnitude=self.magnitude, magnitude_on_columns=self.magnitude_on_columns)

    def prefers_structure(self) -> bool:
        """Whether a rank reduction should go through the structure (`best_factors`) rather than the
        backend's SVD of the exact factorization."""
        raise NotImplementedError

    def _values(self, s: Delta) -> np.ndarray:
        """All singular values of the unscaled delta (as `best_factors` documents), descending."""
        raise NotImplementedError

    def best_factors(self, choose: Callable[[np.ndarray], int], split: str = "B",
                     threads: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(B, A, S) of the unscaled delta: its singular values S, descending (a LoKr's: all products of
        its halves', up to MAX_DENSE_ELEMENTS of them; a LoHa's as `spectrum`), and its best rank-k factors
        for k = choose(S) (float32; the singular values on B, or their square roots on both with
        split='sqrt'), all through the structure."""
        s = self.structure()
        values = self._values(s)
        k = max(1, min(int(choose(values)), self.rank))
        b, a = pad_terms(*self._best(s, k, split), k)  # the split made in float64, before the rounding to float32
        return b, a, values

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

    def _half_dims(self) -> HalfDims:
        """(rows, cols, rank or None for a full matrix) of each half's 2-D matrix."""
        raise NotImplementedError

    def halves(self) -> tuple[Half, Half]:
        """Both halves as Half (float64 copies of the stored tensors; Tucker cores not contracted)."""
        raise NotImplementedError

    def _m(self, key: str) -> np.ndarray:
        t = self.tensors[key]
        return f64(t, t.shape)

    def _tucker(self, rows: int, cols: int, core: str, w_a: str, w_b: str) -> Half:
        return tucker_half(rows, cols, self._m(w_a), self._m(core), self._m(w_b))


class LohaUpdate(LycorisUpdate):
    """LoHa: delta = scale * (w1_a @ w1_b) * (w2_a @ w2_b), elementwise (Tucker halves optional).
    Its exact factorization is the Khatri-Rao one (k = r1*r2), or the dense delta beside an identity
    when r1*r2 >= min(out, cols)."""

    ALGO = "loha"
    PARTS = LOHA_PARTS

    def _dense_plan(self) -> bool:
        k1, k2 = self._term_counts()
        return k1 * k2 >= min(self.rows, self.cols)

    def structure(self) -> Hadamard:
        return Hadamard(*self.halves())

    def _exact_factors(self, s: Delta) -> tuple[np.ndarray, np.ndarray]:
        assert isinstance(s, Hadamard)
        b = np.empty((self.rows, s.terms), dtype=np.float32)
        for o0, o1 in steps(self.rows, s._row_step(s.terms)):
            b[o0:o1] = (s.h1.b[o0:o1, :, None] * s.h2.b[o0:o1, None, :]).reshape(o1 - o0, -1)  # type: ignore[index]
        a = np.empty((s.terms, self.cols), dtype=np.float32)
        for c0, c1 in steps(self.cols, s._col_step(s.terms + s.r1 + s.r2)):
            a[:, c0:c1] = s.kr_cols(c0, c1)
        return b, a

    def merge_stage(self, coef: float, threads: int = 0) -> tuple[str, tuple[np.ndarray, ...]]:
        """("hadamard", (B1, A1, B2, A2)) for delta_2d = (B1 @ A1) * (B2 @ A2), coef folded into B1."""
        h1, h2 = self.halves()
        assert h1.b is not None and h2.b is not None
        for i, h in enumerate((h1, h2), 1):
            if h.tucker:
                check_dense(self.label, f"the Tucker factor of half {i} of this LoHa", (h.r, h.n))
        return "hadamard", (np.ascontiguousarray(h1.b * coef, dtype=np.float32), h1.a_full32(),
                            np.ascontiguousarray(h2.b, dtype=np.float32), h2.a_full32())

    def _core_svd_first(self, s: Delta) -> bool:
        assert isinstance(s, Hadamard)
        return self._factor_shape()[0] <= limits.SMALL_FACTORS or s.terms > MAX_CORE_RANK

    def _best(self, s: Delta, k: int, split: str = "B") -> tuple[np.ndarray, np.ndarray]:
        assert isinstance(s, Hadamard)
        return hadamard_best(s, k, self.label, split)

    def prefers_structure(self) -> bool:
        """A LoHa whose exact factorization is large (and whose Gram core is small enough)."""
        k1, k2 = self._term_counts()
        return self._factor_shape()[0] > limits.SMALL_FACTORS and k1 * k2 <= MAX_CORE_RANK

    def _values(self, s: Delta) -> np.ndarray:
        assert isinstance(s, Hadamard)
        return s.svals(self.label)

    def _half_dims(self) -> HalfDims:
        s = {k: t.shape for k, t in self.tensors.items()}
        r1, r2 = s["hada_w1_b"][0], s["hada_w2_b"][0]
        return (self.rows, self.cols, r1), (self.rows, self.cols, r2)

    def halves(self) -> tuple[Half, Half]:
        (m1, n1, _), (m2, n2, _) = self._half_dims()
        if "hada_t1" in self.tensors:
            return (self._tucker(m1, n1, "hada_t1", "hada_w1_a", "hada_w1_b"),
                    self._tucker(m2, n2, "hada_t2", "hada_w2_a", "hada_w2_b"))
        return (factored_half(m1, n1, self._m("hada_w1_a"), self._m("hada_w1_b")),
                factored_half(m2, n2, self._m("hada_w2_a"), self._m("hada_w2_b")))


class LokrUpdate(LycorisUpdate):
    """LoKr: delta = scale * kron(w1, w2). Its exact factorization is kron(B1, B2), kron(A1, A2) of each
    half's factors (a full half W (m x n) taken as (I_m, W) if m <= n else (W, I_n)), or the dense
    delta beside an identity when that is smaller."""

    ALGO = "lokr"
    PARTS = LOKR_PARTS

    def _dense_plan(self) -> bool:
        k1, k2 = self._term_counts()
        return k1 * k2 > min(self.rows, self.cols)

    def structure(self) -> Kronecker:
        return Kronecker(*self.halves())

    def _exact_factors(self, s: Delta) -> tuple[np.ndarray, np.ndarray]:
        assert isinstance(s, Kronecker)
        f1, f2 = s.h1.factors32(), s.h2.factors32()
        return np.ascontiguousarray(np.kron(f1[0], f2[0])), np.ascontiguousarray(np.kron(f1[1], f2[1]))

    def merge_stage(self, coef: float, threads: int = 0) -> tuple[str, tuple[np.ndarray, ...]]:
        """("kron", (W1, W2)) for delta_2d = kron(W1, W2), coef folded into W1."""
        h1, h2 = self.halves()
        check_dense(self.label, "the first LoKr half (w1) as a dense matrix", (h1.m, h1.n))
        check_dense(self.label, "the second LoKr half (w2) as a dense matrix", (h2.m, h2.n))
        return "kron", (h1.dense32(float(coef)), h2.dense32())

    def _best(self, s: Delta, k: int, split: str = "B") -> tuple[np.ndarray, np.ndarray]:
        assert isinstance(s, Kronecker)
        return kron_best(s, k, self.label, split)

    def prefers_structure(self) -> bool:
        """Always: the SVDs of its halves are exact and cheap."""
        return True

    def _values(self, s: Delta) -> np.ndarray:
        assert isinstance(s, Kronecker)
        s1, s2 = s.h1.svals(self.label), s.h2.svals(self.label)
        check_dense(self.label, "the singular values of this LoKr", (len(s1), len(s2)))
        return np.sort(np.outer(s1, s2).ravel())[::-1]

    def _half_dims(self) -> HalfDims:
        s = {k: t.shape for k, t in self.tensors.items()}
        if "lokr_w1" in s:
            first: tuple[int, int, int | None] = (s["lokr_w1"][0], s["lokr_w1"][1], None)
        else:
            first = (s["lokr_w1_a"][0], s["lokr_w1_b"][1], s["lokr_w1_b"][0])
        c = self.rows // first[0]
        if "lokr_w2" in s:
            return first, (c, int(np.prod(s["lokr_w2"][1:], dtype=np.int64)), None)
        r2 = s["lokr_t2"][0] if "lokr_t2" in s else s["lokr_w2_b"][0]
        return first, (c, self.cols // first[1], r2)

    def halves(self) -> tuple[Half, Half]:
        t = self.tensors
        (m1, n1, _), (m2, n2, _) = self._half_dims()
        first = (Half(m1, n1, w=self._m("lokr_w1")) if "lokr_w1" in t
                 else factored_half(m1, n1, self._m("lokr_w1_a"), self._m("lokr_w1_b")))
        if "lokr_w2" in t:
            second = Half(m2, n2, w=self._m("lokr_w2").reshape(m2, n2))
        elif "lokr_t2" in t:
            second = self._tucker(m2, n2, "lokr_t2", "lokr_w2_a", "lokr_w2_b")
        else:
            second = factored_half(m2, n2, self._m("lokr_w2_a"), self._m("lokr_w2_b"))
        return first, second


_CLASSES: dict[str, type[LycorisUpdate]] = {"loha": LohaUpdate, "lokr": LokrUpdate}
