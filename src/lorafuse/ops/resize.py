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
from lorafuse.model.layout import output_dtype, rounded
from lorafuse.model.param_lora import refuse_parameter_loras
from lorafuse.model.update import beyond_float32
from lorafuse.ops.rank import RankRule, fro_kept


@dataclass
class ModuleReport:
    name: str
    rank_in: int
    rank_out: int
    fro_kept: float  # fraction of ||delta||_F kept (1.0 = lossless)


GROUP = 64  # modules per call into the core (the progress bar advances per group)


def resize(adapter: str | os.PathLike[str] | Adapter, rule: RankRule, split: str = "B",
           threads: int = 0, progress: bool | None = None,
           dtype: object = None, device: str = "cpu") -> tuple[Adapter, list[ModuleReport]]:
    """The adapter with every module's rank reduced by `rule`, and a report per module. `dtype` ('fp32',
    'fp16', 'bf16' or an alias io.dtypes accepts, like kohya's --save_precision 'float', or a torch / numpy
    dtype) is the dtype of the new factors; None: the input's factor dtype when all its factors share one of
    F32 / F16 / BF16, else F32.
    `device` 'cuda' runs the factored SVDs on the GPU (DeviceError when this build or machine cannot)."""
    a, threads, backend, out_dtype = prepare_resize(adapter, rule, threads, dtype, device, split)
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
                results[n] = a.updates[n].best_factors(rule.choose, split, threads)  # type: ignore[union-attr]
            items = [FactorJob(n, *a.updates[n].stored_factors(threads)) for n in group if n not in results]
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
    from lorafuse.formats.sd_keys import kernel_unknown, note_unknown_kernels

    note_unknown_kernels(a.label, [n for n, u in a.updates.items()
                                   if isinstance(u, LycorisUpdate) and kernel_unknown(n, tuple(u.delta_shape))])
    return a, threads, backend, output_dtype([a], dtype, "resize")


def resized(a: Adapter, updates: dict[str, Update]) -> Adapter:
    """The resized adapter: `a`'s config, state and full tensors with the new `updates` (derived from `a`'s
    files, which saving it never replaces)."""
    return Adapter(updates=updates, full=dict(a.full), config=restated_config(a.config, updates), format=a.format,
                   path=None, full_origin=dict(a.full_origin), derived_from=a.sources(), state=copy.deepcopy(a.state))
