"""apply streams: it merges a 554 MiB checkpoint while allowed 256 MiB of memory.

The limit is RLIMIT_DATA, set in the child before exec. Since Linux 4.7 it caps the
heap and every private writable mapping (malloc'd arrays, thread stacks), but not
shared or read-only file mappings, which is how lorafuse reads checkpoints
(mmap ACCESS_READ): the first test checks exactly that, with lorafuse's own reader,
so that the second one means what it says. The child runs with one OpenBLAS thread
and `--threads 2`, so that the thread stacks it maps do not depend on the machine's
core count.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from fault_tools import llama_specs, lorafuse_cmd, write_checkpoint, write_peft_adapter
from safetensors import safe_open

MIB = 1 << 20
LIMIT = 256 * MIB
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA semantics are Linux's")


def _limit_data() -> None:
    resource.setrlimit(resource.RLIMIT_DATA, (LIMIT, LIMIT))


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A 554 MiB BF16 llama-shaped checkpoint in 2 shards, and an r=16 adapter on every projection."""
    root = tmp_path_factory.mktemp("big")
    specs = llama_specs(layers=5, hidden=2048, inter=5632, vocab=8192)
    base = write_checkpoint(root / "base", specs, shards=2)
    factors = write_peft_adapter(root / "adapter", specs, TARGETS, r=16, alpha=32)
    size = sum(s.nbytes for s in specs)
    assert size > 2 * LIMIT
    yield base, root / "adapter", specs, factors, size
    shutil.rmtree(root, ignore_errors=True)  # do not keep a gigabyte among pytest's retained folders


_PROBE = textwrap.dedent("""
    import errno, json, mmap, os, sys
    import numpy as np
    from lorafuse.io.safetensors import SafetensorsFile

    def status():
        return {k: int(v.split()[0]) * 1024 for k, v in (l.split(":") for l in open("/proc/self/status"))
                if k in ("VmData", "VmRSS", "RssFile")}

    shard, heap = sys.argv[1], int(sys.argv[2])
    r = {}
    try:
        a = np.ones(heap, dtype=np.uint8)
        r["heap"] = "allocated"
        del a
    except MemoryError:
        r["heap"] = "MemoryError"
    with SafetensorsFile(shard) as f:  # lorafuse's map of the shard; read every page of it
        r["checksum"] = sum(int(f.raw(n).reshape(-1).view(np.uint8)[::4096].sum()) for n in f.keys())
        r["mapped"] = status()
    with open(shard, "rb") as fh:  # a private writable map of the same file counts
        try:
            mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            r["private_map"] = "mapped"
        except OSError as e:
            r["private_map"] = errno.errorcode.get(e.errno, str(e.errno))
    print(json.dumps(r))
""")


def test_the_limit_counts_the_heap_but_not_read_only_file_maps(big):
    base, _, _, _, size = big
    shard = max(base.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    assert shard.stat().st_size > LIMIT
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(shard), str(shard.stat().st_size)], capture_output=True,
                          text=True, env=ENV, preexec_fn=_limit_data, timeout=120)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["heap"] == "MemoryError"  # the limit is enforced on the heap ...
    assert r["private_map"] == "ENOMEM"  # ... and on private writable file maps,
    # but lorafuse's read-only map of a larger file is not, even with all its pages resident.
    assert r["mapped"]["VmData"] < LIMIT < r["mapped"]["RssFile"]


def _peaks(pid: int, peaks: dict[str, int]) -> None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmData", "VmHWM", "RssAnon", "RssFile"):
                    peaks[key] = max(peaks.get(key, 0), int(value.split()[0]) * 1024)
    except (OSError, ValueError, IndexError):
        pass


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float64 -> BF16 bits, round to nearest even (torch as the reference)."""
    return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _bits_to_f64(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def test_apply_under_a_memory_limit_smaller_than_the_checkpoint(big, tmp_path):
    base, adapter, specs, factors, size = big
    out = tmp_path / "merged"
    log = tmp_path / "stderr.txt"
    peaks: dict[str, int] = {}
    start = time.monotonic()
    with open(log, "w") as err:
        proc = subprocess.Popen(lorafuse_cmd(base, adapter, "-o", out, "--threads", "2"), stderr=err, env=ENV,
                                preexec_fn=_limit_data)
        while proc.poll() is None:
            _peaks(proc.pid, peaks)
            time.sleep(0.005)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, log.read_text()
    # VmHWM is the resident peak of the command itself (getrusage's ru_maxrss would also count what
    # the child shared with this process between fork and exec); sampled until just before it exits.
    print(f"\napply of {size / MIB:.0f} MiB under RLIMIT_DATA {LIMIT / MIB:.0f} MiB: {seconds:.2f} s; peaks: "
          + ", ".join(f"{k} {v / MIB:.0f} MiB" for k, v in sorted(peaks.items())))
    assert 0 < peaks["VmData"] <= LIMIT
    assert peaks["VmHWM"] < LIMIT  # resident memory, mapped file pages included, stays below the limit too

    # Every tensor is there, untouched ones byte for byte; merged ones equal numpy's W + 2 * B @ A
    # rounded once to BF16 (float32 arithmetic may round an entry at a tie the other way).
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert index == json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    checked = ["model.layers.0.self_attn.q_proj.weight", "model.layers.2.mlp.gate_proj.weight",
               "model.layers.4.mlp.down_proj.weight", "model.layers.4.input_layernorm.weight", "lm_head.weight"]
    for name in checked:
        with safe_open(str(out / index[name]), "pt") as f:
            got = f.get_tensor(name).view(torch.int16).numpy().view(np.uint16)
        with safe_open(str(base / index[name]), "pt") as f:
            w = f.get_tensor(name).view(torch.int16).numpy().view(np.uint16)
        module = name.removesuffix(".weight")
        if module not in factors:
            np.testing.assert_array_equal(got, w, err_msg=name)
            continue
        a, b = (x.astype(np.float64) for x in factors[module])
        ref = _bits_to_f64(w) + 2.0 * (b @ a)
        # Rounding once to BF16 is off by at most half a unit (2**-8 relatively); float32 arithmetic
        # adds a few float32 epsilons of the terms' magnitudes (it matters where they cancel).
        terms = np.abs(_bits_to_f64(w)) + 2.0 * (np.abs(b) @ np.abs(a))
        err = np.abs(_bits_to_f64(got) - ref)
        assert (err <= 2.0**-8 * np.abs(ref) + 16 * 2.0**-24 * terms).all(), f"{name}: max error {err.max():.3g}"
        assert (got == _bf16_bits(ref)).mean() > 0.999, f"{name} is not W + 2 B A rounded once"
        assert (got != w).mean() > 0.5, f"{name} was not merged"
    assert {s.name for s in specs} == set(index)
