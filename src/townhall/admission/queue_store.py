"""Where the waiting room's counters live: process memory (embedded) or Redis (scale-out).

Both run the same pure arithmetic (``waiting_room``) on a space's ``Counters``. Redis keeps
them in one hash per space (``{redis_prefix}:wr:{space}``) plus one bit per arrival number
(``...:wr:{space}:used``) so that a queue token admits once, and updates them in an optimistic
transaction (``WATCH``/``MULTI``): nodes that race on one space retry, and no node ever
applies a decision computed from stale counters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from townhall.admission.waiting_room import Admit, Counters

T = TypeVar("T")

# Counters of a space nobody touched for this long are dropped (a space's life is hours).
IDLE_SECONDS = 24 * 3600


class AlreadyUsed(Exception):
    """This arrival number has already been admitted once."""


class QueueStore(Protocol):
    async def update(self, space_id: str, fn: Callable[[Counters], T], *, claim: int | None = None) -> T:
        """Run ``fn`` on the space's counters atomically and keep its changes. With ``claim``,
        raise ``AlreadyUsed`` if that arrival number was admitted before, and mark it used when
        ``fn`` returns something true-ish under ``admitted``."""
        ...

    async def close(self) -> None: ...


def admitted(result: object) -> bool:
    return isinstance(result, Admit)


class MemoryQueueStore:
    def __init__(self) -> None:
        self.counters: dict[str, Counters] = {}
        self.used: dict[str, bytearray] = {}

    async def update(self, space_id: str, fn: Callable[[Counters], T], *, claim: int | None = None) -> T:
        c = self.counters.get(space_id)
        if c is None:
            c = self.counters[space_id] = Counters()
        bits = self.used.setdefault(space_id, bytearray())
        if claim is not None and claim < len(bits) * 8 and bits[claim >> 3] & (1 << (claim & 7)):
            raise AlreadyUsed
        result = fn(c)
        if claim is not None and admitted(result):
            if claim >= len(bits) * 8:
                bits.extend(bytes((claim >> 3) + 1 - len(bits)))
            bits[claim >> 3] |= 1 << (claim & 7)
        return result

    async def close(self) -> None:
        self.counters.clear()
        self.used.clear()


class RedisQueueStore:
    def __init__(self, url: str, prefix: str = "townhall:wr:") -> None:
        import redis.asyncio as aioredis

        self.redis: Any = aioredis.Redis.from_url(url, decode_responses=True)
        self.prefix = prefix

    async def update(self, space_id: str, fn: Callable[[Counters], T], *, claim: int | None = None) -> T:
        from redis.exceptions import WatchError

        key = self.prefix + space_id
        used_key = key + ":used"
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key, used_key)
                    if claim is not None and await pipe.getbit(used_key, claim):
                        await pipe.unwatch()
                        raise AlreadyUsed
                    c = Counters.from_fields(await pipe.hgetall(key))
                    result = fn(c)
                    pipe.multi()
                    pipe.delete(key)
                    pipe.hset(key, mapping=c.to_fields())
                    pipe.expire(key, IDLE_SECONDS)
                    if claim is not None and admitted(result):
                        pipe.setbit(used_key, claim, 1)
                        pipe.expire(used_key, IDLE_SECONDS)
                    await pipe.execute()
                    return result
                except WatchError:
                    continue

    async def close(self) -> None:
        await self.redis.aclose()


def queue_store_from_url(url: str | None, prefix: str = "townhall") -> QueueStore:
    if not url or url == "memory://":
        return MemoryQueueStore()
    return RedisQueueStore(url, f"{prefix}:wr:")
