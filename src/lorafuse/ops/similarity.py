"""similarity: exact cosine similarity of adapters' deltas, from the factors alone.

<B1 A1, B2 A2>_F = sum((B1^T B2) * (A1 A2^T)) per module, summed over modules (a module
missing from one adapter contributes 0 to the inner product and its own norm to the other's).
Stored LoRA factors go to the core in batches of bounded work, so that Ctrl-C and SIGTERM act
between them; LoHa, LoKr and Tucker modules go through their structure (model.spectral:
<w1 (x) w2, v1 (x) v2> = <w1, v1> <w2, v2>, ...), never through a dense delta.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
from collections.abc import Iterable, Sequence
from itertools import combinations
from pathlib import Path

import numpy as np

from lorafuse.backends import InnerJob, get_backend
from lorafuse.errors import LorafuseValueError, NonFiniteError, ShapeMismatchError, warn
from lorafuse.formats import load
from lorafuse.model import Adapter, Update
from lorafuse.model.adapter import adapter_list
from lorafuse.model.arithmetic import input_label, laid_out, module_examples, one_model, shared_modules
from lorafuse.model.names import TOKENS_SUFFIX, full_tensors_text
from lorafuse.model.param_lora import refuse_parameter_loras
from lorafuse.model.spectral import (
    CORE_BATCH_ELEMENTS,
    CORE_BATCH_FLOPS,
    CORE_BATCH_MODULES,
    frobenius_sq,
    inner,
    is_stored_lora,
)
from lorafuse.model.update import holds_nonfinite, refuse_dora


class _Batch:
    """Inner products of stored LoRA factors waiting for one call into the core."""

    def __init__(self, n: int, threads: int) -> None:
        self.g = np.zeros((n, n))
        self.threads = threads
        self.items: list[tuple[np.ndarray, ...]] = []
        self.where: list[tuple[int, int]] = []
        self.coefs: list[float] = []
        self.flops = 0.0
        self.elements = 0
        self.modules = 0

    def full(self, flops: float, elements: int) -> bool:
        return bool(self.items) and (self.flops + flops > CORE_BATCH_FLOPS or self.elements + elements >
                                     CORE_BATCH_ELEMENTS or self.modules >= CORE_BATCH_MODULES)

    def add(self, factors: tuple[np.ndarray, ...], i: int, j: int, coef: float) -> None:
        b1, a1, b2, a2 = factors
        self.items.append(factors)
        self.where.append((i, j))
        self.coefs.append(coef)  # applied in float64, not folded into the float32 factors
        self.flops += 2.0 * b1.shape[1] * b2.shape[1] * (b1.shape[0] + a1.shape[1])
        self.elements += b1.size + a1.size + b2.size + a2.size

    def flush(self) -> None:
        if self.items:
            values = get_backend().inner([InnerJob(*f) for f in self.items], self.threads) * np.asarray(self.coefs)
            for (i, j), v in zip(self.where, values):
                self.g[i, j] += v
        self.items, self.where, self.coefs = [], [], []
        self.flops, self.elements, self.modules = 0.0, 0, 0


def _check_shapes(name: str, holders: list[tuple[int, Update]], loaded: list[Adapter]) -> None:
    i0, first = holders[0]
    for j, v in holders[1:]:
        if (tuple(first.delta_shape), first.transposed) != (tuple(v.delta_shape), v.transposed):
            raise ShapeMismatchError(f"module {name!r}: {input_label(loaded[i0], i0)} has shape "
                                     f"{tuple(first.delta_shape)}, {input_label(loaded[j], j)} has "
                                     f"{tuple(v.delta_shape)}")


def _module_cost(holders: list[tuple[int, Update]]) -> tuple[float, int]:
    rows = holders[0][1].delta_shape[0]
    cols = int(np.prod(holders[0][1].delta_shape[1:], dtype=np.int64))
    ranks = [u.rank for _, u in holders if is_stored_lora(u)]
    flops = sum(2.0 * r1 * r2 * (rows + cols) for x, r1 in enumerate(ranks) for r2 in ranks[x:])
    return flops, sum(ranks) * (rows + cols) * 2


def gram(adapters: Iterable[str | os.PathLike[str] | Adapter], threads: int = 0) -> np.ndarray:
    """G[i, j] = <delta_i, delta_j>_F over all modules, in float64 (any iterable of adapters, not one)."""
    loaded = [a if isinstance(a, Adapter) else load(a) for a in adapter_list(adapters, "similarity")]
    for a in loaded:
        refuse_dora(a.label, a.updates, "its similarity to another adapter")
        refuse_parameter_loras(a.label, a.updates, "similarity")
    batch = _Batch(len(loaded), threads)
    names = list(dict.fromkeys(name for a in loaded for name in a.updates))
    for name in names:
        at = [i for i, a in enumerate(loaded) if name in a.updates]
        holders = list(zip(at, laid_out([loaded[i].updates[name] for i in at])))  # a flattened conv: its 4-D shape
        _check_shapes(name, holders, loaded)
        if batch.full(*_module_cost(holders)):
            batch.flush()
        factors = {i: u.stored_factors(threads) for i, u in holders if is_stored_lora(u)}
        batch.modules += 1
        for x, (i, u) in enumerate(holders):
            for j, v in holders[x:]:
                if i in factors and j in factors:
                    batch.add((*factors[i], *factors[j]), i, j, u.scale * v.scale)
                else:
                    batch.g[i, j] += frobenius_sq(u) if i == j else inner(u, v)
                batch.g[i, j] += _bias_inner(u, v)
    batch.flush()
    g = batch.g
    return np.triu(g) + np.triu(g, 1).T


def _bias_inner(u: Update, v: Update) -> float:
    """<s_u b_u, s_v b_v> of two updates' lora_B biases (PEFT's merge adds scale * bias to the base bias), in
    float64; 0 where either has none."""
    bu, bv = getattr(u, "bias", None), getattr(v, "bias", None)
    if bu is None or bv is None:
        return 0.0
    return u.scale * v.scale * float(np.dot(bu.f32().astype(np.float64).ravel(), bv.f32().astype(np.float64).ravel()))


LEFT_OUT_NOTE = "left out of the similarity"  # in every left_out_notes line


def left_out_notes(adapters: Sequence[Adapter], labels: Sequence[str] | None = None) -> list[str]:
    """One line per adapter holding full tensors that replace base tensors whole (PEFT modules_to_save, the
    base biases bias='all' saves): what they change needs the base, so similarity leaves them out. PEFT's
    copies of base layer weights change nothing and are not named."""
    names = [str(x) for x in labels] if labels is not None else [a.label for a in adapters]
    notes = []
    for name, a in zip(names, adapters):
        extra = [a.full_origin.get(k, k) for k in a.full if not a.full_origin.get(k, k).endswith(".base_layer.weight")]
        if extra:
            how = "replace base tensors (or rows of them) whole" if any(
                o.endswith(TOKENS_SUFFIX) for o in extra) else "replace base tensors whole"
            notes.append(f"{name}: {full_tensors_text(a.config, extra)} {how}; what they change "
                         f"needs the base, so they are {LEFT_OUT_NOTE} (its LoRA modules alone are compared)")
    return notes


def similarity(adapters: Iterable[str | os.PathLike[str] | Adapter], threads: int = 0) -> np.ndarray:
    """Cosine similarity matrix of the adapters' deltas (all modules together). `adapters`: any iterable (a
    generator too), never one path. An adapter whose delta holds NaN or Inf is refused (NonFiniteError
    naming it and the module): its similarities would mean nothing."""
    loaded = [a if isinstance(a, Adapter) else load(a) for a in adapter_list(adapters, "similarity")]
    if len(loaded) < 1:
        raise LorafuseValueError("similarity needs at least one adapter")
    g = gram([_scaled(a) for a in loaded], threads)  # each by a power of two: the cosines are the same
    if not np.isfinite(g).all():
        raise _non_finite(loaded, g, threads)
    norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = g / np.outer(norms, norms)
    for note in (unshared_notes(loaded) + zero_notes(loaded, [i for i, n in enumerate(norms) if n == 0])
                 + left_out_notes(loaded)):
        warn(note, UserWarning)  # a 0 that measures nothing (the CLI prints these as notes)
    return np.where(np.outer(norms, norms) > 0, cos, 0.0)


def _scaled(a: Adapter) -> Adapter:
    """`a` with every module's scale divided by one power of two, that of its largest scale: the same cosines,
    and a squared norm that float64 holds where the scales alone would overflow it (alpha 1e200) or underflow."""
    scales = [abs(u.scale) for u in a.updates.values() if math.isfinite(u.scale) and u.scale != 0]
    if not scales:
        return a
    c = 2.0 ** math.frexp(max(scales))[1]
    return dataclasses.replace(a, updates={n: dataclasses.replace(u, scale=u.scale / c)
                                           for n, u in a.updates.items()})


def _non_finite(loaded: Sequence[Adapter], g: np.ndarray, threads: int) -> NonFiniteError:
    """The error of a Gram matrix holding NaN / Inf: the first adapter (numbered from 1) whose own norm is not
    finite, and its first such module."""
    bad = [i for i in range(len(loaded)) if not np.isfinite(g[i, i])] or \
        [int(i) for i in np.argwhere(~np.isfinite(g))[0]]
    i = bad[0]
    norms = loaded[i].norms(threads)
    module = next((n for n, v in norms.items() if not np.isfinite(v)), None)
    if module is None and norms and not any(holds_nonfinite(u) for u in loaded[i].updates.values()):
        module = max(norms, key=lambda n: norms[n])  # every norm finite, their squares overflow: the largest named
    where = f"module {module!r}" if module is not None else "its modules together"
    u = loaded[i].updates.get(module) if module is not None else None
    if u is not None and not holds_nonfinite(u):
        squared = " when squared" if module is not None and np.isfinite(norms[module]) else ""
        return NonFiniteError(f"similarity: adapter {i + 1} ({loaded[i].label}): {where}: its factors are finite, but "
                              f"its delta's norm overflows float64{squared} (scale {u.scale:g}): the cosine is not "
                              "computed")
    return NonFiniteError(f"similarity: adapter {i + 1} ({loaded[i].label}): {where} has a delta holding NaN or Inf "
                          "(in its factors or its scale): its similarities would be meaningless")


ZERO_NOTE = "its delta is zero"  # in every zero_notes line (the CLI prints them with the names it was given)


def zero_notes(adapters: Sequence[Adapter], zero: Sequence[int], labels: Sequence[str] | None = None) -> list[str]:
    """One line per adapter of `adapters` at the indices `zero`, whose delta is zero (no module, or B @ A = 0 in
    every one): its cosines, the diagonal's too, are undefined, and similarity shows them as 0."""
    names = [str(x) for x in labels] if labels is not None else [a.label for a in adapters]
    why = [_zero_why(adapters[i]) for i in zero]
    return [f"{names[i]}: {ZERO_NOTE} ({w}): its cosine with any adapter, itself included, is undefined and shown as 0"
            for i, w in zip(zero, why)]


def _zero_why(adapter: Adapter) -> str:
    """Why a zero delta is zero: no module, every module's scale 0 (lora_alpha 0), B @ A 0 in every module, or
    each module's scale or B @ A."""
    if not adapter.updates:
        return "it holds no module"
    scaled = [u.scale != 0 for u in adapter.updates.values()]
    if not any(scaled):
        return "every module's scale is 0: an alpha of 0?"
    if all(scaled):
        return "B @ A is 0 in every module: saved before training?"
    return "each module's scale or its B @ A is 0"


def unshared_pairs(adapters: Sequence[Adapter]) -> list[tuple[int, int]]:
    """The pairs (i, j), i < j, of adapters (each with modules) that share no module: their cosine is 0
    because no module is in both, not because their deltas were measured orthogonal."""
    return [(i, j) for i, j in combinations(range(len(adapters)), 2)
            if adapters[i].updates and adapters[j].updates and not shared_modules([adapters[i], adapters[j]])]


def unshared_notes(adapters: Sequence[Adapter], labels: Sequence[str] | None = None, limit: int = 10) -> list[str]:
    """One line per pair of `adapters` that share no module (unshared_pairs), saying so and what to do:
    for a kohya file and a diffusers LoRA file (one model named two ways, perhaps) the `lorafuse convert`
    that gives the kohya one diffusers names. At most `limit` lines, then one counting the others."""
    names = [str(x) for x in labels] if labels is not None else [a.label for a in adapters]
    pairs = unshared_pairs(adapters)
    notes = []
    for i, j in pairs[:limit]:
        a, b = adapters[i], adapters[j]
        line = (f"{names[i]} and {names[j]} share no module ({module_examples(list(a.updates))} vs "
                f"{module_examples(list(b.updates))}): their similarity of 0 says only that no module is in both")
        kinds = {a.format: i, b.format: j}
        if set(kinds) == {"kohya", "diffusers"}:
            k = kinds["kohya"]
            src = Path(names[k])
            out = src.with_name(f"{src.stem or 'converted'}_diffusers.safetensors")
            line += (f"; {names[k]} has kohya names and {names[kinds['diffusers']]} diffusers names: if they are "
                     f"for the same model, `lorafuse convert {shlex.quote(str(src))} --to peft -o "
                     f"{shlex.quote(str(out))}` gives the kohya one diffusers names to compare")
        elif one_model(a, b):
            line += "; they adapt different parts of one model (its text encoders, its UNet or transformer)"
        else:
            line += ("; adapters for different models, or one model named two ways (kohya and diffusers files "
                     "convert into each other with `lorafuse convert`)")
        notes.append(line)
    if len(pairs) > limit:
        notes.append(f"... and {len(pairs) - limit} more pairs that share no module")
    return notes
