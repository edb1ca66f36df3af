"""combine's peak memory is bounded by a group of modules, not by the number of adapters (issue #12).

`lorafuse combine --method svd --rank 32` over 40 and over 400 one-layer rank-16 PEFT adapters
(one 4096 x 4096 module, 0.5 MB each: 20 MB and 200 MB of inputs, stacked ranks 640 and 6400) runs
in a child process; its own peak RSS (ru_maxrss from wait4: anonymous memory and the mapped pages of
the inputs) may grow by at most 150 MB from 40 to 400 adapters (before the streaming loop: +680 MB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import lorafuse

SIZE, RANK = 4096, 16
KEY = "base_model.model.model.layers.0.self_attn.q_proj"
MODULE = "model.layers.0.self_attn.q_proj"
MiB = 1 << 20


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("memory")
    rng = np.random.default_rng(12)
    dirs = []
    for i in range(400):
        d = tmp / f"a{i:03d}"
        d.mkdir()
        a = rng.standard_normal((RANK, SIZE), dtype=np.float32) * np.float32(0.02)
        b = rng.standard_normal((SIZE, RANK), dtype=np.float32) * np.float32(0.02)
        save_file({KEY + ".lora_A.weight": a, KEY + ".lora_B.weight": b}, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": RANK, "lora_alpha": RANK, "target_modules": ["q_proj"]}))
        dirs.append(d)
    return dirs


def peak_rss(args: list[str]) -> int:
    """Run `python -m lorafuse ARGS` and return its own peak RSS in bytes (wait4's ru_maxrss)."""
    proc = subprocess.Popen([sys.executable, "-m", "lorafuse", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()  # type: ignore[union-attr]
    proc.stdout.close()  # type: ignore[union-attr]
    proc.stderr.close()  # type: ignore[union-attr]
    assert proc.returncode == 0, err
    assert f"combined {len(args) - 7} adapters with svd: 1 module, rank 32" in out
    return usage.ru_maxrss * 1024


def test_peak_memory_does_not_grow_with_the_number_of_adapters(many: list[Path], tmp_path: Path) -> None:
    def run(n: int) -> int:
        return peak_rss(["combine", *map(str, many[:n]), "--method", "svd", "--rank", "32", "-o",
                         str(tmp_path / f"out{n}")])

    small, large = run(40), run(400)
    inputs = sum((d / "adapter_model.safetensors").stat().st_size for d in many)
    assert inputs > 190 * MiB  # what a loop holding every adapter's factors would add
    assert large - small <= 150 * MiB, f"peak RSS {small / MiB:.0f} MiB (40 adapters), {large / MiB:.0f} MiB (400)"

    out = lorafuse.load(tmp_path / "out400")
    assert list(out.updates) == [MODULE]
    assert out.updates[MODULE].rank == 32 and out.updates[MODULE].scale == 1.0
