"""The core's combine kernels against independent references.

factored_svd and dense_svd are checked against numpy's float64 SVD of the dense
matrix (singular values, the Eckart-Young optimal error, exact reconstruction at
full rank), task_merge against straightforward numpy float64 versions of the
formulas in PEFT's merge_utils and against the real peft.utils.merge_utils (torch).
Outputs are float32, so tolerances are a few float32 ulps of the quantities involved.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft.utils import merge_utils

from lorafuse import _core
from lorafuse.errors import DtypeError, LorafuseError, LorafuseValueError, NonFiniteError, ShapeMismatchError

EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture
def rng():
    return np.random.default_rng(20240917)


def f32(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def svd64(D: np.ndarray) -> np.ndarray:
    return np.linalg.svd(np.asarray(D, dtype=np.float64), compute_uv=False)


def optimal_error(s: np.ndarray, k: int) -> float:
    """Eckart-Young: the Frobenius error of the best rank-k approximation."""
    return float(np.sqrt(np.sum(s[k:] ** 2)))


def recon(B2: np.ndarray, A2: np.ndarray) -> np.ndarray:
    return B2.astype(np.float64) @ A2.astype(np.float64)


def factors(rng, out: int, r: int, inn: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    B = f32(rng.standard_normal((out, r)))
    A = f32(rng.standard_normal((r, inn)))
    return B, A, B.astype(np.float64) @ A.astype(np.float64)


def check_rank_k(D: np.ndarray, B2: np.ndarray, A2: np.ndarray, k: int) -> None:
    """B2 @ A2 is a best rank-k approximation of D (float32 factors)."""
    s = svd64(D)
    err = np.linalg.norm(D - recon(B2, A2))
    opt = optimal_error(s, k)
    # float32 rounding of the factors adds an error of a few ulps of ||D||, orthogonal in effect.
    floor = 4 * EPS32 * np.linalg.norm(D)
    assert err <= opt * (1 + 1e-5) + floor, (err, opt)
    assert err >= opt * (1 - 1e-9)


def check_signs(B2: np.ndarray) -> None:
    """The entry of largest magnitude of each nonzero column is positive."""
    for j in range(B2.shape[1]):
        col = B2[:, j]
        if np.any(col != 0):
            assert col[np.argmax(np.abs(col))] > 0


# ----------------------------------------------------------------------------- factored_svd


@pytest.mark.parametrize("out,inn,r", [(96, 64, 8), (40, 120, 6), (80, 80, 16)])
@pytest.mark.parametrize("split", ["B", "sqrt"])
def test_factored_svd_is_eckart_young(rng, out, inn, r, split):
    B, A, D = factors(rng, out, r, inn)
    s = svd64(D)
    for k in (1, 3, r - 1, r):
        B2, A2, S = _core.factored_svd([("m", B, A)], [k], split=split)[0]
        assert B2.dtype == np.float32 and A2.dtype == np.float32 and S.dtype == np.float64
        assert B2.shape == (out, k) and A2.shape == (k, inn) and S.shape == (r,)
        np.testing.assert_allclose(S, s[:r], rtol=0, atol=1e-10 * s[0])
        check_rank_k(D, B2, A2, k)
        check_signs(B2)
        if split == "B":  # A2 has orthonormal rows, B2 = U_k S_k
            np.testing.assert_allclose(A2.astype(np.float64) @ A2.T, np.eye(k), atol=1e-6)
            np.testing.assert_allclose(np.linalg.norm(B2.astype(np.float64), axis=0), S[:k], rtol=1e-6)
        else:  # sqrt(S) on both sides
            np.testing.assert_allclose(np.linalg.norm(B2.astype(np.float64), axis=0), np.sqrt(S[:k]), rtol=1e-6)
            np.testing.assert_allclose(np.linalg.norm(A2.astype(np.float64), axis=1), np.sqrt(S[:k]), rtol=1e-6)


def test_factored_svd_full_rank_is_exact(rng):
    B, A, D = factors(rng, 70, 12, 50)
    for split in ("B", "sqrt"):
        B2, A2, _ = _core.factored_svd([("m", B, A)], [12], split=split)[0]
        assert np.linalg.norm(D - recon(B2, A2)) <= 4 * EPS32 * np.linalg.norm(D)


def test_factored_svd_pads_when_k_exceeds_rank(rng):
    B, A, D = factors(rng, 50, 5, 40)
    B2, A2, S = _core.factored_svd([("m", B, A)], [9])[0]
    assert B2.shape == (50, 9) and A2.shape == (9, 40) and S.shape == (5,)
    assert not B2[:, 5:].any() and not A2[5:].any()
    assert np.linalg.norm(D - recon(B2, A2)) <= 4 * EPS32 * np.linalg.norm(D)


@pytest.mark.parametrize("out,inn,r", [(30, 50, 40), (50, 30, 30), (24, 24, 60)])
def test_factored_svd_dense_fallback(rng, out, inn, r):
    """R >= min(out, in): D is formed and decomposed densely; same contract."""
    B, A, D = factors(rng, out, r, inn)
    s = svd64(D)
    m = min(out, inn)
    for k in (4, m, m + 3):
        B2, A2, S = _core.factored_svd([("m", B, A)], [k])[0]
        assert B2.shape == (out, k) and A2.shape == (k, inn) and S.shape == (m,)
        np.testing.assert_allclose(S, s[:m], rtol=0, atol=1e-10 * s[0])
        check_rank_k(D, B2, A2, min(k, m))
        assert not B2[:, m:].any() and not A2[m:].any()


def test_factored_svd_negative_weights_folded_into_B(rng):
    """Two adapters with weights 0.7 and -1.3 (scales folded in) stacked like `cat`."""
    B1, A1, _ = factors(rng, 64, 4, 48)
    B2_, A2_, _ = factors(rng, 64, 6, 48)
    w1, w2 = 0.7 * 2.0, -1.3 * 0.5
    B = f32(np.hstack([w1 * B1.astype(np.float64), w2 * B2_.astype(np.float64)]))
    A = f32(np.vstack([A1, A2_]))
    D = B.astype(np.float64) @ A.astype(np.float64)
    s = svd64(D)
    B2, A2, S = _core.factored_svd([("m", B, A)], [5])[0]
    np.testing.assert_allclose(S, s[:10], rtol=0, atol=1e-10 * s[0])
    check_rank_k(D, B2, A2, 5)


def test_factored_matches_dense_path_and_is_thread_independent(rng):
    """The factored path and a dense SVD of the same D agree (same sign convention);
    a batch gives bit-identical results on 1 and 2 threads."""
    shapes = [(120, 80, 6), (40, 90, 10), (64, 64, 64), (200, 30, 5), (33, 77, 12)]
    items, dense = [], []
    for i, (out, inn, r) in enumerate(shapes):
        B, A, D = factors(rng, out, r, inn)
        items.append((f"mod.{i}", B, A))
        dense.append((f"mod.{i}", f32(D)))
    ranks = [3, 4, 8, 5, 2]
    one = _core.factored_svd(items, ranks, threads=1)
    two = _core.factored_svd(items, ranks, threads=2)
    for a, b in zip(one, two):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    ref = _core.dense_svd(dense, ranks, oversample=1000)  # exact path
    for (B2, A2, _), (Bd, Ad, _), (_, _D) in zip(one, ref, dense):
        scale = np.abs(B2).max()
        np.testing.assert_allclose(B2, Bd, rtol=0, atol=1e-4 * scale)
        np.testing.assert_allclose(A2, Ad, rtol=0, atol=1e-4)


def test_factored_svd_zero_factors(rng):
    """An untrained adapter (B = 0) reduces to zero, without NaN."""
    B = np.zeros((40, 4), np.float32)
    A = f32(rng.standard_normal((4, 30)))
    B2, A2, S = _core.factored_svd([("m", B, A)], [2])[0]
    assert not S.any() and np.isfinite(A2).all() and not recon(B2, A2).any()
    B2, A2, S = _core.factored_svd([("m", np.zeros((40, 0), np.float32), np.zeros((0, 30), np.float32))], [3])[0]
    assert S.shape == (0,) and B2.shape == (40, 3) and not B2.any() and not A2.any()


def test_factored_svd_errors(rng):
    B, A, _ = factors(rng, 20, 4, 10)
    with pytest.raises(ShapeMismatchError, match=r"q_proj.*\(20, 4\).*\(5, 10\)"):
        _core.factored_svd([("q_proj", B, f32(rng.standard_normal((5, 10))))], [2])
    with pytest.raises(ShapeMismatchError, match="q_proj"):
        _core.factored_svd([("q_proj", B.ravel(), A)], [2])
    with pytest.raises(DtypeError, match="q_proj"):
        _core.factored_svd([("q_proj", B.astype(np.float64), A)], [2])
    with pytest.raises(LorafuseValueError, match="q_proj.*contiguous"):
        _core.factored_svd([("q_proj", np.asfortranarray(B), A)], [2])
    with pytest.raises(LorafuseValueError, match="q_proj: rank must be >= 1, got 0"):
        _core.factored_svd([("q_proj", B, A)], [0])
    with pytest.raises(LorafuseValueError, match="2 ranks for 1 items"):
        _core.factored_svd([("q_proj", B, A)], [2, 2])
    with pytest.raises(LorafuseValueError, match="split"):
        _core.factored_svd([("q_proj", B, A)], [2], split="A")
    bad = B.copy()
    bad[3, 1] = np.nan
    with pytest.raises(NonFiniteError, match="v_proj"):
        _core.factored_svd([("q_proj", B, A), ("v_proj", bad, A)], [2, 2])


# ----------------------------------------------------------------------------- dense_svd


def decaying(rng, m: int, n: int, ratio: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """U diag(s) V^T with s_i = ratio^i; returns (D float64, s)."""
    U, _ = np.linalg.qr(rng.standard_normal((m, min(m, n))))
    V, _ = np.linalg.qr(rng.standard_normal((n, min(m, n))))
    s = ratio ** np.arange(min(m, n))
    return (U * s) @ V.T, s


@pytest.mark.parametrize("out,inn", [(60, 40), (35, 70)])
def test_dense_svd_exact_path_is_numpy_truncation(rng, out, inn):
    D = f32(rng.standard_normal((out, inn)))
    D64 = D.astype(np.float64)
    U, s, Vt = np.linalg.svd(D64, full_matrices=False)
    for k in (1, 6):  # (k + 10) * 4 >= min(out, in): exact
        for split in ("B", "sqrt"):
            B2, A2, S = _core.dense_svd([("m", D)], [k], split=split, seed=k)[0]
            assert B2.shape == (out, k) and A2.shape == (k, inn) and S.shape == (k,)
            np.testing.assert_allclose(S, s[:k], rtol=0, atol=1e-10 * s[0])
            truncation = (U[:, :k] * s[:k]) @ Vt[:k]
            assert np.linalg.norm(recon(B2, A2) - truncation) <= 1e-6 * np.linalg.norm(D64)
            check_signs(B2)
    # the exact path does not depend on the seed
    a = _core.dense_svd([("m", D)], [6], seed=1)[0]
    b = _core.dense_svd([("m", D)], [6], seed=2)[0]
    np.testing.assert_array_equal(a[0], b[0])
    # k beyond min(out, in): all singular values, padded factors
    m = min(out, inn)
    B2, A2, S = _core.dense_svd([("m", D)], [m + 4])[0]
    assert S.shape == (m,) and B2.shape == (out, m + 4) and A2.shape == (m + 4, inn)
    assert not B2[:, m:].any() and not A2[m:].any()
    assert np.linalg.norm(D64 - recon(B2, A2)) <= 4 * EPS32 * np.linalg.norm(D64)


def test_dense_svd_randomized_near_optimal_and_reproducible(rng):
    m, n, k = 400, 260, 10  # (k + 10) * 4 = 80 < 260: randomized
    items, spectra = [], []
    for i in range(3):
        D, s = decaying(rng, m + 20 * i, n)
        items.append((f"layers.{i}.mlp", f32(D)))
        spectra.append(s)
    one = _core.dense_svd(items, [k] * 3, seed=7, threads=1)
    two = _core.dense_svd(items, [k] * 3, seed=7, threads=2)
    for (B2, A2, S), (B2b, A2b, Sb), (_, D), s in zip(one, two, items, spectra):
        np.testing.assert_array_equal(B2, B2b)
        np.testing.assert_array_equal(A2, A2b)
        np.testing.assert_array_equal(S, Sb)
        err = np.linalg.norm(D.astype(np.float64) - recon(B2, A2))
        assert err <= 1.01 * optimal_error(s, k)
        np.testing.assert_allclose(S, s[:k], rtol=1e-4)
        check_signs(B2)
    other = _core.dense_svd(items[:1], [k], seed=8)[0]
    assert not np.array_equal(other[0], one[0][0])  # another sketch: the randomized path ran
    assert np.linalg.norm(items[0][1].astype(np.float64) - recon(other[0], other[1])) <= 1.01 * optimal_error(
        spectra[0], k
    )
    # the name keys the sketch too
    renamed = _core.dense_svd([("other.name", items[0][1])], [k], seed=7)[0]
    assert not np.array_equal(renamed[0], one[0][0])


def test_dense_svd_randomized_low_rank_input(rng):
    """A rank-4 D asked for rank 8: recovered to float32 accuracy, tail values ~0."""
    B, A, D = factors(rng, 300, 4, 200)
    B2, A2, S = _core.dense_svd([("m", f32(D))], [8], power_iters=2)[0]
    assert np.linalg.norm(D - recon(B2, A2)) <= 1e-5 * np.linalg.norm(D)
    np.testing.assert_allclose(S[:4], svd64(D)[:4], rtol=1e-5)
    assert np.all(S[4:] <= 1e-5 * S[0])


def test_dense_svd_errors(rng):
    D = f32(rng.standard_normal((20, 10)))
    with pytest.raises(ShapeMismatchError, match=r"lm_head.*\(200,\)"):
        _core.dense_svd([("lm_head", D.ravel())], [2])
    with pytest.raises(DtypeError, match="lm_head"):
        _core.dense_svd([("lm_head", D.astype(np.float16))], [2])
    with pytest.raises(LorafuseValueError, match="oversample"):
        _core.dense_svd([("lm_head", D)], [2], oversample=-1)
    with pytest.raises(LorafuseValueError, match="power_iters"):
        _core.dense_svd([("lm_head", D)], [2], power_iters=-1)
    with pytest.raises(LorafuseValueError, match="seed"):
        _core.dense_svd([("lm_head", D)], [2], seed=-1)
    bad = D.copy()
    bad[0, 0] = np.inf
    with pytest.raises(NonFiniteError, match="lm_head"):
        _core.dense_svd([("lm_head", bad)], [2])


# ----------------------------------------------------------------------------- task_merge


def distinct_tensors(rng, n: int, shape) -> list[np.ndarray]:
    """Tensors whose magnitudes are all distinct (no ties for top-k)."""
    size = int(np.prod(shape))
    out = []
    for _ in range(n):
        mags = (rng.permutation(size) + 1.0) / size * rng.uniform(0.5, 2.0)
        signs = rng.choice([-1.0, 1.0], size)
        t = f32((mags * signs).reshape(shape))
        assert np.unique(np.abs(t)).size == size
        out.append(t)
    return out


def ref_magnitude_prune(t: np.ndarray, density: float) -> np.ndarray:
    if density >= 1:
        return t.astype(np.float64)
    flat = t.astype(np.float64).ravel()
    k = int(density * flat.size)
    keep = np.argsort(-np.abs(flat), kind="stable")[:k]  # ties: lowest index first
    res = np.zeros_like(flat)
    res[keep] = flat[keep]
    return res.reshape(t.shape)


def ref_merge(pruned: list[np.ndarray], weights, merge: str, majority: str = "total") -> np.ndarray:
    """PEFT's formulas in float64 on already pruned tensors."""
    P = np.stack([p.astype(np.float64) for p in pruned])
    w = np.asarray(weights, np.float64).reshape((-1,) + (1,) * (P.ndim - 1))
    if merge == "sum":
        return (w * P).sum(0)
    stat = P.sum(0) if majority == "total" else np.sign(P).sum(0)
    sign = np.where(stat >= 0, 1.0, -1.0)
    mask = np.sign(P) == sign
    return (w * P * mask).sum(0) / np.maximum(mask.sum(0), 1)


def assert_f32_close(ours: np.ndarray, ref: np.ndarray, tensors, weights) -> None:
    """Equal within float32 rounding of the terms."""
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    scale = sum(abs(w) * np.abs(t.astype(np.float64)).max() for w, t in zip(weights, tensors))
    np.testing.assert_allclose(ours, ref, rtol=4 * EPS32, atol=4 * EPS32 * scale)


def peft(fn, tensors, weights, *args):
    return fn([torch.from_numpy(t) for t in tensors], torch.tensor(weights, dtype=torch.float32), *args).numpy()


@pytest.mark.parametrize("density", [0.0, 0.2, 0.5, 0.99, 1.0, 1.5])
@pytest.mark.parametrize("merge,majority", [("sum", "total"), ("ties", "total"), ("ties", "frequency")])
def test_task_merge_magnitude_against_numpy(rng, density, merge, majority):
    shape = (24, 17)
    items, weights, refs = [], [], []
    for i, n in enumerate((3, 2, 1)):  # a module missing from some adapters has fewer tensors
        ts = distinct_tensors(rng, n, shape)
        w = list(rng.uniform(-1.5, 1.5, n))
        items.append((f"layers.{i}.q_proj", ts))
        weights.append(w)
        refs.append(ref_merge([ref_magnitude_prune(t, density) for t in ts], w, merge, majority))
    res = _core.task_merge(items, weights, prune="magnitude", density=density, merge=merge, majority=majority)
    for ours, ref, (_, ts), w in zip(res, refs, items, weights):
        assert_f32_close(ours, ref, ts, w)


def test_task_merge_against_peft(rng):
    ts = distinct_tensors(rng, 4, (40, 33))
    w = [0.8, -0.4, 1.3, 0.25]

    def ours(**kw):
        return _core.task_merge([("m", ts)], [w], **kw)[0]

    assert_f32_close(ours(), peft(merge_utils.task_arithmetic, ts, w), ts, w)
    for density in (0.1, 0.35, 0.8):
        assert_f32_close(
            ours(prune="magnitude", density=density),
            peft(merge_utils.magnitude_prune, ts, w, density),
            ts,
            w,
        )
        for majority in ("total", "frequency"):
            assert_f32_close(
                ours(prune="magnitude", density=density, merge="ties", majority=majority),
                peft(merge_utils.ties, ts, w, density, majority),
                ts,
                w,
            )
    # signs that disagree a lot: TIES with few tensors of mixed sign and zeros in them
    z = [f32(np.where(rng.random((50, 20)) < 0.3, 0.0, rng.standard_normal((50, 20)))) for _ in range(3)]
    for majority in ("total", "frequency"):
        assert_f32_close(
            _core.task_merge([("m", z)], [[1.0, -2.0, 0.5]], merge="ties", majority=majority)[0],
            peft(merge_utils.ties, z, [1.0, -2.0, 0.5], 1.0, majority),
            z,
            [1.0, -2.0, 0.5],
        )


def test_task_merge_magnitude_ties_at_threshold():
    """Equal magnitudes at the threshold: exactly k kept, lowest index first."""
    t = f32([3, -1, 1, 2, -1, 1, 1, -3])
    res = _core.task_merge([("m", [t])], [[1.0]], prune="magnitude", density=0.75)[0]  # k = 6
    np.testing.assert_array_equal(res, f32([3, -1, 1, 2, -1, 0, 0, -3]))
    np.testing.assert_array_equal(res, ref_magnitude_prune(t, 0.75))


def test_task_merge_random_prune_statistics():
    n, p = 100_000, 0.3
    x = f32(np.random.default_rng(5).uniform(0.5, 1.5, n) * np.random.default_rng(6).choice([-1, 1], n))
    res = _core.task_merge([("lora.up", [x])], [[1.0]], prune="random", density=p, rescale=True, seed=11)[0]
    kept = res != 0
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(kept.mean() - p) <= 5 * sigma
    np.testing.assert_allclose(res[kept], x[kept].astype(np.float64) / p, rtol=EPS32, atol=0)
    plain = _core.task_merge([("lora.up", [x])], [[1.0]], prune="random", density=p, rescale=False, seed=11)[0]
    np.testing.assert_array_equal(plain != 0, kept)  # rescale does not change the mask
    np.testing.assert_array_equal(plain[kept], x[kept])
    # another seed, another mask; the tensor index keys the mask too
    other = _core.task_merge([("lora.up", [x])], [[1.0]], prune="random", density=p, seed=12)[0]
    assert not np.array_equal(other != 0, kept)
    second = _core.task_merge([("lora.up", [x, x])], [[0.0, 1.0]], prune="random", density=p, seed=11)[0]
    assert not np.array_equal(second != 0, kept)
    # density >= 1: no pruning and no rescale, like PEFT
    np.testing.assert_array_equal(
        _core.task_merge([("m", [x])], [[1.0]], prune="random", density=1.0, rescale=True)[0], x
    )


def test_task_merge_random_prune_is_unbiased():
    n, p, seeds = 1000, 0.4, 300
    x = f32(np.random.default_rng(3).uniform(0.5, 2.0, n))
    total = np.zeros(n)
    for seed in range(seeds):
        total += _core.task_merge([("m", [x])], [[1.0]], prune="random", density=p, rescale=True, seed=seed)[0]
    mean = total / seeds
    z = (mean - x) / (x * np.sqrt((1 - p) / p / seeds))
    assert np.abs(z).max() < 5.5
    assert abs(z.mean()) < 5 / np.sqrt(n)


@pytest.mark.parametrize("merge,majority", [("sum", "total"), ("ties", "total"), ("ties", "frequency")])
def test_task_merge_dare_matches_reference_on_its_masks(rng, merge, majority):
    """DARE = random prune with rescale, then sum or TIES: recover each pruned tensor
    (weight 1 on it, 0 on the others) and apply the numpy reference to them."""
    ts = [f32(rng.standard_normal((30, 21))) for _ in range(3)]
    w = [0.9, -0.6, 1.1]
    kw = dict(prune="random", density=0.5, rescale=True, seed=99)
    pruned = []
    for i in range(3):
        one_hot = [1.0 if j == i else 0.0 for j in range(3)]
        pruned.append(_core.task_merge([("m", ts)], [one_hot], **kw)[0])
    res = _core.task_merge([("m", ts)], [w], merge=merge, majority=majority, **kw)[0]
    assert_f32_close(res, ref_merge(pruned, w, merge, majority), [t / 0.5 for t in ts], w)


@pytest.mark.parametrize(
    "kw",
    [
        dict(prune="random", density=0.3, rescale=True),
        dict(prune="random", density=0.3, merge="ties", majority="frequency"),
        dict(prune="magnitude", density=0.1, merge="ties"),
        dict(prune="none", merge="sum"),
    ],
)
def test_task_merge_bit_identical_across_threads(rng, kw):
    items = [(f"mod.{i}", [f32(rng.standard_normal(70_000 + 1000 * i)) for _ in range(3)]) for i in range(3)]
    weights = [[1.0, -0.5, 0.7]] * 3
    runs = [_core.task_merge(items, weights, seed=5, threads=t, **kw) for t in (1, 2, 3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(a, b)


def test_task_merge_keeps_shape(rng):
    ts = [f32(rng.standard_normal((4, 5, 6))) for _ in range(2)]
    res = _core.task_merge([("conv", ts)], [[1.0, 2.0]])[0]
    assert res.shape == (4, 5, 6)
    assert_f32_close(res, ref_merge(ts, [1.0, 2.0], "sum"), ts, [1.0, 2.0])


def test_task_merge_errors(rng):
    a = f32(rng.standard_normal((8, 4)))
    b = f32(rng.standard_normal((4, 8)))
    with pytest.raises(ShapeMismatchError, match=r"k_proj.*\(4, 8\).*\(8, 4\)"):
        _core.task_merge([("k_proj", [a, b])], [[1.0, 1.0]])
    with pytest.raises(DtypeError, match="k_proj"):
        _core.task_merge([("k_proj", [a, a.astype(np.float64)])], [[1.0, 1.0]])
    with pytest.raises(LorafuseValueError, match="k_proj.*contiguous"):
        _core.task_merge([("k_proj", [a, np.asfortranarray(a)])], [[1.0, 1.0]])
    with pytest.raises(ShapeMismatchError, match="k_proj.*1 weights for 2 tensors"):
        _core.task_merge([("k_proj", [a, a])], [[1.0]])
    with pytest.raises(LorafuseValueError, match="k_proj.*at least one tensor"):
        _core.task_merge([("k_proj", [])], [[]])
    with pytest.raises(LorafuseValueError, match="density must be >= 0"):
        _core.task_merge([("k_proj", [a])], [[1.0]], prune="magnitude", density=-0.1)
    with pytest.raises(LorafuseValueError, match="density 0 and rescale"):
        _core.task_merge([("k_proj", [a])], [[1.0]], prune="random", density=0.0, rescale=True)
    for kw, word in [(dict(prune="topk"), "topk"), (dict(merge="mean"), "mean"), (dict(majority="count"), "count")]:
        with pytest.raises(LorafuseValueError, match=word):
            _core.task_merge([("k_proj", [a])], [[1.0]], **kw)
    bad = a.copy()
    bad[1, 1] = np.nan
    with pytest.raises(NonFiniteError, match="v_proj: task tensor 1"):
        _core.task_merge([("k_proj", [a]), ("v_proj", [a, bad])], [[1.0], [1.0, 1.0]])
    with pytest.raises(NonFiniteError, match="k_proj"):
        _core.task_merge([("k_proj", [f32([3e38]), f32([3e38])])], [[1.0, 1.0]])
    # every one of them is a lorafuse error
    with pytest.raises(LorafuseError):
        _core.task_merge([("k_proj", [a, b])], [[1.0, 1.0]])
