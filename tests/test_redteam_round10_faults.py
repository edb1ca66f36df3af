"""Round 10 red team, faults: a second Ctrl-C / SIGTERM that lands while lorafuse removes a stopped run's temporary
output (a user pressing Ctrl-C twice, `timeout` or a supervisor sending SIGTERM after SIGINT) interrupted the
removal, leaving a model-sized `.NAME.tmp-PID-...` (or a recipe's `.lorafuse-run-PID-...` folder) behind while the
message said "no output was written". The removal now holds those signals; they act once it is done."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import lorafuse
from lorafuse.io import atomic


def _second_signal_during(monkeypatch: pytest.MonkeyPatch, module: object, name: str, signum: int) -> list[int]:
    """Wrap `module.name` (a removal) so that `signum` is raised in this process as it starts: the second stop."""
    real = getattr(module, name)
    calls: list[int] = []

    def stopped_again(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            signal.raise_signal(signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, stopped_again)
    return calls


class _Stop(BaseException):
    pass


@pytest.fixture
def sigterm_raises():
    """SIGTERM raises _Stop (as the CLI's handler raises its _Terminated), for the test's length."""
    def handler(signum: int, frame: object) -> None:
        raise _Stop(signum)

    before = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("folder", [True, False])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_second_stop_while_the_temporary_output_is_removed_still_removes_it(tmp_path, monkeypatch, sigterm_raises,
                                                                              folder, signum):
    out = tmp_path / ("out" if folder else "out.safetensors")
    calls = _second_signal_during(monkeypatch, atomic, "_remove_at", signum)
    writer = atomic.atomic_dir if folder else atomic.atomic_file
    with pytest.raises((KeyboardInterrupt, _Stop)) as caught:
        with writer(out) as tmp:
            target = tmp / "model.safetensors" if folder else tmp
            target.write_bytes(b"x" * 100_000)
            raise KeyboardInterrupt  # the first Ctrl-C, mid-write
    assert calls, "the temporary output was never removed"
    # the second stop is still delivered (not lost), once the removal is done
    assert isinstance(caught.value, _Stop if signum == signal.SIGTERM else KeyboardInterrupt)
    assert sorted(os.listdir(tmp_path)) == []  # no `.out.tmp-PID-...` left beside the output


def test_a_second_stop_keeps_the_previous_output_and_removes_the_new_one(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with atomic.atomic_dir(out, kind="checkpoint") as tmp:
        (tmp / "model.safetensors").write_bytes(b"previous")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _second_signal_during(monkeypatch, atomic, "_remove_at", signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_dir(out, kind="checkpoint") as tmp:
            (tmp / "model.safetensors").write_bytes(b"new, never committed")
            raise KeyboardInterrupt
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _adapter(folder: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir()
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
               rng.standard_normal((2, 8)).astype(np.float32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight":
               rng.standard_normal((8, 2)).astype(np.float32)}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                            "target_modules": ["q_proj"]}))
    return folder


def _two_stage_recipe(tmp_path: Path) -> tuple[Path, Path]:
    """A recipe of two stages (linear of two adapters, then a resize of it) in tmp_path/in, and an empty output
    folder tmp_path/o."""
    root = tmp_path / "in"
    root.mkdir()
    _adapter(root / "a", 1)
    _adapter(root / "b", 2)
    recipe = root / "r.yml"
    recipe.write_text("name: ab\nmerge_method: linear\nmodels:\n  - model: a\n  - model: b\n---\n"
                      "name: r1\nmerge_method: resize\nmodels:\n  - model: ab\nparameters: {rank: 1}\n")
    outdir = tmp_path / "o"
    outdir.mkdir()
    return recipe, outdir


def test_a_stop_while_a_recipe_removes_its_stage_folder_still_removes_it(tmp_path, monkeypatch):
    """A two-stage recipe's first stage's folder (`.lorafuse-run-PID-...`) is removed even when a Ctrl-C lands during
    that removal (after the last stage's output was put in place: the interruption still comes, after it)."""
    recipe, outdir = _two_stage_recipe(tmp_path)
    _second_signal_during(monkeypatch, shutil, "rmtree", signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        lorafuse.run(recipe, outdir / "out")
    assert sorted(os.listdir(outdir)) == ["out"]
    assert json.loads((outdir / "out" / "adapter_config.json").read_text())["r"] == 1


# A run killed outright (SIGKILL: the OOM killer) inside a container leaves `.NAME.tmp-PID-...` on the mounted volume.
# Every run of the same container gets the same pid (1, or 7 under an init), so the next run's own pid was the dead
# run's, and lorafuse never removed that entry (a model-sized leftover per killed run): "this process's own". An entry
# last changed before this process started, and whose lock nobody holds, is a dead run's, whatever its pid.

def _stale(entry: Path, folder: bool) -> Path:
    """The entry a killed run left: written before the process that looks at it started (the test process plays a
    later run with the same pid: its start, io.atomic._STARTED_NS, is set after the entry is made)."""
    if folder:
        entry.mkdir()
        (entry / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 4096)
    else:
        entry.write_bytes(b"\0" * 4096)
    atomic.mark_entry(entry)  # as a run marks its temporary and set-aside entries
    return entry


@pytest.fixture
def started_now(monkeypatch):
    """This process 'starts' when called: the entries made before are an earlier process's."""
    return lambda: monkeypatch.setattr(atomic, "_STARTED_NS", time.time_ns() + 1, raising=False)


@pytest.mark.parametrize("folder", [True, False])
def test_a_killed_runs_temporary_output_with_this_process_pid_is_removed(tmp_path, folder, started_now):
    out = tmp_path / ("out" if folder else "out.safetensors")
    stale = _stale(tmp_path / f".{out.name}.tmp-{os.getpid()}-abcd1234", folder)
    started_now()
    writer = atomic.atomic_dir if folder else atomic.atomic_file
    with writer(out) as tmp:
        (tmp / "x.bin" if folder else tmp).write_bytes(b"new")
    assert not stale.exists()
    assert sorted(os.listdir(tmp_path)) == [out.name]


def test_an_output_a_killed_run_with_this_process_pid_moved_aside_is_put_back(tmp_path, started_now):
    """A killed run had moved the previous output aside (`.out.old-PID-...`, where no atomic exchange exists) and
    died before putting its own in place: the next run (same pid) puts the previous output back."""
    out = tmp_path / "out"
    aside = _stale(tmp_path / f".out.old-{os.getpid()}-abcd5678", True)
    before = (aside / "model-00001-of-00002.safetensors").read_bytes()
    started_now()
    assert atomic.remove_stale(out) == []
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert (out / "model-00001-of-00002.safetensors").read_bytes() == before


def test_a_killed_recipes_stage_folder_with_this_process_pid_is_removed(tmp_path, started_now):
    recipe, outdir = _two_stage_recipe(tmp_path)
    stale = _stale(outdir / f".lorafuse-run-{os.getpid()}-abcd1234", True)
    started_now()
    lorafuse.run(recipe, outdir / "out")
    assert not stale.exists()
    assert sorted(os.listdir(outdir)) == ["out"]


def test_a_live_entry_of_this_process_is_kept(tmp_path):
    """The other side: an entry of this process's own live run (locked, made after this process started) stays."""
    out = tmp_path / "out"
    with atomic.atomic_dir(out) as tmp:
        assert atomic.remove_stale(out) == []
        assert tmp.exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]


# SIGTERM while the command line is read and numpy loads (between the console script's start-up and the command) was
# at its default: the process died without a word, exit -15, where the docs promise a line and status 143.
_TERM_WHILE_PARSING = """
import os, signal, sys
import lorafuse.cli as cli
parsed = cli._parsed
def parse_then_stopped(given):
    os.kill(os.getpid(), signal.SIG{sig})  # the stop lands while the command line is read
    return parsed(given)
cli._parsed = parse_then_stopped
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig, status", [("TERM", 143), ("HUP", 129)])
def test_sigterm_while_the_command_line_is_read_is_one_line_and_its_status(tmp_path, sig, status):
    import subprocess
    import sys

    a = _adapter(tmp_path / "a", 1)
    proc = subprocess.run([sys.executable, "-c", _TERM_WHILE_PARSING.format(sig=sig), "resize", str(a), "--rank", "1",
                           "-o", str(tmp_path / "out"), "-q"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == status, proc.stderr
    assert proc.stderr == "lorafuse: interrupted; no output was written\n"
    assert sorted(os.listdir(tmp_path)) == ["a"]
