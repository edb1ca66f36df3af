"""apply, planning: which output tensors a merge writes, shard by shard, and what changes in each.

A plain checkpoint is a pipeline of one component (`Pipeline.of_checkpoint`), so one planner
serves both: adapter modules are matched against the whole model's keys (a checkpoint's LLM
names through the key chain of `ops.match`, diffusion names through the Flux / SD tables),
regrouped per component, and each touched component gets a plan of its output shards.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal

from lorafuse._terminal import plural, short
from lorafuse.errors import DtypeError, LorafuseValueError, UnsupportedError
from lorafuse.formats.kohya import STALE_HASH_KEYS
from lorafuse.io.checkpoint import INDEX_SUFFIX, Checkpoint, read_config
from lorafuse.io.dtypes import DTYPES, WRITABLE_FLOATS
from lorafuse.io.hub import TRANSFORMERS_WEIGHTS
from lorafuse.io.pipeline import Pipeline
from lorafuse.io.safetensors import TensorSpec
from lorafuse.io.tensor import Tensor
from lorafuse.model import Adapter
from lorafuse.model.arithmetic import FLOAT32_MAX
from lorafuse.ops.apply_quant import (
    QuantRef,
    QuantScan,
    check_scan,
    check_unscaled_f8,
    copy_ref,
    plan_quant,
    scan_quant,
)
from lorafuse.ops.match import checkpoint_keys
from lorafuse.ops.resolve import Contribution, Resolved, TokenRows, adapter_notes, missing_error, resolve
from lorafuse.ops.tied import EMBEDDING_SUFFIXES, TiedLayers, tied_layers, untie

LM_HEAD = "lm_head.weight"


@dataclass
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    src_shard: str
    src_name: str
    updates: list[Contribution] = field(default_factory=list)
    bias_updates: list[Contribution] = field(default_factory=list)
    replacement: Tensor | None = None
    # Rows the adapters replace (PEFT trainable tokens), on the base (or its replacement) before any delta adds.
    token_rows: list[TokenRows] = field(default_factory=list)
    # The merge sees the weight as a (rows, -1) matrix: rows = shape[0] (a Linear's out, a conv's out
    # channels) unless a resolver says otherwise (a fused [E, out, in] expert tensor: E * out rows).
    matrix_rows: int | None = None
    # A quantized base weight (io.quant): read through its scheme, written quantized again or as `dtype`.
    quant: QuantRef | None = None
    # The companion `role` (a scale) of the requantized weight `weight`, computed with it: (weight, role).
    companion_of: tuple[str, str] | None = None

    @property
    def rows(self) -> int:
        if self.matrix_rows is not None:
            return self.matrix_rows
        return self.shape[0] if self.shape else 1

    @property
    def nbytes(self) -> int:
        return TensorSpec(self.name, self.dtype, self.shape).nbytes

    def is_copy(self, src_dtype: str) -> bool:
        return (not self.updates and not self.bias_updates and self.replacement is None and self.dtype == src_dtype
                and self.quant is None and self.companion_of is None and not self.token_rows)


@dataclass
class Plan:
    shards: list[tuple[str, list[OutTensor]]]
    metadata: dict[str, dict[str, str]]
    config_updates: dict[str, object]
    notes: list[str]
    config_removals: list[str] = field(default_factory=list)  # config.json keys the output drops
    requantized: list[str] = field(default_factory=list)  # weights quantized again after their merge


_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE_UNITS.update({u[0]: _SIZE_UNITS[u] for u in ("KB", "MB", "GB", "TB")})  # 5G = 5GB
_SIZE_UNITS.update({u[:2]: _SIZE_UNITS[u] for u in ("KIB", "MIB", "GIB", "TIB")})  # 2Gi = 2GiB
_SIZE_EXAMPLES = ("give one such as 5GB, 500MB, 1.5GB, 2GiB or 1000000 (bytes); KB, MB, GB are 10^3, 10^6, 10^9 "
                  "bytes and KiB, MiB, GiB 2^10, 2^20, 2^30")
MIN_SHARD_SIZE = 64 << 10  # below this a shard holds almost nothing but its header


def parse_size(text: str | int) -> int:
    """A byte count: an integer, or a string '5GB' (10^9), '500MiB' (2^20), '1.5 gb', '100' (bytes).

    Units are case-insensitive. A count without a unit (or in B) must be a whole number; a fraction
    of a unit rounds down to whole bytes. Anything else is a LorafuseValueError."""
    if isinstance(text, numbers.Integral) and not isinstance(text, bool):  # numpy integers too
        text = int(text)
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise LorafuseValueError(f"{text!r} is not a size: {_SIZE_EXAMPLES}")
    if isinstance(text, int):
        if text <= 0:
            raise LorafuseValueError(f"size {text} is not a positive number of bytes: {_SIZE_EXAMPLES}")
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else ""
    if m is None or (unit or "B") not in _SIZE_UNITS:
        raise LorafuseValueError(f"{text!r} is not a size: {_SIZE_EXAMPLES}")
    number = Decimal(m.group(1))
    if (unit or "B") == "B" and number != number.to_integral_value():
        raise LorafuseValueError(f"{text!r} is a fraction of a byte: a size without a unit is a whole number of "
                                 f"bytes; {_SIZE_EXAMPLES}")
    size = int(number * _SIZE_UNITS[unit or "B"])  # exact decimal arithmetic, rounded down
    if size <= 0:
        raise LorafuseValueError(f"size {text!r} is 0 bytes: {_SIZE_EXAMPLES}")
    return size


def check_requantize(requantize: bool | None, dtype: object) -> None:
    """requantize keeps a quantized base's format, a dtype writes it dequantized: both together are refused
    (LorafuseValueError), by apply and, before its first stage, by a recipe."""
    if requantize and dtype is not None:
        raise LorafuseValueError("requantize keeps the base's quantized format, and dtype asks for a dequantized "
                                 f"output in {dtype}: give one of them (--requantize or --dtype; Python: "
                                 "requantize=True or dtype=)")


def shard_limit(max_shard_size: str | int) -> int:
    """--max-shard-size as bytes; absurdly small sizes (every tensor a file, the header repeated in each)
    are refused."""
    size = parse_size(max_shard_size)
    if size < MIN_SHARD_SIZE:
        raise LorafuseValueError(
            f"shard size {max_shard_size!r} ({size} bytes) is below the {MIN_SHARD_SIZE // 1024} KiB minimum: each "
            "shard repeats the checkpoint's metadata and becomes a file of its own; Hugging Face checkpoints use "
            "shards of 1GB to 10GB (e.g. --max-shard-size 5GB)"
        )
    return size


def _output_dtype(src_dtype: str, requested: str | None, changed: bool) -> str:
    """A plain (not quantized) tensor's output dtype: --dtype converts every float tensor, plain float8 values
    included (plan_quant first refuses a float8 tensor with unknown scale-like tensors beside it)."""
    if not DTYPES[src_dtype].is_float:
        return src_dtype
    if requested is not None:
        return requested
    if not changed or src_dtype in WRITABLE_FLOATS:
        return src_dtype
    return "F32" if src_dtype == "F64" else "BF16"  # a merged F64 / F8 weight


def _plan(ckpt: Checkpoint, resolved: Resolved, config: dict[str, object], dtype: str | None,
          max_shard_size: int | None, notes: list[str], untied: dict[str, str] | None = None,
          requantize: bool | None = None, scan: QuantScan | None = None) -> Plan:
    """The output tensors of one checkpoint, shard by shard, given what changes in it; `untied`: the tied layers
    it writes apart (layer -> the stored key it copies: ops.tied.untie), with tie_word_embeddings=false."""
    contributions, bias_contributions = resolved.contributions, resolved.bias_contributions
    replacements = resolved.replacements
    config_updates: dict[str, object] = {}

    changed = set(contributions) | set(replacements) | set(resolved.rows)
    copies: dict[str, list[str]] = {}  # a stored key -> the tied layers written after it, as its copies
    for layer, src in (untied or {}).items():
        copies.setdefault(src, []).append(layer)
    if untied is not None:
        config_updates["tie_word_embeddings"] = False
        config_updates.update(_untied_text_configs(config))
    if dtype is not None:
        torch_name = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype]
        for k in ("torch_dtype", "dtype"):
            if k in config:
                config_updates[k] = torch_name
        config_updates.update(_nested_dtypes(config, config_updates, torch_name))

    scan = scan if scan is not None else scan_quant(ckpt, config)
    qplan = plan_quant(ckpt, config, changed, dtype, requantize, scan)
    quant_weights = qplan.weights if qplan is not None else {}
    # a tied layer written apart from a quantized weight is that weight dequantized, not its codes as values
    copy_refs = {src: ref for src in copies if (ref := copy_ref(ckpt, config, scan, src, dtype)) is not None}
    if qplan is None and copies:
        check_unscaled_f8(ckpt, set(copies))
    if qplan is None and requantize is not None:  # --no-requantize too: said, as --requantize is
        what = "requantize" if requantize else "requantize=False (--no-requantize)"
        notes.append(f"{ckpt.location}: {what} has no effect: the base is not quantized")

    def out_tensor(key: str, shard: str, src: str) -> OutTensor:
        info = ckpt.info(src)
        ch = key in changed or key in bias_contributions
        ref = quant_weights.get(src)
        if (ref is not None or copy_refs.get(src) is not None) and resolved.rows.get(key):
            raise UnsupportedError(f"{ckpt.directory / shard}: {key} is quantized, and {resolved.rows[key][0].source} "
                                   "replaces rows of it (trainable_token_indices): lorafuse replaces rows of "
                                   "floating-point weights only (PEFT writes them in the weight's dtype)")
        if ref is not None and src == key:
            repl = replacements.get(key)
            # requantized: the stored codes' dtype and shape; else the real shape in --dtype, or the dtype it
            # was quantized from
            out_dtype = info.dtype if ref.requantize else dtype or ref.dtype or "BF16"
            out_shape = info.shape if ref.requantize else ref.shape
            return OutTensor(key, out_dtype, out_shape, shard, src, contributions.get(key, []),
                             bias_contributions.get(key, []), repl[0] if repl else None, quant=ref,
                             matrix_rows=ref.shape[0] if ref.shape else 1)
        cref = copy_refs.get(src) if src != key else None
        if cref is not None:
            repl = replacements.get(key)
            return OutTensor(key, cref.dtype or "BF16", cref.shape, shard, src, contributions.get(key, []),
                             bias_contributions.get(key, []), repl[0] if repl else None, quant=cref,
                             matrix_rows=cref.shape[0] if cref.shape else 1)
        if ch and not DTYPES[info.dtype].is_float:  # refused here, so that --dry-run refuses it too
            by = sorted({c.source for c in contributions.get(key, []) + bias_contributions.get(key, [])})
            raise DtypeError(f"{ckpt.directory / shard}: {key} is {info.dtype} {list(info.shape)}, and "
                             f"{', '.join(by) or 'an adapter'} changes it: lorafuse merges into floating-point "
                             "weights only (F32, F16, BF16, F64, FP8, bitsandbytes)")
        out_dtype = _output_dtype(info.dtype, dtype, ch)
        if ch and out_dtype != info.dtype and info.dtype not in WRITABLE_FLOATS and dtype is None:
            notes.append(f"{key}: merged {info.dtype} weight written as {out_dtype}")
        repl = replacements.get(key)
        if resolved.rows.get(key) and info.dtype not in ("F32", "F16", "BF16", "F64"):
            raise DtypeError(f"{ckpt.directory / shard}: {key} is {info.dtype} {list(info.shape)}, and "
                             f"{resolved.rows[key][0].source} replaces rows of it (trainable_token_indices): lorafuse "
                             "replaces rows of F32, F16, BF16 and F64 weights only")
        return OutTensor(key, out_dtype, info.shape, shard, src, contributions.get(key, []),
                         bias_contributions.get(key, []), repl[0] if repl else None, list(resolved.rows.get(key, [])))

    ordered: list[tuple[str, OutTensor]] = []
    moved = {k for k, w in qplan.companions.items() if w in quant_weights} if qplan is not None else set()
    left_out = qplan.dropped | moved if qplan is not None else set()
    requantized: list[str] = []
    for shard in ckpt.shards:
        for info in sorted(ckpt.headers[shard].values(), key=lambda t: t.begin):
            if info.name in left_out:
                continue
            ordered.append((shard, out_tensor(info.name, shard, info.name)))
            ref = quant_weights.get(info.name)
            if ref is not None and ref.requantize:  # its fresh scales follow it, computed from its row blocks
                requantized.append(info.name)
                for role, (cshard, ckey) in ref.companions.items():
                    cinfo = ckpt.info(ckey)
                    ordered.append((shard, OutTensor(ckey, cinfo.dtype, cinfo.shape, cshard, ckey,
                                                     companion_of=(info.name, role))))
            for layer in copies.get(info.name, []):
                ordered.append((shard, out_tensor(layer, shard, info.name)))

    for _, t in ordered:  # a fused expert tensor [E, out, in] is merged as an (E * out, in) matrix (ops.fused)
        t.matrix_rows = resolved.matrix_rows.get(t.name, t.matrix_rows)
        if t.quant is not None and len(t.quant.shape) > 2 and t.matrix_rows != t.quant.shape[0]:
            # its quantized rows are read and written in that view too (a 3-D bitsandbytes weight: flat blocks)
            t.quant = replace(t.quant, shape=(t.rows, math.prod(t.quant.shape) // max(1, t.rows)))
    if max_shard_size is None:
        groups: dict[str, list[OutTensor]] = {s: [] for s in ckpt.shards}
        for shard, t in ordered:
            groups[shard].append(t)
        shards = list(groups.items())
        metadata = {s: shard_metadata(m) for s, m in ckpt.metadata.items()}
    else:
        packs: list[list[OutTensor]] = []
        size = 0
        for _, t in ordered:
            if not packs or (size + t.nbytes > max_shard_size and packs[-1]):
                packs.append([])
                size = 0
            packs[-1].append(t)
            size += t.nbytes
        packs = packs or [[]]  # a checkpoint of no tensors still gets its (empty) model file
        n = len(packs)
        stem = weights_stem(ckpt)  # diffusers' own names for a diffusers component: diffusers loads no other
        stem += f".{weights_variant(ckpt)}" if weights_variant(ckpt) else ""  # model.fp16-00001-of-00002...
        names = [f"{stem}.safetensors"] if n == 1 else [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        shards = list(zip(names, packs))
        first_meta = ckpt.metadata[ckpt.shards[0]] if ckpt.shards else {}
        _check_metadata_fits(first_meta, max_shard_size, f"{ckpt.directory / ckpt.shards[0]}" if ckpt.shards else "")
        metadata = {name: shard_metadata(first_meta) for name in names}
    plan = Plan(shards, metadata, config_updates, notes)
    if qplan is not None:
        plan.config_removals = qplan.config_removals
        plan.requantized = requantized
        if not qplan.requantize and (qplan.config_removals or qplan.dropped):
            written = dtype or " / ".join(sorted({r.dtype or "BF16" for r in qplan.weights.values()})) or "BF16"
            notes.append(f"{ckpt.directory}: {plural(len(qplan.weights), 'weight')} quantized with "
                         f"{qplan.quantization.describe()} written dequantized as {written}; "
                         f"{plural(len(qplan.dropped), 'companion tensor')} (scales, quant states) and config.json's "
                         f"{' / '.join(qplan.config_removals) or 'quantization settings'} left out")
    return plan


def drop_named_weights(plan: Plan, ckpt: Checkpoint) -> None:
    """A checkpoint folder re-sharded into a folder (save_pretrained's names, `weights_stem`): a config.json whose
    transformers_weights names the input's weights file (consolidated.safetensors), which the output does not hold,
    would make transformers look for it there and fail. The output's config.json leaves the key out, as
    save_pretrained leaves it out (transformers then loads the output's own files), and a note says so."""
    named = read_config(ckpt.directory).get(TRANSFORMERS_WEIGHTS)
    if named is None or not plan.shards:
        return
    plan.config_removals = [*plan.config_removals, TRANSFORMERS_WEIGHTS]
    first = plan.shards[0][0]
    loaded = first if len(plan.shards) == 1 else resharded_index_name(ckpt)
    plan.notes.append(f"{ckpt.directory / 'config.json'}: its {TRANSFORMERS_WEIGHTS} ({short(named)}) is left out of "
                      f"the re-sharded output's config.json, as save_pretrained leaves it out: transformers loads the "
                      f"output's {loaded} without it")


DIFFUSERS_STEM = "diffusion_pytorch_model"


def weights_stem(ckpt: Checkpoint) -> str:
    """The name a re-sharded output's files take (STEM.safetensors, STEM-0000i-of-0000n.safetensors and
    STEM.safetensors.index.json, as save_pretrained(max_shard_size=) writes them): diffusers' own,
    `diffusion_pytorch_model`, for a checkpoint whose index or weights file has it (a diffusers model folder:
    diffusers' from_pretrained looks for no other name), else transformers' `model`."""
    own = ckpt.index_name or (ckpt.shards[0] if ckpt.shards else "")
    return DIFFUSERS_STEM if own.startswith(DIFFUSERS_STEM + ".") or own.startswith(DIFFUSERS_STEM + "-") else "model"


def weights_variant(ckpt: Checkpoint) -> str:
    """The variant in the names of a checkpoint saved as one (save_pretrained(variant="fp16"): its index
    model.safetensors.index.fp16.json, or its one file model.fp16.safetensors; diffusers' alike), '' for others: a
    re-sharded output keeps it in its names (model.fp16-00001-of-00002.safetensors), which from_pretrained(...,
    variant="fp16") looks for."""
    own = ckpt.index_name or (ckpt.shards[0] if len(ckpt.shards) == 1 else "")
    stem = re.escape(weights_stem(ckpt))
    m = re.fullmatch(rf"{stem}\.safetensors\.index\.([^./]+)\.json|{stem}\.([^.\-/]+)\.safetensors", own, re.IGNORECASE)
    return "" if m is None else str(m[1] or m[2])


def resharded_index_name(ckpt: Checkpoint) -> str:
    """The shard index of a re-sharded output: save_pretrained's name (model.safetensors.index.json, diffusers'
    for a diffusers component), with the input's variant (weights_variant: model.safetensors.index.fp16.json)."""
    variant = weights_variant(ckpt)
    return f"{weights_stem(ckpt)}{INDEX_SUFFIX}" if not variant else \
        f"{weights_stem(ckpt)}.safetensors.index.{variant}.json"


# hashes of the base's own weights (ModelSpec's, sd-scripts'), which a merged file's weights no longer have
BASE_HASH_KEYS = (*STALE_HASH_KEYS, "sshs_model_hash", "sshs_legacy_hash")


def shard_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """A merged shard's metadata: the base's without the hashes of its weights (BASE_HASH_KEYS: a UI that reads
    them would take the merge for the base), with safetensors' `format: pt` first where it names no format. The
    output gets lorafuse's `lorafuse.*` keys, and transformers 4's load_state_dict refuses a file whose metadata is
    not None and names no format (pt, tf, flax, mlx): a base saved by `save_file(tensors, path)`, without
    metadata, would otherwise merge into a model that transformers cannot load."""
    kept = {k: v for k, v in metadata.items() if k not in BASE_HASH_KEYS}
    return kept if "format" in kept else {"format": "pt", **kept}


def _check_metadata_fits(metadata: dict[str, str], max_shard_size: int, where: str) -> None:
    """Every re-sharded file repeats the input's metadata: refuse a shard size under 100 times its size
    (the copies would be more than 1% of the output, and most of it with thousands of tiny shards)."""
    meta_bytes = len(json.dumps(metadata, ensure_ascii=False).encode("utf-8")) if metadata else 0
    if meta_bytes * 100 > max_shard_size:
        raise LorafuseValueError(
            f"{where}: its metadata ({meta_bytes} bytes) is copied into every output shard, and --max-shard-size "
            f"{max_shard_size} bytes is less than 100 times that: choose at least {meta_bytes * 100} bytes "
            "(e.g. 5GB), or leave --max-shard-size out to keep the input's shards"
        )



# transformers' default tie_word_embeddings by model_type (5.25, AutoConfig.for_model(t).tie_word_embeddings),
# for a config.json without the key: transformers 4.x leaves it out where it equals the default (GPT-2's, Gemma's
# are true: read as false, an embedding LoRA was merged into a weight that lm_head no longer shared)
TIE_DEFAULTS = {
    **dict.fromkeys(("gpt2", "gemma", "gemma2", "gemma3", "gemma3_text", "opt", "falcon", "starcoder2", "bloom"),
                    True),
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi", "phi3",
                     "gpt_neox", "stablelm", "olmo", "olmo2", "gptj"), False),
}


# where a composite model's config.json nests the text decoder's config (transformers' get_text_config(decoder=True))
TEXT_CONFIGS = ("text_config", "decoder", "generator")


def _text_configs_tying(config: dict[str, object]) -> list[str]:
    """The nested text decoder configs (TEXT_CONFIGS) whose tie_word_embeddings is true."""
    return [k for k in TEXT_CONFIGS
            if isinstance(sub := config.get(k), dict) and sub.get("tie_word_embeddings") is True]


def _nested_dtypes(config: dict[str, object], updates: dict[str, object], torch_name: str) -> dict[str, object]:
    """config.json's nested model configs (text_config, vision_config, ...: a dict with a model_type, or a
    `*_config` key other than quantization_config) that name a dtype, with it set to `torch_name` (on top of
    what `updates` already changes in them): a composite model written in --dtype says so in every part, as
    transformers' save_pretrained writes it, not the base's old dtype in its text / vision configs."""
    out: dict[str, object] = {}
    for k, v in config.items():
        if not isinstance(v, dict) or k == "quantization_config" or not ("model_type" in v or k.endswith("_config")):
            continue
        named = [d for d in ("torch_dtype", "dtype") if d in v]
        if named:
            sub = updates.get(k, v)
            assert isinstance(sub, dict)
            out[k] = {**sub, **dict.fromkeys(named, torch_name)}
    return out


def _untied_text_configs(config: dict[str, object]) -> dict[str, object]:
    """config.json's nested text configs that tie, with tie_word_embeddings false (a model written untied):
    transformers 4 ties a composite model's output layer by its text config's flag (get_text_config), transformers
    5 carries a llava-family text config's true up to the model's, and vLLM builds the language model from it."""
    return {k: {**config[k], "tie_word_embeddings": False}  # type: ignore[dict-item]
            for k in _text_configs_tying(config)}


def tie_word_embeddings(config: dict[str, object]) -> bool | None:
    """Whether the model ties lm_head to the input embedding: config.json's tie_word_embeddings, else
    transformers' default for its model_type (TIE_DEFAULTS, or transformers itself where installed); None when
    neither says. A nested text config that ties (TEXT_CONFIGS: transformers 4 reads its flag, 5 carries a
    llava-family one's true up to the model's) makes it true whatever the model's own flag says."""
    if _text_configs_tying(config):
        return True
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return None
    if model_type in TIE_DEFAULTS:
        return TIE_DEFAULTS[model_type]
    try:
        from transformers import AutoConfig

        return bool(AutoConfig.for_model(model_type).tie_word_embeddings)
    except Exception:  # not installed, or a model_type it does not know  # noqa: BLE001
        return None


def _changed_by(resolved: Resolved, tied_rows: Collection[str] = ()) -> dict[str, str]:
    """Every base key the adapters change -> who changes it (the first adapter and module), for messages; the keys
    of `tied_rows` (_tie_token_rows) count only where something else changes them."""
    out: dict[str, str] = {}
    for key, cs in resolved.contributions.items():
        out[key] = f"{cs[0].source}: module {cs[0].update.name.split('[', 1)[0]!r}"
    for key, (_, label) in resolved.replacements.items():
        out.setdefault(key, f"{label}: a full tensor")
    for key, rows in resolved.rows.items():
        if key not in tied_rows:
            out.setdefault(key, f"{rows[0].source}: trainable token rows")
    return out


def _tie_token_rows(resolved: Resolved, tied: TiedLayers) -> set[str]:
    """PEFT ties the output layer's trainable tokens to the input embedding's (TrainableTokensWrapper with
    tied_adapter) where the model ties the two: rows an adapter replaces in a tied embedding are replaced in each
    layer that reads it too (a stored copy gets them; a layer stored nowhere reads them), unless that adapter gives
    the layer rows of its own (different ids: PEFT then does not tie them). Returns the embeddings whose rows
    change with all their readers alike, and those readers: these rows need no untying."""
    readers: dict[str, list[str]] = {}
    for layer, src in {**tied.virtual, **tied.stored}.items():
        readers.setdefault(src, []).append(layer)
    alike: set[str] = set()
    for src, layers in readers.items():
        rows = resolved.rows.get(src, [])
        if not rows:
            continue
        own = {r.source for layer in layers for r in resolved.rows.get(layer, [])}
        for layer in layers:
            resolved.rows.setdefault(layer, []).extend(r for r in rows if r.source not in own)
        if not own:
            alike.update([src, *layers])
    return alike


def _untie_note(untied: dict[str, str], tied: TiedLayers) -> str:
    pairs = {**untied, **tied.stored}
    shown = ", ".join(f"{layer} from {src}" for layer, src in list(pairs.items())[:3])
    return (f"untied {shown}{', ...' if len(pairs) > 3 else ''}: only one of them changes (or each changes "
            f"differently); {'the tied layers are written as weights of their own and ' if untied else ''}"
            "config.json now has tie_word_embeddings=false")


@dataclass
class ModelPlan:
    """The plans of the components an apply writes (a checkpoint: its one component ''), and the notes."""

    model: Pipeline
    plans: dict[str, Plan]
    notes: list[str]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for plan in self.plans.values() for _, ts in plan.shards for t in ts)

    @property
    def total_tensors(self) -> int:
        return sum(len(ts) for plan in self.plans.values() for _, ts in plan.shards)


def split_by_component(model: Pipeline, resolved: Resolved) -> dict[str, Resolved]:
    """Model-wide matches regrouped per component, with the components' own keys."""
    if model.single:
        return {"": resolved}
    parts: dict[str, Resolved] = {}
    for attr in ("contributions", "bias_contributions", "replacements", "rows", "matrix_rows"):
        for key, value in getattr(resolved, attr).items():
            comp, bare = model.split(key)
            getattr(parts.setdefault(comp, Resolved()), attr)[bare] = value
    return parts


def _no_key(name: str) -> str | None:
    return None


def plan_model(model: Pipeline, adapters: Sequence[Adapter], weights: Sequence[float], dtype: str | None,
               max_shard_size: int | None, skip_missing: bool = False,
               requantize: bool | None = None) -> ModelPlan:
    """Match every adapter module in the model and plan the output of each component it touches (a
    checkpoint is always written whole). LLM names match a checkpoint's keys only: a pipeline's
    components are diffusion models, named by the diffusion tables. Quantized weights are matched by
    their real shape (a packed 4-bit weight's is in its quant state); `requantize`: see plan_quant."""
    shapes = model.shapes()
    configs = {comp: read_config(ck.directory) for comp, ck in model.components.items()}
    scans = {comp: scan_quant(ck, configs[comp]) for comp, ck in model.components.items()}
    for comp, scan in scans.items():
        if model.single:  # a pipeline's untouched components are copied whatever they hold: refused in _plan
            check_scan(model.components[comp], scan, dtype, requantize)
        for key, shape in scan.shapes(model.components[comp]).items():
            shapes[model.tensor_name(comp, key)] = shape
    config: dict[str, object] | None = None
    tied = TiedLayers()
    base_key: Callable[[str], str | None] = _no_key
    if model.single:
        ckpt = model.components[""]
        config = configs[""]
        chain = checkpoint_keys(ckpt.keys(), config=config)
        tied = tied_layers(config, ckpt.keys(), chain, bool(tie_word_embeddings(config)))
        base_key = chain.with_virtual(tied.virtual)  # a tied layer it does not store reads another
        for layer, src in tied.virtual.items():
            shapes[layer] = shapes[src]
    resolved = resolve(shapes, adapters, weights, base_key, config)
    _check_coefficients(resolved)
    notes: list[str] = [n for ck in model.components.values() for n in ck.notes] + adapter_notes(adapters)
    if model.single and config is not None and tie_word_embeddings(config) is None \
            and LM_HEAD not in model.components[""]:
        touched = sorted(k for k in (*resolved.contributions, *resolved.replacements)
                         if k.endswith(EMBEDDING_SUFFIXES))
        if touched:  # a model that ties lm_head to it would read the merged embedding there too
            notes.append(f"{touched[0]} is merged as a weight of its own: no config.json (nor a model_type lorafuse "
                         "knows) says whether lm_head is tied to it, and the checkpoint stores no lm_head.weight; "
                         "for a model that ties them (GPT-2, Gemma, OPT, ...) give its folder with config.json, "
                         "where lorafuse writes lm_head apart")
    if resolved.missing:
        unread = list(model.unread.values())
        if not skip_missing:
            given = model.components[""].path if model.single else model.directory  # the file or folder given
            raise missing_error(resolved.missing, str(given), unread, resolved.components)
        notes += [f"skipped (no target): {m}" for m in resolved.missing] + [f"not read: {why}" for why in unread]
        if not (resolved.contributions or resolved.bias_contributions or resolved.replacements):
            notes.append("no adapter module found a target (--skip-missing skipped them all): the output is the base "
                         "unchanged; is the adapter for another model?")
    tied_rows = _tie_token_rows(resolved, tied) if model.single else set()
    untied = untie(tied, _changed_by(resolved, tied_rows)) if model.single else None
    if untied is not None:
        notes.append(_untie_note(untied, tied))
    plans = {}
    for comp, part in split_by_component(model, resolved).items():
        ckpt = model.components[comp]
        plans[comp] = _plan(ckpt, part, config if config is not None else configs[comp], dtype,
                            max_shard_size, notes, untied, requantize, scans[comp])
    untouched = [c for c in model.components if c not in plans]
    if dtype is not None and not model.single and untouched:
        notes.append(f"dtype {dtype} applies to the merged {', '.join(sorted(plans))}; "
                     f"{', '.join(sorted(untouched))} copied as {'it is' if len(untouched) == 1 else 'they are'}")
    return ModelPlan(model, plans, notes)


def _check_coefficients(resolved: Resolved) -> None:
    """Each contribution's coefficient, weight x scale, scales its factors in float32 (ops.stages): refused
    before any work where float32 cannot hold it, as combine refuses it (model.arithmetic.float32_coefficient)."""
    for contribs in resolved.contributions.values():
        for c in contribs:
            if not abs(c.coef) <= FLOAT32_MAX:
                s = c.update.scale
                raise LorafuseValueError(f"{c.source}: module {c.update.name!r}: weight {c.coef / s:g} times its scale "
                                         f"{s:g} is beyond float32's range: use smaller weights")


def plan_apply(ckpt: Checkpoint, adapters: Sequence[Adapter], weights: Sequence[float], dtype: str | None,
               max_shard_size: int | None, skip_missing: bool = False, requantize: bool | None = None) -> Plan:
    """The plan of one checkpoint (see plan_model)."""
    return plan_model(Pipeline.of_checkpoint(ckpt), adapters, weights, dtype, max_shard_size, skip_missing,
                      requantize).plans[""]
