"""Whether a regular expression is safe to match against module names: bounded length and backtracking (PEFT's
target_modules / exclude_modules / rank_pattern keys are user text, matched with Python's backtracking `re`).
formats.peft compiles what passes; model.arithmetic checks a pattern it joins from several before writing it."""

from __future__ import annotations

import re

from lorafuse.errors import LorafuseValueError

MAX_PATTERN_LENGTH = 1000
MAX_REPEATS = 2  # quantifiers that can repeat ('*', '+', '{2,5}'; not '?') in one pattern
MAX_PATHS = 100_000  # ways one match attempt may go (alternations add their branches, optional parts double)

try:  # the standard library's regular-expression parser (re._parser since Python 3.11)
    from re import _constants as _sre_c  # type: ignore[attr-defined]
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre_c
    import sre_parse as _sre_parse

_REPEATS = {_sre_c.MAX_REPEAT, _sre_c.MIN_REPEAT, getattr(_sre_c, "POSSESSIVE_REPEAT", _sre_c.MAX_REPEAT)}
_BACKREFS = {_sre_c.GROUPREF, _sre_c.GROUPREF_EXISTS, getattr(_sre_c, "GROUPREF_IGNORE", _sre_c.GROUPREF)}
_ZERO_WIDTH = {_sre_c.AT, _sre_c.ASSERT, _sre_c.ASSERT_NOT}


def pattern_problem(pattern: str) -> str | None:
    """Why `pattern` is not a regular expression lorafuse matches (compile_pattern refuses it: not one, too long,
    or matching it could take exponential or high polynomial time), or None."""
    try:
        problem = analyse(pattern)[0]
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError, ValueError) as e:
        return f"is not a regular expression ({e})"
    return problem


def analyse(pattern: str, max_repeats: int | None = MAX_REPEATS,
            max_length: int = MAX_PATTERN_LENGTH) -> tuple[str | None, int, int | None, int]:
    """(why matching could take exponential or high polynomial time or None, repeating quantifiers,
    fixed width or None, paths).

    Python's `re` backtracks: a quantifier inside a quantifier ('(a+)+'), a quantified
    alternation ('(a|a)*') or a backreference can take ages on a module name of a few dozen
    characters, and every extra quantifier multiplies the work by the name's length. Without those,
    alternations and optional parts still multiply the ways a match can be tried ('a?a?a?...aaa',
    '(a|a)(a|a)...'): `paths` counts them (an alternation adds its branches' counts, a sequence
    multiplies), at most MAX_PATHS. `max_repeats` (None: any number) bounds the repeating quantifiers,
    `max_length` the pattern's characters.
    PEFT's own patterns are module names or short regexes, far from these limits. What stays allowed
    can still take a second on a 1000-character name: MatchBudget bounds the total work too."""
    if len(pattern) > max_length:
        return f"is {len(pattern)} characters long (at most {max_length})", 0, None, 1
    parsed = _sre_parse.parse(pattern)
    repeats = 0
    zero_width = False

    def walk(items: object, in_repeat: bool) -> tuple[str | None, int]:
        """(problem, paths) of a sequence of parsed items."""
        nonlocal repeats, zero_width
        paths = 1
        for op, av in items:  # type: ignore[attr-defined]
            if op in _ZERO_WIDTH:
                zero_width = True
            ways = 1
            if op in _REPEATS:
                lo, hi, sub = av
                if in_repeat:
                    return "has a quantifier inside a quantifier", paths
                if hi > 1:
                    repeats += 1
                problem, inner = walk(sub, hi > 1)
                ways = inner + (lo == 0) if hi == 1 else 1
            elif op == _sre_c.SUBPATTERN:
                problem, ways = walk(av[-1], in_repeat)
            elif op == _sre_c.BRANCH and in_repeat:
                problem = "has a quantified alternation"
            elif op == _sre_c.BRANCH:
                problem, ways = None, 0
                for alt in av[1]:
                    problem, alt_ways = walk(alt, in_repeat)
                    ways += alt_ways
                    if problem:
                        break
            elif op in (_sre_c.ASSERT, _sre_c.ASSERT_NOT):
                problem, ways = walk(av[1], in_repeat)
            elif op == getattr(_sre_c, "ATOMIC_GROUP", None):
                problem, ways = walk(av, in_repeat)
            elif op in _BACKREFS:
                problem = "has a backreference"
            else:
                problem = None
            if problem:
                return problem, paths
            paths = min(paths * ways, MAX_PATHS + 1)
        return None, paths

    problem, paths = walk(parsed, False)
    if problem is None and max_repeats is not None and repeats > max_repeats:
        problem = f"has {repeats} repeating quantifiers (at most {max_repeats})"
    if problem is None and paths > MAX_PATHS:
        problem = (f"has more than {MAX_PATHS} ways to try a match (each alternation or optional part multiplies "
                   "them)")
    lo, hi = parsed.getwidth()
    return problem, repeats, (lo if lo == hi and not zero_width else None), paths


MAX_SEARCH_STEPS = 50_000_000_000  # upper estimate of one NameFilter's backtracking steps over all names
MAX_FILTER_LENGTH = 1 << 20  # characters of one NameFilter's pattern


class NameFilter:
    """A user's regular expression searched in names (extract's include / exclude): refused up front where
    `analyse` finds it could take exponential time, and its estimated work over all names bounded by
    MAX_SEARCH_STEPS (a hostile checkpoint's long names), LorafuseValueError naming `where` either way. An empty
    pattern, which every name matches (an --exclude '' would leave nothing, an --include '' select all), is
    refused: it is an option given with its value left out, not a filter."""

    def __init__(self, pattern: str, where: str) -> None:
        self.pattern, self.where = pattern, where
        if pattern == "":
            raise LorafuseValueError(f"{where} is empty, and an empty pattern matches every name: leave the option "
                                     "out, or give a pattern such as 'q_proj|v_proj'")
        shown = repr(pattern) if len(pattern) <= 200 else f"{pattern[:197]!r}... ({len(pattern)} characters)"
        self.shown = shown
        try:
            # the budget bounds the work of many quantifiers; a long pattern may list many names ('a|b|c|...')
            problem, self.repeats, _, self.paths = analyse(pattern, None, MAX_FILTER_LENGTH)
            self.compiled = re.compile(pattern)
        except (re.error, OverflowError, RecursionError, ValueError) as e:
            raise LorafuseValueError(f"{where} {shown} is not a regular expression ({e})") from None
        if problem:
            raise LorafuseValueError(f"{where} {shown} {problem}: it could take very long to match; write it "
                                     "more simply")
        self.steps = 0

    def search(self, name: str) -> bool:
        """Whether the pattern is found in `name` (re.search)."""
        n = len(name) + 1
        self.steps += self.paths * n ** (self.repeats + 1) // (self.repeats + 1)
        if self.steps > MAX_SEARCH_STEPS:
            raise LorafuseValueError(
                f"{self.where} {self.shown}: searching it in the names needs more than about {MAX_SEARCH_STEPS:.3g} "
                f"backtracking steps, stopped at {name[:200]!r}: use fewer quantifiers or alternations")
        return self.compiled.search(name) is not None
