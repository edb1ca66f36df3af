"""The one protocol of every update class, and the union of the classes lorafuse reads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from lorafuse.errors import UnsupportedError
from lorafuse.io.tensor import Tensor
from lorafuse.model.lora import LoraUpdate
from lorafuse.model.lycoris import LycorisUpdate
from lorafuse.model.names import Kind
from lorafuse.model.structure import Delta


class UpdateProtocol(Protocol):
    """What every module update offers (LoraUpdate, LohaUpdate, LokrUpdate)."""

    name: str
    kind: Kind
    scale: float
    magnitude: Tensor | None
    magnitude_on_columns: bool

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this update adds to."""
        ...

    @property
    def rank(self) -> int:
        """Rank of the exact factorization `stored_factors` gives."""
        ...

    def stored_factors(self, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """An exact factorization (B, A) of the unscaled 2-D delta, float32, as stored."""
        ...

    def factors(self, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(B_c, A_c) in the base weight's 2-D layout, float32, unscaled."""
        ...

    def structure(self) -> Delta:
        """The unscaled 2-D delta in its structure (norms, spectra, products without a dense delta)."""
        ...

    def stored_tensors(self) -> list[Tensor]:
        """The tensors this update keeps from its file."""
        ...

    def delta(self) -> np.ndarray:
        """The dense delta in float64, scale included (small modules, reports, tests)."""
        ...

    def is_plain(self) -> bool:
        """A pure low-rank delta (no DoRA magnitude, no bias): it adds linearly."""
        ...

    def with_factors(self, b: np.ndarray, a: np.ndarray, scale: float = 1.0) -> LoraUpdate:
        """A LoraUpdate of the same module with new stored factors."""
        ...


# A module's update: a LoRA (LoraUpdate, also a Tucker LoCon) or a LyCORIS LoHa / LoKr (LycorisUpdate).
Update = LoraUpdate | LycorisUpdate


def stored_tensors(u: Update) -> list[Tensor]:
    """The tensors an update keeps from its file: factors, LyCORIS pieces, DoRA magnitude, bias."""
    return u.stored_tensors()


def holds_nonfinite(u: Update) -> bool:
    """Whether a tensor the update keeps from its file holds NaN or Inf (each widened to float32 from whatever
    dtype it is stored in). For error messages: it reads every stored tensor."""
    return not all(np.isfinite(t.f32()).all() for t in u.stored_tensors())


def beyond_float32(u: Update) -> str | None:
    """For a module whose F64 tensors are all finite but hold a value float32 cannot (it widens to Inf): the
    words 'holds 1e+300 in its F64 factors, beyond float32's range (3.4e+38): lorafuse computes in float32
    ...'; else None (no F64 tensor, a NaN or Inf stored as such, or every value in range). For error messages."""
    biggest = 0.0
    for t in u.stored_tensors():
        if t.dtype == "F64":
            x = np.asarray(t.raw, dtype=np.float64)
            if not np.isfinite(x).all():
                return None
            biggest = max(biggest, float(np.abs(x).max(initial=0.0)))
    limit = float(np.finfo(np.float32).max)
    if biggest <= limit:
        return None
    return (f"holds {biggest:.4g} in its F64 factors, beyond float32's range ({limit:.2g}): lorafuse computes in "
            "float32 (scale that module down)")


def nonfinite_words(u: Update) -> str:
    """What a module whose stored tensors are not finite in float32 holds (holds_nonfinite), for error messages:
    beyond_float32's words, else 'holds NaN or Inf in its factors'."""
    return beyond_float32(u) or "holds NaN or Inf in its factors"


def nonfinite_factors(u: Update) -> str:
    """What the tensors of the update's delta (its factors or LyCORIS pieces, not a DoRA magnitude or a bias) hold
    besides finite numbers: 'NaN', 'Inf', 'NaN and Inf', or '' (each widened to float32; reads every one)."""
    others = [t for t in (u.magnitude, getattr(u, "bias", None)) if t is not None]
    nan = inf = False
    for t in u.stored_tensors():
        if any(t is o for o in others):
            continue
        x = t.f32()
        nan = nan or bool(np.isnan(x).any())
        inf = inf or bool(np.isinf(x).any())
    return " and ".join(w for w, held in (("NaN", nan), ("Inf", inf)) if held)


def refuse_dora(label: str, updates: Mapping[str, Update], what: str) -> None:
    """Refuse (UnsupportedError) a DoRA module where `what` needs the delta itself: a DoRA delta is
    m (W + s B A) / ||W + s B A|| - W, which the base weight W decides; the adapter alone does not hold it."""
    for name, u in updates.items():
        if u.magnitude is not None:
            raise UnsupportedError(f"{label}: module {name!r} is DoRA: its delta depends on the base weight (the "
                                   f"magnitude rescales W + s B A), so {what} is not defined by the adapter alone; "
                                   "merge it into the base with `apply` to compare or measure the merged weights")
