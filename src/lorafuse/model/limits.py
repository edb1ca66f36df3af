"""Limits of what lorafuse forms for one module, and the small helpers the structured math shares.

The tunables here (DENSE_SLOWDOWN, SMALL_FACTORS, ...) are read at call time as `limits.NAME`, so a
test may set them on this module.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from lorafuse.errors import UnsupportedError
from lorafuse.io.tensor import Tensor

MAX_DELTA_ELEMENTS = 1 << 32  # a larger delta (16 GiB in float32) is a corrupt or hostile file
# The largest dense array lorafuse forms in Python for one module: an exact factorization, a dense
# half of a LoKr, a contracted Tucker factor, a dense delta (1 GiB of float32). A merge into a base
# weight writes that weight, which may be larger: its kernels work in row blocks.
MAX_DENSE_ELEMENTS = 1 << 28
MAX_CORE_RANK = 2048  # k x k Gram / core matrices of the structured spectra and rank-k approximations
MAX_WORK = 1 << 42  # floating-point operations of one structured pass over one module (minutes)
TILE_ELEMENTS = 1 << 21  # working tiles of the structured passes (16 MiB of float64)
# Dense tiles multiply through rank-r inner dimensions and then stream every element: measured about
# 6x slower per flop than the Gram products of the structured paths, which the cost estimates weigh in.
DENSE_SLOWDOWN = 6.0
SMALL_FACTORS = 1 << 24  # LoHa exact factorizations up to this size convert through the core's QR + SVD
EPS = float(np.finfo(np.float64).eps)


def elements(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def shape_text(shape: Sequence[int]) -> str:
    return " x ".join(str(int(s)) for s in shape)


def check_dense(where: str, what: str, shape: Sequence[int]) -> None:
    """Refuse, before allocating it, a dense array of `shape` over MAX_DENSE_ELEMENTS elements."""
    n = elements(shape)
    if n > MAX_DENSE_ELEMENTS:
        raise UnsupportedError(
            f"{where}: {what} needs a dense {shape_text(shape)} array ({n:,} elements), more than the "
            f"{MAX_DENSE_ELEMENTS:,} elements (1 GiB of float32) lorafuse allows for one module; the module is "
            "refused rather than exhaust memory (no real adapter module needs that much: is the file corrupt?)")


def check_work(where: str, what: str, flops: float) -> None:
    if flops > MAX_WORK:
        raise UnsupportedError(
            f"{where}: {what} would take about {flops:.3g} floating-point operations, more than the {MAX_WORK:.3g} "
            "lorafuse allows for one module (hours of work): the module is refused (is the file corrupt?)")


def check_core(where: str, what: str, k: int) -> None:
    if k > MAX_CORE_RANK:
        raise UnsupportedError(
            f"{where}: {what} needs an eigen- or singular value decomposition of a {k} x {k} matrix, more than "
            f"the {MAX_CORE_RANK} x {MAX_CORE_RANK} lorafuse allows for one module: the module is refused")


def steps(total: int, step: int) -> Iterator[tuple[int, int]]:
    step = max(1, int(step))
    for start in range(0, total, step):
        yield start, min(total, start + step)


def f64(t: Tensor, shape: tuple[int, ...]) -> np.ndarray:
    return np.ascontiguousarray(t.f32().reshape(shape), dtype=np.float64)
