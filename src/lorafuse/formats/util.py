"""Small helpers the format writers share."""

from __future__ import annotations

import os
from pathlib import Path

from lorafuse.errors import FormatError
from lorafuse.io.safetensors import read_header


def most_common(values: list[float]) -> float:
    """The most frequent value; ties go to the first seen (the r / lora_alpha a config states)."""
    counts: dict[float, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=lambda v: (counts[v], -values.index(v)))


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
