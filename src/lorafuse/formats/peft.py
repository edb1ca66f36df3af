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
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lorafuse.adapter import Adapter, Kind, LoraUpdate, check_module_name
from lorafuse.errors import FormatError, ShapeMismatchError, UnsupportedError
from lorafuse.io.atomic import atomic_dir
from lorafuse.io.checkpoint import read_json, refuse_pickle
from lorafuse.io.safetensors import SafetensorsFile, save_file
from lorafuse.io.tensor import Tensor
from lorafuse.formats.util import most_common

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
        if _compiled(key).match(module):
            return value
    return default


_COMPILED: dict[str, re.Pattern[str]] = {}
MAX_PATTERN_LENGTH = 1000
MAX_REPEATS = 2  # quantifiers that can repeat ('*', '+', '{2,5}'; not '?') in one pattern
MATCH_BUDGET_S = 20.0  # matching every pattern against every module of one adapter: real ones take milliseconds

try:  # the standard library's regular-expression parser (re._parser since Python 3.11)
    from re import _constants as _sre_c  # type: ignore[attr-defined]
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre_c
    import sre_parse as _sre_parse

_REPEATS = {_sre_c.MAX_REPEAT, _sre_c.MIN_REPEAT, getattr(_sre_c, "POSSESSIVE_REPEAT", _sre_c.MAX_REPEAT)}
_BACKREFS = {_sre_c.GROUPREF, _sre_c.GROUPREF_EXISTS, getattr(_sre_c, "GROUPREF_IGNORE", _sre_c.GROUPREF)}


def _compiled(pattern: str) -> re.Pattern[str]:
    rx = _COMPILED.get(pattern)
    if rx is None:
        if len(_COMPILED) > 4096:
            _COMPILED.clear()
        rx = _COMPILED[pattern] = re.compile(rf"(.*\.)?({pattern})$")
    return rx


def _pattern_problem(pattern: str) -> str | None:
    """Why matching `pattern` could take exponential (or high polynomial) time, or None.

    Python's `re` backtracks: a quantifier inside a quantifier ('(a+)+'), a quantified
    alternation ('(a|a)*') or a backreference can take ages on a module name of a few dozen
    characters, and every extra quantifier multiplies the work by the name's length. PEFT's own
    patterns are module names or short regexes, far from these limits. What stays allowed can
    still take a second on a 1000-character name: build_adapter bounds the total time too."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        return f"is {len(pattern)} characters long (at most {MAX_PATTERN_LENGTH})"
    parsed = _sre_parse.parse(pattern)
    repeats = 0

    def walk(items: object, in_repeat: bool) -> str | None:
        nonlocal repeats
        for op, av in items:  # type: ignore[attr-defined]
            if op in _REPEATS:
                lo, hi, sub = av
                if in_repeat:
                    return "has a quantifier inside a quantifier"
                if hi > 1:
                    repeats += 1
                problem = walk(sub, hi > 1)
            elif op == _sre_c.SUBPATTERN:
                problem = walk(av[-1], in_repeat)
            elif op == _sre_c.BRANCH and in_repeat:
                problem = "has a quantified alternation"
            elif op == _sre_c.BRANCH:
                problem = next((q for alt in av[1] if (q := walk(alt, in_repeat))), None)
            elif op in (_sre_c.ASSERT, _sre_c.ASSERT_NOT):
                problem = walk(av[1], in_repeat)
            elif op == getattr(_sre_c, "ATOMIC_GROUP", None):
                problem = walk(av, in_repeat)
            elif op in _BACKREFS:
                problem = "has a backreference"
            else:
                problem = None
            if problem:
                return problem
        return None

    problem = walk(parsed, False)
    if problem is None and repeats > MAX_REPEATS:
        problem = f"has {repeats} repeating quantifiers (at most {MAX_REPEATS})"
    return problem


def _read_config(folder: Path) -> dict[str, object]:
    path = folder / CONFIG_NAME
    cfg = read_json(path, "the adapter config")
    if isinstance(cfg, dict):
        # PEFT itself always writes both; without them the scale alpha / r would be a guess.
        for key in ("r", "lora_alpha"):
            if key not in cfg:
                raise FormatError(f"{path}: '{key}' is missing (PEFT writes it; the scale {key} needs it)")
    return check_config(cfg, str(path))


def _is_number(x: object) -> bool:
    """A finite int or float (not a bool): ints too large for a float are not."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def _is_positive_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_config(cfg: object, path: str) -> dict[str, object]:
    """Validate a PEFT LoRA config (the JSON object of adapter_config.json)."""
    if not isinstance(cfg, dict):
        raise FormatError(f"{path}: adapter config is not a JSON object (it is {type(cfg).__name__})")
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise UnsupportedError(f"{path}: peft_type {_short(peft_type)} is not a LoRA adapter (lorafuse handles LORA)")

    def check(key: str, ok: bool, what: str) -> None:
        if not ok:
            raise FormatError(f"{path}: '{key}' must be {what}, got {_short(cfg.get(key))}")

    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    check("r", _is_positive_int(r), "a positive integer")
    check("lora_alpha", _is_number(alpha), "a number")
    for key in ("rank_pattern", "alpha_pattern"):
        value = cfg.get(key) or {}
        check(key, isinstance(value, dict), "an object")
        for pat, v in value.items():
            if key == "rank_pattern" and not (_is_positive_int(v) or (_is_number(v) and v > 0 and v == int(v))):
                raise FormatError(f"{path}: {key}[{pat!r}] must be a positive integer, got {_short(v)}")
            if not _is_number(v):
                raise FormatError(f"{path}: {key}[{pat!r}] must be a finite number, got {_short(v)}")
            try:
                problem = _pattern_problem(pat)
                _compiled(pat)
            except (re.error, OverflowError, RecursionError, ValueError) as e:
                raise FormatError(f"{path}: {key} pattern {_short(pat)} is not a regular expression ({e})") from None
            if problem:
                raise FormatError(f"{path}: {key} pattern {_short(pat)} {problem}: it could take very long "
                                  "to match; write it more simply")
    for key in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias"):
        check(key, isinstance(cfg.get(key, False), bool), "true or false")
    for key in ("target_modules", "exclude_modules"):  # PEFT: a regex string, a list of names, or null
        value = cfg.get(key)
        check(key, value is None or isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(v, str) for v in value)), "a string, a list of strings or null")
    value = cfg.get("modules_to_save")
    check("modules_to_save", value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
          "a list of strings or null")
    if cfg.get("target_parameters"):
        raise UnsupportedError(f"{path}: LoRA on parameters ('target_parameters') is not supported")
    return cfg


def load_peft(path: str | os.PathLike[str]) -> Adapter:
    folder = _folder(Path(path))
    cfg = _read_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file() and not weights.exists():  # anything else there (a FIFO, a folder) is refused below
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
    seen: dict[tuple[str, str], str] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        for suffix, role in _ROLES.items():
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                check_module_name(module, f"{label}: tensor {key!r}")
                if (module, role) in seen:
                    raise FormatError(f"{label}: module {module!r} has two {role} tensors: "
                                      f"{seen[module, role]!r} and {key!r}")
                seen[module, role] = key
                parts.setdefault(module, {})[role] = tensor
                break
        else:
            if ".lora_" in name:
                raise FormatError(f"{label}: tensor {key!r} is not a LoRA tensor lorafuse knows")
            check_module_name(name, label, "tensor")
            canonical = name.replace(".base_layer.", ".")
            if canonical in full:
                raise FormatError(f"{label}: tensors {origin[canonical]!r} and {name!r} both replace the base "
                                  f"weight {canonical!r}")
            full[canonical] = tensor
            origin[canonical] = name
    weights = label
    scales = _pattern_values(cfg, list(parts), weights)
    updates = {m: _update(weights, m, p, cfg, *scales[m]) for m, p in parts.items()}
    if cfg.get("use_dora") and not any(u.magnitude is not None for u in updates.values()):
        raise FormatError(f"{weights}: use_dora is set but no lora_magnitude_vector tensors were saved")
    for m, t in full.items():
        if not t.is_float:
            raise FormatError(f"{weights}: modules_to_save tensor {m!r} has non-float dtype {t.dtype}")
    return Adapter(updates=updates, full=full, config=cfg, format="peft", full_origin=origin)


def _pattern_values(cfg: dict[str, object], modules: list[str], label: str) -> dict[str, tuple[object, object]]:
    """(r, lora_alpha) of every module after rank_pattern / alpha_pattern, within MATCH_BUDGET_S."""
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    if not rank_pattern and not alpha_pattern:
        return {m: (r, alpha) for m in modules}
    deadline = time.monotonic() + MATCH_BUDGET_S
    out = {}
    for m in modules:
        out[m] = (pattern_value(rank_pattern, m, r), pattern_value(alpha_pattern, m, alpha))  # type: ignore[arg-type]
        if time.monotonic() > deadline:
            raise FormatError(f"{label}: matching rank_pattern / alpha_pattern ({len(rank_pattern)} + "
                              f"{len(alpha_pattern)} patterns) against {len(modules)} modules takes more than "
                              f"{MATCH_BUDGET_S:g} s; the patterns are too costly (stopped at module {m!r})")
    return out


def _update(weights: str, module: str, p: dict[str, Tensor], cfg: dict[str, object], r_cfg: object,
            alpha_cfg: object) -> LoraUpdate:
    where = f"{weights}: module {module!r}"
    kind: Kind
    if ("emb_A" in p or "emb_B" in p) and ("A" in p or "B" in p):
        raise FormatError(f"{where} has both lora_embedding_A/B and lora_A/B tensors")
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
    if len(a.shape) < 2 or len(b.shape) != len(a.shape):
        raise ShapeMismatchError(f"{where}: {names[0]} {a.shape} and {names[1]} {b.shape} are not LoRA factors "
                                 "(two matrices, or conv kernels of the same number of dimensions)")
    if rank == 0:
        raise ShapeMismatchError(f"{where}: {names[0]} {a.shape} has rank 0 (a zero-rank adapter)")
    if b.shape[1] != rank or any(d != 1 for d in b.shape[2:]):
        raise ShapeMismatchError(f"{where}: {names[0]} {a.shape} and {names[1]} {b.shape} are not LoRA factors of one rank")
    for role, n in (("magnitude", "lora_magnitude_vector"), ("bias", "lora_B.bias")):
        extra = p.get(role)
        if extra is not None and not extra.is_float:
            raise FormatError(f"{where}: {n} has non-float dtype {extra.dtype}")
    if r_cfg != rank:
        raise ShapeMismatchError(f"{where}: adapter_config.json says r={r_cfg} but the tensors have rank {rank}")
    alpha = float(alpha_cfg)  # type: ignore[arg-type]
    if not math.isfinite(alpha):  # a config that was not checked by check_config
        raise FormatError(f"{where}: lora_alpha {alpha} is not finite")
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



def _check_peft_storable(adapter: Adapter, u: object) -> None:
    """PEFT stores LoRA factors; a LoHa / LoKr, or a DoRA normalized over columns of an untransposed
    weight (LyCORIS wd_on_out=False), has no PEFT form."""
    if not isinstance(u, LoraUpdate):
        raise UnsupportedError(f"{adapter.label}: module {u.name!r} is a LoHa / LoKr update; PEFT stores LoRA "  # type: ignore[attr-defined]
                               "factors only (convert it first: `lorafuse convert IN -o OUT --to kohya --rank K`)")
    if u.magnitude_on_columns and not u.transposed:
        raise UnsupportedError(f"{adapter.label}: module {u.name!r} is DoRA normalized per input column "
                               "(LyCORIS wd_on_out=False), which PEFT cannot express")


def peft_config_for(adapter: Adapter) -> dict[str, object]:
    """adapter_config.json for `adapter`: r and lora_alpha (plus exact-name patterns where modules
    differ) are derived from the updates themselves, so each module's scale is kept exactly."""
    cfg: dict[str, object] = {k: v for k, v in adapter.config.items()
                              if k not in ("rank_pattern", "alpha_pattern", "use_rslora")}
    updates = list(adapter.updates.values())
    for u in updates:
        _check_peft_storable(adapter, u)
    ranks = [float(u.rank) for u in updates]
    alphas = [u.scale * u.rank for u in updates]
    r = int(most_common(ranks)) if updates else int(cfg.get("r", 8))  # type: ignore[call-overload]
    alpha = most_common(alphas) if updates else float(cfg.get("lora_alpha", r))  # type: ignore[arg-type]
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
        _check_peft_storable(adapter, u)
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
