"""Fifth red-team round, files: each test is a finding that was wrong before, checked against an independent
reference (numpy float64, the real transformers / diffusers / peft / safetensors packages, the file system)."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
from redteam_fixtures import kohya_file, peft_folder
from safetensors.numpy import load_file, save_file

import lorafuse
from lorafuse import cli
from lorafuse.cli import main
from lorafuse.errors import FormatError, LorafuseValueError
from lorafuse.io.checkpoint import Checkpoint

PREFIX = "base_model.model."


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _delta(adapter: Path, module: str) -> np.ndarray:
    """B @ A * alpha / r of a PEFT folder's module, float64 (the adapters here have alpha = r)."""
    t = load_file(str(adapter / "adapter_model.safetensors"))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    a = t[f"{PREFIX}{module}.lora_A.weight"].astype(np.float64)
    b = t[f"{PREFIX}{module}.lora_B.weight"].astype(np.float64)
    return b @ a * (cfg["lora_alpha"] / cfg["r"])


def _weights(folder: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# ----------------------------------------------------------------------------- 1: single file beside an index


def _llama(seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


Q = "model.layers.0.self_attn.q_proj"


def test_a_model_saved_sharded_then_whole_is_merged_as_transformers_loads_it(tmp_path):
    """transformers' save_pretrained of a model saved sharded before leaves the old index (it removes only the old
    shards); from_pretrained loads model.safetensors first. lorafuse refused the folder (a shard the index lists is
    gone); it now merges model.safetensors, as transformers loads it."""
    import torch
    from transformers import LlamaForCausalLM

    model = _llama(0)
    model.save_pretrained(tmp_path / "model", max_shard_size="40KB")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2)
    model.save_pretrained(tmp_path / "model")
    names = sorted(os.listdir(tmp_path / "model"))
    assert "model.safetensors" in names and "model.safetensors.index.json" in names  # transformers' leftover
    assert not any(n.startswith("model-0") for n in names)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    adapter = peft_folder(tmp_path / "lora", {Q: (32, 32)}, seed=1)
    report = lorafuse.apply(tmp_path / "model", [adapter], out=tmp_path / "out", progress=False)
    got = _weights(tmp_path / "out")[f"{Q}.weight"].astype(np.float64)
    want = loaded[f"{Q}.weight"].double().numpy() + _delta(adapter, Q)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    note = next(n for n in report.notes if "holds both" in n)
    assert "model.safetensors and model.safetensors.index.json: transformers loads model.safetensors" in note


def test_new_weights_saved_whole_beside_old_shards_are_the_ones_merged(tmp_path):
    """A sharded save, then model.safetensors written beside it with other weights: transformers loads the new
    file; lorafuse merged into the old shards (a note said only that model.safetensors was not copied)."""
    import torch
    from safetensors.torch import save_file as save_torch
    from transformers import LlamaForCausalLM

    model = _llama(0)
    model.save_pretrained(tmp_path / "model", max_shard_size="40KB")
    old = {k: v.double().numpy().copy() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2)
    save_torch({k: v.contiguous() for k, v in model.state_dict().items()},
               str(tmp_path / "model" / "model.safetensors"), metadata={"format": "pt"})
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    assert not np.allclose(loaded[f"{Q}.weight"].double().numpy(), old[f"{Q}.weight"])  # the new weights
    adapter = peft_folder(tmp_path / "lora", {Q: (32, 32)}, seed=1)
    report = lorafuse.apply(tmp_path / "model", [adapter], out=tmp_path / "out", progress=False)
    out = _weights(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["model.safetensors"]
    for key, value in loaded.items():
        want = value.double().numpy() + (_delta(adapter, Q) if key == f"{Q}.weight" else 0)
        np.testing.assert_allclose(out[key].astype(np.float64), want, rtol=0, atol=1e-5, err_msg=key)
    assert any("both list the same" in n and "transformers loads model.safetensors" in n for n in report.notes)


def test_diffusers_folder_with_both_is_read_through_its_index_as_diffusers_loads_it(tmp_path):
    """diffusers' from_pretrained looks for the shard index first: a diffusers folder holding both is read through
    the index, with a note."""
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file as save_torch

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=8)
    vae.save_pretrained(tmp_path / "vae", max_shard_size="20KB")
    save_torch({k: (v * 2).contiguous() for k, v in vae.state_dict().items()},
               str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    loaded = AutoencoderKL.from_pretrained(tmp_path / "vae").state_dict()
    ckpt = Checkpoint(tmp_path / "vae")
    assert ckpt.index_name == "diffusion_pytorch_model.safetensors.index.json"
    for key, value in loaded.items():
        with ckpt.open(ckpt.shard_of[key]) as f:
            np.testing.assert_array_equal(np.asarray(f.raw(key)).reshape(value.shape), value.numpy(), err_msg=key)
    assert ckpt.notes == [f"{tmp_path / 'vae'} holds both diffusion_pytorch_model.safetensors.index.json and "
                          "diffusion_pytorch_model.safetensors: diffusers loads the shards "
                          "diffusion_pytorch_model.safetensors.index.json lists, and so does lorafuse; "
                          "diffusion_pytorch_model.safetensors and its tensors are left alone (both list the same "
                          f"{len(loaded)} tensors)"]


def _base_beside_index(folder: Path, index_names: list[str]) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    save_file({"a.weight": rng.standard_normal((4, 4)).astype(np.float32),
               "b.weight": rng.standard_normal((4, 4)).astype(np.float32)}, str(folder / "model.safetensors"))
    save_file({n: np.zeros((4, 4), np.float32) for n in index_names}, str(folder / "model-00001-of-00001.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "model-00001-of-00001.safetensors" for n in index_names}}))


def test_a_single_file_and_an_index_that_list_other_tensors_are_said_to_differ(tmp_path, capsys):
    _base_beside_index(tmp_path / "m", ["a.weight", "c.weight"])
    ckpt = Checkpoint(tmp_path / "m")
    assert ckpt.shards == ["model.safetensors"] and not ckpt.sharded and sorted(ckpt.keys()) == ["a.weight",
                                                                                                "b.weight"]
    assert ckpt.notes == [f"{tmp_path / 'm'} holds both model.safetensors and model.safetensors.index.json: "
                          "transformers loads model.safetensors, and so does lorafuse; model.safetensors.index.json "
                          "and the shards it lists are left alone (they list different tensors: 1 only in "
                          "model.safetensors (e.g. 'b.weight'); 1 only in model.safetensors.index.json (e.g. "
                          "'c.weight'))"]
    code, out, err = _run(capsys, "info", tmp_path / "m")
    assert code == 0, err
    assert f"  note: {ckpt.notes[0]}" in out.splitlines()
    code, out, err = _run(capsys, "info", tmp_path / "m", "--json")
    assert json.loads(out)["notes"] == ckpt.notes


def test_extract_says_how_a_folder_with_both_was_read(tmp_path):
    _base_beside_index(tmp_path / "base", ["a.weight", "b.weight"])
    (tmp_path / "ft").mkdir()
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    rng = np.random.default_rng(3)
    ft = {k: v + np.outer(rng.standard_normal(4), rng.standard_normal(4)).astype(np.float32) for k, v in base.items()}
    save_file(ft, str(tmp_path / "ft" / "model.safetensors"))
    res = lorafuse.extract(tmp_path / "base", tmp_path / "ft", rank=1, progress=False)
    assert any("holds both model.safetensors and model.safetensors.index.json" in n and "same 2 tensors" in n
               for n in res.notes)
    for key in ("a", "b"):  # the differences from model.safetensors, not from the zeros of the shard
        u = res.adapter.updates[key]
        np.testing.assert_allclose(u.delta().astype(np.float64), (ft[f"{key}.weight"] - base[f"{key}.weight"])
                                   .astype(np.float64), atol=1e-5)


def test_an_index_that_lists_the_single_file_itself_is_one_checkpoint(tmp_path):
    """model.safetensors beside an index whose only shard is model.safetensors: one checkpoint, read through the
    index (kept in an apply's output), no note."""
    _base_beside_index(tmp_path / "m", [])
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a.weight": "model.safetensors", "b.weight": "model.safetensors"}}))
    ckpt = Checkpoint(tmp_path / "m")
    assert ckpt.sharded and ckpt.shards == ["model.safetensors"] and ckpt.notes == []


# ----------------------------------------------------------------------------- 2: combined regex target_modules


def _regex_adapters(tmp_path: Path, patterns: list[str]) -> list[Path]:
    shapes = {f"model.layers.{i}.self_attn.{p}": (16, 16) for i in range(2) for p in ("q_proj", "v_proj")}
    kinds = [("q_proj",), ("v_proj",), ("q_proj", "v_proj")]
    return [peft_folder(tmp_path / f"t{n}", {k: v for k, v in shapes.items() if k.endswith(kinds[n])}, seed=n + 1,
                        extra={"target_modules": tm}) for n, tm in enumerate(patterns)]


def _peft_targets(target_modules: object) -> list[str]:
    """The modules PEFT (inject_adapter_in_model) gives LoRA layers for, with `target_modules`."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    class Attn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(16, 16) for _ in range(3))

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn = Attn()

    class Inner(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList([Layer(), Layer()])

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Inner()

    m = inject_adapter_in_model(LoraConfig(r=2, target_modules=target_modules), Model())
    return sorted(n.removesuffix(".lora_A") for n, _ in m.named_modules() if n.endswith(".lora_A"))


@pytest.mark.parametrize("engine", ["memory", "stream"])
@pytest.mark.parametrize("patterns", [
    [r".*\.q_proj", r".*\.v_proj", r".*self_attn\.(q|v)_proj"],  # joined: 3 repeating quantifiers (at most 2)
    [r"(?P<m>.*)\.q_proj", r"(?P<m>.*)\.v_proj"],  # joined: a group name defined twice, not a regular expression
])
def test_combining_adapters_with_regex_targets_writes_a_config_peft_and_lorafuse_read(tmp_path, engine, patterns):
    """Each input's target_modules pattern loads in PEFT and lorafuse; their alternation did not load in lorafuse
    (combine refused its own output's config). The output now names its modules in full where the joined pattern
    would be refused, and PEFT targets exactly them."""
    adapters = _regex_adapters(tmp_path, patterns)
    held = {a: {k.removeprefix(PREFIX).rsplit(".lora_", 1)[0] for k in load_file(str(a / "adapter_model.safetensors"))}
            for a in adapters}
    for a, p in zip(adapters, patterns):
        assert _peft_targets(p) == sorted(held[a])
    out = tmp_path / "out"
    assert main(["combine", *map(str, adapters), "-o", str(out), "--method", "svd", "--rank", "4",
                 "--engine", engine]) == 0
    modules = sorted(set().union(*held.values()))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert _peft_targets(cfg["target_modules"]) == modules
    combined = lorafuse.load(out)
    assert sorted(combined.updates) == modules
    for m in modules:
        want = sum(_delta(a, m) for a in adapters if m in held[a])
        np.testing.assert_allclose(combined.updates[m].delta().astype(np.float64), want, atol=1e-4, err_msg=m)


def test_joined_regex_targets_that_lorafuse_reads_stay_one_pattern():
    from lorafuse.model.arithmetic import combined_targets

    cfgs = [{"target_modules": r".*\.q_proj"}, {"target_modules": r"model\.layers\.0\.self_attn\.v_proj"}]
    assert combined_targets(cfgs, ["x"])["target_modules"] == (r"(.*\.q_proj)|(model\.layers\.0\.self_attn\.v_proj)")
    assert combined_targets([{"target_modules": "a" * 600 + ".*"}, {"target_modules": "b" * 600 + ".*"}],
                            ["m.q", "m.v"])["target_modules"] == ["m.q", "m.v"]  # joined: over 1000 characters


# ----------------------------------------------------------------------------- 3: long names in messages

HUGE = 1 << 20  # a 1 MiB name


def _raw_safetensors(path: Path, header: dict[str, object], data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _shown(e: pytest.ExceptionInfo[BaseException], what: str) -> None:
    text = str(e.value)
    assert len(text) < 1000, len(text)
    assert re.search(r"\.\.\. \([0-9,]+ characters\)", text), text  # the name cut short, its length said
    assert what in text, text


@pytest.mark.parametrize("header, what", [
    ({"n" * HUGE: {"dtype": "F7", "shape": [1], "data_offsets": [0, 4]}}, "has unknown dtype 'F7'"),
    ({"n" * HUGE: {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, "needs 8 bytes"),
    ({"n" * HUGE: {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, "leaves a gap before it"),
    ({"n" * HUGE: "x"}, "is not an object"),
    ({"__metadata__": {"k" * HUGE: 3}}, "maps to 3"),
])
def test_a_hostile_header_name_is_shown_cut_short(tmp_path, header, what):
    """A tensor name or metadata key of a header was printed whole: a 50 MB name made a 52 MB error line."""
    path = _raw_safetensors(tmp_path / "x.safetensors", header, b"\0" * 4 if "__metadata__" not in header else b"")
    with pytest.raises(FormatError) as e:
        Checkpoint(path)
    _shown(e, what)


def test_a_duplicate_hostile_name_is_shown_cut_short(tmp_path):
    name = "d" * HUGE
    entry = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    raw = f'{{"{name}":{entry},"{name}":{entry}}}'.encode()
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with pytest.raises(FormatError) as e:
        Checkpoint(path)
    _shown(e, "duplicate key")


def test_an_index_with_a_hostile_tensor_name_or_shard_name_is_shown_cut_short(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"a": np.zeros(1, np.float32)}, str(folder / "m1.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "m1.safetensors", "x" * HUGE: "m1.safetensors"}}))
    with pytest.raises(FormatError) as e:
        Checkpoint(folder)
    _shown(e, "is listed in m1.safetensors but is not there")
    # a shard name longer than a file name can be: named with the index, not "m: cannot read: File name too long"
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "y" * HUGE + ".safetensors"}}))
    with pytest.raises(FormatError) as e:
        Checkpoint(folder)
    assert str(e.value).startswith(f"{folder / 'model.safetensors.index.json'}: shard 'yyy")
    assert f"({HUGE + 12:,} characters) cannot be looked at in {folder}: File name too long" in str(e.value)
    assert len(str(e.value)) < 1000


def test_adapter_files_with_hostile_key_names_are_shown_cut_short(tmp_path):
    kohya = tmp_path / "k.safetensors"
    save_file({"lora_unet_" + "z" * HUGE + ".lora_down.weight": np.zeros((1, 2), np.float32)}, str(kohya))
    with pytest.raises(FormatError) as e:
        lorafuse.load(kohya)
    _shown(e, "name")
    odd = tmp_path / "odd.safetensors"
    save_file({"unet." + "z" * HUGE + ".lora_X.weight": np.zeros((1, 2), np.float32)}, str(odd))
    with pytest.raises(FormatError) as e:
        lorafuse.load(odd)
    _shown(e, "not a recognised adapter; it holds 1 tensor ('unet.zzz")
    diff = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({"unet.a.lora_A.weight": np.zeros((1, 2), np.float32),
               "unet.a.lora_B.weight": np.zeros((2, 1), np.float32),
               "unet." + "z" * HUGE + ".lora.weight": np.zeros((1, 2), np.float32)}, str(diff))
    with pytest.raises(FormatError) as e:
        lorafuse.load(diff)
    _shown(e, "is not a diffusers LoRA tensor")
    folder = peft_folder(tmp_path / "p", {"m.q": (2, 2)}, seed=0,
                         tensors={PREFIX + "w" * HUGE + ".lora_X.weight": np.zeros(1, np.float32)})
    with pytest.raises(FormatError) as e:
        lorafuse.load(folder)
    _shown(e, "is not a LoRA tensor lorafuse knows")


# ----------------------------------------------------------------------------- 4: a stopped run's message


def _recipe(tmp_path: Path) -> Path:
    peft_folder(tmp_path / "a1", {Q: (8, 6)}, seed=1)
    peft_folder(tmp_path / "a2", {Q: (8, 6)}, seed=2)
    (tmp_path / "base").mkdir()
    save_file({f"{Q}.weight": np.ones((8, 6), np.float32)}, str(tmp_path / "base" / "model.safetensors"))
    recipe = tmp_path / "r.yml"
    recipe.write_text("name: pooled\nmerge_method: linear\nmodels: [{model: ./a1}, {model: ./a2}]\n---\n"
                      "name: final\nmerge_method: apply\nbase_model: ./base\nmodels: [{model: pooled}]\n")
    return recipe


def _stop_in_apply(monkeypatch) -> None:
    """The run's apply stage gets Ctrl-C as it starts."""
    real = cli._commands

    def commands():
        cmds = dict(real())
        apply = cmds["apply"]

        def stopped(args):
            os.kill(os.getpid(), signal.SIGINT)
            return apply(args)

        cmds["apply"] = stopped
        return cmds

    monkeypatch.setattr(cli, "_commands", commands)


def test_a_run_stopped_in_its_last_stage_names_no_removed_intermediate_output(tmp_path, capsys, monkeypatch):
    """Ctrl-C during the apply stage said 'interrupted after .lorafuse-run-.../pooled was written': that output
    lay in the run's temporary folder, already removed."""
    recipe = _recipe(tmp_path)
    _stop_in_apply(monkeypatch)
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, "run", recipe, "-o", tmp_path / "out", "-q")
    assert code == 130
    assert "lorafuse run: interrupted; no output was written" in err, err
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".lorafuse-run") or p == "out"]


def test_a_run_stopped_with_kept_intermediates_names_them(tmp_path, capsys, monkeypatch):
    recipe = _recipe(tmp_path)
    _stop_in_apply(monkeypatch)
    code, _, err = _run(capsys, "run", recipe, "-o", tmp_path / "out", "-q", "--intermediate-dir", tmp_path / "mid")
    assert code == 130
    assert f"interrupted after {tmp_path / 'mid' / 'pooled'} was written" in err, err
    assert (tmp_path / "mid" / "pooled" / "adapter_config.json").is_file()


# ----------------------------------------------------------------------------- 5: the provenance record's size


def test_a_combine_whose_record_would_not_fit_is_refused_before_any_adapter_is_read(tmp_path, monkeypatch):
    """The record names every input; past the metadata lorafuse reads back it was refused when the output was
    written, after all the work. Now before the header pass, with the record's true size."""
    import lorafuse.io.safetensors as st
    from lorafuse.io.provenance import Provenance
    from lorafuse.ops.combine import many

    files = [kohya_file(tmp_path / f"adapter_{i:03d}.safetensors", "lora_unet_x", seed=i) for i in range(40)]
    monkeypatch.setattr(st, "MAX_METADATA_BYTES", 4000)  # about 30 of these inputs' records
    read: list[object] = []
    real = many.check_sources
    monkeypatch.setattr(many, "check_sources", lambda *a, **k: read.append(a) or real(*a, **k))
    with pytest.raises(LorafuseValueError, match=re.escape("the provenance record of this combine names each of "
                                                           "its 40 inputs with its sha256 and weight, which would "
                                                           "take ")) as e:
        lorafuse.combine(files, method="linear", engine="stream")
    assert "bytes of metadata, more than the 4,000 that lorafuse reads" in str(e.value)
    assert "nothing was written" in str(e.value)
    assert read == []  # no header pass
    # what fits is written, and its record names every input
    combined = lorafuse.combine(files[:10], method="linear", engine="stream")
    combined.save(tmp_path / "ok.safetensors")
    rec = Provenance.from_metadata(st.read_header(tmp_path / "ok.safetensors")[1])
    assert rec is not None and [i.name for i in rec.inputs] == [str(p) for p in files[:10]]


# ----------------------------------------------------------------------------- smaller: output names, info


def test_an_output_ending_in_slash_dot_is_a_folder_to_write_into(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kohya_file(tmp_path / "k1.safetensors", "lora_unet_x", seed=1)
    kohya_file(tmp_path / "k2.safetensors", "lora_unet_x", seed=2)
    code, _, err = _run(capsys, "combine", "k1.safetensors", "k2.safetensors", "-o", "a/.")
    assert code == 0, err
    assert (tmp_path / "a").is_dir() and (tmp_path / "a" / "k1.safetensors").is_file()


@pytest.mark.parametrize("out", [" ", "x/ ", "  "])
def test_an_output_named_by_spaces_only_is_refused(tmp_path, capsys, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    kohya_file(tmp_path / "k1.safetensors", "lora_unet_x", seed=1)
    kohya_file(tmp_path / "k2.safetensors", "lora_unet_x", seed=2)
    code, _, err = _run(capsys, "combine", "k1.safetensors", "k2.safetensors", "-o", out)
    assert code == 2
    assert f"output {out!r}: give the output a name" in err
    assert sorted(os.listdir(tmp_path)) == ["k1.safetensors", "k2.safetensors"]


def test_a_file_input_named_as_a_folder_to_write_into_gets_no_path_inside_it_as_advice(tmp_path, capsys,
                                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    kohya_file(tmp_path / "k1.safetensors", "lora_unet_x", seed=1)
    code, _, err = _run(capsys, "resize", "./k1.safetensors", "--rank", "1", "-o", "./k1.safetensors/")
    assert code == 1
    assert "k1.safetensors/k1.safetensors" not in err
    assert "give the output file's full name (k1.safetensors is a file, not a folder to write into)" in err


def test_info_parses_a_large_header_once(tmp_path, monkeypatch):
    """info of a checkpoint with a large header parsed it twice (the adapter sniff, then the checkpoint) and
    looked for quantization twice."""
    import lorafuse.io.quant as quant
    import lorafuse.io.safetensors as st

    n = 30_000
    path = _raw_safetensors(tmp_path / "big.safetensors",
                            {f"layer.{i}.weight": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
                             for i in range(n)})
    assert path.stat().st_size > st._PARSED_MIN_BYTES
    parsed: list[int] = []
    real_parse = st._parse_text
    monkeypatch.setattr(st, "_parse_text", lambda *a: parsed.append(1) or real_parse(*a))
    detected: list[int] = []
    real_detect = quant._detect_by_names
    monkeypatch.setattr(quant, "_detect_by_names", lambda d: detected.append(1) or real_detect(d))
    d = lorafuse.describe(path)
    assert d["type"] == "checkpoint" and d["tensors"] == n and d["quantization"] is None
    assert parsed == [1] and detected == [1]
    # a file changed in between is parsed again (its bytes differ), and its own header is what is read
    _raw_safetensors(path, {f"layer.{i}.weight": {"dtype": "F16", "shape": [0], "data_offsets": [0, 0]}
                            for i in range(n)})
    assert lorafuse.describe(path)["dtypes"] == {"F16": n}
    assert len(parsed) == 2


def test_a_diffusers_folder_whose_index_is_stale_is_refused_naming_both_files(tmp_path):
    """diffusers loads the index first, so a stale one fails there too: the refusal names the file beside it."""
    folder = tmp_path / "unet"
    folder.mkdir()
    save_file({"a.weight": np.zeros((2, 2), np.float32)}, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a.weight": "diffusion_pytorch_model-00001-of-00002.safetensors"}}))
    with pytest.raises(FormatError) as e:
        Checkpoint(folder)
    assert str(e.value) == (
        f"{folder / 'diffusion_pytorch_model.safetensors.index.json'}: shard "
        f"'diffusion_pytorch_model-00001-of-00002.safetensors' is not a file in {folder} (diffusers loads "
        "diffusion_pytorch_model.safetensors.index.json before diffusion_pytorch_model.safetensors, which is beside "
        "it, and so does lorafuse: remove the index if diffusion_pytorch_model.safetensors holds the model)")
