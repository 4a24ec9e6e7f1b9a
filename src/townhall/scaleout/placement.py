"""Which node runs a space's stage: one media node per space, recorded in Redis with a lease.

Theory of operation
-------------------
- A space's stage (mixer, packager) runs on exactly one node, its *owner*. The owner is the
  value of the key ``{prefix}:space:{id}:node`` (the node's public URL), written with
  ``SET NX PX`` — the first node to need the space claims it — and kept alive by the owner,
  which renews its leases every third of their life. No home-made protocol: Redis's atomic
  ``SET NX`` and a compare-and-renew script are the whole agreement.
- Any other node answering for the space redirects speakers to the owner (WHIP/WHEP, RFC 9725
  §4.5) and relays listeners' HLS requests to it (``scaleout/relay.py``).
- If the owner dies, its leases lapse within ``lease_seconds``; the next speaker to reconnect
  anywhere claims the space there, and its recording continues in the shared media store after
  a discontinuity.
- Without Redis (the embedded default) every space is this node's: ``LocalPlacement``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

import httpx

logger = logging.getLogger(__name__)

# Renew the lease only if this node still holds it (another node may have taken it over).
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Placement(Protocol):
    me: str

    async def claim(self, space_id: str) -> str:
        """The space's owner, claiming it for this node if nobody holds it."""
        ...

    async def owner(self, space_id: str) -> str | None:
        """The space's owner, or None if nobody holds it (answered from a short cache)."""
        ...

    async def renew(self, space_ids: list[str]) -> list[str]:
        """Extend this node's leases; returns the spaces whose lease was lost."""
        ...

    async def release(self, space_id: str) -> None: ...

    async def close(self) -> None: ...


class LocalPlacement:
    """One node: every space is ours."""

    def __init__(self, me: str) -> None:
        self.me = me

    async def claim(self, space_id: str) -> str:
        return self.me

    async def owner(self, space_id: str) -> str | None:
        return self.me

    async def renew(self, space_ids: list[str]) -> list[str]:
        return []

    async def release(self, space_id: str) -> None:
        return None

    async def close(self) -> None:
        return None


class RedisPlacement:
    def __init__(
        self,
        url: str,
        me: str,
        *,
        prefix: str = "townhall",
        lease_seconds: float = 10.0,
        cache_seconds: float = 1.0,
    ) -> None:
        import redis.asyncio as redis

        self.me = me
        self.prefix = prefix
        self.lease_ms = int(lease_seconds * 1000)
        self.cache_seconds = cache_seconds
        self._redis: Any = redis.from_url(
            url, socket_timeout=2, socket_connect_timeout=2, decode_responses=True
        )
        self._cache: dict[str, tuple[float, str | None]] = {}
        self._http: httpx.AsyncClient | None = None

    def http(self) -> httpx.AsyncClient:
        """The client this node relays listeners' requests to owners with."""
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(15.0, connect=2.0))
        return self._http

    def _key(self, space_id: str) -> str:
        return f"{self.prefix}:space:{space_id}:node"

    async def claim(self, space_id: str) -> str:
        key = self._key(space_id)
        if await self._redis.set(key, self.me, nx=True, px=self.lease_ms):
            owner: str = self.me
            logger.info("space claimed", extra={"space": space_id, "node": self.me})
        else:
            current = await self._redis.get(key)
            if current is None:  # expired between the two calls: try once more
                return await self.claim(space_id)
            owner = str(current)
        self._cache[space_id] = (time.monotonic() + self.cache_seconds, owner)
        return owner

    async def owner(self, space_id: str) -> str | None:
        cached = self._cache.get(space_id)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        value = await self._redis.get(self._key(space_id))
        owner = None if value is None else str(value)
        self._cache[space_id] = (time.monotonic() + self.cache_seconds, owner)
        return owner

    async def renew(self, space_ids: list[str]) -> list[str]:
        lost = []
        for space_id in space_ids:
            if not await self._redis.eval(_RENEW, 1, self._key(space_id), self.me, self.lease_ms):
                lost.append(space_id)
        return lost

    async def release(self, space_id: str) -> None:
        self._cache.pop(space_id, None)
        await self._redis.eval(_RELEASE, 1, self._key(space_id), self.me)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        await self._redis.aclose()
