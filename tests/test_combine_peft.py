"""combine against the real PEFT add_weighted_adapter, method by method, and against numpy float64."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import peft_fixtures as pf
import pytest
from peft import PeftModel

import lorafuse

WEIGHTS = [1.0, 0.7, -0.4]


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> tuple[pf.Case, list[Path]]:
    """Three rank-4 adapters on one tiny Llama; the third lacks most modules (mismatched module sets)."""
    tmp = tmp_path_factory.mktemp("trio")
    case = pf.llama_case(tmp / "c0", seed=0)
    b = pf.extra_adapter(case, tmp / "b", seed=1, lora_alpha=16)
    c = pf.extra_adapter(case, tmp / "c", seed=2, lora_alpha=4, target_modules=("q_proj", "v_proj", "down_proj"))
    return case, [case.adapter_dir, b, c]


@pytest.fixture(scope="module")
def mixed_ranks(trio: tuple[pf.Case, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Ranks 4, 8 (rslora) and 2 with a rank_pattern: only svd and cat accept these."""
    case, dirs = trio
    tmp = tmp_path_factory.mktemp("mixed")
    d = pf.extra_adapter(case, tmp / "d", seed=3, r=8, lora_alpha=6, use_rslora=True)
    e = pf.extra_adapter(case, tmp / "e", seed=4, r=2, lora_alpha=2, rank_pattern={"o_proj": 3},
                         target_modules=("o_proj", "up_proj", "k_proj"))
    return [dirs[0], d, e]


def dense_inputs(dirs: list[Path], weights: list[float]) -> dict[str, np.ndarray]:
    """sum_i w_i s_i B_i A_i per module, float64, from lorafuse's loader (checked against PEFT elsewhere)."""
    total: dict[str, np.ndarray] = {}
    for d, w in zip(dirs, weights):
        for name, u in lorafuse.load(d).updates.items():
            total[name] = total.get(name, 0) + w * u.delta()
    return total


def rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def assert_matches_peft(result: lorafuse.Adapter, ref: dict[str, np.ndarray], tol: float) -> None:
    assert set(result.updates) == set(ref)
    for name, r in ref.items():
        got = result.updates[name].delta()
        assert got.shape == r.shape
        assert rel_err(got, r) <= tol, f"{name}: relative error {rel_err(got, r):.3g} > {tol}"


@pytest.mark.parametrize("method,kwargs,tol", [
    ("cat", {}, 1e-6),
    ("linear", {}, 1e-6),
    ("ties", {"density": 0.6}, 1e-6),
    ("ties", {"density": 0.4, "majority_sign": "frequency"}, 1e-6),
    ("magnitude_prune", {"density": 0.5}, 1e-6),
    ("svd", {"rank": 6}, 1e-4),
    ("ties_svd", {"density": 0.7, "rank": 5}, 1e-4),
    ("magnitude_prune_svd", {"density": 0.5, "rank": 5}, 1e-4),
])
def test_method_equals_peft(trio: tuple[pf.Case, list[Path]], method: str, kwargs: dict, tol: float) -> None:
    case, dirs = trio
    peft_kwargs = {"combination_type": method}
    if "rank" in kwargs:
        peft_kwargs["svd_rank"] = kwargs["rank"]
    if "density" in kwargs:
        peft_kwargs["density"] = kwargs["density"]
    if "majority_sign" in kwargs:
        peft_kwargs["majority_sign_method"] = kwargs["majority_sign"]
    ref = pf.peft_weighted_deltas(case.base_dir, case.model_cls, dirs, WEIGHTS, **peft_kwargs)
    result = lorafuse.combine(dirs, WEIGHTS, method=method, **kwargs)
    assert_matches_peft(result, ref, tol)


def test_svd_is_the_eckart_young_optimum(mixed_ranks: list[Path]) -> None:
    """Different ranks, rslora, a rank_pattern, negative weights: the error equals the best possible."""
    weights = [0.9, -1.3, 0.5]
    result = lorafuse.combine(mixed_ranks, weights, method="svd", rank=5)
    for name, d in dense_inputs(mixed_ranks, weights).items():
        s = np.linalg.svd(d, compute_uv=False)
        optimum = np.sqrt(np.sum(s[5:] ** 2))
        err = np.linalg.norm(result.updates[name].delta() - d)
        assert err == pytest.approx(optimum, rel=1e-5, abs=1e-9 * s[0]), name
        assert result.updates[name].rank == 5 and result.updates[name].scale == 1.0


def test_cat_and_full_rank_svd_are_exact(mixed_ranks: list[Path]) -> None:
    weights = [0.9, -1.3, 0.5]
    dense = dense_inputs(mixed_ranks, weights)
    cat = lorafuse.combine(mixed_ranks, weights, method="cat")
    full = lorafuse.combine(mixed_ranks, weights, method="svd", rank=64)
    for name, d in dense.items():
        scale = np.abs(d).max()
        assert np.abs(cat.updates[name].delta() - d).max() <= 1e-6 * scale, name
        assert np.abs(full.updates[name].delta() - d).max() <= 1e-5 * scale, name


def test_svd_with_mixed_ranks_equals_peft(trio: tuple[pf.Case, list[Path]], mixed_ranks: list[Path]) -> None:
    """PEFT (first adapter without rslora, so its output scaling is 1) agrees on different ranks too."""
    case, _ = trio
    weights = [0.9, -1.3, 0.5]
    ref = pf.peft_weighted_deltas(case.base_dir, case.model_cls, mixed_ranks, weights, combination_type="svd",
                                  svd_rank=5)
    assert_matches_peft(lorafuse.combine(mixed_ranks, weights, method="svd", rank=5), ref, 1e-4)


def test_factorwise_methods_need_equal_ranks(mixed_ranks: list[Path]) -> None:
    with pytest.raises(lorafuse.ShapeMismatchError, match="equal ranks"):
        lorafuse.combine(mixed_ranks, method="linear")


@pytest.mark.parametrize("method", ["svd", "cat", "ties_svd"])
def test_saved_adapter_loads_in_peft_and_gives_the_combined_delta(trio: tuple[pf.Case, list[Path]], method: str,
                                                                   tmp_path: Path) -> None:
    case, dirs = trio
    kwargs = {"density": 0.5, "rank": 6} if method == "ties_svd" else ({"rank": 6} if method == "svd" else {})
    result = lorafuse.combine(dirs, WEIGHTS, method=method, **kwargs)
    out = tmp_path / "combined"
    result.save(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False
    model = PeftModel.from_pretrained(case.model_cls.from_pretrained(str(case.base_dir)), str(out))
    seen = 0
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and name in result.updates:
            got = module.get_delta_weight("default").double().numpy()
            ref = result.updates[name].delta()
            assert np.abs(got - ref).max() <= 1e-6 * max(1.0, np.abs(ref).max()), name
            seen += 1
    assert seen == len(result.updates)
    # and lorafuse reads back what it wrote
    again = lorafuse.load(out)
    for name, u in result.updates.items():
        np.testing.assert_allclose(again.updates[name].delta(), u.delta(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_is_reproducible_and_thread_independent(trio: tuple[pf.Case, list[Path]], method: str) -> None:
    _, dirs = trio
    kwargs = {"density": 0.5, **({"rank": 6} if method.endswith("svd") else {})}
    runs = [lorafuse.combine(dirs, WEIGHTS, method=method, seed=7, threads=t, **kwargs) for t in (1, 2, 3)]
    other = lorafuse.combine(dirs, WEIGHTS, method=method, seed=8, **kwargs)
    for name in runs[0].updates:
        deltas = [r.updates[name].delta() for r in runs]
        assert np.array_equal(deltas[0], deltas[1]) and np.array_equal(deltas[0], deltas[2]), name
    assert any(not np.array_equal(runs[0].updates[n].delta(), other.updates[n].delta()) for n in other.updates)


@pytest.mark.filterwarnings("ignore:.*one adapter, combined by method:lorafuse.errors.AdapterNote")  # on purpose
def test_dare_linear_keeps_density_and_rescales(trio: tuple[pf.Case, list[Path]]) -> None:
    """One adapter: each factor entry is kept with probability `density` and divided by it."""
    _, dirs = trio
    density = 0.3
    single = lorafuse.load(dirs[0])
    result = lorafuse.combine([dirs[0]], [1.0], method="dare_linear", density=density, seed=3)
    kept, total = 0, 0
    for name, u in single.updates.items():
        b, a = u.stored_factors()
        c = u.scale
        rb, ra = result.updates[name].stored_factors()
        for orig, new, w in ((a, ra, np.sqrt(c)), (b, rb, np.sqrt(c))):
            nz = new != 0
            kept += int(nz.sum())
            total += new.size
            np.testing.assert_allclose(new[nz], (w * orig / density)[nz], rtol=1e-6)
    sigma = np.sqrt(density * (1 - density) / total)
    assert abs(kept / total - density) < 5 * sigma


def test_dare_linear_svd_is_unbiased(trio: tuple[pf.Case, list[Path]]) -> None:
    """Averaged over seeds, DARE's dense merge approaches the plain weighted sum (PEFT's in distribution)."""
    _, dirs = trio
    name = "model.layers.0.self_attn.q_proj"
    exact = dense_inputs(dirs, WEIGHTS)[name]
    seeds = 40
    mean = sum(lorafuse.combine(dirs, WEIGHTS, method="dare_linear_svd", density=0.5, rank=64, seed=s)
               .updates[name].delta() for s in range(seeds)) / seeds
    single = lorafuse.combine(dirs, WEIGHTS, method="dare_linear_svd", density=0.5, rank=64, seed=0).updates[name]
    # one draw is far off; the mean of 40 is ~sqrt(40) times closer
    assert rel_err(mean, exact) < 0.3 * rel_err(single.delta(), exact)


def test_combine_cli_writes_a_peft_adapter(trio: tuple[pf.Case, list[Path]], tmp_path: Path) -> None:
    from lorafuse.cli import main

    _, dirs = trio
    out = tmp_path / "cli"
    code = main(["combine", *map(str, dirs), "--weights", "1,0.7,-0.4", "--rank", "6", "-o", str(out), "-q"])
    assert code == 0
    api = lorafuse.combine(dirs, WEIGHTS, method="svd", rank=6)
    got = lorafuse.load(out)
    for name, u in api.updates.items():
        np.testing.assert_allclose(got.updates[name].delta(), u.delta(), rtol=0, atol=1e-7)
    with pytest.raises(SystemExit) as exc:  # argparse refuses an unknown method, with the choices
        main(["combine", str(dirs[0]), "--method", "nope", "-o", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert main(["combine", str(dirs[0]), "--method", "ties", "-o", str(tmp_path / "x")]) == 2  # no density
    assert not (tmp_path / "x").exists()


def test_output_config_unites_targets_and_has_scale_one(trio: tuple[pf.Case, list[Path]], mixed_ranks: list[Path],
                                                         tmp_path: Path) -> None:
    case, dirs = trio
    out = lorafuse.combine(mixed_ranks, [1.0, 1.0, 1.0], method="cat").save(tmp_path / "cat")
    cfg = json.loads((out / "adapter_config.json").read_text())
    targets = set()
    for d in mixed_ranks:
        targets |= set(json.loads((d / "adapter_config.json").read_text())["target_modules"])
    assert set(cfg["target_modules"]) == targets
    assert cfg["use_rslora"] is False
    loaded = lorafuse.load(out)
    assert {u.scale for u in loaded.updates.values()} == {1.0}
    # q_proj: ranks 4 + 8 (o_proj also has the rank-3 pattern of the third adapter)
    assert loaded.updates["model.layers.0.self_attn.q_proj"].rank == 12
    assert loaded.updates["model.layers.0.self_attn.o_proj"].rank == 4 + 8 + 3


def test_peft_rslora_first_input_bug_is_not_copied(trio: tuple[pf.Case, list[Path]], mixed_ranks: list[Path]) -> None:
    """PEFT copies use_rslora from the first input into the output, scaling it by sqrt(k); lorafuse does not."""
    case, _ = trio
    order = [mixed_ranks[1], mixed_ranks[0]]  # the rslora adapter first
    weights = [1.0, 1.0]
    ref = pf.peft_weighted_deltas(case.base_dir, case.model_cls, order, weights, combination_type="svd", svd_rank=4)
    ours = lorafuse.combine(order, weights, method="svd", rank=4)
    name = "model.layers.0.self_attn.q_proj"
    optimum = np.linalg.svd(dense_inputs(order, weights)[name], compute_uv=False)
    assert np.linalg.norm(ours.updates[name].delta()) == pytest.approx(np.sqrt(np.sum(optimum[:4] ** 2)), rel=1e-5)
    assert np.linalg.norm(ref[name]) == pytest.approx(2.0 * np.sqrt(np.sum(optimum[:4] ** 2)), rel=1e-4)  # sqrt(4)


def test_combine_refuses_dora(tmp_path: Path) -> None:
    case = pf.llama_case(tmp_path / "d", use_dora=True)
    with pytest.raises(lorafuse.UnsupportedError, match="DoRA"):
        lorafuse.combine([case.adapter_dir, case.adapter_dir], method="svd")


def test_similarity_cli(trio: tuple[pf.Case, list[Path]], capsys: pytest.CaptureFixture[str]) -> None:
    from lorafuse.cli import main

    _, dirs = trio
    assert main(["similarity", *map(str, dirs), "--json"]) == 0
    got = np.array(json.loads(capsys.readouterr().out)["cosine"])
    flat = []
    for d in dirs:
        deltas = {n: u.delta() for n, u in lorafuse.load(d).updates.items()}
        flat.append(np.concatenate([deltas[n].ravel() if n in deltas else np.zeros(lorafuse.load(dirs[0]).updates[n]
                                    .delta().size) for n in sorted(lorafuse.load(dirs[0]).updates)]))
    ref = np.array([[x @ y / np.linalg.norm(x) / np.linalg.norm(y) for y in flat] for x in flat])
    np.testing.assert_allclose(got, ref, atol=1e-7)
    assert main(["similarity", *map(str, dirs)]) == 0
    assert "1.0000" in capsys.readouterr().out
