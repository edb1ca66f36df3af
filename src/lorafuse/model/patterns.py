"""Whether a regular expression is safe to match against module names: bounded length and backtracking (PEFT's
target_modules / exclude_modules / rank_pattern keys are user text, matched with Python's backtracking `re`).
formats.peft compiles what passes; model.arithmetic checks a pattern it joins from several before writing it."""

from __future__ import annotations

import re

MAX_PATTERN_LENGTH = 1000
MAX_REPEATS = 2  # quantifiers that can repeat ('*', '+', '{2,5}'; not '?') in one pattern

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


def analyse(pattern: str) -> tuple[str | None, int, int | None]:
    """(why matching could take exponential or high polynomial time or None, repeating quantifiers,
    fixed width or None).

    Python's `re` backtracks: a quantifier inside a quantifier ('(a+)+'), a quantified
    alternation ('(a|a)*') or a backreference can take ages on a module name of a few dozen
    characters, and every extra quantifier multiplies the work by the name's length. PEFT's own
    patterns are module names or short regexes, far from these limits. What stays allowed can
    still take a second on a 1000-character name: MatchBudget bounds the total work too."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        return f"is {len(pattern)} characters long (at most {MAX_PATTERN_LENGTH})", 0, None
    parsed = _sre_parse.parse(pattern)
    repeats = 0
    zero_width = False

    def walk(items: object, in_repeat: bool) -> str | None:
        nonlocal repeats, zero_width
        for op, av in items:  # type: ignore[attr-defined]
            if op in _ZERO_WIDTH:
                zero_width = True
            if op in _REPEATS:
                lo, hi, sub = av
                if in_repeat:
                    return "has a quantifier inside a quantifier"
                if hi > 1:
                    repeats += 1
                problem = walk(sub, hi > 1)
            elif op == _sre_c.SUBPATTERN:
                problem = walk(av[-1], in_repeat)
            elif op == _sre_c.BRANCH and in_repeat:
                problem = "has a quantified alternation"
            elif op == _sre_c.BRANCH:
                problem = next((q for alt in av[1] if (q := walk(alt, in_repeat))), None)
            elif op in (_sre_c.ASSERT, _sre_c.ASSERT_NOT):
                problem = walk(av[1], in_repeat)
            elif op == getattr(_sre_c, "ATOMIC_GROUP", None):
                problem = walk(av, in_repeat)
            elif op in _BACKREFS:
                problem = "has a backreference"
            else:
                problem = None
            if problem:
                return problem
        return None

    problem = walk(parsed, False)
    if problem is None and repeats > MAX_REPEATS:
        problem = f"has {repeats} repeating quantifiers (at most {MAX_REPEATS})"
    lo, hi = parsed.getwidth()
    return problem, repeats, (lo if lo == hi and not zero_width else None)
