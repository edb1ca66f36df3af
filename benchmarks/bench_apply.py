#!/usr/bin/env python3
"""Benchmark ``lorafuse apply`` against the I/O floor (``cp -r``) and a PEFT merge.

One run builds a random bf16 Llama checkpoint at TinyLlama-1.1B dimensions plus a PEFT LoRA
adapter on every linear module, then times these tools, each in its own child process so
that peak RSS is per tool:

* ``cp -r BASE OUT``                                   -- the copy floor: the kernel copies the pages
                                                          (copy_file_range), nothing passes through user space
* ``dd if=/dev/zero of=OUT bs=256K`` (as many bytes)   -- the write floor: what writing that many new
                                                          bytes with write(2) costs on this machine, in
                                                          calls of the size lorafuse's writer makes (larger
                                                          calls ran 2-6x slower on the build VM: io.safetensors
                                                          WRITE_PIECE)
* ``lorafuse apply BASE ADAPTER -o OUT --threads N``   -- the tool under test
* PEFT: ``from_pretrained`` -> ``PeftModel.from_pretrained`` -> ``merge_and_unload``
  -> ``save_pretrained``                               -- what users do today

lorafuse, cp and dd run alternately (lorafuse, cp, dd, lorafuse, cp, dd, ...), at least 5 times
each; before every timed run (untimed) all outputs are removed, `sync` runs and the inputs are
read once, so every run starts from the same state. Write costs on small VMs swing 2-6x with what
ran just before (see docs/performance.md), so the report is the median and the
spread (min..max) of the runs, never the best one, and the ratios are ratios of medians. PEFT
runs --peft-repeat times (default 1) after them. lorafuse runs with LORAFUSE_TIMINGS=1: the
phases of its median run are printed.

It prints wall time, CPU time and peak RSS of each, the ratios lorafuse/cp, lorafuse/dd and
PEFT/lorafuse, a cheap correctness check of a few merged tensors, and PASS/MISS against the
targets (lorafuse within 1.3x of cp, >= 5x faster than PEFT, peak RSS < 25% of the
checkpoint). A MISS does not make the exit status non-zero; a failing tool or a wrong
merge does.

Quick check:  python3 benchmarks/bench_apply.py --layers 2 --skip-peft
Full size:    python3 benchmarks/bench_apply.py            (~2.2 GB checkpoint, ~11 GB of disk)

--fp8: the same base converted to block-scaled FP8 (benchmarks/_fp8.py: F8_E4M3 weights, F32
weight_scale_inv per 128x128 block, quantization_config in config.json); lorafuse (keeping FP8)
against a torch script doing dequantize -> merge -> requantize on the same files, alternating,
--repeat runs each (median, spread, peak RSS), then both outputs checked against a float64 merge.
Quick check:  python3 benchmarks/bench_apply.py --fp8 --layers 2
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _fp8  # noqa: E402
from _common import (  # noqa: E402
    ADAPTER_CONFIG_NAME,
    LLAMA_LINEAR_MODULES,
    RunResult,
    build_llama_checkpoint,
    build_lora_adapter,
    checkpoint_specs,
    finish_workdir,
    fmt_mib,
    fmt_spread,
    llama_config,
    load_tensor,
    make_workdir,
    median_spread,
    parse_size,
    print_run_header,
    run_measured,
    tree_bytes,
    warm_page_cache,
)

if TYPE_CHECKING:
    import torch

PEFT_CHILD_COMMAND = "_peft-child"  # hidden first argument: run the PEFT merge in this process
PEFT_PHASES_PREFIX = "PEFT_PHASES "

TARGET_VS_CP = 1.3  # median lorafuse wall / median cp wall must be <= this
MIN_RUNS = 5  # timed runs per tool (lorafuse, cp, dd), alternating
TARGET_VS_PEFT = 5.0  # PEFT wall / lorafuse wall must be >= this
TARGET_RSS_FRACTION = 0.25  # lorafuse peak RSS / checkpoint size must be < this
MAX_ULPS = 1.0  # merged tensors must be within one bf16 rounding of the exact merge

INPUTS_STAMP = "inputs.json"


# --------------------------------------------------------------------------------------
# PEFT child
# --------------------------------------------------------------------------------------


def peft_child(base_dir: str, adapter_dir: str, out_dir: str, threads: int) -> int:
    """What users run to merge a LoRA with PEFT; prints per-phase times as one JSON line."""
    t0 = time.perf_counter()
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    t1 = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)  # `dtype`: transformers >= 4.56
    t2 = time.perf_counter()
    peft_model = PeftModel.from_pretrained(model, adapter_dir)
    t3 = time.perf_counter()
    # PEFT only warns about adapter keys it could not match; a fresh lora_B is all zeros, so a
    # zero lora_B means the adapter file was not (fully) loaded.
    lora_b = [p for name, p in peft_model.named_parameters() if ".lora_B." in name]
    unloaded = sum(1 for p in lora_b if not bool(p.detach().abs().amax() > 0))
    if not lora_b or unloaded:
        print(f"error: {unloaded} of {len(lora_b)} lora_B weights are zero: adapter not loaded", flush=True)
        return 3
    merged = peft_model.merge_and_unload()
    t4 = time.perf_counter()
    merged.save_pretrained(out_dir)
    t5 = time.perf_counter()
    phases = {
        "import": t1 - t0,
        "load base": t2 - t1,
        "load adapter": t3 - t2,
        "merge": t4 - t3,
        "save": t5 - t4,
        "lora modules": len(lora_b),
    }
    print(PEFT_PHASES_PREFIX + json.dumps(phases), flush=True)
    return 0


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


@dataclass
class Inputs:
    base_dir: Path
    adapter_dir: Path
    base_bytes: int  # size of the base .safetensors files: the "checkpoint size"
    base_files: int
    base_tensors: int
    base_params: int
    adapter_bytes: int
    adapter_modules: int
    adapter_params: int
    build_s: dict[str, float]  # empty when reused


def _lora_scale(adapter_dir: Path) -> float:
    config = json.loads((adapter_dir / ADAPTER_CONFIG_NAME).read_text())
    return float(config["lora_alpha"]) / float(config["r"])


def prepare_inputs(workdir: Path, args: argparse.Namespace) -> Inputs:
    base_dir = workdir / "base"
    adapter_dir = workdir / "adapter"
    stamp_path = workdir / INPUTS_STAMP
    wanted = {
        "version": 1,
        "layers": args.layers,
        "rank": args.rank,
        "alpha": args.alpha,
        "shard_size": args.shard_size,
        "seed": args.seed,
    }
    build_s: dict[str, float] = {}
    reuse = stamp_path.exists() and json.loads(stamp_path.read_text()) == wanted
    if reuse:
        print(f"reusing inputs in {workdir} (same parameters, see {INPUTS_STAMP})")
    else:
        for path in (stamp_path, base_dir, adapter_dir):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        config = llama_config(args.layers)
        max_shard = parse_size(args.shard_size) if args.shard_size else None
        t0 = time.perf_counter()
        build_llama_checkpoint(base_dir, config, max_shard_bytes=max_shard, seed=args.seed)
        t1 = time.perf_counter()
        build_lora_adapter(
            adapter_dir,
            config,
            rank=args.rank,
            alpha=args.alpha,
            target_modules=LLAMA_LINEAR_MODULES,
            base_model_name_or_path=str(base_dir),
            seed=args.seed + 1,
        )
        t2 = time.perf_counter()
        build_s = {"base": t1 - t0, "adapter": t2 - t1}
        stamp_path.write_text(json.dumps(wanted, indent=2) + "\n")

    specs = checkpoint_specs(base_dir)
    base_files = sorted(base_dir.glob("*.safetensors"))
    adapter_specs = checkpoint_specs(adapter_dir)
    return Inputs(
        base_dir=base_dir,
        adapter_dir=adapter_dir,
        base_bytes=sum(p.stat().st_size for p in base_files),
        base_files=len(base_files),
        base_tensors=len(specs),
        base_params=sum(s.numel for s in specs.values()),
        adapter_bytes=tree_bytes(adapter_dir / "adapter_model.safetensors"),
        adapter_modules=sum(1 for name in adapter_specs if name.endswith(".lora_A.weight")),
        adapter_params=sum(s.numel for s in adapter_specs.values()),
        build_s=build_s,
    )


# --------------------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------------------


@dataclass
class Tool:
    key: str
    label: str
    out_dir: Path
    cmd: list[str] | None  # None: skipped
    skip_reason: str = ""
    env: dict[str, str] | None = None
    runs: list[RunResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(r.ok for r in self.runs)

    @property
    def walls(self) -> list[float]:
        return [r.wall_s for r in self.runs]

    @property
    def wall_s(self) -> float:  # median of the runs
        return median_spread(self.walls)[0]

    @property
    def cpu_s(self) -> float:  # median of the runs
        return median_spread([r.cpu_s for r in self.runs])[0]

    @property
    def median_run(self) -> RunResult:
        return sorted(self.runs, key=lambda r: r.wall_s)[(len(self.runs) - 1) // 2]

    @property
    def peak_rss(self) -> int:  # worst of the repeats
        return max(r.peak_rss_bytes for r in self.runs)

    @property
    def peak_anon(self) -> int | None:
        values = [r.peak_anon_bytes for r in self.runs if r.peak_anon_bytes is not None]
        return max(values) if values else None


def _compile_bytecode() -> None:
    """Compile lorafuse's modules to bytecode, as `pip install` does: a source checkout run with
    PYTHONDONTWRITEBYTECODE=1 (this project's build machines set it) would otherwise compile every
    module at every start, about 0.1 s of each timed run that no installed copy pays."""
    probe = subprocess.run([sys.executable, "-c", "import lorafuse, os; print(os.path.dirname(lorafuse.__file__))"],
                           capture_output=True, text=True, timeout=120)
    folder = probe.stdout.strip()
    if probe.returncode == 0 and folder and os.access(folder, os.W_OK):
        subprocess.run([sys.executable, "-m", "compileall", "-q", folder], capture_output=True, timeout=600)
        print(f"compiled lorafuse's bytecode in {folder} (as pip install does)")


def resolve_lorafuse(override: str | None) -> tuple[list[str] | None, str]:
    """The command that runs the lorafuse CLI, or None and the reason it is unavailable."""
    candidates: list[list[str]] = []
    if override:
        candidates.append(shlex.split(override))
    else:
        # the console script installed beside this interpreter (a venv's bin/lorafuse) before what PATH finds:
        # on PATH may stand a version manager's shim (pyenv: a shell script that starts pyenv, then Python),
        # whose start-up would be timed as lorafuse's
        beside = Path(sys.executable).with_name("lorafuse")
        exe = str(beside) if beside.is_file() and os.access(beside, os.X_OK) else shutil.which("lorafuse")
        if exe:
            candidates.append([exe])
        candidates.append([sys.executable, "-m", "lorafuse"])
    failures: list[str] = []
    for cmd in candidates:
        try:
            probe = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            failures.append(f"`{shlex.join(cmd)} --help`: {exc}")
            continue
        if probe.returncode == 0:
            _compile_bytecode()
            return cmd, ""
        last = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or ["no output"]
        failures.append(f"`{shlex.join(cmd)} --help` exited {probe.returncode}: {last[0]}")
    return None, "; ".join(failures)


def make_tools(args: argparse.Namespace, inputs: Inputs, workdir: Path) -> list[Tool]:
    base, adapter = str(inputs.base_dir), str(inputs.adapter_dir)
    tools: list[Tool] = []

    out_cp = workdir / "out_cp"
    tools.append(Tool("cp", "cp -r", out_cp, ["cp", "-r", base, str(out_cp)]))
    out_dd = workdir / "out_dd"
    dd = f"dd if=/dev/zero of={shlex.quote(str(out_dd / 'zeros.bin'))} bs=256K count={inputs.base_bytes} " \
         "iflag=count_bytes status=none"
    tools.append(Tool("dd", "dd (write floor)", out_dd, ["sh", "-c", f"mkdir -p {shlex.quote(str(out_dd))} && {dd}"]))

    out_lf = workdir / "out_lorafuse"
    if args.skip_lorafuse:
        tools.append(Tool("lorafuse", "lorafuse apply", out_lf, None, "--skip-lorafuse"))
    else:
        lf_cmd, reason = resolve_lorafuse(args.lorafuse_cmd)
        cmd = None if lf_cmd is None else [*lf_cmd, "apply", base, adapter, "-o", str(out_lf), "--threads", str(args.threads)]
        tools.append(Tool("lorafuse", "lorafuse apply", out_lf, cmd, f"not available: {reason}",
                          env={**os.environ, "LORAFUSE_TIMINGS": "1"}))

    out_peft = workdir / "out_peft"
    if args.skip_peft:
        tools.append(Tool("peft", "PEFT merge", out_peft, None, "--skip-peft"))
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), PEFT_CHILD_COMMAND, base, adapter, str(out_peft), str(args.threads)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        tools.append(Tool("peft", "PEFT merge", out_peft, cmd, env=env))
    return tools


def _prepare(all_outputs: Sequence[Path], warm_paths: Sequence[Path]) -> None:
    """The same state before every timed run (untimed): no outputs, nothing dirty, inputs read once."""
    for out in all_outputs:
        if out.is_file() or out.is_symlink():
            out.unlink()
        else:
            shutil.rmtree(out, ignore_errors=True)
    os.sync()  # flush earlier outputs so their writeback does not land in this run
    warm_page_cache(warm_paths)


def _run_once(tool: Tool, i: int, repeat: int, log_dir: Path) -> bool:
    assert tool.cmd is not None
    result = run_measured(tool.cmd, log_dir / f"{tool.key}-{i + 1}.log", env=tool.env)
    tool.runs.append(result)
    print(
        f"  {tool.label:<16} run {i + 1}/{repeat}: {result.wall_s:.2f} s wall, {result.cpu_s:.2f} s cpu, "
        f"peak RSS {fmt_mib(result.peak_rss_bytes)} MiB"
        + ("" if result.ok else f"  FAILED (exit {result.returncode})"),
        flush=True,
    )
    if not result.ok:
        print("  --- last lines of its output ---")
        print("\n".join("  " + line for line in result.log_tail().splitlines()), flush=True)
    return result.ok


def run_alternating(tools: Sequence[Tool], repeat: int, warm_paths: Sequence[Path], log_dir: Path,
                    all_outputs: Sequence[Path], repeats: Sequence[int] | None = None) -> None:
    """Round i runs every tool once, in order; a tool that fails drops out.

    `repeats` (one count per tool) gives the tools different numbers of runs: a tool with fewer runs
    takes part in the last rounds only, so the tools end together and the last tool's last run is the
    last one (lorafuse x5 and a peer x1: lorafuse, lorafuse, lorafuse, lorafuse, lorafuse, peer)."""
    counts = [repeat] * len(tools) if repeats is None else list(repeats)
    assert len(counts) == len(tools)
    for tool in tools:
        assert tool.cmd is not None
        print(f"[{tool.label}] {shlex.join(tool.cmd)}", flush=True)
    rounds = max(counts, default=0)
    active = list(tools)
    for r in range(rounds):
        for tool, count in zip(tools, counts):
            i = r - (rounds - count)  # this tool's run index in round r; < 0: not started yet
            if tool not in active or i < 0:
                continue
            _prepare(all_outputs, warm_paths)
            if not _run_once(tool, i, count, log_dir):
                active.remove(tool)


def run_tool(tool: Tool, repeat: int, warm_paths: Sequence[Path], log_dir: Path,
             all_outputs: Sequence[Path] | None = None) -> None:
    """`repeat` runs of one tool, each after _prepare (by default removing the tool's own output)."""
    assert tool.cmd is not None
    print(f"\n[{tool.label}] {shlex.join(tool.cmd)}")
    outputs = [tool.out_dir] if all_outputs is None else all_outputs
    for i in range(repeat):
        _prepare(outputs, warm_paths)
        if not _run_once(tool, i, repeat, log_dir):
            return


def run_with_peer(lf: Tool, peer: Tool, repeat: int, peer_repeat: int, warm_paths: Sequence[Path], log_dir: Path,
                  extra_outputs: Sequence[Path] = ()) -> bool:
    """lorafuse's `repeat` and its peer's `peer_repeat` timed runs, alternating (lorafuse, peer, lorafuse,
    peer, ...; see run_alternating: the tool with more runs starts alone), each preceded (untimed) by
    removing every output (both tools' and `extra_outputs`), `sync` and reading `warm_paths` once. A tool
    without a command is reported as skipped. As the peer runs last, lorafuse's output is gone by then:
    one more lorafuse run, untimed, writes it again for the correctness check (only its own output is
    removed before it, so the peer's stays). Returns False when that extra run failed."""
    for tool in (lf, peer):
        if tool.cmd is None:
            print(f"\n[{tool.label}] skipped: {tool.skip_reason}")
    timed = [(t, n) for t, n in ((lf, repeat), (peer, peer_repeat)) if t.cmd is not None]
    if not timed:
        return True
    print()
    all_outputs = [lf.out_dir, peer.out_dir, *extra_outputs]
    run_alternating([t for t, _ in timed], 0, warm_paths, log_dir, all_outputs, repeats=[n for _, n in timed])
    if not lf.ok or lf.out_dir.exists():
        return True
    assert lf.cmd is not None
    _prepare([lf.out_dir], warm_paths)
    result = run_measured(lf.cmd, log_dir / f"{lf.key}-check.log", env=lf.env)
    print(f"  {lf.label:<16} one more run for the correctness check (output kept, time not counted):"
          f" {result.wall_s:.2f} s" + ("" if result.ok else f"  FAILED (exit {result.returncode})"), flush=True)
    return result.ok


PEER_SINGLE_RUN = "the peer's single run is reported; pass --peer-repeat 5 for a median"


def describe_runs(repeat: int, peer_repeat: int | None, peer: str = "peer") -> str:
    """How the timed runs are summarized, for a benchmark's method line."""
    text = f"lorafuse: median (min..max) of {repeat} timed run{'' if repeat == 1 else 's'}"
    if repeat < MIN_RUNS:
        text += f" (WARNING: fewer than {MIN_RUNS}, not enough for a claim)"
    if peer_repeat is not None:
        if peer_repeat == 1:
            text += f"; {peer}: one run, after lorafuse's ({PEER_SINGLE_RUN})"
        else:
            text += (f"; {peer}: median (min..max) of {peer_repeat} runs, alternating with lorafuse's"
                     f" (lorafuse, {peer}, lorafuse, {peer}, ...; the tool with more runs starts alone)")
            if peer_repeat < MIN_RUNS:
                text += f" (WARNING: fewer than {MIN_RUNS})"
    return text + "; peak RSS: the worst run; ratios are ratios of medians"


def warn_few_runs(repeat: int, peer_repeat: int | None = None, repeat_option: str = "--repeat") -> None:
    """The warning for an explicit --repeat (or --peer-repeat above 1) below MIN_RUNS."""
    if repeat < MIN_RUNS:
        print(f"warning: {repeat_option} {repeat} is below {MIN_RUNS}: a median of fewer than {MIN_RUNS} runs"
              " meets no speed claim (host paging makes single timings bimodal); for quick checks only")
    if peer_repeat is not None and 1 < peer_repeat < MIN_RUNS:
        print(f"warning: --peer-repeat {peer_repeat} is below {MIN_RUNS}: the peer's median of so few runs is"
              " for quick checks only")


def lorafuse_phases(tool: Tool) -> str | None:
    """The LORAFUSE_TIMINGS block of lorafuse's median run."""
    if not tool.ok:
        return None
    lines = tool.median_run.log_path.read_text(errors="replace").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("apply timings")), None)
    if start is None:
        return None
    block = [lines[start]] + [line for line in lines[start + 1 :] if line.startswith("  ")]
    return "\n".join(block)


def peft_phases(tool: Tool) -> dict[str, float] | None:
    if not tool.ok:
        return None
    for line in tool.median_run.log_path.read_text(errors="replace").splitlines():
        if line.startswith(PEFT_PHASES_PREFIX):
            return json.loads(line[len(PEFT_PHASES_PREFIX) :])
    return None


# --------------------------------------------------------------------------------------
# Correctness
# --------------------------------------------------------------------------------------


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 numbers at |x| (8 significant bits), as float64."""
    import torch

    _, exponent = torch.frexp(x.abs().clamp_min(torch.finfo(torch.bfloat16).tiny))
    return torch.pow(2.0, (exponent - 8).to(torch.float64))


def check_correctness(inputs: Inputs, outputs: dict[str, Path], layers: int) -> bool:
    """Cheap checks of the merged checkpoints.

    * every output has the base's tensor names, shapes and dtypes;
    * a tensor without LoRA (lm_head) is copied bit for bit;
    * for one q_proj and one down_proj, the error against the exact merge
      W + alpha/r * B @ A (fp64) is at most one bf16 ulp of the largest of |W|, |dW| and
      |result|, and so is the difference between the two tools. A single correctly rounded
      add gives <= 0.5 of that ulp; rounding dW to bf16 first (double rounding) <= 1. The
      ulp of the result alone would not do: where W and dW nearly cancel it is tiny, and
      any fp32 error of dW shows up as many of its ulps.
    """
    import torch

    print("\ncorrectness")
    if not outputs:
        print("  nothing to check (no merge output)")
        return True
    ok = True
    base_specs = checkpoint_specs(inputs.base_dir)
    untouched = "lm_head.weight"
    for label, out_dir in outputs.items():
        out_specs = checkpoint_specs(out_dir)
        if out_specs == base_specs:
            line = f"  {label}: {len(out_specs)} tensors, names/shapes/dtypes identical to the base"
        else:
            ok = False
            missing = sorted(set(base_specs) - set(out_specs))
            extra = sorted(set(out_specs) - set(base_specs))
            changed = sorted(n for n in set(base_specs) & set(out_specs) if base_specs[n] != out_specs[n])
            line = f"  {label}: tensors DIFFER from the base: missing {missing[:3]}, extra {extra[:3]}, changed {changed[:3]}"
        if untouched in out_specs:
            same = torch.equal(load_tensor(out_dir, untouched), load_tensor(inputs.base_dir, untouched))
            ok &= same
            line += f"; {untouched} (no LoRA) {'bit-identical' if same else 'DIFFERS'}"
        print(line)

    scale = _lora_scale(inputs.adapter_dir)
    adapter_file = inputs.adapter_dir / "adapter_model.safetensors"
    modules = ["model.layers.0.self_attn.q_proj", f"model.layers.{layers - 1}.mlp.down_proj"]
    print(
        f"  vs exact fp64 merge W + {scale:g} * B @ A; err in bf16 ulps of max(|W|, |dW|, |result|)"
        f" (limit {MAX_ULPS:g}); 'exact' = share of values equal to bf16(exact merge):"
    )
    for module in modules:
        name = f"{module}.weight"
        w = load_tensor(inputs.base_dir, name).to(torch.float64)
        a = load_tensor(adapter_file, f"base_model.model.{module}.lora_A.weight").to(torch.float64)
        b = load_tensor(adapter_file, f"base_model.model.{module}.lora_B.weight").to(torch.float64)
        delta = scale * (b @ a)
        exact = w + delta
        operand_scale = torch.maximum(torch.maximum(w.abs(), delta.abs()), exact.abs())
        rounded = exact.to(torch.bfloat16).to(torch.float64)
        print(f"    {name} {list(exact.shape)}: mean |dW| {float(delta.abs().mean()):.1e}, mean |W| {float(w.abs().mean()):.1e}")
        merged: dict[str, torch.Tensor] = {}
        for label, out_dir in outputs.items():
            x = load_tensor(out_dir, name)
            if x.dtype != torch.bfloat16 or x.shape != exact.shape:
                ok = False
                print(f"      {label:<18} WRONG dtype/shape {x.dtype} {tuple(x.shape)}")
                continue
            x64 = x.to(torch.float64)
            merged[label] = x64
            err = (x64 - exact).abs()
            err_ulps = float((err / _bf16_ulp(operand_scale)).max())
            exact_share = float((x64 == rounded).to(torch.float64).mean())
            ok &= err_ulps <= MAX_ULPS
            print(f"      {label:<18} max err {float(err.max()):.2e} = {err_ulps:.2f} ulp, exact {exact_share:.2%}")
        if len(merged) == 2:
            (la, xa), (lb, xb) = merged.items()
            diff = (xa - xb).abs()
            scale_ab = torch.maximum(operand_scale, torch.maximum(xa.abs(), xb.abs()))
            diff_ulps = float((diff / _bf16_ulp(scale_ab)).max())
            identical = float((xa == xb).to(torch.float64).mean())
            ok &= diff_ulps <= MAX_ULPS
            print(f"      {la + ' vs ' + lb:<18} max diff {float(diff.max()):.2e} = {diff_ulps:.2f} ulp, identical {identical:.2%}")
    print(f"  merge: {'OK' if ok else 'MISMATCH'}")
    return ok


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def print_table(tools: Sequence[Tool], ckpt_bytes: int, repeat: int) -> None:
    header = (f"{'tool':<18}{'wall s: median (min..max)':>27}{'cpu s':>8}{'peak RSS MiB':>14}{'RSS/ckpt':>10}"
              f"{'peak anon MiB':>15}")
    print(f"\nresults (wall and cpu: median of each tool's runs, spread min..max; peak RSS: worst run; checkpoint "
          f"{fmt_mib(ckpt_bytes)} MiB)")
    print(header)
    print("-" * len(header))
    for tool in tools:
        if tool.cmd is None:
            reason = tool.skip_reason if len(tool.skip_reason) <= 60 else tool.skip_reason[:57] + "..."
            print(f"{tool.label:<18}  skipped: {reason}")
        elif not tool.ok:
            print(f"{tool.label:<18}  FAILED (exit {tool.runs[-1].returncode}, log {tool.runs[-1].log_path})")
        else:
            anon = "n/a" if tool.peak_anon is None else fmt_mib(tool.peak_anon)
            walls = f"{fmt_spread(tool.walls)} x{len(tool.runs)}"
            print(
                f"{tool.label:<18}{walls:>27}{tool.cpu_s:>8.2f}{fmt_mib(tool.peak_rss):>14}"
                f"{tool.peak_rss / ckpt_bytes:>10.1%}{anon:>15}"
            )
    sources = sorted({r.rss_source for t in tools for r in t.runs})
    print(
        f"peak RSS = ru_maxrss of the tool's process (via {', '.join(sources) or 'n/a'}); it includes file pages"
        " the tool has mmap'ed and touched. peak anon = RssAnon sampled every 20 ms (allocated memory only)."
    )


def print_summary(tools: dict[str, Tool], ckpt_bytes: int) -> None:
    cp, dd, lf, peft = tools["cp"], tools["dd"], tools["lorafuse"], tools["peft"]

    def verdict(passed: bool) -> str:
        return "PASS" if passed else "MISS"

    print()
    parts: list[str] = []
    if lf.ok and dd.ok:
        print(f"lorafuse / dd   = {lf.wall_s / dd.wall_s:.2f}x (ratio of medians; dd writes as many new bytes)")
    if lf.ok and cp.ok:
        ratio = lf.wall_s / cp.wall_s
        print(f"lorafuse / cp   = {ratio:.2f}x (ratio of medians)")
        parts.append(f"lorafuse/cp {ratio:.2f}x (<= {TARGET_VS_CP:g}x) {verdict(ratio <= TARGET_VS_CP)}")
    else:
        parts.append(f"lorafuse/cp n/a (<= {TARGET_VS_CP:g}x)")
    if lf.ok and peft.ok:
        ratio = peft.wall_s / lf.wall_s
        print(f"PEFT / lorafuse = {ratio:.2f}x")
        parts.append(f"PEFT/lorafuse {ratio:.2f}x (>= {TARGET_VS_PEFT:g}x) {verdict(ratio >= TARGET_VS_PEFT)}")
    else:
        parts.append(f"PEFT/lorafuse n/a (>= {TARGET_VS_PEFT:g}x)")
    if lf.ok:
        frac = lf.peak_rss / ckpt_bytes
        parts.append(f"lorafuse RSS {frac:.1%} of ckpt (< {TARGET_RSS_FRACTION:.0%}) {verdict(frac < TARGET_RSS_FRACTION)}")
    else:
        parts.append(f"lorafuse RSS n/a (< {TARGET_RSS_FRACTION:.0%})")
    print("targets: " + " | ".join(parts))


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=22, help="decoder layers (default %(default)s, as TinyLlama-1.1B)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default %(default)s)")
    p.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: 2 * rank)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="--threads for lorafuse and torch threads for PEFT (default: cpu count, %(default)s)")
    p.add_argument("--repeat", type=int, default=MIN_RUNS, help=f"alternating timed runs of lorafuse, cp and dd, at least {MIN_RUNS}; the median and spread are reported (default %(default)s)")
    p.add_argument("--peft-repeat", type=int, default=1, help="timed runs of the PEFT merge, after the others (default %(default)s)")
    p.add_argument("--shard-size", default=None, help="write the base sharded like save_pretrained(max_shard_size=...), e.g. 1GB")
    p.add_argument("--workdir", default=None, help="work directory (default: a fresh temp dir under /tmp); inputs in it are reused when built with the same options")
    p.add_argument("--keep", action="store_true", help="keep the work directory (default: remove the temp dir, or only the outputs of --workdir)")
    p.add_argument("--skip-peft", action="store_true", help="do not run the PEFT merge")
    p.add_argument("--skip-lorafuse", action="store_true", help="do not run lorafuse")
    p.add_argument("--lorafuse-cmd", default=None, help="command that runs the lorafuse CLI (default: `lorafuse` on PATH, else `python3 -m lorafuse`)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random weights (default %(default)s)")
    p.add_argument("--fp8", action="store_true", help="the base as block-scaled FP8; lorafuse vs a torch "
                   "dequantize -> merge -> requantize script (PEFT, cp and dd are not run)")
    args = p.parse_args(argv)
    if args.layers < 1 or args.rank < 1 or args.threads < 1 or args.repeat < 1 or args.peft_repeat < 1:
        p.error("--layers, --rank, --threads, --repeat and --peft-repeat must be >= 1")
    if args.repeat < MIN_RUNS:
        print(f"note: --repeat {args.repeat} raised to {MIN_RUNS}: a median and a spread need at least {MIN_RUNS} runs")
        args.repeat = MIN_RUNS
    if args.alpha is None:
        args.alpha = 2 * args.rank
    elif float(args.alpha).is_integer():
        args.alpha = int(args.alpha)  # PEFT configs carry lora_alpha as an int
    if args.shard_size:
        try:
            parse_size(args.shard_size)
        except ValueError as exc:
            p.error(str(exc))
    return args


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == PEFT_CHILD_COMMAND:
        base, adapter, out, threads = argv[1:5]
        return peft_child(base, adapter, out, int(threads))
    if argv and argv[0] == _fp8.TORCH_CHILD_COMMAND:
        base, adapter, out, threads = argv[1:5]
        return _fp8.torch_child(base, adapter, out, int(threads))
    args = parse_args(argv)
    if args.fp8:
        return main_fp8(args, argv)

    print_run_header("bench_apply: lorafuse apply vs cp -r vs PEFT merge_and_unload", argv)
    workdir, log_dir, own_workdir = make_workdir(args.workdir, "lorafuse-bench-")

    tools: list[Tool] = []
    status = 0
    try:
        print(f"\ninputs: Llama bf16, TinyLlama-1.1B dims, {args.layers} layers; LoRA r={args.rank} alpha={args.alpha} on {','.join(LLAMA_LINEAR_MODULES)}")
        inputs = prepare_inputs(workdir, args)
        print(
            f"  base    {inputs.base_dir}: {fmt_mib(inputs.base_bytes)} MiB in {inputs.base_files} file(s), "
            f"{inputs.base_tensors} tensors, {inputs.base_params / 1e9:.3f} B params"
        )
        print(
            f"  adapter {inputs.adapter_dir}: {fmt_mib(inputs.adapter_bytes)} MiB, {inputs.adapter_modules} LoRA modules, "
            f"{inputs.adapter_params / 1e6:.2f} M params (float32)"
        )
        if inputs.build_s:
            build = inputs.build_s
            print(f"  built in {build['base'] + build['adapter']:.1f} s (base {build['base']:.1f} s, adapter {build['adapter']:.1f} s)")
        free = shutil.disk_usage(workdir).free
        if free < 1.2 * inputs.base_bytes:
            print(f"  warning: only {fmt_mib(free)} MiB free in {workdir}; one output at a time needs about {fmt_mib(1.1 * inputs.base_bytes)} MiB")

        tools = make_tools(args, inputs, workdir)
        print(
            "\nmethod: lorafuse, cp and dd run alternately; every timed run is preceded (untimed) by removing all"
            " outputs, `sync`, and reading the base and adapter files once, so all tools see a warm page cache and"
            " no pending writeback (nothing is dropped from caches); outputs are written to page cache, no fsync is"
            f" timed. lorafuse --threads {args.threads}; PEFT torch threads {args.threads}."
        )
        warm_paths = [inputs.base_dir, inputs.adapter_dir]
        all_outputs = [t.out_dir for t in tools]
        for tool in tools:
            if tool.cmd is None:
                print(f"\n[{tool.label}] skipped: {tool.skip_reason}")
        by_key = {tool.key: tool for tool in tools}
        alternating = [by_key[k] for k in ("lorafuse", "cp", "dd") if by_key[k].cmd is not None]
        print()
        run_alternating(alternating, args.repeat, warm_paths, log_dir, all_outputs)
        if by_key["lorafuse"].ok:  # keep its output for the correctness check
            all_outputs = [p for p in all_outputs if p != by_key["lorafuse"].out_dir]
            _prepare(all_outputs, warm_paths)
            lf = by_key["lorafuse"]
            assert lf.cmd is not None
            # one more run whose output stays for the correctness check; its time is not counted
            if not run_measured(lf.cmd, log_dir / "lorafuse-check.log", env=lf.env).ok:
                status = 1
        if by_key["peft"].cmd is not None:
            run_tool(by_key["peft"], args.peft_repeat, warm_paths, log_dir, all_outputs)
        status |= int(any(t.cmd is not None and not t.ok for t in tools))

        phases = lorafuse_phases(by_key["lorafuse"])
        if phases:
            print("\nlorafuse phases of its median run (threads overlap: phases can add up to more than the wall)")
            print("\n".join("  " + line for line in phases.splitlines()))
        phases = peft_phases(by_key["peft"])
        if phases:
            shown = ", ".join(f"{k} {v:.2f} s" for k, v in phases.items() if k != "lora modules")
            print(f"\nPEFT phases: {shown} ({phases['lora modules']:.0f} LoRA modules loaded)")

        outputs = {t.key: t.out_dir for t in tools if t.key in ("lorafuse", "peft") and t.ok}
        if not check_correctness(inputs, outputs, args.layers):
            status = 1
        print_table(tools, inputs.base_bytes, args.repeat)
        print_summary(by_key, inputs.base_bytes)
    finally:
        finish_workdir(workdir, args.keep, own_workdir, [tool.out_dir for tool in tools])
    return status


def main_fp8(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """--fp8: lorafuse and the torch peer, alternating, on the FP8 conversion of the bench's base."""
    print_run_header("bench_apply --fp8: lorafuse apply (keep FP8) vs torch dequantize -> merge -> requantize", argv)
    workdir, log_dir, own_workdir = make_workdir(args.workdir, "lorafuse-bench-fp8-")
    status = 0
    tools: list[Tool] = []
    try:
        print(f"\ninputs: Llama, TinyLlama-1.1B dims, {args.layers} layers, linear weights block-scaled FP8 "
              f"(128x128); LoRA r={args.rank} alpha={args.alpha} on {','.join(LLAMA_LINEAR_MODULES)}")
        inputs = prepare_inputs(workdir, args)
        fp8_dir = workdir / "base_fp8"
        stamp = workdir / "fp8.json"
        wanted = json.loads((workdir / INPUTS_STAMP).read_text())
        if not (stamp.exists() and json.loads(stamp.read_text()) == wanted and fp8_dir.is_dir()):
            t0 = time.perf_counter()
            _fp8.convert_base(inputs.base_dir, fp8_dir)
            stamp.write_text(json.dumps(wanted))
            print(f"  converted the base to FP8 in {time.perf_counter() - t0:.1f} s")
        fp8_bytes = sum(p.stat().st_size for p in fp8_dir.glob("*.safetensors"))
        print(f"  base    {fp8_dir}: {fmt_mib(fp8_bytes)} MiB (FP8 + scales; bf16 was {fmt_mib(inputs.base_bytes)} MiB)")
        out_lf, out_torch = workdir / "out_lorafuse", workdir / "out_torch"
        lf_cmd, reason = (None, "--skip-lorafuse") if args.skip_lorafuse else resolve_lorafuse(args.lorafuse_cmd)
        lf = Tool("lorafuse", "lorafuse apply", out_lf,
                  None if lf_cmd is None else [*lf_cmd, "apply", str(fp8_dir), str(inputs.adapter_dir), "-o",
                                               str(out_lf), "--threads", str(args.threads)],
                  reason, env={**os.environ, "LORAFUSE_TIMINGS": "1"})
        peer = Tool("torch", "torch fp8 script", out_torch,
                    [sys.executable, str(Path(__file__).resolve()), _fp8.TORCH_CHILD_COMMAND, str(fp8_dir),
                     str(inputs.adapter_dir), str(out_torch), str(args.threads)])
        tools = [lf, peer]
        print("\nmethod: " + describe_runs(args.repeat, args.repeat, "torch") + f"; --threads {args.threads}")
        if not run_with_peer(lf, peer, args.repeat, args.repeat, [fp8_dir, inputs.adapter_dir], log_dir):
            status = 1
        status |= int(any(t.cmd is not None and not t.ok for t in tools))
        phases = lorafuse_phases(lf)
        if phases:
            print("\nlorafuse phases of its median run")
            print("\n".join("  " + line for line in phases.splitlines()))
        outputs = {t.key: t.out_dir for t in tools if t.ok and t.out_dir.exists()}
        if outputs and not _fp8.check(fp8_dir, inputs.adapter_dir, outputs, args.layers):
            status = 1
        print_table(tools, fp8_bytes, args.repeat)
        if lf.ok and peer.ok:
            print(f"\ntorch / lorafuse = {peer.wall_s / lf.wall_s:.2f}x wall (ratio of medians); peak RSS "
                  f"lorafuse {fmt_mib(lf.peak_rss)} MiB, torch {fmt_mib(peer.peak_rss)} MiB")
    finally:
        finish_workdir(workdir, args.keep, own_workdir, [tool.out_dir for tool in tools])
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
