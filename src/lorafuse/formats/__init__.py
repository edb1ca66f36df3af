"""Adapter formats: each module here registers its format (model.registry: name, sniff, load, save);
detection and loading go through the registry. A new format is a module here that registers itself
and is imported below."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lorafuse._terminal import short
from lorafuse.errors import AdapterNote, FormatError, warn

# Imported for their registration (kohya, diffusers, peft: sniffed in that order, by priority).
from lorafuse.formats import diffusers, kohya, peft  # noqa: F401
from lorafuse.formats.held import adapter_format, adapter_path, located_adapter, subfolder_hint
from lorafuse.formats.outputs import python_output
from lorafuse.io.checkpoint import is_pickle, is_safetensors, refuse_pickle
from lorafuse.io.hub import held_adapter_file
from lorafuse.io.safetensors import read_header
from lorafuse.model import Adapter
from lorafuse.model.f64 import narrowable_updates
from lorafuse.model.registry import formats, get_format, set_output_rule, sniff

set_output_rule(python_output)  # what Adapter.save's `out` means: the CLI's -o rules


def _expected() -> str:
    described = [s.description for s in formats()]
    return ", ".join(described[:-1]) + (" or " if len(described) > 1 else "") + described[-1]


def detect_format(path: str | os.PathLike[str]) -> str:
    """The registered format that recognises `path` ('kohya' for a .safetensors file with
    `.lora_down.weight` (or LyCORIS) keys, 'diffusers' for one with `<component>.<module>.lora_A.weight`
    keys or diffusers' own LoRA-layer / attention-processor names (`.lora.down.weight`,
    `.lora_linear_layer.down.weight`, `.processor.to_q_lora.down.weight`: formats.diffusers), 'peft' for
    a PEFT adapter folder); raises FormatError for anything unknown. A Hub id is resolved (io.hub), and a folder
    holding one adapter file is that file (formats.held)."""
    return located_format(located_adapter(path))


def located_format(p: Path) -> str:
    """detect_format of a path located_adapter has already located (a local path: no Hub id, no folder holding
    the adapter file instead of being it)."""
    try:
        os.stat(p)
    except FileNotFoundError:
        from lorafuse.io.checkpoint import no_such_path

        raise FormatError(no_such_path(p)) from None
    except (OSError, ValueError) as e:  # a name too long, a folder that cannot be searched, a loop of links
        raise FormatError(f"{p}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    if p.is_file() and is_pickle(p):
        raise refuse_pickle(p)
    keys: list[str] = []
    if is_safetensors(p) and not p.is_dir():  # MODEL.SAFETENSORS too: suffixes in any case
        keys = list(read_header(p)[0])  # one that cannot be read: say why, not "not a recognised adapter"
    fmt = sniff(p, keys)
    if fmt is not None:
        return fmt
    _refuse_gguf(p)
    if p.is_dir():
        try:
            pickles = sorted(f for f in p.iterdir() if is_pickle(f))
        except OSError as e:
            raise FormatError(f"{p}: cannot read: {e.strerror or e}") from None
        if pickles:
            raise refuse_pickle(pickles[0])
        _refuse_odd_adapter_files(p)
        sub = subfolder_hint(p)
        if sub:
            raise FormatError(f"{p}: not an adapter itself{sub}")
    raise FormatError(f"{p}: not a recognised adapter{_held_text(p, keys)}: expected {_expected()}")


def _refuse_gguf(p: Path) -> None:
    """A GGUF file where an adapter is read (only once no format recognised it): FormatError saying so."""
    from lorafuse.formats.gguf import is_gguf

    if is_gguf(p):
        raise FormatError(f"{p}: a GGUF file (llama.cpp; magic 'GGUF'), which lorafuse does not read as an adapter: "
                          "it writes GGUF LoRAs (lorafuse convert ADAPTER --to gguf) and describes GGUF files "
                          f"(lorafuse info), but reads adapters as safetensors: expected {_expected()}")


def _held_text(p: Path, keys: list[str]) -> str:
    """What a path that is not an adapter holds instead, so that the user sees which names were not understood:
    a file's tensors, or those of the file a folder would be read as (io.hub.held_adapter_file: its
    pytorch_lora_weights.safetensors or its one .safetensors file)."""
    where = "it holds"
    if p.is_dir():
        try:
            file = held_adapter_file(p)
            several = [] if file is not None else sorted(f.name for f in p.iterdir() if is_safetensors(f)
                                                         and not f.name.startswith(".") and f.is_file())
        except OSError:
            file, several = None, []
        adapters = [n for n in several[:16] if adapter_format(p / n) is not None] if len(several) > 1 else []
        if adapters:  # as a Hub repository of several (io.hub): the folder does not say which to read
            shown = ", ".join(several[:4]) + (f" and {len(several) - 4} more" if len(several) > 4 else "")
            return (f"; it holds {len(several)} .safetensors files ({shown}) and no adapter_config.json, so it does "
                    f"not say which is the adapter: give the file's path (e.g. {p / adapters[0]})")
        if file is None or not is_safetensors(file):
            return ""
        try:
            keys = list(read_header(file)[0])
        except FormatError as e:
            return f"; its {file.name} cannot be read ({e})"
        where = f"its {file.name} holds"
    if not keys:
        return ""
    shown = ", ".join(short(k) for k in sorted(keys)[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    lora_key = diffusers.unprefixed_lora_key(keys)
    what = (diffusers.unprefixed_why(lora_key) if lora_key
            else "a PEFT adapter's tensors, without the adapter_config.json that PEFT reads beside them (give the "
                 "folder holding both)" if any(k.startswith(peft.PREFIX) and ".lora_" in k for k in keys)
            else "none named as an adapter's")
    return f"; {where} {len(keys)} tensor{'s' if len(keys) != 1 else ''} ({shown}), {what}"


_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what makes a folder a PEFT adapter


def _refuse_odd_adapter_files(folder: Path) -> None:
    """A folder holding a PEFT adapter's file names that are not readable regular files (a FIFO, a device, a
    folder, a loop of links): say which, rather than "not a recognised adapter"."""
    from lorafuse.io.safetensors import file_kind

    for name in _ADAPTER_FILES:
        f = folder / name
        if not os.path.lexists(f):
            continue
        try:
            mode = os.stat(f).st_mode
        except OSError as e:
            raise FormatError(f"{f}: cannot read: {e.strerror or e}") from None
        if not stat.S_ISREG(mode):
            raise FormatError(f"{f}: is {file_kind(mode)}, not a file: a PEFT adapter's {name} is a regular file")


def load(path: str | os.PathLike[str]) -> Adapter:
    """Load an adapter from disk; its tensors stay memory-mapped until used. What loading decided for
    the user (tensors PEFT would ignore, left out) is in `Adapter.notes` and given as AdapterNote
    warnings."""
    adapter = read(path)
    for note in adapter.notes:
        warn(f"{adapter.label}: {note}", AdapterNote)
    return adapter


def read(path: str | os.PathLike[str]) -> Adapter:
    """`load` without the AdapterNote warnings (the notes stay in `Adapter.notes`): for a reader that opens an
    adapter again after saying them once. Never by silencing warnings around `load`: warnings.catch_warnings
    changes the filters of the whole process, so another thread's warnings (the user's) would be lost."""
    p = located_adapter(path)  # a Hub id: the adapter in its snapshot (io.hub); a folder holding one: it (formats.held)
    try:
        adapter = get_format(located_format(p)).load(p)
    except FormatError as e:  # every refusal of a file names it
        if str(p) in str(e):
            raise
        raise FormatError(f"{p}: {e}") from None
    narrowable_updates(adapter.updates)  # F64 factors beyond float32's range: balanced (model.f64)
    return adapter


__all__ = ["adapter_format", "adapter_path", "detect_format", "load", "located_adapter", "located_format", "read"]
