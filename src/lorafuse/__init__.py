"""lorafuse: compose LoRA adapters over safetensors files: exact, fast, streaming."""

from __future__ import annotations

from lorafuse._progress import ProgressEvent
from lorafuse._version import get_version
from lorafuse.errors import (
    AdapterNote,
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
from lorafuse.formats import detect_format, load
from lorafuse.model import Adapter, LoraUpdate
from lorafuse.ops.apply import ApplyReport, apply
from lorafuse.ops.combine import METHODS, combine
from lorafuse.ops.convert import convert
from lorafuse.ops.info import describe
from lorafuse.ops.similarity import similarity

__version__ = get_version()  # pyproject.toml's version (lorafuse._version)

__all__ = [
    "AdapterNote",
    "Adapter",
    "ApplyReport",
    "convert",
    "METHODS",
    "DtypeError",
    "FormatError",
    "InputChangedError",
    "LoraUpdate",
    "LorafuseError",
    "LorafuseValueError",
    "MissingModuleError",
    "NonFiniteError",
    "OutputError",
    "OverwriteWarning",
    "ProgressEvent",
    "ShapeMismatchError",
    "UnsupportedError",
    "__version__",
    "apply",
    "combine",
    "describe",
    "detect_format",
    "load",
    "similarity",
]
