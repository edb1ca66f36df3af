"""Crashes that became clear errors (issue #13 §3): inputs truncated while read, threads that
cannot be started, absurd numbers.

* A memory-mapped input truncated (or rewritten in place) while lorafuse reads it: the read
  that would raise SIGBUS sees zeros instead (the core's guard, cpp/src/mapguard.cpp), and
  every place where such data could go on (a core call, a kernel-side copy, a write(2) of a
  mapped view, the commit of an output) raises InputChangedError naming the file with its
  size then and now. A real `lorafuse apply` whose base is truncated mid-run exits 1 and
  leaves no output and no temporary entry. Faults outside lorafuse's mappings still kill.
* Threads that cannot be started (a real limit: every new thread needs a 4 GiB stack under
  RLIMIT_STACK and the address space is capped with RLIMIT_AS, which holds for root too) are
  done without: same results, bit for bit, and `lorafuse apply` succeeds. --threads is
  0..1024 and the core runs at most 4 workers per hardware thread.
* Every numeric option is range-checked by argparse (exit 2, the option, the value and the
  range named) and by the API (LorafuseValueError); ranks are capped at each module's full
  rank min(out, in), so no output is allocated from a user's number.
"""

from __future__ import annotations

import gc
import json
import os
import re
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from fault_tools import (
    Spec,
    leftovers,
    llama_specs,
    lorafuse_cmd,
    temp_pattern,
    tree_hashes,
    write_checkpoint,
    write_peft_adapter,
)
from safetensors.numpy import load_file, save_file

import lorafuse
from lorafuse import InputChangedError, LorafuseValueError, UnsupportedError, _core
from lorafuse.cli import main
from lorafuse.io.atomic import atomic_file
from lorafuse.io.safetensors import SafetensorsFile, SafetensorsWriter, TensorSpec, raise_if_inputs_changed
from lorafuse.ops.extract import extract
from lorafuse.ops.rank import RankRule
from lorafuse.ops.resize import resize

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20


def _changed_words(path: Path, was: int, now: int) -> list[str]:
    return [str(path), "changed or was truncated while lorafuse was reading it", f"was {was} bytes, now {now}",
            "nothing was written"]


def _assert_changed(message: str, path: Path, was: int, now: int) -> None:
    for words in _changed_words(path, was, now):
        assert words in message, message


def _mapped(path: Path, name: str = "w") -> tuple[SafetensorsFile, np.ndarray]:
    f = SafetensorsFile(path)
    return f, f.raw(name)


# ---- truncated while read: in process -------------------------------------------------------------


def test_truncated_mapping_reads_zeros_and_every_use_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((1024, 1024)).astype(np.float32)  # 4 MiB
    path = tmp_path / "w.safetensors"
    save_file({"w": w}, str(path))
    size = path.stat().st_size
    f, view = _mapped(path)
    try:
        start = f.file_offset("w")
        cut = 2 * MIB  # page aligned: file bytes [0, cut) stay, everything after is gone
        os.truncate(path, cut)
        faults = _core.mapping_faults()
        got = np.array(view)  # would be SIGBUS: reads zeros from the first page past the new end
        assert _core.mapping_faults() > faults  # one or a few (memcpy may read the end first)
        intact = (cut - start) // 4  # elements wholly before the cut
        np.testing.assert_array_equal(got.reshape(-1)[:intact], w.reshape(-1)[:intact])
        assert not got.reshape(-1)[intact:].any()

        with pytest.raises(InputChangedError) as e:
            raise_if_inputs_changed()
        _assert_changed(str(e.value), path, size, cut)
        with pytest.raises(InputChangedError) as e:
            raise_if_inputs_changed([tmp_path])  # a folder holding the file
        _assert_changed(str(e.value), path, size, cut)
        raise_if_inputs_changed([tmp_path / "other.safetensors"])  # not an input of that run: not its business

        # every core call that reads the mapping refuses it, on the calling thread or on workers
        with pytest.raises(InputChangedError) as e:
            _core.to_float32(view, "F32", 4)
        _assert_changed(str(e.value), path, size, cut)
        b = np.ones((1024, 2), np.float32)
        a = np.ones((2, 1024), np.float32)
        out = np.empty((1024, 1024), np.float32)
        with pytest.raises(InputChangedError, match="w.safetensors changed or was truncated"):
            _core.merge_batch([("q_proj", view, "F32", out, "F32", [(b, a, None, False)])], 2)
        with pytest.raises(InputChangedError, match="w.safetensors changed or was truncated"):
            _core.factored_frobenius_sq([(view[:, :8].copy(), view[:8])], 1)
        # arrays outside the mapping are not affected
        np.testing.assert_array_equal(_core.to_float32(w, "F32", 2), w)
    finally:
        f.close()
        del view
        gc.collect()
    raise_if_inputs_changed()  # the mapping is gone with its last view, and its guard entry with it


def test_a_fault_in_a_file_of_unchanged_size_and_time_is_an_unreadable_file(tmp_path):
    """Truncated, read, then grown back with its old modification time: only the fault tells (as an I/O
    error would); the message says where the read failed."""
    path = tmp_path / "w.safetensors"
    save_file({"w": np.ones((512, 1024), np.float32)}, str(path))  # 2 MiB
    st = path.stat()
    f, view = _mapped(path)
    try:
        os.truncate(path, MIB)
        assert float(view.sum()) < 512 * 1024  # zeros past the cut
        os.truncate(path, st.st_size)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        with pytest.raises(InputChangedError) as e:
            raise_if_inputs_changed([path])
        m = re.search(r"could not be read at byte (\d+) while lorafuse was reading it \(an I/O error, or the file "
                      rf"changed; it has {st.st_size} bytes\); nothing was written", str(e.value))
        assert m is not None, str(e.value)
        assert MIB <= int(m.group(1)) < st.st_size
        assert str(path) in str(e.value)
    finally:
        f.close()
        del view
        gc.collect()


def test_kernel_threads_faulting_first_raise_not_crash(tmp_path):
    """The first reads past the new end happen on the core's worker threads (GIL released)."""
    rng = np.random.default_rng(1)
    path = tmp_path / "big.safetensors"
    w = rng.standard_normal((4096, 1024)).astype(np.float32)  # 16 MiB
    w[0, 0] = np.nan  # extract would report it (NonFiniteError): the changed file explains more, it wins
    save_file({"w": w}, str(path))
    size = path.stat().st_size
    f, view = _mapped(path)
    try:
        os.truncate(path, MIB)
        with pytest.raises(InputChangedError) as e:
            _core.to_float32(view, "F32", 8)
        _assert_changed(str(e.value), path, size, MIB)
        with pytest.raises(InputChangedError) as e:
            _core.extract_svd([("m", view, "F32", np.zeros_like(view), "F32")], [4], threads=4)
        _assert_changed(str(e.value), path, size, MIB)
    finally:
        f.close()
        del view
        gc.collect()


def test_copy_from_a_truncated_source_names_it(tmp_path):
    src = tmp_path / "src.safetensors"
    save_file({"w": np.arange(1 << 20, dtype=np.float32)}, str(src))  # 4 MiB
    size = src.stat().st_size
    with SafetensorsFile(src) as f:
        os.truncate(src, MIB)
        with pytest.raises(InputChangedError) as e:
            with SafetensorsWriter(tmp_path / "dst.safetensors", [TensorSpec("w", "F32", (1 << 20,))]) as w:
                w.copy_from("w", f, "w")  # copy_file_range comes back short
    _assert_changed(str(e.value), src, size, MIB)


def test_writing_a_view_of_a_truncated_mapping_is_refused(tmp_path):
    """write(2) from a mapped view past the new end fails with EFAULT (the kernel takes the fault)."""
    src = tmp_path / "src.safetensors"
    save_file({"w": np.ones((1024, 1024), np.float32)}, str(src))
    size = src.stat().st_size
    f, view = _mapped(src)
    try:
        os.truncate(src, PAGE)
        with pytest.raises(InputChangedError) as e:
            with SafetensorsWriter(tmp_path / "dst.safetensors", [TensorSpec("w", "F32", (1024, 1024))]) as w:
                w.write("w", view)
        _assert_changed(str(e.value), src, size, PAGE)
    finally:
        f.close()
        del view
        gc.collect()


def test_commit_refuses_an_input_rewritten_in_place(tmp_path):
    src = tmp_path / "in.safetensors"
    save_file({"w": np.ones((256, 256), np.float32)}, str(src))
    size = src.stat().st_size
    out = tmp_path / "out.safetensors"
    f, view = _mapped(src)
    try:
        with pytest.raises(InputChangedError) as e:
            with atomic_file(out, [src]) as tmp:
                save_file({"w": np.array(view) * 2}, str(tmp))
                with open(src, "r+b") as g:  # same size, other bytes: a download resumed in place
                    g.seek(size - 4)
                    g.write(b"\0\0\0\0")
                st = os.stat(src)
                os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # whatever the clock's resolution
        assert f"was {size} bytes, now {size}, rewritten in place" in str(e.value)
        assert str(src) in str(e.value)
        assert not out.exists() and leftovers(out) == []
    finally:
        f.close()
        del view
        gc.collect()


def test_input_replaced_by_rename_is_not_an_error(tmp_path):
    """A re-download that writes a new file and renames it over the input leaves the mapped inode whole."""
    src = tmp_path / "in.safetensors"
    save_file({"w": np.full((64, 64), 3.0, np.float32)}, str(src))
    out = tmp_path / "out.safetensors"
    f, view = _mapped(src)
    try:
        with atomic_file(out, [src]) as tmp:
            new = tmp_path / "new.safetensors"
            save_file({"w": np.zeros((8, 8), np.float32)}, str(new))
            os.replace(new, src)
            save_file({"w": np.array(view)}, str(tmp))
        np.testing.assert_array_equal(load_file(str(out))["w"], np.full((64, 64), 3.0, np.float32))
    finally:
        f.close()
        del view
        gc.collect()


def test_sigbus_outside_lorafuse_mappings_still_kills(tmp_path):
    """The guard handles only its own mappings: any other SIGBUS goes on to faulthandler / the default."""
    code = textwrap.dedent(f"""
        import faulthandler, mmap, os
        import numpy as np
        import lorafuse._core  # installs the guard
        faulthandler.enable()
        path = {str(tmp_path / "plain.bin")!r}
        with open(path, "wb") as f:
            f.write(b"x" * 65536)
        fd = os.open(path, os.O_RDONLY)
        m = mmap.mmap(fd, 65536, access=mmap.ACCESS_READ)
        os.truncate(path, 0)
        print(int(np.frombuffer(m, np.uint8).sum()))
    """)
    # under scripts/sanitize.sh ASan would take this deliberate foreign fault and report it: leave it to us
    env = dict(os.environ, ASAN_OPTIONS=os.environ.get("ASAN_OPTIONS", "") + ":handle_sigbus=0")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == -signal.SIGBUS
    assert "Bus error" in r.stderr and r.stdout == ""


# ---- truncated while read: a real `lorafuse apply` ------------------------------------------------


@pytest.mark.parametrize("layout", ["merged", "copied"])
def test_apply_whose_base_is_truncated_mid_run_exits_1_and_leaves_nothing(tmp_path, layout):
    """merged: every tensor is read through the mapping; copied: all but the last are copied by the kernel."""
    specs = [Spec(f"model.layers.{i}.self_attn.q_proj.weight", "BF16", (2048, 2048)) for i in range(24)]  # 192 MiB
    base = write_checkpoint(tmp_path / "base", specs)
    adapter = tmp_path / "adapter"
    write_peft_adapter(adapter, specs if layout == "merged" else specs[-1:], ["q_proj"], r=4)
    shard = base / "model.safetensors"
    size = shard.stat().st_size
    out = tmp_path / "out"
    proc = subprocess.Popen(lorafuse_cmd(base, adapter, "-o", out, "--threads", "1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    truncated = False
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            tmp = [p for p in tmp_path.iterdir() if temp_pattern(out).match(p.name)]
            written = tmp[0] / "model.safetensors" if tmp else None
            try:
                started = written is not None and written.stat().st_size > 16 * MIB
            except FileNotFoundError:
                started = False
            if started:  # the base is open and mapped, a twelfth of the output is written
                os.kill(proc.pid, signal.SIGSTOP)
                os.truncate(shard, MIB)  # a re-download in place starts over
                os.kill(proc.pid, signal.SIGCONT)
                truncated = True
                break
            time.sleep(0.0005)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert truncated, f"the run ended before the base could be truncated: {proc.returncode} {stderr}"
    assert proc.returncode == 1, stderr  # not -7 (SIGBUS)
    assert stdout == ""
    assert "InputChangedError" in stderr
    _assert_changed(stderr, shard, size, MIB)
    assert not out.exists()
    assert leftovers(out) == []


# ---- threads ------------------------------------------------------------------------------------------

# Runs its argv under a real thread limit: RLIMIT_STACK (set before exec) makes every new thread reserve a
# 4 GiB stack, and RLIMIT_AS, set once everything is imported, leaves room for `extra` such stacks only.
# pthread_create then fails with EAGAIN, for root too (RLIMIT_NPROC does not bind root).
_LIMITED = textwrap.dedent("""
    import resource, sys, threading
    import numpy as np
    import lorafuse, lorafuse.cli, lorafuse.ops.apply, lorafuse.formats.peft, lorafuse.io.checkpoint
    from lorafuse import _core

    def vm_size():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))

    extra = int(sys.argv[1])
    stack = resource.getrlimit(resource.RLIMIT_STACK)[0]
    limit = vm_size() + (1 << 30) + extra * (stack + (64 << 20))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    threads_before = threading.active_count()
    if sys.argv[2] == "cli":
        code = lorafuse.cli.main(sys.argv[3:])
        sys.stderr.write(f"thread_start_failures={_core.thread_start_failures()}\\n")
        sys.exit(code)
    exec(sys.argv[3])
""")


def _run_limited(extra_threads: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    def limit_stack() -> None:
        resource.setrlimit(resource.RLIMIT_STACK, (4 << 30, resource.RLIM_INFINITY))

    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", _LIMITED, str(extra_threads), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, preexec_fn=limit_stack)


def test_the_limit_really_stops_threads():
    r = _run_limited(0, "api", textwrap.dedent("""
        try:
            threading.Thread(target=print).start()
            print("started")
        except RuntimeError as e:
            print("refused:", e)
    """))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "refused: can't start new thread"


def test_core_kernels_without_threads_give_the_same_bits(tmp_path):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((300, 200)).astype(np.float32)
    b = rng.standard_normal((300, 6)).astype(np.float32)
    a = rng.standard_normal((6, 200)).astype(np.float32)
    w_ft = (w + b @ a * 0.1).astype(np.float32)
    np.savez(tmp_path / "in.npz", w=w, b=b, a=a, w_ft=w_ft)
    code = textwrap.dedent(f"""
        d = np.load({str(tmp_path / "in.npz")!r})
        w, b, a, w_ft = d["w"], d["b"], d["a"], d["w_ft"]
        out = np.empty(w.shape, np.uint16)
        _core.merge_batch([("m", w, "F32", out, "BF16", [(b, a, None, False)])], 8)
        bf = _core.from_float32(w, "BF16", 8)
        ((B2, A2, S),) = _core.factored_svd([("m", b, a)], [3], "B", 8)
        ((EB, EA, ES, frob),) = _core.extract_svd([("m", w, "F32", w_ft, "F32")], [3], threads=8)
        np.savez({str(tmp_path / "out.npz")!r}, merged=out, bf=bf, B2=B2, A2=A2, EB=EB, EA=EA)
        print(_core.thread_start_failures())
    """)
    r = _run_limited(0, "api", code)
    assert r.returncode == 0, r.stderr
    assert "terminate called" not in r.stderr
    assert int(r.stdout) > 0  # the workers asked for could not start: the calling thread did their work
    got = np.load(tmp_path / "out.npz")
    ref = np.empty(w.shape, np.uint16)
    _core.merge_batch([("m", w, "F32", ref, "BF16", [(b, a, None, False)])], 1)
    np.testing.assert_array_equal(got["merged"], ref)
    exact = w.astype(np.float64) + b.astype(np.float64) @ a.astype(np.float64)
    np.testing.assert_allclose((got["merged"].astype(np.uint32) << 16).view(np.float32), exact, rtol=2**-8, atol=0)
    np.testing.assert_array_equal(got["bf"], _core.from_float32(w, "BF16", 1))
    ((B2, A2, _),) = _core.factored_svd([("m", b, a)], [3], "B", 1)
    np.testing.assert_array_equal(got["B2"], B2)
    np.testing.assert_array_equal(got["A2"], A2)
    ((EB, EA, _, _),) = _core.extract_svd([("m", w, "F32", w_ft, "F32")], [3], threads=1)
    np.testing.assert_array_equal(got["EB"], EB)
    np.testing.assert_array_equal(got["EA"], EA)


@pytest.mark.parametrize("extra", [0, 1], ids=["no-thread", "one-thread"])
def test_apply_under_a_thread_limit_succeeds_with_the_same_output(tmp_path, extra):
    specs = llama_specs(layers=2, hidden=256, inter=512, vocab=512)
    base = write_checkpoint(tmp_path / "base", specs)
    adapter = tmp_path / "adapter"
    write_peft_adapter(adapter, specs, ["q_proj", "v_proj", "down_proj"], r=4)
    ref = tmp_path / "ref"
    r = subprocess.run(lorafuse_cmd(base, adapter, "-o", ref, "--threads", "1"), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    r = _run_limited(extra, "cli", "apply", str(base), str(adapter), "-o", str(out), "--threads", "8",
                     "--no-progress", "-q")
    assert r.returncode == 0, r.stderr
    assert "terminate called" not in r.stderr
    failures = int(r.stderr.strip().splitlines()[-1].split("=")[1])
    assert failures > 0  # the core's workers were refused by the limit; the calling thread did their work
    assert tree_hashes(out) == tree_hashes(ref)
    assert leftovers(out) == []


def test_threads_beyond_the_cap_run_at_most_four_per_core():
    hw = _core.hardware_threads()
    assert _core.resolve_threads(0) == hw
    assert _core.resolve_threads(1) == 1
    assert _core.resolve_threads(1024) == min(1024, 4 * hw)
    x = np.random.default_rng(3).standard_normal((64, 1 << 16)).astype(np.float32)
    np.testing.assert_array_equal(_core.from_float32(x, "F16", 1024).view(np.uint16),
                                  x.astype(np.float16).view(np.uint16))


@pytest.mark.parametrize("value, words", [
    ("99999999999", "got 99999999999"), ("40000", "got 40000"), ("1025", "got 1025"), ("-1", "got -1"),
    ("two", "got 'two'"), ("1.5", "got '1.5'"),
])
def test_cli_threads_out_of_range(capsys, tmp_path, value, words):
    for command in (["apply", "b", "a"], ["combine", "a"], ["similarity", "a"], ["info", "a"],
                    ["resize", "a", "--rank", "2"], ["extract", "b", "f", "--rank", "2"],
                    ["convert", "a", "--to", "kohya"]):
        needs_out = command[0] not in ("similarity", "info")
        line = _argparse_error(capsys, *command, *(["-o", str(tmp_path / "o")] if needs_out else []),
                               "--threads", value)
        assert "argument --threads: must be an integer from 0 (all cores) to 1024" in line and words in line


@pytest.mark.parametrize("threads", [99999999999, 40000, 1025, -1, True, 2.0, "4", None])
def test_api_threads_out_of_range(tmp_path, threads):
    specs = [Spec("model.layers.0.self_attn.q_proj.weight", "BF16", (16, 16))]
    base = write_checkpoint(tmp_path / "base", specs)
    adapter = tmp_path / "adapter"
    write_peft_adapter(adapter, specs, ["q_proj"], r=2)
    calls = [
        lambda: lorafuse.apply(base, [adapter], out=tmp_path / "o1", threads=threads),
        lambda: lorafuse.combine([adapter], threads=threads),
        lambda: lorafuse.similarity([adapter, adapter], threads),
        lambda: resize(adapter, RankRule(rank=1), threads=threads),
        lambda: extract(base, base, RankRule(rank=1), threads=threads),
        lambda: _core.to_float32(np.zeros((2, 2), np.float32), "F32", threads),
        lambda: _core.factored_svd([("m", np.ones((4, 2), np.float32), np.ones((2, 4), np.float32))], [1], "B",
                                   threads),
    ]
    for call in calls:
        with pytest.raises(LorafuseValueError, match=r"threads must be .*(0 \(all cores\) to 1024|<= 1024|>= 0)"):
            call()
    assert not (tmp_path / "o1").exists()


def test_core_threads_error_shows_no_tensor_contents():
    x = np.arange(10000, dtype=np.float32)
    with pytest.raises(LorafuseValueError) as e:
        _core.to_float32(x, "F32", 99999999999)
    assert str(e.value) == ("threads must be <= 1024, got 99999999999 (allowed: an integer from 0 (all cores) "
                            "to 1024)")


# ---- ranges -------------------------------------------------------------------------------------------


def _argparse_error(capsys, *argv: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    return err.strip().splitlines()[-1]


RANGE_CASES = [
    # (command prefix, option, bad values, range words)
    (["resize", "a"], "--rank", ["0", "-3", "1048577", "99999999999", "2.5", "x"], "an integer from 1 to 1048576"),
    (["resize", "a", "--rank", "2"], "--max-rank", ["0", "1048577", "99999999999"], "an integer from 1 to 1048576"),
    (["resize", "a"], "--sv-ratio", ["0.5", "nan", "inf", "-1"], "a number >= 1"),
    (["resize", "a"], "--sv-fro", ["0", "1.5", "nan", "-inf"], "a number > 0 and <= 1"),
    (["resize", "a"], "--sv-cumulative", ["0", "2", "nan"], "a number > 0 and <= 1"),
    (["extract", "b", "f"], "--rank", ["0", "99999999999"], "an integer from 1 to 1048576"),
    (["extract", "b", "f", "--rank", "2"], "--power-iters", ["-1", "101", "99999999999"], "an integer from 0 to 100"),
    (["extract", "b", "f", "--rank", "2"], "--oversample", ["-1", "1048577"], "an integer from 0 to 1048576"),
    (["extract", "b", "f", "--rank", "2"], "--seed", ["-1", str(2**64), "0.5"],
     f"an integer from 0 to {2**64 - 1}"),
    (["combine", "a"], "--rank", ["0", "99999999999"], "an integer from 1 to 1048576"),
    (["combine", "a"], "--conv-rank", ["0", "99999999999"], "an integer from 1 to 1048576"),
    (["combine", "a"], "--density", ["-0.1", "0", "1.5", "nan", "inf"], "a number > 0 and <= 1"),
    (["combine", "a"], "--seed", ["-1", str(2**64)], f"an integer from 0 to {2**64 - 1}"),
    (["combine", "a"], "--weights", ["1,nan", "inf", "1,-inf"], "finite numbers"),
    (["apply", "b", "a"], "--weights", ["nan", "1,inf"], "finite numbers"),
    (["convert", "a", "--to", "kohya"], "--rank", ["0", "99999999999"], "an integer from 1 to 1048576"),
    (["convert", "a", "--to", "kohya"], "--conv-rank", ["0", "99999999999"], "an integer from 1 to 1048576"),
]


@pytest.mark.parametrize("prefix, option, values, words", RANGE_CASES, ids=[f"{c[0][0]}{c[1]}" for c in RANGE_CASES])
def test_cli_numeric_options_are_range_checked(capsys, tmp_path, prefix, option, values, words):
    for value in values:
        line = _argparse_error(capsys, *prefix, "-o", str(tmp_path / "o"), f"{option}={value}")
        assert line.startswith(f"lorafuse {prefix[0]}: error: argument {option}: "), line
        assert words in line and value in line, line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kwargs, words", [
    (dict(rank=2**20 + 1), "rank must be <= 1048576, got 1048577"),
    (dict(rank=99999999999), "rank must be <= 1048576"),
    (dict(rank=0), "rank must be >= 1, got 0"),
    (dict(rank=True), "rank must be an integer from 1 to 1048576, got a bool"),
    (dict(rank=2.0), "rank must be an integer from 1 to 1048576, got 2.0"),
    (dict(rank=2, max_rank=2**21), "max_rank must be <= 1048576"),
    (dict(sv_ratio=float("nan")), "sv_ratio must be a finite number >= 1, got nan"),
    (dict(sv_ratio=float("inf")), "sv_ratio must be a finite number >= 1, got inf"),
    (dict(sv_ratio=True), "sv_ratio must be a finite number >= 1, got True"),
    (dict(sv_fro=0.0), "sv_fro must be a finite number > 0 and <= 1, got 0.0"),
    (dict(sv_fro=float("nan")), "sv_fro must be a finite number > 0 and <= 1, got nan"),
    (dict(sv_cumulative=1.5), "sv_cumulative must be a finite number > 0 and <= 1, got 1.5"),
    (dict(sv_cumulative="0.5"), "sv_cumulative must be a finite number > 0 and <= 1, got '0.5'"),
])
def test_rank_rule_ranges(kwargs, words):
    with pytest.raises(LorafuseValueError) as e:
        RankRule(**kwargs)
    assert words in str(e.value)


def test_rank_rule_accepts_numpy_integers():
    assert RankRule(rank=np.int64(4), max_rank=np.int32(3)).choose(np.ones(8)) == 3


@pytest.fixture
def small_adapter(tmp_path):
    """A PEFT adapter over modules of shapes (48, 32), (32, 48) and (8, 48): full ranks 32, 32 and 8."""
    specs = [Spec("model.layers.0.self_attn.q_proj.weight", "F32", (48, 32)),
             Spec("model.layers.0.self_attn.o_proj.weight", "F32", (32, 48)),
             Spec("model.layers.0.self_attn.k_proj.weight", "F32", (8, 48))]
    base = write_checkpoint(tmp_path / "base", specs)
    factors = write_peft_adapter(tmp_path / "adapter", specs, ["q_proj", "o_proj", "k_proj"], r=6, alpha=12, seed=5)
    return base, tmp_path / "adapter", factors


@pytest.mark.parametrize("kwargs, words", [
    (dict(rank=99999999999), "rank must be <= 1048576, got 99999999999"),
    (dict(conv_rank=2**20 + 1, rank=2), "conv_rank must be <= 1048576"),
    (dict(rank=0), "rank must be >= 1, got 0"),
    (dict(rank=np.float64(3.0)), "rank must be an integer"),
    (dict(method="ties_svd", density=float("nan")), "density must be a finite number > 0 and <= 1, got nan"),
    (dict(method="ties_svd", density=1.5), "density must be a finite number > 0 and <= 1, got 1.5"),
    (dict(seed=-1), "seed must be >= 0, got -1"),
    (dict(seed=2**64), f"seed must be <= {2**64 - 1}"),
    (dict(seed=True), "seed must be an integer"),
    (dict(weights=[float("inf")]), "weights must be finite numbers"),
    (dict(weights=[True]), "weights must be finite numbers, got True"),
])
def test_combine_ranges(small_adapter, kwargs, words):
    _, adapter, _ = small_adapter
    with pytest.raises(LorafuseValueError) as e:
        lorafuse.combine([adapter], **kwargs)
    assert words in str(e.value)


@pytest.mark.parametrize("kwargs, words", [
    (dict(oversample=-1), "oversample must be >= 0"),
    (dict(oversample=2**20 + 1), "oversample must be <= 1048576"),
    (dict(oversample=2**63), "oversample must be <= 1048576"),
    (dict(power_iters=101), "power_iters must be <= 100, got 101"),
    (dict(power_iters=-1), "power_iters must be >= 0"),
    (dict(seed=-5), "seed must be >= 0, got -5"),
    (dict(seed=1.5), "seed must be an integer"),
])
def test_extract_ranges(small_adapter, kwargs, words):
    base, _, _ = small_adapter
    with pytest.raises(LorafuseValueError) as e:
        extract(base, base, RankRule(rank=2), **kwargs)
    assert words in str(e.value)


def test_core_entry_points_refuse_absurd_numbers():
    b, a = np.ones((8, 2), np.float32), np.ones((2, 8), np.float32)
    d = np.ones((8, 8), np.float32)
    for call, words in [
        (lambda: _core.factored_svd([("m", b, a)], [2**20 + 1]), "m: rank must be <= 1048576"),
        (lambda: _core.factored_svd([("m", b, a)], [2**70]), "m: rank must be <= 1048576"),
        (lambda: _core.dense_svd([("m", d)], [2**40]), "m: rank must be <= 1048576"),
        (lambda: _core.dense_svd([("m", d)], [1], oversample=2**62), "oversample must be <= 1048576"),
        (lambda: _core.factored_svd([("m", b, a)], [1], power_iters=10**6), "power_iters must be <= 100"),
        (lambda: _core.extract_svd([("m", d, "F32", d, "F32")], [2**62]), "m: rank must be <= 1048576"),
        (lambda: _core.extract_svd([("m", d, "F32", d, "F32")], [1], oversample=2**63 - 1),
         "oversample must be <= 1048576"),
        (lambda: _core.factored_svd_is_exact(8, 8, 2, 2**62, "auto", 10), "rank must be <= 1048576"),
        (lambda: _core.dense_svd_is_exact(8, 8, 1, 2**63 - 1), "oversample must be <= 1048576"),
        (lambda: _core.task_merge([("m", [d])], [[float("nan")]]), "m: weight 0 must be finite, got nan"),
        (lambda: _core.task_merge([("m", [d])], [[1.0]], prune="magnitude", density=float("inf")),
         "density must be >= 0 (a finite number), got inf"),
    ]:
        with pytest.raises(LorafuseValueError) as e:
            call()
        assert words in str(e.value)


def _delta(factors: dict[str, tuple[np.ndarray, np.ndarray]], module: str, scale: float) -> np.ndarray:
    a, b = factors[module]
    return scale * b.astype(np.float64) @ a.astype(np.float64)


def test_huge_rank_is_capped_at_each_modules_full_rank(small_adapter, tmp_path):
    """rank 2^20 (allowed): every module gets min(out, in) columns, exact, nothing padded (kohya's rule)."""
    base, adapter, factors = small_adapter
    full = {"model.layers.0.self_attn.q_proj": 32, "model.layers.0.self_attn.o_proj": 32,
            "model.layers.0.self_attn.k_proj": 8}
    stacked = lorafuse.combine([adapter, adapter], [1.0, -0.5], method="svd", rank=2**20)
    assert {n: u.rank for n, u in stacked.updates.items()} == full  # min(out, in), as kohya: never 2^20
    for n, u in stacked.updates.items():
        b, a = u.stored_factors(1)
        np.testing.assert_allclose(u.scale * b.astype(np.float64) @ a, 0.5 * _delta(factors, n, 2.0), atol=1e-5)
    eight = lorafuse.combine([adapter] * 8, method="svd", rank=2**20, exact=True)  # stacked rank 48 > 32: dense
    assert {n: u.rank for n, u in eight.updates.items()} == full
    for n, u in eight.updates.items():
        b, a = u.stored_factors(1)
        np.testing.assert_allclose(b.astype(np.float64) @ a, 8 * _delta(factors, n, 2.0), atol=1e-4)
    resized, report = resize(adapter, RankRule(rank=2**20))
    assert [m.rank_out for m in report] == [6, 6, 6]
    with pytest.raises(UnsupportedError, match="no module .*differs"):  # identical: nothing to extract
        extract(base, base, RankRule(rank=2**20))
    # an extraction against a really different model: the full rank, the exact difference
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    (tuned / "config.json").write_text(json.dumps({"model_type": "llama"}))
    w = load_file(str(base / "model.safetensors"))
    rng = np.random.default_rng(9)
    moved = {k: (v + rng.standard_normal(v.shape).astype(np.float32)) for k, v in w.items()}
    save_file(moved, str(tuned / "model.safetensors"))
    res = extract(base, tuned, RankRule(rank=2**20))
    assert {m.name: m.rank for m in res.modules} == full
    for n, u in res.adapter.updates.items():
        b, a = u.stored_factors(1)
        key = n + ".weight"
        np.testing.assert_allclose(b.astype(np.float64) @ a, moved[key].astype(np.float64) - w[key], atol=1e-4)
