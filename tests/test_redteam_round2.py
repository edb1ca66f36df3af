"""Second red-team round (a new user walking the docs, conversions, numerics, recipes): each test is a finding
that was wrong before, checked against an independent reference (numpy float64, the real gguf reader)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from redteam_fixtures import llm_base, peft_folder
from safetensors import safe_open
from safetensors.numpy import save_file

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import LorafuseValueError, UnsupportedError

H, R = 16, 2
PREFIX = "base_model.model."
_peft, _base = peft_folder, llm_base


LLM = {"model.layers.0.self_attn.q_proj": (H, H), "model.layers.0.mlp.up_proj": (2 * H, H)}


# ----------------------------------------------------------------------------- the docs, as a new user reads them


def test_subpackages_are_attributes_after_a_plain_import():
    """docs/api.md writes lorafuse.backends.get_backend(...) after `import lorafuse`: it raised AttributeError
    unless something else had imported the subpackage first."""
    code = ("import lorafuse; b = lorafuse.backends.get_backend('cpu'); print(type(b).__name__, "
            "lorafuse.ops.__name__, lorafuse.formats.__name__, lorafuse.model.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["CpuBackend", "lorafuse.ops", "lorafuse.formats", "lorafuse.model"]
    with pytest.raises(AttributeError):
        lorafuse.no_such_subpackage  # noqa: B018


@pytest.mark.parametrize("flags", [["--progress", "-q"], ["--progress", "--json"]])
def test_apply_draws_no_bar_with_quiet_or_json(tmp_path, capsys, flags):
    """cli.md: a bar 'never with --no-progress, -q or --json'; apply drew one with --progress -q."""
    base = _base(tmp_path / "base", {m: s for m, s in LLM.items()})
    lora = _peft(tmp_path / "lora", LLM, 1)
    assert main(["apply", str(base), str(lora), "-o", str(tmp_path / "out"), *flags]) == 0
    assert capsys.readouterr().err == ""


def test_a_format_that_cannot_name_the_modules_is_refused_before_any_work(tmp_path, capsys):
    """combine --format kohya of LLM PEFT adapters: exit 1 after the work, naming '<in-memory adapter>'; now an
    argument error (exit 2) before any work, naming the input and the option."""
    a, b = _peft(tmp_path / "a", LLM, 1), _peft(tmp_path / "b", LLM, 2)
    for fmt in ("kohya", "diffusers"):
        assert main(["combine", str(a), str(b), "-o", str(tmp_path / "out"), "--format", fmt]) == 2
        err = capsys.readouterr().err
        assert f"--format {fmt} cannot hold these modules" in err and "_proj'" in err and f"not a {fmt}" in err
        assert "in-memory" not in err
    assert main(["combine", str(a), str(b), "-o", str(tmp_path / "out"), "--format", "kohya", "--dry-run"]) == 2
    assert not (tmp_path / "out").exists()
    assert main(["combine", str(a), str(b), "-o", str(tmp_path / "out"), "--format", "peft", "-q"]) == 0


def test_options_a_streamed_engine_cannot_take_are_argument_errors(tmp_path, capsys):
    a, b = _peft(tmp_path / "a", LLM, 1), _peft(tmp_path / "b", LLM, 2)
    assert main(["combine", str(a), str(b), "--method", "ties", "--density", "0.5", "--engine", "stream",
                 "-o", str(tmp_path / "out")]) == 2
    assert "does not stream" in capsys.readouterr().err
    with pytest.raises(LorafuseValueError, match="does not stream"):
        lorafuse.combine([a, b], method="ties", density=0.5, engine="stream")


def test_a_file_of_an_earlier_lorafuse_folder_output_is_lorafuses(tmp_path, capsys):
    """cli.md: a single-file base writes OUT/model.safetensors into an existing folder, and an earlier lorafuse
    output is replaced. The shard of an earlier folder output was called 'a file lorafuse did not write'."""
    base = _base(tmp_path / "base", {m: s for m, s in LLM.items()})
    lora = _peft(tmp_path / "lora", LLM, 1)
    out = tmp_path / "out"
    assert main(["apply", str(base), str(lora), "-o", str(out), "-q"]) == 0
    assert main(["apply", str(base / "model.safetensors"), str(lora), "-o", str(out), "-q"]) == 0
    assert main(["apply", str(base / "model.safetensors"), str(lora), "-o", str(out), "-q"]) == 0  # ours again
    # a folder the user added a file to is the user's: its files are not replaced without --overwrite
    other = tmp_path / "other"
    assert main(["apply", str(base), str(lora), "-o", str(other), "-q"]) == 0
    (other / "notes.txt").write_text("mine")
    before = (other / "model.safetensors").read_bytes()
    assert main(["apply", str(base / "model.safetensors"), str(lora), "-o", str(other)]) == 1
    assert "OutputError" in capsys.readouterr().err and (other / "model.safetensors").read_bytes() == before


def test_a_recipe_records_its_models_as_it_names_them(tmp_path):
    """README: lorafuse.inputs holds each input's name as given. A recipe's models were recorded by their
    absolute paths, so the same recipe run from a copy of its folder wrote other bytes."""
    outs = []
    for where in ("one", "two"):
        folder = tmp_path / where
        _peft(folder / "lora-a", LLM, 1)
        _peft(folder / "lora-b", LLM, 2)
        (folder / "merge.yml").write_text("merge_method: svd\nmodels:\n  - model: ./lora-a\n"
                                          "    parameters: {weight: 0.6}\n  - model: ./lora-b\n"
                                          "parameters: {rank: 2}\n")
        assert main(["run", str(folder / "merge.yml"), "-o", str(tmp_path / f"out-{where}"), "-q"]) == 0
        outs.append((tmp_path / f"out-{where}" / "adapter_model.safetensors").read_bytes())
    assert outs[0] == outs[1]
    with safe_open(str(tmp_path / "out-one" / "adapter_model.safetensors"), "np") as f:
        inputs = json.loads(f.metadata()["lorafuse.inputs"])
    assert [i["name"] for i in inputs] == ["./lora-a", "./lora-b"]


def test_a_file_that_is_no_recipe_is_said_to_be_none_in_one_line(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({f"key_{i}": i for i in range(30)}, indent=1))
    assert main(["run", str(config), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "not a recipe" in err and "key_0" in err and len(err.strip().splitlines()) == 1
    many = tmp_path / "many.yml"
    many.write_text("merge_method: svd\nmodels: [{model: a}]\n" + "".join(f"field_{i}: 1\n" for i in range(30)))
    assert main(["run", str(many), "-o", str(tmp_path / "x")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 11 and lines[-1].endswith("and 20 more errors in this stage")


# ----------------------------------------------------------------------------- numerics


def _delta64(u) -> np.ndarray:
    b, a = u.B.f32().astype(np.float64), u.A.f32().astype(np.float64)
    return u.scale * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1))


def test_dora_is_refused_where_the_delta_needs_the_base(tmp_path):
    """similarity and norm treated a DoRA module as plain LoRA: a DoRA delta is m (W + sBA)/||W + sBA|| - W."""
    rng = np.random.default_rng(3)
    dora = _peft(tmp_path / "dora", LLM, 1, extra={"use_dora": True}, tensors={
        f"{PREFIX}{m}.lora_magnitude_vector": rng.uniform(0.5, 2, o).astype(np.float32) for m, (o, _) in LLM.items()})
    plain = _peft(tmp_path / "plain", LLM, 1)
    with pytest.raises(UnsupportedError, match=r"is DoRA: its delta depends on the base weight"):
        lorafuse.similarity([dora, plain])
    with pytest.raises(UnsupportedError, match=r"is DoRA"):
        lorafuse.load(dora).norm()
    info = lorafuse.describe(dora)
    details = info["module_details"]
    assert [m["delta_norm"] for m in details] == [None, None] and all(m["dora"] for m in details)
    want = np.sqrt(sum(np.sum(_delta64(u) ** 2) for u in lorafuse.load(plain).updates.values()))
    assert lorafuse.load(plain).norm() == pytest.approx(want, rel=1e-6)


def test_resize_keeps_no_more_directions_than_the_delta_has(tmp_path):
    """resize(rank=40) of an r=64 adapter kept 40 columns on a 24 x 40 module, 16 of them zero."""
    shapes = {"model.layers.0.self_attn.o_proj": (24, 40), "model.layers.0.self_attn.q_proj": (64, 64)}
    lora = _peft(tmp_path / "big", shapes, 4, rank=64, alpha=64)
    result = lorafuse.resize(lora, rank=40)
    assert result.ranks == {"model.layers.0.self_attn.o_proj": 24, "model.layers.0.self_attn.q_proj": 40}
    before = lorafuse.load(lora).updates["model.layers.0.self_attn.o_proj"]
    after = result.adapter.updates["model.layers.0.self_attn.o_proj"]
    np.testing.assert_allclose(_delta64(after), _delta64(before), rtol=0, atol=1e-3 * np.abs(_delta64(before)).max())


# ----------------------------------------------------------------------------- conversions


def _gguf_delta(path: Path, tensor: str) -> np.ndarray:
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(path)
    alpha = float(reader.get_field("adapter.lora.alpha").parts[-1][0])
    t = {x.name: np.array(x.data, dtype=np.float64) for x in reader.tensors}
    a, b = t[f"{tensor}.lora_a"], t[f"{tensor}.lora_b"]
    return (alpha / a.shape[0]) * (b @ a)


def test_gguf_ignores_fan_in_fan_out_as_peft_does_for_linear_layers(tmp_path):
    """A Llama LoRA whose config says fan_in_fan_out: true. PEFT ignores the flag for torch Linear layers
    (delta = s B A); the GGUF held the transpose (square layers) or swapped sizes (the others)."""
    pytest.importorskip("gguf")
    shapes = {"model.layers.0.self_attn.o_proj": (H, H), "model.layers.0.mlp.up_proj": (2 * H, H)}
    lora = _peft(tmp_path / "lora", shapes, 5, alpha=4, extra={"fan_in_fan_out": True})
    out = tmp_path / "x.gguf"
    lorafuse.convert(lora, out, to="gguf", arch="qwen2")
    with safe_open(str(lora / "adapter_model.safetensors"), "np") as f:
        for module, tensor in (("model.layers.0.self_attn.o_proj", "blk.0.attn_output.weight"),
                               ("model.layers.0.mlp.up_proj", "blk.0.ffn_up.weight")):
            b = f.get_tensor(f"{PREFIX}{module}.lora_B.weight").astype(np.float64)
            a = f.get_tensor(f"{PREFIX}{module}.lora_A.weight").astype(np.float64)
            np.testing.assert_allclose(_gguf_delta(out, tensor), 2.0 * b @ a, rtol=1e-6, atol=1e-6)


def test_gguf_refuses_an_adapter_whose_sizes_are_not_the_bases(tmp_path, capsys):
    pytest.importorskip("gguf")
    lora = _peft(tmp_path / "lora", LLM, 5)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 2 * H,
                                  "intermediate_size": 2 * H, "num_attention_heads": 2, "num_hidden_layers": 1}))
    out = tmp_path / "x.gguf"
    assert main(["convert", str(lora), "--to", "gguf", "--base-config", str(config), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "ShapeMismatchError" in err and "hidden_size is 32" in err and not out.exists()
    config.write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": H,
                                  "intermediate_size": 2 * H, "num_attention_heads": 2, "num_hidden_layers": 1}))
    assert main(["convert", str(lora), "--to", "gguf", "--base-config", str(config), "-o", str(out), "-q"]) == 0


def _kohya(path: Path, up: np.ndarray, down: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> Path:
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
               f"{name}.alpha": np.array(4.0, np.float32), **(extra or {})}, str(path))
    return path


def test_convert_refuses_nan_factors_instead_of_copying_them(tmp_path, capsys):
    down = np.ones((4, 320), np.float32)
    down[0, 0] = np.nan
    src = _kohya(tmp_path / "nan.safetensors", np.ones((320, 4), np.float32), down)
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(src), "--to", "peft", "--family", "sd1", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "NonFiniteError" in err and "attn1_to_q" in err and not out.exists()


def test_convert_names_the_one_reason_a_module_is_refused(tmp_path, capsys):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    src = _kohya(tmp_path / "dora.safetensors", np.ones((320, 4), np.float32), np.ones((4, 320), np.float32),
                 {f"{name}.dora_scale": np.ones((1, 320), np.float32)})
    assert main(["convert", str(src), "--to", "peft", "--family", "sd1", "-o", str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "DoRA magnitude" in err and "a bias or a transposed" not in err


# ----------------------------------------------------------------------------- recipes and provenance


def _recipe(folder: Path, text: str) -> Path:
    (folder / "r.yml").write_text(text)
    return folder / "r.yml"


def _two_stages(tmp_path: Path) -> Path:
    """A base, adapters a and b, and the recipe mix = svd(a, b), then fin = apply(base, mix)."""
    _base(tmp_path / "base", LLM)
    _peft(tmp_path / "a", LLM, 1)
    _peft(tmp_path / "b", LLM, 2)
    return _recipe(tmp_path, "name: mix\nmerge_method: svd\nmodels: [{model: a}, {model: b}]\nparameters: {rank: 2}"
                             "\n---\nname: fin\nmerge_method: apply\nbase_model: base\nmodels: [{model: mix}]\n")


def test_a_recipe_does_not_read_a_model_from_the_current_folder(tmp_path, capsys, monkeypatch):
    """`model: adapters/style`, missing beside the recipe but present in the current folder, was passed on as a
    Hub id, and the verb read the current folder's adapter: each folder the recipe ran in merged another one."""
    proj = tmp_path / "proj"
    proj.mkdir()
    _peft(tmp_path / "adapters" / "style", LLM, 1)
    recipe = _recipe(proj, "merge_method: svd\nmodels: [{model: adapters/style}]\nparameters: {rank: 2}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(recipe), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "'adapters/style' is not in the recipe's folder" in err and not (tmp_path / "out").exists()
    _peft(proj / "adapters" / "style", LLM, 2)  # beside the recipe: that one is read
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 0


def test_a_recipe_records_its_base_as_it_names_it(tmp_path):
    """lorafuse.base_model, the card's base_model and extract's base_model_name_or_path held the absolute path
    found from the recipe's folder: the same recipe in two folders wrote other bytes, and published the user's
    local paths."""
    got = []
    for where in ("p1", "p2"):
        folder = tmp_path / where
        folder.mkdir()
        _base(folder / "base", LLM)
        _peft(folder / "a", LLM, 1)
        out = tmp_path / f"{where}-out"
        assert main(["run", str(_recipe(folder, "merge_method: apply\nbase_model: base\nmodels: [{model: a}]\n")),
                     "-o", str(out), "-q"]) == 0
        with safe_open(str(out / "model.safetensors"), "np") as f:
            assert f.metadata()["lorafuse.base_model"] == "base"
        got.append(((out / "model.safetensors").read_bytes(), (out / "README.md").read_text()))
    assert got[0] == got[1] and str(tmp_path) not in got[0][1]
    folder = tmp_path / "p1"
    (folder / "x.yml").write_text("merge_method: extract\nbase_model: base\nmodels: [{model: fine}]\n"
                                  "parameters: {rank: 2}\n")
    import shutil

    shutil.copytree(tmp_path / "p1-out", folder / "fine")
    assert main(["run", str(folder / "x.yml"), "-o", str(tmp_path / "x-out"), "-q"]) == 0
    config = json.loads((tmp_path / "x-out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "base"


def test_the_last_output_of_a_recipe_records_every_input(tmp_path, capsys):
    """mix = svd(a, b), then apply(base, mix): the output recorded base and mix only (mix a deleted temporary
    folder); a changed b could not be told from it. Now mix's own record (a, b and their sha256) is kept, in
    lorafuse.stages (each stage once), the input naming it by `stage`."""
    import hashlib

    recipe = _two_stages(tmp_path)
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 0
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "np") as f:
        inputs = json.loads(f.metadata()["lorafuse.inputs"])
        stages = json.loads(f.metadata()["lorafuse.stages"])
    assert [i["name"] for i in inputs] == ["base", "mix"] and inputs[1]["stage"] == "mix"
    nested = stages["mix"]
    assert nested["operation"] == "combine" and nested["recipe"] == "stage mix"
    for record, name in zip(nested["inputs"], ("a", "b")):
        want = hashlib.sha256((tmp_path / name / "adapter_model.safetensors").read_bytes()).hexdigest()
        assert record["name"] == name and record["files"]["adapter_model.safetensors"] == want
    assert main(["info", str(tmp_path / "out")]) == 0
    shown = capsys.readouterr().out
    assert "input 2.1   a (adapter" in shown and "input 2.2   b (adapter" in shown
    assert "| 2.2 | `b` | adapter |" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("text, where, why", [
    ("name: mix.safetensors\nmerge_method: svd\nmodels: [{model: a}]\nparameters: {rank: 2}\n---\nname: fin\n"
     "merge_method: resize\nmodels: [{model: mix.safetensors}]\nparameters: {rank: 1}\n", "line 1, name",
     "ends in .safetensors"),
    ("name: Mix\nmerge_method: svd\nmodels: [{model: a}]\nparameters: {rank: 2}\n---\nname: mix\n"
     "merge_method: resize\nmodels: [{model: Mix}]\nparameters: {rank: 1}\n", "line 6, name", "differ only in case"),
    ("merge_method: apply\nbase_model: base\nmodels: [{model: a}]\nparameters: {max_shard_size: 10IB}\n",
     "line 4, parameters.max_shard_size", "is not a size"),
    ("merge_method: extract\nbase_model: base\nmodels: [{model: a}]\nparameters: {rank: 2, include: '(['}\n",
     "line 4, parameters.include", "is not a regular expression"),
])
def test_what_a_stage_would_refuse_when_it_runs_is_refused_before_the_first(tmp_path, capsys, text, where, why):
    _base(tmp_path / "base", LLM)
    _peft(tmp_path / "a", LLM, 1)
    recipe = _recipe(tmp_path, text)
    for dry in ([], ["--dry-run"]):
        assert main(["run", str(recipe), "-o", str(tmp_path / "out"), *dry]) == 2
        err = capsys.readouterr().err
        assert f"r.yml {where}" in err and why in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "base", "r.yml"]


def test_yaml_text_has_the_bound_a_recipe_file_has(tmp_path):
    from lorafuse.errors import RecipeError

    text = "merge_method: svd\nmodels: [" + ",".join(["{model: a}"] * 120_000) + "]\n"
    with pytest.raises(RecipeError, match=r"larger than 1 Mi characters"):
        lorafuse.run(text, tmp_path / "out")


def test_info_names_the_file_it_was_given(tmp_path, capsys):
    base = _base(tmp_path / "base", LLM)
    assert main(["info", str(base / "model.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(base / "model.safetensors")


def test_info_describes_a_gguf_lora_lorafuse_wrote(tmp_path, capsys):
    """`lorafuse info` of a file `convert --to gguf` had just written said 'not a safetensors file'."""
    gguf = pytest.importorskip("gguf")
    shapes = {"model.layers.0.self_attn.o_proj": (H, H), "model.layers.0.mlp.up_proj": (2 * H, H),
              "model.layers.0.mlp.down_proj": (H, 2 * H)}
    lora = _peft(tmp_path / "lora", shapes, 5, rank=4, alpha=8)
    out = tmp_path / "x.gguf"
    lorafuse.convert(lora, out, to="gguf", arch="qwen2", gguf_type="f16")
    assert main(["info", str(out), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    reader = gguf.GGUFReader(out)  # the reference: gguf's own reader, tensor by tensor
    assert d["type"] == "gguf" and d["kind"] == "adapter" and d["architecture"] == "qwen2"
    assert d["lora_alpha"] == 8 and d["tensors"] == len(reader.tensors) == 6 and d["ranks"] == {"4": 3}
    want = {"blk.0.attn_output.weight": [H, H], "blk.0.ffn_up.weight": [2 * H, H], "blk.0.ffn_down.weight": [H, 2 * H]}
    assert {m["name"]: m["shape"] for m in d["modules"]} == want
    assert d["written_by_lorafuse"] == lorafuse.__version__
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "(LoRA adapter, llama.cpp)" in text and "blk.0.ffn_up.weight" in text and "r=4" in text
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (1 << 40).to_bytes(8, "little") + bytes(8))
    assert main(["info", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "FormatError" in err and "not a GGUF file lorafuse reads" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- extract


def _gpt2(tmp_path: Path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=16, vocab_size=50)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(tmp_path / "base")
    return torch, transformers, model


def test_extract_treats_position_embeddings_as_embeddings(tmp_path):
    """GPT-2's wpe is a torch Embedding: extract stored its LoRA as a Linear's (lora_A / lora_B), which PEFT
    ignores (the change was lost), and with Conv1D layers beside it the run failed on mixed layouts."""
    torch, transformers, model = _gpt2(tmp_path)
    rng = np.random.default_rng(1)
    delta = (rng.standard_normal((16, 3)) @ rng.standard_normal((3, 32))).astype(np.float32) * 0.05
    attn = (rng.standard_normal((32, 2)) @ rng.standard_normal((2, 96))).astype(np.float32) * 0.05
    with torch.no_grad():
        model.transformer.wpe.weight += torch.from_numpy(delta)
        model.transformer.h[0].attn.c_attn.weight += torch.from_numpy(attn)  # Conv1D: stored in x out
    model.save_pretrained(tmp_path / "ft")
    res = lorafuse.extract(tmp_path / "base", tmp_path / "ft", tmp_path / "x", rank=4, embeddings="lora")
    assert "transformer.wpe" in res.ranks and "transformer.h.0.attn.c_attn" in res.ranks
    with safe_open(str(tmp_path / "x" / "adapter_model.safetensors"), "np") as f:
        assert any(k.endswith("wpe.lora_embedding_A") for k in f.keys())
    from peft import PeftModel

    base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    merged = PeftModel.from_pretrained(base, tmp_path / "x").merge_and_unload()
    got = merged.transformer.wpe.weight.detach().numpy() - model.transformer.wpe.weight.detach().numpy() + delta
    np.testing.assert_allclose(got, delta, atol=1e-5)  # rank 3 <= 4: the change exactly
    got_attn = merged.transformer.h[0].attn.c_attn.weight.detach().numpy()
    np.testing.assert_allclose(got_attn, model.transformer.h[0].attn.c_attn.weight.detach().numpy(), atol=1e-5)
    skipped = lorafuse.extract(tmp_path / "base", tmp_path / "ft", rank=4)  # default: embeddings skipped, said
    assert any("transformer.wpe.weight: embedding" in n for n in skipped.notes)


def test_extract_full_embeddings_name_the_layers_in_modules_to_save(tmp_path):
    torch, transformers, model = _gpt2(tmp_path)
    with torch.no_grad():
        model.transformer.wte.weight += 0.01
        model.transformer.h[0].mlp.c_fc.weight += 0.01
    model.save_pretrained(tmp_path / "ft")
    lorafuse.extract(tmp_path / "base", tmp_path / "ft", tmp_path / "x", rank=2, embeddings="full")
    config = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    # PEFT wraps the layer named so (it was ["weight"]); GPT-2's lm_head reads wte's weight: kept whole too
    assert config["modules_to_save"] == ["lm_head", "wte"]


def test_extract_says_which_biases_and_norms_changed(tmp_path, capsys):
    """A LoRA holds weight matrices only; changed biases and norms were dropped without a word, and a BitFit
    fine-tune (biases alone) was called 'the same checkpoint as the base'."""
    torch, transformers, model = _gpt2(tmp_path)
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.bias += 0.1
        model.transformer.h[0].ln_1.weight += 0.1
    model.save_pretrained(tmp_path / "bitfit")
    assert main(["extract", str(tmp_path / "base"), str(tmp_path / "bitfit"), "--rank", "2", "-o",
                 str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "only tensors a LoRA cannot hold changed" in err and "attn.c_attn.bias" in err and "ln_1.weight" in err
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight += 0.01
    model.save_pretrained(tmp_path / "ft")
    res = lorafuse.extract(tmp_path / "base", tmp_path / "ft", rank=2)
    changed = [n for n in res.notes if "changed, but not a weight matrix" in n]
    assert len(changed) == 2 and any("ln_1.weight" in n for n in changed)
    assert not any("ln_2" in n for n in res.notes)  # unchanged tensors are not listed


def test_extract_writes_the_dtype_asked_for_also_from_a_recipe(tmp_path):
    torch, transformers, model = _gpt2(tmp_path)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight += 0.01 * torch.randn(32, 128)
    model.save_pretrained(tmp_path / "ft")
    res = lorafuse.extract(tmp_path / "base", tmp_path / "ft", tmp_path / "x", rank=2, dtype="bf16")
    wide = lorafuse.extract(tmp_path / "base", tmp_path / "ft", rank=2)
    (name, u), = res.adapter.updates.items()
    assert {u.A.dtype, u.B.dtype} == {"BF16"}
    d16, d32 = _delta64(u), _delta64(wide.adapter.updates[name])
    assert np.linalg.norm(d16 - d32) / np.linalg.norm(d32) < 1e-2  # bf16 keeps 8 bits
    with safe_open(str(tmp_path / "x" / "adapter_model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}
    recipe = _recipe(tmp_path, "merge_method: extract\nbase_model: base\nmodels: [{model: ft}]\n"
                               "parameters: {rank: 2}\ndtype: float16\n")
    assert main(["run", str(recipe), "-o", str(tmp_path / "r"), "-q"]) == 0
    with safe_open(str(tmp_path / "r" / "adapter_model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float16"}


# ----------------------------------------------------------------------------- the streamed combine


def _write_list(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_a_rank_near_the_modules_size_is_streamed_exactly(tmp_path):
    """k + 10 sketch columns fall short when k is a large share of min(out, in): 3 passes gave 1.06-1.11x the
    optimum at k = 60 of 128, 2 passes 1.6-2x. Such a module is now sketched whole: the float64 optimum."""
    shapes = {"model.layers.0.self_attn.q_proj": (64, 48)}
    paths = [_peft(tmp_path / f"a{i}", shapes, 100 + i, rank=4, alpha=4) for i in range(30)]
    d = sum(_delta64(lorafuse.load(p).updates["model.layers.0.self_attn.q_proj"]) for p in paths)
    s = np.linalg.svd(d, compute_uv=False)
    k = 16  # 2 (k + 10) >= 48
    optimum = np.sqrt(np.sum(s[k:] ** 2)) / np.linalg.norm(d)
    from lorafuse.ops.combine import CombineOptions, combine_to

    for passes in (1, 2, 3):
        report = combine_to(paths, [1.0] * len(paths), CombineOptions(rank=k, passes=passes, dtype="fp32"),
                            tmp_path / f"out{passes}", overwrite=True)
        assert report.summary is not None and report.summary.engine == "stream"
        got = _delta64(lorafuse.load(tmp_path / f"out{passes}").updates["model.layers.0.self_attn.q_proj"])
        err = np.linalg.norm(d - got) / np.linalg.norm(d)
        assert err <= optimum * (1 + 1e-4), (passes, err, optimum)


def test_a_list_line_that_reads_two_ways_is_refused(tmp_path, capsys):
    """`client 2` where folders `client` and `client 2` both exist was read as `client` with weight 2."""
    for name, seed in (("client", 1), ("client 2", 2), ("client 3", 3)):
        _peft(tmp_path / name, LLM, seed)
    lst = _write_list(tmp_path / "list.txt", ["client 2", "client 3"])
    assert main(["combine", "--from-list", str(lst), "-o", str(tmp_path / "out"), "--rank", "2"]) == 2
    err = capsys.readouterr().err
    assert "line 1: 'client 2' reads two ways" in err and not (tmp_path / "out").exists()
    from lorafuse.ops.combine.many import read_list

    sources, weights = read_list(_write_list(tmp_path / "l2.txt", ["client 2 1", "client 3 0.5"]))
    assert [s.path.name for s in sources] == ["client 2", "client 3"] and weights == [1.0, 0.5]
    (tmp_path / "client").rename(tmp_path / "gone")  # now `client 2` reads one way only: the folder
    sources, weights = read_list(lst)
    assert [s.path.name for s in sources] == ["client 2", "client 3"] and weights == [0.5, 0.5]


def _loha(path: Path, module: str, out: int, inn: int, rank: int = 2, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    save_file({f"{module}.hada_w1_a": rng.standard_normal((out, rank)).astype(np.float32),
               f"{module}.hada_w1_b": rng.standard_normal((rank, inn)).astype(np.float32),
               f"{module}.hada_w2_a": rng.standard_normal((out, rank)).astype(np.float32),
               f"{module}.hada_w2_b": rng.standard_normal((rank, inn)).astype(np.float32),
               f"{module}.alpha": np.array(rank, np.float32)}, str(path))
    return path


def test_a_short_list_with_a_loha_takes_the_in_memory_path(tmp_path, capsys):
    """--from-list with a LoHa failed even with --engine memory, whose advice the message gave."""
    module = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    _kohya(tmp_path / "k1.safetensors", np.ones((320, 4), np.float32) * 0.01, np.ones((4, 320), np.float32) * 0.01)
    _loha(tmp_path / "loha.safetensors", module, 320, 320)
    lst = _write_list(tmp_path / "list.txt", ["k1.safetensors", "loha.safetensors"])
    files = [tmp_path / "k1.safetensors", tmp_path / "loha.safetensors"]
    want = lorafuse.combine(files, [0.5, 0.5], rank=4)
    for engine in ([], ["--engine", "memory"]):
        out = tmp_path / f"out{len(engine)}.safetensors"
        assert main(["combine", "--from-list", str(lst), "-o", str(out), "--rank", "4", "-q", *engine]) == 0
        got = lorafuse.load(out).updates[module]
        np.testing.assert_allclose(_delta64(got), _delta64(want.updates[module]), rtol=1e-5, atol=1e-7)
    assert main(["combine", "--from-list", str(lst), "-o", str(tmp_path / "s.safetensors"), "--rank", "4",
                 "--passes", "2"]) == 1
    err = capsys.readouterr().err
    assert "list.txt line 2: module" in err and "LoHa / LoKr / Tucker" in err


def test_an_adapter_changed_with_its_old_time_put_back_is_detected(tmp_path, at_pass):
    import os

    from lorafuse.errors import InputChangedError
    from lorafuse.ops.combine import CombineOptions, combine_to

    paths = [_peft(tmp_path / f"a{i}", LLM, i) for i in range(3)]
    config = paths[1] / "adapter_config.json"

    def rewrite() -> None:  # the same size, the old modification time restored (cp -p, rsync -t)
        st = config.stat()
        text = config.read_text()
        config.write_text(text.replace('"lora_alpha": 2', '"lora_alpha": 3'))
        os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert config.stat().st_size == st.st_size

    at_pass(2, rewrite)
    with pytest.raises(InputChangedError, match=r"changed since combine started \(pass 2\)"):
        combine_to(paths, None, CombineOptions(rank=2, passes=2), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_streamed_summary_says_how_long_the_headers_took_and_how_rough_the_estimate_is(tmp_path, capsys):
    paths = [_peft(tmp_path / f"a{i}", LLM, i) for i in range(3)]
    lst = _write_list(tmp_path / "list.txt", [p.name for p in paths])
    assert main(["combine", "--from-list", str(lst), "-o", str(tmp_path / "out"), "--rank", "2", "--passes", "2"]) == 0
    out = capsys.readouterr().out
    assert "every adapter's header checked in" in out and "from 10 random probes per module" in out


def test_run_prints_one_json_object_with_each_stages_report(tmp_path, capsys):
    """README: `--dry-run --json` for machines; `run` had no --json."""
    recipe = _two_stages(tmp_path)
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["out"] == str(tmp_path / "out") and not d["dry_run"] and [s["name"] for s in d["stages"]] == ["mix", "fin"]
    assert d["stages"][0]["report"]["method"] == "svd" and d["stages"][1]["report"]["merged"]
    assert main(["run", str(recipe), "-o", str(tmp_path / "out2"), "--json", "--dry-run"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["dry_run"] and d["stages"][0]["plan"]["verb"] == "combine" and d["stages"][1]["plan"] is None
    assert not (tmp_path / "out2").exists()


# ----------------------------------------------------------------------------- failures and limits


def _sharded(folder: Path, scale: float) -> Path:
    """A two-shard checkpoint of LLM's weights (with an index), every weight `scale`."""
    folder.mkdir(parents=True)
    names = sorted(LLM)
    for i, m in enumerate(names):
        shard = folder / f"model-0000{i + 1}-of-00002.safetensors"
        save_file({f"{m}.weight": np.full(LLM[m], scale, np.float32)}, str(shard))
    index = {"metadata": {}, "weight_map": {f"{m}.weight": f"model-0000{i + 1}-of-00002.safetensors"
                                            for i, m in enumerate(names)}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "version": scale}))
    return folder


def test_a_checkpoint_swapped_while_read_is_refused_not_mixed(tmp_path, monkeypatch, capsys):
    """A sharded base replaced by rename (as a lorafuse output is replaced) between the header pass and the
    reads: shards opened after the swap came from the new version, and apply wrote a mix with exit 0."""
    from lorafuse.errors import InputChangedError
    from lorafuse.io.checkpoint import Checkpoint
    from lorafuse.ops import apply as apply_mod

    base, other = _sharded(tmp_path / "base", 1.0), _sharded(tmp_path / "other", 2.0)

    def swap() -> None:
        base.rename(tmp_path / "old")
        other.rename(base)

    ckpt = Checkpoint(base)
    swap()
    with pytest.raises(InputChangedError, match=r"was replaced since lorafuse read its header"):
        ckpt.open(ckpt.shards[0])
    with pytest.raises(InputChangedError, match=r"was replaced while lorafuse read it"):
        ckpt.check_folder()
    (tmp_path / "base").rename(tmp_path / "other")
    (tmp_path / "old").rename(tmp_path / "base")
    lora = _peft(tmp_path / "lora", LLM, 1)
    real = apply_mod._Executor.write_shard
    swapped: list[bool] = []

    def write_shard(self, *args, **kwargs):  # the swap lands after the plan, before the first shard is read
        if not swapped:
            swapped.append(True)
            swap()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(apply_mod._Executor, "write_shard", write_shard)
    assert main(["apply", str(base), str(lora), "-o", str(tmp_path / "out")]) == 1
    assert "InputChangedError" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_out_of_memory_is_one_line(tmp_path, monkeypatch, capsys):
    from lorafuse.ops import apply as apply_mod

    def no_memory(self, count: int, size: int) -> None:
        raise MemoryError("Unable to allocate 48.0 MiB")

    monkeypatch.setattr(apply_mod._Arenas, "__init__", no_memory)
    base, lora = _base(tmp_path / "base", LLM), _peft(tmp_path / "lora", LLM, 1)
    assert main(["apply", str(base), str(lora), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lorafuse apply: error: out of memory (Unable to allocate 48.0 MiB)")
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["base", "lora"]


@pytest.mark.parametrize("limit, threads", [("resource.RLIMIT_AS, (3 << 30, resource.RLIM_INFINITY)", "1"),
                                            (None, None)])
def test_openblas_starts_no_threads_under_a_small_address_space(limit, threads):
    """OpenBLAS raises SIGINT in the process when it cannot start a thread (ulimit -v, ulimit -u): read as Ctrl-C,
    every command said 'interrupted'. Under such a limit it gets one thread (a user's own setting is kept)."""
    import os

    code = ("import os, resource\n" + (f"resource.setrlimit({limit})\n" if limit else "") +
            "from lorafuse.cli import _quiet_blas\n_quiet_blas('combine')\n"
            "print(os.environ.get('OPENBLAS_NUM_THREADS'))\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == str(threads)


def test_an_output_under_a_file_is_refused_before_any_stage_runs(tmp_path, capsys):
    _peft(tmp_path / "a", LLM, 1)
    (tmp_path / "notes.txt").write_text("mine")
    recipe = _recipe(tmp_path, "merge_method: svd\nmodels: [{model: a}]\nparameters: {rank: 2}\n")
    assert main(["run", str(recipe), "-o", str(tmp_path / "notes.txt" / "out")]) == 1
    err = capsys.readouterr().err
    assert "notes.txt is a file, not a folder" in err and "stage" not in err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_temporary_output_is_removed_even_when_its_folder_was_renamed(tmp_path):
    """The output's folder renamed while the output was written: the temporary folder was removed by its old
    path, so it stayed behind in the renamed folder, and the message named it instead of the output."""
    from lorafuse.errors import OutputError
    from lorafuse.io.atomic import atomic_dir

    (tmp_path / "mp").mkdir()
    with pytest.raises(OutputError, match=r"cannot write the output .*mp/merged: No such file or directory"):
        with atomic_dir(tmp_path / "mp" / "merged") as tmp:
            (tmp / "config.json").write_text("{}")
            (tmp_path / "mp").rename(tmp_path / "mp2")
            (tmp / "model.safetensors").write_bytes(b"x")  # the old path is gone: ENOENT
    assert list((tmp_path / "mp2").iterdir()) == []


# ----------------------------------------------------------------------------- the command line, as a new user types it


@pytest.mark.parametrize("argv, says", [
    (["merge", "base", "lora", "-o", "x"], "to merge adapters into a base model: apply"),
    (["help", "aply"], "help: no command 'aply'; did you mean 'apply'?"),  # (`help apply` is apply --help)
    (["resize", "lora", "--new_rank", "2", "-o", "x"], "kohya's --new_rank is --rank here"),
    (["resize", "lora", "--rank", "2", "--save_precision", "fp16", "-o", "x"], "kohya's --save_precision is --dtype"),
    (["combine", "a", "b", "--method", "task_arithmetic", "-o", "x"], "mergekit's task_arithmetic on LoRAs is cat"),
    (["combine", "--weights", "1", "2", "a", "b", "-o", "x"],
     "--weights takes one comma-separated value: --weights 1,2"),
    (["combine", "a", "b", "--verbose", "-o", "x"], "--verbose is an option of apply, convert, extract, resize"),
    (["apply", "base", "lora", "--rank", "4", "-o", "x"], "--rank is an option of combine"),
    (["apply", "base", "lora", "--dtype", "float64", "-o", "x"], "argument --dtype: unknown dtype 'float64'"),
    ([], "give a COMMAND (the list above)"),
])
def test_mistakes_other_tools_teach_get_the_fix(capsys, argv, says):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert says in capsys.readouterr().err


def test_names_users_bring_are_taken(tmp_path, capsys):
    """--device gpu, --method SVD, --split b, convert --to diffusers (the file it writes is diffusers')."""
    a, b = _peft(tmp_path / "a", LLM, 1), _peft(tmp_path / "b", LLM, 2)
    assert main(["combine", str(a), str(b), "--method", "SVD", "--split", "b", "-o", str(tmp_path / "c"), "-q"]) == 0
    from lorafuse.cli import build_parser

    ns = build_parser().parse_args(["apply", "base", "lora", "-o", "x", "--device", "GPU"])
    assert ns.device == "cuda"
    ns = build_parser().parse_args(["convert", "x.safetensors", "--to", "diffusers", "-o", "y.safetensors"])
    assert ns.to == "peft"


def test_a_swapped_base_and_adapter_and_a_trailing_space_are_said(tmp_path, capsys):
    base, lora = _base(tmp_path / "base", LLM), _peft(tmp_path / "lora", LLM, 1)
    assert main(["apply", str(lora), str(base), "-o", str(tmp_path / "x")]) == 1
    assert "the base comes first" in capsys.readouterr().err
    assert main(["apply", str(base) + " ", str(lora), "-o", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert f"{str(base) + ' '!r}: no such file or directory (did you mean {str(base)!r}?" in err


def test_resize_to_a_rank_no_module_exceeds_says_nothing_was_reduced(tmp_path, capsys):
    lora = _peft(tmp_path / "lora", LLM, 1)
    assert main(["resize", str(lora), "--rank", "8", "-o", str(tmp_path / "r")]) == 0
    assert "nothing was reduced" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the API in a long-lived process


def _adapter_sha(out: Path, name: str) -> str:
    with safe_open(str(out / "model.safetensors"), "np") as f:
        inputs = json.loads(f.metadata()["lorafuse.inputs"])
    (record,) = [i for i in inputs if i["role"] == "adapter"]
    return str(record["files"][name])


def test_a_loaded_adapter_whose_file_was_replaced_records_what_it_merged(tmp_path):
    """An Adapter loaded, then its file replaced on disk: the merge used the bytes loaded, the record hashed
    the new file."""
    import hashlib
    import os

    base = _base(tmp_path / "base", LLM)
    a = _peft(tmp_path / "a", LLM, 1)
    other = _peft(tmp_path / "other", LLM, 2)
    loaded_sha = hashlib.sha256((a / "adapter_model.safetensors").read_bytes()).hexdigest()
    adapter = lorafuse.load(a)
    os.replace(other / "adapter_model.safetensors", a / "adapter_model.safetensors")
    lorafuse.apply(base, [adapter], out=tmp_path / "out")
    assert _adapter_sha(tmp_path / "out", "adapter_model.safetensors") == loaded_sha


def test_a_loaded_adapter_whose_folder_was_deleted_still_combines(tmp_path):
    import shutil

    a, b = _peft(tmp_path / "a", LLM, 1), _peft(tmp_path / "b", LLM, 2)
    adapter = lorafuse.load(a)
    want = {n: _delta64(u) for n, u in adapter.updates.items()}
    shutil.rmtree(a)
    result = lorafuse.resize(adapter, rank=2)  # read "to record its sha256" was a FormatError
    for n, u in result.adapter.updates.items():
        np.testing.assert_allclose(_delta64(u), want[n], rtol=1e-5, atol=1e-6)
    lorafuse.combine([adapter, b]).save(tmp_path / "c")


def test_a_stale_mapping_elsewhere_does_not_block_other_saves(tmp_path):
    """One Adapter kept while its file was rewritten in place made every save of unrelated in-memory adapters fail
    (the commit checked every mapped file of the process)."""
    from lorafuse.model import Adapter

    cached = lorafuse.load(_peft(tmp_path / "cached", LLM, 1))
    path = tmp_path / "cached" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-4:] = b"\0\0\0\0"
    path.write_bytes(bytes(data))  # rewritten in place: the cached adapter's mapping is stale now
    q = f"{PREFIX}model.layers.0.self_attn.q_proj"
    plain = Adapter.from_state_dict({f"{q}.lora_A.weight": np.ones((2, H), np.float32),
                                     f"{q}.lora_B.weight": np.ones((H, 2), np.float32)})
    plain.save(tmp_path / "plain")
    (2 * plain).save(tmp_path / "twice")
    assert cached.updates  # (kept alive to the end)


def test_two_runs_sharing_an_intermediate_folder_refuse_the_second(tmp_path):
    """Two lorafuse.run calls at once with one intermediate_dir read each other's stage outputs silently."""
    import threading

    from lorafuse.errors import OutputError
    from lorafuse.recipes import runner

    recipe = _two_stages(tmp_path)
    gate, inside = threading.Event(), threading.Event()
    real = runner._intermediate

    def slow(*args, **kwargs):  # the first run holds the folder while the second starts
        inside.set()
        gate.wait(10)
        return real(*args, **kwargs)

    errors: list[BaseException] = []

    def first() -> None:
        try:
            lorafuse.run(recipe, tmp_path / "one", intermediate_dir=tmp_path / "shared")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    runner._intermediate = slow
    try:
        t = threading.Thread(target=first)
        t.start()
        assert inside.wait(10)
        runner._intermediate = real
        with pytest.raises(OutputError, match="another lorafuse run is writing its stages there"):
            lorafuse.run(recipe, tmp_path / "two", intermediate_dir=tmp_path / "shared")
    finally:
        runner._intermediate = real
        gate.set()
        t.join(30)
    assert not errors and (tmp_path / "one" / "model.safetensors").is_file() and not (tmp_path / "two").exists()


def test_extract_is_exact_where_the_rank_is_a_large_share_of_the_module(tmp_path):
    """A flat spectrum (a fine-tune that changed a small layer everywhere) at rank 32 of 128: the randomized SVD's
    k + 10 columns gave 1.0118x the optimum. Where 4 (k + 10) >= min(out, in), as combine does, the difference is
    formed and its SVD is exact."""
    rng = np.random.default_rng(11)
    w = rng.standard_normal((256, 128)).astype(np.float32)
    d = rng.standard_normal((256, 128)).astype(np.float32) * 0.01  # flat
    for name, arr in (("base", w), ("ft", w + d)):
        (tmp_path / name).mkdir()
        save_file({"model.layers.0.mlp.up_proj.weight": arr}, str(tmp_path / name / "model.safetensors"))
    res = lorafuse.extract(tmp_path / "base", tmp_path / "ft", rank=32)
    (u,) = res.adapter.updates.values()
    exact = (w + d).astype(np.float64) - w.astype(np.float64)
    s = np.linalg.svd(exact, compute_uv=False)
    optimum = np.sqrt(np.sum(s[32:] ** 2)) / np.linalg.norm(exact)
    got = np.linalg.norm(exact - _delta64(u)) / np.linalg.norm(exact)
    assert got <= optimum * (1 + 1e-5), (got, optimum)
    assert res.modules[0].rel_error == pytest.approx(got, rel=1e-4)
