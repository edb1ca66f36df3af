"""The numerics of the 'reference' backend (lorafuse.backends.reference): numpy float64 dtype
conversion, truncated SVD with the core's conventions, the core's path rules and random stream."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lorafuse.backends.jobs import SvdResult
from lorafuse.errors import DtypeError, LorafuseValueError

# ---------------------------------------------------------------- dtypes

ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
WRITABLE = ("F32", "F16", "BF16")
# Largest float32 magnitudes that stay finite in each writable dtype: at or above the threshold a
# value rounds to Inf (F16: 65520 is halfway between 65504 and 2^16; BF16: halfway above 0x7F7F).
OVERFLOW = {
    "F32": np.float32(np.inf),
    "F16": np.float32(65520.0),
    "BF16": np.uint32(0x7F7F8000).view(np.float32),
}


def check_dtype(dtype: str) -> str:
    if dtype not in ITEMSIZE:
        raise DtypeError(f"unsupported dtype '{dtype}' (the core handles F32, F16, BF16, F64, F8_E4M3, F8_E5M2)")
    return dtype


def _e4m3_table() -> np.ndarray:
    b = np.arange(256)
    exp, mant = (b >> 3) & 0xF, b & 0x7
    value = np.where(exp == 0, mant * 2.0**-9, (1.0 + mant / 8.0) * np.exp2(exp - 7.0))
    value = np.where((exp == 0xF) & (mant == 0x7), np.nan, value)
    return np.where(b >> 7 == 1, -value, value).astype(np.float32)  # negation: a NaN keeps the sign bit too


def _e5m2_table() -> np.ndarray:
    return (np.arange(256, dtype=np.uint16) << 8).view(np.float16).astype(np.float32)


_F8 = {"F8_E4M3": _e4m3_table(), "F8_E5M2": _e5m2_table()}


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Raw elements of `dtype` (BF16 as uint16, F8 as uint8) as float32: exact, except F64 (rounded)."""
    check_dtype(dtype)
    raw = np.ascontiguousarray(raw)
    if raw.dtype.itemsize != ITEMSIZE[dtype]:
        raise DtypeError(f"to_float32 input: buffer item size {raw.dtype.itemsize} does not match dtype {dtype}")
    if dtype == "F32":
        return raw.view(np.float32).copy()
    if dtype == "F16":
        return raw.view(np.float16).astype(np.float32)
    if dtype == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype == "F64":
        with np.errstate(over="ignore"):
            return raw.view(np.float64).astype(np.float32)
    return _F8[dtype][raw.view(np.uint8)]


def _to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> BF16 bits by choosing the nearer of the two neighbouring BF16 values (ties: even)."""
    u = x.view(np.uint32)
    sign = (u >> 16) & np.uint32(0x8000)
    mag = u & np.uint32(0x7FFFFFFF)
    lo = mag & np.uint32(0xFFFF0000)
    hi = lo + np.uint32(0x10000)
    with np.errstate(invalid="ignore"):
        lo_v = lo.view(np.float32).astype(np.float64)
        hi_v = np.where(hi == 0x7F800000, 2.0**128, hi.view(np.float32).astype(np.float64))  # Inf: one ulp above max
        v = mag.view(np.float32).astype(np.float64)
        up = (hi_v - v < v - lo_v) | ((hi_v - v == v - lo_v) & ((lo >> 16) & 1 == 1))
    bits = np.where(up & (mag < 0x7F800000), hi, lo) >> 16
    nan = mag > 0x7F800000
    bits = np.where(nan, (u >> 16) | np.uint32(0x0040), bits | sign)
    return bits.astype(np.uint16)


def from_float32(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 rounded to F32 / F16 / BF16 (nearest even); F16 as float16, BF16 as uint16."""
    check_dtype(dtype)
    if dtype not in WRITABLE:
        raise DtypeError(f"cannot write dtype {dtype} (lorafuse writes F32, F16 and BF16)")
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise DtypeError("from_float32 input must be a float32 numpy array")
    x = np.ascontiguousarray(x)
    if dtype == "F32":
        return x.copy()
    if dtype == "BF16":
        return _to_bf16(x)
    with np.errstate(over="ignore", invalid="ignore"):
        h = x.astype(np.float16)  # numpy rounds to nearest even, subnormals and overflow included
    nan = np.isnan(x)
    if nan.any():
        bits = h.view(np.uint16)
        sign = ((x.view(np.uint32) >> 16) & 0x8000).astype(np.uint16)
        h = np.where(nan, sign | np.uint16(0x7E00), bits).astype(np.uint16).view(np.float16)
    return h


# ---------------------------------------------------------------- SVD helpers

_AUTO_EXACT_FACTOR = 1.5  # svd.hpp kAutoExactFactor


def _exact_factored_cost(out: int, in_: int, r: int, k: int) -> float:
    o, i, rr = float(out), float(in_), float(r)
    m = min(o, i)
    if rr >= m:
        return 1.2e-10 * o * i * rr + 7.3e-10 * o * i * m
    return 1.2e-10 * (o + i) * rr * rr + 5.6e-10 * rr**3 + 4e-10 * (o + i) * rr * k


def _randomized_factored_cost(out: int, in_: int, r: int, k: int, oversample: int, power_iters: int) -> float:
    o, i, rr = float(out), float(in_), float(r)
    ll = min(float(k + oversample), rr, o, i)
    products = float(2 * power_iters + 2)
    return 3e-11 * (o + i) * rr * ll * products + 2.5e-10 * (o + i) * ll * ll * products + 5.6e-10 * ll**3


def factored_is_exact(out: int, in_: int, r: int, k: int, mode: str, oversample: int, power_iters: int) -> bool:
    """The cpu backend's path rule (cpp/src/svd.cpp factored_svd_is_exact, copied with its cost model)."""
    if mode not in ("exact", "auto", "randomized"):
        raise LorafuseValueError(f"unknown mode '{mode}' (expected 'exact', 'auto' or 'randomized')")
    if mode == "exact" or k + oversample >= min(r, out, in_):
        return True
    if mode == "randomized":
        return False
    return _exact_factored_cost(out, in_, r, k) <= _AUTO_EXACT_FACTOR * _randomized_factored_cost(
        out, in_, r, k, oversample, power_iters)


def dense_is_exact(out: int, in_: int, k: int, oversample: int) -> bool:
    """cpp/src/svd.cpp dense_svd_is_exact: (k + oversample) * 4 >= min(out, in)."""
    return k + oversample >= (min(out, in_) + 3) // 4


def check_split(split: str) -> None:
    if split not in ("B", "sqrt"):
        raise LorafuseValueError(f"unknown split '{split}' (expected 'B' or 'sqrt')")


def check_rank(k: object, name: str) -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
        raise LorafuseValueError(f"{name}: rank must be an integer >= 1, got {k!r}")
    return int(k)


def check_ranks(ranks: Sequence[int], n: int, fn: str) -> list[int]:
    if len(ranks) != n:
        raise LorafuseValueError(f"{fn}: {len(ranks)} ranks for {n} items")
    return list(ranks)


def raw_f32(x: np.ndarray, dtype: str, what: str) -> np.ndarray:
    """x as float32 after the checks of a raw buffer of `dtype` (the cpu backend's words)."""
    check_dtype(dtype)
    if x.dtype.itemsize != ITEMSIZE[dtype]:
        raise DtypeError(f"{what}: buffer item size {x.dtype.itemsize} does not match dtype {dtype}")
    return to_float32(x, dtype)


def f32(x: object, what: str) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise DtypeError(f"{what} must be a float32 numpy array")
    return x


def shape_str(a: np.ndarray) -> str:
    return "(" + ", ".join(str(d) for d in a.shape) + ("," if a.ndim == 1 else "") + ")"


def _fix_signs(u: np.ndarray, v: np.ndarray) -> None:
    """Flip columns so the entry of largest magnitude of each column of u is positive (first on ties)."""
    if u.shape[0] == 0 or u.shape[1] == 0:
        return
    best = np.argmax(np.abs(u), axis=0)
    flip = u[best, np.arange(u.shape[1])] < 0
    u[:, flip] *= -1.0
    v[:, flip] *= -1.0


def truncated(d: np.ndarray, k: int, s_len: int, split: str, zero_null: bool = False,
               kmax: int | None = None) -> SvdResult:
    """B (out x k), A (k x in) float32 of the best rank-k approximation of d (float64), its s_len
    leading singular values (zeros past the last one); at most kmax vectors (the factors' rank), a
    zero singular value's vectors zeroed with zero_null (extract)."""
    out, in_ = d.shape
    b = np.zeros((out, k), dtype=np.float32)
    a = np.zeros((k, in_), dtype=np.float32)
    s_out = np.zeros(s_len, dtype=np.float64)
    if min(out, in_) == 0 or s_len == 0:
        return SvdResult(b, a, s_out)
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    n = min(s_len, len(s))
    s_out[:n] = s[:n]
    kk = min(k, len(s), s_len if zero_null else len(s), len(s) if kmax is None else kmax)
    u, v = u[:, :kk].copy(), vt[:kk].T.copy()
    _fix_signs(u, v)
    sk = s[:kk]
    if zero_null:
        keep = sk > 0
        u, v, sk = u * keep, v * keep, np.where(keep, sk, 0.0)
    left, right = (sk, np.ones_like(sk)) if split == "B" else (np.sqrt(sk), np.sqrt(sk))
    b[:, :kk] = u * left
    a[:kk] = (v * right).T
    return SvdResult(b, a, s_out)


# ---------------------------------------------------------------- task merge: the core's random stream

_M64 = (1 << 64) - 1
_PRUNE_DOMAIN = 0x7072756E65000001  # cpp/src/taskmerge.cpp kPruneDomain


def _mix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _mix64_array(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 arrays (numpy's array arithmetic wraps modulo 2^64)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _derive(key: int, word: int) -> int:
    return _mix64(key ^ _mix64(word & _M64))


def _name_hash(name: str) -> int:
    h = 0xCBF29CE484222325
    for c in name.encode("utf-8"):
        h = ((h ^ c) * 0x100000001B3) & _M64
    return h


def random_keep(seed: int, name: str, index: int, numel: int, density: float) -> np.ndarray:
    """The random-pruning mask of task tensor `index` of module `name` (rng.hpp: uniform01 of
    counter_bits(key, element) < density)."""
    key = _derive(_derive(_derive(_derive(0, seed), _PRUNE_DOMAIN), _name_hash(name)), index)
    bits = _mix64_array(np.uint64(key) ^ _mix64_array(np.arange(numel, dtype=np.uint64)))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53 < density


def magnitude_keep(t: np.ndarray, density: float) -> np.ndarray:
    numel = t.size
    kd = density * float(numel)
    k = numel if kd >= numel else int(kd)
    keep = np.zeros(numel, dtype=bool)
    if k > 0:
        keep[np.argsort(-np.abs(t), kind="stable")[:k]] = True  # stable: ties keep the lowest indices
    return keep
