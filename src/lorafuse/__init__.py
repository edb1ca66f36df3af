"""lorafuse: compose LoRA adapters over safetensors files: exact, fast, streaming.

The functions here (load, apply, combine, resize, extract, convert, similarity, describe, detect_format)
document their parameters: help(lorafuse.resize). What an operation that ran returns is a `Report`
(`out`, `notes`, `seconds`; an `AdapterReport` adds `ranks`): see lorafuse.ops.api and docs/api.md.
"""

from __future__ import annotations

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
    ShapeMismatchError,
    UnsupportedError,
)
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

__version__ = get_version()  # pyproject.toml's version (lorafuse._version)

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
    "ProgressEvent",
    "Report",
    "ResizeResult",
    "ShapeMismatchError",
    "UnsupportedError",
    "__version__",
    "apply",
    "combine",
    "describe",
    "detect_format",
    "extract",
    "load",
    "resize",
    "similarity",
]
