"""resize: the optimal lower-rank version of one adapter (kohya's resize_lora.py, exactly).

Per module: thin QR of B and of A^T, SVD of the r x r core (the C++ factored path), the
rank from the rule (ops.rank), and the leading k singular directions as the new factors.
Each module keeps its scale: the factors approximate B A and the stored scale is unchanged.
The new factors are computed in float32 / float64 and rounded once, to nearest even, to `dtype`: by
default the input's factor dtype when all its factors share one of F32, F16, BF16 (kohya's resize
with --save_precision), else F32 (with an AdapterNote). A lora_B bias and kohya `.alpha` keep theirs.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass

import numpy as np

from lorafuse._progress import Progress
from lorafuse._validate import check_threads
from lorafuse.backends import Backend, FactorJob, backend_for_device
from lorafuse.errors import LorafuseValueError, NonFiniteError, UnsupportedError
from lorafuse.formats import load
from lorafuse.io.dtypes import dtype_spelling
from lorafuse.io.provenance import adapter_input, given_name, record
from lorafuse.io.safetensors import raise_if_inputs_changed
from lorafuse.model import Adapter, LycorisUpdate, Update
from lorafuse.model.arithmetic import check_split, restated_config
from lorafuse.model.experts import ALL_PARTS, one_expert_rank
from lorafuse.model.layout import output_dtype, refuse_lost_directions, rounded
from lorafuse.model.limits import check_dense
from lorafuse.model.param_lora import refuse_parameter_loras
from lorafuse.model.update import beyond_float32, nonfinite_factors
from lorafuse.ops.rank import RankRule, fro_kept


@dataclass
class ModuleReport:
    name: str
    rank_in: int
    rank_out: int
    fro_kept: float  # fraction of ||delta||_F kept (1.0 = lossless)


GROUP = 64  # modules per call into the core (the progress bar advances per group)
_ALGOS = {"loha": "LoHa", "lokr": "LoKr"}


def resize(adapter: str | os.PathLike[str] | Adapter, rule: RankRule, split: str = "B",
           threads: int = 0, progress: bool | None = None,
           dtype: object = None, device: str = "cpu") -> tuple[Adapter, list[ModuleReport]]:
    """The adapter with every module's rank reduced by `rule`, and a report per module. `dtype` ('fp32',
    'fp16', 'bf16' or an alias io.dtypes accepts, like kohya's --save_precision 'float', or a torch / numpy
    dtype) is the dtype of the new factors; None: the input's factor dtype when all its factors share one of
    F32 / F16 / BF16, else F32.
    `device` 'cuda' runs the factored SVDs on the GPU (DeviceError when this build or machine cannot)."""
    a, threads, backend, out_dtype = prepare_resize(adapter, rule, threads, dtype, device, split)
    _refuse_nonfinite_biases(a)
    names = list(a.updates)
    results: dict[str, tuple] = {}
    bar = Progress(len(names), "resize", progress, unit="modules")
    try:
        for start in range(0, len(names), GROUP):
            group = names[start : start + GROUP]
            # a LoKr (or a large LoHa) through its structure: the SVDs of its halves, never its exact
            # factorization (which a few kilobytes of LoKr can make gigabytes large)
            structured = [n for n in group if isinstance(a.updates[n], LycorisUpdate)
                          and a.updates[n].prefers_structure()]  # type: ignore[union-attr]
            for n in structured:
                results[n] = _structured_factors(a.updates[n], n, rule, split, threads)  # type: ignore[arg-type]
            items = [FactorJob(n, *_exact_factors(a.updates[n], n, threads)) for n in group if n not in results]
            results.update({n: r for (n, _, _), r in zip(items, backend.factored_svd(
                items, [a.updates[n].rank for n, _, _ in items], split, threads))})
            bar.update(len(group), group[-1])
    except NonFiniteError as e:  # the core names the module: say which adapter it is in, and an F64 file's reason
        said = f"{a.label}: {e}" if a.label not in str(e) else str(e)
        beyond = next((f"module {n!r} {w}" for n, u in a.updates.items() if (w := beyond_float32(u))), None)
        raise NonFiniteError(said if beyond is None else f"{said}: {beyond}") from None
    finally:
        bar.close()
    updates: dict[str, Update] = {}
    report: list[ModuleReport] = []
    for n in names:
        b2, a2, s = results[n]
        u = a.updates[n]
        k = min(rule.choose(s), u.rank, b2.shape[1], b2.shape[0], a2.shape[1])  # no more than the delta's rank
        _refuse_underflow(a.label, n, b2[:, :k], a2[:k], s[:k], split)
        try:
            new = rounded(u.with_factors(b2[:, :k], a2[:k], scale=u.scale), out_dtype, threads, refuse_underflow=True)
        except (NonFiniteError, UnsupportedError) as e:  # a factor the dtype cannot hold: say which adapter
            raise type(e)(f"{a.label}: {e}") from None
        new.bias = u.bias
        updates[n] = new
        report.append(ModuleReport(n, u.rank, k, fro_kept(s, k)))
    updates, common, _ = one_expert_rank(updates, ALL_PARTS)  # the MoE experts PEFT stacks: one rank, zero-padded
    if common:
        report = [dataclasses.replace(m, rank_out=updates[m.name].rank) for m in report]
    raise_if_inputs_changed(a.sources())  # its file shrank or changed while read: refuse the result
    out = resized(a, updates)
    out.provenance = record("resize", [adapter_input(a, name=given_name(adapter))],  # io.provenance
                            {**dataclasses.asdict(rule), "split": split, "dtype": dtype_spelling(dtype),
                             "device": device})
    return out, report


def _refuse_nonfinite_biases(a: Adapter) -> None:
    """NonFiniteError naming the module whose lora_B bias holds NaN or Inf: resize keeps a bias as it is, so it
    would be written into the output (the core refuses such factors)."""
    for name, u in a.updates.items():
        bias = getattr(u, "bias", None)
        if bias is None:
            continue
        x = bias.f32()
        if not np.isfinite(x).all():
            held = " and ".join(w for w, bad in (("NaN", np.isnan(x).any()), ("Inf", np.isinf(x).any())) if bad)
            raise NonFiniteError(f"{a.label}: module {name!r}: its lora_B bias {tuple(x.shape)} holds {held}")


def _structured_factors(u: LycorisUpdate, name: str, rule: RankRule, split: str,
                        threads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A LoHa's / LoKr's best factors through its structure (LycorisUpdate.best_factors), refused as the core refuses
    a LoRA's (NonFiniteError naming the module): pieces that hold NaN or Inf, or factors past float32's range."""
    held = nonfinite_factors(u)
    if held:
        raise NonFiniteError(f"{name}: input holds {held}")
    with np.errstate(over="ignore", invalid="ignore"):  # the float64 factors rounded to float32: checked below
        b, a, s = u.best_factors(rule.choose, split, threads)
    if not (np.isfinite(b).all() and np.isfinite(a).all()):
        raise NonFiniteError(f"{name}: the low-rank factors do not fit float32: the largest singular value is "
                             f"{float(s[0]):.3g} (float32 holds up to {float(np.finfo(np.float32).max):.3g})")
    return b, a, s


def _exact_factors(u: Update, name: str, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """The module's exact factorization for the core's SVD; a LoHa / LoKr whose finite pieces give one past float32's
    range (their products overflow) is refused naming the module, not said to hold NaN or Inf."""
    if not isinstance(u, LycorisUpdate):
        return u.stored_factors(threads)
    with np.errstate(over="ignore", invalid="ignore"):
        b, a = u.stored_factors(threads)
    if not (np.isfinite(b).all() and np.isfinite(a).all()) and not nonfinite_factors(u):
        algo = _ALGOS.get(u.algo, u.algo)
        raise NonFiniteError(f"{name}: its {algo} pieces are finite but their exact factorization "
                             f"({tuple(b.shape)} x {tuple(a.shape)}) overflows float32 (values past "
                             f"{float(np.finfo(np.float32).max):.3g}): scale the module down")
    return b, a


def _refuse_underflow(label: str, name: str, b: np.ndarray, a: np.ndarray, s: np.ndarray, split: str) -> None:
    """Refuse new float32 factors whose kept singular values fell below float32's range (model.layout's
    refuse_lost_directions, naming the adapter and the module)."""
    refuse_lost_directions(f"{label}: module {name!r}", b, a, s, split)


def prepare_resize(adapter: str | os.PathLike[str] | Adapter, rule: RankRule, threads: int = 0,
                   dtype: object = None, device: str = "cpu",
                   split: str = "B") -> tuple[Adapter, int, Backend, str]:
    """What resize checks and reads before any SVD (its arguments' meaning: resize): the adapter (loaded
    when a path), the checked threads, the backend, the new factors' dtype. DoRA modules are refused."""
    threads = check_threads(threads)
    check_split(split)
    backend = backend_for_device(device)
    if not isinstance(rule, RankRule):
        raise LorafuseValueError(f"rule must be a RankRule (rank=, sv_ratio=, sv_fro= or sv_cumulative=), got "
                                 f"{type(rule).__name__}")
    a = adapter if isinstance(adapter, Adapter) else load(adapter)
    refuse_parameter_loras(a.label, a.updates, "resize")
    for name, u in a.updates.items():
        if u.magnitude is not None:
            raise UnsupportedError(f"{a.label}: module {name!r} is DoRA; its rank cannot be reduced independently "
                                   "of the magnitude vector")
        if 0 in tuple(u.delta_shape)[:2]:  # the result would have rank 0, which PEFT and lorafuse refuse to load
            raise UnsupportedError(f"{a.label}: module {name!r} updates a weight of shape {tuple(u.delta_shape)}, "
                                   "with no rows or no columns: it has no rank to reduce (apply merges it as "
                                   "nothing)")
    if rule.rank is not None:  # a fixed rank: the size of a structured LoHa's / LoKr's rank-k LoRA is known now
        _check_structured_sizes(a, min(rule.rank, rule.max_rank or rule.rank))
    from lorafuse.formats.sd_keys import kernel_unknown, note_unknown_kernels

    note_unknown_kernels(a.label, [n for n, u in a.updates.items()
                                   if isinstance(u, LycorisUpdate) and kernel_unknown(n, tuple(u.delta_shape))])
    return a, threads, backend, output_dtype([a], dtype, "resize")


def _check_structured_sizes(a: Adapter, rank: int) -> None:
    """Refuse, as the run's best_factors would (model.limits.check_dense), a LoHa / LoKr taken through its structure
    whose rank-`rank` LoRA is past the one-module limit: before any work, so that --dry-run refuses it too."""
    for u in a.updates.values():
        if isinstance(u, LycorisUpdate) and u.prefers_structure():
            check_dense(u.label, f"the rank-k LoRA of this {_ALGOS.get(u.algo, u.algo)}",
                        (max(1, min(rank, u.rank)), u.rows + u.cols))


def resized(a: Adapter, updates: dict[str, Update]) -> Adapter:
    """The resized adapter: `a`'s config, state and full tensors with the new `updates` (derived from `a`'s
    files, which saving it never replaces)."""
    return Adapter(updates=updates, full=dict(a.full), config=restated_config(a.config, updates), format=a.format,
                   path=None, full_origin=dict(a.full_origin), derived_from=a.sources(), state=copy.deepcopy(a.state))
