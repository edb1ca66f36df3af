"""The compiled C++ core, for the backend layer only: every other module reaches it through
`lorafuse.backends` (the operations) or through this module's process-wide services (thread
counts, limits, the SIGBUS guard of mapped files, CPU features)."""

from __future__ import annotations

from types import ModuleType

from lorafuse import _core as _loaded
from lorafuse import _validate

core: ModuleType = _loaded

MAX_THREADS: int = core.MAX_THREADS
MAX_RANK: int = core.MAX_RANK
MAX_OVERSAMPLE: int = core.MAX_OVERSAMPLE
MAX_POWER_ITERS: int = core.MAX_POWER_ITERS
ISA: str = core.isa
VERSION: str = str(core.__version__)  # the build's pyproject version


def _check_limits() -> None:
    """lorafuse._validate (a leaf, below this layer) states the core's limits (cpp/include/lorafuse/limits.hpp)
    as constants; a core built with other limits must not load with them."""
    ours = {"MAX_THREADS": _validate.MAX_THREADS, "MAX_RANK": _validate.MAX_RANK,
            "MAX_OVERSAMPLE": _validate.MAX_OVERSAMPLE, "MAX_POWER_ITERS": _validate.MAX_POWER_ITERS}
    theirs = {name: getattr(core, name) for name in ours}
    if ours != theirs:
        raise ImportError(f"lorafuse's compiled core ({core.__name__}) has the limits {theirs}, lorafuse._validate "
                          f"{ours}: rebuild lorafuse")


_check_limits()


def resolve_threads(threads: int) -> int:
    """The number of worker threads a `threads` argument runs (0: all hardware threads)."""
    return int(core.resolve_threads(threads))


def hardware_threads() -> int:
    return int(core.hardware_threads())


def register_mapping(buffer: object, label: bytes, path: bytes, dev: int, ino: int, file_size: int,
                     mtime_ns: int) -> int:
    """Guard reads of a memory-mapped file against SIGBUS; a slot, or -1 when the table is full."""
    return int(core.register_mapping(buffer, label, path, dev, ino, file_size, mtime_ns))


def unregister_mapping(slot: int) -> None:
    core.unregister_mapping(slot)


def mapping_problem(slot: int) -> str:
    """'' while the mapping is sound, else why its data cannot be trusted."""
    return str(core.mapping_problem(slot))


def mapping_faults() -> int:
    return int(core.mapping_faults())


def thread_start_failures() -> int:
    return int(core.thread_start_failures())
