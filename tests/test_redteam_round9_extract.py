"""Red-team round 9, extract against kohya sd-scripts' networks/extract_lora_from_models.py: its --clamp_quantile
(each module's up = U S and down = V^T clamped to [-h, h], h the quantile of their entries together) and --min_diff
(a difference whose largest |W_ft - W_base| is at most it is no change), as --clamp-quantile and --min-diff here,
each against a numpy float64 reference of the same definition, plus their checks, records and messages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from redteam_fixtures import run_cli
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import lorafuse
from lorafuse.errors import LorafuseValueError, UnsupportedError
from lorafuse.ops.plan import plan_extract

pytestmark = pytest.mark.filterwarnings("ignore")


def _pair(tmp: Path, base: dict[str, np.ndarray], ft: dict[str, np.ndarray]) -> tuple[Path, Path]:
    """Two checkpoint folders (base/, ft/) holding `base` and `ft` in model.safetensors each."""
    for d, t in (("base", base), ("ft", ft)):
        (tmp / d).mkdir()
        save_file(t, str(tmp / d / "model.safetensors"))
    return tmp / "base", tmp / "ft"


def _spectral(rng: np.random.Generator, m: int, n: int, s: np.ndarray) -> np.ndarray:
    """An m x n matrix with singular values `s` (then zeros), float64."""
    u, _ = np.linalg.qr(rng.standard_normal((m, len(s))))
    v, _ = np.linalg.qr(rng.standard_normal((n, len(s))))
    return (u * s) @ v.T


def _clamp_models(tmp: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """A Linear 40 x 24 and a 3x3 convolution 8 x 6 (the exact SVD's path at rank 4) and a Linear 300 x 200 (the
    randomized SVD's path), each delta with a well-separated leading spectrum (its rank-4 factors unique up to
    sign); returns the folders and each module's D = W_ft - W_base (float64, of the float32 weights)."""
    rng = np.random.default_rng(7)
    lead = np.array([9.0, 6.0, 4.0, 2.5])
    deltas = {"m.lin": _spectral(rng, 40, 24, np.r_[lead, 0.01 * np.ones(20)]),
              "m.conv": _spectral(rng, 8, 54, np.r_[lead, 0.01 * np.ones(4)]).reshape(8, 6, 3, 3),
              "m.big": _spectral(rng, 300, 200, np.r_[lead, 1e-3 * np.ones(100)])}
    base = {f"{m}.weight": rng.standard_normal(d.shape).astype(np.float32) for m, d in deltas.items()}
    ft = {k: (v + deltas[k[:-7]]).astype(np.float32) for k, v in base.items()}
    b, f = _pair(tmp, base, ft)
    return b, f, {k[:-7]: ft[k].astype(np.float64) - base[k] for k in base}


def _factors(folder: Path, module: str) -> tuple[np.ndarray, np.ndarray]:
    """(B, A) of one module of an extracted PEFT folder as 2-D float64, after checking PEFT's scale is 1."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"] and not cfg.get("alpha_pattern") and not cfg.get("rank_pattern")
    t = load_file(str(folder / "adapter_model.safetensors"))
    a = t[f"base_model.model.{module}.lora_A.weight"].astype(np.float64)
    b = t[f"base_model.model.{module}.lora_B.weight"].astype(np.float64)
    return b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1)


def _kohya_clamp(d: np.ndarray, k: int, q: float, signs_like: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy float64 reference of kohya's clamp: U S and V^T of the rank-k truncated SVD of D (each singular pair's
    sign that of `signs_like`'s column, the SVD's sign being arbitrary), clamped to [-h, h], h = quantile(q) of
    their entries together (linear interpolation, torch.quantile's)."""
    u, s, vt = np.linalg.svd(d.reshape(d.shape[0], -1))
    b, a = u[:, :k] * s[:k], vt[:k]
    sign = np.sign(np.sum(b * signs_like, axis=0))
    b, a = b * sign, a * sign[:, None]
    h = np.quantile(np.concatenate([b.ravel(), a.ravel()]), q)
    return np.clip(b, -h, h), np.clip(a, -h, h)


# ----------------------------------------------------------------------------- 1. --clamp-quantile


@pytest.mark.parametrize("q", [0.99, 0.9])
def test_clamp_quantile_is_kohyas_clamp_of_the_optimal_factors(tmp_path: Path, q: float) -> None:
    """Each module's written B and A are U S and V^T of the optimal rank-4 SVD clamped at the q-quantile of their
    entries, and the reported error is the clamped factors' own ||D - B A|| / ||D||."""
    base, ft, deltas = _clamp_models(tmp_path)
    res = lorafuse.extract(base, ft, tmp_path / "out", rank=4, clamp_quantile=q)
    errors = {m.name: m.rel_error for m in res.modules}
    assert set(errors) == set(deltas)
    for module, d in deltas.items():
        b, a = _factors(tmp_path / "out", module)
        rb, ra = _kohya_clamp(d, 4, q, b)
        scale = float(np.abs(rb).max())
        np.testing.assert_allclose(b, rb, atol=2e-5 * scale, err_msg=module)
        np.testing.assert_allclose(a, ra, atol=2e-5, err_msg=module)
        d2 = d.reshape(d.shape[0], -1)
        assert np.mean(np.abs(b) >= np.abs(rb).max() * (1 - 1e-6)) > 0  # the clamp did bite
        want = np.linalg.norm(d2 - b @ a) / np.linalg.norm(d2)
        assert errors[module] == pytest.approx(want, rel=1e-4, abs=1e-6), module
        s = np.linalg.svd(d2, compute_uv=False)
        assert errors[module] > np.sqrt(np.sum(s[4:] ** 2) / np.sum(s**2))  # the clamp moved it off the optimum


def test_clamp_quantile_one_changes_nothing_but_the_record(tmp_path: Path) -> None:
    """q = 1 clamps at the largest entry: the factors are those of no clamp."""
    base, ft, _ = _clamp_models(tmp_path)
    plain = lorafuse.extract(base, ft, rank=4)
    clamped = lorafuse.extract(base, ft, rank=4, clamp_quantile=1.0)
    for name, u in plain.adapter.updates.items():
        np.testing.assert_array_equal(clamped.adapter.updates[name].B.f32(), u.B.f32())
        np.testing.assert_array_equal(clamped.adapter.updates[name].A.f32(), u.A.f32())


def test_clamp_quantile_on_the_command_line_and_in_the_record(tmp_path: Path) -> None:
    """`--clamp-quantile Q` writes what clamp_quantile=Q does, and the output's lorafuse.parameters records it (and
    min_diff): a rerun of the recorded options gives the same adapter."""
    base, ft, deltas = _clamp_models(tmp_path)
    code, _, err = run_cli(["extract", str(base), str(ft), "--rank", "4", "--clamp-quantile", "0.9", "--min-diff",
                            "0.001", "-o", str(tmp_path / "cli"), "-q"])
    assert code == 0, err
    api = lorafuse.extract(base, ft, rank=4, clamp_quantile=0.9)
    for module in deltas:
        b, a = _factors(tmp_path / "cli", module)
        np.testing.assert_array_equal(b, api.adapter.updates[module].B.f32().reshape(b.shape[0], -1))
    with safe_open(str(tmp_path / "cli" / "adapter_model.safetensors"), "np") as f:
        params = json.loads((f.metadata() or {})["lorafuse.parameters"])
    assert params["clamp_quantile"] == 0.9 and params["min_diff"] == 0.001


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, float("nan"), True, "0.9"])
def test_clamp_quantile_out_of_range_is_refused_before_any_work(tmp_path: Path, bad: object) -> None:
    base, ft, _ = _clamp_models(tmp_path)
    with pytest.raises(LorafuseValueError, match="clamp_quantile"):
        lorafuse.extract(base, ft, tmp_path / "out", rank=4, clamp_quantile=bad)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()
    with pytest.raises(LorafuseValueError, match="clamp_quantile"):
        plan_extract(base, ft, rank=4, clamp_quantile=bad)  # type: ignore[arg-type]


def test_clamp_quantile_whose_bound_is_not_positive_is_refused_naming_the_module(tmp_path: Path) -> None:
    """A quantile of 0.01 of roughly symmetric entries is negative: kohya's clamp to [-h, h] would then set every
    entry to h (a wrong delta): refused, naming the fine-tuned model, the module and its shape; nothing written."""
    base, ft, _ = _clamp_models(tmp_path)
    code, out, err = run_cli(["extract", str(base), str(ft), "--rank", "4", "--clamp-quantile", "0.01", "-o",
                              str(tmp_path / "out")])
    assert code != 0 and not out
    line = err.strip()
    assert "\n" not in line and "Traceback" not in line, err
    assert str(ft) in line and "m.big" in line and "(300, 200)" in line and "quantile" in line, line
    assert not (tmp_path / "out").exists()


def test_kohyas_spelling_names_the_option(tmp_path: Path) -> None:
    """kohya's --clamp_quantile / --min_diff are said as lorafuse's options, not a bare 'unrecognized'."""
    base, ft, _ = _clamp_models(tmp_path)
    for kohya, ours in (("--clamp_quantile", "--clamp-quantile"), ("--min_diff", "--min-diff")):
        code, _, err = run_cli(["extract", str(base), str(ft), "--rank", "4", kohya, "0.5", "-o",
                                str(tmp_path / "out")])
        assert code == 2 and ours in err, err
    code, out, _ = run_cli(["extract", "--help"])
    assert code == 0 and "--clamp-quantile" in out and "--min-diff" in out


# ----------------------------------------------------------------------------- 2. --min-diff


def _min_diff_models(tmp: Path) -> tuple[Path, Path, dict[str, float]]:
    """Three Linear modules whose deltas' largest |entry| is 2^-8, 2^-6 and 2^-3, each exact in float32 (weights
    on a 2^-10 grid, deltas on a 2^-12 grid); returns the folders and numpy's float64 max |W_ft - W_base|."""
    rng = np.random.default_rng(3)
    base, ft = {}, {}
    for name, top in (("a", 2.0**-8), ("b", 2.0**-6), ("c", 2.0**-3)):
        w = (rng.integers(-512, 512, (24, 16)) / 1024).astype(np.float32)
        d = rng.integers(-int(top * 4096), int(top * 4096) + 1, (24, 16)) / 4096
        d[0, 0] = -top
        base[f"m.{name}.weight"], ft[f"m.{name}.weight"] = w, (w + d).astype(np.float32)
    b, f = _pair(tmp, base, ft)
    return b, f, {k[2:-7]: float(np.max(np.abs(ft[k].astype(np.float64) - base[k]))) for k in base}


def test_min_diff_counts_modules_within_it_unchanged(tmp_path: Path) -> None:
    """kohya's rule: a difference is one when its largest |entry| is above min_diff; at or below it the module
    gets no LoRA, is counted unchanged and a note says how many. The others are extracted as without it."""
    base, ft, largest = _min_diff_models(tmp_path)
    assert largest == {"a": 2.0**-8, "b": 2.0**-6, "c": 2.0**-3}
    res = lorafuse.extract(base, ft, rank=2, min_diff=2.0**-6)
    kept = {m for m, top in largest.items() if top > 2.0**-6}
    assert {m.name for m in res.modules} == {f"m.{m}" for m in kept} == set(res.adapter.updates)
    assert res.unchanged == 2
    assert any("min_diff" in n and "2 fine-tuned weight matrices" in n for n in res.notes), res.notes
    plain = lorafuse.extract(base, ft, rank=2)
    assert plain.unchanged == 0 and len(plain.modules) == 3
    np.testing.assert_array_equal(res.adapter.updates["m.c"].B.f32(), plain.adapter.updates["m.c"].B.f32())
    zero = lorafuse.extract(base, ft, rank=2, min_diff=0)  # 0: only equal weights are unchanged
    assert len(zero.modules) == 3 and zero.unchanged == 0


def test_min_diff_above_every_difference_is_refused_saying_so(tmp_path: Path) -> None:
    base, ft, _ = _min_diff_models(tmp_path)
    with pytest.raises(UnsupportedError, match="min_diff=0.5"):
        lorafuse.extract(base, ft, tmp_path / "out", rank=2, min_diff=0.5)
    assert not (tmp_path / "out").exists()
    code, _, err = run_cli(["extract", str(base), str(ft), "--rank", "2", "--min-diff", "0.5", "-o",
                            str(tmp_path / "out")])
    assert code != 0 and "--min-diff" in err and "\n" not in err.strip() and "Traceback" not in err, err
    assert "same checkpoint" not in err  # they differ: not "is it the same checkpoint?"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [-0.01, float("inf"), float("nan"), False, "0.1"])
def test_min_diff_out_of_range_is_refused(tmp_path: Path, bad: object) -> None:
    base, ft, _ = _min_diff_models(tmp_path)
    with pytest.raises(LorafuseValueError, match="min_diff"):
        lorafuse.extract(base, ft, rank=2, min_diff=bad)  # type: ignore[arg-type]
    code, _, err = run_cli(["extract", str(base), str(ft), "--rank", "2", "--min-diff", "-1", "-o",
                            str(tmp_path / "out")])
    assert code == 2 and "--min-diff" in err


def test_min_diff_does_not_hide_a_nan(tmp_path: Path) -> None:
    """A NaN in the fine-tuned weight is no 'small difference': still refused naming the module."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    f = w.copy()
    f[3, 2] = np.nan
    base, ft = _pair(tmp_path, {"m.x.weight": w, "m.y.weight": w}, {"m.x.weight": f, "m.y.weight": w + 1})
    code, _, err = run_cli(["extract", str(base), str(ft), "--rank", "2", "--min-diff", "10", "-o",
                            str(tmp_path / "out")])
    assert code != 0 and "m.x" in err and "NaN" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_clamp_then_dtype_rounds_the_clamped_factors(tmp_path: Path) -> None:
    """--dtype fp16 (kohya's --save_precision) rounds the clamped factors once: the written F16 delta is the clamped
    float32 one within F16's rounding, and a min_diff module is still left out."""
    base, ft, deltas = _clamp_models(tmp_path)
    res32 = lorafuse.extract(base, ft, rank=4, clamp_quantile=0.95, min_diff=1e-9)
    res16 = lorafuse.extract(base, ft, tmp_path / "out", rank=4, clamp_quantile=0.95, min_diff=1e-9, dtype="fp16")
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    for module in deltas:
        b, a = _factors(tmp_path / "out", module)
        u = res32.adapter.updates[module]
        want = u.B.f32().reshape(b.shape[0], -1).astype(np.float64) @ u.A.f32().reshape(a.shape[0], -1)
        np.testing.assert_allclose(b @ a, want, atol=2e-3 * np.abs(want).max(), err_msg=module)
    assert len(res16.modules) == 3


# ----------------------------------------------------------------------------- 3. --conv-rank (kohya's --conv_dim)


class _Net(torch.nn.Module):
    """A 3x3 Conv2d, a 1x1 Conv2d, a k=3 Conv1d and a Linear: kohya's --conv_dim sets the first and the third."""

    def __init__(self) -> None:
        super().__init__()
        self.c3 = torch.nn.Conv2d(6, 12, 3, padding=1)
        self.c1 = torch.nn.Conv2d(12, 10, 1)
        self.t1 = torch.nn.Conv1d(10, 9, 3)
        self.lin = torch.nn.Linear(16, 20)


def _conv_models(tmp: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    torch.manual_seed(0)
    net = _Net()
    base = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    rng = np.random.default_rng(5)
    ft = {k: (v + (0.05 * rng.standard_normal(v.shape) if k.endswith(".weight") else 0)).astype(np.float32)
          for k, v in base.items()}
    b, f = _pair(tmp, base, ft)
    return b, f, {k[:-7]: ft[k].astype(np.float64) - base[k] for k in base if k.endswith(".weight")}


@pytest.mark.parametrize(("rule", "conv_rank", "want"), [
    ({"rank": 4}, 2, {"c3": 2, "c1": 4, "t1": 2, "lin": 4}),
    ({"rank": 2}, 5, {"c3": 5, "c1": 2, "t1": 5, "lin": 2}),
    ({"sv_fro": 1.0, "max_rank": 3}, 6, {"c3": 3, "c1": 3, "t1": 3, "lin": 3}),
])
def test_conv_rank_sets_kxk_convolutions_and_peft_merges_it(tmp_path: Path, rule: dict[str, float], conv_rank: int,
                                                            want: dict[str, int]) -> None:
    """kohya's --conv_dim: kxk convolutions (3x3 Conv2d, k=3 Conv1d) get conv_rank, 1x1 ones and Linear the rule
    (capped by max_rank); each module's delta is the optimal one of its rank (numpy float64, exact SVD path), and
    PEFT merges the written folder (its rank_pattern) into exactly those deltas."""
    from peft import PeftModel

    base, ft, deltas = _conv_models(tmp_path)
    res = lorafuse.extract(base, ft, tmp_path / "out", conv_rank=conv_rank, **rule)  # type: ignore[arg-type]
    assert {m.name: m.rank for m in res.modules} == want
    torch.manual_seed(0)
    net = _Net()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in load_file(str(base / "model.safetensors")).items()})
    merged = PeftModel.from_pretrained(net, str(tmp_path / "out")).merge_and_unload()
    got = {k[:-7]: v.detach().double().numpy() for k, v in merged.state_dict().items() if k.endswith(".weight")}
    w0 = load_file(str(base / "model.safetensors"))
    for module, d in deltas.items():
        d2 = d.reshape(d.shape[0], -1)
        u, s, vt = np.linalg.svd(d2)
        k = want[module]
        best = (u[:, :k] * s[:k]) @ vt[:k]
        np.testing.assert_allclose((got[module] - w0[f"{module}.weight"]).reshape(d2.shape), best, atol=2e-5,
                                   err_msg=module)


def test_conv_rank_without_kxk_convolutions_says_it_changed_nothing(tmp_path: Path) -> None:
    base, ft, _ = _conv_models(tmp_path)
    res = lorafuse.extract(base, ft, rank=2, conv_rank=4, exclude="c3|t1")
    assert {m.rank for m in res.modules} == {2}
    assert any("conv_rank 4" in n and "changed nothing" in n for n in res.notes), res.notes
    code, out, err = run_cli(["extract", str(base), str(ft), "--rank", "2", "--conv-rank", "3", "--dry-run", "-o",
                              str(tmp_path / "plan")])
    assert code == 0, err
    assert re.search(r"c3 +rank 3 ", out) and re.search(r"t1 +rank 3 ", out) and re.search(r"c1 +rank 2 ", out), out
    assert "rank 2, conv-rank 3" in out
    code, _, err = run_cli(["extract", str(base), str(ft), "--rank", "2", "--conv_dim", "3", "-o",
                            str(tmp_path / "out")])
    assert code == 2 and "--conv-rank" in err
    with pytest.raises(LorafuseValueError, match="conv_rank"):
        lorafuse.extract(base, ft, rank=2, conv_rank=0)


def test_min_diff_applies_to_an_embedding_kept_whole(tmp_path: Path) -> None:
    """--embeddings full keeps a changed embedding whole; one whose change is within --min-diff is unchanged, as a
    LoRA module within it is (not a 'changed' tensor kept whole while an equal-sized Linear change is dropped)."""
    rng = np.random.default_rng(4)
    emb = rng.standard_normal((50, 16)).astype(np.float32)
    lin = rng.standard_normal((16, 16)).astype(np.float32)
    base, ft = _pair(tmp_path, {"model.embed_tokens.weight": emb, "model.q_proj.weight": lin},
                     {"model.embed_tokens.weight": emb + np.float32(2.0**-10), "model.q_proj.weight": lin + 1})
    res = lorafuse.extract(base, ft, rank=2, embeddings="full", min_diff=2.0**-8)
    assert not res.adapter.full and set(res.adapter.updates) == {"model.q_proj"} and res.unchanged == 1
    kept = lorafuse.extract(base, ft, rank=2, embeddings="full", min_diff=2.0**-12)
    assert set(kept.adapter.full) == {"model.embed_tokens.weight"}


def test_recipe_extract_takes_conv_rank_clamp_quantile_and_min_diff(tmp_path: Path) -> None:
    """A recipe's extract stage takes the three options, as the command line: the same factors."""
    base, ft, _ = _conv_models(tmp_path)
    (tmp_path / "x.yml").write_text("merge_method: extract\nbase_model: base\nmodels: [{model: ft}]\n"
                                    "parameters: {rank: 2, conv_rank: 3, clamp_quantile: 0.95, min_diff: 0.0001}\n")
    lorafuse.run(tmp_path / "x.yml", tmp_path / "by-recipe")
    code, _, err = run_cli(["extract", str(base), str(ft), "--rank", "2", "--conv-rank", "3", "--clamp-quantile",
                            "0.95", "--min-diff", "0.0001", "-q", "-o", str(tmp_path / "by-hand")])
    assert code == 0, err
    a = load_file(str(tmp_path / "by-recipe" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "by-hand" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a["base_model.model.c3.lora_A.weight"].shape[0] == 3
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    (tmp_path / "bad.yml").write_text("merge_method: extract\nbase_model: base\nmodels: [{model: ft}]\n"
                                      "parameters: {rank: 2, clamp_quantile: 1.5}\n")
    with pytest.raises(LorafuseValueError, match="clamp_quantile"):
        lorafuse.run(tmp_path / "bad.yml", tmp_path / "never")
    assert not (tmp_path / "never").exists()
