"""Work handed to a thread pool where a thread can be started, else done at once in the caller's thread.

A process or thread limit (ulimit -u, a container's pids limit) makes ThreadPoolExecutor.submit raise RuntimeError
("can't start new thread"), as does a pool already shut down: the work then runs here, with the same result, not a
traceback. Only the submission is caught: an error of the work itself reaches the caller unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def started(pool: ThreadPoolExecutor | None, fn: Callable[..., T], *args: object) -> Future[T] | T:
    """fn(*args) submitted to `pool` (its Future), or its result, computed here, where there is no pool or no
    thread can be started for it."""
    if pool is not None:
        try:
            return pool.submit(fn, *args)
        except RuntimeError:  # no thread can be started (or the pool is shut down): done here
            pass
    return fn(*args)


def outcome(value: Future[T] | T) -> T:
    """What `started` gave, waited for where it is a Future (its error raised)."""
    return value.result() if isinstance(value, Future) else value
