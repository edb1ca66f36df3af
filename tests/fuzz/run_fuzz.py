#!/usr/bin/env python3
"""Run one fuzz target of fuzz_targets.py in a child process, with a seed corpus, and report.

    python3 tests/fuzz/run_fuzz.py TARGET --runs N [--corpus DIR] [--seconds S] [--artifacts DIR]
    python3 tests/fuzz/run_fuzz.py all --seconds 300 --corpus tests/fuzz/corpus   # a long campaign

TARGET is one of safetensors, checkpoint, peft, kohya, detect, or `all` (one after the other).
Seeds: every case of the hostile corpus (tests/data/hostile, encoded for the target) plus valid
files written by the real `safetensors` package. --corpus keeps what libFuzzer finds (one
folder per target below DIR) so a later run starts from there; without it a temporary folder
is used. Findings (crash-*, timeout-*, oom-*) go to --artifacts (default: the current folder).
Prints one line per target: inputs run, seconds, inputs per second; exits non-zero on a finding.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS_FILE = HERE / "fuzz_targets.py"
HOSTILE = HERE.parent / "data" / "hostile"
TARGETS = ("safetensors", "checkpoint", "peft", "kohya", "detect")
MAX_LEN = 8192


def _valid_files() -> dict[str, bytes]:
    """Valid safetensors files written by the reference package (numpy; torch adds BF16 / F8)."""
    import numpy as np
    import safetensors.numpy

    out: dict[str, dict[str, object]] = {
        "plain": {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(4, dtype=np.float16),
                  "i": np.array([1, -2], np.int64), "z": np.zeros((0, 3), np.float32), "s": np.array(1.5, np.float32)},
        "peft": {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 4), np.float32),
                 "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((4, 2), np.float32),
                 "base_model.model.model.embed_tokens.lora_embedding_A": np.ones((2, 6), np.float32),
                 "base_model.model.model.embed_tokens.lora_embedding_B": np.ones((4, 2), np.float32),
                 "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": np.ones((2, 3, 1, 1), np.float16),
                 "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": np.ones((5, 2, 1, 1), np.float16),
                 "base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector": np.ones((1, 5, 1, 1),
                                                                                              np.float16),
                 "base_model.model.lm_head.weight": np.ones((3, 4), np.float32)},
        "kohya": {"lora_unet_mid_block_proj_in.lora_down.weight": np.ones((2, 4), np.float32),
                  "lora_unet_mid_block_proj_in.lora_up.weight": np.ones((4, 2), np.float32),
                  "lora_unet_mid_block_proj_in.alpha": np.array(1.0, np.float32),
                  "lora_te1_text_model_conv.lora_down.weight": np.ones((2, 3, 3, 3), np.float16),
                  "lora_te1_text_model_conv.lora_up.weight": np.ones((4, 2, 1, 1), np.float16),
                  "lora_te1_text_model_conv.alpha": np.array(4, np.int64)},
    }
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, tensors in out.items():
            path = Path(tmp) / f"{name}.safetensors"
            safetensors.numpy.save_file(tensors, str(path), metadata={"format": "pt", "ss_network_dim": "2"})
            files[name] = path.read_bytes()
        try:
            import safetensors.torch
            import torch

            path = Path(tmp) / "torch.safetensors"
            safetensors.torch.save_file({
                "lora_unet_x.lora_down.weight": torch.ones(2, 4, dtype=torch.bfloat16),
                "lora_unet_x.lora_up.weight": torch.ones(4, 2, dtype=torch.float8_e4m3fn),
                "lora_unet_x.alpha": torch.tensor(2.0, dtype=torch.bfloat16)}, str(path))
            files["torch"] = path.read_bytes()
        except ImportError:
            pass
    return files


def _pack(a: bytes, b: bytes) -> bytes:
    return struct.pack("<I", len(a)) + a + b


PEFT_CONFIG = json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": True,
                          "rank_pattern": {"up_proj": 2}, "alpha_pattern": {"q_proj": 3}}).encode()


def build_seeds(target: str, out: Path) -> int:
    """Write the seed inputs of `target` into `out`; returns how many."""
    out.mkdir(parents=True, exist_ok=True)
    seeds: list[bytes] = []
    safetensors_files: list[bytes] = []
    peft_folders: list[tuple[bytes, bytes]] = []
    manifest = json.loads((HOSTILE / "manifest.json").read_text(encoding="utf-8"))
    for case in manifest["cases"]:
        path = HOSTILE / case["path"]
        if path.is_file():
            safetensors_files.append(path.read_bytes())
        elif (path / "adapter_config.json").is_file() or (path / "adapter_model.safetensors").is_file():
            cfg = path / "adapter_config.json"
            weights = path / "adapter_model.safetensors"
            peft_folders.append((cfg.read_bytes() if cfg.is_file() else b"",
                                 weights.read_bytes() if weights.is_file() else b""))
        else:
            safetensors_files += [p.read_bytes() for p in sorted(path.glob("*.safetensors"))]
    valid = _valid_files()
    safetensors_files += list(valid.values())
    peft_folders.append((PEFT_CONFIG, valid["peft"]))
    if target in ("safetensors", "checkpoint", "kohya"):
        seeds = safetensors_files
    elif target == "peft":
        seeds = [_pack(c, w) for c, w in peft_folders]
    elif target == "detect":
        seeds = [bytes([0]) + _pack(f, b"") for f in safetensors_files]
        seeds += [bytes([1 | 2 | 4]) + _pack(c, w) for c, w in peft_folders]
        seeds += [bytes([1 | 2 | 4 | 32]) + _pack(PEFT_CONFIG, valid["peft"]), bytes([1 | 8]) + _pack(b"", b""),
                  bytes([1 | 16]) + _pack(b"", valid["kohya"]), bytes([2]) + _pack(b"\x80\x04.", b"")]
    else:
        raise SystemExit(f"unknown target {target!r}")
    seeds = [s for s in dict.fromkeys(seeds) if len(s) <= MAX_LEN]
    for i, s in enumerate(seeds):
        (out / f"seed-{i:04d}").write_bytes(s)
    return len(seeds)


def _tmpfs() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def run_target(target: str, runs: int, seconds: int, corpus: Path | None, artifacts: Path, verbose: bool,
               extra: list[str]) -> tuple[int, int, float]:
    """Run one target; returns (exit code, inputs run, seconds)."""
    scratch = Path(tempfile.mkdtemp(prefix=f"lorafuse-fuzz-{target}-", dir=_tmpfs()))
    try:
        seeds = scratch / "seeds"
        build_seeds(target, seeds)
        live = corpus / target if corpus is not None else scratch / "corpus"
        live.mkdir(parents=True, exist_ok=True)
        artifacts.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(TARGETS_FILE), target, f"-runs={runs}", f"-max_len={MAX_LEN}",
               "-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1", "-detect_leaks=0",
               f"-artifact_prefix={artifacts}{os.sep}", *extra]
        if seconds:
            cmd.append(f"-max_total_time={seconds}")
        cmd += [str(live), str(seeds)]
        env = dict(os.environ, LORAFUSE_FUZZ_WORKDIR=str(scratch / "work"))
        start = time.monotonic()
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace")
        elapsed = time.monotonic() - start
        log = proc.stdout
        if verbose or proc.returncode != 0:
            sys.stdout.write(log)
        found = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log)
        done = int(found[-1]) if found else 0
        return proc.returncode, done, elapsed
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Arguments after -- go to libFuzzer as they are.")
    parser.add_argument("target", choices=[*TARGETS, "all"])
    parser.add_argument("--runs", type=int, default=-1, help="inputs to run per target (-1: no limit, see --seconds)")
    parser.add_argument("--seconds", type=int, default=0, help="stop each target after this long (0: no limit)")
    parser.add_argument("--corpus", type=Path, default=None, help="keep the evolving corpus here (DIR/TARGET)")
    parser.add_argument("--artifacts", type=Path, default=Path.cwd(), help="where findings are written")
    parser.add_argument("--verbose", action="store_true", help="show libFuzzer's output")
    args, extra = parser.parse_known_args(argv)
    extra = [e for e in extra if e != "--"]
    if args.runs < 0 and not args.seconds:
        parser.error("give --runs N or --seconds S")
    targets = TARGETS if args.target == "all" else (args.target,)
    worst, total = 0, 0
    for target in targets:
        code, done, elapsed = run_target(target, args.runs, args.seconds, args.corpus, args.artifacts.resolve(),
                                         args.verbose, extra)
        total += done
        rate = done / elapsed if elapsed else 0.0
        status = "ok" if code == 0 else f"FINDING (exit {code}, see {args.artifacts})"
        print(f"{target:12s} {done:9d} inputs {elapsed:8.1f} s {rate:8.0f} inputs/s  {status}", flush=True)
        worst = worst or code
    if len(targets) > 1:
        print(f"{'total':12s} {total:9d} inputs")
    return worst


if __name__ == "__main__":
    sys.exit(main())
