"""Adapter arithmetic, rank truncation, norms and similarity, against dense numpy float64 (property tests)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorafuse
from lorafuse import Adapter

SHAPES = {"m.q": (12, 9), "m.v": (7, 12), "m.down": (10, 5)}


def random_adapter(rng: np.random.Generator, modules: list[str], max_rank: int = 4) -> tuple[Adapter, dict]:
    """An in-memory adapter built from a PEFT-style state dict with per-module ranks and scales."""
    sd, rank_pattern, alpha_pattern = {}, {}, {}
    for m in modules:
        out, inp = SHAPES[m]
        r = int(rng.integers(1, max_rank + 1))
        sd[f"base_model.model.{m}.lora_A.weight"] = rng.standard_normal((r, inp)).astype(np.float32)
        sd[f"base_model.model.{m}.lora_B.weight"] = rng.standard_normal((out, r)).astype(np.float32)
        rank_pattern[m] = r
        alpha_pattern[m] = float(rng.uniform(0.5, 8))
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    return Adapter.from_state_dict(sd, cfg), cfg


def dense(a: Adapter) -> dict[str, np.ndarray]:
    return {n: u.delta() for n, u in a.updates.items()}


def assert_dense_equal(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], rtol: float = 1e-6) -> None:
    assert set(got) == set(ref)
    for n in ref:
        scale = max(1e-30, np.abs(ref[n]).max())
        assert np.abs(got[n] - ref[n]).max() <= rtol * scale, n


module_sets = st.lists(st.sampled_from(sorted(SHAPES)), min_size=1, max_size=3, unique=True)
coefs = st.floats(-3, 3, allow_nan=False).filter(lambda x: abs(x) > 1e-3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), ma=module_sets, mb=module_sets, c=coefs)
def test_arithmetic_is_exact(seed: int, ma: list[str], mb: list[str], c: float) -> None:
    rng = np.random.default_rng(seed)
    a, _ = random_adapter(rng, ma)
    b, _ = random_adapter(rng, mb)
    da, db = dense(a), dense(b)
    both = set(da) | set(db)
    expect_sum = {n: da.get(n, 0) + db.get(n, 0) for n in both}
    expect_diff = {n: da.get(n, 0) - db.get(n, 0) for n in both}
    assert_dense_equal(dense(a + b), expect_sum)
    assert_dense_equal(dense(a - b), expect_diff)
    assert_dense_equal(dense(-a), {n: -d for n, d in da.items()})
    assert_dense_equal(dense(c * a), {n: c * d for n, d in da.items()})
    assert_dense_equal(dense(a * c - b / c), {n: c * da.get(n, 0) - db.get(n, 0) / c for n in both})
    for n in both:  # sums stay factored: ranks add up
        ranks = [x.updates[n].rank for x in (a, b) if n in x.updates]
        assert (a + b).updates[n].rank == sum(ranks)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), ms=module_sets, split=st.sampled_from(["B", "sqrt"]))
def test_to_rank_full_is_lossless_and_lower_rank_is_optimal(seed: int, ms: list[str], split: str) -> None:
    rng = np.random.default_rng(seed)
    a, _ = random_adapter(rng, ms)
    b, _ = random_adapter(rng, ms)
    s = a + 0.5 * b
    ds = dense(s)
    full = s.to_rank(64, split=split)
    assert_dense_equal(dense(full), ds, rtol=1e-5)
    k = 2
    low = s.to_rank(k, split=split)
    for n, d in ds.items():
        sv = np.linalg.svd(d, compute_uv=False)
        optimum = np.sqrt(np.sum(sv[k:] ** 2))
        assert np.linalg.norm(low.updates[n].delta() - d) == pytest.approx(optimum, rel=1e-4, abs=1e-6 * sv[0])
        assert low.updates[n].rank == k


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), ms=st.lists(module_sets, min_size=2, max_size=4))
def test_similarity_and_norm_equal_the_dense_values(seed: int, ms: list[list[str]]) -> None:
    rng = np.random.default_rng(seed)
    adapters = [random_adapter(rng, m)[0] for m in ms]
    flat = []
    for a in adapters:
        d = dense(a)
        flat.append(np.concatenate([d[n].ravel() if n in d else np.zeros(np.prod(SHAPES[n])) for n in sorted(SHAPES)]))
    ref = np.array([[x @ y / (np.linalg.norm(x) * np.linalg.norm(y)) for y in flat] for x in flat])
    with warnings.catch_warnings():  # adapters that share no module: similarity 0, and a warning saying so
        warnings.filterwarnings("ignore", message=".* share no module", category=UserWarning)
        got = lorafuse.similarity(adapters)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)
    for a, x in zip(adapters, flat):
        assert a.norm() == pytest.approx(np.linalg.norm(x), rel=1e-9)


def test_similarity_of_an_adapter_with_its_negative(tmp_path) -> None:
    a, _ = random_adapter(np.random.default_rng(0), sorted(SHAPES))
    cos = lorafuse.similarity([a, -a, 2 * a])
    np.testing.assert_allclose(cos, [[1, -1, 1], [-1, 1, -1], [1, -1, 1]], atol=1e-12)


def test_state_dicts_in_and_out_numpy_and_torch(tmp_path) -> None:
    rng = np.random.default_rng(1)
    a, cfg = random_adapter(rng, sorted(SHAPES))
    torch_sd = {k: torch.from_numpy(v) for k, v in a.state_dict("numpy").items()}
    b = Adapter.from_state_dict(torch_sd, cfg)
    assert_dense_equal(dense(b), dense(a), rtol=0)
    bf16 = {k: v.to(torch.bfloat16) for k, v in a.state_dict("torch").items()}
    c = Adapter.from_state_dict(bf16, cfg)
    assert {u.A.dtype for u in c.updates.values()} == {"BF16"}
    ref = {n: u.scale * (c.updates[n].B.f32().astype(np.float64) @ c.updates[n].A.f32().astype(np.float64))
           for n, u in a.updates.items()}
    expect = {n: a.updates[n].scale * (bf16[f"base_model.model.{n}.lora_B.weight"].double().numpy()
                                       @ bf16[f"base_model.model.{n}.lora_A.weight"].double().numpy())
              for n in a.updates}
    assert_dense_equal(ref, expect, rtol=1e-12)
    out = (a + c).to_rank(3).save(tmp_path / "saved")
    again = lorafuse.load(out)
    assert_dense_equal(dense(again), dense((a + c).to_rank(3)), rtol=1e-6)


def test_arithmetic_refuses_dora_and_mismatched_shapes() -> None:
    rng = np.random.default_rng(2)
    a, cfg = random_adapter(rng, ["m.q"])
    sd = a.state_dict()
    sd["base_model.model.m.q.lora_magnitude_vector"] = np.ones(12, np.float32)
    dora = Adapter.from_state_dict(sd, {**cfg, "use_dora": True})
    with pytest.raises(lorafuse.UnsupportedError, match="DoRA"):
        _ = a + dora
    other = {"base_model.model.m.q.lora_A.weight": np.ones((2, 3), np.float32),
             "base_model.model.m.q.lora_B.weight": np.ones((12, 2), np.float32)}
    with pytest.raises(lorafuse.ShapeMismatchError, match="m.q"):
        _ = a + Adapter.from_state_dict(other)
