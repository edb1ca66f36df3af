"""What every method's group runner receives: the options, the output ranks and the backend of one run."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorafuse.backends import Backend
from lorafuse.model import LoraUpdate
from lorafuse.ops.combine.options import CombineOptions

# A group of modules: (name, terms) in module order; a runner returns, per module, its output update
# and whether it took a randomized SVD.
Output = tuple[str, LoraUpdate, bool]


@dataclass
class Context:
    options: CombineOptions
    backend: Backend
    ranks: dict[str, int] = field(default_factory=dict)  # output rank per module (methods that take a rank)
    structured_above: int = 1 << 24  # svd: stacked exact-factorization elements above which LyCORIS goes structured
    release: bool = True  # drop the input pages of a group once it is done
