"""Modules in groups sized by bytes: the loop that streams them through a method."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from lorafuse.io.pages import release_pages
from lorafuse.ops.combine.context import Context, Output
from lorafuse.ops.combine.terms import Term, Terms, input_arrays

Runner = Callable[[list[tuple[str, list[Term]]], Context], list[Output]]
Sizer = Callable[[str, list[Term], Context], int]


def by_bytes(sizes: Sequence[int], budget: int, min_items: int = 1) -> Iterator[tuple[int, int]]:
    """[start, stop) ranges of consecutive items whose sizes add up to at most `budget`, or of at most
    `min_items` items when fewer would not fit (so that every worker thread has a module)."""
    start, total = 0, 0
    for i, s in enumerate(sizes):
        if i - start >= min_items and total + s > budget:
            yield start, i
            start, total = i, 0
        total += s
    if start < len(sizes):
        yield start, len(sizes)


def stream(by_module: Terms, run: Runner, size: Sizer, ctx: Context, min_items: int = 1) -> Iterator[Output]:
    """Every module's output, in module order, a group at a time: one call of `run` per group of modules
    whose working bytes (`size`) fit ctx.options.group_bytes; once a group is done the pages of its inputs
    are dropped from the resident set, so memory is bounded by a group, not by the number of adapters."""
    names = list(by_module)
    sizes = [size(n, by_module[n], ctx) for n in names]
    for start, stop in by_bytes(sizes, ctx.options.group_bytes, min_items):
        group = [(n, by_module[n]) for n in names[start:stop]]
        yield from run(group, ctx)
        if ctx.release:
            release_pages(a for _, ts in group for a in input_arrays(ts))
