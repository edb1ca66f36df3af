"""Small helpers the format writers share."""

from __future__ import annotations


def most_common(values: list[float]) -> float:
    """The most frequent value; ties go to the first seen (the r / lora_alpha a config states)."""
    counts: dict[float, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=lambda v: (counts[v], -values.index(v)))
