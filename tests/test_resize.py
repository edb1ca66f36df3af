"""resize against numpy float64 (dense delta, full SVD, truncation) and the real PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import peft_fixtures as pf
import pytest
import torch
from peft import PeftModel

import lorafuse
from lorafuse.cli import main
from lorafuse.ops.rank import RankRule
from lorafuse.ops.resize import resize


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> pf.Case:
    return pf.llama_case(tmp_path_factory.mktemp("resize"), r=8, lora_alpha=12,
                         rank_pattern={"down_proj": 6}, alpha_pattern={"q_proj": 3})


def spectrum(d: np.ndarray) -> np.ndarray:
    return np.linalg.svd(d, compute_uv=False)


def expected_rank(rule: RankRule, s: np.ndarray, r: int) -> int:
    """The rules of DESIGN section 4, written out independently on the exact singular values."""
    s = s[:r]
    if rule.rank is not None:
        k = rule.rank
    elif rule.sv_ratio is not None:
        k = int(sum(1 for x in s if x > s[0] / rule.sv_ratio))
    elif rule.sv_fro is not None:
        total = np.sqrt(np.sum(s**2))
        k = next(i for i in range(1, len(s) + 1) if np.sqrt(np.sum(s[:i] ** 2)) / total >= rule.sv_fro - 1e-12)
    else:
        k = next(i for i in range(1, len(s) + 1) if np.sum(s[:i]) / np.sum(s) >= rule.sv_cumulative - 1e-12)
    if rule.max_rank:
        k = min(k, rule.max_rank)
    return max(1, min(k, r))


@pytest.mark.parametrize("rule", [
    RankRule(rank=3),
    RankRule(rank=100),
    RankRule(sv_ratio=4.0),
    RankRule(sv_fro=0.8),
    RankRule(sv_fro=0.95, max_rank=4),
    RankRule(sv_cumulative=0.7),
])
def test_resize_is_eckart_young_optimal_with_the_rule_ranks(case: pf.Case, rule: RankRule) -> None:
    adapter = lorafuse.load(case.adapter_dir)
    out, report = resize(adapter, rule)
    by_name = {m.name: m for m in report}
    for name, u in adapter.updates.items():
        d = u.delta()
        s = spectrum(d)
        k = expected_rank(rule, s, u.rank)
        got = out.updates[name]
        assert got.rank == k == by_name[name].rank_out, name
        assert got.scale == pytest.approx(u.scale)
        optimum = np.sqrt(np.sum(s[k:] ** 2))
        assert np.linalg.norm(got.delta() - d) == pytest.approx(optimum, rel=1e-5, abs=1e-6 * s[0]), name
        assert by_name[name].fro_kept == pytest.approx(np.sqrt(np.sum(s[:k] ** 2) / np.sum(s**2)), rel=1e-9)


def test_resize_to_full_rank_is_lossless(case: pf.Case) -> None:
    adapter = lorafuse.load(case.adapter_dir)
    out, report = resize(adapter, RankRule(rank=64))
    for name, u in adapter.updates.items():
        d = u.delta()
        assert np.abs(out.updates[name].delta() - d).max() <= 1e-5 * np.abs(d).max()
        assert out.updates[name].rank == u.rank
    assert all(m.fro_kept == pytest.approx(1.0) for m in report)


def test_resized_adapter_loads_in_peft_with_the_dense_svd_logits(case: pf.Case, tmp_path: Path) -> None:
    out = tmp_path / "r3"
    assert main(["resize", str(case.adapter_dir), "--rank", "3", "-o", str(out), "-q"]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["use_rslora"] is False
    peft_model = PeftModel.from_pretrained(case.model_cls.from_pretrained(str(case.base_dir)), str(out)).eval()
    # reference: the base plus every delta truncated by numpy's dense SVD
    ref_model = case.model_cls.from_pretrained(str(case.base_dir)).eval()
    adapter = lorafuse.load(case.adapter_dir)
    with torch.no_grad():
        for name, u in adapter.updates.items():
            uu, s, vt = np.linalg.svd(u.delta(), full_matrices=False)
            w = ref_model.get_submodule(name).weight
            w += torch.from_numpy(uu[:, :3] @ np.diag(s[:3]) @ vt[:3]).to(w.dtype)
        got, ref = peft_model(case.input_ids).logits, ref_model(case.input_ids).logits
        full = case.peft_model(case.input_ids).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    assert (got - full).abs().max() > 1e-3  # rank 3 really changed something


def test_resize_cli_reports(case: pf.Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fro"
    assert main(["resize", str(case.adapter_dir), "--sv-fro", "0.9", "--json", "-o", str(out)]) == 0
    data = json.loads(capsys.readouterr().out)
    adapter = lorafuse.load(case.adapter_dir)
    assert {m["name"] for m in data["modules"]} == set(adapter.updates)
    for m in data["modules"]:
        assert m["fro_kept"] >= 0.9 - 1e-9 and m["rank"] <= m["rank_in"]
    assert main(["resize", str(case.adapter_dir), "--rank", "2", "--verbose", "-o", str(tmp_path / "v")]) == 0
    text = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in text and "resized" in text
    # exactly one rule is required; bad values are refused
    with pytest.raises(SystemExit):
        main(["resize", str(case.adapter_dir), "-o", str(tmp_path / "x")])
    for bad in (["--sv-fro", "1.5"], ["--rank", "0"]):  # out of range: an argparse error (exit 2) naming the option
        with pytest.raises(SystemExit) as exited:
            main(["resize", str(case.adapter_dir), *bad, "-o", str(tmp_path / "x")])
        assert exited.value.code == 2
    assert not (tmp_path / "x").exists()


def test_rank_rule_validation() -> None:
    with pytest.raises(lorafuse.LorafuseValueError, match="exactly one"):
        RankRule(rank=2, sv_fro=0.5)
    with pytest.raises(lorafuse.LorafuseValueError, match="sv_ratio"):
        RankRule(sv_ratio=0.5)
    assert RankRule(sv_ratio=2).choose(np.array([4.0, 2.0, 1.0])) == 1  # 2.0 is not > 4 / 2
    assert RankRule(sv_fro=1.0).choose(np.array([3.0, 4.0 * 0, 0.0])) == 1
    assert RankRule(sv_cumulative=0.5, max_rank=1).choose(np.array([1.0, 1.0, 1.0])) == 1


def test_resize_refuses_dora(tmp_path: Path) -> None:
    dora = pf.llama_case(tmp_path, use_dora=True)
    with pytest.raises(lorafuse.UnsupportedError, match="DoRA"):
        resize(lorafuse.load(dora.adapter_dir), RankRule(rank=2))
