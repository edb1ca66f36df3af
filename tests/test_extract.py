"""extract: a LoRA from a fine-tuned model and its base, against PEFT's own merge and numpy float64."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import peft_fixtures as pf
import pytest
import torch
from peft import PeftModel
from safetensors.numpy import load_file, save_file

import lorafuse
from lorafuse.cli import main
from lorafuse.ops.extract import extract
from lorafuse.ops.rank import RankRule


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> tuple[pf.Case, Path]:
    """A base, and that base merged with a real PEFT rank-4 adapter by merge_and_unload (float32)."""
    tmp = tmp_path_factory.mktemp("extract")
    case = pf.llama_case(tmp, r=4, target_modules=(*pf.LLAMA_TARGETS, "embed_tokens"))
    ft = tmp / "finetuned"
    copy.deepcopy(case.peft_model).merge_and_unload().save_pretrained(str(ft), max_shard_size="100KB")
    return case, ft


def rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def test_extract_recovers_the_adapter_delta(merged: tuple[pf.Case, Path]) -> None:
    case, ft = merged
    res = extract(case.base_dir, ft, RankRule(rank=4), embeddings="lora")
    adapter = lorafuse.load(case.adapter_dir)
    assert set(res.adapter.updates) == set(adapter.updates)
    for name, u in adapter.updates.items():
        assert rel(res.adapter.updates[name].delta(), u.delta()) < 1e-3, name
    by_name = {m.name: m for m in res.modules}
    assert all(m.rank == 4 and m.rel_error < 1e-3 for m in by_name.values())
    assert res.unchanged == 1 and not res.skipped  # lm_head took no update; nothing else was left out


def test_extracted_adapter_loads_in_peft_and_reproduces_the_finetuned_logits(merged: tuple[pf.Case, Path],
                                                                              tmp_path: Path) -> None:
    case, ft = merged
    out = tmp_path / "extracted"
    assert main(["extract", str(case.base_dir), str(ft), "--rank", "4", "--embeddings", "lora", "-o", str(out),
                 "-q"]) == 0
    model = PeftModel.from_pretrained(case.model_cls.from_pretrained(str(case.base_dir)), str(out)).eval()
    finetuned = case.model_cls.from_pretrained(str(ft)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(case.input_ids).logits, finetuned(case.input_ids).logits, rtol=0,
                                   atol=1e-3)


def test_rank_rules_on_a_known_spectrum(tmp_path: Path) -> None:
    """W_ft = W_base + U diag(0.6^i) V^T: the rule picks the rank the exact spectrum gives,
    and the error is within 1% of the optimal truncated-SVD error."""
    rng = np.random.default_rng(0)
    base, ft = tmp_path / "base", tmp_path / "ft"
    base.mkdir()
    ft.mkdir()
    wb, wf, spectra = {}, {}, {}
    for i, (out, inp) in enumerate([(96, 64), (64, 160), (128, 128)]):
        key = f"layers.{i}.proj.weight"
        w = rng.standard_normal((out, inp)).astype(np.float32)
        u, _ = np.linalg.qr(rng.standard_normal((out, 40)))
        v, _ = np.linalg.qr(rng.standard_normal((inp, 40)))
        s = 0.6 ** np.arange(40)
        wb[key], wf[key] = w, (w + (u * s) @ v.T).astype(np.float32)
        spectra[key] = np.linalg.svd(wf[key].astype(np.float64) - w, compute_uv=False)
    wb["norm.weight"] = wf["norm.weight"] = np.ones(8, np.float32)
    save_file(wb, str(base / "model.safetensors"))
    save_file(wf, str(ft / "model.safetensors"))
    for rule in (RankRule(sv_fro=0.99, max_rank=32), RankRule(sv_ratio=20.0, max_rank=32), RankRule(rank=5)):
        res = extract(base, ft, rule, power_iters=3)
        for m in res.modules:
            s = spectra[m.name + ".weight"]
            assert m.rank == rule.choose(s[:32], float(np.sum(s**2))), (rule, m.name)
            optimum = np.sqrt(np.sum(s[m.rank:] ** 2) / np.sum(s**2))
            assert m.rel_error <= 1.01 * optimum + 1e-6
            d = wf[m.name + ".weight"].astype(np.float64) - wb[m.name + ".weight"]
            assert rel(res.adapter.updates[m.name].delta(), d) == pytest.approx(m.rel_error, rel=1e-3, abs=1e-6)
        assert res.unchanged == 0


def test_include_exclude_embeddings_and_mismatches(merged: tuple[pf.Case, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    case, ft = merged
    res = extract(case.base_dir, ft, RankRule(rank=2), include=r"layers\.0\.", exclude="mlp")
    assert res.adapter.updates and all(n.startswith("model.layers.0.self_attn") for n in res.adapter.updates)
    # embeddings kept whole and no LoRA module: PEFT refuses such an adapter (NoMatchingPeftModuleError)
    with pytest.raises(lorafuse.UnsupportedError, match="no LoRA module.*--embeddings lora"):
        extract(case.base_dir, ft, RankRule(rank=2), include="embed", embeddings="full")
    full = extract(case.base_dir, ft, RankRule(rank=2), include=r"embed|layers\.0\.self_attn\.q_proj",
                   embeddings="full")
    assert list(full.adapter.updates) == ["model.layers.0.self_attn.q_proj"]
    assert list(full.adapter.full) == ["model.embed_tokens.weight"]
    ref = {}
    for f in ft.glob("*.safetensors"):
        ref.update(load_file(str(f)))
    np.testing.assert_array_equal(full.adapter.full["model.embed_tokens.weight"].raw,
                                  ref["model.embed_tokens.weight"])
    # a fine-tuned model whose q_proj changed shape is reported, not guessed
    odd = tmp_path / "odd"
    odd.mkdir()
    tensors = dict(ref)
    tensors["model.layers.0.self_attn.q_proj.weight"] = np.zeros((8, 64), np.float32)
    save_file(tensors, str(odd / "model.safetensors"))
    res = extract(case.base_dir, odd, RankRule(rank=2))
    assert any("q_proj" in s and "shape" in s for s in res.skipped)
    assert "model.layers.0.self_attn.q_proj" not in res.adapter.updates
    assert main(["extract", str(case.base_dir), str(odd), "--rank", "2", "--json", "-o", str(tmp_path / "j")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["modules"]) == len(res.modules)
    with pytest.raises(lorafuse.LorafuseValueError, match="regular expression"):
        extract(case.base_dir, ft, RankRule(rank=2), include="(")
