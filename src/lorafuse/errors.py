"""The lorafuse exception hierarchy. The C++ core raises these classes too."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from types import FrameType


class LorafuseError(Exception):
    """Base class of every error lorafuse raises on purpose."""


class LorafuseValueError(LorafuseError, ValueError):
    """A bad argument (weights, thread count, options)."""


class RecipeError(LorafuseValueError):
    """A recipe (lorafuse run) that cannot run as written: the message names the file, the line and the field."""


class FormatError(LorafuseError):
    """A file is malformed or in a format lorafuse does not read."""


class RecipeFileError(RecipeError, FormatError):
    """A recipe file that cannot be read as one (missing, a folder, unreadable, binary, not text): an input file's
    error, as a missing adapter or --from-list file is (the CLI exits 1 for it, not 2 as for a recipe's bad field);
    also a RecipeError."""


class ShapeMismatchError(LorafuseError):
    """Tensors whose shapes do not fit together (adapter vs base, factors, ...)."""


class MissingModuleError(LorafuseError):
    """An adapter module has no matching weight in the base checkpoint."""


class UnsharedModulesError(MissingModuleError, LorafuseValueError):
    """Adapters to be combined share no module and name their modules from different roots: adapters of
    different models, or one model in two namings. Also a LorafuseValueError (what it was before it had a class
    of its own); the CLI exits 1 for it, as for the other input errors."""


class DtypeError(LorafuseError):
    """An element type that cannot be read or written here."""


class NonFiniteError(LorafuseError):
    """NaN or Inf found in an input or a result."""


class UnsupportedError(LorafuseError):
    """A valid input that this operation cannot honour (it refuses instead of guessing)."""


class OutputError(LorafuseError):
    """The output path is unusable (it is an input, or it cannot be written)."""


class DeviceError(LorafuseError, RuntimeError):
    """The GPU backend cannot run this work: no usable CUDA device or driver, a failed CUDA call, or not
    enough device memory (the message names the module, the sizes and what to do)."""


class OverwriteWarning(UserWarning):
    """overwrite=True replaced an existing output that lorafuse did not write (the message says what)."""


class AdapterNote(UserWarning):
    """What loading an adapter decided for the user, as PEFT would (tensors PEFT ignores and so lorafuse
    leaves out, ...): the message names the adapter. `Adapter.notes` holds the same lines."""


class InputChangedError(LorafuseError):
    """An input file changed, was truncated or could not be read while lorafuse was reading it
    (a re-download in place, say): what was read cannot be trusted, and nothing is written."""


# lorafuse's own files, and contextlib's (where a `with` block of lorafuse's ends: atomic outputs, streams)
_OWN_FILES = (os.path.dirname(os.path.abspath(__file__)) + os.sep, os.path.abspath(contextlib.__file__))


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """warnings.warn attributed to the user's line: the first frame outside lorafuse, however deep in lorafuse
    the warning is given (the shown file and line, and `warnings.filterwarnings(module=...)`, name the caller's
    code, as `lorafuse.load`'s AdapterNote does)."""
    frame: FrameType | None = sys._getframe(1)  # warn's caller: stacklevel 2
    level = 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_OWN_FILES):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level if frame is not None else 2)


_CALLER_MARK = "_lorafuse_from_caller"


def from_caller(e: BaseException) -> BaseException:
    """Mark `e` as raised by the caller's own code (a progress callback): it is passed on as it is, never taken
    for lorafuse's (an OSError of the callback's is not a write error of the output). Returns `e`."""
    with contextlib.suppress(AttributeError, TypeError):
        setattr(e, _CALLER_MARK, True)
    return e


def is_from_caller(e: BaseException) -> bool:
    return bool(getattr(e, _CALLER_MARK, False))


__all__ = [
    "LorafuseError",
    "LorafuseValueError",
    "RecipeError",
    "RecipeFileError",
    "FormatError",
    "ShapeMismatchError",
    "MissingModuleError",
    "UnsharedModulesError",
    "DtypeError",
    "NonFiniteError",
    "DeviceError",
    "UnsupportedError",
    "OutputError",
    "OverwriteWarning",
    "InputChangedError",
]
