"""Module names and kinds, shared by every update class and format."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Literal

from lorafuse.errors import FormatError

Kind = Literal["linear", "conv", "embedding"]
MAX_NAME_LENGTH = 1024  # real module names are under 200 characters


def exact_pattern(name: str) -> str:
    """A PEFT rank_pattern / alpha_pattern key that matches the module `name` alone: PEFT matches a key K as
    re.match(rf"(.*\\.)?(K)$", module), so a bare name also matches every module it is the dotted tail of ('fc'
    matches 'sub.fc'); '^' anchors it at the start (the form PEFT's LoraConfig documents)."""
    return "^" + re.escape(name)


def check_module_name(name: str, where: str, what: str = "module") -> None:
    """Refuse a module (or tensor) name read from a file that no model can have and that could
    do harm on its way to messages, terminals or other tools: empty, very long, with control or
    other non-printable characters (NUL, newlines, escapes, bidi overrides), with a path
    separator, or with an empty dotted component ('a..b', '.a', 'a.')."""
    problem = None
    if not name:
        problem = "is empty"
    elif len(name) > MAX_NAME_LENGTH:
        problem = f"has {len(name)} characters (at most {MAX_NAME_LENGTH})"
    elif not name.isprintable():
        bad = next(c for c in name if not c.isprintable())
        problem = f"holds the non-printable character U+{ord(bad):04X}"
    elif "/" in name or "\\" in name:
        problem = "holds a path separator ('/' or '\\')"
    elif "" in name.split("."):
        problem = "has an empty component (a leading, trailing or doubled '.')"
    if problem is not None:
        shown = repr(name) if len(name) <= 200 else repr(name[:200]) + "..."
        raise FormatError(f"{where}: {what} name {shown} {problem}")


# what PEFT saves for trainable_token_indices: the new rows of module X, as `X.token_adapter.trainable_tokens_delta`
TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"


def full_kind(config: Mapping[str, object], origin: str) -> str:
    """What a full tensor of a PEFT adapter is, by the name it was saved under (`origin`): 'bias' (a bias that
    adapter_config bias='all' / 'lora_only' saves, modules_to_save not naming its module), 'base copy' (PEFT's copy
    of a LoRA'd layer's base weight, `<module>.base_layer.weight`), 'trainable tokens' (the rows
    trainable_token_indices replaces, TOKENS_SUFFIX) or 'modules_to_save'."""
    if origin.endswith(TOKENS_SUFFIX):
        return "trainable tokens"
    module, _, param = origin.rpartition(".")
    owner = module.removesuffix(".base_layer")
    listed = config.get("modules_to_save")
    saved = [m for m in listed if isinstance(m, str)] if isinstance(listed, list) else []
    if (param == "bias" and config.get("bias") in ("all", "lora_only")
            and not any(owner == m or owner.endswith("." + m) for m in saved)):
        return "bias"
    return "base copy" if ".base_layer." in origin else "modules_to_save"


def full_tensors_text(config: Mapping[str, object], origins: Sequence[str]) -> str:
    """How messages name full tensors of a PEFT adapter (by their saved names), by kind (full_kind): "bias tensors
    (a, b, c, ...) that adapter_config bias='all' saves", "modules_to_save tensors (d)", "PEFT's copies of base
    layer weights (e)", joined by 'and'."""
    kinds: dict[str, list[str]] = {}
    for o in sorted(origins):
        kinds.setdefault(full_kind(config, o), []).append(o)
    parts = []
    for kind, names in kinds.items():
        listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        parts.append(f"bias tensors ({listed}) that adapter_config bias={config.get('bias')!r} saves" if kind == "bias"
                     else f"PEFT's copies of base layer weights ({listed})" if kind == "base copy"
                     else f"trainable token rows ({listed}, which replace rows of an embedding: "
                          "trainable_token_indices)" if kind == "trainable tokens"
                     else f"modules_to_save tensors ({listed})")
    return " and ".join(parts)


def full_kinds_text(config: Mapping[str, object], origins: Sequence[str]) -> str:
    """The kinds (full_kind) of full tensors of a PEFT adapter, for a message that lists the tensors itself:
    'modules_to_save', "biases that adapter_config bias='all' saves", "PEFT's copies of base layer weights"."""
    words = {"modules_to_save": "modules_to_save", "base copy": "PEFT's copies of base layer weights",
             "trainable tokens": "trainable token rows (trainable_token_indices)",
             "bias": f"biases that adapter_config bias={config.get('bias')!r} saves"}
    return " and ".join(dict.fromkeys(words[full_kind(config, o)] for o in sorted(origins)))
