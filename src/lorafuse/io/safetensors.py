"""safetensors files: a validating, memory-mapped reader and a streaming writer.

Format: 8-byte little-endian header length N, N bytes of UTF-8 JSON
`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}`,
then the data buffer. The reader checks everything the reference implementation
checks and hands out zero-copy numpy views of the mapped file.

A mapped file that shrinks while it is read (a re-download in place, `cp` over it) would
kill the process with SIGBUS at the first read past its new end. Every mapping made here
is registered with the core's guard (lorafuse.backends.native.register_mapping, cpp/src/mapguard.cpp):
such a read sees zeros instead, the fault is recorded, and `raise_if_inputs_changed` (called
before an output is committed) and every core call that reads the mapping raise
InputChangedError naming the file. A file whose size or modification time changes between
opening and commit is refused the same way, and a kernel-side copy that finds the file
shorter than it was says so.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import mmap
import os
import re
import stat
import struct
import sys
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lorafuse._terminal import short
from lorafuse.backends import native
from lorafuse.backends.pages import mapping_of
from lorafuse.errors import FormatError, InputChangedError, LorafuseValueError, OutputError
from lorafuse.io.dtypes import DTYPES

MAX_HEADER_BYTES = 100_000_000
MAX_DIMS = 32  # numpy 1.x holds at most 32 dimensions (2.x: 64); no real tensor has more
# A header's JSON costs a few hundred bytes of Python objects per value: a small header can describe
# more than any real file (a million empty tensors in 59 MB). Real checkpoint shards and adapters
# list at most tens of thousands of tensors and a few megabytes of metadata (kohya's tag counts,
# a thumbnail). Both counts are checked on the raw bytes, before anything is parsed.
MAX_TENSORS = 1 << 18  # tensors in one file
MAX_HEADER_VALUES = 1 << 22  # JSON values of one header, counted from its commas and brackets (an upper bound)
MAX_METADATA_BYTES = 16 << 20  # UTF-8 bytes of all __metadata__ keys and values together
_U64_MAX = 2**64 - 1
_I64_MAX = 2**63 - 1
_WIDEST = 8  # bytes per element of the widest type a tensor is converted to (float64)
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True, slots=True)  # slots: a header may list a few hundred thousand of them
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets into the data buffer
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)  # Python ints: exact, and () -> 1


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)  # in C: the per-key loop runs only when there is a duplicate to name
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise FormatError(f"duplicate key {short(key)} in header")
            seen.add(key)
    return out


def _reject_constant(name: str) -> object:
    raise FormatError(f"{name} is not a JSON value")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_unicode(text: str) -> bool:
    """False for a string with lone UTF-16 surrogates (JSON escapes such as \\ud800): it is not
    Unicode text, and it could not be written back to a UTF-8 header."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def file_kind(mode: int) -> str:
    """'a directory', 'a FIFO', ... for a file that is not a regular file."""
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


# Python 3.13+ maps a file without keeping a duplicate of its descriptor (mmap's trackfd=False): a mapping, and so
# a loaded adapter, then holds no descriptor. Earlier versions' mmap keeps one open per mapping, while it lives.
# Nothing here needs it: the guard tells a changed file by its path (device, inode, size, modification time).
_UNTRACKED: dict[str, bool] = {"trackfd": False} if sys.version_info >= (3, 13) and os.name == "posix" else {}
# Where mmap would keep a descriptor, a file up to this size is read into anonymous memory instead once this
# process's mappings hold half the descriptors its limit allows (_copy_instead): thousands of small adapters can
# be loaded at once under the usual limit of 1024 open files, while the first ones stay mapped (their pages can
# leave the resident set: release_pages).
_COPY_LIMIT = 16 << 20
_COPIED_MAX = 0 if _UNTRACKED else _COPY_LIMIT


def os_error_text(e: OSError | ValueError) -> str:
    """What went wrong reading a file, for a message; for the limit on open files (EMFILE, ENFILE), what to do."""
    text = str(getattr(e, "strerror", None) or e)
    if getattr(e, "errno", None) in (errno.EMFILE, errno.ENFILE):
        held = ("" if _UNTRACKED else
                "; before Python 3.13 each loaded adapter keeps its file open while it lives (once half the limit is "
                f"used, only those of more than {_COPY_LIMIT >> 20} MiB), so pass paths instead "
                "of loaded Adapters where an operation takes many (combine streams paths, a few open at a time, "
                "with methods svd and linear on the cpu, --engine auto or stream; its other methods hold every "
                "adapter open at once)")
        text += f" (this process has as many files open as its limit allows: raise it, `ulimit -n`{held})"
    return text


def open_regular(path: str | os.PathLike[str], where: str) -> int:
    """A read-only descriptor of a regular file. A FIFO, socket or device is refused without
    blocking on it (opening a FIFO would wait for a writer forever)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise FormatError(f"{where}: cannot read: {os_error_text(e)}") from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        os.close(fd)
        raise FormatError(f"{where}: cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise FormatError(f"{where}: cannot read: it is {file_kind(mode)}, not a file")
    return fd


def _header_values(raw: bytes | bytearray) -> int:
    """The JSON values a header holds, as lorafuse bounds them: counted from its commas and brackets."""
    return raw.count(b",") + raw.count(b"{") + raw.count(b"[")


def _check_counts(raw: bytes | bytearray, where: str) -> None:
    """Refuse, before parsing, a header listing more tensors or JSON values than lorafuse reads."""
    tensors = raw.count(b'"data_offsets"')
    if tensors > MAX_TENSORS:
        raise FormatError(f"{where}: the header lists {tensors:,} tensors (entries with data_offsets), more than the "
                          f"{MAX_TENSORS:,} lorafuse reads from one file; real checkpoint shards and adapters hold "
                          "far fewer (a corrupt or hostile file?)")
    values = _header_values(raw)
    if values > MAX_HEADER_VALUES:
        raise FormatError(f"{where}: the header holds about {values:,} JSON values (counted from its commas and "
                          f"brackets), more than the {MAX_HEADER_VALUES:,} lorafuse reads from one header; real "
                          "headers hold far fewer (a corrupt or hostile file?)")


def _decode_header(raw: bytes | bytearray, where: str) -> str:
    _check_counts(raw, where)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{where}: header is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.startswith("{"):
        if text.lstrip().startswith("{"):  # whitespace first: the reference reads it, lorafuse does not
            raise FormatError(f"{where}: header does not start with '{{'")
        raise FormatError(f"{where}: not a safetensors file: its header does not start with '{{' (a safetensors "
                          f"header is a JSON object; this one starts {_short(text[:16], 24)})")
    return text


# A lone UTF-16 surrogate can only come from a JSON escape \uD800-\uDFFF (the text is valid UTF-8): a header
# without such an escape needs no per-string check.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LONG_INT = re.compile(r"integer string conversion: value has (\d+) digits")


def parse_header(raw: bytes | bytearray, data_size: int, where: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a header (the N JSON bytes) against a data buffer of `data_size` bytes."""
    return _parse_text(_decode_header(raw, where), data_size, where)


def json_error(e: BaseException) -> str:
    """What json.loads' error says, in a user's words: Python's own words for an integer of thousands of digits
    tell the user to call a Python function."""
    digits = _LONG_INT.search(str(e))
    return f"a number of {digits[1]} digits, more than any real one" if digits else str(e)


def _parse_text(text: str, data_size: int, where: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    surrogates = _SURROGATE_ESCAPE.search(text) is not None
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except FormatError as e:
        raise FormatError(f"{where}: header is not valid JSON ({e})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, integers of thousands of digits, deep nesting
        raise FormatError(f"{where}: header is not valid JSON ({json_error(e)})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{where}: header is not a JSON object")
    metadata = obj.pop("__metadata__", None)
    if metadata is None:  # absent or null; [] or "" are not a map and are refused below
        metadata = {}
    if not isinstance(metadata, dict):
        raise FormatError(f"{where}: __metadata__ must map strings to strings, got {type(metadata).__name__}")
    for k, v in metadata.items():
        if not isinstance(v, str):
            raise FormatError(f"{where}: __metadata__ must map strings to strings: {short(k)} maps to {_short(v)}")
        if surrogates and not (_is_unicode(k) and _is_unicode(v)):
            raise FormatError(f"{where}: __metadata__ entry {short(k)} holds a lone UTF-16 surrogate (not Unicode "
                              "text)")
    size = _metadata_bytes(metadata)
    if size > MAX_METADATA_BYTES:
        largest = max(metadata, key=lambda k: len(metadata[k]))
        raise FormatError(f"{where}: __metadata__ holds {size:,} bytes of text, more than the {MAX_METADATA_BYTES:,} "
                          f"lorafuse reads (its largest entry is {_short(largest)}, {len(metadata[largest]):,} "
                          "characters); real files hold a few megabytes at most (a corrupt or hostile file?)")
    tensors: dict[str, TensorInfo] = {}
    for name in list(obj):  # each entry's JSON is dropped as soon as it is parsed
        tensors[name] = _parse_entry(name, obj.pop(name), where, surrogates)
    # Offsets must tile the data buffer exactly: no overlap, no gap, nothing after.
    cursor = 0
    last: TensorInfo | None = None
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if t.begin != cursor:
            kind = "overlaps another tensor" if t.begin < cursor else "leaves a gap before it"
            other = f" ({short(last.name)} ends at {cursor})" if last is not None else ""
            raise FormatError(f"{where}: tensor {short(t.name)} at offsets [{t.begin}, {t.end}] {kind}{other}")
        cursor, last = t.end, t
    if cursor > data_size:
        assert last is not None
        raise FormatError(f"{where}: tensors need {cursor} data bytes but the file holds {data_size} (truncated?): "
                          f"tensor {short(last.name)} at offsets [{last.begin}, {last.end}] is past the end")
    if cursor < data_size:
        raise FormatError(f"{where}: {data_size - cursor} trailing bytes after the last tensor "
                          f"(the tensors end at data offset {cursor}, the data is {data_size} bytes)")
    return tensors, dict(metadata)


def _metadata_bytes(metadata: Mapping[str, str]) -> int:
    """UTF-8 bytes of all keys and values (counted without encoding while the characters say it is small)."""
    chars = sum(len(k) + len(v) for k, v in metadata.items())
    if chars * 4 <= MAX_METADATA_BYTES:  # a character is at most 4 UTF-8 bytes
        return chars
    return sum(len(k.encode("utf-8")) + len(v.encode("utf-8")) for k, v in metadata.items())


def _short(value: object, limit: int = 60) -> str:
    return short(value, limit)


def _parse_entry(name: str, entry: object, where: str, surrogates: bool = True) -> TensorInfo:
    if surrogates and not _is_unicode(name):
        raise FormatError(f"{where}: tensor name {short(name)} holds a lone UTF-16 surrogate (not Unicode text)")
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: entry for tensor {short(name)} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise FormatError(f"{where}: tensor {short(name)} has unknown dtype {_short(dtype)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise FormatError(f"{where}: tensor {short(name)} has invalid shape {_short(shape)}")
    if len(shape) > MAX_DIMS:
        raise FormatError(f"{where}: tensor {short(name)} has {len(shape)} dimensions (at most {MAX_DIMS} are "
                          "supported)")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and 0 <= o <= _U64_MAX for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise FormatError(f"{where}: tensor {short(name)} has invalid data_offsets {_short(offsets)}")
    nbytes = DTYPES[dtype].itemsize
    # The byte size with zero dims taken as 1, at 8 bytes an element: numpy cannot hold a shape past
    # 2**63 - 1 bytes even with no elements, and the tensor may be converted to float32 / float64.
    extent = _WIDEST
    for d in shape:
        nbytes *= d
        extent *= max(d, 1)
        if nbytes > _U64_MAX or extent > _I64_MAX:
            raise FormatError(f"{where}: tensor {short(name)} with shape {_short(shape)} overflows 64-bit byte sizes")
    if nbytes != offsets[1] - offsets[0]:
        raise FormatError(
            f"{where}: tensor {short(name)} of dtype {dtype} and shape {shape} needs {nbytes} bytes "
            f"but its data_offsets span {offsets[1] - offsets[0]}"
        )
    return TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])


_SNIFF_BYTES = 512  # the first bytes of a file, read once: the header length and what the file looks like


def looks_like(head: bytes) -> str | None:
    """What a file that is not safetensors looks like, from its first bytes: 'a zip archive (...)',
    'text', ...; None when nothing is obvious."""
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (torch.save writes PyTorch .bin / .pt checkpoints as zip archives)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a Python pickle (an old-style PyTorch .bin / .pt checkpoint)"
    if head.startswith(b"GGUF"):
        return "a GGUF file (llama.cpp; magic 'GGUF')"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the file it points to (`git lfs pull` fetches it)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # a character cut by the end of what was read is still text
        if e.start < len(head) - 3 or e.reason != "unexpected end of data":
            return None
        text = head[:e.start].decode("utf-8")
    if not text or any(ord(c) < 32 and c not in "\t\n\r\f" for c in text):
        return None
    start = text.lstrip().lower()
    if start.startswith(("<!doctype html", "<html")):
        return "an HTML page (a download that saved a web page instead of the file?)"
    if start.startswith(("{", "[")):
        return "JSON text"
    return "text"


def _not_safetensors(where: str, head: bytes, n: int, size: int) -> str:
    """The message for a file whose first 8 bytes cannot be a header length (larger than the file or
    the limit) and are not followed by a JSON object: it names what the file looks like."""
    kind = looks_like(head)
    what = f": it looks like {kind}" if kind else ""
    limit = (f"more than the {MAX_HEADER_BYTES}-byte limit" if n > MAX_HEADER_BYTES else
             f"past the end of the {size}-byte file")
    return (f"{where}: not a safetensors file{what} (a safetensors file starts with an 8-byte header length, "
            f"then a JSON header '{{...}}'; read that way, its first 8 bytes give {n}, {limit})")


def _read_header_fd(fd: int, where: str) -> tuple[dict[str, TensorInfo], dict[str, str], int, int]:
    """(tensors, metadata, data start, file size) of the open regular file `fd`."""
    tensors, metadata, start, st = _read_header_stat(fd, where)
    return tensors, metadata, start, st.st_size


def _read_header_stat(fd: int, where: str) -> tuple[dict[str, TensorInfo], dict[str, str], int, os.stat_result]:
    """(tensors, metadata, data start, the stat the header was validated against) of `fd`."""
    try:
        st = os.fstat(fd)
        size = st.st_size
        if size < 8:
            raise FormatError(f"{where}: file is {size} bytes, too small for a safetensors header")
        head = os.pread(fd, _SNIFF_BYTES, 0)
        if len(head) < 8:  # shrunk since fstat
            raise FormatError(f"{where}: file is {len(head)} bytes, too small for a safetensors header")
        (n,) = struct.unpack("<Q", head[:8])
        if (n > MAX_HEADER_BYTES or 8 + n > size) and head[8:].lstrip(b" \t\r\n")[:1] != b"{":
            # an impossible length and no JSON object after it: not a safetensors file at all (a script, a
            # zip / pickle checkpoint, ...); with a '{' it is a safetensors file cut short or a hostile one
            raise FormatError(_not_safetensors(where, head, n, size))
        if n > MAX_HEADER_BYTES:
            raise FormatError(f"{where}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if 8 + n > size:
            raise FormatError(f"{where}: header length {n} runs past the end of the {size}-byte file")
        raw = _read_exactly(fd, n, 8, where)
    except OSError as e:
        raise FormatError(f"{where}: cannot read: {e.strerror or e}") from None
    key = _parsed_key(raw, size - 8 - n)
    last = _last_parsed
    if key is not None and last is not None and last[0] == key:
        return dict(last[1]), dict(last[2]), 8 + n, st
    text = _decode_header(raw, where)
    del raw  # the header's bytes, its text and its JSON never all exist at once
    tensors, metadata = _parse_text(text, size - 8 - n, where)
    if key is not None:
        _keep_parsed(key, tensors, metadata)
    return tensors, metadata, 8 + n, st


# The last large header parsed, by the digest of its bytes and the size of the data it describes: a file read
# twice in a row (an adapter sniffed, then read as a checkpoint; `info` of a shard with 262,144 tensors) is parsed
# once. Headers under a mebibyte parse in milliseconds and are not kept.
_PARSED_MIN_BYTES = 1 << 20
_last_parsed: tuple[tuple[bytes, int], dict[str, TensorInfo], dict[str, str]] | None = None


def _parsed_key(raw: bytes | bytearray, data_size: int) -> tuple[bytes, int] | None:
    if len(raw) < _PARSED_MIN_BYTES:
        return None
    return hashlib.blake2b(raw, digest_size=32).digest(), data_size


def _keep_parsed(key: tuple[bytes, int], tensors: dict[str, TensorInfo], metadata: dict[str, str]) -> None:
    """Keep copies: the caller's dicts are its own to change."""
    global _last_parsed
    _last_parsed = (key, dict(tensors), dict(metadata))


def _read_exactly(fd: int, n: int, offset: int, where: str) -> bytearray:
    """n bytes at `offset`, read into one buffer (no chunk copies)."""
    raw = bytearray(n)
    view = memoryview(raw)
    done = 0
    while done < n:  # a read may return fewer bytes than asked
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [view[done:]], offset + done)
        else:  # pragma: no cover  (platforms without preadv)
            chunk = os.pread(fd, n - done, offset + done)
            got = len(chunk)
            view[done:done + got] = chunk
        if not got:
            raise FormatError(f"{where}: the file ended inside its {n}-byte header (changed while read?)")
        done += got
    view.release()
    return raw


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Header of a safetensors file: (tensors, metadata, data start offset). Reads only the header."""
    tensors, metadata, start, _ = read_header_identity(path)
    return tensors, metadata, start


def read_header_identity(path: str | os.PathLike[str]
                         ) -> tuple[dict[str, TensorInfo], dict[str, str], int, FileIdentity]:
    """read_header, and the identity (identity_of) of the file whose header it is: a later open of the same path
    can tell whether it is still that file."""
    where = str(path)
    fd = open_regular(path, where)
    try:
        tensors, metadata, start, st = _read_header_stat(fd, where)
    finally:
        os.close(fd)
    return tensors, metadata, start, identity_of(st)


# st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns of a file as it was read. The change time is the kernel's
# (no one sets it back): a file swapped in with the same size and modification time, even on a reused inode,
# still differs in it.
FileIdentity = tuple[int, int, int, int, int]


def identity_of(st: os.stat_result) -> FileIdentity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _Mapped(NamedTuple):
    """A guarded mapping not yet unmapped: its file's resolved path, where it starts in memory, its size and
    the file's identity when it was validated."""

    path: Path
    address: int
    size: int
    identity: FileIdentity
    mapping: weakref.ref[mmap.mmap]  # the mapping itself, while it lives (mapped_bytes holds it)


_LIVE: dict[int, _Mapped] = {}  # guard slot -> its mapping, for every mapping not yet unmapped


def mapped_bytes(path: str | os.PathLike[str]) -> mmap.mmap | None:
    """The live mapping of the file that `path` named when it was mapped (the whole file, as validated), where
    the file at `path` now is another one or none (replaced by rename, deleted) and the mappings of that path
    hold one version only; else None (read the path itself). What a record of the input's sha256 must hash:
    the bytes the operation read, not those that are there now."""
    if not _LIVE:  # nothing mapped (every adapter of a streamed combine is closed): no path to resolve
        return None
    where = _resolved(path)
    live = [m for m in list(_LIVE.values()) if m.path == where]
    if not live:
        return None
    try:
        now: FileIdentity | None = identity_of(os.stat(path))
    except OSError:
        now = None
    if any(m.identity == now for m in live) or len({m.identity for m in live}) != 1:
        return None
    for m in live:
        mapping = m.mapping()
        if mapping is not None and not mapping.closed:
            return mapping
    return None


def _resolved(path: str | os.PathLike[str]) -> Path:
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))


_SLOT_OF: dict[int, int] = {}  # id() of a live guarded mmap -> its slot (raise_if_view_changed's one lookup)


def _unguard(slot: int, key: int) -> None:
    """A guarded mapping is gone: free its slot."""
    _LIVE.pop(slot, None)
    if _SLOT_OF.get(key) == slot:
        del _SLOT_OF[key]
    native.unregister_mapping(slot)


def _guard(m: mmap.mmap, path: Path, where: str, st: os.stat_result) -> tuple[int, weakref.finalize]:
    """Register the mapping `m` of the file at `path` (validated as `st`) with the core's SIGBUS guard,
    until `m` is unmapped: by close(), or when the last numpy view of it goes."""
    label = where.encode("utf-8", "backslashreplace")  # a name that is not UTF-8 comes back escaped
    slot = native.register_mapping(m, label, os.fsencode(os.path.abspath(path)), st.st_dev, st.st_ino, st.st_size,
                                  st.st_mtime_ns)
    if slot < 0:
        raise FormatError(f"{where}: cannot map: 65536 files are mapped at once already; close some adapters or "
                          "checkpoints first")
    _LIVE[slot] = _Mapped(_resolved(path), _address(m), st.st_size, identity_of(st), weakref.ref(m))
    _SLOT_OF[id(m)] = slot
    return slot, weakref.finalize(m, _unguard, slot, id(m))


def raise_if_inputs_changed(paths: Iterable[str | os.PathLike[str]] | None = None) -> None:
    """Raise InputChangedError when a file this process has mapped (one of `paths` or a file inside one of
    them; every mapped file when `paths` is None) was truncated or rewritten while it was read: a read of it
    faulted (and saw zeros), or its size or modification time differs from when it was opened.

    Called before an output is committed (io.atomic) so that such data never reaches an output."""
    if not _LIVE:
        return
    roots = None if paths is None else {_resolved(p) for p in paths}
    for slot, (path, *_) in list(_LIVE.items()):
        if roots is not None and path not in roots and roots.isdisjoint(path.parents):
            continue
        problem = native.mapping_problem(slot)
        if problem:
            raise InputChangedError(problem)


def _address(m: mmap.mmap) -> int:
    """Where a mapping starts in memory (the temporary view is gone before the mapping may close)."""
    view = np.frombuffer(m, dtype=np.uint8, count=1)
    try:
        return int(view.ctypes.data)
    finally:
        del view


def locate(array: np.ndarray) -> tuple[Path, int, FileIdentity] | None:
    """(file, byte offset, identity when mapped) of a C-contiguous array that is a view of a mapped
    safetensors file (one still mapped: a view keeps its mapping), or None (a copy, a strided view, an array
    of no file). Its bytes are then exactly the file's from that offset, as they were when it was mapped: a
    later pass can read them again without loading the file (while the identity holds)."""
    if not array.flags.c_contiguous or array.nbytes == 0:
        return None
    start = int(array.ctypes.data)
    for m in list(_LIVE.values()):
        if m.address <= start and start + array.nbytes <= m.address + m.size:
            return m.path, start - m.address, m.identity
    return None


def raise_if_view_changed(array: np.ndarray) -> None:
    """InputChangedError when `array` is a view of a mapped file that was truncated or rewritten since it was
    mapped (a read of it saw zeros, or its size or modification time differ): call it after copying or
    converting a view, so that what was read is known to be the file's."""
    if array.nbytes == 0:
        return
    m = mapping_of(array)  # the mmap the view is of: one look-up, however many files are mapped
    slot = _SLOT_OF.get(id(m)) if m is not None else None
    if slot is not None:
        problem = native.mapping_problem(slot)
        if problem:
            raise InputChangedError(problem)


def _file_of(array: np.ndarray) -> list[Path] | None:
    """The mapped file `array` is a view of, as raise_if_inputs_changed's paths: that file alone is checked when a
    write of it faulted (None, every mapped file, where the view's file is not known)."""
    found = locate(array)
    return None if found is None else [found[0]]


def _copy_instead() -> bool:
    """Whether a small file is read into memory rather than mapped (see _COPY_LIMIT): this process's mappings
    hold half the descriptors its limit on open files (RLIMIT_NOFILE) allows."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return False
    return soft != resource.RLIM_INFINITY and len(_LIVE) >= soft // 2


def _copy_of(fd: int, size: int) -> mmap.mmap:
    """The file's `size` bytes read into an anonymous mapping, which holds no descriptor (see _COPIED_MAX)."""
    m = mmap.mmap(-1, size)
    done = 0
    while done < size:
        chunk = os.pread(fd, min(size - done, 1 << 20), done)
        if not chunk:
            m.close()
            raise OSError(errno.EIO, "the file shrank while it was read")
        m[done:done + len(chunk)] = chunk
        done += len(chunk)
    return m


class SafetensorsFile:
    """A validated safetensors file, memory-mapped; tensors are zero-copy numpy views.

    Use as a context manager or call close(). `release(name)` drops a tensor's pages
    from this process's resident set once it has been used (they stay in the page cache).
    The mapping is guarded against the file shrinking while it is read (see the module docstring).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        where = str(path)
        self._unguard: weakref.finalize | None = None
        # One descriptor for validating and mapping: the mapping covers exactly the bytes validated.
        fd = open_regular(self.path, where)
        try:
            self.tensors, self.metadata, self._data_start, st = _read_header_stat(fd, where)
            self.identity = identity_of(st)  # the file mapped, as validated
            self._size = st.st_size
            self._copied = 0 < st.st_size <= _COPIED_MAX and _copy_instead()
            self._map: mmap.mmap | None = (None if not st.st_size else _copy_of(fd, st.st_size) if self._copied
                                           else mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ, **_UNTRACKED))
            if self._map is not None:
                self._slot, self._unguard = _guard(self._map, self.path, where, st)
        except OSError as e:
            os.close(fd)
            raise FormatError(f"{where}: cannot map: {os_error_text(e)}") from None
        except BaseException:
            os.close(fd)
            raise
        self._file = os.fdopen(fd, "rb")

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # views still alive: the mapping (and its guard) goes when they do
                pass
            else:
                if self._unguard is not None:
                    self._unguard()
            self._map = None
        self._file.close()

    def check_unchanged(self) -> None:
        """InputChangedError when this file was truncated or rewritten since it was opened."""
        if self._unguard is not None and self._unguard.alive:
            problem = native.mapping_problem(self._slot)
            if problem:
                raise InputChangedError(problem)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise FormatError(f"{self.path}: no tensor named {short(name)}") from None

    def raw(self, name: str) -> np.ndarray:
        """Read-only view of a tensor's bytes as its raw numpy type (BF16 as uint16, F8 as uint8)."""
        t = self.info(name)
        dt = DTYPES[t.dtype]
        if t.nbytes == 0 or self._map is None:
            return np.zeros(t.shape, dtype=dt.raw)
        arr = np.frombuffer(self._map, dtype=dt.raw, count=t.numel, offset=self._data_start + t.begin)
        arr = arr.reshape(t.shape)
        arr.flags.writeable = False  # (a file read into memory, _copy_of, is a writable mapping)
        if not arr.flags.aligned:  # a writer that did not align its data: copy once
            arr = arr.copy()
        return arr

    def file_offset(self, name: str) -> int:
        """Absolute offset of a tensor's first byte in the file."""
        return self._data_start + self.info(name).begin

    def fileno(self) -> int:
        return self._file.fileno()

    @property
    def size(self) -> int:
        """The file's size in bytes when it was opened and validated."""
        return self._size

    def release(self, name: str | None = None, begin: int = 0, end: int | None = None) -> None:
        """Drop mapped pages (all, or bytes [begin, end) of one tensor) from the resident set."""
        if self._map is None or self._copied or not hasattr(mmap, "MADV_DONTNEED"):
            return  # (dropped pages of a file read into memory, _copy_of, would read back as zeros)
        if name is None:
            start, stop = 0, len(self._map)
        else:
            t = self.info(name)
            start = self._data_start + t.begin + begin
            stop = self._data_start + (t.end if end is None else t.begin + end)
        start -= start % _PAGE
        stop = min(len(self._map), stop)
        if stop > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype].itemsize
        for d in self.shape:
            n *= d
        return n


PAGE_ALIGN = 4096  # encode_header's data_start: the page size within which copied tensors keep their place
# Bytes per write() / pwrite() call. One call of a whole 32 MiB batch lets the kernel fill the page cache with
# its largest folios (ext4 has large folios since Linux 6.16), and on a VM whose host takes freed memory back
# those allocations were the slow part of writing: 2.1 GB in 32 MiB calls took 0.5-5.0 s (median ~2.7 s) where
# the same bytes in 256 KiB calls took 0.49-0.52 s, as fast as `cp` (a one-off check, 6 alternating runs each;
# docs/performance.md). ~8,000 calls for 2 GB cost a few milliseconds.
WRITE_PIECE = 256 << 10


def encode_header(specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None,
                  data_start: int | None = None) -> tuple[bytes, dict[str, int]]:
    """Header bytes (with the 8-byte length prefix, padded so data starts 8-aligned) and each tensor's offset.
    `data_start` (a multiple of 8): the header is padded with spaces, as the format allows, to the shortest length
    congruent to it modulo 4096 (PAGE_ALIGN), so that tensors copied from a file whose data starts there sit at
    the same place within their pages: the kernel then copies them page by page (`copy_file_range` of unaligned
    ranges runs at ~60% of the speed). Rewriting a header in place passes the length already written. A
    header that lorafuse's reader would refuse (more than MAX_HEADER_BYTES, the bound of safetensors too,
    MAX_HEADER_VALUES, MAX_METADATA_BYTES of metadata or MAX_TENSORS tensors) is an OutputError: a file
    written is a file that can be read back."""
    header: dict[str, object] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise LorafuseValueError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    offsets: dict[str, int] = {}
    cursor = 0
    for s in specs:
        if s.name in offsets or s.name == "__metadata__":
            raise LorafuseValueError(f"duplicate or reserved tensor name {short(s.name)}")
        if s.dtype not in DTYPES:
            raise LorafuseValueError(f"tensor {short(s.name)}: unknown dtype {_short(s.dtype)}")
        offsets[s.name] = cursor
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [cursor, cursor + s.nbytes]}
        cursor += s.nbytes
    body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    pad = (8 - len(body) % 8) % 8
    if data_start is not None and data_start % 8 == 0:
        aligned = (data_start - 8 - len(body)) % PAGE_ALIGN
        if len(body) + aligned <= MAX_HEADER_BYTES:
            pad = aligned
    body += b" " * pad
    _check_readable(body, metadata or {}, len(offsets))
    return struct.pack("<Q", len(body)) + body, offsets


def metadata_problem(metadata: Mapping[str, str]) -> str | None:
    """Why a header holding `metadata` could not be read back, counted as read_header counts it (its bytes of
    metadata, the JSON values its text holds), or None; what a writer can check before any work."""
    size = _metadata_bytes(metadata)
    if size > MAX_METADATA_BYTES:
        return f"{size:,} bytes of metadata, more than the {MAX_METADATA_BYTES:,} that lorafuse reads"
    values = _header_values(json.dumps(metadata, ensure_ascii=False, separators=(",", ":")).encode("utf-8",
                                                                                                   "surrogatepass"))
    if values > MAX_HEADER_VALUES:
        return f"about {values:,} JSON values, more than the {MAX_HEADER_VALUES:,} that lorafuse reads"
    return None


def _check_readable(body: bytes, metadata: Mapping[str, str], tensors: int) -> None:
    """Refuse to write a header that read_header would refuse (_check_counts, _parse_header's bounds), counted
    the way it counts them."""
    size = _metadata_bytes(metadata)
    values = _header_values(body)
    why = (f"{len(body):,} bytes, more than the {MAX_HEADER_BYTES:,} that lorafuse and safetensors read"
           if len(body) > MAX_HEADER_BYTES else
           f"{size:,} bytes of metadata, more than the {MAX_METADATA_BYTES:,} that lorafuse reads"
           if size > MAX_METADATA_BYTES else
           f"about {values:,} JSON values, more than the {MAX_HEADER_VALUES:,} that lorafuse reads"
           if values > MAX_HEADER_VALUES else
           f"{tensors:,} tensors, more than the {MAX_TENSORS:,} that lorafuse reads from one file"
           if tensors > MAX_TENSORS else None)
    if why is None:
        return
    largest = max(metadata, key=lambda k: len(metadata[k]), default=None)
    what = f" (its largest metadata entry: {_short(largest)}, {len(metadata[largest]):,} characters)" if largest else ""
    raise OutputError(f"cannot write a safetensors file whose header holds {why}{what}: it could not be read back; "
                      "nothing was written")


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor.

    The header goes first, so the data of each tensor can be streamed in as it is
    produced, either in the order of `specs` (`write(name, array)`, `start` / `append`, or
    `copy_from(name, src, src_name)`, a kernel-side copy) or in any order, each tensor whole at its
    place in the file (`write_at(name, array)`, os.pwrite); one file uses one of the two ways.
    close() checks that every tensor was written, completely, and names the ones that were not.
    """

    def __init__(self, path: str | os.PathLike[str], specs: list[TensorSpec],
                 metadata: Mapping[str, str] | None = None, data_start: int | None = None):
        self.path = Path(path)
        self._specs = specs
        self._next = 0
        self._remaining = 0
        header, self._offsets = encode_header(specs, metadata, data_start)  # data_start: see encode_header
        self._header_bytes = len(header)
        self._by_name = {s.name: s for s in specs}
        self._placed: set[str] = set()  # tensors written by write_at
        # 0o666: the umask decides, as for any new file
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        # A writer dropped without close() (an abandoned open_stream) closes its descriptor when it is collected;
        # the file is left as it is (the atomic_file / atomic_dir around it remove a temporary output).
        self._release = weakref.finalize(self, os.close, self._fd)
        try:
            self._write_all(memoryview(header))
        except BaseException:
            self._close_fd()
            raise

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._close_fd()

    def _close_fd(self) -> None:
        """Close the descriptor once (the finalizer, called here, does nothing later)."""
        self._fd = -1
        self._release()

    def _write_all(self, view: memoryview) -> None:
        view = view.cast("B")
        while len(view):
            n = os.write(self._fd, view[:WRITE_PIECE])
            view = view[n:]

    @property
    def data_start(self) -> int:
        """Offset of the data buffer in the file (the header's length, with its 8-byte prefix)."""
        return self._header_bytes

    def start(self, name: str) -> None:
        """Begin the next tensor; its bytes follow through append()."""
        if self._placed:
            raise LorafuseValueError(f"{self.path}: tensor {short(name)} written in order after tensors written by "
                                     "write_at (a file is written one way or the other)")
        if self._remaining:
            raise LorafuseValueError(f"{self.path}: tensor {short(self._specs[self._next - 1].name)} is incomplete")
        if self._next >= len(self._specs):
            raise LorafuseValueError(f"{self.path}: tensor {short(name)} written after the last one")
        spec = self._specs[self._next]
        if spec.name != name:
            raise LorafuseValueError(f"{self.path}: expected tensor {short(spec.name)}, got {short(name)}")
        self._next += 1
        self._remaining = spec.nbytes

    def append(self, array: np.ndarray) -> None:
        """Bytes of the current tensor, in order (a whole tensor or consecutive parts of it)."""
        array = np.ascontiguousarray(array)
        if array.nbytes > self._remaining:
            raise LorafuseValueError(f"{self.path}: {array.nbytes} bytes exceed the {self._remaining} left in the "
                                     "tensor")
        if array.nbytes:
            try:
                self._write_all(array.data.cast("B"))
            except OSError as e:
                # EFAULT: the bytes are a view of an input file that shrank under its mapping (the
                # kernel reports the fault to write(2) instead of raising SIGBUS).
                if e.errno != errno.EFAULT:
                    raise
                raise_if_inputs_changed(_file_of(array))
                raise InputChangedError(f"the data of tensor {short(self._specs[self._next - 1].name)} could not be "
                                        "read from its input file: it changed or was truncated while lorafuse was "
                                        "reading it; nothing was written") from None
        self._remaining -= array.nbytes

    def write(self, name: str, array: np.ndarray) -> None:
        self.start(name)
        self.append(array)
        if self._remaining:
            raise LorafuseValueError(f"{self.path}: tensor {short(name)} needs {self._remaining} more bytes")

    def copy_from(self, name: str, src: SafetensorsFile, src_name: str) -> None:
        """Copy a tensor's bytes from another file without passing them through this process."""
        self.start(name)
        info = src.info(src_name)
        if info.nbytes != self._remaining:
            raise LorafuseValueError(f"{self.path}: {short(src_name)} has {info.nbytes} bytes, {short(name)} needs "
                                     f"{self._remaining}")
        offset = src.file_offset(src_name)
        try:
            copy_range(src.fileno(), offset, self._fd, info.nbytes)
        except _EndOfData as e:
            src.check_unchanged()  # names the file, with its size then and now
            raise InputChangedError(f"{src.path} ended at byte {e.at} while lorafuse was copying tensor "
                                    f"{short(src_name)} from it (it had {src.size} bytes when opened): it changed or "
                                    "was truncated while lorafuse was reading it; nothing was written") from None
        self._remaining = 0

    def write_at(self, name: str, array: np.ndarray) -> None:
        """Write tensor `name` whole at its place in the file (any order; each tensor once). The array must
        have the tensor's byte size and element size (its raw numpy type: BF16 as uint16, F8 as uint8)."""
        spec = self._by_name.get(name)
        if spec is None:
            raise LorafuseValueError(f"{self.path}: no tensor named {short(name)} in the header being written")
        if name in self._placed:
            raise LorafuseValueError(f"{self.path}: tensor {short(name)} written twice")
        if self._next:
            raise LorafuseValueError(f"{self.path}: tensor {short(name)} written by write_at after tensors written in "
                                     "order (a file is written one way or the other)")
        array = np.ascontiguousarray(array)
        itemsize = DTYPES[spec.dtype].itemsize
        if array.nbytes != spec.nbytes or (array.size and array.dtype.itemsize != itemsize):
            raise LorafuseValueError(f"{self.path}: tensor {short(name)} ({spec.dtype}, shape {spec.shape}) needs "
                                     f"{spec.nbytes} bytes of {itemsize}-byte elements, got an array of "
                                     f"{array.dtype} with shape {array.shape} ({array.nbytes} bytes)")
        view = array.data.cast("B") if array.nbytes else memoryview(b"")
        at = self._header_bytes + self._offsets[name]
        try:
            while len(view):
                n = os.pwrite(self._fd, view[:WRITE_PIECE], at)
                view, at = view[n:], at + n
        except OSError as e:
            if e.errno != errno.EFAULT:  # as in append(): an input view whose file shrank under its mapping
                raise
            raise_if_inputs_changed(_file_of(array))
            raise InputChangedError(f"the data of tensor {short(name)} could not be read from its input file: it "
                                    "changed or was truncated while lorafuse was reading it; nothing was "
                                    "written") from None
        self._placed.add(name)

    def missing(self) -> list[str]:
        """The tensors not (completely) written yet, in header order."""
        if self._placed or not self._next:
            return [s.name for s in self._specs if s.name not in self._placed]
        return [s.name for s in self._specs[self._next - (1 if self._remaining else 0):]]

    def rewrite_metadata(self, metadata: Mapping[str, str] | None) -> None:
        """Replace the header's metadata with `metadata`, whose header has the same length (values that
        are only known at the end, such as hashes of the data, written first as placeholders of the
        same length)."""
        header, _ = encode_header(self._specs, metadata, self._header_bytes)
        if len(header) != self._header_bytes:
            raise LorafuseValueError(f"{self.path}: the new metadata makes a header of {len(header)} bytes, not "
                                     f"the {self._header_bytes} already written")
        if os.pwrite(self._fd, header, 0) != len(header):
            raise OSError(errno.EIO, "short write of the header", str(self.path))

    def close(self) -> None:
        if self._fd < 0:  # closed already
            return
        missing = self.missing()
        self._close_fd()
        if missing:
            shown = ", ".join(repr(n) for n in missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8
                                                                else "")
            if self._placed:
                raise LorafuseValueError(f"{self.path}: closed with {len(missing)} of {len(self._specs)} tensors "
                                         f"not written: {shown}")
            done = len(self._specs) - len(missing)
            raise LorafuseValueError(f"{self.path}: closed after {done} of {len(self._specs)} tensors "
                                     f"(missing: {shown})")


class _EndOfData(FormatError):
    """The source of a copy ended early (at byte `at`)."""

    def __init__(self, message: str, at: int) -> None:
        super().__init__(message)
        self.at = at


def copy_range(src_fd: int, src_offset: int, dst_fd: int, nbytes: int) -> None:
    """Append nbytes of src (from src_offset) to dst's current position, in the kernel when possible.

    A source shorter than src_offset + nbytes (a file truncated after it was validated) raises
    FormatError (an _EndOfData, which says where it ended)."""
    done = 0
    use_cfr = hasattr(os, "copy_file_range")
    while done < nbytes:
        n = 0
        if use_cfr:
            try:
                n = os.copy_file_range(src_fd, dst_fd, min(nbytes - done, 1 << 30), src_offset + done)
            except OSError:
                use_cfr = False
        if not use_cfr:
            chunk = os.pread(src_fd, min(nbytes - done, 1 << 24), src_offset + done)
            n = os.write(dst_fd, chunk)
        if n == 0:
            raise _EndOfData(f"unexpected end of data while copying {nbytes} bytes at offset {src_offset}",
                             src_offset + done)
        done += n


def save_file(tensors: Mapping[str, tuple[str, np.ndarray]], path: str | os.PathLike[str],
              metadata: Mapping[str, str] | None = None) -> None:
    """Write {name: (dtype, raw array)} to a safetensors file (not atomic: see io.atomic)."""
    specs = [TensorSpec(n, d, tuple(a.shape)) for n, (d, a) in tensors.items()]
    for s, (_, a) in zip(specs, tensors.values()):
        if a.dtype.itemsize != DTYPES[s.dtype].itemsize:
            raise LorafuseValueError(f"tensor {short(s.name)}: array of {a.dtype} cannot hold {s.dtype}")
    with SafetensorsWriter(path, specs, metadata) as w:
        for name, (_, a) in tensors.items():
            w.write(name, a)
