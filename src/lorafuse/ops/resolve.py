"""Which base tensor each adapter module changes, and how: the matching step of `apply`.

LLM adapters (PEFT folders) name modules by their canonical path and match through
`BaseMatcher`. Diffusion adapters (kohya / LyCORIS files, diffusers LoRA files) name
them `lora_unet_...` or `unet.down_blocks...` and match through the data tables of
`formats.sd_keys`, which may land a module on rows of a fused weight (OpenCLIP's
`in_proj_weight`) or spread a fused module (Flux `qkv`) over several weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from lorafuse.adapter import Adapter, LoraUpdate, Update
from lorafuse.errors import MissingModuleError, ShapeMismatchError, UnsupportedError
from lorafuse.formats.targets import Target
from lorafuse.io.tensor import Tensor
DIFFUSION_FORMATS = ("kohya", "diffusers")
BaseKey = Callable[[str], "str | None"]  # canonical tensor name -> the checkpoint's key (LLM adapters)


@dataclass
class Contribution:
    update: Update
    coef: float  # user weight times the update's scale
    source: str  # adapter label, for messages
    base_rows: tuple[int, int] | None = None  # rows of the base weight the delta lands on (None: all)
    delta_rows: tuple[int, int] | None = None  # rows of the update's delta that land there (None: all)

    @property
    def mapped(self) -> bool:
        return self.base_rows is not None or self.delta_rows is not None


@dataclass
class Resolved:
    contributions: dict[str, list[Contribution]] = field(default_factory=dict)
    bias_contributions: dict[str, list[Contribution]] = field(default_factory=dict)
    replacements: dict[str, tuple[Tensor, str]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def _rows_cols(shape: Sequence[int]) -> tuple[int, int]:
    rows = int(shape[0]) if len(shape) else 1
    return rows, int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1


def _check_fit(adapter: Adapter, name: str, u: Update, key: str, shape: tuple[int, ...], t: Target) -> None:
    """The update (or its rows) must cover the base weight (or its rows) element for element."""
    d_rows, d_cols = _rows_cols(u.delta_shape)
    b_rows, b_cols = _rows_cols(shape)
    lo, hi = t.delta_rows or (0, d_rows)
    blo, bhi = t.base_rows or (0, b_rows)
    whole = t.delta_rows is None and t.base_rows is None
    same = tuple(u.delta_shape) == tuple(shape) if whole and len(u.delta_shape) == len(shape) else (
        d_cols == b_cols and hi - lo == bhi - blo and 0 <= lo < hi <= d_rows and 0 <= blo < bhi <= b_rows)
    if not same:
        where = "" if whole else f" (update rows {lo}:{hi} onto base rows {blo}:{bhi})"
        raise ShapeMismatchError(
            f"{adapter.label}: module {name!r}: the update has shape {tuple(u.delta_shape)} but base weight "
            f"{key!r} has shape {tuple(shape)}{where}"
        )


GENERIC_PREFIXES = ("lycoris_", "lora_unet_", "lora_te_", "lora_")


def _generic_underscore_match(found: dict[str, list[Target]], missing: list[str],
                              shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, list[Target]], list[str]]:
    """kohya-style names on a model the SD tables do not know (LyCORIS names any torch model's layers
    `lycoris_<path with _>`): the module is the weight whose dotted path, with '_' for '.', is its name
    without the prefix. A name two keys spell alike stays unmatched."""
    if not missing:
        return found, missing
    spelled: dict[str, list[str]] = {}
    for key in shapes:
        if key.endswith(".weight"):
            spelled.setdefault(key[: -len(".weight")].replace(".", "_"), []).append(key)
    still: list[str] = []
    for name in missing:
        prefix = next((p for p in GENERIC_PREFIXES if name.startswith(p)), None)
        keys = spelled.get(name[len(prefix):], []) if prefix else []
        if len(keys) == 1:
            found[name] = [Target(keys[0])]
        else:
            still.append(name)
    return found, still


def _targets(adapter: Adapter, shapes: Mapping[str, tuple[int, ...]],
             base_key: BaseKey) -> tuple[dict[str, list[Target]], list[str]]:
    if adapter.format in DIFFUSION_FORMATS:
        from lorafuse.formats.sd_keys import match_modules

        found, missing = match_modules({n: tuple(u.delta_shape) for n, u in adapter.updates.items()}, shapes)
        return _generic_underscore_match(found, missing, shapes)
    found: dict[str, list[Target]] = {}
    missing: list[str] = []
    for name in adapter.updates:
        key = base_key(name + ".weight")
        if key is None:
            missing.append(name)
        else:
            found[name] = [Target(key)]
    return found, missing


def resolve(shapes: Mapping[str, tuple[int, ...]], adapters: Sequence[Adapter], weights: Sequence[float],
            base_key: BaseKey) -> Resolved:
    """Contributions per base key for every adapter; `base_key(name)` maps a canonical tensor name to a
    key (LLM adapters); `shapes` holds every base key's shape. Modules that found no target are
    listed in `missing` (the caller refuses them with `missing_error`, or skips them)."""
    out = Resolved()
    for adapter, w in zip(adapters, weights):
        found, missing = _targets(adapter, shapes, base_key)
        for name in missing:
            out.missing.append(f"{adapter.label}: module {name!r}")
        for name, targets in found.items():
            u = adapter.updates[name]
            if u.magnitude is not None and w != 1.0:
                raise UnsupportedError(
                    f"{adapter.label}: module {name!r} is DoRA; a weight other than 1 has no defined meaning for it"
                )
            for t in targets:
                shape = shapes[t.key]
                _check_fit(adapter, name, u, t.key, shape, t)
                c = Contribution(u, w * u.scale, adapter.label, t.base_rows, t.delta_rows)
                if c.mapped and (u.magnitude is not None or u.bias is not None):
                    raise UnsupportedError(
                        f"{adapter.label}: module {name!r} lands on part of a fused weight ({t.key!r}); a DoRA "
                        "magnitude or a bias cannot be applied to part of a weight"
                    )
                out.contributions.setdefault(t.key, []).append(c)
                if isinstance(u, LoraUpdate) and u.bias is not None:
                    bkey = t.key[: -len("weight")] + "bias"
                    if bkey not in shapes:
                        out.missing.append(f"{adapter.label}: module {name!r} has a lora_B bias but the base has "
                                           f"no {bkey!r}")
                        continue
                    out.bias_contributions.setdefault(bkey, []).append(c)
        for name, tensor in adapter.full.items():
            key = base_key(name)
            if key is None:
                out.missing.append(f"{adapter.label}: modules_to_save tensor {name!r}")
                continue
            if tuple(tensor.shape) != tuple(shapes[key]):
                raise ShapeMismatchError(
                    f"{adapter.label}: modules_to_save tensor {name!r} has shape {tensor.shape} "
                    f"but base {key!r} has shape {shapes[key]}"
                )
            if key in out.replacements:
                raise UnsupportedError(f"{key!r} is replaced by both {out.replacements[key][1]} and {adapter.label}")
            out.replacements[key] = (tensor, adapter.label)
    return out


def missing_error(missing: list[str], label: str) -> MissingModuleError:
    """Every module that found no target, one per line (users fix their files from this list)."""
    lines = "\n  ".join(missing)
    return MissingModuleError(
        f"{len(missing)} adapter module(s) found no target in the base {label}:\n  {lines}\n"
        "(pass --skip-missing to merge the others and report these)"
    )
