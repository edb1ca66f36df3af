"""Backends: where the math runs, behind one set of operations (`Backend`).

`get_backend("auto" | "cpu" | "reference" | "cuda")`. 'auto' is the CUDA backend when it is
built and a GPU is present, else 'cpu'; LORAFUSE_BACKEND overrides 'auto'. Only this package
imports the compiled modules.
"""

from __future__ import annotations

import os
from functools import cache

from lorafuse.backends.base import Backend
from lorafuse.backends.jobs import (
    DenseJob,
    ExtractJob,
    ExtractResult,
    FactorJob,
    FactorListJob,
    FactorPair,
    FactorStage,
    InnerJob,
    LowRankStage,
    MergeJob,
    Stage,
    SvdResult,
    TaskMergeJob,
)
from lorafuse.errors import LorafuseValueError

NAMES = ("auto", "cpu", "reference", "cuda")
ENV = "LORAFUSE_BACKEND"


@cache
def _make(name: str) -> Backend:
    if name == "cpu":
        from lorafuse.backends.cpu import CpuBackend

        return CpuBackend()
    if name == "reference":
        from lorafuse.backends.reference import ReferenceBackend

        return ReferenceBackend()
    if name == "cuda":
        raise LorafuseValueError("backend 'cuda': this build of lorafuse has no CUDA backend "
                                 "(build with LORAFUSE_CUDA=ON on a machine with the CUDA toolkit)")
    raise LorafuseValueError(f"unknown backend {name!r}: choose one of {', '.join(NAMES)}")


def get_backend(name: str = "auto") -> Backend:
    """The backend called `name`; 'auto' picks the best one built (LORAFUSE_BACKEND overrides)."""
    if not isinstance(name, str):
        raise LorafuseValueError(f"backend must be a name ({', '.join(NAMES)}), got {type(name).__name__}")
    name = name.strip().lower()
    if name == "auto":
        forced = os.environ.get(ENV, "").strip().lower()
        if forced and forced != "auto":
            return _make(forced)
        return _make("cpu")
    return _make(name)


def available_backends() -> list[str]:
    """The backends this build and machine can run."""
    found = []
    for name in ("cpu", "reference", "cuda"):
        try:
            _make(name)
        except (LorafuseValueError, ImportError):
            continue
        found.append(name)
    return found


__all__ = [
    "Backend", "DenseJob", "ExtractJob", "ExtractResult", "FactorJob", "FactorListJob", "FactorPair", "FactorStage",
    "InnerJob",
    "LowRankStage", "MergeJob", "Stage", "SvdResult", "TaskMergeJob", "available_backends", "get_backend",
]
