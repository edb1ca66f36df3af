"""Where a recipe's model names point: a path relative to the recipe's folder (or absolute, or ~), else a
Hub id (`org/name`, `org/name@revision`) left for the verb to resolve (lorafuse.io.hub), else the path in
the recipe's folder (which the verb then reports as missing, with its full name)."""

from __future__ import annotations

from pathlib import Path


def _candidate(folder: Path, text: str) -> Path:
    p = Path(text).expanduser()
    return p if p.is_absolute() else folder / p


def exists(folder: Path, text: str) -> bool:
    return _candidate(folder, text).exists()


def is_hub_id(text: str) -> bool:
    from lorafuse.io.hub import is_hub_id as hub_id

    return hub_id(text)


def locate(folder: Path, text: str) -> str:
    """What the verb is given for the model `text` of a recipe read from `folder`."""
    candidate = _candidate(folder, text)
    if candidate.exists() or Path(text).expanduser().is_absolute():
        return str(candidate)
    return text if is_hub_id(text) else str(candidate)


__all__ = ["exists", "is_hub_id", "locate"]
