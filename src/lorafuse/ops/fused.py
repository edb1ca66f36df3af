"""Adapter modules that land on fused base weights: MoE expert tensors and fused projections.

Expert tensors (PEFT `target_parameters`, `lora.ParamWrapper` in peft/tuners/lora/layer.py). A
parameter of shape [E, d1, d2] gets lora_A (r*E, in) and lora_B (out, r*E). PEFT reads them as
A.reshape(E, r, in) (expert-major rows) and B.reshape(out, r, E) (expert-minor columns), so expert
e's factors are A[e*r:(e+1)*r] and B[:, e::E], and its delta is scale * B_e @ A_e. Which of d1, d2
is `out` depends on the experts class: PEFT swaps in / out for a 3-D parameter unless the module
says `is_transposed` (transformers' experts classes decorated `use_experts_implementation(
is_transposed=True)`: GptOss, Aria, Ergo, OpenAI privacy filter), so
- [E, out, in] (Qwen3-MoE, Mixtral, DeepSeek, ... and every class without the flag): d1 = out,
  param[e] += scale * B_e @ A_e;
- [E, in, out] (is_transposed): d1 = in, param[e] += scale * (B_e @ A_e)^T.
A 2-D parameter is one expert (E = 1): param += scale * B @ A, as a Linear's weight. r and alpha
come from rank_pattern / alpha_pattern matched against the parameter's name (`<module>.<param>`).
The merge sees the tensor as an (E * d1, d2) matrix (OutTensor.matrix_rows) and every expert is a
contribution on its own d1 rows (a row block, see ops.stages: it costs nothing on other rows).

Checkpoints that store those experts one by one. transformers 5 fuses the per-expert weights of
Qwen2/3-MoE, DeepSeek, OLMoE, Mixtral, ... when it loads a checkpoint and splits them again when it
saves one (conversion_mapping.py), so the Hub's files hold `experts.{e}.gate_proj.weight` (Mixtral:
`block_sparse_moe.experts.{e}.w1.weight`). A LoRA on the fused parameters lands there as transformers
fuses them (PER_EXPERT_ON_DISK): expert e's gate_up delta rows [0, I) on gate_proj, [I, 2I) on
up_proj, its down delta on down_proj.

When several parameters of one module are targeted, PEFT nests the wrappers: the file's
`<module>.lora_A` is the outermost, `<module>.base_layer.lora_A` the next. Their order follows the
model class's parameter order, which a checkpoint does not record, so each wrapper is matched to the
targeted parameter its factors fit; a wrapper that fits several of them is refused.

Fused projections. A LoRA trained on a model with separate q_proj / k_proj / v_proj (gate_proj /
up_proj), such as a "llamafied" Phi-3, lands on row blocks of the base's fused qkv_proj
(gate_up_proj): [q; k; v] with q = heads * head_dim and k, v = kv_heads * head_dim rows, [gate; up]
with intermediate_size rows each, the sizes read from config.json, for the model types whose
fused layout is known to be these contiguous blocks (FUSED_LAYOUTS). Other fused layouts
(GPT-NeoX, Bloom, Falcon, GPT-BigCode: heads interleaved) are not mapped, and a module that would
need them is reported with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

from lorafuse.errors import LorafuseError, ShapeMismatchError, UnsupportedError
from lorafuse.formats.targets import Target
from lorafuse.io.tensor import Tensor
from lorafuse.model import Adapter, LoraUpdate
from lorafuse.model.param_lora import ParamLoraUpdate

BaseKey = Callable[[str], "str | None"]
Shapes = Mapping[str, tuple[int, ...]]

# transformers 5 experts classes decorated use_experts_implementation(is_transposed=True): their fused
# parameters are [E, in, out] and PEFT does not swap in / out for them (model_type of the config, or
# of a sub-config).
EXPERTS_TRANSPOSED = frozenset({"gpt_oss", "aria", "aria_text", "ergo", "openai_privacy_filter"})
# model types whose checkpoints hold the fused experts either way: [E, out, in] as transformers 5 saves them, or
# [E, in, out] as the Hub's originals store them, transposed when transformers loads them (conversion_mapping.py:
# Transpose(1, 2, check_dims=True) on 'mlp.experts.gate_up_proj' / 'down_proj'); each tensor is taken in the
# orientation its shape fits (a square one fits both and is refused).
EXPERTS_EITHER_WAY = frozenset({"qwen3_vl_moe"})


@dataclass
class ExpertResult:
    """What the parameter LoRAs of one adapter change."""

    contributions: dict[str, list[tuple[Target, LoraUpdate, float]]] = field(default_factory=dict)
    matrix_rows: dict[str, int] = field(default_factory=dict)
    plain: dict[str, LoraUpdate] = field(default_factory=dict)  # wrappers that are plain layers after all
    missing: list[str] = field(default_factory=list)


def _model_types(config: Mapping[str, object] | None) -> set[str]:
    found: set[str] = set()
    todo: list[tuple[object, int]] = [(config, 0)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, dict) and depth <= 3:
            if isinstance(value.get("model_type"), str):
                found.add(value["model_type"])
            todo += [(v, depth + 1) for v in value.values()]
    return found


# transformers 5 fuses these models' per-expert weights when it loads a checkpoint and splits them again
# when it saves one (conversion_mapping.py: the "qwen2_moe" and "mixtral" patterns and the model types
# mapped onto them): gate_up_proj[e] = [gate; up] of expert e (Concatenate on the out rows), down_proj[e]
# = its down weight. A LoRA on the fused parameters lands on those per-expert weights, by rows.
_QWEN2_MOE = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
_MIXTRAL = {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}
PER_EXPERT_ON_DISK: dict[str, dict[str, tuple[str, ...]]] = {
    **dict.fromkeys(("qwen2_moe", "qwen3_moe", "afmoe", "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1",
                     "ernie4_5_moe", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "glm4v_moe", "longcat_flash",
                     "solar_open", "mellum", "beam", "qwen3_omni_moe", "qwen3_omni_moe_thinker",
                     "qwen3_omni_moe_text", "qwen3_next", "hunyuan_v1_moe", "flex_olmo", "olmoe", "sarvam_mla",
                     "exaone_moe", "cohere2_moe"), _QWEN2_MOE),
    **dict.fromkeys(("mixtral", "minimax", "minimax_m2"), _MIXTRAL),
}
MAX_EXPERTS = 1 << 16


@dataclass(frozen=True)
class _Param:
    """A targeted parameter of the base: one tensor `key`, or (per_expert) for each expert e the weights
    that transformers fuses into its rows, as (key, rows) in row order."""

    name: str  # <module>.<param>: what rank_pattern / alpha_pattern match
    key: str  # the fused tensor, or the first per-expert weight (for messages)
    shape: tuple[int, ...]
    per_expert: tuple[tuple[tuple[str, int], ...], ...] = ()


def _targeted_params(module: str, parameters: Sequence[str], base_key: BaseKey, shapes: Shapes,
                     types: set[str]) -> list[_Param]:
    """Every parameter of `module` that target_parameters names (PEFT: `M.P == T` or `M.P` ends with
    `.T`) and the base holds: as a 2-D or 3-D tensor, or split per expert (PER_EXPERT_ON_DISK)."""
    found: dict[str, _Param] = {}
    split = next((PER_EXPERT_ON_DISK[t] for t in sorted(types) if t in PER_EXPERT_ON_DISK), None)
    for t in parameters:
        leaf = t.rpartition(".")[2]
        name = f"{module}.{leaf}"
        if name != t and not name.endswith("." + t) or name in found:
            continue
        key = base_key(name)
        if key is not None and key in shapes and len(shapes[key]) in (2, 3):
            found[name] = _Param(name, key, tuple(shapes[key]))
        elif split is not None and leaf in split:
            p = _per_expert(name, module, split[leaf], base_key, shapes)
            if p is not None:
                found[name] = p
    return list(found.values())


def _per_expert(name: str, module: str, parts: tuple[str, ...], base_key: BaseKey, shapes: Shapes) -> _Param | None:
    """The per-expert weights `<module>.<e>.<part>.weight` (Mixtral's `block_sparse_moe` for `mlp` too)."""
    for owner in dict.fromkeys((module, module.replace(".mlp.", ".block_sparse_moe."))):
        experts: list[tuple[tuple[str, int], ...]] = []
        cols: int | None = None
        rows: list[int] | None = None
        for e in range(MAX_EXPERTS):
            keys = [base_key(f"{owner}.{e}.{part}.weight") for part in parts]
            if any(k is None for k in keys):
                _check_expert_gap(owner, e, parts, keys, base_key)
                break
            found = [tuple(shapes[k]) for k in keys if k is not None]
            if any(len(s) != 2 for s in found):
                return None
            if rows is None:
                rows, cols = [s[0] for s in found], found[0][1]
            if [s[0] for s in found] != rows or any(s[1] != cols for s in found):
                raise ShapeMismatchError(f"the per-expert weights of {owner!r} differ in shape from expert to expert: "
                                         f"{', '.join(f'{k!r} {s}' for k, s in zip(keys, found))}")
            experts.append(tuple((cast(str, k), s[0]) for k, s in zip(keys, found)))
        if experts and rows is not None and cols is not None:
            return _Param(name, experts[0][0][0], (len(experts), sum(rows), cols), tuple(experts))
    return None


def _check_expert_gap(owner: str, e: int, parts: tuple[str, ...], keys: list[str | None], base_key: BaseKey) -> None:
    """ShapeMismatchError when the per-expert weights of `owner` stop at expert `e` but the checkpoint goes on: some
    of expert e's weights are there, or a later expert's (up to 8 on): a checkpoint with a hole in it, whose experts
    counted so far would be taken for the model's."""
    later = next((f"{owner}.{n}.{parts[0]}.weight" for n in range(e + 1, e + 9)
                  if base_key(f"{owner}.{n}.{parts[0]}.weight") is not None), None)
    held = [f"{owner}.{e}.{part}.weight" for part, k in zip(parts, keys) if k is not None]
    if held or later is not None:
        missing = ", ".join(repr(f"{owner}.{e}.{part}.weight") for part, k in zip(parts, keys) if k is None)
        raise ShapeMismatchError(f"the base lacks {missing} but has {held[0] if held else later!r}: a checkpoint "
                                 "with experts missing (a damaged or partly copied file?)")


@dataclass(frozen=True)
class _Fit:
    param: _Param
    experts: int
    rank: int
    transposed: bool  # [E, in, out]
    rows: int  # d1


def _fits(u: ParamLoraUpdate, p: _Param, transposed: bool | None) -> list[_Fit]:
    """How wrapper `u` can land on the parameter (none when its factors do not fit it). `transposed`
    None: the model's experts class is unknown, so either orientation that fits."""
    a_rows, a_cols = u.A.shape
    b_rows, b_cols = u.B.shape
    shape = p.shape
    if b_cols != a_rows:
        return []
    if len(shape) == 2:
        return [_Fit(p, 1, a_rows, False, shape[0])] if (shape[0], shape[1]) == (b_rows, a_cols) else []
    e, d1, d2 = shape
    if e <= 0 or a_rows % e:
        return []
    options = [False] if p.per_expert else [False, True] if transposed is None else [transposed]
    return [_Fit(p, e, a_rows // e, t, d1) for t in options
            if (d1, d2) == ((a_cols, b_rows) if t else (b_rows, a_cols))]


def _shape_text(u: ParamLoraUpdate) -> str:
    return f"lora_A {tuple(u.A.shape)}, lora_B {tuple(u.B.shape)}"


def _listed(candidates: Sequence[_Param]) -> str:
    return ", ".join(f"{p.key!r} {p.shape}" if not p.per_expert else
                     f"{p.name!r} {p.shape} (split per expert: {p.key!r}, ...)" for p in candidates)


def resolve_parameters(adapter: Adapter, params: dict[str, ParamLoraUpdate], shapes: Shapes, base_key: BaseKey,
                       config: Mapping[str, object] | None, weight: float) -> ExpertResult:
    """The per-expert contributions of an adapter's ParamWrapper modules (see the module docstring)."""
    from lorafuse.formats.peft import pattern_value

    out = ExpertResult()
    cfg = adapter.config
    parameters = cast("list[str]", cfg.get("target_parameters") or [])
    types = _model_types(config)
    transposed: bool | None = True if types & EXPERTS_TRANSPOSED else None if (
        not types or types & EXPERTS_EITHER_WAY) else False
    by_module: dict[str, list[ParamLoraUpdate]] = {}
    for u in params.values():
        by_module.setdefault(u.module, []).append(u)
    for module, wrappers in by_module.items():
        wrappers.sort(key=lambda w: w.depth)
        try:
            candidates = _targeted_params(module, parameters, base_key, shapes, types)
        except ShapeMismatchError as e:
            raise ShapeMismatchError(f"{adapter.label}: module {wrappers[0].name!r}: {e}") from None
        if not candidates:
            if len(wrappers) == 1 and wrappers[0].depth == 0 and base_key(module + ".weight") is not None:
                why = _module_untargeted(adapter, module)
                if why is None:
                    out.plain[wrappers[0].name] = _as_plain(adapter, wrappers[0])
                else:
                    out.missing.append(f"{adapter.label}: module {module!r}: target_parameters {parameters} names no "
                                       f"parameter of it in the base, and it is {why}: PEFT builds no LoRA layer for "
                                       "it and ignores its tensors")
                continue
            looked = ", ".join(repr(f"{module}.{t.rpartition('.')[2]}") for t in parameters)
            for w in wrappers:
                out.missing.append(f"{adapter.label}: module {w.name!r} (a LoRA on a parameter, target_parameters "
                                   f"{parameters}): the base has none of {looked}{_per_expert_hint(module, shapes)}")
            continue
        fits = {w.name: [f for p in candidates for f in _fits(w, p, transposed)] for w in wrappers}
        for w in wrappers:
            found = fits[w.name]
            if len(found) == 1:
                continue
            if not found:
                how = ("" if transposed is None else " stored [E, in, out] (is_transposed)" if transposed
                       else " stored [E, out, in]")
                counts = "".join(_expert_count(adapter, w, p, transposed, pattern_value) for p in candidates)
                raise ShapeMismatchError(
                    f"{adapter.label}: module {w.name!r} ({_shape_text(w)}, a LoRA on a parameter of {module!r}) "
                    f"fits none of the base's targeted parameters {_listed(candidates)}{how}: PEFT reads lora_A as "
                    f"(r * E, in) and lora_B as (out, r * E) for a parameter of E experts{counts}; the adapter was "
                    "not made for this base")
            raise UnsupportedError(
                f"{adapter.label}: module {w.name!r} ({_shape_text(w)}) fits several of the base's targeted "
                f"parameters ({_listed(candidates)}), and the checkpoint does not record the order in which PEFT "
                "wrapped them (or whether they are stored [E, in, out] or [E, out, in]: config.json names no "
                "model_type, or one whose checkpoints hold them either way): lorafuse cannot tell which one it "
                "adapts")
        taken: dict[str, str] = {}
        for w in wrappers:
            f = fits[w.name][0]
            if f.param.name in taken:
                raise UnsupportedError(
                    f"{adapter.label}: modules {taken[f.param.name]!r} and {w.name!r} both fit base parameter "
                    f"{_listed([f.param])} and no other: lorafuse cannot tell which parameter each adapts")
            taken[f.param.name] = w.name
            _expert_contributions(adapter, w, f, weight, pattern_value, out)
    return out


def _config_name(adapter: Adapter) -> str:
    """The config that states r, for a message: a file's adapter_config.json, or the config given with a state
    dict (an adapter in memory)."""
    return "adapter_config.json" if adapter.path is not None else "its config"


def _expert_count(adapter: Adapter, w: ParamLoraUpdate, p: _Param, transposed: bool | None,
                  pattern_value: Callable[[dict[str, object], str, object], object]) -> str:
    """'' unless wrapper `w` fits parameter `p` but for its number of experts: with the r its config gives the
    parameter, its factors' r * E rows hold another number of experts than the base parameter has (an adapter
    made for a model with more or fewer experts); then what it holds and what the base has."""
    cfg = adapter.config
    r_cfg = pattern_value(cast("dict[str, object]", cfg.get("rank_pattern") or {}), p.name, cfg.get("r", 8))
    rows, a_cols = w.A.shape
    b_rows = w.B.shape[0]
    if not isinstance(r_cfg, int) or isinstance(r_cfg, bool) or r_cfg <= 0 or rows % r_cfg or w.B.shape[1] != rows:
        return ""
    held = rows // r_cfg
    e, dims = (1, tuple(p.shape)) if len(p.shape) == 2 else (p.shape[0], tuple(p.shape[1:]))
    orientations = [False] if p.per_expert or len(p.shape) == 2 else [False, True] if transposed is None \
        else [transposed]
    if held == e or not any(dims == ((a_cols, b_rows) if t else (b_rows, a_cols)) for t in orientations):
        return ""
    return (f"; its factors hold r * E = {rows} rows: with r={r_cfg} ({_config_name(adapter)}) that is {held} experts, "
            f"but base parameter {p.name!r} has {e}: the adapter was made for a model with {held} experts")


def _module_untargeted(adapter: Adapter, module: str) -> str | None:
    """Why PEFT puts no plain LoRA layer on `module` (its target_modules rules, target_parameters aside: an entry
    without its module, 'down_proj', names a parameter of any module), or None when it does."""
    from lorafuse.formats.peft import MatchBudget, Targeting

    cfg = adapter.config
    if cfg.get("target_modules") is None:
        return "not in target_modules (null: PEFT then adapts only the parameters target_parameters names)"
    targeting = Targeting({**cfg, "target_parameters": None}, adapter.label)
    return targeting.why_not(module, "linear", MatchBudget(adapter.label, targeting.regexes, 1))


def _as_plain(adapter: Adapter, w: ParamLoraUpdate) -> LoraUpdate:
    if w.A.shape[0] != w.r:
        raise ShapeMismatchError(f"{adapter.label}: module {w.name!r}: {_config_name(adapter)} says r={w.r} but the "
                                 f"tensors have rank {w.A.shape[0]}")
    return w.as_plain()


def _per_expert_hint(module: str, shapes: Shapes) -> str:
    prefix = module.rsplit(".", 1)[-1] + ".0."
    if any(f".{prefix}" in k or k.startswith(prefix) for k in shapes):
        return (f" (the base stores these experts one by one, {module}.0...., in a layout lorafuse does not map "
                "for this model_type)")
    return ""


def _expert_contributions(adapter: Adapter, w: ParamLoraUpdate, f: _Fit, weight: float,
                          pattern_value: Callable[[dict[str, object], str, object], object],
                          out: ExpertResult) -> None:
    cfg = adapter.config
    p = f.param
    r_cfg = pattern_value(cast("dict[str, object]", cfg.get("rank_pattern") or {}), p.name, cfg.get("r", 8))
    alpha = float(cast(float, pattern_value(cast("dict[str, object]", cfg.get("alpha_pattern") or {}), p.name,
                                            cfg.get("lora_alpha", 8))))
    if r_cfg != f.rank:
        counts = _expert_count(adapter, w, p, f.transposed, pattern_value)
        if counts:
            raise ShapeMismatchError(f"{adapter.label}: module {w.name!r} ({_shape_text(w)}) on base parameter "
                                     f"{_listed([p])}{counts}")
        raise ShapeMismatchError(
            f"{adapter.label}: module {w.name!r} ({_shape_text(w)}) on base parameter {_listed([p])}: "
            f"{f.experts} experts of rank {f.rank}, but {_config_name(adapter)} says r={r_cfg} for {p.name!r}")
    scale = alpha / math.sqrt(f.rank) if cfg.get("use_rslora") else alpha / f.rank
    if len(p.shape) == 2:
        out.contributions.setdefault(p.key, []).append((Target(p.key), LoraUpdate(w.name, w.A, w.B, scale),
                                                        weight * scale))
        return
    e, r = f.experts, f.rank
    if not p.per_expert:
        out.matrix_rows[p.key] = e * f.rows
    b3 = w.B.raw.reshape(w.B.shape[0], r, e)  # PEFT: B.reshape(out, r, E), expert e = B[:, :, e]
    for i in range(e):  # one contribution per expert, on its own rows (views of the file: nothing read yet)
        a_i = Tensor(w.A.raw[i * r : (i + 1) * r], w.A.dtype)
        b_i = Tensor(b3[:, :, i], w.B.dtype)
        u = LoraUpdate(f"{w.name}[expert {i}]", a_i, b_i, scale, "linear", transposed=f.transposed)
        if not p.per_expert:
            target = Target(p.key, base_rows=(i * f.rows, (i + 1) * f.rows))
            out.contributions.setdefault(p.key, []).append((target, u, weight * scale))
            continue
        lo = 0
        for key, rows in p.per_expert[i]:  # expert i's delta rows, weight by weight ([gate; up])
            whole = rows == f.rows
            target = Target(key) if whole else Target(key, delta_rows=(lo, lo + rows))
            out.contributions.setdefault(key, []).append((target, u, weight * scale))
            lo += rows


# ------------------------------------------------------------------------------------ fused projections

# model_type -> fused layer -> its parts, in row order; every part a contiguous block (transformers:
# Phi3Attention slices qkv at q and q + kv; Phi3MLP / GlmMLP / Glm4MLP chunk gate_up_proj in two, gate first).
FUSED_LAYOUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "phi3": {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")},
    "glm": {"gate_up_proj": ("gate_proj", "up_proj")},
    "glm4": {"gate_up_proj": ("gate_proj", "up_proj")},
}
# Fused layers lorafuse does not map separate modules onto, and why (heads interleaved, or unknown).
FUSED_NAMES = ("qkv_proj", "query_key_value", "c_attn", "W_pack", "qkv", "Wqkv", "gate_up_proj")
INTERLEAVED = {
    "gpt_neox": "GPT-NeoX interleaves q, k, v per head in query_key_value",
    "bloom": "Bloom interleaves q, k, v per head in query_key_value",
    "falcon": "Falcon interleaves q, k, v per head or per group of heads in query_key_value",
    "gpt_bigcode": "GPT-BigCode interleaves q, k, v per head in c_attn (unless multi_query)",
    "codegen": "CodeGen splits qkv_proj into interleaved model-parallel blocks",
    "phi4_multimodal": "Phi-4-multimodal's audio / vision layers order gate_up_proj up first",
}
_PARTS = {p for layout in FUSED_LAYOUTS.values() for parts in layout.values() for p in parts}


def _config_int(config: Mapping[str, object], key: str) -> int | None:
    for c in (config, config.get("text_config")):
        if isinstance(c, dict):
            v = c.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def _blocks(model_type: str, fused: str, config: Mapping[str, object]) -> list[int] | None:
    """The row counts of the fused layer's parts, from config.json (None when it lacks a size)."""
    if fused == "qkv_proj":
        heads, hidden = _config_int(config, "num_attention_heads"), _config_int(config, "hidden_size")
        if heads is None:
            return None
        kv = _config_int(config, "num_key_value_heads") or heads
        head_dim = _config_int(config, "head_dim") or (hidden // heads if hidden else None)
        if head_dim is None:
            return None
        return [heads * head_dim, kv * head_dim, kv * head_dim]
    inter = _config_int(config, "intermediate_size")
    return None if inter is None else [inter, inter]


class FusedNames:
    """A module q_proj / k_proj / v_proj / gate_proj / up_proj that the base fuses into qkv_proj /
    gate_up_proj: a Target on its row block (ops.match's chain, after the exact keys)."""

    name = "fused"

    def __init__(self, base_key: BaseKey, config: Mapping[str, object] | None) -> None:
        self.base_key = base_key
        self.config = config or {}
        mt = self.config.get("model_type")
        self.layouts = FUSED_LAYOUTS.get(mt, {}) if isinstance(mt, str) else {}

    def match(self, modules: Shapes, shapes: Shapes) -> tuple[dict[str, list[Target]], list[str]]:
        found: dict[str, list[Target]] = {}
        if not self.layouts:
            return found, list(modules)
        mt = cast(str, self.config.get("model_type"))
        for name in modules:
            parent, _, leaf = name.rpartition(".")
            for fused, parts in self.layouts.items():
                if leaf not in parts or not parent:
                    continue
                key = self.base_key(f"{parent}.{fused}.weight")
                sizes = _blocks(mt, fused, self.config) if key is not None else None
                if key is None or sizes is None:
                    continue
                rows = int(shapes[key][0]) if shapes.get(key) else -1
                if sum(sizes) != rows:
                    raise ShapeMismatchError(
                        f"module {name!r}: base weight {key!r} has {rows} rows, but config.json's sizes give "
                        f"{' + '.join(map(str, sizes))} = {sum(sizes)} for {', '.join(parts)}: the config does not "
                        "describe this checkpoint")
                i = parts.index(leaf)
                lo = sum(sizes[:i])
                found[name] = [Target(key, base_rows=(lo, lo + sizes[i]))]
        return found, [m for m in modules if m not in found]


def fused_hint(name: str, base_key: BaseKey, config: Mapping[str, object] | None) -> str:
    """Why a module that the base fuses with others found no target ('' when no fused weight is near)."""
    parent, _, leaf = name.rpartition(".")
    if leaf not in _PARTS and leaf not in ("query", "key", "value", "q", "k", "v"):
        return ""
    for fused in FUSED_NAMES:
        try:
            key = base_key(f"{parent}.{fused}.weight") if parent else None
        except LorafuseError:  # an ambiguous key: no hint
            key = None
        if key is None:
            continue
        mt = (config or {}).get("model_type")
        why = INTERLEAVED.get(mt) if isinstance(mt, str) else None
        if why is None:
            why = (f"lorafuse knows the row layout of {fused} only for model types "
                   f"{', '.join(sorted(FUSED_LAYOUTS))} (config.json says model_type={mt!r})")
        return f" (the base fuses it into {key!r}: {why}; merging it there would need that layout)"
    return ""
