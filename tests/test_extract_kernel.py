"""The streamed randomized SVD of W_ft - W_base (lorafuse._core.extract_svd).

Checked against numpy's float64 SVD of the difference of the float32 inputs
(D = W_ft - W_base rounded once to float32, as the kernel forms it tile by tile):
near-optimal error, singular values, exact ||D||_F^2, exact recovery of low-rank
differences, dtype independence, bit-identical results for any thread count, and
the error paths.
"""

from __future__ import annotations

import numpy as np
import pytest

from lorafuse import _core
from lorafuse.errors import DtypeError, LorafuseValueError, NonFiniteError, ShapeMismatchError


@pytest.fixture
def rng():
    return np.random.default_rng(20240921)


def f32(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def diff64(w_base: np.ndarray, w_ft: np.ndarray) -> np.ndarray:
    """The D the kernel sees: the float32 difference, exactly, in float64."""
    return (f32(w_ft) - f32(w_base)).astype(np.float64)


def orthonormal(rng, n: int, r: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return q


def decaying_pair(rng, out: int, inn: int, decay: float = 0.7, rank: int | None = None):
    """W_base random (weight-like scale), W_ft = W_base + U diag(decay^i) V^T."""
    r = min(out, inn) if rank is None else rank
    s = decay ** np.arange(r)
    delta = (orthonormal(rng, out, r) * s) @ orthonormal(rng, inn, r).T
    w_base = f32(0.02 * rng.standard_normal((out, inn)))
    return w_base, f32(w_base + delta)


def extract(w_base, w_ft, k, *, base_dtype="F32", ft_dtype="F32", name="m", **kw):
    return _core.extract_svd([(name, w_base, base_dtype, w_ft, ft_dtype)], [k], **kw)[0]


def recon(B, A) -> np.ndarray:
    return B.astype(np.float64) @ A.astype(np.float64)


def same(a, b) -> bool:
    """Bit-identical results: (B, A, S, frob_sq) tuples."""
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("out,inn,k", [(120, 200, 8), (200, 120, 8), (96, 96, 12), (40, 300, 4), (300, 40, 16)])
def test_near_optimal_on_decaying_spectrum(rng, out, inn, k):
    w_base, w_ft = decaying_pair(rng, out, inn)
    D = diff64(w_base, w_ft)
    s = np.linalg.svd(D, compute_uv=False)
    B, A, S, frob_sq = extract(w_base, w_ft, k)
    n_sv = min(k + 10, out, inn)
    assert B.shape == (out, k) and A.shape == (k, inn) and S.shape == (n_sv,)
    assert B.dtype == np.float32 and A.dtype == np.float32 and S.dtype == np.float64
    assert isinstance(frob_sq, float)
    err = np.linalg.norm(D - recon(B, A))
    opt = np.sqrt(np.sum(s[k:] ** 2))
    assert opt <= err <= 1.01 * opt, (err, opt)
    np.testing.assert_allclose(S[:k], s[:k], rtol=1e-3)
    assert np.all(np.diff(S) <= 0)
    assert frob_sq == pytest.approx(float(np.sum(D * D)), rel=1e-6)
    # B A is the projection of D onto span(B): the error is sqrt(frob_sq - sum S_k^2),
    # up to the cancellation of float32-accurate S when the error is small.
    tol = 1e-3 + 1e-6 * frob_sq / err**2
    assert np.sqrt(frob_sq - np.sum(S[:k] ** 2)) == pytest.approx(err, rel=tol)
    # A's rows are orthonormal (V_k^T), B = U_k S_k.
    np.testing.assert_allclose(A.astype(np.float64) @ A.T.astype(np.float64), np.eye(k), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(B.astype(np.float64), axis=0), S[:k], rtol=1e-5)


def test_sign_convention_matches_factored_svd(rng):
    w_base, w_ft = decaying_pair(rng, 90, 70)
    B, A, _, _ = extract(w_base, w_ft, 6)
    for j in range(B.shape[1]):
        assert B[np.argmax(np.abs(B[:, j])), j] > 0
    # factored_svd of the exact same D (given as D @ I) follows the same convention.
    D = f32(w_ft - w_base)
    B2, A2, _ = _core.factored_svd([("m", D, np.eye(70, dtype=np.float32))], [6])[0]
    np.testing.assert_allclose(B, B2, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(A, A2, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("out,inn,r", [(150, 90, 5), (64, 257, 9), (33, 33, 3)])
def test_exact_low_rank_difference_is_recovered(rng, out, inn, r):
    w_base = f32(0.02 * rng.standard_normal((out, inn)))
    delta = f32(rng.standard_normal((out, r))) @ f32(0.01 * rng.standard_normal((r, inn)))
    w_ft = f32(w_base + delta)
    D = diff64(w_base, w_ft)
    B, A, S, frob_sq = extract(w_base, w_ft, r)
    assert np.linalg.norm(D - recon(B, A)) <= 1e-5 * np.linalg.norm(D)
    assert np.all(S[r:] <= 1e-5 * S[0])
    assert frob_sq == pytest.approx(float(np.sum(D * D)), rel=1e-6)


def test_no_power_iterations_and_no_oversampling_still_work(rng):
    w_base, w_ft = decaying_pair(rng, 80, 60, decay=0.5)
    D = diff64(w_base, w_ft)
    s = np.linalg.svd(D, compute_uv=False)
    opt = np.sqrt(np.sum(s[5:] ** 2))
    B, A, S, _ = extract(w_base, w_ft, 5, oversample=0, power_iters=0)  # a plain range finder
    assert S.shape == (5,)
    assert opt <= np.linalg.norm(D - recon(B, A)) < np.linalg.norm(D)
    B, A, S, _ = extract(w_base, w_ft, 5, oversample=0, power_iters=2)
    assert np.linalg.norm(D - recon(B, A)) <= 1.05 * opt
    B, A, S, _ = extract(w_base, w_ft, 5, oversample=3, power_iters=5)
    assert S.shape == (8,)
    assert np.linalg.norm(D - recon(B, A)) <= 1.001 * opt


def test_rank_above_min_dimension_is_padded(rng):
    w_base = f32(rng.standard_normal((6, 10)))
    w_ft = f32(rng.standard_normal((6, 10)))
    D = diff64(w_base, w_ft)
    B, A, S, frob_sq = extract(w_base, w_ft, 9)
    assert B.shape == (6, 9) and A.shape == (9, 10) and S.shape == (6,)
    assert not B[:, 6:].any() and not A[6:].any()
    np.testing.assert_allclose(S, np.linalg.svd(D, compute_uv=False), rtol=1e-5)
    assert np.linalg.norm(D - recon(B, A)) <= 1e-5 * np.linalg.norm(D)
    # tall, and one row / one column
    B, A, S, _ = extract(w_ft.T.copy(), w_base.T.copy(), 40)
    assert B.shape == (10, 40) and A.shape == (40, 6) and S.shape == (6,)
    np.testing.assert_allclose(recon(B, A), -D.T, atol=1e-5)
    row_b, row_f = f32(rng.standard_normal((1, 33))), f32(rng.standard_normal((1, 33)))
    B, A, S, _ = extract(row_b, row_f, 3)
    assert B.shape == (1, 3) and S.shape == (1,)
    np.testing.assert_allclose(recon(B, A), diff64(row_b, row_f), atol=1e-5)
    B, A, S, _ = extract(row_b.T.copy(), row_f.T.copy(), 2)
    np.testing.assert_allclose(recon(B, A), diff64(row_b, row_f).T, atol=1e-5)


def test_zero_difference_gives_zero_factors(rng):
    w = f32(rng.standard_normal((50, 70)))
    B, A, S, frob_sq = extract(w, w.copy(), 8)
    assert frob_sq == 0.0
    assert not B.any() and not A.any() and not S.any()
    assert np.all(np.isfinite(B)) and np.all(np.isfinite(A)) and np.all(np.isfinite(S))
    # an empty matrix
    e = np.zeros((0, 5), np.float32)
    B, A, S, frob_sq = extract(e, e, 3)
    assert B.shape == (0, 3) and A.shape == (3, 5) and S.shape == (0,) and frob_sq == 0.0 and not A.any()


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("base_dtype,ft_dtype", [("BF16", "BF16"), ("F16", "F16"), ("BF16", "F32"), ("F32", "F16"),
                                                 ("F16", "BF16")])
def test_raw_dtypes_match_their_float32_values(rng, base_dtype, ft_dtype):
    w_base, w_ft = decaying_pair(rng, 70, 130)
    raw_b = _core.from_float32(w_base, base_dtype)
    raw_f = _core.from_float32(w_ft, ft_dtype)
    vals_b = _core.to_float32(raw_b, base_dtype)
    vals_f = _core.to_float32(raw_f, ft_dtype)
    got = extract(raw_b, raw_f, 6, base_dtype=base_dtype, ft_dtype=ft_dtype, seed=3)
    ref = extract(vals_b, vals_f, 6, seed=3)
    assert same(got, ref)


def test_f64_and_f8_inputs(rng):
    w_base, w_ft = decaying_pair(rng, 40, 50)
    ref = extract(w_base, w_ft, 4)
    assert same(extract(w_base.astype(np.float64), w_ft.astype(np.float64), 4, base_dtype="F64", ft_dtype="F64"), ref)
    for dt, bad in (("F8_E4M3", lambda c: (c & 0x7F) == 0x7F), ("F8_E5M2", lambda c: (c & 0x7C) == 0x7C)):
        codes = rng.integers(0, 256, size=(2, 40, 50), dtype=np.uint8)
        codes[bad(codes)] = 0x38  # a finite code in place of NaN / Inf
        got = extract(codes[0], codes[1], 4, base_dtype=dt, ft_dtype=dt)
        want = extract(_core.to_float32(codes[0], dt), _core.to_float32(codes[1], dt), 4)
        assert same(got, want)


def test_read_only_views_are_accepted(rng):
    w_base, w_ft = decaying_pair(rng, 30, 40)
    raw_b, raw_f = _core.from_float32(w_base, "BF16"), _core.from_float32(w_ft, "BF16")
    ref = extract(raw_b, raw_f, 4, base_dtype="BF16", ft_dtype="BF16")
    buf = np.concatenate([raw_b.ravel(), raw_f.ravel()]).tobytes()
    views = np.frombuffer(buf, dtype=np.uint16)  # read-only, like a memory-mapped shard
    vb, vf = views[: raw_b.size].reshape(30, 40), views[raw_b.size :].reshape(30, 40)
    assert not vb.flags.writeable
    assert same(extract(vb, vf, 4, base_dtype="BF16", ft_dtype="BF16"), ref)


# ----------------------------------------------------------------------------- determinism


def batch(rng):
    shapes = [(67, 1100), (1030, 70), (9, 17), (128, 256), (200, 40)]
    items = []
    for i, (o, n) in enumerate(shapes):
        w_base, w_ft = decaying_pair(rng, o, n, decay=0.9)
        items.append((f"model.layers.{i}.proj", _core.from_float32(w_base, "BF16"), "BF16", w_ft, "F32"))
    return items


def test_bit_identical_for_any_thread_count(rng):
    items = batch(rng)
    ranks = [12, 7, 20, 5, 3]
    runs = [_core.extract_svd(items, ranks, seed=11, threads=t) for t in (1, 2, 3)]
    for other in runs[1:]:
        assert all(same(a, b) for a, b in zip(runs[0], other))
    # one module at a time: its tile products are then spread over the threads
    for item, k, ref in zip(items, ranks, runs[0]):
        for t in (1, 2, 3, 4):
            assert same(_core.extract_svd([item], [k], seed=11, threads=t)[0], ref)


def test_seed_and_name_select_the_sketch(rng):
    w_base, w_ft = decaying_pair(rng, 150, 120, decay=0.95)
    a = extract(w_base, w_ft, 6, seed=5)
    assert same(a, extract(w_base, w_ft, 6, seed=5))
    b = extract(w_base, w_ft, 6, seed=6)
    c = extract(w_base, w_ft, 6, seed=5, name="other")
    assert not np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])
    assert a[3] == b[3] == c[3]  # ||D||_F^2 does not depend on the sketch
    np.testing.assert_allclose(a[2][:6], b[2][:6], rtol=1e-2)


# ----------------------------------------------------------------------------- errors


def test_shape_mismatch_names_module_and_shapes():
    a = np.zeros((4, 5), np.float32)
    b = np.zeros((4, 6), np.float32)
    with pytest.raises(ShapeMismatchError, match=r"layers\.3\.q_proj.*\(4, 5\).*\(4, 6\)"):
        _core.extract_svd([("layers.3.q_proj", a, "F32", b, "F32")], [2])
    with pytest.raises(ShapeMismatchError, match="v_proj"):
        _core.extract_svd([("v_proj", np.zeros(5, np.float32), "F32", np.zeros(5, np.float32), "F32")], [2])


@pytest.mark.parametrize("where", ["base", "ft"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_input_names_module(rng, where, value):
    w_base, w_ft = decaying_pair(rng, 20, 300)
    (w_base if where == "base" else w_ft)[13, 257] = value
    good_b, good_f = decaying_pair(rng, 10, 10)
    items = [("ok.0", good_b, "F32", good_f, "F32"), ("layers.7.mlp.up_proj", w_base, "F32", w_ft, "F32")]
    with pytest.raises(NonFiniteError,
                       match=r"layers\.7\.mlp\.up_proj.*" + ("base" if where == "base" else "fine-tuned")):
        _core.extract_svd(items, [4, 4], threads=2)


def test_non_finite_first_bad_module_in_order_and_overflow(rng):
    items = []
    for i in range(6):
        w_base, w_ft = decaying_pair(rng, 40, 40)
        if i in (2, 4):
            w_ft[0, 0] = np.nan
        items.append((f"m{i}", w_base, "F32", w_ft, "F32"))
    for t in (1, 2, 3):
        with pytest.raises(NonFiniteError, match="m2"):
            _core.extract_svd(items, [3] * 6, threads=t)
    big = np.full((3, 3), 3e38, np.float32)
    with pytest.raises(NonFiniteError, match="huge.*overflows"):
        _core.extract_svd([("huge", big, "F32", -big, "F32")], [1])
    bf = _core.from_float32(np.full((8, 8), np.inf, np.float32), "BF16")
    with pytest.raises(NonFiniteError, match="inf_bf16"):
        _core.extract_svd([("inf_bf16", bf, "BF16", bf, "BF16")], [1])


def test_argument_checks(rng):
    w = f32(rng.standard_normal((8, 9)))
    ok = ("m", w, "F32", w, "F32")
    with pytest.raises(DtypeError):
        _core.extract_svd([("m", w, "F33", w, "F32")], [2])
    with pytest.raises(DtypeError, match="m: base weight"):
        _core.extract_svd([("m", w, "BF16", w, "F32")], [2])  # item size 4 for BF16
    with pytest.raises(LorafuseValueError, match="contiguous"):
        _core.extract_svd([("m", w[:, ::2], "F32", w[:, ::2], "F32")], [2])
    with pytest.raises(LorafuseValueError, match="rank"):
        _core.extract_svd([ok], [0])
    with pytest.raises(LorafuseValueError):
        _core.extract_svd([ok], [2, 3])
    with pytest.raises(LorafuseValueError, match="oversample"):
        _core.extract_svd([ok], [2], oversample=-1)
    with pytest.raises(LorafuseValueError, match="power_iters"):
        _core.extract_svd([ok], [2], power_iters=-1)
    with pytest.raises(LorafuseValueError, match="seed"):
        _core.extract_svd([ok], [2], seed=-1)
    with pytest.raises(LorafuseValueError, match="numpy array"):
        _core.extract_svd([("m", w.tolist(), "F32", w, "F32")], [2])
    with pytest.raises(LorafuseValueError):
        _core.extract_svd([("m", w, "F32", w)], [2])
    with pytest.raises(LorafuseValueError):
        _core.extract_svd([(3, w, "F32", w, "F32")], [2])
    assert _core.extract_svd([], []) == []
