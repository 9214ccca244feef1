"""Progress lines with an ETA, measured in child training steps (the unit of work of a run)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """Counts done work units against a planned total and prints progress with an ETA.

    Args:
        total: planned work units (child training steps over the whole run).
        stream: where to print; live ``\\r`` updates only when it is a terminal.
        min_interval: seconds between live updates.
    """

    def __init__(self, total: int, stream: TextIO = sys.stderr, min_interval: float = 1.0):
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream
        self.min_interval = min_interval
        self.start = time.perf_counter()
        self._last = 0.0
        self.label = ""
        self.live = stream.isatty()

    def eta(self) -> float:
        elapsed = time.perf_counter() - self.start
        return elapsed / self.done * (self.total - self.done) if self.done else float("nan")

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        eta = self.eta()
        eta_text = format_seconds(eta) if eta == eta else "?"
        pct = 100.0 * self.done / self.total
        return f"{self.label} | {pct:5.1f}% | elapsed {format_seconds(elapsed)} | ETA {eta_text}"

    def advance(self, units: int = 1) -> None:
        self.done += units
        now = time.perf_counter()
        if self.live and now - self._last >= self.min_interval:
            self._last = now
            self.stream.write("\r" + self.line() + "\033[K")
            self.stream.flush()

    def note(self, text: str) -> None:
        """Prints a permanent line (e.g. at the end of a generation) followed by the progress line."""
        self.stream.write(("\r\033[K" if self.live else "") + text + "\n")
        self.stream.flush()
