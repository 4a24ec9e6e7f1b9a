"""How late the mixer's ticks ran, over a sliding window (pure: values in, quantiles out).

Theory of operation
-------------------
The room records every tick's lateness (seconds past its deadline). Statistics are read once a
second per room, so they must cost little however long the window: sorting or partitioning
30,000 floats every second in every room would itself hold the stage's event loop for
milliseconds and make the next ticks late. Instead each value is counted in a fixed bin (0.1 ms
wide below 50 ms, 1 ms below 1 s, 10 ms below 10 s, then one overflow bin) and a ring of bin
numbers lets the oldest value leave the window in O(1). A quantile is then one pass over the
bin counts, and is reported as the upper edge of its bin (never below the true value, at most
one bin width above it) and never above the exact maximum, which a monotonic queue keeps.
Lifetime counts of ticks later than a few thresholds are kept beside the window, so a reader
can take the difference of two reads and know exactly how many late ticks fell between them.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import math

WINDOW_TICKS = 50 * 60 * 10  # ten minutes of 20 ms ticks
LATE_THRESHOLDS = (0.005, 0.010, 0.020)  # seconds past the deadline


def _bin_edges() -> list[float]:
    """Lower edges of the bins, in seconds; the last bin is open above."""
    fine = [i * 0.0001 for i in range(500)]  # 0 .. 50 ms by 0.1 ms
    mid = [0.050 + i * 0.001 for i in range(950)]  # 50 ms .. 1 s by 1 ms
    coarse = [1.0 + i * 0.010 for i in range(901)]  # 1 s .. 10 s by 10 ms, then overflow
    return fine + mid + coarse


_EDGES = _bin_edges()


class LatenessWindow:
    """Tick lateness over the last ``size`` ticks, with lifetime counts of late ticks."""

    def __init__(self, size: int = WINDOW_TICKS, thresholds: tuple[float, ...] = LATE_THRESHOLDS) -> None:
        self.size = size
        self.thresholds = thresholds
        self.late = dict.fromkeys(thresholds, 0)  # lifetime: ticks later than each threshold
        self.total = 0  # lifetime: ticks recorded
        self._counts = [0] * len(_EDGES)
        self._ring = [0] * size
        self._max: collections.deque[tuple[int, float]] = collections.deque()  # (tick, lateness)

    def __len__(self) -> int:
        return min(self.total, self.size)

    def add(self, late: float) -> None:
        """One tick's lateness in seconds (an early wake-up counts as 0)."""
        late = max(late, 0.0)
        n = self.total
        slot = n % self.size
        if n >= self.size:
            self._counts[self._ring[slot]] -= 1
        b = bisect.bisect_right(_EDGES, late) - 1
        self._ring[slot] = b
        self._counts[b] += 1
        while self._max and self._max[-1][1] <= late:
            self._max.pop()
        self._max.append((n, late))
        if self._max[0][0] <= n - self.size:
            self._max.popleft()
        self.total = n + 1
        for t in self.thresholds:
            if late > t:
                self.late[t] += 1

    def maximum(self) -> float:
        return self._max[0][1] if self._max else 0.0

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0..1) of the window, to within one bin, rounded up; 0 if empty."""
        n = len(self)
        if n == 0:
            return 0.0
        if q >= 1.0:
            return self.maximum()
        rank = max(1, math.ceil(q * n))  # the rank-th smallest value
        b = bisect.bisect_left(list(itertools.accumulate(self._counts)), rank)
        upper = _EDGES[b + 1] if b + 1 < len(_EDGES) else math.inf
        return min(upper, self.maximum())
