"""Outputs appear whole or not at all, never on top of an input, and never on top of what the user
did not ask lorafuse to replace.

What an output path may hold before a run (checked before any work, and again just before the rename):

* nothing, an empty folder (a folder output) or an empty file (a file output): written;
* an earlier lorafuse output of the same kind (a re-run: io.manifest.KINDS, a merged model, a diffusers
  pipeline, an adapter or a plot): replaced. lorafuse recognises its outputs (see io.manifest): a folder by
  `lorafuse_manifest.json` listing exactly what the folder holds (and its `kind`), a .safetensors file by the
  `lorafuse_version` key of its metadata (a merged model when its `lorafuse.operation` is apply), a PNG by a
  text chunk; an SVG, PDF or JPEG plot by the `lorafuse_version VERSION` text that lorafuse.plot puts in its
  description, keywords or comment (plot_is_ours, below);
* an earlier lorafuse output of another kind (a merged model where an adapter is written, say: a mistyped
  -o): refused as the user's are, unless overwrite=True, which replaces it and says so;
* anything else (a folder of the user's, a lorafuse folder the user added files to, a file lorafuse did
  not write): refused with an OutputError naming the path and what it holds, unless overwrite=True
  (CLI --overwrite), which replaces it and says so (an OverwriteWarning; the CLI prints a note).

Refused whatever `overwrite` says: an output that is, or holds, the current folder or an input; an
output inside an input folder; a symbolic link (lorafuse would replace the link, not what it points
to); a folder where a file goes and the reverse; a FIFO, socket or device. Paths are compared as the
system sees them, not as they are spelled: `..` and links are resolved, folders are also compared by
identity (device and inode: a bind mount, another spelling on a case-insensitive file system), and an
input folder counts with what its links lead to (a Hugging Face snapshot's files are links into
`blobs/`: an output holding that folder holds the input).

What an output's name means (output_file, names_file): a name that ends in a path separator (or in `/.`), or an
existing folder, names a folder to write a one-file output into (the file gets a default name there);
the folder must itself be a place an output may be (not the current folder or one above it, not an
input folder or a folder holding an input).

A run writes `.NAME.tmp-PID-XXXXXXXX` beside the output NAME (holding an advisory
lock on it while it lives) and renames it over NAME once complete: a file with
rename(2), a folder with an atomic exchange of the two names where the system has
one (Linux renameat2 RENAME_EXCHANGE), so that NAME holds the previous output or
the new one at every instant, and concurrent runs into the same NAME end with one
run's whole output. A run killed outright leaves its temporary entry behind; the
next run writing NAME removes the entries of runs that are gone: those marked as
lorafuse's (TEMP_XATTR, an extended attribute) or empty, never a user's file or folder
that only has such a name (where the file system keeps no extended attributes, the
name decides).

No fsync: this guards against interrupted processes and failed writes, not against
a power loss or a kernel crash.
"""

from __future__ import annotations

import contextvars
import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lorafuse._validate import check_bool
from lorafuse.errors import LorafuseValueError, OutputError, OverwriteWarning, is_from_caller, warn
from lorafuse.io.manifest import (
    KINDS,
    MANIFEST_NAME,
    MARKER_KEY,
    PLOT,
    STAMP_XATTR,
    FolderState,
    inspect_folder,
    own_file_kind,
    same_kind,
    stamp,
    stamp_differs,
    stamp_tree,
    write_manifest,
)
from lorafuse.io.safetensors import os_error_text, raise_if_inputs_changed

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locks, no cleanup of leftovers
    fcntl = None  # type: ignore[assignment]

# Errors that say the output cannot be written (full disk, quota, file size limit, read-only).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}
_RETRIES = 100  # renames retried while other runs replace the same output


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux 4.7+: /proc/self/status):
    setting it to 0 for a moment, as os.umask must to read it, would give every file that the caller's other
    threads (or this process's other runs) create meanwhile the mode 0o666 / 0o777, writable by everyone."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # elsewhere: at least lorafuse's own threads never see the 0
        mask = os.umask(0)
        os.umask(mask)
    return mask


# How messages name the switch that replaces an output: the Python API's keyword, the CLI's flag inside
# overwrite_named("--overwrite") (cli.main)
_OVERWRITE_WORDS: contextvars.ContextVar[str] = contextvars.ContextVar("lorafuse_overwrite_words",
                                                                     default="overwrite=True")


@contextmanager
def overwrite_named(words: str) -> Iterator[None]:
    """Inside this block messages name the switch that replaces an output `words` (the CLI's '--overwrite');
    elsewhere the Python API's overwrite=True."""
    token = _OVERWRITE_WORDS.set(words)
    try:
        yield
    finally:
        _OVERWRITE_WORDS.reset(token)


def overwrite_words() -> str:
    """'overwrite=True', or what overwrite_named says (the CLI: '--overwrite')."""
    return _OVERWRITE_WORDS.get()


def _overwrite_hint() -> str:
    words = overwrite_words()
    return f"pass {words}{' (Python: overwrite=True)' if words != 'overwrite=True' else ''} to replace it"


def _location(out: Path) -> Path:
    """Where `out` is: its folder with links resolved, and its own name (a link named as the output is
    not followed: it is what would be replaced). '.', '..' and '/' resolve whole."""
    if out.name in ("", ".", ".."):
        return out.resolve()
    return out.parent.resolve() / out.name


def _cwd() -> Path | None:
    try:
        return Path.cwd().resolve()
    except OSError:  # the current folder was removed
        return None


_LINK_WALK_ENTRIES = 20_000  # entries of an input folder looked at for links that lead out of it
_LINK_WALK_DEPTH = 4  # folder levels below an input folder (a pipeline's component folders are one)


_LOOKS = threading.local()  # .seen: path -> its os.stat (or None), while one check of an output lasts (_looking)


@contextmanager
def _looking() -> Iterator[None]:
    """Each path's os.stat taken once while the context lasts (this thread): the thousands of inputs of one
    combine share their folders above, which every input's relation to the output looks at."""
    outer = getattr(_LOOKS, "seen", None)
    _LOOKS.seen = {} if outer is None else outer
    try:
        yield
    finally:
        _LOOKS.seen = outer


def _stat(path: Path) -> os.stat_result | None:
    seen: dict[Path, os.stat_result | None] | None = getattr(_LOOKS, "seen", None)
    if seen is not None and path in seen:
        return seen[path]
    try:
        st: os.stat_result | None = os.stat(path)
    except (OSError, ValueError):
        st = None
    if seen is not None:
        seen[path] = st
    return st


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of what `path` leads to, or None when it cannot be looked at."""
    st = _stat(path)
    return None if st is None else (st.st_dev, st.st_ino)


def _folder_identity(path: Path) -> tuple[int, int] | None:
    """_identity of a folder; None for anything else."""
    st = _stat(path)
    return (st.st_dev, st.st_ino) if st is not None and stat.S_ISDIR(st.st_mode) else None


def _above(path: Path) -> set[tuple[int, int]]:
    """The identities of the existing folders above `path` (not `path` itself)."""
    return {i for i in map(_identity, path.parents) if i is not None}


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` lies below `folder` (`folder in path.parents`, both absolute and normalized), by text."""
    top, text = str(folder), str(path)
    return text != top and text.startswith(top if top.endswith(os.sep) else top + os.sep)


def _links_out(folder: Path) -> list[tuple[Path, Path]]:
    """(link, where it leads) for the links inside `folder` (a few levels down, hidden folders skipped)
    that lead out of it: the files a Hugging Face snapshot reads live in its `blobs/` folder."""
    found: list[tuple[Path, Path]] = []
    budget = _LINK_WALK_ENTRIES
    stack = [(folder, 0)]
    while stack and budget > 0:
        here, depth = stack.pop()
        try:
            entries = list(os.scandir(here))
        except OSError:
            continue
        for entry in entries[:budget]:
            budget -= 1
            try:
                if entry.is_symlink():
                    target = Path(entry.path).resolve()
                    if target != folder and folder not in target.parents:
                        found.append((Path(entry.path), target))
                elif entry.is_dir(follow_symlinks=False) and depth + 1 < _LINK_WALK_DEPTH \
                        and not entry.name.startswith("."):
                    stack.append((Path(entry.path), depth + 1))
            except (OSError, RuntimeError):  # a loop of links, a vanished entry
                continue
    return found


_HELD_WALK = 20000  # entries of an existing output folder compared with the inputs


def _held_inside(out: Path, inputs: dict[tuple[int, int], str]) -> tuple[str, Path] | None:
    """(input, its place inside `out`) when an existing output folder holds an input folder by identity (device,
    inode): the input may be named through a bind mount elsewhere. Links are not followed."""
    if not inputs or not os.path.isdir(out) or os.path.islink(out):
        return None
    stack, seen = [Path(out)], 0
    while stack and seen < _HELD_WALK:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    seen += 1
                    st = entry.stat(follow_symlinks=False)
                    if not stat.S_ISDIR(st.st_mode):  # a hard link to an input file: deleting it loses nothing
                        continue
                    name = inputs.get((st.st_dev, st.st_ino))
                    if name is not None:
                        return name, Path(entry.path)
                    stack.append(Path(entry.path))
        except OSError:
            continue
    return None


def _input_places(inputs: Iterable[Path]) -> list[tuple[str, Path]]:
    """(how to name it, where it is) for every input, resolved, and for what the links inside an input
    folder lead to."""
    places: list[tuple[str, Path]] = []
    for p in inputs:
        src = Path(os.path.realpath(p))  # a loop of links stays as it is (Path.resolve raises RuntimeError)
        places.append((str(p), src))
        if src.is_dir():
            places += [(f"{link} (a link to {target})", target) for link, target in _links_out(src)]
    return places


def _home() -> Path | None:
    """The home folder (links resolved), or None where it cannot be told."""
    try:
        home = os.path.expanduser("~")
        return Path(home).resolve() if home != "~" and os.path.isdir(home) else None
    except (OSError, RuntimeError, ValueError):
        return None


def _relation(out: Path, target: Path, places: list[tuple[str, Path]], into: str | None = None) -> str | None:
    """Why writing `target` (the output `out`, located) would destroy or change the current folder or an
    input, or None. `places`: _input_places of the inputs. `into`: `out` is a folder named to write the
    file `into` in (not replaced: written into), which must not be any of those either."""
    cwd = _cwd()
    named = str(out) if str(out) == str(target) else f"{out} ({target})"
    target_id = _folder_identity(target)
    target_same = _identity(target)  # a file too: the same file under another name (a bind mount, a hard link)
    target_above = _above(target)
    why = ("a folder named as the output of a one-file command may not be the current folder or one above it, "
           "an input folder or a folder holding an input")
    example = _example(out, into, places) if into is not None else None
    if into is not None and os.path.exists(target) and not os.path.isdir(target):  # `-o input.safetensors/`
        todo = f"give the output file's full name ({out} is a file, not a folder to write into)"
    else:
        todo = "give the output file's full name" + ("" if example is None else f", e.g. {example}")
    if cwd is not None:
        cwd_id = _identity(cwd)
        if target == cwd or (target_id is not None and target_id == cwd_id):
            if into is not None:
                return f"output {named} is the current folder; {why}: {todo}"
            return (f"output {named} is the current folder; lorafuse replaces an output as a whole, which would "
                    "delete the folder you are in and everything in it: give a new folder name, e.g. ./merged")
        if _inside(cwd, target) or (target_id is not None and target_id in _above(cwd)):
            if into is not None:
                return f"output {named} holds the current folder {cwd}; {why}: {todo}"
            return (f"output {named} holds the current folder {cwd}; replacing it would delete that folder "
                    "and everything beside it: give a new folder name")
    home = _home()
    if into is None and home is not None and (target == home or target in home.parents):
        return (f"output {named} {'is' if target == home else 'holds'} your home folder {home}; lorafuse replaces an "
                "output as a whole, which would delete everything in it, --overwrite or not: give a new folder "
                "name, e.g. ~/merged")
    for p, src in places:
        src_id = _folder_identity(src)
        if target == src or (target_same is not None and target_same == _identity(src)):
            if into is not None:
                return f"output {out} is the input {p}; {why}: {todo}"
            return f"output {out} would overwrite the input {p}; choose another output path"
        if _inside(src, target) or (target_id is not None and target_id in _above(src)):
            if into is not None:
                return f"output {out} holds the input {p}, which is inside it; {why}: {todo}"
            return (f"output {out} would overwrite the input {p}, which is inside it (replacing {out} deletes "
                    "everything in it); choose another output path")
        if src_id is not None and (_inside(target, src) or src_id in target_above):
            if into is not None:
                return f"output {out} is inside the input folder {p}; {why}: {todo}"
            return (f"output {out} is inside the input folder {p}; writing there would change an input: choose a "
                    "path outside it")
    return None


def _example(out: Path, into: str, places: list[tuple[str, Path]]) -> Path | None:
    """The output file to suggest for a refused `-o FOLDER/`: FOLDER/into, unless that is refused itself (an
    input, or inside an input folder: `-o ADAPTER/` of the adapter folder itself), then None."""
    candidate = out / into
    try:
        refused = _relation(candidate, candidate.resolve(), places)
    except (OSError, ValueError, RuntimeError):
        return None
    return None if refused else candidate


def _located(out: Path) -> list[Path]:
    try:
        return [_location(out), out.resolve()]
    except (OSError, ValueError, RuntimeError) as e:  # a NUL in the path, a loop of links
        raise LorafuseValueError(f"output {out}: not a usable path: {e}") from None


def check_output_path(out: str | os.PathLike[str], inputs: Iterable[Path] = ()) -> None:
    """Refuse (OutputError) an output that is or holds the current folder or an input, or that lies
    inside an input folder: replacing it would destroy or change them, `overwrite` or not. Symbolic
    links are resolved (an output that is a link is checked where it points too), folders are also
    compared by identity, and the links inside an input folder count as inputs where they lead."""
    text = os.fsdecode(os.fspath(out))
    out = Path(out)
    first = text.split(os.sep, 1)[0]
    if first.startswith("~") and os.path.expanduser(first) != first and not os.path.lexists(first):
        raise LorafuseValueError(f"output {text!r}: a leading ~ is read as a home folder by a shell, not in Python, "
                                 f"so this would create a folder named {first!r} here: give the path in full "
                                 f"({os.path.expanduser(text)!r}), or {os.path.abspath(text)!r} for a folder of that "
                                 "name (./~/... on the command line)")
    with _looking():
        places = _input_places(inputs)
        for target in _located(out):
            why = _relation(out, target, places)
            if why:
                raise OutputError(why)
        held = _held_inside(out, {i: p for p, src in places if (i := _identity(src)) is not None})
    if held is not None:  # an input named through a bind mount or a hard link, whose own path is elsewhere
        raise OutputError(f"output {out} would overwrite the input {held[0]}, which is inside it as {held[1]} "
                          "(replacing it deletes everything in it); choose another output path")
    if out.name in ("", ".", "..") or not out.name.strip():
        raise LorafuseValueError(f"output {os.fsdecode(out)!r}: give the output a name (a path that ends in a file or "
                                 "folder name, not in spaces)")


def _ends_as_folder(text: str) -> bool:
    """Whether a path's text ends as only a folder's can: in a path separator (`out/`), or in `.` or `..`
    (`out/.`, which pathlib shortens to `out`)."""
    return text.replace(os.altsep or os.sep, os.sep).rsplit(os.sep, 1)[-1] in ("", ".", "..")


def names_folder(out: str | os.PathLike[str]) -> bool:
    """Whether `out` names a folder: it ends in a path separator (`out/`) or in `/.` (`out/.`), or is an existing
    folder (links followed)."""
    text = os.fsdecode(os.fspath(out))
    return _ends_as_folder(text) or os.path.isdir(text)


def names_file(out: str | os.PathLike[str], suffix: str = ".safetensors") -> bool:
    """Whether `out` names one file of the kind `suffix` says: its name ends in `suffix` (any case) and no
    path separator (nor `/.`) follows."""
    text = os.fsdecode(os.fspath(out))
    return not _ends_as_folder(text) and text.lower().endswith(suffix.lower()) \
        and len(Path(text).name) > len(suffix)


def output_file(out: str | os.PathLike[str], name: str, inputs: Iterable[Path] = (),
                suffix: str = ".safetensors") -> Path:
    """Where a one-file output named `out` goes: `out` itself, or `out/name` when `out` names a folder
    (names_folder) and not a `suffix` file (names_file: `x.safetensors` is a file, even where a folder of
    that name exists, and is refused there by check_output). The folder must be a place an output may be:
    OutputError when it is or holds the current folder or an input, or is inside an input folder."""
    if names_file(out, suffix) or not names_folder(out):
        return Path(out)
    folder = Path(out)
    with _looking():
        places = _input_places(inputs)
        for target in _located(folder):
            why = _relation(folder, target, places, into=name)
            if why:
                raise OutputError(why)
    return folder / name


def _listing(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _folder_state(out: Path) -> tuple[FolderState | None, str]:
    """The folder `out` as inspect_folder sees it: (None, '') when it is gone, (None, reason) when it
    cannot be read. A verdict on a folder that another run moved away meanwhile (it replaced `out`) is
    taken again on what `out` holds now."""
    for _ in range(_RETRIES):
        try:
            state = inspect_folder(out)
        except (FileNotFoundError, NotADirectoryError):
            return None, ""
        except OSError as e:
            return None, e.strerror or str(e)
        if state.empty or state.ours or state.current:
            return state, ""
        # another run replaced `out` while it was read (and is removing the folder read): look again
    return state, ""


def _mount_table() -> list[str] | None:
    """The mount points of this process (Linux: /proc/self/mountinfo), or None where there is no such table."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            return [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split(" ")[4])
                    for line in f if line.count(" ") >= 5]
    except OSError:
        return None


def is_mount_point(path: Path) -> bool:
    """Whether `path` itself (links followed) is a mount point: another file system, or a bind mount of a folder or
    a file (`docker run -v host:/out`), which a rename can neither replace nor move (EBUSY)."""
    try:
        real = os.path.realpath(path)
    except (OSError, ValueError):
        return False
    points = _mount_table()
    return real in points if points is not None else os.path.ismount(real)


def mounts_under(folder: Path) -> list[str]:
    """The mount points inside `folder` (Linux: /proc/self/mountinfo; a bind mount of a folder of the same file
    system has its device and inode, so only the mount table tells), else those with another device number."""
    try:
        root = os.path.realpath(folder)
    except (OSError, ValueError):
        return []
    inside = root.rstrip(os.sep) + os.sep
    points = _mount_table()
    if points is not None:
        return sorted(p for p in points if p.startswith(inside))
    found = []
    try:
        dev = os.lstat(root).st_dev
        for top, dirs, _ in os.walk(root):
            for d in list(dirs):
                p = os.path.join(top, d)
                if os.lstat(p).st_dev != dev:
                    found.append(p)
                    dirs.remove(d)
    except OSError:
        pass
    return found


def _judge_folder(out: Path, overwrite: bool, kind: str | None = None) -> str | None:
    """None when the existing folder `out` may be replaced silently (empty, or lorafuse's own output
    untouched, of the same `kind`); the note of what is replaced with `overwrite`; else raises OutputError."""
    mounted = mounts_under(out)
    if mounted:  # replacing the folder would delete what is mounted there: another file system, or an input
        raise OutputError(f"output {out} holds a mount point ({mounted[0]}{', ...' if len(mounted) > 1 else ''}); "
                          f"lorafuse never deletes across a mount, even with {overwrite_words()}: unmount it, or give "
                          "another path")
    state, unreadable = _folder_state(out)
    if state is None and not unreadable:  # gone meanwhile (another run is replacing it): nothing to lose
        return None
    if state is not None and state.empty:
        return None
    if state is not None and state.ours:
        if same_kind(state.kind, kind):
            return None
        return _other_kind(out, f"an earlier lorafuse output holding {KINDS[str(state.kind)]} (its {MANIFEST_NAME} "
                                f"says kind {state.kind!r})", str(kind), overwrite)
    if state is None:
        what = f"a folder lorafuse cannot read ({unreadable}), so it cannot tell what it holds"
        todo = "Give a new or empty folder"
    elif state.manifest == "valid":
        parts = ([f"entries lorafuse did not write: {_listing(state.unlisted)}"] if state.unlisted else []) + \
                ([f"files changed since lorafuse wrote them: {_listing(state.changed)} (edited, or copied or "
                  f"downloaded here: not as lorafuse left them, by their checksum or their {STAMP_XATTR} stamp)"]
                 if state.changed else [])
        what = f"an earlier lorafuse output that now holds {'; and '.join(parts)}"
        todo = (f"Move {_listing(state.unlisted)} out of it, give another path" if state.unlisted
                else "Give another path")
    else:
        why = "no " + MANIFEST_NAME if state.manifest == "absent" else f"its {MANIFEST_NAME} is not lorafuse's"
        what = f"a folder lorafuse did not write ({why}) holding {_listing(state.entries)}"
        todo = "Give a new or empty folder"
    if overwrite:
        return f"{overwrite_words()} replaced {out}, {what}; everything that was in it is gone"
    raise OutputError(f"output {out} is {what}; lorafuse replaces an output folder as a whole, so it would delete "
                      f"them: nothing was written. {todo}, or {_overwrite_hint()} with everything in it")


_PLOT_MARK = re.compile(rb"%s [0-9A-Za-z.+_-]{1,64}" % MARKER_KEY.encode())
_PLOT_HEAD = 64 << 10  # an SVG's metadata comes first
_PLOT_TAIL = 1 << 20  # a PDF's Info dictionary comes last, before the cross-reference table


def _jpeg_marked(fd: int, size: int) -> bool:
    """A JPEG with lorafuse's mark in a comment (COM) segment before its image data."""
    pos = 2
    for _ in range(1000):
        head = os.pread(fd, 4, pos)
        if len(head) < 4 or head[0] != 0xFF or head[1] in (0xDA, 0xD9):  # start of scan, end of image
            return False
        length = int.from_bytes(head[2:], "big")
        if length < 2:
            return False
        if head[1] == 0xFE and _PLOT_MARK.fullmatch(os.pread(fd, length - 2, pos + 4)):
            return os.pread(fd, 2, size - 2) == b"\xff\xd9"
        pos += 2 + length
    return False


def plot_is_ours(path: Path) -> bool:
    """True when `path` is an intact SVG, PDF or JPEG plot that lorafuse wrote (lorafuse.plot marks them
    with `lorafuse_version VERSION`: an SVG in its dc:description, a PDF in its Keywords, a JPEG in a
    comment). PNG plots and .safetensors files: io.manifest.file_is_ours."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or stamp_differs(fd):  # a plot edited in place since: the user's
            return False
        head = os.pread(fd, _PLOT_HEAD, 0)
        if head.startswith(b"\xff\xd8"):
            return _jpeg_marked(fd, st.st_size)
        if head.startswith((b"<?xml", b"<svg")):
            tail = os.pread(fd, 64, max(st.st_size - 64, 0))
            m = re.search(rb"<dc:description>(.{1,200}?)</dc:description>", head, re.DOTALL)
            return m is not None and _PLOT_MARK.fullmatch(m.group(1)) is not None and \
                tail.rstrip().endswith(b"</svg>")
        if head.startswith(b"%PDF-"):
            tail = os.pread(fd, _PLOT_TAIL, max(st.st_size - _PLOT_TAIL, 0))
            m = re.search(rb"/Keywords \(([^)]{1,200})\)", tail)
            return m is not None and _PLOT_MARK.fullmatch(m.group(1)) is not None and \
                tail.rstrip().endswith(b"%%EOF")
        return False
    except OSError:
        return False
    finally:
        os.close(fd)


def _in_own_folder(out: Path) -> FolderState | None:
    """The intact lorafuse folder output that `out` is a file of (a shard of a merged checkpoint, say:
    shards carry no mark of their own; their folder's manifest lists them, with their sizes), else None."""
    if out.name == MANIFEST_NAME:
        return None
    try:
        state = inspect_folder(out.parent)
    except OSError:
        return None
    entries = _entry_pattern(out)  # this run's own temporary and set-aside entries are no addition
    added = [n for n in state.unlisted
             if not ((m := entries.match(n.rstrip("/"))) and int(m.group(2)) == os.getpid())]
    own = state.manifest == "valid" and not added and not state.changed and state.current \
        and out.name in state.entries
    return state if own else None


def _own_file(out: Path) -> tuple[str | None, str]:
    """(its kind, how to say what it is) when `out` is lorafuse's own file, else (None, ''): a marked file
    (io.manifest.own_file_kind; kind '' when it does not say), a marked plot, or a file of an intact lorafuse
    folder output (that folder's kind)."""
    kind = own_file_kind(out)
    if kind is None and plot_is_ours(out):
        kind = PLOT
    if kind is not None:
        return kind, f"an earlier lorafuse output, {KINDS.get(kind, 'a file')}"
    folder = _in_own_folder(out)
    if folder is not None:
        return folder.kind or "", (f"a file of the earlier lorafuse output {out.parent}, "
                                   f"{KINDS.get(folder.kind or '', 'a folder')}")
    return None, ""


def _other_kind(out: Path, what: str, kind: str, overwrite: bool) -> str:
    """The note (`overwrite`) or the OutputError of an earlier lorafuse output, `what`, that an output of another
    kind would replace: a re-run replaces its own output silently; a mistyped -o must not turn a merged model
    into an adapter unnoticed."""
    new = KINDS.get(kind, f"a {kind} output")
    if overwrite:
        return f"{overwrite_words()} replaced {out}, {what}, with {new}"
    raise OutputError(f"output {out} is {what}, and this writes {new}: lorafuse replaces its earlier output without "
                      f"{overwrite_words()} only with one of the same kind (a re-run); nothing was written. Give "
                      f"another path, or {_overwrite_hint()}")


def _judge_file(out: Path, st: os.stat_result, overwrite: bool, kind: str | None = None) -> str | None:
    """As _judge_folder, for an existing regular file where a file output goes."""
    if st.st_size == 0:
        return None
    old, what = _own_file(out)
    if old is not None:
        return None if same_kind(old, kind) else _other_kind(out, what, str(kind), overwrite)
    if own_file_kind(out, stamped=False) is not None:
        what = (f"a file lorafuse did not write as it is now ({st.st_size} bytes: a lorafuse output, but not as "
                f"lorafuse left it: copied, downloaded or edited since, without the {STAMP_XATTR} stamp lorafuse puts "
                "on every file it writes or no longer matching it), so it may be the only copy you have")
    else:
        what = (f"a file lorafuse did not write ({st.st_size} bytes, without the '{MARKER_KEY}' mark lorafuse puts in "
                "the metadata of its .safetensors files and plots)")
    if overwrite:
        return f"{overwrite_words()} replaced {out}, {what}"
    raise OutputError(f"output {out} is {what}; nothing was written. Give another path, or {_overwrite_hint()}")


def _judge(out: Path, folder: bool, overwrite: bool, kind: str | None = None) -> str | None:
    """What `out` holds now, judged for an output of the kind given (a folder or a file; `kind`, what it is:
    io.manifest.KINDS, None when not known): None when it may be written (missing, empty, lorafuse's own
    output of the same kind), the note of what `overwrite` replaces, or an OutputError."""
    overwrite = check_bool(overwrite, "overwrite")  # every output check comes here: 'no' is not a switch
    try:
        st = os.lstat(out)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as e:
        raise OutputError(f"cannot look at the output {out}: {getattr(e, 'strerror', None) or e}") from None
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        try:
            target = os.readlink(out)
        except OSError:
            target = "?"
        raise OutputError(f"output {out} is a symbolic link (to {target}); lorafuse does not replace links, even "
                          f"with {overwrite_words()}: give the path it points to, or remove the link")
    if (stat.S_ISDIR(mode) or stat.S_ISREG(mode)) and is_mount_point(out):
        inside = f"a new {'folder' if folder else 'file'} inside it, e.g. {out / 'out'}" if stat.S_ISDIR(mode) \
            else "another path"
        raise OutputError(f"output {out} is a mount point (another file system, or a bind mount such as docker's -v "
                          "makes); lorafuse writes an output beside its path and renames it into place, which cannot "
                          f"replace a mount point, even with {overwrite_words()}: give {inside}")
    if stat.S_ISDIR(mode):
        if not folder:
            example = out / ("out" + (out.suffix or ".safetensors"))
            raise OutputError(f"output {out} is a folder; give a file name (e.g. {example}): lorafuse "
                              f"does not replace a folder with a file, even with {overwrite_words()}")
        return _judge_folder(out, overwrite, kind)
    if not stat.S_ISREG(mode):
        from lorafuse.io.safetensors import file_kind

        raise OutputError(f"output {out} is {file_kind(mode)}; lorafuse writes regular files and folders and never "
                          f"replaces anything else, even with {overwrite_words()}: give another path")
    if folder:
        raise OutputError(f"output {out} exists and is not a folder (a file of {st.st_size} bytes) and this writes a "
                          "folder: give a folder path; lorafuse does not replace a file with a folder, even with "
                          f"{overwrite_words()}")
    return _judge_file(out, st, overwrite, kind)


def check_output(out: str | os.PathLike[str], inputs: Iterable[Path] = (), *, folder: bool,
                 overwrite: bool = False, kind: str | None = None) -> str | None:
    """Everything atomic_dir (folder=True) / atomic_file (folder=False) checks before a run writes
    `out`: call it early to refuse before any long work. `kind`: what the output is (io.manifest.KINDS;
    an earlier lorafuse output of another kind is not replaced without `overwrite`; None: not compared).
    Returns None when `out` may be written as it is, or (overwrite=True) the note of what will be
    replaced; raises OutputError (LorafuseValueError for a path that names no output) otherwise."""
    out = Path(out)
    check_output_path(out, inputs)
    blocked = _not_a_folder(out.parent)  # `-o notes.txt/merged`: refused before any work, not after it
    if blocked:
        raise OutputError(f"cannot write the output {out}: {blocked}")
    note = _judge(out, folder, overwrite, kind)
    unwritable = _unwritable(out, folder)  # a read-only folder or disk: before the work (and in a dry run) too
    if unwritable:
        raise OutputError(unwritable)
    return note


def _unwritable(out: Path, folder: bool) -> str | None:
    """Why the temporary output beside `out` (or the folders above it) cannot be made, where the system says so
    before any work (access(2): a read-only file system, a folder the user may not write in), else None; the
    words are those of the failure it foresees (_prepare, atomic_dir / atomic_file)."""
    here = next((p for p in (out.parent, *out.parent.parents) if os.path.isdir(p)), None)
    effective = os.access in os.supports_effective_ids
    if here is None or os.access(here, os.W_OK | os.X_OK, effective_ids=effective):
        return None
    try:
        read_only = bool(os.statvfs(here).f_flag & getattr(os, "ST_RDONLY", 1))
    except (OSError, AttributeError):
        read_only = False
    why = os.strerror(errno.EROFS if read_only else errno.EACCES)
    if here != out.parent:
        return f"cannot create the folder {out.parent} for the output {out}: {why} ({here} cannot be written)"
    return f"cannot create a temporary {'folder' if folder else 'file'} beside the output {out}: {why}"


def _write_error(out: Path, e: OSError, existed: bool, tmp: Path | None = None) -> OutputError:
    what = f"{out} is unchanged" if existed else "nothing was written"
    removed = "the temporary output was removed" if tmp is None or not os.path.lexists(tmp) else \
        f"the temporary output {tmp} could not be removed (the next run writing {out} removes it)"
    return OutputError(f"cannot write the output {out}: {os_error_text(e)}{_gone_meanwhile(out, e, tmp)}; {removed} "
                       f"and {what}")


def _gone_meanwhile(out: Path, e: OSError, tmp: Path | None) -> str:
    """What a 'No such file or directory' while writing `out` means when the folder it is written in was removed or
    renamed by another process while the run went on: said, else ''."""
    if e.errno != errno.ENOENT or tmp is None or os.path.isdir(out.parent):
        return ""
    return f" (its folder {out.parent} was removed or renamed while the run went on)"


COMMITTED: list[Path] = []  # the outputs this process has put in place (the CLI's words when it is stopped)
_LIVE: list[Callable[[], None]] = []  # the cleanups of the temporary outputs being written now (emergency_cleanup)


def emergency_cleanup() -> None:
    """Remove every temporary output still being written (their cleanups, newest first; errors ignored), for a
    process that must end at once: called from another thread (the CLI's stop watchdog) while the main thread
    is stuck, so it takes no lock of the writers'."""
    for cleanup in reversed(list(_LIVE)):
        try:
            cleanup()
        except Exception:  # noqa: BLE001 (best effort: the process ends next)
            pass


def forget_outputs(folder: Path) -> None:
    """Drop from COMMITTED the outputs inside `folder`, which its maker removed (a recipe's temporary folder)."""
    inside = os.path.join(os.path.abspath(folder), "")
    COMMITTED[:] = [p for p in COMMITTED if not os.path.join(os.path.abspath(p), "").startswith(inside)]


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP (unless ignored: nohup) held while an output is put in place (the old one moved
    aside, the new one renamed in): their handlers run once it is, so that `out` is never left missing nor the
    message wrong. The main thread only (where Python runs signal handlers); elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    hup = getattr(signal, "SIGHUP", None)
    held = (signal.SIGINT, signal.SIGTERM) + \
        ((hup,) if hup is not None and signal.getsignal(hup) not in (signal.SIG_IGN, None) else ())
    # a handler installed outside Python (an embedding application's) reads as None, and None cannot be put back
    # (TypeError after the commit, with this module's handler left in place): such a signal is left alone
    held = tuple(s for s in held if signal.getsignal(s) is not None)
    try:
        before = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in held}
    except (ValueError, OSError):  # an embedding without signal handling
        yield
        return
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)


def remove_held(cleanup: Callable[[], None]) -> None:
    """Run `cleanup` (the removal of a stopped run's temporary output) with SIGINT, SIGTERM and SIGHUP held: a second
    Ctrl-C or a SIGTERM after a Ctrl-C would otherwise stop the removal halfway and leave a model-sized temporary
    entry behind; they act once it is done."""
    with _signals_held():
        cleanup()


@contextmanager
def _cleanup_on_error(out: Path, existed: bool, cleanup: Callable[[], None], commit: bool = False,
                      tmp: Path | None = None) -> Iterator[None]:
    """Run `cleanup` on any error; write errors, any error while renaming into place, and any error on the
    temporary output `tmp` itself (its folder renamed or removed meanwhile) become OutputError naming `out`."""
    try:
        yield
    except BaseException as e:
        remove_held(cleanup)
        inside = tmp is not None and isinstance(e, OSError) and e.filename is not None and \
            os.fsdecode(e.filename).startswith(str(tmp))
        if isinstance(e, OSError) and not is_from_caller(e) and (commit or e.errno in _WRITE_ERRNOS or inside):
            raise _write_error(out, e, existed, tmp) from e
        raise


def _finish_folder(tmp: Path, kind: str) -> None:
    """The manifest and the stamps of a finished temporary folder. Their errors are errors writing the output, also
    those that name no file inside it (EMFILE while os.fwalk walks it names '.' or nothing)."""
    try:
        write_manifest(tmp, kind)
        stamp_tree(tmp)
    except OSError as e:
        if e.filename is not None and os.fsdecode(e.filename).startswith(str(tmp)):
            raise
        raise OSError(e.errno, e.strerror or str(e), str(tmp)) from e


def _open_parent(out: Path) -> int | None:
    """A descriptor of the folder a temporary entry is made in: it is removed through it even when that folder
    was renamed meanwhile (by path it would stay behind in the folder's new place, where no run looks)."""
    try:
        return os.open(out.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None


def _remove_at(parent: int | None, tmp: Path) -> None:
    """Remove the temporary entry `tmp` (a file or a folder) through `parent` where it can, else by its path."""
    if parent is not None:
        try:
            if stat.S_ISDIR(os.stat(tmp.name, dir_fd=parent, follow_symlinks=False).st_mode):
                if sys.version_info >= (3, 11):
                    shutil.rmtree(tmp.name, dir_fd=parent)
                    return
            else:
                os.unlink(tmp.name, dir_fd=parent)
                return
        except FileNotFoundError:
            return
        except OSError:
            pass
    remove_entry(tmp)


def lock_entry(fd: int) -> None:
    """Mark a temporary entry as owned by a live run (released by the kernel when the process dies), and as
    lorafuse's (mark_entry). With owner_gone and remove_entry, also the rules of other writers' temporary entries
    (recipes.runner's)."""
    mark_entry(fd)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass


TEMP_XATTR = "user.lorafuse.temporary"  # on the temporary and set-aside entries a run makes (mark_entry)


def mark_entry(entry: int | Path) -> None:
    """Put TEMP_XATTR on a temporary or set-aside entry (an open descriptor, or a path: a link is not followed) where
    the file system keeps extended attributes: a leftover is removed only when it carries it or is empty
    (owner_gone), never a user's file or folder that happens to have such a name."""
    try:
        if isinstance(entry, int):
            os.setxattr(entry, TEMP_XATTR, b"1")
        else:
            os.setxattr(entry, TEMP_XATTR, b"1", follow_symlinks=False)
    except (OSError, AttributeError):  # no xattrs here (or on this system)
        pass


def unmark_entry(entry: int | Path) -> None:
    """Take TEMP_XATTR off an entry that becomes the output (or is the previous output, put back)."""
    try:
        if isinstance(entry, int):
            os.removexattr(entry, TEMP_XATTR)
        else:
            os.removexattr(entry, TEMP_XATTR, follow_symlinks=False)
    except (OSError, AttributeError):
        pass


def _marked_or_empty(fd: int) -> bool:
    """Whether the leftover entry open as `fd` is lorafuse's to remove: it carries TEMP_XATTR, it is empty (a run
    killed before it marked it: nothing is lost), or its file system keeps no extended attributes (there its
    name and its dead owner decide, as before lorafuse marked its entries)."""
    try:
        os.getxattr(fd, TEMP_XATTR)
        return True
    except AttributeError:  # no xattrs on this system
        return True
    except OSError as e:
        if e.errno != getattr(errno, "ENODATA", None):
            return e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            return not os.listdir(fd)
        return stat.S_ISREG(st.st_mode) and st.st_size == 0
    except OSError:
        return False


_STARTED_NS = time.time_ns()  # this process had made no temporary entry before this module was imported


def _before_this_process(path: Path) -> bool:
    """Whether `path` was last changed before this process could have made it: the entry of an earlier process
    that had this process's pid (every run of a container gets the same pid: 1, or 7 under an init)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return max(st.st_mtime_ns, st.st_ctime_ns) < _STARTED_NS


def owner_gone(path: Path, pid: int) -> bool:
    """True when the run that made `path` has ended: its pid is not alive (or is this process's, which began after
    `path` last changed) and nobody holds the lock; and `path` is lorafuse's (_marked_or_empty)."""
    if fcntl is None:
        return False
    if pid == os.getpid():
        if not _before_this_process(path):
            return False  # this process's own (a run going on in another thread)
    else:
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
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another pid namespace's live run would hold it
    except OSError:
        os.close(fd)
        return False
    try:
        return _marked_or_empty(fd)  # a user's file named like a leftover is not one
    finally:
        os.close(fd)


def _rmtree_own(path: Path) -> None:
    """Remove a folder lorafuse is done with (a replaced output, a temporary one) even where its folders were
    made read-only (chmod -R a-w on an output): a folder that refuses an unlink is made writable by its owner
    and the unlink tried again; anything else left is left silently, as before."""
    def again(func: Callable[..., object], p: str, _exc: object) -> None:
        if func not in (os.unlink, os.rmdir, os.remove):  # os.open, os.scandir, os.lstat (EMFILE, say): no unlink
            return  # to try again (called with the path alone they raise TypeError): left, as before
        try:
            parent = os.path.dirname(p)
            os.chmod(parent, os.stat(parent).st_mode | stat.S_IWUSR | stat.S_IXUSR)
            func(p)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=again)
    else:
        shutil.rmtree(path, onerror=again)


def remove_entry(path: Path) -> None:
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            if mounts_under(path):  # never delete through a mount (what it shows is not ours): leave it be
                return
            _rmtree_own(path)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


_NAME_MAX = 255  # bytes in one file name (Linux, macOS)
_TMP_ROOM = 40  # what a temporary entry adds to the stem: ".", ".tmp-PID-", 8 random characters


def _stem(out: Path) -> str:
    """The output's name in its temporary and set-aside entries (`.STEM.tmp-PID-xxxxxxxx`): the name itself, or,
    where that would make an entry's name too long for the file system, its start and a hash of the whole."""
    raw = os.fsencode(out.name)
    if len(raw) + _TMP_ROOM <= _NAME_MAX:
        return out.name
    digest = hashlib.blake2b(raw, digest_size=4).hexdigest()
    keep = raw[:_NAME_MAX - _TMP_ROOM - len(digest) - 1]
    while keep and keep[-1] >= 0x80 and not _whole_utf8(keep):  # not half a character
        keep = keep[:-1]
    return os.fsdecode(keep) + "~" + digest


def _whole_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _entry_pattern(out: Path) -> re.Pattern[str]:
    """The names of `out`'s temporary and set-aside entries, `.STEM.tmp-PID-xxxxxxxx` / `.STEM.old-PID-...`:
    group 1 the kind, group 2 the pid of the run that made it."""
    return re.compile(rf"\.{re.escape(_stem(out))}\.(tmp|old)-(\d+)-[a-z0-9_]{{8}}\Z")


def remove_stale(out: Path) -> list[str]:
    """Remove what killed runs left beside `out` (returns the names removed).

    A `.old-` entry holds the output that a killed run had moved aside: it is put back
    when `out` is missing."""
    pattern = _entry_pattern(out)
    removed: list[str] = []
    try:
        entries = sorted(out.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or not owner_gone(entry, int(m.group(2))):
            continue
        if m.group(1) == "old" and not os.path.lexists(out):
            try:
                os.rename(entry, out)
                unmark_entry(out)
                continue
            except OSError:
                pass
        remove_entry(entry)
        removed.append(entry.name)
    return removed


def _not_a_folder(folder: Path) -> str | None:
    """Why `folder` (a path above an output) cannot hold it: the first part of it that exists and is not a
    folder, or None."""
    for part in (*reversed(folder.parents), folder):
        try:
            st = os.lstat(part)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            if not os.path.exists(part):
                return f"{part} is a link to {os.readlink(part)}, which does not exist"
            continue
        if not stat.S_ISDIR(st.st_mode):
            return f"{part} is a file, not a folder"
    return None


def make_folders(folder: Path) -> list[Path]:
    """Make `folder` and the missing folders above it, one level at a time (one that another run makes meanwhile
    is taken as it is); returns those this call made, outermost first, for unmake_folders. On an error, what it
    made is removed and the OSError raised."""
    made: list[Path] = []
    for d in reversed([d for d in (folder, *folder.parents) if not os.path.lexists(d)]):
        try:
            d.mkdir()
        except FileExistsError:
            if d.is_dir():
                continue
            unmake_folders(made)
            raise
        except OSError:
            unmake_folders(made)
            raise
        made.append(d)
    return made


def unmake_folders(made: list[Path]) -> None:
    """Remove the folders make_folders made (innermost first), where they are still empty."""
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:
            return


def _prepare(out: Path) -> list[Path]:
    """Make the folders above `out` that are missing (returned for unmake_folders on failure) and remove what
    killed runs left beside it."""
    try:
        made = make_folders(out.parent)
    except OSError as e:
        raise OutputError(f"cannot create the folder {out.parent} for the output {out}: "
                          f"{_not_a_folder(out.parent) or e.strerror or e}") from e
    if not os.path.isdir(out.parent):
        raise OutputError(f"cannot write the output {out}: "
                          f"{_not_a_folder(out.parent) or f'{out.parent} is not a folder'}")
    remove_stale(out)
    return made


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
                mark_entry(tmp)  # the previous output, now at tmp: a leftover of lorafuse's until removed
                remove_entry(tmp)
                return
        except FileNotFoundError:  # another run moved `out` meanwhile
            continue
        # No atomic exchange: move the previous output aside, then put ours in place.
        old = out.parent / f".{_stem(out)}.old-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.rename(out, old)
        except FileNotFoundError:  # another run moved it meanwhile
            continue
        mark_entry(old)  # a leftover of lorafuse's, should this run be killed now (remove_stale puts it back)
        try:
            os.rename(tmp, out)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):  # another run's output got there first: go again
                remove_entry(old)
                continue
            try:
                os.rename(old, out)  # put the previous output back
                unmark_entry(out)
            except OSError:
                if os.path.lexists(out):  # another run's output is there now
                    remove_entry(old)
            raise
        remove_entry(old)
        return
    raise OutputError(f"cannot replace the output {out}: other processes keep replacing it")


def _commit_check(out: Path, folder: bool, overwrite: bool, cleanup: Callable[[], None],
                  kind: str | None = None) -> str | None:
    """The check again, just before the rename: what sits at `out` now (another run's output, or a
    folder the user made meanwhile). Returns the note to give once replaced."""
    try:
        return _judge(out, folder, overwrite, kind)
    except BaseException:
        remove_held(cleanup)
        raise


def _keep_modes(out: Path, tmp: Path, folder: bool) -> None:
    """Give the new output `tmp` the permissions of the output it replaces: a private file stays private.
    For a folder, its own mode and that of each file or folder it had under the same name."""
    try:
        st = os.lstat(out)
    except OSError:
        return
    if folder != stat.S_ISDIR(st.st_mode) or not (folder or stat.S_ISREG(st.st_mode)):
        return
    if folder:
        for root, dirs, files in os.walk(tmp):
            rel = Path(root).relative_to(tmp)
            for name in dirs + files:
                _copy_mode(out / rel / name, Path(root) / name)
    _copy_mode(out, tmp)


def _copy_mode(src: Path, dst: Path) -> None:
    try:
        old, new = os.lstat(src), os.lstat(dst)
        same_kind = stat.S_IFMT(old.st_mode) == stat.S_IFMT(new.st_mode)
        if same_kind and (stat.S_ISREG(old.st_mode) or stat.S_ISDIR(old.st_mode)):
            # what others may do is kept; the owner keeps read and write (and search): a later run replaces it
            folder = stat.S_ISDIR(old.st_mode)
            if old.st_gid != new.st_gid:  # and the group they do it as (a team's shared folder); before the
                _keep_group(dst, old.st_gid)  # chmod: a chown clears the set-group-ID bit
            os.chmod(dst, (stat.S_IMODE(old.st_mode) & (0o3777 if folder else 0o777)) | (0o700 if folder else 0o600))
    except OSError:
        pass


def _keep_group(path: Path, gid: int) -> None:
    """Give `path` the group `gid`, where the user may (a group they are in; root): else it keeps its own."""
    try:
        os.chown(path, -1, gid, follow_symlinks=False)
    except (OSError, NotImplementedError):
        pass


def _announce(note: str | None) -> None:
    if note:
        warn(note, OverwriteWarning)  # at the user's line, however deep the output was written


@contextmanager
def atomic_dir(out: str | os.PathLike[str], inputs: Iterable[Path] = (), *, overwrite: bool = False,
               kind: str = "output") -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success lorafuse_manifest.json (listing what the body
    wrote, `kind` saying what it is) is added and the folder replaces `out` by rename.

    `out` must be new, an empty folder or an earlier lorafuse output of the same `kind` (see check_output);
    other folders are refused unless `overwrite`, which replaces them with an OverwriteWarning naming what
    was there.
    On any error (or interruption) the temporary folder is removed and `out` keeps whatever it held
    before. Write errors (full disk, quota, size limit, read-only file system) are raised as OutputError
    naming `out`.
    """
    out = Path(out)
    inputs = list(inputs)  # used twice: here and before the commit
    note = check_output(out, inputs, folder=True, overwrite=overwrite, kind=kind)
    existed = os.path.lexists(out)
    made = _prepare(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{_stem(out)}.tmp-{os.getpid()}-", dir=out.parent))
    except OSError as e:
        unmake_folders(made)
        raise OutputError(f"cannot create a temporary folder beside the output {out}: {e.strerror or e}") from e
    try:
        fd = os.open(tmp, os.O_RDONLY)
    except OSError as e:
        remove_entry(tmp)
        unmake_folders(made)
        raise OutputError(f"cannot open the temporary folder {tmp}: {e.strerror or e}") from e

    parent = _open_parent(out)

    def cleanup() -> None:
        _remove_at(parent, tmp)
        unmake_folders(made)

    _LIVE.append(cleanup)
    try:
        lock_entry(fd)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the output is an ordinary folder
        with _cleanup_on_error(out, existed, cleanup, tmp=tmp):
            yield tmp
            _finish_folder(tmp, kind)
        note = _commit_check(out, True, overwrite, cleanup, kind)
        with _signals_held(), _cleanup_on_error(out, existed, cleanup, commit=True, tmp=tmp):
            raise_if_inputs_changed(inputs)  # an input truncated / rewritten while read: no output (its own)
            _keep_modes(out, tmp, folder=True)
            unmark_entry(fd)  # the output now, not a temporary entry
            _replace_dir(tmp, out)
            COMMITTED.append(out)
    finally:
        _LIVE.remove(cleanup)
        os.close(fd)
        if parent is not None:
            os.close(parent)
    _announce(note)


@contextmanager
def atomic_file(out: str | os.PathLike[str], inputs: Iterable[Path] = (), *,
                overwrite: bool = False, kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary file path beside `out`; on success it replaces `out` by rename.

    The body writes a file lorafuse recognises later (a .safetensors file whose metadata has
    `lorafuse_version`, see io.manifest.mark_metadata, or a PNG with that text chunk) so that a later
    run may replace it. `out` must be new, an empty file or such a file of the same `kind` (io.manifest.KINDS:
    what the body writes; None: not compared); others are refused unless `overwrite` (see atomic_dir).
    Errors as for atomic_dir."""
    out = Path(out)
    inputs = list(inputs)  # used twice: here and before the commit
    note = check_output(out, inputs, folder=False, overwrite=overwrite, kind=kind)
    existed = os.path.lexists(out)
    made = _prepare(out)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{_stem(out)}.tmp-{os.getpid()}-", dir=out.parent)
    except OSError as e:
        unmake_folders(made)
        raise OutputError(f"cannot create a temporary file beside the output {out}: {e.strerror or e}") from e
    tmp = Path(name)
    parent = _open_parent(out)

    def cleanup() -> None:
        _remove_at(parent, tmp)
        unmake_folders(made)

    _LIVE.append(cleanup)
    try:
        lock_entry(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the output is an ordinary file
        with _cleanup_on_error(out, existed, cleanup, tmp=tmp):
            yield tmp
        note = _commit_check(out, False, overwrite, cleanup, kind)
        with _signals_held(), _cleanup_on_error(out, existed, cleanup, commit=True, tmp=tmp):
            raise_if_inputs_changed(inputs)  # an input truncated / rewritten while read: no output (its own)
            _keep_modes(out, tmp, folder=False)
            unmark_entry(fd)  # the output now, not a temporary entry
            stamp(tmp)
            os.replace(tmp, out)
            COMMITTED.append(out)
    finally:
        _LIVE.remove(cleanup)
        os.close(fd)
        if parent is not None:
            os.close(parent)
    _announce(note)
