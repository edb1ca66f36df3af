"""Red team round 5, CLI manners: a --x/--no-x pair given both ways is refused; a misspelled option is named
before argparse's "required" error; adapters that share no module exit 1 (UnsharedModulesError); Ctrl-C while
the console script imports lorafuse is one line and 130; --json's notes hold the notes shown on stderr; combine's
--progress help says when it draws; counted words agree with their number; --dtype repeats compare by meaning;
`-o -` is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tomllib
from redteam_fixtures import kohya_file, llm_base, peft_folder
from safetensors.numpy import load_file

import lorafuse
from lorafuse.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"model.layers.0.self_attn.q_proj": (16, 16), "model.layers.0.mlp.down_proj": (16, 32)}


@pytest.fixture
def made(tmp_path: Path) -> Path:
    llm_base(tmp_path / "base", SHAPES)
    peft_folder(tmp_path / "a1", SHAPES, 1)
    peft_folder(tmp_path / "a2", SHAPES, 2)
    kohya_file(tmp_path / "k1.safetensors", "lora_unet_down_blocks_0_attn", 3)
    return tmp_path


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# 1 (and 8): BooleanOptionalAction pairs and --dtype repeats
def test_requantize_both_ways_is_refused(made: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for pair in (["--requantize", "--no-requantize"], ["--no-requantize", "--requantize"]):
        with pytest.raises(SystemExit) as e:
            main(["apply", str(made / "base"), str(made / "a1"), "-o", str(made / "o"), *pair, "--dry-run"])
        assert e.value.code == 2
        assert f"--requantize/--no-requantize given twice ({pair[0]} and {pair[1]}): give it once" in \
            capsys.readouterr().err
    ns = build_parser().parse_args(["apply", "b", "a", "-o", "o", "--no-requantize", "--no-requantize"])
    assert ns.requantize is False


def test_every_boolean_pair_is_checked() -> None:
    """Every --x/--no-x option of every verb is the checked kind (none left as plain BooleanOptionalAction)."""
    import argparse

    from lorafuse.cli import _BooleanOnce

    parser = build_parser()
    for verb in parser.verbs.values():  # type: ignore[attr-defined]
        for action in verb._actions:
            if isinstance(action, argparse.BooleanOptionalAction):
                assert isinstance(action, _BooleanOnce), action.option_strings


def test_dtype_repeats_compare_by_meaning(made: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(["apply", str(made / "base"), str(made / "a1"), "-o", str(made / "o"), "--dtype", "fp16",
                         "--dtype", "half", "--dry-run"], capsys)
    assert code == 0, err
    for verb in (["apply", "b", "a"], ["combine", "a"], ["resize", "a", "--rank", "2"]):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([*verb, "-o", "o", "--dtype", "fp16", "--dtype", "bf16"])
        assert e.value.code == 2
        assert "--dtype given twice (" in capsys.readouterr().err


# 2: misspelled options
@pytest.mark.parametrize(("argv", "bad", "meant"), [
    (["apply", "b", "a", "--ouput", "x"], "--ouput", "--out"),
    (["resize", "a", "-o", "x", "--rnak", "8"], "--rnak", "--rank"),
    (["convert", "a.safetensors", "-o", "x.safetensors", "--too", "peft"], "--too", "--to"),
    (["-V"], "-V", "--version"),
])
def test_misspelled_option_is_named_before_required(argv: list[str], bad: str, meant: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert f"unrecognized argument {bad}; did you mean {meant!r}?" in err, err
    assert "required" not in err


def test_words_after_double_dash_are_not_options() -> None:
    assert build_parser().parse_args(["info", "--", "--ouput"]).path == "--ouput"


# 3: exit status of adapters that share no module
def test_share_no_module_exits_1(made: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["combine", str(made / "a1"), str(made / "k1.safetensors"), "-o", str(made / "k2")], capsys)
    assert code == 1 and out == ""
    assert "error: UnsharedModulesError: combine --method svd:" in err and "share no module" in err
    assert not (made / "k2").exists()
    with pytest.raises(lorafuse.LorafuseValueError, match="share no module"):  # still a LorafuseValueError
        lorafuse.combine([str(made / "a1"), str(made / "k1.safetensors")], rank=2)
    with pytest.raises(lorafuse.MissingModuleError):
        lorafuse.combine([str(made / "a1"), str(made / "k1.safetensors")], rank=2)


def test_docs_list_the_signal_statuses() -> None:
    cli_md = (ROOT / "docs" / "cli.md").read_text()
    section = cli_md[cli_md.index("## Exit status"):]
    for code in ("130", "143", "141", "UnsharedModulesError"):
        assert code in section
    readme = (ROOT / "README.md").read_text()
    assert "130 Ctrl-C, 143 SIGTERM, 141 a closed pipe" in readme


# 4: Ctrl-C during the console script's imports
def test_console_script_handles_ctrl_c_during_imports(made: Path) -> None:
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["lorafuse"]
    module, func = target.split("#")[0].strip().split(":")
    assert "." not in module  # outside the package: importing `lorafuse` happens inside its handler
    stub = f"import sys; from {module} import {func}; sys.exit({func}())"
    env = dict(os.environ)  # the installed module (the wheel's, or a development install's src/)
    warm = subprocess.run([sys.executable, "-c", stub, "info", str(made / "a1")], env=env, capture_output=True)
    assert warm.returncode == 0, warm.stderr
    handled = 0
    for delay in (0.03, 0.05, 0.08, 0.12):  # Python's own start-up is ~20 ms; lorafuse's imports follow
        p = subprocess.Popen([sys.executable, "-c", stub, "info", str(made / "a1")], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        text = err.decode()
        if p.returncode == 0:  # it finished first
            continue
        assert "Traceback" not in text or "lorafuse" not in text, text  # never a traceback through lorafuse
        if "Traceback" not in text:
            assert p.returncode == 130, text
            assert text.strip().endswith("interrupted; no output was written"), text
            assert len(text.strip().splitlines()) == 1, text
            handled += 1
    assert handled >= 1


def test_entry_module_catches_interrupted_import(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from redteam_fixtures import stop_import

    import lorafuse_entry

    stop_import(monkeypatch, "lorafuse.cli", KeyboardInterrupt)
    assert lorafuse_entry.main() == 130
    assert capsys.readouterr().err == "lorafuse: interrupted; no output was written\n"


# 5: --json notes
def test_combine_json_holds_the_stderr_notes(made: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["combine", str(made / "a1"), "-o", str(made / "q"), "--rank", "2", "--json"], capsys)
    assert code == 0, err
    shown = [line[len("note: "):] for line in err.splitlines() if line.startswith("note: ")]
    assert shown and "one adapter, combined by method 'svd'" in shown[0]
    notes = json.loads(out)["notes"]
    for note in shown:
        assert note in notes


def test_resize_and_convert_json_have_notes(made: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["resize", str(made / "a1"), "--rank", "4", "-o", str(made / "r"), "--json"], capsys)
    assert code == 0, err
    notes = json.loads(out)["notes"]
    assert any("every module's rank is 4 or less already" in n for n in notes) and "note: every module" in err
    kohya_file(made / "sd.safetensors", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 3,
               width=320)
    code, out, err = _run(["convert", str(made / "sd.safetensors"), "--to", "peft", "-o", str(made / "c.safetensors"),
                           "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["notes"] == []


# 6: combine's --progress help
def test_combine_progress_help_says_when() -> None:
    text = " ".join(build_parser().verbs["combine"].format_help().split())  # type: ignore[attr-defined]
    assert "combine draws one only when it streams the adapters" in text and "none with the memory engine" in text


# 7: counted words
def test_convert_summary_counts_agree(made: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kohya_file(made / "sd.safetensors", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 3,
               width=320)
    code, out, err = _run(["convert", str(made / "sd.safetensors"), "--to", "peft", "-o", str(made / "c.safetensors")],
                          capsys)
    assert code == 0, err
    assert "converted 1 module of " in out and ": 1 module;" in out and "1 modules" not in out
    assert len(load_file(str(made / "c.safetensors"))) == 2  # one module: its A and B


def test_one_file_note_agrees_with_its_count(made: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(["apply", str(made / "base"), str(made / "a1"), "-o", str(made / "m.safetensors")], capsys)
    assert code == 0, err
    left = sorted(p.name for p in (made / "base").iterdir() if p.suffix != ".safetensors")
    assert left == ["config.json"]
    assert f"config.json of {made / 'base'} is not in it" in err
    merged = load_file(str(made / "m.safetensors"))
    base = load_file(str(made / "base" / "model.safetensors"))
    assert merged.keys() == base.keys()
    assert all(np.isfinite(v).all() for v in merged.values())


# 9: -o -
@pytest.mark.parametrize("argv", [
    ["apply", "b", "a", "-o", "-"], ["combine", "a", "-o", "-"], ["resize", "a", "--rank", "2", "-o", "-"],
    ["extract", "b", "f", "--rank", "2", "-o", "-"], ["convert", "a", "--to", "peft", "-o", "-"],
    ["run", "r.yml", "-o", "-"], ["info", "a", "--spectrum", "-"], ["similarity", "a", "b", "--plot", "-"],
])
def test_dash_output_is_refused(argv: list[str], capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    assert "'-' (stdout): lorafuse writes files and folders, not to stdout; give a path (./- for one named '-')" \
        in capsys.readouterr().err
    assert not (tmp_path / "-").exists()
