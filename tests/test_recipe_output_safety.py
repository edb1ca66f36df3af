"""lorafuse run: what a recipe may write, and what it leaves behind.

Checked: `-o` naming an input of any stage (not only the last), or the recipe file, or a folder holding them,
is refused before any work, even with --overwrite; --overwrite replaces `-o` only, never what sits at an
intermediate output (DIR/NAME), and a rerun into the same --intermediate-dir needs no --overwrite; an
intermediate output that is an input, or an --intermediate-dir inside any stage's input, is refused before
anything is created; the temporary folder of a run that was killed is removed by the next run writing beside
the same output; an output folder that cannot be written is an OutputError, not a traceback; the temporary
folder is gone after a run whatever ends it.

Every refusal is checked on what it leaves: the inputs' bytes and listings, the exit status and message, and
the listing of the folder the run writes in.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from recipe_fixtures import MODULES, make_adapter
from safetensors.numpy import save_file

import lorafuse
from lorafuse.cli import dispatch, main
from lorafuse.errors import LorafuseError, OutputError
from lorafuse.io import atomic
from lorafuse.recipes.runner import run as run_with

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def make_base(root: Path, name: str = "base", seed: int = 9) -> Path:
    g = np.random.default_rng(seed)
    p = root / name
    p.mkdir()
    tensors = {f"{m}.weight": g.standard_normal(shape).astype(np.float32) for m, shape in MODULES.items()}
    save_file(tensors, str(p / "model.safetensors"), metadata={"format": "pt"})
    (p / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    return p


def make_kohya(root: Path, name: str, seed: int) -> Path:
    """A one-file kohya adapter (two attention modules of rank 2)."""
    g = np.random.default_rng(seed)
    tensors = {}
    for m in ("q", "k"):
        key = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_{m}"
        tensors[f"{key}.lora_down.weight"] = g.standard_normal((2, 16)).astype(np.float32)
        tensors[f"{key}.lora_up.weight"] = g.standard_normal((16, 2)).astype(np.float32)
        tensors[f"{key}.alpha"] = np.array(2.0, dtype=np.float32)
    save_file(tensors, str(root / name))
    return root / name


def snapshot(path: Path) -> dict[str, str]:
    """Every entry under `path` (and `path` itself) with the sha256 of a file's bytes ('dir' for a folder)."""
    def one(p: Path) -> str:
        return "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()

    if not path.is_dir():
        return {".": one(path)}
    return {".": "dir", **{str(p.relative_to(path)): one(p) for p in sorted(path.rglob("*"))}}


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    code = main(["run", *map(str, argv), "-q"])
    return code, capsys.readouterr().err


def recipe(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    make_adapter(tmp_path, "a", 4, 8, 1)
    make_adapter(tmp_path, "b", 4, 4, 2)
    make_base(tmp_path)
    return tmp_path


MIX_THEN_APPLY = """\
    name: mix
    merge_method: svd
    parameters: {{rank: 4}}
    models:
      - model: {first}
      - model: b
    ---
    name: merged
    merge_method: apply
    base_model: base
    models:
      - model: mix
    """


# ----------------------------------------------------------------------------- 1: -o and every stage's inputs


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_naming_an_earlier_stage_input_is_refused(root: Path, capsys: pytest.CaptureFixture[str],
                                                        overwrite: bool):
    """Bug 1: -o was checked against the last stage's inputs only, so `-o ab` replaced the input `ab` of the first
    stage (silently: ab is a lorafuse output), and `-o a --overwrite` replaced the user's adapter `a`."""
    assert main(["combine", str(root / "a"), str(root / "b"), "-q", "-o", str(root / "ab")]) == 0
    r1 = recipe(root / "r1.yml", MIX_THEN_APPLY.format(first="ab"))
    r2 = recipe(root / "r2.yml", MIX_THEN_APPLY.format(first="a"))
    before = {n: snapshot(root / n) for n in ("a", "ab", "b", "base")}
    entries = listing(root)
    flags = ["--overwrite"] if overwrite else []
    code, err = cli(capsys, r1, "-o", root / "ab", *flags)
    assert code == 1 and f"output {root / 'ab'} would overwrite the input" in err, err
    code, err = cli(capsys, r2, "-o", root / "a", *flags)
    assert code == 1 and f"output {root / 'a'} would overwrite the input" in err, err
    code, err = cli(capsys, r2, "-o", root / "a" / "inside", *flags)  # a path inside an earlier stage's input
    assert code == 1 and "is inside the input folder" in err, err
    assert {n: snapshot(root / n) for n in before} == before
    assert listing(root) == entries  # no output, no temporary folder


@pytest.mark.parametrize("out", ["R/r.yml", "R"])
def test_output_naming_the_recipe_file_is_refused(root: Path, capsys: pytest.CaptureFixture[str], out: str):
    """Bug 1: the recipe file is an input too: -o RECIPE (or the folder holding it) with --overwrite replaced it."""
    (root / "R").mkdir()
    make_kohya(root, "k.safetensors", 3)  # one-file adapters: the recipe writes one file, as R/r.yml is
    make_kohya(root, "k2.safetensors", 4)
    r = recipe(root / "R" / "r.yml", "merge_method: linear\nmodels:\n  - model: ../k.safetensors\n"
                                     "  - model: ../k2.safetensors\n")
    before = snapshot(root / "R")
    entries = listing(root)
    with pytest.raises(OutputError, match="would overwrite the input .*r\\.yml"):
        lorafuse.run(r, root / out, overwrite=True)
    code, err = cli(capsys, r, "-o", root / out, "--overwrite")
    assert code == 1 and "r.yml" in err and "would overwrite the input" in err, err
    assert snapshot(root / "R") == before and listing(root) == entries


# ----------------------------------------------------------------------------- 2: --overwrite and intermediates


MIX_THEN_RESIZE = """\
    name: {name}
    merge_method: svd
    parameters: {{rank: 4}}
    models:
      - model: a
      - model: b
    ---
    name: small
    merge_method: resize
    parameters: {{rank: 2}}
    models:
      - model: {name}
    """


def test_overwrite_never_replaces_a_user_folder_in_the_intermediate_dir(root: Path,
                                                                      capsys: pytest.CaptureFixture[str]):
    """Bug 2: --overwrite was passed to the intermediate stages, so work/mix (the user's notes) was deleted."""
    (root / "work" / "mix").mkdir(parents=True)
    (root / "work" / "mix" / "notes.txt").write_text("my notes")
    r = recipe(root / "r.yml", MIX_THEN_RESIZE.format(name="mix"))
    before, entries = snapshot(root / "work"), listing(root)
    for flags in ([], ["--overwrite"]):
        code, err = cli(capsys, r, "-o", root / "out", "--intermediate-dir", root / "work", *flags)
        assert code == 1, err
        assert str(root / "work" / "mix") in err and "notes.txt" in err and "--intermediate-dir" in err, err
        assert "pass --overwrite" not in err  # --overwrite does not replace it: the message must not suggest it
    assert snapshot(root / "work") == before and (root / "work" / "mix" / "notes.txt").read_text() == "my notes"
    assert listing(root) == entries  # refused before any work: no output, no temporary folder


def test_rerun_into_the_same_intermediate_dir_needs_no_overwrite(root: Path, capsys: pytest.CaptureFixture[str]):
    """Bug 2: a rerun was refused (work/mix exists) though work/mix is lorafuse's own earlier output."""
    r = recipe(root / "r.yml", MIX_THEN_RESIZE.format(name="mix"))
    assert cli(capsys, r, "-o", root / "out", "--intermediate-dir", root / "work") == (0, "")
    first = snapshot(root / "work")
    assert cli(capsys, r, "-o", root / "out", "--intermediate-dir", root / "work") == (0, "")
    assert snapshot(root / "work") == first  # replaced by the same bytes
    assert listing(root / "work") == ["mix"] and (root / "out" / "adapter_model.safetensors").is_file()


def test_an_intermediate_output_that_is_an_input_is_refused_before_any_work(root: Path,
                                                                           capsys: pytest.CaptureFixture[str]):
    """Bug 2: a stage named `base` with --intermediate-dir ROOT writes ROOT/base, the base checkpoint the last stage
    reads: with --overwrite it was replaced by an adapter."""
    r = recipe(root / "r.yml", f"""\
        name: base
        merge_method: svd
        parameters: {{rank: 4}}
        models: [{{model: a}}, {{model: b}}]
        ---
        name: merged
        merge_method: apply
        base_model: {root / 'base'}
        models: [{{model: a}}]
        """)
    before, entries = snapshot(root / "base"), listing(root)
    for flags in ([], ["--overwrite"]):
        code, err = cli(capsys, r, "-o", root / "out", "--intermediate-dir", root, *flags)
        assert code == 1, err
        assert "stage 'base'" in err and f"would overwrite the input {root / 'base'}" in err, err
    assert snapshot(root / "base") == before and listing(root) == entries


def test_output_at_an_intermediate_output_is_refused_before_any_work(root: Path, capsys: pytest.CaptureFixture[str]):
    """Bug 2: -o DIR/mix (an earlier lorafuse output) with --intermediate-dir DIR --overwrite: stage 'mix' replaced
    it before the last stage refused to write its own input, so the refused run lost what -o held."""
    work = root / "work"
    assert main(["combine", str(root / "a"), "--method", "cat", "-q", "-o", str(work / "mix")]) == 0
    r = recipe(root / "r.yml", MIX_THEN_RESIZE.format(name="mix"))
    before, entries = snapshot(work), listing(root)
    for out in (work / "mix", work / "mix" / "inner"):
        for flags in ([], ["--overwrite"]):
            code, err = cli(capsys, r, "-o", out, "--intermediate-dir", work, *flags)
            assert code == 1 and f"which is the output {out} or holds it" in err, err
    assert snapshot(work) == before and listing(root) == entries


# ----------------------------------------------------------------------------- 3: --intermediate-dir in an input


@pytest.mark.parametrize("inside", ["a/inter", "base/inter", "base/deep/er", "a"])
def test_intermediate_dir_inside_an_input_is_refused_and_creates_nothing(root: Path,
                                                                        capsys: pytest.CaptureFixture[str],
                                                                        inside: str):
    """Bug 3: inside the first stage's input the folder was made before stage 1 refused (and left there); inside
    the base the last stage reads it was accepted and written into the base's folder."""
    r = recipe(root / "r.yml", MIX_THEN_APPLY.format(first="a"))
    before = {n: snapshot(root / n) for n in ("a", "b", "base")}
    entries = listing(root)
    for flags in ([], ["--overwrite"]):
        code, err = cli(capsys, r, "-o", root / "out", "--intermediate-dir", root / inside, *flags)
        assert code == 1 and "is inside the input folder" in err and "--intermediate-dir" in err, err
    with pytest.raises(OutputError, match="is inside the input folder"):
        lorafuse.run(r, root / "out", intermediate_dir=root / inside, dry_run=True)
    assert {n: snapshot(root / n) for n in before} == before
    assert listing(root) == entries


# ----------------------------------------------------------------------------- 4: a killed run's folder


def dead_pid() -> int:
    """A pid that no process has now."""
    for pid in range(4_000_000, 3_000_000, -7919):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except OSError:
            continue
    pytest.skip("no free pid found")


KILL_AT_SECOND_STAGE = """\
import os, signal, sys
from lorafuse.cli import dispatch
from lorafuse.recipes.runner import run
calls = []
def stage(argv):
    if calls:  # the first stage has written its output into the run's folder
        os.kill(os.getpid(), signal.SIGKILL)
    calls.append(argv)
    return dispatch(argv)
run(sys.argv[1], sys.argv[2], dispatch=stage)
"""


@pytest.mark.skipif(fcntl is None, reason="no advisory locks: a killed run's folder cannot be told from a live one's")
def test_a_killed_runs_folder_is_removed_by_the_next_run(root: Path):
    """Bug 4: a run killed outright (SIGKILL, the OOM killer) left .lorafuse-run-XXXXXXXX beside -o forever."""
    r = recipe(root / "r.yml", MIX_THEN_APPLY.format(first="a"))
    entries = listing(root)
    killed = subprocess.run([sys.executable, "-c", KILL_AT_SECOND_STAGE, str(r), str(root / "out")], cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = [n for n in listing(root) if n not in entries]
    assert len(left) == 1 and left[0].startswith(".lorafuse-run-"), left  # what the killed run left
    assert (root / left[0] / "mix" / "adapter_model.safetensors").is_file()
    # and a folder made as a dead run makes it (its pid gone, no lock held), one of a live run, and others
    gone = root / f".lorafuse-run-{dead_pid()}-abcd1234"
    (gone / "mix").mkdir(parents=True)
    (gone / "mix" / "adapter_model.safetensors").write_bytes(b"x" * 64)
    atomic.mark_entry(gone)  # as a run marks its temporary folder
    live = root / f".lorafuse-run-{os.getpid()}-live0000"  # this process: alive
    live.mkdir()
    (root / ".lorafuse-run-mine").mkdir()  # not a run's name: the user's
    lorafuse.run(r, root / "out")
    assert listing(root) == sorted([*entries, "out", live.name, ".lorafuse-run-mine"])


@pytest.mark.skipif(fcntl is None, reason="no advisory locks")
def test_the_run_folder_names_its_pid_and_is_locked_while_it_runs(root: Path):
    """Bug 4: what lets a later run tell a live run's folder from a dead one's: the pid in its name, and a lock
    held for as long as the run lives."""
    r = recipe(root / "r.yml", MIX_THEN_APPLY.format(first="a"))
    seen: list[str] = []

    def stage(argv: Sequence[str]) -> int:
        if seen or argv[0] == "apply":
            work = [p for p in root.iterdir() if p.name.startswith(".lorafuse-run-")]
            assert len(work) == 1
            seen.append(work[0].name)
            fd = os.open(work[0], os.O_RDONLY)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
        return dispatch(argv)

    run_with(r, root / "out", dispatch=stage)
    assert len(seen) == 1 and re.fullmatch(rf"\.lorafuse-run-{os.getpid()}-[a-z0-9_]{{8}}", seen[0]), seen
    assert not (root / seen[0]).exists()


# ----------------------------------------------------------------------------- 5: an output folder not writable


@pytest.mark.parametrize("how", ["chmod", "denied"])
def test_an_output_folder_that_cannot_be_written_is_an_output_error(root: Path, capsys: pytest.CaptureFixture[str],
                                                                    monkeypatch: pytest.MonkeyPatch, how: str):
    """Bug 5: the temporary folder's mkdtemp raised PermissionError: a traceback, not a refusal."""
    ro = root / "ro"
    ro.mkdir()
    r = recipe(root / "r.yml", MIX_THEN_APPLY.format(first="a"))
    if how == "chmod":
        if os.geteuid() == 0:
            pytest.skip("root writes in a folder of mode 0555")
        ro.chmod(0o555)
    else:  # as a read-only mount, or a folder of another user, answers root too
        real = os.mkdir

        def mkdir(path, *args, **kwargs):
            if Path(os.fsdecode(path)).parent == ro:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
            real(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
    entries = listing(root)
    try:
        with pytest.raises(OutputError, match=f"cannot create a temporary folder beside the output {ro / 'out'}"):
            lorafuse.run(r, ro / "out")
        code, err = cli(capsys, r, "-o", ro / "out")
        assert code == 1 and f"cannot create a temporary folder beside the output {ro / 'out'}" in err, err
        assert "Permission denied" in err and "Traceback" not in err
    finally:
        ro.chmod(0o755)
    assert listing(ro) == [] and listing(root) == entries


# ----------------------------------------------------------------------------- 6: gone whatever happens


class Boom(LorafuseError):
    pass


@pytest.mark.parametrize("error", [KeyboardInterrupt, Boom, RuntimeError])
def test_the_temporary_folder_is_gone_whatever_ends_the_run(root: Path, error: type[BaseException]):
    """Bug 6 (kept): after the first stage wrote into the temporary folder, an error or an interruption in the
    second leaves no temporary folder and no output, and no open descriptor of it."""
    r = recipe(root / "r.yml", MIX_THEN_APPLY.format(first="a"))
    entries = listing(root)
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None

    def stage(argv: Sequence[str]) -> int:
        if argv[0] == "apply":
            assert any(p.name.startswith(".lorafuse-run-") for p in root.iterdir())
            raise error("stop")
        return dispatch(argv)

    with pytest.raises(error):
        run_with(r, root / "out", dispatch=stage)
    assert listing(root) == entries
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) == fds
