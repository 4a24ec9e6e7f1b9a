"""Where the waiting room's counters live: process memory (embedded) or Redis (scale-out).

The memory store runs the pure arithmetic of ``waiting_room`` on a ``Counters`` per space. The
Redis store keeps the same fields in one hash per space (``{redis_prefix}:wr:{space}``, the
names of ``Counters.to_fields``) plus one bit per arrival number (``...:wr:{space}:used``) so a
queue token admits once; a space split K ways (``waiting_room_splits``) has one such pair per
split, ``{redis_prefix}:wr:{<space>:s<k>}`` and ``...:used``, the braces a Redis Cluster hash
tag: a split's two keys share a slot (one script touches both) while the K splits hash to
different slots, which a cluster could place on different primaries (a split is only a key:
the script is the same); without a cluster, ``shard_urls`` (``waiting_room_redis_urls``) puts
split k on server k mod n. Each operation runs as one Lua script: atomic on the Redis server, one
round trip, no retries when nodes race on one space. The script is the same arithmetic
written again in Lua (a transaction with ``WATCH`` around the Python functions cost ~3.6x more
Redis CPU per update, BENCHMARKS.md "Scale-out plan"); ``tests/test_admission_cores.py`` runs
both on the same random sequence of operations and asserts the same decisions and counters.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

from townhall.admission import waiting_room as wr

# Counters of a space nobody touched for this long are dropped (a space's life is hours).
IDLE_SECONDS = 24 * 3600

Op = Literal["join", "claim", "renew"]


class AlreadyUsed(Exception):
    """This arrival number has already been admitted once."""


@dataclasses.dataclass(frozen=True)
class Step:
    """One operation on a space's counters, as the Redis script takes it. ``arg``: the arrival
    number of a claim, the old expiry of a renewal; ``split``: which of the space's splits
    (``None``: the space is not split), ``cap`` being already that split's share."""

    op: Op
    space_id: str
    cap: wr.Capacity
    now: float
    expires_at: float
    arg: float = 0
    elsewhere_ok: bool = True
    may_queue: bool = True
    split: int | None = None


def counters_key(space_id: str, split: int | None) -> str:
    """A split's name after the store's prefix (see the module's note for the hash tag)."""
    return space_id if split is None else f"{{{space_id}:s{split}}}"


class QueueStore(abc.ABC):
    """A space's waiting room, each operation atomic (``waiting_room`` says what they do).

    A store implements one primitive, ``_apply``, the shape the Redis script has: a ``Step`` in,
    the decision out (``None`` for a renewal, which decides nothing); the public operations
    below are the same for every store."""

    # True when every operation is answered from process memory without suspending.
    in_memory = False

    async def join(
        self,
        space_id: str,
        cap: wr.Capacity,
        now: float,
        expires_at: float,
        *,
        elsewhere_ok: bool,
        may_queue: bool = True,
        split: int | None = None,
    ) -> wr.JoinDecision:
        decision = await self._apply(
            Step("join", space_id, cap, now, expires_at, 0, elsewhere_ok, may_queue, split)
        )
        assert decision is not None
        return decision

    async def claim(
        self,
        space_id: str,
        cap: wr.Capacity,
        number: int,
        now: float,
        expires_at: float,
        *,
        elsewhere_ok: bool,
        split: int | None = None,
    ) -> wr.Decision:
        """``AlreadyUsed`` if ``number`` has been admitted before; marks it when admitting."""
        decision = await self._apply(
            Step("claim", space_id, cap, now, expires_at, number, elsewhere_ok, split=split)
        )
        assert decision is not None and not isinstance(decision, wr.Full)
        return decision

    async def renew(
        self,
        space_id: str,
        cap: wr.Capacity,
        old_expires_at: float,
        new_expires_at: float,
        now: float,
        split: int | None = None,
    ) -> None:
        await self._apply(Step("renew", space_id, cap, now, new_expires_at, old_expires_at, split=split))

    @abc.abstractmethod
    async def _apply(self, step: Step) -> wr.JoinDecision | None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...


class MemoryQueueStore(QueueStore):
    in_memory = True

    def __init__(self) -> None:
        self.counters: dict[str, wr.Counters] = {}
        self.used: dict[str, bytearray] = {}

    async def _apply(self, step: Step) -> wr.JoinDecision | None:
        key = counters_key(step.space_id, step.split)
        c = self.counters.get(key)
        if c is None:
            c = self.counters[key] = wr.Counters()
        cap, now, expires_at, ok = step.cap, step.now, step.expires_at, step.elsewhere_ok
        if step.op == "join":
            return wr.join(c, cap, now, expires_at, elsewhere_ok=ok, may_queue=step.may_queue)
        if step.op == "renew":
            wr.renew(c, cap, step.arg, expires_at, now)
            return None
        number = int(step.arg)
        bits = self.used.setdefault(key, bytearray())
        if number < len(bits) * 8 and bits[number >> 3] & (1 << (number & 7)):
            raise AlreadyUsed
        decision = wr.claim(c, cap, number, now, expires_at, elsewhere_ok=ok)
        if isinstance(decision, wr.Admit):
            if number >= len(bits) * 8:
                bits.extend(bytes((number >> 3) + 1 - len(bits)))
            bits[number >> 3] |= 1 << (number & 7)
        return decision

    async def close(self) -> None:
        self.counters.clear()
        self.used.clear()


# The arithmetic of waiting_room.refresh/join/claim/renew, field for field. Returns
# {outcome, number, released}: outcome 1 admitted, 0 waiting, 2 full (not queued), -1 number
# already used.
_SCRIPT = """
local op = ARGV[1]
local now, expires = tonumber(ARGV[2]), tonumber(ARGV[3])
local max_active, rate, burst, bs = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local arg, elsewhere_ok, idle, eps = tonumber(ARGV[8]), ARGV[9] == '1', tonumber(ARGV[10]), 1e-4
local may_queue = ARGV[11] == '1'
if op == 'claim' and redis.call('GETBIT', KEYS[2], arg) == 1 then return {-1, arg, 0} end
local f = redis.call('HGETALL', KEYS[1])
local a, r, k, t = 0, 0, 0, -1
local buckets = {}
for i = 1, #f, 2 do
  local name, value = f[i], tonumber(f[i + 1])
  if name == 'a' then a = value elseif name == 'r' then r = value
  elseif name == 'k' then k = value elseif name == 't' then t = value
  elseif string.sub(name, 1, 1) == 'b' then buckets[tonumber(string.sub(name, 2))] = value end
end
if burst < 1 then burst = 1 end
if t < 0 then k, t = burst, now
elseif now > t then k = math.min(burst, k + (now - t) * rate); t = now end
local floor = math.ceil(now / bs)
local active = 0
for b, n in pairs(buckets) do
  if b < floor then redis.call('HDEL', KEYS[1], 'b' .. string.format('%d', b)); buckets[b] = nil
  else active = active + n end
end
if a > r and active < max_active then
  local kk = math.min(a - r, math.floor(k + eps))
  r = r + kk; k = k - kk
end
local function count(at)
  local b = math.ceil(at / bs)
  redis.call('HINCRBY', KEYS[1], 'b' .. string.format('%d', b), 1)
end
local outcome, number = 0, -1
if op == 'join' then
  if a == r and k + eps >= 1 and active < max_active and elsewhere_ok then
    k = k - 1; count(expires); outcome = 1
  elseif may_queue then number = a; a = a + 1
  else outcome = 2 end
elseif op == 'claim' then
  number = arg
  if number >= a then a = number + 1 end
  if number < r and active < max_active and elsewhere_ok then
    count(expires); outcome = 1
    redis.call('SETBIT', KEYS[2], number, 1); redis.call('EXPIRE', KEYS[2], idle)
  end
elseif op == 'renew' then
  local old = 'b' .. string.format('%d', math.ceil(arg / bs))
  if (tonumber(redis.call('HGET', KEYS[1], old)) or 0) > 0 then redis.call('HINCRBY', KEYS[1], old, -1) end
  count(expires)
end
redis.call('HSET', KEYS[1], 'a', string.format('%d', a), 'r', string.format('%d', r),
  'k', string.format('%.17g', k), 't', string.format('%.17g', t))
redis.call('EXPIRE', KEYS[1], idle)
return {outcome, number, r}
"""


class RedisQueueStore(QueueStore):
    """The waiting room on Redis, shared by every node of a fleet (one Lua call per operation)."""

    def __init__(self, url: str, prefix: str = "townhall:wr:", shard_urls: Sequence[str] = ()) -> None:
        """``shard_urls``: Redis servers (primaries) for a split space's counters, split k on
        ``shard_urls[k % n]`` — every node lists the same servers in the same order. Empty: all
        on ``url``. An unsplit space's counters live on the first."""
        import redis.asyncio as aioredis

        urls = list(shard_urls) or [url]
        self.shards: list[Any] = [aioredis.Redis.from_url(u, decode_responses=True) for u in urls]
        self.redis: Any = self.shards[0]
        self.prefix = prefix
        self._scripts: list[Any] = [shard.register_script(_SCRIPT) for shard in self.shards]

    def _shard(self, split: int | None) -> int:
        return (split or 0) % len(self.shards)

    async def _apply(self, step: Step) -> wr.JoinDecision | None:
        key, cap = self.prefix + counters_key(step.space_id, step.split), step.cap
        script = self._scripts[self._shard(step.split)]
        args = [step.op, repr(step.now), repr(step.expires_at), cap.max_active, repr(cap.rate)]
        args += [repr(cap.burst), repr(cap.bucket_seconds), repr(step.arg)]
        args += ["1" if step.elsewhere_ok else "0", IDLE_SECONDS, "1" if step.may_queue else "0"]
        outcome, number, released = (int(x) for x in await script(keys=[key, key + ":used"], args=args))
        if step.op == "renew":
            return None
        if outcome == -1:
            raise AlreadyUsed
        if outcome == 1:
            return wr.Admit()
        if outcome == 2:
            return wr.Full()
        return wr.waiting(wr.Counters(released=released), cap, number)

    async def counters(self, space_id: str, split: int | None = None) -> wr.Counters:
        """The space's (or one split's) counters as stored (for tests and inspection)."""
        shard = self.shards[self._shard(split)]
        return wr.Counters.from_fields(await shard.hgetall(self.prefix + counters_key(space_id, split)))

    async def close(self) -> None:
        for shard in self.shards:
            await shard.aclose()


def queue_store_from_url(
    url: str | None, prefix: str = "townhall", shard_urls: Sequence[str] = ()
) -> QueueStore:
    if not url or url == "memory://":
        return MemoryQueueStore()
    return RedisQueueStore(url, f"{prefix}:wr:", shard_urls)
