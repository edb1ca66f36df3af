"""Lead's round-6 mends: a transformers config.json naming its weights file (`transformers_weights`) is read, merged
and fetched as transformers loads it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import lorafuse
from lorafuse.errors import FormatError
from lorafuse.io.checkpoint import Checkpoint


def _tiny_llama(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(folder)


def _adapter(base: Path, folder: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(folder)


@pytest.fixture()
def named_base(tmp_path: Path) -> Path:
    """A folder whose config.json names consolidated.safetensors, beside a decoy model.safetensors of zeros."""
    base = tmp_path / "base"
    _tiny_llama(base)
    (base / "model.safetensors").rename(base / "consolidated.safetensors")
    real = load_file(base / "consolidated.safetensors")
    save_file({k: np.zeros_like(v) for k, v in real.items()}, base / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((base / "config.json").read_text())
    cfg["transformers_weights"] = "consolidated.safetensors"
    (base / "config.json").write_text(json.dumps(cfg))
    return base


def test_the_checkpoint_reads_the_file_the_config_names(named_base: Path) -> None:
    ckpt = Checkpoint(named_base)
    assert ckpt.shards == ["consolidated.safetensors"]
    assert any("transformers_weights" in n for n in ckpt.notes)


def test_apply_merges_the_named_file_and_transformers_loads_the_merge(named_base: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    _adapter(named_base, tmp_path / "lora")
    out = tmp_path / "out"
    lorafuse.apply(named_base, [tmp_path / "lora"], out=out)
    # the reference: what transformers loads (the named file) merged by PEFT
    ref = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(named_base), tmp_path / "lora").merge_and_unload()
    want = {k: v.detach().float().numpy() for k, v in ref.state_dict().items()}
    got = LlamaForCausalLM.from_pretrained(out).state_dict()
    assert (out / "consolidated.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["transformers_weights"] == "consolidated.safetensors"
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight",
                 "model.layers.0.mlp.up_proj.weight"):
        np.testing.assert_allclose(got[name].float().numpy(), want[name], rtol=1e-6, atol=1e-6)
    assert np.abs(got["model.layers.0.self_attn.q_proj.weight"].float().numpy()).max() > 0  # not the decoy


@pytest.mark.parametrize("value, said", [
    ("../other.safetensors", "is a path"),
    ("pytorch_model.bin", "is not a FILE.safetensors"),
    ("missing.safetensors", "is not a file in"),
    (7, "is not a file name"),
])
def test_a_named_file_lorafuse_cannot_read_as_transformers_does_is_refused(named_base: Path, value: object,
                                                                           said: str) -> None:
    cfg = json.loads((named_base / "config.json").read_text())
    cfg["transformers_weights"] = value
    (named_base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="transformers_weights") as e:
        Checkpoint(named_base)
    assert said in str(e.value)


def test_a_named_index_is_read_with_its_shards(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    save_file({"a": np.ones((2, 2), np.float32)}, base / "part-1.safetensors")
    save_file({"b": np.ones((2, 2), np.float32)}, base / "part-2.safetensors")
    save_file({"a": np.zeros((2, 2), np.float32)}, base / "model.safetensors")
    (base / "weights.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "part-1.safetensors", "b": "part-2.safetensors"}}))
    (base / "config.json").write_text(json.dumps({"transformers_weights": "weights.safetensors.index.json"}))
    ckpt = Checkpoint(base)
    assert ckpt.shards == ["part-1.safetensors", "part-2.safetensors"]
    assert ckpt.index_name == "weights.safetensors.index.json"



def test_the_cli_leaves_a_signal_handler_set_outside_python_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """An embedding application's own C handler (getsignal: None) could not be put back by Python: the CLI leaves
    that signal alone instead of failing (TypeError) after the command; the others it sets and puts back."""
    import signal

    from redteam_fixtures import peft_folder

    from lorafuse import cli

    peft_folder(tmp_path / "a", {"model.layers.0.self_attn.q_proj": (8, 6)}, 1)
    real_getsignal, real_signal = signal.getsignal, signal.signal
    hup_before = real_getsignal(signal.SIGHUP)
    set_calls: list[int] = []

    def getsignal(s: int) -> object:
        return None if s == signal.SIGTERM else real_getsignal(s)

    def set_signal(s: int, h: object) -> object:
        set_calls.append(s)
        return real_signal(s, h)  # type: ignore[arg-type]

    monkeypatch.setattr(signal, "getsignal", getsignal)
    monkeypatch.setattr(signal, "signal", set_signal)
    assert cli.main(["info", str(tmp_path / "a")]) == 0
    assert "model.layers.0.self_attn.q_proj" in capsys.readouterr().out
    assert signal.SIGTERM not in set_calls
    if hup_before is signal.SIG_DFL:  # caught during the command, then put back
        assert set_calls.count(signal.SIGHUP) == 2 and real_getsignal(signal.SIGHUP) is signal.SIG_DFL
