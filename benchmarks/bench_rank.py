#!/usr/bin/env python3
"""Benchmark ``lorafuse resize`` and ``lorafuse extract`` against the dense-SVD scripts people use.

Both tables use the linear modules (q, k, v, o, gate, up, down) of a TinyLlama-1.1B-shaped
Llama (hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads). Every tool runs in its
own child process, measured with GNU time (peak RSS) like bench_apply.py: lorafuse --repeat times
(default 5) and the dense tool --peer-repeat times (default 1, since a dense run takes minutes at
full size: the peer's single run is reported; pass --peer-repeat 5 for a median). With more than one
dense run the two alternate (lorafuse, dense, lorafuse, dense, ...; the tool with more runs starts
alone), and each timed run is preceded (untimed) by removing the outputs, ``sync`` and reading the
inputs once (warm page cache), as bench_apply.py does. Host paging makes single timings bimodal, so
the tables give the median wall and CPU time of each tool's runs with the spread (min..max) and the
count, never the best run; the ratios are ratios of medians, the peak RSS is the worst run's, and
lorafuse's ``--json`` report is its median run's. The dense run, which comes last, removes lorafuse's
output; one more lorafuse run, untimed, writes it again for the checks.

Table 1 -- resize. A rank-64 PEFT LoRA (lora_alpha 128, A and B ~ N(0, 0.02^2), float32, non-zero)
reduced to rank 16:

* ``lorafuse resize ADAPTER --rank 16 -o OUT --threads N --json``, end to end (read, compute, write);
* dense, the approach of kohya's ``networks/resize_lora.py``: load the whole adapter
  (``safetensors.torch.load_file``), then per module the dense delta ``D = B @ A * scale``
  (torch float32), ``U, S, Vh = torch.linalg.svd(D)`` (kohya's call, i.e. full_matrices=True),
  ``lora_B = U[:, :16] * S[:16]``, ``lora_A = Vh[:16]``, and ``save_file`` of the result as a
  PEFT adapter (scale 1) -- same input files.

  Check on a few modules: both results' errors ``||X - D||_F`` against the float64 optimum
  ``||D_16 - D||_F`` (numpy SVD of the float64 dense delta), which must agree to 1e-5 relative.
  ``||X - D_16||_F / ||D_16||_F`` is shown too, for information only: with random factors
  s_17 / s_16 is 0.98-0.999, so D_16 itself moves by ~1e-4 under float32 rounding of D (the
  dense path's input). Target: dense / lorafuse >= 100x.

Table 2 -- extract. Two bf16 checkpoints: a random base (N(0, 0.02^2), norms ones) and a
"fine-tuned" one, identical except on the 7 x layers linear weights, where
``W_ft = bf16(W_base + U diag(s) V^T + E)``:

* ``U`` (out x 64), ``V`` (in x 64) random orthonormal, ``s`` geometric from s_1 down to
  s_1 * 0.01 over the 64 directions, scaled so that the low-rank part has RMS 1e-3 (5% of the
  weights' 0.02): the decaying head that fine-tuning deltas show;
* ``E`` ~ N(0, (1e-4)^2) dense, plus the rounding of the fine-tuned weights to bf16 (another
  ~4e-5 RMS): a full-rank floor, as in real fine-tunes stored in bf16.

Why: a rank-32 extraction is only a fair test of accuracy if the spectrum decays past rank
32 and does not stop dead at a small rank. Here s_33 / s_32 = 0.93, s_42 / s_32 = 0.48 (the
randomized SVD's sketch edge), and the floor sits about 5-10x under s_32, so the optimal
relative error is about 0.14 and an inaccurate subspace shows up; on a flat spectrum (pure
noise) every method's error is ~1 and the ratio says nothing, and on an exact rank-64 product
with no floor any method that finds the span is exact. Options: --ft-rank/--ft-rms/--ft-decay/--ft-noise.

* ``lorafuse extract BASE FT --rank 32 -o OUT --threads N --json --no-progress`` (randomized
  SVD streamed from both memory-mapped checkpoints, embeddings skipped by default);
* dense, the approach of mergekit's LoRA extraction: per module both tensors loaded as float32
  torch (``safe_open``), ``D = ft - base``, ``U, S, Vh = torch.linalg.svd(D, full_matrices=False)``,
  truncate to 32 (sqrt(S) on each factor), ``save_file`` as a PEFT adapter -- the same
  7 x layers modules (the embeddings and lm_head are unchanged, so neither tool needs them).

  Quality: for every extracted module, each tool's relative error ``||D - B A||_F / ||D||_F``
  is measured in float64 from the files, and divided by the optimal relative error
  ``sqrt(sum_{i>32} s_i^2) / ||D||_F`` from D's full spectrum (float64; the squared singular
  values are taken as the eigenvalues of the Gram matrix, checked against ``np.linalg.svd`` on
  one module). Mean and max over modules are printed; target: lorafuse max <= 1.01x,
  dense / lorafuse >= 10x. lorafuse's own reported rel_error is compared with the measured one.

The dense paths take minutes at full size (a full SVD of a 2048 x 5632 matrix takes seconds on
a few cores). ``--dense-layers N`` runs them on the first N layers only (same input files; the
other modules are not touched) and extrapolates to all layers: import (and, for resize, the
load of the whole file) as measured, the per-module work and the save x layers/N, from the
phases of the dense tool's median run. The output says so; the peak RSS shown is the N-layer run's.

If ``lorafuse extract`` cannot run because the C++ kernel ``lorafuse._core.extract_svd`` is not
built yet, its row says so and the rest (inputs, dense, reference) still runs. A MISS of a
target does not make the exit status non-zero; a failing tool or a wrong result does.

Quick check:  python3 benchmarks/bench_rank.py --layers 2
Full size:    python3 benchmarks/bench_rank.py   (dense paths ~10 min each on 2 cores; ~7 GB of disk)
              python3 benchmarks/bench_rank.py --dense-layers 2   (dense paths extrapolated)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    LLAMA_LINEAR_MODULES,
    TensorSpec,
    build_derived_checkpoint,
    build_llama_checkpoint,
    build_lora_adapter,
    checkpoint_weight_map,
    find_peft_adapter_dir,
    finish_workdir,
    fmt_mib,
    fmt_runs,
    llama_config,
    load_tensor,
    make_workdir,
    peft_lora_delta64,
    peft_lora_scale,
    print_run_header,
    tree_bytes,
)
from bench_apply import (  # noqa: E402
    MIN_RUNS,
    Tool,
    describe_runs,
    resolve_lorafuse,
    run_with_peer,
    warn_few_runs,
)

KOHYA_CHILD_COMMAND = "_kohya-resize-child"  # hidden first argument: run the dense resize in this process
MERGEKIT_CHILD_COMMAND = "_mergekit-extract-child"  # hidden first argument: run the dense extract here
PHASES_PREFIX = "DENSE_PHASES "

TARGET_RESIZE = 100.0  # dense resize wall / lorafuse resize wall must be >= this
TARGET_EXTRACT = 10.0  # dense extract wall / lorafuse extract wall must be >= this
TARGET_EXTRACT_ERR = 1.01  # lorafuse rel. error / optimal rel. error, max over modules, must be <= this
RESIZE_ERR_TOL = 1e-5  # | ||X - D|| / ||D_k - D|| - 1 | for both resize results
REPORTED_ERR_TOL = 1e-3  # lorafuse's reported rel_error vs the measured one, relative

FACTOR_STD = 0.02
INPUTS_STAMP = "inputs.json"
_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def _layers(n: int) -> str:
    return f"{n} layer" + ("" if n == 1 else "s")


def _layer(name: str) -> int:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else -1


def _kind(name: str) -> str:
    return name.removesuffix(".weight").rsplit(".", 1)[-1]


def _module_order(name: str) -> tuple[int, int]:
    kind = _kind(name)
    return _layer(name), LLAMA_LINEAR_MODULES.index(kind) if kind in LLAMA_LINEAR_MODULES else 99


def linear_modules(layers: int) -> list[str]:
    """The targeted linear modules of the first `layers` decoder layers, in layer order."""
    out = []
    for i in range(layers):
        for kind in LLAMA_LINEAR_MODULES:
            part = "self_attn" if kind.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            out.append(f"model.layers.{i}.{part}.{kind}")
    return out


# --------------------------------------------------------------------------------------
# Dense children (what users run today)
# --------------------------------------------------------------------------------------


def _write_peft_config(out_dir: Path, rank: int, targets: Sequence[str], base: str | None) -> None:
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": rank,
        "target_modules": sorted(set(targets)),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
    }
    (out_dir / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))


def kohya_child(spec_path: str) -> int:
    """Dense resize as kohya's resize_lora.py does it: dense delta + torch.linalg.svd per module."""
    spec = json.loads(Path(spec_path).read_text())
    t0 = time.perf_counter()
    import torch
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(spec["threads"])
    t1 = time.perf_counter()
    adapter_dir = Path(spec["adapter"])
    state = load_file(str(adapter_dir / ADAPTER_WEIGHTS_NAME))  # the whole adapter, as kohya does
    config = json.loads((adapter_dir / ADAPTER_CONFIG_NAME).read_text())
    t2 = time.perf_counter()
    suffix = ".lora_A.weight"
    prefixes = sorted((k[: -len(suffix)] for k in state if k.endswith(suffix)), key=_module_order)
    prefixes = [p for p in prefixes if _layer(p) < spec["layers"]]
    out: dict[str, torch.Tensor] = {}
    per_kind: dict[str, float] = {}
    rank = spec["rank"]
    for prefix in prefixes:
        tm = time.perf_counter()
        a = state[prefix + ".lora_A.weight"].to(torch.float32)
        b = state[prefix + ".lora_B.weight"].to(torch.float32)
        _, scale = peft_lora_scale(config, prefix.removeprefix("base_model.model."))
        delta = (b @ a) * scale
        u, s, vh = torch.linalg.svd(delta)
        k = min(rank, s.numel())
        out[prefix + ".lora_B.weight"] = (u[:, :k] @ torch.diag(s[:k])).contiguous()
        out[prefix + ".lora_A.weight"] = vh[:k].contiguous()
        per_kind[_kind(prefix)] = per_kind.get(_kind(prefix), 0.0) + time.perf_counter() - tm
    t3 = time.perf_counter()
    out_dir = Path(spec["out"])
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(out, str(out_dir / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    _write_peft_config(out_dir, rank, [_kind(p) for p in prefixes], config.get("base_model_name_or_path"))
    t4 = time.perf_counter()
    phases = {"import": t1 - t0, "load": t2 - t1, "svd": t3 - t2, "save": t4 - t3}
    print(PHASES_PREFIX + json.dumps({"phases": phases, "per_kind": per_kind, "modules": len(prefixes)}), flush=True)
    return 0


def mergekit_child(spec_path: str) -> int:
    """Dense extraction as mergekit does it: float32 D = ft - base and a thin torch SVD per module."""
    spec = json.loads(Path(spec_path).read_text())
    t0 = time.perf_counter()
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.set_num_threads(spec["threads"])
    t1 = time.perf_counter()
    base_map = checkpoint_weight_map(Path(spec["base"]))
    ft_map = checkpoint_weight_map(Path(spec["finetuned"]))
    handles: dict[Path, object] = {}

    def get(path: Path, name: str) -> torch.Tensor:
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path].get_tensor(name)  # type: ignore[attr-defined]

    modules = linear_modules(spec["layers"])
    out: dict[str, torch.Tensor] = {}
    per_kind: dict[str, float] = {}
    rank = spec["rank"]
    for module in modules:
        tm = time.perf_counter()
        key = module + ".weight"
        base = get(base_map[key], key).to(torch.float32)
        ft = get(ft_map[key], key).to(torch.float32)
        diff = ft - base
        del base, ft
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)
        k = min(rank, s.numel())
        root = s[:k].sqrt()
        out[f"base_model.model.{module}.lora_B.weight"] = (u[:, :k] * root).contiguous()
        out[f"base_model.model.{module}.lora_A.weight"] = (root[:, None] * vh[:k]).contiguous()
        per_kind[_kind(module)] = per_kind.get(_kind(module), 0.0) + time.perf_counter() - tm
    t2 = time.perf_counter()
    out_dir = Path(spec["out"])
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(out, str(out_dir / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    _write_peft_config(out_dir, rank, [_kind(m) for m in modules], spec["base"])
    t3 = time.perf_counter()
    phases = {"import": t1 - t0, "load+svd": t2 - t1, "save": t3 - t2}
    print(PHASES_PREFIX + json.dumps({"phases": phases, "per_kind": per_kind, "modules": len(modules)}), flush=True)
    return 0


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def _stamped(dir_: Path, wanted: dict[str, object]) -> bool:
    stamp = dir_ / INPUTS_STAMP
    return stamp.exists() and json.loads(stamp.read_text()) == wanted


def _reset(dir_: Path) -> None:
    if dir_.exists():
        shutil.rmtree(dir_)
    dir_.mkdir(parents=True)


def prepare_resize_input(workdir: Path, args: argparse.Namespace) -> tuple[Path, float | None]:
    root = workdir / "resize"
    wanted = {"version": 1, "layers": args.layers, "rank": args.rank_in, "alpha": args.alpha_in,
              "std": FACTOR_STD, "seed": args.seed}
    adapter = root / "adapter"
    if _stamped(root, wanted):
        print(f"  reusing {adapter} (same parameters, see {INPUTS_STAMP})")
        return adapter, None
    _reset(root)
    t0 = time.perf_counter()
    build_lora_adapter(adapter, llama_config(args.layers), rank=args.rank_in, alpha=args.alpha_in,
                       target_modules=LLAMA_LINEAR_MODULES, a_std=FACTOR_STD, b_std=FACTOR_STD,
                       seed=args.seed * 1000 + 17)
    (root / INPUTS_STAMP).write_text(json.dumps(wanted, indent=2) + "\n")
    return adapter, time.perf_counter() - t0


def finetune_update(name: str, shape: tuple[int, ...], args: argparse.Namespace):  # -> torch.Tensor
    """U diag(s) V^T + N(0, noise^2) for one weight (float32), seeded by its name."""
    import torch

    out_f, in_f = shape
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + zlib.crc32(name.encode()))
    r = min(args.ft_rank, out_f, in_f)
    q1, _ = torch.linalg.qr(torch.randn(out_f, r, generator=gen))
    q2, _ = torch.linalg.qr(torch.randn(in_f, r, generator=gen))
    s = args.ft_decay ** (torch.arange(r, dtype=torch.float64) / max(r - 1, 1))
    s = (s * (args.ft_rms * (out_f * in_f) ** 0.5 / float(s.norm()))).to(torch.float32)
    update = (q1 * s) @ q2.T
    if args.ft_noise > 0:
        update += torch.randn(out_f, in_f, generator=gen) * args.ft_noise
    return update


def prepare_extract_inputs(workdir: Path, args: argparse.Namespace) -> tuple[Path, Path, float | None]:
    import torch

    root = workdir / "extract"
    wanted = {"version": 1, "layers": args.layers, "seed": args.seed, "ft_rank": args.ft_rank,
              "ft_rms": args.ft_rms, "ft_decay": args.ft_decay, "ft_noise": args.ft_noise}
    base_dir, ft_dir = root / "base", root / "finetuned"
    if _stamped(root, wanted):
        print(f"  reusing {root} (same parameters, see {INPUTS_STAMP})")
        return base_dir, ft_dir, None
    _reset(root)
    t0 = time.perf_counter()
    build_llama_checkpoint(base_dir, llama_config(args.layers), seed=args.seed)
    targets = {m + ".weight" for m in linear_modules(args.layers)}

    def transform(spec: TensorSpec, tensor: torch.Tensor) -> torch.Tensor | None:
        if spec.name not in targets:
            return None  # embeddings, norms, lm_head: identical
        return (tensor.to(torch.float32) + finetune_update(spec.name, spec.shape, args)).to(tensor.dtype)

    build_derived_checkpoint(base_dir, ft_dir, transform)
    (root / INPUTS_STAMP).write_text(json.dumps(wanted, indent=2) + "\n")
    return base_dir, ft_dir, time.perf_counter() - t0


# --------------------------------------------------------------------------------------
# Tools and reporting helpers
# --------------------------------------------------------------------------------------


def lorafuse_subcommand(override: str | None, sub: str) -> tuple[list[str] | None, str]:
    """The lorafuse CLI command, if it has a working `sub` sub-command."""
    cmd, reason = resolve_lorafuse(override)
    if cmd is None:
        return None, reason
    try:
        probe = subprocess.run([*cmd, sub, "--help"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"`{shlex.join(cmd)} {sub} --help`: {exc}"
    if probe.returncode != 0:
        last = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, f"`{shlex.join(cmd)} {sub} --help` exited {probe.returncode} (no `{sub}` command yet?): {last[0]}"
    return cmd, ""


EXTRACT_KERNEL_MISSING = (
    "lorafuse's C++ core has no `extract_svd` kernel yet (lorafuse.ops.extract calls"
    " lorafuse._core.extract_svd); rebuild lorafuse once it exists and rerun"
)


def extract_kernel_available() -> tuple[bool, str]:
    code = "from lorafuse import _core; import lorafuse.ops.extract; _core.extract_svd"
    try:
        probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    if probe.returncode == 0:
        return True, ""
    last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
    if "extract_svd" in last:
        return False, EXTRACT_KERNEL_MISSING
    return False, f"`python3 -c {code!r}` failed: {last}"


def dense_phases(tool: Tool) -> dict[str, object] | None:
    """The phases the dense child printed in its median run."""
    if not tool.ok:
        return None
    for line in tool.median_run.log_path.read_text(errors="replace").splitlines():
        if line.startswith(PHASES_PREFIX):
            return json.loads(line[len(PHASES_PREFIX):])
    return None


def lorafuse_json(tool: Tool) -> dict[str, object] | None:
    """The JSON report `lorafuse ... --json` printed in its median run (the log mixes in stderr)."""
    if not tool.ok:
        return None
    text = tool.median_run.log_path.read_text(errors="replace")
    for m in re.finditer(r"^\{", text, flags=re.M):
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[m.start():])
        except ValueError:
            continue
        if isinstance(obj, dict) and "modules" in obj:
            return obj
    return None


@dataclass
class DenseTotal:
    seconds: float | None  # measured (median of the runs) or extrapolated wall time for all layers
    extrapolated: bool
    text: str = ""


def dense_total(tool: Tool, layers: int, dense_layers: int, scaled: Sequence[str]) -> DenseTotal:
    """The dense tool's time for `layers` layers: the median of its runs, or extrapolated from `dense_layers`
    (the phases of its median run in `scaled` x layers/dense_layers, the rest and the interpreter start/exit as
    measured in that run)."""
    info = dense_phases(tool)
    if not tool.ok:
        return DenseTotal(None, False)
    if info is None or dense_layers == layers:
        return DenseTotal(tool.wall_s, False)
    phases: dict[str, float] = info["phases"]  # type: ignore[assignment]
    factor = layers / dense_layers
    overhead = tool.median_run.wall_s - sum(phases.values())
    total = overhead + sum(v * (factor if k in scaled else 1.0) for k, v in phases.items())
    parts = ", ".join(f"{k} {v * (factor if k in scaled else 1.0):.1f} s" for k, v in phases.items())
    which = "its run" if len(tool.runs) == 1 else f"its median run of {len(tool.runs)}"
    text = (f"dense EXTRAPOLATED from {dense_layers} to {layers} layers ({', '.join(scaled)} x{factor:.2f},"
            f" the rest as measured; phases of {which}): {parts}, + {overhead:.1f} s interpreter start/exit"
            f" = {total:.1f} s")
    return DenseTotal(total, True, text)


def print_dense_phases(tool: Tool, dense_layers: int) -> None:
    info = dense_phases(tool)
    if not info:
        return
    phases = ", ".join(f"{k} {v:.2f} s" for k, v in info["phases"].items())  # type: ignore[union-attr]
    kinds = ", ".join(f"{k} {v:.1f}" for k, v in info["per_kind"].items())  # type: ignore[union-attr]
    which = "" if len(tool.runs) == 1 else f", its median run of {len(tool.runs)}"
    print(f"\n{tool.label} phases ({_layers(dense_layers)}, {info['modules']} modules{which}): {phases}")
    print(f"  per module kind, s (summed over {_layers(dense_layers)}): {kinds}")


def print_results(title: str, tools: Sequence[Tool], total: DenseTotal, layers: int, dense: Tool | None) -> None:
    print(f"\n{title}")
    header = (f"{'tool':<38}{'wall s: median (min..max)':>30}{'cpu s':>10}{'peak RSS MiB':>15}"
              f"{'peak anon MiB':>15}")
    print(header)
    print("-" * len(header))
    for tool in tools:
        if tool.cmd is None:
            reason = tool.skip_reason if len(tool.skip_reason) <= 110 else tool.skip_reason[:107] + "..."
            print(f"{tool.label:<38}  skipped: {reason}")
        elif not tool.ok:
            print(f"{tool.label:<38}  FAILED (exit {tool.runs[-1].returncode}, log {tool.runs[-1].log_path})")
        else:
            anon = "n/a" if tool.peak_anon is None else fmt_mib(tool.peak_anon)
            print(f"{tool.label:<38}{fmt_runs(tool.walls):>30}{tool.cpu_s:>10.2f}{fmt_mib(tool.peak_rss):>15}"
                  f"{anon:>15}")
    if total.extrapolated and total.seconds is not None and dense is not None:
        label = f"dense, extrap. to {layers} layers"
        print(f"{label:<38}{total.seconds:>30.1f}{'n/a':>10}{'n/a':>15}{'n/a':>15}"
              "   (EXTRAPOLATED time; RSS: measured row above)")
    print("wall and cpu: the median of the tool's runs, wall with the spread (min..max) and the number of runs;"
          " peak RSS = ru_maxrss of the tool's process, the worst run (GNU time %M; includes mmap'ed file pages);"
          " peak anon = RssAnon sampled every 20 ms, the worst run.")


def print_ratio(name: str, lf: Tool, total: DenseTotal, target: float) -> str:
    if lf.ok and total.seconds is not None:
        ratio = total.seconds / lf.wall_s
        note = " (ratio of medians; dense time EXTRAPOLATED)" if total.extrapolated else " (ratio of medians)"
        verdict = "PASS" if ratio >= target else "MISS"
        print(f"{name}: dense / lorafuse = {ratio:.1f}x{note}; target >= {target:g}x: {verdict}")
        return f"{name} {ratio:.1f}x (>= {target:g}x) {verdict}"
    print(f"{name}: dense / lorafuse = n/a (target >= {target:g}x)")
    return f"{name} n/a"


def print_method(args: argparse.Namespace, dense_layers: int) -> None:
    part = "" if dense_layers == args.layers else f"; dense runs on the first {dense_layers} layers, then extrapolated"
    print(f"\nmethod: lorafuse --threads {args.threads}; dense: torch threads {args.threads}{part}. "
          + describe_runs(args.repeat, None if args.skip_dense else args.peer_repeat, "dense")
          + ". Before every timed run (untimed): outputs removed, `sync`, the inputs read once.")


def adapter_summary(out: Path) -> tuple[int, list[int], dict[str, object]]:
    """(modules, sorted distinct ranks, config) of a PEFT adapter folder."""
    from safetensors import safe_open

    adapter_dir = find_peft_adapter_dir(out)
    config = json.loads((adapter_dir / ADAPTER_CONFIG_NAME).read_text())
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS_NAME), framework="pt") as f:
        a_keys = [k for k in f.keys() if k.endswith(".lora_A.weight")]
        ranks = sorted({f.get_slice(k).get_shape()[0] for k in a_keys})
    return len(a_keys), ranks, config


def check_structure(outputs: dict[str, Path], expected: dict[str, int], rank: int) -> bool:
    ok = True
    for label, out in outputs.items():
        try:
            n, ranks, config = adapter_summary(out)
        except (FileNotFoundError, OSError) as exc:
            print(f"  {label}: {exc}")
            ok = False
            continue
        good = n == expected[label] and ranks == [rank]
        ok &= good
        print(f"  {label}: {n} modules (expected {expected[label]}), ranks {ranks},"
              f" r={config.get('r')} lora_alpha={config.get('lora_alpha')}{'' if good else '  WRONG'}")
    return ok


# --------------------------------------------------------------------------------------
# Table 1: resize
# --------------------------------------------------------------------------------------


def check_resize(adapter: Path, outputs: dict[str, Path], rank: int, layers: int, dense_layers: int) -> bool:
    import numpy as np

    print("\ncorrectness (Table 1)")
    expected = {"lorafuse": layers * len(LLAMA_LINEAR_MODULES), "dense": dense_layers * len(LLAMA_LINEAR_MODULES)}
    ok = check_structure(outputs, expected, rank)
    last = (dense_layers if "dense" in outputs else layers) - 1
    modules = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.mlp.down_proj",
        f"model.layers.{last}.mlp.up_proj",
    ]
    print(f"  float64 optimum: numpy SVD of D = alpha/r * B @ A (float64), D_k its rank-{rank} truncation;"
          f" err = ||X - D||_F; 'vs opt' = err / ||D_k - D||_F - 1 (limit {RESIZE_ERR_TOL:g});"
          f" 'vs D_k' = ||X - D_k||_F / ||D_k||_F (information: D_k is ill-conditioned when s_k+1/s_k ~ 1)")
    labels = list(outputs)
    header = f"    {'module':<34}{'shape':>13}{'s_k+1/s_k':>11}{'opt err/||D||':>15}"
    header += "".join(f"{l + ' vs opt':>18}{l + ' vs D_k':>18}" for l in labels)
    print(header)
    for module in modules:
        d = peft_lora_delta64(adapter, module).numpy()
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        k = min(rank, len(s))
        dk = (u[:, :k] * s[:k]) @ vt[:k]
        opt = float(np.sqrt(np.sum(s[k:] ** 2)))
        gap = s[k] / s[k - 1] if k < len(s) else 0.0
        line = f"    {module:<34}{str(tuple(d.shape)):>13}{gap:>11.4f}{opt / np.linalg.norm(d):>15.4f}"
        for label, out in outputs.items():
            try:
                x = peft_lora_delta64(out, module).numpy()
            except KeyError:
                line += f"{'missing':>18}{'':>18}"
                ok = False
                continue
            vs_opt = float(np.linalg.norm(x - d)) / opt - 1.0
            vs_dk = float(np.linalg.norm(x - dk) / np.linalg.norm(dk))
            ok &= abs(vs_opt) <= RESIZE_ERR_TOL
            line += f"{vs_opt:>18.1e}{vs_dk:>18.1e}"
        print(line, flush=True)
    print(f"  resize: {'OK' if ok else 'MISMATCH'}")
    return ok


def run_resize(args: argparse.Namespace, workdir: Path, log_dir: Path) -> tuple[int, str]:
    print(
        f"\n=== Table 1: resize rank {args.rank_in} -> {args.rank_out} ===\n"
        f"input: PEFT LoRA r={args.rank_in} lora_alpha={args.alpha_in} on {','.join(LLAMA_LINEAR_MODULES)} of a"
        f" TinyLlama-1.1B-shaped Llama, {args.layers} layers; A, B ~ N(0, {FACTOR_STD}^2) float32"
    )
    adapter, build_s = prepare_resize_input(workdir, args)
    adapter_bytes = tree_bytes(adapter / ADAPTER_WEIGHTS_NAME)
    print(f"  {adapter}: {fmt_mib(adapter_bytes)} MiB, {args.layers * len(LLAMA_LINEAR_MODULES)} modules"
          + (f"; built in {build_s:.1f} s" if build_s is not None else ""))
    dense_layers = min(args.dense_layers or args.layers, args.layers)

    out_lf = workdir / "resize_out_lorafuse"
    if args.skip_lorafuse:
        lf = Tool("lorafuse", "lorafuse resize", out_lf, None, "--skip-lorafuse")
    else:
        cmd, reason = lorafuse_subcommand(args.lorafuse_cmd, "resize")
        full = None if cmd is None else [*cmd, "resize", str(adapter), "--rank", str(args.rank_out), "-o", str(out_lf),
                                         "--threads", str(args.threads), "--json"]
        lf = Tool("lorafuse", "lorafuse resize", out_lf, full, f"not available: {reason}")

    out_dense = workdir / "resize_out_dense"
    dense_label = "dense (kohya resize_lora)" + ("" if dense_layers == args.layers else f", {_layers(dense_layers)}")
    if args.skip_dense:
        dense = Tool("dense", dense_label, out_dense, None, "--skip-dense")
    else:
        spec = {"adapter": str(adapter), "out": str(out_dense), "rank": args.rank_out, "layers": dense_layers,
                "threads": args.threads}
        spec_path = workdir / "resize_dense_spec.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        dense = Tool("dense", dense_label, out_dense,
                     [sys.executable, str(Path(__file__).resolve()), KOHYA_CHILD_COMMAND, str(spec_path)])

    print_method(args, dense_layers)
    status = 0 if run_with_peer(lf, dense, args.repeat, args.peer_repeat, [adapter], log_dir) else 1
    status |= int(any(t.cmd is not None and not t.ok for t in (lf, dense)))

    report = lorafuse_json(lf)
    if report:
        print(f"\nlorafuse says: {report.get('summary')}")
    print_dense_phases(dense, dense_layers)
    total = dense_total(dense, args.layers, dense_layers, ("svd", "save"))
    if total.extrapolated:
        print(total.text)

    outputs = {t.key: t.out_dir for t in (lf, dense) if t.ok}
    if outputs and not check_resize(adapter, outputs, args.rank_out, args.layers, dense_layers):
        status = 1

    print_results(f"Table 1: resize r={args.rank_in} -> {args.rank_out}, {args.layers} layers"
                  f" ({fmt_mib(adapter_bytes)} MiB adapter)", (lf, dense), total, args.layers, dense)
    summary = print_ratio("resize", lf, total, TARGET_RESIZE)
    if not args.keep:
        for tool in (lf, dense):
            shutil.rmtree(tool.out_dir, ignore_errors=True)
    return status, summary


# --------------------------------------------------------------------------------------
# Table 2: extract
# --------------------------------------------------------------------------------------


@dataclass
class ModuleQuality:
    name: str
    shape: tuple[int, int]
    optimal: float  # optimal relative error at the rank
    gap: float  # s_{k+1} / s_k
    measured: dict[str, float] = field(default_factory=dict)  # tool -> measured relative error


def _spectrum_sq(d) -> "np.ndarray":  # noqa: F821
    """Squared singular values of d (descending), float64, as the eigenvalues of the smaller Gram matrix."""
    import numpy as np

    g = d.T @ d if d.shape[0] >= d.shape[1] else d @ d.T
    return np.clip(np.linalg.eigvalsh(g)[::-1], 0.0, None)


def check_extract(base: Path, ft: Path, outputs: dict[str, Path], rank: int, layers: int, dense_layers: int,
                  check_layers: int, reported: dict[str, float] | None) -> tuple[bool, str]:
    import numpy as np
    import torch

    print("\nquality (Table 2)")
    expected = {"lorafuse": layers * len(LLAMA_LINEAR_MODULES), "dense": dense_layers * len(LLAMA_LINEAR_MODULES)}
    ok = check_structure(outputs, expected, rank)

    # The reference method: Gram eigenvalues vs numpy's SVD on one small module.
    probe = "model.layers.0.self_attn.k_proj"
    d = (load_tensor(ft, probe + ".weight").to(torch.float64) - load_tensor(base, probe + ".weight").to(torch.float64)).numpy()
    s_svd = np.linalg.svd(d, compute_uv=False)
    lam = _spectrum_sq(d)
    opt_svd = np.sqrt(np.sum(s_svd[rank:] ** 2))
    opt_gram = np.sqrt(np.sum(lam[rank:]))
    print(f"  reference: full spectrum of D = ft - base in float64 (eigenvalues of the Gram matrix); on {probe}"
          f" its optimal error differs from np.linalg.svd's by {abs(opt_gram / opt_svd - 1):.1e} (relative)")

    modules = linear_modules(min(check_layers, layers))
    rows: list[ModuleQuality] = []
    t0 = time.perf_counter()
    for i, module in enumerate(modules):
        key = module + ".weight"
        d = (load_tensor(ft, key).to(torch.float64) - load_tensor(base, key).to(torch.float64)).numpy()
        lam = _spectrum_sq(d)
        norm_sq = float(np.sum(d * d))
        k = min(rank, len(lam))
        row = ModuleQuality(module, tuple(d.shape), float(np.sqrt(np.sum(lam[k:]) / norm_sq)),
                            float(np.sqrt(lam[k] / lam[k - 1])) if k < len(lam) else 0.0)
        for label, out in outputs.items():
            if label == "dense" and _layer(module) >= dense_layers:
                continue
            try:
                x = peft_lora_delta64(out, module).numpy()
            except KeyError:
                ok = False
                continue
            row.measured[label] = float(np.linalg.norm(d - x) / np.sqrt(norm_sq))
        rows.append(row)
        if (i + 1) % 35 == 0 and i + 1 < len(modules):
            print(f"    {i + 1}/{len(modules)} modules checked ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"  {len(rows)} modules ({min(check_layers, layers)} layers) checked in {time.perf_counter() - t0:.1f} s;"
          " ratio = tool's relative error ||D - B A||_F / ||D||_F (measured in float64 from its output file)"
          " / the optimal relative error")

    labels = list(outputs)
    header = f"    {'kind':<10}{'shape':>13}{'opt rel err':>13}{'s33/s32':>9}"
    header += "".join(f"{l + ' mean':>16}{l + ' max':>15}" for l in labels)
    print(header)
    for kind in LLAMA_LINEAR_MODULES:
        group = [r for r in rows if _kind(r.name) == kind]
        if not group:
            continue
        line = (f"    {kind:<10}{str(group[0].shape):>13}{np.mean([r.optimal for r in group]):>13.4f}"
                f"{np.mean([r.gap for r in group]):>9.3f}")
        for label in labels:
            ratios = [r.measured[label] / r.optimal for r in group if label in r.measured]
            line += f"{np.mean(ratios):>16.5f}{np.max(ratios):>15.5f}" if ratios else f"{'-':>16}{'-':>15}"
        print(line)
    summary = ""
    for label in labels:
        ratios = [r.measured[label] / r.optimal for r in rows if label in r.measured]
        if not ratios:
            continue
        worst = max((r for r in rows if label in r.measured), key=lambda r: r.measured[label] / r.optimal)
        line = (f"  {label}: rel. error / optimal over {len(ratios)} modules: mean {np.mean(ratios):.5f}x,"
                f" max {max(ratios):.5f}x ({worst.name})")
        if label == "lorafuse":
            verdict = "PASS" if max(ratios) <= TARGET_EXTRACT_ERR else "MISS"
            line += f"; target max <= {TARGET_EXTRACT_ERR:g}x: {verdict}"
            summary = f"extract error max {max(ratios):.4f}x (<= {TARGET_EXTRACT_ERR:g}x) {verdict}"
        print(line)
    if reported is not None and "lorafuse" in outputs:
        diffs = [abs(reported[r.name] / r.measured["lorafuse"] - 1) for r in rows
                 if "lorafuse" in r.measured and r.name in reported]
        missing = [r.name for r in rows if "lorafuse" in r.measured and r.name not in reported]
        good = bool(diffs) and max(diffs) <= REPORTED_ERR_TOL and not missing
        ok &= good
        print(f"  lorafuse's reported rel_error vs measured: max relative difference {max(diffs, default=float('nan')):.1e}"
              f" over {len(diffs)} modules (limit {REPORTED_ERR_TOL:g}){'' if good else '  WRONG'}"
              + (f"; {len(missing)} modules not reported" if missing else ""))
    print(f"  extract: {'OK' if ok else 'MISMATCH'}")
    return ok, summary


def run_extract(args: argparse.Namespace, workdir: Path, log_dir: Path) -> tuple[int, list[str]]:
    print(
        f"\n=== Table 2: extract rank {args.extract_rank} ===\n"
        f"inputs: two bf16 Llama checkpoints, TinyLlama-1.1B dims, {args.layers} layers: a random base and"
        f" ft = bf16(base + U diag(s) V^T + E) on every {','.join(LLAMA_LINEAR_MODULES)} weight (embeddings, norms,"
        f" lm_head identical); rank {args.ft_rank}, s geometric from s_1 to s_1*{args.ft_decay:g}, RMS {args.ft_rms:g};"
        f" E ~ N(0, {args.ft_noise:g}^2)"
    )
    base, ft, build_s = prepare_extract_inputs(workdir, args)
    ckpt_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    print(f"  {base} and {ft}: {fmt_mib(ckpt_bytes)} MiB each"
          + (f"; built in {build_s:.1f} s" if build_s is not None else ""))
    dense_layers = min(args.dense_layers or args.layers, args.layers)

    out_lf = workdir / "extract_out_lorafuse"
    if args.skip_lorafuse:
        lf = Tool("lorafuse", "lorafuse extract", out_lf, None, "--skip-lorafuse")
    else:
        cmd, reason = lorafuse_subcommand(args.lorafuse_cmd, "extract")
        if cmd is not None:
            available, reason = extract_kernel_available()
            cmd = cmd if available else None
        full = None if cmd is None else [*cmd, "extract", str(base), str(ft), "--rank", str(args.extract_rank),
                                         "-o", str(out_lf), "--threads", str(args.threads), "--json", "--no-progress"]
        lf = Tool("lorafuse", "lorafuse extract", out_lf, full, f"not available: {reason}")

    out_dense = workdir / "extract_out_dense"
    dense_label = "dense (mergekit-style)" + ("" if dense_layers == args.layers else f", {_layers(dense_layers)}")
    if args.skip_dense:
        dense = Tool("dense", dense_label, out_dense, None, "--skip-dense")
    else:
        spec = {"base": str(base), "finetuned": str(ft), "out": str(out_dense), "rank": args.extract_rank,
                "layers": dense_layers, "threads": args.threads}
        spec_path = workdir / "extract_dense_spec.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        dense = Tool("dense", dense_label, out_dense,
                     [sys.executable, str(Path(__file__).resolve()), MERGEKIT_CHILD_COMMAND, str(spec_path)])

    print_method(args, dense_layers)
    status = 0 if run_with_peer(lf, dense, args.repeat, args.peer_repeat, [base, ft], log_dir) else 1
    for tool in (lf, dense):
        if tool.cmd is None or tool.ok:
            continue
        if tool.key == "lorafuse" and "extract_svd" in tool.runs[-1].log_tail(40):
            print(f"  -> {EXTRACT_KERNEL_MISSING}")
            tool.cmd, tool.skip_reason, tool.runs = None, f"not available: {EXTRACT_KERNEL_MISSING}", []
            continue
        status = 1

    report = lorafuse_json(lf)
    reported = None
    if report:
        print(f"\nlorafuse says: {report.get('summary')}")
        reported = {m["name"]: float(m["rel_error"]) for m in report["modules"]}  # type: ignore[index,union-attr]
    elif lf.ok:
        print("\nlorafuse: no JSON report found in its output")
    print_dense_phases(dense, dense_layers)
    total = dense_total(dense, args.layers, dense_layers, ("load+svd", "save"))
    if total.extrapolated:
        print(total.text)

    outputs = {t.key: t.out_dir for t in (lf, dense) if t.ok}
    summaries: list[str] = []
    if outputs:
        good, err_summary = check_extract(base, ft, outputs, args.extract_rank, args.layers, dense_layers,
                                          args.check_layers or args.layers, reported)
        if not good:
            status = 1
        if err_summary:
            summaries.append(err_summary)

    print_results(f"Table 2: extract rank {args.extract_rank}, {args.layers} layers ({fmt_mib(ckpt_bytes)} MiB per checkpoint)",
                  (lf, dense), total, args.layers, dense)
    summaries.insert(0, print_ratio("extract", lf, total, TARGET_EXTRACT))
    if not args.keep:
        for tool in (lf, dense):
            shutil.rmtree(tool.out_dir, ignore_errors=True)
    return status, summaries


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=22, help="decoder layers (default %(default)s, as TinyLlama-1.1B)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="lorafuse threads and torch threads of the dense tools (default %(default)s)")
    p.add_argument("--repeat", type=int, default=MIN_RUNS,
                   help=f"timed lorafuse runs; the median, its spread (min..max) and the count are reported"
                   f" (default %(default)s; fewer than {MIN_RUNS} only with a warning)")
    p.add_argument("--peer-repeat", type=int, default=1,
                   help="timed runs of the dense tools (the peers); with N > 1 they alternate with lorafuse's and"
                   " their median is reported. Default %(default)s, since a dense run takes minutes at full size:"
                   " the peer's single run is reported; pass --peer-repeat 5 for a median")
    p.add_argument("--only", choices=("resize", "extract"), default=None, help="run one table only")
    p.add_argument("--skip-dense", action="store_true", help="do not run the dense tools")
    p.add_argument("--skip-lorafuse", action="store_true", help="do not run lorafuse")
    p.add_argument("--dense-layers", type=int, default=None, help="run the dense tools on the first N layers and extrapolate to --layers (default: all)")
    p.add_argument("--rank-in", type=int, default=64, help="Table 1 input rank (default %(default)s)")
    p.add_argument("--alpha-in", type=int, default=None, help="Table 1 input lora_alpha (default 2 * rank-in)")
    p.add_argument("--rank-out", type=int, default=16, help="Table 1 output rank (default %(default)s)")
    p.add_argument("--extract-rank", type=int, default=32, help="Table 2 rank (default %(default)s)")
    p.add_argument("--ft-rank", type=int, default=64, help="Table 2: rank of the fine-tuning update's decaying part (default %(default)s)")
    p.add_argument("--ft-rms", type=float, default=1e-3, help="Table 2: RMS of that part (default %(default)s; the weights' std is 0.02)")
    p.add_argument("--ft-decay", type=float, default=0.01, help="Table 2: s_last / s_1 of that part, geometric (default %(default)s)")
    p.add_argument("--ft-noise", type=float, default=1e-4, help="Table 2: std of the dense noise added (default %(default)s)")
    p.add_argument("--check-layers", type=int, default=None, help="Table 2: measure the errors on the first N layers only (default: all)")
    p.add_argument("--workdir", default=None, help="work directory (default: a fresh temp dir under /tmp); inputs in it are reused when built with the same options")
    p.add_argument("--keep", action="store_true", help="keep the work directory and outputs")
    p.add_argument("--lorafuse-cmd", default=None, help="command that runs the lorafuse CLI (default: `lorafuse` on PATH, else `python3 -m lorafuse`)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random inputs (default %(default)s)")
    args = p.parse_args(argv)
    if min(args.layers, args.threads, args.repeat, args.peer_repeat, args.rank_in, args.rank_out, args.extract_rank,
           args.ft_rank) < 1:
        p.error("--layers, --threads, --repeat, --peer-repeat and the ranks must be >= 1")
    for name in ("dense_layers", "check_layers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.rank_out >= args.rank_in:
        p.error("--rank-out must be smaller than --rank-in")
    if not 0 < args.ft_decay <= 1 or args.ft_rms <= 0 or args.ft_noise < 0:
        p.error("--ft-decay must be in (0, 1], --ft-rms > 0, --ft-noise >= 0")
    if args.alpha_in is None:
        args.alpha_in = 2 * args.rank_in
    warn_few_runs(args.repeat, None if args.skip_dense else args.peer_repeat)
    return args


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == KOHYA_CHILD_COMMAND:
        return kohya_child(argv[1])
    if argv and argv[0] == MERGEKIT_CHILD_COMMAND:
        return mergekit_child(argv[1])
    args = parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecations while writing inputs

    print_run_header("bench_rank: lorafuse resize / extract vs dense torch.linalg.svd (kohya resize_lora, mergekit extraction)", argv)
    workdir, log_dir, own_workdir = make_workdir(args.workdir, "lorafuse-bench-rank-")

    status = 0
    summaries: list[str] = []
    try:
        if args.only in (None, "resize"):
            s, summary = run_resize(args, workdir, log_dir)
            status |= s
            summaries.append(summary)
        if args.only in (None, "extract"):
            s, more = run_extract(args, workdir, log_dir)
            status |= s
            summaries.extend(more)
        print("\ntargets: " + " | ".join(summaries))
    finally:
        finish_workdir(workdir, args.keep, own_workdir)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
