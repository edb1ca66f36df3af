"""Quantized base checkpoints: which quantization a checkpoint uses, and what lorafuse can do with it.

lorafuse never writes a model whose meaning it does not understand. A checkpoint says it is quantized
in config.json (`quantization_config`, or compressed-tensors' older `compression_config`); a single file
or a folder without a config says it through companion tensors beside its weights (`weight_scale_inv`,
`weight.absmax`, `qweight`, `SCB`, ...). `detect` reads both and returns a `Quantization`: its scheme
when lorafuse can honour it, else a refusal (`refusal`) that names the file, the method and what to do.

A scheme (`QuantScheme`) says which companion tensors belong to a weight, how rows of the weight
dequantize to float32, and how float32 rows quantize back (codes + companions), or that lorafuse cannot
write it (`writable` False). Schemes come from a registry keyed by quant_method (`register_method`):
block- / channel- / tensor-scaled float8 (DeepSeek / transformers `fp8`, compressed-tensors
`float-quantized`) and bitsandbytes 4-bit / LLM.int8 (`Bitsandbytes`; the math is io/quant_bnb.py's)
are registered here.

A scheme may keep per-weight parameters in the weight's own companions (bitsandbytes' quant_state JSON:
the real shape, quant type, block size): planning `bind`s the scheme to each weight, and the bound scheme
says the weight's real shape and dtype (`logical_shape`, `logical_dtype`: a packed 4-bit weight is stored
as [bytes, 1]), how its stored codes are read by rows (`read_rows`) and how many bytes rows of codes take
(`code_bytes`), and assembles the companions of a requantized weight once every row block is done (`finish`).
"""

from __future__ import annotations

import functools
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np

from lorafuse.backends import get_backend
from lorafuse.errors import LorafuseError, UnsupportedError
from lorafuse.io import quant_bnb as Q
from lorafuse.io.checkpoint import Checkpoint, read_config
from lorafuse.io.safetensors import SafetensorsFile
from lorafuse.io.tensor import Tensor

FP8_E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
_E4M3_MIN_NORMAL = 2.0**-6

# Tensor name endings (after the module's prefix) that only quantized checkpoints have, and the method
# each one points to. Checked when a checkpoint has no quantization_config.
_COMPANION_HINTS: tuple[tuple[str, str], ...] = (
    (".weight_scale_inv", "fp8"),
    (".weight_scale", "compressed-tensors"),
    (".weight_zero_point", "compressed-tensors"),
    (".weight_packed", "compressed-tensors"),
    (".weight_shape", "compressed-tensors"),
    (".weight_global_scale", "compressed-tensors"),
    (".weight.absmax", "bitsandbytes"),
    (".weight.quant_map", "bitsandbytes"),
    (".weight.nested_absmax", "bitsandbytes"),
    (".weight.nested_quant_map", "bitsandbytes"),
    (".weight.quant_state.bitsandbytes__nf4", "bitsandbytes"),
    (".weight.quant_state.bitsandbytes__fp4", "bitsandbytes"),
    (".SCB", "bitsandbytes"),
    (".weight_format", "bitsandbytes"),
    (".qweight", "gptq/awq"),
    (".qzeros", "gptq/awq"),
    (".g_idx", "gptq"),
    (".weight_scales", "eetq"),
    # GPT-OSS's MXFP4 experts (transformers' Mxfp4Config): 4-bit codes in `_blocks`, e8m0 scales in `_scales`
    (".gate_up_proj_blocks", "mxfp4"),
    (".down_proj_blocks", "mxfp4"),
)

# What to do about the methods lorafuse refuses.
_MERGE_16BIT = ("merge the adapter into the original 16-bit (bf16 / fp16) base with lorafuse, then quantize "
                "the merged model again with the same tool")
_ADVICE: dict[str, str] = {
    "gptq": _MERGE_16BIT + " (GPTQ's integer codes and calibration cannot take a low-rank update exactly)",
    "awq": _MERGE_16BIT + " (AWQ's activation-aware scales were calibrated for the original weights)",
    "gptq/awq": _MERGE_16BIT,
    "compressed-tensors": ("lorafuse reads compressed-tensors float8 weights (format float-quantized, 8-bit float, "
                           "strategy block, channel or tensor) only: " + _MERGE_16BIT),
}
_DEFAULT_ADVICE = ("lorafuse cannot read these weights: " + _MERGE_16BIT + ", or dequantize the checkpoint to 16 bits "
                   "with the tool that made it and merge into that")


class QuantScheme(ABC):
    """How the weights of one quantization are stored, read and written back, one row block at a time."""

    name: str  # what messages call it: 'fp8 block 128x128 (weight_scale_inv)'
    method: str  # the quant_method it serves
    writable: bool  # whether lorafuse can quantize merged rows back into this scheme

    @abstractmethod
    def companions(self, weight_key: str) -> dict[str, str]:
        """role -> the tensor key of each companion that a weight needs (its scales, ...)."""

    @abstractmethod
    def check(self, weight_key: str, shape: tuple[int, ...], dtype: str,
              companions: Mapping[str, tuple[str, tuple[int, ...]]]) -> str | None:
        """None when the stored weight and its companions (role -> (dtype, shape)) fit the scheme, else why not."""

    @abstractmethod
    def row_align(self, shape: tuple[int, ...]) -> int:
        """Row blocks handed to dequantize / quantize start at multiples of this (a block's rows)."""

    @abstractmethod
    def dequantize(self, codes: np.ndarray, companions: Mapping[str, tuple[np.ndarray, str]], r0: int,
                   shape: tuple[int, ...], threads: int = 0) -> np.ndarray:
        """Rows [r0, r0 + len(codes)) of the weight as float32 (rows x cols); companions are whole (raw, dtype)."""

    @abstractmethod
    def quantize(self, x: np.ndarray, r0: int, shape: tuple[int, ...],
                 companion_dtypes: Mapping[str, str], threads: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """float32 rows [r0, r0 + len(x)) -> (raw codes, role -> raw rows of each companion in its dtype)."""

    @abstractmethod
    def companion_rows(self, role: str, r0: int, r1: int, shape: tuple[int, ...]) -> tuple[int, int]:
        """The rows of a companion tensor that weight rows [r0, r1) use."""

    # ---- what a scheme may change; the defaults serve schemes whose stored weight has the weight's shape (FP8)

    # Whether `apply` writes this scheme's weights quantized again when neither --dtype nor --requantize says
    # (FP8: yes, the deployed format is FP8; bitsandbytes: no, the deployed QLoRA model is 16-bit).
    requantize_by_default: ClassVar[bool] = True
    # Whether a stored weight's shape may differ from its real one (packed codes): a weight that cannot be
    # read is then refused even when no adapter targets it (its real shape, which matching needs, is unknown).
    packed: ClassVar[bool] = False

    def bind(self, weight_key: str, shape: tuple[int, ...], dtype: str,
             read: Callable[[str], tuple[np.ndarray, str]]) -> QuantScheme:
        """The scheme of one weight that passed `check`: schemes whose parameters live in the weight's own
        companions (bitsandbytes' quant_state: its real shape, quant type, block size) read them here,
        through read(role) -> (raw, dtype), and return a scheme bound to that weight. Raises a LorafuseError
        naming the tensor when they are unreadable. Default: the scheme itself (everything is in the config)."""
        return self

    def logical_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The weight's real shape, given its stored shape (what adapters are matched against and what a
        dequantized output is written as). Default: the stored shape."""
        return shape

    def logical_dtype(self) -> str | None:
        """The float dtype (safetensors name) the weight was quantized from, when the checkpoint records it
        (the dtype a dequantized output defaults to); None: not recorded."""
        return None

    def read_rows(self, raw: np.ndarray, companions: Mapping[str, tuple[np.ndarray, str]], r0: int, r1: int,
                  shape: tuple[int, ...], threads: int = 0) -> np.ndarray:
        """Rows [r0, r1) of the weight (logical `shape`) as float32 (rows x cols), from the whole stored weight
        `raw` and the whole companions. Default: the stored weight's rows through `dequantize`."""
        return self.dequantize(raw.reshape(shape[0], -1)[r0:r1], companions, r0, shape, threads)

    def code_bytes(self, r0: int, r1: int, shape: tuple[int, ...], itemsize: int) -> int:
        """Bytes of the stored codes of rows [r0, r1) (row blocks start at multiples of row_align)."""
        cols = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        return (r1 - r0) * cols * itemsize

    def finish(self, parts: Mapping[str, list[np.ndarray]], companions: Mapping[str, tuple[np.ndarray, str]],
               shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        """Every companion of a requantized weight as written (raw, any numpy type: its bytes are written), from
        what `quantize` returned for each row block (role -> blocks in row order) and the base's companions.
        Default: each role's blocks concatenated."""
        return {role: np.concatenate([x.reshape(-1) for x in xs]) for role, xs in parts.items()}

    def is_companion(self, key: str) -> bool:
        """Whether `key` names a tensor that only exists beside a weight of this scheme (a companion without its
        weight is refused). Default: no such names."""
        return False

    def may_be_weight(self, key: str, shape: tuple[int, ...], dtype: str) -> bool:
        """Whether a tensor with none of the scheme's companions beside it can only be one of its quantized
        weights that lost them (then it is checked, and refused, instead of being copied as a plain tensor).
        Default: float8 tensors (codes are not values in a quantized checkpoint)."""
        return dtype in ("F8_E4M3", "F8_E5M2")


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def e4m3_from_float32(x: np.ndarray) -> np.ndarray:
    """float32 -> float8_e4m3fn bits (uint8), round to nearest even; |x| > 448 saturates to +-448 (as clamping
    before torch's `.to(torch.float8_e4m3fn)` does); NaN -> 0x7F / 0xFF. Vectorized, no per-element Python.

    One table lookup per element: the code depends only on the top 16 bits of the float32 (sign, exponent,
    7 mantissa bits: the 3 kept and the rounding bit below them) and on whether any lower bit is set."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    idx = (u >> 15) & np.uint32(0x1FFFE)
    idx |= (u & np.uint32(0xFFFF)) != 0
    return np.take(_e4m3_table(), idx)


@functools.cache
def _e4m3_table() -> np.ndarray:
    """The code of every (top 16 bits, any lower bit set) pair, from the exact conversion."""
    top = np.arange(1 << 16, dtype=np.uint32) << 16
    reps = np.stack([top, top | 1], axis=1).reshape(-1)
    return _e4m3_exact(reps.view(np.float32))


def _e4m3_exact(x: np.ndarray) -> np.ndarray:
    """e4m3_from_float32 computed from the bits (builds its table)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    sign = ((x.view(np.uint32) >> 24) & 0x80).astype(np.uint8)
    with np.errstate(invalid="ignore"):
        a = np.minimum(np.abs(x), np.float32(FP8_E4M3_MAX))
    bits = a.view(np.uint32)
    # normal numbers: keep 3 mantissa bits (round half to even on the 20 dropped), rebias the exponent 127 -> 7
    code = ((bits + np.uint32(0x7FFFF) + ((bits >> 20) & 1)) >> 20).view(np.int32)
    code -= 120 << 3
    with np.errstate(invalid="ignore"):
        small = a < np.float32(_E4M3_MIN_NORMAL)
    # subnormals are m * 2^-9 (m = 8 is the smallest normal, code 0x08); rint rounds half to even
    code[small] = np.rint(a[small] * np.float32(512.0)).astype(np.int32)
    code[np.isnan(x)] = 0x7F
    return code.clip(0, 0x7F).astype(np.uint8) | sign


@functools.cache
def _e8m0_table() -> np.ndarray:
    """The float32 value of every float8_e8m0fnu code: 2^(e - 127) (e = 0: 2^-127, a float32 subnormal), 255 NaN."""
    e = np.minimum(np.arange(256, dtype=np.int64), 254)  # 255 (NaN) set below: 2^128 is no float32
    out = np.ldexp(np.ones(256, dtype=np.float64), e - 127).astype(np.float32)
    out[255] = np.nan
    return out


def e8m0_to_float32(raw: np.ndarray) -> np.ndarray:
    """float8_e8m0fnu codes (safetensors F8_E8M0, raw uint8) -> float32."""
    return np.take(_e8m0_table(), np.ascontiguousarray(raw).view(np.uint8))


def e8m0_from_float32(x: np.ndarray) -> np.ndarray:
    """float32 powers of two (2^-127 .. 2^127) -> float8_e8m0fnu codes (uint8); any other positive value is
    rounded UP to a power of two, clamped to that range; NaN, Inf, zero and negative values -> 255 (NaN)."""
    a = np.ascontiguousarray(x, dtype=np.float32).astype(np.float64)
    ok = np.isfinite(a) & (a > 0)
    e = _pow2_exponent_at_least(np.where(ok, a, 1.0))
    return np.where(ok, np.clip(e, -127, 127) + 127, 255).astype(np.uint8)


def _pow2_exponent_at_least(a: np.ndarray) -> np.ndarray:
    """The smallest k with 2^k >= a, for positive finite float64 a (exact: frexp, no logarithm)."""
    m, e = np.frexp(a)  # a = m * 2^e, 0.5 <= m < 1
    return np.where(m == 0.5, e - 1, e).astype(np.int64)


def pow2_scales(amax: np.ndarray) -> np.ndarray:
    """ue8m0 block scales: amax / 448 rounded UP to a power of two (so every |x| / scale <= 448 still fits e4m3,
    as transformers' FP8 quantizer rounds ue8m0 scales: 2^ceil(log2(amax / 448)), here exact in float64),
    within float8_e8m0fnu's 2^-127 .. 2^127; 1 for an all-zero (or non-finite) block. float32."""
    a = np.asarray(amax, dtype=np.float64) / FP8_E4M3_MAX
    ok = np.isfinite(a) & (a > 0)
    e = np.clip(_pow2_exponent_at_least(np.where(ok, a, 1.0)), -127, 127)
    return np.where(ok, np.ldexp(1.0, e), 1.0).astype(np.float32)


def scales_to_float32(raw: np.ndarray, dtype: str, threads: int = 0) -> np.ndarray:
    """Stored scales (raw, safetensors `dtype`: F32, BF16, F16 or F8_E8M0) as float32."""
    if dtype == "F8_E8M0":
        return e8m0_to_float32(raw)
    return get_backend().to_float32(np.ascontiguousarray(raw), dtype, threads)


def _scale_fits(sshape: tuple[int, ...], grid: tuple[int, int]) -> bool:
    """Whether a scale tensor of shape `sshape` holds the (block rows, block cols) `grid` of scales: the grid itself
    after leading 1s ((3, 5); (1, 3, 5); a channel's (64, 1)), or, for a grid of one row or one column of blocks, those
    scales as a 0-D / 1-D tensor ((64,); (); (1,)); not (15,) for (3, 5), nor a grid transposed ((1, 2) for (2, 1):
    transformers' loader refuses it, a size mismatch)."""
    while len(sshape) > 2 and sshape[0] == 1:
        sshape = sshape[1:]
    if len(sshape) == 2:
        return sshape == grid
    return len(sshape) < 2 and math.prod(sshape) == math.prod(grid) and min(grid) == 1


def _round_scale(s: np.ndarray, dtype: str, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Scales as stored (raw, in `dtype`) and their float32 values. A positive scale that rounds to zero in a
    narrow dtype (F16 below 2^-25) becomes the dtype's smallest positive value: a zero scale would turn the
    block's codes into +-448 times 0, silently."""
    s = np.ascontiguousarray(s, dtype=np.float32)
    if dtype == "F8_E8M0":
        raw = e8m0_from_float32(s)
        return raw, e8m0_to_float32(raw)
    backend = get_backend()
    raw = backend.from_float32(s, dtype, threads)
    back = backend.to_float32(raw, dtype, threads)
    lost = (back == 0) & (s > 0)
    if lost.any():
        raw = raw.copy()
        raw.reshape(-1).view(np.uint8 if raw.itemsize == 1 else f"<u{raw.itemsize}")[lost.reshape(-1)] = 1
        back = backend.to_float32(raw, dtype, threads)
    return raw, back


@dataclass(frozen=True)
class Fp8Scaled(QuantScheme):
    """float8_e4m3fn codes times one float scale per (block_rows x block_cols) block of the weight:
    W[i, j] = codes[i, j] * scale[i // bm, j // bn]. DeepSeek-V3 / transformers' `fp8` store the
    multiplier as `weight_scale_inv` (F32, shape ceil(out / bm) x ceil(in / bn)); compressed-tensors
    stores it as `weight_scale` (a block grid, (out, 1) per channel, or one value per tensor), and so does
    AutoFP8 / vLLM's per-tensor `fp8` (`_fp8_scale_names`). A block
    dimension of 0 means the whole dimension (channel: (1, 0); tensor: (0, 0)). Edge blocks may be
    partial. Requantizing gives each block a fresh scale amax / 448 (1 for an all-zero block, as
    transformers' Fp8Quantize), rounded to the scale's dtype, and codes round(clamp(x / scale)). With
    `ue8m0` (quantization_config `scale_fmt: ue8m0`, DeepSeek-V3.1 / V4 style), or scales stored as
    float8_e8m0fnu (F8_E8M0), the fresh scales are powers of two, amax / 448 rounded up (`pow2_scales`):
    transformers loads ue8m0 scales as float8_e8m0fnu, which holds powers of two only."""

    name: str
    method: str
    scale_suffix: str  # 'weight_scale_inv' or 'weight_scale'
    block: tuple[int, int]
    writable: bool = True
    extra_suffixes: tuple[str, ...] = field(default=())  # other companions kept (keep-FP8) or dropped (--dtype)
    ue8m0: bool = False  # scale_fmt ue8m0: requantized scales are powers of two

    def companions(self, weight_key: str) -> dict[str, str]:
        """The scale beside the weight: `x.weight` -> `x.weight_scale_inv` (`x.weight_scale`); a parameter that is
        no `weight` (transformers 5's fused experts `experts.gate_up_proj`, finegrained_fp8.py) -> its name +
        `_scale_inv` (`_scale`), as transformers names it."""
        return {"scale": weight_key + self.scale_suffix.removeprefix("weight")}

    def blocks(self, shape: tuple[int, ...]) -> tuple[int, int]:
        rows, cols = shape[0], int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        bm, bn = self.block
        # A block larger than the weight covers it whole: the same grid, without padding to the block's size
        # (a config saying 2**31 would otherwise make lorafuse allocate gigabytes for a small weight).
        return (max(1, min(bm or rows, rows)), max(1, min(bn or cols, cols)))

    def grid(self, shape: tuple[int, ...]) -> tuple[int, int]:
        rows, cols = shape[0], int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        bm, bn = self.blocks(shape)
        return (_ceil(rows, bm), _ceil(cols, bn))

    def check(self, weight_key: str, shape: tuple[int, ...], dtype: str,
              companions: Mapping[str, tuple[str, tuple[int, ...]]]) -> str | None:
        if dtype != "F8_E4M3":
            return f"the weight is {dtype}, not F8_E4M3"
        if len(shape) != 2:
            return f"the weight has {len(shape)} dimensions (lorafuse reads 2-D float8 weights only)"
        if "scale" not in companions:
            return f"no {self.companions(weight_key)['scale']} beside it, so the scale of its codes is unknown"
        sdtype, sshape = companions["scale"]
        if self._scale_dtype(sdtype) not in ("F32", "BF16", "F16", "F8_E8M0"):
            return (f"its scale is {sdtype}, not a float type lorafuse reads (F32, BF16, F16, F8_E8M0; U8 bytes of "
                    "float8_e8m0fnu with scale_fmt ue8m0)")
        grid = self.grid(shape)
        if not _scale_fits(tuple(sshape), grid) and math.prod(sshape) != 1:  # one value: per tensor (`bind`)
            return (f"its scale has shape {list(sshape)}; a {shape[0]}x{shape[1]} weight in blocks of "
                    f"{self.blocks(shape)[0]}x{self.blocks(shape)[1]} needs {list(grid)}")
        return None

    def bind(self, weight_key: str, shape: tuple[int, ...], dtype: str,
             read: Callable[[str], tuple[np.ndarray, str]]) -> QuantScheme:
        """A weight whose scale holds one value where the config's blocks need a grid of them (an FP8 embedding or
        lm_head with a per-tensor scale inside a block-FP8 checkpoint) is scaled per tensor: transformers' FP8
        dequantize derives the block from the scale's grid, and one scale is one block."""
        if self.grid(shape) == (1, 1) or read("scale")[0].size != 1:
            return self
        return replace(self, name=f"{self.name}; this weight: one scale per tensor", block=(0, 0))

    def row_align(self, shape: tuple[int, ...]) -> int:
        return self.blocks(shape)[0]

    def companion_rows(self, role: str, r0: int, r1: int, shape: tuple[int, ...]) -> tuple[int, int]:
        bm = self.blocks(shape)[0]
        return r0 // bm, _ceil(r1, bm)

    def _scale_dtype(self, stored: str) -> str:
        """How a scale stored as `stored` is encoded: with scale_fmt ue8m0, U8 scales are the bytes of
        float8_e8m0fnu (MXFP8 checkpoints; transformers' FP8 loader views them so)."""
        return "F8_E8M0" if stored == "U8" and self.ue8m0 else stored

    def _scales(self, companions: Mapping[str, tuple[np.ndarray, str]], r0: int, r1: int, shape: tuple[int, ...],
                threads: int) -> np.ndarray:
        raw, dtype = companions["scale"]
        grid = self.grid(shape)
        g0, g1 = self.companion_rows("scale", r0, r1, shape)
        rows = raw.reshape(grid)[g0:g1]
        return scales_to_float32(np.ascontiguousarray(rows), self._scale_dtype(dtype), threads)

    def dequantize(self, codes: np.ndarray, companions: Mapping[str, tuple[np.ndarray, str]], r0: int,
                   shape: tuple[int, ...], threads: int = 0) -> np.ndarray:
        rows, cols = codes.shape
        bm, bn = self.blocks(shape)
        s = self._scales(companions, r0, r0 + rows, shape, threads)  # (block rows, block cols)
        x = get_backend().to_float32(np.ascontiguousarray(codes), "F8_E4M3", threads)
        s_cols = np.repeat(s, bn, axis=1)[:, :cols]  # one scale per column, per block row: small
        full = rows // bm * bm
        with np.errstate(over="ignore", invalid="ignore"):  # a huge scale: the merge's finiteness check says so
            if full:
                x[:full].reshape(-1, bm, cols)[...] *= s_cols[: full // bm, None, :]
            if full < rows:
                x[full:] *= s_cols[full // bm]
        return x

    def quantize(self, x: np.ndarray, r0: int, shape: tuple[int, ...],
                 companion_dtypes: Mapping[str, str], threads: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        rows, cols = x.shape
        bm, bn = self.blocks(shape)
        nr, nc = _ceil(rows, bm), _ceil(cols, bn)
        if rows % bm or cols % bn:  # partial edge blocks: pad with zeros (they change no block's amax)
            xp = np.zeros((nr * bm, nc * bn), dtype=np.float32)
            xp[:rows, :cols] = x
        else:
            xp = x
        blocks = xp.reshape(nr, bm, nc, bn)
        amax = np.maximum(blocks.max(axis=(1, 3)), -blocks.min(axis=(1, 3)))
        if not np.isfinite(amax).all():  # NaN / Inf values (--allow-nonfinite): the scale of the block's finite ones
            with np.errstate(invalid="ignore"):
                amax = np.where(np.isfinite(blocks), np.abs(blocks), np.float32(0)).max(axis=(1, 3))
        sdtype = self._scale_dtype(companion_dtypes["scale"])
        if self.ue8m0 or sdtype == "F8_E8M0":
            s = pow2_scales(amax)  # 1 for zero / NaN / Inf blocks too
        else:
            with np.errstate(invalid="ignore", over="ignore"):
                s = np.where(amax > 0, amax / np.float32(FP8_E4M3_MAX), np.float32(1.0)).astype(np.float32)
            s = np.where(np.isfinite(s), s, np.float32(1.0)).astype(np.float32)  # NaN / Inf rows (--allow-nonfinite)
        s_raw, s32 = _round_scale(s, sdtype, threads)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            q = blocks / s32[:, None, :, None]
        codes = e4m3_from_float32(q.reshape(nr * bm, nc * bn)[:rows, :cols])
        return codes, {"scale": s_raw}


# ---------------------------------------------------------------- bitsandbytes


def _module_prefix(weight_key: str) -> str:
    return weight_key[: -len("weight")] if weight_key.endswith("weight") else weight_key + "."


_BNB4_ROLES = tuple(s[1:] for s in Q.BNB4_WEIGHT_SUFFIXES)  # 'absmax', ..., 'quant_state.bitsandbytes__nf4'
_QS_ROLES = tuple(r for r in _BNB4_ROLES if r.startswith("quant_state."))
_ST_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@dataclass(frozen=True)
class Bitsandbytes(QuantScheme):
    """bitsandbytes as transformers saves it (`quant_method: bitsandbytes`): 4-bit nf4 / fp4 weights (packed
    codes + `weight.absmax`, `weight.quant_map`, `weight.quant_state.bitsandbytes__<type>`, nested or not, any
    quant_storage) and LLM.int8 weights (int8 + `SCB`, `weight_format`). This unbound scheme finds and checks a
    weight's companions; `bind` reads its quant state and returns `Bnb4Weight` or `Int8Weight`, which do the
    math (io.quant_bnb). Dequantized (16-bit) output by default: the model QLoRA users deploy."""

    name: str
    method: str = "bitsandbytes"
    writable: bool = True
    packed_dtype: str = "U8"  # the config's bnb_4bit_quant_storage, as a safetensors dtype
    requantize_by_default: ClassVar[bool] = False
    packed: ClassVar[bool] = True

    def companions(self, weight_key: str) -> dict[str, str]:
        out = {role: f"{weight_key}.{role}" for role in _BNB4_ROLES}
        prefix = _module_prefix(weight_key)
        out.update({s: prefix + s for s in Q.BNB8_MODULE_SUFFIXES})
        return out

    def is_companion(self, key: str) -> bool:
        return key.endswith(tuple("." + s for s in Q.BNB_COMPANION_SUFFIXES))

    def may_be_weight(self, key: str, shape: tuple[int, ...], dtype: str) -> bool:
        """Besides float8: a `weight` of integer codes (packed 4-bit U8, LLM.int8 I8), or [n, 1] of the config's
        quant_storage type (packed 4-bit codes stored as bf16 / fp16 / fp32), without its quant state / SCB."""
        if super().may_be_weight(key, shape, dtype):
            return True
        if key != "weight" and not key.endswith(".weight"):
            return False
        return dtype in ("U8", "I8") or (dtype == self.packed_dtype and len(shape) == 2 and shape[1] == 1)

    def check(self, weight_key: str, shape: tuple[int, ...], dtype: str,
              companions: Mapping[str, tuple[str, tuple[int, ...]]]) -> str | None:
        four = [r for r in companions if r in _BNB4_ROLES]
        eight = [r for r in companions if r in Q.BNB8_MODULE_SUFFIXES]
        if four and eight:
            return f"it has both 4-bit ({', '.join(four)}) and 8-bit ({', '.join(eight)}) bitsandbytes companions"
        if eight:
            if dtype != "I8" or len(shape) != 2:
                return f"it is {dtype} {list(shape)}, but a bitsandbytes 8-bit weight is 2-D I8"
            if "SCB" not in companions:
                return f"no {_module_prefix(weight_key)}SCB beside it"
            sdtype, sshape = companions["SCB"]
            if sdtype not in ("F32", "F16", "BF16") or int(np.prod(sshape, dtype=np.int64)) != shape[0]:
                return f"its SCB is {sdtype} {list(sshape)}, not one float per row ({shape[0]})"
            return None
        if not four:
            return f"it is {dtype} with no bitsandbytes companions (weight.absmax / SCB) beside it"
        missing = [r for r in ("absmax", "quant_map") if r not in companions]
        if not any(r in companions for r in _QS_ROLES):
            missing.append("quant_state.bitsandbytes__nf4 (or __fp4)")
        if missing:
            return f"no {', '.join(weight_key + '.' + m for m in missing)} beside it"
        if dtype not in ("U8", "I8", "BF16", "F16", "F32"):
            return f"its packed codes are {dtype}, not a bitsandbytes quant_storage type"
        return None

    def bind(self, weight_key: str, shape: tuple[int, ...], dtype: str,
             read: Callable[[str], tuple[np.ndarray, str]]) -> QuantScheme:
        if any(_has(read, role) for role in Q.BNB8_MODULE_SUFFIXES):  # LLM.int8 (check: not also 4-bit)
            tensors: dict[str, object] = {_module_prefix(weight_key) + role: Tensor(*read(role))
                                          for role in Q.BNB8_MODULE_SUFFIXES if _has(read, role)}
            Q.check_int8_format(tensors, weight_key)
            return Int8Weight("bitsandbytes LLM.int8 (SCB)")
        tensors = {weight_key: Tensor(*read("weight"))}
        tensors.update({f"{weight_key}.{role}": Tensor(*read(role)) for role in _BNB4_ROLES if _has(read, role)})
        st = Q.parse_bnb4(tensors, weight_key)
        what = f"bitsandbytes 4-bit {st.quant_type}, blocks of {st.blocksize}" + (", nested" if st.nested else "")
        return Bnb4Weight(what, "bitsandbytes", True, self.packed_dtype, quant_type=st.quant_type,
                          blocksize=st.blocksize, nested=st.nested, dtype=st.dtype, shape=st.shape,
                          storage=st.storage_dtype, nested_offset=st.nested_offset,
                          nested_blocksize=st.nested_blocksize)

    # the unbound scheme does no math: `bind` first
    def row_align(self, shape: tuple[int, ...]) -> int:
        raise NotImplementedError("Bitsandbytes: bind the scheme to a weight first")

    def dequantize(self, codes: np.ndarray, companions: Mapping[str, tuple[np.ndarray, str]], r0: int,
                   shape: tuple[int, ...], threads: int = 0) -> np.ndarray:
        raise NotImplementedError("Bitsandbytes: bind the scheme to a weight first")

    def quantize(self, x: np.ndarray, r0: int, shape: tuple[int, ...],
                 companion_dtypes: Mapping[str, str], threads: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        raise NotImplementedError("Bitsandbytes: bind the scheme to a weight first")

    def companion_rows(self, role: str, r0: int, r1: int, shape: tuple[int, ...]) -> tuple[int, int]:
        raise NotImplementedError("Bitsandbytes: bind the scheme to a weight first")


@dataclass(frozen=True)
class Bnb4Weight(Bitsandbytes):
    """One bitsandbytes 4-bit weight, its quant state read (`Bitsandbytes.bind`). The stored weight is the
    packed codes ([bytes / itemsize, 1]); its real shape and dtype are the quant state's. Rows dequantize
    through io.quant_bnb.dequantize_bnb4 (the blocks run along the flattened weight: any rows); requantizing
    takes row blocks that start at a block boundary (bnb4_row_align) and gives each block a fresh absmax, in
    bitsandbytes' own quantize_4bit arithmetic; nested absmax is quantized once every block's is known
    (`finish`), with the base's nested offset, map and block size, so its quant_state is written back unchanged."""

    quant_type: str = "nf4"
    blocksize: int = 64
    nested: bool = False
    dtype: str = "float32"
    shape: tuple[int, ...] = ()
    storage: str = "uint8"
    nested_offset: float = 0.0
    nested_blocksize: int = Q.NESTED_BLOCKSIZE  # the quant state's (bitsandbytes writes 256)

    def logical_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.shape

    def logical_dtype(self) -> str | None:
        return _ST_DTYPE[self.dtype]

    def row_align(self, shape: tuple[int, ...]) -> int:
        return Q.bnb4_row_align(shape, self.blocksize)

    def companion_rows(self, role: str, r0: int, r1: int, shape: tuple[int, ...]) -> tuple[int, int]:
        cols = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        return r0 * cols // self.blocksize, _ceil(r1 * cols, self.blocksize)

    def _state(self, weight_key: str, packed: np.ndarray, companions: Mapping[str, tuple[np.ndarray, str]]
               ) -> Q.Bnb4State:
        tensors: dict[str, object] = {weight_key: packed.reshape(-1).view(np.uint8)}
        tensors.update({f"{weight_key}.{role}": Tensor(raw, dt) for role, (raw, dt) in companions.items()})
        return Q.parse_bnb4(tensors, weight_key)

    def read_rows(self, raw: np.ndarray, companions: Mapping[str, tuple[np.ndarray, str]], r0: int, r1: int,
                  shape: tuple[int, ...], threads: int = 0) -> np.ndarray:
        st = self._state("weight", raw, companions)
        if tuple(shape) != st.shape and math.prod(shape) == st.numel:  # rows of a view: an [E, out, in] weight as
            st = replace(st, shape=tuple(shape))  # the merge's (E * out, in) matrix (the blocks run flat: any view)
        return Q.dequantize_bnb4(raw.reshape(-1).view(np.uint8), st, slice(r0, r1)).reshape(r1 - r0, -1)

    def dequantize(self, codes: np.ndarray, companions: Mapping[str, tuple[np.ndarray, str]], r0: int,
                   shape: tuple[int, ...], threads: int = 0) -> np.ndarray:
        """A run of rows as `quantize` returned it: packed codes and float32 absmax ('absmax') of rows that
        start at a block boundary; `shape` is the run's."""
        absmax = np.asarray(companions["absmax"][0], dtype=np.float32).reshape(-1)
        st = Q.Bnb4State("weight", self.quant_type, self.blocksize, tuple(shape), self.dtype, absmax,
                         Q.code_table(self.quant_type), "uint8")
        return Q.dequantize_bnb4(codes.reshape(-1).view(np.uint8), st).reshape(shape[0], -1)

    def quantize(self, x: np.ndarray, r0: int, shape: tuple[int, ...],
                 companion_dtypes: Mapping[str, str], threads: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        packed, absmax = Q.quantize_4bit_blocks(x, self.quant_type, self.blocksize)
        return packed, {"absmax": _as_stored(absmax, companion_dtypes.get("absmax", "F32"))}

    def code_bytes(self, r0: int, r1: int, shape: tuple[int, ...], itemsize: int) -> int:
        cols = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        return (r1 * cols + 1) // 2 - r0 * cols // 2

    def finish(self, parts: Mapping[str, list[np.ndarray]], companions: Mapping[str, tuple[np.ndarray, str]],
               shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        absmax = np.concatenate([a.reshape(-1) for a in parts["absmax"]]).astype(np.float32)
        out = {role: raw for role, (raw, _) in companions.items()}  # maps and quant_state: written back as read
        if not self.nested:  # in the base's absmax dtype (bitsandbytes writes F32; F16 / BF16, F64 are read too)
            out["absmax"] = _raw_in(absmax, companions["absmax"][1])
            return out
        raw, dt = companions["nested_quant_map"]
        nmap = get_backend().to_float32(np.ascontiguousarray(raw).reshape(-1), dt, 0)
        codes, nabs, _ = Q.quantize_nested_absmax(absmax, offset=self.nested_offset, code=nmap,
                                                  blocksize=self.nested_blocksize)
        out["absmax"], out["nested_absmax"] = codes, _raw_in(nabs, companions["nested_absmax"][1])
        return out


def _as_stored(absmax: np.ndarray, dtype: str) -> np.ndarray:
    """float32 absmax rounded to the dtype the base stores it in (F16 / BF16: the scales the written weight's codes
    are read with, so the reported error is that of the output); float32 otherwise (F32, F64, nested U8 codes)."""
    if dtype not in ("F16", "BF16"):
        return absmax
    backend = get_backend()
    with np.errstate(over="ignore"):
        return backend.to_float32(backend.from_float32(np.ascontiguousarray(absmax, dtype=np.float32), dtype, 0),
                                  dtype, 0)


def _raw_in(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 scales as the raw bytes of the float `dtype` their base tensor is stored in (F32, F16, BF16, F64)."""
    if dtype in ("F16", "BF16"):
        return get_backend().from_float32(np.ascontiguousarray(x, dtype=np.float32), dtype, 0)
    return x.astype(np.float64) if dtype == "F64" else x


@dataclass(frozen=True)
class Int8Weight(Bitsandbytes):
    """One bitsandbytes LLM.int8 weight: int8 [out, in] and SCB (each row's absmax). Rows dequantize as
    `(int8 * SCB) * float32(1 / 127)` (bitsandbytes' int8_vectorwise_dequant). Requantizing does what loading a
    16-bit model in 8 bits does (bitsandbytes' Int8Params: the weight rounded to float16, then its CPU
    int8_vectorwise_quant): SCB = the row's absmax, codes = round-half-even(x * float32(127 / SCB)); a zero row
    gets codes 0."""

    def row_align(self, shape: tuple[int, ...]) -> int:
        return 1

    def companion_rows(self, role: str, r0: int, r1: int, shape: tuple[int, ...]) -> tuple[int, int]:
        return r0, r1

    def dequantize(self, codes: np.ndarray, companions: Mapping[str, tuple[np.ndarray, str]], r0: int,
                   shape: tuple[int, ...], threads: int = 0) -> np.ndarray:
        raw, dt = companions["SCB"]
        scb = get_backend().to_float32(np.ascontiguousarray(raw.reshape(-1)[r0: r0 + codes.shape[0]]), dt, threads)
        return Q.dequantize_int8(np.asarray(codes).view(np.int8).reshape(codes.shape[0], -1), scb)

    def quantize(self, x: np.ndarray, r0: int, shape: tuple[int, ...],
                 companion_dtypes: Mapping[str, str], threads: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            a = x.astype(np.float16).astype(np.float32)
            scb = np.abs(a).max(axis=1) if a.shape[1] else np.zeros(a.shape[0], dtype=np.float32)
            q = np.rint(a * (np.float32(127.0) / scb)[:, None])
        codes = np.where(np.isfinite(q), q, 0).astype(np.int8)
        scb_raw = get_backend().from_float32(np.ascontiguousarray(scb, dtype=np.float32),
                                             companion_dtypes.get("SCB", "F32"), threads)
        return codes, {"SCB": scb_raw}

    def finish(self, parts: Mapping[str, list[np.ndarray]], companions: Mapping[str, tuple[np.ndarray, str]],
               shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        out = {role: raw for role, (raw, _) in companions.items()}  # weight_format: written back as read
        out["SCB"] = np.concatenate([s.reshape(-1) for s in parts["SCB"]])
        return out


def _has(read: Callable[[str], tuple[np.ndarray, str]], role: str) -> bool:
    try:
        read(role)
    except KeyError:
        return False
    return True


def _bnb_factory(qc: dict[str, object]) -> QuantScheme | str:
    storage = qc.get("bnb_4bit_quant_storage", "uint8")
    packed = Q.QUANT_STORAGE[storage][0] if isinstance(storage, str) and storage in Q.QUANT_STORAGE else "U8"
    return Bitsandbytes(_bnb_name(qc, {}), packed_dtype=packed)


def _bnb_name(qc: Mapping[str, object], dtypes: Mapping[str, str]) -> str:
    """What a bitsandbytes checkpoint holds, from its tensors (each 4-bit weight's quant_state names its type,
    whatever the config says or leaves out), else from its config."""
    four = sorted({k.rpartition("__")[2] for k in dtypes if Q.QUANT_STATE_PREFIX in k} & set(Q.QUANT_TYPES))
    eight = any(k == "SCB" or k.endswith(".SCB") for k in dtypes)
    parts = []
    if four:
        parts.append(f"bitsandbytes 4-bit {' / '.join(four)}")
    elif qc.get("load_in_4bit"):
        qtype = qc.get("bnb_4bit_quant_type")
        parts.append("bitsandbytes 4-bit" + (f" {qtype}" if isinstance(qtype, str) else ""))
    if eight or (not four and not qc.get("load_in_4bit") and qc.get("load_in_8bit")):
        parts.append("bitsandbytes 8-bit (LLM.int8)")
    return " and ".join(parts) or "bitsandbytes"


# ---------------------------------------------------------------- detection


@dataclass(frozen=True)
class Quantization:
    """What a checkpoint says about its quantization. `scheme` None: lorafuse cannot honour it."""

    method: str  # quant_method ('fp8', 'gptq', ...), or what companion tensors point to
    source: str  # where it was found: 'config.json quantization_config' or 'tensor names (e.g. x.weight_scale_inv)'
    scheme: QuantScheme | None
    why: str = ""  # why it is refused (scheme None)
    dropped_suffixes: tuple[str, ...] = ()  # companions written only with quantized weights (input_scale, ...)

    def describe(self) -> str:
        how = self.scheme.name if self.scheme is not None else "not supported by lorafuse"
        return f"{self.method} ({how}; from {self.source})"


# quant_method -> a factory of its scheme from the quantization_config (None: refuse, with the reason)
SchemeFactory = Callable[[dict[str, object]], "QuantScheme | str"]
_METHODS: dict[str, SchemeFactory] = {}


def register_method(method: str, factory: SchemeFactory) -> None:
    """Make lorafuse honour checkpoints of `method` (a quant_method, lowercase): `factory` turns a
    quantization_config into the scheme of its weights, or into a string saying why it cannot.
    bitsandbytes registers here once its dequantize / quantize paths exist (io/quant_bnb.py)."""
    _METHODS[method.lower()] = factory


def _pair(value: object, default: tuple[int, int] | None) -> tuple[int, int] | None:
    if value is None:
        return default
    if (isinstance(value, list | tuple) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        return (int(value[0]), int(value[1]))
    return None


def _fp8_factory(qc: dict[str, object]) -> QuantScheme | str:
    fmt = str(qc.get("fmt", "e4m3")).lower()
    if fmt not in ("e4m3", "float8_e4m3fn"):
        return f"float8 format {fmt!r} (lorafuse reads e4m3 weights only)"
    # weight_block_size absent or null: one scale per tensor (transformers' FineGrainedFP8Config takes None so)
    size = qc.get("weight_block_size")
    block = _pair(size, None) if size is not None else (0, 0)
    if block is None:
        return f"weight_block_size {size!r} is not two positive integers"
    scale_fmt = qc.get("scale_fmt")
    if scale_fmt not in (None, "float", "ue8m0"):
        return f"scale_fmt {scale_fmt!r} (lorafuse reads 'float' and 'ue8m0' scales)"
    what = f"block {block[0]}x{block[1]}" if block != (0, 0) else "per tensor"
    ue8m0 = scale_fmt == "ue8m0"
    return Fp8Scaled(f"float8 e4m3, {what}, weight_scale_inv" + (" (ue8m0: powers of two)" if ue8m0 else ""),
                     "fp8", "weight_scale_inv", block, ue8m0=ue8m0)


def _fp8_scale_names(scheme: Fp8Scaled, dtypes: Mapping[str, str]) -> Fp8Scaled:
    """`quant_method: fp8` without weight_block_size whose float8 weights carry a `weight_scale` and no tensor a
    `weight_scale_inv`: AutoFP8 / vLLM's per-tensor layout (neuralmagic's `*-FP8` models: quantization_config
    {quant_method: fp8, activation_scheme, ignored_layers}, `weight` F8_E4M3 + `weight_scale` F32 [] or [1],
    `input_scale` with static activations), W = codes * weight_scale: the scheme of compressed-tensors' `tensor`
    strategy, under that name. Otherwise transformers' own naming (`weight_scale_inv`)."""
    if scheme.block != (0, 0) or any(k.endswith("_scale_inv") for k in dtypes):
        return scheme
    if not any(k.endswith(".weight_scale") and dtypes.get(k.removesuffix("_scale")) == "F8_E4M3" for k in dtypes):
        return scheme
    return replace(scheme, name=scheme.name.replace("weight_scale_inv", "weight_scale (AutoFP8 / vLLM layout)"),
                   scale_suffix="weight_scale")


def _ct_factory(qc: dict[str, object]) -> QuantScheme | str:
    """compressed-tensors: float-quantized 8-bit float weights with one block / channel / tensor strategy."""
    fmt = qc.get("format")
    if fmt not in ("float-quantized", "naive-quantized"):
        return f"format {fmt!r} (lorafuse reads float-quantized float8 weights only)"
    sparsity = qc.get("sparsity_config")
    if isinstance(sparsity, dict) and sparsity.get("format") not in (None, "dense"):
        return f"sparsity format {sparsity.get('format')!r}"
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        return "no config_groups"
    strategies: set[tuple[str, tuple[int, int] | None]] = set()
    for name, g in groups.items():
        w = g.get("weights") if isinstance(g, dict) else None
        if not isinstance(w, dict):
            return f"config group {name!r} has no weights scheme"
        if w.get("type") != "float" or w.get("num_bits") != 8 or w.get("symmetric", True) is not True:
            return (f"config group {name!r}: {w.get('num_bits')}-bit {w.get('type')} weights "
                    f"(symmetric={w.get('symmetric')}); lorafuse reads symmetric 8-bit float weights only")
        if w.get("dynamic") not in (None, False):
            return f"config group {name!r}: dynamic weight scales"
        strategy = str(w.get("strategy"))
        if strategy == "block":
            block = _pair(w.get("block_structure"), None)
            if block is None:
                return f"config group {name!r}: block_structure {w.get('block_structure')!r}"
            strategies.add((strategy, block))
        elif strategy in ("channel", "tensor"):
            strategies.add((strategy, None))
        else:
            return f"config group {name!r}: weight strategy {strategy!r} (lorafuse reads block, channel, tensor)"
    if len(strategies) != 1:
        return "config groups with different weight strategies"
    strategy, block = strategies.pop()
    grid = block if block is not None else (1, 0) if strategy == "channel" else (0, 0)
    what = f"block {grid[0]}x{grid[1]}" if strategy == "block" else f"per {strategy}"
    return Fp8Scaled(f"float8 e4m3, {what}, weight_scale", "compressed-tensors", "weight_scale", grid)


register_method("fp8", _fp8_factory)
register_method("compressed-tensors", _ct_factory)
register_method("bitsandbytes", _bnb_factory)

# Companions that go with quantized weights (activation and KV-cache scales): kept with keep-FP8, dropped
# with the quantization_config when the weights are written in 16 / 32 bits.
# (`activation_scale`: transformers' fp8 with activation_scheme static; `kv_scale`: AutoFP8 / vLLM's older
# KV-cache scale.) transformers 5's fused experts name theirs `<param>_activation_scale` (`quant_extras`).
_DROPPED_WITH_CONFIG = ("input_scale", "activation_scale", "output_scale", "k_scale", "v_scale", "kv_scale",
                        "weight_scale_inv", "weight_scale")


def _method_of(config: Mapping[str, object]) -> tuple[str, dict[str, object], str] | None:
    for key in ("quantization_config", "compression_config"):
        qc = config.get(key)
        if qc is None:
            continue
        if not isinstance(qc, dict):
            return ("unknown", {}, f"config.json {key} (not a JSON object)")
        method = qc.get("quant_method", "compressed-tensors" if key == "compression_config" else None)
        return (str(method).lower() if method is not None else "unknown", qc, f"config.json {key}")
    return None


def detect(config: Mapping[str, object], dtypes: Mapping[str, str]) -> Quantization | None:
    """A checkpoint's quantization from its config.json (`config`, {} when none) and its tensors
    (key -> dtype); None for a checkpoint that is not quantized (plain float8 weights without scales
    included: they are values, merged as such)."""
    found = _method_of(config)
    if found is not None:
        method, qc, source = found
        factory = _METHODS.get(method)
        if factory is None:
            return Quantization(method, source, None, _ADVICE.get(method, _DEFAULT_ADVICE))
        made = factory(qc)
        if isinstance(made, str):
            return Quantization(method, source, None, f"{made}; " + _ADVICE.get(method, _DEFAULT_ADVICE))
        if type(made) is Bitsandbytes:  # say what the tensors hold (the config may leave the quant type out)
            made = replace(made, name=_bnb_name(qc, dtypes))
        if method == "fp8" and isinstance(made, Fp8Scaled):
            made = _fp8_scale_names(made, dtypes)
        return Quantization(method, source, made, dropped_suffixes=_DROPPED_WITH_CONFIG)
    return _detect_by_names(dtypes)


def detect_checkpoint(ckpt: Checkpoint, config: Mapping[str, object] | None = None) -> Quantization | None:
    """`detect` for a checkpoint: its config.json (`config` when already read) and its tensors' dtypes."""
    return detect(read_config(ckpt.directory) if config is None else config,
                  {k: ckpt.info(k).dtype for k in ckpt.keys()})


def parameter_count(ckpt: Checkpoint, q: Quantization | None) -> int:
    """The model's parameters in a checkpoint quantized as `q` (None: not quantized): each tensor's element count,
    a packed bitsandbytes 4-bit weight counted by its real shape (from its quant_state), and the quantization's
    companions (scales, absmax, quant maps and states, SCB, activation / KV-cache scales) not counted. A
    quantization lorafuse does not read (GPTQ, ...) is counted as stored (packed integers)."""
    keys = ckpt.keys()
    if q is None or q.scheme is None:
        return sum(ckpt.info(k).numel for k in keys)
    scheme = q.scheme
    present = set(keys)
    companions = {c for k in keys for c in scheme.companions(k).values() if c in present}
    companions |= {k for k in keys if scheme.is_companion(k)} | quant_extras(keys, q)
    total = 0
    files: dict[str, SafetensorsFile] = {}
    try:
        for k in keys:
            if k in companions:
                continue
            states = [k + Q.QUANT_STATE_PREFIX + t for t in Q.QUANT_TYPES if k + Q.QUANT_STATE_PREFIX + t in present]
            if len(states) == 1:
                shard = ckpt.shard_of[states[0]]
                if shard not in files:
                    files[shard] = ckpt.open(shard)
                try:
                    total += math.prod(Q.quant_state_shape(files[shard].raw(states[0]), states[0]))
                    continue
                except LorafuseError:
                    pass  # an unreadable quant state: counted as stored (apply refuses it, naming it)
            total += ckpt.info(k).numel
    finally:
        for f in files.values():
            f.close()
    return total


def quant_extras(keys: Iterable[str], q: Quantization) -> set[str]:
    """The tensors of a quantized checkpoint that go with its quantized weights without being one's companion
    (activation / KV-cache scales): `<module>.<suffix>` for a suffix of q.dropped_suffixes (`x.input_scale`), or
    `<param>_<suffix>` beside a tensor `<param>` (transformers 5's fused FP8 experts:
    `experts.gate_up_proj_activation_scale` beside `experts.gate_up_proj`)."""
    present = set(keys)
    tails = tuple("_" + s for s in q.dropped_suffixes)  # one test per name; the few that end so are looked at
    out = set()
    for k in present:
        last = k.rpartition(".")[2]
        if last in q.dropped_suffixes or (last.endswith(tails) and any(
                last.endswith("_" + s) and k[: -len(s) - 1] in present for s in q.dropped_suffixes)):
            out.add(k)
    return out


def _detect_by_names(dtypes: Mapping[str, str]) -> Quantization | None:
    hinted = tuple(suffix for suffix, _ in _COMPANION_HINTS)
    for key in dtypes:
        if not key.endswith(hinted):  # one test per name (a checkpoint of 262,144 tensors: most of them)
            continue
        for suffix, method in _COMPANION_HINTS:
            if not key.endswith(suffix):
                continue
            source = f"tensor names (e.g. {key}; no quantization_config)"
            weight = key[: -len(suffix)] + ".weight"
            if suffix == ".weight_scale_inv" and dtypes.get(weight) == "F8_E4M3":
                # DeepSeek-V3's layout: 128 x 128 blocks (checked against every scale's shape)
                scheme = Fp8Scaled("float8 e4m3, block 128x128 (assumed), weight_scale_inv", "fp8",
                                   "weight_scale_inv", (128, 128))
                return Quantization("fp8", source, scheme, dropped_suffixes=_DROPPED_WITH_CONFIG)
            if suffix == ".weight_scale" and dtypes.get(weight) == "F8_E4M3":
                return Quantization(method, source, None,
                                    "float8 weights with weight_scale but no quantization_config to say their block "
                                    "layout; put the checkpoint's config.json beside it")
            if method == "bitsandbytes":  # self-describing: the quant_state / SCB beside each weight says it all
                return Quantization(method, source, Bitsandbytes(_bnb_name({}, dtypes)))
            return Quantization(method, source, None, _ADVICE.get(method, _DEFAULT_ADVICE))
    return None


def refusal(q: Quantization, where: str | os.PathLike[str], verb: str = "apply") -> UnsupportedError:
    """The error for a checkpoint lorafuse cannot honour: the file, the method, and what to do."""
    return UnsupportedError(f"{where}: the checkpoint is quantized with {q.method} (found in {q.source}), which "
                            f"lorafuse {verb} cannot honour: {q.why}")


def relative(err_sq: float, ref_sq: float) -> float:
    """A relative Frobenius error from sums of squares (0 when both are 0)."""
    return math.sqrt(err_sq / ref_sq) if ref_sq > 0 else (0.0 if err_sq == 0 else math.inf)
