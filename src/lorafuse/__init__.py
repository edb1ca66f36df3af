"""lorafuse: compose LoRA adapters over safetensors files: exact, fast, streaming."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from lorafuse import _core
from lorafuse.adapter import Adapter, LoraUpdate
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
from lorafuse.ops.apply import ApplyReport, apply
from lorafuse.ops.combine import METHODS, combine
from lorafuse.ops.convert import convert
from lorafuse.ops.info import describe
from lorafuse.ops.similarity import similarity


def _version() -> str:
    """pyproject.toml's version, as installed (the one place it is written)."""
    try:
        return version("lorafuse")
    except PackageNotFoundError:  # a source tree on sys.path without an install
        return str(_core.__version__)


__version__ = _version()

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
