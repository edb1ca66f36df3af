"""The terms a combination works on: per module, the (weight, update) of every adapter that has it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lorafuse._validate import full_rank
from lorafuse.errors import LorafuseValueError
from lorafuse.formats import load
from lorafuse.model import Adapter, LoraUpdate, Update, arithmetic, stored_tensors
from lorafuse.model.layout import is_kxk


@dataclass
class Term:
    weight: float
    update: Update

    @property
    def coef(self) -> float:
        return self.weight * self.update.scale


Terms = dict[str, list[Term]]


def as_adapters(adapters: Sequence[str | os.PathLike[str] | Adapter]) -> list[Adapter]:
    return [a if isinstance(a, Adapter) else load(a) for a in adapters]


def terms_by_module(adapters: Sequence[Adapter], weights: Sequence[float]) -> Terms:
    """Module -> the Term of every adapter that has it (model.arithmetic.terms_by_module: layouts checked,
    a LoHa / LoKr with its conv kernel flattened laid onto the 4-D shape of the module)."""
    return {name: [Term(w, u) for w, u in ts] for name, ts in arithmetic.terms_by_module(adapters, weights).items()}


def dense_shape(u: Update) -> tuple[int, int]:
    """The stored 2-D shape (rows, cols) of an update's delta, as its stored factors multiply out."""
    b_rows = u.B.shape[0] if isinstance(u, LoraUpdate) else u.delta_shape[0]
    return int(b_rows), int(np.prod(u.delta_shape, dtype=np.int64)) // max(int(b_rows), 1)


def stack(terms: Sequence[Term], threads: int, coef_on: str = "B") -> tuple[np.ndarray, np.ndarray]:
    """[c_i B_i] and [A_i] (coef_on='B'), or [B_i] and [c_i A_i] (coef_on='A'): model.arithmetic.stack."""
    return arithmetic.stack([(t.weight, t.update) for t in terms], threads, coef_on)


def input_arrays(terms: Sequence[Term]) -> list[np.ndarray]:
    """The stored arrays (views of the input files while they are mapped) behind the terms."""
    return [t.raw for term in terms for t in stored_tensors(term.update) if isinstance(getattr(t, "raw", None),
                                                                                       np.ndarray)]


def unused_conv_rank() -> LorafuseValueError:
    """The refusal of a conv_rank that no module takes (no input module is a kxk convolution): it would change
    nothing, and the output would record it as used (as convert refuses it; combine's engines both say this)."""
    return LorafuseValueError("conv_rank (--conv-rank) applies to kxk convolutions (k > 1), and no module of the "
                              "adapters is one: leave it out (rank, --rank, sets every module's rank here)")


def output_ranks(by_module: Terms, rank: int | None, conv_rank: int | None) -> dict[str, int]:
    """Each module's output rank: `conv_rank` for kxk convolutions (k > 1), `rank` for the rest. A default
    is the largest rank among the plain LoRA inputs (PEFT's rule); `conv_rank` defaults to `rank`."""
    if conv_rank is not None and not any(is_kxk(ts[0].update.delta_shape) for ts in by_module.values()):
        raise unused_conv_rank()
    lora_ranks = [t.update.rank for ts in by_module.values() for t in ts if isinstance(t.update, LoraUpdate)]
    default = rank if rank is not None else max(lora_ranks, default=None)
    conv_default = conv_rank if conv_rank is not None else default
    out: dict[str, int] = {}
    for n, ts in by_module.items():
        k = conv_default if is_kxk(ts[0].update.delta_shape) else default
        if k is None:
            raise LorafuseValueError(f"module {n!r}: LoHa / LoKr inputs have no LoRA rank to default to; "
                                     "pass rank (--rank, and --conv-rank for kxk convolutions)")
        out[n] = full_rank(k, tuple(ts[0].update.delta_shape))  # a rank above min(out, in) adds only zeros
    return out
