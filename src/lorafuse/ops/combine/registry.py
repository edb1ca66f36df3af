"""The combination methods, one registry entry each: what options a method takes and how it runs.

A new method is one `Method(...)` entry in REGISTRY plus its group runner; the CLI's --method
choices and help and the option checks come from here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lorafuse.errors import NonFiniteError
from lorafuse.model.spectral import factor_cost
from lorafuse.ops.combine import svd, taskmerge
from lorafuse.ops.combine.context import Context, Output
from lorafuse.ops.combine.terms import Term, Terms, stack

Runner = Callable[[list[tuple[str, list[Term]]], Context], list[Output]]
Sizer = Callable[[str, list[Term], Context], int]


@dataclass(frozen=True)
class Method:
    """A combination method. takes_rank: has an output rank (--rank, --conv-rank); takes_density: needs a
    density (the pruning methods); uses_seed: --seed changes its result (random masks or randomized SVD
    sketches); accepts_lycoris: takes LoHa / LoKr inputs; exact: its result is the exact weighted sum (or
    its optimal rank-k approximation); takes_split: it ends in an SVD whose singular values --split places;
    uses_majority_sign: it elects signs as TIES does (--majority-sign); takes_exact: it has an exact switch
    (--exact); help: one line for the CLI; run: the group runner; working_bytes:
    a module's working memory while its group runs (groups are sized by it); per_thread: the modules a
    group takes at least per worker thread, however large (the core spreads a call's modules over the
    threads); check: refusals that need only the shapes, before any work; out_rank: a module's output
    rank, known before any work (a streamed output's layout is made from it)."""

    name: str
    takes_rank: bool
    takes_density: bool
    uses_seed: bool
    accepts_lycoris: bool
    exact: bool
    help: str
    run: Runner
    working_bytes: Sizer
    per_thread: int = 0
    check: Callable[[str, Terms], None] | None = None
    out_rank: Callable[[str, list[Term], Context], int] | None = None
    takes_split: bool = False
    uses_majority_sign: bool = False
    takes_exact: bool = False

    def rank_of(self, name: str, terms: list[Term], ctx: Context) -> int:
        """Module `name`'s output rank: out_rank's, or the chosen rank of a method that takes one."""
        return self.out_rank(name, terms, ctx) if self.out_rank is not None else ctx.ranks[name]


def _run_cat(group: list[tuple[str, list[Term]]], ctx: Context) -> list[Output]:
    out: list[Output] = []
    for n, ts in group:
        b, a = stack(ts, ctx.options.threads, coef_on="A")
        if not (np.isfinite(b).all() and np.isfinite(a).all()):  # the result itself: nothing else checks it
            raise NonFiniteError(f"{n}: the concatenated factors (B_i, w_i s_i A_i) hold NaN or Inf")
        out.append((n, ts[0].update.with_factors(b, a), False))
    return out


def _cat_bytes(name: str, terms: list[Term], ctx: Context) -> int:
    return 2 * 4 * sum(factor_cost(t.update)[1] for t in terms)  # the stack (kept: it is the result) and a term


def _rank_sum(name: str, terms: list[Term], ctx: Context) -> int:
    return sum(t.update.rank for t in terms)


def _first_rank(name: str, terms: list[Term], ctx: Context) -> int:
    return terms[0].update.rank  # the factor-wise methods require equal ranks (checked before any work)


def _factorwise(name: str, density: bool, seed: bool, text: str) -> Method:
    return Method(name, takes_rank=False, takes_density=density, uses_seed=seed, accepts_lycoris=False,
                  exact=False, help=text, run=taskmerge.run_factorwise, working_bytes=taskmerge.factorwise_bytes,
                  check=taskmerge.check_equal_ranks, out_rank=_first_rank, uses_majority_sign="ties" in name)


def _dense(name: str, seed: bool, text: str) -> Method:
    return Method(name, takes_rank=True, takes_density=True, uses_seed=seed, accepts_lycoris=True, exact=False,
                  help=text, run=taskmerge.run_dense_svd, working_bytes=taskmerge.dense_bytes, per_thread=2,
                  check=taskmerge.check_dense_terms, takes_split=True, uses_majority_sign="ties" in name)


_METHODS = [
    Method("svd", takes_rank=True, takes_density=False, uses_seed=True, accepts_lycoris=True, exact=True,
           help="best rank-k of sum_i c_i B_i A_i, exactly, from QR of the stacked factors",
           run=svd.run, working_bytes=svd.working_bytes, per_thread=1, takes_split=True, takes_exact=True),
    Method("cat", takes_rank=False, takes_density=False, uses_seed=False, accepts_lycoris=True, exact=True,
           help="exact: B' = [B_1 .. B_n], A' = [c_1 A_1; ..; c_n A_n] (rank = sum of ranks)",
           run=_run_cat, working_bytes=_cat_bytes, out_rank=_rank_sum),
    _factorwise("linear", False, False, "PEFT: A and B stacks merged separately with sqrt|c_i| weights "
                "(approximate; equal ranks)"),
    _factorwise("ties", True, False, "PEFT's TIES on the factors (--density; equal ranks)"),
    _factorwise("dare_linear", True, True, "PEFT's DARE + sum on the factors (--density, --seed; equal ranks)"),
    _factorwise("dare_ties", True, True, "PEFT's DARE + TIES on the factors (--density, --seed; equal ranks)"),
    _factorwise("magnitude_prune", True, False, "PEFT's magnitude pruning on the factors (--density; equal ranks)"),
    _dense("ties_svd", True, "PEFT: TIES of the dense deltas, then rank k (--density)"),
    _dense("dare_linear_svd", True, "PEFT: DARE + sum of the dense deltas, then rank k (--density, --seed)"),
    _dense("dare_ties_svd", True, "PEFT: DARE + TIES of the dense deltas, then rank k (--density, --seed)"),
    _dense("magnitude_prune_svd", True, "PEFT: magnitude pruning of the dense deltas, then rank k (--density)"),
]

REGISTRY: dict[str, Method] = {m.name: m for m in _METHODS}
METHODS: tuple[str, ...] = tuple(REGISTRY)


def methods_with(flag: str) -> tuple[str, ...]:
    """The methods whose `flag` (a Method field: 'takes_rank', 'uses_seed', ...) is set, in registry order."""
    return tuple(m.name for m in REGISTRY.values() if getattr(m, flag))


# Other tools' names for a combination (mergekit, PEFT, kohya), and what lorafuse calls it: said where such a
# name is refused (the CLI's --method, a recipe's merge_method).
FOREIGN_METHODS: dict[str, str] = {
    "task_arithmetic": "mergekit's task_arithmetic on LoRAs is cat here (the exact weighted sum of the deltas), or "
                       "svd (that sum cut to a rank)",
    "ties_merging": "use ties_svd (TIES on the dense deltas, as mergekit's ties) or ties (PEFT's, on the factors)",
    "dare": "use dare_linear or dare_ties (with --density)",
    "weighted_average": "use linear (factor averaging, PEFT's linear) or svd (the exact weighted sum, cut to a rank)",
    "average": "use linear (factor averaging, PEFT's linear) or svd (the exact weighted sum, cut to a rank)",
    "sum": "use cat (the exact sum of the deltas)",
    "concat": "use cat",
    "slerp": "lorafuse combines LoRA deltas (svd, cat, linear, ties, dare); SLERP merges two full models",
    "model_stock": "lorafuse combines LoRA deltas (svd, cat, linear, ties, dare); model_stock merges full models",
    "breadcrumbs": "lorafuse combines LoRA deltas (svd, cat, linear, ties, dare); breadcrumbs is not one of them",
    "della": "lorafuse combines LoRA deltas (svd, cat, linear, ties, dare); della is not one of them",
    # mergekit's other methods: each told as such, not suggested as a near name (della_linear is not dare_linear)
    **{name: f"mergekit's {name} is not a lorafuse method: lorafuse combines LoRA deltas (svd, cat, linear, ties, "
                 "dare; ties_svd, dare_ties_svd and dare_linear_svd as mergekit's ties and dare on the full deltas)"
       for name in ("breadcrumbs_ties", "della_linear", "sce", "passthrough", "nuslerp", "multislerp", "karcher",
                    "arcee_fusion", "nearswap")},
}


def foreign_method(name: str) -> str | None:
    """What lorafuse offers for another tool's name of a combination (mergekit, PEFT), else None."""
    return FOREIGN_METHODS.get(name.lower())


def methods_help(width: int = 21) -> str:
    """The methods and their help lines, one per method, for the CLI."""
    return "\n".join(f"  {m.name:<{width}}{m.help}" for m in REGISTRY.values())


# The options a method may not take, the flag of Method that says it takes them, and why not (for messages):
# combine's check_options and a recipe's check (recipes.checks) read it.
OPTION_FLAGS = (
    ("rank", "takes_rank", "takes no rank (it is defined by the inputs)"),
    ("conv_rank", "takes_rank", "takes no rank (it is defined by the inputs)"),
    ("density", "takes_density", "takes no density"),
    ("split", "takes_split", "takes no split (it ends in no SVD whose singular values to place)"),
    ("majority_sign", "uses_majority_sign", "takes no majority_sign (it elects no sign)"),
    ("seed", "uses_seed", "takes no seed (nothing in it is random)"),
    ("exact", "takes_exact", "has no exact switch"),
)
