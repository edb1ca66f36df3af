"""LyCORIS LoHa and LoKr updates, read from kohya-named `.safetensors` files (formats.kohya), and the
structured arithmetic of every update that is not a plain pair of stored factors.

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

Memory and time. A few kilobytes of LoKr or LoHa factors can describe a delta of billions of
elements, and their exact low-rank factorization (rank r1*r2) can be larger still. Norms, singular
values and inner products therefore go through the structure, never through a dense delta:
||w1 (x) w2|| = ||w1|| ||w2||; the singular values of w1 (x) w2 are the products of those of the
halves; <w1 (x) w2, v1 (x) v2> = <w1, v1> <w2, v2>; a LoHa through the Gram matrices of its
Khatri-Rao factors or in tiles of rows and columns; a Tucker core (LoHa, LoKr, LoCon `lora_mid`)
through the core, never contracted whole. Working memory is a few tiles of TILE_ELEMENTS; any
dense array formed for one module (a factorization, a dense half, a Tucker factor) is checked
against MAX_DENSE_ELEMENTS before it is allocated, and a pass over one module against MAX_WORK,
both with an UnsupportedError naming the file, the module and the shapes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np

from lorafuse import _core
from lorafuse.adapter import Kind, LoraUpdate
from lorafuse.errors import FormatError, ShapeMismatchError, UnsupportedError
from lorafuse.io.tensor import Tensor

if TYPE_CHECKING:
    from lorafuse.adapter import Update

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

# ----------------------------------------------------------------------------- limits

MAX_DELTA_ELEMENTS = 1 << 32  # a larger delta (16 GiB in float32) is a corrupt or hostile file
# The largest dense array lorafuse forms in Python for one module: an exact factorization, a dense
# half of a LoKr, a contracted Tucker factor, a dense delta (1 GiB of float32). A merge into a base
# weight writes that weight, which may be larger: its kernels work in row blocks.
MAX_DENSE_ELEMENTS = 1 << 28
MAX_CORE_RANK = 2048  # k x k Gram / core matrices of the structured spectra and rank-k approximations
MAX_WORK = 1 << 42  # floating-point operations of one structured pass over one module (minutes)
TILE_ELEMENTS = 1 << 21  # working tiles of the structured passes (16 MiB of float64)
# Dense tiles multiply through rank-r inner dimensions and then stream every element: measured about
# 6x slower per flop than the Gram products of the structured paths, which the cost estimates weigh in.
DENSE_SLOWDOWN = 6.0
SMALL_FACTORS = 1 << 24  # LoHa exact factorizations up to this size convert through the core's QR + SVD
_EPS = float(np.finfo(np.float64).eps)


def _elements(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def _shape_text(shape: Sequence[int]) -> str:
    return " x ".join(str(int(s)) for s in shape)


def check_dense(where: str, what: str, shape: Sequence[int]) -> None:
    """Refuse, before allocating it, a dense array of `shape` over MAX_DENSE_ELEMENTS elements."""
    n = _elements(shape)
    if n > MAX_DENSE_ELEMENTS:
        raise UnsupportedError(
            f"{where}: {what} needs a dense {_shape_text(shape)} array ({n:,} elements), more than the "
            f"{MAX_DENSE_ELEMENTS:,} elements (1 GiB of float32) lorafuse allows for one module; the module is "
            "refused rather than exhaust memory (no real adapter module needs that much: is the file corrupt?)")


def _check_work(where: str, what: str, flops: float) -> None:
    if flops > MAX_WORK:
        raise UnsupportedError(
            f"{where}: {what} would take about {flops:.3g} floating-point operations, more than the {MAX_WORK:.3g} "
            "lorafuse allows for one module (hours of work): the module is refused (is the file corrupt?)")


def _check_core(where: str, what: str, k: int) -> None:
    if k > MAX_CORE_RANK:
        raise UnsupportedError(
            f"{where}: {what} needs an eigen- or singular value decomposition of a {k} x {k} matrix, more than "
            f"the {MAX_CORE_RANK} x {MAX_CORE_RANK} lorafuse allows for one module: the module is refused")


def _steps(total: int, step: int) -> Iterator[tuple[int, int]]:
    step = max(1, int(step))
    for start in range(0, total, step):
        yield start, min(total, start + step)


def _f64(t: Tensor, shape: tuple[int, ...]) -> np.ndarray:
    return np.ascontiguousarray(t.f32().reshape(shape), dtype=np.float64)


# ----------------------------------------------------------------------------- one matrix, as stored


class _Half:
    """A 2-D matrix H (m x n) in float64 as stored: full (`w`), or `b` (m x r) @ A with A stored (`a`,
    r x n) or the Tucker contraction of `core` (r, r2, K) with `wb` (r2, d), its columns (d, K)
    flattened (n = d * K). A Tucker A is never formed whole unless asked; every product goes through
    the core. For a full H the methods that speak of A mean W (and B is the identity)."""

    def __init__(self, m: int, n: int, *, w: np.ndarray | None = None, b: np.ndarray | None = None,
                 a: np.ndarray | None = None, core: np.ndarray | None = None, wb: np.ndarray | None = None) -> None:
        self.m, self.n = int(m), int(n)
        self.w, self.b, self.a, self.core, self.wb = w, b, a, core, wb

    @property
    def full(self) -> bool:
        return self.w is not None

    @property
    def tucker(self) -> bool:
        return self.core is not None

    @property
    def r(self) -> int:
        """Rows of A: the stored rank (m for a full H)."""
        return self.m if self.b is None else int(self.b.shape[1])

    @property
    def kernel(self) -> int:
        return int(self.core.shape[2]) if self.core is not None else 1

    @property
    def rank_bound(self) -> int:
        return min(self.m, self.n) if self.full else min(self.r, self.m, self.n)

    def _dense_a(self) -> np.ndarray | None:
        return self.w if self.full else self.a

    # ---- products with A (W when full) ----------------------------------------------------------

    def col_step(self, rows: int) -> int:
        """Columns per tile when `rows` values are held per column (whole `d` columns of a Tucker A)."""
        step = max(1, TILE_ELEMENTS // max(1, rows))
        k = self.kernel
        return max(k, step // k * k)

    def cols(self, c0: int, c1: int) -> np.ndarray:
        """A[:, c0:c1]."""
        dense = self._dense_a()
        if dense is not None:
            return dense[:, c0:c1]
        assert self.core is not None and self.wb is not None
        k = self.kernel
        i0, i1 = c0 // k, -(-c1 // k)
        blk = np.einsum("ijk,jc->ick", self.core, self.wb[:, i0:i1], optimize=True).reshape(self.r, -1)
        return blk[:, c0 - i0 * k: c1 - i0 * k]

    def a_rows(self, idx: np.ndarray) -> np.ndarray:
        """A[idx, :] (len(idx) x n)."""
        dense = self._dense_a()
        if dense is not None:
            return dense[idx]
        assert self.core is not None and self.wb is not None
        return np.einsum("ijk,jc->ick", self.core[idx], self.wb, optimize=True).reshape(len(idx), self.n)

    def a_t(self, x: np.ndarray) -> np.ndarray:
        """x @ A^T for x (p x n): (p x r)."""
        dense = self._dense_a()
        if dense is not None:
            return x @ dense.T
        assert self.core is not None and self.wb is not None
        p, (r, r2, k) = x.shape[0], self.core.shape
        z = np.einsum("pck,jc->pjk", x.reshape(p, -1, k), self.wb, optimize=True)
        return z.reshape(p, r2 * k) @ self.core.reshape(r, r2 * k).T

    def a_mul(self, y: np.ndarray) -> np.ndarray:
        """A @ y for y (n x p): (r x p)."""
        dense = self._dense_a()
        if dense is not None:
            return dense @ y
        assert self.core is not None and self.wb is not None
        p, (r, r2, k) = y.shape[1], self.core.shape
        z = np.einsum("jc,ckp->jkp", self.wb, y.reshape(-1, k, p), optimize=True)
        return self.core.reshape(r, r2 * k) @ z.reshape(r2 * k, p)

    def left(self, mat: np.ndarray) -> np.ndarray:
        """mat @ A for mat (p x r): (p x n)."""
        dense = self._dense_a()
        if dense is not None:
            return mat @ dense
        assert self.core is not None and self.wb is not None
        p, (r, r2, k) = mat.shape[0], self.core.shape
        c = (mat @ self.core.reshape(r, r2 * k)).reshape(p, r2, k)
        return np.einsum("pjk,jc->pck", c, self.wb, optimize=True).reshape(p, self.n)

    def gram_a(self) -> np.ndarray:
        """A @ A^T (r x r)."""
        dense = self._dense_a()
        if dense is not None:
            return dense @ dense.T
        return self.cross_a(self)

    def cross_a(self, other: _Half) -> np.ndarray:
        """A_self @ A_other^T (r x r_other) for halves with the same columns."""
        mine, theirs = self._dense_a(), other._dense_a()
        if theirs is not None:
            return self.a_t(theirs).T
        if mine is not None:
            return other.a_t(mine)
        assert self.core is not None and other.core is not None and self.wb is not None and other.wb is not None
        if self.kernel != other.kernel:  # column tiles covering whole columns of both cores
            unit = math.lcm(self.kernel, other.kernel)
            step = max(unit, TILE_ELEMENTS // (self.r + other.r) // unit * unit)
            g = np.zeros((self.r, other.r))
            for c0, c1 in _steps(self.n, step):
                g += self.cols(c0, c1) @ other.cols(c0, c1).T
            return g
        d = self.wb @ other.wb.T
        t = np.einsum("ijk,jl->ilk", self.core, d, optimize=True)
        return t.reshape(self.r, -1) @ other.core.reshape(other.r, -1).T

    # ---- products with H -------------------------------------------------------------------------

    def h_mul(self, y: np.ndarray) -> np.ndarray:
        """H @ y for y (n x p): (m x p)."""
        ay = self.a_mul(y)
        return ay if self.b is None else self.b @ ay

    def h_t(self, x: np.ndarray) -> np.ndarray:
        """x @ H^T for x (p x n): (p x m)."""
        xa = self.a_t(x)
        return xa if self.b is None else xa @ self.b.T

    def h_tmul(self, y: np.ndarray) -> np.ndarray:
        """H^T @ y for y (m x p): (n x p)."""
        if self.w is not None:
            return self.w.T @ y
        assert self.b is not None
        return self.left((self.b.T @ y).T).T

    def term_vectors(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Columns idx of B and rows idx of A of the exact factorization H = B A (a full H: B = I_m
        and A = W when m <= n, else B = W and A = I_n)."""
        if self.b is not None:
            return self.b[:, idx], self.a_rows(idx)
        assert self.w is not None
        if self.m <= self.n:
            return np.eye(self.m)[:, idx], self.w[idx]
        return self.w[:, idx], np.eye(self.n)[idx]

    @property
    def terms(self) -> int:
        if self.b is not None:
            return self.r
        return min(self.m, self.n)

    # ---- norms, inner products, singular values ----------------------------------------------------

    def fro2(self) -> float:
        if self.w is not None:
            return float(np.vdot(self.w, self.w))
        assert self.b is not None
        return float(np.sum((self.b.T @ self.b) * self.gram_a()))

    def inner(self, other: _Half) -> float:
        """<H_self, H_other>_F for halves of the same shape."""
        if self.w is not None and other.w is not None:
            return float(np.vdot(self.w, other.w))
        if self.w is not None:
            return other.inner(self)
        assert self.b is not None
        if other.w is not None:
            return float(np.sum(self.b * self.a_t(other.w)))
        assert other.b is not None
        return float(np.sum((self.b.T @ other.b) * self.cross_a(other)))

    def svals(self, where: str) -> np.ndarray:
        """All singular values (at most min(m, n, r)), descending."""
        if self.w is not None:
            _check_core(where, "the singular values of a full LoKr half", min(self.m, self.n))
            return np.linalg.svd(self.w, compute_uv=False)
        assert self.b is not None
        _check_core(where, "the singular values of a factored half", self.r)
        rb = np.linalg.qr(self.b, mode="r")
        if self.a is not None:
            ra = np.linalg.qr(self.a.T, mode="r")
            return np.linalg.svd(rb @ ra.T, compute_uv=False)
        lam = np.linalg.eigvalsh(rb @ self.gram_a() @ rb.T)
        return np.sqrt(np.clip(lam[::-1], 0.0, None))[: self.rank_bound]

    def svd(self, k: int, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The leading k singular triplets (U (m x k'), s (k'), Vt (k' x n)), k' <= k."""
        if self.w is not None:
            _check_core(where, "the SVD of a full LoKr half", min(self.m, self.n))
            u, s, vt = np.linalg.svd(self.w, full_matrices=False)
            return u[:, :k], s[:k], vt[:k]
        assert self.b is not None
        _check_core(where, "the SVD of a factored half", self.r)
        qb, rb = np.linalg.qr(self.b)
        if self.a is not None:
            qa, ra = np.linalg.qr(self.a.T)
            x, s, yt = np.linalg.svd(rb @ ra.T, full_matrices=False)
            return qb @ x[:, :k], s[:k], yt[:k] @ qa.T
        lam, e = np.linalg.eigh(self.gram_a())
        keep = lam > max(float(lam[-1]), 0.0) * _EPS * self.r * 16
        root = np.sqrt(lam[keep])
        x, s, yt = np.linalg.svd(rb @ (e[:, keep] * root), full_matrices=False)
        k = min(k, len(s))
        return qb @ x[:, :k], s[:k], self.left((yt[:k] / root) @ e[:, keep].T)

    # ---- dense float32 forms (each checked against the cap by the caller) -------------------------

    def a_full32(self) -> np.ndarray:
        dense = self._dense_a()
        if dense is not None:
            return np.ascontiguousarray(dense, dtype=np.float32)
        out = np.empty((self.r, self.n), dtype=np.float32)
        for c0, c1 in _steps(self.n, self.col_step(self.r)):
            out[:, c0:c1] = self.cols(c0, c1)
        return out

    def dense32(self, coef: float = 1.0) -> np.ndarray:
        """coef * H as float32, computed in float64 column tiles."""
        if self.w is not None:
            return np.ascontiguousarray(self.w * coef, dtype=np.float32)
        assert self.b is not None
        out = np.empty((self.m, self.n), dtype=np.float32)
        for c0, c1 in _steps(self.n, self.col_step(self.m + self.r)):
            out[:, c0:c1] = (self.b * coef) @ self.cols(c0, c1)
        return out

    def factors32(self) -> tuple[np.ndarray, np.ndarray]:
        """Exact float32 factors with at most min(m, n) terms: (B, A), or the dense H beside an identity."""
        if self.b is not None and self.r < min(self.m, self.n):
            return np.ascontiguousarray(self.b, dtype=np.float32), self.a_full32()
        w = self.dense32()
        if self.m <= self.n:
            return np.eye(self.m, dtype=np.float32), w
        return w, np.eye(self.n, dtype=np.float32)


def _factored_half(m: int, n: int, b: np.ndarray, a: np.ndarray) -> _Half:
    return _Half(m, n, b=b, a=a.reshape(a.shape[0], -1))


def _tucker_half(m: int, n: int, w_a: np.ndarray, core: np.ndarray, w_b: np.ndarray) -> _Half:
    """A Tucker half: B = w_a^T (w_a: r x m), core (r, r2, kh, kw), w_b (r2, d)."""
    r, r2 = core.shape[:2]
    return _Half(m, n, b=np.ascontiguousarray(w_a.T), core=core.reshape(r, r2, -1), wb=w_b)


# ----------------------------------------------------------------------------- whole updates, structured


class _Delta:
    """An update's unscaled 2-D delta D (m x n), kept in its structure.

    Every structure has an exact factorization D = sum_t b_t a_t^T of `terms` terms, produced in
    tiles (`term_tile`), and a bilinear form sum_t b_t^T D a_t over tiles of another's terms
    (`bilinear`): the inner product of any two structures goes through them, in bounded memory.
    Structures that can also produce dense blocks of D cheaply say so with `block_cost`."""

    m: int
    n: int
    terms: int
    block_cost: float = math.inf  # flops per element of a dense block

    def fro2(self, where: str) -> float:
        raise NotImplementedError

    def svals(self, where: str) -> np.ndarray:
        raise NotImplementedError

    def term_tile(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def bilinear(self, bt: np.ndarray, at: np.ndarray) -> float:
        raise NotImplementedError

    def bilinear_cost(self) -> float:
        """flops of `bilinear` per term."""
        raise NotImplementedError

    def term_width(self) -> int:
        """Values held per term of a tile (its b and a, and the bilinear intermediates it causes)."""
        return self.m + self.n

    def block(self, o0: int, o1: int, c0: int, c1: int) -> np.ndarray:
        raise NotImplementedError

    def mul(self, x: np.ndarray) -> np.ndarray:
        """D @ x for x (n x width): (m x width)."""
        raise NotImplementedError

    def tmul(self, y: np.ndarray) -> np.ndarray:
        """D^T @ y for y (m x width): (n x width)."""
        raise NotImplementedError

    def mul_cost(self, width: int) -> float:
        """flops of `mul` or `tmul` with width columns."""
        raise NotImplementedError


class _LowRank(_Delta):
    """D = B @ A: a LoRA (its stored factors, or a Tucker LoCon through its core)."""

    def __init__(self, h: _Half) -> None:
        assert h.b is not None
        self.h, self.m, self.n, self.terms = h, h.m, h.n, h.r
        self.block_cost = 2.0 * h.r

    def fro2(self, where: str) -> float:
        return self.h.fro2()

    def svals(self, where: str) -> np.ndarray:
        return self.h.svals(where)

    def term_tile(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.h.term_vectors(idx)

    def bilinear(self, bt: np.ndarray, at: np.ndarray) -> float:
        assert self.h.b is not None
        return float(np.sum((bt.T @ self.h.b) * self.h.a_t(at)))

    def bilinear_cost(self) -> float:
        h = self.h
        return 2.0 * h.r * (h.m + h.n) + (2.0 * h.n * int(h.wb.shape[0]) if h.wb is not None else 0.0)

    def block(self, o0: int, o1: int, c0: int, c1: int) -> np.ndarray:
        assert self.h.b is not None
        return self.h.b[o0:o1] @ self.h.cols(c0, c1)

    def mul(self, x: np.ndarray) -> np.ndarray:
        return self.h.h_mul(x)

    def tmul(self, y: np.ndarray) -> np.ndarray:
        return self.h.h_tmul(y)

    def mul_cost(self, width: int) -> float:
        return self.bilinear_cost() * width


class _Hadamard(_Delta):
    """D = (P1 Q1) * (P2 Q2), elementwise (LoHa): its exact factorization is the Khatri-Rao one,
    B = [P1[:, i] * P2[:, j]], A = [Q1[i] * Q2[j]], r1 * r2 terms."""

    def __init__(self, h1: _Half, h2: _Half) -> None:
        assert h1.b is not None and h2.b is not None
        self.h1, self.h2, self.m, self.n = h1, h2, h1.m, h1.n
        self.r1, self.r2 = h1.r, h2.r
        self.terms = self.r1 * self.r2
        self.block_cost = 2.0 * (self.r1 + self.r2) + 1

    def _col_step(self, rows: int) -> int:
        return min(self.h1.col_step(rows), self.h2.col_step(rows))

    def _row_step(self, width: int) -> int:
        return max(1, TILE_ELEMENTS // max(1, width))

    def term_tile(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        i, j = np.divmod(idx, self.r2)
        b1, a1 = self.h1.term_vectors(i)
        b2, a2 = self.h2.term_vectors(j)
        return b1 * b2, a1 * a2

    def bilinear(self, bt: np.ndarray, at: np.ndarray) -> float:
        """sum_t bt_t^T D at_t = sum over (t, i, j) of (bt_t . P1_i * P2_j) (at_t . Q1_i * Q2_j)."""
        t = bt.shape[1]
        p1, p2 = self.h1.b, self.h2.b
        assert p1 is not None and p2 is not None
        left = np.zeros((t * self.r1, self.r2))
        for o0, o1 in _steps(self.m, self._row_step(t * self.r1)):
            x = (bt[o0:o1, :, None] * p1[o0:o1, None, :]).reshape(o1 - o0, -1)
            left += x.T @ p2[o0:o1]
        right = np.zeros((t * self.r1, self.r2))
        for c0, c1 in _steps(self.n, self._col_step(t * self.r1 + self.r1 + self.r2)):
            q1, q2 = self.h1.cols(c0, c1), self.h2.cols(c0, c1)
            y = (at[:, None, c0:c1] * q1[None, :, :]).reshape(-1, c1 - c0)
            right += y @ q2.T
        return float(np.sum(left * right))

    def bilinear_cost(self) -> float:
        return 2.0 * (self.m + self.n) * (self.r1 * self.r2 + self.r1)


    def block(self, o0: int, o1: int, c0: int, c1: int) -> np.ndarray:
        assert self.h1.b is not None and self.h2.b is not None
        return (self.h1.b[o0:o1] @ self.h1.cols(c0, c1)) * (self.h2.b[o0:o1] @ self.h2.cols(c0, c1))

    # ---- Gram matrices of the Khatri-Rao factors ---------------------------------------------------

    def kr_rows(self, o0: int, o1: int) -> np.ndarray:
        """Rows o0:o1 of the Khatri-Rao B ((o1 - o0) x (r1*r2))."""
        p1, p2 = self.h1.b, self.h2.b
        assert p1 is not None and p2 is not None
        return (p1[o0:o1, :, None] * p2[o0:o1, None, :]).reshape(o1 - o0, -1)

    def kr_cols(self, c0: int, c1: int) -> np.ndarray:
        """Columns c0:c1 of the Khatri-Rao A ((r1*r2) x (c1 - c0))."""
        q1, q2 = self.h1.cols(c0, c1), self.h2.cols(c0, c1)
        return (q1[:, None, :] * q2[None, :, :]).reshape(self.terms, c1 - c0)

    def cross_p(self, other: _Hadamard) -> np.ndarray:
        """B^T B' of the Khatri-Rao Bs (r1*r2 x r1'*r2')."""
        g = np.zeros((self.terms, other.terms))
        for o0, o1 in _steps(self.m, self._row_step(self.terms + other.terms)):
            g += self.kr_rows(o0, o1).T @ (self.kr_rows(o0, o1) if other is self else other.kr_rows(o0, o1))
        return g

    def cross_q(self, other: _Hadamard) -> np.ndarray:
        """A A'^T of the Khatri-Rao As (r1*r2 x r1'*r2')."""
        g = np.zeros((self.terms, other.terms))
        rows = self.terms + other.terms + self.r1 + self.r2 + other.r1 + other.r2
        for c0, c1 in _steps(self.n, min(self._col_step(rows), other._col_step(rows))):
            kq = self.kr_cols(c0, c1)
            g += kq @ (kq if other is self else other.kr_cols(c0, c1)).T
        return g

    def gram_p(self) -> np.ndarray:
        return self.cross_p(self)

    def gram_q(self) -> np.ndarray:
        return self.cross_q(self)

    def _kr_mul_cheaper(self, width: int) -> bool:
        kr = 2.0 * self.terms * (self.m + self.n) * width
        return kr <= self.m * self.n * (self.block_cost * DENSE_SLOWDOWN + 2 * width)

    def mul_cost(self, width: int) -> float:
        kr = 2.0 * self.terms * (self.m + self.n) * width
        return min(kr, self.m * self.n * (self.block_cost * DENSE_SLOWDOWN + 2 * width))

    def mul(self, x: np.ndarray) -> np.ndarray:
        width = x.shape[1]
        if self._kr_mul_cheaper(width):  # through the Khatri-Rao factors: KR_B (KR_A x)
            z = np.zeros((self.terms, width))
            for c0, c1 in _steps(self.n, self._col_step(self.terms + self.r1 + self.r2)):
                z += self.kr_cols(c0, c1) @ x[c0:c1]
            out = np.empty((self.m, width))
            for o0, o1 in _steps(self.m, self._row_step(self.terms)):
                out[o0:o1] = self.kr_rows(o0, o1) @ z
            return out
        out = np.zeros((self.m, width))
        for c0, c1, o0, o1, d in _dense_blocks(self):
            out[o0:o1] += d @ x[c0:c1]
        return out

    def tmul(self, y: np.ndarray) -> np.ndarray:
        width = y.shape[1]
        if self._kr_mul_cheaper(width):  # KR_A^T (KR_B^T y)
            z = np.zeros((self.terms, width))
            for o0, o1 in _steps(self.m, self._row_step(self.terms)):
                z += self.kr_rows(o0, o1).T @ y[o0:o1]
            out = np.empty((self.n, width))
            for c0, c1 in _steps(self.n, self._col_step(self.terms + self.r1 + self.r2)):
                out[c0:c1] = self.kr_cols(c0, c1).T @ z
            return out
        out = np.zeros((self.n, width))
        for c0, c1, o0, o1, d in _dense_blocks(self):
            out[c0:c1] += d.T @ y[o0:o1]
        return out

    def _gram_cost(self) -> float:
        return 2.0 * self.terms ** 2 * (self.m + self.n)

    def _dense_cost(self) -> float:
        return self.m * self.n * self.block_cost * DENSE_SLOWDOWN

    def fro2(self, where: str) -> float:
        gram, dense = self._gram_cost(), self._dense_cost()
        if self.terms <= MAX_CORE_RANK and gram <= dense:
            return float(np.sum(self.gram_p() * self.gram_q()))
        _check_work(where, "the norm of this LoHa", dense)
        return sum(float(np.vdot(x, x)) for x in self.blocks())

    def blocks(self) -> Iterator[np.ndarray]:
        """Dense blocks of D covering it once (column tiles outside, row tiles inside)."""
        for c0, c1 in _steps(self.n, self._col_step(min(self.m, 4096) + self.r1 + self.r2)):
            for o0, o1 in _steps(self.m, self._row_step(c1 - c0)):
                yield self.block(o0, o1, c0, c1)

    def svals(self, where: str) -> np.ndarray:
        k_dense = min(self.m, self.n)
        gram = self._gram_cost() + 10.0 * self.terms ** 3
        dense = self._dense_cost() + 2.0 * self.m * self.n * k_dense + 10.0 * k_dense ** 3
        if self.terms <= MAX_CORE_RANK and (gram <= dense or k_dense > MAX_CORE_RANK):
            _check_work(where, "the singular values of this LoHa", gram)
            lam, v = np.linalg.eigh(self.gram_p())
            keep = lam > max(float(lam[-1]), 0.0) * _EPS * self.terms * 16
            root = v[:, keep] * np.sqrt(lam[keep])
            s2 = np.linalg.eigvalsh(root.T @ self.gram_q() @ root)
        else:
            _check_core(where, "the singular values of this LoHa", k_dense)
            _check_work(where, "the singular values of this LoHa", dense)
            g = np.zeros((k_dense, k_dense))
            if self.n <= self.m:  # D^T D over row blocks of whole rows
                for o0, o1 in _steps(self.m, self._row_step(self.n)):
                    x = self.block(o0, o1, 0, self.n)
                    g += x.T @ x
            else:  # D D^T over column blocks of whole columns
                for c0, c1 in _steps(self.n, self._col_step(self.m + self.r1 + self.r2)):
                    x = self.block(0, self.m, c0, c1)
                    g += x @ x.T
            s2 = np.linalg.eigvalsh(g)
        return np.sqrt(np.clip(s2[::-1], 0.0, None))[: min(self.terms, k_dense)]


class _Kronecker(_Delta):
    """D = kron(H1, H2) (LoKr): H1 (m1 x n1), H2 (m2 x n2)."""

    def __init__(self, h1: _Half, h2: _Half) -> None:
        self.h1, self.h2 = h1, h2
        self.m, self.n = h1.m * h2.m, h1.n * h2.n
        self.terms = h1.terms * h2.terms

    def fro2(self, where: str) -> float:
        return self.h1.fro2() * self.h2.fro2()

    def svals(self, where: str) -> np.ndarray:
        return top_products(self.h1.svals(where), self.h2.svals(where), MAX_CORE_RANK)

    def term_tile(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        i, j = np.divmod(idx, self.h2.terms)
        b1, a1 = self.h1.term_vectors(i)
        b2, a2 = self.h2.term_vectors(j)
        t = len(idx)
        return ((b1[:, None, :] * b2[None, :, :]).reshape(self.m, t),
                (a1[:, :, None] * a2[:, None, :]).reshape(t, self.n))

    def bilinear(self, bt: np.ndarray, at: np.ndarray) -> float:
        """sum_t bt_t^T kron(H1, H2) at_t = sum_t <reshape(bt_t), H1 reshape(at_t) H2^T>."""
        (m1, n1), (m2, n2), t = (self.h1.m, self.h1.n), (self.h2.m, self.h2.n), bt.shape[1]
        x = self.h2.h_t(at.reshape(t * n1, n2))  # (t*n1, m2): X_t @ H2^T
        z = x.reshape(t, n1, m2).transpose(1, 0, 2).reshape(n1, t * m2)
        y = self.h1.h_mul(z).reshape(m1, t, m2)  # H1 @ X_t @ H2^T
        return float(np.einsum("itp,tip->", y, bt.T.reshape(t, m1, m2), optimize=True))

    def bilinear_cost(self) -> float:
        (m1, n1), (m2, n2) = (self.h1.m, self.h1.n), (self.h2.m, self.h2.n)
        return 2.0 * (n1 * n2 * min(m2, self.h2.r + m2) + m1 * n1 * m2) + self.m + self.n

    def term_width(self) -> int:
        return self.m + self.n + self.h1.n * self.h2.m * 2

    def mul(self, x: np.ndarray) -> np.ndarray:
        """kron(H1, H2) x: each column reshaped (n1 x n2) to H1 X H2^T."""
        (m1, n1), (m2, n2), width = (self.h1.m, self.h1.n), (self.h2.m, self.h2.n), x.shape[1]
        t = self.h2.h_mul(x.reshape(n1, n2, width).transpose(1, 0, 2).reshape(n2, n1 * width))  # (m2, n1*width)
        t = t.reshape(m2, n1, width).transpose(1, 0, 2).reshape(n1, m2 * width)
        return self.h1.h_mul(t).reshape(m1 * m2, width)

    def tmul(self, y: np.ndarray) -> np.ndarray:
        (m1, n1), (m2, n2), width = (self.h1.m, self.h1.n), (self.h2.m, self.h2.n), y.shape[1]
        t = self.h2.h_tmul(y.reshape(m1, m2, width).transpose(1, 0, 2).reshape(m2, m1 * width))  # (n2, m1*width)
        t = t.reshape(n2, m1, width).transpose(1, 0, 2).reshape(m1, n2 * width)
        return self.h1.h_tmul(t).reshape(n1 * n2, width)

    def mul_cost(self, width: int) -> float:
        (m1, n1), (m2, n2) = (self.h1.m, self.h1.n), (self.h2.m, self.h2.n)
        return 2.0 * width * (max(m1, n1) * max(m2, n2) * (min(m2, n2) + min(m1, n1)))


def top_products(s1: np.ndarray, s2: np.ndarray, limit: int) -> np.ndarray:
    """The `limit` largest products s1[i] * s2[j] of two descending non-negative vectors, descending.
    The k-th largest has (i+1)(j+1) <= k, so only those pairs are looked at."""
    s1, s2 = s1[:limit], s2[:limit]
    if not len(s1) or not len(s2):
        return np.zeros(0)
    counts = np.minimum(len(s2), limit // np.arange(1, len(s1) + 1))
    counts = counts[counts > 0]
    i = np.repeat(np.arange(len(counts)), counts)
    starts = np.cumsum(counts) - counts
    j = np.arange(int(counts.sum())) - np.repeat(starts, counts)
    p = s1[i] * s2[j]
    return np.sort(p)[::-1][:limit]


def _top_pairs(s1: np.ndarray, s2: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (i, j) of the k largest products s1[i] * s2[j], in descending order of the product."""
    counts = np.minimum(len(s2), k // np.arange(1, len(s1) + 1))
    counts = counts[counts > 0]
    i = np.repeat(np.arange(len(counts)), counts)
    starts = np.cumsum(counts) - counts
    j = np.arange(int(counts.sum())) - np.repeat(starts, counts)
    order = np.argsort(-(s1[i] * s2[j]), kind="stable")[:k]
    return i[order], j[order]


def _inner(x: _Delta, y: _Delta, where: str) -> float:
    """<D_x, D_y>_F of two structures of the same shape, the cheapest bounded way."""
    if isinstance(x, _Kronecker) and isinstance(y, _Kronecker) and (x.h1.m, x.h1.n) == (y.h1.m, y.h1.n):
        return x.h1.inner(y.h1) * x.h2.inner(y.h2)
    if isinstance(x, _LowRank) and isinstance(y, _LowRank):
        return x.h.inner(y.h)
    options: list[tuple[float, str]] = [
        (x.terms * (y.bilinear_cost() + x.m + x.n), "x"),
        (y.terms * (x.bilinear_cost() + y.m + y.n), "y"),
        (x.m * x.n * (x.block_cost + y.block_cost + 2) * DENSE_SLOWDOWN, "blocks"),
    ]
    if isinstance(x, _Hadamard) and isinstance(y, _Hadamard) and x.terms * y.terms <= MAX_CORE_RANK ** 2:
        options.append((2.0 * x.terms * y.terms * (x.m + x.n), "gram"))
    cost, how = min(options)
    _check_work(where, "the inner product of these two deltas", cost)
    if how == "gram":
        assert isinstance(x, _Hadamard) and isinstance(y, _Hadamard)
        return float(np.sum(x.cross_p(y) * x.cross_q(y)))
    if how == "blocks":
        assert isinstance(x, (_LowRank, _Hadamard)) and isinstance(y, (_LowRank, _Hadamard))
        total = 0.0
        rows = min(x.m, 4096)
        for c0, c1 in _steps(x.n, max(1, TILE_ELEMENTS // rows)):
            for o0, o1 in _steps(x.m, max(1, TILE_ELEMENTS // (c1 - c0))):
                total += float(np.vdot(x.block(o0, o1, c0, c1), y.block(o0, o1, c0, c1)))
        return total
    if how == "y":
        x, y = y, x
    step = max(1, TILE_ELEMENTS // max(1, x.term_width(), y.term_width()))
    return sum(y.bilinear(*x.term_tile(np.arange(t0, t1))) for t0, t1 in _steps(x.terms, step))


# ----------------------------------------------------------------------------- the Tucker LoCon factor


class TuckerFactor(Tensor):
    """The lora_down of a Tucker LoCon as a tensor (r, in, kh, kw): `lora_mid` (r, r, kh, kw) contracted
    with a 1x1 `lora_down` (r, in, 1, 1). Both stay as stored; the contraction is computed (float64,
    in tiles, stored as float32) each time `raw` is read, after a check against MAX_DENSE_ELEMENTS,
    and never kept: norms, spectra and inner products go through the core instead."""

    def __init__(self, mid: Tensor, down: Tensor, where: str) -> None:
        object.__setattr__(self, "dtype", "F32")
        object.__setattr__(self, "mid", mid)
        object.__setattr__(self, "down", down)
        object.__setattr__(self, "where", where)

    @property  # type: ignore[override]
    def raw(self) -> np.ndarray:  # a dataclass field of Tensor, computed here
        r, d = self.down.shape[0], self.down.shape[1]
        shape = (r, d, *self.mid.shape[2:])
        check_dense(self.where, "the Tucker LoCon factor (lora_mid contracted with lora_down)", shape)
        return self.half(1).a_full32().reshape(shape)

    @raw.setter
    def raw(self, value: np.ndarray) -> None:  # the dataclass __init__ of Tensor is never called
        raise AttributeError("a TuckerFactor is computed from its core")

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.down.shape[0], self.down.shape[1], *self.mid.shape[2:])

    def half(self, rows: int, up: np.ndarray | None = None) -> _Half:
        """The LoCon as a _Half: B = up (rows x r) (the identity when None), A through the core."""
        r, d = self.down.shape[0], self.down.shape[1]
        core = _f64(self.mid, (r, r, -1))
        wb = _f64(self.down, (r, d))
        if up is None:
            return _Half(r, d * core.shape[2], b=np.eye(r), core=core, wb=wb)
        return _Half(rows, d * core.shape[2], b=up, core=core, wb=wb)

    def __repr__(self) -> str:
        return f"TuckerFactor(mid={self.mid.shape}, down={self.down.shape}, {self.where!r})"

    __hash__ = object.__hash__

    def __eq__(self, other: object) -> bool:
        return self is other


def is_stored_lora(u: Update) -> bool:
    """A LoRA whose factors are stored as they are used (the core's batched kernels take them)."""
    return isinstance(u, LoraUpdate) and not isinstance(u.A, TuckerFactor)


def _where(u: Update) -> str:
    w = getattr(u, "where", "") or (u.A.where if isinstance(u, LoraUpdate) and isinstance(u.A, TuckerFactor) else "")
    return w or f"module {u.name!r}"


def structure(u: Update) -> _Delta:
    """The unscaled 2-D delta of any update, in its structure (float64 copies of the stored tensors,
    nothing larger)."""
    if isinstance(u, LycorisUpdate):
        h1, h2 = u.halves()
        return _Hadamard(h1, h2) if u.algo == "loha" else _Kronecker(h1, h2)
    if isinstance(u.A, TuckerFactor):
        up = _f64(u.B, (u.B.shape[0], u.rank))
        return _LowRank(u.A.half(u.B.shape[0], up))
    b, a = u.factors()
    return _LowRank(_Half(b.shape[0], a.shape[1], b=b.astype(np.float64), a=a.astype(np.float64)))


def frobenius_sq(u: Update) -> float:
    """||delta||_F^2 (scale included) from the structure."""
    return u.scale * u.scale * structure(u).fro2(_where(u))


def inner(u: Update, v: Update) -> float:
    """<delta_u, delta_v>_F (scales included) of two updates of the same 2-D shape."""
    x, y = structure(u), structure(v)
    if (x.m, x.n) != (y.m, y.n):
        raise ShapeMismatchError(f"module {u.name!r}: deltas of 2-D shapes ({x.m}, {x.n}) and ({y.m}, {y.n}) have "
                                 "no inner product")
    return u.scale * v.scale * _inner(x, y, _where(u))


def spectrum(u: Update) -> np.ndarray:
    """The singular values of the delta (scale included), descending; at most MAX_CORE_RANK of them."""
    return abs(u.scale) * structure(u).svals(_where(u))[:MAX_CORE_RANK]


def structured_svd(terms: Sequence[tuple[float, Update]], k: int, split: str = "B", seed: int = 0,
                   oversample: int = 10, power_iters: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A near-optimal rank-k approximation (B (out x k), A (k x in*kh*kw), float32) of sum_i c_i * delta_i
    for (c_i, update_i) (c_i multiplies the unscaled delta: weight times scale), by a randomized range
    finder with power iterations as the core's (float64 here), every product through the structures:
    memory of the order of the result, never an exact factorization. `split` puts the singular values
    on B ('B') or their square roots on both ('sqrt')."""
    parts = [(float(c), structure(u)) for c, u in terms]
    where = _where(terms[0][1])
    m, n = parts[0][1].m, parts[0][1].n
    if any((s.m, s.n) != (m, n) for _, s in parts):
        raise ShapeMismatchError(f"{where}: the deltas to combine have different 2-D shapes")
    width = min(k + oversample, m, n)
    check_dense(where, "the randomized SVD of these deltas", (m + n, width))
    _check_work(where, "the randomized SVD of these deltas",
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
    return _pad_terms(b.astype(np.float32), a.astype(np.float32), min(k, m, n))


# ----------------------------------------------------------------------------- batches for the core

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
        k, elements = u.rank, u._factor_shape()[0]
    else:
        k = u.rank
        elements = k * (u.delta_shape[0] + _elements(u.delta_shape[1:]))
    return 12.0 * k * elements + 10.0 * k ** 3, elements


def lora_cost(u: LoraUpdate, passes: float = 2.0) -> tuple[float, int]:
    """(flops, elements) of a core pass over a stored LoRA's factors (about passes * r^2 * (out + in))."""
    rows, cols = u.delta_shape[0], _elements(u.delta_shape[1:])
    return passes * u.rank * u.rank * (rows + cols) + u.rank ** 3, u.rank * (rows + cols)


def frobenius_norms(updates: Mapping[str, Update], threads: int = 0) -> dict[str, float]:
    """||delta||_F of every update: stored LoRAs through the core in batches, the others through
    their structure, one module at a time."""
    sq: dict[str, float] = {}
    stored = [(n, u) for n, u in updates.items() if is_stored_lora(u)]
    for n, u in updates.items():
        if not is_stored_lora(u):
            sq[n] = frobenius_sq(u)
    for i0, i1 in batches([lora_cost(u) for _, u in stored]):  # type: ignore[arg-type]
        chunk = stored[i0:i1]
        values = _core.factored_frobenius_sq([u.factors(threads) for _, u in chunk], threads)
        for (n, u), s in zip(chunk, values):
            sq[n] = u.scale * u.scale * float(s)
    return {n: float(np.sqrt(max(sq[n], 0.0))) for n in updates}


# ----------------------------------------------------------------------------- LyCORIS updates

@dataclass
class LycorisUpdate:
    """One module's LoHa or LoKr update; used like `LoraUpdate` (scale, delta_shape, rank, factors,
    delta) where that makes sense.

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
    def label(self) -> str:
        return self.where or f"module {self.name!r}"

    def _term_counts(self) -> tuple[int, int]:
        k1, k2 = (min(rows, cols) if r is None else min(r, rows, cols) for rows, cols, r in self._half_dims())
        return k1, k2

    def _dense_plan(self) -> bool:
        """Whether the exact factorization is the dense delta beside an identity (fewer elements than
        the Khatri-Rao / Kronecker one)."""
        k1, k2 = self._term_counts()
        if self.algo == "loha":
            return k1 * k2 >= min(self.rows, self.cols)
        return k1 * k2 > min(self.rows, self.cols)

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

    def stored_factors(self, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """An exact factorization (B, A) of the 2-D delta without the scale, float32: B (out x k),
        A (k x in*kh*kw). LoHa: Khatri-Rao products of the halves (k = r1*r2), or the dense delta
        beside an identity when r1*r2 >= min(out, cols). LoKr: kron(B1, B2), kron(A1, A2) of each
        half's factors, a full half W (m x n) taken as (I_m, W) if m <= n else (W, I_n); the dense
        delta beside an identity when that is smaller. Refused (UnsupportedError) past
        MAX_DENSE_ELEMENTS, before anything is allocated."""
        dense = self._dense_plan()
        if dense:
            check_dense(self.label, f"the exact factorization of this {self.algo} (its dense delta)",
                        (self.rows, self.cols))
        else:
            check_dense(self.label, f"the exact factorization of this {self.algo} (rank {self.rank})",
                        (self.rank, self.rows + self.cols))
        s = structure(self)
        if dense:
            w = np.empty((self.rows, self.cols), dtype=np.float32)
            for c0, c1, o0, o1, x in _dense_blocks(s):
                w[o0:o1, c0:c1] = x
            if self.rows <= self.cols:
                return np.eye(self.rows, dtype=np.float32), w
            return w, np.eye(self.cols, dtype=np.float32)
        if isinstance(s, _Kronecker):
            f1, f2 = s.h1.factors32(), s.h2.factors32()
            return np.ascontiguousarray(np.kron(f1[0], f2[0])), np.ascontiguousarray(np.kron(f1[1], f2[1]))
        assert isinstance(s, _Hadamard)
        b = np.empty((self.rows, s.terms), dtype=np.float32)
        for o0, o1 in _steps(self.rows, s._row_step(s.terms)):
            b[o0:o1] = (s.h1.b[o0:o1, :, None] * s.h2.b[o0:o1, None, :]).reshape(o1 - o0, -1)  # type: ignore[index]
        a = np.empty((s.terms, self.cols), dtype=np.float32)
        for c0, c1 in _steps(self.cols, s._col_step(s.terms + s.r1 + s.r2)):
            a[:, c0:c1] = s.kr_cols(c0, c1)
        return b, a

    def factors(self, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The same as `stored_factors` (a LyCORIS update is never transposed)."""
        return self.stored_factors(threads)

    def merge_stage(self, coef: float, threads: int = 0) -> tuple[str, tuple[np.ndarray, ...]]:
        """Arrays for the core's merge kernel, float32, C-contiguous, 2-D, with `coef` folded into
        the first: ("hadamard", (B1, A1, B2, A2)) for delta_2d = (B1 @ A1) * (B2 @ A2), or
        ("kron", (W1, W2)) for delta_2d = kron(W1, W2). `coef` is the whole coefficient of the
        unscaled delta: the user's weight times `self.scale` (as `Contribution.coef`)."""
        h1, h2 = self.halves()
        if self.algo == "loha":
            assert h1.b is not None and h2.b is not None
            for i, h in enumerate((h1, h2), 1):
                if h.tucker:
                    check_dense(self.label, f"the Tucker factor of half {i} of this LoHa", (h.r, h.n))
            return "hadamard", (np.ascontiguousarray(h1.b * coef, dtype=np.float32), h1.a_full32(),
                                np.ascontiguousarray(h2.b, dtype=np.float32), h2.a_full32())
        check_dense(self.label, "the first LoKr half (w1) as a dense matrix", (h1.m, h1.n))
        check_dense(self.label, "the second LoKr half (w2) as a dense matrix", (h2.m, h2.n))
        return "kron", (h1.dense32(float(coef)), h2.dense32())

    def delta(self) -> np.ndarray:
        """The dense delta in float64, scale included, in the base weight's shape (for small modules,
        reports and tests; refused past MAX_DENSE_ELEMENTS)."""
        check_dense(self.label, f"the dense delta of this {self.algo}", (self.rows, self.cols))
        s = structure(self)
        if isinstance(s, _Kronecker):
            check_dense(self.label, "the first LoKr half", (s.h1.m, s.h1.n))
            check_dense(self.label, "the second LoKr half", (s.h2.m, s.h2.n))
            d = np.kron(_dense64(s.h1), _dense64(s.h2))
        else:
            d = np.empty((self.rows, self.cols))
            for c0, c1, o0, o1, x in _dense_blocks(s):
                d[o0:o1, c0:c1] = x
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
        """The best rank-`rank` approximation of the delta (Eckart-Young) as a LoraUpdate with scale 1,
        the singular values on B. A DoRA magnitude is kept. LoKr: from the SVDs of its halves (the
        singular triplets of a Kronecker product are the products of theirs); LoHa: through the core's
        QR + SVD of the exact factorization, or, when that is large, through the Gram matrices of its
        Khatri-Rao factors, building the result in tiles."""
        s = structure(self)
        k = min(rank, self.rank)
        if isinstance(s, _Hadamard) and (self._factor_shape()[0] <= SMALL_FACTORS or s.terms > MAX_CORE_RANK):
            fb, fa = self.stored_factors(threads)
            fb = np.ascontiguousarray(fb * np.float32(self.scale))
            ((b, a, _),) = _core.factored_svd([(self.name, fb, fa)], [k], "B", threads)
        else:
            b, a = _kron_best(s, k, self.label) if isinstance(s, _Kronecker) else _hadamard_best(s, k, self.label)  # type: ignore[arg-type]
            b = b.astype(np.float64) * self.scale
        b, a = _pad_terms(np.asarray(b, dtype=np.float32), np.asarray(a, dtype=np.float32), k)
        lora = self.with_factors(b, a, 1.0)
        return dataclasses.replace(lora, magnitude=self.magnitude, magnitude_on_columns=self.magnitude_on_columns)

    def prefers_structure(self) -> bool:
        """Whether a rank reduction should go through the structure (`best_factors`) rather than the core's
        SVD of the exact factorization: a LoKr always (its halves' SVDs are exact and cheap), a LoHa whose
        exact factorization is large."""
        if self.algo == "lokr":
            return True
        k1, k2 = self._term_counts()
        return self._factor_shape()[0] > SMALL_FACTORS and k1 * k2 <= MAX_CORE_RANK

    def best_factors(self, choose: Callable[[np.ndarray], int], split: str = "B",
                     threads: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(B, A, S) of the unscaled delta: its singular values S, descending (a LoKr's: all products of
        its halves', up to MAX_DENSE_ELEMENTS of them; a LoHa's as `spectrum`), and its best rank-k factors
        for k = choose(S) (float32; the singular values on B, or their square roots on both with
        split='sqrt'), all through the structure."""
        s = structure(self)
        if isinstance(s, _Kronecker):
            s1, s2 = s.h1.svals(self.label), s.h2.svals(self.label)
            check_dense(self.label, "the singular values of this LoKr", (len(s1), len(s2)))
            values = np.sort(np.outer(s1, s2).ravel())[::-1]
        else:
            assert isinstance(s, _Hadamard)
            values = s.svals(self.label)
        k = max(1, min(int(choose(values)), self.rank))
        b, a = _kron_best(s, k, self.label) if isinstance(s, _Kronecker) else _hadamard_best(s, k, self.label)  # type: ignore[arg-type]
        b, a = _pad_terms(b, a, k)
        if split == "sqrt":
            root = np.sqrt(np.linalg.norm(b.astype(np.float64), axis=0))  # B = U S: its column norms are S
            with np.errstate(divide="ignore", invalid="ignore"):
                b = np.where(root > 0, b / root, 0.0).astype(np.float32)
            a = (a * root[:, None]).astype(np.float32)
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

    def halves(self) -> tuple[_Half, _Half]:
        """Both halves as _Half (float64 copies of the stored tensors; Tucker cores not contracted)."""
        t = self.tensors
        (m1, n1, _), (m2, n2, _) = self._half_dims()

        def m(key: str) -> np.ndarray:
            return _f64(t[key], t[key].shape)

        def tucker(rows: int, cols: int, core: str, w_a: str, w_b: str) -> _Half:
            return _tucker_half(rows, cols, m(w_a), m(core), m(w_b))

        if self.algo == "loha":
            if "hada_t1" in t:
                return (tucker(m1, n1, "hada_t1", "hada_w1_a", "hada_w1_b"),
                        tucker(m2, n2, "hada_t2", "hada_w2_a", "hada_w2_b"))
            return (_factored_half(m1, n1, m("hada_w1_a"), m("hada_w1_b")),
                    _factored_half(m2, n2, m("hada_w2_a"), m("hada_w2_b")))
        first = (_Half(m1, n1, w=m("lokr_w1")) if "lokr_w1" in t
                 else _factored_half(m1, n1, m("lokr_w1_a"), m("lokr_w1_b")))
        if "lokr_w2" in t:
            second = _Half(m2, n2, w=m("lokr_w2").reshape(m2, n2))
        elif "lokr_t2" in t:
            second = tucker(m2, n2, "lokr_t2", "lokr_w2_a", "lokr_w2_b")
        else:
            second = _factored_half(m2, n2, m("lokr_w2_a"), m("lokr_w2_b"))
        return first, second


def _dense64(h: _Half) -> np.ndarray:
    if h.w is not None:
        return h.w
    assert h.b is not None
    return h.b @ h.left(np.eye(h.r)) if h.tucker else h.b @ h.a  # type: ignore[operator]


def _dense_blocks(s: _Delta) -> Iterator[tuple[int, int, int, int, np.ndarray]]:
    """(c0, c1, o0, o1, D[o0:o1, c0:c1]) covering a LoHa or LoKr delta once, in float64 tiles."""
    if isinstance(s, _Kronecker):
        w1, w2 = _dense64(s.h1), _dense64(s.h2)
        m2 = w2.shape[0]
        for o0, o1 in _steps(s.m, max(1, TILE_ELEMENTS // s.n)):
            i, p = np.divmod(np.arange(o0, o1), m2)
            yield 0, s.n, o0, o1, (w1[i][:, :, None] * w2[p][:, None, :]).reshape(o1 - o0, s.n)
        return
    assert isinstance(s, _Hadamard)
    for c0, c1 in _steps(s.n, s._col_step(min(s.m, 4096) + s.r1 + s.r2)):
        for o0, o1 in _steps(s.m, s._row_step(c1 - c0)):
            yield c0, c1, o0, o1, s.block(o0, o1, c0, c1)


def _pad_terms(b: np.ndarray, a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero terms appended up to k (a delta of numerical rank below k keeps the rank asked)."""
    if b.shape[1] >= k:
        return np.ascontiguousarray(b[:, :k]), np.ascontiguousarray(a[:k])
    extra = k - b.shape[1]
    return (np.ascontiguousarray(np.hstack([b, np.zeros((b.shape[0], extra), np.float32)])),
            np.ascontiguousarray(np.vstack([a, np.zeros((extra, a.shape[1]), np.float32)])))


def _kron_best(s: _Kronecker, k: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The best rank-k approximation of kron(H1, H2) (unscaled): the k largest products of the halves'
    singular triplets, B = sigma1 sigma2 kron(u1, u2), A = kron(v1, v2)^T."""
    check_dense(where, "the rank-k LoRA of this LoKr", (k, s.m + s.n))
    u1, s1, v1 = s.h1.svd(k, where)
    u2, s2, v2 = s.h2.svd(k, where)
    i, j = _top_pairs(s1, s2, k)
    t = len(i)
    b = (u1[:, i][:, None, :] * u2[:, j][None, :, :]).reshape(s.m, t) * (s1[i] * s2[j])
    a = (v1[i][:, :, None] * v2[j][:, None, :]).reshape(t, s.n)
    return b.astype(np.float32), a.astype(np.float32)


def _hadamard_best(s: _Hadamard, k: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The best rank-k approximation of a LoHa (unscaled) through the Gram matrices of its Khatri-Rao
    factors P (m x K), Q (K x n): P = U_P S_P V_P^T and Q^T = U_Q S_Q V_Q^T from the eigenvectors of
    P^T P and Q Q^T, the SVD X S Y^T of the K x K core S_P V_P^T V_Q S_Q, then B = P V_P S_P^-1 X_k S_k
    and A = Y_k^T S_Q^-1 V_Q^T Q, built tile by tile (never P or Q whole)."""
    _check_core(where, "the rank-k LoRA of this LoHa", s.terms)
    _check_work(where, "the rank-k LoRA of this LoHa", s._gram_cost() + 10.0 * s.terms ** 3)
    check_dense(where, "the rank-k LoRA of this LoHa", (k, s.m + s.n))

    def roots(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lam, v = np.linalg.eigh(g)
        keep = lam > max(float(lam[-1]), 0.0) * _EPS * s.terms * 16
        return v[:, keep], np.sqrt(lam[keep])

    vp, sp = roots(s.gram_p())
    vq, sq = roots(s.gram_q())
    x, sv, yt = np.linalg.svd((sp[:, None] * (vp.T @ vq)) * sq[None, :], full_matrices=False)
    k = min(k, len(sv))
    mb = (vp / sp) @ (x[:, :k] * sv[:k])  # (K x k)
    ma = (yt[:k] / sq) @ vq.T  # (k x K)
    b = np.empty((s.m, k), dtype=np.float32)
    p1, p2 = s.h1.b, s.h2.b
    assert p1 is not None and p2 is not None
    for o0, o1 in _steps(s.m, s._row_step(s.terms)):
        b[o0:o1] = (p1[o0:o1, :, None] * p2[o0:o1, None, :]).reshape(o1 - o0, -1) @ mb
    a = np.empty((k, s.n), dtype=np.float32)
    for c0, c1 in _steps(s.n, s._col_step(s.terms + s.r1 + s.r2)):
        a[:, c0:c1] = ma @ s.kr_cols(c0, c1)
    return b, a


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
    """Refuse an empty delta, and one too large for any real module. (What an operation forms from it,
    such as an exact factorization, is checked against MAX_DENSE_ELEMENTS when it is formed.)"""
    if min(u.shape) == 0:
        raise ShapeMismatchError(f"{where}: the {u.algo} delta has shape {u.shape}, with an empty dimension")
    n = int(np.prod(u.shape, dtype=np.float64))
    if n > MAX_DELTA_ELEMENTS:
        raise ShapeMismatchError(f"{where}: a delta of shape {u.shape} ({n} elements) is larger than any real "
                                 f"module (at most {MAX_DELTA_ELEMENTS} elements)")
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
    return _check_size(where, LycorisUpdate(name, "loha", kind, shape, _scale(alpha, rank), dict(own), where=where))


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
    u = LycorisUpdate(name, "lokr", kind, shape, _scale(alpha, r1 if r1 is not None else r2), dict(own), where=where)
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


__all__ = ["LOHA_PARTS", "LOKR_PARTS", "MAX_CORE_RANK", "MAX_DENSE_ELEMENTS", "MAX_WORK", "UNSUPPORTED_PARTS",
           "LycorisUpdate", "TuckerFactor", "batches", "check_dense", "dora_magnitude", "factor_cost",
           "frobenius_norms", "frobenius_sq", "inner", "is_stored_lora", "loha_update", "lokr_update", "lora_cost",
           "spectrum", "structure", "structured_svd", "top_products", "unsupported_algorithm"]
