"""diffusers / PEFT LoRA files for diffusion pipelines: one `.safetensors` file, as diffusers'
`save_lora_weights` writes it (`pytorch_lora_weights.safetensors`).

Keys are `<component>.<module path>.lora_A.weight` (r x in, or r x in x kh x kw) and
`.lora_B.weight` (out x r [x 1 x 1]), with the component one of `unet`, `text_encoder`,
`text_encoder_2`, `text_encoder_3`, `transformer`. The canonical module name is the key
without the suffix: `unet.down_blocks.0.attentions.0.proj_in`.

Also read (never written), with the same module names and scales, and mixed freely in one file:
- diffusers' own LoRA-layer names, what its training scripts save
  (`convert_state_dict_to_diffusers(get_peft_model_state_dict(model))`, which renames a PEFT state
  dict's `to_q` / `to_k` / `to_v` / `to_out.0` factors and leaves other modules' `lora_A` / `lora_B`):
  `<module>.lora.down.weight` / `.lora.up.weight` (A / B) and, in text encoders,
  `<module>.lora_linear_layer.down.weight` / `.up.weight` (`q_proj` / `k_proj` / `v_proj` / `out_proj`);
- the attention-processor names of older diffusers files:
  `<attention>[.processor].to_q_lora.down.weight` / `.up.weight` (also `to_k_lora`, `to_v_lora`,
  `to_out_lora`), module `<attention>.to_q` ... `<attention>.to_out.0`, in a text encoder
  `<attention>.q_proj` ... `<attention>.out_proj` (diffusers' `convert_unet_state_dict_to_peft` /
  `DIFFUSERS_OLD_TO_PEFT`).

Scales: the `lora_adapter_metadata` entry of the file's `__metadata__` holds one PEFT
`LoraConfig` per component, flattened with the component as prefix (`"unet.r"`,
`"unet.lora_alpha"`, `"unet.rank_pattern"`, ...); diffusers 0.42 reads it in
`_fetch_state_dict` and builds each component's `LoraConfig(**config)` from it. A module's
scale is alpha / r (alpha / sqrt(r) with rslora) after rank_pattern / alpha_pattern, with
PEFT's matching rule. A file without it loads in diffusers with alpha = r (scale 1).

The writer stores exact-name patterns (`^down_blocks\\.0\\...`) wherever a module's rank or
alpha differs from the component's most common one, and an alpha that divides back to
the module's scale exactly. Other metadata (kohya's `ss_*` / `modelspec.*`) is kept as
is, but for hashes of the input's weights (formats.kohya.own_hashes), and `lorafuse_kohya` (JSON) records
what converting back to a kohya file needs.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from lorafuse._terminal import short
from lorafuse.errors import FormatError, ShapeMismatchError, UnsupportedError
from lorafuse.formats.kohya import STALE_HASH_KEYS, kohya_metadata, own_hashes
from lorafuse.formats.peft import PREFIX as PEFT_PREFIX
from lorafuse.formats.peft import check_config, pattern_value
from lorafuse.formats.streaming import WritePlan, specs_of, stream_with, write_adapter
from lorafuse.formats.util import (
    COMFY_TEXT_ENCODERS,
    COMFY_TEXT_WHY,
    ORIGINAL_PREFIXES,
    ORIGINAL_WHY,
    most_common,
    safetensors_keys,
)
from lorafuse.io.checkpoint import loads_json
from lorafuse.io.provenance import Provenance, is_provenance_key
from lorafuse.io.safetensors import SafetensorsFile
from lorafuse.io.tensor import Tensor
from lorafuse.model import Adapter, FormatSpec, Kind, LoraUpdate, Update, register
from lorafuse.model.arithmetic import restated_config
from lorafuse.model.names import check_module_name
from lorafuse.model.state import DiffusersState, as_diffusers

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers looks for in a folder
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
KOHYA_RECORD_KEY = "lorafuse_kohya"  # our record of the kohya file a conversion came from
_OWN_KEYS = ("format", ADAPTER_METADATA_KEY, KOHYA_RECORD_KEY)
# The key layouts read, as (A suffix, B suffix): PEFT's names (written), then diffusers' LoRA-layer names.
_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
          (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"))
# Attention processors: `<attention>[.processor].<projection>_lora.down.weight` / `.up.weight`.
_PROCESSOR_HALVES = (("_lora.down.weight", "A"), ("_lora.up.weight", "B"))
_PROCESSOR = ".processor"
_PROJECTIONS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_CLIP_PROJECTIONS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_REFUSED = {".lora_B.bias": "a LoRA bias (lora_bias)", ".lora.up.bias": "a LoRA bias (lora_bias)",
            ".lora_linear_layer.up.bias": "a LoRA bias (lora_bias)", ".lora_magnitude_vector": "a DoRA magnitude",
            ".lora_embedding_A": "an embedding LoRA", ".lora_embedding_B": "an embedding LoRA"}
_LAYOUTS = ("<component>.<module>.lora_A.weight / .lora_B.weight, .lora.down.weight / .lora.up.weight, "
            ".lora_linear_layer.down.weight / .up.weight, or an attention processor's "
            ".to_q_lora.down.weight / .up.weight (to_k_lora, to_v_lora, to_out_lora)")
# safetensors' own writer orders tensors by dtype (widest first), then name.
_DTYPE_ORDER = {"F64": 0, "F32": 1, "BF16": 2, "F16": 3, "F8_E4M3": 4, "F8_E5M2": 5}
# Module paths of a CLIP text model that transformers >= 5 flattens (no `text_model.` level):
# files saved from such a model lack the prefix that kohya names and older files have.
_CLIP_ROOTS = ("encoder.layers.", "embeddings.", "final_layer_norm")
_TEXT_MODEL = "text_model."


def split_name(name: str) -> tuple[str, str]:
    """(component, module path) of a canonical diffusers name; ('', name) when it has no component."""
    component, _, path = name.partition(".")
    if component in COMPONENTS and path:
        return component, path
    return "", name


def is_diffusers_lora(path: str | os.PathLike[str]) -> bool:
    """A `.safetensors` file whose keys are `<component>.<module>.lora_A.weight` / `.lora_B.weight`
    (or one of the other layouts read: module docstring). Reads the header only."""
    return has_diffusers_keys(safetensors_keys(path))


def has_diffusers_keys(keys: Iterable[str]) -> bool:
    """Tensor names of a diffusers LoRA file (`<component>.<module>.lora_A.weight` / `.lora_B.weight`,
    or one of the other layouts read)."""
    for k in keys:
        component, rest = split_name(k)
        if component and parse_key(component, rest) is not None:
            return True
    return False


def unprefixed_lora_key(keys: Iterable[str]) -> str | None:
    """The first name that is a LoRA factor without a component prefix (`down_blocks.0....lora_A.weight`: one
    model's LoRA, as diffusers' `ModelMixin.save_lora_adapter` writes it, whose component the file does not
    tell); None when there is none."""
    return next((k for k in keys if not split_name(k)[0] and not k.startswith(PEFT_PREFIX)
                 and parse_key("", k) is not None), None)


UNPREFIXED_WHY = ("LoRA factors without a component prefix: one model's LoRA, as diffusers' save_lora_adapter writes "
                  "it, which lorafuse does not read, as the file does not say which component "
                  f"({', '.join(COMPONENTS)}) it belongs to; save the pipeline's LoRA with save_lora_weights "
                  "(names unet.<module>..., transformer.<module>...) instead")


PROCESSOR_WHY = ("attention-processor LoRA factors without a component prefix (<attention>.processor.to_q_lora.down."
                 "weight, ...), as diffusers 0.14 and older saved a UNet's LoRA (save_attn_procs): diffusers now loads "
                 "none of it (load_lora_weights looks for 'unet.' keys) and lorafuse does not read it either; these "
                 "are the UNet's layers: with every key prefixed 'unet.' both read the file")


def unprefixed_why(key: str) -> str:
    """Why a file whose LoRA factor `key` has no component prefix (`unprefixed_lora_key`) is not read."""
    if key.startswith(COMFY_TEXT_ENCODERS):
        return COMFY_TEXT_WHY
    if _PROCESSOR + "." in key and key.endswith(tuple(s for s, _ in _PROCESSOR_HALVES)):
        return PROCESSOR_WHY
    return ORIGINAL_WHY if key.startswith(ORIGINAL_PREFIXES) else UNPREFIXED_WHY


def parse_key(component: str, rest: str) -> tuple[str, str, str] | None:
    """A LoRA factor's key (without its component) in any of the layouts read: (the module path as
    PEFT names it, 'A' or 'B', the key of the other half); None for anything else."""
    for a, b in _PAIRS:
        for suffix, role, other in ((a, "A", b), (b, "B", a)):
            if rest.endswith(suffix) and len(rest) > len(suffix):
                return rest[: -len(suffix)], role, rest[: -len(suffix)] + other
    for suffix, role in _PROCESSOR_HALVES:
        if not rest.endswith(suffix):
            continue
        head = rest[: -len(suffix)]  # <attention>[.processor].to_q
        attention, _, projection = head.rpartition(".")
        names = _CLIP_PROJECTIONS if component.startswith("text_encoder") else _PROJECTIONS
        if projection not in names or not attention:
            return None
        if attention.endswith(_PROCESSOR) and len(attention) > len(_PROCESSOR):
            attention = attention[: -len(_PROCESSOR)]
        other = next(s for s, r in _PROCESSOR_HALVES if r != role)
        return f"{attention}.{names[projection]}", role, head + other
    return None


def _canonical_path(component: str, path: str) -> str:
    """A flattened CLIP path gets back its `text_model.` level (the name kohya files and the
    base checkpoints use)."""
    if component.startswith("text_encoder") and path.startswith(_CLIP_ROOTS):
        return _TEXT_MODEL + path
    return path


def _component_configs(metadata: dict[str, str], where: str) -> dict[str, dict[str, object]]:
    """The per-component LoraConfig dicts of `lora_adapter_metadata`, validated."""
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    flat = loads_json(raw, f"{where}: __metadata__[{ADAPTER_METADATA_KEY!r}]")
    if not isinstance(flat, dict):
        raise FormatError(f"{where}: __metadata__[{ADAPTER_METADATA_KEY!r}] is not a JSON object")
    configs: dict[str, dict[str, object]] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        if component not in COMPONENTS or not field:
            raise FormatError(f"{where}: {ADAPTER_METADATA_KEY} entry {short(key)} is not '<component>.<field>' with a "
                              f"component in {', '.join(COMPONENTS)}")
        configs.setdefault(component, {})[field] = value
    for component, cfg in configs.items():
        label = f"{where}: {ADAPTER_METADATA_KEY} of {component!r}"
        for field in ("r", "lora_alpha"):
            if field not in cfg:
                raise FormatError(f"{label}: {field!r} is missing (diffusers' LoraConfig needs it for the scale)")
        check_config(cfg, label)
        # (fan_in_fan_out is read as PEFT does on the torch Linear layers of diffusers' models: ignored)
        unread = [what for key, what in (("use_dora", "use_dora (DoRA)"), ("lora_bias", "lora_bias (lora_B biases)"))
                  if cfg.get(key)]
        if unread:
            raise UnsupportedError(f"{label}: {' and '.join(unread)} {'is' if len(unread) == 1 else 'are'} set, which "
                                   "lorafuse does not read from diffusers LoRA files (it reads plain LoRA: "
                                   "lora_A / lora_B)")
    return configs


def _scale(cfg: dict[str, object] | None, path: str, rank: int, where: str) -> float:
    """alpha / r of a module from its component's config (PEFT's pattern rule); 1 without a config,
    as diffusers loads such a file."""
    if cfg is None:
        return 1.0
    rank_pattern: dict[str, object] = cfg.get("rank_pattern") or {}  # type: ignore[assignment]
    alpha_pattern: dict[str, object] = cfg.get("alpha_pattern") or {}  # type: ignore[assignment]
    names = [path, path.removeprefix(_TEXT_MODEL)] if path.startswith(_TEXT_MODEL) else [path]
    r_cfg, alpha = cfg["r"], cfg["lora_alpha"]
    for n in names:  # the module as saved, then as a flattened text model names it
        r_hit = pattern_value(rank_pattern, n, None)
        a_hit = pattern_value(alpha_pattern, n, None)
        r_cfg = r_hit if r_hit is not None else r_cfg
        alpha = a_hit if a_hit is not None else alpha
        if r_hit is not None or a_hit is not None:
            break
    if r_cfg != rank:
        raise ShapeMismatchError(f"{where}: {ADAPTER_METADATA_KEY} gives r={r_cfg} but the tensors have rank {rank}")
    value = float(alpha)  # type: ignore[arg-type]
    return value / math.sqrt(rank) if cfg.get("use_rslora") else value / rank


def _scale_with(alpha: tuple[str, float] | None, cfg: dict[str, object] | None, path: str, rank: int,
                where: str) -> float:
    """A module's scale: alpha / r from its `.alpha` tensor where the file has one (and its config, when it also
    has one, agrees), else _scale."""
    if alpha is None:
        return _scale(cfg, path, rank, where)
    key, value = alpha
    scale = value / rank
    if cfg is not None and not math.isclose(_scale(cfg, path, rank, where), scale, rel_tol=1e-6):
        raise FormatError(f"{where}: {short(key)} gives alpha {value:g} (scale {scale:g}), but {ADAPTER_METADATA_KEY} "
                          f"gives scale {_scale(cfg, path, rank, where):g}: which one holds cannot be told")
    return scale


def _update(where: str, module: str, p: dict[str, tuple[str, Tensor]], missing: dict[str, str],
            scale_of: object) -> LoraUpdate:
    """The update of one module from its halves (role -> (key, tensor)); `missing` names, per role, the
    key the absent half would have."""
    for role, present in (("A", "B"), ("B", "A")):
        if role not in p:
            have, t = p[present]
            raise FormatError(f"{where} has no {'lora_A' if role == 'A' else 'lora_B'} half: "
                              f"{short(missing[role])} is not in the file (only {short(have)} {t.shape})")
    (a_key, a), (b_key, b) = p["A"], p["B"]
    for t, n in ((a, a_key), (b, b_key)):
        if not t.is_float:
            raise FormatError(f"{where}: {short(n)} has non-float dtype {t.dtype}")
    rank = a.shape[0] if a.shape else 0
    ok = (len(a.shape) in (2, 4) and len(b.shape) == len(a.shape) and rank > 0 and b.shape[1] == rank
          and all(d == 1 for d in b.shape[2:]))
    if not ok:
        raise ShapeMismatchError(f"{where}: {short(a_key)} {a.shape} and {short(b_key)} {b.shape} are not LoRA "
                                 "factors of one rank (two matrices, or conv kernels of the same number of dimensions)")
    kind: Kind = "conv" if len(a.shape) == 4 else "linear"
    return LoraUpdate(module, a, b, scale_of(rank), kind)  # type: ignore[operator]


def load_diffusers(path: str | os.PathLike[str]) -> Adapter:
    """A diffusers LoRA file as an Adapter (format 'diffusers') whose module names carry the component
    prefix. Its state (model.state.DiffusersState): the file's other metadata (e.g. kohya's ss_*), each
    component's LoraConfig dict and, for a file converted from kohya, the kohya record."""
    p = Path(path)
    with SafetensorsFile(p) as f:  # views handed out keep the mapping alive
        tensors = {key: Tensor(f.raw(key), f.info(key).dtype) for key in f.keys()}
        metadata = dict(f.metadata)
    configs = _component_configs(metadata, str(p))
    parts: dict[str, dict[str, tuple[str, Tensor]]] = {}
    missing: dict[str, dict[str, str]] = {}  # module -> role -> the key its absent half would have
    origin: dict[str, str] = {}
    alphas: dict[str, tuple[str, float]] = {}  # module -> (key, alpha) of `<module>.alpha` scalars
    for key, t in tensors.items():
        if key.endswith(".alpha") and split_name(key)[0]:
            # network alphas beside diffusers-named factors (TheLastBen's Flux files): diffusers' loaders read
            # them as the module's lora_alpha, scale alpha / r
            component, rest = split_name(key)
            module = f"{component}.{_canonical_path(component, rest.removesuffix('.alpha'))}"
            values = t.f32().reshape(-1) if t.is_float else None
            if values is None or values.size != 1 or not math.isfinite(float(values[0])):
                raise FormatError(f"{p}: tensor {short(key)} ({t.dtype} {t.shape}) is not one finite alpha value")
            alphas[module] = (key, float(values[0]))
            continue
        refused = next((what for s, what in _REFUSED.items() if key.endswith(s)), None)
        if refused:
            raise UnsupportedError(f"{p}: tensor {short(key)} is {refused}, which lorafuse does not read from "
                                   "diffusers LoRA files")
        component, rest = split_name(key)
        parsed = parse_key(component, rest) if component else None
        if parsed is None:
            raise FormatError(f"{p}: tensor {short(key)} is not a diffusers LoRA tensor ({_LAYOUTS}; component one of "
                              f"{', '.join(COMPONENTS)})")
        saved, role, other = parsed
        module = f"{component}.{_canonical_path(component, saved)}"
        check_module_name(module, f"{p}: tensor {short(key)}")
        if role in parts.get(module, {}):
            raise FormatError(f"{p}: module {module!r} has two {'lora_A' if role == 'A' else 'lora_B'} tensors "
                              f"({short(parts[module][role][0])} and {short(key)})")
        parts.setdefault(module, {})[role] = (key, t)
        missing.setdefault(module, {})["B" if role == "A" else "A"] = f"{component}.{other}"
        origin[module] = saved
    stray = sorted(key for module, (key, _) in alphas.items() if module not in parts)
    if stray:
        raise FormatError(f"{p}: {short(stray[0])} is the alpha of a module that has no lora_A / lora_B in the file")
    updates: dict[str, Update] = {}
    for module, d in parts.items():
        component = split_name(module)[0]
        where = f"{p}: module {module!r}"
        cfg = configs.get(component)
        updates[module] = _update(where, module, d, missing[module],
                                  lambda r, c=cfg, s=origin[module], w=where, m=module: _scale_with(
                                      alphas.get(m), c, s, r, w))
    record = _kohya_record(metadata, str(p))
    keys = record.get("metadata_keys") if record else None
    if isinstance(keys, list) and all(isinstance(k, str) and k in metadata for k in keys):
        kept = {k: metadata[k] for k in keys}
    else:
        kept = {k: v for k, v in metadata.items() if k not in _OWN_KEYS}
    state = DiffusersState(kept, configs, record)
    # config: every module's rank and scale (as load_kohya's): state_dict() with it is the adapter
    return Adapter(updates=updates, config=restated_config({}, updates), format="diffusers", path=p, state=state,
                   provenance=Provenance.from_metadata(metadata))


def _kohya_record(metadata: dict[str, str], where: str) -> dict[str, object] | None:
    raw = metadata.get(KOHYA_RECORD_KEY)
    if raw is None:
        return None
    record = loads_json(raw, f"{where}: __metadata__[{KOHYA_RECORD_KEY!r}]")
    if not isinstance(record, dict):
        raise FormatError(f"{where}: __metadata__[{KOHYA_RECORD_KEY!r}] is not a JSON object")
    return record


# ----------------------------------------------------------------------------- writing


def exact_alpha(scale: float, rank: int) -> float:
    """An alpha with alpha / rank == scale exactly in double precision (what PEFT computes), as
    close to scale * rank as possible."""
    alpha = scale * rank
    if alpha / rank == scale:
        return alpha
    lo = hi = alpha
    for _ in range(64):
        lo, hi = math.nextafter(lo, -math.inf), math.nextafter(hi, math.inf)
        for cand in (lo, hi):
            if cand / rank == scale:
                return cand
    return alpha  # pragma: no cover - some neighbour within a few ulps always divides back



def _pattern(component: str, path: str) -> str:
    """A PEFT pattern that matches exactly this module (for text encoders, with or without the
    `text_model.` level that transformers >= 5 flattens away)."""
    if component.startswith("text_encoder") and path.startswith(_TEXT_MODEL):
        return "^(?:text_model\\.)?" + re.escape(path.removeprefix(_TEXT_MODEL))
    return "^" + re.escape(path)


def _target(component: str, path: str) -> str:
    """A target_modules entry: PEFT takes a module whose name equals it or ends with '.' + it."""
    return path.removeprefix(_TEXT_MODEL) if component.startswith("text_encoder") else path


def component_configs(adapter: Adapter) -> dict[str, dict[str, object]]:
    """Per component, the LoraConfig dict that diffusers builds the component's adapter from: the most
    common r and alpha, exact-name patterns for the modules that differ, every module targeted."""
    groups: dict[str, list[tuple[str, LoraUpdate]]] = {}
    for name, u in adapter.updates.items():
        component, path = split_name(name)
        if not isinstance(u, LoraUpdate):
            raise UnsupportedError(f"{adapter.label}: module {name!r} is a LoHa / LoKr update; diffusers LoRA files "
                                   "store LoRA factors only (convert it first: `lorafuse convert IN -o OUT --to kohya "
                                   "--rank K`)")
        groups.setdefault(component, []).append((path, u))
    out: dict[str, dict[str, object]] = {}
    for component, items in groups.items():
        ranks = [u.rank for _, u in items]
        alphas = [exact_alpha(u.scale, u.rank) for _, u in items]
        r = int(most_common([float(x) for x in ranks]))
        alpha = most_common(alphas)
        out[component] = {
            "r": r,
            "lora_alpha": alpha,
            "rank_pattern": {_pattern(component, p): k for (p, _), k in zip(items, ranks) if k != r},
            "alpha_pattern": {_pattern(component, p): a for (p, _), a in zip(items, alphas) if a != alpha},
            "target_modules": sorted({_target(component, p) for p, _ in items}),
            "use_rslora": False,
            "use_dora": False,
            "lora_bias": False,
            "lora_dropout": 0.0,
            "bias": "none",
            "init_lora_weights": True,
        }
    return out


def diffusers_tensors(adapter: Adapter) -> dict[str, Tensor]:
    """The file's tensors, in the order safetensors' writer uses (dtype widest first, then name)."""
    out: dict[str, Tensor] = {}
    for name, u in adapter.updates.items():
        out.update(diffusers_module_tensors(adapter, name, u))
    if adapter.full:
        raise UnsupportedError(f"{adapter.label}: full tensors ({', '.join(sorted(adapter.full)[:3])}) cannot be "
                               "stored in a diffusers LoRA file")
    return dict(sorted(out.items(), key=lambda kv: (_DTYPE_ORDER.get(kv[1].dtype, 9), kv[0])))


def diffusers_module_tensors(adapter: Adapter, name: str, u: Update) -> dict[str, Tensor]:
    """One module's tensors in the file (see diffusers_tensors)."""
    where = f"{adapter.label}: module {name!r}"
    component, _ = split_name(name)
    if not component:
        raise UnsupportedError(f"{where}: not a diffusers module name (<component>.<module path>, component "
                               f"one of {', '.join(COMPONENTS)}); the diffusers LoRA format cannot name it")
    if not isinstance(u, LoraUpdate):
        raise UnsupportedError(f"{where} is a LoHa / LoKr update; diffusers LoRA files store LoRA factors only")
    if not u.is_plain():
        raise UnsupportedError(f"{where} has a DoRA magnitude or a bias; lorafuse writes plain LoRA "
                               "diffusers files only")
    if u.laid_as(False).transposed or u.kind == "embedding":  # (fan_in_fan_out alone: the same factors)
        raise UnsupportedError(f"{where} is a transposed ({u.kind}) update; diffusers LoRA files store "
                               "lora_A (r x in) and lora_B (out x r) only")
    return {name + ".lora_A.weight": u.A, name + ".lora_B.weight": u.B}


def diffusers_metadata(adapter: Adapter) -> dict[str, str]:
    """`__metadata__`: the adapter's own metadata (kohya's ss_* ...), then diffusers' `format` and
    `lora_adapter_metadata`, then the kohya record when the adapter has one. kohya's network keys (ss_network_module /
    _dim / _alpha / _args) are set from the modules written, as a kohya file's are (formats.kohya.kohya_metadata):
    a LyCORIS file converted to LoRA no longer says LoHa / LoKr, nor its old ranks."""
    state = as_diffusers(adapter.state)
    kept = kohya_metadata(adapter) if any(k.startswith("ss_network") for k in state.metadata) else state.metadata
    meta = {k: v for k, v in kept.items()
            if k not in _OWN_KEYS and not is_provenance_key(k) and k not in STALE_HASH_KEYS}
    flat = {f"{c}.{k}": v for c, cfg in component_configs(adapter).items() for k, v in cfg.items()}
    meta["format"] = "pt"
    meta[ADAPTER_METADATA_KEY] = json.dumps(flat, indent=2, sort_keys=True)
    record = state.kohya
    if record is not None:
        record = {**record, "metadata_keys": [k for k in meta if k not in _OWN_KEYS]}
        meta[KOHYA_RECORD_KEY] = json.dumps(record, sort_keys=True)
    return meta


def save_diffusers(adapter: Adapter, out: str | os.PathLike[str], inputs: Sequence[Path] = (),
                   overwrite: bool = False) -> Path:
    """Write `adapter` (diffusers-named modules) as one diffusers LoRA `.safetensors` file, atomically.
    Factors keep their stored dtype; each module's scale is kept exactly through the per-component
    LoraConfig in `lora_adapter_metadata`, which diffusers' `load_lora_weights` reads. The metadata gets
    lorafuse's mark (`lorafuse_version`); an existing file without it is refused unless `overwrite`."""
    return write_adapter(diffusers_plan(adapter), adapter.updates, out, inputs, overwrite)


def diffusers_plan(adapter: Adapter) -> WritePlan:
    """What save_diffusers writes for `adapter` (its updates may be a layout's placeholders:
    formats.streaming): the header in safetensors' order, the metadata with lorafuse's mark and the
    adapter's provenance (io.provenance: `lorafuse.*` keys); sd-scripts' hashes that a kohya file carried
    computed for this file's data (an input's modelspec.hash_sha256 dropped: formats.kohya.own_hashes)."""
    specs = specs_of(diffusers_tensors(adapter))
    meta, finish = own_hashes(specs, diffusers_metadata(adapter), adapter)
    return WritePlan(adapter.label, list(adapter.updates), specs, meta,
                     functools.partial(diffusers_module_tensors, adapter), finish=finish)


def _sniff(path: Path, keys: list[str]) -> bool:
    return has_diffusers_keys(keys)


def _save(adapter: Adapter, out: str | os.PathLike[str], overwrite: bool) -> Path:
    return save_diffusers(adapter, out, adapter.sources(), overwrite=overwrite)


FORMAT = register(FormatSpec("diffusers", _sniff, load_diffusers, _save,
                             "a diffusers LoRA .safetensors file (<component>.<module>.lora_A.weight or "
                             ".lora.down.weight keys)",
                             priority=20, open_stream=stream_with(diffusers_plan)))

__all__ = ["COMPONENTS", "WEIGHT_NAME", "component_configs", "diffusers_metadata", "diffusers_module_tensors",
           "diffusers_plan", "diffusers_tensors",
           "exact_alpha", "is_diffusers_lora", "load_diffusers", "parse_key", "save_diffusers", "split_name"]
