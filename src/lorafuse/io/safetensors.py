"""safetensors files: a validating, memory-mapped reader and a streaming writer.

Format: 8-byte little-endian header length N, N bytes of UTF-8 JSON
`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}`,
then the data buffer. The reader checks everything the reference implementation
checks and hands out zero-copy numpy views of the mapped file.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorafuse.errors import FormatError, LorafuseValueError
from lorafuse.io.dtypes import DTYPES

MAX_HEADER_BYTES = 100_000_000
MAX_DIMS = 32  # numpy 1.x holds at most 32 dimensions (2.x: 64); no real tensor has more
_U64_MAX = 2**64 - 1
_I64_MAX = 2**63 - 1
_WIDEST = 8  # bytes per element of the widest type a tensor is converted to (float64)
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
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
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise FormatError(f"duplicate key {key!r} in header")
        out[key] = value
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


def open_regular(path: str | os.PathLike[str], where: str) -> int:
    """A read-only descriptor of a regular file. A FIFO, socket or device is refused without
    blocking on it (opening a FIFO would wait for a writer forever)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise FormatError(f"{where}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        os.close(fd)
        raise FormatError(f"{where}: cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise FormatError(f"{where}: cannot read: it is {file_kind(mode)}, not a file")
    return fd


def parse_header(raw: bytes, data_size: int, where: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a header (the N JSON bytes) against a data buffer of `data_size` bytes."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{where}: header is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.startswith("{"):
        raise FormatError(f"{where}: header does not start with '{{'")
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except FormatError as e:
        raise FormatError(f"{where}: header is not valid JSON ({e})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, integers of thousands of digits, deep nesting
        raise FormatError(f"{where}: header is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{where}: header is not a JSON object")
    metadata = obj.pop("__metadata__", None)
    if metadata is None:  # absent or null; [] or "" are not a map and are refused below
        metadata = {}
    if not isinstance(metadata, dict):
        raise FormatError(f"{where}: __metadata__ must map strings to strings, got {type(metadata).__name__}")
    for k, v in metadata.items():
        if not isinstance(v, str):
            raise FormatError(f"{where}: __metadata__ must map strings to strings: {k!r} maps to {_short(v)}")
        if not (_is_unicode(k) and _is_unicode(v)):
            raise FormatError(f"{where}: __metadata__ entry {k!r} holds a lone UTF-16 surrogate (not Unicode text)")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in obj.items():
        tensors[name] = _parse_entry(name, entry, where)
    # Offsets must tile the data buffer exactly: no overlap, no gap, nothing after.
    cursor = 0
    last: TensorInfo | None = None
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if t.begin != cursor:
            kind = "overlaps another tensor" if t.begin < cursor else "leaves a gap before it"
            other = f" ({last.name!r} ends at {cursor})" if last is not None else ""
            raise FormatError(f"{where}: tensor {t.name!r} at offsets [{t.begin}, {t.end}] {kind}{other}")
        cursor, last = t.end, t
    if cursor > data_size:
        assert last is not None
        raise FormatError(f"{where}: tensors need {cursor} data bytes but the file holds {data_size} (truncated?): "
                          f"tensor {last.name!r} at offsets [{last.begin}, {last.end}] is past the end")
    if cursor < data_size:
        raise FormatError(f"{where}: {data_size - cursor} trailing bytes after the last tensor "
                          f"(the tensors end at data offset {cursor}, the data is {data_size} bytes)")
    return tensors, dict(metadata)


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_entry(name: str, entry: object, where: str) -> TensorInfo:
    if not _is_unicode(name):
        raise FormatError(f"{where}: tensor name {name!r} holds a lone UTF-16 surrogate (not Unicode text)")
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: entry for tensor {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise FormatError(f"{where}: tensor {name!r} has unknown dtype {_short(dtype)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise FormatError(f"{where}: tensor {name!r} has invalid shape {_short(shape)}")
    if len(shape) > MAX_DIMS:
        raise FormatError(f"{where}: tensor {name!r} has {len(shape)} dimensions (at most {MAX_DIMS} are supported)")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and 0 <= o <= _U64_MAX for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise FormatError(f"{where}: tensor {name!r} has invalid data_offsets {_short(offsets)}")
    nbytes = DTYPES[dtype].itemsize
    # The byte size with zero dims taken as 1, at 8 bytes an element: numpy cannot hold a shape past
    # 2**63 - 1 bytes even with no elements, and the tensor may be converted to float32 / float64.
    extent = _WIDEST
    for d in shape:
        nbytes *= d
        extent *= max(d, 1)
        if nbytes > _U64_MAX or extent > _I64_MAX:
            raise FormatError(f"{where}: tensor {name!r} with shape {_short(shape)} overflows 64-bit byte sizes")
    if nbytes != offsets[1] - offsets[0]:
        raise FormatError(
            f"{where}: tensor {name!r} of dtype {dtype} and shape {shape} needs {nbytes} bytes "
            f"but its data_offsets span {offsets[1] - offsets[0]}"
        )
    return TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])


def _read_header_fd(fd: int, where: str) -> tuple[dict[str, TensorInfo], dict[str, str], int, int]:
    """(tensors, metadata, data start, file size) of the open regular file `fd`."""
    try:
        size = os.fstat(fd).st_size
        if size < 8:
            raise FormatError(f"{where}: file is {size} bytes, too small for a safetensors header")
        (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        if n > MAX_HEADER_BYTES:
            raise FormatError(f"{where}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if 8 + n > size:
            raise FormatError(f"{where}: header length {n} runs past the end of the {size}-byte file")
        raw = bytearray()
        while len(raw) < n:  # pread may return fewer bytes than asked
            chunk = os.pread(fd, n - len(raw), 8 + len(raw))
            if not chunk:
                raise FormatError(f"{where}: the file ended inside its {n}-byte header (changed while read?)")
            raw += chunk
    except OSError as e:
        raise FormatError(f"{where}: cannot read: {e.strerror or e}") from None
    tensors, metadata = parse_header(bytes(raw), size - 8 - n, where)
    return tensors, metadata, 8 + n, size


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Header of a safetensors file: (tensors, metadata, data start offset). Reads only the header."""
    where = str(path)
    fd = open_regular(path, where)
    try:
        tensors, metadata, start, _ = _read_header_fd(fd, where)
    finally:
        os.close(fd)
    return tensors, metadata, start


class SafetensorsFile:
    """A validated safetensors file, memory-mapped; tensors are zero-copy numpy views.

    Use as a context manager or call close(). `release(name)` drops a tensor's pages
    from this process's resident set once it has been used (they stay in the page cache).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        where = str(path)
        # One descriptor for validating and mapping: the mapping covers exactly the bytes validated.
        fd = open_regular(self.path, where)
        try:
            self.tensors, self.metadata, self._data_start, size = _read_header_fd(fd, where)
            self._map: mmap.mmap | None = mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else None
        except OSError as e:
            os.close(fd)
            raise FormatError(f"{where}: cannot map: {e.strerror or e}") from None
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
            except BufferError:  # views still alive: the mapping goes when they do
                pass
            self._map = None
        self._file.close()

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise FormatError(f"{self.path}: no tensor named {name!r}") from None

    def raw(self, name: str) -> np.ndarray:
        """Read-only view of a tensor's bytes as its raw numpy type (BF16 as uint16, F8 as uint8)."""
        t = self.info(name)
        dt = DTYPES[t.dtype]
        if t.nbytes == 0 or self._map is None:
            return np.zeros(t.shape, dtype=dt.raw)
        arr = np.frombuffer(self._map, dtype=dt.raw, count=t.numel, offset=self._data_start + t.begin)
        arr = arr.reshape(t.shape)
        if not arr.flags.aligned:  # a writer that did not align its data: copy once
            arr = arr.copy()
        return arr

    def file_offset(self, name: str) -> int:
        """Absolute offset of a tensor's first byte in the file."""
        return self._data_start + self.info(name).begin

    def fileno(self) -> int:
        return self._file.fileno()

    def release(self, name: str | None = None, begin: int = 0, end: int | None = None) -> None:
        """Drop mapped pages (all, or bytes [begin, end) of one tensor) from the resident set."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
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


def encode_header(specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None) -> tuple[bytes, dict[str, int]]:
    """Header bytes (with the 8-byte length prefix, padded so data starts 8-aligned) and each tensor's offset."""
    header: dict[str, object] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise LorafuseValueError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    offsets: dict[str, int] = {}
    cursor = 0
    for s in specs:
        if s.name in offsets or s.name == "__metadata__":
            raise LorafuseValueError(f"duplicate or reserved tensor name {s.name!r}")
        if s.dtype not in DTYPES:
            raise LorafuseValueError(f"tensor {s.name!r}: unknown dtype {s.dtype!r}")
        offsets[s.name] = cursor
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [cursor, cursor + s.nbytes]}
        cursor += s.nbytes
    body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * ((8 - len(body) % 8) % 8)
    return struct.pack("<Q", len(body)) + body, offsets


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor, in the order of `specs`.

    The header goes first, so the data of each tensor can be streamed in as it is
    produced: `write(name, array)` or `copy_from(name, src, src_name)` (kernel-side copy).
    """

    def __init__(self, path: str | os.PathLike[str], specs: list[TensorSpec], metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self._specs = specs
        self._next = 0
        self._remaining = 0
        header, _ = encode_header(specs, metadata)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self._write_all(memoryview(header))
        except BaseException:
            os.close(self._fd)
            raise

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            os.close(self._fd)

    def _write_all(self, view: memoryview) -> None:
        view = view.cast("B")
        while len(view):
            n = os.write(self._fd, view[: 1 << 30])
            view = view[n:]

    def start(self, name: str) -> None:
        """Begin the next tensor; its bytes follow through append()."""
        if self._remaining:
            raise LorafuseValueError(f"{self.path}: tensor {self._specs[self._next - 1].name!r} is incomplete")
        if self._next >= len(self._specs):
            raise LorafuseValueError(f"{self.path}: tensor {name!r} written after the last one")
        spec = self._specs[self._next]
        if spec.name != name:
            raise LorafuseValueError(f"{self.path}: expected tensor {spec.name!r}, got {name!r}")
        self._next += 1
        self._remaining = spec.nbytes

    def append(self, array: np.ndarray) -> None:
        """Bytes of the current tensor, in order (a whole tensor or consecutive parts of it)."""
        array = np.ascontiguousarray(array)
        if array.nbytes > self._remaining:
            raise LorafuseValueError(f"{self.path}: {array.nbytes} bytes exceed the {self._remaining} left in the tensor")
        if array.nbytes:
            self._write_all(memoryview(array).cast("B"))
        self._remaining -= array.nbytes

    def write(self, name: str, array: np.ndarray) -> None:
        self.start(name)
        self.append(array)
        if self._remaining:
            raise LorafuseValueError(f"{self.path}: tensor {name!r} needs {self._remaining} more bytes")

    def copy_from(self, name: str, src: SafetensorsFile, src_name: str) -> None:
        """Copy a tensor's bytes from another file without passing them through this process."""
        self.start(name)
        info = src.info(src_name)
        if info.nbytes != self._remaining:
            raise LorafuseValueError(f"{self.path}: {src_name!r} has {info.nbytes} bytes, {name!r} needs {self._remaining}")
        copy_range(src.fileno(), src.file_offset(src_name), self._fd, info.nbytes)
        self._remaining = 0

    def close(self) -> None:
        if self._next != len(self._specs) or self._remaining:
            os.close(self._fd)
            raise LorafuseValueError(f"{self.path}: closed after {self._next} of {len(self._specs)} tensors")
        os.close(self._fd)


def copy_range(src_fd: int, src_offset: int, dst_fd: int, nbytes: int) -> None:
    """Append nbytes of src (from src_offset) to dst's current position, in the kernel when possible."""
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
            raise FormatError(f"unexpected end of data while copying {nbytes} bytes at offset {src_offset}")
        done += n


def save_file(tensors: Mapping[str, tuple[str, np.ndarray]], path: str | os.PathLike[str],
              metadata: Mapping[str, str] | None = None) -> None:
    """Write {name: (dtype, raw array)} to a safetensors file (not atomic: see io.atomic)."""
    specs = [TensorSpec(n, d, tuple(a.shape)) for n, (d, a) in tensors.items()]
    for s, (_, a) in zip(specs, tensors.values()):
        if a.dtype.itemsize != DTYPES[s.dtype].itemsize:
            raise LorafuseValueError(f"tensor {s.name!r}: array of {a.dtype} cannot hold {s.dtype}")
    with SafetensorsWriter(path, specs, metadata) as w:
        for name, (_, a) in tensors.items():
            w.write(name, a)
