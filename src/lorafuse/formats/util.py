"""Small helpers the format writers share."""

from __future__ import annotations

import os
from pathlib import Path

from lorafuse.errors import FormatError
from lorafuse.io.safetensors import read_header
from lorafuse.model.arithmetic import most_common

__all__ = ["most_common", "safetensors_keys"]


def safetensors_keys(path: str | os.PathLike[str]) -> list[str]:
    """The tensor names of a readable `.safetensors` file (header only); [] for anything else."""
    p = Path(path)
    if not (p.is_file() and p.name.lower().endswith(".safetensors")):  # suffixes in any case
        return []
    try:
        tensors, _, _ = read_header(p)
    except FormatError:
        return []
    return list(tensors)
