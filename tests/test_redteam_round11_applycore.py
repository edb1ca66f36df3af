"""Red-team round 11, `lorafuse apply` on plain transformers checkpoints: what of the model folder the merged
folder keeps, and what apply says about the adapters it is given."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from redteam_fixtures import llm_base, peft_deltas, peft_folder, run_cli
from safetensors.numpy import load_file

SHAPES = {"model.layers.0.self_attn.q_proj": (8, 8)}


def _base_with_templates(folder: Path) -> Path:
    base = llm_base(folder, SHAPES)
    (base / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    extra = base / "additional_chat_templates"  # what transformers' save_pretrained writes for named templates
    extra.mkdir()
    (extra / "tool_use.jinja").write_text("{{ tools | tojson }}{% for m in messages %}{{ m }}{% endfor %}\n")
    (extra / "rag.jinja").write_bytes(b"{{ documents }}\xc3\xa9\n")
    return base


def test_apply_copies_the_named_chat_templates(tmp_path: Path) -> None:
    """transformers keeps a tokenizer's named chat templates (tool_use, rag, ...) in additional_chat_templates/;
    the merged folder must hold them byte for byte, as PEFT's merge + save_pretrained of the tokenizer does
    (lorafuse left the folder out with a note: the merged model lost its tool-use template)."""
    base = _base_with_templates(tmp_path / "base")
    adapter = peft_folder(tmp_path / "a", SHAPES, 1)
    out = tmp_path / "out"
    code, _, err = run_cli(["apply", str(base), str(adapter), "-o", str(out)])
    assert code == 0, err
    for name in ("chat_template.jinja", "additional_chat_templates/tool_use.jinja",
                 "additional_chat_templates/rag.jinja", "config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    assert "additional_chat_templates" not in err
    # the weights are still the merge, and a re-run replaces its own output (the manifest lists the folder)
    merged = load_file(str(out / "model.safetensors"))
    w = load_file(str(base / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj"
    np.testing.assert_allclose(merged[f"{key}.weight"], w[f"{key}.weight"] + peft_deltas(adapter)[key],
                               rtol=0, atol=1e-5)
    code, _, err = run_cli(["apply", str(base), str(adapter), "-o", str(out)])
    assert code == 0, err


def _named(folder: Path, seed: int, name: str | None) -> Path:
    extra = {} if name is None else {"base_model_name_or_path": name}
    return peft_folder(folder, SHAPES, seed, extra=extra)


def test_apply_notes_adapters_that_name_different_base_models(tmp_path: Path) -> None:
    """Two adapters whose adapter_config.json name different base models: merged as asked (the weights are
    right), with a note naming both, as `combine` gives one (lorafuse said nothing)."""
    base = llm_base(tmp_path / "base", SHAPES)
    a = _named(tmp_path / "a", 1, "Qwen/Qwen3-0.6B")
    b = _named(tmp_path / "b", 2, "meta-llama/Llama-3.2-1B")
    out = tmp_path / "out"
    code, text, err = run_cli(["apply", str(base), str(a), str(b), "--weights", "1,-0.5", "-o", str(out), "--json"])
    assert code == 0, err
    notes = json.loads(text)["notes"]
    said = [n for n in notes if "base_model_name_or_path" in n]
    assert len(said) == 1, notes
    assert "Qwen/Qwen3-0.6B" in said[0] and "meta-llama/Llama-3.2-1B" in said[0] and str(b) in said[0]
    key = "model.layers.0.self_attn.q_proj"
    w = load_file(str(base / "model.safetensors"))[f"{key}.weight"].astype(np.float64)
    expected = w + peft_deltas(a)[key] - 0.5 * peft_deltas(b)[key]
    np.testing.assert_allclose(load_file(str(out / "model.safetensors"))[f"{key}.weight"], expected,
                               rtol=0, atol=1e-5)


def test_apply_says_nothing_when_the_adapters_agree(tmp_path: Path) -> None:
    """The same base named by both (or one naming none, a kohya-like config): no such note."""
    base = llm_base(tmp_path / "base", SHAPES)
    a = _named(tmp_path / "a", 1, "Qwen/Qwen3-0.6B")
    b = _named(tmp_path / "b", 2, "Qwen/Qwen3-0.6B")
    c = _named(tmp_path / "c", 3, None)
    code, text, err = run_cli(["apply", str(base), str(a), str(b), str(c), "-o", str(tmp_path / "out"), "--json"])
    assert code == 0, err
    assert not [n for n in json.loads(text)["notes"] if "base_model_name_or_path" in n]
