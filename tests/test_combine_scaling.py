"""svd with many stacked adapters: the randomized path through the factors and the auto switch.

References: numpy's float64 SVD of the dense sum D = sum_i c_i B_i A_i (Eckart-Young optimum)
and lorafuse's own exact path on the same inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lorafuse import Adapter, _core, combine
from lorafuse.cli import main
from lorafuse.errors import LorafuseValueError
from lorafuse.formats import load


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(4242)


def optimum(D: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """The float64 best rank-k approximation of D and its error ||D - D_k||_F."""
    U, s, Vt = np.linalg.svd(D, full_matrices=False)
    return (U[:, :k] * s[:k]) @ Vt[:k], float(np.sqrt(np.sum(s[k:] ** 2)))


def decaying_stack(rng: np.random.Generator, out: int, inn: int, r: int, ratio: float) -> tuple[np.ndarray, ...]:
    """B (out x r), A (r x in) float32 whose product has singular values ratio^i."""
    U, _ = np.linalg.qr(rng.standard_normal((out, r)))
    V, _ = np.linalg.qr(rng.standard_normal((inn, r)))
    s = ratio ** np.arange(r)
    B = np.ascontiguousarray((U * s).astype(np.float32))
    A = np.ascontiguousarray(V.T.astype(np.float32))
    return B, A


def test_randomized_factored_path_near_optimal_on_a_decaying_spectrum(rng):
    B, A = decaying_stack(rng, 300, 260, 120, 0.9)
    D = B.astype(np.float64) @ A.astype(np.float64)
    k = 12
    Dk, opt = optimum(D, k)
    B2, A2, S = _core.factored_svd([("m", B, A)], [k], mode="randomized", seed=3)[0]
    assert S.shape == (k,)  # the randomized path returns the k computed values
    X = B2.astype(np.float64) @ A2.astype(np.float64)
    assert np.linalg.norm(D - X) <= (1 + 1e-6) * opt
    assert np.linalg.norm(X - Dk) <= 1e-4 * np.linalg.norm(Dk)
    np.testing.assert_allclose(S, np.linalg.svd(D, compute_uv=False)[:k], rtol=1e-5)
    # the exact path on the same input: all 120 singular values, the optimum to float32 accuracy
    B3, A3, S3 = _core.factored_svd([("m", B, A)], [k], mode="exact")[0]
    assert S3.shape == (120,)
    assert np.linalg.norm(B3.astype(np.float64) @ A3.astype(np.float64) - Dk) <= 1e-5 * np.linalg.norm(Dk)


def test_randomized_factored_path_flat_spectrum_error_close_to_optimal(rng):
    """Many random adapters: a nearly flat spectrum. The error, not the subspace, is what is near-optimal."""
    out, inn, r = 200, 150, 400  # R >= min(out, in): the exact path would form D
    B = rng.standard_normal((out, r)).astype(np.float32)
    A = rng.standard_normal((r, inn)).astype(np.float32)
    D = B.astype(np.float64) @ A.astype(np.float64)
    k = 16
    _, opt = optimum(D, k)
    B2, A2, _ = _core.factored_svd([("m", B, A)], [k], mode="randomized")[0]
    err = np.linalg.norm(D - B2.astype(np.float64) @ A2.astype(np.float64))
    assert opt <= err <= 1.02 * opt


def test_randomized_factored_path_reproducible_and_thread_independent(rng):
    items = []
    for i in range(4):
        B, A = decaying_stack(rng, 120 + 10 * i, 90, 60, 0.85)
        items.append((f"layers.{i}.q_proj", B, A))
    one = _core.factored_svd(items, [8] * 4, mode="randomized", seed=5, threads=1)
    two = _core.factored_svd(items, [8] * 4, mode="randomized", seed=5, threads=2)
    for a, b in zip(one, two):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    other = _core.factored_svd(items[:1], [8], mode="randomized", seed=6)[0]
    assert not np.array_equal(other[0], one[0][0])  # another seed, another sketch: the randomized path ran
    for (B2, _A2, _), (_, _B, _A) in zip(one, items):  # largest entry of each left vector positive
        cols = np.abs(B2).argmax(axis=0)
        assert np.all(B2[cols, np.arange(B2.shape[1])] > 0)


def test_randomized_mode_falls_back_to_exact_when_the_sketch_covers_the_rank(rng):
    B = rng.standard_normal((80, 12)).astype(np.float32)
    A = rng.standard_normal((12, 70)).astype(np.float32)
    assert _core.factored_svd_is_exact(80, 70, 12, 4, "randomized")  # k + 10 >= R
    a = _core.factored_svd([("m", B, A)], [4], mode="randomized")[0]
    b = _core.factored_svd([("m", B, A)], [4], mode="exact")[0]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_auto_mode_switches_by_cost():
    for o, i in [(2048, 2048), (5632, 2048), (256, 2048)]:
        assert _core.factored_svd_is_exact(o, i, 72, 32, "auto")  # a few adapters: exact
        assert not _core.factored_svd_is_exact(o, i, 16000, 32, "randomized")
        assert _core.factored_svd_is_exact(o, i, 16000, 32, "exact")
    assert not _core.factored_svd_is_exact(2048, 2048, 1024, 32, "auto")  # 64 rank-16 adapters
    with pytest.raises(LorafuseValueError, match="unknown mode 'fast'"):
        _core.factored_svd([("m", np.ones((4, 2), np.float32), np.ones((2, 3), np.float32))], [1], mode="fast")


def random_adapters(rng: np.random.Generator, n: int, out: int, inn: int, r: int) -> list[Adapter]:
    adapters = []
    for _ in range(n):
        sd = {
            "model.layers.0.mlp.up_proj.lora_A.weight": (0.05 * rng.standard_normal((r, inn))).astype(np.float32),
            "model.layers.0.mlp.up_proj.lora_B.weight": (0.05 * rng.standard_normal((out, r))).astype(np.float32),
        }
        adapters.append(Adapter.from_state_dict(sd, {"r": r, "lora_alpha": 2 * r, "target_modules": ["up_proj"]}))
    return adapters


def dense_sum(adapters: list[Adapter], weights: list[float]) -> np.ndarray:
    return sum(w * a.updates["model.layers.0.mlp.up_proj"].delta() for a, w in zip(adapters, weights))


def test_combine_many_adapters_goes_randomized_and_exact_flag_forces_the_optimum(rng):
    n, out, inn, r, k = 40, 512, 384, 16, 16  # R = 640 >= min(out, in)
    adapters = random_adapters(rng, n, out, inn, r)
    weights = [float(w) for w in rng.uniform(-1, 1, n)]
    D = dense_sum(adapters, weights)
    Dk, opt = optimum(D, k)
    auto = combine(adapters, weights, method="svd", rank=k)
    assert auto.randomized == ["model.layers.0.mlp.up_proj"]
    X = auto.updates["model.layers.0.mlp.up_proj"].delta()
    err = np.linalg.norm(D - X)
    assert opt <= err * (1 + 1e-6) and err <= 1.02 * opt
    exact = combine(adapters, weights, method="svd", rank=k, exact=True)
    assert exact.randomized == []
    Xe = exact.updates["model.layers.0.mlp.up_proj"].delta()
    assert np.linalg.norm(Xe - Dk) <= 1e-4 * np.linalg.norm(Dk)
    # a few adapters stay exact by themselves
    few = combine(adapters[:3], weights[:3], method="svd", rank=k)
    assert few.randomized == []
    Dk3, _ = optimum(dense_sum(adapters[:3], weights[:3]), k)
    assert np.linalg.norm(few.updates["model.layers.0.mlp.up_proj"].delta() - Dk3) <= 1e-4 * np.linalg.norm(Dk3)


def test_cli_reports_randomized_modules_and_exact_flag(rng, tmp_path: Path, capsys):
    adapters = random_adapters(rng, 40, 512, 384, 16)
    dirs = []
    for j, a in enumerate(adapters):
        d = tmp_path / f"a{j}"
        a.save(d)
        dirs.append(d)
    code = main(["combine", *map(str, dirs), "--rank", "16", "-o", str(tmp_path / "auto")])
    out = capsys.readouterr().out
    assert code == 0
    assert "1 of 1 module took a randomized SVD (near-optimal) (--exact forces the exact SVD): " \
           "model.layers.0.mlp.up_proj" in out
    code = main(["combine", *map(str, dirs), "--rank", "16", "--exact", "-o", str(tmp_path / "exact")])
    out = capsys.readouterr().out
    assert code == 0 and "randomized SVD" not in out
    weights = [1.0] * 40
    Dk, opt = optimum(dense_sum(adapters, weights), 16)
    got = load(tmp_path / "exact").updates["model.layers.0.mlp.up_proj"].delta()
    assert np.linalg.norm(got - Dk) <= 1e-4 * np.linalg.norm(Dk)


def test_dense_svd_methods_list_the_modules_whose_rank_k_step_was_randomized(rng):
    """ties_svd: rank k by an exact SVD when 4 (k + 10) >= min(out, in), else randomized (listed)."""
    small = random_adapters(rng, 2, 60, 40, 4)  # 4 (4 + 10) = 56 >= 40: exact
    large = random_adapters(rng, 2, 300, 260, 4)  # 56 < 260: randomized
    for adapters, expected in ((small, []), (large, ["model.layers.0.mlp.up_proj"])):
        result = combine(adapters, [1.0, 0.5], method="ties_svd", rank=4, density=0.5)
        assert result.randomized == expected
    assert _core.dense_svd_is_exact(60, 40, 4) and not _core.dense_svd_is_exact(300, 260, 4)
