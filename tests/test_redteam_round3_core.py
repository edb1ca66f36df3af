"""Red team round 3, the core's SVD family on finite inputs whose float32 products overflow.

A finite float32 matrix with an entry near float32's max (~2.5e38) made the randomized range finder's
float32 sketch products overflow: BDCSVD got NaN, its info() was never read, and dense_svd / extract_svd
returned uninitialized singular values and NaN factors without an error (`lorafuse extract` exited 0).
Finite factors of ~1e19 whose delta has singular values past float32's range gave lora_B full of Inf
(resize, combine svd: exit 0). Now every SVD entry point either computes the right answer (an
overflowing product is run again on its input scaled by a power of two, undone exactly on S) or raises
NonFiniteError naming the module, and writes nothing. Everything is checked against numpy in float64.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lorafuse.backends import DenseJob, ExtractJob, get_backend
from lorafuse.backends.jobs import FactorJob, FactorListJob
from lorafuse.cli import main
from lorafuse.errors import NonFiniteError

F32_MAX = float(np.finfo(np.float32).max)
Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def cpu():
    return get_backend("cpu")


def spiky(rng: np.random.Generator, shape: tuple[int, int] = (128, 96)) -> np.ndarray:
    """A finite float32 matrix whose float32 products with a Gaussian sketch overflow: one entry of
    2.5e38, a spread rank-1 part of singular value 1e37 and unit noise."""
    x, y = rng.standard_normal(shape[0]), rng.standard_normal(shape[1])
    d = 1e37 * np.outer(x / np.linalg.norm(x), y / np.linalg.norm(y)) + rng.standard_normal(shape)
    d[3, 5] = 2.5e38
    return d.astype(np.float32)


def huge_factors(rng: np.random.Generator, out: int = 64, r: int = 8, in_: int = 48):
    """Finite factors (~1e19 each) whose product's singular values pass float32's max."""
    return ((1e19 * rng.standard_normal((out, r))).astype(np.float32),
            (1e19 * rng.standard_normal((r, in_))).astype(np.float32))


def f64(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    return b.astype(np.float64) @ a.astype(np.float64)


def best_rank(d: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy's float64 singular values and best rank-k approximation of d."""
    u, s, vt = np.linalg.svd(d.astype(np.float64), full_matrices=False)
    return s, (u[:, :k] * s[:k]) @ vt[:k]


def assert_svd_matches(b: np.ndarray, a: np.ndarray, s: np.ndarray, d: np.ndarray, k: int, top: int) -> None:
    """Finite float32 factors; the `top` leading singular values and the rank-k product equal numpy's
    within float32 rounding (relative to the largest singular value)."""
    assert b.dtype == np.float32 and a.dtype == np.float32
    assert np.isfinite(b).all() and np.isfinite(a).all() and np.isfinite(s).all()
    ref_s, ref_dk = best_rank(d, k)
    np.testing.assert_allclose(s[:top], ref_s[:top], rtol=0, atol=2e-6 * ref_s[0])
    assert np.abs(f64(b[:, :k], a[:k]) - ref_dk).max() <= 2e-6 * ref_s[0]


# ---- dense_svd, extract_svd: the randomized paths (and the exact ones beside them) ----

@pytest.mark.parametrize("k", [2, 30])  # 2: randomized (sketch products overflow); 30: the exact float64 path
def test_dense_svd_of_a_matrix_near_float32_max_is_right(cpu, k: int) -> None:
    d = spiky(np.random.default_rng(1))
    assert cpu.dense_svd_is_exact(*d.shape, k) == (k == 30)
    r = cpu.dense_svd([DenseJob("m", d)], [k])[0]
    assert_svd_matches(r.b, r.a, r.s, d, k, top=2)
    assert float(f64(r.b, r.a)[3, 5]) == pytest.approx(2.5e38, rel=1e-6)


def test_extract_svd_of_a_difference_near_float32_max_is_right(cpu) -> None:
    rng = np.random.default_rng(2)
    d = spiky(rng)
    base = rng.standard_normal(d.shape).astype(np.float32)
    ft = (base.astype(np.float64) + d).astype(np.float32)
    diff = ft - base  # what the core decomposes (float32 difference, finite)
    assert np.isfinite(diff).all()
    e = cpu.extract_svd([ExtractJob("m", base, "F32", ft, "F32")], [2])[0]
    assert_svd_matches(e.b, e.a, e.s, diff, 2, top=2)
    assert e.frob_sq == pytest.approx(float(np.sum(diff.astype(np.float64) ** 2)), rel=1e-9)


@pytest.mark.parametrize("where", ["row", "column"])
def test_singular_values_past_float32_range_are_computed_where_the_factors_fit(cpu, where) -> None:
    """A finite row (column) of 3e38: its singular value 2.1e39 (2.4e39) is past float32's max, and the
    randomized path's first (last) product overflows for sure: the row against a Gaussian sketch, the
    column against the orthonormal basis of the range. Split sqrt fits float32 either way; split B fits
    for the column (B = U S holds 3e38 in each of its 64 rows) and not for the row (B = S e_0): refused."""
    rng = np.random.default_rng(3)
    d = rng.standard_normal((64, 48)).astype(np.float32)
    if where == "row":
        d[0] = 3e38
    else:
        d[:, 0] = 3e38
    ref_s, _ = best_rank(d, 2)
    assert ref_s[0] > F32_MAX
    for k in (2, 20):  # randomized, exact
        if where == "row":
            with pytest.raises(NonFiniteError, match=r"^m: the low-rank factors do not fit float32"):
                cpu.dense_svd([DenseJob("m", d)], [k], "B")
        else:
            r = cpu.dense_svd([DenseJob("m", d)], [k], "B")[0]
            assert_svd_matches(r.b, r.a, r.s, d, k, top=1)
        r = cpu.dense_svd([DenseJob("m", d)], [k], "sqrt")[0]
        assert_svd_matches(r.b, r.a, r.s, d, k, top=1)
    job = ExtractJob("m", np.zeros_like(d), "F32", d, "F32")
    if where == "row":
        with pytest.raises(NonFiniteError, match=r"^m: the low-rank factors do not fit float32"):
            cpu.extract_svd([job], [2])
    else:
        e = cpu.extract_svd([job], [2])[0]
        assert_svd_matches(e.b, e.a, e.s, d, 2, top=1)


def test_a_refused_job_names_itself_and_the_batch_reports_the_first_bad_one(cpu) -> None:
    rng = np.random.default_rng(4)
    good = rng.standard_normal((64, 48)).astype(np.float32)
    row = good.copy()
    row[0] = 3e38
    with pytest.raises(NonFiniteError, match=r"^second: the low-rank factors do not fit float32"):
        cpu.dense_svd([DenseJob("first", good), DenseJob("second", row), DenseJob("third", row)], [2, 2, 2])
    nan = good.copy()
    nan[1, 1] = np.nan
    with pytest.raises(NonFiniteError, match=r"^first: input holds NaN or Inf"):  # job order, inputs first
        cpu.dense_svd([DenseJob("first", nan), DenseJob("second", row)], [2, 2])


# ---- factored_svd (resize) and factored_svd_lists (combine svd) ----

@pytest.mark.parametrize("mode", ["exact", "randomized"])
def test_factored_svd_of_huge_finite_factors(cpu, mode: str) -> None:
    b, a = huge_factors(np.random.default_rng(5))
    d = f64(b, a)
    ref_s, _ = best_rank(d, 8)
    assert ref_s[0] > F32_MAX and np.isfinite(b).all() and np.isfinite(a).all()
    k = 8 if mode == "exact" else 2
    kw = {"mode": mode, "oversample": 2, "power_iters": 4}
    with pytest.raises(NonFiniteError, match=r"^f: the low-rank factors do not fit float32"):
        cpu.factored_svd([FactorJob("f", b, a)], [k], "B", **kw)
    r = cpu.factored_svd([FactorJob("f", b, a)], [k], "sqrt", **kw)[0]
    if mode == "exact":  # the factored float64 path: the full decomposition
        assert_svd_matches(r.b, r.a, r.s, d, k, top=8)
    else:  # a sketch of width 4 of a rank-8 product: the leading values, to the sketch's accuracy
        assert np.isfinite(r.b).all() and np.isfinite(r.a).all()
        np.testing.assert_allclose(r.s[:2], ref_s[:2], rtol=5e-3)


@pytest.mark.parametrize("mode", ["exact", "randomized"])
def test_factored_svd_lists_of_huge_finite_factors(cpu, mode: str) -> None:
    rng = np.random.default_rng(6)
    (b1, a1), (b2, a2) = huge_factors(rng), huge_factors(rng)
    d = f64(b1, a1) - 0.5 * f64(b2, a2)
    ref_s, _ = best_rank(d, 16)
    job = FactorListJob("combined", [(b1, a1), (b2, a2)], [1.0, -0.5])
    k = 16 if mode == "exact" else 2
    kw = {"mode": mode, "oversample": 2, "power_iters": 4}
    with pytest.raises(NonFiniteError, match=r"^combined: the low-rank factors do not fit float32"):
        cpu.factored_svd_lists([job], [k], "B", **kw)
    r = cpu.factored_svd_lists([job], [k], "sqrt", **kw)[0]
    if mode == "exact":
        assert_svd_matches(r.b, r.a, r.s, d, k, top=16)
    else:
        assert np.isfinite(r.b).all() and np.isfinite(r.a).all()
        np.testing.assert_allclose(r.s[:2], ref_s[:2], rtol=5e-3)


def test_factored_svd_whose_float32_products_overflow_but_whose_result_fits_is_right(cpu) -> None:
    """A of ~3e37 (finite) and B of ~1e-2: A X overflows float32 in the randomized path's first product
    (rows of norm ~2e38 against a Gaussian sketch), B A has singular values of ~2e37. Scaled, the
    products stay finite and give numpy's answer, with split B too."""
    rng = np.random.default_rng(7)
    b = (1e-2 * rng.standard_normal((64, 12))).astype(np.float32)
    a = (3e37 * rng.standard_normal((12, 48))).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # a Gaussian sketch's first product overflows
        assert not np.isfinite(a @ rng.standard_normal((48, 10)).astype(np.float32)).all()
    d = f64(b, a)
    ref_s, _ = best_rank(d, 12)
    r = cpu.factored_svd([FactorJob("f", b, a)], [12], "B", mode="exact")[0]
    assert_svd_matches(r.b, r.a, r.s, d, 12, top=12)
    r = cpu.factored_svd([FactorJob("f", b, a)], [2], "B", mode="randomized", oversample=8, power_iters=4)[0]
    assert np.isfinite(r.b).all() and np.isfinite(r.a).all()
    np.testing.assert_allclose(r.s[:2], ref_s[:2], rtol=1e-2)
    r = cpu.factored_svd_lists([FactorListJob("f", [(b, a), (b, a)], [0.5, 0.5])], [2], "B", mode="randomized",
                               oversample=8, power_iters=4)[0]
    np.testing.assert_allclose(r.s[:2], ref_s[:2], rtol=1e-2)


# ---- the command line: one line naming the module, exit 1, nothing written ----

def write_model(path: Path, q: np.ndarray, k: np.ndarray) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({f"{Q}.weight": q, "model.layers.0.self_attn.k_proj.weight": k}, str(path / "model.safetensors"))
    return path


def one_line_error(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"lorafuse {command}: error: NonFiniteError: ") and f"{Q}: " in err, err  # (resize: the
    # adapter's path first)
    return err


def test_cli_extract_near_float32_max(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(8)
    q, kw = rng.standard_normal((96, 128)).astype(np.float32), rng.standard_normal((32, 128)).astype(np.float32)
    base = write_model(tmp_path / "base", q, kw)
    q_ft = q + 0.01 * rng.standard_normal(q.shape).astype(np.float32)
    q_ft[0, 0] = 3e38
    ft = write_model(tmp_path / "ft", q_ft, kw)
    out = tmp_path / "out"
    assert main(["extract", str(base), str(ft), "--rank", "2", "-o", str(out), "-q"]) == 0  # the streamed path
    w = load_file(str(out / "adapter_model.safetensors"))
    b, a = w[f"base_model.model.{Q}.lora_B.weight"], w[f"base_model.model.{Q}.lora_A.weight"]
    assert_svd_matches(b, a, np.linalg.svd(f64(b, a), compute_uv=False), q_ft - q, 2, top=1)
    assert float(f64(b, a)[0, 0]) == pytest.approx(3e38, rel=1e-6)
    # a delta whose singular value passes float32's max: refused, nothing written
    q_row = q.copy()
    q_row[0] = 3e38
    row = write_model(tmp_path / "row", q_row, kw)
    for rank in ("2", "40"):  # the streamed randomized path, the exact dense path
        bad = tmp_path / f"bad{rank}"
        assert main(["extract", str(base), str(row), "--rank", rank, "-o", str(bad), "-q"]) == 1
        assert "the low-rank factors do not fit float32" in one_line_error(capsys, "extract")
        assert not bad.exists()


@pytest.fixture
def huge_adapter(tmp_path: Path) -> tuple[Path, np.ndarray]:
    b, a = huge_factors(np.random.default_rng(9), 64, 4, 64)
    d = tmp_path / "huge"
    d.mkdir()
    p = f"base_model.model.{Q}."
    save_file({p + "lora_A.weight": a, p + "lora_B.weight": b}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4,
                                                      "target_modules": ["q_proj"]}))
    return d, f64(b, a)


@pytest.mark.parametrize("command", ["resize", "combine"])
def test_cli_resize_and_combine_refuse_factors_past_float32(huge_adapter: tuple[Path, np.ndarray], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str], command: str) -> None:
    adapter, delta = huge_adapter
    inputs = [str(adapter)] if command == "resize" else [str(adapter), str(adapter)]
    out = tmp_path / "out"
    assert main([command, *inputs, "--rank", "2", "-o", str(out), "-q"]) == 1
    assert "the low-rank factors do not fit float32" in one_line_error(capsys, command)
    assert not out.exists()
    # split sqrt keeps sqrt(S) on each factor: representable, and right
    assert main([command, *inputs, "--rank", "2", "--split", "sqrt", "-o", str(out), "-q"]) == 0
    w = load_file(str(out / "adapter_model.safetensors"))
    b, a = w[f"base_model.model.{Q}.lora_B.weight"], w[f"base_model.model.{Q}.lora_A.weight"]
    target = delta if command == "resize" else 2 * delta
    assert_svd_matches(b, a, np.linalg.svd(f64(b, a), compute_uv=False), target, 2, top=2)
