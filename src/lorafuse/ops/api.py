"""The top-level Python API (`lorafuse.apply`, `lorafuse.combine`, ...): each function documents its own
parameters (numpy style: `name : type, default value`) and forwards to the operation in lorafuse.ops /
lorafuse.formats, which keeps its own signature and return type.

`resize` and `extract` take the CLI's rank rules as keyword arguments (exactly one of `rank`, `sv_ratio`,
`sv_fro`, `sv_cumulative`, capped by `max_rank`; ops.rank.RankRule checks them, naming the parameter)
and may write their output (`out`) with the CLI's rules for output names, checked before any work.

Reports: what an operation that ran returns answers one read-only protocol, `Report` (`out`: the path
written, None when the result stayed in memory; `notes`: what the run decided for the user; `seconds`:
its wall time), and an operation whose result is an adapter adds `ranks` (`AdapterReport`: each output
module's rank, in output order). `ApplyReport` (apply), `ResizeResult` (resize) and `ExtractResult`
(extract) are Reports; the last two are AdapterReports, and so are `CombineReport` (ops.combine.combine_to)
and `ConvertReport` (convert); `lorafuse.combine` returns the Adapter itself.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt

from lorafuse._progress import ProgressCallback
from lorafuse._validate import check_bool, check_path
from lorafuse.formats import detect_format as _detect_format
from lorafuse.formats import load as _load
from lorafuse.io.hub import check_spec, quiet_downloads
from lorafuse.model import Adapter
from lorafuse.ops import apply as _apply
from lorafuse.ops import combine as _combine
from lorafuse.ops import convert as _convert
from lorafuse.ops import extract as _extract
from lorafuse.ops import info as _info
from lorafuse.ops import resize as _resize
from lorafuse.ops import similarity as _similarity
from lorafuse.ops.extract import ExtractReport as ExtractReport  # see ExtractResult
from lorafuse.ops.outputs import checked_output, extract_output, save_as
from lorafuse.ops.rank import RankRule

# A path as the API takes it (docs/api.md: "Paths are str, os.PathLike or bytes"; _validate.check_path decodes bytes).
StrPath = str | bytes | os.PathLike[str] | os.PathLike[bytes]
# Weights, one per adapter: any iterable of real numbers, or a 1-D numpy array / torch tensor (_validate.check_weights).
Weights = Iterable[float] | npt.ArrayLike


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _hub_bars(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """`fn` with its `progress=False` also silencing huggingface_hub's own download bars (io.hub.quiet_downloads,
    as the CLI's -q / --json / --no-progress do): False draws no bar of any kind."""

    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with quiet_downloads(kwargs.get("progress", _default_progress(fn)) is False):
            return fn(*args, **kwargs)

    return run


def _default_progress(fn: Callable[..., object]) -> object:
    defaults = fn.__kwdefaults__ or {}
    return defaults.get("progress")


def _given(value: object) -> Any:
    """An argument passed on as the user gave it: the operation checks it and takes every form these signatures
    name (a bytes path decoded by _validate.check_path, weights by check_weights, a torch / numpy dtype by
    io.dtypes), though its own annotation states the narrower form it works with."""
    return value


__all__ = ["AdapterReport", "ExtractResult", "Report", "ResizeResult", "apply", "combine", "convert", "describe",
           "detect_format", "extract", "load", "resize", "similarity"]


# ----------------------------------------------------------------------------- the report protocol


@runtime_checkable
class Report(Protocol):
    """What every report of an operation that ran answers (read-only)."""

    @property
    def out(self) -> Path | None:
        """The file or folder written; None when the result stayed in memory."""

    @property
    def notes(self) -> Sequence[str]:
        """What the run decided for the user (inputs left out, a name that changed the output's format, ...)."""

    @property
    def seconds(self) -> float:
        """Wall time of the run, the output's writing included."""


@runtime_checkable
class AdapterReport(Report, Protocol):
    """A Report of an operation whose result is an adapter."""

    @property
    def ranks(self) -> Mapping[str, int]:
        """Each output module's rank, in output order (the keys are the output's module names)."""


@dataclass(frozen=True)
class ResizeResult:
    """What `lorafuse.resize` returns (an AdapterReport): the resized adapter and one row per module.

    Attributes
    ----------
    adapter : Adapter
        The resized adapter (in memory; written to `out` too when it was given).
    modules : list of ops.resize.ModuleReport
        One row per module, in order: `name`, `rank_in`, `rank_out`, `fro_kept` (the fraction of the
        module's ||delta||_F the new rank keeps; 1.0 is lossless).
    out : Path or None
        The output written, or None.
    seconds : float
        Wall time of the run.
    notes : list of str
        What the run decided for the user (a `.safetensors` name that wrote another format, ...).
    """

    adapter: Adapter
    modules: list[_resize.ModuleReport]
    out: Path | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def ranks(self) -> dict[str, int]:
        """Each module's new rank, in order."""
        return {m.name: m.rank_out for m in self.modules}


@dataclass
class ExtractResult(_extract.ExtractResult):
    """What `lorafuse.extract` returns (an AdapterReport): an ops.extract.ExtractResult (`adapter`, `modules`:
    one row per module with `name`, `shape`, `rank`, `rel_error` = ||D - B A||_F / ||D||_F and
    `singular_values`, how many were computed to choose the rank; `skipped`; `unchanged`) that also says where it
    was written and how long it took.

    Attributes
    ----------
    out : Path or None
        The output written, or None.
    seconds : float
        Wall time of the run.
    notes : list of str
        The tensors not extracted, each with the reason (`skipped`), then what the output's name decided.
    """

    # @dataclass here generates an __init__ whose annotations, the inherited `modules: list[ExtractReport]`
    # included, resolve in this module (typing.get_type_hints, inspect.signature(eval_str=True)): ExtractReport
    # is imported above for them
    out: Path | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def ranks(self) -> dict[str, int]:
        """Each extracted module's rank, in order."""
        return {m.name: m.rank for m in self.modules}


# ----------------------------------------------------------------------------- loading and describing


def load(path: StrPath) -> Adapter:
    """Load an adapter from disk; its tensors stay memory-mapped until used.

    Parameters
    ----------
    path : str, bytes or os.PathLike
        A PEFT adapter folder, a kohya / LyCORIS `.safetensors` file or a diffusers LoRA `.safetensors` file
        (the format is detected: `detect_format`), or a folder holding one such file
        (`pytorch_lora_weights.safetensors`, else its only `.safetensors` file), as a Hub id's repository is read.

    Returns
    -------
    Adapter
        The adapter. What loading decided for the user (tensors PEFT would ignore, left out) is in
        `Adapter.notes` and is also given as AdapterNote warnings.
    """
    # a Hub id (`org/name`, `org/name@revision`): the adapter in its snapshot (io.hub); a folder holding one adapter
    # file: that file (formats.held). Its notes are warnings at the caller's line (errors.warn).
    return _load(_given(path))


def detect_format(path: StrPath) -> str:
    """The name of the adapter format that recognises `path`.

    Parameters
    ----------
    path : str, bytes or os.PathLike
        A file or folder.

    Returns
    -------
    str
        'kohya' for a `.safetensors` file with `.lora_down.weight` (or LyCORIS) keys, 'diffusers' for one with
        `<component>.<module>.lora_A.weight` keys or diffusers' own LoRA-layer names, 'peft' for a PEFT
        adapter folder. Raises FormatError for anything else (a pickle is refused, never read).
    """
    return _detect_format(_given(path))


def describe(path: StrPath, threads: int = 0) -> dict[str, object]:
    """What `lorafuse info --json` prints: a description of an adapter, a checkpoint or a pipeline.

    Parameters
    ----------
    path : str, bytes or os.PathLike
        An adapter (PEFT folder, kohya / LyCORIS file, diffusers LoRA file, or a folder holding one), a
        checkpoint (a folder or one `.safetensors` file) or a diffusers pipeline folder.
    threads : int, default 0
        Worker threads for the adapter's norms; 0 uses every core.

    Returns
    -------
    dict
        JSON-ready: `type` ('adapter', 'checkpoint', 'pipeline') and what that kind has (an adapter's
        modules with rank, scale, shape, dtype and exact ||delta||_F; a checkpoint's tensors, parameters,
        bytes and dtypes; a pipeline's components).
    """
    return _info.describe(_given(path), threads=threads)


def similarity(adapters: Iterable[StrPath | Adapter], threads: int = 0) -> np.ndarray:
    """The exact cosine similarity matrix of the adapters' deltas (all modules together), from the factors.

    Parameters
    ----------
    adapters : iterable of str, bytes, os.PathLike or Adapter
        At least one adapter (paths are loaded): a list, a tuple or a generator (read once); not one path, a
        mapping or a set (no order).
    threads : int, default 0
        Worker threads; 0 uses every core.

    Returns
    -------
    numpy.ndarray
        n x n float64 matrix; 0 where an adapter's delta is zero.
    """
    return _similarity.similarity(_given(adapters), threads=threads)


# ----------------------------------------------------------------------------- operations


@_hub_bars
def apply(
    base: StrPath,
    adapters: Iterable[StrPath | Adapter],
    weights: Weights | None = None,
    out: StrPath | None = None,
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
) -> _apply.ApplyReport:
    """Merge adapters into a base checkpoint: W' = W + sum_i w_i s_i B_i A_i per targeted weight, streamed.

    Parameters
    ----------
    base : str, bytes or os.PathLike
        A checkpoint folder (one file, or shards with an index), one `.safetensors` file (a single-file
        SD 1.5 / SDXL / Flux checkpoint, say) or a diffusers pipeline folder (model_index.json: the touched
        components are merged, the others copied).
    adapters : iterable of str, bytes, os.PathLike or Adapter
        At least one adapter (a list, a tuple or a generator, read once; not one path, a mapping or a set);
        diffusion adapters (kohya, LyCORIS, diffusers LoRA) find their weights through the SD / SDXL / Flux /
        text-encoder name tables.
    weights : iterable of float, or a 1-D numpy array / torch tensor, default None
        One finite multiplier per adapter's delta, in the adapters' order (not a set nor a mapping); None: 1 for
        each. An adapter with modules_to_save tensors (which replace base weights whole) or DoRA modules takes 1
        only (UnsupportedError).
    out : str, bytes or os.PathLike, default None
        The output (required; checked before any work). With a single-file base, the output file, or the
        base's file name inside `out` when it ends in a path separator or is an existing folder. With a
        checkpoint folder, a folder (config and tokenizer files copied), or one file holding every tensor
        when `out` ends in `.safetensors` (not with `max_shard_size`, nor for a pipeline). It may be new, an
        empty folder (file) or an earlier lorafuse merged model (an adapter there is another kind of output);
        anything else is refused unless `overwrite`.
    dtype : str, torch or numpy dtype, default None
        'bf16', 'fp16' or 'fp32' (or an alias, torch.bfloat16, np.float16, ...): the output dtype of float
        tensors; None keeps each tensor's own.
    threads : int, default 0
        Worker threads; 0 uses every core.
    max_shard_size : str or int, default None
        Largest output shard ('5GB', '500MB' or bytes); None keeps the base's sharding.
    progress : callable, bool or None, default None
        A callable receives a `ProgressEvent` for every step of the output (each tensor's bytes exactly
        once); True draws a bar on stderr, None draws one when stderr is a terminal, False reports nothing.
    allow_nonfinite : bool, default False
        Write Inf / NaN results (values that overflow the output dtype) instead of raising NonFiniteError.
    skip_missing : bool, default False
        Adapter modules that find no target weight are listed in the report's notes instead of raising
        MissingModuleError.
    overwrite : bool, default False
        Replace an `out` that lorafuse did not write, or its output of another kind (never an input), with an
        OverwriteWarning.
    device : str, default 'cpu'
        Where the merge is computed: 'cpu' (the compiled core) or 'cuda' (one NVIDIA GPU, with a build that has the
        CUDA backend: docs/building.md; DeviceError says why when it cannot run here).
    requantize : bool, default None
        For a quantized base (docs/formats.md#quantized-bases): True writes every merged weight back in the
        base's own quantized format (fresh scales per block); False writes the dequantized weights in 16 bits
        (or `dtype`) without the quantization config; None: the format's default (FP8 stays FP8,
        bitsandbytes 4-bit / 8-bit becomes the 16-bit model). Ignored for plain bases.

    Returns
    -------
    ApplyReport
        A Report: `out`, `notes`, `seconds`, and `merged` / `replaced` / `biases` (tensor names),
        `tensors`, `bytes_written`.
    """
    return _apply.apply(_given(base), _given(adapters), _given(weights), _given(out), dtype=dtype, threads=threads,
                        max_shard_size=max_shard_size, progress=progress, allow_nonfinite=allow_nonfinite,
                        skip_missing=skip_missing, overwrite=overwrite, device=device, requantize=requantize)


@_hub_bars
def combine(
    adapters: Iterable[StrPath | Adapter],
    weights: Weights | None = None,
    *,
    method: str = "svd",
    rank: int | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    seed: int = 0,
    split: str = "B",
    threads: int = 0,
    exact: bool = False,
    conv_rank: int | None = None,
    dtype: object = None,
    device: str = "cpu",
    engine: str = "auto",
    passes: int | None = None,
    progress: bool | None = False,
    oversample: int | None = None,
) -> Adapter:
    """Combine adapters into one adapter (PEFT's add_weighted_adapter, method for method).

    Parameters
    ----------
    adapters : iterable of str, bytes, os.PathLike or Adapter
        At least one adapter; any ordered iterable, a generator too (read once), not a set (no order). LoHa /
        LoKr inputs enter through an exact factorization of their delta (methods svd, cat and the *_svd ones;
        in-memory engine).
    weights : iterable of float, or a 1-D numpy array / torch tensor, default None
        One finite weight per adapter, in the adapters' order (not a set nor a mapping); None: 1 for each.
    method : str, default 'svd'
        One of `lorafuse.METHODS`: 'svd' (the best rank-k approximation of sum_i w_i s_i B_i A_i), 'cat'
        (exact, ranks add up), 'linear', 'ties', 'dare_linear', 'dare_ties', 'magnitude_prune' (PEFT's
        factor-wise merges, equal ranks required) or their '*_svd' forms (merged dense deltas, then rank k).
    rank : int, default None
        Output rank of the methods that take one; None: the largest input rank (as PEFT).
    density : float, default None
        The fraction of entries kept (0..1), required by the ties / dare / magnitude_prune methods and
        refused by the others.
    majority_sign : str, default 'total'
        The ties methods' sign election: 'total' (the sign of the summed values) or 'frequency' (the sign
        of most values).
    seed : int, default 0
        Seed of DARE's random masks and of randomized SVD sketches (with the module name, so results do not
        depend on the number of threads).
    split : str, default 'B'
        Where svd puts the singular values: 'B' (on B, like PEFT) or 'sqrt' (their square roots on both
        factors).
    threads : int, default 0
        Worker threads; 0 uses every core.
    exact : bool, default False
        Method svd only: the exact path for every module, however many adapters are stacked (by default a
        module with a large stacked rank may take a randomized SVD; those are listed in the result's
        `randomized`).
    conv_rank : int, default None
        Output rank of kxk convolutions with k > 1 (kohya's `--new_conv_rank`); None: `rank`. Refused
        (LorafuseValueError) when no module is one.
    dtype : str, torch or numpy dtype, default None
        'fp32', 'fp16' or 'bf16' (or an alias, torch.bfloat16, np.float16, ...): the dtype of the result's
        factors; None: the inputs' factor dtype when they all share one of F32 / F16 / BF16, else F32. The math
        is float32 / float64 either way.
    device : str, default 'cpu'
        Where the math runs: 'cpu' (the compiled core) or 'cuda' (one NVIDIA GPU, with a build that has the
        CUDA backend: docs/building.md; DeviceError says why when it cannot run here).
    engine : str, default 'auto'
        'memory' (every adapter mapped at once), 'stream' (methods svd and linear: each adapter opened, read
        once per pass and closed; memory independent of the number of adapters) or 'auto': stream for more
        than 256 adapters, or when `passes` is given, or when some module would take a randomized SVD anyway.
    passes : int, default None
        The streamed svd's passes over the adapters; None: 3 (range, one power iteration, projection:
        near-optimal), 2 (range, projection: up to 1.5x the optimal error on smoothly decaying spectra),
        1 (a single-pass sketch, for adapters read only once), more (more power iterations). Giving it
        selects engine 'stream'.
    progress : bool, default False
        Draw a bar over the adapters read (streamed engine); None: when stderr is a terminal.
    oversample : int, default None
        The streamed svd's sketch columns beyond the rank; None: 10. Without a power iteration (passes=2) the
        sketch's width is what bounds the error: 120 came within 1.02x of the optimum on
        benchmarks/bench_many.py's adapters, where 10 gave 1.43x; each pass's products grow with it. Giving it
        selects engine 'stream'.

    Returns
    -------
    Adapter
        The combined adapter, in memory (every module with scale 1); `save(out)` writes it.
        `lorafuse.ops.combine.combine_to` writes it while computing and returns a CombineReport.
    """
    return _combine.combine(_given(adapters), _given(weights), method=method, rank=rank, density=density,
                            majority_sign=majority_sign, seed=seed, split=split, threads=threads, exact=exact,
                            conv_rank=conv_rank, dtype=_given(dtype), device=device, engine=engine, passes=passes,
                            progress=progress, oversample=oversample)


def convert(
    adapter: StrPath | Adapter,
    out: StrPath,
    to: str = "peft",
    rank: int | None = None,
    conv_rank: int | None = None,
    family: str | None = None,
    threads: int = 0,
    overwrite: bool = False,
    *,
    arch: str | None = None,
    base_config: StrPath | None = None,
    gguf_type: str | None = None,
) -> _convert.ConvertReport:
    """Convert a diffusion LoRA between kohya and diffusers / PEFT naming (lossless, but for a float32 rounding
    where diffusers modules with different scales fuse into one kohya module: docs/cli.md), LoHa / LoKr to LoRA,
    and an LLM LoRA to a llama.cpp GGUF adapter.

    Parameters
    ----------
    adapter : str, bytes, os.PathLike or Adapter
        A kohya / LyCORIS `.safetensors` file or a diffusers LoRA file; with to='gguf', a PEFT adapter folder.
    out : str, bytes or os.PathLike
        The output `.safetensors` file (`.gguf` with to='gguf'). It may be new, empty or a file lorafuse
        wrote; another file is refused (before any work) unless `overwrite`.
    to : str, default 'peft'
        'peft': a diffusers LoRA file (what diffusers' `save_lora_weights` writes); 'kohya': a kohya file;
        'gguf': a GGUF LoRA adapter for llama.cpp (`llama-cli --lora X.gguf`), as llama.cpp's
        `convert_lora_to_gguf.py` writes it.
    rank : int, default None
        The rank of the LoRA each LoHa / LoKr module becomes (its best rank-k approximation, its factors rounded
        once to the input's factor dtype, as resize's); required when
        the adapter has such modules, refused (LorafuseValueError) when it has none. Plain LoRA modules are
        kept as they are (`resize` changes their rank).
    conv_rank : int, default None
        The same for kxk convolutions with k > 1; None: `rank`. Refused when no LoHa / LoKr module is one.
    family : str, default None
        'sd1', 'sdxl', 'flux' (Flux.1), 'flux2' (Flux.2) or 'wan' (Wan 2.1 / 2.2): the model family whose names are
        used; None guesses it from names one family alone has (LorafuseValueError where there are none): a diffusers
        Flux LoRA (`transformer.transformer_blocks...`, names SD3, QwenImage, HunyuanVideo share) needs 'flux', a
        Wan LoRA 'wan'; Flux.2 is told from Flux.1 by the layers and MLP widths one of them alone has.
    threads : int, default 0
        Worker threads; 0 uses every core.
    overwrite : bool, default False
        Replace an `out` that lorafuse did not write, or its output of another kind (never an input).
    arch : str, default None
        With to='gguf': the llama.cpp architecture ('llama', 'mistral', 'qwen2', 'qwen3', 'gemma', 'gemma2',
        'gemma3', 'phi3'); None takes it from `base_config`.
    base_config : str, bytes or os.PathLike, default None
        With to='gguf': the base model's config.json (or its folder); Llama / Mistral q_proj / k_proj LoRAs
        and embedding LoRAs need its head counts and vocabulary.
    gguf_type : str, default None
        With to='gguf': 'f32' (None: llama.cpp's converter's default), 'f16', 'bf16' or 'q8_0'.

    Returns
    -------
    ConvertReport
        `out`, `to`, `family`, `modules_in`, `modules_out`, `split` / `fused` (which modules became which)
        and `lycoris` (one row per LoHa / LoKr module turned into a LoRA).
    """
    return _convert.convert(_given(adapter), _given(out), to=to, rank=rank, conv_rank=conv_rank, family=family,
                            threads=threads, overwrite=overwrite, arch=arch, base_config=_given(base_config),
                            gguf_type=gguf_type)


@_hub_bars
def resize(
    adapter: StrPath | Adapter,
    rank: int | None = None,
    *,
    sv_ratio: float | None = None,
    sv_fro: float | None = None,
    sv_cumulative: float | None = None,
    max_rank: int | None = None,
    split: str = "B",
    threads: int = 0,
    dtype: object = None,
    out: StrPath | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    device: str = "cpu",
) -> ResizeResult:
    """Reduce an adapter's rank: per module the best rank-k approximation of its delta (kohya's resize_lora).

    Exactly one rank rule is given (`rank`, `sv_ratio`, `sv_fro` or `sv_cumulative`); each module's rank is
    then capped by `max_rank` and by its own rank, and is at least 1. Each module keeps its scale.

    Parameters
    ----------
    adapter : str, bytes, os.PathLike or Adapter
        The adapter (paths are loaded). DoRA modules are refused.
    rank : int, default None
        Rule: this rank for every module.
    sv_ratio : float, default None
        Rule: keep the singular values S_i > S_1 / sv_ratio (sv_ratio >= 1).
    sv_fro : float, default None
        Rule: the smallest k keeping this fraction (0..1] of the Frobenius norm:
        sqrt(sum_{i<=k} S_i^2) / ||S|| >= sv_fro.
    sv_cumulative : float, default None
        Rule: the smallest k with sum_{i<=k} S_i / sum S >= sv_cumulative (0..1].
    max_rank : int, default None
        Upper bound on every module's rank; None: no bound beyond the module's own rank.
    split : str, default 'B'
        Where the singular values go: 'B' (on B, like PEFT) or 'sqrt' (their square roots on both factors).
    threads : int, default 0
        Worker threads; 0 uses every core.
    dtype : str, torch or numpy dtype, default None
        'fp32', 'fp16' or 'bf16' (or an alias, torch.bfloat16, np.float16, ...): the dtype of the new factors;
        None: the input's factor dtype when all its factors share one of F32 / F16 / BF16, else F32.
    out : str, bytes or os.PathLike, default None
        Also write the result here, in the input's format, with the CLI's rules (a name ending in
        `.safetensors` is one file: a PEFT adapter is then written as a diffusers or kohya file if those can
        name its modules, else refused; a one-file format given a folder writes into it). Checked before any
        work. None: nothing is written (`result.adapter.save(path)` writes it later).
    overwrite : bool, default False
        Replace an `out` that lorafuse did not write, or its output of another kind (never an input), with an
        OverwriteWarning.
    progress : bool or None, default None
        True draws a progress bar on stderr, None draws one when stderr is a terminal, False draws none.
    device : str, default 'cpu'
        Where the math runs: 'cpu' (the compiled core) or 'cuda' (one NVIDIA GPU, with a build that has the
        CUDA backend: docs/building.md; DeviceError says why when it cannot run here).

    Returns
    -------
    ResizeResult
        An AdapterReport: `adapter`, `modules` (`name`, `rank_in`, `rank_out`, `fro_kept` per module),
        `ranks`, `out`, `notes`, `seconds`.
    """
    start = time.monotonic()
    out = None if out is None else check_path(out, "out")
    overwrite = check_bool(overwrite, "overwrite")  # a switch, whether or not there is an output to replace
    rule = RankRule(rank=rank, sv_ratio=sv_ratio, sv_fro=sv_fro, sv_cumulative=sv_cumulative, max_rank=max_rank)
    a = adapter if isinstance(adapter, Adapter) else _load(_given(adapter))
    notes: list[str] = []
    target = None
    if out is not None:
        target = checked_output(out, a.format, [a], a.sources(), overwrite=overwrite)  # before the work
        if target.note:
            notes.append(target.note)
    result, rows = _resize.resize(a, rule, split, threads, progress=progress, dtype=dtype, device=device)
    written = result.save(target.path, target.format, overwrite=overwrite) if target is not None else None
    return ResizeResult(result, rows, written, time.monotonic() - start, notes)


@_hub_bars
def extract(
    base: StrPath,
    finetuned: StrPath,
    out: StrPath | None = None,
    *,
    rank: int | None = None,
    sv_ratio: float | None = None,
    sv_fro: float | None = None,
    sv_cumulative: float | None = None,
    max_rank: int | None = None,
    include: str | None = None,
    exclude: str | None = None,
    embeddings: str = "skip",
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
    threads: int = 0,
    overwrite: bool = False,
    progress: bool | None = None,
    device: str = "cpu",
    dtype: object = None,
    clamp_quantile: float | None = None,
    min_diff: float | None = None,
    conv_rank: int | None = None,
) -> ExtractResult:
    """Extract a PEFT LoRA adapter approximating finetuned - base, per weight matrix (randomized SVD).

    Exactly one rank rule is given (`rank`, `sv_ratio`, `sv_fro` or `sv_cumulative`, by keyword); each
    module's rank is then capped by `max_rank` and by its full rank, and is at least 1.

    Parameters
    ----------
    base : str, bytes or os.PathLike
        The base checkpoint: a folder (one file or shards with an index) or one `.safetensors` file.
    finetuned : str, bytes or os.PathLike
        The fine-tuned checkpoint of the same architecture.
    out : str, bytes or os.PathLike, default None
        Also write the adapter here, with the CLI's rules: a PEFT folder, or, for a name ending in
        `.safetensors`, one diffusers or kohya file if those can name the base's modules (else refused).
        Checked before any work, and never inside the base or the fine-tuned checkpoint. None: nothing is
        written.
    rank : int, default None
        Rule: this rank for every module.
    sv_ratio : float, default None
        Rule: keep the singular values S_i > S_1 / sv_ratio (sv_ratio >= 1).
    sv_fro : float, default None
        Rule: the smallest k keeping this fraction (0..1] of ||D||_F (D = finetuned - base), the whole
        difference counted.
    sv_cumulative : float, default None
        Rule: the smallest k with sum_{i<=k} S_i / sum S >= sv_cumulative (0..1], over the computed values.
    max_rank : int, default None
        Upper bound on every module's rank; for the spectrum rules also how many singular values are
        computed (None: 128; a note names the modules whose sv_ratio / sv_fro would keep more).
    include : str, default None
        A regular expression searched in module names: only matching modules are extracted.
    exclude : str, default None
        A regular expression searched in module names: matching modules are left out.
    embeddings : str, default 'skip'
        Embeddings and lm_head: 'skip', 'lora' (extracted like other modules) or 'full' (the fine-tuned
        tensor stored whole, as PEFT's modules_to_save).
    oversample : int, default 10
        Extra sketch columns of the randomized SVD.
    power_iters : int, default 2
        Power iterations of the randomized SVD (more: more accurate on flat spectra, slower).
    seed : int, default 0
        Seed of the random sketches.
    threads : int, default 0
        Worker threads; 0 uses every core.
    overwrite : bool, default False
        Replace an `out` that lorafuse did not write, or its output of another kind (never an input).
    progress : bool or None, default None
        True draws a progress bar on stderr, None draws one when stderr is a terminal, False draws none.
    device : str, default 'cpu'
        Where the math runs: 'cpu' (the compiled core) or 'cuda' (one NVIDIA GPU, with a build that has the
        CUDA backend: docs/building.md; DeviceError says why when it cannot run here).
    dtype : str, torch or numpy dtype, default None
        The factors' dtype: 'fp32' (None: float32, as computed), 'fp16' or 'bf16' (kohya's --save_precision),
        rounded once to nearest even.
    clamp_quantile : float, default None
        kohya's --clamp_quantile (0 < Q <= 1; kohya's default 0.99): each module's factors B = U S and A = V^T
        are clamped to [-h, h], h the Q-quantile of their entries together (signed, linear interpolation as
        torch.quantile), and the reported error is the clamped factors'. None: no clamp (the optimal factors).
    min_diff : float, default None
        kohya's --min_diff (>= 0): a module whose largest |W_ft - W_base| is at most this counts as unchanged
        (no LoRA; a note counts them). kohya applies it to the text encoder as a whole; lorafuse to each
        module. None: only equal weights are unchanged.
    conv_rank : int, default None
        kohya's --conv_dim: the rank of kxk convolutions (a kernel dimension above 1), whatever the rule of the
        other modules (capped by `max_rank` and the module's full rank). None: the rule, as every module (kohya
        without --conv_dim leaves kxk convolutions out; use `exclude` for that).

    Returns
    -------
    ExtractResult
        An AdapterReport: `adapter`, `modules` (`name`, `shape`, `rank`, `rel_error`, `singular_values`: how
        many were computed), `ranks`, `skipped`, `unchanged`, `out`, `notes`, `seconds`.
    """
    start = time.monotonic()
    out = None if out is None else check_path(out, "out")  # first: a rank given by position lands here
    overwrite = check_bool(overwrite, "overwrite")  # a switch, whether or not there is an output to replace
    base, finetuned = check_spec(base, "base model"), check_spec(finetuned, "fine-tuned model")  # bytes as text
    rule = RankRule(rank=rank, sv_ratio=sv_ratio, sv_fro=sv_fro, sv_cumulative=sv_cumulative, max_rank=max_rank)
    inputs = [Path(base), Path(finetuned)]
    notes: list[str] = []
    target = None
    if out is not None:
        # what the name means: a .safetensors name is one file, if a one-file format can name the base's modules
        target = extract_output(out, base, finetuned, include, exclude, overwrite=overwrite)
        if target.note:
            notes.append(target.note)
    res = _extract.extract(base, finetuned, rule, include=include, exclude=exclude, embeddings=embeddings,
                           oversample=oversample, power_iters=power_iters, seed=seed, threads=threads,
                           progress=progress, device=device, dtype=dtype, clamp_quantile=clamp_quantile,
                           min_diff=min_diff, conv_rank=conv_rank)
    if target is not None and target.format == "kohya":  # a kohya file from single-file SD checkpoints
        res = _extract.kohya_named(res, base, finetuned)
    written = save_as(res.adapter, target.format, target.path, inputs, overwrite=overwrite) if target else None
    return ExtractResult(res.adapter, res.modules, res.skipped, res.unchanged, out=written,
                         seconds=time.monotonic() - start,
                         notes=[f"not extracted: {s}" for s in res.skipped] + res.notes + notes)


