"""A small progress bar on stderr (drawn only when stderr is a terminal, unless forced)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from lorafuse._terminal import printable


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


class Progress:
    def __init__(self, total: int, label: str, enabled: bool | None = None, stream: TextIO | None = None,
                 unit: str = "bytes") -> None:
        self.unit = unit
        self.stream = stream or sys.stderr
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
            shown = printable(note, keep_newlines=False)[:40]  # a tensor name from a file: escaped
            self.stream.write(f"\r{self.label} [{bar:<30}] {frac * 100:5.1f}% {counts} {shown:<40}")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
