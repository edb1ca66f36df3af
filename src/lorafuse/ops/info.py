"""info: describe an adapter or a checkpoint (for people, or as JSON)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import cast

from lorafuse._terminal import plural
from lorafuse.errors import FormatError
from lorafuse.formats import load
from lorafuse.formats.diffusers import split_name, unprefixed_lora_key, unprefixed_why
from lorafuse.formats.held import adapter_path, subfolder_hint
from lorafuse.formats.lycoris_keys import scale_rank
from lorafuse.formats.peft import PREFIX as PEFT_PREFIX
from lorafuse.formats.util import most_common
from lorafuse.io.checkpoint import Checkpoint
from lorafuse.io.hub import local_path
from lorafuse.io.pipeline import Pipeline, is_pipeline
from lorafuse.io.provenance import CARD_NAME, Provenance, path_text
from lorafuse.io.quant import Quantization, detect_checkpoint, parameter_count
from lorafuse.model import Adapter, LoraUpdate, stored_tensors
from lorafuse.model.lycoris import LycorisUpdate
from lorafuse.model.names import full_kind
from lorafuse.model.param_lora import ParamLoraUpdate
from lorafuse.model.spectral import frobenius_norms
from lorafuse.model.state import DiffusersState, metadata_of
from lorafuse.model.update import Update, nonfinite_factors

LYCORIS_ONLY = "- (LoHa / LoKr only: see scales)"  # what the text output shows for an adapter without an alpha


def _rounded(x: float, decimals: int) -> float:
    """`x` rounded to `decimals` decimals, or to `decimals` significant digits where that keeps more: a small
    alpha or scale (1e-9) is not shown as 0."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, max(decimals, decimals - math.floor(math.log10(abs(x)))))


def _number(x: float) -> int | float:
    """A JSON number: an integral value as an int (16, not 16.0) where a double holds it exactly (|x| < 2^53:
    not 1e300 as 301 digits), others rounded to 6 decimals (6 significant digits when smaller)."""
    x = _rounded(float(x), 6)
    return int(x) if x.is_integer() and abs(x) < 2**53 else x


def _alpha(adapter: Adapter, name: str, u: LoraUpdate) -> float:
    """A LoRA module's alpha: scale * r, or scale * sqrt(r) where its config says use_rslora."""
    if isinstance(adapter.state, DiffusersState):
        rslora = bool(adapter.state.components.get(split_name(name)[0], {}).get("use_rslora"))
    else:
        rslora = adapter.format == "peft" and bool(adapter.config.get("use_rslora"))
    return u.scale * (math.sqrt(u.rank) if rslora else u.rank)


@dataclass(frozen=True)
class _Built:
    """What PEFT builds for a LoRA on a parameter (a ParamWrapper): the parameter's r and scale (rank_pattern /
    alpha_pattern match `<module>.<param>`), and the experts its factors hold (lora_A has r rows per expert)."""

    param: str | None  # None: several parameters give the same r and scale
    r: int
    scale: float
    experts: int


def _kind(u: Update, built: _Built | None = None) -> str:
    if isinstance(u, ParamLoraUpdate):
        if built is None:
            return (f"parameter LoRA on {u.module} (target_parameters: r and scale per parameter, known against the "
                    "base)")
        return (f"parameter LoRA on {built.param or u.module} (target_parameters: {plural(built.experts, 'expert')} "
                f"of rank {built.r})")
    return u.kind if isinstance(u, LoraUpdate) else f"{u.algo} ({u.kind})"


def _parameter_candidates(cfg: dict[str, object], module: str) -> list[tuple[str, int, float]]:
    """Each parameter of `module` that target_parameters names (PEFT: `M.P == T` or `M.P` ends with `.T`), with
    its r and scale from rank_pattern / alpha_pattern, as PEFT builds its ParamWrapper."""
    from lorafuse.formats.peft import pattern_value

    found: dict[str, tuple[str, int, float]] = {}
    for t in cast("list[str]", cfg.get("target_parameters") or []):
        name = f"{module}.{t.rpartition('.')[2]}"
        if name != t and not name.endswith("." + t):
            continue
        r = pattern_value(cast("dict[str, object]", cfg.get("rank_pattern") or {}), name, cfg.get("r", 8))
        alpha = pattern_value(cast("dict[str, object]", cfg.get("alpha_pattern") or {}), name, cfg.get("lora_alpha", 8))
        if isinstance(r, int) and r > 0 and isinstance(alpha, int | float):
            found[name] = (name, r, float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r))
    return list(found.values())


_MAX_WAYS = 40_320  # assignments of parameters to one module's wrappers tried at most (8!; real ones: 2 or 3)


def _built_wrappers(adapter: Adapter) -> dict[str, _Built]:
    """What PEFT builds for each LoRA on a parameter whose parameter the config alone tells. The file names the
    module, not the parameter, and nests a module's wrappers in an order it does not record: every way of giving
    the wrappers distinct targeted parameters where each lora_A holds a whole number of r-row blocks, the same
    number of experts for all of them, is tried; a wrapper is resolved when all those ways give it one r and scale
    (ops.fused matches them against the base at apply)."""
    by_module: dict[str, list[ParamLoraUpdate]] = {}
    for u in adapter.updates.values():
        if isinstance(u, ParamLoraUpdate):
            by_module.setdefault(u.module, []).append(u)
    out: dict[str, _Built] = {}
    for module, wrappers in by_module.items():
        candidates = _parameter_candidates(adapter.config, module)
        if math.perm(len(candidates), len(wrappers)) > _MAX_WAYS:  # a crafted nesting: left unresolved (r=?)
            continue
        seen: dict[str, set[_Built]] = {w.name: set() for w in wrappers}
        rows = [w.A.shape[0] for w in wrappers]
        for chosen in itertools.permutations(candidates, len(wrappers)):
            experts = {n // r for n, (_, r, _) in zip(rows, chosen)}
            if any(n % r for n, (_, r, _) in zip(rows, chosen)) or len(experts) > 1:
                continue
            for w, n, (name, r, scale) in zip(wrappers, rows, chosen):
                seen[w.name].add(_Built(name, r, scale, n // r))
        for w in wrappers:
            ways = seen[w.name]
            if ways and len({(b.r, b.scale, b.experts) for b in ways}) == 1:
                b = next(iter(ways))
                out[w.name] = b if len(ways) == 1 else dataclasses.replace(b, param=None)
    return out


def _rank(u: Update) -> int | None:
    """A module's rank as its format means it: a LoRA's r; a LoHa's / LoKr's dim (LyCORIS's lora_dim, the r of
    scale = alpha / r), not the rank of its exact factorization; None for a LoKr of two full halves."""
    return scale_rank(u.algo, u.tensors) if isinstance(u, LycorisUpdate) else int(u.rank)


def describe_adapter(adapter: Adapter, threads: int = 0) -> dict[str, object]:
    # A LoRA on a parameter (fused MoE experts) is one low-rank block per expert, known only against the
    # base: its delta norm is not defined without it (None, as a non-finite norm is in JSON).
    # The same for a DoRA module: its delta is m (W + s B A) / ||W + s B A|| - W.
    # A LoRA on a parameter shows the r and scale PEFT builds it with (its lora_A holds r rows per expert), or
    # None for both where only the base tells which parameter it adapts.
    plain = {n: u for n, u in adapter.updates.items() if not isinstance(u, ParamLoraUpdate) and u.magnitude is None}
    norms = frobenius_norms(plain, threads)
    built = _built_wrappers(adapter)
    rank_scale = {n: ((built[n].r, built[n].scale) if n in built else (None, None))
                  if isinstance(u, ParamLoraUpdate) else (_rank(u), float(u.scale))
                  for n, u in adapter.updates.items()}
    modules = []
    for name, u in adapter.updates.items():
        modules.append({
            "name": name,
            "kind": _kind(u, built.get(name)),
            "rank": rank_scale[name][0],
            "scale": rank_scale[name][1],
            "shape": [int(d) for d in u.delta_shape],
            "dtype": "/".join(dict.fromkeys(t.dtype for t in stored_tensors(u))),
            "dora": u.magnitude is not None,
            "bias": u.bias is not None,
            "delta_norm": float(norms[name]) if name in norms else None,
            # what its factors hold besides numbers ('NaN', 'Inf', 'NaN and Inf'), when its norm is not finite
            "nonfinite": ((nonfinite_factors(u) or None) if name in norms and not math.isfinite(norms[name])
                          else None),
        })
    cfg = adapter.config
    meta = metadata_of(adapter.state)  # kohya / diffusers: the file's metadata
    # kohya / diffusers files store an alpha per module (alpha = scale * r); a LoHa / LoKr's scale is
    # alpha over its own dimension, not over the rank of its exact factorization: shown as scales only.
    # Every number is a JSON number: lora_alpha the config's (PEFT) or the most common module alpha
    # (kohya / diffusers; None for LoHa / LoKr only), lora_alphas every distinct module alpha.
    per_module = [_number(_alpha(adapter, n, u)) for n, u in adapter.updates.items()
                  if isinstance(u, LoraUpdate) and not isinstance(u, ParamLoraUpdate)]
    per_module += [_number(b.scale * (math.sqrt(b.r) if adapter.config.get("use_rslora") else b.r))
                   for b in built.values()]
    config_alpha = cfg.get("lora_alpha")
    if adapter.format == "peft" and isinstance(config_alpha, int | float) and not isinstance(config_alpha, bool):
        lora_alpha: int | float | None = _number(config_alpha)
    else:
        lora_alpha = _number(most_common([float(a) for a in per_module])) if per_module else None
    return {
        "type": "adapter",
        "format": adapter.format,
        "path": path_text(adapter.path) if adapter.path else None,
        "modules": len(adapter.updates),
        "ranks": dict(sorted(Counter(r for r, _ in rank_scale.values() if r is not None).items())),
        "scales": sorted({_rounded(s, 8) for _, s in rank_scale.values() if s is not None}),
        "lora_alpha": lora_alpha,
        "lora_alphas": sorted(set(per_module)),
        "use_rslora": bool(cfg.get("use_rslora", False)),
        "dora": any(u.magnitude is not None for u in adapter.updates.values()),
        # every tensor the parameters count: the modules' factors, and the full tensors (modules_to_save, ...)
        "dtypes": dict(Counter([t.dtype for u in adapter.updates.values() for t in stored_tensors(u)] +
                               [t.dtype for t in adapter.full.values()])),
        "parameters": int(adapter.num_parameters()),
        "full_tensors": sorted(adapter.full),
        # what each is: "modules_to_save", "bias" (adapter_config bias='all' / 'lora_only'), "base copy"
        "full_tensor_kinds": {k: full_kind(cfg, adapter.full_origin.get(k, k)) for k in sorted(adapter.full)},
        "base_model": cfg.get("base_model_name_or_path") or meta.get("ss_sd_model_name"),
        "provenance": adapter.provenance.as_dict() if adapter.provenance is not None else None,
        # what reading it left out or decided, as load's AdapterNote warnings say it (info --json lists these)
        "notes": [f"{adapter.label}: {n}" for n in adapter.notes],
        "module_details": modules,
    }


def describe_quantization(ckpt: Checkpoint, q: Quantization | None = None) -> dict[str, object] | None:
    """How the checkpoint is quantized (None: it is not): the method, the scheme lorafuse reads it with
    (None: lorafuse refuses it, `why` says why), and where that was found (`q`: detect_checkpoint's, when read)."""
    q = detect_checkpoint(ckpt) if q is None else q
    if q is None:
        return None
    return {"method": q.method, "scheme": q.scheme.name if q.scheme is not None else None,
            "supported": q.scheme is not None, "source": q.source, "why": q.why or None}


def describe_checkpoint(ckpt: Checkpoint) -> dict[str, object]:
    infos = [t for h in ckpt.headers.values() for t in h.values()]
    q = detect_checkpoint(ckpt)
    return {
        "type": "checkpoint",
        "path": path_text(ckpt.path),
        "shards": ckpt.shards,
        "sharded": ckpt.sharded,
        "tensors": len(infos),
        # the model's parameters: a packed 4-bit weight by its real shape, scales and quant states not counted
        "parameters": parameter_count(ckpt, q),
        "bytes": ckpt.total_bytes(),
        "dtypes": dict(Counter(t.dtype for t in infos)),
        "quantization": describe_quantization(ckpt, q) if q is not None else None,  # (None: detected once)
        # how lorafuse made it (io.provenance), from the first shard's metadata (every shard holds it)
        "provenance": _made_by(ckpt),
        "notes": list(ckpt.notes),  # how the folder was read (io.checkpoint: a single file beside an index)
    }


def _made_by(ckpt: Checkpoint) -> dict[str, object] | None:
    made = Provenance.from_metadata(ckpt.metadata.get(ckpt.shards[0])) if ckpt.shards else None
    return made.as_dict() if made is not None else None


def describe_pipeline(pipe: Pipeline) -> dict[str, object]:
    """A diffusers pipeline folder: each component with weights, described as a checkpoint."""
    return {"type": "pipeline", "path": path_text(pipe.directory),
            "components": {name: describe_checkpoint(ck) for name, ck in pipe.components.items()},
            "not_read": dict(pipe.unread),  # components whose weights lorafuse does not read, and why
            "provenance": _pipeline_record(pipe), "notes": []}  # info --json adds the notes shown


def _pipeline_record(pipe: Pipeline) -> dict[str, object] | None:
    """How lorafuse made the pipeline: its components' record when they hold one; where they hold several (apply
    rewrites the components it changes and copies the others, which keep the record of an earlier run), the
    one whose every input sha256 the pipeline's model card (README.md, written by the last run) lists; None
    when no one record is that (each component's own is under `components`)."""
    made = [Provenance.from_metadata(ck.metadata.get(ck.shards[0])) if ck.shards else None
            for ck in pipe.components.values()]
    records = list({json.dumps(m.as_dict(), sort_keys=True): m for m in made if m is not None}.values())
    if len(records) <= 1:
        return records[0].as_dict() if records else None
    try:
        with open(pipe.directory / CARD_NAME, "rb") as f:
            card = f.read(_CARD_MAX).decode("utf-8", "replace")
    except OSError:
        return None
    last = [m for m in records if all(sha in card for i in m.inputs for _, sha in i.hashes()) and
            m.invocation.text in card]
    return last[0].as_dict() if len(last) == 1 else None


_CARD_MAX = 4 << 20  # a model card read this far (lorafuse's lists at most CARD_MAX_INPUTS inputs)


def describe(path: str | os.PathLike[str], threads: int = 0) -> dict[str, object]:
    """An adapter (PEFT folder, kohya / LyCORIS file, diffusers LoRA file, or a folder holding one:
    see adapter_path), a checkpoint, a diffusers pipeline folder, or a GGUF file (a llama.cpp LoRA: what
    `convert --to gguf` writes); a Hub id is its snapshot folder (io.hub)."""
    p = local_path(path, what="adapter or checkpoint")
    from lorafuse.formats.gguf import describe_gguf, is_gguf  # only for a GGUF file: gguf's reader

    if is_gguf(p):
        return describe_gguf(p)
    if is_pipeline(p):
        return describe_pipeline(Pipeline(p))
    adapter = adapter_path(p)
    if adapter is not None:
        return describe_adapter(load(adapter), threads)
    try:
        ckpt = Checkpoint(p)
    except FormatError as e:
        sub = subfolder_hint(p)  # PEFT's save_pretrained of an adapter not named 'default': say where it is
        if sub:
            raise FormatError(f"{e}{sub}") from None
        raise
    described = describe_checkpoint(ckpt)
    keys = [k for h in ckpt.headers.values() for k in h]
    lora_key = unprefixed_lora_key(keys)
    if lora_key:  # not a model: say why not an adapter
        cast("list[str]", described["notes"]).append(f"not read as an adapter: its tensors are "
                                                     f"{unprefixed_why(lora_key)}")
    elif any(k.startswith(PEFT_PREFIX) and ".lora_" in k for k in keys):  # a PEFT folder that lost its config
        cast("list[str]", described["notes"]).append("not read as an adapter: its tensors are a PEFT adapter's, "
                                                     "without the adapter_config.json that PEFT reads beside them "
                                                     "(put it back beside them)")
    return described


def alpha_text(d: dict[str, object]) -> str:
    """How an adapter description's alphas read for people: a kohya / diffusers file's distinct module
    alphas ('0.5, 1, 4, 8'), a PEFT config's lora_alpha (with the module alphas its patterns give)."""
    raw = d.get("lora_alphas")
    alphas = [float(a) for a in raw] if isinstance(raw, list) else []
    listed = ", ".join(f"{a:g}" for a in alphas)
    if d.get("format") != "peft":
        return listed or LYCORIS_ONLY
    alpha = d.get("lora_alpha")
    text = f"{alpha:g}" if isinstance(alpha, int | float) else str(alpha)
    return text + (f" (modules: {listed})" if len(alphas) > 1 else "")


def json_ready(value: object) -> object:
    """`value` with every non-finite float (a NaN or infinite norm) as None: JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value
