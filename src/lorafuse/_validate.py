"""Range checks of the numbers users pass to the API (the CLI checks the same ranges while parsing).

Every integer and float argument that sizes an allocation, starts threads or reaches the core
goes through here: bool is not a number, NaN and infinities are refused, and ranges come from
the core's (cpp/include/lorafuse/limits.hpp), stated here as constants because this module is a leaf
below the backend layer; lorafuse.backends.native refuses to load a core built with other limits, so
the Python and C++ checks cannot disagree.

- threads:      0 (all hardware threads) .. MAX_THREADS (1024); the core runs at most
                4 workers per hardware thread whatever is asked
- ranks:        1 .. MAX_RANK (2^20); each module is further capped at its full rank
                min(out, in) by the operations (kohya's rule), so no output is padded
- oversample:   0 .. MAX_OVERSAMPLE (2^20); power_iters: 0 .. MAX_POWER_ITERS (100)
- seed:         0 .. 2^64 - 1
"""

from __future__ import annotations

import math
import numbers
import operator
import os
import re
import sys
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet

from lorafuse._terminal import plural
from lorafuse.errors import LorafuseValueError


def _is_bool(value: object) -> bool:
    """A Python or numpy bool (not a number here). numpy is not imported for it: where numpy is not loaded, no
    value can be a numpy bool (the CLI reads its options before numpy loads: lorafuse.cli._quiet_blas)."""
    if isinstance(value, bool):
        return True
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, np.bool_)

# cpp/include/lorafuse/limits.hpp: kMaxThreads, kMaxRank, kMaxOversample, kMaxPowerIters
MAX_THREADS: int = 1024
MAX_RANK: int = 2**20
MAX_OVERSAMPLE: int = 2**20
MAX_POWER_ITERS: int = 100
MAX_SEED = 2**64 - 1
MAX_PASSES: int = 21  # combine's streamed passes (--passes, passes=, a recipe's passes)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_int(value: object, name: str, lo: int, hi: int, note: str = "") -> int:
    """`value` as an int in [lo, hi] (any integer type but bool), else LorafuseValueError."""
    what = f"{name} must be an integer from {lo}{note} to {hi}"
    if _is_bool(value):
        raise LorafuseValueError(f"{what}, got a bool ({value!r})")
    try:
        n = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise LorafuseValueError(f"{what}, got {_show(value)}") from None
    allowed = f"(allowed: an integer from {lo}{note} to {hi})"
    if n < lo:
        raise LorafuseValueError(f"{name} must be >= {lo}, got {_show(n)} {allowed}")
    if n > hi:
        raise LorafuseValueError(f"{name} must be <= {hi}, got {_show(n)} {allowed}")
    return n


def check_float(value: object, name: str, lo: float, hi: float, *, lo_open: bool = False) -> float:
    """`value` as a finite float in [lo, hi] (or (lo, hi] with lo_open), else LorafuseValueError (a bool, a str)."""
    what = f"{name} must be a finite number {'>' if lo_open else '>='} {lo:g}"
    if hi < math.inf:
        what += f" and <= {hi:g}"
    x = real_number(value)  # a Python or numpy real, or a 0-d array / tensor of one (as integers take them)
    if x is None or not math.isfinite(x) or x < lo or x > hi or (lo_open and x == lo):
        raise LorafuseValueError(f"{what}, got {_show(value)}")
    return x


def check_threads(threads: object) -> int:
    return check_int(threads, "threads", 0, MAX_THREADS, " (all cores)")


def check_rank(rank: object, name: str = "rank") -> int:
    return check_int(rank, name, 1, MAX_RANK)


def check_optional_rank(rank: object, name: str = "rank") -> int | None:
    return None if rank is None else check_rank(rank, name)


def check_seed(seed: object) -> int:
    return check_int(seed, "seed", 0, MAX_SEED)


def check_oversample(oversample: object) -> int:
    return check_int(oversample, "oversample", 0, MAX_OVERSAMPLE)


def check_power_iters(power_iters: object) -> int:
    return check_int(power_iters, "power_iters", 0, MAX_POWER_ITERS)


# A dict's keys and items views are sets that keep the dict's (insertion) order: `weights=d.values()` pairs with them.
_ORDERED_SETS: tuple[type, ...] = (type({}.keys()), type({}.items()))


def unordered(value: object) -> bool:
    """Whether `value` is a collection whose iteration order is not the order it was written in: a set or a
    frozenset (any collections.abc.Set but a dict's keys / items), whose elements come in hash order (for
    str, a different order in every process). Where one value pairs with each adapter, such an order pairs
    them wrongly: the adapters and their weights are refused as sets (refuse_one, _weight_items)."""
    return isinstance(value, AbstractSet) and not isinstance(value, _ORDERED_SETS)


def _weight_items(weights: object) -> list[object]:
    """The elements of `weights`: a sequence or any other iterable (a generator: read once here), or a 1-D
    numpy array / torch tensor (its elements as Python numbers). One number, a str or a 0-d / 2-D array is
    refused: weights are one number per adapter. So are a mapping (iterated, it gives its keys) and a set
    (no order: see unordered), which would give the adapters each other's weights."""
    what = "weights must be a sequence of numbers, one per adapter (a list, a tuple, a 1-D array or tensor)"
    ndim = getattr(weights, "ndim", None)
    if isinstance(ndim, int) and hasattr(weights, "tolist"):  # numpy array, torch tensor
        if ndim != 1:
            raise LorafuseValueError(f"{what}, got a {ndim}-D {type(weights).__name__} ({_show(weights)})")
        items = weights.tolist()
        return list(items) if isinstance(items, list) else [items]
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__iter__"):
        raise LorafuseValueError(f"{what}, got {_show(weights)}")
    if isinstance(weights, Mapping):
        raise LorafuseValueError(f"{what}, not a {type(weights).__name__} ({_show(weights)}): iterated, a mapping "
                                 "gives its keys, not its values; give the weights as a list in the adapters' order "
                                 "(weights=list(d.values()))")
    if unordered(weights):
        raise LorafuseValueError(f"{what}, not a {type(weights).__name__} ({_show(weights)}): a set has no order (its "
                                 "elements come in hash order) and holds equal weights once, so the adapters would "
                                 "get each other's weights; give a list in the adapters' order")
    return list(weights)


def real_number(value: object) -> float | None:
    """`value` as a float when it is one real number: a Python or numpy real (not a bool), or a 0-d numpy array
    / torch tensor holding one; else None."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a 0-d array / tensor (a numpy scalar too)
        try:
            value = value.item()
        except (RuntimeError, TypeError, ValueError):  # a tensor without data (torch's meta device)
            return None
    if _is_bool(value) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range (10**400): not a finite number, said by the caller
        return -math.inf if value < 0 else math.inf


def _weight_value(w: object) -> float:
    """One weight as a finite float: a real number (real_number), not a bool nor a str."""
    x = real_number(w)
    if x is None:
        shown = w.item() if getattr(w, "ndim", None) == 0 and hasattr(w, "item") else w
        raise LorafuseValueError(f"weights must be finite numbers, got {_show(shown)} (a {type(shown).__name__}, not "
                                 "a number)")
    if not math.isfinite(x):
        raise LorafuseValueError(f"weights must be finite numbers, got {_show(w)}")
    return x


def weight_list(weights: object) -> list[float]:
    """`weights` as a list of finite floats (see _weight_items, _weight_value), its length not checked:
    what apply and combine take before they know how many adapters there are."""
    return [_weight_value(w) for w in _weight_items(weights)]


def check_weights(weights: object, count: int) -> list[float]:
    """One finite real number per adapter: a sequence, an iterable or a 1-D array / tensor (bool and str
    refused), as floats."""
    ws = weight_list(weights)
    if len(ws) != count:
        raise LorafuseValueError(f"{plural(len(ws), 'weight')} given for {plural(count, 'adapter')}")
    return ws


def check_path(value: object, name: str) -> str:
    """A path argument as text: a str, an os.PathLike or bytes (decoded as the file system does); anything else
    (None, a number, a list) raises LorafuseValueError naming the argument. A number where an output path is
    expected is usually a rank given by position: the message says so."""
    if isinstance(value, (str, bytes, os.PathLike)):
        text = os.fspath(value)
        text = os.fsdecode(text) if isinstance(text, bytes) else text
        if not text:  # Path('') is the current folder
            raise LorafuseValueError(f"{name} must be a path, got an empty string")
        if "\0" in text:
            raise LorafuseValueError(f"{name}: a path cannot hold a NUL character, got {text!r}"[:200])
        return text
    hint = f"; the rank rule is a keyword argument (rank={value!r})" if name == "out" and isinstance(
        value, (int, float)) and not isinstance(value, bool) else ""
    raise LorafuseValueError(f"{name} must be a path (str or os.PathLike), got {_show(value)}{hint}")


def split_name(text: str) -> str:
    """A --split / split value in any case, as lorafuse spells it: 'B' or the lower-case text ('sqrt')."""
    return "B" if text.lower() == "b" else text.lower()


def check_text(value: object, name: str, choices: Iterable[str] = ()) -> str:
    """A text option (split, engine, to, ...) when it is a str, else LorafuseValueError naming `choices`: the
    caller then checks the text with its own message. Checked first because `x not in choices` fails on other
    values with no word about the option: a numpy array compares element-wise (ambiguous truth value), a list
    cannot be hashed, and a 0-d array of 'B' would pass and reach the core."""
    if not isinstance(value, str):
        what = f"one of {', '.join(map(repr, choices))} (a str)" if choices else "a str"
        raise LorafuseValueError(f"{name} must be {what}, got {_show(value)} (a {type(value).__name__})")
    return value


def check_bool(value: object, name: str) -> bool:
    """`value` when it is True or False (a numpy bool too), else LorafuseValueError: a string such as 'no' is
    not a switch."""
    if not _is_bool(value):
        raise LorafuseValueError(f"{name} must be True or False, got {_show(value)}")
    return bool(value)


def check_optional_bool(value: object, name: str) -> bool | None:
    """None, True or False (the switches whose None means 'decide for me'), else LorafuseValueError."""
    if value is not None and not _is_bool(value):
        raise LorafuseValueError(f"{name} must be True, False or None, got {_show(value)}")
    return None if value is None else bool(value)


def full_rank(k: int, shape: tuple[int, ...]) -> int:
    """A rank capped at the full rank of a delta of `shape` (out, in, ...): min(out, in * kh * kw)."""
    if len(shape) < 2:
        return k
    cols = 1
    for d in shape[1:]:
        cols *= int(d)
    return max(1, min(k, int(shape[0]), cols))


# A number as written on a command line or in an adapter list: decimal digits with an optional point and
# exponent, or inf / nan (which callers refuse as not finite). Python's float() also reads `1_5` (as 15),
# non-ASCII digits and surrounding spaces. Unambiguous: a megabyte of digits is matched in linear time.
_DECIMAL = re.compile(r"[-+]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|inf|infinity|nan)",
                      re.IGNORECASE)


def decimal_number(text: str) -> float | None:
    """`text` as a float when it is a plain decimal number (or inf / nan), else None (`1_5`, `0x10`, ` 1`)."""
    return float(text) if _DECIMAL.fullmatch(text) else None


def rounds_to_zero(text: str, value: float) -> bool:
    """Whether a decimal number's text with a non-zero digit became 0.0 (`1e-400`: below float64's range)."""
    return value == 0.0 and any(c in "123456789" for c in re.split("[eE]", text)[0])
