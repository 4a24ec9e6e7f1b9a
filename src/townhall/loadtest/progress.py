"""The progress line a load test keeps on stderr (rendering is pure; ``Progress`` writes)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TextIO

WIDTH = 24


def render(label: str, elapsed: float, seconds: float, fields: Mapping[str, object]) -> str:
    """``label [#####.....] 4.1/10.0 s  key value  key value``: the bar is time, since every
    scenario is bounded by its duration."""
    frac = 0.0 if seconds <= 0 else min(1.0, max(0.0, elapsed / seconds))
    filled = round(frac * WIDTH)
    bar = "#" * filled + "." * (WIDTH - filled)
    rest = "  ".join(f"{k} {v}" for k, v in fields.items())
    return f"{label} [{bar}] {elapsed:5.1f}/{seconds:.1f} s  {rest}"


class Progress:
    """Redraws one line in place on a terminal; on anything else, writes a line at most every
    ``every`` redraws so that a log stays readable."""

    def __init__(self, stream: TextIO | None = None, every: int = 10) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.every = every
        self._n = 0
        self._width = 0

    def show(self, line: str) -> None:
        self._n += 1
        if self.tty:
            pad = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
        elif self._n % self.every == 1:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self, line: str) -> None:
        if self.tty:
            self.show(line)
            self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
