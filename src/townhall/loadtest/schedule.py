"""When each simulated client starts (pure).

A scenario spreads ``n`` starts evenly over ``seconds`` (an open loop: clients start on time
whatever the server answers, as people pressing "join" do). The driver asks :meth:`Schedule.due`
how many should have started by ``now`` and starts the difference, so a driver that fell behind
catches up at once instead of shifting every later start.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Schedule:
    """``n`` starts over ``seconds`` from ``start``: start ``i`` at ``start + i * seconds / n``."""

    n: int
    seconds: float
    start: float

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError("the number of starts must not be negative")
        if self.seconds < 0:
            raise ValueError("the spread must not be negative")

    @property
    def rate(self) -> float:
        """Starts per second (infinite when all start at once)."""
        return self.n / self.seconds if self.seconds > 0 else math.inf

    def offset(self, i: int) -> float:
        return i * self.seconds / self.n if self.n else 0.0

    def due(self, now: float) -> int:
        """How many starts are due by ``now`` (0..n)."""
        if self.n == 0 or now < self.start:
            return 0
        if self.seconds <= 0:
            return self.n
        return min(self.n, math.floor((now - self.start) * self.n / self.seconds) + 1)

    def next_at(self, started: int) -> float | None:
        """When start number ``started`` is due; None once all have started."""
        if started >= self.n:
            return None
        return self.start + self.offset(started)
