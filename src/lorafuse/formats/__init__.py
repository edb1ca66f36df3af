"""Adapter formats: detection and loading."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from lorafuse.adapter import Adapter
from lorafuse.errors import AdapterNote, FormatError
from lorafuse.formats.diffusers import has_diffusers_keys, load_diffusers
from lorafuse.formats.kohya import has_kohya_keys, load_kohya
from lorafuse.formats.peft import is_peft, load_peft
from lorafuse.formats.util import safetensors_keys
from lorafuse.io.checkpoint import is_pickle, is_safetensors, refuse_pickle
from lorafuse.io.safetensors import read_header


def _format_of(p: Path, keys: list[str]) -> str | None:
    """The adapter format of `p`, given the tensor names of its header ([] for a folder)."""
    if has_kohya_keys(keys):
        return "kohya"
    if has_diffusers_keys(keys):
        return "diffusers"
    if is_peft(p):
        return "peft"
    return None


def adapter_format(path: str | os.PathLike[str]) -> str | None:
    """'peft', 'kohya' or 'diffusers' when `path` is such an adapter, else None (never raises)."""
    p = Path(path)
    return _format_of(p, safetensors_keys(p))


def detect_format(path: str | os.PathLike[str]) -> str:
    """'peft' for a PEFT adapter folder, 'kohya' for a .safetensors file with `.lora_down.weight` (or
    LyCORIS) keys, 'diffusers' for a .safetensors file with `<component>.<module>.lora_A.weight` keys
    (diffusers' save_lora_weights); raises FormatError for anything unknown."""
    p = Path(path)
    if not p.exists():
        raise FormatError(f"{p}: no such file or directory")
    if p.is_file() and is_pickle(p):
        raise refuse_pickle(p)
    keys: list[str] = []
    if is_safetensors(p) and not p.is_dir():  # MODEL.SAFETENSORS too: suffixes in any case
        keys = list(read_header(p)[0])  # one that cannot be read: say why, not "not a recognised adapter"
    fmt = _format_of(p, keys)
    if fmt is not None:
        return fmt
    if p.is_dir():
        try:
            pickles = sorted(f for f in p.iterdir() if is_pickle(f))
        except OSError as e:
            raise FormatError(f"{p}: cannot read: {e.strerror or e}") from None
        if pickles:
            raise refuse_pickle(pickles[0])
    raise FormatError(
        f"{p}: not a recognised adapter: expected a PEFT adapter folder "
        "(adapter_config.json + adapter_model.safetensors), a kohya LoRA .safetensors file or a diffusers "
        "LoRA .safetensors file (<component>.<module>.lora_A.weight keys)"
    )


def load(path: str | os.PathLike[str]) -> Adapter:
    """Load an adapter from disk; its tensors stay memory-mapped until used. What loading decided for
    the user (tensors PEFT would ignore, left out) is in `Adapter.notes` and given as AdapterNote
    warnings."""
    fmt = detect_format(path)
    if fmt == "peft":
        adapter = load_peft(path)
    elif fmt == "kohya":
        adapter = load_kohya(path)
    elif fmt == "diffusers":
        adapter = load_diffusers(path)
    else:  # pragma: no cover
        raise FormatError(f"{path}: unsupported adapter format {fmt!r}")
    for note in adapter.notes:
        warnings.warn(f"{adapter.label}: {note}", AdapterNote, stacklevel=2)
    return adapter


__all__ = ["adapter_format", "detect_format", "load"]
