"""Round 13 red team, quiet and machine-readable output: `--json` prints one strict JSON document on stdout whose
`notes` hold every note the plain run says on stderr, with `-q` too (`-q --json`: the JSON, every note in it,
nothing else anywhere); notes go to stderr with `--json` as without it, on every verb and in `run --json`; every
report says its `seconds`; a number that is not finite is null, never a NaN / Infinity token."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from redteam_fixtures import llm_base, peft_folder, run_cli, write_recipe
from safetensors.numpy import load_file, save_file

SHAPES = {"model.layers.0.self_attn.q_proj": (16, 8), "model.layers.0.mlp.up_proj": (24, 8)}
LOHA = "lora_unet_down_blocks_0_attentions_0_proj_in"


def _refuse(token: str) -> object:
    raise ValueError(f"{token} is no JSON")


def strict(text: str) -> dict:
    """stdout read as strict JSON readers read it (python -m json.tool, jq, JSON.parse): one document, no NaN."""
    doc = json.loads(text, parse_constant=_refuse)
    assert isinstance(doc, dict)
    return doc


def said(err: str) -> list[str]:
    """The notes a run said on stderr (`note: ...` lines)."""
    return [line.removeprefix("note: ") for line in err.splitlines() if line.startswith("note: ")]


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """base/ and ft/ (every weight changed, q_proj's of another shape: not extracted), adapters a/ (rank 2), c4/
    (rank 4), n/ (a's tensors, its config targeting q_proj only: a note), loha.safetensors (a LoHa whose kernel
    only SD 1.x tells: a note), r.yml (svd with a seed it does not use: a note); the current folder."""
    llm_base(tmp_path / "base", SHAPES)
    weights = load_file(str(tmp_path / "base" / "model.safetensors"))
    rng = np.random.default_rng(5)
    (tmp_path / "ft").mkdir()
    ft = {k: v + np.float32(0.1) * rng.standard_normal(v.shape).astype(np.float32) for k, v in weights.items()}
    ft["model.layers.0.self_attn.q_proj.weight"] = np.ones((16, 9), np.float32)
    save_file(ft, str(tmp_path / "ft" / "model.safetensors"))
    (tmp_path / "ft" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    peft_folder(tmp_path / "a", SHAPES, 1)
    peft_folder(tmp_path / "c4", SHAPES, 3, rank=4)
    peft_folder(tmp_path / "n", SHAPES, 1, extra={"target_modules": ["q_proj"]})
    save_file({f"{LOHA}.hada_w1_a": rng.standard_normal((8, 2)).astype(np.float32),
               f"{LOHA}.hada_w1_b": rng.standard_normal((2, 8)).astype(np.float32),
               f"{LOHA}.hada_w2_a": rng.standard_normal((8, 2)).astype(np.float32),
               f"{LOHA}.hada_w2_b": rng.standard_normal((2, 8)).astype(np.float32),
               f"{LOHA}.alpha": np.array(2.0, np.float32)}, str(tmp_path / "loha.safetensors"))
    write_recipe(tmp_path, "merge_method: svd\nmodels:\n  - model: ./a\n  - model: ./c4\n"
                           "parameters: {rank: 4, seed: 5}\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# each: a command line (-o added) whose plain run says a note on stderr
NOTED = {
    "combine: a seed no SVD used": (["combine", "a", "c4", "--seed", "3"], ""),
    "combine: a module the config does not target": (["combine", "n", "a"], ""),
    "combine --dry-run: a module the config does not target": (["combine", "n", "a", "--dry-run"], ""),
    "resize: no rank to reduce": (["resize", "c4", "--rank", "8"], ""),
    "resize: a module the config does not target": (["resize", "n", "--rank", "1"], ""),
    "resize --dry-run: a module the config does not target": (["resize", "n", "--rank", "1", "--dry-run"], ""),
    "convert: a LoHa's kernel": (["convert", "loha.safetensors", "--to", "peft", "--rank", "2"], ".safetensors"),
    "extract: a weight of another shape": (["extract", "base", "ft", "--rank", "2"], ""),
}


@pytest.mark.parametrize("case", NOTED)
def test_quiet_json_holds_every_note_the_plain_run_says(tree: Path, case: str) -> None:
    """--help: -q prints nothing, "--json still prints its JSON, with the notes in it"; docs/cli.md: "with --json the
    JSON is printed and its notes hold what would have been said on stderr". -q --json printed "notes": [] where the
    plain run said its notes (a seed that changed nothing, the modules PEFT ignores, a rank already reached)."""
    argv, suffix = NOTED[case]
    code, _, err = run_cli([*argv, "-o", f"plain{suffix}"])
    assert code == 0, err
    plain = said(err)
    assert plain, err
    code, out, err = run_cli([*argv, "-o", f"quiet{suffix}", "-q", "--json"])
    assert code == 0 and err == "", err
    notes = strict(out)["notes"]
    assert [n for n in plain if n not in notes] == [], (plain, notes)


@pytest.mark.parametrize("case", NOTED)
def test_json_says_the_notes_on_stderr_as_the_plain_run_does(tree: Path, case: str) -> None:
    """--json replaces stdout only: stderr still holds the notes (docs/cli.md: "Notes still go to stderr"), and the
    JSON's notes hold them. extract --json kept its notes to the JSON alone."""
    argv, suffix = NOTED[case]
    code, _, err = run_cli([*argv, "-o", f"plain{suffix}"])
    assert code == 0, err
    code, out, json_err = run_cli([*argv, "-o", f"json{suffix}", "--json"])
    assert code == 0, json_err
    assert said(json_err) == said(err)
    notes = strict(out)["notes"]
    assert [n for n in said(err) if not any(n in m or m in n for m in notes)] == [], (said(err), notes)


def test_gguf_json_says_its_notes_on_stderr_and_quiet_keeps_them_in_the_json(tree: Path) -> None:
    """convert --to gguf --json held the q8_0 fallback note in the JSON but never said it on stderr."""
    code, out, err = run_cli(["convert", "a", "--to", "gguf", "--arch", "qwen2", "--gguf-type", "q8_0", "-o",
                              "g.gguf", "--json"])
    assert code == 0, err
    report = strict(out)
    fallback = [n for n in report["notes"] if "written F16" in n]
    assert len(fallback) == 1 and said(err) == fallback, (report["notes"], err)
    code, out, err = run_cli(["convert", "a", "--to", "gguf", "--arch", "qwen2", "--gguf-type", "q8_0", "-o",
                              "g.gguf", "-q", "--json"])
    assert code == 0 and err == "", err
    assert strict(out)["notes"] == fallback


def _stage_command(out: str) -> str:
    """The stage's command line a plain `lorafuse run` prints on stdout."""
    lines = [line for line in out.splitlines() if line.startswith("stage 'stage': ")]
    assert len(lines) == 1, out
    return lines[0].removeprefix("stage 'stage': ")


def test_run_json_holds_its_stages_notes(tree: Path) -> None:
    """run --json ran every stage with -q: a stage's report said "notes": [] where the plain run said the stage's
    note, run's own notes lacked it, stderr stayed empty, and each stage's command showed a -q nobody typed."""
    code, out, err = run_cli(["run", "r.yml", "-o", "out"])
    assert code == 0, err
    plain, command = said(err), _stage_command(out)
    assert any("--seed 5 changed nothing" in n for n in plain), err
    code, out, json_err = run_cli(["run", "r.yml", "-o", "out", "--json"])  # a re-run into its own output
    assert code == 0, json_err
    doc = strict(out)
    assert said(json_err) == plain
    (stage,) = doc["stages"]
    assert stage["command"] == command
    assert [n for n in plain if n not in stage["report"]["notes"]] == []
    assert [n for n in plain if n not in doc["notes"]] == []
    code, out, err = run_cli(["run", "r.yml", "-o", "out", "-q", "--json"])
    assert code == 0 and err == "", err
    doc = strict(out)
    assert [n for n in plain if n not in doc["notes"]] == []
    assert [n for n in plain if n not in doc["stages"][0]["report"]["notes"]] == []


def test_run_dry_run_json_prints_one_json_document(tree: Path) -> None:
    """run --dry-run --json: one JSON document on stdout, each stage's plan in it, nothing written."""
    code, out, err = run_cli(["run", "r.yml", "-o", "out", "--dry-run", "--json"])
    assert code == 0, err
    doc = strict(out)
    assert doc["dry_run"] is True and doc["out"] is None
    plan = doc["stages"][0]["plan"]
    assert plan["dry_run"] is True and plan["verb"] == "combine"
    assert not (tree / "out").exists()


@pytest.mark.parametrize("argv", [["resize", "c4", "--rank", "2"], ["extract", "base", "ft", "--rank", "2"],
                                  ["convert", "loha.safetensors", "--to", "peft", "--rank", "2"],
                                  ["convert", "a", "--to", "gguf", "--arch", "qwen2"]])
def test_every_report_says_its_seconds(tree: Path, argv: list[str]) -> None:
    """apply, combine and run --json say the seconds the run took; resize, extract and convert said them only inside
    the summary's text."""
    out_name = {"convert": "x.safetensors" if "peft" in argv else "x.gguf"}.get(argv[0], "x")
    code, out, err = run_cli([*argv, "-o", out_name, "--json"])
    assert code == 0, err
    seconds = strict(out)["seconds"]
    assert isinstance(seconds, float) and 0 <= seconds < 60


def test_a_number_that_is_not_finite_is_null(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A report number that is NaN (resize's fro_kept here) was printed as the token NaN, which strict JSON readers
    refuse; info's rule (a non-finite norm is null) holds for every --json."""
    import dataclasses

    import lorafuse.ops.resize as resize_module

    real = resize_module.resize

    def nan_kept(*args: object, **kw: object) -> tuple[object, list[object]]:
        result, report = real(*args, **kw)  # type: ignore[arg-type]
        return result, [dataclasses.replace(m, fro_kept=math.nan) for m in report]

    monkeypatch.setattr(resize_module, "resize", nan_kept)
    code, out, err = run_cli(["resize", "c4", "--rank", "2", "-o", "x", "--json"])
    assert code == 0, err
    assert [m["fro_kept"] for m in strict(out)["modules"]] == [None, None]


def test_quiet_json_still_says_what_overwrite_replaced(tree: Path) -> None:
    """-q silences notes, but not the one naming what --overwrite replaced (docs/cli.md); -q --json holds it too."""
    (tree / "mine").mkdir()
    (tree / "mine" / "keep.txt").write_text("mine")
    code, out, err = run_cli(["resize", "c4", "--rank", "2", "-o", "mine", "--overwrite", "-q", "--json"])
    assert code == 0
    assert len(said(err)) == 1 and "--overwrite replaced mine" in err, err
    assert strict(out)["notes"] == said(err)


def _no_matplotlib(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """matplotlib absent (None in sys.modules), or failing at its import (an import that raises)."""
    import builtins
    import sys

    if how == "absent":
        monkeypatch.setitem(sys.modules, "matplotlib", None)
        return
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: object, **kwargs: object) -> object:
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)


@pytest.mark.parametrize("how", ["absent", "failing"])
@pytest.mark.parametrize("argv", [["similarity", "a", "c4", "--plot", "p.png"], ["info", "c4", "--spectrum", "p.png"]])
def test_a_plot_that_fails_leaves_no_json_on_stdout(tree: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str],
                                                     how: str) -> None:
    """similarity --json --plot and info --json --spectrum printed their JSON, then failed to draw (exit status 1):
    stdout held a complete report of a command that failed. The plot is drawn first; an absent matplotlib is said
    before any work, as the other refusals of a plot are."""
    _no_matplotlib(monkeypatch, how)
    code, out, err = run_cli([*argv, "--json"])
    assert code == 1 and "pip install lorafuse[plot]" in err, err
    assert out == ""
    assert not (tree / "p.png").exists()


@pytest.mark.parametrize("argv", [["apply", "base", "a", "-o", "x"], ["combine", "a", "c4", "-o", "x"],
                                  ["resize", "c4", "--rank", "2", "-o", "x"],
                                  ["extract", "base", "ft", "--rank", "2", "-o", "x"],
                                  ["convert", "loha.safetensors", "--to", "peft", "--rank", "2", "-o", "x.safetensors"],
                                  ["run", "r.yml", "-o", "x"]])
def test_every_report_has_the_common_keys(tree: Path, argv: list[str]) -> None:
    """Every verb that writes reports, in --json, where it wrote (`out`), what it said (`notes`) and how long it took
    (`seconds`); every verb but run (whose stages do) its `summary`. apply printed no summary, resize, extract and
    convert no seconds. The summary is the line the run prints without --json."""
    code, plain, err = run_cli(argv)
    assert code == 0, err
    code, out, err = run_cli([*argv, "--json"])
    assert code == 0, err
    doc = strict(out)
    assert doc["out"] == "x.safetensors" if argv[0] == "convert" else doc["out"] == "x"
    assert isinstance(doc["notes"], list) and isinstance(doc["seconds"], float)
    if argv[0] in ("apply", "resize", "extract", "convert"):
        timeless = re.compile(r" in \d+\.\d\d s$")  # the seconds of two runs differ
        first = plain.splitlines()[0]
        assert timeless.sub("", doc["summary"]) == timeless.sub("", first), (doc["summary"], first)
    elif argv[0] == "combine":
        assert "summary" in doc
