"""Text on its way to a terminal: names read from files must not drive it.

Module names, tensor names, metadata values and paths come from files, and a name can hold
ESC (colour, cursor moves, window titles), BEL, CR (overwrite the line shown), other C0 / C1
controls, or bidi overrides (show text in another order than it is). `printable` writes each
of them as a visible escape (`\\x1b`, `\\u202e`), keeping the line breaks of our own
multi-line messages; the CLI passes every message, note, summary and table line through it.
"""

from __future__ import annotations


def _escape(c: str) -> str:
    o = ord(c)
    if o < 0x100:
        return f"\\x{o:02x}"
    if o < 0x10000:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


def _printable_line(line: str) -> str:
    if line.isprintable():
        return line
    return "".join(c if c.isprintable() else _escape(c) for c in line)


def printable(text: object, keep_newlines: bool = True) -> str:
    """`str(text)` with every non-printable character (controls, bidi overrides, lone surrogates,
    non-space separators; see `str.isprintable`) escaped, except the line feeds between lines
    unless `keep_newlines` is False (one-line displays such as a progress bar). The result is
    identical to the input when it is plain printable text."""
    s = str(text)
    if s.isprintable():
        return s
    if not keep_newlines:
        return _printable_line(s)
    return "\n".join(_printable_line(line) for line in s.split("\n"))


def plural(n: int, word: str, many: str | None = None, verb: tuple[str, str] | None = None) -> str:
    """'1 adapter', '2 adapters' (`many`: the plural when it is not word + 's'); with `verb` = ('has', 'have'):
    '1 module has', '2 modules have'."""
    counted = f"{n:,} {word if n == 1 else (many or word + 's')}"
    return counted if verb is None else f"{counted} {verb[0] if n == 1 else verb[1]}"


SHOWN_CHARS = 200  # of a name, key or value read from a file, in a message: real names are far shorter


def short(value: object, limit: int = SHOWN_CHARS) -> str:
    """How a message shows a name, key or value read from a file: its repr, cut to `limit` characters with its
    full length said when longer (a hostile header's 50 MB tensor name is not a 50 MB message). A long str is
    cut before its repr is made."""
    if isinstance(value, str) and len(value) > limit:
        return f"{repr(value[:limit])[:limit - 3]}... ({len(value):,} characters)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}..."
