"""Map adapter module names onto the keys of a base checkpoint: chains of matchers tried in order.

Two chains, one per kind of name:
- tensor names of LLM adapters (PEFT folders), key by key (`KeyChain`): the exact key
  (`model.layers.0.self_attn.q_proj.weight`), then Hugging Face prefixes (the checkpoint's key
  has a prefix the name lacks, or the name one the checkpoint lacks: `model.` of a
  ...ForCausalLM adapter against a bare model), then the `lm_head` a checkpoint with tied
  embeddings does not store. A unique match wins; several are reported as ambiguous.
  Names that find no key may land on a row block of a fused weight (`ops.fused.FusedNames`: a
  q_proj on the first rows of a Phi-3 `qkv_proj`, by the sizes in config.json).
- module names of diffusion adapters (kohya / LyCORIS / diffusers LoRA files), all at once
  (`ModuleChain`): the Flux tables, the SD / SDXL / text-encoder tables, then LyCORIS's generic
  `lycoris_<path with _>` spelling of any model's layers.
Each matcher takes what the ones before it left; the first that matches a name decides it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

from lorafuse.errors import MissingModuleError
from lorafuse.formats.targets import Target

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

    def __call__(self, key: str) -> str | None:
        return self.find(key)


def checkpoint_keys(keys: Iterable[str], virtual: Iterable[str] = ()) -> KeyChain:
    """The chain for LLM tensor names against a checkpoint's keys (and keys it reads but does not store)."""
    keys = list(keys)
    return KeyChain([ExactKey(keys), HfPrefixedKey(keys), HfShorterKey(keys), VirtualKey(virtual)])


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


def underscore_candidates(name: str, shapes: Shapes) -> list[str]:
    """The weights a kohya/LyCORIS-style `name` spells once '.' is read as '_' (UnderscoreNames matches only a
    name with exactly one; two or more: an ambiguity a message should name)."""
    prefix = next((p for p in GENERIC_PREFIXES if name.startswith(p)), None)
    if prefix is None:
        return []
    want = name[len(prefix):]
    return sorted(k for k in shapes if k.endswith(".weight") and k[: -len(".weight")].replace(".", "_") == want)


class UnderscoreNames:
    """kohya-style names on a model the tables do not know (LyCORIS names any torch model's layers
    `lycoris_<path with _>`): the module is the weight whose dotted path, with '_' for '.', is its name
    without the prefix. A name two keys spell alike stays unmatched."""

    name = "underscore"

    def match(self, modules: Shapes, shapes: Shapes) -> tuple[Found, list[str]]:
        if not modules:
            return {}, []
        spelled: dict[str, list[str]] = {}
        for key in shapes:
            if key.endswith(".weight"):
                spelled.setdefault(key[: -len(".weight")].replace(".", "_"), []).append(key)
        found: Found = {}
        for name in modules:
            prefix = next((p for p in GENERIC_PREFIXES if name.startswith(p)), None)
            keys = spelled.get(name[len(prefix):], []) if prefix else []
            if len(keys) == 1:
                found[name] = [Target(keys[0])]
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
        return ModuleChain([FluxTables(), SdTables(), UnderscoreNames()])
    from lorafuse.ops.fused import FusedNames

    return ModuleChain([KeyNames(base_key), FusedNames(base_key, config)])
