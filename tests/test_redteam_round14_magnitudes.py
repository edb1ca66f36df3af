"""Red-team round 14, magnitudes: factors near float32's limits (products below its smallest subnormal) through
the verbs that write a model. Never a delta written as zeros with exit 0: the right result (against numpy
float64) or a refusal naming the module."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from redteam_fixtures import run_cli
from safetensors.numpy import save_file

import lorafuse
from lorafuse.errors import UnsupportedError
from lorafuse.ops.combine import combine_with
from lorafuse.ops.combine.options import CombineOptions

PREFIX = "base_model.model."
Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.k_proj"
TINY = 2.0**-80  # factors of ~1e-24: their products (~1e-48) are below float32's smallest subnormal (1.4e-45)


def _factors(seed: int, rank: int, scale: float, out: int = 16, inn: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return ((rng.standard_normal((rank, inn)) * scale).astype(np.float32),
            (rng.standard_normal((out, rank)) * scale).astype(np.float32))


def _peft(folder: Path, mods: dict[str, tuple[np.ndarray, np.ndarray]], rank: int) -> Path:
    folder.mkdir(parents=True)
    data = {}
    for m, (a, b) in mods.items():
        data[f"{PREFIX}{m}.lora_A.weight"] = a
        data[f"{PREFIX}{m}.lora_B.weight"] = b
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank,
              "target_modules": sorted({m.rsplit(".", 1)[-1] for m in mods})}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(data, str(folder / "adapter_model.safetensors"))
    return folder


def _delta(u) -> np.ndarray:
    b, a = u.stored_factors()
    return b.astype(np.float64) @ a.astype(np.float64) * u.scale


def _exact(mods: dict[str, tuple[np.ndarray, np.ndarray]], name: str) -> np.ndarray:
    a, b = mods[name]
    return b.astype(np.float64) @ a.astype(np.float64)


def _best(d: np.ndarray, k: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(d)
    return (u[:, :k] * s[:k]) @ vt[:k]


def _rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def _pair(tmp_path: Path, rank: int = 2, scale: float = TINY) -> tuple[list[Path], list[dict]]:
    mods = [{Q: _factors(1 + i, rank, scale), K: _factors(10 + i, rank, 1.0)} for i in range(2)]
    return [_peft(tmp_path / f"a{i}", m, rank) for i, m in enumerate(mods)], mods


# ---- combine svd (memory engine) ------------------------------------------------------------------------------


def test_memory_svd_tiny_factors_split_b_refused_not_written_as_zeros(tmp_path: Path) -> None:
    """Singular values of ~1e-48 on B are zeros in float32: the module is refused, naming it, no output."""
    paths, _ = _pair(tmp_path)
    out = tmp_path / "out"
    code, _, err = run_cli(["combine", *map(str, paths), "--engine", "memory", "--rank", "4", "--weights", "0.5,0.5",
                            "-o", str(out)])
    assert code != 0
    assert Q in err and "float32" in err and "Traceback" not in err
    assert not out.exists()


def test_memory_svd_tiny_factors_split_sqrt_is_exact(tmp_path: Path) -> None:
    paths, mods = _pair(tmp_path)
    out = tmp_path / "out"
    code, _, err = run_cli(["combine", *map(str, paths), "--engine", "memory", "--rank", "4", "--split", "sqrt",
                            "--weights", "0.5,0.5", "-o", str(out)])
    assert code == 0, err
    got = lorafuse.load(out)
    for name in (Q, K):
        ref = 0.5 * _exact(mods[0], name) + 0.5 * _exact(mods[1], name)
        assert _rel(_delta(got.updates[name]), ref) < 1e-5


@pytest.fixture
def dense_pair(tmp_path: Path) -> tuple[list, np.ndarray]:
    """The dense route of svd (stacked rank >= min(out, in), a stack over the group's bytes) accumulated s B A in
    float32, where 1e-48 products are zeros: it wrote a delta of zeros even with split sqrt."""
    rank = 8
    mods = [{Q: _factors(3 + i, rank, TINY)} for i in range(2)]
    ads = [lorafuse.load(_peft(tmp_path / f"d{i}", m, rank)) for i, m in enumerate(mods)]
    return ads, _best(0.5 * _exact(mods[0], Q) + 0.5 * _exact(mods[1], Q), rank)


def test_memory_svd_dense_route_tiny_factors_split_sqrt_exact(dense_pair: tuple[list, np.ndarray]) -> None:
    ads, best = dense_pair
    got = combine_with(ads, [0.5, 0.5], CombineOptions(method="svd", rank=8, split="sqrt", group_bytes=64,
                                                       exact=True))
    assert _rel(_delta(got.updates[Q]), best) < 1e-5


def test_memory_svd_dense_route_tiny_factors_split_b_refused(dense_pair: tuple[list, np.ndarray]) -> None:
    ads, _ = dense_pair
    with pytest.raises(UnsupportedError, match=r"q_proj.*float32"):
        combine_with(ads, [0.5, 0.5], CombineOptions(method="svd", rank=8, split="B", group_bytes=64, exact=True))


# ---- combine *_svd (dense deltas in float32, as PEFT) ---------------------------------------------------------


@pytest.mark.parametrize("method", ["ties_svd", "magnitude_prune_svd", "dare_linear_svd"])
def test_dense_methods_tiny_factors_refused_not_zeros(tmp_path: Path, method: str) -> None:
    paths, _ = _pair(tmp_path)
    out = tmp_path / "out"
    code, _, err = run_cli(["combine", *map(str, paths), "--method", method, "--density", "0.5", "--weights",
                            "0.5,0.5", "-o", str(out)])
    assert code != 0
    assert Q in err and "float32" in err and "Traceback" not in err
    assert not out.exists()


def test_dense_method_normal_factors_still_combine(tmp_path: Path) -> None:
    paths, _ = _pair(tmp_path, scale=2.0**-20)  # products ~1e-12: float32 holds them
    out = tmp_path / "out"
    code, _, err = run_cli(["combine", *map(str, paths), "--method", "ties_svd", "--density", "0.5", "--weights",
                            "0.5,0.5", "-o", str(out)])
    assert code == 0, err
    assert np.abs(_delta(lorafuse.load(out).updates[Q])).max() > 0


# ---- Adapter.to_rank (model arithmetic) -----------------------------------------------------------------------


def test_to_rank_tiny_factors_split_b_refused_not_zeros(tmp_path: Path) -> None:
    paths, _ = _pair(tmp_path)
    a = lorafuse.load(paths[0])
    with pytest.raises(UnsupportedError, match=r"q_proj.*float32"):
        a.to_rank(1)
    with pytest.raises(UnsupportedError, match=r"q_proj"):
        (a + lorafuse.load(paths[1])).to_rank(2)


def test_to_rank_tiny_factors_split_sqrt_is_best(tmp_path: Path) -> None:
    paths, mods = _pair(tmp_path)
    got = lorafuse.load(paths[0]).to_rank(1, split="sqrt")
    for name in (Q, K):
        assert _rel(_delta(got.updates[name]), _best(_exact(mods[0], name), 1)) < 1e-5


# ---- 16-bit outputs of factors whose rank directions differ in size -------------------------------------------


@pytest.mark.parametrize("dtype,tol", [("fp16", 3e-3), ("bf16", 3e-2)])
def test_cat_of_huge_alpha_tiny_factors_with_plain_adapter_to_16_bit(tmp_path: Path, dtype: str, tol: float) -> None:
    """alpha 1e30 on factors of 1e-15 (a delta of ~1) beside an ordinary adapter: cat's B holds 5e14 in one rank
    direction and ~1 in the other, which one power of two for the whole factor cannot bring into F16's range; it
    was refused ('beyond the largest finite F16') although each direction balanced by its own power of two fits."""
    rng = np.random.default_rng(5)
    mods_a = {m: ((rng.standard_normal((2, 12)) * 1e-15).astype(np.float32),
                  (rng.standard_normal((16, 2)) * 1e-15).astype(np.float32)) for m in (Q, K)}
    mods_b = {m: _factors(20, 2, 1.0) for m in (Q, K)}
    a = _peft(tmp_path / "a", mods_a, 2)
    cfg = json.loads((a / "adapter_config.json").read_text())
    (a / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 1e30}))
    b = _peft(tmp_path / "b", mods_b, 2)
    out = tmp_path / "out"
    code, _, err = run_cli(["combine", str(a), str(b), "--method", "cat", "--weights", "1,1", "--dtype", dtype,
                            "-o", str(out)])
    assert code == 0, err
    got = lorafuse.load(out)
    for name in (Q, K):
        ref = 0.5e30 * _exact(mods_a, name) + _exact(mods_b, name)
        assert _rel(_delta(got.updates[name]), ref) < tol


# ---- tiny weights: a coefficient float32 holds as 0 on one factor ---------------------------------------------


def _normal_pair(tmp_path: Path) -> tuple[list[Path], list[dict]]:
    mods = [{Q: _factors(30 + i, 2, 1.0), K: _factors(40 + i, 2, 1.0)} for i in range(2)]
    return [_peft(tmp_path / f"n{i}", m, 2) for i, m in enumerate(mods)], mods


def test_cat_tiny_weights_exact_not_zeros(tmp_path: Path) -> None:
    """--weights 1e-50: w s A in float32 is 0, and cat wrote a delta of zeros with exit 0."""
    paths, mods = _normal_pair(tmp_path)
    out = tmp_path / "out"
    code, _, err = run_cli(["combine", *map(str, paths), "--method", "cat", "--weights", "1e-50,2e-50", "-o",
                            str(out)])
    assert code == 0, err
    got = lorafuse.load(out)
    for name in (Q, K):
        ref = 1e-50 * _exact(mods[0], name) + 2e-50 * _exact(mods[1], name)
        assert _rel(_delta(got.updates[name]), ref) < 1e-5


def test_python_sum_and_to_rank_of_tiny_multiples(tmp_path: Path) -> None:
    paths, mods = _normal_pair(tmp_path)
    a, b = (lorafuse.load(p) for p in paths)
    total = a * 1e-50 + b * 3e-50
    low = (a * 1e-50).to_rank(1, split="sqrt")
    for name in (Q, K):
        ref = 1e-50 * _exact(mods[0], name) + 3e-50 * _exact(mods[1], name)
        assert _rel(_delta(total.updates[name]), ref) < 1e-5
        assert _rel(_delta(low.updates[name]), _best(1e-50 * _exact(mods[0], name), 1)) < 1e-5


def test_dense_method_tiny_weights_refused_not_zeros(tmp_path: Path) -> None:
    paths, _ = _normal_pair(tmp_path)
    out = tmp_path / "out"
    code, _, err = run_cli(["combine", *map(str, paths), "--method", "ties_svd", "--density", "1", "--weights",
                            "1e-50,1e-50", "-o", str(out)])
    assert code != 0
    assert "float32" in err and "Traceback" not in err and ("q_proj" in err or "k_proj" in err)
    assert not out.exists()
