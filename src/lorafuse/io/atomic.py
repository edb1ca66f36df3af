"""Outputs appear whole or not at all, and never on top of an input."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lorafuse.errors import OutputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_path(out: Path, inputs: Iterable[Path]) -> None:
    """Refuse an output that is an input, or a folder that holds one (replacing it would destroy it)."""
    target = out.resolve()
    for p in inputs:
        src = Path(p).resolve()
        if target == src or target in src.parents:
            raise OutputError(f"output {out} would overwrite the input {p}; choose another output path")


@contextmanager
def atomic_dir(out: str | os.PathLike[str], inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out` by rename.

    On any error (or interruption) the temporary folder is removed and `out` keeps
    whatever it held before.
    """
    out = Path(out)
    check_output_path(out, inputs)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the output is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / "previous")
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


@contextmanager
def atomic_file(out: str | os.PathLike[str], inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a temporary file path beside `out`; on success it replaces `out` by rename."""
    out = Path(out)
    check_output_path(out, inputs)
    if out.is_dir():
        raise OutputError(f"output {out} is a folder; give a file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the output is an ordinary file
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
