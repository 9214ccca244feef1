"""Progress of long work (a run's child training steps, a report's figures): a tqdm bar with ETA on a terminal,
plain lines otherwise, nothing when quiet."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from tqdm import tqdm


def format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def quiet_by_default() -> bool:
    """Whether progress is hidden unless asked for: ``munet -q`` raises the ``munet`` logger above warnings."""
    return not logging.getLogger("munet").isEnabledFor(logging.WARNING)


class Progress:
    """Counts done work units against a planned total and shows them with an ETA.

    On a terminal a tqdm bar is redrawn in place and :meth:`note` lines are printed above it; on anything else (a
    log file, a pipe) only the notes are printed, each with the progress so far. Close it when the work ends.

    Args:
        total: planned work units (e.g. child training steps over the whole run).
        stream: where to print.
        done: units done before this progress started (a resumed run's finished generations); they count towards
            the total but not towards the rate the ETA is computed from.
        unit: the name of a work unit, for the bar.
        quiet: print nothing; ``None``: :func:`quiet_by_default`.
        min_interval: seconds between two redraws of the bar.
    """

    def __init__(self, total: int, stream: TextIO = sys.stderr, done: int = 0, unit: str = "step",
                 quiet: bool | None = None, min_interval: float = 1.0):
        self.total = max(total, 1)
        self.done = self.done_before = done
        self.stream = stream
        self.start = time.perf_counter()
        self._label = ""
        self.quiet = quiet_by_default() if quiet is None else quiet
        self.live = not self.quiet and stream.isatty()
        self.bar = tqdm(total=self.total, initial=done, file=stream, unit=unit, disable=not self.live,
                        mininterval=min_interval, dynamic_ncols=True, leave=False)

    @property
    def label(self) -> str:
        return self._label

    @label.setter
    def label(self, text: str) -> None:
        self._label = text
        self.bar.set_description_str(text, refresh=False)

    def eta(self) -> float:
        elapsed = time.perf_counter() - self.start
        rate_units = self.done - self.done_before
        return elapsed / rate_units * (self.total - self.done) if rate_units else float("nan")

    def line(self) -> str:
        """The progress so far as one line of text: label, percentage, elapsed time and ETA."""
        elapsed = time.perf_counter() - self.start
        eta = self.eta()
        eta_text = format_seconds(eta) if eta == eta else "?"
        pct = 100.0 * self.done / self.total
        return f"{self._label} | {pct:5.1f}% | elapsed {format_seconds(elapsed)} | ETA {eta_text}"

    def advance(self, units: int = 1) -> None:
        self.done += units
        self.bar.update(units)

    def extend(self, units: int) -> None:
        """Grows the total by work found past the plan (a generation's twins, ``mutation_twins``)."""
        self.total += units
        self.bar.total = self.total

    def skip(self, units: int = 1) -> None:
        """Counts ``units`` found already done (e.g. a benchmark's stored results): towards the total, not the rate."""
        self.done_before += units
        self.advance(units)

    def note(self, text: str) -> None:
        """Prints a permanent line (e.g. at the end of a generation), above the bar on a terminal."""
        if self.quiet:
            return
        if self.live:
            self.bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        self.bar.close()
