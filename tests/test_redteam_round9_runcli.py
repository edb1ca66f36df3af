"""Red team, round 9: the command line's manners as users of PEFT, mergekit, kohya and diffusers tools expect them:
`lorafuse run` keeps stdout for what a user pipes (notes on stderr, names escaped) and takes --progress as the other
long commands do; one exit status per class of failure on every command (a recipe file that cannot be read is an
input error, 1, as a missing adapter or --from-list file is), as docs/cli.md's table says; every option of every
command is in docs/cli.md's synopsis, and every option there exists; options that would do nothing with another
are refused naming both (-q with --verbose, info --json with --modules, info --modules of a checkpoint)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from redteam_fixtures import kohya_file, recipe_tree, run_cli, write_recipe

import lorafuse

ROOT = Path(__file__).resolve().parents[1]
MODULE = "lora_unet_down_blocks_0_attentions_0_proj_in"
ONE_STAGE = "merge_method: svd\nparameters: {rank: 2}\nmodels:\n  - model: a\n  - model: b\n"
TWO_STAGES = ("name: pooled\nmerge_method: svd\nmodels:\n  - model: a\n  - model: b\n---\n"
              "name: small\nmerge_method: resize\nparameters: {rank: 1}\nmodels:\n  - model: pooled\n")


@pytest.fixture()
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    recipe_tree(tmp_path)
    kohya_file(tmp_path / "k1.safetensors", MODULE, 1)
    write_recipe(tmp_path, ONE_STAGE)
    write_recipe(tmp_path, TWO_STAGES, "two.yml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _bar(err: str) -> bool:
    """Whether stderr holds a finished progress bar."""
    return "100" in err and "%" in err


# ----------------------------------------------------------------------------- lorafuse run: stdout and stderr

def test_run_prints_its_notes_on_stderr_as_every_verb_does(tree: Path) -> None:
    """`lorafuse run` printed its notes (`note: --intermediate-dir ... is not used`) on stdout, where a user pipes
    the stage lines and summaries; every verb prints its notes on stderr."""
    code, out, err = run_cli(["run", "r.yml", "-o", "out", "--intermediate-dir", "keep"])
    assert code == 0, err
    assert "note:" not in out, out
    assert "note: --intermediate-dir keep is not used" in err, err
    assert "stage 'stage': lorafuse combine" in out and "ran 1 stage; wrote out" in out, out


def test_run_stage_lines_escape_the_controls_of_a_name(tree: Path) -> None:
    """The stage's command line was printed raw: an -o (or a model path) holding ESC drove the terminal (colours,
    window title), where every other line the CLI shows escapes it (`\\x1b`)."""
    out_name = "out\x1b[31mred"
    code, out, err = run_cli(["run", "r.yml", "-o", out_name])
    assert code == 0, err
    assert "\x1b" not in out and "\x1b" not in err, (out, err)
    assert "--out=out\\x1b[31mred" in out, out
    assert (tree / out_name / "adapter_config.json").is_file()


def test_run_takes_progress_as_the_other_long_commands_do(tree: Path) -> None:
    """apply, combine, resize and extract take --progress / --no-progress; run, which runs them, did not (exit 2,
    "unrecognized arguments"). --progress draws each stage's bar on a stderr that is no terminal; --no-progress none;
    the two together are refused, as on the verbs."""
    code, out, err = run_cli(["run", "two.yml", "-o", "drawn", "--progress"])
    assert code == 0, err
    assert _bar(err) and "resize" in err, err
    assert "--progress" in out  # the stage's command line says what it ran with
    code, out, err = run_cli(["run", "two.yml", "-o", "plain", "--no-progress"])
    assert code == 0 and not _bar(err) and err == "", err
    code, _, err = run_cli(["run", "two.yml", "-o", "both", "--progress", "--no-progress"])
    assert code == 2 and "--no-progress" in err and "--progress" in err, err
    assert not (tree / "both").exists()


def test_run_progress_is_refused_with_print_schema(tree: Path) -> None:
    code, out, err = run_cli(["run", "--print-schema", "--progress"])
    assert code == 2 and "--progress" in err and out == "", err


def test_run_progress_with_json_keeps_stdout_one_json_object(tree: Path) -> None:
    import json

    code, out, err = run_cli(["run", "two.yml", "-o", "j", "--json", "--progress"])
    assert code == 0, err
    assert json.loads(out)["out"] == "j"


# ----------------------------------------------------------------------------- one exit status per failure class

@pytest.mark.parametrize("argv, named", [
    (["run", "missing.yml", "-o", "o"], "missing.yml: no such recipe file"),
    (["run", "a", "-o", "o"], "a: is a folder, not a recipe file"),
    (["run", "k1.safetensors", "-o", "o"], "k1.safetensors: a binary file"),
    (["run", "latin.yml", "-o", "o"], "latin.yml line 1, column 18: not UTF-8 text"),
    (["combine", "--from-list", "missing.txt", "-o", "o"], "missing.txt: no such adapter list"),
    (["combine", "--from-list", "a", "-o", "o"], "a is a PEFT adapter, not an adapter list"),
    (["combine", "missing", "a", "-o", "o"], "missing: no such file or directory"),
    (["apply", "missing", "a", "-o", "o"], "missing: no such file or directory"),
    (["resize", "missing", "--rank", "1", "-o", "o"], "missing: no such file or directory"),
    (["extract", "base", "missing", "--rank", "1", "-o", "o"], "missing: no such file or directory"),
    (["convert", "missing.safetensors", "--to", "peft", "-o", "o.safetensors"], "missing.safetensors: no such"),
    (["similarity", "a", "missing"], "missing: no such file or directory"),
    (["info", "missing"], "missing: no such file or directory"),
])
def test_an_input_file_that_cannot_be_read_exits_1_on_every_command(tree: Path, argv: list[str], named: str) -> None:
    """A missing recipe file exited 2 (a usage error) where a missing --from-list file, adapter, base or path exits
    1 (an input error); so did a recipe that is a folder, a binary file or not UTF-8, where a list that is one of
    those exits 1. One class of failure, one status, on every command (docs/cli.md: exit status)."""
    (tree / "latin.yml").write_bytes("merge_method: caf\xe9\n".encode("latin-1"))
    code, out, err = run_cli(argv)
    assert code == 1, (argv, err)
    assert named in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert out == "" and not (tree / "o").exists() and not (tree / "o.safetensors").exists()


def test_a_recipe_field_that_is_wrong_is_still_a_usage_error(tree: Path) -> None:
    """The other side of the line: a recipe's bad field is a bad value (2), as a --from-list line's bad weight is."""
    write_recipe(tree, "merge_method: svd\nmodels:\n  - model: a\n    parameters: {wieght: 1}\n", "typo.yml")
    assert run_cli(["run", "typo.yml", "-o", "o"])[0] == 2
    (tree / "nan.txt").write_text("a nan\nb\n")
    assert run_cli(["combine", "--from-list", "nan.txt", "-o", "o"])[0] == 2


def test_python_callers_still_catch_a_missing_recipe_as_both_classes(tree: Path) -> None:
    """lorafuse.run's missing recipe is still a RecipeError (what callers caught before) and now a FormatError too,
    as a missing adapter is."""
    with pytest.raises(lorafuse.RecipeError, match="no such recipe file") as caught:
        lorafuse.run(tree / "missing.yml", tree / "o")
    assert isinstance(caught.value, lorafuse.FormatError)


def _exit_table() -> dict[int, str]:
    text = (ROOT / "docs" / "cli.md").read_text()
    section = text[text.index("## Exit status"):]
    rows = re.findall(r"^\| (\d+) \| (.*) \|$", section, re.M)
    return {int(code): rest for code, rest in rows}


def test_the_exit_status_table_lists_every_status_the_cli_returns() -> None:
    assert set(_exit_table()) == {0, 1, 2, 129, 130, 141, 143}


@pytest.mark.parametrize("status", [1, 2])
def test_the_exit_status_tables_examples_exit_as_it_says(tree: Path, status: int) -> None:
    """Each `lorafuse ...` example of the table's rows for 1 and 2 exits with that row's status, run as written (in
    a folder holding the adapter `a` and a recipe `r.yml` with the misspelled field the row names)."""
    (tree / "folder").mkdir()
    write_recipe(tree, "merge_method: svd\nmodels:\n  - model: a\n    parameters: {wieght: 1}\n")
    examples = re.findall(r"`(lorafuse [^`]+)`", _exit_table()[status])
    assert examples, _exit_table()[status]
    for example in examples:
        code, _, err = run_cli(shlex.split(example)[1:])
        assert code == status, (example, err)
        assert not (tree / "out").exists() and not (tree / "small").exists()


# ----------------------------------------------------------------------------- docs/cli.md and argparse agree

def _synopsis() -> dict[str, str]:
    """docs/cli.md's synopsis, per command (its lines, continuation lines included)."""
    text = (ROOT / "docs" / "cli.md").read_text()
    block = re.search(r"## Synopsis\n+```\n(.*?)```", text, re.S)
    assert block is not None
    entries: dict[str, str] = {}
    verb = None
    for line in block.group(1).splitlines():
        start = re.match(r"lorafuse (\w+)", line)
        if start:
            verb = start.group(1)
        if verb is not None:
            entries[verb] = entries.get(verb, "") + line + "\n"
    return entries


def _named(option: str, text: str) -> bool:
    return re.search(r"(?<![\w-])" + re.escape(option) + r"(?![\w-])", text) is not None


def test_every_option_of_every_command_is_in_the_synopsis() -> None:
    """docs/cli.md's synopsis left out options the commands take (combine's --density, --seed, --split, --exact,
    ...; run's --threads, --json; --overwrite and --dry-run almost everywhere; extract's --sv-ratio): a user reading
    it could not find them. Every option of every command's parser is named in its synopsis entry."""
    from lorafuse.cli import build_parser

    synopsis = _synopsis()
    verbs = build_parser().verbs  # type: ignore[attr-defined]
    assert set(synopsis) == set(verbs)
    missing = {verb: [a.option_strings[-1] for a in parser._actions
                      if a.option_strings and "--help" not in a.option_strings
                      and not any(_named(o, synopsis[verb]) for o in a.option_strings)]
               for verb, parser in verbs.items()}
    assert {v: m for v, m in missing.items() if m} == {}


def test_every_option_of_the_synopsis_is_an_option_of_its_command() -> None:
    from lorafuse.cli import _option_names, build_parser

    verbs = build_parser().verbs  # type: ignore[attr-defined]
    extra = {verb: sorted(o for o in set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", text))
                          if o not in _option_names(verbs[verb]))
             for verb, text in _synopsis().items()}
    assert {v: e for v, e in extra.items() if e} == {}


def test_every_options_help_that_has_a_default_says_it() -> None:
    """combine --split's help said where the values go, not which way is the default (resize's says so)."""
    import argparse

    from lorafuse.cli import build_parser

    unsaid = [(verb, a.option_strings[-1]) for verb, p in build_parser().verbs.items()  # type: ignore[attr-defined]
              for a in p._actions if a.option_strings and a.nargs != 0 and a.default not in (None, argparse.SUPPRESS)
              and "default" not in (a.help or "")]
    assert unsaid == []


def test_quiet_help_says_what_it_silences() -> None:
    """-q's help said "print nothing on success", and --json with -q prints its JSON."""
    from lorafuse.cli import build_parser

    for verb, parser in build_parser().verbs.items():  # type: ignore[attr-defined]
        quiet = [a for a in parser._actions if "-q" in a.option_strings]
        if quiet:
            assert "--json" in (quiet[0].help or "") and "notes" in (quiet[0].help or ""), verb


# ----------------------------------------------------------------------------- options that would do nothing

@pytest.mark.parametrize("argv", [
    ["apply", "base", "a", "-o", "m"],
    ["resize", "a", "--rank", "1", "-o", "m"],
    ["extract", "base", "base", "--rank", "1", "-o", "m"],
    ["convert", "k1.safetensors", "--to", "peft", "-o", "m.safetensors"],
])
def test_quiet_with_verbose_is_refused_naming_both(tree: Path, argv: list[str]) -> None:
    """-q (print nothing) with --verbose (a line per module) ran and printed nothing: --verbose was silently
    ignored."""
    code, out, err = run_cli([*argv, "-q", "--verbose"])
    assert code == 2 and "--verbose" in err and "-q" in err and out == "", err
    assert not (tree / "m").exists() and not (tree / "m.safetensors").exists()


def test_info_json_with_modules_is_refused_naming_both(tree: Path) -> None:
    """--json lists every module already: --modules did nothing with it."""
    code, out, err = run_cli(["info", "a", "--json", "--modules"])
    assert code == 2 and "--json" in err and "--modules" in err and out == "", err


@pytest.mark.parametrize("path, kind", [("base", "checkpoint"), ("base/model.safetensors", "checkpoint")])
def test_info_modules_of_a_checkpoint_is_refused_saying_why(tree: Path, path: str, kind: str) -> None:
    """info --modules of a checkpoint printed the checkpoint's summary as without it: silently ignored."""
    code, out, err = run_cli(["info", path, "--modules"])
    assert code == 2 and "--modules" in err and kind in err and out == "", err
    assert run_cli(["info", path])[0] == 0


def test_info_modules_still_lists_every_module_of_an_adapter(tree: Path, tmp_path: Path) -> None:
    from redteam_fixtures import peft_folder

    shapes = {f"model.layers.{i}.self_attn.q_proj": (8, 8) for i in range(12)}
    peft_folder(tmp_path / "many", shapes, 3)
    code, out, _ = run_cli(["info", "many", "--modules"])
    assert code == 0 and all(name in out for name in shapes)
    assert "more (--modules lists all)" in run_cli(["info", "many"])[1]


# ----------------------------------------------------------------------------- a closed pipe, Ctrl-C

def test_run_into_a_reader_that_left_exits_141_without_a_traceback(tree: Path) -> None:
    """`lorafuse run r.yml -o out --dry-run | head -c 1`: the reader leaves; no BrokenPipeError traceback."""
    script = (f"{shlex.quote(sys.executable)} -m lorafuse run r.yml -o out --dry-run; echo status=$? >&2")
    res = subprocess.run(["bash", "-c", f"set -o pipefail; ({script}) | head -c 1 >/dev/null"], capture_output=True,
                         text=True, timeout=120, cwd=tree)
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr
    assert re.search(r"status=(0|141)\b", res.stderr), res.stderr
    assert not (tree / "out").exists()


def test_ctrl_c_in_a_later_stage_leaves_no_output_and_exits_130(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lorafuse.ops.resize as resize_module

    def stopped(*args: object, **kw: object) -> None:
        raise KeyboardInterrupt

    before = sorted(p.name for p in tree.iterdir())
    monkeypatch.setattr(resize_module, "resize", stopped)
    code, _, err = run_cli(["run", "two.yml", "-o", "out"])
    assert code == 130 and "interrupted" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tree.iterdir()) == before  # no -o, no temporary folder of the first stage



def test_run_into_a_full_stdout_names_stdout_and_leaves_nothing(tree: Path) -> None:
    """`lorafuse run ... > /dev/full` said "lorafuse run: error: No space left on device" (which file?), where every
    verb says `stdout: No space left on device`: the stage line printed by the recipe runner was not named."""
    with open("/dev/full", "w") as full:
        res = subprocess.run([sys.executable, "-m", "lorafuse", "run", "two.yml", "-o", "out"], stdout=full,
                             stderr=subprocess.PIPE, text=True, cwd=tree, timeout=120)
    assert res.returncode == 1 and "stdout: No space left on device" in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert not list(tree.glob(".lorafuse-run-*"))


def test_every_commands_description_is_wrapped_for_a_terminal() -> None:
    """combine's, convert's and run's --help printed their description as one line of 290 to 640 characters
    (RawDescriptionHelpFormatter keeps text as written), which a terminal breaks mid-word; the top-level help's
    last line ran to 166. The others are written in lines of under 100."""
    from lorafuse.cli import build_parser

    parser = build_parser()
    texts = {"lorafuse": (parser.description or "") + "\n" + (parser.epilog or "")}
    texts.update({verb: p.description or "" for verb, p in parser.verbs.items()})  # type: ignore[attr-defined]
    wide = {name: max(map(len, text.splitlines())) for name, text in texts.items()}
    assert {name: n for name, n in wide.items() if n > 100} == {}


def test_apply_verbose_that_has_nothing_to_list_says_so(tree: Path) -> None:
    """apply --verbose lists the weights of a quantized base quantized again; on a float base it printed nothing
    more and said nothing: the option was silently ignored."""
    code, out, err = run_cli(["apply", "base", "a", "-o", "merged", "--verbose", "--no-progress"])
    assert code == 0 and "merged 1 weight" in out, err
    assert "note: --verbose" in err and "quantized none" in err, err
    code, out, err = run_cli(["apply", "base", "a", "-o", "merged2", "--no-progress"])
    assert code == 0 and err == "", err


def test_convert_verbose_that_has_nothing_to_list_says_so(tree: Path) -> None:
    """convert --verbose lists the LoHa / LoKr modules converted; for a plain LoRA file it printed nothing more and
    said nothing."""
    code, out, err = run_cli(["convert", "k1.safetensors", "--to", "peft", "-o", "v.safetensors", "--verbose"])
    assert code == 0 and "converted 1 module" in out, err
    assert "note: --verbose" in err and "has none" in err, err
