"""safetensors element types: sizes, the numpy type that holds their raw bytes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lorafuse.errors import DtypeError, LorafuseValueError


@dataclass(frozen=True)
class DTypeInfo:
    name: str
    itemsize: int
    raw: np.dtype  # numpy type of the raw buffer (BF16 as uint16, F8 as uint8)
    is_float: bool


_TABLE = [
    DTypeInfo("BOOL", 1, np.dtype(np.bool_), False),
    DTypeInfo("U8", 1, np.dtype(np.uint8), False),
    DTypeInfo("I8", 1, np.dtype(np.int8), False),
    DTypeInfo("F8_E4M3", 1, np.dtype(np.uint8), True),
    DTypeInfo("F8_E5M2", 1, np.dtype(np.uint8), True),
    # float8_e8m0fnu: an exponent only (2^(e - 127), 255 = NaN), what transformers saves ue8m0 FP8 block scales as.
    # Read and written by the quantization layer only (io.quant); elsewhere it is data copied through, not a float
    # lorafuse computes in.
    DTypeInfo("F8_E8M0", 1, np.dtype(np.uint8), False),
    DTypeInfo("I16", 2, np.dtype("<i2"), False),
    DTypeInfo("U16", 2, np.dtype("<u2"), False),
    DTypeInfo("F16", 2, np.dtype("<f2"), True),
    DTypeInfo("BF16", 2, np.dtype("<u2"), True),
    DTypeInfo("I32", 4, np.dtype("<i4"), False),
    DTypeInfo("U32", 4, np.dtype("<u4"), False),
    DTypeInfo("F32", 4, np.dtype("<f4"), True),
    DTypeInfo("I64", 8, np.dtype("<i8"), False),
    DTypeInfo("U64", 8, np.dtype("<u8"), False),
    DTypeInfo("F64", 8, np.dtype("<f8"), True),
]
DTYPES: dict[str, DTypeInfo] = {d.name: d for d in _TABLE}
# Float types lorafuse computes in and can write back.
WRITABLE_FLOATS = ("F32", "F16", "BF16")

_ALIASES = {
    "f32": "F32", "float32": "F32", "fp32": "F32", "float": "F32",
    "f16": "F16", "float16": "F16", "fp16": "F16", "half": "F16",
    "bf16": "BF16", "bfloat16": "BF16",
}


_SPELLINGS = "'fp32', 'fp16', 'bf16' (or float32, float16, bfloat16, torch.bfloat16, numpy.float16, ...)"


def dtype_spelling(value: object) -> str | None:
    """An output dtype as text: a str as it is, a torch dtype as 'torch.bfloat16', a numpy dtype (or scalar
    type, np.float16) as its name ('float16'); None stays None. Anything else: LorafuseValueError."""
    if value is None or isinstance(value, str):
        return value
    if type(value).__module__.startswith("torch") and type(value).__name__ == "dtype":
        return str(value)  # 'torch.bfloat16'
    if isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
        return np.dtype(value).name
    raise LorafuseValueError(f"dtype must be one of {_SPELLINGS}, a torch dtype or a numpy dtype, got "
                             f"{value!r} ({type(value).__name__})")


def parse_output_dtype(value: object) -> str:
    """'bf16', 'bfloat16', 'BF16', 'torch.bfloat16', torch.bfloat16, np.float16 ... -> 'BF16' / 'F16' / 'F32'."""
    text = dtype_spelling(value)
    if text is None:
        raise LorafuseValueError(f"dtype must be one of {_SPELLINGS}, got None")
    key = text.strip().removeprefix("torch.").removeprefix("numpy.").removeprefix("np.")
    name = _ALIASES.get(key.lower(), key.upper())
    if name not in WRITABLE_FLOATS:
        raise LorafuseValueError(f"output dtype {text!r} is not one of float32, float16, bfloat16 ({_SPELLINGS})")
    return name


def numpy_to_safetensors(dtype: np.dtype) -> str:
    """The safetensors name of a numpy dtype (float32 -> 'F32')."""
    for d in _TABLE:
        if d.raw == dtype and d.name not in ("BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0"):
            return d.name
    raise DtypeError(f"numpy dtype {dtype} has no safetensors equivalent")
