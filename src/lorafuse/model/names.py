"""Module names and kinds, shared by every update class and format."""

from __future__ import annotations

from typing import Literal

from lorafuse.errors import FormatError

Kind = Literal["linear", "conv", "embedding"]
MAX_NAME_LENGTH = 1024  # real module names are under 200 characters


def check_module_name(name: str, where: str, what: str = "module") -> None:
    """Refuse a module (or tensor) name read from a file that no model can have and that could
    do harm on its way to messages, terminals or other tools: empty, very long, with control or
    other non-printable characters (NUL, newlines, escapes, bidi overrides), with a path
    separator, or with an empty dotted component ('a..b', '.a', 'a.')."""
    problem = None
    if not name:
        problem = "is empty"
    elif len(name) > MAX_NAME_LENGTH:
        problem = f"has {len(name)} characters (at most {MAX_NAME_LENGTH})"
    elif not name.isprintable():
        bad = next(c for c in name if not c.isprintable())
        problem = f"holds the non-printable character U+{ord(bad):04X}"
    elif "/" in name or "\\" in name:
        problem = "holds a path separator ('/' or '\\')"
    elif "" in name.split("."):
        problem = "has an empty component (a leading, trailing or doubled '.')"
    if problem is not None:
        shown = repr(name) if len(name) <= 200 else repr(name[:200]) + "..."
        raise FormatError(f"{where}: {what} name {shown} {problem}")
