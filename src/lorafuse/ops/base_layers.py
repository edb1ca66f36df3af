"""What extract knows of the base model's layers beyond its tensor names: which modules are embeddings,
grouped convolutions or output heads, which output head reads (is tied to) the input embedding, and every
module name PEFT will see.

A checkpoint names its tensors only, and a 2-D `.weight` is a torch Linear or an Embedding (a T5
`relative_attention_bias`, a DeBERTa `rel_embeddings`: PEFT wraps them as embeddings, whose LoRA it stores
as lora_embedding_A / B), a 4-D one a dense or a grouped convolution. When the base has a config.json that
names its class (`architectures`) and transformers is importable, the class is built on the meta device (no
weight is read or allocated) and decides; else the name tables below do (transformers is optional).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

# Layers PEFT wraps as embeddings (torch Embedding: token, position and relative-position tables), by their last
# name, when the model class cannot say. A checkpoint names its tensors only.
EMBEDDING_NAMES = frozenset({
    "embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings",
    "embed_positions", "tok_embeddings", "token_embedding", "position_embedding", "embed_in", "shared",
    "relative_attention_bias",  # T5, mT5, UMT5, LongT5, Pix2Struct, Switch Transformers
    "rel_embeddings",  # DeBERTa-v2 / v3
})
# Output heads (torch Linear) that --embeddings also governs.
HEAD_NAMES = frozenset({"lm_head", "embed_out"})
# Embedding tables no output head is tied to (positions, token types, relative positions).
POSITION_TABLES = frozenset({"wpe", "position_embeddings", "position_embedding", "embed_positions",
                             "token_type_embeddings", "relative_attention_bias", "rel_embeddings"})


@dataclass(frozen=True)
class BaseLayers:
    """The base's layers as extract needs them (base_layers). `kinds` and `groups` are empty, and `modules`
    holds the checkpoint's module names alone, when no model class was built."""

    # module -> 'embedding', 'linear', 'conv', 'conv_transpose', 'other'
    kinds: Mapping[str, str] = field(default_factory=dict)
    groups: Mapping[str, int] = field(default_factory=dict)  # convolutions with groups > 1
    heads: frozenset[str] = HEAD_NAMES  # output heads: last names, and the class's output embedding
    # a module that reads an embedding's weight (tied: lm_head; T5's encoder.embed_tokens) -> that embedding
    ties: Mapping[str, str] = field(default_factory=dict)
    modules: frozenset[str] = frozenset()  # every module name PEFT sees (containers included)
    prefix: str = ""  # the class's base_model_prefix: a checkpoint of the bare model lacks it
    model_class: str | None = None  # the class that decided, None: the name tables

    def kind(self, module: str) -> str | None:
        """The layer type of `module` as the model class says, None when it does not know the name."""
        found = self.kinds.get(module)
        if found is None and self.prefix:
            found = self.kinds.get(f"{self.prefix}.{module}")
        return found

    def is_embedding(self, module: str) -> bool:
        """A torch Embedding: by the class, else by the last name (EMBEDDING_NAMES)."""
        kind = self.kind(module)
        return kind == "embedding" if kind is not None else module.rsplit(".", 1)[-1] in EMBEDDING_NAMES

    def is_head(self, module: str) -> bool:
        return module in self.heads or module.rsplit(".", 1)[-1] in self.heads

    def group_count(self, module: str) -> int:
        return self.groups.get(module) or self.groups.get(f"{self.prefix}.{module}", 1)


def checkpoint_modules(keys: Iterable[str]) -> set[str]:
    """Every module a checkpoint's tensor names imply: each key's owner and the containers above it."""
    found: set[str] = set()
    for key in keys:
        parts = key.split(".")[:-1]
        for i in range(1, len(parts) + 1):
            found.add(".".join(parts[:i]))
    return found


def peft_targets(chosen: Iterable[str], modules: Iterable[str]) -> list[str]:
    """target_modules that select exactly the `chosen` modules among the model's `modules` under PEFT's list
    matching (a module M is targeted when M == T or M ends with '.' + T): for each chosen module its shortest
    dotted tail that names no other module (a last name such as 'q_proj' where every q_proj is chosen,
    'to_out.0' where '0' would also select the container down_blocks.0, which PEFT cannot wrap), else its full
    name. A tail never starts with a number: `modules` read from a checkpoint lack the layers without weights
    (a Dropout at net.2 of one block, a Linear at net.2 of another)."""
    chosen = set(chosen)
    taken: set[str] = set()  # the tails of the modules that must not be selected
    for m in set(modules) - chosen:
        parts = m.split(".")
        taken.update(".".join(parts[i:]) for i in range(len(parts)))
    out: set[str] = set()
    for m in chosen:
        parts = m.split(".")
        tails = [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]  # shortest first
        out.add(next((t for t in tails if t not in taken and not t.split(".", 1)[0].isdigit()), m))
    return sorted(out)


# Decoder-only model types whose layers the name tables tell apart as the class would (every weight matrix a
# Linear but the input embeddings and the output head, which ops.apply_plan.tie_word_embeddings ties; no grouped
# convolution): their class is not built, which would import transformers (~3-4 s of a 2-core machine's time).
TABLE_MODEL_TYPES = frozenset((
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
    "phi", "phi3", "gpt2", "gpt_neox", "gptj", "falcon", "opt", "starcoder2", "olmo", "olmo2", "olmoe", "cohere",
    "stablelm", "granite", "deepseek_v2", "deepseek_v3", "internlm2", "exaone", "smollm3"))


def base_layers(config: Mapping[str, object], keys: Iterable[str], embeddings: Iterable[str]) -> BaseLayers:
    """The base's layers: from its model class (built on the meta device) when config.json names one that
    transformers has and its model_type is not one the tables know (TABLE_MODEL_TYPES), else from the name
    tables, with lm_head tied to the input embedding (`embeddings`: the checkpoint's modules named like one, when
    there is exactly one) as ops.apply_plan.tie_word_embeddings says."""
    keys = list(keys)
    stored = checkpoint_modules(keys)
    known = config.get("model_type") in TABLE_MODEL_TYPES  # no class needed (importing transformers takes seconds)
    built = _from_class(config) if not known and _plausible(config, len(keys)) else None
    if built is not None:
        return BaseLayers(built.kinds, built.groups, built.heads, built.ties, frozenset(stored | built.modules),
                          built.prefix, built.model_class)
    from lorafuse.ops.apply_plan import tie_word_embeddings

    inputs = [m for m in embeddings if m.rsplit(".", 1)[-1] not in POSITION_TABLES]
    ties = {"lm_head": inputs[0]} if tie_word_embeddings(dict(config)) and len(inputs) == 1 else {}
    return BaseLayers(ties=ties, modules=frozenset(stored))


_COUNTS = re.compile(r"(layers?|experts?|heads?|depths?|blocks?|stages?)$", re.IGNORECASE)


def _plausible(config: Mapping[str, object], tensors: int) -> bool:
    """Whether the class can be built in bounded time: the counts that multiply its modules (layers, experts,
    heads, depths, blocks, stages; a list of them summed) are each at most the checkpoint's tensor count (a
    config.json of a billion layers beside a small checkpoint is not built)."""
    limit = max(tensors, 64)
    todo: list[tuple[object, int]] = [(config, 0)]
    while todo:
        value, depth = todo.pop()
        if not isinstance(value, Mapping) or depth > 3:
            continue
        for k, v in value.items():
            if isinstance(v, Mapping):
                todo.append((v, depth + 1))
            elif isinstance(k, str) and _COUNTS.search(k):
                counts = v if isinstance(v, list) else [v]
                if sum(c for c in counts if isinstance(c, int) and not isinstance(c, bool)) > limit:
                    return False
    return True


def _from_class(config: Mapping[str, object]) -> BaseLayers | None:
    """The layers of the class config.json's `architectures` names, built on the meta device; None without
    transformers (or torch), for a class it does not have, or when building it fails."""
    archs = config.get("architectures")
    if not (isinstance(archs, list) and archs and isinstance(archs[0], str) and archs[0].isidentifier()):
        return None
    try:  # optional: the name tables decide without them
        with _quiet():
            import torch
            import transformers
    except Exception:  # noqa: BLE001  (not installed, or broken: the name tables decide)
        return None
    cls = getattr(transformers, archs[0], None)
    config_class = getattr(cls, "config_class", None)
    if cls is None or config_class is None or not hasattr(cls, "_from_config"):
        return None
    values = dict(config)
    if "use_pretrained_backbone" in values:  # never a download (timm / a Hub backbone): the layers are what counts
        values["use_pretrained_backbone"] = False
    try:
        with _quiet(), torch.device("meta"):
            model = cls._from_config(config_class.from_dict(values))
    except Exception:  # noqa: BLE001  (a config this transformers cannot build: the name tables decide)
        return None
    return _layers_of(model, torch, archs[0])


def _layers_of(model: object, torch: object, name: str) -> BaseLayers:
    nn = torch.nn  # type: ignore[attr-defined]
    conv1d = _transformers_conv1d()
    kinds: dict[str, str] = {}
    groups: dict[str, int] = {}
    for module_name, module in model.named_modules():  # type: ignore[attr-defined]
        if isinstance(module, nn.Embedding):
            kinds[module_name] = "embedding"
        elif isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d)):
            kinds[module_name] = "linear"
        elif isinstance(module, nn.modules.conv._ConvTransposeNd):
            kinds[module_name] = "conv_transpose"  # PEFT's LoRA has no layer for it
        elif isinstance(module, nn.modules.conv._ConvNd):
            kinds[module_name] = "conv"
            if int(module.groups) > 1:
                groups[module_name] = int(module.groups)
        else:
            kinds[module_name] = "other"
    by_object = {id(m): n for n, m in model.named_modules()}  # type: ignore[attr-defined]
    heads = set(HEAD_NAMES)
    out_module = _call(model, "get_output_embeddings")
    in_module = _call(model, "get_input_embeddings")
    out_name = by_object.get(id(out_module)) if out_module is not None else None
    in_name = by_object.get(id(in_module)) if in_module is not None else None
    if out_name:
        heads.add(out_name)
    ties: dict[str, str] = {}
    tied = getattr(model, "all_tied_weights_keys", None)  # transformers 5: the ties it makes on load
    if isinstance(tied, Mapping):
        for target, source in tied.items():
            t, s = str(target).removesuffix(".weight"), str(source).removesuffix(".weight")
            if str(target).endswith(".weight") and str(source).endswith(".weight") and kinds.get(s) == "embedding" \
                    and kinds.get(t) in ("embedding", "linear"):
                ties[t] = s  # T5: encoder.embed_tokens, decoder.embed_tokens and lm_head read `shared`
    elif out_name and in_name and bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False)):
        ties[out_name] = in_name  # transformers 4: the config decides
    return BaseLayers(kinds, groups, frozenset(heads), ties, frozenset(kinds), str(getattr(model, "base_model_prefix",
                                                                                         "") or ""), name)


def _transformers_conv1d() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # noqa: BLE001
        return None
    return Conv1D


def _call(model: object, method: str) -> object:
    try:
        return getattr(model, method)()
    except Exception:  # noqa: BLE001  (a class without that head)
        return None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' own warnings about the config (token ids, defaults) are not the user's business here."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)
