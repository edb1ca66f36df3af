"""Map adapter module names onto the keys of a base checkpoint: chains of matchers tried in order.

Two chains, one per kind of name:
- tensor names of LLM adapters (PEFT folders), key by key (`KeyChain`): the exact key
  (`model.layers.0.self_attn.q_proj.weight`), then Hugging Face prefixes (the checkpoint's key
  has a prefix the name lacks, or the name one the checkpoint lacks: `model.` of a
  ...ForCausalLM adapter against a bare model), then, for a layout transformers renames as it
  loads (RENAMES, by config.json's model_type), the name spelled as the checkpoint spells it,
  then the tied layers a checkpoint does not store (`lm_head`, BERT's `cls.predictions.decoder`:
  ops.tied). A unique match wins; several are reported as ambiguous.
  Names that find no key may land on a row block of a fused weight (`ops.fused.FusedNames`: a
  q_proj on the first rows of a Phi-3 `qkv_proj`, by the sizes in config.json).
- module names of diffusion adapters (kohya / LyCORIS / diffusers LoRA files), all at once
  (`ModuleChain`): the Flux tables, the SD / SDXL / text-encoder tables, then LyCORIS's generic
  diffusers names of any other pipeline component (`transformer.<path>` -> `transformer/<path>.weight`), then
  LyCORIS's generic `lycoris_<path with _>` spelling of any model's layers, then an original model's names onto its
  diffusers transformer where the paths differ (Wan, Flux.2: formats.dit_keys), and their diffusers names onto the
  original layout.
Each matcher takes what the ones before it left; the first that matches a name decides it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from lorafuse.errors import MissingModuleError, ShapeMismatchError
from lorafuse.formats.targets import Target
from lorafuse.formats.util import ORIGINAL_PREFIXES

if TYPE_CHECKING:
    from lorafuse.formats.dit_keys import Family

Shapes = Mapping[str, tuple[int, ...]]
Found = dict[str, list[Target]]


# ------------------------------------------------------------------------------------------ key by key


class KeyMatcher(Protocol):
    """One way to find the checkpoint key of a tensor name; None when it has no answer."""

    name: str

    def find(self, key: str) -> str | None: ...


class ExactKey:
    name = "exact"

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = set(keys)

    def find(self, key: str) -> str | None:
        return key if key in self.keys else None


class HfPrefixedKey:
    """The checkpoint's key is the name with a prefix (`model.` + name): unique or ambiguous."""

    name = "hf-prefix"

    def __init__(self, keys: Iterable[str]) -> None:
        self._by_suffix: dict[str, list[str]] = {}
        for k in keys:
            parts = k.split(".")
            for i in range(1, len(parts)):
                self._by_suffix.setdefault(".".join(parts[i:]), []).append(k)

    def find(self, key: str) -> str | None:
        found = self._by_suffix.get(key, [])
        if len(found) > 1:
            raise MissingModuleError(f"{key!r} matches several base keys: {', '.join(sorted(found)[:4])}")
        return found[0] if found else None


class HfShorterKey:
    """The name carries a prefix the checkpoint lacks: the longest shorter dotted suffix that is a key."""

    name = "hf-shorter"

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = set(keys)

    def find(self, key: str) -> str | None:
        parts = key.split(".")
        for i in range(1, len(parts) - 1):
            shorter = ".".join(parts[i:])
            if shorter in self.keys:
                return shorter
        return None


# transformers 5 loads these layouts under other names than their checkpoints hold (conversion_mapping.py renames
# them as it loads and back as it saves, in 5.x as in the checkpoints of 4.x), and PEFT names an adapter's modules
# as loaded: per model_type, the reverse of transformers' renamings, (in-memory pattern, on-disk replacement)
# applied in order; the result is then looked up like any name (exact, with or without a prefix).
_LLAVA = ((r"^model\.language_model\.", "language_model.model."),  # "llava": ^language_model -> model.language_model
          (r"^language_model\.(?!model\.)", "language_model.model."))  # "LlavaModel": language_model.model -> ...
_QWEN2_VL = ((r"^(?:model\.)?language_model\.", "model."),)  # "Qwen2VLForConditionalGeneration": ^model -> ...
_QKV = {"q": "query", "k": "key", "v": "value"}
_DINOV2 = ((r"\.attention\.(q|k|v)_proj\.", lambda m: f".attention.attention.{_QKV[m.group(1)]}."),  # "Dinov2Model"
           (r"\.attention\.o_proj\.", ".attention.output.dense."))
# "ViTModel" (and "BeitModel", "ViTMAEForPreTraining"): encoder.layer. -> layers. (ViT-MAE's decoder_encoder.layer.
# -> decoder_layers.), attention.query -> q_proj, ..., intermediate.dense -> mlp.fc1, output.dense -> mlp.fc2
_VIT = ((r"(^|[._])layers\.(\d+)\.", r"\1encoder.layer.\2."), *_DINOV2,
        (r"\.mlp\.fc1\.", ".intermediate.dense."), (r"\.mlp\.fc2\.", ".output.dense."))
_MIXTRAL = ((r"\.mlp\.", ".block_sparse_moe."),)  # "mixtral": .block_sparse_moe. -> .mlp.
RENAMES: dict[str, tuple[tuple[str, str | Callable[[re.Match[str]], str]], ...]] = {
    **dict.fromkeys(("llava", "aria", "paligemma", "aya_vision", "got_ocr2", "gemma3", "internvl", "vipllava",
                     "mistral3", "llava_next", "llava_next_video", "llava_onevision", "video_llava", "fuyu",
                     "mllama"), _LLAVA),
    **dict.fromkeys(("qwen2_vl", "qwen2_5_vl"), _QWEN2_VL),
    **dict.fromkeys(("vit", "deit", "beit", "vit_mae", "vit_msn", "ijepa", "audio-spectrogram-transformer", "vivit"),
                    _VIT),
    **dict.fromkeys(("dinov2", "dinov2_with_registers"), _DINOV2),
    **dict.fromkeys(("mixtral", "minimax", "minimax_m2"), _MIXTRAL),
}
RENAMED_FAMILIES = ("the llava family (Llava, Gemma 3, PaliGemma, Mistral 3, ...), Qwen2-VL / 2.5-VL, the ViT family "
                    "(ViT, DeiT, BEiT, ViT-MAE, DINOv2, ...) and Mixtral")


class RenamedKey:
    """A layout transformers renames as it loads (RENAMES, by config.json's model_type): the name spelled
    as the checkpoint spells it, then looked up by `inner` (exact, with or without a prefix)."""

    name = "renamed"

    def __init__(self, model_type: str, inner: KeyChain) -> None:
        self.rules = [(re.compile(rx), repl) for rx, repl in RENAMES[model_type]]
        self.inner = inner

    def find(self, key: str) -> str | None:
        renamed = key
        for rx, repl in self.rules:
            renamed = rx.sub(repl, renamed)
        return self.inner.find(renamed) if renamed != key else None


class VirtualKey:
    """A key the checkpoint does not store but reads from another one (a tied `lm_head.weight`)."""

    name = "virtual"

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = set(keys)

    def find(self, key: str) -> str | None:
        return key if key in self.keys else None


class KeyChain:
    """Matchers tried in order; the first answer wins."""

    def __init__(self, matchers: Sequence[KeyMatcher]) -> None:
        self.matchers = tuple(matchers)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.matchers]

    def find(self, key: str) -> str | None:
        for m in self.matchers:
            found = m.find(key)
            if found is not None:
                return found
        return None

    def with_virtual(self, virtual: Iterable[str]) -> KeyChain:
        """This chain (checkpoint_keys') with its last matcher, the keys read but not stored, replaced: the stored
        keys' indexes are not built again."""
        return KeyChain([*self.matchers[:-1], VirtualKey(virtual)])

    def __call__(self, key: str) -> str | None:
        return self.find(key)


def checkpoint_keys(keys: Iterable[str], virtual: Iterable[str] = (),
                    config: Mapping[str, object] | None = None) -> KeyChain:
    """The chain for LLM tensor names against a checkpoint's keys (and keys it reads but does not store); with
    the base's config.json, a layout transformers renames as it loads is spelled back (RenamedKey)."""
    keys = list(keys)
    stored: list[KeyMatcher] = [ExactKey(keys), HfPrefixedKey(keys), HfShorterKey(keys)]
    model_type = (config or {}).get("model_type")
    renamed: list[KeyMatcher] = [RenamedKey(model_type, KeyChain(stored))] if (
        isinstance(model_type, str) and model_type in RENAMES) else []
    return KeyChain([*stored, *renamed, VirtualKey(virtual)])


class BaseMatcher:
    """The key chain of a checkpoint (`checkpoint_keys`), by its former name."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = set(keys)
        self.chain = checkpoint_keys(self.keys)

    def find(self, key: str) -> str | None:
        """The checkpoint key for `key` (a full tensor name such as `x.q_proj.weight`), or None."""
        return self.chain.find(key)

    def weight(self, module: str) -> str | None:
        return self.find(module + ".weight")


# ------------------------------------------------------------------------------------------ all modules at once


class ModuleMatcher(Protocol):
    """Matches what it can of `modules` (name -> delta shape) among `shapes` (key -> shape); returns the
    targets found and the names it leaves, in their order."""

    name: str

    def match(self, modules: Shapes, shapes: Shapes) -> tuple[Found, list[str]]: ...


class FluxTables:
    """Flux.1 transformer names (kohya, BFL / ComfyUI, diffusers), through formats.flux_keys."""

    name = "flux"

    def match(self, modules: Shapes, shapes: Shapes) -> tuple[Found, list[str]]:
        from lorafuse.formats import flux_keys
        from lorafuse.formats.sd_keys import _TE_NAME_PREFIXES

        mine = {m: s for m, s in modules.items() if not m.startswith(_TE_NAME_PREFIXES) and flux_keys.is_flux_module(m)}
        if not mine:
            return {}, list(modules)
        found, _ = flux_keys.match_modules(mine, shapes)
        return found, [m for m in modules if m not in found]


class SdTables:
    """SD 1.x / 2.x / SDXL UNet and text-encoder names (kohya and diffusers), through formats.sd_keys.
    Names the Flux tables claim are left to them (a Flux name that found no Flux weight is not retried)."""

    name = "sd"

    def match(self, modules: Shapes, shapes: Shapes) -> tuple[Found, list[str]]:
        from lorafuse.formats.sd_keys import _is_flux, match_modules

        mine = {m: s for m, s in modules.items() if not _is_flux(m)}
        found, _ = match_modules(mine, shapes) if mine else ({}, [])
        return found, [m for m in modules if m not in found]


GENERIC_PREFIXES = ("lycoris_", "lora_unet_", "lora_te_", "lora_")
# Where a checkpoint keeps the denoiser kohya names `lora_unet_`: a pipeline folder's transformer (a UNet's names are
# the SD tables'), a single file's LDM / ComfyUI prefix (SD3's joint_blocks, HunyuanVideo's, Wan's, ...)
DENOISER_PREFIXES = ("transformer/", *ORIGINAL_PREFIXES)


# The prefixes that name the denoiser's own layers (kohya's UNet / DiT names, LyCORIS's names of the model it wraps):
# only these reach a path inside DENOISER_PREFIXES (a text encoder's `lora_te_` never does).
DENOISER_NAMES = ("lycoris_", "lora_unet_")


def underscore_candidates(name: str, shapes: Shapes) -> list[str]:
    """The weights a kohya/LyCORIS-style `name` spells once '.' is read as '_' (UnderscoreNames matches only a
    name with exactly one; two or more: an ambiguity a message should name)."""
    prefix = next((p for p in GENERIC_PREFIXES if name.startswith(p)), None)
    if prefix is None:
        return []
    want, inner = name[len(prefix):], prefix in DENOISER_NAMES
    return sorted(k for k in shapes if want in _spellings(k, inner))


def _spellings(key: str, inner: bool = True) -> tuple[str, ...]:
    """How kohya / LyCORIS names spell a weight key's module: its path with '_' for '.', and (`inner`) the path
    inside the denoiser (DENOISER_PREFIXES)."""
    if not key.endswith(".weight"):
        return ()
    path = key[: -len(".weight")]
    prefix = next((p for p in DENOISER_PREFIXES if path.startswith(p)), None) if inner else None
    within = () if prefix is None else (path[len(prefix):].replace(".", "_"),)
    return (path.replace(".", "_"), *within)


class UnderscoreNames:
    """kohya-style names on a model the tables do not know (LyCORIS names any torch model's layers
    `lycoris_<path with _>`, musubi-tuner a QwenImage transformer's `lora_unet_<path with _>`, sd-scripts SD3's
    `lora_unet_joint_blocks_...`): the module is the weight whose dotted path, with '_' for '.', is its name without
    the prefix, the path taken inside the denoiser where the checkpoint has one (`transformer/` of a pipeline
    folder, `model.diffusion_model.` of a single file) for the denoiser's names (DENOISER_NAMES). A name two keys
    spell alike stays unmatched."""

    name = "underscore"

    def match(self, modules: Shapes, shapes: Shapes) -> tuple[Found, list[str]]:
        if not modules:
            return {}, []
        spelled: dict[bool, dict[str, list[str]]] = {True: {}, False: {}}
        for inner, table in spelled.items():
            for key in shapes:
                for spelling in _spellings(key, inner):
                    table.setdefault(spelling, []).append(key)
        found: Found = {}
        for name in modules:
            prefix = next((p for p in GENERIC_PREFIXES if name.startswith(p)), None)
            keys = spelled[prefix in DENOISER_NAMES].get(name[len(prefix):], []) if prefix else []
            if len(keys) == 1:
                found[name] = [Target(keys[0])]
        return found, [m for m in modules if m not in found]


class OriginalNames:
    """kohya-style names of an original model's layers (musubi-tuner's Wan `lora_unet_blocks_0_self_attn_q`, a
    ComfyUI-layout file read as such) onto a diffusers transformer whose paths differ (formats.dit_keys: a family's
    table, used where the checkpoint has the family's signature weight): `transformer/<path>.weight` of a pipeline
    folder, or `<path>.weight` of a file of that one model."""

    name = "original"

    def match(self, modules: Shapes, shapes: Shapes) -> tuple[Found, list[str]]:
        from lorafuse.formats.dit_keys import families_of

        prefix = DENOISER_PREFIXES[0] if any(k.startswith(DENOISER_PREFIXES[0]) for k in shapes) else ""
        inside = {k[len(prefix):] for k in shapes if k.startswith(prefix)} if prefix else set(shapes)
        families = families_of(inside)
        found: Found = {}
        for name in modules if families else ():
            own = next((p for p in DENOISER_NAMES if name.startswith(p)), None)
            paths = [f.diffusers_path(name[len(own):]) for f in families] if own else []
            key = next((f"{prefix}{p}.weight" for p in paths if p is not None and f"{p}.weight" in inside), None)
            if key is not None:
                found[name] = [Target(key)]
            elif own:
                fused = [f.fused_parts(name[len(own):]) for f in families]
                parts = next((ps for ps in fused if ps and all(f"{p}.weight" in inside for p in ps)), ())
                if parts:
                    found[name] = _fused_targets(name, modules[name], [f"{prefix}{p}.weight" for p in parts], shapes)
        return found, [m for m in modules if m not in found]


def _fused_targets(name: str, shape: tuple[int, ...], keys: list[str], shapes: Shapes) -> list[Target]:
    """A fused layer's delta onto the separate weights it is made of, its rows in order, each weight taking as many
    rows as it has (Lumina 2's `attention.qkv` onto `to_q`, `to_k`, `to_v` of grouped-query attention)."""
    rows = [int(shapes[k][0]) for k in keys]
    if len(shape) != 2 or sum(rows) != shape[0] or any(tuple(shapes[k][1:]) != tuple(shape[1:]) for k in keys):
        listing = ", ".join(f"{k!r} {tuple(shapes[k])}" for k in keys)
        raise ShapeMismatchError(f"module {name!r} with delta shape {tuple(shape)} does not fit the weights it is made "
                                 f"of, whose rows it stacks: {listing}")
    starts = [sum(rows[:i]) for i in range(len(rows))]
    return [Target(k, None, (a, a + n)) for k, a, n in zip(keys, starts, rows)]


class OriginalWeights:
    """diffusers LoRA names of a transformer whose original paths differ (`transformer.blocks.0.attn1.to_q` of Wan)
    onto the original layout (a single file, bare or under ComfyUI's `model.diffusion_model.` / `diffusion_model.`),
    through formats.dit_keys, where the checkpoint has the family's original signature weight."""

    name = "original-weights"

    def match(self, modules: Shapes, shapes: Shapes) -> tuple[Found, list[str]]:
        from lorafuse.formats.dit_keys import families_of

        component = DENOISER_PREFIXES[0].rstrip("/") + "."
        found: Found = {}
        for prefix in ("", *ORIGINAL_PREFIXES):
            inside = {k[len(prefix):] for k in shapes if k.startswith(prefix)}
            families = families_of(inside, original=True)
            for name in modules if families else ():
                path = _diffusers_path(name, component, families)
                if name in found or path is None:
                    continue
                paths = [f.original_path(path) for f in families]
                key = next((f"{prefix}{p}.weight" for p in paths if p is not None and f"{p}.weight" in inside), None)
                if key is not None:
                    found[name] = [Target(key)]
        return found, [m for m in modules if m not in found]


def _diffusers_path(name: str, component: str, families: list[Family]) -> str | None:
    """The diffusers path a module names: `transformer.<path>`, or a kohya-spelled one of a family's tables
    (ai-toolkit's Wan `diffusion_model.blocks.0.attn1.to_q`, read as `lora_unet_blocks_0_attn1_to_q`); None for any
    other name."""
    if name.startswith(component):
        return name[len(component):]
    own = next((p for p in DENOISER_NAMES if name.startswith(p)), None)
    paths = [f.spelled_diffusers_path(name[len(own):]) for f in families] if own else []
    return next((p for p in paths if p is not None), None)


class ComponentNames:
    """diffusers LoRA names of any pipeline component the tables do not know (Wan's `transformer.blocks.0.attn1.to_q`,
    LTX-Video's, QwenImage's, ...: diffusers' own module paths): the weight `<component>/<path>.weight` of a
    pipeline folder, or, for the transformer, `<path>.weight` of a checkpoint of that one model (no component
    folders), exactly as named. (Another component's name is never read as a one-model file's: two text encoders
    spell their layers alike.)"""

    name = "component"

    def match(self, modules: Shapes, shapes: Shapes) -> tuple[Found, list[str]]:
        one_model = not any("/" in k for k in shapes)
        found: Found = {}
        for name in modules:
            component, dot, path = name.partition(".")
            if not dot or not component or not path:
                continue
            bare = f"{path}.weight" if one_model and f"{component}/" == DENOISER_PREFIXES[0] else ""
            key = next((k for k in (f"{component}/{path}.weight", bare) if k in shapes), None)
            if key is not None:
                found[name] = [Target(key)]
        return found, [m for m in modules if m not in found]


class KeyNames:
    """LLM module names through a key chain (`name + '.weight'`)."""

    name = "keys"

    def __init__(self, base_key: Callable[[str], str | None]) -> None:
        self.base_key = base_key

    def match(self, modules: Shapes, shapes: Shapes) -> tuple[Found, list[str]]:
        found: Found = {}
        for name in modules:
            key = self.base_key(name + ".weight")
            if key is not None:
                found[name] = [Target(key)]
        return found, [m for m in modules if m not in found]


class ModuleChain:
    """Module matchers tried in order, each on the names the ones before it left."""

    def __init__(self, matchers: Sequence[ModuleMatcher]) -> None:
        self.matchers = tuple(matchers)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.matchers]

    def match(self, modules: Shapes, shapes: Shapes) -> tuple[Found, list[str]]:
        found: Found = {}
        left = dict(modules)
        for m in self.matchers:
            if not left:
                break
            hits, rest = m.match(left, shapes)
            found.update(hits)
            left = {n: left[n] for n in rest}
        return found, list(left)


DIFFUSION_FORMATS = ("kohya", "diffusers")


def module_chain(adapter_format: str, base_key: Callable[[str], str | None],
                 config: Mapping[str, object] | None = None) -> ModuleChain:
    """The chain for an adapter of this format: diffusion names through the tables, LLM names by key,
    then onto the row blocks of a fused qkv_proj / gate_up_proj that config.json describes (ops.fused)."""
    if adapter_format in DIFFUSION_FORMATS:
        return ModuleChain([FluxTables(), SdTables(), ComponentNames(), UnderscoreNames(), OriginalNames(),
                            OriginalWeights()])
    from lorafuse.ops.fused import FusedNames

    return ModuleChain([KeyNames(base_key), FusedNames(base_key, config)])
