"""The portable core's variants side by side: the same core work under each one this CPU runs.

The wheel carries the core built for generic x86-64, x86-64-v3 (AVX2) and x86-64-v4 (AVX-512)
and loads the best (lorafuse/_core.py); LORAFUSE_ISA forces one. Each timed run is a fresh
child process forced onto one variant; variants alternate, and each figure is the median of
--repeat runs with its spread. Work per run: rounding 256 MB of float32 to BF16, the exact
factored SVD of 8 stacked rank-256 modules (2048 x 2048) to rank 32, and a randomized
extract of one 2048 x 2048 difference to rank 32, and apply's fused merge (merge_batch) of eight bf16
5632 x 2048 weights with a rank-16 update, in memory (176 MiB in, 176 MiB out).

    python benchmarks/bench_isa.py [--repeat 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_run_header  # noqa: E402

WORK = r"""
import json, sys, time
import numpy as np
from lorafuse import _core
threads = int(sys.argv[1])
rng = np.random.default_rng(0)
x = rng.standard_normal(64 << 20).astype(np.float32)
items = [(f"m{i}", rng.standard_normal((2048, 256)).astype(np.float32),
          rng.standard_normal((256, 2048)).astype(np.float32)) for i in range(8)]
w = rng.standard_normal((2048, 2048)).astype(np.float32)
from lorafuse.backends.jobs import LowRankStage, MergeJob
stage = [LowRankStage((rng.standard_normal((5632, 16)) * 0.01).astype(np.float32),
                      rng.standard_normal((16, 2048)).astype(np.float32))]
bases = [rng.integers(0x3c00, 0x3f80, size=(5632, 2048), dtype=np.uint16) for _ in range(8)]
outs = [np.ones_like(b) for b in bases]  # written once: the timed merge does not fault its pages in
jobs = [MergeJob(f"w{i}", b, "BF16", o, "BF16", stage) for i, (b, o) in enumerate(zip(bases, outs))]
t = [time.perf_counter()]
_core.from_float32(x, "BF16", threads); t.append(time.perf_counter())
_core.factored_svd(items, [32] * 8, "B", threads); t.append(time.perf_counter())
_core.extract_svd([("e", np.zeros_like(w), "F32", w, "F32")], [32], 10, 2, 0, threads); t.append(time.perf_counter())
_core.merge_batch(jobs, threads); t.append(time.perf_counter())
print(json.dumps({"isa": _core.isa, "bf16 256 MB": t[1] - t[0], "factored svd": t[2] - t[1], "extract": t[3] - t[2],
                  "merge 176 MiB bf16 r16": t[4] - t[3]}))
"""


def variants() -> list[str]:
    from lorafuse import _core

    features = _core.cpu_features()
    found = [v for v in ("generic", "avx2", "avx512", "native")
             if subprocess.run([sys.executable, "-c", "import lorafuse._core"], env=dict(os.environ, LORAFUSE_ISA=v),
                               capture_output=True).returncode == 0]
    return [v for v in found if v in ("generic", "native") or features.get(v)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=5, help="timed runs per variant, alternating (default 5)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="core threads (default: all cores)")
    args = p.parse_args()
    print_run_header("bench_isa: the core's variants on the same work", sys.argv[1:])
    names = variants()
    runs: dict[str, dict[str, list[float]]] = {v: {} for v in names}
    for _ in range(args.repeat):
        for v in names:
            out = subprocess.run([sys.executable, "-c", WORK, str(args.threads)], env=dict(os.environ, LORAFUSE_ISA=v),
                                 capture_output=True, text=True, check=True).stdout
            result = json.loads(out)
            assert result.pop("isa") == v
            for k, s in result.items():
                runs[v].setdefault(k, []).append(s)
    base = names[0]
    cols = list(runs[base])
    print(f"{'variant':<9}" + "".join(f"{c + ' (median, spread)':>34}" for c in cols))
    for v in names:
        cells = []
        for c in cols:
            xs = runs[v][c]
            ratio = statistics.median(runs[base][c]) / statistics.median(xs)
            cells.append(f"{statistics.median(xs):.3f} s ({min(xs):.3f}-{max(xs):.3f}) {ratio:4.2f}x")
        print(f"{v:<9}" + "".join(f"{cell:>34}" for cell in cells))
    print(f"(ratios: speed-up over {base}; median of {args.repeat} alternating runs, a fresh process each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
