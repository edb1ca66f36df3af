"""A LoRA update: delta = scale * B_c @ A_c in the base weight's 2-D layout.

Each update holds its factors as stored by its format (memory-mapped until used) and knows how they
map onto the base weight's layout: B_c (rows x r) and A_c (r x cols) where the base weight, flattened
to 2-D, is (rows x cols). A Tucker LoCon is a LoraUpdate whose A is a TuckerFactor (model.tucker).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from lorafuse.errors import LorafuseValueError, ShapeMismatchError
from lorafuse.io.tensor import Tensor
from lorafuse.model.half import Half
from lorafuse.model.limits import f64
from lorafuse.model.names import Kind
from lorafuse.model.structure import LowRank
from lorafuse.model.tucker import TuckerFactor


@dataclass
class LoraUpdate:
    """One module's low-rank update.

    `A` (r x in, or r x in x kh x kw for conv) and `B` (out x r [x 1 x 1]) are as the
    format stores them. When `transposed` is set (PEFT embeddings, `fan_in_fan_out`
    layers) the base weight holds (B @ A)^T, so B_c = A^T and A_c = B^T.
    """

    name: str
    A: Tensor
    B: Tensor
    scale: float
    kind: Kind = "linear"
    transposed: bool = False
    magnitude: Tensor | None = None  # DoRA: one value per output feature (a row, or a column if transposed)
    bias: Tensor | None = None  # lora_B bias, added to the base bias times scale
    # DoRA that normalizes the base weight's columns (LyCORIS `wd_on_out=False` on a Linear) although
    # the update is not transposed: magnitude then has one value per column of the 2-D base weight.
    magnitude_on_columns: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this update adds to."""
        if self.transposed:
            return (self.A.shape[1], self.B.shape[0])
        return (self.B.shape[0], *self.A.shape[1:])

    def stored_factors(self, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(B, A) as float32, unscaled, in the format's own orientation, flattened to 2-D:
        B (out x r) and A (r x in, or r x in*kh*kw for conv). `threads`: worker threads of the conversion of
        16-bit or float8 factors to float32 (0: all cores)."""
        a = self.A.f32(threads).reshape(self.rank, -1)
        b = self.B.f32(threads).reshape(self.B.shape[0], self.rank)
        return b, a

    def factors(self, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(B_c, A_c) as C-contiguous float32, unscaled, in the base weight's 2-D layout (`threads`: as
        stored_factors)."""
        b, a = self.stored_factors(threads)
        if self.transposed:
            return np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)
        return np.ascontiguousarray(b), np.ascontiguousarray(a)

    def with_factors(self, b: np.ndarray, a: np.ndarray, scale: float = 1.0) -> LoraUpdate:
        """The update of the same module and layout with new stored factors B (out x k), A (k x ...) and
        `scale`. What travels with the factors is kept, never dropped: the DoRA magnitude (and which
        side it normalizes) as it is, the lora_B bias rescaled so that scale * bias, what a merge adds,
        stays the same. (Operations that cannot honour them, such as combining, refuse them first.) The update
        holds copies of `b` and `a`: a later write to them does not change it."""
        b32, a32 = new_factors(self.name, b, a, self.A.shape[1:], self.B.shape[0], self.B.shape[2:])
        k = a32.shape[0]
        a_t = Tensor.from_array(a32.reshape((k, *self.A.shape[1:])))
        b_t = Tensor.from_array(b32.reshape((self.B.shape[0], k, *self.B.shape[2:])))
        bias = self.bias
        if bias is not None and scale != self.scale:
            if scale == 0 or not np.isfinite(scale):
                raise LorafuseValueError(f"module {self.name!r}: its lora_B bias (added times scale {self.scale}) "
                                         f"cannot be kept by an update of scale {scale}")
            rescaled = bias.f32().astype(np.float64) * (self.scale / scale)
            bias = Tensor.from_array(rescaled.astype(np.float32))
        return LoraUpdate(self.name, a_t, b_t, scale, self.kind, self.transposed, self.magnitude, bias,
                          self.magnitude_on_columns)

    def laid_as(self, transposed: bool) -> LoraUpdate:
        """The same update marked `transposed` or not where only the mark changes: a linear LoRA without a DoRA
        magnitude is the layer's (out x in) update B @ A however its base weight is stored, and PEFT decides
        that by the layer's type, whatever fan_in_fan_out says (it resets the flag for a torch Linear, forces it
        for a transformers Conv1D, with a warning). Any other update (an embedding, a DoRA) as it is."""
        if self.transposed == transposed or self.kind != "linear" or self.magnitude is not None:
            return self
        return dataclasses.replace(self, transposed=transposed)

    def is_plain(self) -> bool:
        """A pure low-rank delta: no DoRA magnitude, no bias (those do not add linearly)."""
        return self.magnitude is None and self.bias is None

    def stored_tensors(self) -> list[Tensor]:
        """The tensors kept from the file: factors (a Tucker LoCon's lora_mid and lora_down, as stored, not their
        contraction), DoRA magnitude, bias."""
        a = [self.A.mid, self.A.down] if isinstance(self.A, TuckerFactor) else [self.A]
        return [*a, self.B] + [t for t in (self.magnitude, self.bias) if t is not None]

    def structure(self) -> LowRank:
        """The unscaled 2-D delta B_c @ A_c in its structure (float64; a Tucker LoCon through its core)."""
        if isinstance(self.A, TuckerFactor):
            up = f64(self.B, (self.B.shape[0], self.rank))
            return LowRank(self.A.half(self.B.shape[0], up))
        b, a = self.factors()
        return LowRank(Half(b.shape[0], a.shape[1], b=b.astype(np.float64), a=a.astype(np.float64)))

    def delta(self) -> np.ndarray:
        """The dense delta in float64 (for small modules, reports and tests)."""
        b, a = self.factors()
        return (self.scale * (b.astype(np.float64) @ a.astype(np.float64))).reshape(self.delta_shape)


def new_factors(name: str, b: object, a: object, a_tail: tuple[int, ...], rows: int,
                b_tail: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """New factors B, A given to `with_factors`, as C-contiguous float32 copies: real floating arrays (or torch
    tensors) whose shapes are B (rows x k [x b_tail]) and A (k x a_tail, or k x prod(a_tail)) for one k >= 1;
    anything else is refused naming the module and the shapes, never reshaped or cast into another update."""
    arrays = []
    for side, x in (("B", b), ("A", a)):
        arr = np.asarray(x) if hasattr(x, "__array__") else None
        if arr is None or arr.dtype.kind != "f":
            got = f"{type(x).__name__}" if arr is None else f"a {arr.dtype} array"
            raise LorafuseValueError(f"module {name!r}: the new factor {side} must be a real floating numpy array "
                                     f"or tensor, got {got}")
        arrays.append(arr)
    b_arr, a_arr = arrays
    k = a_arr.shape[0] if a_arr.ndim >= 1 else 0
    fits = (k >= 1 and a_arr.shape[1:] in (tuple(a_tail), (int(np.prod(a_tail)),))
            and b_arr.shape in ((rows, k), (rows, k, *b_tail)))
    if not fits:
        raise ShapeMismatchError(f"module {name!r}: new factors B {tuple(b_arr.shape)} and A {tuple(a_arr.shape)} "
                                 f"do not fit the module: B must be ({rows}, k) and A (k, {int(np.prod(a_tail))}) "
                                 "for one rank k >= 1")
    return (np.array(b_arr, dtype=np.float32, order="C"), np.array(a_arr, dtype=np.float32, order="C"))
