"""Helpers of the fault tests (test_faults.py, test_memory_limit.py).

Synthetic llama-shaped checkpoints and PEFT adapters of any size, written straight to
disk in the safetensors format (no torch, no lorafuse, nothing held in memory), the
`lorafuse apply` command as a subprocess, hashes of file trees and the temporary
entries an output can leave beside it.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ADAPTER_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4}

_POOL_BYTES = 8 << 20


def _pool() -> bytes:
    """8 MiB of varied, finite BF16 values (about N(0, 0.02)), the material of every synthetic tensor."""
    x = np.random.default_rng(1234).standard_normal(_POOL_BYTES // 2, dtype=np.float32) * 0.02
    return (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()


_POOL: bytes | None = None


@dataclass(frozen=True)
class Spec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * ITEMSIZE[self.dtype]


def write_safetensors(path: Path, specs: Sequence[Spec], fill: Callable[[Spec], bytes | None] | None = None,
                      metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file. A tensor's bytes are `fill(spec)`, or else a slice of the pool
    (cyclic, at an offset that depends on the tensor's name) reinterpreted in the tensor's dtype."""
    global _POOL
    if _POOL is None:
        _POOL = _pool()
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    pool = memoryview(_POOL)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body)
        for s in specs:
            data = fill(s) if fill is not None else None
            if data is not None:
                assert len(data) == s.nbytes
                f.write(data)
                continue
            start = int(hashlib.sha256(s.name.encode()).hexdigest()[:8], 16) % (_POOL_BYTES // 4) * 4
            left = s.nbytes
            while left:
                n = min(left, _POOL_BYTES - start)
                f.write(pool[start : start + n])
                left -= n
                start = 0


def llama_specs(layers: int, hidden: int, inter: int, vocab: int, dtype: str = "BF16") -> list[Spec]:
    specs = [Spec("model.embed_tokens.weight", dtype, (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [Spec(p + "input_layernorm.weight", dtype, (hidden,))]
        specs += [Spec(p + f"self_attn.{m}.weight", dtype, (hidden, hidden)) for m in ("q_proj", "k_proj", "v_proj",
                                                                                         "o_proj")]
        specs += [Spec(p + "post_attention_layernorm.weight", dtype, (hidden,))]
        specs += [Spec(p + f"mlp.{m}.weight", dtype, (inter, hidden)) for m in ("gate_proj", "up_proj")]
        specs += [Spec(p + "mlp.down_proj.weight", dtype, (hidden, inter))]
    specs += [Spec("model.norm.weight", dtype, (hidden,)), Spec("lm_head.weight", dtype, (vocab, hidden))]
    return specs


def write_checkpoint(folder: Path, specs: Sequence[Spec], shards: int = 1) -> Path:
    """A transformers-style checkpoint folder: config.json and model.safetensors, or `shards`
    shards of about equal size with model.safetensors.index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16"}) + "\n")
    if shards == 1:
        write_safetensors(folder / "model.safetensors", specs)
        return folder
    total = sum(s.nbytes for s in specs)
    groups: list[list[Spec]] = [[]]
    size = 0
    for s in specs:
        if size >= total * len(groups) / shards and len(groups) < shards:
            groups.append([])
        groups[-1].append(s)
        size += s.nbytes
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, group in zip(names, groups):
        write_safetensors(folder / name, group)
    index = {"metadata": {"total_size": total},
             "weight_map": {s.name: name for name, group in zip(names, groups) for s in group}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def write_peft_adapter(folder: Path, specs: Sequence[Spec], targets: Sequence[str], r: int = 8, alpha: int = 16,
                       seed: int = 0, scale_b: float = 0.05) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors, F32 factors) for every
    weight of `specs` whose module name ends with one of `targets`. Returns {module: (A, B)}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for s in specs:
        module = s.name.removesuffix(".weight")
        if len(s.shape) == 2 and module.endswith(tuple(targets)):
            out_f, in_f = s.shape
            a = (rng.standard_normal((r, in_f)) * 0.05).astype(np.float32)
            b = (rng.standard_normal((out_f, r)) * scale_b).astype(np.float32)
            factors[module] = (a, b)
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b
    adapter_specs = [Spec(k, "F32", v.shape) for k, v in tensors.items()]
    write_safetensors(folder / ADAPTER_FILE, adapter_specs, fill=lambda s: tensors[s.name].tobytes())
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
           "target_modules": sorted(set(targets)), "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
           "fan_in_fan_out": False, "base_model_name_or_path": None}
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return factors


RECORD_FREE_MARK = b"# lorafuse model card"  # what record_free puts for a model card (README.md) lorafuse wrote


def record_free(name: str, data: bytes) -> bytes:
    """A file of an output without what records how the run was invoked (issue #16: the command line or the
    Python call differ between runs that write the same weights): a .safetensors file's header without its
    `lorafuse.*` metadata (the rest of the header and the data as they are), lorafuse's model card (README.md)
    as a fixed mark, the manifest without the card's entry and the .safetensors files' sizes and sampled hashes
    (their headers' lengths follow the record's, and a big file's sampled hash takes in its header). Other files
    as they are."""
    base = name.rsplit("/", 1)[-1]
    try:
        if base.endswith(".safetensors"):
            (n,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8:8 + n])
            meta = header.get("__metadata__", {})
            header["__metadata__"] = {k: v for k, v in meta.items() if not k.startswith("lorafuse.")}
            return json.dumps(header).encode() + b"\0" + data[8 + n:]
        if base == "README.md" and b"\n- lorafuse\n" in data:
            return RECORD_FREE_MARK
        if base == "lorafuse_manifest.json":
            manifest = json.loads(data)
            files = {k: ({f: v for f, v in rec.items() if f not in ("size", "sample_sha256")}  # (the header's in it)
                         if k.endswith(".safetensors") else rec)
                     for k, rec in manifest["files"].items() if k != "README.md"}
            return json.dumps({**manifest, "files": files}, sort_keys=True).encode()
    except (ValueError, struct.error, AttributeError, KeyError, TypeError):  # not lorafuse's: as it is
        pass
    return data


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (or of `root` itself when it is a file), each without the run's record
    (record_free); {} when absent."""
    if not root.exists():
        return {}
    if root.is_file():
        return {"": hashlib.sha256(record_free(root.name, root.read_bytes())).hexdigest()}
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = str(p.relative_to(root))
            out[rel] = hashlib.sha256(record_free(rel, p.read_bytes())).hexdigest()
    return out


def leftovers(out: Path) -> list[str]:
    """Entries beside `out` that a run writing `out` made (temporary files, moved-aside outputs)."""
    if not out.parent.exists():
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def temp_pattern(out: Path) -> re.Pattern[str]:
    """The name of lorafuse's temporary entry for `out`: `.NAME.tmp-PID-XXXXXXXX`."""
    return re.compile(rf"\.{re.escape(out.name)}\.tmp-(\d+)-[a-z0-9_]{{8}}\Z")


def lorafuse_cmd(*args: object) -> list[str]:
    return [sys.executable, "-m", "lorafuse", "apply", *map(str, args), "--no-progress", "-q"]


def run_apply(*args: object, timeout: float = 120, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(lorafuse_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          **kwargs)  # type: ignore[call-overload]
