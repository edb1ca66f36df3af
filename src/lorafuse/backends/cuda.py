"""The 'cuda' backend: the compiled CUDA module `lorafuse._cuda` (cpp/cuda), the CPU core's operations on
one NVIDIA GPU.

Inputs and outputs stay numpy arrays in host memory (often mappings of the input files): each operation
copies what it needs to the GPU through pinned buffers and its results back. The argument checks and the
conventions are the CPU core's own code (the module links it), so a job that the 'cpu' backend refuses is
refused here with the same message. `task_merge` (elementwise and memory-bound) runs on the CPU core.

Loading needs the module (built when nvcc and cuBLAS / cuSOLVER were found: docs/building.md), the
NVIDIA libraries (`pip install "lorafuse[cuda]"` brings cuBLAS and cuSOLVER) and a driver with a GPU;
`unavailable()` says which one is missing.
"""

from __future__ import annotations

import ctypes
import glob
import importlib
import importlib.util
import os
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any, TypeVar

import numpy as np

from lorafuse.backends import native
from lorafuse.backends.jobs import (
    ConvertJob,
    DenseJob,
    ExtractJob,
    ExtractResult,
    FactorJob,
    FactorListJob,
    FactorPair,
    InnerJob,
    MergeJob,
    SketchJob,
    SvdResult,
    TaskMergeJob,
)
from lorafuse.backends.pages import check_no_overlap
from lorafuse.errors import DeviceError

T = TypeVar("T")

RUN_ON_CPU = "run with --device cpu (Python: device='cpu')"
BUILD = ('build lorafuse with CUDA on a machine with nvcc: pip install "lorafuse[cuda]" with LORAFUSE_CUDA=ON '
         "(docs/building.md)")

# cuSOLVER needs cuBLAS, cuBLASLt, cuSPARSE and nvJitLink; loaded in this order when the module's RPATH
# does not reach the pip packages (a wheel installed into another prefix, a build tree on sys.path).
_NVIDIA_LIBS = ("nvJitLink", "cublasLt", "cublas", "cusparse", "cusolver")


def _nvidia_lib_dirs() -> list[str]:
    """The lib folders of NVIDIA's pip packages (nvidia/cu13/lib, nvidia/<name>/lib), if installed."""
    spec = importlib.util.find_spec("nvidia")  # a namespace package: no import needed, typed or not
    if spec is None:
        return []
    dirs: list[str] = []
    for root in spec.submodule_search_locations or []:
        dirs += sorted(glob.glob(os.path.join(root, "cu*", "lib")))
        dirs += sorted(glob.glob(os.path.join(root, "*", "lib")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _preload_nvidia() -> None:
    """Loads the pip packages' cuBLAS / cuSOLVER (and what they need) into the process, so the module's
    references resolve whatever its RPATH says; libraries that are not there are left to the loader."""
    dirs = _nvidia_lib_dirs()
    for lib in _NVIDIA_LIBS:
        for d in dirs:
            found = sorted(glob.glob(os.path.join(d, f"lib{lib}.so*")))
            if found:
                try:
                    ctypes.CDLL(found[0], mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    pass
                break


def load_module(instead: str = RUN_ON_CPU) -> ModuleType:
    """lorafuse._cuda, or DeviceError saying why it cannot be loaded and what to do (`instead`: the way to run
    without it, as the caller reached the GPU: by --device, or by LORAFUSE_BACKEND)."""
    not_built = DeviceError("backend 'cuda': this build of lorafuse has no CUDA backend (it was built without "
                            f"nvcc or without cuBLAS / cuSOLVER); {BUILD}, or {instead}")
    try:
        return importlib.import_module("lorafuse._cuda")
    except ModuleNotFoundError as e:
        if e.name == "lorafuse._cuda":  # not built: NVIDIA's libraries (~200 MiB mapped) would load for nothing
            raise not_built from None
    except ImportError:
        pass
    _preload_nvidia()
    try:
        return importlib.import_module("lorafuse._cuda")
    except ModuleNotFoundError:
        raise not_built from None
    except ImportError as e:
        raise DeviceError(f"backend 'cuda': lorafuse's CUDA module is built but cannot be loaded ({e}); install "
                          f'the NVIDIA libraries it needs with pip install "lorafuse[cuda]", or {instead}') from None


def unavailable(instead: str = RUN_ON_CPU) -> str:
    """'' when the CUDA backend can run here, else why not and what to do: the message of the DeviceError
    that get_backend('cuda') raises."""
    try:
        CudaBackend(instead)
    except DeviceError as e:
        return str(e)
    return ""


def _arrays(obj: object) -> Iterator[np.ndarray]:
    """Every numpy array inside nested tuples and lists (a job's inputs)."""
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _arrays(x)


class CudaBackend:
    name = "cuda"

    def __init__(self, instead: str = RUN_ON_CPU) -> None:
        self._mod: Any = load_module(instead)
        why = str(self._mod.unavailable_reason())
        if why:
            raise DeviceError(f"backend 'cuda': {why}; {instead}")
        self.device = str(self._mod.device_description(0))

    def _run(self, inputs: object, fn: Callable[[], T]) -> T:
        """fn(), refused as the CPU core refuses it when a mapped input faulted while it was read (a file
        truncated or rewritten meanwhile reads as zeros): InputChangedError, also in place of an error
        that the changed input explains. lorafuse._core keeps the fault table of every mapping."""
        try:
            result = fn()
        except Exception:
            if native.mapping_faults():
                native.core.check_intact(list(_arrays(inputs)))
            raise
        if native.mapping_faults():
            native.core.check_intact(list(_arrays(inputs)))
        return result

    def to_float32(self, raw: np.ndarray, dtype: str, threads: int = 0) -> np.ndarray:
        return self._run(raw, lambda: self._mod.to_float32(raw, dtype, threads))

    def from_float32(self, x: np.ndarray, dtype: str, threads: int = 0) -> np.ndarray:
        return self._run(x, lambda: self._mod.from_float32(x, dtype, threads))

    def convert_into(self, jobs: Sequence[ConvertJob], threads: int = 0) -> None:
        # Host arrays into host arrays (the streamed combine's factor stacks): the CPU core's conversion.
        native.core.convert_into(list(jobs), threads)

    def sketch_fold(self, jobs: Sequence[SketchJob], threads: int = 0) -> None:
        # Host arrays into host arrays (the streamed combine's chunk of factors, read from files): the CPU core's.
        native.core.sketch_fold(list(jobs), threads)

    def merge_batch(self, jobs: Sequence[MergeJob], threads: int = 0) -> list[bool]:
        for j in jobs:  # as the 'cpu' backend: each piece's output is written back while the next is read
            check_no_overlap(j)
        if not jobs:
            return []
        return list(self._run(jobs, lambda: self._mod.merge_batch(list(jobs), threads)))

    def frobenius_sq(self, pairs: Sequence[FactorPair], threads: int = 0) -> np.ndarray:
        return self._run(pairs, lambda: self._mod.factored_frobenius_sq(list(pairs), threads))

    def inner(self, jobs: Sequence[InnerJob], threads: int = 0) -> np.ndarray:
        return self._run(jobs, lambda: self._mod.factored_inner(list(jobs), threads))

    def factored_svd(self, jobs: Sequence[FactorJob], ranks: Sequence[int], split: str = "B", threads: int = 0,
                     mode: str = "exact", seed: int = 0, oversample: int = 10,
                     power_iters: int = 4) -> list[SvdResult]:
        out = self._run(jobs, lambda: self._mod.factored_svd(list(jobs), list(ranks), split, threads, mode=mode,
                                                             seed=seed, oversample=oversample,
                                                             power_iters=power_iters))
        return [SvdResult(*r) for r in out]

    def factored_svd_lists(self, jobs: Sequence[FactorListJob], ranks: Sequence[int], split: str = "B",
                           threads: int = 0, mode: str = "exact", seed: int = 0, oversample: int = 10,
                           power_iters: int = 4,
                           release: Sequence[Sequence[bool] | None] | None = None) -> list[SvdResult]:
        # `release` (dropping mapped pages after each use) bounds the CPU path's resident set; here each
        # job's factors are copied to the device once, so it has nothing to do.
        out = self._run(jobs, lambda: self._mod.factored_svd_lists(list(jobs), list(ranks), split, threads,
                                                                   mode=mode, seed=seed, oversample=oversample,
                                                                   power_iters=power_iters))
        return [SvdResult(*r) for r in out]

    def factored_svd_is_exact(self, out: int, in_: int, r: int, k: int, mode: str = "auto",
                              oversample: int = 10, power_iters: int = 4) -> bool:
        return bool(native.core.factored_svd_is_exact(out, in_, r, k, mode, oversample, power_iters))

    def dense_svd(self, jobs: Sequence[DenseJob], ranks: Sequence[int], split: str = "B", seed: int = 0,
                  oversample: int = 10, power_iters: int = 4, threads: int = 0) -> list[SvdResult]:
        out = self._run(jobs, lambda: self._mod.dense_svd(list(jobs), list(ranks), split, seed, oversample,
                                                          power_iters, threads))
        return [SvdResult(*r) for r in out]

    def dense_svd_is_exact(self, out: int, in_: int, k: int, oversample: int = 10) -> bool:
        return bool(native.core.dense_svd_is_exact(out, in_, k, oversample))

    def task_merge(self, jobs: Sequence[TaskMergeJob], weights: Sequence[Sequence[float]], prune: str = "none",
                   density: float = 1.0, rescale: bool = False, merge: str = "sum", majority: str = "total",
                   seed: int = 0, threads: int = 0) -> list[np.ndarray]:
        # Elementwise and memory-bound: the CPU core's kernel (the same semantics, the same random drops).
        return list(native.core.task_merge(list(jobs), list(weights), prune, density, rescale, merge, majority,
                                           seed, threads))

    def extract_svd(self, jobs: Sequence[ExtractJob], ranks: Sequence[int], oversample: int = 10,
                    power_iters: int = 2, seed: int = 0, threads: int = 0) -> list[ExtractResult]:
        out = self._run(jobs, lambda: self._mod.extract_svd(list(jobs), list(ranks), oversample, power_iters,
                                                            seed, threads))
        return [ExtractResult(b, a, s, float(f)) for b, a, s, f in out]
