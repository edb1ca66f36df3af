"""bitsandbytes 4-bit (nf4 / fp4) and 8-bit (LLM.int8) weights as transformers saves them: pure numpy.

Layout of one 4-bit weight `X.weight` (bitsandbytes `Linear4bit._save_to_state_dict`, which writes
`QuantState.as_dict(packed=True)` under `X.weight.`; transformers' `save_pretrained` keeps those keys):

- `X.weight`: the 4-bit codes, two per byte, the first element of each pair in the high nibble, over the
  weight flattened in C order; shape `[ceil(n / 2) / k, 1]` where the bytes are viewed as the
  `bnb_4bit_quant_storage` type of k bytes (uint8 by default; bf16 / fp16 / fp32 for FSDP).
- `X.weight.absmax`: one scale per block of `blocksize` consecutive elements of the flattened weight
  (float32), or, with nested ("double") quantization, those scales minus their mean, quantized to 8 bits
  (uint8 codes into `nested_quant_map`).
- `X.weight.quant_map`: the 16 code values of the quant type (float32). bitsandbytes itself never reads
  it back (its kernels use the fixed nf4 / fp4 tables); lorafuse checks that it is that table.
- `X.weight.nested_absmax` (float32, one per 256 absmax codes) and `X.weight.nested_quant_map` (the 256
  values of bitsandbytes' signed dynamic 8-bit map): nested quantization only.
- `X.weight.quant_state.bitsandbytes__nf4` (or `__fp4`): uint8 bytes of a JSON object with `quant_type`,
  `blocksize`, `dtype` (the weight's dtype before quantization: 'bfloat16', 'float16', 'float32'),
  `shape`, and when nested `nested_blocksize`, `nested_dtype` ('float32'), `nested_offset` (the mean
  subtracted before quantizing the absmax, a float).

Dequantization (bitsandbytes `functional.dequantize_4bit`, its reference kernel in backends/default and
its CUDA kernel): `W.flat[i] = table[code(i)] * absmax[i // blocksize]`, in float32, then cast to `dtype`;
with nested quantization `absmax[b] = nested_quant_map[absmax_code[b]] * nested_absmax[b // 256] +
nested_offset` (float32; `functional.dequantize_blockwise` + `offset`). Two known quirks of bitsandbytes'
native CPU kernel (0.50) that lorafuse does not copy: its AVX-512 path indexes absmax per row, so it returns
wrong values when the last dimension is a multiple of 16 but not of blocksize; and its scalar path decodes
fp4 code 8 as -0.0 where the table (and the reference kernel) hold +0.0.

An 8-bit weight `X.weight` is int8 `[out, in]` beside `X.SCB` (float32 `[out]`, each row's absmax) and
`X.weight_format` (a uint8 scalar, 0 = row-major, the only layout bitsandbytes still writes or reads):
`W = (int8 * SCB[:, None]) * float32(1 / 127)` (bitsandbytes `int8_vectorwise_dequant`, which transformers'
`dequantize_bnb_weight` calls).

Everything here is numpy, vectorized (table lookups, no per-element Python); bitsandbytes is only the
reference the tests compare against (tests/test_quant_bnb.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from lorafuse.errors import FormatError, LorafuseValueError, UnsupportedError

# ---------------------------------------------------------------- names

# Tensor names after a 4-bit weight's own name (`X.weight` + suffix).
BNB4_WEIGHT_SUFFIXES: tuple[str, ...] = (
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_state.bitsandbytes__nf4",
    ".quant_state.bitsandbytes__fp4",
)
# Tensor names after an 8-bit weight's module prefix (`X.` + suffix, beside `X.weight`).
BNB8_MODULE_SUFFIXES: tuple[str, ...] = ("SCB", "weight_format")
# Every companion ending, after the module prefix `X.`: what marks a tensor as part of a bitsandbytes weight.
BNB_COMPANION_SUFFIXES: tuple[str, ...] = tuple("weight" + s for s in BNB4_WEIGHT_SUFFIXES) + BNB8_MODULE_SUFFIXES

QUANT_STATE_PREFIX = ".quant_state.bitsandbytes__"
QUANT_TYPES = ("nf4", "fp4")
# bitsandbytes' quantize_4bit / dequantize_4bit accept these block sizes.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256  # quantize_4bit(compress_statistics=True) quantizes absmax in blocks of 256
WEIGHT_DTYPES = ("bfloat16", "float16", "float32")
# quant_storage name -> (safetensors dtype, numpy type of the raw elements; BF16 as uint16 as in lorafuse.io)
QUANT_STORAGE: dict[str, tuple[str, np.dtype[Any]]] = {
    "uint8": ("U8", np.dtype(np.uint8)),
    "int8": ("I8", np.dtype(np.int8)),
    "bfloat16": ("BF16", np.dtype("<u2")),
    "float16": ("F16", np.dtype("<f2")),
    "float32": ("F32", np.dtype("<f4")),
}
_INT8_SCALE = np.float32(7.874015718698502e-3)  # float32(1 / 127), the constant bitsandbytes multiplies by

# ---------------------------------------------------------------- tables

# nf4: bitsandbytes' `get_4bit_type('nf4')` (quantiles of N(0, 1), normalized to [-1, 1]), float32.
_NF4 = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    dtype=np.float32,
)
# fp4 (1 sign, 2 exponent, 1 mantissa bit, bias 2), in code order, divided by its largest magnitude (12)
# in float32 as `get_4bit_type('fp4')` does. Code 8 is +0.0 (the table and the CPU kernel agree).
_FP4 = (np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3], dtype=np.float32)
        / np.float32(12.0)).astype(np.float32)
_TABLES: dict[str, NDArray[np.float32]] = {"nf4": _NF4, "fp4": _FP4}


_MAX_BLOCKSIZE = 1 << 16  # bitsandbytes' blocksizes are 64 .. 4096; far more is a hostile or broken file


def code_table(quant_type: str) -> NDArray[np.float32]:
    """The 16 float32 values of nf4 or fp4, indexed by 4-bit code (bitsandbytes' `get_4bit_type`)."""
    if quant_type not in _TABLES:
        raise LorafuseValueError(f"bitsandbytes 4-bit quant_type {quant_type!r} is not one of {', '.join(QUANT_TYPES)}")
    return _TABLES[quant_type].copy()


def _pair_table(quant_type: str) -> NDArray[np.float32]:
    """byte -> (value of its high nibble, value of its low nibble): one gather decodes two elements."""
    t = _TABLES[quant_type]
    b = np.arange(256)
    return np.stack([t[b >> 4], t[b & 15]], axis=1).astype(np.float32)


_PAIRS: dict[str, NDArray[np.float32]] = {q: _pair_table(q) for q in QUANT_TYPES}


def _quantize_bounds(quant_type: str) -> tuple[NDArray[np.float32], NDArray[np.intp]]:
    """Decision bounds of bitsandbytes' default `quantize_4bit`: midpoints (float32) of the sorted table,
    and the code of each sorted position (a stable sort: fp4's two zeros keep code order, 0 then 8)."""
    t = _TABLES[quant_type]
    order = np.argsort(t, kind="stable")
    s = t[order]
    return ((s[:-1] + s[1:]) / np.float32(2.0)).astype(np.float32), order


_BOUNDS = {q: _quantize_bounds(q) for q in QUANT_TYPES}


def _linspace_f32(start: float, end: float, steps: int) -> NDArray[np.float32]:
    """torch.linspace(start, end, steps, dtype=float32) on CPU: step = (end - start) / (steps - 1) in float32, the
    first half start + step * i, the second end - step * (steps - 1 - i), each a fused multiply-add (exact in
    float64, rounded once)."""
    a, b = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([a], dtype=np.float32)
    step = np.float64(np.float32((b - a) / np.float32(steps - 1)))
    i = np.arange(steps, dtype=np.float64)
    lo = np.float64(a) + step * i
    hi = np.float64(b) - step * (steps - 1 - i)
    return np.where(i < steps // 2, lo, hi).astype(np.float32)


def dynamic_map() -> NDArray[np.float32]:
    """bitsandbytes' signed dynamic 8-bit map, `create_dynamic_map()` (7 exponent bits: for i in 0..6 the midpoints
    of torch.linspace(0.1, 1, 2**i + 1) times 10**(i - 6), both signs, then 0 and 1; sorted; 256 float32 values):
    the `nested_quant_map` bitsandbytes writes for nested 4-bit weights."""
    parts = [np.array([0.0, 1.0], dtype=np.float32)]
    for i in range(7):
        b = _linspace_f32(0.1, 1.0, 2**i + 1)
        means = (b[:-1] + b[1:]) / np.float32(2.0)
        scaled = (means * np.float32(10.0 ** (i - 6))).astype(np.float32)
        parts += [scaled, -scaled]
    return np.sort(np.concatenate(parts)).astype(np.float32)


# ---------------------------------------------------------------- state


@dataclass(frozen=True)
class Bnb4State:
    """What a 4-bit weight's companions say (bitsandbytes' `QuantState`), read by `parse_bnb4`.

    `absmax` is float32 per block, or with `nested` the uint8 codes of (absmax - nested_offset) in
    `nested_quant_map`, scaled per `nested_blocksize` codes by `nested_absmax`."""

    weight_name: str
    quant_type: str  # 'nf4' | 'fp4'
    blocksize: int
    shape: tuple[int, ...]  # the weight's shape before quantization
    dtype: str  # its dtype before quantization: 'bfloat16' | 'float16' | 'float32' (what bnb dequantizes to)
    absmax: np.ndarray
    quant_map: NDArray[np.float32]
    storage_dtype: str  # the packed tensor's element type ('uint8', 'bfloat16', ... : bnb_4bit_quant_storage)
    nested: bool = False
    nested_absmax: NDArray[np.float32] | None = None
    nested_quant_map: NDArray[np.float32] | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE
    nested_offset: float = 0.0
    nested_dtype: str = "float32"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def cols(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def packed_bytes(self) -> int:
        return (self.numel + 1) // 2

    def absmax_f32(self, b0: int = 0, b1: int | None = None) -> NDArray[np.float32]:
        """The float32 scales of blocks [b0, b1), nested quantization undone exactly as bitsandbytes does
        (`dequantize_blockwise(absmax, state2) + offset`, float32)."""
        b1 = self.nblocks if b1 is None else b1
        if not self.nested:
            return np.asarray(self.absmax[b0:b1], dtype=np.float32)
        assert self.nested_quant_map is not None and self.nested_absmax is not None
        v = self.nested_quant_map[self.absmax[b0:b1]]
        v *= self.nested_absmax[np.arange(b0, b1) // self.nested_blocksize]
        v += np.float32(self.nested_offset)
        return v


def _array_and_dtype(value: Any) -> tuple[np.ndarray, str]:
    """(numpy array, element type name) of a numpy array or a lorafuse io.tensor.Tensor (raw + dtype: BF16 is
    uint16 raw there, so its dtype name comes with it)."""
    raw = getattr(value, "raw", None)
    dt = getattr(value, "dtype", None)
    if raw is not None and isinstance(dt, str):
        names = {"U8": "uint8", "I8": "int8", "BF16": "bfloat16", "F16": "float16", "F32": "float32",
                 "F64": "float64", "U16": "uint16", "I16": "int16", "I32": "int32", "I64": "int64"}
        return np.asarray(raw), names.get(dt, dt)
    a = np.asarray(value)
    return a, a.dtype.name


def _float32_of(a: np.ndarray, dtype: str, key: str) -> NDArray[np.float32]:
    if dtype == "bfloat16":
        return (np.ascontiguousarray(a).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype in ("float32", "float16", "float64"):
        return np.asarray(a, dtype=np.float32)
    raise FormatError(f"{key}: a {dtype} tensor where bitsandbytes stores float32")


def _parse_json(raw: np.ndarray, key: str) -> dict[str, Any]:
    if raw.dtype != np.uint8:
        raise FormatError(f"{key}: a {raw.dtype} tensor; bitsandbytes stores its quant_state as uint8 JSON bytes")
    try:
        obj = json.loads(np.ascontiguousarray(raw).reshape(-1).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{key}: not the JSON bytes of a bitsandbytes quant_state ({e})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{key}: the JSON is a {type(obj).__name__}, not an object")
    return obj


def quant_state_shape(raw: Any, key: str) -> tuple[int, ...]:
    """The real shape of a 4-bit weight from its quant_state tensor `key` (the uint8 JSON bytes) alone; FormatError
    when it holds no list of sizes."""
    obj = _parse_json(_array_and_dtype(raw)[0], key)
    shape_v = obj.get("shape")
    if (not isinstance(shape_v, list) or not shape_v
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape_v)):
        raise FormatError(f"{key}: shape {shape_v!r} is not a list of sizes")
    return tuple(int(d) for d in shape_v)


def _int_field(obj: Mapping[str, Any], name: str, key: str) -> int:
    v = obj.get(name)
    if isinstance(v, bool) or not isinstance(v, int):
        raise FormatError(f"{key}: {name} is {v!r}, not an integer")
    return v


def parse_bnb4(tensors: Mapping[str, Any], weight_name: str) -> Bnb4State:
    """Read the quant state of the 4-bit weight `weight_name` from its companion tensors in `tensors`
    (name -> numpy array or lorafuse Tensor; the packed weight itself only for its size), as bitsandbytes'
    `QuantState.from_dict` reads a state dict. Raises FormatError naming the tensor when a companion is
    missing, malformed or inconsistent with the others; UnsupportedError for a valid state lorafuse does
    not read (a nested dtype other than float32)."""
    qs_keys = [k for k in (weight_name + QUANT_STATE_PREFIX + q for q in QUANT_TYPES) if k in tensors]
    if not qs_keys:
        raise FormatError(f"{weight_name}: no {weight_name}{QUANT_STATE_PREFIX}nf4 or ...fp4 tensor beside the "
                          "bitsandbytes 4-bit weight")
    if len(qs_keys) > 1:
        raise FormatError(f"{weight_name}: both {qs_keys[0]} and {qs_keys[1]}; a weight has one quant_state")
    qs_key = qs_keys[0]
    obj = _parse_json(_array_and_dtype(tensors[qs_key])[0], qs_key)
    quant_type = obj.get("quant_type")
    if quant_type not in QUANT_TYPES:
        raise FormatError(f"{qs_key}: quant_type {quant_type!r} is not nf4 or fp4")
    if not qs_key.endswith("__" + quant_type):
        raise FormatError(f"{qs_key}: its JSON says quant_type {quant_type!r}, its name says otherwise")
    blocksize = _int_field(obj, "blocksize", qs_key)
    if blocksize not in BLOCKSIZES:
        raise FormatError(f"{qs_key}: blocksize {blocksize} is not one bitsandbytes uses ({BLOCKSIZES})")
    dtype = obj.get("dtype")
    if dtype not in WEIGHT_DTYPES:
        raise FormatError(f"{qs_key}: dtype {dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    shape_v = obj.get("shape")
    if (not isinstance(shape_v, list) or not shape_v
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape_v)):
        raise FormatError(f"{qs_key}: shape {shape_v!r} is not a list of sizes")
    shape = tuple(int(d) for d in shape_v)
    n = math.prod(shape)
    nblocks = -(-n // blocksize)

    if weight_name not in tensors:
        raise FormatError(f"{weight_name}: the packed 4-bit weight is missing (its quant_state {qs_key} is there)")
    packed, storage = _array_and_dtype(tensors[weight_name])
    if packed.dtype.itemsize * packed.size != (n + 1) // 2:
        raise FormatError(f"{weight_name}: {packed.dtype.itemsize * packed.size} bytes of packed 4-bit codes, but "
                          f"shape {list(shape)} in {qs_key} needs {(n + 1) // 2}")

    def need(suffix: str) -> tuple[np.ndarray, str, str]:
        key = weight_name + suffix
        if key not in tensors:
            raise FormatError(f"{key} is missing: the bitsandbytes 4-bit weight {weight_name} needs it")
        a, dt = _array_and_dtype(tensors[key])
        return a.reshape(-1), dt, key

    qmap_raw, qmap_dt, qmap_key = need(".quant_map")
    quant_map = _float32_of(qmap_raw, qmap_dt, qmap_key)
    expected = _TABLES[quant_type]
    if quant_map.shape != (16,) or not np.allclose(quant_map, expected, rtol=0.0, atol=1e-6):
        raise FormatError(f"{qmap_key}: not the {quant_type} table bitsandbytes dequantizes with "
                          f"(got {np.array2string(quant_map[:16], precision=4)})")

    absmax_raw, absmax_dt, absmax_key = need(".absmax")
    nested = "nested_offset" in obj or (weight_name + ".nested_absmax") in tensors
    if absmax_raw.size != nblocks:
        raise FormatError(f"{absmax_key}: {absmax_raw.size} values, but {n} elements in blocks of {blocksize} "
                          f"need {nblocks}")
    if not nested:
        absmax = _float32_of(absmax_raw, absmax_dt, absmax_key)
        return Bnb4State(weight_name, quant_type, blocksize, shape, dtype, absmax, quant_map, storage)

    for f in ("nested_blocksize", "nested_dtype", "nested_offset"):
        if f not in obj:
            raise FormatError(f"{qs_key}: no {f}, but {weight_name} has nested (double) quantization")
    nbs = _int_field(obj, "nested_blocksize", qs_key)
    if not 0 < nbs <= _MAX_BLOCKSIZE:
        raise FormatError(f"{qs_key}: nested_blocksize {nbs} is not between 1 and {_MAX_BLOCKSIZE} (bitsandbytes "
                          f"writes {NESTED_BLOCKSIZE})")
    ndt = obj["nested_dtype"]
    if ndt != "float32":
        raise UnsupportedError(f"{qs_key}: nested_dtype {ndt!r}; lorafuse reads bitsandbytes' float32 nested "
                               "absmax only")
    off = obj["nested_offset"]
    if isinstance(off, bool) or not isinstance(off, (int, float)) or not math.isfinite(off):
        raise FormatError(f"{qs_key}: nested_offset {off!r} is not a finite number")
    if absmax_dt != "uint8":
        raise FormatError(f"{absmax_key}: {absmax_dt}, but with nested quantization it holds uint8 codes")
    nabs_raw, nabs_dt, nabs_key = need(".nested_absmax")
    nested_absmax = _float32_of(nabs_raw, nabs_dt, nabs_key)
    if nested_absmax.size != -(-nblocks // nbs):
        raise FormatError(f"{nabs_key}: {nested_absmax.size} values, but {nblocks} absmax codes in blocks of {nbs} "
                          f"need {-(-nblocks // nbs)}")
    nq_raw, nq_dt, nq_key = need(".nested_quant_map")
    nested_map = _float32_of(nq_raw, nq_dt, nq_key)
    if nested_map.size != 256:
        raise FormatError(f"{nq_key}: {nested_map.size} values, not the 256 of an 8-bit map")
    return Bnb4State(weight_name, quant_type, blocksize, shape, dtype, np.ascontiguousarray(absmax_raw, dtype=np.uint8),
                     quant_map, storage, True, nested_absmax, nested_map, nbs, float(off), ndt)


# ---------------------------------------------------------------- 4-bit dequantize


def _packed_bytes(packed: Any) -> NDArray[np.uint8]:
    a = np.ascontiguousarray(_array_and_dtype(packed)[0])
    return a.reshape(-1).view(np.uint8)


def dequantize_bnb4(packed: Any, state: Bnb4State, rows: slice | None = None) -> NDArray[np.float32]:
    """The 4-bit weight as float32 of its shape (or rows `rows` of it, along the first dimension), equal bit
    for bit to bitsandbytes' `functional.dequantize_4bit(packed, quant_state)` computed in float32 (CPU
    kernel and the default torch kernel alike); casting to `state.dtype` with round-to-nearest-even then
    gives what bitsandbytes returns in that dtype. Nested absmax is undone first, as bitsandbytes does.

    Row slices are cheap: the blocks run along the flattened weight, so rows [r0, r1) need only the bytes
    and scales of blocks r0 * cols // blocksize .. ceil(r1 * cols / blocksize) (any r0, r1; no alignment)."""
    data = _packed_bytes(packed)
    if data.size != state.packed_bytes:
        raise FormatError(f"{state.weight_name}: {data.size} bytes of packed 4-bit codes, but shape "
                          f"{list(state.shape)} needs {state.packed_bytes}")
    r0, r1, step = (0, state.rows, 1) if rows is None else rows.indices(state.rows)
    if step != 1:
        raise LorafuseValueError("dequantize_bnb4: rows must be a contiguous slice (step 1)")
    r1 = max(r1, r0)
    cols = state.cols if len(state.shape) > 1 else 1
    out_shape = (r1 - r0, *state.shape[1:]) if len(state.shape) > 1 else (r1 - r0,)
    e0, e1 = r0 * cols, r1 * cols
    if e1 <= e0:
        return np.zeros(out_shape, dtype=np.float32)
    bs = state.blocksize
    b0, b1 = e0 // bs, -(-e1 // bs)
    s0, s1 = b0 * bs, min(b1 * bs, state.numel)  # whole blocks around the rows; s0 is even (bs is)
    vals = _PAIRS[state.quant_type][data[s0 // 2: (s1 + 1) // 2]].reshape(-1)  # high nibble first
    scale = state.absmax_f32(b0, b1)
    full = (s1 - s0) // bs
    with np.errstate(invalid="ignore", over="ignore"):  # an Inf / NaN absmax: for the caller to judge
        if full:
            vals[: full * bs].reshape(full, bs)[...] *= scale[:full, None]
        if full * bs < s1 - s0:
            vals[full * bs: s1 - s0] *= scale[full]
    return vals[e0 - s0: e1 - s0].reshape(out_shape)


# ---------------------------------------------------------------- 4-bit quantize


def quantize_4bit_blocks(values: Any, quant_type: str, blocksize: int) -> tuple[NDArray[np.uint8], NDArray[np.float32]]:
    """Packed 4-bit codes (uint8, two per byte, high nibble first) and float32 absmax of a run of a weight's
    flattened elements that starts at a block boundary, equal bit for bit to bitsandbytes' default
    `quantize_4bit` kernel (the one its CPU backend runs): absmax per block, values times float32(1 / absmax)
    (absmax floored at 1e-38), clamped to [-1, 1], the code of the nearest table value (ties to the lower
    value, `bucketize` on float32 midpoints). A partial last block (only where the weight ends) is scaled by
    division instead, and its absmax is stored floored at 1e-38, as bitsandbytes does. An odd count is padded
    with one zero code. Row streaming: chunks must start at multiples of blocksize elements."""
    if quant_type not in QUANT_TYPES:
        raise LorafuseValueError(f"bitsandbytes 4-bit quant_type {quant_type!r} is not one of {', '.join(QUANT_TYPES)}")
    if blocksize not in BLOCKSIZES:
        raise LorafuseValueError(f"bitsandbytes blocksize {blocksize} is not one of {BLOCKSIZES}")
    a = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    n = a.size
    full = n // blocksize * blocksize
    tiny = np.float32(1e-38)
    scaled = np.empty(n + (n & 1), dtype=np.float32)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        com = a[:full].reshape(-1, blocksize)
        absmax = np.abs(com).max(axis=1) if full else np.zeros(0, dtype=np.float32)
        recip = np.float32(1.0) / np.maximum(absmax, tiny)
        np.multiply(com, recip[:, None], out=scaled[:full].reshape(-1, blocksize))
        if full < n:
            am = np.maximum(np.abs(a[full:]).max(), tiny).astype(np.float32)
            np.divide(a[full:], am, out=scaled[full:n])
            absmax = np.concatenate([absmax, am.reshape(1)])
    np.clip(scaled[:n], np.float32(-1.0), np.float32(1.0), out=scaled[:n])
    if n & 1:
        scaled[n] = 0.0
    bounds, order = _BOUNDS[quant_type]
    q = np.searchsorted(bounds, scaled, side="left")
    codes = order[q].astype(np.uint8) if quant_type != "nf4" else q.astype(np.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.astype(np.uint8), absmax.astype(np.float32)


_LUT_SIZE = 65536


def _nearest_lut(code: NDArray[np.float32]) -> NDArray[np.uint8]:
    """bitsandbytes' CPU 8-bit quantization table: [-1, 1] cut into 65536 points v_i = -1 + (2 i) / 65535 (float32),
    each mapped to the number of code midpoints (float32) below it, i.e. the nearest code (ties to the lower)."""
    i = np.arange(_LUT_SIZE, dtype=np.float32)
    v = (np.float32(-1.0) + (np.float32(2.0) * i) / np.float32(_LUT_SIZE - 1)).astype(np.float32)
    mid = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    return np.searchsorted(mid, v, side="left").astype(np.uint8)


def quantize_blockwise_8bit(values: Any, code: Any, blocksize: int) -> tuple[NDArray[np.uint8], NDArray[np.float32]]:
    """uint8 codes and float32 absmax per block of `blocksize`, equal bit for bit to bitsandbytes' CPU
    `quantize_blockwise` (its native `quantize_cpu`, the kernel nested 4-bit quantization runs on CPU): absmax =
    max |x| (NaN counts as 0), an all-zero block gets codes 0; else x * float32(1 / absmax), clamped to [-1, 1],
    goes through a 65536-entry table: index trunc(((x + 1) * 0.5) * 65535 + 0.5) (the multiply-add fused), entry
    = the nearest code to that grid point. So a code is the nearest one up to the 2 / 65535 grid, not always the
    exact nearest (bitsandbytes' CUDA kernel searches the code itself and can differ by one code there)."""
    c = np.asarray(code, dtype=np.float32).reshape(-1)
    if c.size != 256:
        raise LorafuseValueError(f"an 8-bit quantization map has 256 values, not {c.size}")
    a = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    n = a.size
    nb = -(-n // blocksize)
    pad = np.zeros(nb * blocksize, dtype=np.float32)
    pad[:n] = a
    blocks = pad.reshape(nb, blocksize)
    mag = np.abs(blocks)
    mag[np.isnan(mag)] = 0.0
    absmax = mag.max(axis=1).astype(np.float32) if nb else np.zeros(0, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = np.float32(1.0) / absmax
        x = np.clip(blocks * inv[:, None], np.float32(-1.0), np.float32(1.0))
        t = (x + np.float32(1.0)) * np.float32(0.5)
        # fused t * 65535 + 0.5: exact in float64 (24 + 16 bits), rounded once to float32, then truncated
        idx = (t.astype(np.float64) * (_LUT_SIZE - 1) + 0.5).astype(np.float32)
        idx = np.nan_to_num(idx, nan=0.0).astype(np.int64)
    q = _nearest_lut(c)[np.clip(idx, 0, _LUT_SIZE - 1)]
    q[absmax == 0] = 0
    return q.reshape(-1)[:n].astype(np.uint8), absmax


def quantize_nested_absmax(absmax: Any, *, offset: float | None = None, code: Any = None,
                           blocksize: int = NESTED_BLOCKSIZE) -> tuple[NDArray[np.uint8], NDArray[np.float32], float]:
    """Nested ("double") quantization of 4-bit absmax as bitsandbytes' `quantize_4bit(compress_statistics=True)`
    on CPU: (codes uint8, nested_absmax float32, offset) where offset is the mean of absmax and the codes are
    `quantize_blockwise(absmax - offset, blocksize=256)` in `code` (default `dynamic_map()`).

    The codes and nested_absmax match bitsandbytes bit for bit given the same offset. The offset itself is
    the float32 mean computed in float64 and rounded once; torch's float32 `mean()` sums in its own order and
    may differ from it in the last bit (pass `offset` to reproduce a given file, e.g. when requantizing)."""
    a = np.ascontiguousarray(absmax, dtype=np.float32).reshape(-1)
    if offset is None:
        off32 = np.float32(a.astype(np.float64).mean()) if a.size else np.float32(0.0)
    else:
        off32 = np.float32(offset)
    c = dynamic_map() if code is None else code
    q, nabs = quantize_blockwise_8bit((a - off32).astype(np.float32), c, blocksize)
    return q, nabs, float(off32)


def _quant_state_json(state: Mapping[str, Any]) -> NDArray[np.uint8]:
    return np.frombuffer(json.dumps(dict(state)).encode("utf-8"), dtype=np.uint8).copy()


def bnb4_row_align(shape: tuple[int, ...], blocksize: int) -> int:
    """Row chunks given to `quantize_4bit_blocks` must start at multiples of this many rows (so that they start
    at a block boundary of the flattened weight)."""
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    return blocksize // math.gcd(cols, blocksize) if cols else 1


def bnb4_tensors(
    packed: Any,
    absmax: Any,
    *,
    shape: tuple[int, ...],
    quant_type: str = "nf4",
    blocksize: int = DEFAULT_BLOCKSIZE,
    nested: bool = False,
    weight_name: str = "weight",
    dtype: str = "float32",
    quant_storage: str = "uint8",
    nested_offset: float | None = None,
    nested_quant_map: Any = None,
) -> dict[str, np.ndarray]:
    """The tensors bitsandbytes' `Linear4bit` saves for a weight of `shape`, from its packed codes (uint8 bytes)
    and float32 absmax as `quantize_4bit_blocks` returns them (concatenated over row chunks when streaming):
    `weight_name` (shape [bytes / itemsize, 1], raw elements of `quant_storage`: BF16 as uint16), `.absmax`,
    `.quant_map`, when nested `.nested_absmax` / `.nested_quant_map` (absmax quantized by
    `quantize_nested_absmax`), and `.quant_state.bitsandbytes__<type>` (the JSON bytes, keys in bitsandbytes'
    order; `dtype` is the weight's dtype it records)."""
    if quant_type not in QUANT_TYPES:
        raise LorafuseValueError(f"bitsandbytes 4-bit quant_type {quant_type!r} is not one of {', '.join(QUANT_TYPES)}")
    if dtype not in WEIGHT_DTYPES:
        raise LorafuseValueError(f"dtype {dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    if quant_storage not in QUANT_STORAGE:
        raise LorafuseValueError(f"quant_storage {quant_storage!r} is not one of {', '.join(QUANT_STORAGE)}")
    n = math.prod(shape)
    data = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    am = np.ascontiguousarray(absmax, dtype=np.float32).reshape(-1)
    if data.size != (n + 1) // 2 or am.size != -(-n // blocksize):
        raise LorafuseValueError(f"{data.size} packed bytes and {am.size} absmax for shape {list(shape)} in blocks of "
                                 f"{blocksize}: expected {(n + 1) // 2} and {-(-n // blocksize)}")
    storage = QUANT_STORAGE[quant_storage][1]
    if data.size % storage.itemsize:
        raise LorafuseValueError(f"{data.size} packed bytes do not fill whole {quant_storage} elements")
    out: dict[str, np.ndarray] = {weight_name: data.view(storage).reshape(-1, 1)}
    js: dict[str, Any] = {"quant_type": quant_type, "blocksize": blocksize, "dtype": dtype, "shape": list(shape)}
    if nested:
        nmap = dynamic_map() if nested_quant_map is None else np.asarray(nested_quant_map, dtype=np.float32)
        q, nabs, off = quantize_nested_absmax(am, offset=nested_offset, code=nmap)
        out[weight_name + ".absmax"] = q
        out[weight_name + ".quant_map"] = code_table(quant_type)
        out[weight_name + ".nested_absmax"] = nabs
        out[weight_name + ".nested_quant_map"] = nmap.copy()
        js.update({"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32", "nested_offset": off})
    else:
        out[weight_name + ".absmax"] = am
        out[weight_name + ".quant_map"] = code_table(quant_type)
    out[weight_name + QUANT_STATE_PREFIX + quant_type] = _quant_state_json(js)
    return out


def quantize_bnb4(
    w: Any,
    quant_type: str = "nf4",
    blocksize: int = DEFAULT_BLOCKSIZE,
    nested: bool = False,
    *,
    weight_name: str = "weight",
    dtype: str = "float32",
    quant_storage: str = "uint8",
    nested_offset: float | None = None,
    nested_quant_map: Any = None,
) -> dict[str, np.ndarray]:
    """Quantize a float32 weight as bitsandbytes' `quantize_4bit(w, blocksize, compress_statistics=nested,
    quant_type, quant_storage)` and return the tensors `Linear4bit` saves for it under `weight_name`
    (`bnb4_tensors`).

    Equal bit for bit to bitsandbytes on CPU (its default 4-bit kernel, its native 8-bit kernel for the nested
    absmax), given the same nested offset (see `quantize_nested_absmax`). `nested_quant_map` defaults to
    bitsandbytes' `create_dynamic_map()` (`dynamic_map()`)."""
    a = np.asarray(w, dtype=np.float32)
    packed, absmax = quantize_4bit_blocks(a, quant_type, blocksize)
    return bnb4_tensors(packed, absmax, shape=tuple(int(d) for d in a.shape), quant_type=quant_type,
                        blocksize=blocksize, nested=nested, weight_name=weight_name, dtype=dtype,
                        quant_storage=quant_storage, nested_offset=nested_offset, nested_quant_map=nested_quant_map)


# ---------------------------------------------------------------- 8-bit


def dequantize_int8(weight_int8: Any, scb: Any, name: str = "weight") -> NDArray[np.float32]:
    """An LLM.int8 weight as float32: `(int8 * SCB[:, None]) * float32(1 / 127)`, in that order, equal bit for
    bit to bitsandbytes' `int8_vectorwise_dequant(weight, SCB)` (what transformers' `dequantize_bnb_weight`
    and `model.dequantize()` use; cast to the model's dtype afterwards)."""
    w, wdt = _array_and_dtype(weight_int8)
    s, sdt = _array_and_dtype(scb)
    if wdt != "int8":
        raise FormatError(f"{name}: {wdt}, but a bitsandbytes 8-bit weight is int8")
    if w.ndim != 2:
        raise FormatError(f"{name}: {w.ndim} dimensions; a bitsandbytes 8-bit weight is 2-D")
    s32 = _float32_of(s.reshape(-1), sdt, name + " SCB")
    if s32.size != w.shape[0]:
        raise FormatError(f"{name}: SCB has {s32.size} values for {w.shape[0]} rows")
    out = w.astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):  # an Inf / NaN SCB: NaN rows, for the caller to judge
        out *= s32[:, None]
        out *= _INT8_SCALE
    return out


def check_int8_format(tensors: Mapping[str, Any], weight_name: str) -> None:
    """Raise FormatError unless the 8-bit weight's `weight_format` (if present) is 0 / row-major, the only
    layout bitsandbytes reads; and its SCB is there."""
    prefix = weight_name[: -len("weight")] if weight_name.endswith("weight") else weight_name + "."
    if prefix + "SCB" not in tensors:
        raise FormatError(f"{prefix}SCB is missing: the bitsandbytes 8-bit weight {weight_name} needs it")
    key = prefix + "weight_format"
    if key in tensors:
        raw, dt = _array_and_dtype(tensors[key])
        v = np.asarray(raw).reshape(-1)
        if dt not in ("uint8", "int8", "uint16", "int16", "int32", "int64"):  # bitsandbytes writes a uint8 scalar
            raise FormatError(f"{key}: a {dt} tensor of shape {list(np.shape(raw))}; bitsandbytes writes the 8-bit "
                              "weight's layout as one integer (0: row-major)")
        if v.size != 1 or int(v[0]) != 0:
            raise FormatError(f"{key}: {v.tolist()}; bitsandbytes reads row-major (0) 8-bit weights only")


# ---------------------------------------------------------------- companions


def companions(weight_name: str, keys: Iterable[str]) -> list[str]:
    """The tensors among `keys` that belong to the bitsandbytes weight `weight_name` (`X.weight`): its 4-bit
    companions `X.weight.absmax` ... and its 8-bit `X.SCB`, `X.weight_format`; in the order of
    BNB_COMPANION_SUFFIXES."""
    present = set(keys)
    prefix = weight_name[: -len("weight")] if weight_name.endswith("weight") else weight_name + "."
    names = [weight_name + s for s in BNB4_WEIGHT_SUFFIXES] + [prefix + s for s in BNB8_MODULE_SUFFIXES]
    return [k for k in names if k in present]


__all__ = [
    "BLOCKSIZES",
    "BNB4_WEIGHT_SUFFIXES",
    "BNB8_MODULE_SUFFIXES",
    "BNB_COMPANION_SUFFIXES",
    "Bnb4State",
    "QUANT_STORAGE",
    "QUANT_TYPES",
    "bnb4_row_align",
    "bnb4_tensors",
    "check_int8_format",
    "code_table",
    "companions",
    "dequantize_bnb4",
    "dequantize_int8",
    "dynamic_map",
    "parse_bnb4",
    "quantize_4bit_blocks",
    "quantize_blockwise_8bit",
    "quantize_bnb4",
    "quantize_nested_absmax",
    "quant_state_shape",
]
