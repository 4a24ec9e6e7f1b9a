"""Approximate distinct-listener counting (pure: takes ``now``).

Exact while a window holds few listeners (a set of ids), then HyperLogLog (Flajolet et al.
2007) with 2^14 registers: standard error 1.04 / sqrt(16384) = 0.81 %, 16 KiB per window, the
same cost at a hundred listeners or ten million. A listener counts as present while it has been
seen (joined or renewed its ticket) in the current or previous window, so the count follows
people leaving within two windows.
"""

from __future__ import annotations

import hashlib
import math

P = 14
M = 1 << P
EXACT_LIMIT = 4096
STANDARD_ERROR = 1.04 / math.sqrt(M)


class HyperLogLog:
    def __init__(self) -> None:
        self.registers = bytearray(M)

    def add(self, item: str) -> None:
        h = int.from_bytes(hashlib.blake2b(item.encode(), digest_size=8).digest(), "big")
        index = h >> (64 - P)
        rest = (h << P) & ((1 << 64) - 1)
        rank = 64 - P + 1 if rest == 0 else (64 - rest.bit_length()) + 1
        rank = min(rank, 64 - P + 1)
        if rank > self.registers[index]:
            self.registers[index] = rank

    def merge(self, other: HyperLogLog) -> HyperLogLog:
        merged = HyperLogLog()
        merged.registers = bytearray(max(a, b) for a, b in zip(self.registers, other.registers, strict=True))
        return merged

    def estimate(self) -> float:
        alpha = 0.7213 / (1 + 1.079 / M)
        total = sum(2.0**-r for r in self.registers)
        raw = alpha * M * M / total
        zeros = self.registers.count(0)
        if raw <= 2.5 * M and zeros:
            return M * math.log(M / zeros)  # linear counting for small cardinalities
        return raw


class _Window:
    def __init__(self) -> None:
        self.exact: set[str] | None = set()
        self.hll = HyperLogLog()

    def add(self, listener: str) -> None:
        self.hll.add(listener)
        if self.exact is not None:
            self.exact.add(listener)
            if len(self.exact) > EXACT_LIMIT:
                self.exact = None  # from here on only the sketch


class ListenerCounter:
    """Distinct listeners seen in the current or the previous window of ``window`` seconds."""

    def __init__(self, window: float = 60.0) -> None:
        self.window = window
        self._index: int | None = None
        self._current = _Window()
        self._previous = _Window()

    def _roll(self, now: float) -> None:
        index = int(now // self.window)
        if self._index is None:
            self._index = index
        elif index == self._index + 1:
            self._previous, self._current = self._current, _Window()
            self._index = index
        elif index > self._index + 1:
            self._previous, self._current = _Window(), _Window()
            self._index = index

    def seen(self, listener: str, now: float) -> None:
        self._roll(now)
        self._current.add(listener)

    def count(self, now: float) -> tuple[int, bool]:
        """(listeners, exact?)."""
        self._roll(now)
        a, b = self._current.exact, self._previous.exact
        if a is not None and b is not None:
            return len(a | b), True
        return round(self._current.hll.merge(self._previous.hll).estimate()), False
