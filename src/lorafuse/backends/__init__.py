"""Backends: where the math runs, behind one set of operations (`Backend`).

`get_backend("auto" | "cpu" | "reference" | "cuda")`. 'auto' is 'cpu' unless LORAFUSE_BACKEND
names another; the GPU runs only what is asked to run there (`--device cuda`, `device="cuda"`):
its float32 products sum in another order, so results may differ from the CPU's in the last bits,
and a run never changes that silently. LORAFUSE_BACKEND=cuda therefore refuses a 'cpu' device (backend_for_device)
rather than compute there; a DeviceError says what to do as the GPU was asked for (--device, or the variable).
Only this package imports the compiled modules.
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
    given = os.environ.get(ENV, "").strip()
    forced = given.lower()
    if not forced or forced == "auto":
        return None
    if forced not in NAMES:  # the value as set: LORAFUSE_BACKEND=GPU is said as 'GPU'
        raise LorafuseValueError(f"{ENV}: unknown backend {given!r}: choose one of {', '.join(NAMES)} (or leave it "
                                 "unset)")
    return forced


def _cuda(by_env: bool) -> Backend:
    """The 'cuda' backend. Where it cannot run, the DeviceError's advice fits how it was asked for while
    LORAFUSE_BACKEND=cuda is set: by that variable alone (`by_env`: a command without --device, such as info
    or similarity), or by a device that --device cpu would replace only once the variable is unset."""
    try:
        return _make("cuda")
    except DeviceError:
        if forced_backend() != "cuda":
            raise
    from lorafuse.backends.cuda import RUN_ON_CPU, unavailable

    instead = f"unset {ENV} (or set it to cpu) to run on the CPU" if by_env else f"unset {ENV} and {RUN_ON_CPU}"
    why = unavailable(instead)
    if not why:  # it can run after all (a second try): as get_backend('cuda') gives it
        return _make("cuda")
    raise DeviceError(f"{ENV}=cuda names the GPU, which cannot run here: {why}" if by_env else why) from None


def get_backend(name: str = "auto") -> Backend:
    """The backend called `name`; 'auto' picks the best one built (LORAFUSE_BACKEND overrides)."""
    if not isinstance(name, str):
        raise LorafuseValueError(f"backend must be a name ({', '.join(NAMES)}), got {type(name).__name__}")
    given, name = name, name.strip().lower()
    forced = forced_backend()  # checked whatever `name` is: a bad value is said, not ignored
    if name not in NAMES:
        raise LorafuseValueError(f"unknown backend {given!r}: choose one of {', '.join(NAMES)}")
    if name == "auto" and forced == "cuda":
        return _cuda(by_env=True)
    if name == "auto":
        return _make(forced or "cpu")
    return _cuda(by_env=False) if name == "cuda" else _make(name)


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
    if name.startswith("cuda:") and name[5:].isdigit():  # the module runs on its device 0
        raise LorafuseValueError(f"unknown device {device!r}: lorafuse runs on one GPU, 'cuda' (the first one CUDA "
                                 f"sees): choose 'cuda' with CUDA_VISIBLE_DEVICES={int(name[5:])}, or 'cpu'")
    if name not in DEVICES + ("auto",):
        raise LorafuseValueError(f"unknown device {device!r}: choose 'cpu' or 'cuda'")
    return name


def backend_for_device(device: str | None) -> Backend:
    """The backend a `device` argument names: 'cpu' or 'cuda' (or None / 'auto': get_backend('auto')).
    'cpu' is the compiled CPU core, or the float64 reference when LORAFUSE_BACKEND=reference (a host
    backend too; LORAFUSE_BACKEND=cuda refuses it, as the CLI does); 'cuda' that cannot run here raises
    DeviceError saying why and what to do."""
    name = check_device(device)
    forced = forced_backend()
    if name == "cpu" and forced == "reference":
        return _make("reference")  # the float64 reference runs on the host too: LORAFUSE_BACKEND still picks it
    if name == "cpu" and forced == "cuda":  # as the CLI refuses it: the math would run on the CPU, unsaid
        raise LorafuseValueError(f"{ENV}=cuda names the GPU, but the device is 'cpu' (the default where none is "
                                 "given): give --device cuda (Python: device='cuda') to compute on the GPU, or unset "
                                 f"{ENV} (or set it to cpu or reference) to compute on the CPU")
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
