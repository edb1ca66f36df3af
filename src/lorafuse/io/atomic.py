"""Outputs appear whole or not at all, and never on top of an input.

A run writes `.NAME.tmp-PID-XXXXXXXX` beside the output NAME (holding an advisory
lock on it while it lives) and renames it over NAME once complete: a file with
rename(2), a folder with an atomic exchange of the two names where the system has
one (Linux renameat2 RENAME_EXCHANGE), so that NAME holds the previous output or
the new one at every instant, and concurrent runs into the same NAME end with one
run's whole output. A run killed outright leaves its temporary entry behind; the
next run writing NAME removes the entries of runs that are gone.

No fsync: this guards against interrupted processes and failed writes, not against
a power loss or a kernel crash.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lorafuse.errors import OutputError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locks, no cleanup of leftovers
    fcntl = None  # type: ignore[assignment]

# Errors that say the output cannot be written (full disk, quota, file size limit, read-only).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}
_RETRIES = 100  # renames retried while other runs replace the same output


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


def _write_error(out: Path, e: OSError, existed: bool) -> OutputError:
    what = f"{out} is unchanged" if existed else "nothing was written"
    return OutputError(f"cannot write the output {out}: {e.strerror or e}; the temporary output was removed and {what}")


@contextmanager
def _cleanup_on_error(out: Path, existed: bool, cleanup: Callable[[], None], commit: bool = False) -> Iterator[None]:
    """Run `cleanup` on any error; write errors (and any error while renaming into place) become OutputError."""
    try:
        yield
    except BaseException as e:
        cleanup()
        if isinstance(e, OSError) and (commit or e.errno in _WRITE_ERRNOS):
            raise _write_error(out, e, existed) from e
        raise


def _lock(fd: int) -> None:
    """Mark a temporary entry as owned by a live run (released by the kernel when the process dies)."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass


def _owner_gone(path: Path, pid: int) -> bool:
    """True when the run that made `path` has ended: its pid is not alive and nobody holds the lock."""
    if fcntl is None or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
        return False  # alive (or the pid was reused): leave it
    except ProcessLookupError:
        pass
    except (OSError, OverflowError):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True  # another pid namespace's live run would hold it
    except OSError:
        return False
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def remove_stale(out: Path) -> list[str]:
    """Remove what killed runs left beside `out` (returns the names removed).

    A `.old-` entry holds the output that a killed run had moved aside: it is put back
    when `out` is missing."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)-[a-z0-9_]{{8}}\Z")
    removed: list[str] = []
    try:
        entries = sorted(out.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or not _owner_gone(entry, int(m.group(2))):
            continue
        if m.group(1) == "old" and not os.path.lexists(out):
            try:
                os.rename(entry, out)
                continue
            except OSError:
                pass
        _remove(entry)
        removed.append(entry.name)
    return removed


def _prepare(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the folder {out.parent} for the output {out}: {e.strerror or e}") from e
    remove_stale(out)


def _renameat2() -> object | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, other libcs
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the system or file system cannot."""
    if _RENAMEAT2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if _RENAMEAT2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:  # type: ignore[operator]
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` at `out`, which holds the previous or the new output at every instant
    (where the exchange is available); the previous output is then removed."""
    for _ in range(_RETRIES):
        try:
            os.rename(tmp, out)  # no output yet (or an empty folder)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        try:
            if _exchange(tmp, out):
                _remove(tmp)  # the previous output, now at tmp
                return
        except FileNotFoundError:  # another run moved `out` meanwhile
            continue
        # No atomic exchange: move the previous output aside, then put ours in place.
        old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.rename(out, old)
        except FileNotFoundError:  # another run moved it meanwhile
            continue
        try:
            os.rename(tmp, out)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):  # another run's output got there first: go again
                _remove(old)
                continue
            try:
                os.rename(old, out)  # put the previous output back
            except OSError:
                if os.path.lexists(out):  # another run's output is there now
                    _remove(old)
            raise
        _remove(old)
        return
    raise OutputError(f"cannot replace the output {out}: other processes keep replacing it")


@contextmanager
def atomic_dir(out: str | os.PathLike[str], inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out` by rename.

    On any error (or interruption) the temporary folder is removed and `out` keeps
    whatever it held before. Write errors (full disk, quota, size limit, read-only file
    system) are raised as OutputError naming `out`.
    """
    out = Path(out)
    check_output_path(out, inputs)
    try:
        existed = stat.S_ISDIR(os.stat(out).st_mode)  # one look: another run may be replacing `out`
        if not existed:
            raise OutputError(f"output {out} exists and is not a folder")
    except (FileNotFoundError, NotADirectoryError):
        existed = False
    _prepare(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    except OSError as e:
        raise OutputError(f"cannot create a temporary folder beside the output {out}: {e.strerror or e}") from e
    try:
        fd = os.open(tmp, os.O_RDONLY)
    except OSError as e:
        _remove(tmp)
        raise OutputError(f"cannot open the temporary folder {tmp}: {e.strerror or e}") from e
    try:
        _lock(fd)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the output is an ordinary folder
        with _cleanup_on_error(out, existed, lambda: shutil.rmtree(tmp, ignore_errors=True)):
            yield tmp
        with _cleanup_on_error(out, existed, lambda: shutil.rmtree(tmp, ignore_errors=True), commit=True):
            _replace_dir(tmp, out)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(out: str | os.PathLike[str], inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a temporary file path beside `out`; on success it replaces `out` by rename.

    Errors as for atomic_dir."""
    out = Path(out)
    check_output_path(out, inputs)
    if out.is_dir():
        raise OutputError(f"output {out} is a folder; give a file name")
    existed = out.exists()
    _prepare(out)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent)
    except OSError as e:
        raise OutputError(f"cannot create a temporary file beside the output {out}: {e.strerror or e}") from e
    tmp = Path(name)
    try:
        _lock(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the output is an ordinary file
        with _cleanup_on_error(out, existed, lambda: tmp.unlink(missing_ok=True)):
            yield tmp
        with _cleanup_on_error(out, existed, lambda: tmp.unlink(missing_ok=True), commit=True):
            os.replace(tmp, out)
    finally:
        os.close(fd)
