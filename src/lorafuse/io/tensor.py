"""A tensor that stays a view of its file (or an in-memory array) until a kernel needs floats."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lorafuse.backends import get_backend
from lorafuse.errors import DtypeError
from lorafuse.io.dtypes import DTYPES, numpy_to_safetensors
from lorafuse.io.safetensors import raise_if_view_changed


def read_only(array: np.ndarray) -> np.ndarray:
    """`array` itself when it is read-only, else a read-only view of it (the array itself stays writable)."""
    if not isinstance(array, np.ndarray) or not array.flags.writeable:
        return array
    view = array.view()
    view.flags.writeable = False
    return view


@dataclass(frozen=True)
class Tensor:
    """Raw elements of a safetensors dtype: BF16 travels as uint16, F8 as uint8.

    `raw` is read-only, as a view of a mapped file is: what a tensor holds in memory (an adapter's factors, its
    arithmetic's results) cannot be changed through `raw`, `f32()` or an update's `factors()` either. A tensor
    made from an array that something else holds (a caller's) must be made from a copy of it."""

    raw: np.ndarray
    dtype: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "raw", read_only(self.raw))

    def __getstate__(self) -> dict[str, object]:
        """Pickled or deep-copied: the elements read out of the file (copy()), so that a file truncated or
        rewritten since it was mapped raises InputChangedError, never travels as the zeros or new bytes its
        pages now read as (the copy no longer knows the file to check)."""
        return {"raw": self.copy(), "dtype": self.dtype}

    def __setstate__(self, state: dict[str, object]) -> None:
        """Unpickled or deep-copied (pickle gives writable arrays): read-only again."""
        self.__dict__.update({k: read_only(v) if isinstance(v, np.ndarray) else v for k, v in state.items()})

    @classmethod
    def from_array(cls, array: np.ndarray) -> Tensor:
        """Wrap a numpy array (float16/32/64 or integer) as a tensor of the matching dtype (the array itself
        when it is C-contiguous: pass a copy of one the caller keeps)."""
        return cls(np.ascontiguousarray(array), numpy_to_safetensors(array.dtype))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.raw.shape)

    @property
    def is_float(self) -> bool:
        return DTYPES[self.dtype].is_float

    def f32(self, threads: int = 0) -> np.ndarray:
        """A float32 copy (or the read-only array itself when it already is float32). A view of a file that was
        truncated or rewritten since it was mapped raises InputChangedError (its missing pages read as zeros)."""
        if self.dtype == "F32":
            out = np.ascontiguousarray(self.raw, dtype=np.float32)
        elif not self.is_float:
            raise DtypeError(f"a {self.dtype} tensor cannot be used as floating-point data")
        else:
            out = get_backend().to_float32(np.ascontiguousarray(self.raw), self.dtype, threads)
        raise_if_view_changed(self.raw)
        return out

    def copy(self) -> np.ndarray:
        """The raw elements copied out of the file (see f32 for a file changed since it was mapped)."""
        out = self.raw.copy()
        raise_if_view_changed(self.raw)
        return out

    def to(self, dtype: str, threads: int = 0) -> Tensor:
        """This tensor converted to F32/F16/BF16 (rounded to nearest even)."""
        if dtype == self.dtype:
            return self
        return Tensor(get_backend().from_float32(self.f32(threads), dtype, threads), dtype)
