"""lorafuse: compose LoRA adapters over safetensors files: exact, fast, streaming.

The functions here (load, apply, combine, resize, extract, convert, similarity, describe, detect_format)
document their parameters: help(lorafuse.resize). What an operation that ran returns is a `Report`
(`out`, `notes`, `seconds`; an `AdapterReport` adds `ranks`): see lorafuse.ops.api and docs/api.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorafuse import _lazy
from lorafuse._progress import ProgressEvent
from lorafuse._version import get_version
from lorafuse.errors import (
    AdapterNote,
    DeviceError,
    DtypeError,
    FormatError,
    InputChangedError,
    LorafuseError,
    LorafuseValueError,
    MissingModuleError,
    NonFiniteError,
    OutputError,
    OverwriteWarning,
    RecipeError,
    ShapeMismatchError,
    UnsharedModulesError,
    UnsupportedError,
)

# The operations and the data model are imported when first used (PEP 562 `__getattr__` below), so
# `import lorafuse` and every CLI command load only what they run: `lorafuse apply` never imports combine,
# recipes or the plots, and `lorafuse --help` none of them.
_LAZY = {
    "Adapter": "lorafuse.model", "LoraUpdate": "lorafuse.model",
    "AdapterReport": "lorafuse.ops.api", "ExtractResult": "lorafuse.ops.api", "Report": "lorafuse.ops.api",
    "ResizeResult": "lorafuse.ops.api", "apply": "lorafuse.ops.api", "combine": "lorafuse.ops.api",
    "convert": "lorafuse.ops.api", "describe": "lorafuse.ops.api", "detect_format": "lorafuse.ops.api",
    "extract": "lorafuse.ops.api", "load": "lorafuse.ops.api", "resize": "lorafuse.ops.api",
    "similarity": "lorafuse.ops.api",
    "ApplyReport": "lorafuse.ops.apply",
    "METHODS": "lorafuse.ops.combine",
    "run": "lorafuse._run",
}
# Subpackages, reached as attributes after a plain `import lorafuse` (`lorafuse.backends.get_backend`), also
# imported only when first used.
_SUBPACKAGES = frozenset({"backends", "formats", "io", "model", "ops", "recipes"})

if TYPE_CHECKING:
    from lorafuse._run import run
    from lorafuse.model import Adapter, LoraUpdate
    from lorafuse.ops.api import (
        AdapterReport,
        ExtractResult,
        Report,
        ResizeResult,
        apply,
        combine,
        convert,
        describe,
        detect_format,
        extract,
        load,
        resize,
        similarity,
    )
    from lorafuse.ops.apply import ApplyReport
    from lorafuse.ops.combine import METHODS

    __version__: str


def __getattr__(name: str) -> object:
    if name != "__version__" and name not in _LAZY and name not in _SUBPACKAGES:
        raise AttributeError(f"module 'lorafuse' has no attribute {name!r}")
    # One thread at a time (lorafuse._lazy): threads making their first calls at once would import the same
    # circular packages from different ends and get partially initialized modules.
    with _lazy.LOCK:
        if name in globals():  # another thread imported it while this one waited
            return globals()[name]
        if name == "__version__":  # pyproject.toml's version (lorafuse._version): it loads the core, so only when asked
            value: object = get_version()
        elif name in _LAZY:
            value = getattr(_lazy.import_module(_LAZY[name]), name)
        else:
            value = _lazy.import_module(f"lorafuse.{name}")
        globals()[name] = value  # the next lookup finds it directly
    return value


def __dir__() -> list[str]:
    """The public names (__all__) and the module's own dunders; not the names this file imports for itself."""
    return sorted(set(__all__) | {n for n in globals() if n.startswith("__") and n.endswith("__")})


__all__ = [
    "AdapterNote",
    "Adapter",
    "AdapterReport",
    "ApplyReport",
    "convert",
    "METHODS",
    "DtypeError",
    "ExtractResult",
    "FormatError",
    "InputChangedError",
    "LoraUpdate",
    "LorafuseError",
    "LorafuseValueError",
    "MissingModuleError",
    "NonFiniteError",
    "DeviceError",
    "OutputError",
    "OverwriteWarning",
    "RecipeError",
    "ProgressEvent",
    "Report",
    "ResizeResult",
    "ShapeMismatchError",
    "UnsharedModulesError",
    "UnsupportedError",
    "__version__",
    "apply",
    "combine",
    "describe",
    "detect_format",
    "extract",
    "load",
    "resize",
    "run",
    "similarity",
]
