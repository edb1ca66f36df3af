"""Best rank-k approximations of a structured delta (Eckart-Young) through its structure."""

from __future__ import annotations

import numpy as np

from lorafuse.model.limits import EPS, check_core, check_dense, check_work, steps
from lorafuse.model.structure import Hadamard, Kronecker, top_pairs


def pad_terms(b: np.ndarray, a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero terms appended up to k (a delta of numerical rank below k keeps the rank asked)."""
    if b.shape[1] >= k:
        return np.ascontiguousarray(b[:, :k]), np.ascontiguousarray(a[:k])
    extra = k - b.shape[1]
    return (np.ascontiguousarray(np.hstack([b, np.zeros((b.shape[0], extra), np.float32)])),
            np.ascontiguousarray(np.vstack([a, np.zeros((extra, a.shape[1]), np.float32)])))


def kron_best(s: Kronecker, k: int, where: str, split: str = "B") -> tuple[np.ndarray, np.ndarray]:
    """The best rank-k approximation of kron(H1, H2) (unscaled): the k largest products of the halves'
    singular triplets, B = sigma1 sigma2 kron(u1, u2), A = kron(v1, v2)^T (split 'sqrt': the square roots of
    sigma1 sigma2 on both, in float64 before the one rounding to float32)."""
    check_dense(where, "the rank-k LoRA of this LoKr", (k, s.m + s.n))
    u1, s1, v1 = s.h1.svd(k, where)
    u2, s2, v2 = s.h2.svd(k, where)
    i, j = top_pairs(s1, s2, k)
    t = len(i)
    w = s1[i] * s2[j]
    on_a = np.sqrt(w) if split == "sqrt" else np.ones_like(w)
    b = (u1[:, i][:, None, :] * u2[:, j][None, :, :]).reshape(s.m, t) * (w / np.where(on_a > 0, on_a, 1.0))
    a = (v1[i][:, :, None] * v2[j][:, None, :]).reshape(t, s.n) * on_a[:, None]
    return b.astype(np.float32), a.astype(np.float32)


def hadamard_best(s: Hadamard, k: int, where: str, split: str = "B") -> tuple[np.ndarray, np.ndarray]:
    """The best rank-k approximation of a LoHa (unscaled) through the Gram matrices of its Khatri-Rao
    factors P (m x K), Q (K x n): P = U_P S_P V_P^T and Q^T = U_Q S_Q V_Q^T from the eigenvectors of
    P^T P and Q Q^T, the SVD X S Y^T of the K x K core S_P V_P^T V_Q S_Q, then B = P V_P S_P^-1 X_k S_k
    and A = Y_k^T S_Q^-1 V_Q^T Q, built tile by tile (never P or Q whole); split 'sqrt': S_k^1/2 on both."""
    check_core(where, "the rank-k LoRA of this LoHa", s.terms)
    check_work(where, "the rank-k LoRA of this LoHa", s._gram_cost() + 10.0 * s.terms ** 3)
    check_dense(where, "the rank-k LoRA of this LoHa", (k, s.m + s.n))

    def roots(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lam, v = np.linalg.eigh(g)
        keep = lam > max(float(lam[-1]), 0.0) * EPS * s.terms * 16
        return v[:, keep], np.sqrt(lam[keep])

    vp, sp = roots(s.gram_p())
    vq, sq = roots(s.gram_q())
    x, sv, yt = np.linalg.svd((sp[:, None] * (vp.T @ vq)) * sq[None, :], full_matrices=False)
    k = min(k, len(sv))
    on_a = np.sqrt(sv[:k]) if split == "sqrt" else np.ones(k)
    mb = (vp / sp) @ (x[:, :k] * (sv[:k] / np.where(on_a > 0, on_a, 1.0)))  # (K x k)
    ma = on_a[:, None] * ((yt[:k] / sq) @ vq.T)  # (k x K)
    b = np.empty((s.m, k), dtype=np.float32)
    p1, p2 = s.h1.b, s.h2.b
    assert p1 is not None and p2 is not None
    for o0, o1 in steps(s.m, s._row_step(s.terms)):
        b[o0:o1] = (p1[o0:o1, :, None] * p2[o0:o1, None, :]).reshape(o1 - o0, -1) @ mb
    a = np.empty((k, s.n), dtype=np.float32)
    for c0, c1 in steps(s.n, s._col_step(s.terms + s.r1 + s.r2)):
        a[:, c0:c1] = ma @ s.kr_cols(c0, c1)
    return b, a
