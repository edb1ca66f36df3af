# Type stubs of the compiled core (cpp/bindings/core_module.cpp, PYBIND11_MODULE at the end; the
# functions it shares with lorafuse._cuda are def_shared in cpp/bindings/convert.hpp).
#
# lorafuse/_core.py replaces itself in sys.modules with the variant built for this CPU
# (_core_generic, _core_avx2, _core_avx512 or _core_native); every variant exports what is
# declared here. Only lorafuse.backends imports it (tests/test_layers.py); everything else goes
# through lorafuse.backends (the operations, typed jobs) and lorafuse.backends.native.
#
# Raw buffers: any numpy array whose item size matches the safetensors dtype (BF16 travels as
# uint16, F8_E4M3 / F8_E5M2 as uint8). Factors and dense matrices: float32, C-contiguous.
# Errors are lorafuse.errors classes (LorafuseValueError, ShapeMismatchError, DtypeError,
# NonFiniteError, InputChangedError, DeviceError); `threads` is 0 (all hardware threads) .. MAX_THREADS.

from collections.abc import Sequence
from typing import Any

import numpy as np

isa: str  # "generic", "avx2", "avx512" or "native"
__version__: str

MAX_THREADS: int
MAX_RANK: int
MAX_OVERSAMPLE: int
MAX_POWER_ITERS: int

_F32 = np.ndarray  # float32 arrays
_Raw = np.ndarray  # raw buffers of a safetensors dtype

# (B, A, magnitude | None, column_norm) or (kind, factors, magnitude | None, column_norm), kind
# "lowrank" (B, A), "hadamard" (B1, A1, B2, A2) or "kron" (W1, W2[, row_offset]).
_Stage = tuple[Any, Any, _F32 | None, bool]
# (name, w, w_dtype, out, out_dtype, stages); out is written in place.
_MergeJob = tuple[str, _Raw, str, _Raw, str, Sequence[_Stage]]

def cpu_features() -> dict[str, bool]:
    """Instruction sets this CPU and OS support: {'avx2', 'f16c', 'avx512'}."""

def to_float32(raw: _Raw, dtype: str, threads: int = 0) -> _F32:
    """A raw buffer of F32 / F16 / BF16 / F64 / F8_E4M3 / F8_E5M2 as float32 (same shape)."""

def convert_into(jobs: Sequence[tuple[_Raw, str, _F32, bool]], threads: int = 0) -> None:
    """Each (raw, dtype, out, transpose): the 2-D raw buffer widened to float32 into `out` (transposed)."""

def sketch_fold(jobs: Sequence[tuple[Sequence[tuple[_Raw, str, _Raw, str, float]], str, _F32, np.ndarray]],
                threads: int = 0) -> None:
    """Each (terms, side, x, acc): acc += sum c B (A x) ('range') or sum c A^T (B^T x) ('corange')."""

def from_float32(x: _F32, dtype: str, threads: int = 0) -> np.ndarray:
    """float32 rounded to F32 / F16 / BF16 (nearest even): float32, float16 or uint16 (BF16)."""

def merge_batch(jobs: list[_MergeJob], threads: int = 0) -> list[bool]:
    """Fused W' = W + sum of stages (+ DoRA) per job into its out; per job, whether a value is
    NaN, Inf or overflows the output dtype."""

def factored_frobenius_sq(pairs: list[tuple[_F32, _F32]], threads: int = 0) -> np.ndarray:
    """||B A||_F^2 per (B, A) pair, float64."""

def factored_inner(items: list[tuple[_F32, _F32, _F32, _F32]], threads: int = 0) -> np.ndarray:
    """<B1 A1, B2 A2>_F per (B1, A1, B2, A2), float64."""

def hardware_threads() -> int: ...
def resolve_threads(threads: int) -> int:
    """The worker threads a `threads` argument runs (0: all; at most 4 per hardware thread)."""

def thread_start_failures() -> int: ...
def register_mapping(buffer: Any, label: bytes, path: bytes, dev: int, ino: int, file_size: int,
                     mtime_ns: int) -> int:
    """Guard reads of a memory-mapped file against SIGBUS; a slot, or -1 when the table is full."""

def unregister_mapping(slot: int) -> None: ...
def mapping_problem(slot: int) -> str:
    """'' while the mapping is sound, else why its data cannot be trusted (naming the file)."""

def mapping_faults() -> int: ...
def check_intact(arrays: Sequence[Any]) -> None:
    """InputChangedError if one of these arrays overlaps a guarded mapping that faulted (others are ignored)."""

def factored_svd(items: Sequence[tuple[str, _F32, _F32]], ranks: Sequence[int], split: str = "B",
                 threads: int = 0, mode: str = "exact", seed: int = 0, oversample: int = 10,
                 power_iters: int = 4) -> list[tuple[_F32, _F32, np.ndarray]]:
    """(B2 (out, k), A2 (k, in), S float64) per (name, B, A); S: all min(R, out, in) values on the
    exact path, the min(k, R, out, in) computed ones on the randomized path."""

def factored_svd_lists(items: Sequence[tuple[str, Sequence[tuple[_F32, _F32]], Sequence[float]]],
                       ranks: Sequence[int], split: str = "B", threads: int = 0, mode: str = "exact",
                       seed: int = 0, oversample: int = 10, power_iters: int = 4,
                       release: Sequence[Sequence[bool] | None] | None = None,
                       ) -> list[tuple[_F32, _F32, np.ndarray]]:
    """factored_svd of sum_i w_i B_i A_i from (name, [(B_i, A_i)], [w_i]) without stacking on the
    randomized path. release: per item None or one bool per pair, True only for read-only views of a
    file mapping (their pages are dropped from the resident set after each use; results unchanged)."""

def factored_svd_is_exact(out: int, in_: int, r: int, k: int, mode: str = "auto", oversample: int = 10,
                          power_iters: int = 4) -> bool: ...
def dense_svd_is_exact(out: int, in_: int, k: int, oversample: int = 10) -> bool:
    """(k + oversample) * 4 >= min(out, in)."""

def dense_svd(items: Sequence[tuple[str, _F32]], ranks: Sequence[int], split: str = "B", seed: int = 0,
              oversample: int = 10, power_iters: int = 4,
              threads: int = 0) -> list[tuple[_F32, _F32, np.ndarray]]:
    """(B2, A2, S (min(k, out, in) float64)) per (name, D)."""

def task_merge(items: Sequence[tuple[str, Sequence[_F32]]], weights: Sequence[Sequence[float]],
               prune: str = "none", density: float = 1.0, rescale: bool = False, merge: str = "sum",
               majority: str = "total", seed: int = 0, threads: int = 0) -> list[_F32]:
    """PEFT merge_utils semantics per (name, [t_1 .. t_n]); the merged float32 tensor per item."""

def extract_svd(items: Sequence[tuple[str, _Raw, str, _Raw, str]], ranks: Sequence[int], oversample: int = 10,
                power_iters: int = 2, seed: int = 0,
                threads: int = 0) -> list[tuple[_F32, _F32, np.ndarray, float]]:
    """(B (out, k) = U_k S_k, A (k, in) = V_k^T, S (min(k + oversample, out, in)) float64, frob_sq)
    per (name, w_base, base_dtype, w_ft, ft_dtype): D = w_ft - w_base, randomized, streamed."""
