"""Smoke run of every fuzz target (tests/fuzz): 10,000 inputs each, coverage-guided by atheris.

Each target runs in a child process (atheris takes the process over) with the hostile corpus
and valid files as seeds and a fixed libFuzzer seed, so a run is repeatable. A target fails on
any exception that is not a lorafuse error, a crash, a 10-second input or 2 GB of memory.
Longer campaigns: see tests/fuzz/run_fuzz.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

import lorafuse  # noqa: E402

RUN_FUZZ = Path(__file__).resolve().parent / "fuzz" / "run_fuzz.py"
TARGETS = ("safetensors", "checkpoint", "peft", "kohya", "detect")
RUNS = 10_000


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_runs_clean(target, tmp_path):
    # The child imports the same lorafuse as this process (a source tree on sys.path, or the install).
    package_root = str(Path(lorafuse.__file__).parent.parent)  # not resolved: may be a link farm
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(RUN_FUZZ), target, "--runs", str(RUNS), "--artifacts", str(tmp_path), "--", "-seed=1"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"fuzz target {target} found something:\n{out[-6000:]}"
    found = re.search(rf"^{target}\s+(\d+) inputs", proc.stdout, re.MULTILINE)
    assert found, out[-3000:]
    assert int(found.group(1)) >= RUNS, out[-3000:]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-"))]
