"""Exact adapter arithmetic on the data model: sums and differences (factors concatenated, ranks
add up), scaling (scales multiplied) and rank truncation (the best rank-k approximation of every
module, through the backend's factored SVD). Imports no format and no operation: `Adapter`'s
operators call these.

Notation: update i has stored factors B_i (out x r_i), A_i (r_i x in), scale s_i and weight w_i;
c_i = w_i * s_i. Modules missing from some adapters add up from the ones that have them. Results
have scale 1.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from lorafuse._validate import check_rank, check_text, check_threads
from lorafuse.backends import FactorJob, get_backend
from lorafuse.errors import (
    LorafuseError,
    LorafuseValueError,
    NonFiniteError,
    ShapeMismatchError,
    UnsharedModulesError,
    UnsupportedError,
)
from lorafuse.io.safetensors import raise_if_inputs_changed
from lorafuse.io.tensor import Tensor
from lorafuse.model.layout import refuse_lost_directions
from lorafuse.model.lora import LoraUpdate
from lorafuse.model.names import exact_pattern, full_tensors_text
from lorafuse.model.param_lora import refuse_parameter_loras
from lorafuse.model.patterns import pattern_problem
from lorafuse.model.spectral import batches, factor_cost
from lorafuse.model.state import FormatState, KohyaState
from lorafuse.model.update import Update, holds_nonfinite, nonfinite_words

if TYPE_CHECKING:  # the class of the adapters: new ones are made with type(template)(...)
    from lorafuse.model.adapter import Adapter

FLOAT32_MAX = float(np.finfo(np.float32).max)
SVD_GROUP = 64  # modules per call into the backend: only one group's factors exist at a time
SVD_GROUP_ELEMENTS = 1 << 25  # and at most this many factor elements (or one module)
# adapter_config.json fields that describe the inputs' ranks and scales, not the result's
_RANK_FIELDS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora")


def most_common(values: list[float]) -> float:
    """The most frequent value; ties go to the first seen (the r / lora_alpha a config states)."""
    counts: dict[float, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=counts.__getitem__)  # the first maximal key: counts keeps the order values were seen


def rank_fields(updates: Sequence[Update], prefer: Sequence[Update] = ()) -> dict[str, object]:
    """adapter_config.json's rank and scale fields that state `updates` exactly, as PEFT reads them: r and
    lora_alpha the most common rank and alpha (= scale x rank) among `prefer` when given (modules PEFT reads at
    r and lora_alpha alone: the experts of a MoE model it fuses, ops.expert_ranks), else among `updates`;
    exact-name rank_pattern / alpha_pattern for the other modules, use_rslora false, use_dora whether they carry
    magnitudes. Empty for no update."""
    if not updates:
        return {}
    ranks = [float(u.rank) for u in updates]
    alphas = [u.scale * u.rank for u in updates]
    r = int(most_common([float(u.rank) for u in prefer] or ranks))
    alpha = most_common([u.scale * u.rank for u in prefer] or alphas)
    return {"r": r, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
            "rank_pattern": {exact_pattern(u.name): u.rank for u in updates if u.rank != r},
            "alpha_pattern": {exact_pattern(u.name): a for u, a in zip(updates, alphas) if a != alpha},
            "use_rslora": False,
            "use_dora": any(getattr(u, "magnitude", None) is not None for u in updates)}


def restated_config(config: Mapping[str, object], updates: Mapping[str, Update]) -> dict[str, object]:
    """`config` with its rank and scale fields restated from `updates` (a result's own, not its inputs'): a deep
    copy, so that editing the result's config (its target_modules list) leaves the input's as it was."""
    out = {k: copy.deepcopy(v) for k, v in config.items() if k not in _RANK_FIELDS}
    out.update(rank_fields(list(updates.values())))
    return out


def check_linear(adapters: Sequence[Adapter], what: str, biases: bool = False) -> None:
    """DoRA does not add linearly, and full tensors and LoRAs on parameters (PEFT target_parameters) cannot be
    combined: refuse them; lora_B biases too unless `biases` (exact arithmetic carries them: a merge adds
    scale * bias, which is linear in the update)."""
    for a in adapters:
        refuse_parameter_loras(a.label, a.updates, what)
        for name, u in a.updates.items():
            if u.magnitude is not None:
                raise UnsupportedError(
                    f"{a.label}: module {name!r} is DoRA; {what} is defined for plain LoRA only "
                    "(a DoRA update is not a sum of low-rank deltas). Merge it into the base with `apply` instead."
                )
            if u.bias is not None and not biases:
                raise UnsupportedError(
                    f"{a.label}: module {name!r} has a lora_B bias, which {what} cannot carry (it writes the "
                    "deltas' factors only, and a method that mixes them has no rule for the bias a merge adds beside "
                    "them); Python's exact adapter arithmetic carries it (c * a, a + b, a - b, a.to_rank(k))")
        extra = [a.full_origin.get(k, k) for k in a.full if not a.full_origin.get(k, k).endswith(".base_layer.weight")]
        if extra:
            raise UnsupportedError(f"{a.label}: {full_tensors_text(a.config, extra)} cannot be combined; merge them "
                                   "with `apply`")


def check_split(split: str) -> None:
    check_text(split, "split", ("B", "sqrt"))
    if split not in ("B", "sqrt"):
        raise LorafuseValueError(f"split must be 'B' (singular values on B, like PEFT) or 'sqrt', got {split!r}")


def _flattened_as(u: Update, shape: tuple[int, ...]) -> Update | None:
    """A LoHa / LoKr stored with a conv kernel flattened (out, in*kh*kw), laid onto the 4-D `shape` of the
    same module in another adapter; None when that is not what differs."""
    if isinstance(u, LoraUpdate) or len(u.delta_shape) != 2 or len(shape) != 4:
        return None
    if u.delta_shape[0] != shape[0] or u.delta_shape[1] != int(np.prod(shape[1:])):
        return None
    return u.with_shape(shape)


def laid_out(updates: Sequence[Update]) -> list[Update]:
    """One module's updates from several adapters, a LoHa / LoKr stored with its conv kernel flattened (out,
    in*kh*kw) laid onto the 4-D shape another of them gives the module; the others as they are."""
    conv = next((tuple(u.delta_shape) for u in updates if len(u.delta_shape) == 4), None)
    return _one_orientation([(_flattened_as(u, conv) if conv else None) or u for u in updates])


def _one_orientation(updates: list[Update]) -> list[Update]:
    """Linear LoRAs of one module marked transposed in some adapters and not in others (PEFT's fan_in_fan_out,
    which PEFT itself ignores for a torch Linear and forces for a Conv1D) in one layout: that of the first
    update whose mark means something (a DoRA's, a LoHa's / LoKr's), else the first's (LoraUpdate.laid_as)."""
    linear = [u for u in updates if u.kind == "linear"]
    if len({u.transposed for u in linear}) < 2:
        return updates
    fixed = [u.transposed for u in linear if not isinstance(u, LoraUpdate) or u.magnitude is not None]
    target = fixed[0] if fixed else linear[0].transposed
    return [u.laid_as(target) if isinstance(u, LoraUpdate) else u for u in updates]


def input_label(adapter: Adapter, i: int) -> str:
    """How a message names the i-th (from 0) of an operation's adapters: its position and its path, as the
    streamed combine does ('adapter 2 (<in-memory adapter>)' tells two adapters in memory apart)."""
    return f"adapter {i + 1} ({adapter.label})"


def terms_by_module(adapters: Sequence[Adapter], weights: Sequence[float]) -> dict[str, list[tuple[float, Update]]]:
    """Module -> the (weight, update) of every adapter that has it, checking the layouts agree. A LoHa /
    LoKr stored with its conv kernel flattened takes the 4-D shape another adapter gives the module."""
    gathered: dict[str, list[tuple[str, float, Update]]] = {}
    for i, (a, w) in enumerate(zip(adapters, weights)):
        for name, u in a.updates.items():
            gathered.setdefault(name, []).append((input_label(a, i), w, u))
    out: dict[str, list[tuple[float, Update]]] = {}
    for name, items in gathered.items():
        terms = list(zip([w for _, w, _ in items], laid_out([u for _, _, u in items])))
        first = terms[0][1]
        for (label, _, _), (_, u) in zip(items, terms):
            if (tuple(first.delta_shape), first.kind, first.transposed) != (tuple(u.delta_shape), u.kind,
                                                                           u.transposed):
                raise ShapeMismatchError(
                    f"module {name!r}: {label} has a {u.kind} update of shape {tuple(u.delta_shape)}"
                    f"{' (transposed)' if u.transposed else ''}, {items[0][0]} has a {first.kind} update "
                    f"of shape {tuple(first.delta_shape)}{' (transposed)' if first.transposed else ''}"
                )
        out[name] = terms
    return out


COEFFICIENT_EXP = 40  # stack: a coefficient below 2^-40 is split between both sides


def stack(terms: Sequence[tuple[float, Update]], threads: int, coef_on: str = "B") -> tuple[np.ndarray, np.ndarray]:
    """[c_i B_i] and [A_i] (coef_on='B'), or [B_i] and [c_i A_i] (coef_on='A'), c_i = w_i * s_i (a c_i below
    2^-COEFFICIENT_EXP split between both sides by a power of two, so that float32 holds it). Filled
    in place one term at a time: besides the result, only one term's factors exist at a time."""
    b, a = terms[0][1].stored_factors(threads)
    widths = [b.shape[1]] + [u.rank for _, u in terms[1:]]
    out_b = np.empty((b.shape[0], sum(widths)), dtype=np.float32)
    out_a = np.empty((sum(widths), a.shape[1]), dtype=np.float32)
    at = 0
    for i, (w, u) in enumerate(terms):
        if i:
            b, a = u.stored_factors(threads)
        c, other = _split_coefficient(float32_coefficient(w, u.scale, f"input {i + 1}"))
        cb, ca = (c, other) if coef_on == "B" else (other, c)
        with np.errstate(over="ignore", invalid="ignore"):  # checked below, with a message
            out_b[:, at:at + b.shape[1]] = b * np.float32(cb) if cb != 1.0 else b
            out_a[at:at + a.shape[0]] = a * np.float32(ca) if ca != 1.0 else a
        at += b.shape[1]
        del b, a
    return out_b, out_a


def _split_coefficient(c: float) -> tuple[float, float]:
    """(c, 1), or for a c below 2^-COEFFICIENT_EXP (a weight of 1e-50, which float32 holds as 0, or whose
    products with the factors would underflow) (c / 2^e, 2^e) with 2^e about its square root: the coefficient on
    the stack's side and on the other side, whose product is c. A huge c stays on one side: factors it takes past
    float32 are refused (a delta past float32's range is no model's), as before."""
    if c == 0 or math.frexp(c)[1] >= -COEFFICIENT_EXP:
        return c, 1.0
    e = math.frexp(c)[1] // 2
    return math.ldexp(c, -e), math.ldexp(1.0, e)


def float32_coefficient(w: float, scale: float, where: str) -> float:
    """A term's coefficient w * scale, which scales its factors in float32: LorafuseValueError naming `where`
    (the input, the module) when float32 cannot hold it (NaN too)."""
    c = w * scale
    if not abs(c) <= FLOAT32_MAX:
        raise LorafuseValueError(f"{where}: weight {w:g} times its scale {scale:g} is beyond float32's range: use "
                                 "smaller weights")
    return c


# adapter_config.json's fields that say which modules PEFT gives LoRA layers (besides target_modules)
NARROWING_FIELDS = ("exclude_modules", "layers_to_transform", "layers_pattern")


def _given(value: object) -> object:
    """A narrowing field's value, None for the empty values PEFT takes as not given."""
    return None if value is None or value == [] or value == "" else value


def combined_targets(configs: Sequence[Mapping[str, object]], names: Sequence[str]) -> dict[str, object]:
    """target_modules, exclude_modules, layers_to_transform and layers_pattern for the result of inputs whose
    configs are `configs`, holding the modules `names`, such that PEFT targets the modules the inputs targeted
    (and no other, which it would fill with zero factors and report as missing keys): the inputs' fields where
    they agree; their target_modules joined (lists united, regular expressions alternated) where only those
    differ (unless lorafuse would refuse to read the joined expression back: then as below); else the result's
    modules by their full names (narrowing fields None). Copies, never the inputs' own lists: editing the
    result's config leaves theirs as they were."""
    return copy.deepcopy(_combined_targets(configs, names))


def _combined_targets(configs: Sequence[Mapping[str, object]], names: Sequence[str]) -> dict[str, object]:
    targets = [c.get("target_modules") for c in configs]
    narrowing = [{k: _given(c.get(k)) for k in NARROWING_FIELDS} for c in configs]
    if targets and all(n == narrowing[0] for n in narrowing):
        kept: dict[str, object] = dict(narrowing[0])
        if all(t == targets[0] for t in targets) and targets[0] is not None:
            return {**kept, "target_modules": targets[0]}
        if all(isinstance(t, list) for t in targets):
            return {**kept, "target_modules": sorted({m for t in targets for m in t})}  # type: ignore[attr-defined]
        if all(isinstance(t, str) and t != "all-linear" for t in targets):
            joined = "|".join(dict.fromkeys(f"({t})" for t in targets))
            if _readable_pattern(joined):
                return {**kept, "target_modules": joined}
    return {"target_modules": sorted(names), **{k: None for k in NARROWING_FIELDS if any(k in c for c in configs)}}


def _readable_pattern(pattern: str) -> bool:
    """Whether lorafuse reads `pattern` back as a target_modules regular expression (formats.peft: bounded length
    and backtracking, one valid expression): patterns that each pass can fail joined, with more repeating
    quantifiers than one may hold, or a group name that two of them define."""
    return pattern_problem(pattern) is None


def result(template: Adapter, updates: Mapping[str, Update], adapters: Sequence[Adapter]) -> Adapter:
    """The adapter of `updates` computed from `adapters`: the first one's config with rank and alpha fields
    stating `updates` (rank_fields), targeting the modules of every input (combined_targets)."""
    config = restated_config(template.config, updates)
    config.update(combined_targets([a.config for a in adapters], list(updates)))
    return type(template)(updates=dict(updates), config=config, format=template.format,
                          state=joined_state(template, adapters, list(updates)),
                          derived_from=list(dict.fromkeys(p for a in adapters for p in a.sources())))


def joined_state(template: Adapter, adapters: Sequence[Adapter], names: Sequence[str]) -> FormatState:
    """The format state of a result holding modules `names` of `adapters`: the template's (a copy), and for a kohya
    result what the other kohya inputs kept of the modules the template lacks (join_state), in one layout
    (one_layout)."""
    state = copy.deepcopy(template.state)
    if len(adapters) < 2:
        return state
    for other in adapters:
        if other is not template:
            join_state(state, other.state)
    return one_layout(state, names)


def join_state(state: FormatState, other: FormatState) -> None:
    """Add to a kohya result's `state` what another kohya input kept of the modules `state` lacks (each `.alpha`'s
    dtype and form, the ComfyUI key layout it was read in), so that each module is written as its input held it."""
    if not isinstance(state, KohyaState) or not isinstance(other, KohyaState):
        return
    for mine, theirs in ((state.alpha_dtypes, other.alpha_dtypes), (state.unused_alphas, other.unused_alphas),
                         (state.alpha_forms, other.alpha_forms), (state.layouts, other.layouts)):
        for module, value in theirs.items():
            mine.setdefault(module, copy.deepcopy(value))  # type: ignore[arg-type]
    state.conv_dora = state.conv_dora | other.conv_dora


def one_layout(state: FormatState, names: Sequence[str]) -> FormatState:
    """`state` for a file of modules `names` in one key layout: where its ComfyUI layouts name some of the modules
    but not all (a ComfyUI-layout input plus a kohya-named one), none is kept and every module gets its kohya name
    (diffusers' family converters refuse a file that mixes `diffusion_model.<path>` and `lora_unet_` keys)."""
    if isinstance(state, KohyaState) and state.layouts and not all(n in state.layouts for n in names):
        state.layouts = {}
    return state


def shared_modules(adapters: Sequence[Adapter]) -> set[str]:
    """The module names that at least two of `adapters` have."""
    seen: set[str] = set()
    shared: set[str] = set()
    for a in adapters:
        names = set(a.updates)
        shared |= seen & names
        seen |= names
    return shared


def module_examples(names: Sequence[str]) -> str:
    """The first two module names, quoted, and '...' when there are more: how messages show a module set."""
    shown = ", ".join(repr(n) for n in list(names)[:2])
    return shown + (", ..." if len(names) > 2 else "")


def _root(name: str) -> str:
    """The first part of a module name: 'model' in 'model.layers.0.q_proj', 'lora_unet' in kohya's
    'lora_unet_down_blocks_0_...' (no dots)."""
    if "." in name:
        return name.split(".", 1)[0]
    return "_".join(name.split("_", 2)[:2])


def _pipeline_part(root: str) -> bool:
    """Whether a root names a component of a diffusion pipeline: kohya's lora_unet / lora_te, lora_te1, ... /
    lora_transformer, diffusers' unet / text_encoder, text_encoder_2, ... / transformer."""
    part = root.removeprefix("lora_")
    if root.startswith("lora_") and part.startswith("te"):
        return part[2:].isdigit() or part == "te"
    return part in ("unet", "transformer") or part == "text_encoder" or (
        part.startswith("text_encoder_") and part.removeprefix("text_encoder_").isdigit())


def model_roots(adapter: Adapter) -> set[str]:
    """The roots (_root) of an adapter's module names, the components of one diffusion pipeline (in a kohya or
    diffusers file: an LLM's 'transformer.h.0...' is not one) taken as one root, per naming: a text-encoder
    LoRA and a UNet LoRA of one model adapt one model."""
    roots = {_root(n) for n in adapter.updates}
    if adapter.format not in ("kohya", "diffusers"):
        return roots
    return {("lora_<pipeline>" if r.startswith("lora_") else "<pipeline>") if _pipeline_part(r) else r for r in roots}


def one_model(a: Adapter, b: Adapter) -> bool:
    """Whether two adapters name their modules from a common root (model_roots): one model's, in one naming."""
    return not model_roots(a).isdisjoint(model_roots(b))


class RootGroups:
    """Adapters grouped by the roots of their module names (model_roots): adapters that share a root (a shared
    module shares its root) are of one model, and so are two that each share one with a third. check() refuses
    adapters that fall into two groups or more (adapters of different models, or one model in two namings),
    naming the first adapter and the first one outside its group: one stray adapter among many of one model too,
    which sharing modules among the others does not excuse. Memory grows with the roots seen, not the adapters:
    each root keeps the first adapter that had it (how it is named, three of its module names)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._parent: dict[str, str] = {}  # union-find over roots
        self._seen: dict[str, tuple[str, list[str]]] = {}  # root -> the first adapter that had it, in order

    def _top(self, root: str) -> str:
        while self._parent[root] != root:
            self._parent[root] = self._parent[self._parent[root]]
            root = self._parent[root]
        return root

    def see(self, where: str, adapter: Adapter) -> None:
        roots = sorted(model_roots(adapter))
        if not roots:
            return
        names: list[str] | None = None
        for r in roots:
            if r not in self._parent:
                names = names if names is not None else list(adapter.updates)[:3]  # (module_examples shows two)
                self._parent[r] = r
                self._seen[r] = (where, names)
        top = self._top(roots[0])
        for r in roots[1:]:
            self._parent[self._top(r)] = top

    def check(self) -> None:
        if not self._seen:
            return
        first = next(iter(self._seen))
        top = self._top(first)
        for r, stray in self._seen.items():
            if self._top(r) != top:
                raise different_models(self.what, self._seen[first], stray)


def check_shared(adapters: Sequence[Adapter], what: str, wheres: Sequence[str] | None = None) -> None:
    """Refuse adapters that share no module and name their modules from different roots: adapters of
    different models, or one model named two ways (kohya's 'lora_unet_...' vs diffusers' 'unet....'), also as
    one stray adapter among many (RootGroups). Disjoint modules under one root (a q_proj adapter and a v_proj
    adapter of one model; a text-encoder LoRA and a UNet LoRA of one diffusion model) are fine. `wheres`: how
    the message names each adapter (a list file's line), else its label."""
    groups = RootGroups(what)
    for i, a in enumerate(adapters):
        groups.see(a.label if wheres is None else wheres[i], a)
    groups.check()


def different_models(what: str, first: tuple[str, Sequence[str]], second: tuple[str, Sequence[str]]
                     ) -> UnsharedModulesError:
    """check_shared's refusal of two adapters (each: how it is named, its module names) that share no module
    and no root (also raised by the streamed engine's header pass, ops.combine.many.check_sources)."""
    return UnsharedModulesError(
        f"{what}: {first[0]} and {second[0]} share no module "
        f"({module_examples(first[1])} vs {module_examples(second[1])}): adapters "
        "for different models, or one model in two namings (kohya vs diffusers: `lorafuse convert` one "
        "of them first), or adapters of different parts of one model (its output head and its blocks, say). To put "
        "disjoint modules together on purpose, use the method 'cat' (lorafuse combine --method cat)")


def weighted_cat(terms: Sequence[tuple[float, Adapter]]) -> Adapter:
    """sum_i w_i * adapter_i, exactly: factors concatenated, scale 1. Adapters of different models are
    refused (check_shared)."""
    adapters = [a for _, a in terms]
    check_linear(adapters, "adapter arithmetic", biases=True)
    check_shared(adapters, "adapter arithmetic")
    check_float32_scales("adapter arithmetic", adapters)
    updates = {}
    for name, ts in terms_by_module(adapters, [w for w, _ in terms]).items():
        with np.errstate(over="ignore", invalid="ignore"):  # checked below, naming the module
            b, a = stack(ts, 0, coef_on="A")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise _not_finite(name, ts, adapters)
        updates[name] = _with_bias_sum(ts[0][1].with_factors(b, a), ts)
    return result(adapters[0], updates, adapters)


def _with_bias_sum(u: Update, terms: Sequence[tuple[float, Update]]) -> Update:
    """`u` (scale 1) with the lora_B bias sum_i w_i s_i bias_i of the terms that have one (PEFT lora_bias: a
    merge adds scale * bias to the base bias, linearly), in float64 rounded once to float32; `u` as it is when
    no term has a bias."""
    biased = [(w * t.scale, t.bias) for w, t in terms if isinstance(t, LoraUpdate) and t.bias is not None]
    if not biased or not isinstance(u, LoraUpdate):  # (a LoHa / LoKr has no bias)
        return u
    acc = np.zeros(biased[0][1].shape, dtype=np.float64)
    for c, bias in biased:
        acc += c * bias.f32().astype(np.float64)
    with np.errstate(over="ignore"):
        acc32 = acc.astype(np.float32)
    if not np.isfinite(acc32).all():
        raise LorafuseValueError(f"module {u.name!r}: the weighted sum of its lora_B biases is not finite in "
                                 f"float32 (largest {FLOAT32_MAX:.4g})")
    return dataclasses.replace(u, bias=Tensor.from_array(acc32))


def check_float32_scales(what: str, adapters: Sequence[Adapter]) -> None:
    """Refuse, naming the adapter and the module, a scale float32 cannot hold: a sum and a rank truncation scale
    the factors by it in float32 (their result has scale 1). Scaling down first and back up after works."""
    for a in adapters:
        for name, u in a.updates.items():
            if not abs(u.scale) <= FLOAT32_MAX:
                raise LorafuseValueError(
                    f"{what}: {a.label}: module {name!r}: its scale {u.scale:.4g} is beyond float32's range "
                    f"({FLOAT32_MAX:.4g}), in which the factors are computed: scale the adapters down first and "
                    "the result back up after ((a * c + b * c) / c, (a * c).to_rank(k) / c)")


def _not_finite(name: str, terms: Sequence[tuple[float, Update]], adapters: Sequence[Adapter]) -> LorafuseError:
    """The error of a sum whose factors for module `name` are not finite: NonFiniteError naming the adapter
    whose own factors hold NaN / Inf, else LorafuseValueError (scale times factor beyond float32)."""
    for a in adapters:
        u = a.updates.get(name)
        if u is not None and holds_nonfinite(u):
            return NonFiniteError(f"adapter arithmetic: {a.label}: module {name!r} {nonfinite_words(u)}")
    scales = ", ".join(f"{w * u.scale:.4g}" for w, u in terms)
    return LorafuseValueError(f"adapter arithmetic: module {name!r}: the factors times their weighted scales "
                              f"({scales}) overflow float32 (largest {FLOAT32_MAX:.4g})")


def _checked_scale(what: str, name: str, u: Update, scale: float) -> float:
    """`scale` when a file can hold it: finite, and alpha = scale * rank (what kohya and PEFT files store)
    within float32's range; else LorafuseValueError naming the operation and the module."""
    if not math.isfinite(scale) or abs(scale) * u.rank > FLOAT32_MAX:
        raise LorafuseValueError(
            f"{what}: module {name!r} would get scale {scale:.4g} (alpha = scale x rank {u.rank} = "
            f"{scale * u.rank:.4g}), beyond float32's largest number {FLOAT32_MAX:.4g}: no adapter format holds it")
    return scale


def scaled(adapter: Adapter, c: float, what: str = "adapter arithmetic") -> Adapter:
    """c * adapter: the same factors with every scale multiplied by c (exact, rank unchanged). A non-finite
    c, or a scale float32 cannot hold, is refused (LorafuseValueError naming `what`, the operation)."""
    if not math.isfinite(c):
        raise LorafuseValueError(f"{what}: the factor {c} is not a finite number")
    check_linear([adapter], "adapter arithmetic", biases=True)  # a lora_B bias is added times the scale: exact
    updates: dict[str, Update] = {n: dataclasses.replace(u, scale=_checked_scale(what, n, u, u.scale * c))
                                  for n, u in adapter.updates.items()}
    return type(adapter)(updates=updates, config=restated_config(adapter.config, updates), format=adapter.format,
                         derived_from=adapter.sources(), state=copy.deepcopy(adapter.state))


def truncate(adapter: Adapter, rank: int, split: str = "B", threads: int = 0) -> Adapter:
    """The best rank-`rank` approximation of every module's delta (exact: QR + SVD of the small core,
    by the backend's factored SVD); a module whose rank is `rank` or less keeps its rank (its factors
    rebalanced by the SVD), as in resize. In groups of modules bounded by the size of their exact
    factorizations (a LoKr's or LoHa's can be large)."""
    rank = check_rank(rank)
    threads = check_threads(threads)
    check_split(split)
    check_linear([adapter], "rank truncation", biases=True)  # a lora_B bias is kept, as resize keeps it
    check_float32_scales("rank truncation", [adapter])
    names = list(adapter.updates)
    updates: dict[str, LoraUpdate] = {}
    costs = [(0.0, factor_cost(adapter.updates[n])[1]) for n in names]
    backend = get_backend()
    for start, stop in batches(costs, math.inf, SVD_GROUP_ELEMENTS, SVD_GROUP):
        jobs = [FactorJob(n, *stack([(1.0, adapter.updates[n])], threads)) for n in names[start:stop]]
        # at most each module's own (stacked) rank and full rank min(out, in), as resize: a module of lower rank
        # is kept at its rank, never padded with zero columns
        results = backend.factored_svd(jobs, [min(rank, j.b.shape[1], j.b.shape[0], j.a.shape[1]) for j in jobs],
                                       split, threads)
        for j, r in zip(jobs, results):
            refuse_lost_directions(f"{adapter.label}: module {j.name!r}", r.b, r.a, r.s, split)
        updates.update({j.name: adapter.updates[j.name].with_factors(r.b, r.a) for j, r in zip(jobs, results)})
    raise_if_inputs_changed(adapter.sources())  # its file shrank or changed while read: refuse the result
    return result(adapter, updates, [adapter])


def norm(adapter: Adapter, threads: int = 0) -> float:
    """Exact Frobenius norm of all deltas together, from the factors (math.hypot: no square overflows where the
    norm is finite; NaN where a module's is)."""
    values = list(adapter.norms(threads).values())
    return math.nan if any(math.isnan(v) for v in values) else math.hypot(*values)


__all__ = ["RootGroups", "check_linear", "check_shared", "check_split", "different_models", "join_state",
           "module_examples", "norm", "one_layout", "result", "scaled", "shared_modules", "stack", "terms_by_module",
           "truncate", "weighted_cat"]
