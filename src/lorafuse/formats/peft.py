"""PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`.

Keys are `base_model.model.<module>.lora_A.weight` (r x in) and `.lora_B.weight`
(out x r); embeddings use `lora_embedding_A` (r x num_embeddings) and
`lora_embedding_B` (dim x r); DoRA adds `lora_magnitude_vector`; `lora_bias` adds
`lora_B.bias`; `<module>.base_layer.weight` (saved with embedding layers) and any
other tensor is a full copy of a base weight (`modules_to_save`) that replaces it.
Scale per module is alpha / r (alpha / sqrt(r) with rslora), with `rank_pattern`
and `alpha_pattern` overriding r and alpha for the modules they match.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lorafuse.adapter import Adapter, Kind, LoraUpdate
from lorafuse.errors import FormatError, ShapeMismatchError, UnsupportedError
from lorafuse.io.atomic import atomic_dir
from lorafuse.io.checkpoint import refuse_pickle
from lorafuse.io.safetensors import SafetensorsFile, save_file
from lorafuse.io.tensor import Tensor

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# Suffix of a saved key -> the role of the tensor in its module.
_ROLES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "emb_A",
    ".lora_embedding_B": "emb_B",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
}


def _folder(path: Path) -> Path:
    return path.parent if path.is_file() else path


def is_peft(path: str | os.PathLike[str]) -> bool:
    return (_folder(Path(path)) / CONFIG_NAME).is_file()


def pattern_value(patterns: dict[str, object], module: str, default: object) -> object:
    """PEFT's rule: the first pattern (dict order) matching `(.*\\.)?(PATTERN)$` wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_config(folder: Path) -> dict[str, object]:
    path = folder / CONFIG_NAME
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: cannot read adapter config ({e})") from None
    return check_config(cfg, str(path))


def check_config(cfg: object, path: str) -> dict[str, object]:
    """Validate a PEFT LoRA config (the JSON object of adapter_config.json)."""
    if not isinstance(cfg, dict):
        raise FormatError(f"{path}: adapter config is not a JSON object")
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise UnsupportedError(f"{path}: peft_type {peft_type!r} is not a LoRA adapter (lorafuse handles LORA)")

    def check(key: str, ok: bool, what: str) -> None:
        if not ok:
            raise FormatError(f"{path}: '{key}' must be {what}, got {cfg.get(key)!r}")

    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    check("r", isinstance(r, int) and not isinstance(r, bool) and r > 0, "a positive integer")
    check("lora_alpha", isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha),
          "a number")
    for key in ("rank_pattern", "alpha_pattern"):
        value = cfg.get(key) or {}
        check(key, isinstance(value, dict), "an object")
        for pat, v in value.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or (key == "rank_pattern" and v <= 0):
                raise FormatError(f"{path}: {key}[{pat!r}] must be a positive number, got {v!r}")
            try:
                re.compile(pat)
            except re.error as e:
                raise FormatError(f"{path}: {key} pattern {pat!r} is not a regular expression ({e})") from None
    for key in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias"):
        check(key, isinstance(cfg.get(key, False), bool), "true or false")
    if cfg.get("target_parameters"):
        raise UnsupportedError(f"{path}: LoRA on parameters ('target_parameters') is not supported")
    return cfg


def load_peft(path: str | os.PathLike[str]) -> Adapter:
    folder = _folder(Path(path))
    cfg = _read_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise refuse_pickle(folder / "adapter_model.bin")
        raise FormatError(f"{folder}: {WEIGHTS_NAME} not found")
    with SafetensorsFile(weights) as f:  # views handed out keep the mapping alive
        tensors = {key: Tensor(f.raw(key), f.info(key).dtype) for key in f.keys()}
    adapter = build_adapter(tensors, cfg, str(weights))
    adapter.path = folder
    return adapter


def build_adapter(tensors: dict[str, Tensor], cfg: dict[str, object], label: str) -> Adapter:
    """An Adapter from PEFT-named tensors (with or without the `base_model.model.` prefix)."""
    parts: dict[str, dict[str, Tensor]] = {}
    full: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        for suffix, role in _ROLES.items():
            if name.endswith(suffix):
                parts.setdefault(name[: -len(suffix)], {})[role] = tensor
                break
        else:
            if ".lora_" in name:
                raise FormatError(f"{label}: tensor {key!r} is not a LoRA tensor lorafuse knows")
            canonical = name.replace(".base_layer.", ".")
            full[canonical] = tensor
            origin[canonical] = name
    weights = label
    updates = {m: _update(weights, m, p, cfg) for m, p in parts.items()}
    if cfg.get("use_dora") and not any(u.magnitude is not None for u in updates.values()):
        raise FormatError(f"{weights}: use_dora is set but no lora_magnitude_vector tensors were saved")
    for m, t in full.items():
        if not t.is_float:
            raise FormatError(f"{weights}: modules_to_save tensor {m!r} has non-float dtype {t.dtype}")
    return Adapter(updates=updates, full=full, config=cfg, format="peft", full_origin=origin)


def _update(weights: str, module: str, p: dict[str, Tensor], cfg: dict[str, object]) -> LoraUpdate:
    where = f"{weights}: module {module!r}"
    kind: Kind
    if "emb_A" in p or "emb_B" in p:
        a, b, kind, transposed = p.get("emb_A"), p.get("emb_B"), "embedding", True
        names = ("lora_embedding_A", "lora_embedding_B")
    else:
        a, b = p.get("A"), p.get("B")
        names = ("lora_A.weight", "lora_B.weight")
        kind = "conv" if a is not None and len(a.shape) > 2 else "linear"
        transposed = bool(cfg.get("fan_in_fan_out", False)) and kind == "linear"
    if a is None or b is None:
        missing = names[0] if a is None else names[1]
        raise FormatError(f"{where} has no {missing}")
    for t, n in ((a, names[0]), (b, names[1])):
        if not t.is_float:
            raise FormatError(f"{where}: {n} has non-float dtype {t.dtype}")
    rank = a.shape[0] if a.shape else 0
    b_ok = len(b.shape) == len(a.shape) and b.shape[1] == rank and all(d == 1 for d in b.shape[2:])
    if len(a.shape) < 2 or rank == 0 or not b_ok:
        raise ShapeMismatchError(f"{where}: {names[0]} {a.shape} and {names[1]} {b.shape} are not LoRA factors of one rank")
    r_cfg = pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8))
    if r_cfg != rank:
        raise ShapeMismatchError(f"{where}: adapter_config.json says r={r_cfg} but the tensors have rank {rank}")
    alpha = float(pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8)))  # type: ignore[arg-type]
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    update = LoraUpdate(module, a, b, scale, kind, transposed, p.get("magnitude"), p.get("bias"))
    if update.magnitude is not None:
        # One magnitude per output feature of the PEFT layer: B's rows. Conv stores it as (1, out, 1, 1).
        m = update.magnitude
        features = b.shape[0]
        if int(np.prod(m.shape)) != features or sorted(m.shape, reverse=True)[1:] != [1] * (len(m.shape) - 1):
            raise ShapeMismatchError(f"{where}: lora_magnitude_vector {m.shape} does not match {features} output features")
        update.magnitude = Tensor(m.raw.reshape(features), m.dtype)
    if update.bias is not None and update.bias.shape != (b.shape[0],):
        raise ShapeMismatchError(f"{where}: lora_B.bias {update.bias.shape} does not match {b.shape[0]} outputs")
    return update


def _most_common(values: list[float]) -> float:
    counts: dict[float, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=lambda v: (counts[v], -values.index(v)))


def peft_config_for(adapter: Adapter) -> dict[str, object]:
    """adapter_config.json for `adapter`: r and lora_alpha (plus exact-name patterns where modules
    differ) are derived from the updates themselves, so each module's scale is kept exactly."""
    cfg: dict[str, object] = {k: v for k, v in adapter.config.items()
                              if k not in ("rank_pattern", "alpha_pattern", "use_rslora")}
    updates = list(adapter.updates.values())
    ranks = [float(u.rank) for u in updates]
    alphas = [u.scale * u.rank for u in updates]
    r = int(_most_common(ranks)) if updates else int(cfg.get("r", 8))  # type: ignore[call-overload]
    alpha = _most_common(alphas) if updates else float(cfg.get("lora_alpha", r))  # type: ignore[arg-type]
    linear_layouts = {u.transposed for u in updates if u.kind == "linear"}
    if len(linear_layouts) > 1:
        raise UnsupportedError(f"{adapter.label}: linear modules mix fan_in_fan_out layouts; PEFT cannot store that")
    cfg.update({
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "rank_pattern": {re.escape(u.name): u.rank for u in updates if u.rank != r},
        "alpha_pattern": {re.escape(u.name): a for u, a in zip(updates, alphas) if a != alpha},
        "use_rslora": False,
        "use_dora": any(u.magnitude is not None for u in updates),
        "lora_bias": any(u.bias is not None for u in updates),
        "fan_in_fan_out": linear_layouts == {True},
    })
    cfg.setdefault("target_modules", sorted({u.name.rsplit(".", 1)[-1] for u in updates}))
    cfg.setdefault("bias", "none")
    cfg.setdefault("lora_dropout", 0.0)
    cfg.setdefault("base_model_name_or_path", None)
    return cfg


def peft_tensors(adapter: Adapter) -> dict[str, Tensor]:
    """The tensors of adapter_model.safetensors, PEFT-named."""
    out: dict[str, Tensor] = {}
    for name, u in adapter.updates.items():
        key = PREFIX + name
        if u.kind == "embedding":
            out[key + ".lora_embedding_A"] = u.A
            out[key + ".lora_embedding_B"] = u.B
        else:
            out[key + ".lora_A.weight"] = u.A
            out[key + ".lora_B.weight"] = u.B
        if u.magnitude is not None:
            m = u.magnitude
            shape = (1, m.shape[0]) + (1,) * (len(u.A.shape) - 2) if u.kind == "conv" else m.shape
            out[key + ".lora_magnitude_vector"] = Tensor(m.raw.reshape(shape), m.dtype)
        if u.bias is not None:
            out[key + ".lora_B.bias"] = u.bias
    for name, t in adapter.full.items():
        out[PREFIX + adapter.full_origin.get(name, name)] = t
    return out


def save_peft(adapter: Adapter, out: str | os.PathLike[str], inputs: Sequence[Path] = ()) -> Path:
    """Write `adapter` as a PEFT folder (adapter_config.json + adapter_model.safetensors), atomically."""
    cfg = peft_config_for(adapter)
    tensors = peft_tensors(adapter)
    with atomic_dir(out, inputs) as tmp:
        save_file({k: (t.dtype, t.raw) for k, t in tensors.items()}, tmp / WEIGHTS_NAME, {"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return Path(out)
