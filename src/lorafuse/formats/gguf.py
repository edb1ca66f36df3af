"""GGUF LoRA adapters for llama.cpp (`lorafuse convert ADAPTER --to gguf`), written as llama.cpp's own
`convert_lora_to_gguf.py` writes them, with the `gguf` package (pip install 'lorafuse[gguf]').

What llama.cpp expects (convert_lora_to_gguf.py, src/llama-adapter.cpp, src/llama-graph.cpp):

* metadata: `general.architecture` (must equal the base model's, llama.cpp refuses a mismatch),
  `general.type = adapter`, `adapter.type = lora`, `general.name` and the other `general.*` keys that
  gguf's `Metadata.load` finds in the adapter folder (its README model card, its name),
  `adapter.lora.alpha` (FLOAT32) and `general.quantization_version`; no file type, no hyperparameters.
  lorafuse adds one key last, `lorafuse_version` (its output mark); otherwise the file is byte for byte
  what the converter writes (tested against convert_lora_to_gguf.py of llama.cpp as vendored by
  llama-cpp-python 0.3.36, for Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2 in F32 / F16 / BF16 / Q8_0).
* tensors: per adapted base tensor `<gguf name>.weight.lora_a` and `.lora_b` (names by gguf's
  TensorNameMap for the architecture: `blk.N.attn_q`, `blk.N.ffn_down`, `token_embd`, `output`), lora_a
  right before its lora_b. In numpy order lora_a is PEFT's lora_A (r x in) and lora_b PEFT's lora_B
  (out x r), untransposed (the loader checks a.ne[0] == in, b.ne[1] == out, a.ne[1] == b.ne[0]).
  `token_embd` is the exception: lora_a is lora_embedding_A transposed (vocab x r), lora_b is
  lora_embedding_B (dim x r), as llm_build_inp_embd takes rows of lora_a.
* the scale of a module is alpha / r, r read from lora_b (b->ne[0]), alpha the file's one
  `adapter.lora.alpha` (0 means a scale of 1). An adapter whose modules need other scales (alpha_pattern,
  rank_pattern with one alpha, rsLoRA's alpha / sqrt(r)) is written exactly by folding
  s / (alpha / r) into that module's lora_b; the modules folded are reported. The alpha is a FLOAT32 and
  llama.cpp computes alpha / r in float32: an alpha beyond float32's range (or with a subnormal alpha / r) is
  written as the nearest power of two in range, the rest of every scale folded (with a note).
* Llama-architecture models (Llama, Mistral): the converter permutes the rows of q_proj and k_proj
  (LlamaModel.permute: llama.cpp's rotary layout), so lora_b of those modules is permuted the same way,
  which needs the head counts (num_attention_heads, num_key_value_heads) of the base's config.json.
* types: F32 (the converter's default --outtype), F16, BF16 or Q8_0, from float32 values with gguf's
  own quantize; a Q8_0 tensor whose rows are not a multiple of 32 falls back to F16, as the converter
  does (lora_b's rows have r elements). What llama.cpp reads back, (alpha / r) * lora_b @ lora_a, is the
  adapter's delta within the type's rounding, or nothing is written: a module whose factors (lora_b with its
  fold) would overflow their type (F16's 65504, BF16's largest, Q8_0's F16 block scale, float32) or fall
  below its normal range is written with lora_a times 2^k and lora_b over 2^k, exactly (k = 0 where they fit:
  the converter's values); factors holding NaN / Inf (NonFiniteError), and products that no k brings into the
  types' range (NonFiniteError above it, LorafuseValueError below it), are refused naming the module and tensor.

Left out, with a note, as the converter leaves them out: a multimodal model's vision-tower / projector modules
(_VISION_PARTS: llama.cpp keeps those in the separate mmproj file, and applies --lora to the text model only).

Refused, naming the modules: DoRA, lora_B biases, convolutions, LoRA on expert parameters
(target_parameters), LoHa / LoKr (convert them first: --rank), modules_to_save and other full tensors
(a GGUF LoRA holds lora_a / lora_b pairs only), names the architecture has no tensor for, lm_head where
llama.cpp's model has no output tensor of its own (Gemma, Gemma 2, a base with tie_word_embeddings) and
embedding LoRAs where llama.cpp's output projection is the token embedding (Gemma, Gemma 2, a base with
tie_word_embeddings: llama.cpp would apply the LoRA there too and abort on the shapes; an embedding LoRA
therefore needs the base's config) and of Gemma 3 (the converter trims its token_embd to the tokenizer's
vocabulary).
"""

from __future__ import annotations

import dataclasses
import math
import os
import stat
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, NoReturn

import numpy as np

from lorafuse._terminal import plural, short
from lorafuse._validate import check_text
from lorafuse.errors import (
    FormatError,
    LorafuseValueError,
    MissingModuleError,
    NonFiniteError,
    OutputError,
    ShapeMismatchError,
    UnsupportedError,
)
from lorafuse.io.atomic import atomic_file
from lorafuse.io.checkpoint import read_json
from lorafuse.io.hub import CONFIG_FILES, local_path
from lorafuse.io.manifest import ADAPTER, GGUF_MAGIC, MARKER_KEY, gguf_bounded, gguf_counts, version
from lorafuse.io.provenance import path_text
from lorafuse.model import Adapter, LoraUpdate
from lorafuse.model.arithmetic import FLOAT32_MAX
from lorafuse.model.experts import expert_modules
from lorafuse.model.names import full_kind, full_kinds_text
from lorafuse.model.param_lora import ParamLoraUpdate
from lorafuse.model.tucker import TuckerFactor

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_TYPE = "f32"  # convert_lora_to_gguf.py's --outtype default
SUFFIX = ".gguf"
_Q8_BLOCK = 32  # elements per Q8_0 block: a row must be a multiple of it
_F32_TINY = 2.0 ** -126  # float32's smallest normal value
# per type, the range of a tensor's largest |value| written without overflow and at the type's full precision:
# (smallest, largest). F16: its normal range; BF16 and F32: float32's (BF16's largest is 0x7f7f); Q8_0: 127 times
# the block scale d, an F16 (at most 65504; at least 2^-17 keeps the rounding of d within half a step)
_RANGES: dict[str, tuple[float, float]] = {
    "F32": (_F32_TINY, FLOAT32_MAX),
    "BF16": (_F32_TINY, float.fromhex("0x1.fep+127")),
    "F16": (2.0 ** -14, 65504.0),
    "Q8_0": (127 * 2.0 ** -17, 127 * 65504.0),
}

_GEMMA_LM_HEAD = ("llama.cpp's Gemma models have no output tensor (the output is the tied token embedding) and "
                  "its converter drops lm_head, so llama.cpp would never apply it (convert_lora_to_gguf.py stops "
                  "with 'lm_head is present in adapter, but is ignored in base model')")
_TIED_EMBED = ("llama.cpp's output projection is then the token embedding itself (one tensor named "
               "'token_embd.weight') and llama.cpp finds a LoRA by its tensor's name, so it would apply token_embd's "
               "LoRA to the output projection too, where its shapes do not fit: ggml aborts the process "
               "(GGML_ASSERT(ggml_can_mul_mat(a, b)))")
_GEMMA3_EMBED = ("llama.cpp's converter trims Gemma 3's token_embd to the tokenizer's vocabulary, so a LoRA on "
                 "the full embedding does not fit the GGUF base")


@dataclass(frozen=True)
class ArchRule:
    """How llama.cpp's converter treats an architecture's LoRA (the --arch choices)."""

    gguf: str  # general.architecture
    permute_qk: bool  # LlamaModel.undo_permute: q_proj / k_proj rows permuted for llama.cpp's rotary layout
    tied_default: bool  # transformers' default tie_word_embeddings for the config
    lm_head: str | None = None  # why an lm_head LoRA is refused (None: written as `output`)
    embeddings: str | None = None  # why an embedding LoRA is refused (None: written as `token_embd`)


ARCHS: dict[str, ArchRule] = {
    "llama": ArchRule("llama", True, False),
    "mistral": ArchRule("llama", True, False),  # MistralForCausalLM converts as a llama model
    "qwen2": ArchRule("qwen2", False, False),
    "qwen3": ArchRule("qwen3", False, False),
    "gemma": ArchRule("gemma", False, True, lm_head=_GEMMA_LM_HEAD, embeddings="Gemma's GGUF always ties the "
                      "output to the token embedding: " + _TIED_EMBED),
    "gemma2": ArchRule("gemma2", False, True, lm_head=_GEMMA_LM_HEAD, embeddings="Gemma 2's GGUF always ties the "
                       "output to the token embedding: " + _TIED_EMBED),
    "gemma3": ArchRule("gemma3", False, True, embeddings=_GEMMA3_EMBED),
    # Phi-3 / Phi-4 (Phi3MiniModel): qkv_proj and gate_up_proj stay fused, as attn_qkv and ffn_up, unpermuted
    "phi3": ArchRule("phi3", False, False),
}
# config.json's architectures[0] (the converter's registry) and model_type -> an --arch choice
# (llama.cpp converts Mixtral as a llama model: its LlamaModel registers MixtralForCausalLM, q / k permuted)
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "MixtralForCausalLM": "mistral",
                    "Qwen2ForCausalLM": "qwen2",
                    "Qwen3ForCausalLM": "qwen3", "GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2",
                    "Gemma3ForCausalLM": "gemma3", "Gemma3ForConditionalGeneration": "gemma3",
                    "Phi3ForCausalLM": "phi3"}
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "mixtral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
               "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3", "phi3": "phi3"}
# the converter's renaming of language-model parts of multimodal adapters (convert_lora_to_gguf.py)
_LM_PREFIXES = (("model.language_model.", "model."), ("language_model.", ""))
# the parts of a multimodal model (at the top, or under `model.`) that llama.cpp's text converter leaves out: its
# text models skip them (convert_hf_to_gguf.py, e.g. Gemma3Model: 'skip vision tensors'), its mmproj models
# (e.g. Gemma3VisionModel) convert them into the separate mmproj GGUF, which `--lora` never reads
_VISION_PARTS = frozenset(("vision_tower", "vision_model", "multi_modal_projector", "multimodal_projector",
                           "mm_projector", "visual", "audio_tower"))
_VISION_NOTE = ("llama.cpp's text GGUF has no vision tower or multimodal projector: its converter writes them into "
                "the separate mmproj file (--mmproj), and llama.cpp applies --lora to the text model only")


def gguf_module() -> ModuleType:
    """The `gguf` package, or UnsupportedError saying how to get it."""
    try:
        import gguf
    except ImportError:
        raise UnsupportedError("writing GGUF needs the gguf package (llama.cpp's gguf-py): "
                               "pip install 'lorafuse[gguf]'") from None
    return gguf


# ----------------------------------------------------------------------------- the base model's config


@dataclass(frozen=True)
class BaseConfig:
    """What the export needs from the base model's config.json."""

    path: Path
    arch: str | None  # an ARCHS key, None when the config names no architecture lorafuse maps
    names: str  # what the config calls its architecture, for messages
    n_head: int | None
    n_head_kv: int | None
    n_layers: int | None
    tied: bool | None  # tie_word_embeddings as stated (None: not stated)
    hidden: int | None = None  # hidden_size
    intermediate: int | None = None  # intermediate_size
    vocab: int | None = None  # vocab_size
    model_type: str | None = None  # config.json's model_type, as stated


def _int(cfg: Mapping[str, object], key: str, path: Path) -> int | None:
    value = cfg.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise FormatError(f"{path}: {key} is {short(value)}, not a positive integer")
    return value


def read_base_config(path: str | os.PathLike[str]) -> BaseConfig:
    """The base model's config.json (a file, or a folder holding one), read as llama.cpp's converter reads
    it: a text_config (multimodal models) overrides the top level. A Hub id: its config.json (io.hub)."""
    p = local_path(path, what="--base-config", patterns=CONFIG_FILES)
    file = p / "config.json" if os.path.isdir(p) else p  # os.path: False for a name the system refuses (too long)
    if not os.path.lexists(file):  # one that is there but no regular file (a FIFO, a folder) is said so by read_json
        raise FormatError(f"{p}: no config.json there (--base-config, Python: base_config=, takes the base model's "
                          "config.json or its folder)")
    raw = read_json(file, "the base model's config")
    if not isinstance(raw, dict):
        raise FormatError(f"{file}: not a JSON object")
    cfg: dict[str, Any] = dict(raw)
    text = cfg.get("text_config")
    if isinstance(text, dict):
        cfg = {**cfg, **text}
    architectures = raw.get("architectures")
    first = architectures[0] if isinstance(architectures, list) and architectures else None
    model_type = raw.get("model_type")
    arch = HF_ARCHITECTURES.get(first) if isinstance(first, str) else None
    if arch is None and isinstance(model_type, str):
        arch = MODEL_TYPES.get(model_type)
    names = f"architectures {short(architectures)}, model_type {short(model_type)}"
    n_head = _int(cfg, "num_attention_heads", file)
    n_head_kv = _int(cfg, "num_key_value_heads", file) or n_head
    tied = cfg.get("tie_word_embeddings")
    return BaseConfig(file, arch, names, n_head, n_head_kv, _int(cfg, "num_hidden_layers", file),
                      tied if isinstance(tied, bool) else None, _int(cfg, "hidden_size", file),
                      _int(cfg, "intermediate_size", file), _int(cfg, "vocab_size", file),
                      model_type if isinstance(model_type, str) else None)


def _llama_cpp_arch(model_type: str | None) -> str | None:
    """The llama.cpp architecture a config's model_type names, where it names one (`qwen3_moe` -> `qwen3moe`,
    `phi3`), else None: a LoRA for it must carry that general.architecture."""
    if model_type is None or model_type == "mistral3":  # Mistral Small 3.x text models were converted as 'llama'
        return None
    try:
        names = set(gguf_module().MODEL_ARCH_NAMES.values())
    except (UnsupportedError, AttributeError):
        return None
    return next((n for n in (model_type, model_type.replace("_", ""), model_type.replace("_", "-")) if n in names),
                None)


def choose_arch(arch: str | None, base: BaseConfig | None) -> str:
    """The --arch choice: `arch` when given (checked against the config's), else the config's."""
    choices = ", ".join(ARCHS)
    if arch is not None:
        if check_text(arch, "arch", ARCHS) not in ARCHS:
            raise LorafuseValueError(f"arch must be one of {choices}, got {arch!r}")
        if base is not None and base.arch is not None and ARCHS[base.arch].gguf != ARCHS[arch].gguf:
            raise LorafuseValueError(f"--arch {arch} (Python: arch={arch!r}) does not match {base.path} ({base.names}: "
                                     f"{base.arch}); "
                                     "llama.cpp refuses a LoRA whose architecture is not the model's")
        other = _llama_cpp_arch(base.model_type) if base is not None and base.arch is None else None
        if base is not None and other is not None and other != ARCHS[arch].gguf:
            raise LorafuseValueError(f"--arch {arch} (Python: arch={arch!r}) does not match {base.path} ({base.names}: "
                                     f"llama.cpp's {other!r} architecture, which lorafuse does not export to GGUF); "
                                     "llama.cpp refuses a LoRA whose architecture is not the model's")
        return arch
    if base is None:
        raise LorafuseValueError(f"GGUF export needs the base model's architecture: pass --arch ({choices}) or "
                                 "--base-config BASE/config.json (Python: arch= or base_config=; an adapter's "
                                 "base_model_name_or_path is a hub name, not read offline)")
    if base.arch is None:
        raise LorafuseValueError(f"{base.path}: {base.names} is not an architecture lorafuse exports to GGUF; pass "
                                 f"--arch ({choices}; Python: arch=) if the model is one of those")
    return base.arch


# ----------------------------------------------------------------------------- the plan


QType = Literal["F32", "F16", "BF16", "Q8_0"]


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of the file: its GGUF name, numpy-order shape and type."""

    name: str
    shape: tuple[int, ...]
    qtype: QType


@dataclass(frozen=True)
class GgufModule:
    """One adapter module and how it is written."""

    module: str  # the adapter's module name
    base: str  # the base tensor's GGUF name (`blk.0.attn_q.weight`)
    embedding: bool  # token_embd layout (lora_a transposed)
    fold: float  # multiplies lora_b: the module's scale over llama.cpp's alpha / r
    heads: int | None  # q / k rows permuted for these many heads (llama architecture)
    a: GgufTensor
    b: GgufTensor


@dataclass
class GgufPlan:
    """Everything about the output that is known before any factor is read."""

    arch: str  # the --arch choice
    gguf_arch: str  # general.architecture
    alpha: float  # adapter.lora.alpha
    gguf_type: str
    modules: list[GgufModule]
    folded: dict[str, float] = field(default_factory=dict)  # module -> factor folded into its lora_b
    fallback: list[str] = field(default_factory=list)  # Q8_0 tensors written F16 (rows not a multiple of 32)
    notes: list[str] = field(default_factory=list)
    base_config: Path | None = None  # the config.json read (an input: never written over)


def _listed(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _refuse(adapter: Adapter, names: list[str], what: str, why: str) -> UnsupportedError:
    return UnsupportedError(f"{adapter.label}: {plural(len(names), 'module', verb=('is', 'are'))} {what} "
                            f"({_listed(names)}): {why}; nothing was written")


def _vision(name: str) -> bool:
    """Whether a module (or full tensor) is in a multimodal model's vision tower / projector (_VISION_PARTS)."""
    parts = name.split(".", 2)
    return parts[0] in _VISION_PARTS or (len(parts) > 1 and parts[0] == "model" and parts[1] in _VISION_PARTS)


def _leave_out_vision(adapter: Adapter, notes: list[str]) -> set[str]:
    """The vision-tower / projector modules, left out with a note as llama.cpp's converter leaves them out (the
    text model's modules are written as they are); UnsupportedError when nothing else is left."""
    vision = sorted(n for n in adapter.updates if _vision(n))
    if not vision:
        return set()
    if len(vision) == len(adapter.updates):
        raise UnsupportedError(f"{adapter.label}: no LoRA module to write: its {plural(len(vision), 'module')} "
                               f"({_listed(vision)}) {'is' if len(vision) == 1 else 'are'} in the vision tower / "
                               f"multimodal projector, and {_VISION_NOTE}; nothing was written")
    notes.append(f"left out {plural(len(vision), 'vision-tower / projector module')} ({_listed(vision)}), as "
                 f"llama.cpp's converter does: {_VISION_NOTE}; the GGUF holds the text model's modules, whose "
                 "deltas are the adapter's")
    return set(vision)


def _plain_loras(adapter: Adapter, skip: set[str] | frozenset[str] = frozenset()) -> dict[str, LoraUpdate]:
    """The adapter's modules but `skip` as plain LoRA, or UnsupportedError naming those llama.cpp cannot apply."""
    kinds: dict[str, list[str]] = {}
    for name, u in adapter.updates.items():
        if name in skip:
            continue
        if isinstance(u, ParamLoraUpdate):
            kind = "param"
        elif not isinstance(u, LoraUpdate):
            kind = "lycoris"
        elif u.magnitude is not None:
            kind = "dora"
        elif u.bias is not None:
            kind = "bias"
        elif u.kind == "conv" or len(u.A.shape) != 2 or isinstance(u.A, TuckerFactor):
            kind = "conv"
        else:
            continue
        kinds.setdefault(kind, []).append(name)
    reasons = {
        "lycoris": ("LoHa / LoKr", "a GGUF LoRA holds low-rank factors only: pass --rank K (Python: rank=K) to "
                                   "write their best rank-K LoRA"),
        "param": ("LoRA on parameters (target_parameters, MoE experts)",
                  "llama.cpp's converter has no LoRA form for expert tensors"),
        "dora": ("DoRA (lora_magnitude_vector)", "llama.cpp adds scale * B @ A @ x and has no magnitude; merge the "
                                                "adapter into the base instead (lorafuse apply)"),
        "bias": ("LoRA with a lora_B bias (lora_bias)", "llama.cpp's LoRA adapters have no bias"),
        "conv": ("convolution LoRA", "llama.cpp applies LoRA to matrices only"),
    }
    for kind, names in kinds.items():
        what, why = reasons[kind]
        raise _refuse(adapter, names, what, why)
    return {n: _linear_layout(u) for n, u in adapter.updates.items() if isinstance(u, LoraUpdate) and n not in skip}


def _linear_layout(u: LoraUpdate) -> LoraUpdate:
    """The update as PEFT applies it to a torch Linear layer: PEFT ignores fan_in_fan_out=true there (it resets the
    flag, with a warning), and every architecture llama.cpp's LoRA converter maps is made of Linear layers, none
    of transformers' Conv1D (GPT-2)."""
    return dataclasses.replace(u, transposed=False) if u.transposed and u.kind == "linear" else u


# The base's sizes (config.json) each module's delta must have, by the module's last name: (rows, columns).
_SIZES: dict[str, tuple[str | None, str | None]] = {
    "q_proj": (None, "hidden"), "k_proj": (None, "hidden"), "v_proj": (None, "hidden"), "o_proj": ("hidden", None),
    "gate_proj": ("intermediate", "hidden"), "up_proj": ("intermediate", "hidden"),
    "down_proj": ("hidden", "intermediate"), "embed_tokens": ("vocab", "hidden"), "lm_head": ("vocab", "hidden"),
    "qkv_proj": (None, "hidden"), "gate_up_proj": (None, "hidden"),  # Phi-3's fused layers
}
_SIZE_KEYS = {"hidden": "hidden_size", "intermediate": "intermediate_size", "vocab": "vocab_size"}


def _check_sizes(adapter: Adapter, loras: Mapping[str, LoraUpdate], base: BaseConfig) -> None:
    """Refuse a module whose delta does not have the base's sizes (hidden_size, intermediate_size, vocab_size of
    its config.json): llama.cpp refuses such a LoRA when it loads it."""
    for n, u in loras.items():
        rule = _SIZES.get(n.rsplit(".", 1)[-1])
        if rule is None:
            continue
        shape = (int(u.delta_shape[0]), int(np.prod(u.delta_shape[1:])))  # as the base weight: out x in
        for side, (size, got) in enumerate(zip(rule, shape)):
            if size is None:
                continue
            want = getattr(base, size)
            if want is not None and got != want:
                raise ShapeMismatchError(
                    f"{adapter.label}: module {n!r} has a delta of shape {shape} ({'rows' if side == 0 else 'columns'}"
                    f" {got}), but the base's {_SIZE_KEYS[size]} is {want} ({base.path}): the adapter was not made "
                    "for this base; nothing was written")


def _full_tensors(adapter: Adapter, notes: list[str]) -> None:
    """PEFT's saved copies of a LoRA'd embedding / lm_head base weight (`X.base_layer.weight`) are left out,
    as llama.cpp's converter leaves them out; any other full tensor (modules_to_save, a bias that adapter_config
    bias='all' / 'lora_only' saves, `X.base_layer.bias` included) is refused."""
    vision = [k for k in adapter.full if _vision(k)]
    copies = [k for k in adapter.full if full_kind(adapter.config, adapter.full_origin.get(k, "")) == "base copy"
              and k not in vision]
    others = [k for k in adapter.full if k not in copies and k not in vision]
    if others:
        kinds = full_kinds_text(adapter.config, [adapter.full_origin.get(k, k) for k in others])
        raise UnsupportedError(f"{adapter.label}: full tensors ({_listed(sorted(others))}, {kinds}) cannot "
                               "go into a GGUF LoRA, which holds lora_a / lora_b pairs only (llama.cpp's loader "
                               "refuses other tensors); merge the adapter into the base instead (lorafuse apply); "
                               "nothing was written")
    if copies:
        notes.append(f"left out {plural(len(copies), 'saved base weight')} of LoRA'd layers "
                     f"({_listed([adapter.full_origin[k] for k in copies])}), as llama.cpp's converter does: they "
                     "matter only when the vocabulary was resized, and then the GGUF base must be converted from "
                     "the resized model")
    if vision:
        notes.append(f"left out {plural(len(vision), 'full tensor')} of the vision tower / projector "
                     f"({_listed(sorted(vision))}), as llama.cpp's converter does: {_VISION_NOTE}")


def _tensor_map(gguf: ModuleType, gguf_arch: str, n_blocks: int) -> Any:
    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    return gguf.get_tensor_name_map(by_name[gguf_arch], n_blocks)


def _block_count(names: Sequence[str]) -> int:
    """One more than the largest layer index in the module names (`...layers.N...`)."""
    top = -1
    for n in names:
        parts = n.split(".")
        for i, p in enumerate(parts[1:], 1):
            if p.isdecimal() and parts[i - 1] in ("layers", "h", "blocks", "layer"):
                top = max(top, int(p))
    return top + 1


def _hf_name(module: str) -> str:
    for prefix, replace in _LM_PREFIXES:
        if module.startswith(prefix):
            return replace + module[len(prefix):]
    return module


def _choose_alpha(adapter: Adapter, loras: Mapping[str, LoraUpdate]) -> float:
    """The one alpha of the file: the alpha (scale * r) most modules have, preferring the config's
    lora_alpha on a tie, so that as few modules as possible need a folded factor."""
    alphas = [u.scale * u.rank for u in loras.values()]
    groups: list[tuple[float, int]] = []
    for a in alphas:
        for i, (g, n) in enumerate(groups):
            if math.isclose(a, g, rel_tol=1e-9, abs_tol=0.0):
                groups[i] = (g, n + 1)
                break
        else:
            groups.append((a, 1))
    best = max(n for _, n in groups)
    stated = adapter.config.get("lora_alpha")
    for g, n in groups:
        if n == best and isinstance(stated, (int, float)) and math.isclose(g, float(stated), rel_tol=1e-9):
            return float(stated)
    return next(g for g, n in groups if n == best)


def _file_alpha(adapter: Adapter, loras: Mapping[str, LoraUpdate], notes: list[str]) -> tuple[float, bool]:
    """The file's alpha (adapter.lora.alpha, a FLOAT32) and whether it is not the adapter's: _choose_alpha's
    when it is 0 (llama.cpp's scale 1) or a float32 with which llama.cpp's alpha / r, a float32 too, is a normal
    value for every rank of the file; else the power of two nearest to it in that range (with a note), the
    rest of every module's scale folded into its lora_b as rank / alpha patterns are."""
    odd = [n for n, u in loras.items() if not math.isfinite(u.scale)]
    if odd:
        raise LorafuseValueError(f"{adapter.label}: {plural(len(odd), 'module')} {'has' if len(odd) == 1 else 'have'} "
                                 f"a scale that is not finite ({_listed(odd)}); nothing was written")
    alpha = _choose_alpha(adapter, loras)
    smallest = 2.0 ** math.ceil(math.log2(_F32_TINY * max(u.rank for u in loras.values())))
    if alpha == 0 or smallest <= abs(alpha) <= FLOAT32_MAX:
        return alpha, False
    written = math.copysign(smallest if abs(alpha) < smallest else 2.0 ** 127, alpha)  # 2^127: float32's largest
    notes.append(f"the adapter's alpha {alpha:g} is beyond float32's range (adapter.lora.alpha is a FLOAT32, and "
                 f"llama.cpp computes alpha / r in float32): the file's alpha is {written:g} "
                 f"(2^{round(math.log2(abs(written)))}), and the rest of the modules' scales is folded into lora_b")
    return written, True


def _fold(adapter: Adapter, name: str, u: LoraUpdate, alpha: float) -> float:
    """What multiplies the module's lora_b: its scale over llama.cpp's alpha / r (1.0 within float32's rounding
    of the alpha, as in the converter)."""
    gguf_scale = float(np.float32(alpha)) / u.rank if alpha != 0 else 1.0  # _file_alpha: a normal float32
    fold = u.scale / gguf_scale
    if not math.isfinite(fold) or (fold == 0) != (u.scale == 0):
        raise LorafuseValueError(f"{adapter.label}: module {name!r}: its scale {u.scale:g} over llama.cpp's "
                                 f"alpha / r ({alpha:g} / {u.rank}) is beyond float64's range; nothing was written")
    if math.isclose(fold, 1.0, rel_tol=1e-7, abs_tol=0.0):
        return 1.0
    return fold


def _qtype(gguf_type: str, shape: tuple[int, ...], name: str, fallback: list[str]) -> QType:
    if gguf_type == "q8_0":
        if shape[-1] % _Q8_BLOCK == 0:
            return "Q8_0"
        fallback.append(name)
        return "F16"
    return "F32" if gguf_type == "f32" else "F16" if gguf_type == "f16" else "BF16"


def plan_gguf(adapter: Adapter, arch: str | None = None, base_config: str | os.PathLike[str] | None = None,
              gguf_type: str = DEFAULT_TYPE) -> GgufPlan:
    """What `write_gguf` writes for `adapter`, every refusal made here, before any factor is read."""
    gguf = gguf_module()
    if check_text(gguf_type, "gguf_type", GGUF_TYPES) not in GGUF_TYPES:
        raise LorafuseValueError(f"gguf_type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    base = read_base_config(base_config) if base_config is not None else None
    choice = choose_arch(arch, base)
    rule = ARCHS[choice]
    notes: list[str] = []
    loras = _plain_loras(adapter, _leave_out_vision(adapter, notes))
    if not loras:
        raise UnsupportedError(f"{adapter.label}: no LoRA module to write")
    _full_tensors(adapter, notes)
    hf = {n: _hf_name(n) for n in loras}
    heads_dropped = [n for n, h in hf.items() if h == "lm_head"]
    if heads_dropped and rule.lm_head is not None:  # the architecture has no output tensor to map it to
        raise _refuse(adapter, heads_dropped, "an lm_head LoRA", rule.lm_head)
    n_blocks = base.n_layers if base is not None and base.n_layers is not None else _block_count(list(hf.values()))
    tmap = _tensor_map(gguf, rule.gguf, n_blocks)
    mapped: dict[str, str] = {}
    unmapped: list[str] = []
    for n, h in hf.items():
        gname = tmap.get_name(h + ".weight", try_suffixes=(".weight",))
        if gname is None:
            unmapped.append(n)
        else:
            mapped[n] = gname
    experts = expert_modules(unmapped)  # per-expert Linear layers (Mixtral's experts.<e>.w1, Qwen-MoE's ...)
    if experts:
        raise _refuse(adapter, experts, "LoRA on MoE experts (per-expert layers)",
                      "llama.cpp stores a layer's experts stacked in one tensor (ffn_gate_exps, ffn_up_exps, "
                      "ffn_down_exps), and lorafuse does not write stacked expert LoRAs; merge the adapter into the "
                      "base instead (lorafuse apply), or train the LoRA on the attention layers")
    if unmapped:
        shown = ", ".join(f"{n!r} {tuple(loras[n].delta_shape)}" for n in unmapped[:5])
        more = f" and {len(unmapped) - 5} more" if len(unmapped) > 5 else ""
        layers = f" of {n_blocks} layers ({base.path})" if base is not None and base.n_layers is not None else ""
        outside = [n for n in unmapped if not hf[n].startswith("model.layers.")]
        hint = ("--arch, Python: arch=, names another architecture" if not outside else
                f"{_listed(outside, 3)} {'is' if len(outside) == 1 else 'are'} outside the text model's layers: "
                "llama.cpp applies --lora to the text model's tensors only (a multimodal model's vision tower and "
                "projector are in its separate mmproj file); or --arch, Python: arch=, names another architecture")
        raise MissingModuleError(f"{adapter.label}: {plural(len(unmapped), 'module', verb=('has', 'have'))} no "
                                 f"tensor in llama.cpp's {rule.gguf!r} architecture{layers}: {shown}{more}; nothing "
                                 f"was written ({hint})")
    seen: dict[str, str] = {}
    for n, g in mapped.items():
        if g in seen:
            raise FormatError(f"{adapter.label}: modules {seen[g]!r} and {n!r} both are llama.cpp's {g!r}")
        seen[g] = n
    if base is not None:  # the text model's modules only: a module without a tensor there was refused above
        _check_sizes(adapter, loras, base)
    output = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"
    token_embd = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
    heads_out = [n for n, g in mapped.items() if g == output]
    if heads_out:
        # as the base's config states it; a config without the key has its class's default
        tied = None if base is None else base.tied if base.tied is not None else rule.tied_default
        if tied:
            raise _refuse(adapter, heads_out, "an lm_head LoRA",
                          f"{base.path if base else 'the base'} ties lm_head to the token embedding "
                          "(tie_word_embeddings), so its GGUF has no output tensor and llama.cpp refuses a LoRA on "
                          "'output.weight' ('does not exist in base model')")
        if tied is None:
            notes.append(f"lm_head is written as {output!r}: llama.cpp loads it only with a base GGUF that has its "
                         "own output tensor (tie_word_embeddings false); give --base-config (Python: base_config=) to "
                         "have this checked")
    embeds = [n for n, u in loras.items() if u.kind == "embedding" or mapped[n] == token_embd]
    if embeds and rule.embeddings is not None:
        raise _refuse(adapter, embeds, "an embedding LoRA", rule.embeddings)
    if embeds and base is None:
        raise LorafuseValueError(f"{adapter.label}: {_listed(embeds)}: an embedding LoRA needs --base-config "
                                 "BASE/config.json (Python: base_config=), to know whether the base ties lm_head to "
                                 "the embedding: if it "
                                 f"does, {_TIED_EMBED}")
    if embeds and base is not None and (base.tied if base.tied is not None else rule.tied_default):
        raise _refuse(adapter, embeds, "an embedding LoRA",
                      f"{base.path} ties lm_head to the token embedding (tie_word_embeddings): {_TIED_EMBED}")
    odd = [n for n in embeds if not (loras[n].kind == "embedding" and mapped[n] == token_embd)]
    if odd:
        raise _refuse(adapter, odd, "an embedding-shaped LoRA on another tensor, or a Linear LoRA on the "
                      "token embedding", "llama.cpp reads token_embd's LoRA as PEFT's lora_embedding_A / _B")
    alpha, rechosen = _file_alpha(adapter, loras, notes)
    fallback: list[str] = []
    modules: list[GgufModule] = []
    folded: dict[str, float] = {}
    need_heads: list[str] = []
    for n, u in loras.items():
        g = mapped[n]
        emb = u.kind == "embedding"
        rows, cols = u.delta_shape[0], int(np.prod(u.delta_shape[1:]))
        r = u.rank
        a_shape, b_shape = ((rows, r), (cols, r)) if emb else ((r, cols), (rows, r))
        fold = _fold(adapter, n, u, alpha)
        if fold != 1.0:
            folded[n] = fold
        heads = None
        if rule.permute_qk and not emb and _is_qk(hf[n]):
            heads = _qk_heads(hf[n], base)
            if heads is None:
                need_heads.append(n)
            elif rows % (2 * heads):
                raise ShapeMismatchError(f"{adapter.label}: module {n!r} has {rows} output rows, not a multiple of 2 "
                                         f"x {heads} heads ({base.path if base is not None else 'config'})")
        a_name, b_name = g + ".lora_a", g + ".lora_b"
        modules.append(GgufModule(n, g, emb, fold, heads,
                                  GgufTensor(a_name, a_shape, _qtype(gguf_type, a_shape, a_name, fallback)),
                                  GgufTensor(b_name, b_shape, _qtype(gguf_type, b_shape, b_name, fallback))))
    if need_heads:
        _refuse_headless(adapter, need_heads, rule.gguf, base)
    if folded:
        notes.append(_folded_note(folded, alpha, rechosen))
    card = gguf.GGUFWriter(os.devnull, rule.gguf)  # the model card refused before anything is written
    try:
        _model_card(gguf, card, adapter, "adapter", 0, check=True)
    finally:
        card.close()
    if fallback:
        lengths = sorted({t.shape[-1] for m in modules for t in (m.a, m.b) if t.qtype == "F16"})
        widths = plural(lengths[0], "element") if len(lengths) == 1 else f"{', '.join(map(str, lengths))} elements"
        notes.append(f"{plural(len(fallback), 'tensor')} written F16, not Q8_0, as llama.cpp's converter does: "
                     f"their rows ({widths}) are not a multiple of {_Q8_BLOCK} ({_listed(fallback, 3)})")
    return GgufPlan(choice, rule.gguf, alpha, gguf_type, modules, folded, fallback, notes,
                    base.path if base is not None else None)


def _folded_note(folded: Mapping[str, float], alpha: float, rechosen: bool) -> str:
    """The note on the modules whose scale is folded into lora_b, with the reason their scale differs."""
    if alpha == 0:  # lora_alpha 0: llama.cpp's scale is then 1 (a module of scale 0 gets lora_b as zeros)
        why = " 0 (llama.cpp reads it as a scale of 1)"
    elif rechosen:
        why = f" {alpha:g}"
    else:
        why = f" {alpha:g} (rank_pattern / alpha_pattern / rsLoRA)"
    n = len(folded)
    return (f"{plural(n, 'module')} {'has' if n == 1 else 'have'} a scale other than alpha / r with the file's one "
            f"alpha{why}: their scale / (alpha / r) is folded into lora_b, exactly ({_listed(list(folded))})")


def _refuse_headless(adapter: Adapter, modules: list[str], arch: str, base: BaseConfig | None) -> NoReturn:
    """q_proj / k_proj modules whose rows cannot be permuted: no --base-config, or one without the head counts
    (named, with the keys it lacks)."""
    why = (f"{adapter.label}: {_listed(modules)}: llama.cpp's converter permutes the rows of q_proj / k_proj for "
           f"{arch} models, which needs the head counts")
    if base is None:
        raise LorafuseValueError(f"{why}: pass --base-config BASE/config.json (Python: base_config=; "
                                 "num_attention_heads, num_key_value_heads)")
    missing = [k for k, v in (("num_attention_heads", base.n_head), ("num_key_value_heads", base.n_head_kv))
               if v is None]
    raise FormatError(f"{why}, and the base config {base.path} has no {' and no '.join(missing)} (nor in a "
                      "text_config): give the base model's own config.json, which states them")


def _is_qk(hf_name: str) -> bool:
    return hf_name.rsplit(".", 1)[-1] in ("q_proj", "k_proj")


def _qk_heads(hf_name: str, base: BaseConfig | None) -> int | None:
    """The head count LlamaModel.permute uses for a q_proj / k_proj module (None: unknown)."""
    if base is None:
        return None
    return base.n_head if hf_name.endswith("q_proj") else base.n_head_kv


# ----------------------------------------------------------------------------- writing


def _permute_rows(b: np.ndarray, heads: int) -> np.ndarray:
    """LlamaModel.permute on the rows of lora_b: per head, the two halves of the rotary dimensions interleaved."""
    rows = b.shape[0]
    return np.ascontiguousarray(b.reshape(heads, 2, rows // heads // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape))


def _stored_names(m: GgufModule, u: LoraUpdate) -> tuple[str, str]:
    """The adapter's names of the factors written as lora_a and lora_b (for messages)."""
    if m.embedding:
        return "lora_embedding_A", "lora_embedding_B"
    return ("lora_B", "lora_A") if u.transposed else ("lora_A", "lora_B")


def module_arrays(m: GgufModule, u: LoraUpdate, threads: int = 0, label: str = "") -> tuple[np.ndarray, np.ndarray]:
    """lora_a and lora_b of a module as float32, in the GGUF file's numpy orientation, before rounding to
    their types: the module's fold in lora_b and, where a factor would not fit its type (_balanced), both
    rescaled by a power of two. NonFiniteError for a factor holding NaN or Inf (`label`: the adapter)."""
    b_c, a_c = u.factors(threads)  # the base weight's layout: delta = scale * b_c @ a_c
    if m.embedding:  # base weight (vocab x dim): lora_a = A^T (vocab x r), lora_b = B (dim x r)
        a, b = b_c, np.ascontiguousarray(a_c.T)
    else:
        a, b = a_c, b_c
    where = f"{label or '<adapter>'}: module {m.module!r}"
    for x, t, stored in zip((a, b), (m.a, m.b), _stored_names(m, u)):
        if not np.isfinite(x).all():
            raise NonFiniteError(f"{where}: its {stored} (GGUF tensor {t.name!r}) holds NaN or Inf; nothing was "
                                 "written")
    a, b = _balanced(a, b, m, where)
    if m.heads is not None:
        b = _permute_rows(b, m.heads)
    return a, b


_NO_LIMIT = 1 << 30  # a bound on k that no factor sets


def _shifts(x: float, lo: float, hi: float) -> tuple[int, int] | None:
    """(k_min, k_max): the integers k with lo <= x * 2^k <= hi (x >= 0 finite; None for x = 0: any k)."""
    if x == 0:
        return None
    k_min, k_max = math.ceil(math.log2(lo / x)), math.floor(math.log2(hi / x))
    while math.ldexp(x, k_min) < lo:  # log2's rounding; ldexp is exact here (x 2^k near lo or hi)
        k_min += 1
    while math.ldexp(x, k_min - 1) >= lo:
        k_min -= 1
    while math.ldexp(x, k_max) > hi:
        k_max -= 1
    while math.ldexp(x, k_max + 1) <= hi:
        k_max += 1
    return k_min, k_max


def _magnitude(log2: float) -> str:
    return f"{2.0 ** log2:.3g}" if abs(log2) < 1000 else f"about 1e{round(log2 * math.log10(2))}"


def _balanced(a: np.ndarray, b: np.ndarray, m: GgufModule, where: str) -> tuple[np.ndarray, np.ndarray]:
    """lora_a (a) and lora_b (b, times the module's fold) as float32 that their GGUF types hold without overflow
    and at full precision (_RANGES: each tensor's largest |value|), the delta unchanged: a times 2^k and b times
    fold / 2^k for an integer k, 0 where that fits (the converter's values; float32 kept as it is), else k that
    leaves both as far inside their ranges. No such k: NonFiniteError (the product is beyond the types' range)
    or LorafuseValueError (below it: the values would round to zero), naming the module and the tensors."""
    fold = m.fold
    if fold == 1.0 and m.a.qtype == m.b.qtype == "F32":
        return a, b  # float32 in, float32 out: exact
    if fold == 0.0:
        return a, np.zeros_like(b)
    (lo_a, hi_a), (lo_b, hi_b) = _RANGES[m.a.qtype], _RANGES[m.b.qtype]
    f_m, f_e = math.frexp(fold)  # fold = f_m 2^f_e: b's values are b f_m 2^(f_e - k)
    b64 = b.astype(np.float64) * f_m
    ma, mb = float(np.abs(a).max(initial=0.0)), float(np.abs(b64).max(initial=0.0))
    ka, jb = _shifts(ma, lo_a, hi_a), _shifts(mb, lo_b, hi_b)
    k_min = max(ka[0] if ka else -_NO_LIMIT, f_e - jb[1] if jb else -_NO_LIMIT)
    k_max = min(ka[1] if ka else _NO_LIMIT, f_e - jb[0] if jb else _NO_LIMIT)
    if k_min > k_max:
        assert ka is not None and jb is not None
        misfits = [t.name for t, ok in ((m.a, ka[0] <= 0 <= ka[1]), (m.b, jb[0] <= f_e <= jb[1])) if not ok]
        types = m.a.qtype if m.a.qtype == m.b.qtype else f"{m.a.qtype} / {m.b.qtype}"
        log2_b = math.log2(mb) + f_e
        sizes = (f"|lora_a| up to {_magnitude(math.log2(ma))}, |lora_b| up to {_magnitude(log2_b)} with the module's "
                 f"scale folded in: products up to {_magnitude(math.log2(ma) + log2_b)}")
        hint = "; --gguf-type f32 or bf16 (Python: gguf_type=) keep float32's range" \
            if {m.a.qtype, m.b.qtype} & {"F16", "Q8_0"} else ""
        if ka[1] < f_e - jb[1]:  # no k keeps both at most their largest
            raise NonFiniteError(f"{where}: {' and '.join(misfits)} would not be finite as {types} ({sizes}, beyond "
                                 f"what two {types} factors hold even rescaled by a power of two: each at most "
                                 f"{max(hi_a, hi_b):g}); nothing was written{hint}")
        raise UnsupportedError(f"{where}: {' and '.join(misfits)} would round to zero as {types} ({sizes}, below "
                                 f"what two {types} factors hold at full precision even rescaled by a power of two: "
                                 f"each at least {min(lo_a, lo_b):g}); nothing was written{hint}")
    if k_min <= 0 <= k_max:
        k = 0
    else:  # as far inside both ranges (in powers of two from their middles) as the product allows
        mid_a, mid_b = math.log2(lo_a * hi_a) / 2, math.log2(lo_b * hi_b) / 2
        if ka is None and jb is None:
            k = 0
        elif jb is None:
            k = round(mid_a - math.log2(ma))
        elif ka is None:
            k = f_e - round(mid_b - math.log2(mb))
        else:
            k = round((math.log2(mb) + f_e - mid_b - math.log2(ma) + mid_a) / 2)
        k = min(max(k, k_min), k_max)
    if k == 0 and fold == 1.0:
        return a, b
    with np.errstate(under="ignore"):  # values far below the largest: rounded as the type rounds them
        a_out = a if k == 0 else np.ldexp(a, k).astype(np.float32)
        b_out = np.ldexp(b64, f_e - k).astype(np.float32)
    return a_out, b_out


def _encode(gguf: ModuleType, x: np.ndarray, t: GgufTensor, where: str) -> np.ndarray:
    """`x` as the tensor's type (gguf's quantize); NonFiniteError if a value is not finite there (_balanced
    keeps them within range: a guard)."""
    qtype = getattr(gguf.GGMLQuantizationType, t.qtype)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if t.qtype == "Q8_0":
        # a block of values so small that its scale d (an F16) is 0 is 0: written so (gguf's 1 / d overflows)
        blocks = x.reshape(-1, _Q8_BLOCK)
        tiny = np.abs(blocks).max(axis=1) < 2.0 ** -100
        if tiny.any():
            x = np.where(tiny[:, None], np.float32(0), blocks).reshape(x.shape)
    with np.errstate(under="ignore"):
        data = np.ascontiguousarray(gguf.quants.quantize(x, qtype))
    if t.qtype == "F32" or t.qtype == "F16":
        finite = bool(np.isfinite(data).all())
    elif t.qtype == "BF16":
        finite = bool(((data.view(np.uint16) & 0x7F80) != 0x7F80).all())
    else:  # Q8_0 blocks: d (F16), then 32 int8
        finite = bool(np.isfinite(data.reshape(-1, 2 + _Q8_BLOCK)[:, :2].copy().view(np.float16)).all())
    if not finite:
        raise NonFiniteError(f"{where}: {t.name} is not finite as {t.qtype}; nothing was written")
    return data


def _info_of(gguf: ModuleType, t: GgufTensor) -> tuple[tuple[int, ...], Any, int]:
    """(shape as add_tensor_info takes it, numpy dtype, bytes) of a tensor of the plan."""
    if t.qtype == "F32":
        return t.shape, np.dtype(np.float32), 4 * int(np.prod(t.shape))
    if t.qtype == "F16":
        return t.shape, np.dtype(np.float16), 2 * int(np.prod(t.shape))
    qtype = getattr(gguf.GGMLQuantizationType, t.qtype)
    byte_shape = tuple(gguf.quant_shape_to_byte_shape(t.shape, qtype))
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


def write_gguf(adapter: Adapter, plan: GgufPlan, out: str | os.PathLike[str], inputs: Sequence[Path] = (),
               overwrite: bool = False, threads: int = 0) -> Path:
    """Write the plan's GGUF LoRA to `out` (atomically, io.atomic), one module at a time: the header and
    tensor table first (every shape is known), then each module's lora_a and lora_b."""
    gguf = gguf_module()
    out = Path(out)
    loras = {m.module: _linear_layout(u) if isinstance(u := adapter.updates[m.module], LoraUpdate) else u
             for m in plan.modules}
    with atomic_file(out, inputs, overwrite=overwrite, kind=ADAPTER) as tmp:
        w = gguf.GGUFWriter(tmp, plan.gguf_arch)
        done = False
        try:
            for m in plan.modules:
                for t in (m.a, m.b):
                    shape, dtype, nbytes = _info_of(gguf, t)
                    w.add_tensor_info(t.name, shape, dtype, nbytes,
                                      raw_dtype=getattr(gguf.GGMLQuantizationType, t.qtype))
            _metadata(gguf, w, adapter, plan, out)
            w.write_header_to_file(tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for m in plan.modules:
                u = loras[m.module]
                assert isinstance(u, LoraUpdate)
                a, b = module_arrays(m, u, threads, adapter.label)
                for x, t in ((a, m.a), (b, m.b)):
                    if x.shape != t.shape:
                        raise ShapeMismatchError(f"{adapter.label}: module {m.module!r}: {t.name} is {x.shape}, the "
                                                 f"plan says {t.shape}")
                    try:
                        w.write_tensor_data(_encode(gguf, x, t, f"{adapter.label}: module {m.module!r}"))
                    except OSError as e:
                        if e.errno is not None:  # io.atomic names the output and the reason
                            raise
                        # numpy's tofile reports a short write ("N requested and M written") without an errno
                        raise OutputError(f"cannot write the output {out}: {e} (the disk is full, or a file size "
                                          "limit was reached); the temporary output was removed and "
                                          f"{f'{out} is unchanged' if out.exists() else 'nothing was written'}"
                                          ) from None
            w.fout[0].flush()
            expected = w.fout[0].tell()  # where the writes say the file ends
            done = True
        finally:
            try:
                w.close()
            except OSError:
                if done:  # else the error that stopped the writing is the one to report
                    raise
        # numpy's tofile writes through its own FILE* and can lose a failed write (ENOSPC, EFBIG) without a word:
        # the file must be as long as the writes claim
        size = os.stat(tmp).st_size
        if size != expected:
            raise OutputError(f"cannot write the output {out}: {size} of its {expected} bytes reached the disk (the "
                              "disk is full, or a file size limit was reached); the temporary output was removed and "
                              f"{f'{out} is unchanged' if out.exists() else 'nothing was written'}")
    return out


def _metadata(gguf: ModuleType, w: Any, adapter: Adapter, plan: GgufPlan, out: Path) -> None:
    """The keys convert_lora_to_gguf.py writes, in its order: general.type, adapter.type, what gguf's
    Metadata finds in the adapter folder (general.name, model card keys), adapter.lora.alpha,
    general.quantization_version; then `lorafuse_version` (io.manifest's mark: llama.cpp lists it and
    ignores it)."""
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    _model_card(gguf, w, adapter, out.stem, w.get_total_parameter_count()[0])
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, plan.alpha)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_string(MARKER_KEY, version())  # the one key the converter does not write: lorafuse's output mark


def _model_card(gguf: ModuleType, w: Any, adapter: Adapter, stem: str, total: int, check: bool = False) -> None:
    """What gguf's Metadata finds in the adapter folder (its README model card, its name), added to the writer `w`
    (`check`, plan_gguf: `w` writes to os.devnull, and its keys are written there, to refuse the card before
    anything is written); FormatError naming the card where gguf cannot read it or write it (a front matter value
    of another type than gguf expects: the converter would stop there too)."""
    folder = adapter.path if adapter.path is not None and adapter.path.is_dir() else \
        (adapter.path.parent if adapter.path is not None else None)
    try:
        meta = gguf.Metadata.load(None, folder, None, total)
        if meta.name is None:
            meta.name = (folder.name if folder is not None else "") or stem
        # gguf writes strings as strict UTF-8: a name gguf took from a folder or file name that is not UTF-8 (its
        # undecodable bytes as lone surrogates) goes in with those bytes as \xNN, as lorafuse records such names
        for f in dataclasses.fields(meta):
            setattr(meta, f.name, _utf8(getattr(meta, f.name)))
        meta.set_gguf_meta_model(w)
        if check:
            w.write_header_to_file(os.devnull)
            w.write_kv_data_to_file()
    except Exception as e:  # a model card gguf cannot parse or write: the converter would stop; say what failed
        card = folder / "README.md" if folder is not None else "the adapter's model card"
        raise FormatError(f"{card}: gguf could not read the adapter's model card for the GGUF metadata: "
                          f"{type(e).__name__}: {' '.join(str(e).split())}; fix or remove its YAML front matter; "
                          "nothing was written") from None


def _utf8(value: object) -> object:
    """A metadata value with every string in it as UTF-8 can hold it (io.provenance.path_text: \\xNN)."""
    if isinstance(value, str):
        return path_text(value)
    if isinstance(value, list):
        return [_utf8(v) for v in value]
    if isinstance(value, dict):
        return {_utf8(k): _utf8(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------- reading (lorafuse info)

def is_gguf(path: Path) -> bool:
    """Whether `path` is a regular file that starts as a GGUF file does (a FIFO or a device is not opened: a
    FIFO's open would wait for a writer)."""
    try:
        if not path.is_file():
            return False
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except (OSError, ValueError):  # ValueError: a NUL in the path
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and os.read(fd, len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False
    finally:
        os.close(fd)


def _field(reader: Any, key: str) -> object:
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        value = f.contents()
    except Exception:  # a field of a type gguf's reader cannot decode  # noqa: BLE001
        return None
    return value if isinstance(value, str | int | float | list) else None


def describe_gguf(path: Path) -> dict[str, object]:
    """What `lorafuse info` says of a GGUF file: its kind (general.type: 'adapter' for a LoRA), architecture,
    LoRA alpha, tensor types, and for a LoRA each module's llama.cpp tensor, rank and shape (the base weight's,
    rows x columns). Read by gguf's own reader (lorafuse[gguf]); a file it cannot parse is a FormatError."""
    try:
        import gguf
    except ImportError:
        raise UnsupportedError(f"{path}: a GGUF file: reading it needs the gguf package (llama.cpp's gguf-py): "
                               "pip install 'lorafuse[gguf]'") from None
    try:  # the header's counts first (io.manifest.gguf_counts)
        counts = gguf_counts(path)
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None
    if counts is None:
        raise FormatError(f"{path}: not a GGUF file lorafuse reads (its 24-byte header is cut short)")
    version, n_tensors, n_kv = counts
    if version not in (2, 3) or n_kv > 1 << 16 or n_tensors > 1 << 24:
        raise FormatError(f"{path}: not a GGUF file lorafuse reads (version {version}, {n_tensors} tensors, {n_kv} "
                          "metadata keys; GGUF 2 and 3 with at most 2^24 tensors and 65536 keys)")
    try:
        problem = gguf_bounded(path)
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None
    if problem is not None:
        raise FormatError(f"{path}: a GGUF file whose header is damaged: {problem}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # a damaged or hostile file, whatever gguf's reader raises  # noqa: BLE001
        raise FormatError(f"{path}: a GGUF file that gguf's reader cannot parse ({type(e).__name__}: {e})") from None
    tensors = {t.name: t for t in reader.tensors}
    modules, notes = _gguf_modules(tensors)
    alpha = _field(reader, "adapter.lora.alpha")
    return {
        "type": "gguf",
        "path": path_text(path),
        "kind": _field(reader, "general.type"),
        "adapter_type": _field(reader, "adapter.type"),
        "architecture": _field(reader, "general.architecture"),
        "lora_alpha": alpha if isinstance(alpha, int | float) and not isinstance(alpha, bool) else None,
        "tensors": len(tensors),
        "tensor_types": dict(sorted(Counter(t.tensor_type.name for t in tensors.values()).items())),
        "modules": modules,
        "ranks": dict(sorted(Counter(m["rank"] for m in modules).items())),
        "written_by_lorafuse": made if isinstance(made := _field(reader, MARKER_KEY), str) else None,  # a version
        "notes": notes,
    }


def _gguf_modules(tensors: Mapping[str, Any]) -> tuple[list[dict[str, object]], list[str]]:
    """The LoRA pairs of a GGUF file (describe_gguf's "modules": name, rank, the base tensor's numpy-order shape,
    types; a stacked experts tensor (`ffn_gate_exps`, 3-D) as [experts, rows, columns]), and notes naming the
    tensors llama.cpp's loader would refuse: a half without the other, or halves whose shapes do not pair."""
    modules: list[dict[str, object]] = []
    odd: list[str] = []
    halves = {n[: -len(".lora_a")] for n in tensors if n.endswith(".lora_a")}
    halves |= {n[: -len(".lora_b")] for n in tensors if n.endswith(".lora_b")}
    lone = sorted(n for n in halves if n + ".lora_a" not in tensors or n + ".lora_b" not in tensors)
    for name in sorted(halves - set(lone)):
        a, b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        a_ne, b_ne = [int(x) for x in a.shape], [int(x) for x in b.shape]  # GGML order: ne[0] is the row length
        rank = b_ne[0] if b_ne else 0
        if len(a_ne) == len(b_ne) == 2 and a_ne[1] == rank:  # lora_a r x in, lora_b out x r
            shape = [b_ne[1], a_ne[0]]
        elif len(a_ne) == len(b_ne) == 2 and a_ne[0] == rank:  # token_embd: lora_a vocab x r, lora_b dim x r
            shape = [a_ne[1], b_ne[1]]
        elif len(a_ne) == len(b_ne) == 3 and a_ne[1] == rank and a_ne[2] == b_ne[2]:  # experts stacked
            shape = [a_ne[2], b_ne[1], a_ne[0]]
        else:
            odd.append(f"{name!r} (lora_a {tuple(reversed(a_ne))}, lora_b {tuple(reversed(b_ne))})")
            continue
        modules.append({"name": name, "rank": rank, "shape": shape,
                        "types": sorted({a.tensor_type.name, b.tensor_type.name})})
    notes: list[str] = []
    if lone:
        notes.append(f"{plural(len(lone), 'LoRA tensor')} without {'its' if len(lone) == 1 else 'their'} other half "
                     f"(.lora_a / .lora_b): {_listed(lone)}; llama.cpp refuses the file")
    if odd:
        notes.append(f"{plural(len(odd), 'LoRA pair')} whose lora_a and lora_b shapes (numpy order) do not pair "
                     f"as llama.cpp needs (lora_a r x in, lora_b out x r): {', '.join(odd[:5])}"
                     f"{f' and {len(odd) - 5} more' if len(odd) > 5 else ''}; llama.cpp refuses the file")
    return modules, notes


__all__ = ["ARCHS", "DEFAULT_TYPE", "GGUF_TYPES", "SUFFIX", "BaseConfig", "GgufModule", "GgufPlan",
           "GgufTensor", "choose_arch", "describe_gguf", "is_gguf", "module_arrays", "plan_gguf", "read_base_config",
           "write_gguf"]
