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
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorafuse._progress import Progress
from lorafuse._terminal import plural
from lorafuse._validate import (
    check_float,
    check_optional_bool,
    check_optional_rank,
    check_oversample,
    check_power_iters,
    check_seed,
    check_text,
    check_threads,
    full_rank,
)
from lorafuse.backends import Backend, DenseJob, ExtractJob, backend_for_device
from lorafuse.backends.reference_math import to_float32
from lorafuse.errors import FormatError, LorafuseValueError, NonFiniteError, UnsupportedError
from lorafuse.formats.held import extract_models
from lorafuse.formats.sd_keys import checkpoint_kohya_names, unet_folder_family
from lorafuse.io.checkpoint import Checkpoint, read_config
from lorafuse.io.dtypes import DTYPES, dtype_spelling
from lorafuse.io.hub import spec_origin
from lorafuse.io.provenance import InputSpec, Recording, folder_input, recorded_base
from lorafuse.io.quant import detect_checkpoint
from lorafuse.io.safetensors import SafetensorsFile, TensorInfo, raise_if_inputs_changed
from lorafuse.io.tensor import Tensor
from lorafuse.model import Adapter, KohyaState, LoraUpdate, Update
from lorafuse.model.experts import one_expert_rank
from lorafuse.model.layout import check_dtype, rounded
from lorafuse.model.names import check_module_name
from lorafuse.model.patterns import NameFilter
from lorafuse.ops.base_layers import POSITION_TABLES, BaseLayers, base_layers, peft_targets
from lorafuse.ops.fused import PER_EXPERT_ON_DISK, _model_types
from lorafuse.ops.rank import RankRule
from lorafuse.ops.resolve import CONV1D_LAYERS, ModelInfo

BATCH_BYTES = 256 << 20  # input bytes (both checkpoints) mapped per call into the core
DEFAULT_MAX_RANK = 128  # sketch size for spectrum-based rules when --max-rank is not given
MATRIX_NDIMS = (2, 3, 4, 5)  # a Linear (or Embedding) weight, a Conv1d, Conv2d or Conv3d kernel
# A relative error below this, estimated from the float32 singular values (whose rounding leaves ~3e-4 in
# sqrt(||D||^2 - sum S^2)), is computed again from D itself (_residual): a near-exact module (common where the
# fine-tuned model is a merged LoRA: one more pass over the two weights, a float32 product).
DIRECT_ERROR_BELOW = 1e-2


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
    clamp_quantile: float | None = None,
    min_diff: float | None = None,
    conv_rank: int | None = None,
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
    `clamp_quantile` Q in (0, 1] (kohya's --clamp_quantile; None: no clamp): each module's factors, B = U S and
    A = V^T, clamped to [-h, h], h the Q-quantile (linear interpolation, as torch.quantile) of their entries
    together. `min_diff` F >= 0 (kohya's --min_diff; None: only equal weights are unchanged): a module whose
    largest |W_ft - W_base| (float32) is at most F counts as unchanged (no LoRA). `conv_rank` (kohya's --conv_dim):
    the rank of kxk convolutions (a kernel dimension > 1), whatever `rule` (capped by its max_rank); None: `rule`.
    An extraction with nothing in it is refused (UnsupportedError): `include` / `exclude` that leave no
    weight matrix (before any is read), or no module that differs from the base.
    """
    progress = check_optional_bool(progress, "progress")
    x = prepare_extract(base, finetuned, rule, include=include, exclude=exclude, embeddings=embeddings,
                        oversample=oversample, power_iters=power_iters, seed=seed, threads=threads, device=device,
                        dtype=dtype, clamp_quantile=clamp_quantile, min_diff=min_diff, conv_rank=conv_rank)
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
                     **({"dtype": dtype_spelling(dtype)} if dtype is not None else {}),
                     **({"clamp_quantile": x.clamp_quantile} if x.clamp_quantile is not None else {}),
                     **({"min_diff": x.min_diff} if x.min_diff is not None else {}),
                     **({"conv_rank": x.conv_rank} if x.conv_rank is not None else {})},
                    base_model=recorded_base(base))  # io.provenance: both hashed while they are read

    def mapped(which: int, shard: str) -> SafetensorsFile:  # each shard of each checkpoint opened once
        if (which, shard) not in files:
            files[(which, shard)] = (cb if which == 0 else cf).open(shard)
        return files[(which, shard)]

    try:
        rounded_only = 0  # modules whose fine-tuned weight is the base's rounded to the fine-tuned dtype
        below_min_diff = 0  # modules whose largest |W_ft - W_base| is at most min_diff (kohya's --min_diff)
        short: list[str] = []  # modules whose spectrum rule wanted more than the default sketch's values
        for name, key in x.full:
            if not _changed_others(cb, cf, [key], mapped):  # an embedding fine-tuning left as it was: nothing to keep
                result.unchanged += 1
                continue
            fb, f = mapped(0, cb.shard_of[key]), mapped(1, cf.shard_of[key])
            if x.min_diff is not None and _max_abs_diff(backend, fb.raw(key), cb.info(key).dtype, f.raw(key),
                                                        cf.info(key).dtype, x.min_diff, threads) <= x.min_diff:
                fb.release(key)
                f.release(key)
                result.unchanged += 1  # within min_diff: as for a LoRA module, no change
                below_min_diff += 1
                continue
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
            for module, key in list(batch):
                fb, ff = mapped(0, cb.shard_of[key]), mapped(1, cf.shard_of[key])
                # the fine-tuned weight is the base's rounded to its dtype (no fine-tuning changed it), or within
                # min_diff of the base everywhere
                same = _only_rounded(backend, fb.raw(key), cb.info(key).dtype, ff.raw(key), cf.info(key).dtype,
                                     threads)
                small = not same and x.min_diff is not None and _max_abs_diff(
                    backend, fb.raw(key), cb.info(key).dtype, ff.raw(key), cf.info(key).dtype, x.min_diff,
                    threads) <= x.min_diff
                if same or small:
                    fb.release(key)
                    ff.release(key)
                    bar.update(cb.info(key).nbytes + cf.info(key).nbytes, module)
                    batch.remove((module, key))
                    result.unchanged += 1
                    rounded_only += same
                    below_min_diff += small
                    continue
                shape = cb.info(key).shape
                items.append(ExtractJob(module, fb.raw(key).reshape(shape[0], -1), cb.info(key).dtype,
                              ff.raw(key).reshape(shape[0], -1), cf.info(key).dtype))
            # each module's rank at most its full rank min(out, in): no factors padded to an absurd rank
            try:
                ranks = [full_rank(module_rank(k_max, x.conv_rank, cb.info(k).shape), it.w_base.shape)
                         for (_, k), it in zip(batch, items)]
                outs = _svds(backend, items, ranks, oversample, power_iters, seed, threads)
            except NonFiniteError as e:  # the core names the module: say which checkpoints, and its shape
                raise _nonfinite(e, base, finetuned, {m: cb.info(k).shape for m, k in batch}) from None
            for (module, key), it, (b, a, s, frob_sq) in zip(batch, items, outs):
                fb, ff = mapped(0, cb.shard_of[key]), mapped(1, cf.shard_of[key])
                shape = cb.info(key).shape
                chosen = rule if x.conv_rank is None or not kxk(shape) else RankRule(rank=x.conv_rank,
                                                                                       max_rank=rule.max_rank)
                k = min(chosen.choose(s, frob_sq), b.shape[1]) if frob_sq else 0  # b: k_max columns, or the full rank
                if (chosen is rule and rule.max_rank is None and k == DEFAULT_MAX_RANK < min(b.shape[0], a.shape[1])
                        and rule.wants_more(s, frob_sq)):
                    short.append(module)
                err = _rel_error(s, k, frob_sq, shape) if frob_sq else 0.0
                bk, ak = b[:, :k], a[:k]
                if x.clamp_quantile is not None and k:  # kohya's clamp: the error is the clamped factors' own
                    bk, ak = _clamped(bk, ak, x.clamp_quantile, f"{finetuned}: module {module} (weight of shape "
                                      f"{tuple(shape)}, rank {k})")
                    err = _residual(backend, it, bk, ak, frob_sq, threads)
                elif err < DIRECT_ERROR_BELOW and 0 < k < min(b.shape[0], a.shape[1]):
                    err = _residual(backend, it, bk, ak, frob_sq, threads)
                fb.release(key)
                ff.release(key)
                bar.update(cb.info(key).nbytes + cf.info(key).nbytes, module)
                if frob_sq == 0:
                    result.unchanged += 1
                    continue
                result.adapter.updates[module] = _update(module, shape, bk, ak, module in conv1d,
                                                         module in x.embedding)
                result.modules.append(ExtractReport(module, shape, k, err, len(s)))
        changed = _changed_others(cb, cf, x.others, mapped)
        raise_if_inputs_changed(cb.files() + cf.files())  # a checkpoint truncated or rewritten while read
        if rounded_only:
            counted = plural(rounded_only, "fine-tuned weight matrix", "fine-tuned weight matrices", ("is", "are"))
            result.notes.append(f"{counted} the base's rounded to the fine-tuned model's dtype, no more: counted "
                                "unchanged (no LoRA of rounding noise)")
        if below_min_diff:
            counted = plural(below_min_diff, "fine-tuned weight matrix differs", "fine-tuned weight matrices differ")
            result.notes.append(f"{counted} from the base by at most min_diff={x.min_diff:g} (largest |W_ft - W_base|; "
                                "--min-diff): counted unchanged, no LoRA")
        if short:
            result.notes.append(_short_note(rule, short))
    except BaseException:
        rec.close()  # the hashing stops
        raise
    finally:
        for opened in files.values():
            opened.close()
        bar.close()
    result.skipped += [f"{key}: changed, but {_not_a_matrix(cb.info(key), cf.info(key))}: a LoRA cannot hold it"
                       for key in changed]
    if not result.adapter.updates:
        rec.close()
        if full:
            raise _only_kept_whole(finetuned, list(full))
        raise _nothing_differs(finetuned, result.unchanged, changed, x.skipped_embeddings,
                               all(_not_a_matrix(cb.info(k), cf.info(k)) == BIAS_OR_NORM for k in changed),
                               rounded_only, below_min_diff, x.min_diff)
    updates = _with_tied_heads(result, x.tied, x.layers)
    updates, rank, zeros = one_expert_rank(updates, x.expert_parts, x.expert_shapes)
    if rank:
        result.notes.append(_expert_note(rank, zeros, x.config))
        for m in result.modules:
            if m.name in updates and updates[m.name].rank != m.rank:
                m.rank = updates[m.name].rank  # the rank written (zero-padded; the error is the same)
    updates = _one_linear_layout(updates)
    if x.dtype is not None:  # rounded once from the float32 factors (B and A balanced where that keeps the delta)
        try:
            updates = {n: rounded(u, x.dtype, threads, refuse_underflow=True) if isinstance(u, LoraUpdate) else u
                       for n, u in updates.items()}
        except (NonFiniteError, UnsupportedError) as e:  # a factor the dtype cannot hold: nothing is written
            rec.close()  # the hashing stops
            raise type(e)(f"{finetuned}: {e}") from None
    result.adapter = extracted(base, base_config, updates, full, (cb, cf), x.layers.modules)
    result.adapter.provenance = rec.result()
    return result


def kohya_named(res: ExtractResult, base: str | os.PathLike[str], finetuned: str | os.PathLike[str]) -> ExtractResult:
    """`res` (an extract from two single-file SD checkpoints) with its modules under kohya's names
    (sd_keys.checkpoint_kohya_names: what sd-scripts' extract_lora_from_models.py writes), for a kohya file. A
    module kohya's format has no name for (the VAE, an embedding, ...) and a tensor kept whole are left out with a
    note, as kohya's extract writes the UNet's and text encoders' layers alone; an extract left with none is
    refused, before anything is written."""
    adapter, names, left = kohya_adapter(res.adapter, base, finetuned)
    modules = [dataclasses.replace(r, name=names[r.name]) for r in res.modules if r.name in names]
    return dataclasses.replace(res, adapter=adapter, modules=modules, skipped=res.skipped + left)


def kohya_adapter(adapter: Adapter, base: str | os.PathLike[str], finetuned: str | os.PathLike[str]
                  ) -> tuple[Adapter, dict[str, str], list[str]]:
    """kohya_named's work on the adapter alone (a dry run's placeholders too): the adapter under kohya's names,
    each kept module's old name -> its kohya name, and the notes of those left out."""
    base_path = extract_models(base, finetuned)[0]
    ckpt = Checkpoint(base_path)
    keys = ckpt.keys()
    config = read_config(Path(base_path)) if Path(base_path).is_dir() else {}
    family = unet_folder_family(config)  # a diffusers UNet folder's, else None: a single file's keys say it
    names = checkpoint_kohya_names({k: tuple(ckpt.info(k).shape) for k in keys},
                                   None if family is None else family == "sdxl")
    kept = {m: u for m, u in adapter.updates.items() if m in names and u.kind != "embedding"}
    why = "kohya's format has no name for it (kohya's extract writes the UNet's and text encoders' layers alone)"
    left = [f"{m}: {why}" for m in adapter.updates if m not in kept]
    left += [f"{k}: kept whole, which a kohya file cannot hold" for k in adapter.full]
    if not kept:
        raise UnsupportedError(f"extract from {base} and {finetuned} found no change that a kohya file can hold "
                               f"({'; '.join(left[:3])}): give a folder name for a PEFT adapter")
    updates = {names[m]: dataclasses.replace(u, name=names[m]) for m, u in kept.items()}
    convs = any(len(u.delta_shape) > 2 and max(u.delta_shape[2:]) > 1 for u in updates.values())
    renamed = dataclasses.replace(adapter, updates=updates, full={}, full_origin={}, config={}, format="kohya",
                                  state=KohyaState(_kohya_sd_metadata(keys, convs, family, config)))
    return renamed, {m: names[m] for m in kept}, left


def _kohya_sd_metadata(keys: list[str], convs: bool, family: str | None = None,
                       config: Mapping[str, object] | None = None) -> dict[str, str]:
    """The metadata sd-scripts' extract_lora_from_models.py writes beside its network keys (the kohya writer sets
    ss_network_dim / ss_network_alpha and, with kxk convolutions, ss_network_args' conv_dim / conv_alpha from the
    modules): ss_v2 and ss_base_model_version, which UIs read to tell SD 1.x, 2.x and SDXL LoRAs apart (the SDXL
    refiner, which sd-scripts does not train, gets no version). `family`: a diffusers UNet folder's
    (sd_keys.unet_folder_family; SD 2.x's UNet: cross_attention_dim 1024, in its `config`)."""
    v2 = any(k.startswith("cond_stage_model.model.") for k in keys) or (
        family == "sd1" and (config or {}).get("cross_attention_dim") == 1024)
    sdxl = any(k.startswith("conditioner.embedders.1.") for k in keys) or family == "sdxl"
    refiner = not sdxl and any(k.startswith("conditioner.embedders.") for k in keys)
    meta = {"ss_network_module": "networks.lora", "ss_v2": str(v2)}
    if not refiner:
        meta["ss_base_model_version"] = "sdxl_base_v1-0" if sdxl else "sd_v2" if v2 else "sd_v1"
    if convs:  # placeholders the writer replaces by the convolutions' own (formats.kohya._conv_args)
        meta["ss_network_args"] = json.dumps({"conv_dim": "0", "conv_alpha": "0.0"})
    return meta


def _short_note(rule: RankRule, modules: list[str]) -> str:
    """The note for modules whose sv_ratio / sv_fro rule was cut short by the default --max-rank."""
    counted = plural(len(modules), "module", "modules", ("keeps", "keep"))
    names = ", ".join(modules[:3]) + (", ..." if len(modules) > 3 else "")
    return (f"{counted} {DEFAULT_MAX_RANK} singular values, the default --max-rank (Python: max_rank), short of "
            f"{rule.describe()} ({names}): give --max-rank higher to keep more")


def _nonfinite(e: NonFiniteError, base: str | os.PathLike[str], finetuned: str | os.PathLike[str],
               shapes: Mapping[str, tuple[int, ...]]) -> NonFiniteError:
    """A NonFiniteError of the SVDs (`module: what`), naming the two checkpoints and the module's weight shape."""
    text = str(e)
    shape = next((s for m, s in shapes.items() if text.startswith(f"{m}:")), None)
    return NonFiniteError(f"{finetuned} (fine-tuned) against {base} (base): {text}"
                          + (f" (weight of shape {tuple(shape)})" if shape is not None else ""))


def _with_tied_heads(result: ExtractResult, tied: dict[str, str], layers: BaseLayers) -> dict[str, Update]:
    """The updates with a LoRA of the same delta on each module tied to an extracted embedding: an Embedding
    one of the same tensors, a Linear one (an output head) with lora_A = lora_embedding_B^T, lora_B =
    lora_embedding_A^T (PEFT's embedding LoRA stores lora_embedding_A = B^T, lora_embedding_B = A^T); each
    reported like the embedding's."""
    updates = dict(result.adapter.updates)
    reports = {m.name: m for m in result.modules}
    heads = []
    for head, emb in tied.items():
        u = updates.get(emb)
        if not isinstance(u, LoraUpdate):
            continue
        if layers.kind(head) == "embedding":
            updates[head] = dataclasses.replace(u, name=head)
        else:
            a = Tensor.from_array(np.ascontiguousarray(u.B.f32().T))
            b = Tensor.from_array(np.ascontiguousarray(u.A.f32().T))
            updates[head] = LoraUpdate(head, a, b, u.scale, "linear", False)
        r = reports[emb]
        result.modules.append(ExtractReport(head, r.shape, r.rank, r.rel_error, r.singular_values))
        heads.append(head)
    if heads:
        sources = ", ".join(sorted({tied[h] for h in heads}))
        result.notes.append(
            f"{', '.join(heads)} {'reads' if len(heads) == 1 else 'read'} the weight of {sources} (tied): each "
            "gets a LoRA of the same factors, as PEFT's LoRA on an embedding changes its own lookup alone. PEFT's "
            "merge_and_unload adds each of them to the one shared weight (as it does with its "
            "ensure_weight_tying): merge with `lorafuse apply` instead, or keep them whole (--embeddings full)")
    return updates


def _one_linear_layout(updates: dict[str, Update]) -> dict[str, Update]:
    """PEFT's fan_in_fan_out is one flag for the adapter; PEFT sets it per layer type (off for a torch Linear,
    on for a transformers Conv1D). With Conv1D modules (GPT-2) the Linear ones (an output head) are written with
    the flag on as lorafuse reads such a file: the same lora_A / lora_B tensors, marked transposed."""
    if not any(isinstance(u, LoraUpdate) and u.kind == "linear" and u.transposed for u in updates.values()):
        return updates
    return {n: dataclasses.replace(u, transposed=True) if isinstance(u, LoraUpdate) and u.kind == "linear" else u
            for n, u in updates.items()}


def _expert_note(rank: int, zeros: int, config: dict[str, object]) -> str:
    model_type = config.get("model_type")
    added = f", {zeros} unchanged experts as zero factors" if zeros else ""
    return (f"every expert (and router) of each changed MoE layer is written at rank {rank}, the largest among them "
            f"(lower ranks zero-padded: the same deltas){added}: transformers 5 fuses the experts of a "
            f"{model_type!r} model on load, and PEFT stacks their LoRAs, "
            "which needs every expert at the adapter's rank" + (
                "; PEFT 0.21 converts them for Mixtral, Qwen3-MoE, DeepSeek, ... but not for model_type 'qwen2_moe' "
                "itself (its table lacks it), so it fails on this adapter's experts and router: merge it with "
                "`lorafuse apply`" if model_type == "qwen2_moe" else ""))


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
    """The tensors among `keys` (in both checkpoints: biases, norms, embeddings) whose bytes differ, or whose values
    differ where the two store them in different dtypes (a BF16 1.0 is an F32 1.0); `mapped(0 or 1, shard)`: the
    base's or the fine-tuned model's shard, opened once for the whole extract."""
    changed = []
    for key in keys:
        ib, iff = cb.info(key), cf.info(key)
        fb, ff = mapped(0, cb.shard_of[key]), mapped(1, cf.shard_of[key])
        if ib.dtype == iff.dtype:
            same = np.array_equal(_bytes(fb.raw(key)), _bytes(ff.raw(key)))
        else:
            same = np.array_equal(_values(fb.raw(key), ib.dtype), _values(ff.raw(key), iff.dtype), equal_nan=True)
        fb.release(key)
        ff.release(key)
        if not same:
            changed.append(key)
    return changed


def _only_rounded(backend: Backend, base: np.ndarray, base_dtype: str, ft: np.ndarray, ft_dtype: str,
                  threads: int) -> bool:
    """Whether a float32 base weight rounded to the fine-tuned weight's F16 / BF16 (nearest even) is that weight,
    bit for bit: a layer the fine-tuning left as it was, stored at a lower precision (an F16 fine-tune of an
    F32 base: kohya's extract_lora_from_models.py skips such a text encoder by its --min_diff). The first row
    is compared first (a trained layer differs there); NaN / Inf are left to the SVD, which refuses them."""
    if base_dtype != "F32" or ft_dtype not in ("F16", "BF16"):
        return False
    values, ft = base.reshape(base.shape[0], -1).view(np.float32), ft.reshape(ft.shape[0], -1)
    for rows in (slice(0, 1), slice(None)):
        if not np.array_equal(_bytes(backend.from_float32(values[rows], ft_dtype, threads)), _bytes(ft[rows])):
            return False
    return bool(np.isfinite(values).all())


def _max_abs_diff(backend: Backend, base: np.ndarray, base_dtype: str, ft: np.ndarray, ft_dtype: str, bound: float,
                  threads: int) -> float:
    """The largest |W_ft - W_base| (both as float32, the difference in float32, as the SVD sees it), 16 MiB of rows at
    a time; it stops at the first block above `bound` (returning that block's largest), so a changed module costs
    little. NaN when a difference is NaN (NaN or Inf in a weight: left to the SVD, which refuses them)."""
    base, ft = base.reshape(base.shape[0], -1), ft.reshape(ft.shape[0], -1)
    rows = max(1, (16 << 20) // (4 * max(1, base.shape[1])))
    largest = 0.0
    for i in range(0, base.shape[0], rows):
        with np.errstate(over="ignore", invalid="ignore"):
            d = backend.to_float32(np.ascontiguousarray(ft[i:i + rows]), ft_dtype, threads)
            d -= backend.to_float32(np.ascontiguousarray(base[i:i + rows]), base_dtype, threads)
            block = float(np.max(np.abs(d)))
        if not block <= bound:  # above it, or NaN
            return block
        largest = max(largest, block)
    return largest


def _clamped(b: np.ndarray, a: np.ndarray, quantile: float, where: str) -> tuple[np.ndarray, np.ndarray]:
    """kohya's --clamp_quantile: B = U S and A = V^T clamped to [-h, h], h the `quantile` of their entries together
    (signed, linear interpolation: torch.quantile's and numpy's default). An h <= 0 (nearly every entry at or below
    zero) would set every entry to h, a wrong delta: refused, naming `where`."""
    h = float(np.quantile(np.concatenate([b.reshape(-1), a.reshape(-1)]).astype(np.float64), quantile))
    if not h > 0:
        raise UnsupportedError(f"{where}: the {quantile:g}-quantile of its factors' entries is {h:.6g}, not positive, "
                               "so clamping them to [-h, h] (--clamp-quantile, kohya's --clamp_quantile) would set "
                               "every entry to it, a wrong delta; use a higher quantile, or no clamp")
    return np.clip(b, -h, h).astype(np.float32), np.clip(a, -h, h).astype(np.float32)


def _bytes(raw: np.ndarray) -> np.ndarray:
    """A tensor's bytes, of any rank (numpy views a 0-d array, a CLIP logit_scale, as other types only after a
    reshape to 1-d)."""
    return raw.reshape(-1).view(np.uint8)


def _values(raw: np.ndarray, dtype: str) -> np.ndarray:
    """A tensor's values as float64 (exact for every dtype a checkpoint stores)."""
    if dtype == "F64" or not DTYPES[dtype].is_float:
        return raw.astype(np.float64)
    return to_float32(raw, dtype).astype(np.float64)


BIAS_OR_NORM = "not a weight matrix (a bias or a norm)"
_OTHER_TENSORS = ("biases, norms, integer tensors or parameters of no Linear, Embedding or convolution layer, such as "
                  "fused MoE experts")


def _not_a_matrix(ib: TensorInfo, iff: TensorInfo) -> str:
    """Why a tensor in both checkpoints (`ib`, `iff`: its base and fine-tuned headers) is not extracted: integers in
    either (quantized codes, a buffer), a parameter of 2 or more dimensions that is no layer's `.weight` (the fused
    MoE experts of transformers 5: gate_up_proj), else a bias or a norm."""
    if not (DTYPES[ib.dtype].is_float and DTYPES[iff.dtype].is_float):
        stored = (f"stored {ib.dtype} in both" if ib.dtype == iff.dtype else
                  f"stored {ib.dtype} in the base and {iff.dtype} in the fine-tuned model")
        return f"{stored}, not floating point in both (quantized codes or an integer buffer, whose difference is no " \
               "weight update)"
    if len(ib.shape) >= 2:
        return (f"a {len(ib.shape)}-D tensor of shape {tuple(ib.shape)} that is no Linear, Embedding or convolution "
                "layer's .weight (such as the fused MoE experts' gate_up_proj / down_proj, which PEFT adapts with "
                "target_parameters)")
    return BIAS_OR_NORM


def _nothing_differs(finetuned: str | os.PathLike[str], unchanged: int, changed: list[str],
                     skipped: Sequence[str] = (), bitfit: bool = True, rounded: int = 0, below: int = 0,
                     min_diff: float | None = None) -> UnsupportedError:
    """The refusal of an extract in which no module differs from the base: its adapter would target no module,
    which PEFT refuses to load (NoMatchingPeftModuleError). `skipped`: the embeddings and output heads left out
    unread (--embeddings skip), which may be what changed; `bitfit`: every changed tensor is a bias or a norm;
    `rounded`: how many of the equal ones are the base rounded to the fine-tuned dtype (_only_rounded); `below`:
    how many differ by at most `min_diff` (counted unchanged)."""
    hint = "" if not rounded else (f"; {rounded} of them equal to the base rounded to the fine-tuned model's dtype, "
                                   "which no fine-tuning made")
    if below:
        hint += (f"; {below} of them differ by at most min_diff={min_diff:g} (largest |W_ft - W_base|), counted "
                 "unchanged: lower --min-diff (Python: min_diff=) to extract them")
    if skipped:
        shown = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        hint += (f"; the embeddings and output heads were not compared ({shown}; --embeddings skip, the default): "
                "if they changed, extract them with --embeddings lora (Python: embeddings='lora')")
    equal = "all equal" if not below else f"all equal or within min_diff={min_diff:g}"
    if changed:
        shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
        return UnsupportedError(
            f"{finetuned}: no weight matrix of the fine-tuned model differs from the base ({unchanged} compared, "
            f"{equal}); only tensors a LoRA cannot hold changed ({shown}: "
            f"{'biases or norms, as a BitFit fine-tune changes them' if bitfit else _OTHER_TENSORS}){hint}: the "
            "adapter would target no module; nothing is written")
    return UnsupportedError(
        f"{finetuned}: no module of the fine-tuned model differs from the base ({unchanged} weight matrices "
        f"compared, {equal}){hint}: the adapter would target no module, which PEFT refuses to load; nothing is "
        "written" + (" (is it the same checkpoint as the base?)" if not below else ""))


def _checkpoint_input(name: str | os.PathLike[str], ckpt: Checkpoint, role: str) -> InputSpec:
    """A checkpoint as a provenance input: as given, and what extract reads of it (weights, index, config.json)."""
    path = Path(name) if Path(name).is_file() else ckpt.directory
    config = ckpt.directory / "config.json"
    return folder_input(name, path, role, ckpt.files() + ([config] if config.is_file() else []))


def extracted(base: str | os.PathLike[str], base_config: dict[str, object], updates: dict[str, Update],
              full: dict[str, Tensor], checkpoints: Sequence[Checkpoint] = (),
              modules: Iterable[str] = ()) -> Adapter:
    """The extracted PEFT adapter: its updates, the embeddings kept whole (modules_to_save) and its config;
    derived from the checkpoints as given, a folder or one file (its sources: saving it never replaces them; a
    single file's folder is no input, so the adapter may be saved beside it). `modules`: every module
    name of the base (BaseLayers.modules), which target_modules must not select beside the updates'."""
    adapter = Adapter(updates=updates, full=full, derived_from=list(dict.fromkeys(c.path for c in checkpoints)))
    kept = sorted({m.removesuffix(".weight").rsplit(".", 1)[-1] for m in full})  # PEFT names the layer: lm_head
    adapter.config = _config(Path(base), base_config, adapter, kept, modules)
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
    layers: BaseLayers = field(default_factory=BaseLayers)  # what the model class (or the name tables) says
    embedding: set[str] = field(default_factory=set)  # modules extracted as PEFT embedding LoRAs
    tied: dict[str, str] = field(default_factory=dict)  # output head -> the extracted input embedding it reads
    # a MoE model transformers 5 fuses on load: its per-expert layer names, and the base's expert modules' shapes
    expert_parts: frozenset[str] = frozenset()
    expert_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    skipped_embeddings: list[str] = field(default_factory=list)  # embeddings and heads not read (--embeddings skip)
    clamp_quantile: float | None = None  # kohya's --clamp_quantile (_clamped), or None: no clamp
    min_diff: float | None = None  # kohya's --min_diff: a module within it of the base is unchanged, or None
    conv_rank: int | None = None  # kohya's --conv_dim: the rank of kxk convolutions (kxk), or None: the rule's


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
    clamp_quantile: float | None = None,
    min_diff: float | None = None,
    conv_rank: int | None = None,
) -> ExtractSetup:
    """Everything extract checks and decides before it reads a weight (its arguments' meaning: extract):
    the options, both checkpoints' headers and configs (quantized ones refused), which tensors are
    extracted, kept whole or left out (and why). Reads no tensor data."""
    if check_text(embeddings, "embeddings", ("skip", "lora", "full")) not in ("skip", "lora", "full"):
        raise LorafuseValueError(f"embeddings must be skip, lora or full, got {embeddings!r}")
    quantile = None if clamp_quantile is None else check_float(clamp_quantile, "clamp_quantile", 0.0, 1.0,
                                                                 lo_open=True)
    least = None if min_diff is None else check_float(min_diff, "min_diff", 0.0, math.inf)
    conv_rank = check_optional_rank(conv_rank, "conv_rank")
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
    inc = NameFilter(include, "--include (Python: include=) regular expression") if include is not None else None
    exc = NameFilter(exclude, "--exclude (Python: exclude=) regular expression") if exclude is not None else None
    base_path, ft_path = extract_models(base, finetuned)  # an adapter given as either: refused saying so
    cb, cf = Checkpoint(base_path), Checkpoint(ft_path)
    base_config = read_config(cb.directory)  # before the long work
    for ck, config, what in ((cb, base_config, "base"), (cf, read_config(cf.directory), "fine-tuned model")):
        q = detect_checkpoint(ck, config)
        if q is not None:  # codes are not weights: their difference means nothing
            dequantize = ("" if q.scheme is None else ", or write it dequantized first: `lorafuse apply CHECKPOINT "
                          "ADAPTER --weights 0 --dtype bf16 -o OUT` (apply needs an adapter: any adapter of that "
                          "model changes nothing at weight 0)")
            raise UnsupportedError(
                f"{ck.location}: the {what} is quantized "
                f"with {q.describe()}; extract reads 16- and 32-bit checkpoints only: extract from the unquantized "
                f"checkpoints (the 16-bit base and fine-tune){dequantize}")
    model = ModelInfo.from_config(base_config)
    k_max = rule.rank if rule.rank is not None else (rule.max_rank or DEFAULT_MAX_RANK)
    layers = base_layers(base_config, cb.keys(), [k.removesuffix(".weight") for k in cb.keys()
                                                  if k.endswith(".weight") and len(cb.info(k).shape) == 2
                                                  and _named_embedding(k.removesuffix(".weight"))])

    skipped: list[str] = []
    others: list[str] = []
    dtypes: set[tuple[str, str]] = set()  # (base, fine-tuned) dtypes of weight matrices stored differently
    work: list[tuple[str, str]] = []  # (module, key)
    conv1d: set[str] = set()  # GPT-2 style Conv1D weights, stored (in x out)
    full: list[tuple[str, str]] = []
    embedding: set[str] = set()  # PEFT embedding LoRAs (not the output heads, which are Linear)
    skipped_embeddings: list[str] = []
    heads = 0  # embeddings and output heads among the weight matrices selected (what `embeddings` decides on)
    for key in cb.keys():
        if key not in cf:
            skipped.append(f"{key}: only in the base")
            continue
        ib, iff = cb.info(key), cf.info(key)
        if ib.shape != iff.shape:
            skipped.append(f"{key}: shape {ib.shape} in the base, {iff.shape} in the fine-tuned model")
            continue
        module = key.removesuffix(".weight")
        # a weight matrix of floats in both (integer codes are no weights) with rows and columns (an empty one holds
        # nothing to extract: compared as the others are)
        is_matrix = (key.endswith(".weight") and len(ib.shape) in MATRIX_NDIMS and 0 not in ib.shape
                     and DTYPES[ib.dtype].is_float and DTYPES[iff.dtype].is_float)
        if (inc and not inc.search(module)) or (exc and exc.search(module)):
            continue
        if not is_matrix:
            others.append(key)
            continue
        if ib.dtype != iff.dtype:
            dtypes.add((ib.dtype, iff.dtype))
        is_embedding = len(ib.shape) == 2 and layers.is_embedding(module) and not layers.is_head(module)
        heads += is_embedding or layers.is_head(module)
        if (is_embedding or layers.is_head(module)) and embeddings == "skip":
            what = "embedding" if is_embedding else "output head"
            skipped.append(f"{key}: {what} (use --embeddings lora or full; Python: embeddings='lora' or 'full')")
            skipped_embeddings.append(key)
            continue
        _check_writable(module, key, cb)
        if (is_embedding or layers.is_head(module)) and embeddings == "full":
            full.append((module + ".weight", key))
            continue
        grouped = _not_wrapped(layers, module) or _grouped(layers, module, ib.shape)
        if grouped is not None:
            skipped.append(f"{key}: {grouped}")
            continue
        if is_embedding:
            embedding.add(module)
        elif len(ib.shape) == 2 and _layer_type(model, module, key, Path(base)) == "conv1d":
            conv1d.add(module)
        work.append((module, key))
    for key in cf.keys():
        if key not in cb:
            skipped.append(f"{key}: only in the fine-tuned model")
    if not work and not full:
        raise _nothing_to_extract(cf, cb, inc, exc, embeddings, skipped, layers)
    if not work:  # PEFT refuses an adapter with modules_to_save alone (NoMatchingPeftModuleError)
        raise _only_kept_whole(finetuned, [name for name, _ in full])
    tied = _tie_heads(layers, work, full, embedding, skipped)
    notes = [*cb.notes, *cf.notes]  # a folder read as its loader reads it (io.checkpoint)
    notes += [f"weight matrices stored {b} in the base and {f} in the fine-tuned model: each difference also holds "
             f"the rounding to the coarser of the two ({_coarser(b, f)}), which no fine-tuning made (compare "
             "checkpoints of one dtype for a clean extraction)" for b, f in sorted(dtypes)]
    if conv_rank is not None and not any(kxk(cb.info(k).shape) for _, k in work):
        notes.append(f"conv_rank {conv_rank} (--conv-rank) changed nothing: no kxk convolution (a kernel dimension "
                     "above 1) is among the modules extracted")
    if embeddings != "skip" and not heads:  # said, not silently ignored
        notes.append(f"embeddings={embeddings!r} (--embeddings) changed nothing: no embedding or output head is among "
                     "the weight matrices extracted")
    parts = fused_parts(base_config)
    expert_shapes = {k.removesuffix(".weight"): cb.info(k).shape for k in cb.keys()
                     if ".experts." in k and k.endswith(".weight") and len(cb.info(k).shape) == 2 and k in cf
                     and cf.info(k).shape == cb.info(k).shape} if parts else {}
    return ExtractSetup(cb, cf, base_config, work, conv1d, full, skipped, others, notes, out_dtype, k_max, oversample,
                        power_iters, seed, threads, backend, layers, embedding, tied, parts, expert_shapes,
                        skipped_embeddings, quantile, least, conv_rank)


def kxk(shape: tuple[int, ...]) -> bool:
    """A kxk convolution's kernel (kohya's conv2d_3x3, which --conv_dim sets): a kernel dimension above 1."""
    return len(shape) > 2 and any(int(d) > 1 for d in shape[2:])


def module_rank(k_max: int, conv_rank: int | None, shape: tuple[int, ...]) -> int:
    """The sketch size (or fixed rank) of a module of this weight shape: `conv_rank` for a kxk convolution when
    given, else `k_max` (both capped by the caller at the module's full rank)."""
    return conv_rank if conv_rank is not None and kxk(shape) else k_max


def _check_writable(module: str, key: str, cb: Checkpoint) -> None:
    """Refuse, before any work, a weight whose module name no adapter reader takes back (check_module_name: a
    checkpoint's tensor '.weight', 'a..b.weight', 'x/y.weight' or one holding a control character), naming it."""
    try:
        check_module_name(module, f"{cb.location}: tensor {key!r}")
    except FormatError as e:
        raise UnsupportedError(f"{e}: extract cannot write a LoRA for it, as no reader (lorafuse's, PEFT's) would "
                               "read it back; leave it out with --exclude (Python: exclude=)") from None


def fused_parts(config: Mapping[str, object]) -> frozenset[str]:
    """The per-expert layer names transformers 5 fuses for this model (config.json's model types), or none."""
    for t in sorted(_model_types(config)):
        if t in PER_EXPERT_ON_DISK:
            return frozenset(p for parts in PER_EXPERT_ON_DISK[t].values() for p in parts)
    return frozenset()


def _named_embedding(module: str) -> bool:
    """An input embedding by its last name (no position or relative-position table): the one an output head
    can be tied to when no model class says which."""
    return BaseLayers().is_embedding(module) and module.rsplit(".", 1)[-1] not in POSITION_TABLES


def _not_wrapped(layers: BaseLayers, module: str) -> str | None:
    """Why a layer the model class names is left out when PEFT's LoRA has no layer for its type (PEFT refuses to
    load an adapter that targets one: `Target module ConvTranspose1d(...) is not supported`), or None. (A module of
    a custom class, kind 'other', is kept: the MoE routers of transformers 5, whose LoRA PEFT converts.)"""
    if layers.kind(module) == "conv_transpose":
        return ("transposed convolution (ConvTranspose), for which PEFT's LoRA has no layer (PEFT refuses to load an "
                "adapter that targets one); not extracted")
    return None


def _grouped(layers: BaseLayers, module: str, shape: tuple[int, ...]) -> str | None:
    """Why a convolution is left out, or None: a grouped one (depthwise: one input channel per group), whose
    PEFT LoRA has another layout (a dense lora_A over every input channel, a grouped lora_B, the rank a multiple
    of the groups) and cannot be merged by PEFT. Without the model class a kernel of one input channel per
    output channel group cannot be told from a dense convolution of one input channel: it is left out too."""
    if len(shape) < 3:
        return None
    groups = layers.group_count(module)
    if groups > 1:
        return (f"grouped convolution (groups={groups}): PEFT's LoRA for it has another layout (and PEFT cannot "
                "merge it); not extracted")
    if layers.kind(module) is None and shape[1] == 1 and shape[0] > 1:
        return ("convolution with one input channel per output channel (shape "
                f"{tuple(shape)}): a depthwise (grouped) one, whose PEFT LoRA has another layout, unless it has one "
                "input channel; without config.json naming a transformers class it cannot be told, so it is not "
                "extracted")
    return None


def _tie_heads(layers: BaseLayers, work: list[tuple[str, str]], full: list[tuple[str, str]], embedding: set[str],
               skipped: list[str]) -> dict[str, str]:
    """The modules that read an extracted embedding's weight (tied weights: the output head of GPT-2, Gemma, a
    Llama with tie_word_embeddings): PEFT's LoRA on the embedding changes that module's own lookup alone, so
    each of them gets a LoRA of the same factors (returned: module -> embedding), or with --embeddings full the
    same tensor kept whole (added to `full`). A weight several layers read (T5 / BART `shared`: encoder and
    decoder embed_tokens, the output layer) keeps its update on itself alone, as apply merges it (ops.tied), with
    a note. A stored copy of such a module is left to the tie (transformers loads the embedding there), with
    a note in `skipped`."""
    tied: dict[str, str] = {}
    kept = {name.removesuffix(".weight"): key for name, key in full}
    readers: dict[str, list[str]] = {}
    for head, emb in layers.ties.items():
        readers.setdefault(emb, []).append(head)
    for head, emb in layers.ties.items():
        if len(readers[emb]) > 1:  # T5 / BART `shared`: the update stays on it alone (below)
            continue
        stored = any(m == head for m, _ in work) or head in kept
        if emb in embedding:
            tied[head] = emb
            work[:] = [(m, k) for m, k in work if m != head]
        elif emb in kept:
            full[:] = [(n, k) for n, k in full if n != f"{head}.weight"] + [(f"{head}.weight", kept[emb])]
        else:
            continue
        if stored:
            skipped.append(f"{head}.weight: tied to {emb} (transformers loads {emb}'s weight there): {head} gets "
                           f"{emb}'s update instead")
    for emb, heads in readers.items():
        if len(heads) > 1 and (emb in embedding or emb in kept):
            skipped.append(f"{emb}.weight: read by {', '.join(heads)} as well; its update stays on {emb} alone, which "
                           "PEFT's merge_and_unload and lorafuse apply merge into the shared weight (every reader sees "
                           "it); PEFT's unmerged forward reads those layers' own lookups, without it")
    return tied


def _coarser(b: str, f: str) -> str:
    """The coarser of two float dtypes (fewer significand bits); F16 and BF16 each round what the other keeps."""
    bits = {"F64": 52, "F32": 23, "F16": 10, "BF16": 7, "F8_E4M3": 3, "F8_E5M2": 2}
    if {b, f} == {"F16", "BF16"}:
        return "BF16's significand, F16's range"
    return b if bits.get(b, 0) < bits.get(f, 0) else f


def _only_kept_whole(finetuned: str | os.PathLike[str], kept: list[str]) -> UnsupportedError:
    """The refusal of an extract whose adapter would hold only tensors kept whole (--embeddings full): PEFT
    refuses an adapter that puts LoRA on no module (NoMatchingPeftModuleError)."""
    shown = ", ".join(kept[:3]) + (f" and {len(kept) - 3} more" if len(kept) > 3 else "")
    return UnsupportedError(
        f"{finetuned}: only embeddings or output heads would be written, kept whole ({shown}; --embeddings full, "
        "Python: embeddings='full'), and no LoRA module: PEFT refuses to load an adapter that targets no module "
        "(NoMatchingPeftModuleError); extract them as LoRA with --embeddings lora (Python: embeddings='lora'); "
        "nothing is written")


def _nothing_to_extract(cf: Checkpoint, cb: Checkpoint, inc: NameFilter | None, exc: NameFilter | None,
                        embeddings: str, skipped: list[str], layers: BaseLayers) -> UnsupportedError:
    """The refusal of an extract that has no weight matrix to extract (before any is read): the two checkpoints
    share no tensor name, the include / exclude patterns leave none, or the checkpoint holds none (embeddings
    alone, skipped or kept whole)."""
    if not any(k in cf for k in cb.keys()):
        return _no_shared_name(cb, cf)
    matrices = [k.removesuffix(".weight") for k in cb.keys()
                if k.endswith(".weight") and len(cb.info(k).shape) in MATRIX_NDIMS
                and not layers.is_embedding(k[:-7]) and not layers.is_head(k[:-7])]
    shown = ", ".join(repr(m) for m in matrices[:3]) + (", ..." if len(matrices) > 3 else "")
    if (inc or exc) and matrices:
        why = f"{_left_none(matrices, inc, exc)}; regular expressions are searched in module names such as " \
              f"{shown}"
    elif inc or exc:
        why = f"{cb.location} has no weight matrix"
    elif embeddings == "skip":
        why = f"{cb.location} has no weight matrix to extract but embeddings, and embeddings='skip'"
    else:
        why = f"{cb.location} has no weight matrix to extract"
    notes = f" ({'; '.join(skipped[:3])})" if skipped else ""
    return UnsupportedError(f"{why}{notes}: the adapter would target no module, which PEFT refuses to load; "
                            "nothing is extracted")


def _no_shared_name(cb: Checkpoint, cf: Checkpoint) -> UnsupportedError:
    """The two checkpoints name every tensor differently (a fine-tune saved as the bare model, without the
    class's prefix): one example of each, and the prefix one of them lacks when that is the difference."""
    b, f = next(iter(cb.keys()), ""), next(iter(cf.keys()), "")
    hint = ""
    for longer, shorter, which in ((cb, cf, "fine-tuned model's"), (cf, cb, "base's")):
        s = next(iter(shorter.keys()), "")
        prefix = next((k[: -len(s)] for k in longer.keys() if s and k.endswith("." + s)), None)
        if prefix:
            hint = (f"; the {which} names lack the prefix {prefix!r} (a model saved without its head class?): "
                    "save both with one class")
            break
    return UnsupportedError(
        f"{cb.location} and {cf.location} share no tensor name (the base has {b!r}, the fine-tuned model "
        f"{f!r}){hint}: extract pairs the two checkpoints' tensors by name, so nothing can be extracted")


def _left_none(matrices: list[str], inc: NameFilter | None, exc: NameFilter | None) -> str:
    """What `include` and `exclude` did to the checkpoint's weight matrices (`matrices`, embeddings aside) when
    they leave none: include matched none, or exclude matched every one that include (or nothing) let through."""
    total = plural(len(matrices), "weight matrix", "weight matrices")
    include, exclude = (None if f is None else f.pattern for f in (inc, exc))
    kept = [m for m in matrices if inc.search(m)] if inc else matrices
    if not kept:
        return f"no module matched include={include!r} (none of the {total})"
    every = "it" if len(kept) == 1 else f"all {len(kept)}"
    if include:
        return (f"include={include!r} matched {len(kept)} of the {total} and exclude={exclude!r} matched {every}: "
                "no module is left")
    every = f"all {total}" if len(kept) > 1 else "the only weight matrix"
    return f"exclude={exclude!r} matched {every}: no module is left"


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


def _residual(backend: Backend, it: ExtractJob, b: np.ndarray, a: np.ndarray, frob_sq: float, threads: int) -> float:
    """||D - B A||_F / ||D||_F from D itself, 16 MiB of rows at a time: where the error is small (DIRECT_ERROR_BELOW)
    the estimate from the float32 singular values is their rounding, not the error. B A in float32 (one BLAS
    product), D - B A in float32, its squares summed in float64 (a sum of squares cancels nothing; float32 squares
    would underflow to 0 below ~1e-19 and overflow to Inf above ~1.8e19, a delta of 1e-20 or 1e30): accurate to
    about float32's rounding of ||D|| (1e-7), where the estimate's cancellation left about 1e-4, at the cost of one
    more pass over the weights."""
    rows = max(1, (16 << 20) // (4 * max(1, a.shape[1])))
    a32 = np.ascontiguousarray(a, dtype=np.float32)
    total = 0.0
    for i in range(0, it.w_base.shape[0], rows):
        r = backend.to_float32(np.ascontiguousarray(it.w_ft[i:i + rows]), it.ft_dtype, threads)
        r -= backend.to_float32(np.ascontiguousarray(it.w_base[i:i + rows]), it.base_dtype, threads)
        r -= np.ascontiguousarray(b[i:i + rows], dtype=np.float32) @ a32
        r64 = r.astype(np.float64)
        total += float(np.einsum("ij,ij->", r64, r64))  # squares: no cancellation left, float64's range
    return float(np.sqrt(total / frob_sq))


def _update(module: str, shape: tuple[int, ...], b: np.ndarray, a: np.ndarray, conv1d: bool = False,
            embedding: bool = False) -> LoraUpdate:
    k = a.shape[0]
    if conv1d:
        # D (in x out) = b a; PEFT's Conv1D LoRA has delta^T = B A with B (out x k), A (k x in): B = a^T, A = b^T
        return LoraUpdate(module, Tensor.from_array(np.ascontiguousarray(b.T)),
                          Tensor.from_array(np.ascontiguousarray(a.T)), 1.0, "linear", True)
    if embedding:
        # PEFT's embedding LoRA stores (B A)^T: lora_embedding_A = B^T, lora_embedding_B = A^T
        return LoraUpdate(module, Tensor.from_array(np.ascontiguousarray(b.T)),
                          Tensor.from_array(np.ascontiguousarray(a.T)), 1.0, "embedding", True)
    a_t = Tensor.from_array(np.ascontiguousarray(a).reshape((k, *shape[1:])))
    b_t = Tensor.from_array(np.ascontiguousarray(b).reshape((shape[0], k, *([1] * (len(shape) - 2)))))
    return LoraUpdate(module, a_t, b_t, 1.0, "conv" if len(shape) > 2 else "linear", False)


def _config(base: Path, base_config: dict[str, object], adapter: Adapter,
            modules_to_save: list[str], modules: Iterable[str] = ()) -> dict[str, object]:
    task_type = None
    archs = base_config.get("architectures")
    if isinstance(archs, list) and any(str(a).endswith("ForCausalLM") for a in archs):
        task_type = "CAUSAL_LM"
    origin = spec_origin(base)  # a Hub id: PEFT's name for the base is the repo id, its revision the commit
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": recorded_base(base) if origin is None else origin.repo_id,
        **({"revision": origin.commit_sha} if origin is not None else {}),
        # names PEFT's suffix matching selects the extracted modules by, and no other module of the base
        "target_modules": peft_targets(adapter.updates, modules),
        "modules_to_save": modules_to_save or None,
        "lora_dropout": 0.0,
        "bias": "none",
    }
