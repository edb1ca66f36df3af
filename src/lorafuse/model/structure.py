"""An update's unscaled 2-D delta kept in its structure: low rank (LoRA, Tucker LoCon), Hadamard
(LoHa) or Kronecker (LoKr), with norms, spectra, inner products and products with a matrix that never
form the dense delta (working memory: a few tiles of TILE_ELEMENTS; see model.lycoris)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from lorafuse.model import limits
from lorafuse.model.half import Half
from lorafuse.model.limits import EPS, MAX_CORE_RANK, TILE_ELEMENTS, check_core, check_work, steps


class Delta:
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


class LowRank(Delta):
    """D = B @ A: a LoRA (its stored factors, or a Tucker LoCon through its core)."""

    def __init__(self, h: Half) -> None:
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


class Hadamard(Delta):
    """D = (P1 Q1) * (P2 Q2), elementwise (LoHa): its exact factorization is the Khatri-Rao one,
    B = [P1[:, i] * P2[:, j]], A = [Q1[i] * Q2[j]], r1 * r2 terms."""

    def __init__(self, h1: Half, h2: Half) -> None:
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
        for o0, o1 in steps(self.m, self._row_step(t * self.r1)):
            x = (bt[o0:o1, :, None] * p1[o0:o1, None, :]).reshape(o1 - o0, -1)
            left += x.T @ p2[o0:o1]
        right = np.zeros((t * self.r1, self.r2))
        for c0, c1 in steps(self.n, self._col_step(t * self.r1 + self.r1 + self.r2)):
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

    def cross_p(self, other: Hadamard) -> np.ndarray:
        """B^T B' of the Khatri-Rao Bs (r1*r2 x r1'*r2')."""
        g = np.zeros((self.terms, other.terms))
        for o0, o1 in steps(self.m, self._row_step(self.terms + other.terms)):
            g += self.kr_rows(o0, o1).T @ (self.kr_rows(o0, o1) if other is self else other.kr_rows(o0, o1))
        return g

    def cross_q(self, other: Hadamard) -> np.ndarray:
        """A A'^T of the Khatri-Rao As (r1*r2 x r1'*r2')."""
        g = np.zeros((self.terms, other.terms))
        rows = self.terms + other.terms + self.r1 + self.r2 + other.r1 + other.r2
        for c0, c1 in steps(self.n, min(self._col_step(rows), other._col_step(rows))):
            kq = self.kr_cols(c0, c1)
            g += kq @ (kq if other is self else other.kr_cols(c0, c1)).T
        return g

    def gram_p(self) -> np.ndarray:
        return self.cross_p(self)

    def gram_q(self) -> np.ndarray:
        return self.cross_q(self)

    def _kr_mul_cheaper(self, width: int) -> bool:
        kr = 2.0 * self.terms * (self.m + self.n) * width
        return kr <= self.m * self.n * (self.block_cost * limits.DENSE_SLOWDOWN + 2 * width)

    def mul_cost(self, width: int) -> float:
        kr = 2.0 * self.terms * (self.m + self.n) * width
        return min(kr, self.m * self.n * (self.block_cost * limits.DENSE_SLOWDOWN + 2 * width))

    def mul(self, x: np.ndarray) -> np.ndarray:
        width = x.shape[1]
        if self._kr_mul_cheaper(width):  # through the Khatri-Rao factors: KR_B (KR_A x)
            z = np.zeros((self.terms, width))
            for c0, c1 in steps(self.n, self._col_step(self.terms + self.r1 + self.r2)):
                z += self.kr_cols(c0, c1) @ x[c0:c1]
            out = np.empty((self.m, width))
            for o0, o1 in steps(self.m, self._row_step(self.terms)):
                out[o0:o1] = self.kr_rows(o0, o1) @ z
            return out
        out = np.zeros((self.m, width))
        for c0, c1, o0, o1, d in dense_blocks(self):
            out[o0:o1] += d @ x[c0:c1]
        return out

    def tmul(self, y: np.ndarray) -> np.ndarray:
        width = y.shape[1]
        if self._kr_mul_cheaper(width):  # KR_A^T (KR_B^T y)
            z = np.zeros((self.terms, width))
            for o0, o1 in steps(self.m, self._row_step(self.terms)):
                z += self.kr_rows(o0, o1).T @ y[o0:o1]
            out = np.empty((self.n, width))
            for c0, c1 in steps(self.n, self._col_step(self.terms + self.r1 + self.r2)):
                out[c0:c1] = self.kr_cols(c0, c1).T @ z
            return out
        out = np.zeros((self.n, width))
        for c0, c1, o0, o1, d in dense_blocks(self):
            out[c0:c1] += d.T @ y[o0:o1]
        return out

    def _gram_cost(self) -> float:
        return 2.0 * self.terms ** 2 * (self.m + self.n)

    def _dense_cost(self) -> float:
        return self.m * self.n * self.block_cost * limits.DENSE_SLOWDOWN

    def fro2(self, where: str) -> float:
        gram, dense = self._gram_cost(), self._dense_cost()
        if self.terms <= MAX_CORE_RANK and gram <= dense:
            return float(np.sum(self.gram_p() * self.gram_q()))
        check_work(where, "the norm of this LoHa", dense)
        return sum(float(np.vdot(x, x)) for x in self.blocks())

    def blocks(self) -> Iterator[np.ndarray]:
        """Dense blocks of D covering it once (column tiles outside, row tiles inside)."""
        for c0, c1 in steps(self.n, self._col_step(min(self.m, 4096) + self.r1 + self.r2)):
            for o0, o1 in steps(self.m, self._row_step(c1 - c0)):
                yield self.block(o0, o1, c0, c1)

    def svals(self, where: str) -> np.ndarray:
        k_dense = min(self.m, self.n)
        gram = self._gram_cost() + 10.0 * self.terms ** 3
        dense = self._dense_cost() + 2.0 * self.m * self.n * k_dense + 10.0 * k_dense ** 3
        if self.terms <= MAX_CORE_RANK and (gram <= dense or k_dense > MAX_CORE_RANK):
            check_work(where, "the singular values of this LoHa", gram)
            lam, v = np.linalg.eigh(self.gram_p())
            keep = lam > max(float(lam[-1]), 0.0) * EPS * self.terms * 16
            root = v[:, keep] * np.sqrt(lam[keep])
            s2 = np.linalg.eigvalsh(root.T @ self.gram_q() @ root)
        else:
            check_core(where, "the singular values of this LoHa", k_dense)
            check_work(where, "the singular values of this LoHa", dense)
            g = np.zeros((k_dense, k_dense))
            if self.n <= self.m:  # D^T D over row blocks of whole rows
                for o0, o1 in steps(self.m, self._row_step(self.n)):
                    x = self.block(o0, o1, 0, self.n)
                    g += x.T @ x
            else:  # D D^T over column blocks of whole columns
                for c0, c1 in steps(self.n, self._col_step(self.m + self.r1 + self.r2)):
                    x = self.block(0, self.m, c0, c1)
                    g += x @ x.T
            s2 = np.linalg.eigvalsh(g)
        return np.sqrt(np.clip(s2[::-1], 0.0, None))[: min(self.terms, k_dense)]


class Kronecker(Delta):
    """D = kron(H1, H2) (LoKr): H1 (m1 x n1), H2 (m2 x n2)."""

    def __init__(self, h1: Half, h2: Half) -> None:
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


def top_pairs(s1: np.ndarray, s2: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (i, j) of the k largest products s1[i] * s2[j], in descending order of the product."""
    counts = np.minimum(len(s2), k // np.arange(1, len(s1) + 1))
    counts = counts[counts > 0]
    i = np.repeat(np.arange(len(counts)), counts)
    starts = np.cumsum(counts) - counts
    j = np.arange(int(counts.sum())) - np.repeat(starts, counts)
    order = np.argsort(-(s1[i] * s2[j]), kind="stable")[:k]
    return i[order], j[order]


def structure_inner(x: Delta, y: Delta, where: str) -> float:
    """<D_x, D_y>_F of two structures of the same shape, the cheapest bounded way."""
    if isinstance(x, Kronecker) and isinstance(y, Kronecker) and (x.h1.m, x.h1.n) == (y.h1.m, y.h1.n):
        return x.h1.inner(y.h1) * x.h2.inner(y.h2)
    if isinstance(x, LowRank) and isinstance(y, LowRank):
        return x.h.inner(y.h)
    options: list[tuple[float, str]] = [
        (x.terms * (y.bilinear_cost() + x.m + x.n), "x"),
        (y.terms * (x.bilinear_cost() + y.m + y.n), "y"),
        (x.m * x.n * (x.block_cost + y.block_cost + 2) * limits.DENSE_SLOWDOWN, "blocks"),
    ]
    if isinstance(x, Hadamard) and isinstance(y, Hadamard) and x.terms * y.terms <= MAX_CORE_RANK ** 2:
        options.append((2.0 * x.terms * y.terms * (x.m + x.n), "gram"))
    cost, how = min(options)
    check_work(where, "the inner product of these two deltas", cost)
    if how == "gram":
        assert isinstance(x, Hadamard) and isinstance(y, Hadamard)
        return float(np.sum(x.cross_p(y) * x.cross_q(y)))
    if how == "blocks":
        assert isinstance(x, (LowRank, Hadamard)) and isinstance(y, (LowRank, Hadamard))
        total = 0.0
        rows = min(x.m, 4096)
        for c0, c1 in steps(x.n, max(1, TILE_ELEMENTS // rows)):
            for o0, o1 in steps(x.m, max(1, TILE_ELEMENTS // (c1 - c0))):
                total += float(np.vdot(x.block(o0, o1, c0, c1), y.block(o0, o1, c0, c1)))
        return total
    if how == "y":
        x, y = y, x
    step = max(1, TILE_ELEMENTS // max(1, x.term_width(), y.term_width()))
    return sum(y.bilinear(*x.term_tile(np.arange(t0, t1))) for t0, t1 in steps(x.terms, step))


def dense64(h: Half) -> np.ndarray:
    if h.w is not None:
        return h.w
    assert h.b is not None
    return h.b @ h.left(np.eye(h.r)) if h.tucker else h.b @ h.a


def dense_blocks(s: Delta) -> Iterator[tuple[int, int, int, int, np.ndarray]]:
    """(c0, c1, o0, o1, D[o0:o1, c0:c1]) covering a LoHa or LoKr delta once, in float64 tiles."""
    if isinstance(s, Kronecker):
        w1, w2 = dense64(s.h1), dense64(s.h2)
        m2 = w2.shape[0]
        for o0, o1 in steps(s.m, max(1, TILE_ELEMENTS // s.n)):
            i, p = np.divmod(np.arange(o0, o1), m2)
            yield 0, s.n, o0, o1, (w1[i][:, :, None] * w2[p][:, None, :]).reshape(o1 - o0, s.n)
        return
    assert isinstance(s, Hadamard)
    for c0, c1 in steps(s.n, s._col_step(min(s.m, 4096) + s.r1 + s.r2)):
        for o0, o1 in steps(s.m, s._row_step(c1 - c0)):
            yield c0, c1, o0, o1, s.block(o0, o1, c0, c1)
