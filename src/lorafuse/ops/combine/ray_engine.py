"""Many adapters on Ray (engine 'ray'): the streamed engine's passes as Ray tasks over shards of adapters.

The fold of a pass (many.fold_sources: adapters into fresh float64 accumulators, given the pass's operands)
is linear in the adapters, so it splits: the adapter list is cut into shards of consecutive adapters, about
sqrt(n) of them (shard_bounds: fixed by n alone, not by the number of workers), and in each pass one Ray task
per shard opens its adapters by path, reads each once and returns the shard's partial accumulators. Pass 1's
Gaussian test matrices are regenerated from the seed inside each task (never shipped); a later pass's
operands (the orthonormal bases of the previous pass, float32, out x w or in x w per module) are put in
Ray's object store once per pass. The partials are summed by Ray tasks in a tree whose shape is fixed by the
number of shards (pairwise by shard index, tree_sum), so the result does not depend on the number of
workers or on the order in which tasks finish; it differs from the local engine's by float32 rounding
(other chunks of adapters per product) and float64 reassociation only. The driver (this process) keeps the
header pass, each pass's small QR, the final SVD and the writing (many.Sketching: the local engine's code).

Fault tolerance is Ray's: a task whose worker dies is retried (TASK_RETRIES), and since a task is a pure
function of its shard and the pass's operands the result is the same. An error an adapter raises in a task
(a file changed since the header pass, say) is raised here as the same lorafuse error, naming the adapter.
Adapters must be readable at the same paths from every worker (a shared filesystem on a cluster), and
lorafuse must be installed on every node. Tasks on the driver's node read each adapter's factor bytes where
the header pass found them (many.Replay), as the local engine does; tasks on other nodes load each adapter.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorafuse.errors import LorafuseError, UnsupportedError
from lorafuse.model import LoraUpdate
from lorafuse.ops.combine.many import (
    Folding,
    Operand,
    Partial,
    Plan,
    Replay,
    Sketching,
    Source,
    StreamSummary,
    _Bar,
    add_partials,
    fold_sources,
    peak_rss,
)
from lorafuse.ops.combine.options import CombineOptions

TASK_RETRIES = 3  # Ray's retries of a task whose worker died (Ray's default, made explicit)

ShardInfo = tuple[int, int, str]  # adapters folded, bytes of factors read, the worker that ran the task
ShardTask = Callable[..., tuple[Partial, ShardInfo]]


def require_ray() -> Any:
    """The ray module, or UnsupportedError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UnsupportedError("engine 'ray' needs Ray, which is not installed here: pip install 'lorafuse[ray]'"
                               ) from None
    return ray


def shard_bounds(n: int) -> list[tuple[int, int]]:
    """[start, stop) of each shard of n adapters: ceil(sqrt(n)) shards of consecutive adapters, sizes
    differing by at most one (1000 adapters: 32 shards of 31 or 32)."""
    if n <= 0:
        return []
    count = math.isqrt(n - 1) + 1
    return [(i * n // count, (i + 1) * n // count) for i in range(count)]


def tree_sum(add: Callable[[Any, Any], Any], leaves: Sequence[Any]) -> Any:
    """The sum of the leaves in a fixed order: pairwise by index ((0 + 1), (2 + 3), ...; an odd last one goes up
    as it is), then pairwise again, to one. The order depends on the number of leaves alone."""
    if not leaves:
        raise ValueError("tree_sum of nothing")
    level = list(leaves)
    while len(level) > 1:
        up = [add(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            up.append(level[-1])
        level = up
    return level[0]


def check_paths(sources: Sequence[Source]) -> None:
    """Ray tasks open adapters by path: an Adapter in memory is refused, naming its position."""
    for s in sources:
        if not isinstance(s.item, Path):
            raise UnsupportedError(f"{s.where}: an adapter loaded in memory cannot go to Ray tasks, which open "
                                   "each adapter by its path (give its path, or use engine 'stream')")


def shard_task(job: Folding, pass_no: int, operands: dict[str, Operand] | None, sources: Sequence[Source],
               weights: Sequence[float], fingerprints: Sequence[object],
               replays: tuple[str, Sequence[Replay | None]] | None = None) -> tuple[Partial, ShardInfo]:
    """One Ray task: the shard's adapters folded into fresh accumulators of pass `pass_no` (operands None:
    pass 1, regenerated from the seed), with (adapters, bytes read, the worker that ran it). `replays`: (the
    driver's node, the shard's many.Replay records): a task on the driver's node reads the recorded factor bytes
    (the file identity they carry, device and inode included, holds there); a task on another node loads each
    adapter by path."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    mine = replays[1] if replays is not None and replays[0] == here else None
    partial, nbytes = fold_sources(job, pass_no, operands, sources, weights, fingerprints, replays=mine)
    return partial, (len(sources), nbytes, _worker())


def _worker() -> str:
    import ray

    ctx = ray.get_runtime_context()
    return f"{ctx.get_node_id()}/{ctx.get_worker_id()}"


def run_ray(plan: Plan, options: CombineOptions, on_module: Callable[[str, LoraUpdate], None], *,
            task: ShardTask | None = None, task_options: Mapping[str, Any] | None = None) -> StreamSummary:
    """many.run_stream on Ray: on_module(name, update) for every module once all passes are done; the summary.
    Ray: the one this process has initialized (left running), else ray.init(address=options.ray_address)
    (None: a local Ray), shut down at the end. `task` replaces shard_task (a wrapper of it: tests), and
    `task_options` are Ray's options of the shard tasks (num_cpus, max_retries, ...)."""
    ray = require_ray()
    check_paths(plan.sources)
    started = not ray.is_initialized()
    # ray.init puts its own SIGTERM handler in place (exit status 1); the caller's (the CLI's: remove the
    # temporary output, exit 143) is put back once the Ray this process started is shut down
    handlers = _signal_handlers() if started else {}
    if started:
        _check_reachable(options.ray_address)
        global _STARTS
        _STARTS += 1  # from here Ray's threads run in this process, for good (ray_starts)
        try:
            quiet = options.progress is False  # the CLI's -q: Ray's own start-up lines too
            ray.init(address=options.ray_address, logging_level=logging.ERROR if quiet else logging.INFO,
                     log_to_driver=not quiet)
        except (ConnectionError, RuntimeError, ValueError) as e:
            _restore(handlers)
            where = f"at {options.ray_address!r}" if options.ray_address else "(a local one)"
            raise LorafuseError(f"engine 'ray': cannot start or reach Ray {where}: {e}") from None
    try:  # (the summary's time starts once Ray is up: starting a local one takes seconds)
        return _run(ray, plan, options, on_module, shard_task if task is None else task, task_options or {},
                    time.perf_counter())
    finally:
        if started:
            ray.shutdown()
            _restore(handlers)


_STARTS = 0


def ray_starts() -> int:
    """How many times run_ray started a Ray in this process (ray.init, shut down since or not). Ray's core worker
    keeps threads of its own, which may still run as the interpreter exits: after Ctrl-C stopped a run with
    tasks in flight, one of them crashed the process (SIGSEGV in TaskManager::RecordMetrics, Ray 2.60, about 1
    run in 5), so the CLI leaves such a process with os._exit once its outputs are cleaned up (cli._leave)."""
    return _STARTS


CONNECT_SECONDS = 10.0  # how long the address of a Ray cluster may take to accept a connection


def _check_reachable(address: str | None) -> None:
    """A cluster address given as HOST:PORT or ray://HOST:PORT must accept a TCP connection within
    CONNECT_SECONDS: ray.init waits minutes on an address nothing answers (and Ctrl-C takes long to act).
    None (then RAY_ADDRESS, as Ray reads it), 'auto' and 'local' (a local Ray, or the one this machine runs) are
    left to Ray."""
    import os

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None or address in ("auto", "local"):
        return
    import socket
    import urllib.parse

    text = address if "://" in address else "ray://" + address
    try:
        parts = urllib.parse.urlsplit(text)
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        return  # not HOST:PORT: Ray says what is wrong with it
    try:
        with socket.create_connection((host, port), timeout=CONNECT_SECONDS):
            pass
    except OSError as e:
        raise LorafuseError(f"engine 'ray': cannot reach Ray at {address!r}: {host}:{port} did not accept a "
                            f"connection within {CONNECT_SECONDS:g} s ({e.strerror or e})") from None


def _signal_handlers() -> dict[int, Any]:
    """The process's SIGTERM and SIGINT handlers (the main thread only: others cannot set them)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}


def _restore(handlers: Mapping[int, Any]) -> None:
    import signal

    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)


def _run(ray: Any, plan: Plan, options: CombineOptions, on_module: Callable[[str, LoraUpdate], None],
         task: ShardTask, task_options: Mapping[str, Any], start: float) -> StreamSummary:
    sketching = Sketching(plan, options)
    passes, n = sketching.passes, len(plan.sources)
    bounds = shard_bounds(n)
    # absolute paths: a worker's working directory is not the driver's
    sources = [Source(s.item.absolute(), s.where) if isinstance(s.item, Path) else s for s in plan.sources]
    remote = ray.remote(task).options(**{"max_retries": TASK_RETRIES, **task_options, "num_returns": 2})
    add = ray.remote(add_partials).options(max_retries=TASK_RETRIES)
    job = ray.put(sketching.job)
    node = ray.get_runtime_context().get_node_id()  # tasks here may read the factor bytes the header pass found
    bar = _Bar(n * passes, options.progress)
    read = 0
    workers: set[str] = set()
    in_flight: list[Any] = []
    try:
        for p in range(1, passes + 1):
            operands = sketching.start(p)
            shipped = ray.put(None if p == 1 else operands)  # pass 1's are regenerated in the tasks
            refs = [remote.remote(job, p, shipped, sources[a:b], plan.weights[a:b], plan.fingerprints[a:b],
                                  (node, plan.replays[a:b]) if plan.replays else None)
                    for a, b in bounds]
            adds: list[Any] = []
            root = tree_sum(_submitter(add, adds), [r[0] for r in refs])
            in_flight = [r for pair in refs for r in pair] + adds
            waiting = [r[1] for r in refs]
            while waiting:
                done, waiting = ray.wait(waiting, num_returns=1)
                for count, nbytes, worker in ray.get(done):
                    read += nbytes
                    workers.add(worker)
                    bar.step(f"pass {p}/{passes}", count)
            summed = ray.get(root)
            # copies: the object store's arrays are read-only and go away with Ray
            sketching.take({name: [np.array(x) for x in arrays] for name, arrays in summed.items()})
            del summed
            in_flight = []
    except ray.exceptions.RayTaskError as e:
        _settle(ray, in_flight)
        if isinstance(e.cause, LorafuseError):  # an adapter's error in a task: as the local engine raises it
            raise e.cause from None
        raise
    except ray.exceptions.RayError as e:  # a worker lost beyond the retries, an object lost, ...
        _settle(ray, in_flight)
        raise LorafuseError(f"engine 'ray': {type(e).__name__}: {e}") from e
    except BaseException:
        _settle(ray, in_flight, 0.0)
        raise
    finally:
        bar.close()
    errors = sketching.finish(on_module)
    return StreamSummary("ray", n, passes, read, time.perf_counter() - start, peak_rss(), errors,
                         shards=len(bounds), workers=len(workers), header_seconds=plan.seconds)


SETTLE_SECONDS = 30.0  # how long a failed pass waits for its other tasks to end


def _submitter(add: Any, submitted: list[Any]) -> Callable[[Any, Any], Any]:
    """add.remote(x, y) for tree_sum, each task's reference kept in `submitted` (to wait for them)."""

    def submit(x: Any, y: Any) -> Any:
        ref = add.remote(x, y)
        submitted.append(ref)
        return ref

    return submit


def _settle(ray: Any, refs: list[Any], timeout: float = SETTLE_SECONDS) -> None:
    """After a failed pass: wait (at most `timeout` seconds) for its other tasks to end, without cancelling
    them. ray.cancel racing a task's completion or retry crashed the driver process in Ray 2.60 (a failed
    check in its task manager: "Tried to complete task that was not pending", seen in this module's tests);
    a shard's task is bounded work, and a Ray this process started is shut down right after anyway."""
    if not refs:
        return
    try:
        ray.wait(refs, num_returns=len(refs), timeout=timeout)
    except Exception:  # noqa: BLE001 - tasks already failed or gone: nothing to wait for
        pass


__all__ = ["TASK_RETRIES", "check_paths", "ray_starts", "require_ray", "run_ray", "shard_bounds", "shard_task",
           "tree_sum"]
