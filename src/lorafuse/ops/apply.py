"""apply: merge adapters into base weights, streaming shard by shard.

W' = W + sum_i w_i s_i B_i A_i for every targeted weight (DoRA adapters rescale
the rows after their delta), computed by the C++ core in float32 tiles and
rounded once to the output dtype. Untouched tensors are copied byte for byte by
the kernel (copy_file_range); touched ones are read through mmap and their pages
dropped once written, so memory stays bounded by one batch of output tensors.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import numpy as np

from lorafuse import _core
from lorafuse._progress import Progress
from lorafuse._validate import check_threads
from lorafuse.adapter import Adapter
from lorafuse.errors import (
    FormatError,
    LorafuseValueError,
    NonFiniteError,
)
from lorafuse.formats import load
from lorafuse.io.atomic import atomic_dir, atomic_file, check_output
from lorafuse.io.checkpoint import INDEX_SUFFIX, SAFETENSORS_SUFFIX, Checkpoint, is_pickle, read_config
from lorafuse.io.dtypes import DTYPES, WRITABLE_FLOATS, parse_output_dtype
from lorafuse.io.manifest import MANIFEST_NAME, mark_metadata
from lorafuse.io.pipeline import Pipeline, is_pipeline
from lorafuse.io.safetensors import SafetensorsFile, SafetensorsWriter, TensorSpec
from lorafuse.io.sidefiles import classify, copy_entry, copy_file
from lorafuse.io.tensor import Tensor
from lorafuse.ops.match import BaseMatcher
from lorafuse.ops.resolve import Contribution, Resolved, adapter_notes, missing_error, resolve
from lorafuse.ops.stages import Stage, build_stages, on_columns, slice_rows

BATCH_BYTES = 32 << 20  # output bytes computed per call into the core
CHUNK_BYTES = 16 << 20  # larger tensors are computed and written in row blocks of about this size
WRITE_DEPTH = 2  # batches handed to the writer thread and not yet written
LM_HEAD = "lm_head.weight"
_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


@dataclass
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    src_shard: str
    src_name: str
    updates: list[Contribution] = field(default_factory=list)
    bias_updates: list[Contribution] = field(default_factory=list)
    replacement: Tensor | None = None

    @property
    def nbytes(self) -> int:
        return TensorSpec(self.name, self.dtype, self.shape).nbytes

    def is_copy(self, src_dtype: str) -> bool:
        return not self.updates and not self.bias_updates and self.replacement is None and self.dtype == src_dtype


@dataclass
class ApplyReport:
    out: Path
    merged: list[str]
    replaced: list[str]
    biases: list[str]
    tensors: int
    bytes_written: int
    seconds: float
    notes: list[str]


@dataclass
class _Plan:
    shards: list[tuple[str, list[OutTensor]]]
    metadata: dict[str, dict[str, str]]
    config_updates: dict[str, object]
    notes: list[str]


_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE_UNITS.update({u[0]: _SIZE_UNITS[u] for u in ("KB", "MB", "GB", "TB")})  # 5G = 5GB
_SIZE_UNITS.update({u[:2]: _SIZE_UNITS[u] for u in ("KIB", "MIB", "GIB", "TIB")})  # 2Gi = 2GiB
_SIZE_EXAMPLES = ("give one such as 5GB, 500MB, 1.5GB, 2GiB or 1000000 (bytes); KB, MB, GB are 10^3, 10^6, 10^9 "
                  "bytes and KiB, MiB, GiB 2^10, 2^20, 2^30")
MIN_SHARD_SIZE = 64 << 10  # below this a shard holds almost nothing but its header


def parse_size(text: str | int) -> int:
    """A byte count: an integer, or a string '5GB' (10^9), '500MiB' (2^20), '1.5 gb', '100' (bytes).

    Units are case-insensitive. A count without a unit (or in B) must be a whole number; a fraction
    of a unit rounds down to whole bytes. Anything else is a LorafuseValueError."""
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise LorafuseValueError(f"{text!r} is not a size: {_SIZE_EXAMPLES}")
    if isinstance(text, int):
        if text <= 0:
            raise LorafuseValueError(f"size {text} is not a positive number of bytes: {_SIZE_EXAMPLES}")
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else ""
    if m is None or (unit or "B") not in _SIZE_UNITS:
        raise LorafuseValueError(f"{text!r} is not a size: {_SIZE_EXAMPLES}")
    number = Decimal(m.group(1))
    if (unit or "B") == "B" and number != number.to_integral_value():
        raise LorafuseValueError(f"{text!r} is a fraction of a byte: a size without a unit is a whole number of "
                                 f"bytes; {_SIZE_EXAMPLES}")
    size = int(number * _SIZE_UNITS[unit or "B"])  # exact decimal arithmetic, rounded down
    if size <= 0:
        raise LorafuseValueError(f"size {text!r} is 0 bytes: {_SIZE_EXAMPLES}")
    return size


def _shard_limit(max_shard_size: str | int) -> int:
    """--max-shard-size as bytes; absurdly small sizes (every tensor a file, the header repeated in each)
    are refused."""
    size = parse_size(max_shard_size)
    if size < MIN_SHARD_SIZE:
        raise LorafuseValueError(
            f"shard size {max_shard_size!r} ({size} bytes) is below the {MIN_SHARD_SIZE // 1024} KiB minimum: each "
            "shard repeats the checkpoint's metadata and becomes a file of its own; Hugging Face checkpoints use "
            "shards of 1GB to 10GB (e.g. --max-shard-size 5GB)"
        )
    return size


def _output_dtype(src_dtype: str, requested: str | None, changed: bool) -> str:
    if not DTYPES[src_dtype].is_float:
        return src_dtype
    if requested is not None and (changed or src_dtype in WRITABLE_FLOATS or src_dtype == "F64"):
        return requested
    if not changed or src_dtype in WRITABLE_FLOATS:
        return src_dtype
    return "F32" if src_dtype == "F64" else "BF16"  # a merged F64 / F8 weight


@dataclass
class _Tie:
    tied: bool  # config.json says tie_word_embeddings
    emb_key: str | None  # the input embedding's key, when there is exactly one
    virtual_lm_head: bool  # lm_head is not stored: it reads emb_key


def plan_apply(ckpt: Checkpoint, adapters: Sequence[Adapter], weights: Sequence[float], dtype: str | None,
               max_shard_size: int | None, skip_missing: bool = False) -> _Plan:
    matcher = BaseMatcher(ckpt.keys())
    config = read_config(ckpt.directory)

    # Tied embeddings: the checkpoint stores only the input embedding; lm_head reads it.
    tied = bool(config.get("tie_word_embeddings", False))
    emb_key = None
    if tied:
        found = [k for k in ckpt.keys() if k.endswith(_EMBEDDING_SUFFIXES)]
        emb_key = found[0] if len(found) == 1 else None
    virtual_lm_head = tied and LM_HEAD not in ckpt and emb_key is not None

    def base_key(name: str) -> str | None:
        key = matcher.find(name)
        if key is None and virtual_lm_head and name == LM_HEAD:
            return LM_HEAD
        return key

    shapes = {k: tuple(ckpt.info(k).shape) for k in ckpt.keys()}
    if virtual_lm_head:
        shapes[LM_HEAD] = shapes[emb_key]  # type: ignore[index]
    resolved = resolve(shapes, adapters, weights, base_key, config)
    notes: list[str] = adapter_notes(adapters)
    if resolved.missing:
        if not skip_missing:
            raise missing_error(resolved.missing, str(ckpt.directory))
        notes += [f"skipped (no target): {m}" for m in resolved.missing]
    return _plan(ckpt, resolved, config, dtype, max_shard_size, notes, _Tie(tied, emb_key, virtual_lm_head))


def _plan(ckpt: Checkpoint, resolved: Resolved, config: dict[str, object], dtype: str | None,
          max_shard_size: int | None, notes: list[str], tie: _Tie | None = None) -> _Plan:
    """The output tensors of one checkpoint, shard by shard, given what changes in it."""
    tied, emb_key, virtual_lm_head = (tie.tied, tie.emb_key, tie.virtual_lm_head) if tie else (False, None, False)
    contributions, bias_contributions = resolved.contributions, resolved.bias_contributions
    replacements = resolved.replacements
    config_updates: dict[str, object] = {}

    changed = set(contributions) | set(replacements)
    add_lm_head = virtual_lm_head and (LM_HEAD in changed or emb_key in changed)
    if tied and (add_lm_head or (LM_HEAD in ckpt and (LM_HEAD in changed or emb_key in changed))):
        config_updates["tie_word_embeddings"] = False
        notes.append(f"untied lm_head from {emb_key}: only one of them changes (or each changes differently); "
                     "config.json now has tie_word_embeddings=false")
    if dtype is not None:
        torch_name = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype]
        for k in ("torch_dtype", "dtype"):
            if k in config:
                config_updates[k] = torch_name

    def out_tensor(key: str, shard: str, src: str) -> OutTensor:
        info = ckpt.info(src)
        ch = key in changed or key in bias_contributions
        out_dtype = _output_dtype(info.dtype, dtype, ch)
        if ch and out_dtype != info.dtype and info.dtype not in WRITABLE_FLOATS and dtype is None:
            notes.append(f"{key}: merged {info.dtype} weight written as {out_dtype}")
        repl = replacements.get(key)
        return OutTensor(key, out_dtype, info.shape, shard, src, contributions.get(key, []),
                         bias_contributions.get(key, []), repl[0] if repl else None)

    ordered: list[tuple[str, OutTensor]] = []
    for shard in ckpt.shards:
        for info in sorted(ckpt.headers[shard].values(), key=lambda t: t.begin):
            ordered.append((shard, out_tensor(info.name, shard, info.name)))
            if add_lm_head and info.name == emb_key:
                ordered.append((shard, out_tensor(LM_HEAD, shard, emb_key)))

    if max_shard_size is None:
        groups: dict[str, list[OutTensor]] = {s: [] for s in ckpt.shards}
        for shard, t in ordered:
            groups[shard].append(t)
        shards = list(groups.items())
        metadata = dict(ckpt.metadata)
    else:
        packs: list[list[OutTensor]] = []
        size = 0
        for _, t in ordered:
            if not packs or (size + t.nbytes > max_shard_size and packs[-1]):
                packs.append([])
                size = 0
            packs[-1].append(t)
            size += t.nbytes
        packs = packs or [[]]  # a checkpoint of no tensors still gets its (empty) model file
        n = len(packs)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        shards = list(zip(names, packs))
        first_meta = ckpt.metadata[ckpt.shards[0]] if ckpt.shards else {}
        _check_metadata_fits(first_meta, max_shard_size, f"{ckpt.directory / ckpt.shards[0]}" if ckpt.shards else "")
        metadata = {name: dict(first_meta) for name in names}
    return _Plan(shards, metadata, config_updates, notes)


def _check_metadata_fits(metadata: dict[str, str], max_shard_size: int, where: str) -> None:
    """Every re-sharded file repeats the input's metadata: refuse a shard size under 100 times its size
    (the copies would be more than 1% of the output, and most of it with thousands of tiny shards)."""
    meta_bytes = len(json.dumps(metadata, ensure_ascii=False).encode("utf-8")) if metadata else 0
    if meta_bytes * 100 > max_shard_size:
        raise LorafuseValueError(
            f"{where}: its metadata ({meta_bytes} bytes) is copied into every output shard, and --max-shard-size "
            f"{max_shard_size} bytes is less than 100 times that: choose at least {meta_bytes * 100} bytes "
            "(e.g. 5GB), or leave --max-shard-size out to keep the input's shards"
        )


_INF_BITS = {"F16": 0x7C00, "BF16": 0x7F80}  # exponent bits all set: Inf or NaN
_LARGEST = {"F16": "65504", "BF16": "3.39e38", "F32": "3.40e38"}


def _has_nonfinite(raw: np.ndarray | None, dtype: str) -> bool:
    """Inf or NaN among the raw bits of an F16 / BF16 array: two reductions, no temporary array.

    As int16, a positive Inf/NaN is >= the Inf pattern; as uint16, a negative one is >= its pattern."""
    inf = _INF_BITS.get(dtype)
    if inf is None or raw is None or raw.size == 0:
        return False
    bits = raw.reshape(-1).view(np.uint16)
    return int(bits.view(np.int16).max()) >= inf or int(bits.max()) >= 0x8000 | inf


def _inputs_finite(job: tuple, threads: int) -> bool:
    """Whether the base rows and every factor of a merge job are finite (only called for flagged jobs)."""
    _, w, w_dtype, _, _, stages = job
    if not np.isfinite(_core.to_float32(w, w_dtype, threads)).all():
        return False
    return all(np.isfinite(x).all() for _, arrays, m, _ in stages for x in (*arrays, m) if x is not None)


def _overflow_error(names: list[str], dtypes: dict[str, str]) -> NonFiniteError:
    shown = ", ".join(f"{n} ({dtypes[n]}, largest finite {_LARGEST[dtypes[n]]})" for n in names[:5])
    return NonFiniteError(
        f"Inf in the output {shown}{' and more' if len(names) > 5 else ''}: values finite in float32 overflow "
        "when rounded to the output dtype; pass --allow-nonfinite to write them anyway, or choose a wider --dtype"
    )


@dataclass
class _Piece:
    """Rows [r0, r1) of an output tensor: the unit of computing, writing and page release."""

    tensor: OutTensor
    r0: int
    r1: int
    rows: int
    data: np.ndarray | None = None


class _Arenas:
    """Output buffers reused from batch to batch: fresh allocations of this size would be
    mapped and faulted in page by page each time. One arena per batch in flight."""

    def __init__(self, count: int, size: int) -> None:
        self._free = [np.empty(size, dtype=np.uint8) for _ in range(count)]
        self.size = size

    def take(self) -> np.ndarray:
        return self._free.pop()

    def give(self, arena: np.ndarray) -> None:
        self._free.append(arena)


class _Writer:
    """Writes in submission order on one background thread, so disk writes overlap the next
    batch's arithmetic; at most `depth` batches are in flight, which bounds memory.

    Where no thread can be started (a process or thread limit), every write runs at once in
    the calling thread instead: slower, same output."""

    def __init__(self, depth: int = WRITE_DEPTH) -> None:
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorafuse-writer")
        self._pending: deque[Future[None]] = deque()
        self._depth = depth
        try:
            self._pool.submit(lambda: None).result()  # start the thread now, while nothing depends on it
        except RuntimeError:  # "can't start new thread"
            self._pool.shutdown(wait=False)
            self._pool = None

    def submit(self, fn: Callable[[], None]) -> None:
        while len(self._pending) >= self._depth:
            self._pending.popleft().result()
        if self._pool is None:
            fn()
            return
        self._pending.append(self._pool.submit(fn))

    def wait_one(self) -> None:
        if self._pending:
            self._pending.popleft().result()

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        for f in self._pending:
            f.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


class _Executor:
    def __init__(self, ckpt: Checkpoint, threads: int, progress: Progress, allow_nonfinite: bool) -> None:
        self.ckpt, self.threads, self.progress, self.allow_nonfinite = ckpt, threads, progress, allow_nonfinite
        self.files: dict[str, SafetensorsFile] = {}
        self.arenas = _Arenas(WRITE_DEPTH + 1, BATCH_BYTES + CHUNK_BYTES)
        self.merged: list[str] = []
        self.replaced: list[str] = []
        self.biases: list[str] = []
        self.stages: dict[str, list[Stage]] = {}

    def file(self, shard: str) -> SafetensorsFile:
        if shard not in self.files:
            self.files[shard] = self.ckpt.open(shard)
        return self.files[shard]

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def _stages(self, t: OutTensor) -> list[Stage]:
        """The tensor's merge stages, built once and kept until its last row block is computed."""
        if t.name not in self.stages:
            self.stages[t.name] = build_stages(t.updates, t.shape[0] if t.shape else 1, self.threads)
        return self.stages[t.name]

    def _pieces(self, t: OutTensor) -> list[_Piece]:
        rows = t.shape[0] if t.shape else 1
        whole = t.bias_updates or any(c.update.magnitude is not None and on_columns(c) for c in t.updates)
        if whole or t.nbytes <= CHUNK_BYTES:  # column norms need the whole matrix at once
            return [_Piece(t, 0, rows, rows)]
        step = max(1, CHUNK_BYTES * rows // t.nbytes)
        return [_Piece(t, r, min(r + step, rows), rows) for r in range(0, rows, step)]

    def write_shard(self, path: Path, entries: list[OutTensor], metadata: dict[str, str]) -> None:
        specs = [TensorSpec(t.name, t.dtype, t.shape) for t in entries]
        with SafetensorsWriter(path, specs, metadata) as out:
            writer = _Writer()
            try:
                batch: list[_Piece] = []
                size = 0
                for t in entries:
                    src = self.file(t.src_shard)
                    empty = t.nbytes == 0  # a (0, 8) weight, say: nothing to compute, no rows to split
                    if empty or t.is_copy(src.info(t.src_name).dtype):
                        if batch:
                            self._submit(writer, out, batch)
                            batch, size = [], 0
                        writer.submit(self._empty(out, t) if empty else self._copy(out, t, src))
                        continue
                    for piece in self._pieces(t):
                        batch.append(piece)
                        size += piece.tensor.nbytes * (piece.r1 - piece.r0) // piece.rows
                        if size >= BATCH_BYTES:
                            self._submit(writer, out, batch)
                            batch, size = [], 0
                if batch:
                    self._submit(writer, out, batch)
                writer.drain()
            finally:
                # Stop the writer thread before `out` closes its descriptor: on an error, a queued
                # write must not reach a closed descriptor (or another file that reused its number).
                writer.close()

    def _submit(self, writer: _Writer, out: SafetensorsWriter, batch: list[_Piece]) -> None:
        """Compute a batch into a free arena (waiting for the writer to hand one back) and queue its writes."""
        while True:
            try:
                arena = self.arenas.take()
                break
            except IndexError:
                writer.wait_one()
        try:
            pieces = self._flush(batch, arena)
        except BaseException:
            self.arenas.give(arena)
            raise
        write = self._writes(out, pieces)

        def run() -> None:
            try:
                write()
            finally:
                self.arenas.give(arena)

        writer.submit(run)

    def _copy(self, out: SafetensorsWriter, t: OutTensor, src: SafetensorsFile) -> Callable[[], None]:
        def run() -> None:
            out.copy_from(t.name, src, t.src_name)
            self.progress.update(t.nbytes, t.name)

        return run

    def _empty(self, out: SafetensorsWriter, t: OutTensor) -> Callable[[], None]:
        """A tensor of no elements: its header entry says it all (whatever is merged into it is empty too)."""
        for names, changed in ((self.merged, t.updates), (self.replaced, t.replacement is not None),
                               (self.biases, t.bias_updates)):
            if changed:
                names.append(t.name)

        def run() -> None:
            out.start(t.name)

        return run

    def _writes(self, out: SafetensorsWriter, pieces: list[_Piece]) -> Callable[[], None]:
        def run() -> None:
            for p in pieces:
                if p.r0 == 0:
                    out.start(p.tensor.name)
                assert p.data is not None
                out.append(p.data)
                self.progress.update(p.data.nbytes, p.tensor.name)
                p.data = None

        return run

    def _flush(self, batch: list[_Piece], arena: np.ndarray) -> list[_Piece]:
        """Compute every piece of the batch (one call into the core) and release their input pages.

        Outputs are carved from `arena` (16-byte aligned slices) while they fit."""
        jobs = []
        computed: list[_Piece] = []
        used = 0
        for p in batch:
            t = p.tensor
            src = self.file(t.src_shard)
            if t.bias_updates:
                p.data = self._bias(t, src)
                continue
            if t.replacement is not None:  # a full tensor from the adapter takes the base's place
                if p.r0 == 0:
                    self.replaced.append(t.name)
                w, w_dtype = t.replacement.raw, t.replacement.dtype
            else:
                w, w_dtype = src.raw(t.src_name), src.info(t.src_name).dtype
            w2 = w.reshape(p.rows, -1)[p.r0 : p.r1]
            raw_dtype = DTYPES[t.dtype].raw
            nbytes = w2.shape[0] * w2.shape[1] * raw_dtype.itemsize
            if used + nbytes <= arena.size:
                p.data = arena[used : used + nbytes].view(raw_dtype).reshape(w2.shape)
                used += (nbytes + 15) // 16 * 16
            else:  # a tensor that cannot be split (column-normalized DoRA) and is larger than the arena
                p.data = np.empty(w2.shape, dtype=raw_dtype)
            stages = [slice_rows(st, p.r0, p.r1) for st in self._stages(t)] if t.updates else []
            if p.r1 == p.rows:
                self.stages.pop(t.name, None)
            jobs.append((t.name, w2, w_dtype, p.data, t.dtype, stages))
            computed.append(p)
            if t.updates and p.r0 == 0:
                self.merged.append(t.name)
        flags = _core.merge_batch(jobs, self.threads) if jobs else []
        bad_jobs = [job for job, f in zip(jobs, flags) if f]
        if bad_jobs and not self.allow_nonfinite:
            # The core flags results that are not finite in float32 or overflow the output dtype;
            # a flagged job whose inputs are all finite overflowed when rounded (F16 / BF16).
            over = sorted({job[0] for job in bad_jobs if _inputs_finite(job, self.threads)})
            bad = sorted({job[0] for job in bad_jobs} - set(over))
            if bad:
                raise NonFiniteError(
                    f"NaN or Inf in the merged weights of {', '.join(bad[:5])}"
                    f"{' and more' if len(bad) > 5 else ''} (inputs or results are not finite); "
                    "pass --allow-nonfinite to write them anyway"
                )
            raise _overflow_error(over, {job[0]: job[4] for job in bad_jobs})
        for p in computed:
            if p.tensor.replacement is None:
                src = self.file(p.tensor.src_shard)
                row_bytes = src.info(p.tensor.src_name).nbytes // p.rows
                src.release(p.tensor.src_name, p.r0 * row_bytes, p.r1 * row_bytes)
        return batch

    def _bias(self, t: OutTensor, src: SafetensorsFile) -> np.ndarray:
        """base bias + sum of weight * scale * lora_B.bias, in float64, rounded once. A bias that an
        adapter replaces (modules_to_save) takes the base's place first, as for weights: every adapter's
        lora_B bias then adds to it, whichever adapter came first."""
        if t.replacement is not None:
            base = t.replacement
            self.replaced.append(t.name)
        else:
            base = Tensor(src.raw(t.src_name), src.info(t.src_name).dtype)
        acc = base.f32().astype(np.float64)
        for c in t.bias_updates:
            assert c.update.bias is not None
            acc += c.coef * c.update.bias.f32().astype(np.float64)
        if not np.isfinite(acc).all() and not self.allow_nonfinite:
            raise NonFiniteError(f"NaN or Inf in the merged bias {t.name}")
        with np.errstate(over="ignore"):
            acc32 = acc.astype(np.float32)
        out = _core.from_float32(acc32, t.dtype, self.threads)
        if not self.allow_nonfinite and (not np.isfinite(acc32).all() or _has_nonfinite(out, t.dtype)):
            raise _overflow_error([t.name], {t.name: t.dtype})
        self.biases.append(t.name)
        return out

def _copy_side_files(src_dir: Path, dst_dir: Path, skip: set[str], config_updates: dict[str, object],
                     notes: list[str]) -> None:
    """The checkpoint folder's other files (config, tokenizer, ...): regular files only (see io.sidefiles),
    config.json with `config_updates` applied. Sub-folders and other weights are left out with a note."""
    try:
        entries = sorted(src_dir.iterdir())
    except OSError as e:
        raise FormatError(f"{src_dir}: cannot read: {e.strerror or e}") from None
    for p in entries:
        if p.name in skip or p.name.startswith("."):
            continue
        if is_pickle(p) or p.name.lower().endswith((SAFETENSORS_SUFFIX, INDEX_SUFFIX)):
            notes.append(f"{p.name} holds other weights and was not copied")
            continue
        kind, why = classify(p)
        if kind == "skip":
            notes.append(f"{p.name} is {why}: not copied")
        elif kind == "dir":
            notes.append(f"folder {p.name}/ was not copied")
        elif p.name == "config.json" and config_updates:
            cfg = read_config(src_dir)
            cfg.update(config_updates)
            (dst_dir / p.name).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        else:
            copy_file(p, dst_dir / p.name)


def _write_index(dst_dir: Path, ckpt: Checkpoint, plan: _Plan, resharded: bool) -> None:
    """The shard index: under the input's own name (diffusers components use
    diffusion_pytorch_model.safetensors.index.json) unless the output was re-sharded."""
    weight_map = {t.name: shard for shard, ts in plan.shards for t in ts}
    meta = dict(ckpt.index_metadata)
    meta["total_size"] = sum(t.nbytes for _, ts in plan.shards for t in ts)
    if "total_parameters" in meta:
        meta["total_parameters"] = sum(int(np.prod(t.shape)) for _, ts in plan.shards for t in ts)
    index = {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}
    name = ckpt.index_name if ckpt.index_name and not resharded else "model.safetensors.index.json"
    (dst_dir / name).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def apply(
    base: str | os.PathLike[str],
    adapters: Sequence[str | os.PathLike[str] | Adapter],
    weights: Sequence[float] | None = None,
    out: str | os.PathLike[str] | None = None,
    *,
    dtype: str | None = None,
    threads: int = 0,
    max_shard_size: str | int | None = None,
    progress: bool | None = None,
    allow_nonfinite: bool = False,
    skip_missing: bool = False,
    overwrite: bool = False,
) -> ApplyReport:
    """Merge `adapters` (paths or Adapter objects) into the checkpoint at `base`, writing `out`.

    `base` is a folder (single file or sharded with an index), one .safetensors file (then
    `out` is a file too: a single-file SD 1.5 / SDXL / Flux checkpoint, say), or a diffusers
    pipeline folder (model_index.json; the touched components are merged, the rest copied).
    Diffusion adapters (kohya, LyCORIS, diffusers LoRA files) find their weights through the
    SD / SDXL / Flux / text-encoder name tables. `weights` multiply each adapter's delta
    (default 1). `dtype` ('bf16', 'fp16', 'fp32') overrides the output dtype of float tensors.
    Every module that finds no target is listed in a MissingModuleError, unless `skip_missing`
    (then they are listed in the report's notes). `out` may be new, an empty folder (file) or an
    earlier lorafuse output; anything else is refused before any work unless `overwrite` (see io.atomic).
    """
    start = time.monotonic()
    if out is None:
        raise LorafuseValueError("apply needs an output path")
    if not adapters:
        raise LorafuseValueError("apply needs at least one adapter")
    ws = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(ws) != len(adapters):
        raise LorafuseValueError(f"{len(ws)} weights given for {len(adapters)} adapters")
    if not all(math.isfinite(w) for w in ws):
        raise LorafuseValueError(f"weights must be finite numbers, got {ws}")
    threads = check_threads(threads)
    out_dtype = parse_output_dtype(dtype) if dtype is not None else None
    shard_limit = _shard_limit(max_shard_size) if max_shard_size is not None else None

    base_path, out_path = Path(base), Path(out)
    loaded = [a if isinstance(a, Adapter) else load(a) for a in adapters]
    if is_pipeline(base_path):
        if max_shard_size is not None:
            raise LorafuseValueError("--max-shard-size applies to checkpoint folders, not to a diffusers pipeline")
        return _apply_pipeline(Pipeline(base_path), loaded, ws, out_path, out_dtype, threads, progress,
                               allow_nonfinite, skip_missing, start, overwrite)
    ckpt = Checkpoint(base_path)
    inputs = [base_path, *ckpt.files(), *_adapter_files(loaded)]  # the base folder too: no output inside it
    single_file = base_path.is_file()
    check_output(out_path, inputs, folder=not single_file, overwrite=overwrite)
    if single_file and shard_limit is not None:
        raise LorafuseValueError("--max-shard-size applies to checkpoint folders, not to a single-file base")
    plan = plan_apply(ckpt, loaded, ws, out_dtype, shard_limit, skip_missing)

    total = sum(t.nbytes for _, ts in plan.shards for t in ts)
    bar = Progress(total, "apply", progress)
    ex = _Executor(ckpt, threads, bar, allow_nonfinite)
    try:
        if single_file:
            with atomic_file(out_path, inputs, overwrite=overwrite) as tmp:
                shard, entries = plan.shards[0]
                ex.write_shard(tmp, entries, mark_metadata(plan.metadata.get(shard, {})))
        else:
            with atomic_dir(out_path, inputs, overwrite=overwrite, kind="checkpoint") as tmp:
                _write_folder(ex, ckpt, plan, tmp, shard_limit)
    finally:
        ex.close()
        bar.close()
    return ApplyReport(out_path, ex.merged, ex.replaced, ex.biases, sum(len(ts) for _, ts in plan.shards), total,
                       time.monotonic() - start, plan.notes)


def _adapter_files(loaded: Sequence[Adapter]) -> list[Path]:
    """The adapters' files: a single-file output must not replace one of them (nor a file in an adapter folder)."""
    paths = [a.path for a in loaded if a.path is not None]
    return paths + [f for d in paths if d.is_dir() for f in d.iterdir() if f.is_file()]


def _write_folder(ex: _Executor, ckpt: Checkpoint, plan: _Plan, tmp: Path, shard_limit: int | None) -> None:
    for shard, entries in plan.shards:
        ex.write_shard(tmp / shard, entries, plan.metadata.get(shard, {}))
    if len(plan.shards) > 1 or (ckpt.sharded and shard_limit is None):
        _write_index(tmp, ckpt, plan, shard_limit is not None)
    skip = {*ckpt.shards, *([ckpt.index_name] if ckpt.index_name else []), MANIFEST_NAME}  # a fresh one is written
    _copy_side_files(ckpt.directory, tmp, skip, plan.config_updates, plan.notes)
    if plan.config_updates and not (ckpt.directory / "config.json").is_file():
        plan.notes.append("no config.json to update: " + json.dumps(plan.config_updates))


def _split_by_component(resolved: Resolved) -> dict[str, Resolved]:
    """'<component>/<key>' entries of a pipeline-wide match, regrouped per component with bare keys."""
    parts: dict[str, Resolved] = {}
    for attr in ("contributions", "bias_contributions", "replacements"):
        for key, value in getattr(resolved, attr).items():
            comp, bare = key.split("/", 1)
            getattr(parts.setdefault(comp, Resolved()), attr)[bare] = value
    return parts


def _apply_pipeline(pipe: Pipeline, loaded: list[Adapter], ws: list[float], out_path: Path, dtype: str | None,
                    threads: int, progress: bool | None, allow_nonfinite: bool, skip_missing: bool,
                    start: float, overwrite: bool = False) -> ApplyReport:
    """Merge into the components an adapter touches; copy every other file and folder as it is."""
    inputs = [pipe.directory, *pipe.files(), *_adapter_files(loaded)]
    check_output(out_path, inputs, folder=True, overwrite=overwrite)
    resolved = resolve(pipe.shapes(), loaded, ws, lambda name: None)  # LLM names match nothing in a pipeline
    notes: list[str] = adapter_notes(loaded)
    if resolved.missing:
        if not skip_missing:
            raise missing_error(resolved.missing, str(pipe.directory))
        notes += [f"skipped (no target): {m}" for m in resolved.missing]
    plans = {comp: _plan(pipe.components[comp], part, read_config(pipe.components[comp].directory), dtype, None,
                         notes) for comp, part in _split_by_component(resolved).items()}
    total = sum(t.nbytes for plan in plans.values() for _, ts in plan.shards for t in ts)
    bar = Progress(total, "apply", progress)
    merged: list[str] = []
    replaced: list[str] = []
    biases: list[str] = []
    tensors = 0
    try:
        with atomic_dir(out_path, inputs, overwrite=overwrite, kind="diffusers-pipeline") as tmp:
            for entry in sorted(pipe.directory.iterdir()):
                if entry.name.startswith(".") or entry.name == MANIFEST_NAME:  # a fresh manifest is written
                    continue
                if entry.name in plans:
                    comp, plan = entry.name, plans[entry.name]
                    (tmp / comp).mkdir()
                    ex = _Executor(pipe.components[comp], threads, bar, allow_nonfinite)
                    try:
                        _write_folder(ex, pipe.components[comp], plan, tmp / comp, None)
                    finally:
                        ex.close()
                    merged += [f"{comp}/{n}" for n in ex.merged]
                    replaced += [f"{comp}/{n}" for n in ex.replaced]
                    biases += [f"{comp}/{n}" for n in ex.biases]
                    tensors += sum(len(ts) for _, ts in plan.shards)
                else:  # files through links (a Hugging Face cache), folders whole; no FIFO, device or loop
                    copy_entry(entry, tmp / entry.name, notes, pipe.directory)
    finally:
        bar.close()
    return ApplyReport(out_path, merged, replaced, biases, tensors, total, time.monotonic() - start, notes)
