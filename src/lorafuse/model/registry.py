"""The registry of adapter formats: each format module registers how to recognise, read and write
its files; detection, loading and `Adapter.save` go through it. Asked for a format, it imports
lorafuse.formats first if nothing has (`import lorafuse` is lazy).

The registry lives in the data model so that `Adapter.save` finds a format without importing
lorafuse.formats: the format modules fill it in when they are imported (lorafuse/__init__ imports
lorafuse.formats). A new format is one module under formats/ that calls `register`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lorafuse._lazy import import_module
from lorafuse.errors import LorafuseValueError
from lorafuse.io.tensor import Tensor

if TYPE_CHECKING:
    from lorafuse.io.provenance import Provenance
    from lorafuse.model.adapter import Adapter
    from lorafuse.model.layout import AdapterLayout, AdapterWriter


@dataclass(frozen=True)
class FormatSpec:
    """One adapter format.

    `sniff(path, keys)` says whether `path` is such an adapter, given the tensor names of its
    `.safetensors` header ([] for a folder or another file); it reads nothing else than the path's
    own small files and never raises. `load(path)` reads one; `save(adapter, out, overwrite)` writes
    one atomically, never over the adapter's own sources. Sniffing goes by `priority`, lowest first.
    `open_stream(template, layout, out, inputs, overwrite, final)`, for a format that has it, opens a streamed
    output (model.layout): the template adapter's config and state, the layout's modules, updates put
    one by one (lorafuse.formats.streaming.open_stream calls it); `final`, when given, returns the
    provenance to record at the commit (the template's holds placeholders for hashes not known yet)."""

    name: str
    sniff: Callable[[Path, list[str]], bool]
    load: Callable[[Path], Adapter]
    save: Callable[[Adapter, str | os.PathLike[str], bool], Path]
    description: str
    priority: int = 100
    # The in-memory form (Adapter.from_state_dict / state_dict), for a format that has one.
    from_tensors: Callable[[dict[str, Tensor], Any], Adapter] | None = None
    to_tensors: Callable[[Adapter], dict[str, Tensor]] | None = None
    open_stream: Callable[[Adapter, AdapterLayout, str | os.PathLike[str], Sequence[Path], bool,
                           Callable[[], Provenance] | None], AdapterWriter] | None = None


_FORMATS: dict[str, FormatSpec] = {}


class OutputTarget(Protocol):
    """Where an adapter output goes, as the output rule decides it (formats.outputs.AdapterOutput)."""

    @property
    def path(self) -> Path: ...
    @property
    def format(self) -> str: ...
    @property
    def note(self) -> str | None: ...


# out, the format asked for (None: the adapter's own), the adapters it holds, their inputs; overwrite
OutputRule = Callable[..., OutputTarget]
_OUTPUT_RULE: list[OutputRule] = []


def set_output_rule(rule: OutputRule) -> None:
    """What an output name means (the CLI's -o rules: formats.outputs.python_output), set by lorafuse.formats
    when it is imported, for Adapter.save."""
    _OUTPUT_RULE[:] = [rule]


def output_rule() -> OutputRule:
    """The rule set_output_rule set (lorafuse.formats imported first, as for the formats themselves)."""
    _loaded()
    return _OUTPUT_RULE[0]


def register(spec: FormatSpec) -> FormatSpec:
    """Add (or replace, by name) a format."""
    _FORMATS[spec.name] = spec
    return spec


def _loaded() -> dict[str, FormatSpec]:
    """The registry, with lorafuse's own formats in it: `import lorafuse` imports lorafuse.formats only when first
    used (lorafuse/__init__'s lazy names), so `lorafuse.Adapter.from_state_dict(...).save(...)` in a fresh process
    would find no format. Imported here at call time (the model layer imports no format at import time), under
    lorafuse._lazy's lock and never by looking in sys.modules: a module is there while another thread is still
    running it, its formats not all registered yet."""
    import_module("lorafuse.formats")
    return _FORMATS


def formats() -> list[FormatSpec]:
    """The registered formats in sniffing order."""
    return sorted(_loaded().values(), key=lambda s: (s.priority, s.name))


def names() -> list[str]:
    return [s.name for s in formats()]


def get_format(name: str) -> FormatSpec:
    """The format called `name`; LorafuseValueError naming the known ones otherwise."""
    spec = _loaded().get(name) if isinstance(name, str) else None
    if spec is None:
        known = names()
        listed = ", ".join(repr(n) for n in known[:-1]) + (f" and {known[-1]!r}" if len(known) > 1 else
                                                            repr(known[0]) if known else "none")
        raise LorafuseValueError(f"unknown adapter format {name!r} (lorafuse writes {listed})")
    return spec


def sniff(path: Path, keys: list[str]) -> str | None:
    """The name of the first format (by priority) that recognises `path`, else None."""
    return next((s.name for s in formats() if s.sniff(path, keys)), None)


__all__ = ["FormatSpec", "formats", "get_format", "names", "register", "sniff"]
