"""One rank for the per-expert LoRAs of a MoE model that transformers 5 fuses on load.

transformers 5 fuses Mixtral's `block_sparse_moe.experts.{e}.w1 / w3 / w2` (Qwen2/3-MoE, DeepSeek, ...:
`mlp.experts.{e}.gate_proj / up_proj / down_proj`) into one gate_up_proj and one down_proj parameter per
layer (ops.fused.PER_EXPERT_ON_DISK), and PEFT (0.21, peft/utils/transformers_weight_conversion.py) stacks
an adapter's per-expert factors the same way: it needs every expert of a layer, each with both halves of
gate_up, all at the config's `r` and `lora_alpha` (rank_pattern / alpha_pattern entries name the per-expert
modules, which no longer exist then). It maps the router (`gate`) onto a parameter too, at that r.

So the expert modules (and routers) of an adapter for such a model are given one common rank: the largest
among them, their factors padded with zero columns of B and zero rows of A (the delta is unchanged: exact),
and an expert that did not change is written as zero factors. formats.peft then makes that rank the
config's r (expert_modules); ops.extract and ops.resize give the rank (one_expert_rank).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np

from lorafuse.io.tensor import Tensor
from lorafuse.model.lora import LoraUpdate
from lorafuse.model.update import Update

_EXPERT = re.compile(r"^(?P<owner>.+\.experts)\.(?P<e>\d+)\.(?P<part>[^.]+)$")
# the per-expert layers of every layout in ops.fused.PER_EXPERT_ON_DISK (Mixtral's, Qwen2-MoE's)
ALL_PARTS = frozenset({"w1", "w2", "w3", "gate_proj", "up_proj", "down_proj"})


def expert_modules(names: Iterable[str], parts: frozenset[str] = ALL_PARTS) -> list[str]:
    """The names among `names` that are per-expert layers (`<...>.experts.<e>.<part>`) or a router (`<moe>.gate`
    beside such experts)."""
    names = list(names)
    owners = {m.group("owner") for n in names if (m := _EXPERT.match(n)) and m.group("part") in parts}
    routers = {o.removesuffix(".experts") + ".gate" for o in owners}
    return [n for n in names if n in routers or ((m := _EXPERT.match(n)) is not None and m.group("owner") in owners
                                                 and m.group("part") in parts)]


def one_expert_rank(updates: dict[str, Update], parts: frozenset[str],
                    shapes: Mapping[str, tuple[int, ...]] | None = None) -> tuple[dict[str, Update], int, int]:
    """`updates` with every expert module and router (expert_modules) at one rank, the largest among them: padded
    with zeros. With `shapes` (the base's module -> weight shape), each layer with a changed expert also gets the
    experts and parts it lacks as zero factors. Returns the updates, that rank (0: no expert) and how many zero
    experts were added."""
    chosen = [n for n in expert_modules(updates, parts) if isinstance(updates[n], LoraUpdate)]
    if not chosen:
        return updates, 0, 0
    rank = max(updates[n].rank for n in chosen)
    out = dict(updates)
    for n in chosen:
        out[n] = padded(updates[n], rank)  # type: ignore[arg-type]
    missing = missing_experts(chosen, parts, shapes or {})
    for module in missing:
        out[module] = zero_update(module, (shapes or {})[module], rank)
    return out, rank, len(missing)


def missing_experts(chosen: Iterable[str], parts: frozenset[str], shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """The expert modules of `shapes` (the base's module -> weight shape) in a layer that has one of `chosen`,
    that `chosen` lacks: what PEFT needs as zero factors."""
    chosen = set(chosen)
    owners = {m.group("owner") for n in chosen if (m := _EXPERT.match(n))}
    return [module for module in shapes if module not in chosen and (m := _EXPERT.match(module)) is not None
            and m.group("owner") in owners and m.group("part") in parts]


def padded(u: LoraUpdate, rank: int) -> LoraUpdate:
    """`u` at `rank` (>= its own): zero rows appended to A, zero columns to B, in their own dtypes."""
    k = u.rank
    if k == rank:
        return u
    a, b = u.A.raw, u.B.raw
    a2 = np.concatenate([a, np.zeros((rank - k, *a.shape[1:]), a.dtype)], axis=0)
    b2 = np.concatenate([b, np.zeros((b.shape[0], rank - k, *b.shape[2:]), b.dtype)], axis=1)
    return LoraUpdate(u.name, Tensor(a2, u.A.dtype), Tensor(b2, u.B.dtype), u.scale, u.kind, u.transposed,
                      u.magnitude, u.bias, u.magnitude_on_columns)


def zero_update(module: str, shape: tuple[int, ...], rank: int) -> LoraUpdate:
    """A Linear LoRA of `rank` whose delta is zero (an expert that did not change), scale 1 like extract's."""
    return LoraUpdate(module, Tensor.from_array(np.zeros((rank, int(shape[1])), np.float32)),
                      Tensor.from_array(np.zeros((int(shape[0]), rank), np.float32)), 1.0)
