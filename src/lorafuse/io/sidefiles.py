"""The non-weight files of a model folder (configs, tokenizers, schedulers), copied into an output.

Only regular files are copied, exactly the bytes the file held when it was opened. A symbolic link is
followed only where it leads inside the model's folder, or, in a Hugging Face cache snapshot (which links
every file to a blob outside the folder), into the `blobs/` folder of the same repository
(outside_link): a link anywhere else (a cloned repository or an unpacked archive holding
`generation_config.json -> ~/.aws/credentials`) would put that file's bytes into an output that users
upload, so it is left out with a note naming it and where it leads. What is not a regular file is left
out with a note naming it too: a broken link, a link loop, a FIFO (opening it would wait for a writer
forever), a socket, a device (a link to /dev/zero would copy until the disk is full). A file that cannot
be read, or that changes size while it is copied, is a FormatError naming it; a copy never reads past
the size the file had when it was opened.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

from lorafuse.errors import FormatError
from lorafuse.io.checkpoint import broken_link
from lorafuse.io.safetensors import file_kind, open_regular

_CHUNK = 1 << 24


def _hub_blobs(folder: Path) -> Path | None:
    """The `blobs/` folder of the Hugging Face cache repository whose snapshot holds `folder` (resolved):
    <cache>/models--org--name/snapshots/<commit>/... ; None when `folder` is not in a snapshot."""
    for p in (folder, *folder.parents):
        if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
            return p.parent.parent / "blobs"
    return None


def outside_link(path: Path, root: Path) -> Path | None:
    """Where the symbolic link `path` (an entry of the model folder `root`) leads, when that is outside
    `root` and not into the blobs of the Hugging Face cache repository `root` is a snapshot of; None for a
    link that stays inside them, and for anything that is not a link."""
    if not os.path.islink(path):
        return None
    target = Path(os.path.realpath(path))
    real_root = Path(os.path.realpath(root))
    if target == real_root or real_root in target.parents:
        return None
    blobs = _hub_blobs(real_root)
    if blobs is not None and blobs in target.parents:
        return None
    return target


def outside_note(shown: object, target: Path, root: Path) -> str:
    """The note of a side file left out because it links outside the model's folder (outside_link)."""
    return (f"{shown} is a symbolic link to {target}, outside {root}: not copied (lorafuse copies nothing from "
            "outside the base folder into an output; copy the file in if it belongs there)")


def classify(path: Path) -> tuple[str, str]:
    """('file', ''), ('dir', '') or ('skip', why): what `path` is once links are followed."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        link = broken_link(path)
        if link is not None:
            return "skip", link
        if isinstance(e, FileNotFoundError):
            return "skip", "gone (removed while the folder was read)"
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        return "dir", ""
    if stat.S_ISREG(mode):
        return "file", ""
    return "skip", file_kind(mode)


def copy_file(src: Path, dst: Path) -> None:
    """Copy the regular file `src` (followed if it is a link) to the new file `dst`, with its mode and
    times. Exactly the size it had when opened: a file that shrinks or grows meanwhile is refused."""
    try:
        fd = open_regular(src, str(src))  # a FIFO or device is refused without blocking on it
    except FormatError as e:  # unreadable (permissions), or replaced since it was listed
        raise FormatError(f"{e}; it belongs in the output: make it readable, or move it out of {src.parent}") from None
    try:
        st = os.fstat(fd)
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            _copy_exactly(fd, out, st.st_size, src)
        finally:
            os.close(out)
        os.chmod(dst, stat.S_IMODE(st.st_mode))
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(fd)


def _copy_exactly(fd: int, out: int, size: int, src: Path) -> None:
    """`size` bytes of `fd` from its start to `out`: in the kernel (copy_file_range) while it can, else
    read and written here, which also says which side failed. A read error is a FormatError naming
    `src`; a write error (a full disk) is left an OSError, which the output's atomic writer reports."""
    done = 0
    kernel = hasattr(os, "copy_file_range")
    while done < size:
        if kernel:
            try:
                n = os.copy_file_range(fd, out, min(size - done, 1 << 30), done)
            except OSError:  # another filesystem, an old kernel, a full disk: the plain loop says which
                kernel = False
                continue
        else:
            n = _copy_chunk(fd, out, min(size - done, _CHUNK), done, src)
        if n == 0:
            raise FormatError(f"{src}: the file shrank while it was copied ({done} of its {size} bytes read); "
                              "copy again when nothing writes to it")
        done += n
    try:
        more = os.pread(fd, 1, size)
    except OSError as e:
        raise FormatError(f"{src}: cannot read: {e.strerror or e}") from None
    if more:
        raise FormatError(f"{src}: the file grew while it was copied (it had {size} bytes when opened); "
                          "copy again when nothing writes to it")


def _copy_chunk(fd: int, out: int, count: int, offset: int, src: Path) -> int:
    try:
        chunk = os.pread(fd, count, offset)
    except OSError as e:
        raise FormatError(f"{src}: cannot read: {e.strerror or e}") from None
    view = memoryview(chunk)
    while len(view):
        view = view[os.write(out, view):]
    return len(chunk)


def entry_kind(path: Path, shown: object, root: Path) -> tuple[str, str | None]:
    """What the entry `path` of the model folder `root` is once links are followed ('file', 'dir' or 'skip': see
    classify), and the note (naming it `shown`) of one that is not copied: not a regular file or folder, or a
    file that links outside `root` (outside_link); None for one to copy."""
    kind, why = classify(path)
    if kind == "skip":
        return kind, f"{shown} is {why}: not copied"
    target = outside_link(path, root) if kind == "file" else None
    return kind, None if target is None else outside_note(shown, target, root)


def copy_entry(src: Path, dst: Path, notes: list[str], root: Path) -> None:
    """Copy a file or a folder tree `src` (inside the folder `root`) to `dst`. What is not a regular file
    or a folder is left out with a note; so is a link to a file outside `root` (outside_link), to a folder
    outside `root` or to a folder that contains it (a loop)."""
    for path, kind in walk_entry(src, notes, root):
        target = dst / path.relative_to(src)
        if kind == "dir":
            target.mkdir()
        else:
            copy_file(path, target)


def entry_files(src: Path, root: Path) -> list[Path]:
    """The files copy_entry copies of `src` (a file or a folder tree inside `root`), in the order it copies them
    (what it leaves out is left out here too, without its note): what an output's record lists as copied."""
    return [path for path, kind in walk_entry(src, [], root) if kind == "file"]


def walk_entry(src: Path, notes: list[str], root: Path,
               ancestors: frozenset[Path] = frozenset()) -> Iterator[tuple[Path, str]]:
    """(path, 'file' or 'dir') of what copy_entry copies of `src`, a folder before what it holds (paths under
    `src` as listed, links not resolved); what it leaves out is said in `notes`."""
    shown = src.relative_to(root) if src.is_relative_to(root) else src
    kind, note = entry_kind(src, shown, root)
    if note is not None:
        notes.append(note)
        return
    if kind == "file":
        yield src, "file"
        return
    real = src.resolve()
    real_root = root.resolve()
    if real in ancestors or real == real_root or real in real_root.parents:
        notes.append(f"{shown}/ is a symbolic link to {real}, a folder that contains it (a loop): not copied")
        return
    if src.is_symlink() and real_root not in real.parents:
        notes.append(f"{shown}/ is a symbolic link to the folder {real}, outside {root}: not copied")
        return
    try:
        entries = sorted(src.iterdir())
    except OSError as e:
        raise FormatError(f"{src}: cannot read: {e.strerror or e}") from None
    yield src, "dir"
    for entry in entries:
        yield from walk_entry(entry, notes, root, ancestors | {real})
