"""Where an adapter is: a path that is one, or a folder that holds one; and the refusal of an adapter given where a
model checkpoint goes.

One rule for every place an adapter is read (load, detect_format, combine's sources, info, provenance records) and
the same rule a Hub id's snapshot is read with (io.hub.held_adapter_file): a folder that is no adapter itself but
holds diffusers' pytorch_lora_weights.safetensors (what save_lora_weights writes and load_lora_weights(folder)
reads, and what `lorafuse convert -o dir/` writes), or a single .safetensors file, holds that adapter when the file
is one. PEFT's save_pretrained writes an adapter not named 'default' in a sub-folder named after it
(`dir/style/adapter_config.json`): such a folder is not read for the user (it may hold several), its sub-folders
are named in the refusal instead."""

from __future__ import annotations

import os
from pathlib import Path

from lorafuse.errors import FormatError
from lorafuse.formats.util import safetensors_keys
from lorafuse.io.checkpoint import SAFETENSORS_SUFFIX, names_ending
from lorafuse.io.hub import PEFT_CONFIG, PEFT_WEIGHTS, held_adapter_file, hub_origin, local_adapter, local_path
from lorafuse.io.pipeline import is_pipeline
from lorafuse.io.provenance import set_adapter_locator
from lorafuse.model.registry import sniff


def adapter_format(path: str | os.PathLike[str]) -> str | None:
    """The name of the format of `path` ('peft', 'kohya', 'diffusers', ...) when it is an adapter, else None
    (never raises)."""
    p = Path(path)
    try:
        return sniff(p, safetensors_keys(p))
    except (OSError, ValueError):  # a name too long, a folder that cannot be searched: the caller says why
        return None


def adapter_path(path: str | os.PathLike[str]) -> Path | None:
    """The adapter file or folder that `path` is or holds, else None (never raises): `path` itself when it is an
    adapter (a PEFT folder, a kohya / LyCORIS file, a diffusers LoRA file); for a folder that is none of these
    (nor a diffusers pipeline), the file io.hub.held_adapter_file names in it, when that file is an adapter."""
    p = Path(path)
    if adapter_format(p) is not None:
        return p
    try:
        if not p.is_dir() or is_pipeline(p):
            return None
        held = held_adapter_file(p)
    except OSError:
        return None
    return held if held is not None and adapter_format(held) is not None else None


def located_adapter(spec: str | os.PathLike[str], what: str = "adapter") -> Path:
    """The adapter a spec names, as a local path: a Hub id's (io.hub.local_adapter), else the adapter a local
    folder holds (adapter_path), else the path as given (which its loading then refuses, saying why)."""
    p = local_adapter(spec, what)
    return adapter_path(p) or p


set_adapter_locator(located_adapter)  # provenance records the adapter a spec names as its loading found it


def peft_subfolders(folder: Path) -> list[Path]:
    """The sub-folders of `folder` that hold adapter_config.json (PEFT's save_pretrained of an adapter not named
    'default'), sorted; [] for anything else (never raises)."""
    try:
        return sorted(d for d in folder.iterdir() if not d.name.startswith(".") and (d / PEFT_CONFIG).is_file())
    except (OSError, ValueError):  # not a folder, or one that cannot be listed
        return []


def _shown(subs: list[Path]) -> str:
    """The first four sub-folders, and how many more."""
    return ", ".join(str(s) for s in subs[:4]) + (f" and {len(subs) - 4} more" if len(subs) > 4 else "")


def subfolder_hint(folder: Path) -> str:
    """'; it holds a PEFT adapter in a sub-folder (...)' when `folder` is one whose adapters are in sub-folders,
    else ''."""
    subs = peft_subfolders(folder)
    if not subs:
        return ""
    shown = _shown(subs)
    one = len(subs) == 1
    return (f"; it holds {'a PEFT adapter in a sub-folder' if one else f'{len(subs)} PEFT adapters in sub-folders'} "
            f"({shown}: PEFT's save_pretrained writes an adapter not named 'default' in a sub-folder named after it): "
            f"give {'that folder' if one else 'one of them'}")


# What the two commands that take model checkpoints take, for refuse_adapter's `instead`.
APPLY_TAKES = ("apply merges adapters into a model checkpoint (lorafuse apply BASE ADAPTER...: the base model's folder "
               "or .safetensors file first); to add adapters together into one adapter, use lorafuse combine")
EXTRACT_TAKES = ("extract compares two full model checkpoints, a base and its fine-tune (lorafuse extract BASE "
                 "FINETUNED); to subtract one adapter from another, use lorafuse combine A B --weights 1,-1")
_KINDS = {"peft": "a PEFT adapter", "kohya": "a kohya / LyCORIS file", "diffusers": "a diffusers LoRA"}  # adapter_kind


def extract_models(base: str | os.PathLike[str], finetuned: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The two model checkpoints extract reads, as local paths (a Hub id: its snapshot folder, io.hub), an adapter
    given as either refused saying so (refuse_adapter)."""
    paths = (local_path(base, what="checkpoint", adapter=False),
             local_path(finetuned, what="checkpoint", adapter=False))
    for p, what in zip(paths, ("the base model", "the fine-tuned model")):
        refuse_adapter(p, what, EXTRACT_TAKES)
        if is_pipeline(p):
            raise _pipeline_refusal(p, what)
    return paths


def _pipeline_refusal(path: Path, what: str) -> FormatError:
    """The refusal of a diffusers pipeline folder given to extract: its weights are in its components' folders, and
    extract compares one model with its fine-tune (named: the components that hold weights)."""
    try:
        held = sorted(d.name for d in path.iterdir() if d.is_dir() and names_ending(d, SAFETENSORS_SUFFIX))
    except OSError:
        held = []
    shown = ", ".join(held[:6]) + (f" and {len(held) - 6} more" if len(held) > 6 else "")
    example = held[0] if held else "unet"
    return FormatError(f"{path}: {what} is a diffusers pipeline folder (model_index.json), whose weights are in its "
                       f"components' folders ({shown or 'none holds .safetensors weights'}): extract compares one "
                       f"model with its fine-tune; give the same component folder of each (e.g. {path / example} "
                       f"and the other model's {example} folder)")


def adapter_kind(held: Path, given: Path | None = None) -> str:
    """How messages name the adapter `held` ('a PEFT adapter', 'a kohya LoRA', ...), as what `given` is: 'a folder
    holding a diffusers LoRA (dlora/pytorch_lora_weights.safetensors)' when `given` is the folder holding it."""
    fmt = adapter_format(held) or ""
    kind = _KINDS.get(fmt, f"a {fmt} adapter")
    return kind if given is None or held == given else f"a folder holding {kind} ({held})"


def _holds_weights_too(path: Path, held: Path) -> bool:
    """A folder holding an adapter (`held`: itself, a PEFT folder, or its adapter file) and model weights besides (a
    repository with the merged model and its adapter: a .safetensors file other than the adapter's): read as the
    checkpoint it also is."""
    own = PEFT_WEIGHTS if held == path else held.name
    try:
        return path.is_dir() and any(n != own for n in names_ending(path, SAFETENSORS_SUFFIX))
    except OSError:
        return False


def refuse_adapter(path: Path, what: str, instead: str) -> None:
    """FormatError when `path`, given as a model checkpoint (`what`: 'the base model', ...), is an adapter, a folder
    holding one (adapter_path) or a folder of nothing but PEFT adapters in sub-folders; `instead` says what the
    command takes and how to do what the user may have meant. A Hub id's snapshot is named by the id too."""
    origin = hub_origin(path)
    named = path if origin is None else f"{origin[0]}{f'@{origin[1]}' if origin[1] else ''} ({path})"
    held = adapter_path(path)
    if held is not None and not _holds_weights_too(path, held):
        raise FormatError(f"{named}: {what} is {adapter_kind(held, path)}, not a model checkpoint: {instead}")
    try:
        own = names_ending(path, SAFETENSORS_SUFFIX) if path.is_dir() and not is_pipeline(path) else ["-"]
    except OSError:
        return
    subs = [] if own else peft_subfolders(path)
    if subs:
        shown = _shown(subs)
        raise FormatError(f"{named}: {what} holds no model checkpoint, only PEFT adapters in sub-folders ({shown}): "
                          f"{instead}")


__all__ = ["APPLY_TAKES", "EXTRACT_TAKES", "adapter_format", "adapter_kind", "adapter_path", "extract_models",
           "located_adapter", "peft_subfolders", "refuse_adapter", "subfolder_hint"]
