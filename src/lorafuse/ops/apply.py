"""apply: merge adapters into base weights, streaming shard by shard.

W' = W + sum_i w_i s_i B_i A_i for every targeted weight (DoRA adapters rescale
the rows after their delta), computed by the backend (`Backend.merge_batch`: the CPU core, or
the GPU with device='cuda') in
float32 tiles and rounded once to the output dtype. Untouched tensors are copied byte for
byte by the kernel (copy_file_range); touched ones are read through mmap and their pages
dropped once written, so memory stays bounded by one batch of output tensors.

One path for every base: a checkpoint (a folder or one file) is a pipeline of one component
(see io.pipeline); `apply_plan` matches and plans, `_Executor` computes and writes a
component's shards, a writer thread overlapping the disk writes with the next batch's
arithmetic. Progress goes to a callback as `ProgressEvent`s; LORAFUSE_TIMINGS=1 prints the
time of each phase (compute, writes, kernel copies, waits) to stderr.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorafuse._progress import PhaseTimer, ProgressCallback, ProgressReporter, progress_callback
from lorafuse._validate import check_bool, check_optional_bool, check_path, check_threads, check_weights
from lorafuse.backends import Backend, MergeJob, backend_for_device
from lorafuse.errors import (
    FormatError,
    LorafuseError,
    LorafuseValueError,
    NonFiniteError,
)
from lorafuse.formats import load
from lorafuse.formats.held import APPLY_TAKES, refuse_adapter
from lorafuse.io.atomic import atomic_dir, atomic_file, check_output, names_file, output_file
from lorafuse.io.checkpoint import (
    SAFETENSORS_SUFFIX,
    Checkpoint,
    foreign_output,
    is_weights_file,
    one_shard,
    read_config,
)
from lorafuse.io.dtypes import DTYPES, dtype_spelling, parse_output_dtype
from lorafuse.io.hub import PEFT_CONFIG, check_spec, local_path
from lorafuse.io.manifest import CHECKPOINT, MANIFEST_NAME, PIPELINE, mark_metadata
from lorafuse.io.pipeline import Pipeline, is_pipeline
from lorafuse.io.provenance import (
    CARD_NAME,
    Provenance,
    Recording,
    adapter_input,
    folder_input,
    given_name,
    hub_origin,
    keep_base_card,
    model_card,
    recorded_base,
    rewrite_metadata,
    stamp,
)
from lorafuse.io.safetensors import PAGE_ALIGN, SafetensorsFile, SafetensorsWriter, TensorSpec
from lorafuse.io.sidefiles import copy_entry, copy_file, entry_files, entry_kind, walk_entry
from lorafuse.io.tensor import Tensor
from lorafuse.model import Adapter
from lorafuse.model.adapter import adapter_list
from lorafuse.ops.apply_nonfinite import ALLOW, Flagged, kept_as_read, nonfinite_error, overflow_error
from lorafuse.ops.apply_plan import (
    MIN_SHARD_SIZE,
    ModelPlan,
    OutTensor,
    Plan,
    check_requantize,
    drop_named_weights,
    parse_size,
    plan_apply,
    plan_model,
    resharded_index_name,
    shard_limit,
)
from lorafuse.ops.apply_quant import QuantError, QuantRef, dequantize_rows, piece_rows, requantize_rows
from lorafuse.ops.stages import Stage, build_stages, on_columns, row_pieces, slice_stages

__all__ = ["MIN_SHARD_SIZE", "ApplyReport", "ApplySetup", "OutTensor", "Plan", "apply", "parse_size", "plan_apply",
           "prepare_apply"]

BATCH_BYTES = 32 << 20  # output bytes computed per call into the core
CHUNK_BYTES = 16 << 20  # larger tensors are computed and written in row blocks of about this size
WRITE_DEPTH = 2  # batches handed to the writer thread and not yet written


_FALLOC_FL_KEEP_SIZE = 1


@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int] | None:
    """Linux's fallocate(2) (not glibc's posix_fallocate, which writes zeros where a filesystem cannot)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


def _preallocate(path: Path, size: int) -> None:
    """Reserve the blocks of an output file about to be written: on ext4 (and xfs) writing into reserved
    blocks costs the kernel 12-35% less time than growing the file page by page (measured on the
    2.1 GB benchmark). The file's size does not change (KEEP_SIZE); where the filesystem cannot, or
    the disk is full, nothing happens here and the writes report what they always reported."""
    fn = _fallocate()
    if fn is None or size <= 0:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fn(fd, _FALLOC_FL_KEEP_SIZE, 0, size)
    finally:
        os.close(fd)


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
    # weights of a quantized base merged and quantized again: name -> {max_abs_error, rel_fro_error} of the
    # dequantized output against the float32 merged result
    requantized: dict[str, dict[str, float]] = field(default_factory=dict)


_INF_BITS = {"F16": 0x7C00, "BF16": 0x7F80}  # exponent bits all set: Inf or NaN


def _has_nonfinite(raw: np.ndarray | None, dtype: str) -> bool:
    """Inf or NaN among the raw bits of an F16 / BF16 array: two reductions, no temporary array.

    As int16, a positive Inf/NaN is >= the Inf pattern; as uint16, a negative one is >= its pattern."""
    inf = _INF_BITS.get(dtype)
    if inf is None or raw is None or raw.size == 0:
        return False
    bits = raw.reshape(-1).view(np.uint16)
    return int(bits.view(np.int16).max()) >= inf or int(bits.max()) >= 0x8000 | inf


def _companions_of(quant: QuantRef | None) -> tuple[str, ...]:
    """A quantized weight's companions as messages name them, 'key (shard)'; () for a plain weight."""
    return () if quant is None else tuple(f"{key} ({shard})" for shard, key in quant.companions.values())


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
    mapped and faulted in page by page each time. One arena per batch in flight, made when first
    needed (a component whose tensors are all copied makes none)."""

    def __init__(self, count: int, size: int) -> None:
        self._free: list[np.ndarray] = []
        self._unmade = count
        self.size = size

    def take(self) -> np.ndarray:
        if not self._free and self._unmade:
            self._unmade -= 1
            return np.empty(self.size, dtype=np.uint8)
        return self._free.pop()

    def give(self, arena: np.ndarray) -> None:
        self._free.append(arena)


class _Writer:
    """Writes in submission order on one background thread, so disk writes overlap the next
    batch's arithmetic. At most `depth` computed batches wait in its queue (they hold arenas, which
    bound memory); copies and empty tensors hold no memory and never make the caller wait: a
    norm's copy between two weights must not hold the next batch's arithmetic until the writer is idle.

    Where no thread can be started (a process or thread limit), every write runs at once in
    the calling thread instead: slower, same output."""

    def __init__(self, depth: int = WRITE_DEPTH) -> None:
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorafuse-writer")
        self._pending: deque[tuple[Future[None], bool]] = deque()  # (future, holds an arena), in order
        self._held = 0  # pending entries that hold an arena
        self._depth = depth
        try:
            self._pool.submit(lambda: None).result()  # start the thread now, while nothing depends on it
        except RuntimeError:  # "can't start new thread"
            self._pool.shutdown(wait=False)
            self._pool = None

    def submit(self, fn: Callable[[], None], holds_memory: bool = True) -> None:
        if holds_memory:
            while self._held >= self._depth:
                self.wait_one()
        if self._pool is None:
            fn()
            return
        self._pending.append((self._pool.submit(fn), holds_memory))
        self._held += holds_memory

    def wait_one(self) -> None:
        """Wait for the oldest pending entry (they finish in order) and collect its error, if any."""
        if self._pending:
            future, held = self._pending.popleft()
            self._held -= held
            future.result()

    def drain(self) -> None:
        while self._pending:
            self.wait_one()

    def close(self) -> None:
        for f, _ in self._pending:
            f.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _arena_bytes(ckpt: Checkpoint) -> int:
    """An arena's size: a batch's bytes and a row block (BATCH_BYTES + CHUNK_BYTES), or, for a smaller model,
    its tensors' bytes as the widest output holds them (no batch computes more; a piece that does not fit is
    allocated apart, _flush), with the 16-byte alignment of each (so a small
    model reserves no address space it does not use: `ulimit -v` counts what is reserved)."""
    total = 0
    for spec in (ckpt.info(k) for k in ckpt.keys()):
        total += 8 * spec.nbytes + 16  # (x 8: an output may be wider than its input: 4-bit codes -> float32)
        if total >= BATCH_BYTES + CHUNK_BYTES:
            return BATCH_BYTES + CHUNK_BYTES
    return max(total, 16)


class _Executor:
    def __init__(self, ckpt: Checkpoint, threads: int, progress: ProgressReporter, allow_nonfinite: bool,
                 timings: PhaseTimer, backend: Backend, label: Callable[[str], str] = str) -> None:
        self.ckpt, self.threads, self.progress, self.allow_nonfinite = ckpt, threads, progress, allow_nonfinite
        self.backend = backend
        self.timings, self.label = timings, label  # label: a tensor's name in progress events
        self.files: dict[str, SafetensorsFile] = {}
        self.arenas = _Arenas(WRITE_DEPTH + 1, _arena_bytes(ckpt))
        self.merged: list[str] = []
        self.replaced: list[str] = []
        self.biases: list[str] = []
        self.stages: dict[str, list[Stage]] = {}
        self.quant_errors: dict[str, QuantError] = {}
        self.companion_rows: dict[str, dict[str, list[np.ndarray]]] = {}  # weight -> role -> row blocks computed
        self.companions_done: dict[str, dict[str, np.ndarray]] = {}  # weight -> role -> companion as written
        self._quant_of: dict[str, QuantRef] = {}  # requantized weight -> its QuantRef (for its companions)
        self.provenance: Provenance | None = None  # the record put in each shard's metadata (io.provenance)
        self.headers: list[tuple[Path, list[TensorSpec], dict[str, str]]] = []  # shards written with it

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
            self.stages[t.name] = build_stages(t.updates, t.rows, self.threads)
        return self.stages[t.name]

    def _pieces(self, t: OutTensor) -> list[_Piece]:
        rows = t.rows
        whole = t.bias_updates or any(c.update.magnitude is not None and on_columns(c) for c in t.updates)
        if t.companion_of is not None:
            return [_Piece(t, 0, rows, rows)]  # small: a scale per block of its weight
        if t.quant is not None and not whole:  # row blocks aligned to the scale blocks, sized in float32
            step = piece_rows(t.quant.scheme, t.quant.shape, rows, CHUNK_BYTES)
            return [_Piece(t, r, min(r + step, rows), rows) for r in range(0, rows, step)]
        if whole:  # column norms need the whole matrix at once
            return [_Piece(t, 0, rows, rows)]
        step = max(1, CHUNK_BYTES * rows // t.nbytes)  # pieces also end where a row block does (ops.stages)
        return [_Piece(t, r0, r1, rows) for r0, r1 in row_pieces(t.updates, rows, step)]

    def _copies_aligned(self, entries: list[OutTensor]) -> int | None:
        """Where the output's data should start (modulo a page, SafetensorsWriter's data_start) for the most
        bytes of the tensors copied unchanged to sit at the same place within their pages as in their input:
        the kernel copies those page by page. None where nothing is copied."""
        moved: dict[int, int] = {}  # input offset - output offset within the data (mod a page): bytes copied
        at = 0
        for t in entries:
            src = self.file(t.src_shard)
            if t.nbytes and t.is_copy(src.info(t.src_name).dtype):
                shift = (src.file_offset(t.src_name) - at) % PAGE_ALIGN
                moved[shift] = moved.get(shift, 0) + t.nbytes
            at += t.nbytes
        return max(moved, key=lambda k: moved[k]) if moved else None

    def write_shard(self, path: Path, entries: list[OutTensor], metadata: dict[str, str]) -> None:
        specs = [TensorSpec(t.name, t.dtype, t.shape) for t in entries]
        if self.provenance is not None:  # its hashes may be placeholders: _Run.stamp rewrites the header
            self.headers.append((path, specs, metadata))
            metadata = stamp(metadata, self.provenance)
        with SafetensorsWriter(path, specs, metadata, self._copies_aligned(entries)) as out:
            _preallocate(path, os.stat(path).st_size + sum(s.nbytes for s in specs))  # the header is written
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
                        writer.submit(self._empty(out, t) if empty else self._copy(out, t, src), holds_memory=False)
                        continue
                    for piece in self._pieces(t):
                        batch.append(piece)
                        size += piece.tensor.nbytes * (piece.r1 - piece.r0) // piece.rows
                        if piece.tensor.quant is not None:  # float32 rows in and out, not the codes
                            size += 8 * piece.tensor.quant.cols * (piece.r1 - piece.r0)
                        if size >= BATCH_BYTES:
                            self._submit(writer, out, batch)
                            batch, size = [], 0
                if batch:
                    self._submit(writer, out, batch)
                with self.timings.phase("wait for the writer"):
                    writer.drain()
            finally:
                # Stop the writer thread before `out` closes its descriptor: on an error, a queued
                # write must not reach a closed descriptor (or another file that reused its number).
                writer.close()

    def _submit(self, writer: _Writer, out: SafetensorsWriter, batch: list[_Piece]) -> None:
        """Compute a batch into a free arena (waiting for the writer to hand one back) and queue its writes."""
        with self.timings.phase("wait for the writer"):
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

        with self.timings.phase("wait for the writer"):  # at most `depth` computed batches queued
            writer.submit(run)

    def _copy(self, out: SafetensorsWriter, t: OutTensor, src: SafetensorsFile) -> Callable[[], None]:
        def run() -> None:
            with self.timings.phase("copy (copy_file_range)", t.nbytes):
                out.copy_from(t.name, src, t.src_name)
            self.progress.advance(self.label(t.name), t.nbytes)

        return run

    def _empty(self, out: SafetensorsWriter, t: OutTensor) -> Callable[[], None]:
        """A tensor of no elements: its header entry says it all (whatever is merged into it is empty too)."""
        for names, changed in ((self.merged, t.updates), (self.replaced, t.replacement is not None),
                               (self.biases, t.bias_updates)):
            if changed:
                names.append(t.name)

        def run() -> None:
            out.start(t.name)
            self.progress.advance(self.label(t.name), 0)

        return run

    def _writes(self, out: SafetensorsWriter, pieces: list[_Piece]) -> Callable[[], None]:
        def run() -> None:
            for p in pieces:
                if p.r0 == 0:
                    out.start(p.tensor.name)
                assert p.data is not None
                nbytes = p.data.nbytes
                with self.timings.phase("write (computed tensors)", nbytes):
                    out.append(p.data)
                self.progress.advance(self.label(p.tensor.name), nbytes, p.r1 == p.rows)
                p.data = None

        return run

    def _flush(self, batch: list[_Piece], arena: np.ndarray) -> list[_Piece]:
        """Compute every piece of the batch (one call into the core) and release their input pages.

        Outputs are carved from `arena` (16-byte aligned slices) while they fit."""
        jobs = []
        computed: list[_Piece] = []
        merged32: dict[int, np.ndarray] = {}  # id(piece) -> float32 merged rows of a weight quantized again
        used = 0
        for p in batch:
            t = p.tensor
            if t.companion_of is not None:  # computed with its weight, below
                continue
            src = self.file(t.src_shard)
            if t.bias_updates:
                p.data = self._bias(t, src)
                continue
            if t.replacement is not None:  # a full tensor from the adapter takes the base's place
                if p.r0 == 0:
                    self.replaced.append(t.name)
                w, w_dtype = t.replacement.raw, t.replacement.dtype
                w2 = w.reshape(p.rows, -1)[p.r0 : p.r1]
            elif t.quant is not None:  # dequantized rows of a quantized weight
                with self.timings.phase("dequantize (quantized base)"):
                    w2 = dequantize_rows(t.quant, src.raw(t.src_name), p.r0, p.r1, self._raw_of, self.threads)
                w_dtype = "F32"
            else:
                w, w_dtype = src.raw(t.src_name), src.info(t.src_name).dtype
                w2 = w.reshape(p.rows, -1)[p.r0 : p.r1]
            if t.token_rows:  # trainable tokens: rows replaced in the weight's dtype, before any delta adds
                w2 = self._token_rows(t, w2, w_dtype, p.r0, p.r1)
            raw_dtype = DTYPES[t.dtype].raw
            q = t.quant if t.quant is not None and t.quant.requantize else None  # the piece: stored codes
            codes = q is not None
            nbytes = (q.scheme.code_bytes(p.r0, p.r1, q.shape, raw_dtype.itemsize) if q is not None
                      else w2.shape[0] * w2.shape[1] * raw_dtype.itemsize)
            out_dtype, out_shape = (np.dtype(np.uint8), (nbytes,)) if codes else (raw_dtype, w2.shape)
            if used + nbytes <= arena.size:
                p.data = arena[used : used + nbytes].view(out_dtype).reshape(out_shape)
                used += (nbytes + 15) // 16 * 16
            else:  # a tensor that cannot be split (column-normalized DoRA) and is larger than the arena
                p.data = np.empty(out_shape, dtype=out_dtype)
            stages = slice_stages(self._stages(t), p.r0, p.r1) if t.updates else []
            if p.r1 == p.rows:
                self.stages.pop(t.name, None)
            if t.quant is not None and t.quant.requantize:
                merged32[id(p)] = np.empty(w2.shape, dtype=np.float32)
                jobs.append(MergeJob(t.name, w2, w_dtype, merged32[id(p)], "F32", stages))
            else:
                jobs.append(MergeJob(t.name, w2, w_dtype, p.data, t.dtype, stages))
            computed.append(p)
            if t.updates and p.r0 == 0:
                self.merged.append(t.name)
        with self.timings.phase("compute (merge_batch, mapped reads included)", sum(j.out.nbytes for j in jobs)):
            flags = self.backend.merge_batch(jobs, self.threads) if jobs else []
        # The core flags results that are not finite in float32 or overflow the output dtype: say why
        # (jobs and computed pieces are in step)
        flagged = [Flagged(job, p.tensor.updates, p.r0, p.tensor.replacement is not None,
                           _companions_of(p.tensor.quant), p.tensor.token_rows)
                   for job, p, f in zip(jobs, computed, flags) if f]
        flagged = [f for f in flagged if not kept_as_read(f, self.backend, self.threads)]
        if flagged and not self.allow_nonfinite:
            raise nonfinite_error(flagged, self.backend, self.threads)
        if merged32 or any(p.tensor.companion_of is not None for p in batch):
            with self.timings.phase("quantize again (quantized base)"):
                self._requantize(batch, merged32)
        for p in computed:
            if p.tensor.replacement is None:
                src = self.file(p.tensor.src_shard)
                row_bytes = src.info(p.tensor.src_name).nbytes // p.rows
                src.release(p.tensor.src_name, p.r0 * row_bytes, p.r1 * row_bytes)
        return batch

    def _token_rows(self, t: OutTensor, w2: np.ndarray, w_dtype: str, r0: int, r1: int) -> np.ndarray:
        """Rows r0:r1 of the weight (`w2`, raw `w_dtype`) with the rows adapters replace (PEFT trainable tokens) in
        that range: their values cast to `w_dtype` (round to nearest even, as torch's .to() in PEFT's merge)."""
        out = np.array(w2, copy=True)
        for rows in t.token_rows:
            hit = (rows.indices >= r0) & (rows.indices < r1)
            if not hit.any():
                continue
            if w_dtype == "F64":
                values = rows.values.raw.astype(np.float64) if rows.values.dtype == "F64" else \
                    rows.values.f32().astype(np.float64)
            else:
                values = self.backend.from_float32(np.ascontiguousarray(rows.values.f32()), w_dtype, self.threads)
            out[rows.indices[hit] - r0] = values.reshape(len(rows.indices), -1)[hit]
        if t.replacement is None and r0 == 0:  # replaced in part: counted with the tensors adapters replace
            self.replaced.append(t.name)
        return out

    def _raw_of(self, shard: str, key: str) -> tuple[np.ndarray, str]:
        f = self.file(shard)
        return f.raw(key), f.info(key).dtype

    def _requantize(self, batch: list[_Piece], merged32: dict[int, np.ndarray]) -> None:
        """In batch order: the merged float32 rows of each weight quantized again into its codes (p.data),
        their companions (fresh scales) kept until the companion's own piece, which follows its weight."""
        for p in batch:
            t = p.tensor
            if id(p) in merged32:
                assert t.quant is not None and p.data is not None
                dtypes = {role: src_dtype for role, (shard, key) in t.quant.companions.items()
                          for src_dtype in [self.file(shard).info(key).dtype]}
                err = self.quant_errors.setdefault(t.name, QuantError())
                self._quant_of[t.name] = t.quant
                codes, comps = requantize_rows(t.quant, merged32.pop(id(p)), p.r0, t.quant.shape, dtypes,
                                               self.threads, err)
                p.data[...] = np.ascontiguousarray(codes).reshape(-1).view(np.uint8)
                for role, rows in comps.items():
                    self.companion_rows.setdefault(t.name, {}).setdefault(role, []).append(rows)
            elif t.companion_of is not None:
                weight, role = t.companion_of
                if weight not in self.companions_done:  # its weight's last row block is done: assemble them once
                    ref = self._quant_of[weight]
                    base = {r: self._raw_of(shard, key) for r, (shard, key) in ref.companions.items()}
                    self.companions_done[weight] = ref.scheme.finish(self.companion_rows.pop(weight, {}), base,
                                                                     ref.shape)
                done = self.companions_done[weight]
                data = np.ascontiguousarray(done.pop(role)).reshape(-1).view(np.uint8)
                if not done:
                    del self.companions_done[weight]
                if data.nbytes != t.nbytes:
                    raise FormatError(f"{t.name}: the requantized companion has {data.nbytes} bytes, but the base's "
                                      f"{t.dtype} {list(t.shape)} holds {t.nbytes}")
                p.data = data

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
            raise NonFiniteError(f"NaN or Inf in the merged bias {t.name} {list(t.shape)}: {_bias_cause(base, t)}; "
                                 f"{ALLOW}")
        with np.errstate(over="ignore"):
            acc32 = acc.astype(np.float32)
        out = self.backend.from_float32(acc32, t.dtype, self.threads)
        if not self.allow_nonfinite and (not np.isfinite(acc32).all() or _has_nonfinite(out, t.dtype)):
            raise overflow_error([t.name], {t.name: t.dtype}, narrow=bool(np.isfinite(acc32).all()))
        self.biases.append(t.name)
        return out


def _bias_cause(base: Tensor, t: OutTensor) -> str:
    """Why a merged bias (in float64) is not finite: the base's (or its replacement's) bias, or an adapter's
    lora_B.bias, holds NaN or Inf; else the weighted sum overflows."""
    if not np.isfinite(base.f32()).all():
        return ("the adapter's full tensor that replaces it (modules_to_save)" if t.replacement is not None
                else "its base bias") + " holds NaN or Inf"
    for c in t.bias_updates:
        assert c.update.bias is not None
        if not np.isfinite(c.update.bias.f32()).all():
            return f"{c.source}: module {c.update.name!r} holds NaN or Inf in its lora_B.bias"
    return "the inputs are finite, but the base bias plus weight * scale * lora_B.bias overflows"


# Sub-folders of a checkpoint that are tokenizer files: transformers' save_pretrained writes the named chat
# templates (tool_use, rag, ...) as additional_chat_templates/NAME.jinja and its tokenizer loads them from there.
TOKENIZER_FOLDERS = ("additional_chat_templates",)


def _side_files(src_dir: Path, skip: set[str], notes: list[str], root: Path | None = None) -> list[Path]:
    """The checkpoint folder's other files that its output gets a copy of (config, tokenizer, ...): regular files
    only (see io.sidefiles), and the .jinja files of TOKENIZER_FOLDERS. Other sub-folders, other weights and links
    that lead outside the base folder `root` (default `src_dir`; a pipeline's folder for its components) are left
    out with a note."""
    try:
        entries = sorted(src_dir.iterdir())
    except OSError as e:
        raise FormatError(f"{src_dir}: cannot read: {e.strerror or e}") from None
    files = []
    for p in entries:
        if p.name in skip or p.name.startswith("."):
            continue
        if is_weights_file(p):  # another copy of the model, unmerged (tf_model.h5, a .gguf, a pickle)
            notes.append(f"{p.name} holds other weights and was not copied")
            continue
        if p.name == PEFT_CONFIG:  # transformers would load its base_model_name_or_path and adapter, not the merge
            notes.append(f"{p.name}, a PEFT adapter's config beside the model, was not copied: with it in the output, "
                         "transformers' from_pretrained would load that adapter's base model and adapter (here absent) "
                         "instead of the merged weights")
            continue
        kind, note = entry_kind(p, p.name, root or src_dir)
        if note is not None:  # not a file or folder, or a link out (its bytes, say ~/.aws/credentials, stay out)
            notes.append(note)
        elif kind == "dir" and p.name in TOKENIZER_FOLDERS:  # transformers' tokenizer reads *.jinja from it
            files += [f for f, k in walk_entry(p, notes, root or src_dir) if k == "file" and f.suffix == ".jinja"]
        elif kind == "dir":
            notes.append(f"folder {p.name}/ was not copied")
        else:
            files.append(p)
    return files


def _skipped(ckpt: Checkpoint) -> set[str]:
    """What of a checkpoint's folder is not copied as a side file: its weights and index (written anew) and its
    manifest (a fresh one is written)."""
    return {*ckpt.shards, *([ckpt.index_name] if ckpt.index_name else []), MANIFEST_NAME}


def _copied_files(model: Pipeline, plans: Mapping[str, object]) -> list[Path]:
    """What a folder output gets a copy of from the base: each merged component's side files (_side_files), and
    for a pipeline the other entries of its folder, folders whole (io.sidefiles.copy_entry): recorded with the
    base's files in the output's provenance (a tokenizer or scheduler swapped changes the model too)."""
    files = [f for comp in plans for f in _side_files(model.components[comp].directory,
                                                       _skipped(model.components[comp]), [], model.directory)]
    if not model.single:
        for entry in sorted(model.directory.iterdir()):
            if not entry.name.startswith(".") and entry.name != MANIFEST_NAME and entry.name not in plans \
                    and not _top_weights(entry):
                files += entry_files(entry, model.directory)
    return files


def _top_weights(entry: Path) -> bool:
    """Whether the entry of a pipeline's folder (not a component) is a weights file: the single-file checkpoint
    beside the components (sd_xl_base_1.0.safetensors, flux1-dev.safetensors), a LoRA, an ONNX or GGUF copy. It
    holds the model unmerged under a name single-file loaders (ComfyUI, from_single_file) read: not copied."""
    return is_weights_file(entry) and not entry.is_dir()


def _copy_side_files(src_dir: Path, dst_dir: Path, skip: set[str], config_updates: dict[str, object],
                     notes: list[str], config_removals: Sequence[str] = (), root: Path | None = None) -> None:
    """The checkpoint folder's other files (config, tokenizer, ...): _side_files, config.json with
    `config_updates` applied."""
    for p in _side_files(src_dir, skip, notes, root):
        if p.name == "config.json" and (config_updates or config_removals):
            cfg = read_config(src_dir)
            cfg.update(config_updates)
            for key in config_removals:
                cfg.pop(key, None)
            (dst_dir / p.name).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        else:
            target = dst_dir / p.relative_to(src_dir)  # a file of TOKENIZER_FOLDERS keeps its folder
            target.parent.mkdir(exist_ok=True)
            copy_file(p, target)


def _write_index(dst_dir: Path, ckpt: Checkpoint, plan: Plan, resharded: bool) -> None:
    """The shard index: under the input's own name (diffusers components use
    diffusion_pytorch_model.safetensors.index.json), or, re-sharded, the name of the new shards' stem
    (apply_plan.resharded_index_name: diffusers' for a diffusers component, else model.safetensors.index.json, with
    the input's variant)."""
    weight_map = {t.name: shard for shard, ts in plan.shards for t in ts}
    meta = dict(ckpt.index_metadata)
    meta["total_size"] = sum(t.nbytes for _, ts in plan.shards for t in ts)
    if "total_parameters" in meta:
        meta["total_parameters"] = sum(int(np.prod(t.shape)) for _, ts in plan.shards for t in ts)
    index = {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}
    name = ckpt.index_name if ckpt.index_name and not resharded else resharded_index_name(ckpt)
    (dst_dir / name).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def check_progress(progress: ProgressCallback | bool | None) -> ProgressCallback | bool | None:
    """apply's `progress`: a callable, or True, False or None (a numpy bool too, as every other switch:
    check_optional_bool); anything else (`'no'`, 1) is a LorafuseValueError (plan_apply checks it alike)."""
    if callable(progress):
        return progress
    try:
        return check_optional_bool(progress, "progress")
    except LorafuseValueError:
        raise LorafuseValueError(f"progress must be True, False, None or a callable (it gets each "
                                 f"ProgressEvent), got {progress!r}") from None


def apply(
    base: str | os.PathLike[str],
    adapters: Iterable[str | os.PathLike[str] | Adapter],
    weights: Iterable[float] | None = None,
    out: str | os.PathLike[str] | None = None,
    *,
    dtype: object = None,
    threads: int = 0,
    max_shard_size: str | int | None = None,
    progress: ProgressCallback | bool | None = None,
    allow_nonfinite: bool = False,
    skip_missing: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
    requantize: bool | None = None,
) -> ApplyReport:
    """Merge `adapters` (paths or Adapter objects) into the checkpoint at `base`, writing `out`.

    `base` is a folder (single file or sharded with an index), one .safetensors file (then
    `out` is a file too: a single-file SD 1.5 / SDXL / Flux checkpoint, say), or a diffusers
    pipeline folder (model_index.json; the touched components are merged, the rest copied).
    Diffusion adapters (kohya, LyCORIS, diffusers LoRA files) find their weights through the
    SD / SDXL / Flux / text-encoder name tables. `adapters` may be any iterable (a generator is read
    once), never one path. `weights` multiply each adapter's delta (default 1): finite real numbers,
    one per adapter, as a sequence, an iterable or a 1-D array / tensor. `dtype` ('bf16', 'fp16',
    'fp32', an alias, or a torch / numpy dtype) overrides the output dtype of float tensors.
    Every module that finds no target is listed in a MissingModuleError, unless `skip_missing`
    (then they are listed in the report's notes). `out` may be new, an empty folder (file) or an
    earlier lorafuse output; anything else is refused before any work unless `overwrite` (see io.atomic).
    `progress`: a callable receives a `ProgressEvent` for every step of the output (each tensor's
    bytes, exactly once); True draws a bar on stderr, None (default) draws one when stderr is a
    terminal, False reports nothing. `device` 'cuda' computes the merge on the GPU (the files still
    stream through host memory; DeviceError when this build or machine cannot), 'cpu' on the CPU core.
    `requantize` (a quantized base, docs/formats.md#quantized-bases): True writes the base's quantized
    format back (merged weights quantized again, the rest copied), False writes every quantized weight
    dequantized; None (default) does what the quantization does by default: FP8 is kept unless `dtype`
    is given, bitsandbytes is written dequantized in the dtype its quant state names (or `dtype`).
    True with `dtype` is refused (`dtype` means a dequantized output).

    What `out` names (checked before any work): with a single-file base, the output file, or, when `out`
    ends in a path separator or is an existing folder, the file of the base's name inside it. With a
    checkpoint folder base, a folder (config and tokenizer files copied), or one file holding every
    tensor when `out` ends in `.safetensors`: the folder's other files cannot go into it and a note lists
    them; refused when the merge changes config.json in a way the weights depend on (an lm_head untied
    from its embedding), with `max_shard_size`, and for a diffusers pipeline base (a folder of components).
    """
    start = time.monotonic()
    # read once here (generators), then checked: prepare_apply and the provenance see the same lists
    adapters = adapter_list(adapters, "apply")
    weights = None if weights is None else check_weights(weights, len(adapters))
    base = check_spec(base, "base model")  # bytes as text: the provenance records the name as given
    allow_nonfinite = check_bool(allow_nonfinite, "allow_nonfinite")
    progress = check_progress(progress)
    dtype = dtype_spelling(dtype)  # a torch / numpy dtype as its name: the provenance records it as text
    s = prepare_apply(base, adapters, weights, out, dtype=dtype, threads=threads, max_shard_size=max_shard_size,
                      skip_missing=skip_missing, overwrite=overwrite, device=device, requantize=requantize)
    mplan, out_path, one_file, inputs, limit = s.mplan, s.out, s.one_file, s.inputs, s.limit
    callback, close_bar = progress_callback(progress, "apply")
    reporter = ProgressReporter("apply", mplan.total_bytes, mplan.total_tensors, callback)
    run = _Run(mplan, s.threads, reporter, allow_nonfinite, s.timings, s.backend)
    # the record of the run (io.provenance): the inputs' sha256 are computed on a thread while the merge reads
    # the same files, the headers written with placeholders and rewritten once they are known
    rec = _recording(base, adapters, weights, s, {"dtype": dtype, "max_shard_size": max_shard_size,
                                                  "allow_nonfinite": allow_nonfinite, "skip_missing": skip_missing,
                                                  "device": device, "requantize": requantize})
    run.provenance = rec.draft()
    try:
        if one_file:
            with atomic_file(out_path, inputs, overwrite=overwrite, kind=s.kind) as tmp:
                run.write_file(tmp)
                with s.timings.phase("provenance (wait for the inputs' sha256)"):
                    run.stamp(rec.result())
        else:
            with atomic_dir(out_path, inputs, overwrite=overwrite, kind=s.kind) as tmp:
                run.write_folder(tmp, limit)
                with s.timings.phase("provenance (wait for the inputs' sha256)"):
                    run.stamp(rec.result(), tmp)
    finally:
        rec.close()
        close_bar()
    s.timings.report()
    return ApplyReport(out_path, run.merged, run.replaced, run.biases, mplan.total_tensors, mplan.total_bytes,
                       time.monotonic() - start, mplan.notes, run.requantized)


def output_kind(one_file: bool, model: Pipeline) -> str:
    """What apply writes (io.manifest's kinds): a merged checkpoint (one file, or a model's folder) or a pipeline."""
    return CHECKPOINT if one_file or model.single else PIPELINE


@dataclass
class ApplySetup:
    """What apply knows before the first byte is written (prepare_apply): the model's plan (matches, output
    tensors per shard, notes), where the output goes and whether it is one file, the inputs it must not
    replace, the shard limit, the checked threads, the backend, the phase timer, and what `overwrite`
    replaces at the output (io.atomic.check_output's note; None: nothing of the user's)."""

    mplan: ModelPlan
    out: Path
    one_file: bool
    inputs: list[Path]
    limit: int | None
    threads: int
    backend: Backend
    timings: PhaseTimer
    replaces: str | None = None
    adapters: list[Adapter] = field(default_factory=list)  # as loaded (their files, for the provenance)

    @property
    def kind(self) -> str:
        """The output's kind (io.manifest): a merged checkpoint (one file or a folder) or a pipeline."""
        return output_kind(self.one_file, self.mplan.model)


def prepare_apply(
    base: str | os.PathLike[str],
    adapters: Iterable[str | os.PathLike[str] | Adapter],
    weights: Iterable[float] | None = None,
    out: str | os.PathLike[str] | None = None,
    *,
    dtype: object = None,
    threads: int = 0,
    max_shard_size: str | int | None = None,
    skip_missing: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
    requantize: bool | None = None,
) -> ApplySetup:
    """Everything apply does before it writes (its arguments' meaning: apply): the options checked, the
    base and the adapters read (headers; the factors stay mapped), every module matched and the output
    planned, the output's name checked (io.atomic). Raises what apply raises for them; writes nothing."""
    if out is None:
        raise LorafuseValueError("apply needs an output path")
    out = check_path(out, "out")
    adapters = adapter_list(adapters, "apply")
    if not adapters:
        raise LorafuseValueError("apply needs at least one adapter")
    ws = [1.0] * len(adapters) if weights is None else check_weights(weights, len(adapters))
    skip_missing, overwrite = check_bool(skip_missing, "skip_missing"), check_bool(overwrite, "overwrite")
    requantize = check_optional_bool(requantize, "requantize")
    threads = check_threads(threads)
    backend = backend_for_device(device)
    out_dtype = parse_output_dtype(dtype) if dtype is not None else None
    check_requantize(requantize, dtype)
    limit = shard_limit(max_shard_size) if max_shard_size is not None else None

    base_path = local_path(base, what="base model", adapter=False)  # a Hub id: its snapshot folder (io.hub)
    loaded = [a if isinstance(a, Adapter) else _load_adapter(a, base_path) for a in adapters]
    refuse_adapter(base_path, "the base model", APPLY_TAKES)  # after the adapters: `apply ADAPTER MODEL` is said so
    if (why := one_shard(base_path)) is not None:
        raise FormatError(why)
    if is_pipeline(base_path):
        if max_shard_size is not None:
            raise LorafuseValueError("--max-shard-size (Python: max_shard_size=) applies to checkpoint folders, not to "
                                     "a diffusers pipeline")
        model = Pipeline(base_path)
    else:
        model = Pipeline.of_checkpoint(Checkpoint(base_path))
    inputs = [base_path, *model.files(), *_adapter_files(loaded)]  # the base folder too: no output inside it
    single_file = model.single and base_path.is_file()
    out_path, one_file = _output_path(out, base_path, model, single_file, limit, inputs)
    replaces = check_output(out_path, inputs, folder=not one_file, overwrite=overwrite,
                            kind=output_kind(one_file, model))

    timings = PhaseTimer("apply")
    with timings.phase("plan (match, resolve, stages not included)"):
        # a folder into one file: every tensor in one shard (its name is not used)
        mplan = plan_model(model, loaded, ws, out_dtype, sys.maxsize if one_file and not single_file else limit,
                           skip_missing, requantize)
    if one_file and not single_file:
        _one_file_notes(mplan, base_path, out_path)
    elif limit is not None and model.single:  # re-sharded into a folder under save_pretrained's names
        drop_named_weights(mplan.plans[""], model.components[""])
    _base_names_note(loaded, base_path, mplan.notes)
    return ApplySetup(mplan, out_path, one_file, inputs, limit, threads, backend, timings, replaces, loaded)


def _base_names_note(loaded: Sequence[Adapter], base: Path, notes: list[str]) -> None:
    """A note when the adapters' configs name different base models (base_model_name_or_path), as combine
    says it (ops.combine.identity): each is merged into `base` as asked, but one was likely trained for
    another model. Adapters that name none (kohya, diffusers files) are not compared."""
    named = [(a.config.get("base_model_name_or_path"), a.path if a.path is not None else f"adapter {i + 1}")
             for i, a in enumerate(loaded)]
    named = [(n, where) for n, where in named if isinstance(n, str) and n]
    other = next(((n, where) for n, where in named[1:] if n != named[0][0]), None)
    if other is not None:
        notes.append(f"the adapters name different base models (base_model_name_or_path): {named[0][1]} names "
                     f"{named[0][0]!r}, {other[1]} names {other[0]!r}; each is merged into {base} as asked: check "
                     "that every adapter was trained for it")


def _load_adapter(adapter: str | os.PathLike[str], base: Path) -> Adapter:
    """load(adapter); a model checkpoint given where an adapter goes while the base is an adapter (the two
    swapped: `apply lora model`) is refused saying so."""
    try:
        return load(adapter)
    except FormatError as e:
        from lorafuse.formats import detect_format

        try:  # the base first: it is local (a Hub base is in its snapshot), and an adapter's Hub id read as a
            detect_format(base)  # checkpoint downloads its repository's weights (every .safetensors file)
            Checkpoint(adapter)
        except (LorafuseError, OSError, ValueError):
            raise e from None
        raise FormatError(f"{e}. {adapter} is a model checkpoint and {base} an adapter: the base comes first "
                          f"(lorafuse apply BASE ADAPTER...)") from None


def _recording(base: str | os.PathLike[str], adapters: Sequence[str | os.PathLike[str] | Adapter],
               weights: Sequence[float] | None, s: ApplySetup, params: dict[str, object]) -> Recording:
    """The provenance of this apply, its inputs hashed on a thread from now on: the adapters (small) first,
    then the base's files in the order the merge reads them (each read once from disk, by whichever comes
    first; the page cache serves the other). The base (listed first): every weight file, index and
    config.json it has, and for a folder output every file copied into it (_copied_files)."""
    model = s.mplan.model
    base_path = s.inputs[0]  # prepare_apply's inputs start with the base (a Hub id: its snapshot)
    files = [*model.files(), *(ck.directory / "config.json" for ck in model.components.values()),
             *([] if s.one_file else _copied_files(model, s.mplan.plans))]
    ws = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    specs = [adapter_input(a, w, name=given_name(given)) for given, a, w in zip(adapters, s.adapters, ws)]
    origin = hub_origin(base_path)
    return Recording("apply", [folder_input(base, base_path, "base", files), *specs], params,
                     base_model=origin[0] if origin is not None else recorded_base(base))


def _output_path(out: str | os.PathLike[str], base: Path, model: Pipeline, single_file: bool, limit: int | None,
                 inputs: Sequence[Path]) -> tuple[Path, bool]:
    """Where the output goes and whether it is one file (see apply's docstring), refusing before any work
    a name that the base cannot become."""
    if (why := foreign_output(out, folder=not single_file)) is not None:
        raise LorafuseValueError(why)
    if single_file:
        if limit is not None:
            raise LorafuseValueError("--max-shard-size (Python: max_shard_size=) applies to checkpoint folders, not to "
                                     "a single-file base")
        return output_file(out, base.name, inputs, SAFETENSORS_SUFFIX), True
    if not names_file(out, SAFETENSORS_SUFFIX):
        return Path(out), False
    folder = Path(out).with_name(Path(out).name[: -len(SAFETENSORS_SUFFIX)])
    if not model.single:
        raise LorafuseValueError(
            f"output {out} ends in {SAFETENSORS_SUFFIX}, which names one file, but the base {base} is a diffusers "
            f"pipeline ({', '.join(model.components)} and the files around them), which is written as a folder: "
            f"give a folder name, e.g. {folder}")
    if limit is not None:
        raise LorafuseValueError(
            f"--max-shard-size splits a checkpoint folder into shards (Python: max_shard_size=), and the output {out} "
            f"(ending in {SAFETENSORS_SUFFIX}) names one file: leave --max-shard-size out, or give a folder name, e.g. "
            f"{folder}")
    return Path(out), True


def _one_file_notes(mplan: ModelPlan, base: Path, out: Path) -> None:
    """A checkpoint folder written as one .safetensors file: what of the folder is not in it (a note), and
    a refusal when the weights need a config.json that differs from the base's (an untied lm_head)."""
    plan = mplan.plans[""]
    folder = Path(out).with_name(out.name[: -len(SAFETENSORS_SUFFIX)])
    if "tie_word_embeddings" in plan.config_updates:
        raise LorafuseValueError(
            f"output {out} names one .safetensors file, but this merge unties lm_head from the input embedding (only "
            f"one of them changes), which config.json must then say (tie_word_embeddings=false); a .safetensors "
            f"file cannot carry config.json, and with {base}/config.json a model would tie them again: give a "
            f"folder name (e.g. {folder}) to get the checkpoint with its updated config.json")
    ckpt = mplan.model.components[""]
    skip = {*ckpt.shards, *([ckpt.index_name] if ckpt.index_name else []), MANIFEST_NAME}
    try:
        left = sorted(p.name + ("/" if p.is_dir() else "") for p in ckpt.directory.iterdir()
                      if p.name not in skip and not p.name.startswith("."))
    except OSError:
        left = []
    if plan.config_removals:
        mplan.notes.append(f"{out} holds the weights unquantized, and {base}/config.json has a "
                           f"{' / '.join(plan.config_removals)} that no longer applies: give a folder name to get a "
                           "config.json without it")
    changed = {k: v for k, v in plan.config_updates.items() if k in ("torch_dtype", "dtype")}
    if left:
        shown = ", ".join(left[:6]) + (f" and {len(left) - 6} more" if len(left) > 6 else "")
        mplan.notes.append(f"{out} is one .safetensors file, which holds tensors only: {shown} of {base} "
                           f"{'is' if len(left) == 1 else 'are'} not in it (a loader needs config.json and the "
                           f"tokenizer files beside the weights; give a "
                           f"folder name, e.g. {folder}, to get them copied)")
    if changed:
        config = read_config(ckpt.directory)
        key, dtype = next(iter(changed.items()))
        mplan.notes.append(f"the float tensors of {out} are {dtype}, and {base}/config.json says {key}="
                           f"{config.get(key)}: tell the loader the dtype, or give a folder name to get a "
                           "config.json that says it")


def _adapter_files(loaded: Sequence[Adapter]) -> list[Path]:
    """The adapters' files: a single-file output must not replace one of them (nor a file in an adapter folder)."""
    paths = list(dict.fromkeys(p for a in loaded for p in a.sources()))  # an in-memory result's files too
    return paths + [f for d in paths if d.is_dir() for f in d.iterdir() if f.is_file()]


class _Run:
    """Writes the output of a model plan: each planned component through an _Executor, and for a
    pipeline every other entry of its folder copied as it is."""

    def __init__(self, mplan: ModelPlan, threads: int, progress: ProgressReporter, allow_nonfinite: bool,
                 timings: PhaseTimer, backend: Backend) -> None:
        self.mplan, self.threads, self.progress, self.backend = mplan, threads, progress, backend
        self.allow_nonfinite, self.timings = allow_nonfinite, timings
        self.merged: list[str] = []
        self.replaced: list[str] = []
        self.biases: list[str] = []
        self.requantized: dict[str, dict[str, float]] = {}
        self.provenance: Provenance | None = None  # what each shard's metadata records (a draft: see stamp)
        self.headers: list[tuple[Path, list[TensorSpec], dict[str, str]]] = []

    def _executor(self, comp: str) -> _Executor:
        model = self.mplan.model
        ex = _Executor(model.components[comp], self.threads, self.progress, self.allow_nonfinite, self.timings,
                       self.backend,
                       lambda name: model.tensor_name(comp, name))
        ex.provenance = self.provenance
        return ex

    def stamp(self, made: Provenance, folder: Path | None = None) -> None:
        """The final record (every input's sha256 known) into each shard's header, in place; for a folder
        output, the model card README.md (a README.md copied from the base is kept as BASE_README.md)."""
        for path, specs, metadata in self.headers:
            rewrite_metadata(path, specs, stamp(metadata, made))
        if folder is not None:
            kept = keep_base_card(folder)
            # a diffusers model folder (a pipeline's unet/ or transformer/ given alone) is diffusers' too
            diffusers_model = any(f.name.startswith("diffusion_pytorch_model") for f in folder.iterdir())
            library = ("diffusers" if not self.mplan.model.single or diffusers_model else
                       "transformers" if (folder / "config.json").is_file() else None)
            (folder / CARD_NAME).write_text(model_card(made, library_name=library, base_card=kept), encoding="utf-8")

    def _collect(self, comp: str, ex: _Executor) -> None:
        name = self.mplan.model.tensor_name
        self.merged += [name(comp, n) for n in ex.merged]
        self.replaced += [name(comp, n) for n in ex.replaced]
        self.biases += [name(comp, n) for n in ex.biases]
        self.requantized.update({name(comp, n): e.as_dict() for n, e in ex.quant_errors.items()})
        self.headers += ex.headers

    def write_file(self, path: Path) -> None:
        """A single-file checkpoint's one shard."""
        plan = self.mplan.plans[""]
        ex = self._executor("")
        try:
            shard, entries = plan.shards[0]
            ex.write_shard(path, entries, mark_metadata(plan.metadata.get(shard, {})))
        finally:
            ex.close()
        self._collect("", ex)

    def _component(self, comp: str, folder: Path, limit: int | None) -> None:
        ex = self._executor(comp)
        try:
            _write_folder(ex, self.mplan.model.components[comp], self.mplan.plans[comp], folder, limit,
                          self.mplan.model.directory)
        finally:
            ex.close()
        self._collect(comp, ex)

    def write_folder(self, tmp: Path, limit: int | None) -> None:
        model = self.mplan.model
        if model.single:
            self._component("", tmp, limit)
            return
        for entry in sorted(model.directory.iterdir()):
            if entry.name.startswith(".") or entry.name == MANIFEST_NAME:  # a fresh manifest is written
                continue
            if entry.name in self.mplan.plans:
                (tmp / entry.name).mkdir()
                self._component(entry.name, tmp / entry.name, None)
            elif _top_weights(entry):
                self.mplan.notes.append(f"{entry.name} holds other weights (a single-file copy of the model, not "
                                        "merged: the pipeline's components are) and was not copied")
            else:  # files through links (a Hugging Face cache), folders whole; no FIFO, device or loop
                copy_entry(entry, tmp / entry.name, self.mplan.notes, model.directory)


def _write_folder(ex: _Executor, ckpt: Checkpoint, plan: Plan, tmp: Path, limit: int | None,
                  root: Path | None = None) -> None:
    """One checkpoint's output folder: its shards, its index, its side files (`root`: the base folder that
    side-file links may lead into; a pipeline's for its components)."""
    for shard, entries in plan.shards:
        ex.write_shard(tmp / shard, entries, plan.metadata.get(shard, {}))
    if len(plan.shards) > 1 or (ckpt.sharded and limit is None):
        _write_index(tmp, ckpt, plan, limit is not None)
    skip = _skipped(ckpt)
    ckpt.check_folder()  # its config and tokenizer must come from the folder whose weights were read
    _copy_side_files(ckpt.directory, tmp, skip, plan.config_updates, plan.notes, plan.config_removals, root)
    if plan.config_updates and not (ckpt.directory / "config.json").is_file():
        plan.notes.append("no config.json to update: " + json.dumps(plan.config_updates))
