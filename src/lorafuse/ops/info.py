"""info: describe an adapter or a checkpoint (for people, or as JSON)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from lorafuse.formats import adapter_format, load
from lorafuse.io.checkpoint import Checkpoint
from lorafuse.io.pipeline import Pipeline, is_pipeline
from lorafuse.model import Adapter, LoraUpdate, stored_tensors
from lorafuse.model.state import metadata_of


def describe_adapter(adapter: Adapter, threads: int = 0) -> dict[str, object]:
    norms = adapter.norms(threads)
    modules = []
    for name, u in adapter.updates.items():
        modules.append({
            "name": name,
            "kind": u.kind if isinstance(u, LoraUpdate) else f"{u.algo} ({u.kind})",
            "rank": u.rank,
            "scale": u.scale,
            "shape": list(u.delta_shape),
            "dtype": "/".join(dict.fromkeys(t.dtype for t in stored_tensors(u))),
            "dora": u.magnitude is not None,
            "bias": u.bias is not None,
            "delta_norm": norms[name],
        })
    cfg = adapter.config
    meta = metadata_of(adapter.state)  # kohya / diffusers: the file's metadata
    # kohya / diffusers files store an alpha per module (alpha = scale * r); a LoHa / LoKr's scale is
    # alpha over its own dimension, not over the rank of its exact factorization: shown as scales only
    alphas = sorted({round(u.scale * u.rank, 6) for u in adapter.updates.values() if isinstance(u, LoraUpdate)})
    return {
        "type": "adapter",
        "format": adapter.format,
        "path": str(adapter.path) if adapter.path else None,
        "modules": len(adapter.updates),
        "ranks": dict(sorted(Counter(u.rank for u in adapter.updates.values()).items())),
        "scales": sorted({round(u.scale, 8) for u in adapter.updates.values()}),
        "lora_alpha": ((", ".join(f"{a:g}" for a in alphas) or "- (LoHa / LoKr only: see scales)")
                       if adapter.format in ("kohya", "diffusers") else cfg.get("lora_alpha")),
        "use_rslora": bool(cfg.get("use_rslora", False)),
        "dora": any(u.magnitude is not None for u in adapter.updates.values()),
        "dtypes": dict(Counter(t.dtype for u in adapter.updates.values() for t in stored_tensors(u))),
        "parameters": adapter.num_parameters(),
        "full_tensors": sorted(adapter.full),
        "base_model": cfg.get("base_model_name_or_path") or meta.get("ss_sd_model_name"),
        "module_details": modules,
    }


def describe_checkpoint(ckpt: Checkpoint) -> dict[str, object]:
    infos = [t for h in ckpt.headers.values() for t in h.values()]
    return {
        "type": "checkpoint",
        "path": str(ckpt.directory),
        "shards": ckpt.shards,
        "sharded": ckpt.sharded,
        "tensors": len(infos),
        "parameters": sum(t.numel for t in infos),
        "bytes": ckpt.total_bytes(),
        "dtypes": dict(Counter(t.dtype for t in infos)),
    }


def describe_pipeline(pipe: Pipeline) -> dict[str, object]:
    """A diffusers pipeline folder: each component with weights, described as a checkpoint."""
    return {"type": "pipeline", "path": str(pipe.directory),
            "components": {name: describe_checkpoint(ck) for name, ck in pipe.components.items()}}


def describe(path: str | os.PathLike[str], threads: int = 0) -> dict[str, object]:
    """An adapter (PEFT folder, kohya / LyCORIS file, diffusers LoRA file), a checkpoint, or a
    diffusers pipeline folder."""
    p = Path(path)
    if is_pipeline(p):
        return describe_pipeline(Pipeline(p))
    if adapter_format(p) is not None:
        return describe_adapter(load(p), threads)
    return describe_checkpoint(Checkpoint(p))
