"""Red-team round 4, recipes and CLI manners (`lorafuse run`, the recorded command line, argparse): each test is
a finding that was wrong before, checked against an independent reference (hashlib, numpy float64, the
safetensors package, PyYAML) or the exact error."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from redteam_fixtures import PREFIX, kohya_file, llm_base, peft_folder
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import LorafuseValueError, OutputError, RecipeError, UnsupportedError
from lorafuse.io.provenance import (
    InputRecord,
    Invocation,
    Provenance,
    command_text,
    describe_lines,
    flat_inputs,
    model_card,
)
from lorafuse.io.safetensors import MAX_HEADER_VALUES, MAX_METADATA_BYTES, TensorSpec, encode_header, read_header

H = 8
LLM = {"model.layers.0.self_attn.q_proj": (H, H), "model.layers.0.mlp.up_proj": (2 * H, H)}


def _adapters(folder: Path) -> None:
    """a and b (rank 2), c (rank 2, another seed) and a base, all of LLM's modules."""
    peft_folder(folder / "a", LLM, 1)
    peft_folder(folder / "b", LLM, 2)
    peft_folder(folder / "c", LLM, 3)
    llm_base(folder / "base", LLM)


def _recipe(folder: Path, text: str, name: str = "r.yml") -> Path:
    (folder / name).write_text(text)
    return folder / name


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "np") as f:  # the safetensors package's own reader
        return dict(f.metadata())


def _header_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        return int(struct.unpack("<Q", f.read(8))[0])


def _depth(x: object) -> int:
    if isinstance(x, dict):
        return 1 + max((_depth(v) for v in x.values()), default=0)
    if isinstance(x, list):
        return 1 + max((_depth(v) for v in x), default=0)
    return 0


def _fan_in(n: int) -> str:
    """s0 = resize(a); s_i = svd(s_{i-1}, 0.5 * s_{i-1}): each stage reads the one before twice."""
    docs = ["name: s0\nmerge_method: resize\nmodels: [{model: a}]\nparameters: {rank: 2}\n"]
    docs += [f"name: s{i}\nmerge_method: svd\nmodels: [{{model: s{i - 1}}}, {{model: s{i - 1}, parameters: "
             f"{{weight: 0.5}}}}]\nparameters: {{rank: 2}}\n" for i in range(1, n)]
    return "---\n".join(docs)


# ----------------------------------------------------------------------------- 1. provenance of chained stages


def test_a_stage_read_twice_is_recorded_once_and_the_record_grows_linearly(tmp_path):
    """Each input naming a stage held a full copy of its record: a stage read k times was copied k times, so a
    fan-in recipe's header doubled with each stage (9.6 MB at 14 stages, past the reader's limits at 18). Now
    `lorafuse.stages` holds each stage once and inputs name it (`stage`): 7 stages write a header about 7/4 the
    size of 4 stages', and every leaf input still has its sha256."""
    _adapters(tmp_path)
    sizes = {}
    for n in (4, 7):
        out = tmp_path / f"out{n}"
        assert main(["run", str(_recipe(tmp_path, _fan_in(n), f"fan{n}.yml")), "-o", str(out), "-q"]) == 0
        file = out / "adapter_model.safetensors"
        sizes[n] = _header_bytes(file)
        meta = _metadata(file)
        inputs = json.loads(meta["lorafuse.inputs"])
        stages = json.loads(meta["lorafuse.stages"])
        assert sorted(stages) == sorted(f"s{i}" for i in range(n - 1))
        assert [(i["name"], i["stage"], i["weight"]) for i in inputs] == [(f"s{n - 2}", f"s{n - 2}", 1.0),
                                                                           (f"s{n - 2}", f"s{n - 2}", 0.5)]
        assert "made_by" not in meta["lorafuse.inputs"] + meta["lorafuse.stages"]
        assert all("stages" not in s for s in stages.values())  # one flat map, no nesting
        for i in range(1, n - 1):  # each stage reads the one before by name, twice
            assert [x["stage"] for x in stages[f"s{i}"]["inputs"]] == [f"s{i - 1}"] * 2
        leaf = stages["s0"]["inputs"][0]
        assert leaf["name"] == "a" and "stage" not in leaf
        assert leaf["files"] == {f: _sha(tmp_path / "a" / f) for f in ("adapter_config.json",
                                                                         "adapter_model.safetensors")}
        assert meta["lorafuse.stages"].count('"recipe":"stage s0"') == 1
        assert _depth(stages) == _depth(json.loads(_metadata(tmp_path / "out4" / "adapter_model.safetensors")
                                                   ["lorafuse.stages"]))  # no deeper with more stages
    assert sizes[7] < 2 * sizes[4]  # was 8x (doubling per stage)


def test_info_and_the_card_list_a_stage_read_twice_once(tmp_path, capsys):
    _adapters(tmp_path)
    out = tmp_path / "out"
    assert main(["run", str(_recipe(tmp_path, _fan_in(3))), "-o", str(out), "-q"]) == 0
    assert main(["info", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "input 1     s1 (adapter, weight 1)" in shown and "input 2     s1 (adapter, weight 0.5)" in shown
    assert "input 1.1   s0 (adapter, weight 1)" in shown and "input 1.1.1 a (adapter)" in shown
    assert "input 2.1" not in shown and "made from the inputs under input 1 (the same stage)" in shown
    assert shown.count(" a (adapter") == 1  # the leaf once, however often its stages are read
    card = (out / "README.md").read_text()
    assert "| 1.1.1 | `a` | adapter |" in card and "| 2 | `s1` (stage; made from the inputs under 1) |" in card


def test_the_last_output_of_a_two_stage_recipe_names_every_input(tmp_path):
    """mix = svd(a, b), fin = apply(base, mix): fin's record names mix by stage and keeps mix's inputs (a, b
    with their sha256) in lorafuse.stages."""
    _adapters(tmp_path)
    recipe = _recipe(tmp_path, "name: mix\nmerge_method: svd\nmodels: [{model: a}, {model: b}]\nparameters: "
                               "{rank: 2}\n---\nname: fin\nmerge_method: apply\nbase_model: base\n"
                               "models: [{model: mix}]\n")
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 0
    meta = _metadata(tmp_path / "out" / "model.safetensors")
    inputs = json.loads(meta["lorafuse.inputs"])
    assert [(i["name"], i.get("stage")) for i in inputs] == [("base", None), ("mix", "mix")]
    mix = json.loads(meta["lorafuse.stages"])["mix"]
    assert mix["operation"] == "combine" and mix["recipe"] == "stage mix"
    for record, name in zip(mix["inputs"], ("a", "b")):
        assert record["name"] == name
        assert record["files"]["adapter_model.safetensors"] == _sha(tmp_path / name / "adapter_model.safetensors")
    back = Provenance.from_metadata(meta)
    assert back is not None and back.stages["mix"].inputs[1].name == "b" and back.metadata() == {
        k: v for k, v in meta.items() if k.startswith("lorafuse.") and k != "lorafuse_version"}


def _chain(depth: int) -> Provenance:
    """A record whose stages s0 .. s{depth-1} each read the one before (s0 reads the file a)."""
    stages: dict[str, Provenance] = {}
    prev = InputRecord("a", "adapter", sha256="0" * 64)
    for i in range(depth):
        stages[f"s{i}"] = Provenance("resize", (prev,), Invocation("recipe", f"stage s{i}"))
        prev = InputRecord(f"s{i}", "adapter", sha256="1" * 64, stage=f"s{i}")
    return Provenance("resize", (prev,), Invocation("recipe", "..."), stages=stages)


def test_a_deep_chain_of_stages_is_listed_without_recursion():
    """flat_inputs recursed once per stage: past ~1000 stages a RecursionError."""
    p = _chain(1500)
    rows = flat_inputs(p.inputs, stages=p.stages)
    assert len(rows) == 1501 and rows[-1][1].name == "a" and rows[-1][0] == ".".join(["1"] * 1501)
    assert len(describe_lines(p.as_dict())) > 1500
    assert "| 1.1 | `s1498` | adapter |" in model_card(p)
    assert Provenance.from_metadata(p.metadata()) == p


def test_a_record_nested_too_deeply_for_json_is_a_lorafuse_error():
    """An in-memory adapter made from one made in memory, thousands deep: json.dumps raised RecursionError
    (a traceback from the CLI); now a LorafuseValueError saying what to do."""
    p = Provenance("resize", (InputRecord("a", "adapter", sha256="0" * 64),), Invocation("python", "x"))
    for _ in range(3000):
        p = Provenance("resize", (InputRecord("<in-memory adapter>", "adapter", made_by=p),), Invocation("python", "x"))
    with pytest.raises(LorafuseValueError, match="nested too deeply to be written"):
        p.metadata()


def test_a_header_the_reader_would_refuse_is_not_written(tmp_path):
    """encode_header wrote any header: a metadata of 17 MiB or 5 Mi JSON values made a file that lorafuse's
    reader then refused as 'a corrupt or hostile file'. The writer refuses what the reader refuses."""
    spec = [TensorSpec("t", "F32", (2,))]
    with pytest.raises(OutputError, match=f"more than the {MAX_METADATA_BYTES:,} that lorafuse reads"):
        encode_header(spec, {"k": "x" * (MAX_METADATA_BYTES + 1)})
    with pytest.raises(OutputError, match=f"more than the {MAX_HEADER_VALUES:,} that lorafuse reads"):
        encode_header(spec, {"k": "," * (MAX_HEADER_VALUES + 1)})
    ok = {"k": "," * (MAX_HEADER_VALUES - 16)}  # just under: written, and both readers take it back
    path = tmp_path / "ok.safetensors"
    save_file({"t": np.ones(2, np.float32)}, str(path), metadata=ok)
    header, _ = encode_header(spec, ok)
    assert read_header(path)[1] == ok and _metadata(path) == ok and len(header) > 8


# ----------------------------------------------------------------------------- 2. the up-front check


@pytest.mark.parametrize("params, field, why", [
    ("{split: sqrt}", "parameters.split", "merge_method 'cat' takes no split"),
    ("{passes: 2, engine: memory}", "parameters.passes", "not to engine 'memory'"),
    ("{ray_address: auto}", "parameters.ray_address", "a recipe cannot name a Ray cluster"),
])
def test_a_dry_run_refuses_what_the_stage_refuses(tmp_path, capsys, params, field, why):
    """--dry-run exited 0; the run did stage s1 and then failed without a line number."""
    _adapters(tmp_path)
    method = "cat" if "split" in params else "svd"
    recipe = _recipe(tmp_path, "name: s1\nmerge_method: svd\nmodels: [{model: a}, {model: b}]\nparameters: "
                               f"{{rank: 2}}\n---\nname: s2\nmerge_method: {method}\nmodels: [{{model: s1}}, "
                               f"{{model: c}}]\nparameters: {params}\n")
    for dry in (["--dry-run"], []):
        assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q", *dry]) == 2
        err = capsys.readouterr().err
        assert f"r.yml line 9, {field}: " in err and why in err
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".lorafuse-run-*"))


def test_split_on_a_one_stage_ties_recipe_names_its_line(tmp_path, capsys):
    _adapters(tmp_path)
    recipe = _recipe(tmp_path, "merge_method: ties\nmodels: [{model: a}, {model: b}]\nparameters: {density: 0.5, "
                               "split: sqrt}\n")
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "--dry-run"]) == 2
    assert ("r.yml line 3, parameters.split: merge_method 'ties' takes no split (it takes: density, majority_sign, "
            "weight)") in capsys.readouterr().err


# ----------------------------------------------------------------------------- 3. empty YAML documents


@pytest.mark.parametrize("text, stages", [
    ("merge_method: svd\nmodels: [{model: a}]\nparameters: {rank: 2}\n---\n", ["stage"]),
    ("name: s1\nmerge_method: svd\nmodels: [{model: a}]\nparameters: {rank: 2}\n---\n# stage 2 disabled\n---\n"
     "name: s2\nmerge_method: resize\nmodels: [{model: s1}]\nparameters: {rank: 1}\n", ["s1", "s2"]),
    ("---\nmerge_method: svd\nmodels: [{model: a}]\nparameters: {rank: 2}\n---\n...\n---\n", ["stage"]),
])
def test_empty_documents_are_skipped(tmp_path, text, stages):
    """A trailing '---' made a second stage ('a recipe of 2 stages names each one'), a commented-out stage a
    'NoneType' stage: PyYAML gives an empty document as a null scalar, not as None."""
    _adapters(tmp_path)
    import yaml

    assert len([d for d in yaml.safe_load_all(text) if d is not None]) == len(stages)  # PyYAML's own count
    report = lorafuse.run(_recipe(tmp_path, text), tmp_path / "out", dry_run=True)
    assert [s.name for s in report.stages] == stages


# ----------------------------------------------------------------------------- 4. a stage's first model


@pytest.mark.parametrize("model, why", [("missing_lora", "missing_lora: no such file or directory"),
                                        ("junk.safetensors", "junk.safetensors: not a safetensors file")])
def test_a_stage_whose_first_model_cannot_be_read_names_itself(tmp_path, capsys, model, why):
    """The stage before the last reads its first model to tell where its output goes (a folder or a file):
    that error came without the recipe and the stage."""
    _adapters(tmp_path)
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(64))
    recipe = _recipe(tmp_path, f"name: s1\nmerge_method: svd\nmodels: [{{model: {model}}}]\n---\nname: s2\n"
                               "merge_method: resize\nmodels: [{model: s1}]\nparameters: {rank: 2}\n")
    for dry in ([], ["--dry-run"]):
        assert main(["run", str(recipe), "-o", str(tmp_path / "out"), *dry]) == 1
        err = capsys.readouterr().err
        assert "r.yml, stage 's1' (combine): " in err and "FormatError: " in err and why in err


# ----------------------------------------------------------------------------- 5. a recipe behind a link


def test_a_linked_recipe_reads_relative_paths_from_the_links_folder(tmp_path):
    """proj/m.yml -> ../real/m.yml read `a` from real/, where combine --from-list proj/l.txt (a link too) reads
    proj/a: now both read from the folder of the path given."""
    (tmp_path / "real").mkdir()
    peft_folder(tmp_path / "proj" / "a", LLM, 1)
    (tmp_path / "real" / "m.yml").write_text("merge_method: svd\nmodels: [{model: a}]\nparameters: {rank: 2}\n")
    (tmp_path / "proj" / "m.yml").symlink_to(Path("..") / "real" / "m.yml")
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "proj" / "m.yml"), "-o", str(out), "-q"]) == 0
    inputs = json.loads(_metadata(out / "adapter_model.safetensors")["lorafuse.inputs"])
    assert inputs[0]["name"] == "a"
    assert inputs[0]["files"]["adapter_model.safetensors"] == _sha(
        tmp_path / "proj" / "a" / "adapter_model.safetensors")


# ----------------------------------------------------------------------------- 6 / 7. the command line


@pytest.mark.parametrize("words", [["-qo", "{out}"], ["-qo{out}"], ["-o{out}", "-q"], ["--out={out}", "-q"],
                                   ["-q", "-o", "{out}"]])
def test_the_recorded_command_hides_the_output_in_every_spelling(tmp_path, words):
    """-qo OUT and -qoOUT kept the output's path in lorafuse.command: the same job wrote other bytes into
    another folder."""
    peft_folder(tmp_path / "a", LLM, 1)
    got = []
    for name in ("x1", "x2"):
        out = tmp_path / name
        assert main(["resize", str(tmp_path / "a"), "--rank", "1", *[w.format(out=out) for w in words]]) == 0
        got.append((out / "adapter_model.safetensors").read_bytes())
        command = _metadata(out / "adapter_model.safetensors")["lorafuse.command"]
        assert str(out) not in command and "OUT" in command
    assert got[0] == got[1]


def test_command_text_of_short_groups():
    assert command_text(["resize", "a", "-qo", "x"], "x") == "lorafuse resize a -qo OUT"
    assert command_text(["resize", "a", "-qox"], "x") == "lorafuse resize a -qoOUT"
    assert command_text(["resize", "a", "-o=x"], "x") == "lorafuse resize a -o=OUT"
    assert command_text(["combine", "-o", "x", "--", "-o", "x"], "x") == "lorafuse combine -o OUT -- -o x"
    assert command_text(["resize", "x", "-r", "x"], "x") == "lorafuse resize x -r x"  # not an -o group


@pytest.mark.parametrize("words, said", [
    (["--ou=OUT"], "unrecognized argument --ou: options are spelled in full (did you mean '--out'?)"),
    (["-o", "OUT", "--weight", "-0.5,1"], "unrecognized argument --weight: options are spelled in full (did you "
                                          "mean '--weights'?)"),
    (["-o", "OUT", "--weight", "1", "0.5"], "did you mean '--weights'?"),
    (["-o", "OUT", "--dry"], "did you mean '--dry-run'?"),
])
def test_abbreviated_options_are_refused(tmp_path, capsys, words, said):
    """argparse took --ou=X and --weight for --out and --weights, past the checks that read the words (the
    recorded -o OUT, --weights' negative values): `--weight -0.5,1` failed as 'expected one argument'."""
    _adapters(tmp_path)
    out = str(tmp_path / "o")
    argv = ["apply", str(tmp_path / "base"), str(tmp_path / "a"), str(tmp_path / "b"),
            *[w.replace("OUT", out) for w in words]]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and said in capsys.readouterr().err and not os.path.lexists(out)
    assert main(["apply", str(tmp_path / "base"), str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "-0.5,1",
                 "-o", out, "--dry-run", "-q"]) == 0


# ----------------------------------------------------------------------------- 8. recipe values


def test_recipe_names_take_any_case_and_give_the_commands_result(tmp_path):
    """merge_method: TIES, format: PEFT, split: b were refused though --method TIES, --format PEFT and --split b
    work; the recipe now runs the same command: the same tensors."""
    _adapters(tmp_path)
    recipe = _recipe(tmp_path, "merge_method: TIES\nmodels: [{model: a}, {model: b}]\nparameters: {density: 0.5, "
                               "majority_sign: total}\nformat: PEFT\ndtype: FP32\n")
    assert main(["run", str(recipe), "-o", str(tmp_path / "r"), "-q"]) == 0
    assert main(["combine", str(tmp_path / "a"), str(tmp_path / "b"), "--method", "TIES", "--density", "0.5",
                 "--format", "PEFT", "--dtype", "fp32", "-o", str(tmp_path / "cli"), "-q"]) == 0
    got, want = (load_file(str(tmp_path / x / "adapter_model.safetensors")) for x in ("r", "cli"))
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)
    recipe = _recipe(tmp_path, "merge_method: resize\nmodels: [{model: a}]\nparameters: {rank: 1, split: b}\n",
                     "s.yml")
    assert main(["run", str(recipe), "-o", str(tmp_path / "s"), "-q"]) == 0
    assert main(["resize", str(tmp_path / "a"), "--rank", "1", "--split", "B", "-o", str(tmp_path / "t"), "-q"]) == 0
    got, want = (load_file(str(tmp_path / x / "adapter_model.safetensors")) for x in ("s", "t"))
    assert all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("params", ["{sv_ratio: 1}", "{rank: 2, power_iters: 100}", "{rank: 2, oversample: 1048576}"])
def test_recipe_bounds_are_the_commands(tmp_path, params):
    """sv_ratio: 1, power_iters 65..100 and oversample 4097..2^20 were refused (schema.py's own numbers), though
    extract takes them (_validate's MAX_POWER_ITERS, MAX_OVERSAMPLE; --sv-ratio >= 1)."""
    _adapters(tmp_path)
    recipe = _recipe(tmp_path, f"merge_method: extract\nbase_model: base\nmodels: [{{model: base}}]\nparameters: "
                               f"{params}\n")
    report = lorafuse.run(recipe, tmp_path / "out", dry_run=True)
    assert report.stages[0].verb == "extract"


def test_recipe_bounds_refuse_past_the_commands(tmp_path):
    _adapters(tmp_path)
    for params, field in (("{rank: 2, power_iters: 101}", "power_iters"), ("{sv_ratio: 0.5}", "sv_ratio"),
                          ("{rank: 2, oversample: 1048577}", "oversample")):
        recipe = _recipe(tmp_path, f"merge_method: extract\nbase_model: base\nmodels: [{{model: base}}]\n"
                                   f"parameters: {params}\n")
        with pytest.raises(RecipeError, match=f"r.yml line 4, parameters.{field}: "):
            lorafuse.run(recipe, tmp_path / "out", dry_run=True)


def test_an_unknown_method_is_quoted_as_written(tmp_path):
    _adapters(tmp_path)
    recipe = _recipe(tmp_path, "merge_method: TIEZ\nmodels: [{model: a}]\n")
    with pytest.raises(RecipeError, match=r"line 1, merge_method: unknown merge_method 'TIEZ' \(did you mean 'ties'"):
        lorafuse.run(recipe, tmp_path / "out", dry_run=True)


# ----------------------------------------------------------------------------- 9. base_model of a chain


def test_a_chained_output_names_the_real_base(tmp_path):
    """m2 = apply(m1, b), m1 = apply(base, a): the card and lorafuse.base_model said 'm1', an intermediate that
    no longer exists; extract with base_model m1 wrote base_model_name_or_path 'm1'."""
    _adapters(tmp_path)
    recipe = _recipe(tmp_path, "name: m1\nmerge_method: apply\nbase_model: base\nmodels: [{model: a}]\n---\n"
                               "name: m2\nmerge_method: apply\nbase_model: m1\nmodels: [{model: b}]\n")
    assert main(["run", str(recipe), "-o", str(tmp_path / "ch"), "-q"]) == 0
    assert _metadata(tmp_path / "ch" / "model.safetensors")["lorafuse.base_model"] == "base"
    assert (tmp_path / "ch" / "README.md").read_text().startswith('---\nbase_model: "base"\n')
    import shutil

    shutil.copytree(tmp_path / "ch", tmp_path / "ft")
    recipe = _recipe(tmp_path, "name: m1\nmerge_method: apply\nbase_model: base\nmodels: [{model: a}]\n---\n"
                               "name: x\nmerge_method: extract\nbase_model: m1\nmodels: [{model: ft}]\n"
                               "parameters: {rank: 2}\n", "x.yml")
    assert main(["run", str(recipe), "-o", str(tmp_path / "x"), "-q"]) == 0
    config = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "base"
    assert _metadata(tmp_path / "x" / "adapter_model.safetensors")["lorafuse.base_model"] == "base"
    # and the delta extracted is ft - m1 = b's delta (ft = m1 + b, scale alpha / r = 1): numpy float64
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    x = load_file(str(tmp_path / "x" / "adapter_model.safetensors"))
    scale = config["lora_alpha"] / config["r"]
    for m in LLM:
        want = b[f"{PREFIX}{m}.lora_B.weight"].astype(np.float64) @ b[f"{PREFIX}{m}.lora_A.weight"]
        got = scale * x[f"{PREFIX}{m}.lora_B.weight"].astype(np.float64) @ x[f"{PREFIX}{m}.lora_A.weight"]
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


# ----------------------------------------------------------------------------- 10. the smaller ones


def test_print_schema_with_a_recipe_is_refused(tmp_path, capsys):
    _adapters(tmp_path)
    recipe = _recipe(tmp_path, "merge_method: svd\nmodels: [{model: a}]\n")
    assert main(["run", str(recipe), "-o", str(tmp_path / "x"), "--print-schema"]) == 2
    assert "--print-schema prints the recipe schema and runs nothing" in capsys.readouterr().err
    assert main(["run", "--print-schema"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "lorafuse recipe stage"


def _kohya_sd1(path: Path) -> Path:
    return kohya_file(path, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", seed=0)


def test_convert_family_is_refused_where_it_would_be_ignored_or_untrue(tmp_path, capsys):
    """--family flux on an SD 1.x kohya file printed '(flux names)' and wrote unet.* names; --family on a
    conversion that renames nothing was ignored silently."""
    k = _kohya_sd1(tmp_path / "k.safetensors")
    assert main(["convert", str(k), "--to", "peft", "--family", "flux", "-o", str(tmp_path / "p.safetensors")]) == 1
    assert "family 'flux' does not fit its modules" in capsys.readouterr().err
    with pytest.raises(UnsupportedError, match="is a layer of an SD 1.x / SDXL UNet"):
        lorafuse.convert(k, tmp_path / "p.safetensors", to="peft", family="flux")
    assert main(["convert", str(k), "--to", "kohya", "--family", "sd1", "-o", str(tmp_path / "k2.safetensors")]) == 2
    assert "k.safetensors is a kohya file already" in capsys.readouterr().err
    assert main(["convert", str(k), "--to", "peft", "--family", "sd1", "-o", str(tmp_path / "p.safetensors"),
                 "-q"]) == 0
    assert main(["convert", str(tmp_path / "p.safetensors"), "--to", "peft", "--family", "sd1",
                 "-o", str(tmp_path / "p2.safetensors"), "--dry-run"]) == 2
    assert "is a diffusers file already" in capsys.readouterr().err
    assert not (tmp_path / "k2.safetensors").exists() and not (tmp_path / "p2.safetensors").exists()


@pytest.mark.parametrize("text, said", [
    # (`yes:` is text to YAML 1.2's core schema, which recipes are read by since round 5: an unknown field there)
    ("merge_method: svd\nmodels: [{model: a}]\nTRUE: 3\n", "line 3: the key 'TRUE' is read by YAML as a boolean"),
    ("merge_method: svd\nmodels: [{model: a}]\nparameters: {null: 3}\n",
     "line 3: in parameters, the key 'null' is read by YAML as null"),
    ("merge_method: svd\nmodels: [{model: a}]\nparameters:\n  rank: 2\n  true: 1\n  True: 2\n",
     "line 5: in parameters, the key 'true' is read by YAML as a boolean"),
    ("merge_method: svd\nmodels:\n  - {model: a, 7: 3}\n", "line 3: in models[0], the key '7' is read by YAML as an "
                                                            "integer"),
])
def test_a_key_yaml_does_not_read_as_text_is_refused_at_its_line(tmp_path, text, said):
    """`yes: 3` on line 3 said 'line 1, [1]: Keys should be strings'; `true:` and `True:` merged silently."""
    import yaml

    assert _non_text_key(yaml.safe_load(text))  # PyYAML reads a key that is not a str
    with pytest.raises(RecipeError, match="r.yml " + re.escape(said)):
        lorafuse.run(_recipe(tmp_path, text), tmp_path / "out", dry_run=True)


def _non_text_key(x: object) -> bool:
    if isinstance(x, dict):
        return any(not isinstance(k, str) for k in x) or any(_non_text_key(v) for v in x.values())
    return isinstance(x, list) and any(_non_text_key(v) for v in x)


def test_a_merge_key_still_works(tmp_path):
    _adapters(tmp_path)
    text = "merge_method: svd\nmodels: [{model: a}]\nparameters:\n  <<: {rank: 1}\n  seed: 3\n"
    report = lorafuse.run(_recipe(tmp_path, text), tmp_path / "out", dry_run=True)
    assert "--rank=1" in report.stages[0].argv and "--seed=3" in report.stages[0].argv


def test_a_recipe_error_names_the_recipe_parameter(tmp_path, capsys):
    """'pass --skip-missing, Python: skip_missing=True' in a recipe, whose stage is written skip_missing: true."""
    _adapters(tmp_path)
    peft_folder(tmp_path / "extra", {**LLM, "model.layers.0.mlp.gate_proj": (2 * H, H)}, 4)
    recipe = _recipe(tmp_path, "merge_method: apply\nbase_model: base\nmodels: [{model: extra}]\n")
    assert main(["run", str(recipe), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "(pass `parameters: {skip_missing: true}` in the recipe, to merge the others" in err
    assert "--skip-missing" not in err
    (tmp_path / "r.yml").write_text(recipe.read_text() + "parameters: {skip_missing: true}\n")
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 0


def test_one_line_yaml_text_is_a_recipe(tmp_path, monkeypatch):
    """lorafuse.run('{merge_method: svd, models: [{model: a}]}', out) looked for a file of that name."""
    _adapters(tmp_path)
    monkeypatch.chdir(tmp_path)
    report = lorafuse.run("{merge_method: svd, models: [{model: a}], parameters: {rank: 1}}", "out")
    assert report.out == Path("out") and (tmp_path / "out" / "adapter_model.safetensors").is_file()
    # YAML text, not a file name: a list of stages (as JSON writes several, round 6)
    report = lorafuse.run("[{merge_method: resize, models: [{model: a}], parameters: {rank: 1}}]", "o2")
    assert report.out == Path("o2") and (tmp_path / "o2" / "adapter_model.safetensors").is_file()
    with pytest.raises(RecipeError, match="missing.yml: no such recipe file"):
        lorafuse.run("missing.yml", "o3")


def test_info_on_a_link_loop_says_so(tmp_path, capsys):
    """info said 'no such file or directory' for a loop of symbolic links (resize: 'Too many levels of
    symbolic links')."""
    (tmp_path / "l1").symlink_to("l2")
    (tmp_path / "l2").symlink_to("l1")
    try:
        os.stat(tmp_path / "l1")
    except OSError as e:
        strerror = e.strerror  # the system's own words
    assert main(["info", str(tmp_path / "l1")]) == 1
    assert f"l1: cannot read: {strerror} (a loop of symbolic links)" in capsys.readouterr().err
    (tmp_path / "d").symlink_to("nowhere")
    assert main(["info", str(tmp_path / "d")]) == 1
    assert ("d: no such file or directory (a symbolic link to 'nowhere', which does not exist)"
            in capsys.readouterr().err)
