"""apply under faults: killed runs, full disks, concurrent runs, non-finite values.

The guarantees checked here, each with real processes and real file systems:

* SIGKILL at any point of a run leaves the output path as it was before the run
  (absent, or the previous output byte for byte, same inode) or holding the run's whole
  result; never a part. The same holds while a run replaces an earlier lorafuse output
  and while --overwrite replaces what the user kept there; what lorafuse refuses to
  replace (issue #13) is left byte for byte. What a killed run leaves is one `.NAME.tmp-PID-XXXXXXXX` entry
  named after its pid, which the next run writing NAME removes.
* A full disk (ENOSPC on a small tmpfs where one can be mounted; EFBIG from
  RLIMIT_FSIZE always) is an OutputError naming the output, through the API and the
  CLI; the temporary output is removed and the previous output is untouched.
* Concurrent runs writing one output all succeed and leave one run's whole output.
* Non-finite values in an adapter (a PEFT-saved Inf in lora_B) and results that
  overflow F16 / BF16 are refused with the module named; --allow-nonfinite writes them.

Inputs are hashed before and after every run and must not change.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from fault_tools import (
    ADAPTER_FILE,
    PREFIX,
    Spec,
    leftovers,
    llama_specs,
    lorafuse_cmd,
    run_apply,
    temp_pattern,
    tree_hashes,
    write_checkpoint,
    write_peft_adapter,
    write_safetensors,
)
from peft import PeftModel
from peft_fixtures import Case, llama_case
from redteam_fixtures import namespace_prefix
from safetensors import safe_open

import lorafuse
from lorafuse import NonFiniteError, OutputError
from lorafuse.io import atomic
from lorafuse.io import safetensors as st_mod

WEIGHTS = ("1", "0.5")  # two runs with different results
TARGETS = ("q_proj", "v_proj", "down_proj")


@dataclass
class Inputs:
    base: dict[str, Path]  # layout ("file", "folder") -> base argument
    adapter: Path
    refs: dict[str, dict[str, dict[str, str]]]  # layout -> weight -> hashes of the complete output
    sizes: dict[str, int]  # layout -> bytes of the complete output
    seconds: dict[str, float]  # layout -> duration of a whole `lorafuse apply` run

    def hashes(self, layout: str) -> dict[str, dict[str, str]]:
        """Hashes of the input files of one layout: its base and the adapter."""
        return {str(r): tree_hashes(r) for r in (self.base[layout], self.adapter)}


def out_path(tmp: Path, layout: str) -> Path:
    return tmp / ("merged.safetensors" if layout == "file" else "merged")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    """A 72 MiB BF16 llama-shaped checkpoint, as one file and as a folder of 3 shards, an adapter on
    q/v/down_proj (r 8), and the hashes of the complete outputs for both weights."""
    root = tmp_path_factory.mktemp("faults")
    specs = llama_specs(layers=2, hidden=1024, inter=2048, vocab=8192)
    single = write_checkpoint(root / "single", specs) / "model.safetensors"
    folder = write_checkpoint(root / "sharded", specs, shards=3)
    adapter = root / "adapter"
    write_peft_adapter(adapter, specs, TARGETS)
    base = {"file": single, "folder": folder}
    refs: dict[str, dict[str, dict[str, str]]] = {}
    sizes, seconds = {}, {}
    for layout, b in base.items():
        refs[layout] = {}
        for w in WEIGHTS:
            ref = out_path(root / f"ref_{w}", layout)
            if w == WEIGHTS[0]:  # through the CLI, timed
                start = time.monotonic()
                proc = run_apply(b, adapter, "-o", ref, "--weights", w)
                seconds[layout] = time.monotonic() - start
                assert proc.returncode == 0, proc.stderr
            else:
                lorafuse.apply(b, [adapter], [float(w)], out=ref, progress=False)
            refs[layout][w] = tree_hashes(ref)
            files = [ref] if ref.is_file() else [p for p in ref.iterdir() if p.is_file()]
            sizes[layout] = sum(p.stat().st_size for p in files)
            shutil.rmtree(ref.parent)
        assert refs[layout]["1"] != refs[layout]["0.5"]
    # 3 shards, the index, config.json, lorafuse_manifest.json, README.md (the model card, issue #16)
    assert len(refs["folder"]["1"]) == 7
    assert sizes["file"] > 70 << 20
    return Inputs(base, adapter, refs, sizes, seconds)


def temp_bytes(out: Path, pid: int) -> int:
    """Bytes written so far into the temporary output of process `pid` (-1: none yet)."""
    pattern = temp_pattern(out)
    total = -1
    for p in out.parent.iterdir():
        m = pattern.match(p.name)
        if m and int(m.group(1)) == pid:
            try:
                size = sum(f.stat().st_size for f in p.iterdir()) if p.is_dir() else p.stat().st_size
                total = max(total, 0) + size
            except FileNotFoundError:  # renamed or removed meanwhile
                pass
    return total


def kill_when(proc: subprocess.Popen[bytes], out: Path, threshold: float = math.inf,
              seconds: float = math.inf) -> int:
    """SIGKILL `proc` once its temporary output holds >= threshold bytes or `seconds` have passed
    since it started (at once when threshold <= 0). Returns the bytes seen at the kill (-1: no
    temporary output yet)."""
    seen = -1
    start = time.monotonic()
    deadline = start + 60
    while threshold > 0 and proc.poll() is None and time.monotonic() < min(deadline, start + seconds):
        seen = temp_bytes(out, proc.pid)
        if seen >= threshold:
            break
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return seen


# Kill points: fractions of the output written when SIGKILL strikes (0: at once, during start-up;
# 1e-9: as soon as the temporary output has its first bytes; 1.0: all data written, renaming into
# place), then fractions of the duration of a whole run.
KILL_AT_BYTES = (0.0, 1e-9, 0.2, 0.45, 0.7, 0.9, 1.0)
KILL_AT_TIMES = (0.75, 0.9, 1.0)


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_sigkill_leaves_the_previous_output_or_the_new_one(inputs, tmp_path, layout):
    out = out_path(tmp_path, layout)
    refs, total = inputs.refs[layout], inputs.sizes[layout]
    before_inputs = inputs.hashes(layout)
    state: dict[str, str] = {}  # what `out` holds: {} (nothing) or the hashes of one complete output
    partial_kills = 0
    outcomes = []
    killed: set[int] = set()  # pids of the runs killed so far
    points = [("bytes", p) for p in KILL_AT_BYTES] + [("time", p) for p in KILL_AT_TIMES]
    for kind, point in points:
        weight = "0.5" if state == refs["1"] else "1"  # always a result that differs from what `out` holds
        inode = out.stat().st_ino if out.exists() else None
        proc = subprocess.Popen(lorafuse_cmd(inputs.base[layout], inputs.adapter, "-o", out, "--weights", weight),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kind == "bytes":
            seen = kill_when(proc, out, threshold=point * total)
        else:
            seen = kill_when(proc, out, seconds=point * inputs.seconds[layout])
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        assert proc.returncode in (0, -signal.SIGKILL), stderr
        if proc.returncode:
            killed.add(proc.pid)
        after = tree_hashes(out)
        if after == state:
            outcomes.append("unchanged")
            if inode is not None:
                assert out.stat().st_ino == inode, "the previous output was rewritten"
        else:
            assert after == refs[weight], (
                f"kill at {point:.0%} of the {kind} ({seen} of {total} bytes): {out} holds neither its previous "
                f"state nor the complete new output: {sorted(after)}")
            outcomes.append("replaced")
        # What killed runs leave: only their temporary entries, recognisable by name and pid (a run
        # removes those of earlier killed runs when it starts).
        for name in leftovers(out):
            m = temp_pattern(out).match(name)
            assert m and int(m.group(1)) in killed, f"unexpected entry beside the output: {name}"
        if proc.returncode == -signal.SIGKILL and 0 < seen < total and leftovers(out):
            partial_kills += 1
        assert inputs.hashes(layout) == before_inputs, f"a killed run changed an input (kill at {point:.0%})"
        outcomes[-1] += f" ({kind} {point:g}: {seen} bytes)"
        state = after
    assert outcomes[0].startswith("unchanged")  # killed during start-up: nothing written
    assert partial_kills >= 3, f"too few kills struck while the output was partly written: {outcomes}"

    # A rerun succeeds, writes the complete output and removes what the killed runs left.
    weight = "0.5" if state == refs["1"] else "1"
    proc = run_apply(inputs.base[layout], inputs.adapter, "-o", out, "--weights", weight)
    assert proc.returncode == 0, proc.stderr
    assert tree_hashes(out) == refs[weight]
    assert leftovers(out) == []
    assert inputs.hashes(layout) == before_inputs


def test_stale_temporary_entries_are_removed_only_when_their_run_is_gone(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"previous")
    # A dead run's temporary folder and file (pid of a process that has exited), a live run's
    # (this process: pid alive) and entries that only look alike.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    names = {
        f".merged.tmp-{dead_pid}-abcd1234": "dir",
        f".merged.tmp-{dead_pid}-zz_99x00": "file",
        f".merged.tmp-{os.getpid()}-live0000": "dir",
        f".merged.tmp-{dead_pid}-short": "file",
        f".merged.tmp-{dead_pid}-abcd1234.keep": "file",
        f".other.tmp-{dead_pid}-abcd1234": "file",
        f"merged.tmp-{dead_pid}-abcd1234": "file",
    }
    for name, kind in names.items():
        if kind == "dir":
            (tmp_path / name).mkdir()
            (tmp_path / name / "model.safetensors").write_bytes(b"partial")
        else:
            (tmp_path / name).write_bytes(b"partial")
        atomic.mark_entry(tmp_path / name)  # as a run marks its temporary entries
    # A dead pid whose entry is still locked (a live run in another pid namespace) is kept too.
    locked = tmp_path / f".merged.tmp-{dead_pid}-locked00"
    locked.write_bytes(b"partial")
    atomic.mark_entry(locked)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(locked)!r}, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout and holder.stdout.readline() == "locked\n"
        removed = atomic.remove_stale(out)
    finally:
        holder.communicate("")
    assert sorted(removed) == sorted([f".merged.tmp-{dead_pid}-abcd1234", f".merged.tmp-{dead_pid}-zz_99x00"])
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["merged", locked.name] + [n for n in names if n not in removed])
    assert (out / "model.safetensors").read_bytes() == b"previous"


def test_a_previous_output_moved_aside_by_a_killed_run_is_put_back(tmp_path):
    """Without an atomic exchange, a folder output is moved aside (`.NAME.old-PID-X`) for an instant;
    a run killed in that instant leaves it there and the next run puts it back before anything else."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = tmp_path / f".merged.old-{int(dead.stdout)}-0123abcd"
    aside.mkdir()
    (aside / "model.safetensors").write_bytes(b"previous")
    atomic.mark_entry(aside)  # as the run marks what it moves aside
    out = tmp_path / "merged"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic.atomic_dir(out):
            raise RuntimeError("boom")
    assert (out / "model.safetensors").read_bytes() == b"previous"
    assert leftovers(out) == []


def _foreign(out: Path, layout: str) -> None:
    """What the user keeps at `out`: a folder of notes and scripts (folder layout) or a file (file layout)."""
    if layout == "file":
        out.write_bytes(b"w\n" * 1000)
        return
    (out / "scripts").mkdir(parents=True)
    (out / "notes.md").write_text("my notes\n")
    (out / "scripts" / "eval.sh").write_text("#!/bin/sh\n")
    (out / "model.safetensors").write_bytes(b"w\n")


@pytest.mark.parametrize("prior", ["lorafuse", "foreign"])
@pytest.mark.parametrize("layout", ["file", "folder"])
def test_sigkill_while_replacing_leaves_the_previous_output_or_the_new_one(inputs, tmp_path, layout, prior):
    """SIGKILL while a run replaces an earlier lorafuse output (no flag needed), or what the user kept at the
    output path (--overwrite): the path holds the previous content byte for byte (same inode) or the
    complete new output, never a part nor nothing; a rerun cleans up and completes."""
    out = out_path(tmp_path, layout)
    refs, total = inputs.refs[layout], inputs.sizes[layout]
    before_inputs = inputs.hashes(layout)
    killed: set[int] = set()
    flag = ["--overwrite"] if prior == "foreign" else []
    replaced = 0
    for kind, point in [("bytes", 1e-9), ("bytes", 0.5), ("bytes", 1.0), ("time", 1.0)]:
        _remove_tree(out)
        if prior == "foreign":
            _foreign(out, layout)
        else:
            assert run_apply(inputs.base[layout], inputs.adapter, "-o", out, "--weights", "0.5").returncode == 0
        state, inode = tree_hashes(out), out.stat().st_ino
        proc = subprocess.Popen(lorafuse_cmd(inputs.base[layout], inputs.adapter, "-o", out, *flag),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seen = kill_when(proc, out, threshold=point * total) if kind == "bytes" else \
            kill_when(proc, out, seconds=point * inputs.seconds[layout])
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        assert proc.returncode in (0, -signal.SIGKILL), stderr
        if proc.returncode:
            killed.add(proc.pid)
        after = tree_hashes(out)
        if after == state:
            assert out.stat().st_ino == inode, "the previous content was rewritten"
        else:
            assert after == refs["1"], f"kill at {point:g} of the {kind} ({seen} bytes): a partial output"
            replaced += 1
        for name in leftovers(out):
            m = temp_pattern(out).match(name)
            assert m and int(m.group(1)) in killed, f"unexpected entry beside the output: {name}"
        assert inputs.hashes(layout) == before_inputs
    assert replaced < 4  # at least one kill struck before the rename
    # A rerun (the user's content may still be there: --overwrite again) completes and cleans up.
    proc = run_apply(inputs.base[layout], inputs.adapter, "-o", out, "--weights", "0.5", *flag)
    assert proc.returncode == 0, proc.stderr
    assert tree_hashes(out) == refs["0.5"] and leftovers(out) == []


def _remove_tree(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_a_refused_output_is_left_byte_for_byte(inputs, tmp_path, layout):
    """What lorafuse must not replace (the user's folder or file, a lorafuse folder the user added notes to)
    is refused in one line naming it and left as it was: same bytes, same inode, nothing
    beside it."""
    out = out_path(tmp_path, layout)
    before_inputs = inputs.hashes(layout)
    cases = ["foreign"] + (["notes"] if layout == "folder" else [])
    for case in cases:
        _remove_tree(out)
        if case == "foreign":
            _foreign(out, layout)
        else:
            assert run_apply(inputs.base[layout], inputs.adapter, "-o", out).returncode == 0
            (out / "notes.md").write_text("mine\n")
        state, inode = tree_hashes(out), out.stat().st_ino
        proc = run_apply(inputs.base[layout], inputs.adapter, "-o", out)
        assert proc.returncode == 1 and proc.stdout == ""
        assert proc.stderr.startswith(f"lorafuse apply: error: OutputError: output {out} is ") and \
            proc.stderr.count("\n") == 1, proc.stderr
        assert ("notes.md" in proc.stderr) if layout == "folder" else \
            "lorafuse did not write (2000 bytes" in proc.stderr
        assert "--overwrite" in proc.stderr
        assert tree_hashes(out) == state and out.stat().st_ino == inode and leftovers(out) == []
    assert inputs.hashes(layout) == before_inputs


# ----------------------------------------------------------------------------- concurrent runs


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_concurrent_runs_leave_one_whole_output(inputs, tmp_path, layout):
    out = out_path(tmp_path, layout)
    refs = inputs.refs[layout]
    before_inputs = inputs.hashes(layout)
    for _ in range(3):  # the first round starts with no output, the others replace one
        procs = [subprocess.Popen(lorafuse_cmd(inputs.base[layout], inputs.adapter, "-o", out, "--weights", w,
                                               "--threads", "1"), stderr=subprocess.PIPE) for w in WEIGHTS]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err.decode()
        after = tree_hashes(out)
        assert after in (refs["1"], refs["0.5"]), f"a mixture of two runs: {sorted(after)}"
        assert leftovers(out) == []
    assert inputs.hashes(layout) == before_inputs


@pytest.mark.filterwarnings("ignore::lorafuse.errors.OverwriteWarning")  # each replace says so, on purpose
@pytest.mark.parametrize("kind", ["dir", "file", "dir-without-exchange"])
def test_concurrent_commits_never_expose_a_missing_or_mixed_output(tmp_path, kind, monkeypatch):
    """Many writers replace one output as fast as they can while a reader checks it: once it
    exists it always exists, and it is always one writer's whole output. Without an atomic
    exchange (other systems, some file systems) a folder output is missing for an instant
    between two renames; the rest holds."""
    if kind == "dir-without-exchange":
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    may_vanish = kind == "dir-without-exchange"
    kind = kind.split("-")[0]
    out = tmp_path / ("out" if kind == "dir" else "out.bin")
    parts = 4
    errors: list[str] = []
    stop = threading.Event()

    def writer(wid: int) -> None:
        try:
            for i in range(40):
                tag = f"{wid}-{i}".encode()
                if kind == "dir":
                    with atomic.atomic_dir(out) as tmp:
                        for k in range(parts):
                            (tmp / f"part{k}").write_bytes(tag)
                else:  # not marked as lorafuse's: each replace needs overwrite (and says so in a warning)
                    with atomic.atomic_file(out, overwrite=True) as tmp:
                        tmp.write_bytes(tag * 1000)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"writer {wid}: {type(e).__name__}: {e}")

    def reader() -> None:
        existed = False
        while not stop.is_set():
            try:
                if kind == "dir":
                    fd = os.open(out, os.O_RDONLY)  # pin one folder: its files must agree
                else:
                    data = out.read_bytes()
            except FileNotFoundError:
                if existed and not may_vanish:
                    errors.append("reader: the output vanished after it had appeared")
                continue
            existed = True
            if kind == "dir":
                try:
                    tags = {Path(f"/proc/self/fd/{fd}/part{k}").read_bytes() for k in range(parts)}
                except FileNotFoundError:  # a replaced folder being removed: nothing to compare
                    tags = set()
                finally:
                    os.close(fd)
                if len(tags) > 1:
                    errors.append(f"reader: a mixed output: {tags}")
            elif len(data) < 1000 or data != data[: len(data) // 1000] * 1000:
                errors.append(f"reader: a partial output of {len(data)} bytes")

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    r = threading.Thread(target=reader)
    r.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    r.join()
    assert errors == []
    assert leftovers(out) == []


# ----------------------------------------------------------------------------- full disk


def _fsize_limit(limit: int) -> None:
    """preexec_fn: files of the child cannot grow past `limit` bytes; a write beyond gets EFBIG."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def _prior(out: Path, inputs: Inputs, layout: str) -> tuple[dict[str, str], int]:
    """A complete earlier output at `out` (weight 0.5): its hashes and inode."""
    lorafuse.apply(inputs.base[layout], [inputs.adapter], [0.5], out=out, progress=False)
    assert tree_hashes(out) == inputs.refs[layout]["0.5"]
    return tree_hashes(out), out.stat().st_ino


LIMIT = 8 << 20  # smaller than every output .safetensors file (shards of about 24 MiB)


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_file_size_limit_through_the_api(inputs, tmp_path, layout):
    out = out_path(tmp_path, layout)
    before_inputs = inputs.hashes(layout)
    for prior in (False, True):
        state, inode = _prior(out, inputs, layout) if prior else ({}, None)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, hard))
        try:
            with pytest.raises(OutputError) as info:
                lorafuse.apply(inputs.base[layout], [inputs.adapter], out=out, progress=False)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, old_handler)
        message = str(info.value)
        assert f"cannot write the output {out}: File too large" in message
        assert ("is unchanged" if prior else "nothing was written") in message
        assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.EFBIG
        assert tree_hashes(out) == state
        if prior:
            assert out.stat().st_ino == inode
        assert leftovers(out) == []
    assert inputs.hashes(layout) == before_inputs


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_file_size_limit_through_the_cli(inputs, tmp_path, layout):
    out = out_path(tmp_path, layout)
    state, inode = _prior(out, inputs, layout)
    before_inputs = inputs.hashes(layout)
    proc = run_apply(inputs.base[layout], inputs.adapter, "-o", out, preexec_fn=lambda: _fsize_limit(LIMIT))
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.startswith(f"lorafuse apply: error: OutputError: cannot write the output {out}: "
                                  "File too large;"), proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr  # one line, no traceback
    assert tree_hashes(out) == state and out.stat().st_ino == inode
    assert leftovers(out) == []
    assert inputs.hashes(layout) == before_inputs


def _can_mount_tmpfs(where: Path) -> list[str] | None:
    """The command prefix that runs a command where a tmpfs can be mounted at `where`, if any."""
    where.mkdir(exist_ok=True)
    return namespace_prefix(f"mount -t tmpfs -o size=1m tmpfs {where} && touch {where}/x")


_NO_SPACE_SCRIPT = """
import json, os, subprocess, sys
from pathlib import Path
sys.path[:0] = json.loads(os.environ["FAULT_SYS_PATH"])
from fault_tools import leftovers, lorafuse_cmd, tree_hashes
import lorafuse

base, adapter, out = map(Path, sys.argv[1:4])
report = {}
prior = subprocess.run(lorafuse_cmd(base, adapter, "-o", out, "--weights", "0.5"), capture_output=True, text=True)
report["prior_rc"], report["prior"] = prior.returncode, tree_hashes(out)
inode = out.stat().st_ino if out.exists() else None
cli = subprocess.run(lorafuse_cmd(base, adapter, "-o", out), capture_output=True, text=True)
report["cli_rc"], report["cli_stderr"] = cli.returncode, cli.stderr
report["after_cli"], report["leftovers_cli"] = tree_hashes(out), leftovers(out)
try:
    lorafuse.apply(base, [adapter], out=out, progress=False)
    report["api_error"] = None
except Exception as e:
    report["api_error"] = [type(e).__name__, str(e), getattr(e.__cause__, "errno", None)]
report["after_api"], report["leftovers_api"] = tree_hashes(out), leftovers(out)
report["same_inode"] = out.exists() and out.stat().st_ino == inode
print(json.dumps(report))
"""


def _check_no_space(r: dict[str, object], out: Path, inputs: Inputs, layout: str) -> None:
    assert r["prior_rc"] == 0 and r["prior"] == inputs.refs[layout]["0.5"]
    assert r["cli_rc"] == 1
    stderr = str(r["cli_stderr"])
    assert stderr.startswith(f"lorafuse apply: error: OutputError: cannot write the output {out}: "
                             "No space left on device;"), stderr
    assert stderr.count("\n") == 1, stderr  # one line, no traceback
    api = r["api_error"]
    assert isinstance(api, list) and api[0] == "OutputError" and api[2] == errno.ENOSPC, api
    assert f"cannot write the output {out}: No space left on device" in api[1]
    assert r["after_cli"] == r["after_api"] == r["prior"], "a failed run changed the previous output"
    assert r["same_inode"]
    assert r["leftovers_cli"] == r["leftovers_api"] == []


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_no_space_left_on_a_small_tmpfs(inputs, tmp_path, layout, monkeypatch):
    """A file system that fills up: a tmpfs of 1.5 times the output's size, mounted in a private mount
    namespace (as root, or in a user namespace). Where neither is allowed, ENOSPC is injected as below."""
    mnt = tmp_path / "mnt"
    prefix = _can_mount_tmpfs(mnt)
    if prefix is None:
        test_no_space_left_injected(inputs, tmp_path, layout, monkeypatch)
        return
    before_inputs = inputs.hashes(layout)
    script = tmp_path / "no_space.py"
    script.write_text(_NO_SPACE_SCRIPT)
    out = mnt / out_path(tmp_path, layout).name
    cmd = (f"mount -t tmpfs -o size={inputs.sizes[layout] * 3 // 2} tmpfs {mnt} && exec {sys.executable} {script} "
           f"{inputs.base[layout]} {inputs.adapter} {out}")
    env = dict(os.environ, FAULT_SYS_PATH=json.dumps([p for p in sys.path if p]))
    proc = subprocess.run([*prefix, "sh", "-c", cmd], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    _check_no_space(json.loads(proc.stdout), out, inputs, layout)
    assert not any(mnt.iterdir())  # the tmpfs was private to that namespace
    assert inputs.hashes(layout) == before_inputs


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_no_space_left_injected(inputs, tmp_path, layout, monkeypatch):
    """ENOSPC from the writer's writes and kernel copies once half an output has been written."""
    from lorafuse.cli import main

    before_inputs = inputs.hashes(layout)
    out = out_path(tmp_path, layout)
    budget = {"left": 0}
    real_write, real_copy = st_mod.SafetensorsWriter._write_all, st_mod.copy_range

    def spend(n: int) -> None:
        budget["left"] -= n
        if budget["left"] < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def write_all(self, view):  # type: ignore[no-untyped-def]
        spend(len(view.cast("B")))
        real_write(self, view)

    def copy_range(src_fd, src_offset, dst_fd, nbytes):  # type: ignore[no-untyped-def]
        spend(nbytes)
        real_copy(src_fd, src_offset, dst_fd, nbytes)

    _prior(out, inputs, layout)
    inode = out.stat().st_ino
    monkeypatch.setattr(st_mod.SafetensorsWriter, "_write_all", write_all)
    monkeypatch.setattr(st_mod, "copy_range", copy_range)
    r: dict[str, object] = {"prior_rc": 0, "prior": tree_hashes(out)}
    budget["left"] = inputs.sizes[layout] // 2
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        r["cli_rc"] = main(["apply", str(inputs.base[layout]), str(inputs.adapter), "-o", str(out), "--no-progress",
                            "-q"])
    r["cli_stderr"], r["after_cli"], r["leftovers_cli"] = err.getvalue(), tree_hashes(out), leftovers(out)
    budget["left"] = inputs.sizes[layout] // 2
    with pytest.raises(OutputError) as info:
        lorafuse.apply(inputs.base[layout], [inputs.adapter], out=out, progress=False)
    r["api_error"] = [type(info.value).__name__, str(info.value), getattr(info.value.__cause__, "errno", None)]
    r["after_api"], r["leftovers_api"] = tree_hashes(out), leftovers(out)
    r["same_inode"] = out.stat().st_ino == inode
    assert budget["left"] < 0
    _check_no_space(r, out, inputs, layout)
    assert inputs.hashes(layout) == before_inputs


# ----------------------------------------------------------------------------- non-finite values


INF_MODULE = "model.layers.1.mlp.gate_proj"


@pytest.fixture(scope="module")
def peft_inf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Case, Path]:
    """A real PEFT llama case, and the same adapter with lora_B[7, 2] = +Inf in one module, saved by PEFT."""
    case = llama_case(tmp_path_factory.mktemp("llama_inf"), seed=21)
    model = PeftModel.from_pretrained(case.model_cls.from_pretrained(str(case.base_dir)), str(case.adapter_dir))
    with torch.no_grad():
        model.base_model.model.get_submodule(INF_MODULE).lora_B["default"].weight[7, 2] = float("inf")
    adapter = tmp_path_factory.mktemp("inf_adapter") / "adapter"
    model.save_pretrained(str(adapter))
    with safe_open(str(adapter / ADAPTER_FILE), "np") as f:
        b = f.get_tensor(f"{PREFIX}{INF_MODULE}.lora_B.weight")
    assert np.isinf(b[7, 2]) and np.isfinite(np.delete(b, 7, axis=0)).all()
    return case, adapter


def test_inf_in_a_peft_adapter_through_the_cli(peft_inf, tmp_path):
    case, adapter = peft_inf
    out = tmp_path / "merged"
    before_inputs = {str(p): tree_hashes(p) for p in (case.base_dir, adapter)}
    proc = run_apply(case.base_dir, adapter, "-o", out)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorafuse apply: error: NonFiniteError: "), proc.stderr
    assert f"{INF_MODULE}.weight" in lines[0] and "--allow-nonfinite" in lines[0]
    assert "layers.0." not in lines[0] and "q_proj" not in lines[0]  # only the poisoned module is named
    assert not out.exists() and leftovers(out) == []

    proc = run_apply(case.base_dir, adapter, "-o", out, "--allow-nonfinite")
    assert proc.returncode == 0, proc.stderr
    with safe_open(str(out / "model.safetensors"), "np") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}
    assert got.keys() == case.merged_state.keys()
    w = got[f"{INF_MODULE}.weight"]
    # Row 7 of the delta is Inf * lora_A[2, :] (times the scale): +-Inf by the sign of lora_A.
    with safe_open(str(adapter / ADAPTER_FILE), "np") as f:
        a_row = f.get_tensor(f"{PREFIX}{INF_MODULE}.lora_A.weight")[2]
    assert np.all(a_row != 0)
    np.testing.assert_array_equal(w[7], np.where(a_row > 0, np.inf, -np.inf))
    rest = np.delete(w, 7, axis=0)
    np.testing.assert_allclose(rest, np.delete(case.merged_state[f"{INF_MODULE}.weight"], 7, axis=0), rtol=0,
                               atol=1e-5)
    for key, ref in case.merged_state.items():
        if key != f"{INF_MODULE}.weight":
            np.testing.assert_allclose(got[key], ref, rtol=0, atol=1e-5, err_msg=key)
    assert {str(p): tree_hashes(p) for p in (case.base_dir, adapter)} == before_inputs


def _bits_to_f64(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "F16":
        return raw.view(np.float16).astype(np.float64)
    return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)  # BF16


def _round_bits(x: np.ndarray, dtype: str) -> np.ndarray:
    """float64 -> F16 / BF16 bits, round to nearest even (torch as the reference)."""
    t = torch.from_numpy(x).to(torch.float16 if dtype == "F16" else torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16)


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_merged_values_that_overflow_the_output_dtype(tmp_path, dtype, capsys):
    """Finite base weights and finite factors whose merged value is finite in float32 but beyond the
    range of F16 (65504) or BF16 (3.39e38): refused, naming the module; --allow-nonfinite writes Inf there."""
    from lorafuse.cli import main

    rng = np.random.default_rng(5)
    module = "model.layers.0.self_attn.o_proj"
    specs = [Spec("model.layers.0.self_attn.q_proj.weight", dtype, (64, 64)), Spec(f"{module}.weight", dtype, (64, 64))]
    w_bits = {s.name: _round_bits(rng.standard_normal(s.shape) * 0.05, dtype) for s in specs}
    if dtype == "BF16":
        w_bits[f"{module}.weight"][3, 5] = 0x7F7F  # the largest finite BF16, 3.3895e38
    base = tmp_path / "base"
    base.mkdir()
    write_safetensors(base / "model.safetensors", specs, fill=lambda s: w_bits[s.name].tobytes())
    factors = write_peft_adapter(tmp_path / "adapter", specs, ["q_proj", "o_proj"], r=4, alpha=8)
    a, b = factors[module]
    # One entry of the delta (row 3, column 5) made huge; float32 still holds W + delta there.
    big = 200.0 if dtype == "F16" else 3.5e17  # delta[3, 5] = 2 * 4 * big**2: 3.2e5, or 9.8e35
    a[:, 5], b[3, :] = big, big
    with safe_open(str(tmp_path / "adapter" / ADAPTER_FILE), "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[f"{PREFIX}{module}.lora_A.weight"], tensors[f"{PREFIX}{module}.lora_B.weight"] = a, b
    write_safetensors(tmp_path / "adapter" / ADAPTER_FILE, [Spec(k, "F32", v.shape) for k, v in tensors.items()],
                      fill=lambda s: tensors[s.name].tobytes())
    ref = {name: _bits_to_f64(w_bits[name], dtype) + 2.0 * (factors[name.removesuffix(".weight")][1].astype(np.float64)
                                                              @ factors[name.removesuffix(".weight")][0])
           for name in w_bits}
    assert np.isfinite(np.float32(ref[f"{module}.weight"][3, 5]))  # finite in float32 ...
    assert np.isinf(_bits_to_f64(_round_bits(ref[f"{module}.weight"], dtype), dtype)[3, 5])  # ... not in dtype

    out = tmp_path / "merged"
    with pytest.raises(NonFiniteError) as info:
        lorafuse.apply(base, [tmp_path / "adapter"], out=out, progress=False)
    message = str(info.value)
    assert f"{module}.weight ({dtype}" in message and "overflow" in message and "q_proj" not in message
    assert not out.exists() and leftovers(out) == []

    code = main(["apply", str(base), str(tmp_path / "adapter"), "-o", str(out), "--no-progress", "-q"])
    err = capsys.readouterr().err
    assert code == 1 and f"NonFiniteError: Inf in the output {module}.weight ({dtype}, largest finite" in err

    assert main(["apply", str(base), str(tmp_path / "adapter"), "-o", str(out), "--no-progress", "-q",
                 "--allow-nonfinite"]) == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        got = {k: f.get_tensor(k).view(torch.int16).numpy().view(np.uint16) for k in f.keys()}
    for name in w_bits:
        expected = _round_bits(ref[name], dtype)
        mismatch = got[name] != expected
        # float32 arithmetic may round an entry that sits at a tie the other way: at most one unit apart
        assert (np.abs(got[name].astype(np.int32) - expected.astype(np.int32))[mismatch] <= 1).all(), name
        assert mismatch.mean() < 0.01, name
    w = _bits_to_f64(got[f"{module}.weight"], dtype)
    assert w[3, 5] == np.inf and np.isfinite(np.delete(w.reshape(-1), 3 * 64 + 5)).all()


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_sigterm_removes_the_temporary_output_and_keeps_the_previous_one(inputs, tmp_path, layout):
    """SIGTERM mid-write: the CLI exits 143 with a message, removes its temporary output at once
    (no leftovers until a later run) and leaves the previous output untouched."""
    out = out_path(tmp_path, layout)
    before_inputs = inputs.hashes(layout)
    assert run_apply(inputs.base[layout], inputs.adapter, "-o", out, "--weights", "0.5").returncode == 0
    previous, inode = tree_hashes(out), out.stat().st_ino
    proc = subprocess.Popen(lorafuse_cmd(inputs.base[layout], inputs.adapter, "-o", out),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while temp_bytes(out, proc.pid) < 0.3 * inputs.sizes[layout] and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert proc.poll() is None, "the run ended before the signal could be sent"
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 143, stderr
    assert stderr == "lorafuse apply: terminated (SIGTERM); no output was written\n"
    assert tree_hashes(out) == previous and out.stat().st_ino == inode
    assert leftovers(out) == []
    assert inputs.hashes(layout) == before_inputs
