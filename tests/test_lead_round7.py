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
from redteam_fixtures import llm_base, peft_deltas, peft_folder, run_cli
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


# HunyuanVideo's original module paths -> (out, in): a ComfyUI-layout LoRA of a few of its layers
_HV = {"double_blocks.0.img_attn_qkv": (48, 16), "double_blocks.0.img_mlp.fc1": (64, 16),
       "single_blocks.0.linear2": (16, 80)}


@pytest.mark.parametrize("spelling", [("lora_A", "lora_B"), ("lora_down", "lora_up")])
def test_a_comfyui_layout_lora_is_written_back_in_its_layout(tmp_path: Path, spelling: tuple[str, str]) -> None:
    """A `diffusion_model.<path>` LoRA (ComfyUI, ai-toolkit) is read as kohya modules; resize and save wrote it
    back under kohya names (`lora_unet_double_blocks_0_img_attn_qkv`), which diffusers' HunyuanVideo loader does
    not read. It is written in the layout it was read in, factor spelling included, and diffusers reads the
    result as it read the input (the same products B @ A)."""
    import torch
    from diffusers import HunyuanVideoPipeline

    rng = np.random.default_rng(0)
    down, up = spelling
    tensors = {}
    for m, (o, i) in _HV.items():
        tensors[f"diffusion_model.{m}.{down}.weight"] = rng.standard_normal((2, i)).astype(np.float32)
        tensors[f"diffusion_model.{m}.{up}.weight"] = rng.standard_normal((o, 2)).astype(np.float32)
        if down == "lora_down":
            tensors[f"diffusion_model.{m}.alpha"] = np.array(2.0, np.float32)
    from safetensors.numpy import save_file

    src = tmp_path / "hv.safetensors"
    save_file(tensors, str(src))
    for name in ("resized.safetensors", "saved.safetensors"):
        out = tmp_path / name
        if name.startswith("resized"):
            lorafuse.resize(src, rank=2, out=out)
        else:
            lorafuse.load(src).save(out)
        assert set(load_file(str(out))) == set(tensors), name

        def products(path: Path) -> dict[str, np.ndarray]:
            if down == "lora_down":  # (diffusers' HunyuanVideo converter fails on `.alpha` keys: lorafuse's reading)
                a = lorafuse.load(path)
                return {m: np.asarray(u.delta(), np.float64) for m, u in a.updates.items()}
            state = HunyuanVideoPipeline.lora_state_dict(str(path))
            return {k: (state[k.replace(".lora_A.", ".lora_B.")].to(torch.float64)
                        @ state[k].to(torch.float64)).numpy() for k in state if ".lora_A." in k}

        want, got = products(src), products(out)
        assert set(got) == set(want) and len(want) >= 3, name
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=f"{name}: {k}")


def test_the_dot_slash_escape_writes_a_folder_named_tilde(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A leading `~` of an output is expanded (CLI) or refused (Python); `./~/m`, the way to name a folder `~`
    (as `./-` names one `-`), was refused too: Path('./~/m') drops the `./`. It is written where it says."""
    base = llm_base(tmp_path / "base", SHAPES)
    adapter = peft_folder(tmp_path / "a", SHAPES, seed=5)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["apply", "base", "a", "-o", "./~/m", "-q"])
    assert code == 0, err
    got = load_file(str(tmp_path / "~" / "m" / "model.safetensors"))
    w = load_file(str(base / "model.safetensors"))
    for m, d in peft_deltas(adapter).items():
        np.testing.assert_allclose(got[m + ".weight"], w[m + ".weight"] + d, rtol=1e-5, atol=1e-5)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # (where no folder `~` is: there the name is taken as meant)
    with pytest.raises(lorafuse.LorafuseError, match=r"for a folder of that name \(\./~/\.\.\. on the command line"):
        lorafuse.apply(base, [adapter], out="~/x")


def test_an_output_given_with_tilde_is_recorded_as_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--out=~/merged` (bash leaves it as typed; the CLI expands it) was recorded verbatim in the output's
    `lorafuse.command`, where every other spelling of the output is recorded as OUT (a rerun into another folder
    gives the same bytes)."""
    from safetensors import safe_open

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    base = llm_base(tmp_path / "base", SHAPES)
    adapter = peft_folder(tmp_path / "a", SHAPES, seed=6)
    for argv in (["--out=~/merged"], ["-o", "~/merged2"]):
        code, _, err = run_cli(["apply", str(base), str(adapter), *argv, "-q"])
        assert code == 0, err
        name = "merged" if argv[0].startswith("--out=") else "merged2"
        with safe_open(str(home / name / "model.safetensors"), "np") as f:
            command = (f.metadata() or {})["lorafuse.command"]
        assert "~" not in command and ("--out=OUT" in command or "-o OUT" in command), command


def test_a_shard_beside_another_models_index_is_not_taken_for_its_shard(tmp_path: Path) -> None:
    """A `*-00001-of-00002.safetensors` file is refused as one shard of a checkpoint when an index beside it lists
    it; an index of another model in the same folder (a downloads folder) does not make it one: it is read."""
    folder = tmp_path / "downloads"
    base = llm_base(tmp_path / "src", SHAPES)
    folder.mkdir()
    shard = folder / "model-00001-of-00002.safetensors"
    (base / "model.safetensors").rename(shard)
    (folder / "other.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"x.weight": "other-00001-of-00002.safetensors"}}))
    adapter = peft_folder(tmp_path / "a", SHAPES, seed=7)
    out = tmp_path / "merged.safetensors"
    lorafuse.apply(shard, [adapter], out=out)
    got, w = load_file(str(out)), load_file(str(shard))
    for m, d in peft_deltas(adapter).items():
        np.testing.assert_allclose(got[m + ".weight"], w[m + ".weight"] + d, rtol=1e-5, atol=1e-5)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {m + ".weight": shard.name for m in SHAPES}}))
    with pytest.raises(lorafuse.LorafuseError, match="one shard of 2"):
        lorafuse.apply(shard, [adapter], out=tmp_path / "again.safetensors")
