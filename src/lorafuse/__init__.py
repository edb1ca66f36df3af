"""lorafuse: compose LoRA adapters over safetensors files: exact, fast, streaming."""

from __future__ import annotations

__version__ = "0.1.0"

from lorafuse.adapter import Adapter, LoraUpdate
from lorafuse.errors import (
    DtypeError,
    FormatError,
    LorafuseError,
    LorafuseValueError,
    MissingModuleError,
    NonFiniteError,
    OutputError,
    ShapeMismatchError,
    UnsupportedError,
)
from lorafuse.formats import detect_format, load
from lorafuse.ops.apply import ApplyReport, apply
from lorafuse.ops.combine import METHODS, combine
from lorafuse.ops.convert import convert
from lorafuse.ops.info import describe
from lorafuse.ops.similarity import similarity

__all__ = [
    "Adapter",
    "ApplyReport",
    "convert",
    "METHODS",
    "DtypeError",
    "FormatError",
    "LoraUpdate",
    "LorafuseError",
    "LorafuseValueError",
    "MissingModuleError",
    "NonFiniteError",
    "OutputError",
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
