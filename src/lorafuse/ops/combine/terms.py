"""The terms a combination works on: per module, the (weight, update) of every adapter that has it."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lorafuse._validate import full_rank
from lorafuse.errors import LorafuseValueError, ShapeMismatchError, UnsupportedError
from lorafuse.formats import load
from lorafuse.model import Adapter, LoraUpdate, Update, stored_tensors


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


def check_linear(adapters: Sequence[Adapter], what: str) -> None:
    """DoRA and lora_bias do not add linearly, and full tensors cannot be combined: refuse them."""
    for a in adapters:
        for name, u in a.updates.items():
            if u.magnitude is not None:
                raise UnsupportedError(
                    f"{a.label}: module {name!r} is DoRA; {what} is defined for plain LoRA only "
                    "(a DoRA update is not a sum of low-rank deltas). Merge it into the base with `apply` instead."
                )
            if u.bias is not None:
                raise UnsupportedError(f"{a.label}: module {name!r} has a lora_B bias, which {what} cannot carry")
        extra = [k for k in a.full if not a.full_origin.get(k, k).endswith(".base_layer.weight")]
        if extra:
            raise UnsupportedError(
                f"{a.label}: modules_to_save tensors ({', '.join(sorted(extra)[:3])}) cannot be combined; "
                "merge them with `apply`"
            )


def check_split(split: str) -> None:
    if split not in ("B", "sqrt"):
        raise LorafuseValueError(f"split must be 'B' (singular values on B, like PEFT) or 'sqrt', got {split!r}")


def _flattened_as(u: Update, shape: tuple[int, ...]) -> Update | None:
    """A LoHa / LoKr stored with a conv kernel flattened (out, in*kh*kw), laid onto the 4-D `shape` of the
    same module in another adapter; None when that is not what differs."""
    if isinstance(u, LoraUpdate) or len(u.delta_shape) != 2 or len(shape) != 4:
        return None
    if u.delta_shape[0] != shape[0] or u.delta_shape[1] != int(np.prod(shape[1:])):
        return None
    return u.with_shape(shape)


def terms_by_module(adapters: Sequence[Adapter], weights: Sequence[float]) -> Terms:
    """Module -> the (weight, update) of every adapter that has it, checking the layouts agree. A LoHa /
    LoKr stored with its conv kernel flattened takes the 4-D shape another adapter gives the module."""
    gathered: dict[str, list[tuple[str, Term]]] = {}
    for a, w in zip(adapters, weights):
        for name, u in a.updates.items():
            gathered.setdefault(name, []).append((a.label, Term(w, u)))
    out: Terms = {}
    for name, items in gathered.items():
        conv = next((tuple(t.update.delta_shape) for _, t in items if len(t.update.delta_shape) == 4), None)
        terms = [Term(t.weight, (_flattened_as(t.update, conv) if conv else None) or t.update) for _, t in items]
        first = terms[0].update
        for (label, _), t in zip(items, terms):
            u = t.update
            if (tuple(first.delta_shape), first.kind, first.transposed) != (tuple(u.delta_shape), u.kind,
                                                                           u.transposed):
                raise ShapeMismatchError(
                    f"module {name!r}: {label} has a {u.kind} update of shape {tuple(u.delta_shape)}"
                    f"{' (transposed)' if u.transposed else ''}, another adapter has a {first.kind} update "
                    f"of shape {tuple(first.delta_shape)}{' (transposed)' if first.transposed else ''}"
                )
        out[name] = terms
    return out


def dense_shape(u: Update) -> tuple[int, int]:
    """The stored 2-D shape (rows, cols) of an update's delta, as its stored factors multiply out."""
    b_rows = u.B.shape[0] if isinstance(u, LoraUpdate) else u.delta_shape[0]
    return int(b_rows), int(np.prod(u.delta_shape, dtype=np.int64)) // max(int(b_rows), 1)


def stack(terms: Sequence[Term], threads: int, coef_on: str = "B") -> tuple[np.ndarray, np.ndarray]:
    """[c_i B_i] and [A_i] (coef_on='B'), or [B_i] and [c_i A_i] (coef_on='A'). Filled in place one
    term at a time: besides the result, only one term's factors (a LoKr's or LoHa's exact
    factorization can be large) exist at a time."""
    b, a = terms[0].update.stored_factors(threads)
    widths = [b.shape[1]] + [t.update.rank for t in terms[1:]]
    out_b = np.empty((b.shape[0], sum(widths)), dtype=np.float32)
    out_a = np.empty((sum(widths), a.shape[1]), dtype=np.float32)
    at = 0
    for i, t in enumerate(terms):
        if i:
            b, a = t.update.stored_factors(threads)
        c = np.float32(t.coef)
        out_b[:, at:at + b.shape[1]] = b * c if coef_on == "B" else b
        out_a[at:at + a.shape[0]] = a * c if coef_on == "A" else a
        at += b.shape[1]
        del b, a
    return out_b, out_a


def input_arrays(terms: Sequence[Term]) -> list[np.ndarray]:
    """The stored arrays (views of the input files while they are mapped) behind the terms."""
    return [t.raw for term in terms for t in stored_tensors(term.update) if isinstance(getattr(t, "raw", None),
                                                                                       np.ndarray)]


def result(template: Adapter, updates: Mapping[str, Update], adapters: Sequence[Adapter]) -> Adapter:
    config = {k: v for k, v in template.config.items()
              if k not in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora")}
    targets = [a.config.get("target_modules") for a in adapters]
    if targets and all(isinstance(t, list) for t in targets):
        config["target_modules"] = sorted({m for t in targets for m in t})  # type: ignore[attr-defined]
    elif targets and all(isinstance(t, str) for t in targets):
        config["target_modules"] = "|".join(dict.fromkeys(f"({t})" for t in targets))
    else:
        config["target_modules"] = sorted({n.rsplit(".", 1)[-1] for n in updates})
    return Adapter(updates=dict(updates), config=config, format=template.format,
                   derived_from=list(dict.fromkeys(p for a in adapters for p in a.sources())),
                   state=copy.deepcopy(template.state))


def _is_kxk_conv(u: Update) -> bool:
    shape = tuple(u.delta_shape)
    return len(shape) == 4 and shape[2] * shape[3] > 1


def output_ranks(by_module: Terms, rank: int | None, conv_rank: int | None) -> dict[str, int]:
    """Each module's output rank: `conv_rank` for kxk convolutions (k > 1), `rank` for the rest. A default
    is the largest rank among the plain LoRA inputs (PEFT's rule); `conv_rank` defaults to `rank`."""
    lora_ranks = [t.update.rank for ts in by_module.values() for t in ts if isinstance(t.update, LoraUpdate)]
    default = rank if rank is not None else max(lora_ranks, default=None)
    conv_default = conv_rank if conv_rank is not None else default
    out: dict[str, int] = {}
    for n, ts in by_module.items():
        k = conv_default if _is_kxk_conv(ts[0].update) else default
        if k is None:
            raise LorafuseValueError(f"module {n!r}: LoHa / LoKr inputs have no LoRA rank to default to; "
                                     "pass rank (--rank, and --conv-rank for kxk convolutions)")
        out[n] = full_rank(k, tuple(ts[0].update.delta_shape))  # a rank above min(out, in) adds only zeros
    return out
