"""One matrix of a structured update, as stored: full, factored (B @ A) or a Tucker contraction.

A LoHa has two such halves (multiplied elementwise), a LoKr two (Kronecker product), a LoRA or
Tucker LoCon one. Everything is float64 copies of the stored tensors; a Tucker A is never formed
whole unless asked.
"""

from __future__ import annotations

import math
from typing import cast

import numpy as np

from lorafuse.model.limits import EPS, TILE_ELEMENTS, check_core, steps


class Half:
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

    def cross_a(self, other: Half) -> np.ndarray:
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
            for c0, c1 in steps(self.n, step):
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

    def inner(self, other: Half) -> float:
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
            check_core(where, "the singular values of a full LoKr half", min(self.m, self.n))
            return np.linalg.svd(self.w, compute_uv=False)
        assert self.b is not None
        check_core(where, "the singular values of a factored half", self.r)
        rb = cast(np.ndarray, np.linalg.qr(self.b, mode="r"))  # mode "r": R alone (numpy's stubs say QRResult)
        if self.a is not None:
            ra = cast(np.ndarray, np.linalg.qr(self.a.T, mode="r"))
            return np.linalg.svd(rb @ ra.T, compute_uv=False)
        lam = np.linalg.eigvalsh(rb @ self.gram_a() @ rb.T)
        return np.sqrt(np.clip(lam[::-1], 0.0, None))[: self.rank_bound]

    def svd(self, k: int, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The leading k singular triplets (U (m x k'), s (k'), Vt (k' x n)), k' <= k."""
        if self.w is not None:
            check_core(where, "the SVD of a full LoKr half", min(self.m, self.n))
            u, s, vt = np.linalg.svd(self.w, full_matrices=False)
            return u[:, :k], s[:k], vt[:k]
        assert self.b is not None
        check_core(where, "the SVD of a factored half", self.r)
        qb, rb = np.linalg.qr(self.b)
        if self.a is not None:
            qa, ra = np.linalg.qr(self.a.T)
            x, s, yt = np.linalg.svd(rb @ ra.T, full_matrices=False)
            return qb @ x[:, :k], s[:k], yt[:k] @ qa.T
        lam, e = np.linalg.eigh(self.gram_a())
        keep = lam > max(float(lam[-1]), 0.0) * EPS * self.r * 16
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
        for c0, c1 in steps(self.n, self.col_step(self.r)):
            out[:, c0:c1] = self.cols(c0, c1)
        return out

    def dense32(self, coef: float = 1.0) -> np.ndarray:
        """coef * H as float32, computed in float64 column tiles."""
        if self.w is not None:
            return np.ascontiguousarray(self.w * coef, dtype=np.float32)
        assert self.b is not None
        out = np.empty((self.m, self.n), dtype=np.float32)
        for c0, c1 in steps(self.n, self.col_step(self.m + self.r)):
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


def factored_half(m: int, n: int, b: np.ndarray, a: np.ndarray) -> Half:
    return Half(m, n, b=b, a=a.reshape(a.shape[0], -1))


def tucker_half(m: int, n: int, w_a: np.ndarray, core: np.ndarray, w_b: np.ndarray) -> Half:
    """A Tucker half: B = w_a^T (w_a: r x m), core (r, r2, kh, kw), w_b (r2, d)."""
    r, r2 = core.shape[:2]
    return Half(m, n, b=np.ascontiguousarray(w_a.T), core=core.reshape(r, r2, -1), wb=w_b)
