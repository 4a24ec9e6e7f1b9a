"""Per-second aggregation of emoji reactions (pure: takes ``now``).

A million listeners reacting must not become a million messages to a million listeners: each
space keeps one counter per emoji for the current second; when the second is over the counts
become one ``ReactionsTick``. Nothing is kept per reaction.
"""

from __future__ import annotations

import collections
import dataclasses

# The reactions X Spaces listeners know, plus a few; anything else is refused.
EMOJI = ("😂", "😲", "😢", "💜", "💯", "👏", "✊", "👍", "👎", "👋", "🙏", "🔥", "❤️", "🎉")


@dataclasses.dataclass(frozen=True)
class SecondTally:
    second: int
    counts: tuple[tuple[str, int], ...]


class ReactionAggregator:
    """Counts of the open second, and the last closed second's tally for the state document."""

    def __init__(self) -> None:
        self._second: int | None = None
        self._counts: collections.Counter[str] = collections.Counter()
        self.last: SecondTally | None = None
        self.totals: collections.Counter[str] = collections.Counter()

    def add(self, emoji: str, now: float) -> list[SecondTally]:
        """Count one reaction; returns the tally of a second that this closed, if any."""
        closed = self.flush(now)
        if self._second is None:
            self._second = int(now)
        self._counts[emoji] += 1
        self.totals[emoji] += 1
        return closed

    def flush(self, now: float) -> list[SecondTally]:
        """Close the open second if ``now`` is past it."""
        if self._second is None or int(now) <= self._second:
            return []
        tally = SecondTally(self._second, tuple(sorted(self._counts.items())))
        self.last = tally
        self._second = None
        self._counts = collections.Counter()
        return [tally]

    @property
    def idle(self) -> bool:
        return self._second is None
