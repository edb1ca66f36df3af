"""Red team round 6, CLI manners: a stderr that cannot be written (closed by the caller with `2>&-`, a full disk,
a file opened read-only) neither fails nor hangs a run, with or without a progress bar, and the bar of the Python
API is dropped the same way; a stdout that is not UTF-8 gets escaped names, one on a full disk a one-line error
naming stdout, one whose reader left exit status 141 (--version too); a path starting with '-' is named with the
way to give it; `apply --version` is named; `python -m lorafuse` is the console script; apply takes a numpy bool
progress as the other operations do."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from redteam_fixtures import llm_base, peft_folder
from safetensors.numpy import load_file

import lorafuse

SHAPES = {"model.layers.0.self_attn.q_proj": (16, 16), "model.layers.0.mlp.down_proj": (16, 32)}


@pytest.fixture
def made(tmp_path: Path) -> Path:
    llm_base(tmp_path / "base", SHAPES)
    peft_folder(tmp_path / "a1", SHAPES, 1, rank=4, alpha=4)
    return tmp_path


def _lorafuse(argv: list[str], cwd: Path, **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "lorafuse", *argv], cwd=cwd, timeout=60, check=False,
                          stdout=subprocess.PIPE, **kw)  # type: ignore[call-overload]


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return load_file(str(path))


def _merged(made: Path) -> dict[str, np.ndarray]:
    """The float64 merge of a1 into base, rounded to float32 (lora_alpha = r: scale 1)."""
    base, a = _tensors(made / "base" / "model.safetensors"), _tensors(made / "a1" / "adapter_model.safetensors")
    out = {}
    for m in SHAPES:
        p = f"base_model.model.{m}"
        delta = a[f"{p}.lora_B.weight"].astype(np.float64) @ a[f"{p}.lora_A.weight"].astype(np.float64)
        out[f"{m}.weight"] = (base[f"{m}.weight"].astype(np.float64) + delta).astype(np.float32)
    return out


def _close_stderr() -> None:
    os.close(2)


@pytest.mark.parametrize("bar", [[], ["--progress"]])
def test_a_closed_stderr_neither_fails_nor_hangs_apply(made: Path, bar: list[str]) -> None:
    """`lorafuse apply ... 2>&-` (stderr closed: Python's sys.stderr is None) crashed on sys.stderr.isatty() (exit
    1, and the message could not be shown); with --progress, the bar's failed write left tqdm's lock taken and the
    run hung for ever."""
    r = _lorafuse(["apply", "base", "a1", "-o", "merged", *bar], made, preexec_fn=_close_stderr)
    assert r.returncode == 0, r.stdout
    assert b"merged 2 weights" in r.stdout
    got = _tensors(made / "merged" / "model.safetensors")
    for k, want in _merged(made).items():
        np.testing.assert_allclose(got[k], want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("verb", [["resize", "a1", "--rank", "2"], ["extract", "base", "ref", "--rank", "2"],
                                  ["combine", "a1", "a1", "--engine", "stream", "--rank", "2"]])
def test_a_closed_stderr_does_not_fail_the_other_long_commands(made: Path, verb: list[str]) -> None:
    """resize / extract (AttributeError: 'NoneType' object has no attribute 'isatty' / 'write') and combine's
    streamed bar failed the run when stderr was closed."""
    llm_base(made / "ref", {m: (s[0], s[1]) for m, s in SHAPES.items()})
    ref = made / "ref" / "model.safetensors"
    t = _tensors(ref)
    t["model.layers.0.self_attn.q_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"] + 1
    from safetensors.numpy import save_file

    save_file(t, str(ref))
    for bar in ([], ["--progress"]):
        out = made / f"out{len(bar)}"
        r = _lorafuse([*verb, "-o", out.name, *bar], made, preexec_fn=_close_stderr)
        assert r.returncode == 0, (verb, bar, r.stdout)
        assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("stderr", ["/dev/full", "/dev/null-ro"])
def test_a_progress_bar_that_cannot_be_drawn_is_dropped(made: Path, stderr: str) -> None:
    """--progress with stderr on a full disk (ENOSPC) or on a file open for reading (EBADF): the bar is cosmetics;
    apply hung (tqdm's lock left taken), resize failed with exit 1."""
    with open("/dev/full" if stderr == "/dev/full" else os.devnull, "w" if stderr == "/dev/full" else "r") as err:
        r = _lorafuse(["apply", "base", "a1", "-o", "merged", "--progress"], made, stderr=err)
        assert r.returncode == 0, r.stdout
        r = _lorafuse(["resize", "a1", "--rank", "2", "-o", "small", "--progress"], made, stderr=err)
        assert r.returncode == 0, r.stdout
    got = _tensors(made / "merged" / "model.safetensors")
    for k, want in _merged(made).items():
        np.testing.assert_allclose(got[k], want, rtol=1e-6, atol=1e-5)
    assert (made / "small" / "adapter_model.safetensors").is_file()


class _Full:
    """A stderr whose writes fail as on a full disk; a terminal, so that bars are drawn on it by default."""

    def write(self, text: str) -> int:
        raise OSError(28, "No space left on device")

    def flush(self) -> None:
        raise OSError(28, "No space left on device")

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream", [_Full(), None])
def test_the_apis_bars_never_fail_the_operation(made: Path, monkeypatch: pytest.MonkeyPatch, stream: object) -> None:
    """lorafuse.resize(progress=True) raised the bar's OSError (not a LorafuseError) or an AttributeError when
    sys.stderr was None (a pythonw / daemon process); the result must be the one written without a bar."""
    monkeypatch.setattr(sys, "stderr", stream)
    small = lorafuse.resize(str(made / "a1"), rank=2, out=str(made / "small"), progress=True)
    quiet = lorafuse.resize(str(made / "a1"), rank=2, progress=False)
    assert small.ranks == quiet.ranks
    merged = lorafuse.apply(str(made / "base"), [str(made / "a1")], out=str(made / "merged"), progress=True)
    assert len(merged.merged) == 2
    got = _tensors(made / "merged" / "model.safetensors")
    for k, want in _merged(made).items():
        np.testing.assert_allclose(got[k], want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_a_terminal_that_is_not_utf8_gets_escaped_names_not_a_traceback(made: Path, encoding: str) -> None:
    """PYTHONIOENCODING=ascii (or a C locale without UTF-8 mode, a cp1252 console): printing a non-ASCII path on
    stdout raised UnicodeEncodeError, a traceback and exit 1, after resize had written its output."""
    (made / "a1").rename(made / "adä")
    env = {**os.environ, "PYTHONIOENCODING": encoding}
    r = _lorafuse(["info", "adä"], made, env=env, stderr=subprocess.PIPE)
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
    assert r.stdout.startswith(b"adapter     ad\\xe4  (peft)" if encoding == "ascii" else "adapter     adä".encode(
        "latin-1"))
    r = _lorafuse(["resize", "adä", "--rank", "2", "-o", "r€"], made, env=env, stderr=subprocess.PIPE)
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
    assert b"wrote r\\u20ac in" in r.stdout
    assert (made / "r€" / "adapter_model.safetensors").is_file()


def test_a_path_that_starts_with_a_dash_is_named_with_the_way_to_give_it(
        made: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`lorafuse info -my-lora` where ./-my-lora exists said "the following arguments are required: path"; the
    error now names the word and says how to give such a path (./-my-lora, or after --), which works."""
    from lorafuse.cli import main

    monkeypatch.chdir(made)
    (made / "a1").rename(made / "-my-lora")
    for argv in (["info", "-my-lora"], ["resize", "-my-lora", "--rank", "2", "-o", "small"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.splitlines()[-1]
        assert err.startswith(f"lorafuse {argv[0]}: error: unrecognized argument -my-lora: ")
        assert "write ./-my-lora, or put it after --" in err
    assert main(["resize", "--rank", "2", "-o", "small", "--", "-my-lora"]) == 0
    capsys.readouterr()
    assert main(["info", "./-my-lora", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"].endswith("-my-lora")


def test_apply_takes_a_numpy_bool_progress_as_the_other_operations_do(made: Path) -> None:
    """resize, combine and extract take progress=np.True_ (check_optional_bool: a numpy bool is a switch); apply
    refused it ("progress must be True, False, None or a callable")."""
    for switch in (np.True_, np.False_):
        report = lorafuse.apply(str(made / "base"), [str(made / "a1")], out=str(made / "merged"), progress=switch,
                                overwrite=True)
        assert len(report.merged) == 2
        assert lorafuse.resize(str(made / "a1"), rank=2, progress=switch).ranks
    with pytest.raises(lorafuse.LorafuseValueError, match="progress must be True, False, None or a callable"):
        lorafuse.apply(str(made / "base"), [str(made / "a1")], out=str(made / "m2"), progress="no")


def test_python_m_lorafuse_is_the_console_script(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m lorafuse` ran lorafuse.cli.main directly: Ctrl-C while it imported the CLI was a traceback, where
    the `lorafuse` script (lorafuse_entry) says one line and exits 130."""
    import runpy

    from redteam_fixtures import stop_import

    stop_import(monkeypatch, "lorafuse.cli", KeyboardInterrupt)
    monkeypatch.setattr(sys, "argv", ["lorafuse", "--version"])
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_module("lorafuse", run_name="__main__")
    except KeyboardInterrupt:
        pytest.fail("python -m lorafuse let the KeyboardInterrupt out (a traceback)")
    assert e.value.code == 130
    assert capsys.readouterr().err == "lorafuse: interrupted; no output was written\n"


def _plain_env() -> dict[str, str]:
    """The environment without PYTHONUNBUFFERED: stdout block-buffered, as users have it."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


@pytest.mark.parametrize("buffered", [True, False])
@pytest.mark.parametrize("argv", [["--version"], ["info", "a1"]])
def test_a_stdout_on_a_full_disk_is_one_line_naming_stdout(made: Path, argv: list[str], buffered: bool) -> None:
    """stdout on a full disk: `--version` was a traceback (its print is outside the command's handlers); a
    command said `error: No space left on device` (not naming stdout), or, with stdout buffered, Python's
    "Exception ignored in: <_io.TextIOWrapper name='<stdout>'...>" at exit and exit status 120."""
    env = _plain_env() if buffered else {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "lorafuse", *argv], cwd=made, env=env, stdout=full,
                           stderr=subprocess.PIPE, timeout=60, check=False)
    assert r.returncode == 1
    assert re.fullmatch(r"lorafuse( info)?: error: stdout: No space left on device\n", r.stderr.decode())


@pytest.mark.parametrize("buffered", [True, False])
def test_version_to_a_reader_that_left_exits_141_quietly(made: Path, buffered: bool) -> None:
    """`lorafuse --version | reader-that-left`: a BrokenPipeError traceback (unbuffered) or exit status 120 with
    "Exception ignored" (buffered); the documented status is 141, quietly, as for a command's output."""
    env = _plain_env() if buffered else {**os.environ, "PYTHONUNBUFFERED": "1"}
    read, write = os.pipe()
    os.close(read)
    try:
        r = subprocess.run([sys.executable, "-m", "lorafuse", "--version"], cwd=made, env=env, stdout=write,
                           stderr=subprocess.PIPE, timeout=60, check=False)
    finally:
        os.close(write)
    assert (r.returncode, r.stderr) == (141, b"")


def test_version_after_a_command_is_named_not_a_missing_argument(capsys: pytest.CaptureFixture[str]) -> None:
    """`lorafuse apply --version` said "the following arguments are required: base, adapters, -o/--out"; it is
    lorafuse's own option, and `lorafuse --version apply` still prints the version."""
    from lorafuse.cli import main

    with pytest.raises(SystemExit) as e:
        main(["apply", "--version"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == ("lorafuse apply: error: unrecognized argument --version: an "
                                                        "option of lorafuse itself, before any command (lorafuse "
                                                        "--version)")
    with pytest.raises(SystemExit) as e:
        main(["--version", "apply"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("lorafuse ")
