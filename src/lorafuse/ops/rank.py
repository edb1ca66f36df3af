"""Rank rules shared by resize and extract: a fixed rank, or a rank chosen per module from its
singular values S (descending), always capped by max_rank and at least 1.

- rank k:          k
- sv_ratio t:      keep S_i > S_1 / t
- sv_fro f:        the smallest k with sqrt(sum_{i<=k} S_i^2) / ||S|| >= f
- sv_cumulative c: the smallest k with sum_{i<=k} S_i / sum S >= c
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lorafuse._validate import check_float, check_rank
from lorafuse.errors import LorafuseValueError

_EPS = 1e-12  # fractions computed in float64 that should reach exactly f still count
# extract's fraction of ||D||_F: float32 singular values against the float64 ||D||^2 fall short of it by float32's
# rounding (~1e-7 of ||D||^2) even where the kept values are the whole delta: within this of f still counts
_EPS_F32 = 2.0**-20


@dataclass(frozen=True)
class RankRule:
    """How resize and extract choose each module's rank: exactly one of `rank` (that rank), `sv_ratio`
    (keep S_i > S_1 / sv_ratio, sv_ratio >= 1), `sv_fro` (the smallest k keeping that fraction of the
    Frobenius norm, 0 < sv_fro <= 1) or `sv_cumulative` (the smallest k whose singular values sum to that
    fraction of their total, 0 < sv_cumulative <= 1); `max_rank` caps every module's rank (1 .. 2^20).
    Each value is checked when the rule is made, a LorafuseValueError naming the parameter."""

    rank: int | None = None
    sv_ratio: float | None = None
    sv_fro: float | None = None
    sv_cumulative: float | None = None
    max_rank: int | None = None

    def __post_init__(self) -> None:
        given = [n for n in ("rank", "sv_ratio", "sv_fro", "sv_cumulative") if getattr(self, n) is not None]
        if not given:
            raise LorafuseValueError("give exactly one rank rule: rank (a fixed rank), or sv_ratio, sv_fro or "
                                     "sv_cumulative (a rank per module from its singular values); got none"
                                     + (f" (max_rank={self.max_rank!r} only caps the rule's rank)"
                                        if self.max_rank is not None else ""))
        if len(given) > 1:
            raise LorafuseValueError(f"give exactly one rank rule of rank, sv_ratio, sv_fro, sv_cumulative; got "
                                     f"{len(given)}: {', '.join(f'{n}={getattr(self, n)!r}' for n in given)}")
        # Ranks 1 .. 2^20 (each module is further capped at its own full rank); finite fractions.
        for n in ("rank", "max_rank"):
            if getattr(self, n) is not None:
                object.__setattr__(self, n, check_rank(getattr(self, n), n))
        if self.sv_ratio is not None:
            object.__setattr__(self, "sv_ratio", check_float(self.sv_ratio, "sv_ratio", 1.0, math.inf))
        for n in ("sv_fro", "sv_cumulative"):
            if getattr(self, n) is not None:
                object.__setattr__(self, n, check_float(getattr(self, n), n, 0.0, 1.0, lo_open=True))

    @property
    def from_spectrum(self) -> bool:
        return self.rank is None

    def describe(self) -> str:
        for n in ("rank", "sv_ratio", "sv_fro", "sv_cumulative"):
            if getattr(self, n) is not None:
                cap = f", max-rank {self.max_rank}" if self.max_rank else ""  # as the rule: the CLI's spelling
                return f"{n.replace('_', '-')} {getattr(self, n)}{cap}"
        return "?"  # pragma: no cover

    def choose(self, s: np.ndarray, total_sq: float | None = None) -> int:
        """The rank for singular values `s` (descending). `total_sq` is ||D||_F^2 when `s` holds only
        the leading values of a larger spectrum (extract); by default it is sum(s^2)."""
        s = np.asarray(s, dtype=np.float64)
        n = int(np.count_nonzero(s > 0))
        if self.rank is not None:
            k = self.rank
        elif n == 0:
            k = 1
        elif self.sv_ratio is not None:
            k = int(np.count_nonzero(s > s[0] / self.sv_ratio))
        elif self.sv_fro is not None:
            total = float(np.sum(s**2)) if total_sq is None else float(total_sq)
            frac = np.sqrt(np.cumsum(s**2) / total) if total > 0 else np.ones(len(s))
            hit = np.nonzero(frac >= self.sv_fro - (_EPS if total_sq is None else _EPS_F32))[0]
            k = int(hit[0]) + 1 if len(hit) else len(s)
        else:
            assert self.sv_cumulative is not None
            frac = np.cumsum(s) / np.sum(s)
            hit = np.nonzero(frac >= self.sv_cumulative - _EPS)[0]
            k = int(hit[0]) + 1 if len(hit) else len(s)
        if self.max_rank is not None:
            k = min(k, self.max_rank)
        return max(1, k)

    def wants_more(self, s: np.ndarray, total_sq: float) -> bool:
        """Whether sv_ratio or sv_fro is still unmet by all of `s`, the leading singular values of a larger
        spectrum whose ||D||_F^2 is `total_sq` (extract's sketch): the rule would keep more than were computed."""
        s = np.asarray(s, dtype=np.float64)
        if len(s) == 0 or s[0] <= 0 or total_sq <= 0:
            return False
        if self.sv_ratio is not None:
            return bool(s[-1] > s[0] / self.sv_ratio)
        if self.sv_fro is not None:
            return bool(np.sqrt(np.sum(s**2) / total_sq) < self.sv_fro - _EPS_F32)
        return False


def fro_kept(s: np.ndarray, k: int, total_sq: float | None = None) -> float:
    """Fraction of the Frobenius norm kept by the leading k singular values."""
    s = np.asarray(s, dtype=np.float64)
    total = float(np.sum(s**2)) if total_sq is None else float(total_sq)
    return float(np.sqrt(np.sum(s[:k] ** 2) / total)) if total > 0 else 1.0
