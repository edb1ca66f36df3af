"""Hostile and careless inputs to recipes (lorafuse run), provenance records (lorafuse info) and their
neighbours: each case here crashed with a Python exception, hung or ate memory, or left a file behind, before
its fix. Every error must be a LorafuseError naming what was wrong; nothing outside the output is written.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import numpy as np
import pytest
from recipe_fixtures import make_adapter
from safetensors.numpy import save_file

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import OutputError, RecipeError
from lorafuse.io.provenance import Provenance, describe_lines
from lorafuse.recipes.checks import check
from lorafuse.recipes.source import parse, read

# ----------------------------------------------------------------------------- recipe text


def billion_laughs(levels: int) -> str:
    """A mapping `z` whose anchors expand to 9**levels scalars, then a stage that names the last one."""
    names = [f"l{i}" for i in range(levels + 1)]
    lines = ["z:", f"  {names[0]}: &{names[0]} [x, x, x, x, x, x, x, x, x]"]
    for prev, cur in zip(names, names[1:]):
        lines.append(f"  {cur}: &{cur} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + f"\nmerge_method: linear\nmodels: *{names[-1]}\n"


def test_yaml_alias_bomb_is_refused_fast_and_small(tmp_path: Path):
    """9**9 (387 million) scalars by aliases: the positions of the fields were collected by walking every
    alias again (exponential time and memory); now each node is walked once."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(RecipeError, match=r"r\.yml line \d+, models\[0\]"):
        check(parse(billion_laughs(9), "r.yml", tmp_path))
    assert time.perf_counter() - t0 < 5.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: under 200 MiB more


def test_an_aliased_field_is_still_named(tmp_path: Path):
    """An aliased mapping is walked once: a bad value inside its second use is still named, at the line of
    the anchored node (PyYAML gives both uses that node)."""
    text = "merge_method: linear\nmodels:\n- &m {model: a, parameters: {weight: x}}\n- *m\n"
    with pytest.raises(RecipeError) as e:
        check(parse(text, "r.yml", tmp_path))
    assert "r.yml line 3, models[0].parameters.weight" in str(e.value)
    assert "r.yml line 3, models[1].parameters.weight" in str(e.value)


@pytest.mark.parametrize("text", ["a: " + "[" * 50000 + "]" * 50000, "a: " + "{a: " * 5000 + "1" + "}" * 5000],
                         ids=["lists", "mappings"])
def test_deeply_nested_yaml_is_a_recipe_error(tmp_path: Path, text: str):
    with pytest.raises(RecipeError, match="r.yml: not a recipe: its YAML is nested too deeply"):
        parse(text, "r.yml", tmp_path)


@pytest.mark.parametrize("bad", ["\x00", "\udcff", "\x07"], ids=["nul", "surrogate", "bel"])
def test_characters_yaml_refuses_are_a_recipe_error(tmp_path: Path, bad: str):
    """PyYAML's reader checks the text when the loader is made, which was outside the error handling."""
    with pytest.raises(RecipeError, match=r"<recipe>: not valid YAML: unacceptable character"):
        lorafuse.run(f"merge_method: linear\nmodels: [{{model: a{bad}}}]\n", tmp_path / "out", dry_run=True)


def test_an_endless_recipe_file_is_refused_without_reading_it_whole(tmp_path):
    """/dev/zero was read whole (MemoryError, or the machine's memory) before anything looked at it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (min(8 << 30, hard) if hard > 0 else 8 << 30, hard))
    try:
        with pytest.raises(RecipeError, match=r"/dev/zero: is a character device, not a recipe file"):
            read("/dev/zero")
        big = tmp_path / "big.yml"  # a regular file too big: read up to the limit, then refused
        with open(big, "wb") as f:
            f.truncate(2 << 20)
        with pytest.raises(RecipeError, match=r"big.yml: larger than 1 Mi characters: not a recipe"):
            read(big)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_a_recipe_that_is_a_fifo_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "r.yml"
    os.mkfifo(fifo)
    with pytest.raises(RecipeError, match=r"r.yml: is a FIFO, not a recipe file"):
        read(fifo)


def test_a_recipe_path_with_a_nul_is_a_recipe_error(tmp_path: Path):
    with pytest.raises(RecipeError, match="cannot read the recipe: embedded null byte"):
        lorafuse.run(str(tmp_path / "a\x00.yml"), tmp_path / "out")


def test_crlf_recipe_still_reads_as_text(tmp_path: Path):
    """The bounded read keeps text mode: the recorded recipe has the line feeds it had before."""
    p = tmp_path / "r.yml"
    p.write_bytes(b"merge_method: linear\r\nmodels: [{model: a}]\r\n")
    r = read(p)
    assert r.text == "merge_method: linear\nmodels: [{model: a}]\n"
    assert r.documents[0].data == {"merge_method": "linear", "models": [{"model": "a"}]}


# ----------------------------------------------------------------------------- recipes given as Python data


@pytest.mark.parametrize(("recipe", "what"), [
    ({"merge_method": "linear", "models": [{"model": object()}]}, "a object value"),
    ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": np.complex64(0.5)}}]},
     "a complex value"),  # a Path and a numpy float are taken (test_redteam_round14_leftovers.py)
])
def test_recipe_data_yaml_cannot_hold_is_a_recipe_error(tmp_path: Path, recipe: dict[str, object], what: str):
    with pytest.raises(RecipeError, match=f"<recipe>: {what} cannot be a recipe's"):
        lorafuse.run(recipe, tmp_path / "out", dry_run=True)


@pytest.mark.parametrize(("recipe", "what"), [(b"merge_method: linear\n", "bytes"), (["a"], "str"),
                                              ([{"merge_method": "linear"}, 3], "int")])
def test_recipe_data_that_is_not_mappings_is_a_recipe_error(tmp_path: Path, recipe: object, what: str):
    with pytest.raises(RecipeError, match=f"a mapping \\(one stage\\) or a list of mappings, not {what}$"):
        lorafuse.run(recipe, tmp_path / "out", dry_run=True)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- intermediate_dir


TWO_STAGES = """name: s1
merge_method: linear
models: [{{model: {a}}}, {{model: {b}}}]
---
name: s2
merge_method: resize
parameters: {{rank: 2}}
models: [{{model: s1}}]
"""


@pytest.fixture()
def two_stages(tmp_path: Path) -> str:
    a, b = make_adapter(tmp_path, "a", 4, 8.0, 1), make_adapter(tmp_path, "b", 4, 8.0, 2)
    return TWO_STAGES.format(a=a, b=b)


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("inside", ["", "work"])
def test_intermediate_dir_in_the_output_is_refused_before_any_work(tmp_path: Path, two_stages: str,
                                                                   overwrite: bool, inside: str):
    """It ran the first stage into OUT/, then the last stage refused to replace OUT (its input inside it):
    work done for nothing and a folder OUT left where there was none."""
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="is the output .* or inside it"):
        lorafuse.run(two_stages, out, intermediate_dir=out / inside if inside else out, overwrite=overwrite)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_intermediate_dir_that_is_a_file_is_an_output_error(tmp_path: Path, two_stages: str):
    """mkdir raised FileExistsError (a traceback) after the checks."""
    a_file = tmp_path / "a" / "adapter_model.safetensors"
    data = a_file.read_bytes()
    with pytest.raises(OutputError, match="exists and is not a folder"):
        lorafuse.run(two_stages, tmp_path / "out", intermediate_dir=a_file)
    assert a_file.read_bytes() == data and not (tmp_path / "out").exists()


def test_intermediate_dir_that_cannot_be_made_is_an_output_error(tmp_path: Path, two_stages: str):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot make it"):
        lorafuse.run(two_stages, tmp_path / "out", intermediate_dir=blocker / "sub")
    assert blocker.read_text() == "x" and not (tmp_path / "out").exists()


def test_intermediate_dir_beside_the_output_still_works(tmp_path: Path, two_stages: str):
    out, work = tmp_path / "out", tmp_path / "work"
    report = lorafuse.run(two_stages, out, intermediate_dir=work)
    assert report.out == out and (out / "adapter_model.safetensors").is_file()
    assert (work / "s1" / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------- provenance read back (info)


BASE = {"lorafuse.version": "1", "lorafuse.operation": "combine", "lorafuse.parameters": "{}",
        "lorafuse.inputs": json.dumps([{"name": "a", "role": "adapter"}]), "lorafuse.command": "lorafuse x"}


def stamped(tmp_path: Path, **changes: str) -> Path:
    p = tmp_path / "made.safetensors"
    t = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((2, 8), np.float32),
         "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((8, 2), np.float32)}
    save_file(t, str(p), metadata={**BASE, **{f"lorafuse.{k}": v for k, v in changes.items()}})
    return p


@pytest.mark.parametrize("inputs", [
    '[{"name": "a", "role": "adapter", "weight": 1' + "0" * 400 + "}]",  # float(int) overflows
    json.dumps([{"name": "a", "role": "adapter", "made_by": {"operation": "x", "inputs": []}}]),  # no invocation
], ids=["huge-int-weight", "made-by-without-invocation"])
def test_malformed_records_are_ignored_not_a_crash(tmp_path: Path, capsys: pytest.CaptureFixture[str], inputs: str):
    p = stamped(tmp_path, inputs=inputs)
    assert Provenance.from_metadata({**BASE, "lorafuse.inputs": inputs}) is None
    for args in (["info", str(p)], ["info", "--json", str(p)]):
        assert main(args) == 0
        out = capsys.readouterr().out
        assert "made by" not in out and "tensors" in out


def test_non_finite_parameters_are_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """json.loads reads NaN; showing it with allow_nan=False raised ValueError."""
    p = stamped(tmp_path, parameters='{"rank": NaN, "scale": Infinity}')
    assert main(["info", str(p)]) == 0
    assert "  options     rank=NaN, scale=Infinity" in capsys.readouterr().out.splitlines()


def test_a_line_feed_in_a_recorded_name_cannot_forge_a_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    forged = "a\n  input 2     evil.safetensors (adapter)"
    p = stamped(tmp_path, inputs=json.dumps([{"name": forged, "role": "adapter", "files": {"x\ny": "0" * 64}}]))
    assert main(["info", str(p)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "  input 1     a\\n  input 2     evil.safetensors (adapter) (adapter)" in lines
    assert not any(line.startswith("  input 2") for line in lines)
    assert f"      sha256 {'0' * 64}  x\\ny" in lines


def test_describe_lines_of_a_record_without_invocation_in_made_by_is_empty():
    d = {"version": "1", "operation": "combine", "command": "c",
         "inputs": [{"name": "a", "role": "adapter", "made_by": {"operation": "x", "inputs": []}}]}
    assert describe_lines(d) == []
