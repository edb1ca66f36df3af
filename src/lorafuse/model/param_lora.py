"""A PEFT LoRA on a parameter (`target_parameters`, PEFT's `lora.ParamWrapper`), as stored.

PEFT puts such a LoRA on a module's parameter, typically the fused expert tensor of an MoE layer
(`mlp.experts.gate_up_proj`, shape [E, d1, d2]); its file names the module, not the parameter:
`<module>.lora_A.weight` for the outermost wrapper, `<module>.base_layer.lora_A.weight` for the
next one when several parameters of one module are targeted. lora_A is (r * E, in), lora_B
(out, r * E), and the delta of expert e is B[:, e::E] @ A[e*r:(e+1)*r] (see ops.fused). Which
parameter a wrapper adapts, E and the scale (rank_pattern / alpha_pattern match the parameter's
name) are known only against the base model, so this update only carries the factors: every
operation other than apply refuses it by name instead of reading the factors as one matrix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from lorafuse.errors import UnsupportedError
from lorafuse.model.lora import LoraUpdate
from lorafuse.model.structure import LowRank
from lorafuse.model.update import Update


@dataclass
class ParamLoraUpdate(LoraUpdate):
    """`A` (r*E x in) and `B` (out x r*E) of one ParamWrapper; `module` is the wrapped module's name
    (the `.base_layer` components removed), `depth` the number of wrappers outside this one; `r` and
    `alpha` are the module-level values of adapter_config.json (used when the module turns out to be
    a plain layer)."""

    module: str = ""
    depth: int = 0
    r: object = None
    alpha: object = None

    def refusal(self, where: str = "", what: str = "this operation") -> UnsupportedError:
        """The refusal of `what` (an operation that reads the factors as one matrix); `where`: the adapter."""
        return UnsupportedError(
            f"{where + ': ' if where else ''}module {self.name!r} is a LoRA on a parameter of {self.module!r} "
            f"(PEFT target_parameters) with lora_A {tuple(self.A.shape)} and lora_B {tuple(self.B.shape)}: which "
            "parameter it adapts, how many expert blocks its factors hold (one for a 2-D weight such as a router's, "
            "one per expert for a fused MoE tensor) and its scale (rank_pattern / alpha_pattern match the "
            f"parameter's name) are known only against the base model, so {what} cannot read them as one low-rank "
            "matrix; only apply merges it (lorafuse apply BASE ADAPTER)")

    def _refuse(self) -> UnsupportedError:
        return self.refusal()

    def stored_factors(self, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        raise self._refuse()

    def factors(self, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        raise self._refuse()

    def structure(self) -> LowRank:
        raise self._refuse()

    def delta(self) -> np.ndarray:
        raise self._refuse()

    def with_factors(self, b: np.ndarray, a: np.ndarray, scale: float = 1.0) -> LoraUpdate:
        raise self._refuse()

    def as_plain(self) -> LoraUpdate:
        """This module as a plain LoRA layer (a module that target_parameters named but that holds no
        targeted parameter in the base)."""
        return LoraUpdate(self.name, self.A, self.B, self.scale, self.kind, self.transposed, self.magnitude, self.bias,
                          self.magnitude_on_columns)


def refuse_parameter_loras(label: str, updates: Mapping[str, Update], what: str) -> None:
    """Refuse `what` (UnsupportedError naming the adapter `label` and the module) where `updates` hold a LoRA on
    a parameter (ParamLoraUpdate): checked before any work, so a dry run refuses as the run does."""
    for u in updates.values():
        if isinstance(u, ParamLoraUpdate):
            raise u.refusal(label, what)
