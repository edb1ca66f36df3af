"""extract: a LoRA adapter from a fine-tuned model and its base (mergekit-extract-lora,
kohya's extract_lora_from_models.py).

D = W_ft - W_base is dense and usually full rank, so each module gets a randomized SVD
(Halko, Martinsson, Tropp) computed by the C++ core straight from the two memory-mapped
checkpoints, row block by row block: D is never formed, and the mapped pages of each
batch are dropped once it is done. The error of each module is exact:
||D - B A||_F^2 = ||D||_F^2 - sum(S_k^2).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorafuse._progress import Progress
from lorafuse._validate import (
    check_optional_bool,
    check_oversample,
    check_power_iters,
    check_seed,
    check_threads,
    full_rank,
)
from lorafuse.backends import Backend, DenseJob, ExtractJob, backend_for_device
from lorafuse.errors import LorafuseValueError, NonFiniteError, UnsupportedError
from lorafuse.io.checkpoint import Checkpoint, read_config
from lorafuse.io.dtypes import DTYPES, dtype_spelling
from lorafuse.io.hub import spec_origin
from lorafuse.io.provenance import InputSpec, Recording, folder_input, recorded_name
from lorafuse.io.quant import detect_checkpoint
from lorafuse.io.safetensors import SafetensorsFile, raise_if_inputs_changed
from lorafuse.io.tensor import Tensor
from lorafuse.model import Adapter, LoraUpdate, Update
from lorafuse.model.layout import check_dtype, rounded
from lorafuse.ops.rank import RankRule
from lorafuse.ops.resolve import CONV1D_LAYERS, ModelInfo

BATCH_BYTES = 256 << 20  # input bytes (both checkpoints) mapped per call into the core
DEFAULT_MAX_RANK = 128  # sketch size for spectrum-based rules when --max-rank is not given
# Layers PEFT wraps as embeddings (torch Embedding: token and position tables), by their last name, and the output
# heads that --embeddings also governs (lm_head, embed_out: torch Linear). A checkpoint names its tensors only.
EMBEDDING_NAMES = ("embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings",
                   "embed_positions", "tok_embeddings", "token_embedding", "position_embedding", "embed_in", "shared",
                   "lm_head", "embed_out")


@dataclass
class ExtractReport:
    name: str
    shape: tuple[int, ...]
    rank: int
    rel_error: float  # ||D - B A||_F / ||D||_F
    singular_values: int  # how many singular values were computed to decide the rank


@dataclass
class ExtractResult:
    adapter: Adapter
    modules: list[ExtractReport]
    skipped: list[str] = field(default_factory=list)  # changed tensors not extracted, with the reason
    unchanged: int = 0
    notes: list[str] = field(default_factory=list)  # what else the user should know (mixed dtypes)


def _is_embedding(module: str) -> bool:
    return module.rsplit(".", 1)[-1] in EMBEDDING_NAMES


def extract(
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    rule: RankRule,
    *,
    include: str | None = None,
    exclude: str | None = None,
    embeddings: str = "skip",
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
    threads: int = 0,
    progress: bool | None = None,
    device: str = "cpu",
    dtype: object = None,
) -> ExtractResult:
    """Extract a PEFT LoRA adapter approximating finetuned - base per weight matrix.

    `rule` chooses each module's rank (ops.rank.RankRule; a spectrum rule sees the leading
    `rule.max_rank` singular values, DEFAULT_MAX_RANK without one). `include` / `exclude` are
    regular expressions searched in module names. `embeddings`: 'skip' (default), 'lora'
    (extract them like other modules) or 'full' (store the fine-tuned tensor whole, as PEFT's
    modules_to_save). `oversample` (extra sketch columns), `power_iters` and `seed` set the
    randomized SVD; `threads` 0 uses every core; `progress` True / None / False: a bar always /
    on a terminal / never. `lorafuse.extract` takes the rule as keyword arguments (rank=,
    sv_ratio=, ...), can write the result, and documents each parameter. `device` 'cuda' forms each
    difference and takes the SVD's products on the GPU (DeviceError when this build or machine cannot).
    `dtype` ('fp32' by default, 'fp16', 'bf16'): the factors' dtype, rounded once from float32.
    An extraction with nothing in it is refused (UnsupportedError): `include` / `exclude` that leave no
    weight matrix (before any is read), or no module that differs from the base.
    """
    progress = check_optional_bool(progress, "progress")
    x = prepare_extract(base, finetuned, rule, include=include, exclude=exclude, embeddings=embeddings,
                        oversample=oversample, power_iters=power_iters, seed=seed, threads=threads, device=device,
                        dtype=dtype)
    cb, cf, work, conv1d, k_max, backend = x.base, x.finetuned, x.work, x.conv1d, x.k_max, x.backend
    oversample, power_iters, seed, threads, base_config = x.oversample, x.power_iters, x.seed, x.threads, x.config
    result = ExtractResult(Adapter(updates={}), [], list(x.skipped), notes=list(x.notes))
    full: dict[str, Tensor] = {}
    total = sum(cb.info(k).nbytes + cf.info(k).nbytes for _, k in work)
    bar = Progress(total, "extract", progress)
    files: dict[tuple[int, str], SafetensorsFile] = {}
    rec = Recording("extract", [_checkpoint_input(base, cb, "base"), _checkpoint_input(finetuned, cf, "fine-tuned")],
                    {**dataclasses.asdict(rule), "include": include, "exclude": exclude, "embeddings": embeddings,
                     "oversample": oversample, "power_iters": power_iters, "seed": seed, "device": device,
                     **({"dtype": dtype_spelling(dtype)} if dtype is not None else {})},
                    base_model=recorded_name(os.fspath(base)))  # io.provenance: both hashed while they are read

    def mapped(which: int, shard: str) -> SafetensorsFile:  # each shard of each checkpoint opened once
        if (which, shard) not in files:
            files[(which, shard)] = (cb if which == 0 else cf).open(shard)
        return files[(which, shard)]

    try:
        for name, key in x.full:
            if not _changed_others(cb, cf, [key], mapped):  # an embedding fine-tuning left as it was: nothing to keep
                result.unchanged += 1
                continue
            f = mapped(1, cf.shard_of[key])
            full[name] = Tensor(f.raw(key).copy(), cf.info(key).dtype)
            f.check_unchanged()  # the copy outlives the mapping: check it was read whole
        start = 0
        while start < len(work):
            batch: list[tuple[str, str]] = []
            size = 0
            while start < len(work) and (not batch or size < BATCH_BYTES):
                module, key = work[start]
                batch.append((module, key))
                size += cb.info(key).nbytes + cf.info(key).nbytes
                start += 1
            items = []
            for module, key in batch:
                fb, ff = mapped(0, cb.shard_of[key]), mapped(1, cf.shard_of[key])
                shape = cb.info(key).shape
                items.append(ExtractJob(module, fb.raw(key).reshape(shape[0], -1), cb.info(key).dtype,
                              ff.raw(key).reshape(shape[0], -1), cf.info(key).dtype))
            # each module's rank at most its full rank min(out, in): no factors padded to an absurd rank
            outs = _svds(backend, items, [full_rank(k_max, it.w_base.shape) for it in items], oversample,
                         power_iters, seed, threads)
            for (module, key), (b, a, s, frob_sq) in zip(batch, outs):
                fb, ff = mapped(0, cb.shard_of[key]), mapped(1, cf.shard_of[key])
                fb.release(key)
                ff.release(key)
                bar.update(cb.info(key).nbytes + cf.info(key).nbytes, module)
                if frob_sq == 0:
                    result.unchanged += 1
                    continue
                k = min(rule.choose(s, frob_sq), b.shape[1])  # b: k_max columns, or the full rank
                shape = cb.info(key).shape
                err = _rel_error(s, k, frob_sq, shape)
                result.adapter.updates[module] = _update(module, shape, b[:, :k], a[:k], module in conv1d)
                result.modules.append(ExtractReport(module, shape, k, err, len(s)))
        changed = _changed_others(cb, cf, x.others, mapped)
        raise_if_inputs_changed(cb.files() + cf.files())  # a checkpoint truncated or rewritten while read
    except BaseException:
        rec.close()  # the hashing stops
        raise
    finally:
        for opened in files.values():
            opened.close()
        bar.close()
    result.skipped += [f"{key}: changed, but not a weight matrix (a bias or a norm): a LoRA cannot hold it"
                       for key in changed]
    if not result.adapter.updates and not full:
        rec.close()
        raise _nothing_differs(finetuned, result.unchanged, changed)
    updates = result.adapter.updates
    if x.dtype is not None:  # rounded once from the float32 factors (B and A balanced where that keeps the delta)
        updates = {n: rounded(u, x.dtype, threads) if isinstance(u, LoraUpdate) else u for n, u in updates.items()}
    result.adapter = extracted(base, base_config, updates, full, (cb, cf))
    result.adapter.provenance = rec.result()
    return result


def _svds(backend: Backend, items: list[ExtractJob], ranks: list[int], oversample: int, power_iters: int, seed: int,
          threads: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, float]]:
    """Each module's (B, A, S, ||D||^2): the exact SVD of the formed difference where it is cheap (the rank a
    large share of min(out, in), the rule dense_svd_is_exact that combine follows: a randomized sketch of k + 10
    columns falls short there, 1.01x the optimum and more on flat spectra), else the streamed randomized SVD."""
    exact = [backend.dense_svd_is_exact(it.w_base.shape[0], it.w_base.shape[1], k, oversample)
             for it, k in zip(items, ranks)]
    streamed = [(it, k) for it, k, e in zip(items, ranks, exact) if not e]
    found = iter(backend.extract_svd([it for it, _ in streamed], [k for _, k in streamed], oversample, power_iters,
                                     seed, threads) if streamed else [])
    outs: list[tuple[np.ndarray, np.ndarray, np.ndarray, float]] = []
    for it, k, e in zip(items, ranks, exact):
        if not e:
            b, a, s, frob_sq = next(found)
            outs.append((b, a, s, float(frob_sq)))
            continue
        base = backend.to_float32(it.w_base, it.base_dtype, threads)
        ft = backend.to_float32(it.w_ft, it.ft_dtype, threads)
        bad_base, bad_ft = not np.isfinite(base).all(), not np.isfinite(ft).all()
        if bad_base or bad_ft:  # the streamed kernel's words
            which = ("the base and the fine-tuned weight hold" if bad_base and bad_ft else
                     "the base weight holds" if bad_base else "the fine-tuned weight holds")
            raise NonFiniteError(f"{it.name}: {which} NaN or Inf")
        with np.errstate(over="ignore", invalid="ignore"):
            d = ft - base
        if not np.isfinite(d).all():
            raise NonFiniteError(f"{it.name}: W_ft - W_base overflows float32")
        frob_sq = float(np.sum(np.square(d, dtype=np.float64)))
        if frob_sq == 0:
            outs.append((np.zeros((d.shape[0], k), np.float32), np.zeros((k, d.shape[1]), np.float32),
                         np.zeros(k), 0.0))
            continue
        res = backend.dense_svd([DenseJob(it.name, d)], [k], "B", seed, threads=threads)[0]
        outs.append((res.b, res.a, res.s, frob_sq))
    return outs


def _changed_others(cb: Checkpoint, cf: Checkpoint, keys: list[str],
                    mapped: Callable[[int, str], SafetensorsFile]) -> list[str]:
    """The tensors among `keys` (in both checkpoints: biases, norms, embeddings) whose bytes differ; `mapped(0 or 1,
    shard)`: the base's or the fine-tuned model's shard, opened once for the whole extract."""
    changed = []
    for key in keys:
        ib, iff = cb.info(key), cf.info(key)
        if ib.dtype != iff.dtype:
            changed.append(key)
            continue
        fb, ff = mapped(0, cb.shard_of[key]), mapped(1, cf.shard_of[key])
        same = np.array_equal(fb.raw(key).view(np.uint8), ff.raw(key).view(np.uint8))
        fb.release(key)
        ff.release(key)
        if not same:
            changed.append(key)
    return changed


def _nothing_differs(finetuned: str | os.PathLike[str], unchanged: int, changed: list[str]) -> UnsupportedError:
    """The refusal of an extract in which no module differs from the base: its adapter would target no module,
    which PEFT refuses to load (NoMatchingPeftModuleError)."""
    if changed:
        shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
        return UnsupportedError(
            f"{finetuned}: no weight matrix of the fine-tuned model differs from the base ({unchanged} compared, all "
            f"equal); only tensors a LoRA cannot hold changed ({shown}: biases or norms, as a BitFit fine-tune "
            "changes them): the adapter would target no module; nothing is written")
    return UnsupportedError(
        f"{finetuned}: no module of the fine-tuned model differs from the base ({unchanged} weight matrices "
        "compared, all equal): the adapter would target no module, which PEFT refuses to load; nothing is "
        "written (is it the same checkpoint as the base?)")


def _checkpoint_input(name: str | os.PathLike[str], ckpt: Checkpoint, role: str) -> InputSpec:
    """A checkpoint as a provenance input: as given, and what extract reads of it (weights, index, config.json)."""
    path = Path(name) if Path(name).is_file() else ckpt.directory
    config = ckpt.directory / "config.json"
    return folder_input(name, path, role, ckpt.files() + ([config] if config.is_file() else []))


def extracted(base: str | os.PathLike[str], base_config: dict[str, object], updates: dict[str, Update],
              full: dict[str, Tensor], checkpoints: Sequence[Checkpoint] = ()) -> Adapter:
    """The extracted PEFT adapter: its updates, the embeddings kept whole (modules_to_save) and its config;
    derived from the checkpoints' folders (its sources: saving it never replaces them)."""
    adapter = Adapter(updates=updates, full=full, derived_from=list(dict.fromkeys(c.directory for c in checkpoints)))
    kept = sorted({m.removesuffix(".weight").rsplit(".", 1)[-1] for m in full})  # PEFT names the layer: lm_head
    adapter.config = _config(Path(base), base_config, adapter, kept)
    return adapter


@dataclass
class ExtractSetup:
    """What extract knows before it reads a weight (prepare_extract): both checkpoints (headers), the base's
    config, the modules to extract as (module, key), the GPT-2 Conv1D ones among them, the embeddings kept
    whole as (tensor name, key), the tensors left out with the reason, the sketch size k_max, and the checked
    options and backend."""

    base: Checkpoint
    finetuned: Checkpoint
    config: dict[str, object]
    work: list[tuple[str, str]]
    conv1d: set[str]
    full: list[tuple[str, str]]
    skipped: list[str]
    others: list[str]  # tensors in both that are no weight matrix (biases, norms): compared, never extracted
    notes: list[str]  # what else the user should know (weight matrices stored in two dtypes)
    dtype: str | None  # the factors' dtype ('F16', 'BF16'; None: float32 as computed)
    k_max: int
    oversample: int
    power_iters: int
    seed: int
    threads: int
    backend: Backend


def prepare_extract(
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    rule: RankRule,
    *,
    include: str | None = None,
    exclude: str | None = None,
    embeddings: str = "skip",
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
    threads: int = 0,
    device: str = "cpu",
    dtype: object = None,
) -> ExtractSetup:
    """Everything extract checks and decides before it reads a weight (its arguments' meaning: extract):
    the options, both checkpoints' headers and configs (quantized ones refused), which tensors are
    extracted, kept whole or left out (and why). Reads no tensor data."""
    if embeddings not in ("skip", "lora", "full"):
        raise LorafuseValueError(f"embeddings must be skip, lora or full, got {embeddings!r}")
    oversample, power_iters = check_oversample(oversample), check_power_iters(power_iters)
    seed, threads = check_seed(seed), check_threads(threads)
    out_dtype = check_dtype(dtype)
    backend = backend_for_device(device)
    if not isinstance(rule, RankRule):
        raise LorafuseValueError(f"rule must be a RankRule (rank=, sv_ratio=, sv_fro= or sv_cumulative=), got "
                                 f"{type(rule).__name__}")
    for name, value in (("include", include), ("exclude", exclude)):
        if value is not None and not isinstance(value, str):
            raise LorafuseValueError(f"{name} must be a regular expression (a str) searched in each weight's name, "
                                     f"got {type(value).__name__} {value!r}"[:200]
                                     + (f"; for several names join them: {'|'.join(map(str, value))!r}"
                                        if isinstance(value, list | tuple) else ""))
    try:
        inc = re.compile(include) if include else None
        exc = re.compile(exclude) if exclude else None
    except re.error as e:
        raise LorafuseValueError(f"bad --include/--exclude regular expression: {e}") from None
    cb, cf = Checkpoint(base), Checkpoint(finetuned)
    base_config = read_config(cb.directory)  # before the long work
    for ck, config, what in ((cb, base_config, "base"), (cf, read_config(cf.directory), "fine-tuned model")):
        q = detect_checkpoint(ck, config)
        if q is not None:  # codes are not weights: their difference means nothing
            raise UnsupportedError(
                f"{ck.location}: the {what} is quantized "
                f"with {q.describe()}; extract reads 16- and 32-bit checkpoints only: extract from the unquantized "
                "checkpoints (the 16-bit base and fine-tune), or for a float8 checkpoint write it in bf16 first "
                "(`lorafuse apply` with --dtype bf16)")
    model = ModelInfo.from_config(base_config)
    k_max = rule.rank if rule.rank is not None else (rule.max_rank or DEFAULT_MAX_RANK)

    skipped: list[str] = []
    others: list[str] = []
    dtypes: set[tuple[str, str]] = set()  # (base, fine-tuned) dtypes of weight matrices stored differently
    work: list[tuple[str, str]] = []  # (module, key)
    conv1d: set[str] = set()  # GPT-2 style Conv1D weights, stored (in x out)
    full: list[tuple[str, str]] = []
    for key in cb.keys():
        if key not in cf:
            skipped.append(f"{key}: only in the base")
            continue
        ib, iff = cb.info(key), cf.info(key)
        if ib.shape != iff.shape:
            skipped.append(f"{key}: shape {ib.shape} in the base, {iff.shape} in the fine-tuned model")
            continue
        module = key.removesuffix(".weight")
        is_matrix = key.endswith(".weight") and len(ib.shape) in (2, 3, 4) and DTYPES[ib.dtype].is_float
        if (inc and not inc.search(module)) or (exc and exc.search(module)):
            continue
        if not is_matrix:
            others.append(key)
            continue
        if ib.dtype != iff.dtype:
            dtypes.add((ib.dtype, iff.dtype))
        if _is_embedding(module) and embeddings == "skip":
            skipped.append(f"{key}: embedding (use --embeddings lora or full; Python: embeddings='lora' or 'full')")
            continue
        if _is_embedding(module) and embeddings == "full":
            full.append((module + ".weight", key))
            continue
        if len(ib.shape) == 2 and not _is_embedding(module) and _layer_type(model, module, key, Path(base)) == "conv1d":
            conv1d.add(module)
        work.append((module, key))
    for key in cf.keys():
        if key not in cb:
            skipped.append(f"{key}: only in the fine-tuned model")
    if not work and not full:
        raise _nothing_to_extract(cb, include, exclude, embeddings, skipped)
    notes = [f"weight matrices stored {b} in the base and {f} in the fine-tuned model: each difference holds the "
             f"rounding of the base to {f} too (compare checkpoints of one dtype for a clean extraction)"
             for b, f in sorted(dtypes)]
    return ExtractSetup(cb, cf, base_config, work, conv1d, full, skipped, others, notes, out_dtype, k_max, oversample,
                        power_iters, seed, threads, backend)


def _nothing_to_extract(cb: Checkpoint, include: str | None, exclude: str | None, embeddings: str,
                        skipped: list[str]) -> UnsupportedError:
    """The refusal of an extract that has no weight matrix to extract (before any is read): the include /
    exclude patterns leave none, or the checkpoint holds none (embeddings alone, skipped or kept whole)."""
    matrices = [k.removesuffix(".weight") for k in cb.keys()
                if k.endswith(".weight") and len(cb.info(k).shape) in (2, 3, 4) and not _is_embedding(k[:-7])]
    shown = ", ".join(repr(m) for m in matrices[:3]) + (", ..." if len(matrices) > 3 else "")
    if include or exclude:
        given = " and ".join(f"{n}={v!r}" for n, v in (("include", include), ("exclude", exclude)) if v)
        why = (f"no module matched {given} (regular expressions searched in module names such as {shown})"
               if matrices else f"{cb.location} has no weight matrix")
    elif embeddings == "skip":
        why = f"{cb.location} has no weight matrix to extract but embeddings, and embeddings='skip'"
    else:
        why = f"{cb.location} has no weight matrix to extract"
    notes = f" ({'; '.join(skipped[:3])})" if skipped else ""
    return UnsupportedError(f"{why}{notes}: the adapter would target no module, which PEFT refuses to load; "
                            "nothing is extracted")


def _layer_type(model: ModelInfo, module: str, key: str, base: Path) -> str:
    """'conv1d' for a transformers Conv1D weight (GPT-2: stored in x out), else 'linear'. PEFT stores
    a Conv1D's LoRA in the layer's own (out x in) terms with fan_in_fan_out, so extract must know."""
    kind = model.layer_type(module)
    if kind is None and module.rsplit(".", 1)[-1] in CONV1D_LAYERS:
        raise UnsupportedError(f"{base}: cannot tell whether {key} is a torch Linear (out x in) or a transformers "
                               "Conv1D (in x out, GPT-2) without the base's config.json (model_type); add it "
                               "beside the checkpoint, or leave the module out with --exclude")
    return kind or "linear"


def _rel_error(s: np.ndarray, k: int, frob_sq: float, shape: tuple[int, ...]) -> float:
    """||D - B A||_F / ||D||_F from the singular values: sqrt(||D||^2 - sum of the kept S^2) / ||D||, in float64.
    At the full rank the truncation drops nothing: 0 (the subtraction would leave float32's rounding of the
    singular values, ~1e-4 of ||D||, for an error that is ~1e-7)."""
    full = min(int(shape[0]), int(np.prod(shape[1:], dtype=np.int64))) if len(shape) > 1 else 1
    if k >= full:
        return 0.0
    kept = float(np.sum(np.square(s[:k], dtype=np.float64)))
    return float(np.sqrt(max(frob_sq - kept, 0.0) / frob_sq))


def _update(module: str, shape: tuple[int, ...], b: np.ndarray, a: np.ndarray, conv1d: bool = False) -> LoraUpdate:
    k = a.shape[0]
    if conv1d:
        # D (in x out) = b a; PEFT's Conv1D LoRA has delta^T = B A with B (out x k), A (k x in): B = a^T, A = b^T
        return LoraUpdate(module, Tensor.from_array(np.ascontiguousarray(b.T)),
                          Tensor.from_array(np.ascontiguousarray(a.T)), 1.0, "linear", True)
    if _is_embedding(module) and not module.endswith(("lm_head", "embed_out")):
        # PEFT's embedding LoRA stores (B A)^T: lora_embedding_A = B^T, lora_embedding_B = A^T
        return LoraUpdate(module, Tensor.from_array(np.ascontiguousarray(b.T)),
                          Tensor.from_array(np.ascontiguousarray(a.T)), 1.0, "embedding", True)
    a_t = Tensor.from_array(np.ascontiguousarray(a).reshape((k, *shape[1:])))
    b_t = Tensor.from_array(np.ascontiguousarray(b).reshape((shape[0], k, *([1] * (len(shape) - 2)))))
    return LoraUpdate(module, a_t, b_t, 1.0, "conv" if len(shape) > 2 else "linear", False)


def _config(base: Path, base_config: dict[str, object], adapter: Adapter,
            modules_to_save: list[str]) -> dict[str, object]:
    task_type = None
    archs = base_config.get("architectures")
    if isinstance(archs, list) and any(str(a).endswith("ForCausalLM") for a in archs):
        task_type = "CAUSAL_LM"
    origin = spec_origin(base)  # a Hub id: PEFT's name for the base is the repo id, its revision the commit
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": recorded_name(str(base)) if origin is None else origin.repo_id,
        **({"revision": origin.commit_sha} if origin is not None else {}),
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in adapter.updates}),
        "modules_to_save": modules_to_save or None,
        "lora_dropout": 0.0,
        "bias": "none",
    }
