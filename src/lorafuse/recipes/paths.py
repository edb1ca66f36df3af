"""Where a recipe's model names point: a path relative to the recipe's folder (or absolute, or ~), else a
Hub id (`org/name`, `org/name@revision`) left for the verb to resolve (lorafuse.io.hub), else the path in
the recipe's folder (which the verb then reports as missing, with its full name).

A name that cannot be a path at all (`~user/...` of a user that does not exist, a file name longer than the file
system takes) is refused by checks.py naming the recipe's line and field (path_problem); the functions here never
raise for it (a name that cannot be looked at does not exist)."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def _expanded(text: str) -> Path:
    """`text` as a path, `~` and `~user` expanded (left as written when that user's home cannot be told)."""
    try:
        return Path(text).expanduser()
    except RuntimeError:  # ~nosuchuser, or no home folder: path_problem refuses it first
        return Path(text)


def is_absolute(text: str) -> bool:
    """Whether the model `text` names an absolute path (`~` expanded), not one from the recipe's folder."""
    return _expanded(text).is_absolute()


def _candidate(folder: Path, text: str) -> Path:
    p = _expanded(text)
    return p if p.is_absolute() else folder / p


def exists(folder: Path, text: str) -> bool:
    try:
        return os.path.exists(_candidate(folder, text))
    except (OSError, ValueError):
        return False


def path_problem(folder: Path, text: str) -> str | None:
    """Why the model `text` of a recipe read from `folder` cannot name a path, or None: `~user` of a user whose
    home folder cannot be told, a file name longer than the file system takes."""
    if text.startswith("~"):
        try:
            Path(text).expanduser()
        except RuntimeError:
            user = text[1:].split("/", 1)[0]
            return (f"{text!r}: the home folder of {'user ' + repr(user) if user else 'the current user'} cannot be "
                    f"told (no such user); for a folder named {text.split('/', 1)[0]!r} beside the recipe, write "
                    f"./{text}")
    try:
        os.stat(_candidate(folder, text))
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            longest = max(_candidate(folder, text).parts, key=len)
            return (f"{text!r}: a name in it is longer than the file system takes ({len(os.fsencode(longest))} bytes: "
                    f"{e.strerror})")
    except ValueError:  # a NUL: the schema refuses it first
        return None
    return None


def is_hub_id(text: str) -> bool:
    from lorafuse.io.hub import is_hub_id as hub_id

    return hub_id(text)


def locate(folder: Path, text: str) -> str:
    """What the verb is given for the model `text` of a recipe read from `folder`."""
    candidate = _candidate(folder, text)
    if exists(folder, text) or is_absolute(text):
        return str(candidate)
    return text if is_hub_id(text) else str(candidate)


__all__ = ["exists", "is_absolute", "is_hub_id", "locate", "path_problem"]
