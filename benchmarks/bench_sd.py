#!/usr/bin/env python3
"""Benchmark ``lorafuse combine --method svd`` against kohya's ``svd_merge_lora.py`` on SDXL-shaped LoRAs.

The issue's acceptance test: merging and SVD-combining three rank-32 kohya LoRAs of an
SDXL-shaped UNet (real module shapes, random weights) into one rank-32 LoRA; lorafuse
against the dense full-SVD approach of kohya's ``networks/svd_merge_lora.py`` (torch, same
inputs): wall time, peak RSS, ratio; target: at least 20x faster.

Inputs. Three kohya LoRA files (``.safetensors``, F16 factors and F16 ``alpha`` as kohya's
trainer saves them with ``--save_precision fp16``, ``ss_*`` metadata), covering the modules
that sd-scripts' ``networks/lora.py`` targets on the SDXL UNet by default: every Linear of
every SpatialTransformer (``Transformer2DModel``): ``proj_in`` / ``proj_out`` (Linear in SDXL)
and, in each transformer block, ``attn1`` / ``attn2`` ``to_q`` / ``to_k`` / ``to_v`` /
``to_out_0``, ``ff_net_0_proj`` (GEGLU: dim -> 2 * 4 * dim) and ``ff_net_2`` (4 * dim -> dim).
Names and shapes come from diffusers' ``UNet2DConditionModel`` built from the SDXL base
config on the meta device (nothing allocated), renamed to kohya's SDXL (LDM) names:
``down_blocks.{i}.attentions.{j}`` -> ``input_blocks_{3i+j+1}_1``, ``mid_block.attentions.0``
-> ``middle_block_1``, ``up_blocks.{i}.attentions.{j}`` -> ``output_blocks_{3i+j}_1``; i.e.
input_blocks 4, 5 (640, depth 2), 7, 8 (1280, depth 10), middle_block 1 (1280, depth 10),
output_blocks 0-2 (1280, depth 10), 3-5 (640, depth 2): 722 modules. ``lora_down`` ~
U(-1/sqrt(in), 1/sqrt(in)) (kohya's kaiming-uniform init), ``lora_up`` ~ N(0, sigma_j^2) with
sigma_j falling geometrically from 0.01 to 0.001 over the rank (a decaying spectrum, as trained
LoRAs show); rank 32, alpha 16; ratios 1.0, 0.7, 0.5. A module's tensors depend only on its
name, the adapter and --seed, so --blocks N (transformer blocks per SpatialTransformer, for a
quick try) gives the same tensors for the modules it keeps.

Tools, each in its own child process, measured with GNU time (peak RSS) as in the other
benchmarks; each run is preceded (untimed) by removing the outputs, ``sync`` and reading the
three inputs once (warm page cache), as bench_apply.py does. Host paging makes single timings
bimodal, so the tables give the median of the runs with the spread (min..max) and the count,
never the best run; ratios are ratios of medians; peak RSS is the worst run's:

* ``lorafuse combine A B C --weights=1.0,0.7,0.5 --method svd --rank 32 --dtype fp32 -o OUT.safetensors``
  (kohya in; float32 factors, as the peer writes them; the output format is whatever the CLI
  writes, see below), lorafuse's default
  threads (all cores), --repeat timed runs (default 5);
* ``lorafuse.combine(...)`` through the Python API, for information: one child, first; the three
  files opened with ``lorafuse.load`` (memory-mapped), one warm-up call, then --repeat timed calls
  (compute only, no interpreter start-up, no write), their median;
* the peer: a re-implementation (written for this benchmark) of what ``svd_merge_lora.py``
  does with its defaults (``--precision float``, no ``--device``): load each whole file with
  ``safetensors.torch.load_file`` and cast every tensor to float32; for each module add
  ``ratio * (up @ down) * alpha / rank`` into a dense float32 matrix kept for all modules;
  then per module ``torch.linalg.svd`` (full matrices, kohya's call), ``up = U_k diag(S_k)``,
  ``down = Vh_k``, both clamped to +-the 0.99 quantile of their concatenated entries (kohya's
  ``CLAMP_QUANTILE``), ``alpha = new_rank`` (an int64 scalar, as kohya writes it); the model
  hashes of kohya's metadata (sha256 of the serialized tensors) and ``save_file``. torch
  threads = the machine's cores. --peer-repeat runs (default 1, since a run takes minutes at full
  size: the peer's single run is reported; pass --peer-repeat 5 for a median); with more than one
  they alternate with lorafuse's (lorafuse, peer, lorafuse, peer, ...; the tool with more runs
  starts alone). The peer runs last, which removes lorafuse's output: one more lorafuse run,
  untimed, writes it again for the check.

Check. On a sample of modules (one of each of the 12 kinds, spread over the UNet), in float64:
the optimum D_k (numpy SVD of D = sum_i ratio_i * alpha/r * up_i @ down_i from the input files,
truncated to rank 32), and the relative Frobenius distances ``||X - D_k|| / ||D_k||`` of the
deltas ``X = alpha/r * up @ down`` of lorafuse's output and of the peer's factors before its
clamp (kept for the sampled modules only; the seconds spent keeping them are subtracted from
each of the peer's runs), and between the two (deltas, not factors: the SVD's signs are free). All
must be <= 1e-4 (2e-4 between the two). The peer's output as written, i.e. after its quantile
clamp, is compared too, for information: the clamp clips the largest ~1% of the factor entries,
which moves these deltas by several percent. The output of ``lorafuse combine`` is read as a
kohya file or, if the CLI wrote one, as a PEFT folder (the output says which).

A MISS of the target does not make the exit status non-zero; a failing tool or a wrong result
does.

Quick check:  python3 benchmarks/bench_sd.py --blocks 1
Full size:    python3 benchmarks/bench_sd.py   (the peer alone: ~9 min on 2 idle cores, 13 min measured on a
              shared 2-core machine; ~11.5 GiB of RAM, since it keeps every dense delta in float32)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    UNAVAILABLE_EXIT,
    RunResult,
    finish_workdir,
    fmt_mib,
    fmt_runs,
    make_workdir,
    median_spread,
    print_run_header,
    time_lorafuse_combine,
    tree_bytes,
)
from bench_apply import (  # noqa: E402
    MIN_RUNS,
    Tool,
    describe_runs,
    resolve_lorafuse,
    run_tool,
    run_with_peer,
    warn_few_runs,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

PEER_CHILD_COMMAND = "_kohya-svd-merge-child"  # hidden first argument: run the peer in this process
API_CHILD_COMMAND = "_lorafuse-api-child"  # hidden first argument: time lorafuse.combine in this process
PHASES_PREFIX = "PEER_PHASES "
API_RESULT_PREFIX = "API_RESULT "

TARGET_VS_PEER = 20.0  # peer wall / lorafuse wall must be >= this
MAX_REL_ERR = 1e-4  # rank-k deltas vs the float64 optimum, relative Frobenius
CLAMP_QUANTILE = 0.99  # kohya's svd_merge_lora.py
INPUTS_STAMP = "inputs.json"
SDXL_KOHYA_UNET_MODULES = 722  # what sd-scripts' LoRA (no conv_dim) creates on the SDXL UNet

UP_STD = 0.01  # sigma of lora_up's first rank direction
UP_DECAY = 0.1  # sigma of the last / sigma of the first

# diffusers' UNet2DConditionModel config of SDXL base 1.0 (the parts that set module shapes).
SDXL_UNET_CONFIG: dict[str, object] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

#: The module kinds of a SpatialTransformer that kohya's LoRA targets, in kohya's naming.
KINDS: tuple[str, ...] = (
    "proj_in",
    "attn1_to_q",
    "attn1_to_k",
    "attn1_to_v",
    "attn1_to_out_0",
    "attn2_to_q",
    "attn2_to_k",
    "attn2_to_v",
    "attn2_to_out_0",
    "ff_net_0_proj",
    "ff_net_2",
    "proj_out",
)

_DOWN_RE = re.compile(r"^down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$")
_UP_RE = re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$")
_MID_RE = re.compile(r"^mid_block\.attentions\.0\.(.+)$")
_BLOCK_RE = re.compile(r"transformer_blocks_(\d+)_")


# --------------------------------------------------------------------------------------
# SDXL module list
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Module:
    name: str  # kohya name, e.g. lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q
    out_features: int
    in_features: int

    @property
    def kind(self) -> str:
        return module_kind(self.name)

    @property
    def transformer(self) -> str:  # e.g. input_blocks_4_1
        return self.name.removeprefix("lora_unet_").split("_transformer_blocks_")[0].removesuffix(
            "_" + self.kind)


def module_kind(name: str) -> str:
    return next(k for k in sorted(KINDS, key=len, reverse=True) if name.endswith("_" + k))


def ldm_name(diffusers_name: str) -> str | None:
    """kohya's SDXL LoRA name of a diffusers UNet module inside a SpatialTransformer, or None."""
    if m := _DOWN_RE.match(diffusers_name):
        block, attn, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        prefix = f"input_blocks.{3 * block + attn + 1}.1"
    elif m := _UP_RE.match(diffusers_name):
        block, attn, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        prefix = f"output_blocks.{3 * block + attn}.1"
    elif m := _MID_RE.match(diffusers_name):
        rest = m.group(1)
        prefix = "middle_block.1"
    else:
        return None
    return "lora_unet_" + f"{prefix}.{rest}".replace(".", "_")


def sdxl_lora_modules(blocks: int | None) -> list[Module]:
    """The Linear modules kohya's LoRA targets in the SDXL UNet, with their (out, in), in kohya's
    naming; ``blocks`` keeps the first N transformer blocks of each SpatialTransformer."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    modules: list[Module] = []
    for name, module in unet.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        kohya = ldm_name(name)
        if kohya is None or not any(kohya.endswith("_" + k) for k in KINDS):
            continue
        block = _BLOCK_RE.search(kohya)
        if blocks is not None and block and int(block.group(1)) >= blocks:
            continue
        modules.append(Module(kohya, module.out_features, module.in_features))
    return modules


def describe_modules(modules: Sequence[Module], rank: int) -> None:
    shapes: dict[str, dict[tuple[int, int], int]] = {}
    for m in modules:
        shapes.setdefault(m.kind, {}).setdefault((m.out_features, m.in_features), 0)
        shapes[m.kind][(m.out_features, m.in_features)] += 1
    print(f"    {'kind':<16}{'modules':>8}  shapes (out x in: count)")
    for kind in KINDS:
        if kind in shapes:
            text = ", ".join(f"{o}x{i}: {n}" for (o, i), n in sorted(shapes[kind].items()))
            print(f"    {kind:<16}{sum(shapes[kind].values()):>8}  {text}")
    transformers = sorted({m.transformer for m in modules}, key=_transformer_order)
    factor_params = sum(rank * (m.out_features + m.in_features) for m in modules)
    dense_params = sum(m.out_features * m.in_features for m in modules)
    print(f"  {len(modules)} modules in {len(transformers)} SpatialTransformers ({', '.join(transformers)});"
          f" {factor_params:,} LoRA parameters per adapter (rank {rank}, {fmt_mib(2 * factor_params)} MiB in F16);"
          f" the dense deltas: {dense_params:,} parameters ({fmt_mib(4 * dense_params)} MiB in float32)")


def _transformer_order(name: str) -> tuple[int, int]:
    group = {"input": 0, "middle": 1, "output": 2}[name.split("_")[0]]
    number = re.search(r"blocks?_(\d+)_1$", name)
    return group, int(number.group(1)) if number else 0


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def _module_seed(seed: int, adapter: int, name: str, role: str) -> int:
    return (seed * 1_000_003 + adapter * 7919 + zlib.crc32(f"{name}.{role}".encode())) % (2**63)


def lora_factors(module: Module, adapter: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(down [r, in], up [out, r]) in F16 for one module of one adapter: down ~ U(-1/sqrt(in), 1/sqrt(in)),
    up ~ N(0, sigma_j^2) with sigma_j geometric from UP_STD to UP_STD * UP_DECAY over the rank."""
    import torch

    gen = torch.Generator().manual_seed(_module_seed(seed, adapter, module.name, "down"))
    bound = module.in_features**-0.5
    down = torch.empty(rank, module.in_features).uniform_(-bound, bound, generator=gen)
    gen = torch.Generator().manual_seed(_module_seed(seed, adapter, module.name, "up"))
    sigma = UP_STD * UP_DECAY ** (torch.arange(rank, dtype=torch.float32) / max(rank - 1, 1))
    up = torch.empty(module.out_features, rank).normal_(0.0, 1.0, generator=gen) * sigma
    return down.to(torch.float16), up.to(torch.float16)


def write_kohya_lora(path: Path, modules: Sequence[Module], adapter: int, rank: int, alpha: float, seed: int) -> None:
    """One kohya LoRA file: <module>.lora_down.weight / .lora_up.weight / .alpha (a 0-d tensor), all F16,
    with ss_* metadata; written with safetensors' save_file, as kohya's trainer does."""
    import torch
    from safetensors.torch import save_file

    state: dict[str, torch.Tensor] = {}
    for m in modules:
        down, up = lora_factors(m, adapter, rank, seed)
        state[f"{m.name}.lora_down.weight"] = down
        state[f"{m.name}.lora_up.weight"] = up
        state[f"{m.name}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_v2": "False",
        "ss_output_name": path.stem,
        "ss_training_comment": "synthetic (random weights) for bench_sd.py",
    }
    save_file(state, str(path), metadata=metadata)


@dataclass
class Inputs:
    files: list[Path]
    modules: list[Module]
    build_s: float | None  # None when reused

    @property
    def bytes(self) -> int:
        return sum(tree_bytes(f) for f in self.files)


def prepare_inputs(workdir: Path, args: argparse.Namespace, modules: list[Module]) -> Inputs:
    root = workdir / "inputs"
    wanted = {"version": 1, "blocks": args.blocks, "rank": args.input_rank, "alpha": args.alpha,
              "adapters": len(args.ratios), "seed": args.seed, "up_std": UP_STD, "up_decay": UP_DECAY}
    files = [root / f"lora_{chr(ord('a') + i)}.safetensors" for i in range(len(args.ratios))]
    stamp = root / INPUTS_STAMP
    if stamp.exists() and json.loads(stamp.read_text()) == wanted and all(f.exists() for f in files):
        print(f"  reusing {root} (same parameters, see {INPUTS_STAMP})")
        return Inputs(files, modules, None)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    for i, path in enumerate(files):
        write_kohya_lora(path, modules, i, args.input_rank, args.alpha, args.seed)
    stamp.write_text(json.dumps(wanted, indent=2) + "\n")
    return Inputs(files, modules, time.perf_counter() - t0)


# --------------------------------------------------------------------------------------
# The peer: kohya's svd_merge_lora.py, re-implemented
# --------------------------------------------------------------------------------------


def _kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """The two model hashes kohya puts in the metadata: sha256 of the serialized tensor data (the
    file as safetensors would write it with the ss_* metadata only, header excluded) and the
    sha256 of the 64 KiB at offset 1 MiB (first 8 hex digits)."""
    import safetensors.torch

    blob = safetensors.torch.save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(blob[:8], "little")
    view = memoryview(blob)
    return hashlib.sha256(view[8 + header_len:]).hexdigest(), hashlib.sha256(view[0x100000:0x110000]).hexdigest()[:8]


def _peer_accumulate(models: Sequence[str], ratios: Sequence[float]) -> tuple[dict[str, torch.Tensor], float, float]:
    """The dense float32 sum of ratio * up @ down * alpha / rank per module, over all files (kept for
    every module, as kohya does); returns it with the load and merge seconds."""
    import torch
    from safetensors.torch import load_file

    merged: dict[str, torch.Tensor] = {}
    load_s = merge_s = 0.0
    for model, ratio in zip(models, ratios):
        t0 = time.perf_counter()
        lora_sd = {k: v.to(torch.float32) for k, v in load_file(model).items()}  # --precision float
        t1 = time.perf_counter()
        for key in list(lora_sd):
            if "lora_down" not in key:
                continue
            name = key[: key.rfind(".lora_down")]
            down = lora_sd[key]
            up = lora_sd[name + ".lora_up.weight"]
            if down.dim() != 2:
                raise SystemExit(f"{model}: {name} is not a Linear LoRA (down {tuple(down.shape)}); "
                                 "this peer handles Linear modules only")
            rank = down.shape[0]
            alpha = lora_sd.get(name + ".alpha", rank)
            weight = merged.get(name)
            if weight is None:
                weight = torch.zeros((up.shape[0], down.shape[1]), dtype=torch.float32)
            merged[name] = weight + ratio * (up @ down) * (alpha / rank)
        t2 = time.perf_counter()
        load_s += t1 - t0
        merge_s += t2 - t1
    return merged, load_s, merge_s


def _peer_extract(merged: dict[str, torch.Tensor], new_rank: int, clamp: bool, keep: set[str]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float, dict[str, float]]:
    """Per module: full SVD of the dense matrix, rank new_rank, singular values on up, the quantile
    clamp. Returns the state dict, the unclamped factors of the modules in `keep` (for the check),
    the seconds spent keeping those and the seconds of torch.linalg.svd per module shape."""
    import torch

    out: dict[str, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}
    keep_s = 0.0
    svd_s: dict[str, float] = {}
    with torch.no_grad():
        for name, mat in merged.items():
            k = min(new_rank, mat.shape[0], mat.shape[1])
            t = time.perf_counter()
            u, s, vh = torch.linalg.svd(mat)  # kohya's call: full_matrices=True
            shape = f"{mat.shape[0]}x{mat.shape[1]}"
            svd_s[shape] = svd_s.get(shape, 0.0) + time.perf_counter() - t
            up = u[:, :k] @ torch.diag(s[:k])
            down = vh[:k, :]
            if name in keep:
                t = time.perf_counter()
                kept[name + ".lora_up.weight"] = up.clone(memory_format=torch.contiguous_format)
                kept[name + ".lora_down.weight"] = down.clone(memory_format=torch.contiguous_format)
                kept[name + ".alpha"] = torch.tensor(k)
                keep_s += time.perf_counter() - t
            if clamp:
                hi = torch.quantile(torch.cat([up.flatten(), down.flatten()]), CLAMP_QUANTILE)
                up = up.clamp(-hi, hi)
                down = down.clamp(-hi, hi)
            out[name + ".lora_up.weight"] = up.contiguous()
            out[name + ".lora_down.weight"] = down.contiguous()
            out[name + ".alpha"] = torch.tensor(k)  # int64, as kohya writes it
    return out, kept, keep_s, svd_s


def peer_child(spec_path: str) -> int:
    """kohya's svd_merge_lora.py with its defaults; prints per-phase seconds as one JSON line."""
    spec = json.loads(Path(spec_path).read_text())
    t0 = time.perf_counter()
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(spec["threads"])
    t1 = time.perf_counter()
    merged, load_s, merge_s = _peer_accumulate(spec["models"], spec["ratios"])
    t2 = time.perf_counter()
    state, kept, keep_s, svd_s = _peer_extract(merged, spec["rank"], spec["clamp"], set(spec["check_modules"]))
    t3 = time.perf_counter()
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(spec["rank"]),
                "ss_network_alpha": str(spec["rank"]), "ss_v2": "False", "ss_base_model_version": "sdxl_base_v1-0"}
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = _kohya_hashes(state, metadata)
    save_file(state, spec["out"], metadata=metadata)
    t4 = time.perf_counter()
    if kept:
        save_file(kept, spec["check_out"])
    t5 = time.perf_counter()
    phases = {"import": t1 - t0, "load": load_s, "merge": merge_s, "svd": t3 - t2 - keep_s, "save": t4 - t3,
              "check-only": keep_s + t5 - t4, "modules": len(merged),
              "svd_by_shape": svd_s}
    print(PHASES_PREFIX + json.dumps(phases), flush=True)
    return 0


# --------------------------------------------------------------------------------------
# lorafuse through the Python API
# --------------------------------------------------------------------------------------


def api_child(spec_path: str) -> int:
    """lorafuse.load of the inputs, one warm-up lorafuse.combine, then `repeat` timed calls (all printed)."""
    spec = json.loads(Path(spec_path).read_text())
    timed = time_lorafuse_combine(spec["models"], spec["ratios"], spec["rank"], spec["threads"], spec["repeat"],
                                  dtype="fp32")
    if timed is None:
        return UNAVAILABLE_EXIT
    _, result, load_s, times = timed
    out = {"load_s": load_s, "times": times, "modules": len(result.updates),
           "randomized": len(getattr(result, "randomized", []))}
    print(API_RESULT_PREFIX + json.dumps(out), flush=True)
    return 0


# --------------------------------------------------------------------------------------
# Running the tools
# --------------------------------------------------------------------------------------


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _run_json(run: RunResult, prefix: str) -> dict | None:
    """The JSON line a child printed after `prefix` in one run's log."""
    for line in run.log_path.read_text(errors="replace").splitlines():
        if line.startswith(prefix):
            return json.loads(line[len(prefix):])
    return None


def _prefixed_json(tool: Tool, prefix: str) -> dict | None:
    """The JSON line of the tool's median run."""
    return _run_json(tool.median_run, prefix) if tool.runs else None


def peer_seconds(peer: Tool) -> list[float]:
    """Each peer run's wall time less the seconds it spent keeping factors for the check (its "check-only")."""
    out = []
    for run in peer.runs:
        phases = _run_json(run, PHASES_PREFIX) or {}
        out.append(run.wall_s - float(phases.get("check-only", 0.0)))
    return out


def ratios_arg(ratios: Sequence[float]) -> str:
    return ",".join(repr(float(r)) for r in ratios)  # exact: repr round-trips


# --------------------------------------------------------------------------------------
# Check
# --------------------------------------------------------------------------------------


def kohya_delta64(path: Path, module: str) -> np.ndarray:
    """alpha / r * up @ down of a Linear module of a kohya file, in float64 (alpha missing: alpha = r)."""
    import numpy as np
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        keys = set(f.keys())
        if f"{module}.lora_down.weight" not in keys:
            raise KeyError(f"{path}: no module {module}")
        down = f.get_tensor(f"{module}.lora_down.weight").astype(np.float64)
        up = f.get_tensor(f"{module}.lora_up.weight").astype(np.float64)
        rank = down.shape[0]
        alpha = float(f.get_tensor(f"{module}.alpha").reshape(-1)[0]) if f"{module}.alpha" in keys else float(rank)
    return (alpha / rank) * (up @ down)


def peft_delta64(folder: Path, module: str) -> np.ndarray:
    """lora_alpha / r * B @ A of a module of a PEFT folder (rank_pattern / alpha_pattern / rslora honoured)."""
    from _common import peft_lora_delta64

    return peft_lora_delta64(folder, module).numpy()


def output_delta64(path: Path, module: str) -> np.ndarray:
    return peft_delta64(path, module) if path.is_dir() else kohya_delta64(path, module)


def output_summary(path: Path) -> tuple[str, int, list[int]]:
    """(format, number of modules, ranks) of a combined output: a kohya file or a PEFT folder."""
    from safetensors import safe_open

    if path.is_dir():
        from _common import ADAPTER_WEIGHTS_NAME, find_peft_adapter_dir

        weights, suffix, fmt = find_peft_adapter_dir(path) / ADAPTER_WEIGHTS_NAME, ".lora_A.weight", "PEFT folder"
    else:
        weights, suffix, fmt = path, ".lora_down.weight", "kohya file"
    with safe_open(str(weights), framework="np") as f:
        keys = [k for k in f.keys() if k.endswith(suffix)]
        ranks = sorted({f.get_slice(k).get_shape()[0] for k in keys})
    return fmt, len(keys), ranks


def check_modules(modules: Sequence[Module]) -> list[str]:
    """One module of each kind, spread over the SpatialTransformers and their blocks."""
    transformers = sorted({m.transformer for m in modules}, key=_transformer_order)
    chosen: list[str] = []
    for i, kind in enumerate(KINDS):
        wanted = transformers[(5 * i) % len(transformers)]
        candidates = [m.name for m in modules if m.kind == kind and m.transformer == wanted]
        if not candidates:
            candidates = [m.name for m in modules if m.kind == kind]
        if candidates:
            chosen.append(candidates[(3 * i) % len(candidates)])
    return chosen


_COLUMNS = {"lorafuse": "lorafuse err", "peer-unclamped": "peer err", "peer": "peer written err"}
_PAIRS = {("lorafuse", "peer-unclamped"): "lf vs peer", ("lorafuse", "peer"): "lf vs written"}


def _reference_optimum(inputs: Inputs, ratios: Sequence[float], rank: int, module: str) -> tuple[np.ndarray, float]:
    """(D_k, s_{k+1} / s_k): numpy's float64 SVD of D = sum_i ratio_i * alpha/r * up_i @ down_i, truncated."""
    import numpy as np

    d = sum(ratio * kohya_delta64(path, module) for path, ratio in zip(inputs.files, ratios))
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    k = min(rank, len(s))
    return (u[:, :k] * s[:k]) @ vt[:k], float(s[k] / s[k - 1]) if k < len(s) else 0.0


def check_structure(outputs: dict[str, Path], expected: int, rank: int) -> tuple[bool, list[str]]:
    ok, notes = True, []
    for label, path in outputs.items():
        if label == "peer-unclamped":
            continue
        fmt, count, ranks = output_summary(path)
        good = count == expected and ranks == [rank]
        ok &= good
        print(f"  {label}: {path}: {fmt}, {count} modules (expected {expected}), ranks {ranks}" + ("" if good else "  WRONG"))
        if label == "lorafuse" and fmt != "kohya file":
            notes.append(f"lorafuse combine wrote a {fmt} for kohya inputs (-o {path.name}), not a kohya file")
    return ok, notes


def check_outputs(inputs: Inputs, ratios: Sequence[float], rank: int, outputs: dict[str, Path],
                  sample: Sequence[str]) -> tuple[bool, list[str]]:
    """Rank-k deltas of the tools vs the float64 optimum and vs each other, on the sampled modules."""
    import numpy as np

    print("\ncorrectness")
    ok, notes = check_structure(outputs, len(inputs.modules), rank)
    print(f"  float64 optimum D_k: numpy SVD of D = sum_i ratio_i * alpha/r * up_i @ down_i (from the input files),"
          f" truncated to rank {rank}. err = ||X - D_k||_F / ||D_k||_F of a tool's delta X (limit {MAX_REL_ERR:g});"
          f" 'lf vs ...' = ||X_lorafuse - X_peer||_F / ||D_k||_F (limit {2 * MAX_REL_ERR:g} for the peer before its clamp)."
          f" 'peer' = the peer's factors before kohya's {CLAMP_QUANTILE} quantile clamp, 'written' = its output file.")
    labels = [l for l in _COLUMNS if l in outputs]
    pairs = [p for p in _PAIRS if all(x in outputs for x in p)]
    print(f"    {'module (lora_unet_...)':<58}{'shape':>14}{'s33/s32':>9}"
          + "".join(f"{_COLUMNS[l]:>18}" for l in labels) + "".join(f"{_PAIRS[p]:>15}" for p in pairs))
    worst: dict[tuple[str, str], float] = {}
    for module in sample:
        dk, gap = _reference_optimum(inputs, ratios, rank, module)
        norm_dk = float(np.linalg.norm(dk))
        line = f"    {module.removeprefix('lora_unet_'):<58}{str(dk.shape):>14}{gap:>9.3f}"
        deltas: dict[str, np.ndarray] = {}
        for label in labels:
            try:
                deltas[label] = output_delta64(outputs[label], module)
            except KeyError:
                line += f"{'missing':>18}"
                ok = False
                continue
            err = float(np.linalg.norm(deltas[label] - dk)) / norm_dk
            ok &= label == "peer" or err <= MAX_REL_ERR
            line += f"{err:>18.2e}"
        for a, b in pairs:
            if a in deltas and b in deltas:
                diff = float(np.linalg.norm(deltas[a] - deltas[b])) / norm_dk
                worst[(a, b)] = max(worst.get((a, b), 0.0), diff)
                ok &= b == "peer" or diff <= 2 * MAX_REL_ERR
                line += f"{diff:>15.2e}"
            else:
                line += f"{'-':>15}"
        print(line, flush=True)
    for (a, b), value in worst.items():
        if b == "peer-unclamped":
            print(f"  max over {len(sample)} modules, lorafuse vs the peer (before its clamp): {value:.2e}"
                  f" (limit {2 * MAX_REL_ERR:g})")
        else:
            print(f"  max over {len(sample)} modules, lorafuse vs the peer's output as written: {value:.2e}"
                  " (information: the effect of kohya's quantile clamp)")
    print(f"  combine: {'OK' if ok else 'MISMATCH'}")
    return ok, notes


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def _loadavg() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg()) + " (1/5/15 min)"
    except OSError:
        return "n/a"


def make_tools(args: argparse.Namespace, inputs: Inputs, workdir: Path, sample: Sequence[str]) -> tuple[Tool, Tool, Tool]:
    models = [str(f) for f in inputs.files]
    out_lf = workdir / "out_lorafuse.safetensors"
    lf_threads = [] if args.lorafuse_threads is None else ["--threads", str(args.lorafuse_threads)]
    if args.skip_lorafuse:
        lf = Tool("lorafuse", "lorafuse combine (CLI)", out_lf, None, "--skip-lorafuse")
        api = Tool("api", "lorafuse.combine (API)", workdir / "none", None, "--skip-lorafuse")
    else:
        cmd, reason = resolve_lorafuse(args.lorafuse_cmd)
        # --dtype fp32: float32 factors, as the peer writes (svd_merge_lora's default --save_precision float);
        # lorafuse's default keeps the inputs' F16, whose rounding (~5e-4) would hide the math being compared
        full = None if cmd is None else [*cmd, "combine", *models, f"--weights={ratios_arg(args.ratios)}",
                                         "--method", "svd", "--rank", str(args.rank), "--dtype", "fp32",
                                         "-o", str(out_lf), *lf_threads]
        lf = Tool("lorafuse", "lorafuse combine (CLI)", out_lf, full, f"not available: {reason}")
        spec_path = workdir / "api_spec.json"
        spec_path.write_text(json.dumps({"models": models, "ratios": list(args.ratios), "rank": args.rank,
                                         "threads": args.lorafuse_threads or 0, "repeat": args.repeat}, indent=2))
        api = Tool("api", "lorafuse.combine (API)", workdir / "none",
                   [sys.executable, str(Path(__file__).resolve()), API_CHILD_COMMAND, str(spec_path)])
    out_peer = workdir / "out_peer.safetensors"
    label = "kohya svd_merge_lora" + ("" if args.clamp else " (no clamp)")
    if args.skip_peer:
        peer = Tool("peer", label, out_peer, None, "--skip-peer")
    else:
        spec_path = workdir / "peer_spec.json"
        spec_path.write_text(json.dumps({
            "models": models, "ratios": list(args.ratios), "rank": args.rank, "threads": args.threads,
            "clamp": args.clamp, "out": str(out_peer), "check_modules": list(sample),
            "check_out": str(workdir / "peer_unclamped.safetensors")}, indent=2))
        peer = Tool("peer", label, out_peer, [sys.executable, str(Path(__file__).resolve()), PEER_CHILD_COMMAND, str(spec_path)])
    return lf, api, peer


def print_table(inputs: Inputs, args: argparse.Namespace, lf: Tool, api: Tool, peer: Tool,
                api_result: dict | None) -> list[str]:
    print(f"\nResult: {len(inputs.files)} kohya LoRAs (rank {args.input_rank}, {len(inputs.modules)} SDXL UNet modules,"
          f" {fmt_mib(inputs.bytes)} MiB of files) -> one rank-{args.rank} LoRA, SVD merge, ratios {ratios_arg(args.ratios)}")
    header = f"{'tool':<34}{'wall s: median (min..max)':>30}{'cpu s':>10}{'peak RSS MiB':>15}{'peak anon MiB':>15}"
    print(header)
    print("-" * len(header))
    for tool in (lf, api, peer):
        if tool.cmd is None:
            print(f"{tool.label:<34}  skipped: {tool.skip_reason[:90]}")
        elif not tool.ok:
            print(f"{tool.label:<34}  FAILED (exit {tool.runs[-1].returncode}, log {tool.runs[-1].log_path})")
        elif tool is api:
            if api_result:
                anon = "n/a" if tool.peak_anon is None else fmt_mib(tool.peak_anon)
                print(f"{'lorafuse.combine (API, compute)':<34}{fmt_runs(api_result['times'], 3):>30}{'':>10}"
                      f"{fmt_mib(tool.peak_rss):>15}{anon:>15}")
        else:
            anon = "n/a" if tool.peak_anon is None else fmt_mib(tool.peak_anon)
            print(f"{tool.label:<34}{fmt_runs(tool.walls):>30}{tool.cpu_s:>10.2f}{fmt_mib(tool.peak_rss):>15}{anon:>15}")
    print("wall: the median of the runs, the spread (min..max) and the number of runs; cpu: median; peak RSS ="
          " ru_maxrss of the tool's process, the worst run (GNU time %M; includes mmap'ed file pages); peak anon ="
          " RssAnon sampled every 20 ms, the worst run. CLI: end to end; API: one child, compute only, the calls"
          " after a warm-up call.")
    summary: list[str] = []
    if lf.ok and peer.ok:
        seconds = peer_seconds(peer)
        peer_s = median_spread(seconds)[0]
        ratio = peer_s / lf.wall_s
        verdict = "PASS" if ratio >= TARGET_VS_PEER else "MISS"
        if len(seconds) == 1:
            kept = peer.runs[0].wall_s - seconds[0]
            runs = f"its single run less the {kept:.2f} s it spent keeping factors for the check"
        else:
            runs = (f"the median (min..max) of its runs {fmt_runs(seconds, 1)}, each less the seconds it spent keeping"
                    " factors for the check")
        line = (f"kohya svd_merge_lora / lorafuse combine = {peer_s:.1f} s / {lf.wall_s:.2f} s = {ratio:.1f}x"
                f" (ratio of medians; peer: {runs}; lorafuse: median of {len(lf.runs)});"
                f" target >= {TARGET_VS_PEER:g}x: {verdict}")
        print(line)
        print(f"peak RSS: peer / lorafuse = {peer.peak_rss / max(lf.peak_rss, 1):.1f}x (worst runs)")
        summary.append(line)
    else:
        print(f"kohya svd_merge_lora / lorafuse combine = n/a (target >= {TARGET_VS_PEER:g}x)")
    return summary


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Quick check: --blocks 1. Full size: no options (the peer takes 9-13 min and ~11.5 GiB on 2 cores).")
    p.add_argument("--blocks", type=int, default=None,
                   help="keep the first N transformer blocks of each SpatialTransformer (default: all, as SDXL: 2 or 10)")
    p.add_argument("--rank", type=int, default=32, help="output rank (default %(default)s)")
    p.add_argument("--input-rank", type=int, default=32, help="rank of the three input LoRAs (default %(default)s)")
    p.add_argument("--alpha", type=float, default=16.0, help="alpha of the input LoRAs (default %(default)s)")
    p.add_argument("--ratios", type=lambda t: [float(x) for x in t.split(",") if x.strip()], default=[1.0, 0.7, 0.5],
                   help="one ratio (weight) per input LoRA; their number sets the number of inputs (default 1.0,0.7,0.5)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the peer (default %(default)s)")
    p.add_argument("--lorafuse-threads", type=int, default=None, help="lorafuse --threads (default: lorafuse's own, all cores)")
    p.add_argument("--repeat", type=int, default=MIN_RUNS,
                   help="timed lorafuse CLI runs and timed API calls (after a warm-up call); the median, its spread"
                   f" (min..max) and the count are reported (default %(default)s; fewer than {MIN_RUNS} only with a"
                   " warning)")
    p.add_argument("--peer-repeat", type=int, default=1,
                   help="timed runs of the peer; with N > 1 they alternate with lorafuse's and their median is"
                   " reported. Default %(default)s, since a peer run takes minutes at full size: the peer's single run"
                   " is reported; pass --peer-repeat 5 for a median")
    p.add_argument("--no-clamp", dest="clamp", action="store_false", help="peer: skip kohya's quantile clamp of the factors")
    p.add_argument("--skip-peer", action="store_true", help="do not run the peer")
    p.add_argument("--skip-lorafuse", action="store_true", help="do not run lorafuse")
    p.add_argument("--workdir", default=None, help="work directory (default: a fresh temp dir under /tmp); inputs in it are reused when built with the same options")
    p.add_argument("--keep", action="store_true", help="keep the work directory and the outputs")
    p.add_argument("--lorafuse-cmd", default=None, help="command that runs the lorafuse CLI (default: `lorafuse` on PATH, else `python3 -m lorafuse`)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random factors (default %(default)s)")
    args = p.parse_args(argv)
    if min(args.rank, args.input_rank, args.threads, args.repeat, args.peer_repeat) < 1 or (
            args.blocks is not None and args.blocks < 1):
        p.error("--blocks, --rank, --input-rank, --threads, --repeat and --peer-repeat must be >= 1")
    if args.lorafuse_threads is not None and args.lorafuse_threads < 0:
        p.error("--lorafuse-threads must be >= 0")
    if not 1 <= len(args.ratios) <= 26:
        p.error("--ratios needs 1 to 26 values")
    warn_few_runs(args.repeat, None if args.skip_peer else args.peer_repeat)
    return args


def run(args: argparse.Namespace, workdir: Path, log_dir: Path) -> int:
    status = 0
    print(f"\ninputs: {len(args.ratios)} kohya LoRA files for the SDXL UNet (module names and shapes from diffusers'"
          " UNet2DConditionModel with the SDXL base config, built on the meta device, renamed to kohya's LDM names),"
          f" rank {args.input_rank}, alpha {args.alpha:g}, F16; down ~ U(-1/sqrt(in), 1/sqrt(in)),"
          f" up ~ N(0, sigma_j^2), sigma_j from {UP_STD:g} to {UP_STD * UP_DECAY:g}"
          + (f"; first {args.blocks} transformer block(s) per SpatialTransformer" if args.blocks else ""))
    modules = sdxl_lora_modules(args.blocks)
    describe_modules(modules, args.input_rank)
    if args.blocks is None and len(modules) != SDXL_KOHYA_UNET_MODULES:
        print(f"  warning: expected {SDXL_KOHYA_UNET_MODULES} modules (kohya's LoRA on the SDXL UNet), got {len(modules)}")
    inputs = prepare_inputs(workdir, args, modules)
    print(f"  {', '.join(f.name for f in inputs.files)} in {inputs.files[0].parent}: {fmt_mib(inputs.bytes)} MiB"
          + (f"; built in {inputs.build_s:.1f} s" if inputs.build_s is not None else ""))
    sample = check_modules(modules)
    lf, api, peer = make_tools(args, inputs, workdir, sample)
    print("\nmethod: " + describe_runs(args.repeat, None if args.skip_peer else args.peer_repeat)
          + f" (lorafuse: the CLI, end to end). API: one child, before those runs: a warm-up call, then {args.repeat}"
          " timed calls, their median (min..max). Each timed run is preceded (untimed) by removing the outputs,"
          f" `sync` and reading the inputs once. lorafuse threads {args.lorafuse_threads or 'default (all cores)'};"
          f" peer torch threads {args.threads}. load average now: {_loadavg()}"
          " (other work on the machine skews the timings)")
    unclamped = workdir / "peer_unclamped.safetensors"
    all_outputs = [lf.out_dir, peer.out_dir, unclamped]
    if api.cmd is None:
        print(f"\n[{api.label}] skipped: {api.skip_reason}")
    else:
        run_tool(api, 1, inputs.files, log_dir, all_outputs)
        if not api.ok and api.runs[-1].returncode == UNAVAILABLE_EXIT:
            api.cmd, api.skip_reason, api.runs = None, api.runs[-1].log_tail(1), []
    if not run_with_peer(lf, peer, args.repeat, args.peer_repeat, inputs.files, log_dir, [unclamped]):
        status = 1
    status |= int(any(t.cmd is not None and not t.ok for t in (lf, api, peer)))
    print(f"\nload average after the runs: {_loadavg()}")
    api_result = _prefixed_json(api, API_RESULT_PREFIX) if api.ok else None
    if api_result:
        print(f"lorafuse.combine (API): load {api_result['load_s']:.3f} s, timed combine calls after the warm-up "
              + ", ".join(f"{t:.3f}" for t in api_result["times"])
              + f" s: median {fmt_runs(api_result['times'], 3)}; {api_result['modules']} modules,"
              f" {api_result['randomized']} took the randomized SVD")
    peer_phases = _prefixed_json(peer, PHASES_PREFIX) if peer.ok else None
    if peer_phases:
        shown = {k: v for k, v in peer_phases.items() if k not in ("modules", "svd_by_shape")}
        which = "" if len(peer.runs) == 1 else f", its median run of {len(peer.runs)}"
        print("peer phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in shown.items())
              + f" ({peer_phases['modules']:.0f} modules{which})")
        by_shape = sorted(peer_phases.get("svd_by_shape", {}).items(), key=lambda kv: -kv[1])
        print("  torch.linalg.svd seconds by module shape: " + ", ".join(f"{k} {v:.1f}" for k, v in by_shape))

    outputs = {"lorafuse": lf.out_dir} if lf.ok else {}
    if peer.ok:
        outputs["peer-unclamped"] = unclamped
        outputs["peer"] = peer.out_dir
    good, notes = check_outputs(inputs, args.ratios, args.rank, outputs, sample)
    if not good:
        status = 1
    print_table(inputs, args, lf, api, peer, api_result)
    for note in notes:
        print(f"note: {note}")
    if not args.keep:
        for path in all_outputs:
            _remove(path)
    return status


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == PEER_CHILD_COMMAND:
        return peer_child(argv[1])
    if argv and argv[0] == API_CHILD_COMMAND:
        return api_child(argv[1])
    args = parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    print_run_header("bench_sd: lorafuse combine --method svd vs kohya svd_merge_lora.py (dense full SVD), SDXL UNet LoRAs",
                     argv, [("load avg", f"{_loadavg()}  (other work on the machine skews the timings)")])
    workdir, log_dir, own_workdir = make_workdir(args.workdir, "lorafuse-bench-sd-")
    try:
        return run(args, workdir, log_dir)
    finally:
        finish_workdir(workdir, args.keep, own_workdir)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
