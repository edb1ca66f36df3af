"""Lead's tests of round 7: a combination of adapters that name different base models or task types says so
(ops.combine.identity), on the in-memory and the streamed engines, and the result is still the weighted sum."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from redteam_fixtures import llm_base, peft_deltas, peft_folder
from safetensors.numpy import load_file

import lorafuse
from lorafuse.errors import AdapterNote

SHAPES = {"model.layers.0.self_attn.q_proj": (8, 6), "model.layers.0.self_attn.v_proj": (4, 6)}


def _pair(tmp_path: Path, first: dict[str, object], second: dict[str, object]) -> tuple[Path, Path]:
    return (peft_folder(tmp_path / "a", SHAPES, seed=1, extra=first),
            peft_folder(tmp_path / "b", SHAPES, seed=2, extra=second))


def _notes(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, AdapterNote)]


@pytest.mark.parametrize("engine", ["memory", "stream"])
def test_adapters_of_different_bases_are_combined_with_a_note(tmp_path: Path, engine: str) -> None:
    a, b = _pair(tmp_path, {"base_model_name_or_path": "org/base-a", "task_type": "CAUSAL_LM"},
                 {"base_model_name_or_path": "org/base-b", "task_type": "SEQ_CLS"})
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lorafuse.combine([a, b], [0.5, 0.25], method="linear" if engine == "stream" else "cat",
                         engine=engine).save(out)
    notes = [n for n in _notes(caught) if "the adapters name different" in n]
    assert any("base_model_name_or_path" in n and "'org/base-a'" in n and "'org/base-b'" in n for n in notes), notes
    assert any("task_type" in n and "'CAUSAL_LM'" in n and "'SEQ_CLS'" in n for n in notes), notes
    assert len(notes) == 2, notes  # once per field, not once per input
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/base-a" and config["task_type"] == "CAUSAL_LM"
    got, da, db = peft_deltas(out), peft_deltas(a), peft_deltas(b)
    for m in SHAPES:  # linear on equal ranks averages factors: not the sum; cat is the exact weighted sum
        if engine == "memory":
            np.testing.assert_allclose(got[m], 0.5 * da[m] + 0.25 * db[m], rtol=1e-5, atol=1e-6, err_msg=m)
        else:
            assert got[m].shape == da[m].shape and np.all(np.isfinite(got[m]))


def test_adapters_of_one_base_get_no_such_note(tmp_path: Path) -> None:
    same = {"base_model_name_or_path": "org/base", "task_type": "CAUSAL_LM", "revision": None}
    a, b = _pair(tmp_path, same, {**same, "revision": "main"})  # a revision named by the second only: no clash
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lorafuse.combine([a, b], method="cat")
    assert not [n for n in _notes(caught) if "the adapters name different" in n and "base_model" in n]
    assert [n for n in _notes(caught) if "different revision" in n and "names none" in n]


def test_apply_dtype_is_written_into_nested_model_configs(tmp_path: Path) -> None:
    """`apply --dtype bf16` on a composite model (a llava-style config with text / vision configs that name a
    dtype) wrote bfloat16 at the top level only; transformers 4 and vLLM read the text config's dtype. Every
    nested model config now says the dtype written, and the rest of config.json is as it was."""
    shapes = {"model.layers.0.self_attn.q_proj": (8, 6)}
    base = llm_base(tmp_path / "base", shapes)
    config = {"model_type": "llava", "torch_dtype": "float32",
              "text_config": {"model_type": "llama", "torch_dtype": "float32", "hidden_size": 6},
              "vision_config": {"model_type": "clip_vision_model", "dtype": "float32"},
              "rope_scaling": {"dtype": "x"}}
    (base / "config.json").write_text(json.dumps(config))
    adapter = peft_folder(tmp_path / "a", shapes, seed=3)
    out = tmp_path / "out"
    lorafuse.apply(base, [adapter], out=out, dtype="bf16")
    got = json.loads((out / "config.json").read_text())
    assert got["torch_dtype"] == "bfloat16"
    assert got["text_config"] == {"model_type": "llama", "torch_dtype": "bfloat16", "hidden_size": 6}
    assert got["vision_config"] == {"model_type": "clip_vision_model", "dtype": "bfloat16"}
    assert got["rope_scaling"] == {"dtype": "x"}  # not a model config


_SMALL_ADDRESS_SPACE = r"""
import resource, sys
from pathlib import Path
import numpy as np
import lorafuse
import lorafuse.ops.apply
from safetensors.numpy import load_file
size = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + (96 << 20), resource.RLIM_INFINITY))
base, adapter, out = map(Path, sys.argv[1:])
lorafuse.apply(base, [adapter], out=out)
print(float(np.abs(load_file(str(out / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]).sum()))
"""


def test_apply_of_a_small_model_reserves_no_large_buffers(tmp_path: Path) -> None:
    """apply reserved three 48 MiB output buffers (ops.apply._Arenas) whatever the model's size: under `ulimit -v`
    a model of a few bytes was refused as out of memory where every other command ran. The buffers are now made
    when first needed, no larger than the model's tensors: the same apply runs with 96 MiB of address space to
    spare, and its result is the merge."""
    shapes = {"model.layers.0.self_attn.q_proj": (8, 6)}
    base = llm_base(tmp_path / "base", shapes)
    adapter = peft_folder(tmp_path / "a", shapes, seed=4)
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-c", _SMALL_ADDRESS_SPACE, str(base), str(adapter), str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    w = load_file(str(base / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"].astype(np.float64)
    want = w + peft_deltas(adapter)["model.layers.0.self_attn.q_proj"]
    got = load_file(str(out / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert float(res.stdout.strip()) == pytest.approx(float(np.abs(got).sum()), rel=1e-6)
