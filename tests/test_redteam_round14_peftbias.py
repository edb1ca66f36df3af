"""Red-team round 14, peftbias: the parts of a PEFT LoRA beyond A and B (lora_B biases, modules_to_save,
trainable tokens) in similarity, info and the refusals, against the real peft package on adapters peft saves."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import peft_fixtures as pf
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import LlamaForCausalLM

import lorafuse


@pytest.fixture(scope="module")
def bias_case(tmp_path_factory: pytest.TempPathFactory) -> pf.Case:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pf.llama_case(tmp_path_factory.mktemp("bias"), lora_bias=True, target_modules=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def mts_case(tmp_path_factory: pytest.TempPathFactory) -> pf.Case:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pf.llama_case(tmp_path_factory.mktemp("mts"), target_modules=("q_proj", "v_proj"),
                             modules_to_save=("lm_head",))


def _param_delta(case: pf.Case, adapter: Path) -> np.ndarray:
    """Everything peft's merge_and_unload changes (weights and biases), float64, as one vector."""
    def load() -> torch.nn.Module:
        return LlamaForCausalLM.from_pretrained(str(case.base_dir), dtype=torch.float64)

    base = {k: v.detach().numpy() for k, v in load().state_dict().items()}
    merged = pf.peft_merged_state(load, adapter)
    return np.concatenate([(merged[k] - base[k]).ravel() for k in sorted(base)])


def _other_biases(case: pf.Case, out: Path, seed: int) -> Path:
    """A copy of the case's adapter with the same lora_A / lora_B weights and other lora_B biases."""
    shutil.copytree(case.adapter_dir, out)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    rng = np.random.default_rng(seed)
    for k, v in tensors.items():
        if k.endswith(".lora_B.bias"):
            tensors[k] = (rng.standard_normal(v.shape) * 0.5).astype(np.float32)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def test_similarity_counts_the_lora_b_biases_peft_merges(bias_case: pf.Case, tmp_path: Path) -> None:
    # Two adapters with the same A and B and different lora_B biases: PEFT's merges differ in every adapted
    # bias, so the cosine of what they change is not 1; similarity dropped the biases and said 1.0.
    other = _other_biases(bias_case, tmp_path / "other", seed=3)
    d1, d2 = _param_delta(bias_case, bias_case.adapter_dir), _param_delta(bias_case, other)
    expected = float(d1 @ d2 / (np.linalg.norm(d1) * np.linalg.norm(d2)))
    assert expected < 0.99
    cos = lorafuse.similarity([bias_case.adapter_dir, other])
    assert cos[0, 1] == pytest.approx(expected, abs=1e-6)
    assert cos[0, 0] == pytest.approx(1.0, abs=1e-9)


def test_similarity_of_biases_alone_is_theirs(bias_case: pf.Case, tmp_path: Path) -> None:
    # lora_B weights zeroed: the adapters change biases only (PEFT merges s * lora_B.bias); their cosine is
    # that of the bias changes, not 0 with a note that the delta is zero.
    folders = []
    for seed in (4, 5):
        folder = _other_biases(bias_case, tmp_path / f"b{seed}", seed=seed)
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        for k in [k for k in tensors if k.endswith(".lora_B.weight")]:
            tensors[k] = np.zeros_like(tensors[k])
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        folders.append(folder)
    d1, d2 = (_param_delta(bias_case, f) for f in folders)
    expected = float(d1 @ d2 / (np.linalg.norm(d1) * np.linalg.norm(d2)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "its delta is zero" note
        cos = lorafuse.similarity(folders)
    assert cos[0, 1] == pytest.approx(expected, abs=1e-6)


def test_similarity_says_it_leaves_out_modules_to_save_tensors(mts_case: pf.Case, tmp_path: Path) -> None:
    # A modules_to_save tensor replaces the base weight whole: what it changes needs the base. Two adapters
    # whose lm_head replacements differ got cosine 1.0 and not a word about lm_head.
    other = tmp_path / "other"
    shutil.copytree(mts_case.adapter_dir, other)
    tensors = load_file(str(other / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.weight"] = -tensors["base_model.model.lm_head.weight"]
    save_file(tensors, str(other / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"modules_to_save tensors \(lm_head\.weight\).*left out") as rec:
        lorafuse.similarity([mts_case.adapter_dir, other])
    assert sum("lm_head.weight" in str(w.message) for w in rec) == 2  # one note per adapter


def test_similarity_cli_prints_the_modules_to_save_note(mts_case: pf.Case, capsys: pytest.CaptureFixture[str]) -> None:
    from lorafuse.cli import main

    code = main(["similarity", str(mts_case.adapter_dir), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert any("lm_head.weight" in n and "left out" in n for n in out["notes"]), out["notes"]


def test_info_text_says_the_adapter_has_lora_b_biases(bias_case: pf.Case, capsys: pytest.CaptureFixture[str]) -> None:
    # PEFT's merge changes 4 base biases (lora_bias=True); info's text report never said so.
    from lorafuse.cli import main

    assert main(["info", str(bias_case.adapter_dir)]) == 0
    out = capsys.readouterr().out
    line = next((x for x in out.splitlines() if x.strip().startswith("lora_bias")), None)
    assert line is not None and "4 modules" in line, out


@pytest.mark.parametrize("indices, where", [({"embed_tokens": [3, 5]}, "model.embed_tokens.token_adapter"),
                                            ([3, 5], "model.embed_tokens.token_adapter")])
def test_trainable_tokens_refusal_names_the_embedding_module(bias_case: pf.Case, tmp_path: Path, indices: object,
                                                            where: str) -> None:
    # A real PEFT adapter with trainable tokens (rows of embed_tokens replaced): apply merges them (round 15:
    # tests/test_redteam_round15_peftmerge.py); combining refuses them, and the one-line reason says which module's
    # rows they replace.
    from peft import LoraConfig

    def load() -> torch.nn.Module:
        return LlamaForCausalLM.from_pretrained(str(bias_case.base_dir), dtype=torch.float32)

    cfg = LoraConfig(target_modules=["q_proj"], r=2, lora_alpha=4, trainable_token_indices=indices,
                     init_lora_weights=False)
    adapter = pf.peft_saved_adapter(tmp_path, load, cfg)
    assert any(k.endswith("token_adapter.trainable_tokens_delta")
               for k in load_file(str(adapter / "adapter_model.safetensors")))
    with pytest.raises(lorafuse.UnsupportedError, match="trainable_token_indices") as err:
        lorafuse.combine([adapter, adapter], method="cat")
    assert where in str(err.value) and "\n" not in str(err.value)
