"""How lorafuse recognises its own outputs, so that it replaces those and nothing else.

* A folder output holds `lorafuse_manifest.json`: who wrote it (lorafuse, its version), what it is
  (`kind`) and every file and folder written, each file with its size (and the sha256 of files up to
  1 MiB: configs, tokenizer files, small adapters; of a bigger one, the sha256 of its first MiB and of 64
  blocks spread over the rest). The folder is lorafuse's as long as it holds
  nothing more and nothing changed: an entry the manifest does not list (notes the user put there),
  or a listed file whose size or hash differs, makes it the user's again. Files that are gone are no
  loss. Loaders (PEFT, transformers, diffusers, lorafuse) ignore the extra file.
* A single `.safetensors` file carries `"lorafuse_version"` in its `__metadata__`, in an intact file
  (the header and the data sizes agree). A file whose header is unreadable is not lorafuse's.
* A PNG plot carries a `lorafuse_version` text chunk.
* Every file of an output is stamped, outside its bytes, with its size and modification time (an
  extended attribute, `user.lorafuse.written`, where the file system keeps them): a file edited in place
  since (a tool that keeps lorafuse's metadata, a same-size change to a file too big to hash) no longer
  matches its stamp and is the user's; so is a file without a stamp where the file system keeps them (a
  copy, a download, another tool's rewrite: maybe the user's only copy). Where the file system keeps no
  extended attributes, the mark or the manifest alone decides.

Everything here is deterministic (no dates, no process ids): the same run writes the same bytes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lorafuse._version import get_version

MANIFEST_NAME = "lorafuse_manifest.json"
MARKER_KEY = "lorafuse_version"
OPERATION_KEY = "lorafuse.operation"  # io.provenance's record of the command that made a .safetensors file

# What an output is: a folder's manifest `kind`; a file's, told from what it holds (own_file_kind). An earlier
# lorafuse output is replaced without --overwrite only by one that is the same thing (a re-run), never a merged
# model by an adapter (io.atomic). A PEFT folder and an adapter file are the same thing (_SAME).
CHECKPOINT, PIPELINE, PEFT_ADAPTER = "checkpoint", "diffusers-pipeline", "peft-adapter"  # folders
ADAPTER, PLOT = "adapter", "plot"  # files (a merged model file is a CHECKPOINT too)
KINDS = {CHECKPOINT: "a merged model", PIPELINE: "a merged diffusers pipeline", PEFT_ADAPTER: "an adapter",
         ADAPTER: "an adapter", PLOT: "a plot"}
_SAME = {PEFT_ADAPTER: ADAPTER}  # kinds that are the same thing (a PEFT folder and an adapter file: adapters)


def same_kind(old: str | None, new: str | None) -> bool:
    """Whether an output of kind `new` may replace one of kind `old` as a re-run: the same thing, or either
    unknown (None, '', a kind another version wrote)."""
    return old not in KINDS or new not in KINDS or _SAME.get(old, old) == _SAME.get(new, new)
HASH_LIMIT = 1 << 20  # files up to this size are hashed into the manifest
_SAMPLES, _SAMPLE_BYTES = 64, 4096  # blocks of a bigger file hashed into the manifest (_sample_at)
_MANIFEST_MAX = 64 << 20
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def version() -> str:
    return get_version()


# ----------------------------------------------------------------------------- stamps

STAMP_XATTR = "user.lorafuse.written"  # "SIZE:MTIME_NS" of a file as lorafuse left it (an extended attribute)


def stamp(path: Path) -> None:
    """Record on a finished output file, outside its bytes (the same run still writes the same bytes), its size
    and modification time: an edit in place later (same size, or a tool that keeps lorafuse's metadata) moves
    the time and stamp_differs says so. Where the file system keeps no extended attributes, nothing is
    recorded and the mark or manifest alone decides."""
    try:
        st = os.stat(path, follow_symlinks=False)
        if stat.S_ISREG(st.st_mode):
            os.setxattr(path, STAMP_XATTR, f"{st.st_size}:{st.st_mtime_ns}".encode("ascii"), follow_symlinks=False)
    except (OSError, AttributeError):  # no xattrs here (or on this system)
        pass


_NO_XATTRS = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP})  # the file system keeps no (user) extended attributes


def stamp_differs(fd: int) -> bool:
    """Whether the open file is not as lorafuse left it: its stamp differs (edited in place since), or it has
    none where its file system keeps them (lorafuse stamps every file it writes: one without a stamp there is a
    copy, a download or another tool's rewrite, which may be the only one the user has). False where the stamp
    matches, or where the file system keeps no extended attributes (the mark or the manifest alone decides)."""
    try:
        value = os.getxattr(fd, STAMP_XATTR)
        st = os.fstat(fd)
    except AttributeError:  # no xattrs on this system
        return False
    except OSError as e:
        return e.errno not in _NO_XATTRS  # ENODATA: kept, but not set; another error: it cannot be told
    return value != f"{st.st_size}:{st.st_mtime_ns}".encode("ascii")


def stamp_tree(folder: Path) -> None:
    """stamp every regular file in a finished output folder (links are not followed)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            stamp(Path(root) / name)


def mark_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """`metadata` for a new single-file output: any earlier lorafuse marker (metadata passed through
    from a lorafuse-written input) is dropped and a fresh one is put last."""
    out = {k: v for k, v in (metadata or {}).items() if k != MARKER_KEY}
    out[MARKER_KEY] = version()
    return out


def png_metadata() -> dict[str, str]:
    """matplotlib's savefig(metadata=...) for a PNG lorafuse writes: its marker as a tEXt chunk."""
    return {MARKER_KEY: version()}


# ----------------------------------------------------------------------------- folders


def _sha256_at(dir_fd: int, name: str) -> str:
    fd = os.open(name, os.O_RDONLY | _NOFOLLOW | _NONBLOCK, dir_fd=dir_fd)
    try:
        h = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
        return h.hexdigest()
    finally:
        os.close(fd)


def _sample_at(dir_fd: int, name: str, size: int) -> str:
    """sha256 of a file too big to hash whole, from its first HASH_LIMIT bytes (a safetensors header and
    metadata) and _SAMPLES blocks spread evenly over the rest: another model of the same size put in its place
    without lorafuse's stamp (copied, rsync'ed, downloaded, saved and renamed) differs there."""
    fd = os.open(name, os.O_RDONLY | _NOFOLLOW | _NONBLOCK, dir_fd=dir_fd)
    try:
        h = hashlib.sha256(os.pread(fd, HASH_LIMIT, 0))
        step = max(1, (size - HASH_LIMIT) // _SAMPLES)
        for i in range(_SAMPLES):
            h.update(os.pread(fd, _SAMPLE_BYTES, HASH_LIMIT + i * step))
        return h.hexdigest()
    finally:
        os.close(fd)


def _record(dir_fd: int, name: str, st: os.stat_result) -> dict[str, object]:
    """What the manifest says of one non-folder entry."""
    if stat.S_ISREG(st.st_mode):
        rec: dict[str, object] = {"size": st.st_size}
        if st.st_size <= HASH_LIMIT:
            rec["sha256"] = _sha256_at(dir_fd, name)
        else:
            rec["sample_sha256"] = _sample_at(dir_fd, name, st.st_size)
        return rec
    if stat.S_ISLNK(st.st_mode):
        return {"link": os.readlink(name, dir_fd=dir_fd)}
    return {"special": stat.S_IFMT(st.st_mode)}


def _unreadable(error: OSError) -> None:
    """fwalk's onerror: a sub-folder that cannot be read is an answer nobody can trust (it could hold
    anything), so it stops the walk; one that vanished meanwhile holds nothing to lose."""
    if not isinstance(error, FileNotFoundError):
        raise error


def _walk(dir_fd: int) -> Iterator[tuple[str, list[str], list[str], int]]:
    """os.fwalk of an open folder (links not followed: they are entries, never descended into), with
    paths relative to it ('' for the folder itself). Raises OSError for a sub-folder it cannot read."""
    for root, dirs, files, root_fd in os.fwalk(".", dir_fd=dir_fd, onerror=_unreadable):
        rel = os.path.normpath(root)
        yield ("" if rel == "." else rel.replace(os.sep, "/")), dirs, files, root_fd


def _join(root: str, name: str) -> str:
    return f"{root}/{name}" if root else name


def write_manifest(folder: Path, kind: str) -> None:
    """Write `folder`/lorafuse_manifest.json listing everything in `folder` (a finished output, not yet
    in place). A manifest already there (copied from an input) is replaced."""
    files: dict[str, dict[str, object]] = {}
    folders: list[str] = []
    fd = os.open(folder, os.O_RDONLY | _DIRECTORY | _NOFOLLOW)
    try:
        for root, dirs, names, root_fd in _walk(fd):
            folders += [_join(root, d) for d in dirs]
            for name in names:
                if not root and name == MANIFEST_NAME:
                    continue
                files[_join(root, name)] = _record(root_fd, name, os.stat(name, dir_fd=root_fd,
                                                                          follow_symlinks=False))
    finally:
        os.close(fd)
    manifest = {
        "written_by": "lorafuse",
        "version": version(),
        "kind": kind,
        "about": "lorafuse replaces this folder (a later run writing the same output) only while it holds exactly "
                 "the files listed here, unchanged; anything added or changed makes lorafuse refuse without "
                 "--overwrite. Loaders ignore this file.",
        "folders": sorted(folders),
        "files": dict(sorted(files.items())),
    }
    # ASCII JSON: any file name (one that is not UTF-8 too, as \udcXX escapes) reads back as os.listdir gives it
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="ascii")


@dataclass
class FolderState:
    """What an existing folder holds, as far as replacing it goes."""

    entries: list[str]  # its top-level names, sorted (folders end with '/')
    manifest: str = "absent"  # 'absent', 'invalid' or 'valid'
    unlisted: list[str] = field(default_factory=list)  # entries the manifest does not list
    changed: list[str] = field(default_factory=list)  # listed files whose size or hash differ
    ident: tuple[int, int] = (0, 0)  # (st_dev, st_ino) of the folder read
    kind: str | None = None  # what its valid manifest says it is (KINDS), None when it says nothing
    # whether `path` still named the folder read when the reading ended (checked while its descriptor was
    # open, so that its inode number cannot have been reused meanwhile by a folder another run made)
    current: bool = True

    @property
    def empty(self) -> bool:
        return not self.entries

    @property
    def ours(self) -> bool:
        """A lorafuse output with nothing added and nothing changed."""
        return self.manifest == "valid" and not self.unlisted and not self.changed


def _read_manifest(dir_fd: int) -> dict[str, object] | None:
    """The folder's manifest when it is a valid one lorafuse wrote (a regular file, JSON, the right
    fields and types), else None."""
    try:
        fd = os.open(MANIFEST_NAME, os.O_RDONLY | _NOFOLLOW | _NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MANIFEST_MAX:
            return None
        raw = b""
        while chunk := os.read(fd, 1 << 20):
            raw += chunk
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("written_by") != "lorafuse":
        return None
    files, folders = data.get("files"), data.get("folders", [])
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        return None
    if not isinstance(folders, list) or not all(isinstance(f, str) for f in folders):
        return None
    return data


def _differs(dir_fd: int, name: str, rec: Mapping[str, object]) -> bool:
    """True when the entry `name` is not what the manifest recorded (a vanished entry does not differ)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if "link" in rec:
            return not stat.S_ISLNK(st.st_mode) or os.readlink(name, dir_fd=dir_fd) != rec["link"]
        if "special" in rec:
            return stat.S_IFMT(st.st_mode) != rec["special"]
        size = rec.get("size")  # a record without an integer size (a damaged manifest) matches nothing
        if not stat.S_ISREG(st.st_mode) or type(size) is not int or st.st_size != size:
            return True
        if "sha256" in rec and _sha256_at(dir_fd, name) != rec["sha256"]:
            return True
        if "sample_sha256" in rec and _sample_at(dir_fd, name, st.st_size) != rec["sample_sha256"]:
            return True
        fd = os.open(name, os.O_RDONLY | _NOFOLLOW | _NONBLOCK, dir_fd=dir_fd)  # its stamp: edited or copied since
        try:
            return stamp_differs(fd)
        finally:
            os.close(fd)
    except FileNotFoundError:
        return False


def inspect_folder(path: Path) -> FolderState:
    """Read an existing folder once, through one open descriptor (another run replacing `path`
    meanwhile cannot mix two folders into one answer). Raises OSError when it cannot be read."""
    fd = os.open(path, os.O_RDONLY | _DIRECTORY | _NOFOLLOW)
    try:
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino)
        top = sorted(os.listdir(fd))
        entries = sorted(n + "/" if _is_dir_at(fd, n) else n for n in top)
        if not entries:
            return FolderState(entries, ident=ident)
        manifest = _read_manifest(fd)
        if manifest is None:
            return FolderState(entries, "invalid" if MANIFEST_NAME in top else "absent", ident=ident,
                               current=_still_at(path, ident))
        kind = manifest.get("kind")
        state = FolderState(entries, "valid", ident=ident, kind=kind if isinstance(kind, str) else None)
        files: dict[str, dict[str, object]] = manifest["files"]  # type: ignore[assignment]
        folders: set[str] = set(manifest.get("folders", []))  # type: ignore[call-overload]
        for root, dirs, names, root_fd in _walk(fd):
            kept = []
            for d in dirs:
                rel = _join(root, d)
                if rel in folders:
                    kept.append(d)
                else:
                    state.unlisted.append(rel + "/")
            dirs[:] = kept  # an unlisted folder is named once, not walked
            for name in names:
                rel = _join(root, name)
                if not root and name == MANIFEST_NAME:
                    continue
                rec = files.get(rel)
                if rec is None:
                    state.unlisted.append(rel)
                elif _differs(root_fd, name, rec):
                    state.changed.append(rel)
        state.unlisted.sort()
        state.changed.sort()
        state.current = _still_at(path, ident)
        return state
    finally:
        os.close(fd)


def _still_at(path: Path, ident: tuple[int, int]) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == ident


def _is_dir_at(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


# ----------------------------------------------------------------------------- single files


def _png_marked(fd: int) -> bool:
    """A PNG with lorafuse's marker in one of its tEXt chunks (chunks are skipped, never read whole)."""
    pos = len(_PNG_SIGNATURE)
    for _ in range(100_000):
        head = os.pread(fd, 8, pos)
        if len(head) < 8:
            return False
        length, kind = int.from_bytes(head[:4], "big"), head[4:]
        if kind == b"IEND":
            return False
        if kind == b"tEXt" and length <= (1 << 20):
            keyword, _, value = os.pread(fd, length, pos + 8).partition(b"\0")
            if keyword == MARKER_KEY.encode() and value:
                return True
        pos += 12 + length  # length, type, data, CRC
    return False


GGUF_MAGIC = b"GGUF"


def gguf_counts(path: Path) -> tuple[int, int, int] | None:
    """(version, tensor count, metadata key count) of a GGUF file, from its first 24 bytes (magic, u32, u64, u64,
    little-endian); None when it does not start with GGUF's magic or is shorter. OSError when it cannot be read.
    What is checked before gguf's reader parses a file: a hostile count must not make it loop over 2^64 entries."""
    with open(path, "rb") as f:
        return _gguf_head(f.read(24))


def _gguf_head(head: bytes) -> tuple[int, int, int] | None:
    """gguf_counts of a GGUF file's first 24 bytes."""
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        return None
    version, tensors, kvs = (int.from_bytes(head[i:j], "little") for i, j in ((4, 8), (8, 16), (16, 24)))
    return version, tensors, kvs


_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_GGUF_STRING, _GGUF_ARRAY = 8, 9
GGUF_MAX_ARRAY = 1 << 24  # elements of one metadata array (a tokenizer's vocabulary is ~10^5)
GGUF_MAX_DIMS = 8


def gguf_bounded(path: Path) -> str | None:
    """Why a GGUF file's header cannot be what it claims, or None: every metadata key, value, array and tensor
    description walked with each declared length checked against the bytes the file has, before gguf's reader
    (which loops over whatever count a file declares, reading past the end as empty arrays: a 68-byte file
    with an array of 2^62 elements made it allocate without bound). The file is mapped: only the header's pages
    are read. OSError when the file cannot be read."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < 24:
            return _SHORT_HEAD
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _gguf_walk(data)


_SHORT_HEAD = "its 24-byte header is cut short or lacks GGUF's magic"


def _gguf_walk(data: mmap.mmap) -> str | None:
    """gguf_bounded of a mapped file."""
    end = len(data)
    counts = _gguf_head(data[:24])
    if counts is None:
        return _SHORT_HEAD
    _, n_tensors, n_kv = counts
    pos = 24

    def u(n: int) -> int:
        nonlocal pos
        if pos + n > end:
            raise ValueError(f"it ends inside its header, at byte {pos}")
        v = int.from_bytes(data[pos:pos + n], "little")
        pos += n
        return v

    def skip(n: int, what: str) -> None:
        nonlocal pos
        if n < 0 or pos + n > end:
            raise ValueError(f"{what} of {n} bytes at byte {pos} goes past the end of the file ({end} bytes)")
        pos += n

    def value(kind: int, depth: int) -> None:
        if kind in _GGUF_SCALAR:
            skip(_GGUF_SCALAR[kind], "a value")
        elif kind == _GGUF_STRING:
            skip(u(8), "a string")
        elif kind == _GGUF_ARRAY:
            inner, count = u(4), u(8)
            if depth > 4 or count > GGUF_MAX_ARRAY:
                raise ValueError(f"an array of {count} elements (nesting depth {depth}) at byte {pos}")
            if inner in _GGUF_SCALAR:
                skip(count * _GGUF_SCALAR[inner], "an array")
            else:
                if count * 8 > end - pos:  # each string or array takes at least 8 bytes
                    raise ValueError(f"an array of {count} elements at byte {pos} longer than the file")
                for _ in range(count):
                    value(inner, depth + 1)
        else:
            raise ValueError(f"an unknown value type {kind} at byte {pos}")

    try:
        for _ in range(n_kv):
            skip(u(8), "a key")
            value(u(4), 0)
        for _ in range(n_tensors):
            skip(u(8), "a tensor name")
            dims = u(4)
            if dims > GGUF_MAX_DIMS:
                raise ValueError(f"a tensor of {dims} dimensions at byte {pos}")
            skip(8 * dims + 4 + 8, "a tensor description")
    except ValueError as e:
        return str(e)
    return None


def _gguf_marked(path: Path) -> bool:
    """A GGUF file (convert --to gguf) is ours when gguf's reader parses it whole and it holds the marker
    key; without the `gguf` package (lorafuse[gguf]) no GGUF file is taken for ours."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return False
    try:
        counts = gguf_counts(path)
    except OSError:
        return False
    if counts is None or counts[0] not in (2, 3) or counts[2] > 4096 or counts[1] > 1 << 24:
        return False  # not what lorafuse writes: no need to parse it
    try:
        if gguf_bounded(path) is not None:
            return False
    except OSError:
        return False
    try:
        field = GGUFReader(path).get_field(MARKER_KEY)
    except Exception:  # a damaged or hostile file, whatever gguf's reader raises: not ours  # noqa: BLE001
        return False
    return field is not None


def file_is_ours(path: Path) -> bool:
    """True when `path` is an intact lorafuse-written .safetensors file (marker in its metadata), PNG or
    GGUF file."""
    return own_file_kind(path) is not None


def own_file_kind(path: Path, stamped: bool = True) -> str | None:
    """What the intact lorafuse-written file `path` is (KINDS): a PNG is a plot, a GGUF file an adapter
    (convert --to gguf), a .safetensors file a merged model when `apply` made it (its lorafuse.operation),
    else an adapter; '' for a .safetensors file that does not say (no lorafuse.operation: an earlier
    version's). None when the file is not lorafuse's (file_is_ours), also when it is not as lorafuse left it
    (stamp_differs: edited in place, copied, downloaded) unless `stamped` is False (the mark alone)."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        if stamped and stamp_differs(fd):  # lorafuse's output once, edited in place or copied since
            return None
        if os.pread(fd, len(_PNG_SIGNATURE), 0) == _PNG_SIGNATURE:
            return PLOT if _png_marked(fd) else None
        if os.pread(fd, len(GGUF_MAGIC), 0) == GGUF_MAGIC:
            return ADAPTER if _gguf_marked(path) else None
        from lorafuse.errors import LorafuseError
        from lorafuse.io.safetensors import _read_header_fd

        try:  # validates the header, and that the tensors' data fill the rest of the file exactly
            metadata = _read_header_fd(fd, str(path))[1]
        except (LorafuseError, ValueError):
            return None
        if not isinstance(metadata.get(MARKER_KEY), str):
            return None
        operation = metadata.get(OPERATION_KEY)
        return "" if not isinstance(operation, str) else CHECKPOINT if operation == "apply" else ADAPTER
    except OSError:
        return None
    finally:
        os.close(fd)


__all__ = ["ADAPTER", "CHECKPOINT", "GGUF_MAGIC", "KINDS", "MANIFEST_NAME", "MARKER_KEY", "PEFT_ADAPTER", "PIPELINE",
           "PLOT", "STAMP_XATTR", "FolderState", "file_is_ours", "gguf_counts", "inspect_folder", "mark_metadata",
           "own_file_kind", "png_metadata", "same_kind", "stamp", "stamp_differs", "stamp_tree", "write_manifest"]
