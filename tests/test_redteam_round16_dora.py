"""Red-team round 16, DoRA: DoRA adapters (PEFT use_dora) through apply with several adapters at once, checked
against the real PEFT merge_and_unload and a float64 numpy reference."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from lorafuse.cli import main

EMB = "base_model.model.model.embed_tokens."
EMB_KEY = "model.embed_tokens.weight"


def _base(tmp: Path) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(str(tmp / "base"))
    return tmp / "base"


def _adapter(base: Path, out: Path, seed: int, dora: bool, targets: tuple[str, ...]) -> Path:
    """A real PEFT adapter (embedding targeted: PEFT saves its copy of the embedding's weight with it)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(LlamaForCausalLM.from_pretrained(str(base)),
                            LoraConfig(target_modules=list(targets), r=2, lora_alpha=4, use_dora=dora,
                                       init_lora_weights=False))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_A" in n or "lora_B" in n or "lora_embedding" in n:
                    p.copy_(torch.randn(p.shape) * 0.05)
                elif "magnitude" in n:
                    p.mul_(1 + 0.2 * torch.randn(p.shape))
        pm.save_pretrained(str(out))
    return out


def _peft_merged(base: Path, adapters: list[Path]) -> dict[str, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = [f"a{i}" for i in range(len(adapters))]
        pm = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(base)), str(adapters[0]),
                                       adapter_name=names[0])
        for n, a in zip(names[1:], adapters[1:]):
            pm.load_adapter(str(a), adapter_name=n)
        sd = pm.merge_and_unload(adapter_names=names).state_dict()
    return {k: v.double().numpy() for k, v in sd.items()}


def _f64_embedding(base: Path, adapters: list[Path]) -> np.ndarray:
    """float64 reference of the embedding after the adapters in order: a DoRA one rescales the columns of everything
    merged before it by m / ||W_base + its own delta|| (per column: PEFT's DoRA embedding is fan_in_fan_out)."""
    w0 = load_file(str(base / "model.safetensors"))[EMB_KEY].double().numpy()
    w = w0.copy()
    for a in adapters:
        t = load_file(str(a / "adapter_model.safetensors"))
        d = 2.0 * (t[EMB + "lora_embedding_B"].double().numpy() @ t[EMB + "lora_embedding_A"].double().numpy()).T
        m = t.get(EMB + "lora_magnitude_vector")
        w = w + d if m is None else (m.double().numpy() / np.linalg.norm(w0 + d, axis=0))[None, :] * (w + d)
    return w


@pytest.mark.parametrize("kinds", ["dd", "pd"])
def test_two_adapters_on_an_embedding_with_dora_match_peft(tmp_path, kinds, capsys):
    """Each PEFT adapter targeting embed_tokens carries PEFT's copy of the base embedding (base_layer.weight); two
    such adapters hold the same copy, which PEFT loads twice. lorafuse refused the pair ('replaced by both')."""
    base = _base(tmp_path)
    targets = ("embed_tokens", "q_proj")
    adapters = [_adapter(base, tmp_path / f"a{i}", 10 + i, k == "d", targets) for i, k in enumerate(kinds)]
    out = tmp_path / "out"
    assert main(["apply", str(base), *map(str, adapters), "-o", str(out)]) == 0, capsys.readouterr().err
    got = {k: v.double().numpy() for k, v in load_file(str(out / "model.safetensors")).items()}
    ref = _peft_merged(base, adapters)
    for key in (EMB_KEY, "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
        scale = np.abs(ref[key]).max()
        assert np.abs(got[key] - ref[key]).max() <= 1e-5 * scale, key
    f64 = _f64_embedding(base, adapters)
    assert np.abs(got[EMB_KEY] - f64).max() <= 2e-6 * np.abs(f64).max()


def test_dry_run_of_two_embedding_adapters_matches_the_run(tmp_path, capsys):
    base = _base(tmp_path)
    adapters = [_adapter(base, tmp_path / f"a{i}", 20 + i, True, ("embed_tokens",)) for i in range(2)]
    out = tmp_path / "out"
    assert main(["apply", str(base), *map(str, adapters), "-o", str(out), "--dry-run", "--json"]) == 0, \
        capsys.readouterr().err
    plan = json.loads(capsys.readouterr().out)
    assert not out.exists()
    assert main(["apply", str(base), *map(str, adapters), "-o", str(out), "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert plan["merged"] == done["merged"] == [EMB_KEY] and plan["replaced"] == done["replaced"] == [EMB_KEY]
    assert plan["tensors"] == done["tensors"]
    merged = load_file(str(out / "model.safetensors"))[EMB_KEY].double().numpy()
    f64 = _f64_embedding(base, adapters)
    assert np.abs(merged - f64).max() <= 2e-6 * np.abs(f64).max()


def test_two_adapters_with_different_base_layer_copies_are_refused_saying_why(tmp_path, capsys):
    """Copies that differ (adapters trained on different bases): PEFT silently installs the last one under every
    adapter; lorafuse refuses, and the message says the copies differ (it named only the two files)."""
    base = _base(tmp_path)
    a0 = _adapter(base, tmp_path / "a0", 30, True, ("embed_tokens",))
    a1 = _adapter(base, tmp_path / "a1", 31, True, ("embed_tokens",))
    other = tmp_path / "a1x"
    shutil.copytree(a1, other)
    t = load_file(str(a1 / "adapter_model.safetensors"))
    t[EMB + "base_layer.weight"] = t[EMB + "base_layer.weight"] * 1.5
    save_file(t, str(other / "adapter_model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    assert main(["apply", str(base), str(a0), str(other), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert EMB_KEY in err and str(a0) in err and str(other) in err and "weight differ" in err
    assert "Traceback" not in err and not out.exists()


def test_dora_with_a_lora_bias_is_refused_as_peft_refuses_it(tmp_path, capsys):
    """use_dora and lora_bias together: PEFT's LoraConfig refuses them (so no merge of PEFT's defines where the
    bias goes); lorafuse merged the weight by DoRA and added scale * bias to the base bias, a guess."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, attention_bias=True)
    LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "base"))
    base = tmp_path / "base"
    ad = _adapter(base, tmp_path / "ad", 40, True, ("q_proj",))
    t = load_file(str(ad / "adapter_model.safetensors"))
    for k in [k for k in t if k.endswith("lora_B.weight")]:
        t[k.replace(".weight", ".bias")] = torch.randn(t[k].shape[0]) * 0.1
    save_file(t, str(ad / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**config, "lora_bias": True}))
    with pytest.raises(ValueError, match="not supported for DoRA"):
        PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(base)), str(ad))
    for extra in (["--dry-run"], []):
        assert main(["apply", str(base), str(ad), "-o", str(tmp_path / "out"), *extra]) == 1
        err = capsys.readouterr().err
        assert "is DoRA and has a lora_B bias" in err and "q_proj" in err and "Traceback" not in err
        assert not (tmp_path / "out").exists()
