"""F64 LoRA factors made fit for float32, in which lorafuse computes (the core widens or narrows every factor to
float32): a rank direction whose F64 factors lie beyond float32's range, one of them tiny and the other large (A_j
of 1e-48 times B_j of 1e38: a delta of 1e-10), would be narrowed to zeros (or Inf), and every operation would then
merge, combine, resize or convert a wrong delta without a word. Such a direction is balanced by powers of two
(row j of A times 2^k_j, column j of B times 2^-k_j: exact in float64, the delta unchanged), as resize and combine
balance their own factors (model.layout). A direction whose factors stay beyond float32's range balanced (its
delta beyond 2^+-200) is left as it is: the operations refuse an overflow where they meet it (update.beyond_float32
names the value), and a delta below 1e-60 is zero in every float32 / 16-bit output.

Applied where adapters are read (formats.read, Adapter.from_state_dict): every later path sees the balanced
factors. Factors already within range stay as they are (views of the mapped file)."""

from __future__ import annotations

import dataclasses

import numpy as np

from lorafuse.io.tensor import Tensor
from lorafuse.model.lora import LoraUpdate
from lorafuse.model.lycoris import LOHA_PARTS, LOKR_PARTS, LycorisUpdate
from lorafuse.model.update import Update

# A factor whose largest magnitude is within 2^+-SAFE_EXP is used as stored: float32's normal range is 2^-126 ..
# 2^128, and its smaller entries need room below.
SAFE_EXP = 100


def _exponents(x: np.ndarray, axis: int) -> np.ndarray:
    """Per rank direction (rows of A: axis 1, columns of B: axis 0) the binary exponent of its largest finite
    magnitude (frexp's), 0 for a direction of zeros."""
    with np.errstate(invalid="ignore"):
        m = np.max(np.where(np.isfinite(x), np.abs(x), 0.0), axis=axis, initial=0.0)
    return np.frexp(m)[1].astype(np.int64)


def narrowable(update: LoraUpdate) -> LoraUpdate:
    """The update itself, or (F64 factors beyond float32's comfortable range, which balancing brings into it) one
    whose factors are balanced per rank direction."""
    if not isinstance(update.A, Tensor) or "F64" not in (update.A.dtype, update.B.dtype) or update.rank == 0:
        return update
    r = update.rank
    a = _wide(update.A).reshape(r, -1)
    b = _wide(update.B).reshape(update.B.shape[0], r)
    ea, eb = _exponents(a, 1), _exponents(b, 0)
    live = (np.max(np.abs(a), axis=1, initial=0.0) > 0) & (np.max(np.abs(b), axis=0, initial=0.0) > 0)
    if not live.any() or (np.abs(ea[live]).max() <= SAFE_EXP and np.abs(eb[live]).max() <= SAFE_EXP):
        return update
    k = np.where(live, (eb - ea) // 2, 0)
    if not k.any() or max(np.abs(ea + k)[live].max(), np.abs(eb - k)[live].max()) > SAFE_EXP:
        return update  # balanced already, or a delta beyond float32 however balanced (refused where computed)
    a2 = np.ldexp(a, k[:, None]).reshape(update.A.shape)
    b2 = np.ldexp(b, -k[None, :]).reshape(update.B.shape)
    return dataclasses.replace(update, A=Tensor(a2, "F64"), B=Tensor(b2, "F64"))


def _wide(t: Tensor) -> np.ndarray:
    """A factor's values in float64: F64 as stored, others widened exactly from float32."""
    return np.asarray(t.raw, dtype=np.float64) if t.dtype == "F64" else t.f32().astype(np.float64)


def narrowable_lycoris(update: LycorisUpdate) -> LycorisUpdate:
    """A LoHa / LoKr update with F64 pieces beyond float32's comfortable range, with each piece scaled by a power
    of two, their exponents summing to 0: every entry of its delta is a sum of products of one entry of each piece
    ((w1a w1b) * (w2a w2b), kron(w1, w2a w2b), their Tucker cores too), so the delta is unchanged (exactly) and
    each piece comes to about the geometric mean of their sizes; else the update itself."""
    parts = [k for k in update.tensors if k in LOHA_PARTS + LOKR_PARTS]
    if len(parts) != len(update.tensors) or not any(update.tensors[k].dtype == "F64" for k in parts):
        return update
    wide = {k: _wide(update.tensors[k]) for k in parts}
    exps = {k: int(np.frexp(np.max(np.abs(x), initial=0.0))[1]) for k, x in wide.items()}
    if not all(np.isfinite(x).all() and x.any() for x in wide.values()) or max(map(abs, exps.values())) <= SAFE_EXP:
        return update
    mean = sum(exps.values()) // len(parts)
    shift = {k: mean - e for k, e in exps.items()}
    shift[parts[-1]] -= sum(shift.values())  # the exponents sum to 0: the product is unchanged
    if max(abs(exps[k] + shift[k]) for k in parts) > SAFE_EXP:
        return update  # beyond float32 however scaled (refused where computed)
    tensors = {k: Tensor(np.ldexp(wide[k], shift[k]), "F64") for k in parts}
    return dataclasses.replace(update, tensors=tensors)


def narrowable_updates(updates: dict[str, Update]) -> None:
    """narrowable (narrowable_lycoris) applied in place to every LoRA (LoHa / LoKr) update of `updates`."""
    for name, u in list(updates.items()):
        new = narrowable(u) if isinstance(u, LoraUpdate) else narrowable_lycoris(u)
        if new is not u:
            updates[name] = new
