"""Many adapters: combine reading each adapter once per pass, in memory independent of their number.

combine's in-memory path maps every adapter at once, then streams module groups through the method: for
thousands of adapters that exhausts file descriptors and memory. This engine turns it around: it makes
passes over the adapters, and in each pass opens one adapter, reads its factors once, folds them into
per-module sketches and closes it. Memory is O(modules x (out + in) x sketch width), whatever n is.

Reading: the header pass loads each adapter (any format) and records where its factors lie in its file
(Replay: one safetensors file, the factors' byte ranges, shapes, dtypes and scales). Later passes of the
local engine read those bytes with one pread into a reused buffer instead of loading the adapter again, and
check the file is the one the header pass read (device, inode, size, modification and change times)
before and after.
Adapters are read in chunks; each module's sketch is folded over a chunk by one thread per module while the
next chunk is read (_Folding): svd's range and corange products by one backend call on the factors as stored
(sketch_fold: no float32 copy of them is made), linear's sums and the single-pass sketch's second product
from float32 stacks the factors are widened into (convert_into: B_i lands transposed, as B_i^T rows).

svd (D = sum_i c_i B_i A_i, c_i = w_i s_i, per module, in the stored orientation of svd.py):
- passes >= 2: a randomized SVD whose products go through each adapter's factors. Pass 1 takes the range,
  Y = D Omega = sum_i c_i B_i (A_i Omega); each further pass multiplies by the orthonormalized result of the
  previous one from the other side (Z = D^T Q, then D Q_z, ...: a power iteration every two passes). The
  last pass is the projection: D ~ Q Z^T (or Y Q_z^T), whose small SVD gives the rank-k factors.
- passes == 1: the single-pass sketch of Tropp, Yurtsever, Udell & Cevher (2017), "Practical sketching
  algorithms for low-rank matrix approximation": Y = D Omega (out x w) and W = Psi D (l x in, l = 2w + 1)
  in the same pass; Q = orth(Y), X = (Psi Q)^+ W by least squares, D ~ Q X, truncated to rank k.
- Gaussian test matrices are regenerated from (seed, module name, role), never stored or shipped; the
  products with a chunk's factors are float32 (each adapter's term to about 1e-7 of itself: more of D where
  terms cancel), summed over the chunk in float32 and over the chunks in float64, so the order of the
  adapters changes the result by rounding only. A module whose pass-1 sketch is below TINY (products of tiny
  factors, which float32 flushes to zero or keeps a few bits of) is folded again with its operands times a power
  of two (Sketching._rescued, after one more read of its factors' largest entries), the same in every later pass,
  and its sums divided by it; one whose terms no such scale brings into float32's range is refused.
- Error estimate per module (a posteriori, Tropp et al.'s error sketch): pass 1 also takes P = D Phi for
  `PROBES` independent Gaussian columns; since Phi is independent of the approximation D^, the mean of
  ||(D - D^) phi_j||^2 is an unbiased estimate of ||D - D^||_F^2 and ||P||_F^2 / PROBES one of ||D||_F^2.
  The relative error estimate sqrt of their ratio is reported per module, D^ being the factors as written
  (rounded to the output's dtype).

linear (PEFT's factor averaging, FedIT / FedAvg style): one pass, A' = sum_i sign(c_i) sqrt|c_i| A_i and
B' = sum_i sqrt|c_i| B_i, accumulated in float64 (equal ranks per module, as the in-memory method).

Small cases keep combine's in-memory exact path (choose_engine); the other methods always take it.

The fold of a pass (fold_sources: adapters into fresh float64 accumulators, given the pass's operands) is
linear in the adapters; engine 'ray' (ray_engine.py) runs it per shard of adapters in Ray tasks and adds the
partial accumulators, then the driver does what this engine does with them (Sketching).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import math
import os
import re
import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from lorafuse._progress import BAR_FORMAT, Display, human_bytes
from lorafuse._threads import outcome, started
from lorafuse._validate import (
    MAX_PASSES,
    check_int,
    check_path,
    check_text,
    decimal_number,
    full_rank,
    rounds_to_zero,
)
from lorafuse.backends import Backend, ConvertJob, SketchJob, SketchTerm, get_backend
from lorafuse.backends.native import resolve_threads
from lorafuse.errors import (
    AdapterNote,
    FormatError,
    InputChangedError,
    LorafuseError,
    LorafuseValueError,
    NonFiniteError,
    ShapeMismatchError,
    UnsupportedError,
    warn,
)
from lorafuse.formats import load, located_adapter, read
from lorafuse.io.hub import is_hub_id
from lorafuse.io.safetensors import FileIdentity, identity_of, locate, raise_if_inputs_changed
from lorafuse.model import Adapter, LoraUpdate
from lorafuse.model.adapter import refuse_one
from lorafuse.model.arithmetic import (
    FLOAT32_MAX,
    NARROWING_FIELDS,
    RootGroups,
    check_linear,
    combined_targets,
    float32_coefficient,
    join_state,
    one_layout,
    result,
)
from lorafuse.model.layout import ModuleLayout, check_dtype, factor_dtypes, factors_dtype, is_kxk, rounded
from lorafuse.model.spectral import frobenius_sq, is_stored_lora
from lorafuse.model.update import Update, holds_nonfinite, nonfinite_words
from lorafuse.ops.combine.identity import Identities
from lorafuse.ops.combine.options import CombineOptions
from lorafuse.ops.combine.terms import dense_shape, unused_conv_rank

# Three passes (one power iteration) by default: two came within only 1.25-1.5x of the optimal error
# on adapters whose spectrum decays smoothly past k (benchmarks/bench_many.py), three within 1.002x, as
# the in-memory path's randomized SVD, so a list that crosses MEMORY_MAX_ADAPTERS keeps the same quality.
DEFAULT_PASSES = 3
OVERSAMPLE = 10  # sketch width w = k + OVERSAMPLE, as the core's randomized SVD (sketch_width: or min(out, in))
PROBES = 10  # Gaussian columns of the error sketch
# A module whose pass-1 sketch is below TINY may have lost its precision to float32's underflow in the products
# (its factors' products below 2^-126: float32 keeps a few bits of them, or none): Sketching._rescued folds it
# again with the operand times up to 2^SCALE_MAX_EXP (Gaussian entries x 2^120 stay below float32's 2^128).
TINY = 2.0 ** -90
SCALE_MAX_EXP = 120
MEMORY_MAX_ADAPTERS = 256  # at most this many adapters (fewer under a low open-file limit): the in-memory path
STREAMABLE = ("svd", "linear")
ENGINES = ("auto", "memory", "stream", "ray")

# what combined_targets reads of each input's config (a whole config, rank_pattern and all, per adapter would grow
# the header pass's memory with n)
_TARGET_FIELDS = ("target_modules", *NARROWING_FIELDS)

AdapterInput = str | os.PathLike[str] | Adapter


@dataclasses.dataclass(frozen=True)
class Source:
    """One adapter of a combination: its path (opened once per pass) or an Adapter already in memory, and
    where it was named (a list file's line, or its position), for messages."""

    item: Path | Adapter
    where: str

    @property
    def path(self) -> Path | None:
        return self.item if isinstance(self.item, Path) else None


# ---- list files ------------------------------------------------------------------------------------------

_COMMENT_START = re.compile(r"(?:^|(?<=\s))#")  # where a comment may start: a `#` at the start or after a space
PATH_TEXT_MAX = 8192  # a longer text names no path (PATH_MAX is 4096): no `#` further in is looked at
_NUMBERISH = re.compile(r"^[-+]?(?:[.\d]|inf|nan)", re.IGNORECASE)  # a weight, or a bad one said so
# A list's line breaks are those wc -l, sed and editors count, \r\n, \n and \r (str.splitlines also breaks at \f,
# \v, \x1c-\x1e, U+0085, U+2028 and U+2029, which would shift every later line's number, and split a path).
_CONTENT_LINE = re.compile(r"^.*\S.*$", re.MULTILINE)  # a line holding more than blanks (breaks made \n first)
SHOWN_CHARS = 200  # of a listed name or weight in a message (a line may be megabytes long)
HUB_ID_MAX = 1024  # a longer name is no Hub id (org and name: 96 characters each; a revision: a branch, tag or sha)


def _cut(text: object) -> str:
    """str(text), cut to SHOWN_CHARS characters with its full length said: what messages show of a list's line."""
    t = str(text)
    return t if len(t) <= SHOWN_CHARS else f"{t[:SHOWN_CHARS - 3]}... ({len(t)} characters)"


def _shown(text: object) -> str:
    """repr(text) (a str), cut as _cut does."""
    t = str(text)
    return repr(t) if len(t) <= SHOWN_CHARS else repr(_cut(t))


def _from_list(p: Path, name: str) -> Path:
    """Where the list `p` puts the adapter `name`: an absolute path (or ~) as it is, else in the list's folder."""
    target = Path(name).expanduser()
    return target if target.is_absolute() else p.parent / target


def _exists(p: Path, name: str) -> bool:
    """Whether the list `p`'s `name` is a path there (a link too; a name the system refuses is not)."""
    try:
        return os.path.lexists(_from_list(p, name))
    except (OSError, ValueError):
        return False


def _missing_hint(p: Path, name: str, weight: float | None) -> str:
    """A hint for a list's missing `name` (its `weight`: None when the name is the whole line): one that names an
    existing path once its shell quoting is taken off (`"my lora"`, `'my lora'`, `my\\ lora`: a list takes each
    path as it is written), or a whole line whose first words name a path and whose last word is no weight
    (`lora +-1`)."""
    plain = name[1:-1] if len(name) > 1 and name[0] == name[-1] and name[0] in "\"'" else name.replace("\\ ", " ")
    if plain != name and plain.strip() and _exists(p, plain):
        return (f"; {_shown(plain)} exists: a list takes a path as written, without quotes or backslashes, spaces "
                "and all")
    parts = name.rsplit(maxsplit=1)
    if weight is None and len(parts) == 2 and _exists(p, parts[0]):
        return (f"; {_shown(parts[0])} exists, but {_shown(parts[1])} after it is no weight (a decimal number such "
                "as 0.5, -1 or 2e-3)")
    return ""


def _weight(text: str, where: str) -> float:
    """A list line's WEIGHT: a plain decimal number (_validate.decimal_number: not `1_5`), finite, and not rounded
    to 0 from a non-zero text (1e-400): LorafuseValueError naming the line."""
    weight = decimal_number(text)
    if weight is None:
        raise LorafuseValueError(f"{where}: bad weight {_shown(text)} (expected `PATH [WEIGHT]`, WEIGHT a decimal "
                                 "number such as 0.5, -1 or 2e-3)")
    if not math.isfinite(weight):
        raise LorafuseValueError(f"{where}: weight {_shown(text)} is not finite")
    if rounds_to_zero(text, weight):
        raise LorafuseValueError(f"{where}: weight {_shown(text)} is too small for a float64: it would be 0 and "
                                 "leave the adapter out (write 0 for that)")
    return weight


def _reading(p: Path, body: str, where: str, probe: bool = False) -> tuple[str, float | None, bool]:
    """(name, weight, whether the name is a path) of a list line's text `body`: the whole text when it names a
    path (`client 2`), else PATH WEIGHT when its last word is a number. A text that reads both ways (both paths
    exist) is refused, naming the line. `probe`: a weight is parsed (and a bad one refused) only when its PATH
    exists (else the weight is None)."""
    parts = body.rsplit(maxsplit=1)
    whole = _exists(p, body)
    numeric = len(parts) == 2 and _NUMBERISH.match(parts[1]) is not None
    if whole and numeric and _exists(p, parts[0]):
        raise LorafuseValueError(
            f"{where}: {_shown(body)} reads two ways: the adapter {_shown(body)}, or {_shown(parts[0])} with "
            f"weight {_shown(parts[1])}; both exist: give the weight explicitly (`{body} 1` for the first) or write "
            "the path another way")
    if numeric and not whole:
        exists = _exists(p, parts[0])
        return parts[0], _weight(parts[1], where) if exists or not probe else None, exists
    return body, None, whole


def _line_entry(p: Path, line: str, where: str) -> tuple[str, float | None, bool] | None:
    """A list line's (name, weight, whether the name is a path), None for a blank or comment line. `#` after a
    space starts a comment, unless the line up to a later such `#` (or the whole line) names a path: `run #2`,
    `run #2 0.5  # note`. A line with two such readings that both name paths is refused as ambiguous."""
    first = _COMMENT_START.search(line)
    body = (line[:first.start()] if first else line).strip()
    if not body:
        return None
    if first is None:
        return _reading(p, body, where)
    cuts = [m.start() for m in _COMMENT_START.finditer(line, first.start() + 1, PATH_TEXT_MAX)] + [len(line)]
    found = [(text, r) for text in dict.fromkeys(line[:k].strip() for k in cuts)
             if len(text) <= PATH_TEXT_MAX and (r := _reading(p, text, where, probe=True))[2]]
    if found and (whole := _reading(p, body, where, probe=True))[2]:  # a path: its weight is read, as without probe
        found.insert(0, (body, whole))
    if len(found) > 1:
        (_, r1), (_, r2) = found[:2]
        raise LorafuseValueError(
            f"{where}: {_shown(line.strip())} reads two ways: the adapter {_shown(r2[0])} (`#` part of its name), "
            f"or {_shown(r1[0])} followed by a comment; both exist: for the second put the comment on a line of its "
            f"own, for the first give the adapter a name without ` #`")
    return found[0][1] if found else _reading(p, body, where)


def _breaks(text: str, start: int, stop: int) -> int:
    """The line breaks (\r\n, \n, \r: \r\n counts once) in text[start:stop]."""
    return text.count("\n", start, stop) + text.count("\r", start, stop) - text.count("\r\n", start, stop)


def _content_lines(text: str) -> Iterator[tuple[int, str]]:
    """(number, text) of each line of a list that holds more than blanks, lines ending at \r\n, \n or \r, found by
    one regular expression over the text: not a Python list and loop over every line (a list of 64 Mi newlines
    took 87 s and 630 MB that way)."""
    flat = text.replace("\r\n", "\n").replace("\r", "\n")  # one \n per break: the lines and their numbers kept
    no, at = 1, 0
    for m in _CONTENT_LINE.finditer(flat):
        no += flat.count("\n", at, m.start())
        at = m.start()
        yield no, m.group()


def read_list(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> tuple[list[Source], list[float]]:
    """The adapters and weights of a list file: one adapter per line, `PATH [WEIGHT]`; `#` starts a comment
    (at the start of a line or after a space); blank lines are ignored; a relative PATH is taken from the list
    file's folder; a line without a weight gets 1/n (n: the number of adapters). A line that names a path whole
    is that path (`client 2`, `run #2`); one that also reads as an existing PATH and a WEIGHT, or as an existing
    PATH and a comment, is refused as ambiguous. WEIGHT is a decimal number (`1.5`, `-2e-3`; not `1_5`). Lines
    end at \n, \r\n or \r only. Errors name the line. `path` may be str, bytes or os.PathLike
    (_validate.check_path)."""
    p = Path(check_path(path, "path"))
    text = _list_text(p)
    entries: list[tuple[Path, float | None, str]] = []
    for no, line in _content_lines(text):
        where = f"{p} line {no}"
        entry = _line_entry(p, line, where)
        if entry is None:
            continue
        name, weight, exists = entry
        local = _from_list(p, name)
        if not exists:
            if len(name) > HUB_ID_MAX or not is_hub_id(name):
                relative = "" if Path(name).expanduser().is_absolute() else \
                    " (a relative path is read from the list's folder)"
                raise FormatError(f"{where}: no such file or folder {_cut(local)}{relative}"
                                  f"{_missing_hint(p, name, weight)}")
            if os.path.lexists(name):  # the Hub id would resolve to that path of the current folder
                raise FormatError(f"{where}: no such file or folder {_cut(local)} (a relative path is read from the "
                                  f"list's folder); {_shown(name)} exists in the current folder, which a list's paths "
                                  "are not read from: give its absolute path, or its path relative to the list")
            local = _located(name, where)  # a Hub id, when no file of that name is there
        entries.append((local, weight, where))
    if not entries:
        raise LorafuseValueError(f"{p}: the adapter list names no adapter")
    n = len(entries)
    return ([Source(t, where) for t, _, where in entries],
            [1.0 / n if w is None else w for _, w, _ in entries])


LIST_MAX_BYTES = 256 << 20  # an adapter list's size limit: a million lines of long paths fit


LIST_IS = "an adapter list (--from-list LIST) is a text file of `PATH [WEIGHT]` lines, one adapter a line"


def _refuse_adapter_as_list(p: Path) -> None:
    """An adapter (or a folder holding one, formats.held), a folder or a .safetensors file given as the list:
    say what a list is and where adapters go, rather than "cannot read: a directory" or "not UTF-8"."""
    from lorafuse.formats.held import adapter_kind, adapter_path

    held = adapter_path(p)
    if held is not None:
        raise FormatError(f"{p} is {adapter_kind(held, p)}, not an adapter list: {LIST_IS}; give adapters as "
                          "arguments instead (lorafuse combine A B ... -o OUT), or list their paths in such a file")
    if p.is_dir():
        raise FormatError(f"{p} is a folder, not an adapter list: {LIST_IS}")
    if p.name.lower().endswith(".safetensors"):
        raise FormatError(f"{p} is a .safetensors file, not an adapter list: {LIST_IS}")


def _list_text(p: Path) -> str:
    """The text of an adapter list: a regular file (a FIFO or device is refused without waiting on it) of at
    most LIST_MAX_BYTES, UTF-8, without NUL bytes."""
    from lorafuse.io.checkpoint import read_bounded

    if not os.path.lexists(p):
        raise FormatError(f"{p}: no such adapter list")
    _refuse_adapter_as_list(p)
    raw = bytes(read_bounded(p, "the adapter list", LIST_MAX_BYTES))
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Notepad's UTF-8) is not part of the first path
    except UnicodeDecodeError as e:
        raise FormatError(f"adapter list {p}: not UTF-8 text (byte {e.start}): {LIST_IS}") from None
    if "\0" in text:
        line = 1 + _breaks(text, 0, text.index("\0"))
        raise FormatError(f"adapter list {p} line {line}: holds a NUL byte (a binary file, not a list of paths?)")
    return text


def _located(spec: str | os.PathLike[str], where: str) -> Path:
    """A path (a folder holding one adapter file: that file, formats.held), or the adapter a Hub id names (io.hub),
    resolved once here so that every pass reads the same commit; an error names where the adapter was named."""
    try:
        return located_adapter(spec)
    except LorafuseError as e:
        raise _reraise(e, where) from None


def refuse_list_pair(adapters: object) -> None:
    """read_list's (sources, weights) pair given as the adapters: LorafuseValueError saying to unpack it (its
    items, two lists, would be refused as "expected a path" without a word about why)."""
    if (isinstance(adapters, tuple) and len(adapters) == 2 and isinstance(adapters[0], list) and adapters[0]
            and all(isinstance(s, Source) for s in adapters[0])):
        raise LorafuseValueError("combine: adapters is read_list's pair (sources, weights): unpack it, "
                                 "lorafuse.combine(*read_list(path)), or pass sources, weights=weights")


def sources_of(adapters: Iterable[AdapterInput] | Iterable[Source]) -> list[Source]:
    """Any iterable of paths, Adapters or Sources (a generator too) as Sources, numbered from 1."""
    refuse_one(adapters, "combine")
    out: list[Source] = []
    for i, a in enumerate(adapters, 1):
        if isinstance(a, Source):
            out.append(a)
        elif isinstance(a, Adapter):
            out.append(Source(a, f"adapter {i} ({a.label})"))
        elif isinstance(a, (str, bytes, os.PathLike)):  # bytes too, as every path argument (_validate.check_path)
            text = os.fsdecode(a)
            where = f"adapter {i} ({_cut(text)})"
            out.append(Source(_located(text, where), where))
        else:
            raise LorafuseValueError(f"adapter {i}: expected a path or an Adapter, got {type(a).__name__}")
    return out


# ---- the pass over headers: everything checked before any work ------------------------------------------


@dataclasses.dataclass
class ModuleSpec:
    """A module as the inputs lay it out: its first update's layout, the 2-D shape of its delta in the
    stored orientation, the ranks seen and how many adapters have it."""

    name: str
    layout: ModuleLayout
    out: int
    inn: int
    kind: str
    delta_shape: tuple[int, ...]
    transposed: bool
    first: str  # where it was first seen
    total_rank: int = 0
    ranks: set[int] = dataclasses.field(default_factory=set)
    count: int = 0


@dataclasses.dataclass
class Plan:
    """What the header pass found: the sources, their weights, the modules, the output's factor dtype and
    a template adapter (the first input's config and state, no tensors mapped)."""

    sources: list[Source]
    weights: list[float]
    modules: dict[str, ModuleSpec]
    dtypes: set[str]
    template: Adapter
    targets: list[dict[str, object]]  # each input's config (what it targets: arithmetic.combined_targets)
    fingerprints: list[object]
    nbytes: list[int]
    replays: list[Replay | None] = dataclasses.field(default_factory=list)  # per source (the local engine's reads)
    structured: str | None = None  # the first LoHa / LoKr / Tucker module met, said: only the in-memory path takes it
    seconds: float = 0.0  # the header pass's wall time (every adapter opened and checked, before any work)
    identities: Identities = dataclasses.field(default_factory=Identities)  # the models the inputs name

    @property
    def paths(self) -> list[Path]:
        return [s.item for s in self.sources if isinstance(s.item, Path)]

    def factor_dtype(self, dtype: str | None) -> str:
        """The output's factor dtype: `dtype` (checked), else the inputs' (model.layout.factors_dtype)."""
        chosen = check_dtype(dtype)
        return chosen if chosen is not None else factors_dtype(sorted(self.dtypes))

    def output_dtype(self, dtype: str | None) -> str:
        """factor_dtype, with an AdapterNote when the inputs' factor dtypes differ and `dtype` is not given."""
        out = self.factor_dtype(dtype)
        found = sorted(self.dtypes)
        if check_dtype(dtype) is None and found and found != [out]:
            warn(f"combine: the inputs' factors are {' and '.join(found)}, so the result's are {out} "
                 "(--dtype, dtype=, chooses fp32, fp16 or bf16)", AdapterNote)
        return out


@dataclasses.dataclass(frozen=True)
class _Span:
    """One stored factor in a Replay: its offset from the Replay's start, raw shape and numpy type, and dtype."""

    offset: int
    shape: tuple[int, ...]
    raw_dtype: np.dtype
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.raw_dtype.itemsize

    def view(self, data: np.ndarray) -> tuple[np.ndarray, str]:
        """The factor's raw elements in `data` (the Replay's bytes, just read) and its dtype."""
        raw = data[self.offset:self.offset + self.nbytes].view(self.raw_dtype).reshape(self.shape)
        return raw, self.dtype


@dataclasses.dataclass(frozen=True)
class Replay:
    """Where one adapter's factors lie in its one safetensors file, as the header pass found them (the loaded
    factors were views of the file's mapping): a later pass reads those bytes with one pread instead of loading
    the adapter again (format detection, config, header: ~0.6 ms of a 1.1 MiB adapter here). The file must keep
    its identity (device, inode, size, modification and change times), checked before and after the read."""

    path: Path
    identity: FileIdentity
    start: int
    length: int
    modules: tuple[tuple[str, float, int, int, _Span, _Span], ...]  # name, scale, rank, rows of B, A, B


def replay_of(a: Adapter) -> Replay | None:
    """The Replay of a loaded adapter whose every factor is a view of one mapped file, else None."""
    where: tuple[Path, FileIdentity] | None = None
    found: list[tuple[str, float, int, int, tuple[int, np.ndarray, str], tuple[int, np.ndarray, str]]] = []
    for name, u in a.updates.items():
        if not isinstance(u, LoraUpdate):
            return None
        spans = []
        for t in (u.A, u.B):
            at = locate(t.raw)
            if at is None or (where is not None and where != (at[0], at[2])):
                return None
            where = (at[0], at[2])
            spans.append((at[1], t.raw, t.dtype))
        found.append((name, float(u.scale), u.rank, u.B.shape[0], spans[0], spans[1]))
    if where is None:
        return None
    lo = min(off for f in found for off, _, _ in f[4:]) // 64 * 64  # the buffer keeps the file's alignment
    hi = max(off + raw.nbytes for f in found for off, raw, _ in f[4:])
    modules = tuple((name, scale, r, rows, *(_Span(off - lo, tuple(raw.shape), raw.dtype, dt) for off, raw, dt in ab))
                    for name, scale, r, rows, *ab in found)
    return Replay(where[0], where[1], lo, hi - lo, modules)  # type: ignore[arg-type]


def _fingerprint(path: Path) -> object:
    """Identity, size, modification and change times of a file, or of the files directly in a folder: a file
    rewritten or replaced between two passes changes it, even one whose old modification time was put back
    (`cp -p`, `rsync -t`: the change time cannot be set)."""
    def of(st: os.stat_result) -> tuple[int, ...]:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    try:
        if path.is_dir():
            return tuple(sorted((e.name, *of(e.stat())) for e in os.scandir(path) if e.is_file()))
        return of(path.stat())
    except OSError as e:
        return ("unreadable", e.errno)


def _reraise(e: LorafuseError, where: str) -> LorafuseError:
    """The same error class, its message prefixed by where the adapter was named; a message that starts with the
    path `where` already shows (`adapter 2 (x)` and `x: ...`) says it once."""
    text = str(e)
    shown = where[where.find(" (") + 2:-1] if where.endswith(")") and " (" in where else None
    if shown and text.startswith(f"{shown}: "):
        text = text[len(shown) + 2:]
    try:
        return type(e)(f"{where}: {text}")
    except TypeError:  # pragma: no cover - every LorafuseError takes one message
        return LorafuseValueError(f"{where}: {text}")


def _open(src: Source, quiet: bool = False) -> Adapter:
    if isinstance(src.item, Adapter):
        return src.item
    try:
        return read(src.item) if quiet else load(src.item)  # read: the notes said once, by the first pass
    except LorafuseError as e:
        raise _reraise(e, src.where) from None
    except OSError as e:
        raise FormatError(f"{src.where}: cannot read: {e.strerror or e}") from None


def _stored_nbytes(a: Adapter) -> int:
    return sum(t.raw.nbytes for u in a.updates.values() if isinstance(u, LoraUpdate) for t in (u.A, u.B))


def check_sources(sources: list[Source], weights: list[float], method: str, structured: bool = False,
                  progress: bool | None = False) -> Plan:
    """Open every adapter in turn (its header: no factor is read), check it and close it: a missing or bad
    adapter, a DoRA / bias / LoHa module, a module whose layout differs from another adapter's, a weight times a
    scale beyond float32 (svd) or adapters of different models (arithmetic.check_shared) fail here, before any
    work, naming the list line (or position). The method's own shape rules are checked too. Each Source of the
    plan is what the loader read (a PEFT weights file: its folder), which the provenance and the checks between
    passes then cover.
    `structured`: a LoHa / LoKr / Tucker module is recorded in the plan (`structured`) instead of refused, for
    a caller that may still take the in-memory path. `progress`: a bar over the headers (None: on a terminal)."""
    modules: dict[str, ModuleSpec] = {}
    dtypes: set[str] = set()
    targets: list[dict[str, object]] = []
    fingerprints: list[object] = []
    nbytes: list[int] = []
    replays: list[Replay | None] = []
    layouts: dict[tuple[object, ...], tuple[tuple[str, float, int, int, _Span, _Span], ...]] = {}
    template: Adapter | None = None
    lycoris: str | None = None
    read: list[Source] = []
    models = RootGroups(f"combine --method {method}")
    identities = Identities()
    start = time.perf_counter()
    for src, w in zip(_stepped(sources, _Bar(len(sources), progress if len(sources) > 1 else False, "headers")),
                      weights):
        a = _open(src)
        try:
            check_linear([a], f"combine --method {method}")
        except LorafuseError as e:
            raise _reraise(e, src.where) from None
        if isinstance(src.item, Path) and a.path is not None and a.path != src.item:
            src = Source(a.path, src.where)  # what the loader read: a PEFT weights file's folder, config included
        read.append(src)
        models.see(_named(src), a)
        identities.see(a.config, src.where)
        for name, u in a.updates.items():
            if not (isinstance(u, LoraUpdate) and is_stored_lora(u)):
                found = f"{src.where}: module {name!r} is a LoHa / LoKr / Tucker update"
                if not structured:
                    raise structured_refusal(found)
                lycoris = lycoris or found
                continue
            out, inn = dense_shape(u)
            spec = modules.get(name)
            if spec is not None and spec.kind == "linear":
                u = u.laid_as(spec.transposed)  # PEFT's fan_in_fan_out, which PEFT ignores for a torch Linear
            if spec is None:
                spec = modules[name] = ModuleSpec(name, ModuleLayout.like(u, 1), out, inn, u.kind,
                                                  tuple(u.delta_shape), u.transposed, src.where)
            elif (spec.delta_shape, spec.kind, spec.transposed, spec.out) != (tuple(u.delta_shape), u.kind,
                                                                             u.transposed, out):
                raise ShapeMismatchError(
                    f"{src.where}: module {name!r} is a {u.kind} update of shape {tuple(u.delta_shape)}"
                    f"{' (transposed)' if u.transposed else ''}, but {spec.first} has a {spec.kind} update of "
                    f"shape {spec.delta_shape}{' (transposed)' if spec.transposed else ''}")
            spec.total_rank += u.rank
            spec.ranks.add(u.rank)
            spec.count += 1
            if method != "linear":  # (linear takes sqrt|w * scale| in float64, as the in-memory path)
                float32_coefficient(w, u.scale, f"{src.where}: module {name!r}")  # the products are float32
            if method == "linear" and len(spec.ranks) > 1:
                raise ShapeMismatchError(f"{src.where}: module {name!r} has rank {u.rank}, but {spec.first} has "
                                         f"rank {min(spec.ranks - {u.rank})}: method 'linear' averages factors "
                                         "and needs equal ranks (use svd for mixed ranks)")
        dtypes.update(factor_dtypes(a.updates.values()))
        targets.append({k: a.config[k] for k in _TARGET_FIELDS if k in a.config})  # not the whole config
        fingerprints.append(_fingerprint(src.item) if isinstance(src.item, Path) else None)
        nbytes.append(_stored_nbytes(a))
        rp = replay_of(a) if isinstance(src.item, Path) else None
        if rp is not None:  # adapters of one layout share one description: memory stays O(1) per adapter
            rp = dataclasses.replace(rp, modules=layouts.setdefault(rp.modules, rp.modules))
        replays.append(rp)
        if template is None:
            template = result(a, {}, [a])  # config and state only: no view of the file is kept
        else:  # what it kept of its modules' keys and alphas (a few entries a module: not its tensors)
            join_state(template.state, a.state)
        del a
    assert template is not None
    models.check()  # adapters of one model (sharing roots, directly or through others), or refused
    return Plan(read, weights, modules, dtypes, template, targets, fingerprints, nbytes, replays, lycoris,
                time.perf_counter() - start, identities)


def _named(src: Source) -> str:
    """Where an adapter was named, with its path when that does not say it (a list's line)."""
    return src.where + _file_of(src)


def _file_of(src: Source) -> str:
    """' (PATH)' where src.where does not show the adapter's path (a list's line names only the line), else ''."""
    path = src.path
    return "" if path is None or str(path) in src.where else f" ({_cut(path)})"


def _stepped(sources: Sequence[Source], bar: _Bar) -> Iterator[Source]:
    """`sources` one by one, the bar stepped after each and closed at the end (or when the loop stops)."""
    try:
        for src in sources:
            yield src
            bar.step(src.where)
    finally:
        bar.close()


def structured_refusal(found: str) -> UnsupportedError:
    """The refusal of a LoHa / LoKr / Tucker module where the adapters stream (`found` names it)."""
    return UnsupportedError(f"{found}; combining many adapters streams plain LoRA factors only (combine them in "
                            f"memory: at most {memory_max_adapters()} adapters, or --engine memory, Python: "
                            "engine='memory')")


def memory_max_adapters() -> int:
    """The most adapters the in-memory path takes under engine 'auto': MEMORY_MAX_ADAPTERS, fewer when the
    open-file limit would not leave a descriptor per adapter (each mapped adapter holds one) and room to spare."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return MEMORY_MAX_ADAPTERS
    return max(1, min(MEMORY_MAX_ADAPTERS, (int(soft) - 32) // 2))


def choose_engine(plan: Plan, options: CombineOptions, backend: Backend) -> str:
    """'memory' (combine's in-memory path), 'stream' (this module's engine) or 'ray' (only when asked for).
    auto: memory for the methods this engine does not run, on cuda, with exact=True, or for at most
    MEMORY_MAX_ADAPTERS adapters whose every module takes the exact SVD (backend.factored_svd_is_exact,
    combine's cost model); stream otherwise or when passes is given. (MEMORY_MAX_ADAPTERS:
    memory_max_adapters().)"""
    if options.engine != "auto":
        return options.engine
    if options.method not in STREAMABLE or options.device == "cuda" or options.exact:
        return "memory"
    if stream_asked(options):
        return "stream"
    if len(plan.sources) > memory_max_adapters():
        return "stream"
    if options.method == "linear":
        return "memory"
    ranks = output_ranks(plan, options.rank, options.conv_rank)
    exact = all(backend.factored_svd_is_exact(s.out, s.inn, s.total_rank, ranks[n], "auto")
                for n, s in plan.modules.items())
    return "memory" if exact else "stream"


def stream_asked(options: CombineOptions) -> bool:
    """Whether the options set what only the streamed engines use (passes, oversample): they select it under
    engine 'auto'."""
    return options.passes is not None or options.oversample is not None


def output_ranks(plan: Plan, rank: int | None, conv_rank: int | None = None) -> dict[str, int]:
    """Each module's output rank as combine's (terms.output_ranks): `conv_rank` for kxk convolutions (k > 1),
    `rank` for the rest; `rank` defaults to the largest input rank, `conv_rank` to `rank`; capped at the
    module's full rank."""
    default = rank if rank is not None else max((r for s in plan.modules.values() for r in s.ranks), default=1)
    conv = conv_rank if conv_rank is not None else default
    kxk = {n: is_kxk(s.delta_shape) for n, s in plan.modules.items()}
    if conv_rank is not None and not any(kxk.values()):
        raise unused_conv_rank()
    return {n: full_rank(conv if kxk[n] else default, s.delta_shape) for n, s in plan.modules.items()}


# ---- the sketches ---------------------------------------------------------------------------------------


def gaussian(seed: int, name: str, role: int, shape: tuple[int, int]) -> np.ndarray:
    """A standard Gaussian float64 matrix determined by (seed, module name, role) alone: any process that
    knows the seed regenerates it (no test matrix is stored or shipped)."""
    h = int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) & (2**64 - 1), h, role])))
    return rng.standard_normal(shape)


_OMEGA, _PROBE, _PSI = 1, 2, 3


def _orth(x: np.ndarray) -> np.ndarray:
    q, _ = np.linalg.qr(x)
    return q


class _Stack:
    """One module's factors of a chunk of adapters, converted to float32 straight into preallocated stacks:
    B = [B_1 .. B_m] (out x R), A = [A_1; ..; A_m] (R x in) and each stacked rank's coefficient c_i.
    B is kept as its transpose (R x out, each adapter's B_i^T rows contiguous): filling a B_i into a column
    block of an (out x R) array wrote `out` runs of r floats, 2.4x slower than these r runs of `out`."""

    def __init__(self, spec: ModuleSpec, capacity: int) -> None:
        self.bt = np.empty((capacity, spec.out), dtype=np.float32)
        self.a = np.empty((capacity, spec.inn), dtype=np.float32)
        self.coef = np.empty(capacity)  # float64: linear takes sqrt|c_i| of it (svd's fit float32: check_sources)
        self.filled = 0

    def add(self, c: float, r: int, a: tuple[np.ndarray, str], b: tuple[np.ndarray, str], b_rows: int,
            jobs: list[ConvertJob]) -> None:
        """Take an adapter's factors (raw A and B with their dtypes; rank r) into the next rows: their
        conversions (stored dtype to float32, B_i transposed) are queued in `jobs`, for the caller's one backend
        call per adapter."""
        f = self.filled
        a_raw = np.ascontiguousarray(a[0].reshape(r, -1))
        b_raw = np.ascontiguousarray(b[0].reshape(b_rows, r))
        jobs.append(ConvertJob(a_raw, a[1], self.a[f:f + r], False))
        jobs.append(ConvertJob(b_raw, b[1], self.bt[f:f + r], True))
        self.coef[f:f + r] = c
        self.filled = f + r

    def view(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """B (out x R: a transposed view, which BLAS takes as it is), A (R x in), the coefficients."""
        f = self.filled
        return self.bt[:f].T, self.a[:f], self.coef[:f]


Operand = tuple[np.ndarray, np.ndarray | None]  # one module's operand of a pass: X (float32), Psi (float32)


def oversample_of(options: CombineOptions) -> int:
    """The sketch's oversampling the options ask for (--oversample), else OVERSAMPLE."""
    return OVERSAMPLE if options.oversample is None else options.oversample


def sketch_width(k: int, out: int, inn: int, oversample: int = OVERSAMPLE) -> int:
    """A module's sketch width: k + oversample columns, or its whole range, min(out, in), when that is at most
    twice as many. A rank that is a large share of the module's size is where k + 10 columns fall short
    (1.06-1.11x the optimum with 3 passes at k = 60 of 128, 1.6-2x with 2); the whole range makes the result
    exact, and costs at most about twice the output's own factors."""
    full = min(out, inn)
    return full if 2 * (k + oversample) >= full else k + oversample


def first_operand(spec: ModuleSpec, w: int, seed: int, single_pass: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Pass 1's float64 test matrices of a module, regenerated from the seed: X = [Omega Phi] (in x (w +
    PROBES)) and, for the single-pass sketch, Psi ((2w + 1) x out)."""
    omega = gaussian(seed, spec.name, _OMEGA, (spec.inn, w))
    phi = gaussian(seed, spec.name, _PROBE, (spec.inn, PROBES))
    psi = gaussian(seed, spec.name, _PSI, (2 * w + 1, spec.out)) if single_pass else None
    return np.ascontiguousarray(np.hstack([omega, phi])), psi


def _f32(x: np.ndarray | None) -> np.ndarray | None:
    return None if x is None else x.astype(np.float32)


class _SvdSketch:
    """One module's sketches across the passes (see the module docstring): the driver's side, which sets up
    each pass's operand and takes in the pass's summed accumulators (_SvdFold does the folding)."""

    def __init__(self, spec: ModuleSpec, k: int, passes: int, seed: int, oversample: int = OVERSAMPLE) -> None:
        self.spec, self.k, self.passes, self.seed = spec, k, passes, seed
        self.w = sketch_width(k, spec.out, spec.inn, oversample)
        self.probes = PROBES
        self.pass_no = 0
        self.probe_out: np.ndarray | None = None  # D Phi (out x PROBES)
        self.acc: np.ndarray = np.zeros(0)  # the last pass's accumulated product
        self.basis: np.ndarray | None = None  # the orthonormal operand of this pass (for the projection)
        self.psi: np.ndarray | None = None
        self.w_acc: np.ndarray | None = None
        self.x32: np.ndarray = np.zeros(0, dtype=np.float32)  # the operand of this pass
        self.psi32: np.ndarray | None = None

    @property
    def side(self) -> str:
        """'range' (acc = D X, X in x .) in odd passes, 'corange' (acc = D^T X, X out x .) in even ones."""
        return _side(self.pass_no)

    def start(self, pass_no: int) -> None:
        """Set up pass `pass_no` (1-based): its operand, regenerated or from the previous pass's result."""
        w = self.w
        self.pass_no = pass_no
        if pass_no == 1:
            x, self.psi = first_operand(self.spec, w, self.seed, self.passes == 1)
            self.x32, self.psi32 = x.astype(np.float32), _f32(self.psi)
            return
        prev = self.acc
        if pass_no == 2:
            self.probe_out = prev[:, w:].copy()
            prev = prev[:, :w]
        self.basis = _orth(prev)
        self.x32, self.psi32 = self.basis.astype(np.float32), None
        self.acc = np.zeros(0)

    def operand(self) -> Operand:
        return self.x32, self.psi32

    def take(self, arrays: list[np.ndarray]) -> None:
        """This pass's accumulators, summed over every adapter (those of an _SvdFold)."""
        self.acc = arrays[0]
        self.w_acc = arrays[1] if len(arrays) > 1 else None

    def finish(self, split: str, layout: ModuleLayout, threads: int) -> tuple[LoraUpdate, float]:
        """The module's update of rank k (`layout`: the output's, layout_of) with its factors rounded to the
        output's dtype (model.layout.rounded), and the relative error estimate of those factors as written (a
        BF16 output's rounding alone is about 3e-3 of ||D||)."""
        k, w = self.k, self.w
        if self.passes == 1:
            probe_out = self.acc[:, w:]
            q = _orth(self.acc[:, :w])
            assert self.psi is not None and self.w_acc is not None
            x = np.linalg.lstsq(self.psi @ q, self.w_acc, rcond=None)[0]
            u, sv, vt = np.linalg.svd(x, full_matrices=False)
            left, right = q @ u[:, :k], vt[:k]
        else:
            assert self.probe_out is not None and self.basis is not None
            probe_out = self.probe_out
            u, sv, vt = np.linalg.svd(self.acc, full_matrices=False)
            if self.side == "range":  # D ~ Y Q^T, Y = U S V^T
                left, right = u[:, :k], vt[:k] @ self.basis.T
            else:  # D ~ Q Z^T, Z = U S V^T
                left, right = self.basis @ vt[:k].T, u[:, :k].T
        s = sv[:k]
        if len(s) < k:  # fewer singular values than the rank (a tiny module): zero columns
            left = np.hstack([left, np.zeros((left.shape[0], k - len(s)))])
            right = np.vstack([right, np.zeros((k - len(s), right.shape[1]))])
            s = np.concatenate([s, np.zeros(k - len(s))])
        if split == "sqrt":
            r = np.sqrt(s)
            b_out, a_out = left * r, right * r[:, None]
        else:
            b_out, a_out = left * s, right
        if not (np.isfinite(b_out).all() and np.isfinite(a_out).all()):
            raise NonFiniteError(f"module {self.spec.name!r}: the combined factors hold a NaN or Inf (an input "
                                 "holds one, or the sum overflows)")
        b32, a32 = b_out.astype(np.float32), a_out.astype(np.float32)
        written = rounded(layout.placeholder().with_factors(b32, a32), layout.dtype, threads)
        b_w = written.B.f32(threads).reshape(b32.shape).astype(np.float64)
        a_w = written.A.f32(threads).reshape(a32.shape).astype(np.float64)
        phi = gaussian(self.seed, self.spec.name, _PROBE, (self.spec.inn, self.probes))
        resid = probe_out - b_w @ (a_w @ phi)
        total = float(np.sum(probe_out * probe_out))
        err = math.sqrt(float(np.sum(resid * resid)) / total) if total > 0 else 0.0
        return written, err


def _side(pass_no: int) -> str:
    return "range" if pass_no % 2 == 1 else "corange"


class _SvdFold:
    """One module's accumulators of one pass, from zeros: acc = sum_i c_i B_i (A_i X) in the range passes
    (and W = sum_i c_i (Psi B_i) A_i for the single-pass sketch), acc = sum_i c_i A_i^T (B_i^T X) in the
    corange passes. Linear in the adapters: the folds of two sets of adapters add up to the fold of both."""

    def __init__(self, spec: ModuleSpec, side: str, x32: np.ndarray, psi32: np.ndarray | None) -> None:
        self.side, self.x32, self.psi32 = side, x32, psi32
        self.acc = np.zeros((spec.inn if side == "corange" else spec.out, x32.shape[1]))
        self.w_acc = None if psi32 is None else np.zeros((psi32.shape[0], spec.inn))

    def absorb(self, b: np.ndarray, a: np.ndarray, coef: np.ndarray) -> None:
        """Fold a chunk of adapters' terms sum_i c_i B_i A_i (their float32 factors stacked, stored orientation,
        coef: c_i per stacked rank) into this pass's sketch: one GEMM of inner size sum r_i per product
        (float32 products, accumulated in float64)."""
        with np.errstate(over="ignore", invalid="ignore"):  # fold_sources checks the sums, with a message
            coef = coef.astype(np.float32)  # (each term's product is float32)
            if self.side == "range":
                t = a @ self.x32
                t *= coef[:, None]
                self.acc += b @ t
                if self.psi32 is not None and self.w_acc is not None:
                    u = self.psi32 @ b
                    u *= coef[None, :]
                    self.w_acc += u @ a
            else:
                t = b.T @ self.x32
                t *= coef[:, None]
                self.acc += a.T @ t

    def arrays(self) -> list[np.ndarray]:
        return [self.acc] if self.w_acc is None else [self.acc, self.w_acc]


class _LinearSum:
    """One module's factor average: sum_i sign(c_i) sqrt|c_i| A_i and sum_i sqrt|c_i| B_i (float64)."""

    def __init__(self, spec: ModuleSpec) -> None:
        r = next(iter(spec.ranks))
        self.b = np.zeros((spec.out, r))
        self.a = np.zeros((r, spec.inn))

    def absorb(self, b: np.ndarray, a: np.ndarray, coef: np.ndarray) -> None:
        r = self.a.shape[0]  # equal ranks: the stack holds one adapter every r rows
        for j in range(0, a.shape[0], r):
            c = float(coef[j])
            root = math.sqrt(abs(c))
            self.b += root * b[:, j:j + r].astype(np.float64)
            if c:
                self.a += math.copysign(root, c) * a[j:j + r].astype(np.float64)

    def arrays(self) -> list[np.ndarray]:
        return [self.b, self.a]

    @staticmethod
    def finish(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        b, a = arrays
        return b.astype(np.float32), a.astype(np.float32)


Partial = dict[str, list[np.ndarray]]  # module -> its accumulators of one pass over some adapters (float64)


def add_partials(x: Partial, y: Partial) -> Partial:
    """The accumulators of two sets of adapters added (new arrays: either may be read-only)."""
    return {n: [p + q for p, q in zip(x[n], y[n])] for n in x}


@dataclasses.dataclass(frozen=True)
class Folding:
    """What folding adapters into one pass's accumulators takes besides the adapters and the pass's operands:
    the modules, the method, the seed and sketch widths that regenerate pass 1's test matrices, and the chunk
    size (adapters per product). Everything a Ray task gets."""

    modules: dict[str, ModuleSpec]
    method: str
    seed: int
    passes: int
    widths: dict[str, int]
    chunk: int


def fold_sources(job: Folding, pass_no: int, operands: dict[str, Operand] | None, sources: Sequence[Source],
                 weights: Sequence[float], fingerprints: Sequence[object],
                 on_chunk: Callable[[int], None] | None = None,
                 replays: Sequence[Replay | None] | None = None, workers: int = 1) -> tuple[Partial, int]:
    """Fold `sources` (each opened, read once and closed) into fresh accumulators of pass `pass_no` given the
    pass's operands (svd; None in pass 1: its test matrices are regenerated from the seed here). Returns the
    accumulators and the bytes of factors read; on_chunk(adapters) is called after each chunk. The one fold
    of the local engine (all adapters) and of a Ray task (a shard). `replays` (per source, the local engine's):
    read those adapters' factor bytes directly (Replay) instead of loading them again. `workers` > 1: a chunk's
    modules are widened and folded in that many threads at once, each product on one BLAS thread
    (_module_threads), while this thread reads the next chunk."""
    folds: dict[str, _SvdFold] | dict[str, _LinearSum]
    if job.method == "linear":
        folds = {n: _LinearSum(s) for n, s in job.modules.items()}
    else:
        if operands is None:
            if pass_no != 1:
                raise ValueError(f"pass {pass_no} needs the operands of the previous pass")  # pragma: no cover
            operands = {}
            for n, s in job.modules.items():
                x, psi = first_operand(s, job.widths[n], job.seed, job.passes == 1)
                operands[n] = (x.astype(np.float32), _f32(psi))
        folds = {n: _SvdFold(s, _side(pass_no), *operands[n]) for n, s in job.modules.items()}
    stacks = {n: None if _folds_stored(folds[n]) else _Stack(s, job.chunk * max(s.ranks))
              for n, s in job.modules.items()}
    backend = get_backend()
    read = 0
    with _module_threads(min(workers, len(job.modules))) as pool:
        pending: _Folding | None = None
        try:
            for held, nbytes in _chunks(sources, weights, fingerprints, pass_no, job.chunk, replays):
                if pending is not None:  # the previous chunk, folded while this one was read
                    read += pending.wait(on_chunk)
                pending = _Folding(folds, stacks, held, nbytes, backend, pool)
            if pending is not None:
                read += pending.wait(on_chunk)
        finally:
            if pending is not None:
                pending.drain()  # an error: no thread may still read a chunk's buffers
    return {n: f.arrays() for n, f in folds.items()}, read


@contextlib.contextmanager
def _module_threads(workers: int) -> Iterator[ThreadPoolExecutor | None]:
    """A pool of `workers` threads widening and folding one module each (None: the caller's thread), with BLAS
    held to one thread while it lasts. A chunk's products are small (inner size sum r_i, a few dozen columns):
    OpenBLAS's own threads meet at a barrier in every one of them, which costs more than the product as soon
    as another process wants a core (`benchmarks/bench_many.py --n 100` beside one busy process, 2 cores: 2.93 ms
    per adapter and pass against 5.61 ms with OpenBLAS's threads; on a quiet machine 0.87-0.94x)."""
    with _one_blas_thread():
        if workers <= 1:
            yield None
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="lorafuse-fold") as pool:
            yield pool


def _one_blas_thread() -> contextlib.AbstractContextManager[object]:
    """numpy's BLAS held to one thread while the context lasts (threadpoolctl; restored after)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


class _Folding:
    """One chunk being folded: each module's factors of the chunk widened into its stack (float32) and folded
    into its accumulators by one task (in the pool's threads, or at once in this thread without a pool or where
    no thread can be started: _threads.started), so a
    module's stack is still in the cache when its products read it and the caller reads the next chunk
    meanwhile. A module's sums keep their order: its chunks are folded one after the other."""

    def __init__(self, folds: dict[str, _SvdFold] | dict[str, _LinearSum], stacks: dict[str, _Stack | None],
                 held: list[_Held], nbytes: int, backend: Backend, pool: ThreadPoolExecutor | None) -> None:
        self.held, self.nbytes, self.count = held, nbytes, len(held)
        self.names = [n for n in folds if any(n in h.factors for h in held)]

        self.results = [started(pool, _fold_module, folds[n], stacks[n], n, held, backend) for n in self.names]

    def wait(self, on_chunk: Callable[[int], None] | None) -> int:
        """Wait for the chunk's modules (the first failed one's error, in module order), check each loaded
        adapter's files held still while they were read, and let go of the chunk; the bytes of factors read."""
        for name, r in zip(self.names, self.results):
            if not outcome(r):
                raise _non_finite(name, [(h.src, h.w) for h in self.held])
        for h in self.held:
            if h.adapter is not None and isinstance(h.src.item, Path):
                try:
                    raise_if_inputs_changed(h.adapter.sources())
                except LorafuseError as e:
                    raise _reraise(e, h.src.where) from None
        self.held = []
        if on_chunk is not None:
            on_chunk(self.count)
        return self.nbytes

    def drain(self) -> None:
        """Wait for whatever of the chunk still runs (its errors dropped: another error is on its way)."""
        for r in self.results:
            with contextlib.suppress(BaseException):
                outcome(r)


def _folds_stored(fold: _SvdFold | _LinearSum) -> bool:
    """Whether the fold reads the factors as stored (sketch_fold): svd's range and corange passes. linear's sums
    and the single-pass sketch's Psi B_i take float32 stacks (_Stack)."""
    return isinstance(fold, _SvdFold) and fold.psi32 is None


def _fold_module(fold: _SvdFold | _LinearSum, stack: _Stack | None, name: str, held: list[_Held],
                 backend: Backend) -> bool:
    """Module `name`'s factors of a chunk's adapters folded into its accumulators: by one sketch_fold call on the
    factors as stored, or widened into its stack by one backend call and folded from there; whether the sums are
    still finite (small: the sketch, not the data)."""
    entries = [(h, h.factors[name]) for h in held if name in h.factors]
    if stack is None:
        assert isinstance(fold, _SvdFold)
        terms = [SketchTerm(np.ascontiguousarray(a[0].reshape(r, -1)), a[1],
                            np.ascontiguousarray(b[0].reshape(b_rows, r)), b[1], c)
                 for _, (c, r, b_rows, a, b) in entries]  # (svd's c_i in float32's range: check_sources)
        try:
            backend.sketch_fold([SketchJob(terms, fold.side, fold.x32, fold.acc)], 1)
        except LorafuseError as e:
            raise _sketch_error(fold, terms, [h for h, _ in entries], backend, e) from None
        return bool(np.isfinite(fold.acc).all())
    stack.filled = 0
    jobs: list[ConvertJob] = []
    starts: list[tuple[_Held, int]] = []  # each adapter's first job (the error path only)
    for h, (c, r, b_rows, a, b) in entries:
        starts.append((h, len(jobs)))
        stack.add(c, r, a, b, b_rows, jobs)  # (svd's c_i in float32's range: check_sources)
    try:
        backend.convert_into(jobs, 1)
    except LorafuseError as e:
        raise _widen_error(jobs, starts, backend, e) from None
    fold.absorb(*stack.view())
    return all(np.isfinite(x).all() for x in fold.arrays())


def _sketch_error(fold: _SvdFold, terms: list[SketchTerm], held: list[_Held], backend: Backend,
                  error: LorafuseError) -> LorafuseError:
    """The error of a refused sketch_fold (every term is checked before any is folded: the accumulators are
    untouched), prefixed by where the adapter whose factors were refused was named (each term tried alone into
    a scratch accumulator to tell; the first adapter when none fails alone)."""
    for term, h in zip(terms, held):
        try:
            backend.sketch_fold([SketchJob([term], fold.side, fold.x32, np.zeros_like(fold.acc))], 1)
        except LorafuseError as e:
            return _reraise(e, _named(h.src))
    return _reraise(error, _named(held[0].src))


def _widen_error(jobs: list[ConvertJob], starts: list[tuple[_Held, int]], backend: Backend,
                 error: LorafuseError) -> LorafuseError:
    """The error of a failed widening, prefixed by where the adapter whose factors failed was named (each
    adapter's jobs widened again alone to tell; the first when none fails alone)."""
    bounds = [i for _, i in starts[1:]] + [len(jobs)]
    for (h, lo), hi in zip(starts, bounds):
        try:
            backend.convert_into(jobs[lo:hi], 1)
        except LorafuseError as e:
            return _reraise(e, _named(h.src))
    return _reraise(error, _named(starts[0][0].src))


class Sketching:
    """The driver's side of a streamed combination, shared by the local engine and the Ray engine: the
    Folding, each pass's operands, the pass's summed accumulators taken in, and the result."""

    def __init__(self, plan: Plan, options: CombineOptions) -> None:
        self.plan, self.options = plan, options
        method = options.method
        self.passes = 1 if method == "linear" else (DEFAULT_PASSES if options.passes is None else options.passes)
        ranks = output_ranks(plan, options.rank, options.conv_rank)
        self.svd: dict[str, _SvdSketch] = {}
        if method == "svd":
            over = oversample_of(options)
            self.svd = {n: _SvdSketch(s, ranks[n], self.passes, options.seed, over) for n, s in plan.modules.items()}
        self.job = Folding(plan.modules, method, options.seed, self.passes, {n: sk.w for n, sk in self.svd.items()},
                           chunk_size(plan, options.group_bytes // 4))  # the chunk and its stacks
        self.last: Partial = {}
        self.pass_no = 0
        self.scales: dict[str, float] = {}  # a power of two per module whose terms are tiny (_rescued)

    def start(self, pass_no: int) -> dict[str, Operand] | None:
        """Set up pass `pass_no`: every module's operand (None for linear), times its scale. The QR of each
        sketch on one BLAS thread, as the folds (_module_threads): they are as small."""
        self.pass_no = pass_no
        with _one_blas_thread():
            for sk in self.svd.values():
                sk.start(pass_no)
        return {n: self._scaled(n, sk.operand()) for n, sk in self.svd.items()} if self.svd else None

    def _scaled(self, name: str, operand: Operand) -> Operand:
        s = self.scales.get(name, 1.0)
        x, psi = operand
        return operand if s == 1.0 else (x * np.float32(s), None if psi is None else psi * np.float32(s))

    def take(self, partial: Partial) -> None:
        """The pass's accumulators, summed over every adapter (divided by the module's scale; pass 1's of a module
        whose products lost their precision to float32's underflow folded again, scaled: _rescued)."""
        if self.pass_no == 1 and self.svd:
            partial = self._rescued(partial)
        self.last = partial
        for n, sk in self.svd.items():
            s = self.scales.get(n, 1.0)
            sk.take(partial[n] if s == 1.0 else [x / s for x in partial[n]])

    def _rescued(self, partial: Partial) -> Partial:
        """Pass 1's accumulators, those of modules whose sketch is below TINY (products of tiny factors: float32
        flushed them to zero or kept a few bits) folded again here with the operand times a power of two that
        brings the largest term's entries to about 2^-20 (its scale, kept for the later passes); the factors'
        largest entries are read for these modules only (term_sizes: one more read of the adapters). A module
        whose terms are too small for any such scale is refused."""
        tiny = {n for n, arrays in partial.items() if not max(float(np.abs(x).max(initial=0.0)) for x in arrays)
                >= TINY}
        if not tiny:
            return partial
        for n, size in term_sizes(self.plan, tiny, self.job.chunk).items():
            e = -20 - math.ceil(math.log2(size)) if size > 0 else 0  # (0: every term is zero, and so is the sum)
            if e > SCALE_MAX_EXP:
                raise LorafuseValueError(
                    f"module {n!r}: its terms c_i B_i A_i are at most {size:.3g} in size (weight x scale x the "
                    "factors' largest entries), too small for the float32 products of the streamed engine (below "
                    f"2^-{SCALE_MAX_EXP + 20} even scaled): give the adapters larger weights")
            if e > 0:
                self.scales[n] = 2.0 ** e
        if not self.scales:
            return partial
        job = dataclasses.replace(self.job, modules={n: self.plan.modules[n] for n in self.scales})
        operands = {n: self._scaled(n, self.svd[n].operand()) for n in self.scales}
        again, _ = fold_sources(job, 1, operands, self.plan.sources, self.plan.weights, self.plan.fingerprints,
                                replays=self.plan.replays, workers=resolve_threads(self.options.threads))
        return {**partial, **again}

    def finish(self, on_module: Callable[[str, LoraUpdate], None]) -> dict[str, float]:
        """on_module(name, update) for every module in input order, its factors rounded once to the output's
        dtype (layout_of); the svd's error estimates (of those factors as written)."""
        threads = self.options.threads
        layouts = layout_of(self.plan, self.options, self.plan.factor_dtype(self.options.dtype))
        errors: dict[str, float] = {}
        with _one_blas_thread():  # small QR and SVD, as in start()
            for layout in layouts:
                name = layout.name
                if self.svd:
                    update, errors[name] = self.svd[name].finish(self.options.split, layout, threads)
                else:
                    b, a = _LinearSum.finish(self.last[name])
                    update = rounded(layout.placeholder().with_factors(b, a), layout.dtype, threads)
                on_module(name, update)
        return errors


# ---- the engine -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StreamSummary:
    """What a streamed combination did: the engine that ran ('stream', or 'ray': ops.combine.ray_engine),
    adapters read, passes made, bytes of factors read (all passes), wall seconds (with Ray, from when Ray is
    up), the process's peak resident memory (bytes; with Ray, the driver's), per module the estimated
    relative Frobenius error ||D - D^|| / ||D|| of the factors as written (rounded to the output's dtype; svd;
    empty for linear), and with Ray the shards (tasks per
    pass) and the worker processes that ran them."""

    engine: str
    adapters: int
    passes: int
    bytes_read: int
    seconds: float
    peak_rss: int
    errors: dict[str, float] = dataclasses.field(default_factory=dict)
    shards: int = 0
    workers: int = 0
    header_seconds: float = 0.0  # the header pass before the passes (not in `seconds`)

    @property
    def seconds_per_adapter(self) -> float:
        """Wall seconds per adapter read (per adapter and pass)."""
        return self.seconds / max(1, self.adapters * self.passes)

    def lines(self) -> list[str]:
        out = [f"  streamed: {self.adapters} adapters x {self.passes} pass{'es' if self.passes != 1 else ''}, "
               f"{human_bytes(self.bytes_read)} read, {self.seconds_per_adapter * 1e3:.2f} ms per adapter and "
               f"pass, peak memory {human_bytes(self.peak_rss)}{' (the driver)' if self.engine == 'ray' else ''}; "
               f"before them, every adapter's header checked in {self.header_seconds:.2f} s"]
        if self.engine == "ray":
            out.append(f"  on Ray: {self.shards} shard{'s' if self.shards != 1 else ''} of consecutive adapters, "
                       f"{self.shards * self.passes} tasks ({self.shards} per pass), run by {self.workers} "
                       f"worker{'s' if self.workers != 1 else ''}")
        if self.errors:
            worst = max(self.errors, key=lambda n: self.errors[n])
            out.append(f"  estimated relative error ||D - D_k|| / ||D|| (D_k: the factors as written, rounded to "
                       f"the output dtype): largest {self.errors[worst]:.2g} in {worst}, median "
                       f"{float(np.median(list(self.errors.values()))):.2g} (from {PROBES} random probes per module: "
                       "unbiased, one draw typically within 0.6-1.8x of the true error)")
        return out


def peak_rss() -> int:
    """The process's peak resident set in bytes: VmHWM (Linux: of this program, not of a parent it was forked
    from before exec, which ru_maxrss would include), else ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


class _Bar:
    """A tqdm bar over adapters read (all passes), with the ETA; nothing when disabled."""

    def __init__(self, total: int, enabled: bool | None, desc: str = "combine") -> None:
        self.bar: Any = None
        if enabled is None:
            enabled = bool(getattr(sys.stderr, "isatty", lambda: False)())
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="adapter", file=Display(sys.stderr), dynamic_ncols=True,
                            mininterval=0.2, leave=True, bar_format=BAR_FORMAT)

    def step(self, note: str, count: int = 1) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _changed(src: Source, pass_no: int) -> str:
    return (f"{src.where}: changed since combine started (pass {pass_no}){_file_of(src)}: the passes would read "
            "different adapters; nothing is written")


def raise_if_changed(plan: Plan) -> None:
    """After the last pass and the inputs' sha256 (io.provenance.Recording, on their own threads): every adapter
    file (a folder: the files in it) still has the identity, size and times the header pass saw, so the hashes
    recorded are of the bytes the passes read (a hash that read another version of a file would have found it
    with other times, and it cannot have them back: a rename or a link sets the change time); else
    InputChangedError naming the adapter's line, before the output is committed."""
    for src, fingerprint in zip(plan.sources, plan.fingerprints):
        if isinstance(src.item, Path) and _fingerprint(src.item) != fingerprint:
            raise InputChangedError(f"{src.where}: changed while combine ran{_file_of(src)} (after its passes read it, "
                                    "before the output was committed): its recorded sha256 might not be of the bytes "
                                    "read; nothing is written")


def _adapters(sources: Sequence[Source], weights: Sequence[float], fingerprints: Sequence[object],
              pass_no: int, replays: Sequence[Replay | None] | None = None
              ) -> Iterator[tuple[Source, float, Adapter | Replay]]:
    """Each adapter of a pass opened in turn (closed when the caller lets go of it), or its Replay where the
    header pass found one; a file rewritten since the header pass (its fingerprint then) is refused, naming it."""
    for i, (src, w, fingerprint) in enumerate(zip(sources, weights, fingerprints)):
        if isinstance(src.item, Path) and _fingerprint(src.item) != fingerprint:
            raise InputChangedError(_changed(src, pass_no))
        rp = replays[i] if replays else None
        yield src, w, (rp if rp is not None else _open(src, quiet=True))


Factor = tuple[np.ndarray, str]  # a factor's raw elements and their safetensors dtype


Entry = tuple[float, int, int, Factor, Factor]  # c_i = w_i s_i, rank, rows of B, A, B


@dataclasses.dataclass
class _Held:
    """One adapter of a chunk, read: its factors' raw elements per module (views of its Replay's bytes, or of the
    mapping of its loaded `adapter`, held until the chunk is folded and then checked to have held still)."""

    src: Source
    w: float
    factors: dict[str, Entry]
    adapter: Adapter | None


def _held(src: Source, w: float, adapter: Adapter) -> _Held:
    """A loaded adapter's factors (views of its mapping), as a Replay's are read."""
    updates = [(n, u) for n, u in adapter.updates.items() if isinstance(u, LoraUpdate)]
    assert len(updates) == len(adapter.updates)  # check_sources refused every other kind
    return _Held(src, w, {n: (w * u.scale, u.rank, u.B.shape[0], (u.A.raw, u.A.dtype), (u.B.raw, u.B.dtype))
                          for n, u in updates}, adapter)


def _held_replay(src: Source, w: float, rp: Replay, data: np.ndarray) -> _Held:
    """A Replay's factors, views of `data` (its bytes, just read)."""
    factors = {n: (w * scale, r, rows, a.view(data), b.view(data)) for n, scale, r, rows, a, b in rp.modules}
    return _Held(src, w, factors, None)


class _ReplayBuffer:
    """The bytes of one adapter's Replay, read into one reused buffer (64-byte aligned, grown as needed)."""

    def __init__(self) -> None:
        self._buf = np.empty(0, dtype=np.uint8)

    def read(self, src: Source, rp: Replay, pass_no: int) -> np.ndarray:
        if self._buf.nbytes < rp.length + 64:
            raw = np.empty(rp.length + 128, dtype=np.uint8)
            skip = -raw.ctypes.data % 64
            self._buf = raw[skip:skip + rp.length + 64]
        view = self._buf[:rp.length]
        try:
            fd = os.open(rp.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise InputChangedError(f"{_changed(src, pass_no)} ({rp.path}: {e.strerror or e})") from None
        try:
            if identity_of(os.fstat(fd)) != rp.identity:
                raise InputChangedError(_changed(src, pass_no))
            done = 0
            while done < rp.length:
                got = os.preadv(fd, [view[done:].data], rp.start + done)
                if got <= 0:
                    raise InputChangedError(f"{_changed(src, pass_no)} ({rp.path} is shorter)")
                done += got
            if identity_of(os.fstat(fd)) != rp.identity:  # rewritten while it was read
                raise InputChangedError(_changed(src, pass_no))
        except OSError as e:
            raise InputChangedError(f"{_changed(src, pass_no)} ({rp.path}: {e.strerror or e})") from None
        finally:
            os.close(fd)
        return view


def _chunks(sources: Sequence[Source], weights: Sequence[float], fingerprints: Sequence[object], pass_no: int,
            chunk: int, replays: Sequence[Replay | None] | None = None) -> Iterator[tuple[list[_Held], int]]:
    """The adapters of a pass read in chunks of `chunk`: (the adapters read, the bytes of their factors). Replays
    are read into two sets of `chunk` reused buffers, one set per chunk in turn: the caller folds a chunk while
    the next is read, and has let go of it before the one after (which reuses its buffers) is read."""
    buffers = [[_ReplayBuffer() for _ in range(chunk)] for _ in range(2)]
    held: list[_Held] = []
    read, turn = 0, 0
    for src, w, adapter in _adapters(sources, weights, fingerprints, pass_no, replays):
        if isinstance(adapter, Replay):
            h = _held_replay(src, w, adapter, buffers[turn][len(held)].read(src, adapter, pass_no))
        else:
            h = _held(src, w, adapter)
        del adapter  # a loaded adapter: its mapping and descriptor go with its _Held
        read += sum(e[3][0].nbytes + e[4][0].nbytes for e in h.factors.values())
        held.append(h)
        if len(held) >= chunk:
            yield held, read
            held, read, turn = [], 0, 1 - turn
    if held:
        yield held, read


def _non_finite(name: str, held: Sequence[tuple[Source, float]]) -> NonFiniteError:
    """The error of a chunk whose sum for module `name` is not finite: the adapter of the chunk whose factors hold
    NaN or Inf (each opened again: the error path only), or whose own weighted delta is beyond float32, or, when
    none is, the sum's overflow."""
    updates = [(src, w, _open(src, quiet=True).updates.get(name)) for src, w in held]
    for src, _, u in updates:
        if u is not None and holds_nonfinite(u):
            return NonFiniteError(f"{src.where}: module {name!r} {nonfinite_words(u)}{_file_of(src)}")
    summed = f"module {name!r}: the weighted sum of {held[0][0].where} .. {held[-1][0].where} overflows float32 " \
        "(every input is finite"
    for src, w, u in updates:
        if u is not None and (own := own_overflow(u, w)):
            return NonFiniteError(f"{src.where}: module {name!r}: {own}{_file_of(src)}" if w == 1 else
                                  f"{summed}): {_named(src)}: {own}")
    return NonFiniteError(f"{summed}, and so is each one's weighted delta): use smaller weights")


def own_overflow(u: Update, weight: float) -> str:
    """Why one finite input's own delta, times its `weight`, cannot be combined in float32 (its Frobenius norm,
    float64 from the structure, beyond float32's largest value), or '' when it fits. The error path only."""
    with np.errstate(over="ignore", invalid="ignore"):
        norm = abs(weight) * math.sqrt(max(frobenius_sq(u), 0.0))
    if not norm > FLOAT32_MAX:
        return ""
    if weight != 1:
        return (f"its own delta times its weight {weight:g} has Frobenius norm {norm:.3g}, beyond float32's largest "
                f"value ({FLOAT32_MAX:.3g}), in which combine computes: give it a smaller weight")
    return (f"its own delta has Frobenius norm {norm:.3g}, beyond float32's largest value ({FLOAT32_MAX:.3g}), in "
            "which combine computes, whatever the other inputs: give it a smaller weight, or leave it out")


def term_sizes(plan: Plan, names: set[str], chunk: int) -> dict[str, float]:
    """The largest |c_i| max|A_i| max|B_i| over the adapters (factors as float32, as the folds read them) of each
    module of `names`: the size of its largest term's entries, from one more read of the adapters (the rescue
    of modules whose sketches underflowed only: Sketching._rescued)."""
    backend = get_backend()
    sizes = dict.fromkeys(names, 0.0)
    for held, _ in _chunks(plan.sources, plan.weights, plan.fingerprints, 1, chunk, plan.replays):
        for h in held:
            for n in names & h.factors.keys():
                c, _, _, a, b = h.factors[n]
                sizes[n] = max(sizes[n], abs(c) * _largest(a, backend) * _largest(b, backend))
    return sizes


def _largest(f: Factor, backend: Backend) -> float:
    """A factor's largest entry's magnitude, of its float32 values (float64)."""
    return float(np.abs(backend.to_float32(np.ascontiguousarray(f[0]), f[1])).max(initial=0.0))


def chunk_size(plan: Plan, budget: int) -> int:
    """Adapters folded in per product: as many as `budget` bytes of float32 factors hold (1 to 64)."""
    per_adapter = max(1, 4 * sum(s.out * max(s.ranks) + max(s.ranks) * s.inn for s in plan.modules.values()))
    return max(1, min(64, budget // per_adapter))


def run_stream(plan: Plan, options: CombineOptions,
               on_module: Callable[[str, LoraUpdate], None]) -> StreamSummary:
    """The streamed combination: calls on_module(name, update) (the output's layout, layout_of: scale 1, its
    factors rounded to the output's dtype) for every module in the order of the inputs, once all passes are
    done; returns the summary. Adapters are read
    one at a time; their float32 factors wait in a chunk (at most options.group_bytes of them) and each chunk
    goes into the sketches as one product per module."""
    start = time.perf_counter()
    sketching = Sketching(plan, options)
    passes = sketching.passes
    bar = _Bar(len(plan.sources) * passes, options.progress)
    read = 0
    try:
        for p in range(1, passes + 1):
            operands = sketching.start(p)
            partial, nbytes = fold_sources(sketching.job, p, operands, plan.sources, plan.weights,
                                           plan.fingerprints, functools.partial(bar.step, f"pass {p}/{passes}"),
                                           plan.replays, resolve_threads(options.threads))
            read += nbytes
            sketching.take(partial)
    finally:
        bar.close()
    errors = sketching.finish(on_module)
    return StreamSummary("stream", len(plan.sources), passes, read, time.perf_counter() - start, peak_rss(), errors,
                         header_seconds=plan.seconds)


def check_stream_options(options: CombineOptions) -> None:
    """The refusals of the streamed engines' options, before any work (engine 'ray' without Ray installed
    too)."""
    if check_text(options.engine, "engine", ENGINES) not in ENGINES:
        raise LorafuseValueError(f"unknown engine {options.engine!r}: choose one of {', '.join(ENGINES)}")
    address = options.ray_address
    if address is not None and (not isinstance(address, str) or not address):
        raise LorafuseValueError(f"ray_address must be a Ray address (a non-empty string), got {address!r}")
    if address is not None and options.engine != "ray":
        raise LorafuseValueError(f"ray_address applies to engine 'ray' (the engine is {options.engine!r})")
    p = None if options.passes is None else check_int(options.passes, "passes", 1, MAX_PASSES)  # a numpy int too
    if options.engine in ("stream", "ray") or p is not None or options.oversample is not None:
        # (oversample, as passes, selects the streamed engine under 'auto': never silently dropped by exact or cuda)
        engine = "engine 'ray'" if options.engine == "ray" else \
            "passes, engine 'stream'" if options.oversample is None else "oversample, engine 'stream'"
        if options.method not in STREAMABLE:
            raise LorafuseValueError(f"method {options.method!r} does not stream ({engine}): the "
                                   f"streamed engine runs {' and '.join(STREAMABLE)}")
        if options.exact:
            raise LorafuseValueError(f"exact and a streamed engine ({engine}) exclude each other: "
                                     "the streamed svd is randomized")
        if options.device == "cuda":
            raise LorafuseValueError("the streamed engine runs on the CPU (device 'cpu')")
        if options.method == "linear" and p not in (None, 1):
            raise LorafuseValueError("method 'linear' reads each adapter once: passes must be 1 (or left out)")


def layout_of(plan: Plan, options: CombineOptions, dtype: str) -> list[ModuleLayout]:
    """The output's module layouts (rank, dtype, scale 1) in input order."""
    ranks = output_ranks(plan, options.rank, options.conv_rank)
    out = []
    for n, s in plan.modules.items():
        k = next(iter(s.ranks)) if options.method == "linear" else ranks[n]
        out.append(dataclasses.replace(s.layout, rank=k, dtype=dtype, scale=1.0))
    return out


def randomized_modules(plan: Plan, options: CombineOptions) -> list[str]:
    """The modules whose streamed svd is randomized: those sketched by k + oversample columns (oversample_of, as
    Sketching's); one sketched whole (sketch_width: min(out, in) columns) is the best rank-k
    approximation, as the exact path's. [] for linear."""
    if options.method != "svd":
        return []
    ranks = output_ranks(plan, options.rank, options.conv_rank)
    over = oversample_of(options)
    return [n for n, s in plan.modules.items() if sketch_width(ranks[n], s.out, s.inn, over) < min(s.out, s.inn)]


def template_of(plan: Plan, updates: dict[str, LoraUpdate]) -> Adapter:
    """The result adapter: the first input's config and state, targeting what the inputs targeted
    (arithmetic.combined_targets), derived from every input path (save never writes over them)."""
    combined = dataclasses.replace(plan.template, updates=dict(updates))
    combined.state = one_layout(copy.deepcopy(combined.state), list(plan.modules))
    combined.config = {**combined.config, **combined_targets(plan.targets, list(plan.modules))}
    combined.derived_from = list(dict.fromkeys(plan.paths))
    return combined


def gather(adapters: Iterable[AdapterInput] | Iterable[Source],
           weights: Iterable[float] | None) -> tuple[list[Source], list[float]]:
    """Sources and weights from any iterables (generators are read once, here); weights default to 1 each."""
    from lorafuse._validate import check_weights

    sources = sources_of(adapters)
    if not sources:
        raise LorafuseValueError("combine needs at least one adapter")
    ws = [1.0] * len(sources) if weights is None else check_weights(weights, len(sources))
    return sources, ws


__all__ = ["DEFAULT_PASSES", "ENGINES", "MEMORY_MAX_ADAPTERS", "OVERSAMPLE", "PROBES", "Folding", "Operand", "Partial",
           "Plan", "STREAMABLE", "Sketching", "Source", "StreamSummary", "add_partials",
           "check_sources", "check_stream_options", "choose_engine", "chunk_size", "first_operand", "fold_sources",
           "gather", "gaussian", "layout_of", "memory_max_adapters", "own_overflow", "raise_if_changed", "read_list",
           "run_stream",
           "sketch_width",
           "sources_of", "template_of", "randomized_modules", "refuse_list_pair"]
