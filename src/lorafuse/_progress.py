"""Progress: events for callbacks (ProgressEvent, ProgressReporter), a tqdm bar that draws them
(TqdmBar), and a small bar of its own on stderr (Progress; drawn only on a terminal, unless forced)."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

from lorafuse._terminal import printable
from lorafuse.errors import from_caller


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def clock(seconds: float) -> str:
    """A duration as tqdm writes it: MM:SS, or H:MM:SS from an hour on; '?' when unknown."""
    if not seconds >= 0 or seconds == float("inf"):  # NaN too
        return "?"
    m, sec = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class Display:
    """The stream a progress bar draws on (stderr unless given): a write or flush that fails (stderr closed, a full
    disk, a reader that left) stops the drawing instead of failing the run or leaving tqdm's lock taken; a bar is
    no part of the result. None (Python's stderr when file descriptor 2 was closed) draws nothing."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream, self.broken = stream, stream is None

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self.stream.write(text)  # type: ignore[union-attr]
            except (OSError, ValueError):
                self.broken = True
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()  # type: ignore[union-attr]
            except (OSError, ValueError):
                self.broken = True

    def isatty(self) -> bool:
        try:
            return not self.broken and bool(self.stream.isatty())  # type: ignore[union-attr]
        except (OSError, ValueError, AttributeError):
            return False

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, ... as tqdm asks them
        return getattr(self.stream, name)


# What a tqdm bar shows (TqdmBar): percentage, bar, counts, then the time it has taken, the time it
# still needs (ETA, from the rate so far), the rate and the tensor being written.
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed} elapsed, {remaining} left, {rate_fmt}{postfix}]"


class Progress:
    def __init__(self, total: int, label: str, enabled: bool | None = None, stream: TextIO | None = None,
                 unit: str = "bytes") -> None:
        self.unit = unit
        self.stream = Display(stream or sys.stderr)
        from lorafuse._validate import check_optional_bool

        enabled = check_optional_bool(enabled, "progress")  # 'no' is not a switch
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.label, self.done = max(total, 1), label, 0
        self.start = self._last = time.monotonic()

    def update(self, n: int, note: str = "") -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            rate = self.done / max(now - self.start, 1e-9)
            if self.unit == "bytes":
                counts = f"{human_bytes(self.done)}/{human_bytes(self.total)} {human_bytes(rate)}/s"
            else:
                counts = f"{self.done}/{self.total} {self.unit} {rate:.1f}/s"
            elapsed = now - self.start
            left = (self.total - min(self.done, self.total)) * elapsed / self.done if self.done > 0 else float("nan")
            times = f"{clock(elapsed)} elapsed, {clock(left)} left"
            shown = printable(note, keep_newlines=False)[:40]  # a tensor name from a file: escaped
            self.stream.write(f"\r{self.label} [{bar:<30}] {frac * 100:5.1f}% {counts} {times} {shown:<40}")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------------------------------------
# Progress of an operation as events, for a callback (the API) or a drawn bar (the CLI)


@dataclass(frozen=True)
class ProgressEvent:
    """One step of an operation's output: `nbytes` bytes of tensor `name` are written.

    Every output tensor is covered by one or more events (a large one is written in row blocks)
    whose `nbytes` add up to its size; exactly one of them has `tensor_done` set. Totals are
    known before the first event. In a pipeline, names are '<component>/<key>'."""

    op: str
    name: str
    nbytes: int
    tensor_done: bool
    done_bytes: int
    total_bytes: int
    done_tensors: int
    total_tensors: int


ProgressCallback = Callable[[ProgressEvent], None]


class ProgressReporter:
    """Counts an operation's work and hands each step to `callback` (None: counts only).

    `advance` may be called from a writer thread; events reach the callback in order."""

    def __init__(self, op: str, total_bytes: int, total_tensors: int, callback: ProgressCallback | None) -> None:
        self.op, self.callback = op, callback
        self.total_bytes, self.total_tensors = total_bytes, total_tensors
        self.done_bytes = self.done_tensors = 0
        self._lock = threading.Lock()

    def advance(self, name: str, nbytes: int, tensor_done: bool = True) -> None:
        with self._lock:
            self.done_bytes += nbytes
            self.done_tensors += int(tensor_done)
            if self.callback is not None:
                self.callback(ProgressEvent(self.op, name, nbytes, tensor_done, self.done_bytes, self.total_bytes,
                                            self.done_tensors, self.total_tensors))


class TqdmBar:
    """A progress callback that draws a tqdm bar of bytes (on stderr unless `stream`); `close()` ends it.

    The bar is created at the first event, when the totals are known."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label, self.stream = label, stream
        self._bar: Any = None

    def __call__(self, event: ProgressEvent) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=event.total_bytes, desc=self.label, unit="B", unit_scale=True, unit_divisor=1024,
                             file=Display(self.stream if self.stream is not None else sys.stderr), dynamic_ncols=True,
                             mininterval=0.1, leave=True, bar_format=BAR_FORMAT)
        self._bar.set_postfix_str(printable(event.name, keep_newlines=False)[:40], refresh=False)
        self._bar.update(event.nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _theirs(callback: ProgressCallback) -> ProgressCallback:
    """The caller's callback, what it raises marked as theirs (errors.from_caller): passed on unchanged."""
    def call(event: ProgressEvent) -> None:
        try:
            callback(event)
        except BaseException as e:
            from_caller(e)
            raise

    return call


def progress_callback(progress: ProgressCallback | bool | None, label: str,
                      stream: TextIO | None = None) -> tuple[ProgressCallback | None, Callable[[], None]]:
    """The callback for an API `progress` argument and what ends it: a callable is used as it is;
    True draws a bar, None draws one when stderr is a terminal, False reports nothing."""
    if callable(progress):
        return _theirs(progress), lambda: None
    out = stream or sys.stderr
    if progress is None:
        progress = Display(out).isatty()  # False for a closed or missing stderr (pythonw, a daemon), not an error
    if not progress:
        return None, lambda: None
    bar = TqdmBar(label, out)
    return bar, bar.close


TIMINGS_ENV = "LORAFUSE_TIMINGS"


class PhaseTimer:
    """Seconds (and bytes) per phase of an operation, summed over threads; printed to stderr by
    `report` when LORAFUSE_TIMINGS=1 (or `enabled`). Phases on different threads overlap: their
    sum can exceed the wall time."""

    def __init__(self, op: str, enabled: bool | None = None) -> None:
        self.op = op
        self.enabled = os.environ.get(TIMINGS_ENV, "") not in ("", "0") if enabled is None else enabled
        self.seconds: dict[str, float] = {}
        self.bytes: dict[str, int] = {}
        self._lock = threading.Lock()
        self.start = time.perf_counter()

    @contextmanager
    def phase(self, name: str, nbytes: int = 0) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            with self._lock:
                self.seconds[name] = self.seconds.get(name, 0.0) + dt
                self.bytes[name] = self.bytes.get(name, 0) + nbytes

    def report(self, stream: TextIO | None = None) -> None:
        if not self.enabled:
            return
        out = stream or sys.stderr
        wall = time.perf_counter() - self.start
        lines = [f"{self.op} timings (LORAFUSE_TIMINGS): wall {wall:.3f} s"]
        for name, s in self.seconds.items():
            n = self.bytes.get(name, 0)
            rate = f", {human_bytes(n)} at {human_bytes(n / s)}/s" if n and s > 0 else ""
            lines.append(f"  {name:<48} {s:8.3f} s{rate}")
        out.write("\n".join(lines) + "\n")
        out.flush()
