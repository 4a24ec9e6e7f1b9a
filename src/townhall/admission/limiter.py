"""Rate limits behind a small interface, on the ``limits`` library.

The embedded default keeps counters in process memory; ``redis_url`` (scale-out) shares them
between nodes. Both use the moving-window strategy, which is exact: there is no window edge at
which a client can fit two windows' worth of hits.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Protocol, cast

from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string


@dataclasses.dataclass(frozen=True)
class LimitDecision:
    allowed: bool
    # Whole seconds until a retry can succeed; 0 when allowed.
    retry_after: int


class Limiter(Protocol):
    """Counts hits of ``key`` against ``rule`` (``"10/minute"``)."""

    # True when every hit is answered from process memory without suspending.
    in_memory: bool

    async def hit(self, rule: str, *key: str) -> LimitDecision: ...

    async def close(self) -> None: ...


class QuietMemoryStorage(MemoryStorage):
    """``limits``' memory storage, cleaning up at most every ``CLEAN_EVERY`` seconds. Its own
    schedule starts a clean-up pass after every hit once the last pass is done, and a pass hops
    to a worker thread once per key: under a join storm from many addresses that keeps the
    event loop busy cleaning (measured: ~2 thread hops a join). Cleaning only frees memory; the
    moving window itself compares timestamps on every hit, so counting stays exact."""

    CLEAN_EVERY = 5.0
    _cleaned_at = float("-inf")

    async def _MemoryStorage__schedule_expiry(self) -> None:  # the base class's private hook
        now = time.monotonic()
        if now - self._cleaned_at < self.CLEAN_EVERY:
            return
        self._cleaned_at = now
        await super()._MemoryStorage__schedule_expiry()  # type: ignore[misc]


class LimitsLimiter:
    """A ``Limiter`` over any ``limits`` async storage (memory, Redis)."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self.in_memory = isinstance(storage, MemoryStorage)
        self._strategy = MovingWindowRateLimiter(storage)
        self._rules: dict[str, RateLimitItem] = {}

    @classmethod
    def from_url(cls, url: str | None, prefix: str = "townhall") -> LimitsLimiter:
        if not url or url == "memory://":
            return cls(QuietMemoryStorage())
        # redis-py's asyncio client (the ``redis`` package), the one the waiting room uses too;
        # keys under the deployment's ``redis_prefix``.
        storage = storage_from_string(
            url.replace("redis://", "async+redis://", 1),
            implementation="redispy",
            key_prefix=f"{prefix}:limits",
        )
        return cls(cast(Storage, storage))

    def _rule(self, rule: str) -> RateLimitItem:
        item = self._rules.get(rule)
        if item is None:
            item = self._rules[rule] = parse(rule)
        return item

    async def hit(self, rule: str, *key: str) -> LimitDecision:
        item = self._rule(rule)
        if await self._strategy.hit(item, *key):
            return LimitDecision(True, 0)
        stats = await self._strategy.get_window_stats(item, *key)
        return LimitDecision(False, max(1, math.ceil(stats.reset_time - time.time())))

    async def close(self) -> None:
        # Memory counters die with the process (reset also stops their expiry task); shared
        # Redis counters must outlive this node, so they are left alone.
        if isinstance(self._storage, MemoryStorage):
            await self._storage.reset()
            return
        # Close the Redis connections (not the counters) on the loop that opened them.
        client = getattr(getattr(self._storage, "bridge", None), "storage", None)
        closing = getattr(client, "aclose", None)
        if closing is not None:
            await closing()
