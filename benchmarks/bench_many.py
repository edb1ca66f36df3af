#!/usr/bin/env python3
"""Benchmark ``lorafuse combine --from-list`` over many adapters (issue #15): the streamed engine.

The adapters: rank-16 PEFT LoRAs on one decoder layer of TinyLlama shapes (q, k, v, o, gate, up, down;
hidden 2048, intermediate 5632, 4 KV heads of 64), factors stored bf16 (about 1.1 MiB each), made by this
script once into --dir and reused by later runs (the largest n is made; smaller n take the first ones).
Adapter j: B_j = U C_j + noise, A_j = C_j^T V^T + noise, with U S V^T a shared part of decaying spectrum
(0.85^i, i < 32) and C_j a random 32 x 16 mixing: their average is the shared part plus the adapters' own
noise (the data model of issue #15's acceptance).

For each n (default 10, 100, 1000): a list file (weights 1/n), then ``--repeat`` runs (default 5; 3 at
n >= 1000) of the combine, each in its own child process (``lorafuse combine --from-list LIST --rank 16
--passes P -o OUT``, through combine_to, which reports the summary: adapters, passes, bytes read, time,
peak RSS of the child), alternating with ``cat`` of the same files to /dev/null (the time to read the same
bytes from the page cache: the I/O floor; with ``--cold`` the page cache is emptied before every timed run,
lorafuse's and cat's, so both read from the disk; with ``--read-mbps M`` both also run in a cgroup whose reads
from that disk are limited to M MB/s, a slower disk than this machine's: the I/O-bound case). Reported: the
median wall time (and spread), time per adapter (wall / n, and per adapter-pass), peak RSS, the ratio to
``cat``; and, once per n, the relative error ||D - D_k||_F / ||D||_F of q_proj against the float64 optimum
(numpy: D summed in float64 from the stored factors, its exact SVD), for --passes 1, 2 and 3 and for
--passes 2 --oversample 120 (ERROR_RUNS), with the engine's own a-posteriori estimate.

Run: ``python benchmarks/bench_many.py`` (n = 10, 100, 1000), ``--n 10 100`` for fewer, ``--n 10000`` for
the issue's largest case (12 GB of adapters in --dir, and its float64 optimum takes a while).

``--engine ray`` (n = 1000 unless --n says otherwise; needs ``pip install 'lorafuse[ray]'``): the same list
combined by the local streamed engine and by engine 'ray' on a local Ray of --ray-cpus CPUs (default 2),
alternating, --repeat times each, with --dtype fp32 outputs so that the comparison sees the engines and not
the bf16 rounding. Reported: each engine's median time inside combine_to (Ray's start, timed apart, excluded),
the overhead ratio ray / local of the medians and of the fastest runs (other work on the machine slows the
local engine's two BLAS threads far more than Ray's one-thread tasks: the load average is recorded), the
ratio with Ray's start, and the largest relative difference ||D_ray - D_local||_F / ||D_local||_F over the
layer's modules (issue #15: within 1e-3).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HIDDEN, INTER, KV = 2048, 5632, 256
MODULES = {  # name -> (out, in)
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV, HIDDEN), "self_attn.v_proj": (KV, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}
PREFIX = "base_model.model.model.layers.0."
RANK, SHARED, DECAY, NOISE = 16, 32, 0.85, 0.5
# the q_proj error runs: label -> (passes, oversample; None: the default, 10)
ERROR_RUNS = {"1 pass": (1, None), "2 passes": (2, None), "3 passes": (3, None), "2 passes, oversample 120": (2, 120)}

CHILD = r"""
import json, sys, time
from lorafuse.ops.combine import CombineOptions, combine_to
from lorafuse.ops.combine.many import read_list
engine, dtype = sys.argv[6], (None if sys.argv[7] == "-" else sys.argv[7])
oversample = None if sys.argv[9] == "-" else int(sys.argv[9])
init = 0.0
if engine == "ray":  # a local Ray of argv[8] CPUs, started (and timed) before the combination
    import ray
    t = time.perf_counter()
    ray.init(num_cpus=int(sys.argv[8]), include_dashboard=False)
    init = time.perf_counter() - t
sources, weights = read_list(sys.argv[1])
t = time.perf_counter()
wide = {} if oversample is None else {"oversample": oversample}  # (a lorafuse without the option runs the rest)
report = combine_to(sources, weights, CombineOptions(rank=int(sys.argv[3]), passes=int(sys.argv[4]),
                    engine=engine, threads=int(sys.argv[5]), dtype=dtype, **wide), sys.argv[2], overwrite=True)
s = report.summary
print(json.dumps({"wall": time.perf_counter() - t, "passes": s.passes, "adapters": s.adapters,
                  "bytes_read": s.bytes_read, "peak_rss": s.peak_rss, "errors": s.errors, "init": init,
                  "shards": s.shards, "workers": s.workers}))
"""


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def make_adapters(root: Path, n: int) -> list[Path]:
    """The first n adapters under root, making the missing ones (deterministic per index)."""
    from lorafuse.io.safetensors import save_file

    root.mkdir(parents=True, exist_ok=True)
    g0 = np.random.default_rng(0)
    spectrum = np.sqrt(DECAY ** np.arange(SHARED))
    shared = {m: ((np.linalg.qr(g0.standard_normal((o, SHARED)))[0] * spectrum).astype(np.float32),
                  (np.linalg.qr(g0.standard_normal((i, SHARED)))[0] * spectrum).T.astype(np.float32))
              for m, (o, i) in MODULES.items()}
    paths = []
    start = time.perf_counter()
    made = 0
    for j in range(n):
        p = root / f"a{j:05d}"
        paths.append(p)
        if (p / "adapter_config.json").exists():
            continue
        g = np.random.default_rng(1000 + j)
        p.mkdir(exist_ok=True)
        tensors = {}
        for m, (o, i) in MODULES.items():
            u, v = shared[m]
            c = (g.standard_normal((SHARED, RANK)) / np.sqrt(RANK)).astype(np.float32)
            b = u @ c + np.float32(NOISE / np.sqrt(o)) * g.standard_normal((o, RANK), dtype=np.float32)
            a = c.T @ v + np.float32(NOISE / np.sqrt(i)) * g.standard_normal((RANK, i), dtype=np.float32)
            tensors[f"{PREFIX}{m}.lora_A.weight"] = ("BF16", _bf16(a))
            tensors[f"{PREFIX}{m}.lora_B.weight"] = ("BF16", _bf16(b))
        save_file(tensors, p / "adapter_model.safetensors")
        (p / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": RANK, "lora_alpha": RANK,
            "target_modules": sorted({m.split(".")[-1] for m in MODULES})}))
        made += 1
    if made:
        print(f"made {made} adapters in {time.perf_counter() - start:.1f} s under {root}", flush=True)
    return paths


def files_of(paths: list[Path]) -> list[str]:
    return [str(p / f) for p in paths for f in ("adapter_config.json", "adapter_model.safetensors")]


# --read-mbps: the cgroup whose members' reads from the adapters' disk are limited (None: no limit)
_SLOW: Path | None = None


def _join_slow() -> None:
    """In a child before exec (--read-mbps): join the read-limited cgroup."""
    if _SLOW is not None:
        (_SLOW / "cgroup.procs").write_text(str(os.getpid()))


def limit_reads(folder: Path, mbps: float) -> Path:
    """A cgroup (Linux, root; cgroup v1 blkio or v2 io) whose members read the disk holding `folder` at most
    `mbps` MB/s: a slower disk than this machine's, on which reading, not computing, is what takes the time."""
    st = os.stat(folder)
    dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    if (dev / "partition").exists():  # the throttle is set on the whole disk
        dev = dev.resolve().parent
    majmin = (dev / "dev").read_text().strip()
    rate = int(mbps * 1e6)
    v1 = Path("/sys/fs/cgroup/blkio")
    try:
        if v1.is_dir():
            group = v1 / "lorafuse-bench-slow"
            group.mkdir(exist_ok=True)
            (group / "blkio.throttle.read_bps_device").write_text(f"{majmin} {rate}\n")
        else:
            root = Path("/sys/fs/cgroup")
            (root / "cgroup.subtree_control").write_text("+io\n")
            group = root / "lorafuse-bench-slow"
            group.mkdir(exist_ok=True)
            (group / "io.max").write_text(f"{majmin} rbps={rate}\n")
    except OSError as e:
        raise SystemExit(f"--read-mbps needs a cgroup with a read limit (Linux, as root): {e}") from None
    atexit.register(_remove_group, group)
    return group


def _remove_group(group: Path) -> None:
    """At the script's exit: the read-limited cgroup removed (its members, the timed children, have ended)."""
    try:
        group.rmdir()
    except OSError as e:
        print(f"note: could not remove the cgroup {group}: {e}; remove it with rmdir", file=sys.stderr)


def time_cat(files: list[str]) -> float:
    """Seconds to read the files with cat (xargs batches them), output to /dev/null."""
    t = time.perf_counter()
    subprocess.run(["xargs", "-0", "cat"], input="\0".join(files).encode(), stdout=subprocess.DEVNULL, check=True,
                   preexec_fn=_join_slow)
    return time.perf_counter() - t


def drop_caches() -> None:
    """Empty the page cache (Linux, root): the next read of the adapters comes from the disk (--cold)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
            f.write("1\n")
    except OSError as e:
        raise SystemExit(f"--cold needs to write /proc/sys/vm/drop_caches (Linux, as root): {e}") from None


def run_combine(listing: Path, out: Path, passes: int, threads: int, engine: str = "stream",
                dtype: str | None = None, ray_cpus: int = 2, oversample: int | None = None) -> dict[str, object]:
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, str(listing), str(out), str(RANK), str(passes),
                           str(threads), engine, dtype or "-", str(ray_cpus),
                           "-" if oversample is None else str(oversample)], capture_output=True, text=True,
                          check=False, preexec_fn=_join_slow)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"combine failed:\n{done.stderr}")
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_wall"] = wall
    return result


def q_proj_errors(paths: list[Path], outs: dict[str, Path], reported: dict[str, float]) -> dict[str, tuple[float, ...]]:
    """Per run (ERROR_RUNS' labels): (relative error, ratio to the optimum, the engine's estimate) for q_proj;
    '0': the optimum itself."""
    import lorafuse

    name = "model.layers.0.self_attn.q_proj"
    d = np.zeros(MODULES["self_attn.q_proj"])
    w = 1.0 / len(paths)
    for p in paths:
        u = lorafuse.load(p).updates[name]
        b, a = u.stored_factors()
        d += (w * u.scale) * (b.astype(np.float64) @ a.astype(np.float64))
    s = np.linalg.svd(d, compute_uv=False)
    norm = float(np.linalg.norm(d))
    opt = float(np.sqrt(np.sum(s[RANK:] ** 2))) / norm
    out: dict[str, tuple[float, ...]] = {"0": (opt, 1.0, float("nan"))}
    for passes, o in outs.items():
        got = lorafuse.load(o).updates[name].delta()
        err = float(np.linalg.norm(d - got)) / norm
        out[passes] = (err, err / opt, reported[passes])
    return out


def max_relative_difference(a: Path, b: Path) -> float:
    """max over modules of ||D_a - D_b||_F / ||D_b||_F, D from each output's stored factors in float64."""
    import lorafuse

    x, y = lorafuse.load(a), lorafuse.load(b)
    worst = 0.0
    for name, u in y.updates.items():
        db = np.asarray(u.delta(), dtype=np.float64)
        da = np.asarray(x.updates[name].delta(), dtype=np.float64)
        worst = max(worst, float(np.linalg.norm(da - db) / np.linalg.norm(db)))
    return worst


def compare_ray(args: argparse.Namespace, root: Path, paths_all: list[Path], n: int) -> dict[str, object]:
    """The local streamed engine and engine 'ray' on the same list, alternating; their outputs compared."""
    paths = paths_all[:n]
    listing = root / f"list{n}.txt"
    listing.write_text("".join(f"{p}\n" for p in paths))
    time_cat(files_of(paths))  # warm the page cache
    repeat = args.repeat if args.repeat is not None else 5
    local, on_ray = [], []
    load_before = os.getloadavg()[0]  # other work on the machine slows the engines unevenly (BLAS threads)
    for _ in range(repeat):
        local.append(run_combine(listing, root / f"local{n}", args.passes, args.threads, "stream", "fp32"))
        on_ray.append(run_combine(listing, root / f"ray{n}", args.passes, args.threads, "ray", "fp32",
                                  args.ray_cpus))
    t_local = statistics.median(float(r["wall"]) for r in local)  # type: ignore[arg-type]
    t_ray = statistics.median(float(r["wall"]) for r in on_ray)  # type: ignore[arg-type]
    t_init = statistics.median(float(r["init"]) for r in on_ray)  # type: ignore[arg-type]
    row: dict[str, object] = {
        "n": n, "passes": args.passes, "runs": repeat, "ray_cpus": args.ray_cpus,
        "local_s": t_local, "local_runs": [float(r["wall"]) for r in local],  # type: ignore[arg-type]
        "ray_s": t_ray, "ray_runs": [float(r["wall"]) for r in on_ray],  # type: ignore[arg-type]
        "ray_init_s": t_init, "overhead": t_ray / t_local, "overhead_with_start": (t_ray + t_init) / t_local,
        "overhead_of_minima": min(float(r["wall"]) for r in on_ray) / min(float(r["wall"]) for r in local),  # type: ignore[arg-type]
        "shards": on_ray[0]["shards"], "workers": max(int(r["workers"]) for r in on_ray),  # type: ignore[call-overload]
        "ray_driver_peak_rss_mib": max(int(r["peak_rss"]) for r in on_ray) / 2**20,  # type: ignore[call-overload]
        "local_peak_rss_mib": max(int(r["peak_rss"]) for r in local) / 2**20,  # type: ignore[call-overload]
        "max_relative_difference": max_relative_difference(root / f"ray{n}", root / f"local{n}"),
        "load_average_1min": [load_before, os.getloadavg()[0]],
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", help="adapter counts (default 10 100 1000; 1000 with --engine ray)")
    ap.add_argument("--dir", default="/tmp/lorafuse-bench-many", help="where the adapters are made and kept")
    ap.add_argument("--repeat", type=int, default=None,
                    help="timed runs per n (default 5; 3 at n >= 1000 unless given)")
    ap.add_argument("--passes", type=int, default=2, help="passes of the timed runs (default 2)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--cold", action="store_true",
                    help="empty the page cache before every timed run, lorafuse's and cat's (Linux, root): the "
                    "I/O-bound case, where the first pass and cat read from the disk")
    ap.add_argument("--read-mbps", type=float, default=None,
                    help="run lorafuse and cat in a cgroup whose reads from the adapters' disk are limited to this "
                    "many MB/s (Linux, root; implies --cold): a slower disk (a SATA SSD ~500, network storage "
                    "~100-300), where reading is what takes the time: the I/O-bound case of issue #15")
    ap.add_argument("--no-error", action="store_true", help="skip the q_proj error against the float64 optimum")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--engine", choices=("stream", "ray"), default="stream",
                    help="ray: compare engine 'ray' (a local Ray of --ray-cpus CPUs) with the local engine")
    ap.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray (--engine ray; default 2)")
    args = ap.parse_args()
    if args.n is None:
        args.n = [1000] if args.engine == "ray" else [10, 100, 1000]
    root = Path(args.dir)
    paths_all = make_adapters(root / "adapters", max(args.n))
    if args.read_mbps is not None:
        global _SLOW
        _SLOW = limit_reads(root / "adapters", args.read_mbps)
        args.cold = True
    if args.engine == "ray":
        compared = [compare_ray(args, root, paths_all, n) for n in sorted(args.n)]
        print(f"\n{'n':>6} {'passes':>6} {'local s':>8} {'ray s':>8} {'ray / local':>11} {'of minima':>9} "
              f"{'Ray start s':>11} {'with start':>10} {'shards':>6} {'workers':>7} {'max rel. diff':>13}")
        for r in compared:
            print(f"{r['n']:>6} {r['passes']:>6} {r['local_s']:>8.2f} {r['ray_s']:>8.2f} {r['overhead']:>11.2f} "
                  f"{r['overhead_of_minima']:>9.2f} {r['ray_init_s']:>11.2f} {r['overhead_with_start']:>10.2f} "
                  f"{r['shards']:>6} {r['workers']:>7} {r['max_relative_difference']:>13.2e}")
        if args.json:
            Path(args.json).write_text(json.dumps(compared, indent=1))
        return 0
    rows = []
    for n in sorted(args.n):
        paths = paths_all[:n]
        listing = root / f"list{n}.txt"
        listing.write_text("".join(f"{p}\n" for p in paths))
        files = files_of(paths)
        size = sum(os.path.getsize(f) for f in files)
        time_cat(files)  # warm the page cache
        repeat = args.repeat if args.repeat is not None else (5 if n < 1000 else 3)
        runs, cats = [], []
        for _ in range(repeat):  # alternating: combine, cat, combine, cat, ...
            if args.cold:
                drop_caches()
            runs.append(run_combine(listing, root / f"out{n}", args.passes, args.threads))
            if args.cold:
                drop_caches()
            cats.append(time_cat(files))
        walls = [float(r["process_wall"]) for r in runs]  # type: ignore[arg-type]
        inner = [float(r["wall"]) for r in runs]  # type: ignore[arg-type]
        row: dict[str, object] = {
            "n": n, "bytes": size, "runs": repeat, "passes": args.passes,
            "wall_median": statistics.median(walls), "wall_min": min(walls), "wall_max": max(walls),
            "combine_median": statistics.median(inner),
            "ms_per_adapter": 1e3 * statistics.median(walls) / n,
            "ms_per_adapter_pass": 1e3 * statistics.median(inner) / (n * args.passes),
            "peak_rss_mib": max(int(r["peak_rss"]) for r in runs) / 2**20,  # type: ignore[call-overload]
            "cold": args.cold, "read_mbps": args.read_mbps, "cat_median": statistics.median(cats),
            "ratio_to_cat": statistics.median(walls) / statistics.median(cats),
        }
        if not args.no_error:
            outs, reported = {}, {}
            for label, (passes, over) in ERROR_RUNS.items():
                o = root / f"err{n}_{label}"
                r = run_combine(listing, o, passes, args.threads, oversample=over)
                outs[label] = o
                reported[label] = float(r["errors"]["model.layers.0.self_attn.q_proj"])  # type: ignore[index]
            row["q_proj"] = q_proj_errors(paths, outs, reported)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(f"{'n':>6} {'MiB':>8} {'wall s (median, min..max, runs)':>34} {'ms/adapter':>10} {'ms/ad.pass':>10} "
          f"{'peak RSS MiB':>12} {'cat s':>7} {'x cat':>6}")
    for r in rows:
        print(f"{r['n']:>6} {int(r['bytes']) / 2**20:>8.1f} "  # type: ignore[call-overload]
              f"{r['wall_median']:>10.2f} ({r['wall_min']:.2f}..{r['wall_max']:.2f}) x{r['runs']:<3} "
              f"{r['ms_per_adapter']:>13.2f} {r['ms_per_adapter_pass']:>10.2f} {r['peak_rss_mib']:>12.0f} "
              f"{r['cat_median']:>7.3f} {r['ratio_to_cat']:>6.1f}")
    if not args.no_error:
        print("\nq_proj relative error ||D - D_16||_F / ||D||_F (ratio to the float64 optimum; engine's estimate):")
        for r in rows:
            e = r["q_proj"]  # type: ignore[index]
            cells = [f"optimum {e['0'][0]:.4f}"] + [  # type: ignore[index]
                f"{label} {e[label][0]:.4f} ({e[label][1]:.3f}x; est. {e[label][2]:.4f})"  # type: ignore[index]
                for label in ERROR_RUNS]
            print(f"  n = {r['n']}: " + ", ".join(cells))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
