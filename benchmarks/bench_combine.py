#!/usr/bin/env python3
"""Benchmark ``lorafuse combine --method svd`` against PEFT's ``add_weighted_adapter(..., "svd")``.

Table 1 (the issue's acceptance test). Four PEFT LoRA adapters on every linear module
(q, k, v, o, gate, up, down) of a TinyLlama-1.1B-shaped Llama (hidden 2048, intermediate
5632, 22 layers, 32 heads, 4 KV heads), ranks 16, 16, 32, 8, lora_alpha = 2r, random
non-zero float32 factors (A and B ~ N(0, 0.02^2)), weights 1.0, 0.5, -0.3, 0.8, combined
to one rank-32 adapter. Each tool runs in its own child process, measured with GNU time
(peak RSS) like bench_apply.py: lorafuse --repeat times (default 5), PEFT --peer-repeat times
(default 1, since a PEFT run takes minutes at full size: the peer's single run is reported; pass
--peer-repeat 5 for a median); with more than one PEFT run the two alternate (lorafuse, PEFT,
lorafuse, PEFT, ...; the tool with more runs starts alone). Every timed run is preceded (untimed)
by removing the outputs, ``sync`` and reading the input adapters once, as bench_apply.py does.
Host paging makes single timings bimodal, so the table gives the median of each tool's runs with
the spread (min..max) and the count, never the best run; the ratio is a ratio of medians; peak
RSS is the worst run's. PEFT runs last, which removes lorafuse's output: one more lorafuse run,
untimed, writes it again for the check.

* ``lorafuse combine A B C D --weights=... --method svd --rank 32 -o OUT --threads N``,
  end to end (reading the four adapters, writing the result);
* PEFT as a user does it: build the base model, ``PeftModel.from_pretrained(model, A,
  adapter_name="a")``, ``load_adapter`` B, C, D, ``add_weighted_adapter(["a", "b", "c",
  "d"], weights, "combined", combination_type="svd", svd_rank=32)`` (PEFT's defaults
  otherwise, i.e. ``svd_full_matrices=True``), ``save_pretrained(OUT,
  selected_adapters=["combined"])``.

  The base model: add_weighted_adapter never reads the base weights (it takes a full SVD of
  each module's dense delta sum(w_i * s_i * B_i @ A_i)), so the child builds
  ``LlamaForCausalLM(config)`` on the meta device, casts it to bf16 (the dtype TinyLlama
  ships and transformers 5 loads by default; ``--peft-base-dtype fp32`` for float32), and
  materializes it with ``to_empty(device="cpu")`` + zero fill. That touches every page (so
  peak RSS holds a real 1.1B-parameter model, as after ``from_pretrained``) and costs about
  what loading a checkpoint from a warm page cache costs, without random initialization
  (which PEFT users do not pay) and without a multi-GB base checkpoint on disk. The
  adapters are loaded in float32 (PEFT's ``autocast_adapter_dtype``) whatever the base
  dtype, so the SVD work is the same. The build is its own phase ("base") so it can be
  discounted; a meta-device base is not possible, since the adapters must be real tensors.

  PEFT needs minutes here (a full SVD of every dense delta, up to 5632 x 2048). With
  ``--peft-layers N`` it runs on the first N layers only (a model and adapters of N layers;
  the adapters are the first N layers of the same files, byte for byte) and its time is
  extrapolated linearly to ``--layers`` (import as measured, "base" by parameter count, the
  other phases by layers; the phases of its median run); the output says so. Its peak RSS is
  then the N-layer one.

Both tools' rank-32 deltas are checked on a few modules against the float64 optimum
(numpy SVD of the dense D = sum_i w_i * alpha_i / r_i * B_i @ A_i, truncated to rank 32)
and against each other: relative Frobenius errors, which must be <= 1e-4.

Table 2 (scaling). ``lorafuse.combine(..., method="svd", rank=32)`` in-process through the
Python API, on n = 2, 8, 32, 128, 1000 rank-16 adapters with the shapes of ONE decoder
layer (7 modules). The adapters are written once to disk as n one-layer PEFT folders
(about 2.3 MB each; 1000 folders = 2.3 GB, reused with --workdir) and opened with
``lorafuse.load`` (memory-mapped) before timing. Each n runs in its own child process:
one warm-up call, then ``--repeat`` timed calls (default 5). It prints n, the stacked rank
R = 16n, which modules took the randomized SVD through the factors (the auto switch: where
the exact path would cost 1.5x more), the median time of the calls with their spread (min..max)
and count, the median time per adapter, and for q_proj
the error against numpy's float64 optimum (untimed) and the child's peak RSS; the targets are
that the time per adapter does not grow with n (PASS when the per-adapter time at the largest
n is within 1.5x of the smallest per-adapter time seen) and that peak RSS stays flat in n: the
combine loop runs modules in groups sized by bytes (``--group-bytes``, CombineOptions.group_bytes)
and drops a group's input pages once it is done; a module whose stacked rank reaches
min(out, in) and whose stack exceeds the group forms its dense delta a few adapters at a time.

``--compare-group-bytes G --rounds K`` turns Table 2 into an A/B comparison in one session: for every n and
each of K rounds, one child with lorafuse's default group bytes (or --group-bytes) then one with G (e.g.
1000000000000: every module's stack in one piece, the behaviour before the streaming loop), alternating so
that load drifts hit both alike; it prints per n the median (and min-max spread) over the rounds of each
variant's time (a child's time: the median of its --repeat calls), their ratio, and each variant's largest
peak RSS.

A MISS of a target does not make the exit status non-zero; a failing tool or a wrong result
does. lorafuse not installed or without ``combine`` yet: its parts are skipped with the
reason, and the rest (inputs, PEFT, the float64 reference) still runs.

Quick check:  python3 benchmarks/bench_combine.py --layers 2
Full size:    python3 benchmarks/bench_combine.py        (PEFT: about 5-10 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    ADAPTER_WEIGHTS_NAME,
    LLAMA_LINEAR_MODULES,
    UNAVAILABLE_EXIT,
    build_lora_adapter,
    find_peft_adapter_dir,
    finish_workdir,
    fmt_mib,
    fmt_runs,
    llama_config,
    make_workdir,
    median_spread,
    peft_lora_delta64,
    print_run_header,
    run_measured,
    time_lorafuse_combine,
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

PEFT_CHILD_COMMAND = "_peft-combine-child"  # hidden first argument: run the PEFT combine in this process
SCALING_CHILD_COMMAND = "_scaling-child"  # hidden first argument: time lorafuse.combine in this process
PEFT_PHASES_PREFIX = "PEFT_PHASES "
SCALING_RESULT_PREFIX = "SCALING_RESULT "

TARGET_VS_PEFT = 100.0  # PEFT wall / lorafuse wall must be >= this
TARGET_PER_ADAPTER_GROWTH = 1.5  # per-adapter time at the largest n / smallest per-adapter time
MAX_REL_ERR = 1e-4  # rank-k deltas vs the float64 optimum, relative Frobenius

FACTOR_STD = 0.02
ADAPTER_NAMES = "abcdefghijklmnopqrstuvwxyz"
INPUTS_STAMP = "inputs.json"


# --------------------------------------------------------------------------------------
# Children
# --------------------------------------------------------------------------------------


def peft_child(spec_path: str) -> int:
    """What users run to combine LoRAs with PEFT; prints per-phase times as one JSON line."""
    spec = json.loads(Path(spec_path).read_text())
    t0 = time.perf_counter()
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    torch.set_num_threads(spec["threads"])
    t1 = time.perf_counter()
    config = llama_config(spec["layers"])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to({"bf16": torch.bfloat16, "fp32": torch.float32}[spec["base_dtype"]])
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # the base weights do not enter add_weighted_adapter; touch every page
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # real (not empty) buffers
    model.eval()
    t2 = time.perf_counter()
    names, dirs = spec["names"], spec["adapters"]
    peft_model = PeftModel.from_pretrained(model, dirs[0], adapter_name=names[0])
    for name, path in zip(names[1:], dirs[1:]):
        peft_model.load_adapter(path, adapter_name=name)
    t3 = time.perf_counter()
    # PEFT only warns about adapter keys it could not match; a fresh lora_B is all zeros.
    for name in names:
        lora_b = [p for key, p in peft_model.named_parameters() if f".lora_B.{name}." in key]
        zero = sum(1 for p in lora_b if not bool(p.detach().abs().amax() > 0))
        if not lora_b or zero:
            print(f"error: adapter {name}: {zero} of {len(lora_b)} lora_B weights are zero: not loaded", flush=True)
            return 3
    t4 = time.perf_counter()
    peft_model.add_weighted_adapter(
        names, spec["weights"], "combined", combination_type="svd", svd_rank=spec["rank"]
    )
    t5 = time.perf_counter()
    peft_model.save_pretrained(spec["out"], selected_adapters=["combined"])
    t6 = time.perf_counter()
    phases = {
        "import": t1 - t0,
        "base": t2 - t1,
        "load": t3 - t2,
        "add_weighted_adapter": t5 - t4,
        "save": t6 - t5,
        "lora modules": len([k for k, _ in peft_model.named_parameters() if ".lora_A.combined." in k]),
    }
    print(PEFT_PHASES_PREFIX + json.dumps(phases), flush=True)
    return 0


def _time_streaming_combine(spec: dict) -> tuple[list, object, float, list[float]] | None:
    """time_lorafuse_combine through combine_with(CombineOptions(..., group_bytes)) (the grouped, streaming
    loop with its memory budget set); None when this lorafuse has no CombineOptions."""
    try:
        import lorafuse
        from lorafuse.ops.combine import CombineOptions, combine_with
    except ImportError:
        return None
    opts = CombineOptions(method="svd", rank=spec["rank"], threads=spec["threads"])
    if spec.get("group_bytes"):
        opts = CombineOptions(method="svd", rank=spec["rank"], threads=spec["threads"], group_bytes=spec["group_bytes"])
    t0 = time.perf_counter()
    adapters = [lorafuse.load(p) for p in spec["adapters"]]
    load_s = time.perf_counter() - t0
    times: list[float] = []
    result = None
    for i in range(1 + spec["repeat"]):
        t = time.perf_counter()
        result = combine_with(adapters, list(spec["weights"]), opts)
        if i:  # the first call is the warm-up
            times.append(time.perf_counter() - t)
    return adapters, result, load_s, times


def scaling_child(spec_path: str) -> int:
    """Time lorafuse.combine on n adapters in this process: load, one warm-up, then `repeat` timed calls."""
    spec = json.loads(Path(spec_path).read_text())
    timed = _time_streaming_combine(spec)
    if timed is None:
        timed = time_lorafuse_combine(spec["adapters"], spec["weights"], spec["rank"], spec["threads"],
                                      spec["repeat"])
    if timed is None:
        return UNAVAILABLE_EXIT
    adapters, result, load_s, times = timed
    ranks = sorted({u.rank for u in result.updates.values()}) if hasattr(result, "updates") else []
    out = {"n": len(adapters), "load_s": load_s, "times": times, "modules": len(result), "ranks": ranks,
           "randomized": list(getattr(result, "randomized", [])), "check": _scaling_check(adapters, spec, result)}
    print(SCALING_RESULT_PREFIX + json.dumps(out), flush=True)
    return 0


def _scaling_check(adapters: list, spec: dict, result: object, module_suffix: str = "self_attn.q_proj") -> dict:
    """Error of the combined q_proj against the float64 optimum: numpy forms D and runs a full SVD."""
    import numpy as np

    try:  # the check reads every adapter's q_proj: drop those pages again, so peak RSS stays combine's
        from lorafuse.io.pages import release_pages
    except ImportError:
        def release_pages(arrays):  # type: ignore[no-redef]
            return 0
    name = next(n for n in result.updates if n.endswith(module_suffix))
    D = None
    for a, w in zip(adapters, spec["weights"]):
        u = a.updates[name]
        b, a_ = u.factors()
        term = (w * u.scale * np.asarray(b, dtype=np.float64)) @ np.asarray(a_, dtype=np.float64)
        D = term if D is None else D + term
        release_pages([u.A.raw, u.B.raw])
    U, s, Vt = np.linalg.svd(D, full_matrices=False)
    k = spec["rank"]
    Dk = (U[:, :k] * s[:k]) @ Vt[:k]
    X = result.updates[name].delta()
    opt = float(np.sqrt(np.sum(s[k:] ** 2)))
    if opt <= 1e-6 * float(np.linalg.norm(D)):  # rank(D) <= k: the optimum is D itself
        ratio = float("nan")
    else:
        ratio = float(np.linalg.norm(D - X)) / opt
    return {"module": name, "err_ratio": ratio,
            "dist_opt": float(np.linalg.norm(X - Dk) / np.linalg.norm(Dk)), "gap": float(s[k] / s[k - 1]) if s[k - 1] > 0 else 0.0}


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


@dataclass
class Table1Inputs:
    dirs: list[Path]
    ranks: list[int]
    alphas: list[int]
    bytes: int
    modules: int
    build_s: float | None  # None when reused


def prepare_table1(workdir: Path, args: argparse.Namespace) -> Table1Inputs:
    root = workdir / "table1"
    names = ADAPTER_NAMES[: len(args.ranks)]
    alphas = [2 * r for r in args.ranks]
    wanted = {"version": 1, "layers": args.layers, "ranks": args.ranks, "std": FACTOR_STD, "seed": args.seed}
    dirs = [root / f"adapter_{n}" for n in names]
    build_s = None
    if _stamped(root, wanted):
        print(f"  reusing {root} (same parameters, see {INPUTS_STAMP})")
    else:
        _reset(root)
        t0 = time.perf_counter()
        config = llama_config(args.layers)
        for i, (path, r, alpha) in enumerate(zip(dirs, args.ranks, alphas)):
            build_lora_adapter(
                path, config, rank=r, alpha=alpha, target_modules=LLAMA_LINEAR_MODULES,
                a_std=FACTOR_STD, b_std=FACTOR_STD, seed=args.seed * 1000 + 11 * (i + 1),
            )
        build_s = time.perf_counter() - t0
        (root / INPUTS_STAMP).write_text(json.dumps(wanted, indent=2) + "\n")
    return Table1Inputs(
        dirs=dirs, ranks=list(args.ranks), alphas=alphas,
        bytes=sum(tree_bytes(d / ADAPTER_WEIGHTS_NAME) for d in dirs),
        modules=args.layers * len(LLAMA_LINEAR_MODULES), build_s=build_s,
    )


def truncated_adapters(inputs: Table1Inputs, layers: int, workdir: Path) -> list[Path]:
    """The first `layers` decoder layers of each Table 1 adapter (same tensors, same config)."""
    import re

    from safetensors import safe_open
    from safetensors.torch import save_file

    root = workdir / "table1" / f"first_{layers}_layers"
    wanted = {"source": [str(d) for d in inputs.dirs], "layers": layers,
              "mtimes": [(d / ADAPTER_WEIGHTS_NAME).stat().st_mtime_ns for d in inputs.dirs]}
    out = [root / d.name for d in inputs.dirs]
    if _stamped(root, wanted):
        return out
    _reset(root)
    pattern = re.compile(r"\.layers\.(\d+)\.")
    for src, dst in zip(inputs.dirs, out):
        dst.mkdir()
        for f in src.iterdir():
            if f.is_file() and f.name != ADAPTER_WEIGHTS_NAME:
                shutil.copy2(f, dst / f.name)
        with safe_open(str(src / ADAPTER_WEIGHTS_NAME), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys() if (m := pattern.search(k)) and int(m.group(1)) < layers}
        save_file(tensors, str(dst / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    (root / INPUTS_STAMP).write_text(json.dumps(wanted, indent=2) + "\n")
    return out


def prepare_table2(workdir: Path, args: argparse.Namespace) -> tuple[list[Path], float | None]:
    """max(ns) rank-16 one-layer PEFT folders; adapter i is the same whatever max(ns) is."""
    root = workdir / "table2"
    count = max(args.ns)
    wanted = {"version": 1, "rank": 16, "std": FACTOR_STD, "seed": args.seed}
    stamp = root / INPUTS_STAMP
    dirs = [root / f"adapter_{i:04d}" for i in range(count)]
    have = 0
    if stamp.exists() and json.loads(stamp.read_text()).get("params") == wanted:
        have = int(json.loads(stamp.read_text())["count"])
    if have >= count:
        print(f"  reusing {root} ({have} adapters, see {INPUTS_STAMP})")
        return dirs, None
    if have == 0:
        _reset(root)
    t0 = time.perf_counter()
    config = llama_config(1)
    for i in range(have, count):
        if dirs[i].exists():
            shutil.rmtree(dirs[i])
        build_lora_adapter(
            dirs[i], config, rank=16, alpha=32, target_modules=LLAMA_LINEAR_MODULES,
            a_std=FACTOR_STD, b_std=FACTOR_STD, seed=args.seed * 100_000 + 7 * i + 3,
        )
        if (i + 1) % 250 == 0 and i + 1 < count:
            print(f"    {i + 1}/{count} written ({time.perf_counter() - t0:.0f} s)", flush=True)
    stamp.write_text(json.dumps({"params": wanted, "count": count}, indent=2) + "\n")
    return dirs, time.perf_counter() - t0


def layer_shapes() -> dict[str, tuple[int, int]]:
    """(out, in) of each linear module of one TinyLlama decoder layer."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(1))
    shapes = {}
    for name, module in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if short in LLAMA_LINEAR_MODULES and name.startswith("model.layers.0."):
            shapes[short] = (module.out_features, module.in_features)
    return shapes


# --------------------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------------------


def lorafuse_combine_cmd(override: str | None) -> tuple[list[str] | None, str]:
    """The lorafuse CLI command, if it has a working `combine` sub-command."""
    cmd, reason = resolve_lorafuse(override)
    if cmd is None:
        return None, reason
    try:
        probe = subprocess.run([*cmd, "combine", "--help"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"`{shlex.join(cmd)} combine --help`: {exc}"
    if probe.returncode != 0:
        last = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, f"`{shlex.join(cmd)} combine --help` exited {probe.returncode} (no `combine` command yet?): {last[0]}"
    return cmd, ""


def lorafuse_api_available() -> tuple[bool, str]:
    code = "import lorafuse; lorafuse.combine; lorafuse.load"
    try:
        probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    if probe.returncode == 0:
        return True, ""
    last = probe.stderr.strip().splitlines()[-1:] or ["no output"]
    return False, f"`python3 -c {code!r}` failed: {last[0]}"


def weights_arg(weights: Sequence[float]) -> str:
    return ",".join(repr(float(w)) for w in weights)  # exact: repr round-trips


# --------------------------------------------------------------------------------------
# Table 1
# --------------------------------------------------------------------------------------


def peft_phases(tool: Tool) -> dict[str, float] | None:
    """The phases the PEFT child printed in its median run."""
    if not tool.ok:
        return None
    for line in tool.median_run.log_path.read_text(errors="replace").splitlines():
        if line.startswith(PEFT_PHASES_PREFIX):
            return json.loads(line[len(PEFT_PHASES_PREFIX):])
    return None


def base_params(layers: int) -> int:
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(llama_config(layers)).parameters())


def extrapolate(phases: dict[str, float], from_layers: int, to_layers: int) -> dict[str, float]:
    f_layers = to_layers / from_layers
    f_params = base_params(to_layers) / base_params(from_layers)
    return {
        "import": phases["import"],
        "base": phases["base"] * f_params,
        "load": phases["load"] * f_layers,
        "add_weighted_adapter": phases["add_weighted_adapter"] * f_layers,
        "save": phases["save"] * f_layers,
    }


def check_table1(inputs: Table1Inputs, weights: Sequence[float], rank: int, outputs: dict[str, Path],
                 layers: int, peft_layers: int) -> bool:
    """Rank-k deltas of both tools vs the float64 optimum, and vs each other."""
    import numpy as np

    print("\ncorrectness (Table 1)")
    ok = True
    outputs = dict(outputs)
    expected_modules = {"lorafuse": layers * len(LLAMA_LINEAR_MODULES), "peft": peft_layers * len(LLAMA_LINEAR_MODULES)}
    for label, out in list(outputs.items()):
        try:
            adapter_dir = find_peft_adapter_dir(out)
        except FileNotFoundError as exc:
            print(f"  {label}: {exc}")
            ok = False
            del outputs[label]
            continue
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        from safetensors import safe_open

        with safe_open(str(adapter_dir / ADAPTER_WEIGHTS_NAME), framework="pt") as f:
            a_keys = [k for k in f.keys() if k.endswith(".lora_A.weight")]
            ranks = sorted({f.get_slice(k).get_shape()[0] for k in a_keys})
        good = len(a_keys) == expected_modules[label] and ranks == [rank]
        ok &= good
        print(
            f"  {label}: {adapter_dir}: {len(a_keys)} modules (expected {expected_modules[label]}), ranks {ranks},"
            f" r={config.get('r')} lora_alpha={config.get('lora_alpha')}{'' if good else '  WRONG'}"
        )
    if not outputs:
        print("  no combined adapter to check; the float64 reference alone:")

    last = min(layers, peft_layers) - 1 if "peft" in outputs else layers - 1
    modules = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.mlp.down_proj",
        f"model.layers.{last}.mlp.up_proj",
    ]
    print(
        f"  float64 optimum D_k: numpy SVD of D = sum_i w_i * alpha_i/r_i * B_i @ A_i, truncated to rank {rank};"
        f" errors are ||X - D_k||_F / ||D_k||_F (limit {MAX_REL_ERR:g})"
    )
    header = f"    {'module':<34}{'shape':>12}{'s_k+1/s_k':>11}{'||D-D_k||/||D||':>17}"
    labels = list(outputs)
    header += "".join(f"{l + ' err':>14}" for l in labels)
    if len(labels) == 2:
        header += f"{'lorafuse vs peft':>18}"
    print(header)
    for module in modules:
        d = None
        for path, w in zip(inputs.dirs, weights):
            term = w * peft_lora_delta64(path, module).numpy()
            d = term if d is None else d + term
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        k = min(rank, len(s))
        dk = (u[:, :k] * s[:k]) @ vt[:k]
        norm_dk = np.linalg.norm(dk)
        gap = s[k] / s[k - 1] if k < len(s) else 0.0
        trunc = np.linalg.norm(d - dk) / np.linalg.norm(d)
        line = f"    {module:<34}{str(tuple(d.shape)):>12}{gap:>11.3f}{trunc:>17.3e}"
        deltas = {}
        for label, out in outputs.items():
            try:
                x = peft_lora_delta64(out, module).numpy()
            except KeyError:
                line += f"{'missing':>14}"
                ok = False
                continue
            deltas[label] = x
            err = np.linalg.norm(x - dk) / norm_dk
            ok &= bool(err <= MAX_REL_ERR)
            line += f"{err:>14.2e}"
        if len(deltas) == 2:
            (_, xa), (_, xb) = deltas.items()
            diff = np.linalg.norm(xa - xb) / norm_dk
            ok &= bool(diff <= 2 * MAX_REL_ERR)
            line += f"{diff:>18.2e}"
        print(line)
    print(f"  combine: {'OK' if ok else 'MISMATCH'}")
    return ok


def run_table1(args: argparse.Namespace, workdir: Path, log_dir: Path) -> int:
    status = 0
    print(
        f"\n=== Table 1: combine {len(args.ranks)} adapters, method svd, rank {args.rank} ===\n"
        f"inputs: PEFT LoRA on {','.join(LLAMA_LINEAR_MODULES)} of a TinyLlama-1.1B-shaped Llama, {args.layers} layers;"
        f" ranks {','.join(map(str, args.ranks))}, lora_alpha = 2r, A,B ~ N(0, {FACTOR_STD}^2) float32;"
        f" weights {weights_arg(args.weights)}"
    )
    inputs = prepare_table1(workdir, args)
    print(
        f"  {len(inputs.dirs)} adapters in {inputs.dirs[0].parent}: {fmt_mib(inputs.bytes)} MiB of tensors,"
        f" {inputs.modules} modules each" + (f"; built in {inputs.build_s:.1f} s" if inputs.build_s is not None else "")
    )
    peft_layers = args.peft_layers or args.layers
    if peft_layers > args.layers:
        peft_layers = args.layers

    out_lf = workdir / "out_lorafuse"
    if args.skip_lorafuse:
        lf = Tool("lorafuse", "lorafuse combine", out_lf, None, "--skip-lorafuse")
    else:
        lf_cmd, reason = lorafuse_combine_cmd(args.lorafuse_cmd)
        cmd = None if lf_cmd is None else [
            *lf_cmd, "combine", *map(str, inputs.dirs), f"--weights={weights_arg(args.weights)}",
            "--method", "svd", "--rank", str(args.rank), "-o", str(out_lf), "--threads", str(args.threads),
        ]
        lf = Tool("lorafuse", "lorafuse combine", out_lf, cmd, f"not available: {reason}")

    out_peft = workdir / "out_peft"
    if args.skip_peft:
        peft = Tool("peft", "PEFT", out_peft, None, "--skip-peft")
    else:
        peft_dirs = inputs.dirs if peft_layers == args.layers else truncated_adapters(inputs, peft_layers, workdir)
        spec = {
            "layers": peft_layers, "adapters": [str(d) for d in peft_dirs], "names": list(ADAPTER_NAMES[: len(peft_dirs)]),
            "weights": list(args.weights), "rank": args.rank, "out": str(out_peft), "threads": args.threads,
            "base_dtype": args.peft_base_dtype,
        }
        spec_path = workdir / "peft_spec.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        cmd = [sys.executable, str(Path(__file__).resolve()), PEFT_CHILD_COMMAND, str(spec_path)]
        label = "PEFT" if peft_layers == args.layers else f"PEFT ({peft_layers} layer{'s' if peft_layers > 1 else ''})"
        peft = Tool("peft", label, out_peft, cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    print(
        "\nmethod: each timed run is preceded (untimed) by removing the outputs, `sync` and reading the input adapters"
        " once (warm page cache). " + describe_runs(args.repeat, None if args.skip_peft else args.peer_repeat, "PEFT")
        + f". lorafuse --threads {args.threads}; PEFT torch threads {args.threads};"
        f" PEFT base: {peft_layers}-layer LlamaForCausalLM built from config in {args.peft_base_dtype} (zero weights)."
    )
    warm = list(inputs.dirs)
    if not run_with_peer(lf, peft, args.repeat, args.peer_repeat, warm, log_dir):
        status = 1
    status |= int(any(t.cmd is not None and not t.ok for t in (lf, peft)))

    print(f"\nload average after the runs: {_loadavg()}")
    phases = peft_phases(peft)
    peft_total = peft.wall_s if peft.ok else None
    extrapolated = None
    if phases:
        shown = ", ".join(f"{k} {v:.2f} s" for k, v in phases.items() if k != "lora modules")
        which = "" if len(peft.runs) == 1 else f", its median run of {len(peft.runs)}"
        print(f"\nPEFT phases ({peft_layers} layers, {phases['lora modules']:.0f} modules combined{which}): {shown}")
        if peft_layers != args.layers:
            extrapolated = extrapolate(phases, peft_layers, args.layers)
            overhead = peft.median_run.wall_s - sum(v for k, v in phases.items() if k != "lora modules")
            peft_total = sum(extrapolated.values()) + overhead
            shown = ", ".join(f"{k} {v:.1f} s" for k, v in extrapolated.items())
            print(
                f"PEFT EXTRAPOLATED from {peft_layers} to {args.layers} layers (import as measured, base by parameter count,"
                f" load/add_weighted_adapter/save x{args.layers / peft_layers:.2f}): {shown};"
                f" total {peft_total:.1f} s (incl. {overhead:.1f} s of interpreter start/exit)"
            )

    outputs = {t.key: t.out_dir for t in (lf, peft) if t.ok}
    if not check_table1(inputs, args.weights, args.rank, outputs, args.layers, peft_layers):
        status = 1

    print(f"\nTable 1: {len(inputs.dirs)} adapters -> rank {args.rank}, method svd, {args.layers} layers"
          f" ({fmt_mib(inputs.bytes)} MiB of input tensors)")
    header = f"{'tool':<26}{'wall s: median (min..max)':>30}{'cpu s':>10}{'peak RSS MiB':>15}{'peak anon MiB':>15}"
    print(header)
    print("-" * len(header))
    for tool in (lf, peft):
        if tool.cmd is None:
            reason = tool.skip_reason if len(tool.skip_reason) <= 90 else tool.skip_reason[:87] + "..."
            print(f"{tool.label:<26}  skipped: {reason}")
        elif not tool.ok:
            print(f"{tool.label:<26}  FAILED (exit {tool.runs[-1].returncode}, log {tool.runs[-1].log_path})")
        else:
            anon = "n/a" if tool.peak_anon is None else fmt_mib(tool.peak_anon)
            print(f"{tool.label:<26}{fmt_runs(tool.walls):>30}{tool.cpu_s:>10.2f}{fmt_mib(tool.peak_rss):>15}{anon:>15}")
    if extrapolated is not None and peft_total is not None:
        label = f"PEFT, extrap. to {args.layers} layers"
        print(f"{label:<26}{peft_total:>30.1f}{'n/a':>10}{'n/a':>15}{'n/a':>15}"
              "   (time extrapolated; RSS is the measured row above)")
    print(
        "wall: the median of the tool's runs, the spread (min..max) and the number of runs; cpu: median;"
        " peak RSS = ru_maxrss of the tool's process, the worst run (GNU time %M; includes mmap'ed file pages);"
        " peak anon = RssAnon sampled every 20 ms, the worst run."
    )
    if lf.ok and peft_total is not None:
        ratio = peft_total / lf.wall_s
        note = " (ratio of medians" + (f"; PEFT extrapolated from {peft_layers} layers)" if extrapolated is not None
                                       else ")")
        verdict = "PASS" if ratio >= TARGET_VS_PEFT else "MISS"
        print(f"PEFT / lorafuse = {ratio:.1f}x{note}; target >= {TARGET_VS_PEFT:g}x: {verdict}")
        if phases:
            no_base = peft_total - (extrapolated or phases)["base"]
            print(f"  without PEFT's base-model build: {no_base / lf.wall_s:.1f}x")
    else:
        print(f"PEFT / lorafuse = n/a (target >= {TARGET_VS_PEFT:g}x)")

    if not args.keep:
        for tool in (lf, peft):
            shutil.rmtree(tool.out_dir, ignore_errors=True)
    return status


# --------------------------------------------------------------------------------------
# Table 2
# --------------------------------------------------------------------------------------


def run_table2(args: argparse.Namespace, workdir: Path, log_dir: Path) -> int:
    import numpy as np

    print(
        f"\n=== Table 2: lorafuse.combine(method='svd', rank={args.rank}) vs number of rank-16 adapters,"
        f" one decoder layer ({len(LLAMA_LINEAR_MODULES)} modules) ==="
    )
    shapes = layer_shapes()
    print("  shapes (out, in): " + ", ".join(f"{k} {v[0]}x{v[1]}" for k, v in shapes.items()))
    if args.skip_lorafuse:
        print("  skipped: --skip-lorafuse")
        return 0
    available, reason = lorafuse_api_available()
    if not available:
        print(f"  skipped: lorafuse.combine not available: {reason}")
        return 0
    print(f"  inputs: {max(args.ns)} one-layer PEFT folders on disk (r=16, alpha=32, A,B ~ N(0, {FACTOR_STD}^2) float32)")
    dirs, build_s = prepare_table2(workdir, args)
    if build_s is not None:
        print(f"  built in {build_s:.1f} s, {fmt_mib(sum(tree_bytes(d) for d in dirs))} MiB")
    rng = np.random.default_rng(args.seed + 12345)
    all_weights = [float(w) for w in rng.uniform(-1.0, 1.0, size=max(args.ns)).round(3)]
    print(
        "  each n in its own child: lorafuse.load of the n folders (memory-mapped), one warm-up combine, then"
        f" {args.repeat} timed calls, their median (min..max); threads={args.threads}; weights uniform in [-1, 1]"
    )
    rows = []
    status = 0
    for n in args.ns:
        spec = {"adapters": [str(d) for d in dirs[:n]], "weights": all_weights[:n], "rank": args.rank,
                "threads": args.threads, "repeat": args.repeat, "group_bytes": args.group_bytes}
        spec_path = workdir / f"scaling_{n}.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, str(Path(__file__).resolve()), SCALING_CHILD_COMMAND, str(spec_path)]
        res = run_measured(cmd, log_dir / f"scaling-{n}.log")
        found = None
        for line in res.log_path.read_text(errors="replace").splitlines():
            if line.startswith(SCALING_RESULT_PREFIX):
                found = json.loads(line[len(SCALING_RESULT_PREFIX):])
        if res.returncode == UNAVAILABLE_EXIT:
            print(f"  n={n}: skipped: {res.log_tail(1)}")
            break
        if not res.ok or found is None:
            print(f"  n={n}: FAILED (exit {res.returncode}); last lines of {res.log_path}:")
            print("\n".join("    " + l for l in res.log_tail().splitlines()))
            status = 1
            continue
        median = median_spread(found["times"])[0]
        R = 16 * n
        dense = [m.rsplit(".", 1)[-1] for m in found.get("randomized", [])]
        rows.append((n, R, dense, median, found, res))
        calls = ", ".join(f"{t:.3f}" for t in found["times"])
        print(f"  n={n}: calls {calls} s, median (min..max) {fmt_runs(found['times'], 3)},"
              f" load {found['load_s']:.2f} s, {found['modules']} modules, ranks {found['ranks']},"
              f" peak RSS {fmt_mib(res.peak_rss_bytes)} MiB", flush=True)

    if not rows:
        return status
    print(f"\nTable 2: lorafuse svd to rank {args.rank}, one layer; time = median (min..max) of the timed calls"
          " after a warm-up (xN: their number); per adapter = median / n")
    header = (f"{'n':>6}{'R=16n':>8}  {'randomized modules':<20}{'total s: median (min..max)':>31}"
              f"{'per adapter ms':>16}{'peak RSS MiB':>14}{'q err/opt':>11}{'q |X-Dk|/|Dk|':>15}{'s_k+1/s_k':>11}")
    print(header)
    print("-" * len(header))
    for n, R, dense, median, found, res in rows:
        path = "none (all exact)" if not dense else ("all 7" if len(dense) == len(shapes) else ",".join(dense))
        chk = found.get("check") or {}
        print(f"{n:>6}{R:>8}  {path:<20}{fmt_runs(found['times'], 3):>31}{1000 * median / n:>16.2f}"
              f"{fmt_mib(res.peak_rss_bytes):>14}"
              f"{chk.get('err_ratio', float('nan')):>11.6f}{chk.get('dist_opt', float('nan')):>15.2e}"
              f"{chk.get('gap', float('nan')):>11.4f}")
    print("q err/opt = ||D - X||_F / ||D - D_k||_F for q_proj against numpy's float64 SVD (1 = the optimum); "
          "|X-Dk|/|Dk| = distance to the optimal rank-k matrix, which a randomized SVD does not resolve when "
          "the spectrum is flat (s_k+1/s_k near 1) although its error is near-optimal")
    print("peak RSS = ru_maxrss of the child (anonymous memory and the mmap'ed input pages it holds; the streaming "
          "loop drops a group's input pages once the group is done); group bytes: "
          + (f"{args.group_bytes:,}" if args.group_bytes else "lorafuse's default")
          + f". load average now: {_loadavg()}")
    per = [median / n for n, _, _, median, _, _ in rows]
    growth = per[-1] / min(per)
    verdict = "PASS" if growth <= TARGET_PER_ADAPTER_GROWTH else "MISS"
    print(
        f"per-adapter time (median) at n={rows[-1][0]} / smallest per-adapter time = {growth:.2f};"
        f" target: does not grow with n (<= {TARGET_PER_ADAPTER_GROWTH:g}): {verdict}"
    )
    return status


def _scaling_child_run(args: argparse.Namespace, workdir: Path, log_dir: Path, dirs: list[Path],
                       weights: list[float], n: int, group_bytes: int | None, tag: str) -> tuple[dict, object] | None:
    """One Table 2 child on the first n adapters with `group_bytes`: (its result, its RunResult); None (and the
    log tail printed) when it failed."""
    spec = {"adapters": [str(d) for d in dirs[:n]], "weights": weights[:n], "rank": args.rank,
            "threads": args.threads, "repeat": args.repeat, "group_bytes": group_bytes}
    spec_path = workdir / f"scaling_{n}_{tag}.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), SCALING_CHILD_COMMAND, str(spec_path)]
    res = run_measured(cmd, log_dir / f"scaling-{n}-{tag}.log")
    found = None
    for line in res.log_path.read_text(errors="replace").splitlines():
        if line.startswith(SCALING_RESULT_PREFIX):
            found = json.loads(line[len(SCALING_RESULT_PREFIX):])
    if not res.ok or found is None:
        print(f"  n={n} {tag}: FAILED (exit {res.returncode}); last lines of {res.log_path}:")
        print("\n".join("    " + line for line in res.log_tail().splitlines()))
        return None
    return found, res


def run_table2_compare(args: argparse.Namespace, workdir: Path, log_dir: Path) -> int:
    """Table 2 as an A/B comparison: per n, --rounds rounds alternating the default (or --group-bytes) group
    bytes ("new") and --compare-group-bytes ("old"); median and spread over the rounds of each variant's time,
    a child's time being the median of its --repeat calls after a warm-up."""
    import statistics

    import numpy as np

    available, reason = lorafuse_api_available()
    if not available:
        print(f"  skipped: lorafuse.combine not available: {reason}")
        return 0
    dirs, build_s = prepare_table2(workdir, args)
    if build_s is not None:
        print(f"  built in {build_s:.1f} s, {fmt_mib(sum(tree_bytes(d) for d in dirs))} MiB")
    rng = np.random.default_rng(args.seed + 12345)
    weights = [float(w) for w in rng.uniform(-1.0, 1.0, size=max(args.ns)).round(3)]
    variants = [("new", args.group_bytes), ("old", args.compare_group_bytes)]
    print(f"\n=== Table 2 A/B: lorafuse.combine(method='svd', rank={args.rank}), one decoder layer; "
          f"new = group bytes {args.group_bytes or 'default'}, old = group bytes {args.compare_group_bytes:,}; "
          f"{args.rounds} rounds alternating new/old per n, each child: warm-up + median of {args.repeat} calls; "
          f"threads={args.threads} ===")
    status = 0
    table = []
    for n in args.ns:
        times: dict[str, list[float]] = {"new": [], "old": []}
        rss: dict[str, list[int]] = {"new": [], "old": []}
        checks: dict[str, list[float]] = {"new": [], "old": []}
        for rnd in range(args.rounds):
            for tag, gb in (variants if rnd % 2 == 0 else variants[::-1]):
                got = _scaling_child_run(args, workdir, log_dir, dirs, weights, n, gb, f"{tag}{rnd}")
                if got is None:
                    status = 1
                    continue
                found, res = got
                times[tag].append(median_spread(found["times"])[0])
                rss[tag].append(int(res.peak_rss_bytes or 0))
                checks[tag].append(float((found.get("check") or {}).get("err_ratio", float("nan"))))
                print(f"  n={n} round {rnd} {tag}: median (min..max) {fmt_runs(found['times'], 3)} s, peak RSS "
                      f"{fmt_mib(res.peak_rss_bytes)} MiB, q err/opt {checks[tag][-1]:.6f}, load avg {_loadavg()}",
                      flush=True)
        if times["new"] and times["old"]:
            table.append((n, times, rss, checks))
    if not table:
        return status
    print(f"\nTable 2 A/B, rank {args.rank}: median over {args.rounds} rounds (min-max) of each child's median,"
          " seconds per combine call")
    header = (f"{'n':>6}{'new median':>12}{'new spread':>18}{'old median':>12}{'old spread':>18}{'new/old':>9}"
              f"{'new ms/adapter':>16}{'old ms/adapter':>16}{'new RSS MiB':>13}{'old RSS MiB':>13}"
              f"{'q err/opt new':>15}")
    print(header)
    print("-" * len(header))
    for n, times, rss, checks in table:
        mn, mo = statistics.median(times["new"]), statistics.median(times["old"])
        print(f"{n:>6}{mn:>12.3f}{_spread(times['new']):>18}{mo:>12.3f}{_spread(times['old']):>18}{mn / mo:>9.3f}"
              f"{1000 * mn / n:>16.2f}{1000 * mo / n:>16.2f}{fmt_mib(max(rss['new'])):>13}"
              f"{fmt_mib(max(rss['old'])):>13}{max(checks['new']):>15.6f}")
    return status


def _spread(values: list[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f}"


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def _loadavg() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg()) + " (1/5/15 min)"
    except OSError:
        return "n/a"


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=22, help="decoder layers for Table 1 (default %(default)s, as TinyLlama-1.1B)")
    p.add_argument("--rank", type=int, default=32, help="output rank of the combined adapter (default %(default)s)")
    p.add_argument("--ranks", type=_int_list, default=[16, 16, 32, 8], help="Table 1 input ranks (default 16,16,32,8)")
    p.add_argument("--weights", type=_float_list, default=[1.0, 0.5, -0.3, 0.8],
                   help="Table 1 weights, one per adapter (default 1.0,0.5,-0.3,0.8; write --weights=-1,... for a leading minus)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="lorafuse threads and PEFT torch threads (default %(default)s)")
    p.add_argument("--repeat", type=int, default=MIN_RUNS,
                   help="Table 1: timed lorafuse runs; Table 2: timed calls per child after a warm-up; the median, its"
                   f" spread (min..max) and the count are reported (default %(default)s; fewer than {MIN_RUNS} only"
                   " with a warning)")
    p.add_argument("--peer-repeat", type=int, default=1,
                   help="Table 1: timed PEFT runs (the peer); with N > 1 they alternate with lorafuse's and their"
                   " median is reported. Default %(default)s, since a PEFT run takes minutes at full size: the peer's"
                   " single run is reported; pass --peer-repeat 5 for a median")
    p.add_argument("--skip-peft", action="store_true", help="do not run PEFT")
    p.add_argument("--skip-lorafuse", action="store_true", help="do not run lorafuse")
    p.add_argument("--peft-layers", type=int, default=None, help="run PEFT on the first N layers and extrapolate to --layers (default: all)")
    p.add_argument("--peft-base-dtype", choices=("bf16", "fp32"), default="bf16", help="dtype of PEFT's base model (default %(default)s)")
    p.add_argument("--group-bytes", type=int, default=None,
                   help="Table 2: combine's working memory per group of modules (CombineOptions.group_bytes; default: "
                   "lorafuse's; a huge value keeps every module's stack in one piece, as before the streaming loop)")
    p.add_argument("--compare-group-bytes", type=int, default=None,
                   help="Table 2 as an A/B comparison: alternate children with the default (or --group-bytes) group "
                   "bytes and with this value (e.g. 1000000000000, the all-stacked behaviour), --rounds rounds per n")
    p.add_argument("--rounds", type=int, default=3,
                   help="A/B rounds per n with --compare-group-bytes (default %(default)s)")
    p.add_argument("--ns", type=_int_list, default=[2, 8, 32, 128, 1000], help="Table 2 adapter counts (default 2,8,32,128,1000)")
    p.add_argument("--only", choices=("1", "2"), default=None, help="run Table 1 or Table 2 only")
    p.add_argument("--workdir", default=None, help="work directory (default: a fresh temp dir under /tmp); inputs in it are reused when built with the same options")
    p.add_argument("--keep", action="store_true", help="keep the work directory and outputs")
    p.add_argument("--lorafuse-cmd", default=None, help="command that runs the lorafuse CLI (default: `lorafuse` on PATH, else `python3 -m lorafuse`)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random factors (default %(default)s)")
    args = p.parse_args(argv)
    if min(args.layers, args.rank, args.threads, args.repeat, args.peer_repeat) < 1:
        p.error("--layers, --rank, --threads, --repeat and --peer-repeat must be >= 1")
    if args.peft_layers is not None and args.peft_layers < 1:
        p.error("--peft-layers must be >= 1")
    if len(args.ranks) < 2 or min(args.ranks) < 1 or len(args.ranks) > len(ADAPTER_NAMES):
        p.error("--ranks needs 2 to 26 positive ranks")
    if len(args.weights) != len(args.ranks):
        p.error(f"--weights needs {len(args.ranks)} values, one per adapter")
    if not args.ns or min(args.ns) < 1:
        p.error("--ns needs positive counts")
    args.ns = sorted(set(args.ns))
    warn_few_runs(args.repeat, None if args.skip_peft or args.only == "2" else args.peer_repeat)
    return args


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == PEFT_CHILD_COMMAND:
        return peft_child(argv[1])
    if argv and argv[0] == SCALING_CHILD_COMMAND:
        return scaling_child(argv[1])
    args = parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecations while writing inputs

    print_run_header("bench_combine: lorafuse combine --method svd vs PEFT add_weighted_adapter(combination_type='svd')", argv, [("load avg", f"{_loadavg()}  (other work on the machine skews the timings)")])
    workdir, log_dir, own_workdir = make_workdir(args.workdir, "lorafuse-bench-combine-")

    status = 0
    try:
        if args.only in (None, "1"):
            status |= run_table1(args, workdir, log_dir)
        if args.only in (None, "2"):
            if args.compare_group_bytes:
                status |= run_table2_compare(args, workdir, log_dir)
            else:
                status |= run_table2(args, workdir, log_dir)
    finally:
        finish_workdir(workdir, args.keep, own_workdir)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
