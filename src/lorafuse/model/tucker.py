"""The factor of a Tucker LoCon: `lora_mid` contracted with a 1x1 `lora_down`, kept as stored."""

from __future__ import annotations

import numpy as np

from lorafuse.io.tensor import Tensor
from lorafuse.model.half import Half
from lorafuse.model.limits import check_dense, f64


class TuckerFactor(Tensor):
    """The lora_down of a Tucker LoCon as a tensor (r, in, kh, kw): `lora_mid` (r, r, kh, kw) contracted
    with a 1x1 `lora_down` (r, in, 1, 1). Both stay as stored; the contraction is computed (float64,
    in tiles, stored as float32) each time `raw` is read, after a check against MAX_DENSE_ELEMENTS,
    and never kept: norms, spectra and inner products go through the core instead."""

    mid: Tensor
    down: Tensor
    where: str

    def __init__(self, mid: Tensor, down: Tensor, where: str) -> None:
        object.__setattr__(self, "dtype", "F32")
        object.__setattr__(self, "mid", mid)
        object.__setattr__(self, "down", down)
        object.__setattr__(self, "where", where)

    @property
    def raw(self) -> np.ndarray:  # a dataclass field of Tensor, computed here
        r, d = self.down.shape[0], self.down.shape[1]
        shape = (r, d, *self.mid.shape[2:])
        check_dense(self.where, "the Tucker LoCon factor (lora_mid contracted with lora_down)", shape)
        return self.half(1).a_full32().reshape(shape)

    @raw.setter
    def raw(self, value: np.ndarray) -> None:  # the dataclass __init__ of Tensor is never called
        raise AttributeError("a TuckerFactor is computed from its core")

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.down.shape[0], self.down.shape[1], *self.mid.shape[2:])

    def half(self, rows: int, up: np.ndarray | None = None) -> Half:
        """The LoCon as a Half: B = up (rows x r) (the identity when None), A through the core."""
        r, d = self.down.shape[0], self.down.shape[1]
        core = f64(self.mid, (r, r, -1))
        wb = f64(self.down, (r, d))
        if up is None:
            return Half(r, d * core.shape[2], b=np.eye(r), core=core, wb=wb)
        return Half(rows, d * core.shape[2], b=up, core=core, wb=wb)

    def __repr__(self) -> str:
        return f"TuckerFactor(mid={self.mid.shape}, down={self.down.shape}, {self.where!r})"

    __hash__ = object.__hash__

    def __eq__(self, other: object) -> bool:
        return self is other
