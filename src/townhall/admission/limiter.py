"""Rate limits behind a small interface, on the ``limits`` library.

The embedded default keeps counters in process memory; ``redis_url`` (scale-out) shares them
between nodes. Both use the moving-window strategy, which is exact: there is no window edge at
which a client can fit two windows' worth of hits (the memory storage keeps it in O(1) a hit:
``QuietMemoryStorage``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import OrderedDict
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
    """``limits``' memory storage with its moving window kept in O(1) a hit and cleaned as it
    goes, for a join storm's path.

    ``limits`` keeps a key's hits as a list with the newest first (each hit inserts at the
    front: O(hits in the window)), as objects the garbage collector walks, and cleans with a
    pass over every key that hops to a worker thread per key, started after every hit (measured:
    ~2 thread hops a join). Here a key's hits are a list of timestamps (oldest first): a hit
    drops the ones that left its window from the front and appends; the decision is the same
    (refused when the hits within ``expiry`` seconds plus this one pass ``limit``). A list, not
    a deque: a key of one hit costs ~320 bytes with its name and entries (a deque ~1,000,
    ``limits``' own storage ~480; tracemalloc over 50,000 keys), and a storm from a million
    addresses keeps a million keys for a window; dropping from the front of a few
    hundred floats at most is one short memmove. Keys are kept per window length in order of
    their last hit, so the keys whose window has passed are at the front of their group: each
    hit drops a few of them (``SWEEP`` at most) from its own group and from one other in turn
    (so a window length nobody hits any more is emptied too); no pass over every key ever
    runs. Fixed-window counters (not used by the moving window) keep the base class's
    cleaning, at most every ``CLEAN_EVERY`` seconds."""

    CLEAN_EVERY = 5.0
    SWEEP = 8
    _cleaned_at = float("-inf")

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, **options: str) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        self.events: dict[str, list[float]] = {}  # type: ignore[assignment]
        self._groups: dict[int, OrderedDict[str, list[float]]] = {}
        self._turn = 0  # which other group a hit sweeps too

    async def _MemoryStorage__schedule_expiry(self) -> None:  # the base class's private hook
        now = time.monotonic()
        if now - self._cleaned_at < self.CLEAN_EVERY:
            return
        self._cleaned_at = now
        await super()._MemoryStorage__schedule_expiry()  # type: ignore[misc]

    async def _MemoryStorage__expire_events(self) -> None:  # the base's pass: counters only
        now = time.time()
        for key in [k for k, at in self.expirations.items() if at <= now]:
            self.storage.pop(key, None)
            self.expirations.pop(key, None)

    def _sweep(self, group: OrderedDict[str, list[float]], edge: float) -> None:
        for _ in range(self.SWEEP):
            if not group:
                return
            key, hits = next(iter(group.items()))
            if hits and hits[-1] >= edge:
                return
            del group[key]
            self.events.pop(key, None)

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        if amount > limit:
            return False
        now = time.time()
        edge = now - expiry
        group = self._groups.get(expiry)
        if group is None:
            group = self._groups[expiry] = OrderedDict()
        self._sweep(group, edge)  # before this key is looked up: it may be one of them
        if len(self._groups) > 1:
            self._turn = (self._turn + 1) % len(self._groups)
            other_expiry, other = list(self._groups.items())[self._turn]
            if other is not group:
                self._sweep(other, now - other_expiry)
        hits = self.events.get(key)
        if hits is None:
            hits = self.events[key] = group[key] = []
        else:
            group.move_to_end(key)
            _drop_before(hits, edge)
        if len(hits) + amount > limit:
            return False
        hits.extend([now] * amount)
        return True

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        now = time.time()
        hits = self.events.get(key)
        edge = now - expiry
        if hits:
            _drop_before(hits, edge)
        return (hits[0], len(hits)) if hits else (now, 0)

    async def clear(self, key: str) -> None:
        await super().clear(key)
        for group in self._groups.values():
            group.pop(key, None)

    async def reset(self) -> int | None:
        self._groups.clear()
        return await super().reset()


def _drop_before(hits: list[float], edge: float) -> None:
    """Drop the timestamps before ``edge`` from the front of ``hits`` (oldest first)."""
    gone = 0
    for at in hits:
        if at >= edge:
            break
        gone += 1
    if gone:
        del hits[:gone]


class LimitsLimiter:
    """A ``Limiter`` over any ``limits`` async storage (memory, Redis)."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self.in_memory = isinstance(storage, MemoryStorage)
        self._quiet = storage if isinstance(storage, QuietMemoryStorage) else None
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
        if self._quiet is not None:
            # The strategy's own hit, without its generic key building (``key_for``: the same
            # text, ~2 µs less a hit, twice a join).
            name = f"{item.namespace}/{'/'.join(key)}/{item.amount}/{item.multiples}/{item.GRANULARITY.name}"
            if await self._quiet.acquire_entry(name, item.amount, item.get_expiry()):
                return LimitDecision(True, 0)
        elif await self._strategy.hit(item, *key):
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
