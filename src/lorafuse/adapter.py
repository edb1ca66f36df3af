"""The data model: an adapter maps module names to low-rank updates.

A module name is canonical: the base model's weight key without `.weight`
(`model.layers.0.self_attn.q_proj`). Each update holds its factors as stored by
its format (memory-mapped until used) and knows how they map onto the base
weight's layout: delta = scale * B_c @ A_c, with B_c (rows x r) and A_c
(r x cols) where the base weight, flattened to 2-D, is (rows x cols).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from lorafuse import _core
from lorafuse.io.tensor import Tensor

Kind = Literal["linear", "conv", "embedding"]


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

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this update adds to."""
        if self.transposed:
            return (self.A.shape[1], self.B.shape[0])
        return (self.B.shape[0], *self.A.shape[1:])

    def factors(self, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(B_c, A_c) as C-contiguous float32, unscaled, in the base weight's 2-D layout."""
        a = self.A.f32(threads).reshape(self.rank, -1)
        b = self.B.f32(threads).reshape(self.B.shape[0], self.rank)
        if self.transposed:
            return np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)
        return np.ascontiguousarray(b), np.ascontiguousarray(a)

    def delta(self) -> np.ndarray:
        """The dense delta in float64 (for small modules, reports and tests)."""
        b, a = self.factors()
        return (self.scale * (b.astype(np.float64) @ a.astype(np.float64))).reshape(self.delta_shape)


@dataclass
class Adapter:
    """A set of low-rank updates plus the full tensors that travel with them."""

    updates: dict[str, LoraUpdate]
    full: dict[str, Tensor] = field(default_factory=dict)  # base key -> replacement (modules_to_save, base_layer)
    config: dict[str, object] = field(default_factory=dict)
    format: str = "peft"
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.updates)

    def __iter__(self) -> Iterator[str]:
        return iter(self.updates)

    def __getitem__(self, name: str) -> LoraUpdate:
        return self.updates[name]

    @property
    def label(self) -> str:
        return str(self.path) if self.path is not None else "<in-memory adapter>"

    def norms(self, threads: int = 0) -> dict[str, float]:
        """Exact ||delta||_F of every module, from the factors alone (no dense matrix)."""
        pairs = []
        for u in self.updates.values():
            b, a = u.factors(threads)
            pairs.append((b, a))
        sq = _core.factored_frobenius_sq(pairs, threads)
        return {
            name: float(abs(u.scale) * np.sqrt(max(s, 0.0))) for (name, u), s in zip(self.updates.items(), sq)
        }

    def num_parameters(self) -> int:
        n = sum(int(np.prod(u.A.shape)) + int(np.prod(u.B.shape)) for u in self.updates.values())
        n += sum(int(np.prod(u.magnitude.shape)) for u in self.updates.values() if u.magnitude is not None)
        n += sum(int(np.prod(u.bias.shape)) for u in self.updates.values() if u.bias is not None)
        return n + sum(int(np.prod(t.shape)) for t in self.full.values())
