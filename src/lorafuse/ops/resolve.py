"""Which base tensor each adapter module changes, and how: the matching step of `apply`.

LLM adapters (PEFT folders) name modules by their canonical path and match through
`BaseMatcher`. Diffusion adapters (kohya / LyCORIS files, diffusers LoRA files) name
them `lora_unet_...` or `unet.down_blocks...` and match through the data tables of
`formats.sd_keys`, which may land a module on rows of a fused weight (OpenCLIP's
`in_proj_weight`) or spread a fused module (Flux `qkv`) over several weights.
"""

from __future__ import annotations

import dataclasses
import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from lorafuse._terminal import plural
from lorafuse.errors import (
    FormatError,
    LorafuseError,
    MissingModuleError,
    ShapeMismatchError,
    UnsupportedError,
)
from lorafuse.formats.targets import Target
from lorafuse.io.tensor import Tensor
from lorafuse.model import Adapter, LoraUpdate, Update
from lorafuse.model.names import full_kind
from lorafuse.model.param_lora import ParamLoraUpdate

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


@dataclass(frozen=True)
class TokenRows:
    """Rows of a base weight that an adapter replaces (PEFT trainable_token_indices): row indices[i] becomes
    values[i], cast to the weight's dtype, as PEFT's TrainableTokensLayer.merge (index_copy) does."""

    indices: np.ndarray  # int64, distinct
    values: Tensor  # (len(indices), columns)
    source: str  # adapter label, for messages


@dataclass
class Resolved:
    contributions: dict[str, list[Contribution]] = field(default_factory=dict)
    bias_contributions: dict[str, list[Contribution]] = field(default_factory=dict)
    replacements: dict[str, tuple[Tensor, str]] = field(default_factory=dict)
    rows: dict[str, list[TokenRows]] = field(default_factory=dict)  # base key -> the rows adapters replace, in order
    missing: list[str] = field(default_factory=list)
    # the pipeline components whose own names (without the component prefix) missing modules are (LayoutHints)
    components: set[str] = field(default_factory=set)
    # base key -> rows of the matrix the merge sees (a fused [E, d1, d2] expert tensor: E * d1; ops.fused)
    matrix_rows: dict[str, int] = field(default_factory=dict)


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
            f"{key!r} has shape {tuple(shape)}{where}{vocab_hint(name, u.delta_shape, shape) if whole else ''}"
        )


# the last name component of transformers' token embedding layers (input and output), whose rows are the vocabulary
VOCAB_LAYERS = frozenset({"embed_tokens", "lm_head", "wte", "embed_out", "word_embeddings", "tok_embeddings"})


def vocab_hint(name: str, shape: Sequence[int], base: Sequence[int]) -> str:
    """Why a token embedding's update (or replacement) has more or fewer rows than the base's: the adapter was
    trained on the model with its vocabulary resized (resize_token_embeddings), and PEFT saves such layers whole."""
    layer = name.removesuffix(".weight").rsplit(".", 1)[-1]
    if layer not in VOCAB_LAYERS or len(shape) != 2 or len(base) != 2 or shape[1] != base[1] or shape[0] == base[0]:
        return ""
    return (f" (a vocabulary of {shape[0]} tokens where the base has {base[0]}: the adapter was trained on the model "
            "with its token embeddings resized, resize_token_embeddings(); apply it to that resized model, saved with "
            "save_pretrained)")


# transformers models whose layers of these names are `transformers.pytorch_utils.Conv1D` (weight stored
# in x out); every other layer PEFT puts LoRA on with lora_A / lora_B is a torch Linear (out x in) or a
# convolution. From grepping transformers 5 for Conv1D(: gpt2, openai, imagegpt, decision_transformer, clvp.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp", "clvp_decoder"})
CONV1D_LAYERS = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})
# open_clip's (and OpenAI CLIP's) residual blocks, whose mlp.c_fc / mlp.c_proj are torch Linear layers: no
# transformers Conv1D model names its layers `resblocks`
OPENCLIP_BLOCK = re.compile(r"(^|\.)transformer\.resblocks\.\d+\.")
DIFFUSERS_MODEL = "diffusers"  # ModelInfo's model_type of a diffusers model (its config.json names none)


@dataclass(frozen=True)
class ModelInfo:
    """What the base's config.json says about its layers: its model_type and those of its sub-models."""

    model_type: str | None = None
    nested: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls, config: Mapping[str, object] | None) -> ModelInfo:
        if not config:
            return cls()
        nested: set[str] = set()
        todo: list[tuple[object, int]] = [(v, 1) for v in config.values()]
        while todo:  # sub-configs (text_config, decoder, ...) a few levels deep
            value, depth = todo.pop()
            if isinstance(value, dict) and depth <= 3:
                if isinstance(value.get("model_type"), str):
                    nested.add(value["model_type"])
                todo += [(v, depth + 1) for v in value.values()]
        top = config.get("model_type")
        if not isinstance(top, str) and isinstance(config.get("_diffusers_version"), str):
            top = DIFFUSERS_MODEL  # a diffusers model's config.json: torch Linear layers, never a Conv1D
        return cls(top if isinstance(top, str) else None, frozenset(nested))

    def layer_type(self, module: str) -> str | None:
        """'linear' or 'conv1d' for a PEFT lora_A / lora_B module, or None when config.json cannot tell."""
        if OPENCLIP_BLOCK.search(module):  # OpenCLIP's text tower (SD 2.x / SDXL single files): torch Linear
            return "linear"
        if self.model_type is None:
            return None
        if module.rsplit(".", 1)[-1] not in CONV1D_LAYERS:
            return "linear"
        if self.model_type in CONV1D_MODEL_TYPES:
            return "conv1d"
        return None if self.nested & CONV1D_MODEL_TYPES else "linear"


def _peft_layout(adapter: Adapter, name: str, u: Update, key: str, shape: tuple[int, ...],
                 model: ModelInfo) -> Update:
    """A PEFT lora_A / lora_B update in the layout of the base layer it lands on.

    PEFT decides the layout by the layer's type, not by fan_in_fan_out: it resets the flag for a torch
    Linear (weight out x in) and forces it for a transformers Conv1D (weight in x out) with a warning.
    The type comes from config.json's model_type, or from the base weight's shape when that is not
    square; a square weight of an unknown model is taken as Linear only when nothing suggests Conv1D."""
    if adapter.format != "peft" or not isinstance(u, LoraUpdate) or u.kind != "linear":
        return u
    out, inp = int(u.B.shape[0]), int(np.prod(u.A.shape[1:], dtype=np.int64))
    layer = model.layer_type(name)
    base = tuple(int(d) for d in shape)
    if layer is None:
        if out != inp:
            by_shape: dict[tuple[int, ...], str] = {(out, inp): "linear", (inp, out): "conv1d"}
            layer = by_shape.get(base)
            if layer is None:
                return u  # fits neither way: _check_fit reports it
        elif not u.transposed and name.rsplit(".", 1)[-1] not in CONV1D_LAYERS:
            layer = "linear"
        else:
            why = ("the base's config.json names no model_type" if model.model_type is None else
                   f"config.json holds a Conv1D model ({', '.join(sorted(model.nested & CONV1D_MODEL_TYPES))}) "
                   f"inside a {model.model_type!r} model")
            raise UnsupportedError(
                f"{adapter.label}: module {name!r}: cannot tell whether base weight {key!r} ({out} x {inp}) is a "
                "torch Linear (stored out x in; PEFT ignores fan_in_fan_out=true for it) or a transformers Conv1D "
                f"(stored in x out, as in GPT-2): {why}. Put the model's config.json (with its model_type) next to "
                "the base weights")
    expected = (out, inp) if layer == "linear" else (inp, out)
    if model.model_type is not None and base != expected and base == expected[::-1] and out != inp:
        kind = "a torch Linear, stored out x in" if layer == "linear" else "a transformers Conv1D, stored in x out"
        raise ShapeMismatchError(
            f"{adapter.label}: module {name!r}: base weight {key!r} has shape {base}, the transpose of what its "
            f"update needs {expected}: in a {model.model_type!r} model this layer is {kind} (fan_in_fan_out does "
            "not change that); the adapter was not made for this model")
    transposed = layer == "conv1d"
    return u if transposed == u.transposed else dataclasses.replace(u, transposed=transposed)


def _targets(adapter: Adapter, updates: Mapping[str, Update], shapes: Mapping[str, tuple[int, ...]],
             base_key: BaseKey, config: Mapping[str, object] | None) -> tuple[dict[str, list[Target]], list[str]]:
    """Where each module of the adapter lands: the matcher chain for its format (see ops.match)."""
    from lorafuse.ops.match import module_chain

    modules = {n: tuple(u.delta_shape) for n, u in updates.items()}
    try:
        return module_chain(adapter.format, base_key, config).match(modules, shapes)
    except ShapeMismatchError as e:  # a fused layer's sizes in config.json disagree with the weight
        raise ShapeMismatchError(f"{adapter.label}: {e}") from None


def resolve(shapes: Mapping[str, tuple[int, ...]], adapters: Sequence[Adapter], weights: Sequence[float],
            base_key: BaseKey, model_config: Mapping[str, object] | None = None) -> Resolved:
    """Contributions per base key for every adapter; `base_key(name)` maps a canonical tensor name to a
    key (LLM adapters); `shapes` holds every base key's shape; `model_config` is the base's config.json
    (it tells a PEFT module's layer type: Linear or Conv1D). Modules that found no target are listed
    in `missing` (the caller refuses them with `missing_error`, or skips them). Two modules of one
    adapter that land on the same rows of a base weight are refused (the same module saved twice)."""
    from lorafuse.formats.sd_keys import unmatched_hint
    from lorafuse.ops.fused import fused_hint, resolve_parameters

    out = Resolved()
    copies: set[str] = set()  # base keys replaced by PEFT's saved base-layer copy (is_base_copy)
    model = ModelInfo.from_config(model_config)
    twins = _UnicodeTwins(shapes, base_key)
    layouts = LayoutHints(shapes)
    for adapter, w in zip(adapters, weights):
        missing_before = len(out.missing)
        params = {n: u for n, u in adapter.updates.items() if isinstance(u, ParamLoraUpdate)}
        experts = resolve_parameters(adapter, params, shapes, base_key, model_config, w) if params else None
        updates: dict[str, Update] = {n: u for n, u in adapter.updates.items() if n not in params}
        if experts is not None:
            updates.update(experts.plain)
            out.missing += experts.missing
        found, missing = _targets(adapter, updates, shapes, base_key, model_config)
        for name in missing:
            hint = (twins.hint(name, ".weight") or fused_hint(name, base_key, model_config) or _ambiguous(name, shapes)
                    or unmatched_hint(name, shapes) or layouts.hint(name))
            out.missing.append(f"{adapter.label}: module {name!r}{hint}")
        out.components |= layouts.components
        if len(out.missing) == missing_before:  # else the layers it names may be those the unmatched modules adapt
            landed = {t.key for ts in found.values() for t in ts}
            _refuse_random_targets(adapter, shapes, landed | set(experts.contributions if experts is not None else ()))
        claimed: dict[str, list[tuple[str, int, int]]] = {}
        if experts is not None:
            for pkey, entries in experts.contributions.items():
                rows = experts.matrix_rows.get(pkey, int(shapes[pkey][0]))
                if out.matrix_rows.get(pkey, rows) != rows:
                    raise UnsupportedError(f"{adapter.label}: base parameter {pkey!r} {tuple(shapes[pkey])} is merged "
                                           f"as {rows} rows here and {out.matrix_rows[pkey]} by another adapter")
                if pkey in experts.matrix_rows:
                    out.matrix_rows[pkey] = rows
                for t, u_e, coef in entries:
                    _claim(claimed, adapter, u_e.name.split("[", 1)[0], t, (rows,))
                    out.contributions.setdefault(pkey, []).append(
                        Contribution(u_e, coef, adapter.label, t.base_rows, t.delta_rows))
        for name, targets in found.items():
            u = updates[name]
            if u.magnitude is not None and w != 1.0:
                raise UnsupportedError(
                    f"{adapter.label}: module {name!r} is DoRA; a weight other than 1 has no defined meaning for it"
                )
            if u.magnitude is not None and getattr(u, "bias", None) is not None:  # PEFT's LoraConfig refuses the pair
                raise UnsupportedError(
                    f"{adapter.label}: module {name!r} is DoRA and has a lora_B bias: PEFT does not support lora_bias "
                    "with DoRA (it cannot load this adapter), so whether the bias merges scaled by the magnitude over "
                    "the norm or not is not defined"
                )
            for t in targets:
                shape = shapes[t.key]
                u_t = _peft_layout(adapter, name, u, t.key, shape, model)
                _check_fit(adapter, name, u_t, t.key, shape, t)
                _claim(claimed, adapter, name, t, shape)
                c = Contribution(u_t, w * u_t.scale, adapter.label, t.base_rows, t.delta_rows)
                if c.mapped and (u.magnitude is not None or u.bias is not None):
                    raise UnsupportedError(
                        f"{adapter.label}: module {name!r} lands on part of a fused weight ({t.key!r}); a DoRA "
                        "magnitude or a bias cannot be applied to part of a weight"
                    )
                if isinstance(u, LoraUpdate) and u.bias is not None:
                    bkey = t.key[: -len("weight")] + "bias"
                    if bkey not in shapes:  # skipped whole (skip_missing): not its weight's part alone
                        out.missing.append(f"{adapter.label}: module {name!r} has a lora_B bias but the base has "
                                           f"no {bkey!r}")
                        continue
                    out.bias_contributions.setdefault(bkey, []).append(c)
                out.contributions.setdefault(t.key, []).append(c)
        replaced_by: dict[str, str] = {}
        for name, tensor in adapter.full.items():
            if full_kind(adapter.config, adapter.full_origin.get(name, name)) == "trainable tokens":
                _token_rows(out, adapter, name, tensor, w, shapes, base_key)
                continue
            key = base_key(name)
            what = full_label(adapter, name)
            if key is None:
                out.missing.append(f"{adapter.label}: {what}{twins.hint(name, '')}")
                continue
            if tuple(tensor.shape) != tuple(shapes[key]):
                raise ShapeMismatchError(
                    f"{adapter.label}: {what} has shape {tensor.shape} but base {key!r} has shape {shapes[key]}"
                    f"{vocab_hint(key, tensor.shape, shapes[key])}"
                )
            if w != 1.0 and not is_base_copy(adapter, name):
                raise UnsupportedError(
                    f"{adapter.label}: {what} replaces base weight {key!r} whole, and the adapter's weight is {w:g}: "
                    "a replacement cannot be scaled (with any weight it installs the same tensor, so a weight of 0 "
                    "would still change the model). Give this adapter weight 1"
                    + (", or train it with bias='none'" if full_kind(adapter.config, adapter.full_origin.get(name, ""))
                       == "bias" else ", or save it without modules_to_save")
                )
            if key in replaced_by:
                raise FormatError(f"{adapter.label}: tensors {replaced_by[key]!r} and {name!r} both replace base "
                                  f"weight {key!r} (the same tensor saved twice, e.g. with and without a 'model.' "
                                  "prefix); remove one of them")
            if key in out.replacements:
                first = out.replacements[key][0]
                both_copies = key in copies and is_base_copy(adapter, name)
                if both_copies and same_tensor(first, tensor):
                    continue  # two adapters' copies of one base layer (PEFT saves one with each embedding LoRA)
                how = f" ({first.dtype} and {tensor.dtype})" if first.dtype != tensor.dtype else ""
                raise UnsupportedError(
                    f"{key!r} is replaced by both {out.replacements[key][1]} and {adapter.label}"
                    + (f": their copies of the base layer's weight differ{how} (trained on different bases?), and "
                       "PEFT would install the last one under every adapter" if both_copies else ""))
            replaced_by[key] = name
            out.replacements[key] = (tensor, adapter.label)
            if is_base_copy(adapter, name):
                copies.add(key)
    return out


def _token_indices(adapter: Adapter, module: str) -> list[int] | None:
    """The token ids adapter_config's trainable_token_indices gives `module`: a list is the input embedding's (the
    module PEFT saved the rows under); an object's entry whose key `module` ends with (PEFT's _set_trainable rule);
    None when none names it."""
    value = adapter.config.get("trainable_token_indices")
    if isinstance(value, list):  # PEFT wraps one module for it (a tied output layer shares that module's rows)
        from lorafuse.model.names import TOKENS_SUFFIX

        saved = sorted(o[: -len(TOKENS_SUFFIX)] for o in adapter.full_origin.values() if o.endswith(TOKENS_SUFFIX))
        if len(saved) > 1:
            raise UnsupportedError(f"{adapter.label}: trainable_token_indices is a list, which names one module (the "
                                   f"model's input embedding), but the file holds token rows of {len(saved)} modules "
                                   f"({', '.join(saved[:3])}): which of them PEFT loads is unknown")
        return value
    if not isinstance(value, dict):
        return None
    found = [v for k, v in value.items() if module.endswith(k)]
    if len(found) > 1 and any(f != found[0] for f in found[1:]):
        named = [k for k in value if module.endswith(k)]
        raise UnsupportedError(f"{adapter.label}: trainable_token_indices entries {named} all name module "
                               f"{module!r} with different token ids: which rows it replaces is ambiguous")
    return found[0] if found else None


def _token_rows(out: Resolved, adapter: Adapter, name: str, tensor: Tensor, w: float,
                shapes: Mapping[str, tuple[int, ...]], base_key: BaseKey) -> None:
    """PEFT trainable tokens (`<module>.token_adapter.trainable_tokens_delta`): the rows they replace in the module's
    weight, checked against it (ids within its rows, one row of values per id, its width), into `out.rows`."""
    from lorafuse.model.names import TOKENS_SUFFIX

    origin = adapter.full_origin.get(name, name)
    module = origin[: -len(TOKENS_SUFFIX)]
    what = f"trainable token rows {origin!r} {tuple(tensor.shape)}"
    ids = _token_indices(adapter, module)
    if ids is None:
        raise UnsupportedError(f"{adapter.label}: {what}: the adapter's config (adapter_config.json) has no "
                               f"trainable_token_indices entry that module {module!r} ends with, so PEFT would not "
                               "load them and which rows they replace is unknown")
    if module in adapter.updates:
        raise UnsupportedError(f"{adapter.label}: module {module!r} has both a LoRA and {what}: PEFT cannot load "
                               "that adapter (trainable_token_indices cannot be applied to a LoRA layer)")
    key = base_key(module + ".weight")
    if key is None:
        out.missing.append(f"{adapter.label}: {what} (the base has no weight {module + '.weight'!r})")
        return
    shape = tuple(int(d) for d in shapes[key])
    if len(shape) != 2 or tuple(tensor.shape) != (len(ids), shape[1]):
        raise ShapeMismatchError(f"{adapter.label}: {what} for {len(ids)} token ids (trainable_token_indices) does "
                                 f"not fit base weight {key!r} {shape}: it needs ({len(ids)}, {shape[-1]})")
    if ids and max(ids) >= shape[0]:
        hint = vocab_hint(key, (max(ids) + 1, shape[1]), shape)
        raise ShapeMismatchError(f"{adapter.label}: {what}: trainable_token_indices holds token id {max(ids)}, "
                                 f"beyond base weight {key!r} {shape} ({shape[0]} rows){hint}")
    if not tensor.is_float:
        raise FormatError(f"{adapter.label}: {what}: non-float dtype {tensor.dtype}")
    if w != 1.0:
        raise UnsupportedError(f"{adapter.label}: {what} replace rows of base weight {key!r}, and the adapter's "
                               f"weight is {w:g}: replaced rows cannot be scaled (with any weight they install the "
                               "same values, so a weight of 0 would still change the model). Give this adapter "
                               "weight 1")
    indices = np.asarray(ids, dtype=np.int64)
    for other in out.rows.get(key, []):
        shared = np.intersect1d(other.indices, indices)
        if shared.size:
            raise UnsupportedError(f"{adapter.label}: {what} and {other.source} both replace rows "
                                   f"{shared[:5].tolist()} of {key!r}: PEFT merges disjoint token ids only (which "
                                   "adapter's row wins is undefined)")
    out.rows.setdefault(key, []).append(TokenRows(indices, tensor, adapter.label))


def same_tensor(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors hold the same dtype, shape and elements (bit for bit), compared in slices of 16 MiB so
    that a vocabulary-sized embedding needs no second copy in memory."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    x, y = a.raw.reshape(-1).view(np.uint8), b.raw.reshape(-1).view(np.uint8)
    step = 1 << 24
    return all(np.array_equal(x[i:i + step], y[i:i + step]) for i in range(0, x.size, step))


def is_base_copy(adapter: Adapter, name: str) -> bool:
    """A full tensor PEFT saved as `<module>.base_layer.<param>`: its copy of the base layer's weight (saved with
    the LoRA of an embedding or output layer), which PEFT loads into the base whatever the adapter's weight. A
    trained bias saved there (adapter_config bias='all' / 'lora_only') is not one (model.names.full_kind)."""
    return full_kind(adapter.config, adapter.full_origin.get(name, "")) == "base copy"


def full_label(adapter: Adapter, name: str) -> str:
    """A full tensor of the adapter, as messages name it: a bias PEFT saves for adapter_config bias='all' /
    'lora_only', a modules_to_save tensor, or PEFT's saved base-layer copy."""
    origin = adapter.full_origin.get(name, name)
    if full_kind(adapter.config, origin) == "bias":
        return f"bias tensor {origin!r} (saved for adapter_config bias={adapter.config.get('bias')!r})"
    if is_base_copy(adapter, name):
        return (f"tensor {adapter.full_origin[name]!r} (PEFT's copy of the base layer's weight, saved with the "
                "layer's LoRA)")
    return f"modules_to_save tensor {name!r}"


class LayoutHints:
    """Why a module may find no target although the base holds its layer: a base key ending like its name from
    the layer index on (`language_model.model.layers.0.self_attn.q_proj` for `model.language_model.layers.0.
    self_attn.q_proj`), or no base layer of its kind at all (`vit.layers.0.attention.q_proj` on a base spelling
    it `vit.encoder.layer.0.attention.attention.query`): a layout transformers renames as it loads. Only a tail
    that one base key ends with is named (a tail that several keys share, `attentions.0.transformer_blocks.0.
    attn1.to_q` in a UNet's down, mid and up blocks, says nothing about which). In a diffusers pipeline (keys
    `<component>/<key>`) a module named as a component's own key is said to be that component's: the adapter of
    that component alone (a PEFT adapter of the UNet), whose base is the component's folder (`components`
    collects them, for missing_error). The base's keys are indexed once, on the first module that needs a
    hint."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.shapes = shapes
        self._ends: dict[str, str | None] | None = None  # a dotted tail -> the one key ending so (None: several)
        self._parts: set[str] = set()
        self._own: dict[str, list[str]] = {}  # a pipeline component's own key -> the components holding it
        self._spelled: dict[str, list[str]] = {}  # LyCORIS's spelling of an own weight ('.' as '_') -> its keys
        self._stacked: dict[str, list[str]] = {}  # a dotted tail of the module of 3-D tensors (stacked experts) -> keys
        self.components: set[str] = set()  # the components whose own names unmatched modules are

    def _index(self) -> dict[str, str | None]:
        if self._ends is None:
            self._ends = {}
            pipeline = bool(self.shapes) and all("/" in k.split(".", 1)[0] for k in self.shapes)
            for key in sorted(self.shapes):
                component, _, own = key.partition("/") if pipeline else ("", "", key)
                if pipeline:
                    self._own.setdefault(own, []).append(component)
                    if own.endswith(".weight"):
                        self._spelled.setdefault(own[: -len(".weight")].replace(".", "_"), []).append(key)
                parts = own.split(".")
                self._parts.update(parts)
                if len(self.shapes[key]) == 3 and len(parts) > 1:  # `mlp.experts.gate_up_proj` [E, ...]
                    for i in range(len(parts) - 1):
                        self._stacked.setdefault(".".join(parts[i:-1]), []).append(key)
                for i in range(1, len(parts)):
                    tail = ".".join(parts[i:])
                    self._ends[tail] = key if self._ends.get(tail, key) == key else None
        return self._ends

    def hint(self, name: str) -> str:
        ends = self._index()
        components = self._own.get(name + ".weight")
        if components:
            self.components.update(components)
            held = " and ".join(f"{c}/{name}.weight" for c in components)
            return f" (the base holds {held}: {COMPONENT_ALONE}?)"
        spelled = self._spelled.get(name[len("lycoris_"):], []) if name.startswith("lycoris_") else []
        if spelled:  # LyCORIS's create_lycoris(pipe.unet) names a component's layers 'lycoris_<own path>'
            self.components.update(k.partition("/")[0] for k in spelled)
            return f" (the base holds {' and '.join(spelled)}: {COMPONENT_ALONE}?)"
        parts = name.split(".")
        first_index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        for start in range(1, (first_index if first_index is not None else len(parts) - 1) + 1):
            like = ends.get(".".join(parts[start:]) + ".weight")
            if like is not None:
                return f" (the base has {like!r}, which ends like it: the same layer in {ANOTHER_LAYOUT}?)"
        stacked = self._stacked_hint(parts)
        if stacked:
            return stacked
        if first_index is not None and parts[-1] not in self._parts:  # a layer of a numbered block
            return f" (no base weight belongs to a layer named {parts[-1]!r}: an adapter for another model, or a " \
                   f"base in {ANOTHER_LAYOUT}?)"
        return ""

    def _stacked_hint(self, parts: list[str]) -> str:
        """The hint for one expert's own layer (`mlp.experts.3.gate_proj`) where the base stacks that layer's experts
        in 3-D tensors (`mlp.experts.gate_up_proj` [E, ...]): '' when it does not."""
        if len(parts) < 3 or not parts[-2].isdigit():
            return ""
        owner = parts[:-2]
        # tails that keep the layer's index (`layers.5.mlp.experts`): another layer's stacked experts say nothing
        last = max((i for i, p in enumerate(owner) if p.isdigit()), default=len(owner) - 1)
        keys = next((k for i in range(last + 1) if (k := self._stacked.get(".".join(owner[i:]))) is not None), None)
        if not keys:
            return ""
        held = ", ".join(f"{k!r} {list(self.shapes[k])}" for k in keys[:3]) + (" and more" if len(keys) > 3 else "")
        return (f" (the base stacks the experts of {'.'.join(owner)!r} in 3-D tensors, {held}: expert "
                f"{parts[-2]}'s own {parts[-1]!r} has no weight there; lorafuse merges "
                "a LoRA on one expert's layer into checkpoints that store one weight per expert, and PEFT's "
                "target_parameters LoRAs into stacked tensors)")


COMPONENT_ALONE = "an adapter of that component alone"  # LayoutHints' words, which missing_error explains once
ANOTHER_LAYOUT = "another layout"  # layout_hint's words, which missing_error explains once


_EMBEDDING_LEAVES = ("embed_tokens", "wte", "wpe", "word_embeddings", "embed_in", "embed_positions",
                     "position_embeddings", "token_type_embeddings", "shared")


def _refuse_random_targets(adapter: Adapter, shapes: Mapping[str, tuple[int, ...]], landed: set[str]) -> None:
    """With init_lora_weights=false PEFT gives every layer its config targets random LoRA factors, and a
    layer the file has no tensors for keeps them: PEFT's merge then adds random noise there, which
    lorafuse cannot reproduce. (With the other initializations B @ A starts at zero: such a layer is
    left unchanged, as lorafuse leaves it.) PEFT-saved files always hold every targeted layer."""
    if adapter.format != "peft" or adapter.config.get("init_lora_weights", True) is not False:
        return
    from lorafuse.formats.peft import OUTPUT_EMBEDDINGS, MatchBudget, Targeting

    if adapter.config.get("target_modules") is None:
        return  # every module of the file is taken (see formats.peft): the file names the targets
    # Layers targeted by target_modules only: a LoRA on a parameter (target_parameters) lands on the base tensor it
    # names (in `landed`), and an entry without its module ('down_proj') would otherwise name every layer.
    targeting = Targeting({**adapter.config, "target_parameters": None}, adapter.label)
    candidates = [k for k, shape in shapes.items() if k.endswith(".weight") and len(shape) >= 2 and k not in landed]
    budget = MatchBudget(adapter.label, targeting.regexes, len(candidates))
    random: list[str] = []
    for key in candidates:
        module = key[: -len(".weight")]
        leaf = module.rsplit(".", 1)[-1]
        kind = "conv" if len(shapes[key]) > 2 else "embedding" if leaf in _EMBEDDING_LEAVES else "linear"
        if targeting.tied and leaf in OUTPUT_EMBEDDINGS:
            continue  # ensure_weight_tying: its LoRA is the input embedding's, not random
        if targeting.why_not(module, kind, budget) is None:
            random.append(module)
    if random:
        shown = ", ".join(repr(m) for m in random[:5]) + (f" and {len(random) - 5} more" if len(random) > 5 else "")
        raise UnsupportedError(
            f"{adapter.label}: adapter_config.json targets {plural(len(random), 'layer')} of the base that "
            f"{'has' if len(random) == 1 else 'have'} no tensors "
            f"in the file ({shown}), and says init_lora_weights=false: PEFT would give them random LoRA factors "
            "and merge that noise. Save the adapter with PEFT again, or narrow target_modules to the layers in "
            "the file (or set init_lora_weights to true, which leaves those layers unchanged)"
        )


def _claim(claimed: dict[str, list[tuple[str, int, int]]], adapter: Adapter, name: str, t: Target,
           shape: tuple[int, ...]) -> None:
    """Record that module `name` changes rows of `t.key`; a second module of the same adapter on the
    same rows would add its update twice (PEFT loads one module per model layer)."""
    lo, hi = t.base_rows or (0, int(shape[0]) if len(shape) else 1)
    for other, olo, ohi in claimed.get(t.key, []):
        if lo < ohi and olo < hi:
            raise FormatError(
                f"{adapter.label}: modules {other!r} and {name!r} both change base weight {t.key!r}"
                f"{'' if t.base_rows is None else f' (rows {max(lo, olo)}:{min(hi, ohi)})'}: the adapter holds the "
                "same module twice under two names (e.g. with and without a 'model.' prefix), and merging both "
                "would add its update twice; PEFT would load only the one named exactly like the model's layer. "
                "Remove the other one from the file"
            )
    claimed.setdefault(t.key, []).append((name, lo, hi))


class _UnicodeTwins:
    """Base keys that look like an unmatched name but differ from it in Unicode normalization (NFC vs
    NFD: 'é' as one code point or as 'e' and a combining accent)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], base_key: BaseKey) -> None:
        self.shapes, self.base_key = shapes, base_key
        self._by_nfc: dict[str, str] | None = None

    def _find(self, name: str, suffix: str) -> str | None:
        for form in ("NFC", "NFD"):
            alt = unicodedata.normalize(form, name)
            if alt != name:
                try:
                    key = self.base_key(alt + suffix)
                except LorafuseError:
                    key = None
                if key is not None:
                    return key
        if self._by_nfc is None:
            self._by_nfc = {unicodedata.normalize("NFC", k): k for k in self.shapes if not k.isascii()}
        key = self._by_nfc.get(unicodedata.normalize("NFC", name + suffix))
        return key if key != name + suffix else None

    def hint(self, name: str, suffix: str) -> str:
        key = self._find(name, suffix)
        if key is None:
            return ""
        return (f" (base key {key!r} differs from it only in Unicode normalization: the names look identical, "
                "but one writes accented letters as single characters (NFC) and the other as letters plus "
                "combining marks (NFD); rename one so both use the same form)")


def _ambiguous(name: str, shapes: Mapping[str, tuple[int, ...]]) -> str:
    """' (ambiguous: ...)' for a module whose underscore name spells two or more base weights, else ''."""
    from lorafuse.ops.match import underscore_candidates

    keys = underscore_candidates(name, shapes)
    if len(keys) < 2:
        return ""
    shown = ", ".join(map(repr, keys[:4])) + (", ..." if len(keys) > 4 else "")
    return f" (ambiguous: with '.' read as '_' its name spells {len(keys)} base weights, {shown}; lorafuse won't guess)"


def missing_error(missing: list[str], label: str, unread: Sequence[str] = (),
                  components: Iterable[str] = ()) -> MissingModuleError:
    """Every module that found no target, one per line (users fix their files from this list); `unread`: why
    parts of the base were not read (a pipeline component holding only a pickle), which may be where they are;
    `components`: the pipeline components whose own names the modules are (Resolved.components)."""
    from lorafuse.ops.match import RENAMED_FAMILIES

    lines = "\n  ".join(missing)
    also = "".join(f"\nnot read: {why}" for why in unread)
    folders = [os.path.join(label, c) for c in sorted(components)]
    if folders:
        also += (f"\n{COMPONENT_ALONE}: the adapter names the modules of one component of the pipeline, without the "
                 "component's prefix a pipeline's adapter has (a PEFT adapter of the UNet saved alone, say): give "
                 f"that component's folder as the base ({' or '.join(folders)})")
    if any(f"in {ANOTHER_LAYOUT}?)" in m for m in missing):
        also += (f"\n{ANOTHER_LAYOUT}: transformers 5 loads some models under other names than their checkpoints hold "
                 "(it renames them as it loads and back as it saves), and PEFT names an adapter's modules as loaded; "
                 f"lorafuse maps the layouts of {RENAMED_FAMILIES}, by config.json's model_type")
    return MissingModuleError(
        f"{plural(len(missing), 'adapter module')} found no target in the base {label}:\n  {lines}{also}\n"
        "(pass --skip-missing, Python: skip_missing=True, to merge the others and report these)"
    )


def adapter_notes(adapters: Sequence[Adapter]) -> list[str]:
    """What loading each adapter decided for the user (tensors PEFT ignores, ...), labelled."""
    return [f"{a.label}: {note}" for a in adapters for note in a.notes]
