"""Backends: where the math runs, behind one set of operations (`Backend`).

`get_backend("auto" | "cpu" | "reference" | "cuda")`. 'auto' is 'cpu' unless LORAFUSE_BACKEND
names another; the GPU runs only what is asked to run there (`--device cuda`, `device="cuda"`):
its float32 products sum in another order, so results may differ from the CPU's in the last bits,
and a run never changes that silently. Only this package imports the compiled modules.
"""

from __future__ import annotations

import os
from functools import cache

from lorafuse.backends.base import Backend
from lorafuse.backends.jobs import (
    ConvertJob,
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
    SketchJob,
    SketchTerm,
    Stage,
    SvdResult,
    TaskMergeJob,
)
from lorafuse.errors import DeviceError, LorafuseValueError

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
        from lorafuse.backends.cuda import CudaBackend

        return CudaBackend()
    raise LorafuseValueError(f"unknown backend {name!r}: choose one of {', '.join(NAMES)}")


def forced_backend() -> str | None:
    """The backend LORAFUSE_BACKEND names (None: unset, empty or 'auto'); any other value is a
    LorafuseValueError naming the variable, as LORAFUSE_ISA's is (a misspelt name is not ignored)."""
    forced = os.environ.get(ENV, "").strip().lower()
    if not forced or forced == "auto":
        return None
    if forced not in NAMES:
        raise LorafuseValueError(f"{ENV}: unknown backend {forced!r}: choose one of {', '.join(NAMES)} (or leave it "
                                 "unset)")
    return forced


def get_backend(name: str = "auto") -> Backend:
    """The backend called `name`; 'auto' picks the best one built (LORAFUSE_BACKEND overrides)."""
    if not isinstance(name, str):
        raise LorafuseValueError(f"backend must be a name ({', '.join(NAMES)}), got {type(name).__name__}")
    name = name.strip().lower()
    forced = forced_backend()  # checked whatever `name` is: a bad value is said, not ignored
    if name == "auto":
        return _make(forced or "cpu")
    return _make(name)


DEVICES = ("cpu", "cuda")


def check_device(device: str | None) -> str:
    """A `device` argument's name: 'cpu', 'cuda' ('cuda:0' and 'gpu' are aliases) or 'auto' (None); anything
    else raises LorafuseValueError. Says nothing about whether the device can run here (backend_for_device)."""
    if device is None:
        return "auto"
    if not isinstance(device, str):
        shown = repr(device)[:60]  # a torch.device('cuda') reads device(type='cuda'): say what was given, and the form
        raise LorafuseValueError(f"device must be 'cpu' or 'cuda' (a str), got {shown} (a {type(device).__name__})")
    name = device.strip().lower()
    if name in ("cuda:0", "gpu"):
        name = "cuda"
    if name not in DEVICES + ("auto",):
        raise LorafuseValueError(f"unknown device {device!r}: choose 'cpu' or 'cuda'")
    return name


def backend_for_device(device: str | None) -> Backend:
    """The backend a `device` argument names: 'cpu' or 'cuda' (or None / 'auto': get_backend('auto')).
    'cpu' is the compiled CPU core, or the float64 reference when LORAFUSE_BACKEND=reference (a host
    backend too); 'cuda' that cannot run here raises DeviceError saying why and what to do."""
    name = check_device(device)
    if name == "cpu" and forced_backend() == "reference":
        return _make("reference")  # the float64 reference runs on the host too: LORAFUSE_BACKEND still picks it
    return get_backend(name)


def available_backends() -> list[str]:
    """The backends this build and machine can run."""
    found = []
    for name in ("cpu", "reference", "cuda"):
        try:
            _make(name)
        except (LorafuseValueError, DeviceError, ImportError):
            continue
        found.append(name)
    return found


__all__ = [
    "Backend", "ConvertJob", "DenseJob", "ExtractJob", "ExtractResult", "FactorJob", "FactorListJob", "FactorPair",
    "FactorStage", "InnerJob",
    "LowRankStage", "MergeJob", "SketchJob", "SketchTerm", "Stage", "SvdResult", "TaskMergeJob", "available_backends",
    "backend_for_device",
    "check_device",
    "forced_backend", "get_backend",
]
