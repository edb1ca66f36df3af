"""resize: the optimal lower-rank version of one adapter (kohya's resize_lora.py, exactly).

Per module: thin QR of B and of A^T, SVD of the r x r core (the C++ factored path), the
rank from the rule (ops.rank), and the leading k singular directions as the new factors.
Each module keeps its scale: the factors approximate B A and the stored scale is unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from lorafuse import _core
from lorafuse._progress import Progress
from lorafuse.adapter import Adapter, LoraUpdate
from lorafuse.errors import UnsupportedError
from lorafuse.formats import load
from lorafuse.ops.rank import RankRule, fro_kept


@dataclass
class ModuleReport:
    name: str
    rank_in: int
    rank_out: int
    fro_kept: float  # fraction of ||delta||_F kept (1.0 = lossless)


GROUP = 64  # modules per call into the core (the progress bar advances per group)


def resize(adapter: str | os.PathLike[str] | Adapter, rule: RankRule, split: str = "B",
           threads: int = 0, progress: bool | None = None) -> tuple[Adapter, list[ModuleReport]]:
    a = adapter if isinstance(adapter, Adapter) else load(adapter)
    for name, u in a.updates.items():
        if u.magnitude is not None:
            raise UnsupportedError(f"{a.label}: module {name!r} is DoRA; its rank cannot be reduced independently "
                                   "of the magnitude vector")
    names = list(a.updates)
    full = []
    bar = Progress(len(names), "resize", progress, unit="modules")
    try:
        for start in range(0, len(names), GROUP):
            group = names[start : start + GROUP]
            items = [(n, *a.updates[n].stored_factors(threads)) for n in group]
            full += _core.factored_svd(items, [a.updates[n].rank for n in group], split, threads)
            bar.update(len(group), group[-1])
    finally:
        bar.close()
    updates: dict[str, LoraUpdate] = {}
    report: list[ModuleReport] = []
    for n, (b2, a2, s) in zip(names, full):
        u = a.updates[n]
        k = min(rule.choose(s), u.rank)
        new = u.with_factors(b2[:, :k], a2[:k], scale=u.scale)
        new.bias = u.bias
        updates[n] = new
        report.append(ModuleReport(n, u.rank, k, fro_kept(s, k)))
    out = Adapter(updates=updates, full=dict(a.full), config=dict(a.config), format=a.format, path=None,
                  full_origin=dict(a.full_origin), derived_from=a.sources())
    return out, report
