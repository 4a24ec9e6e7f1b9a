"""Events between layers, and the bus that carries them.

Frozen dataclasses, not dicts: ``SpaceStarted``, ``StageChanged``, ``SpeakerRevoked`` ... The
``EventBus`` is a small interface with an in-process default (the embedded mode); the
scale-out issue puts Redis pub/sub behind the same interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Protocol

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SpaceEvent:
    space_id: str


@dataclasses.dataclass(frozen=True)
class SpaceStarted(SpaceEvent):
    pass


@dataclasses.dataclass(frozen=True)
class SpaceEnded(SpaceEvent):
    pass


@dataclasses.dataclass(frozen=True)
class StageChanged(SpaceEvent):
    """Who is on stage, co-hosts, hands or mutes changed: re-read the live state."""


@dataclasses.dataclass(frozen=True)
class SpeakerGranted(SpaceEvent):
    account_id: int
    grant_id: str


@dataclasses.dataclass(frozen=True)
class SpeakerRevoked(SpaceEvent):
    """A grant is void: a media node must drop that speaker's media at once."""

    account_id: int
    grant_id: str


@dataclasses.dataclass(frozen=True)
class SpeakerMuted(SpaceEvent):
    account_id: int
    muted: bool


@dataclasses.dataclass(frozen=True)
class ReactionsTick(SpaceEvent):
    """Reaction counts of one whole second, aggregated: one message per space per second."""

    second: int
    counts: tuple[tuple[str, int], ...]


class EventBus(Protocol):
    async def publish(self, event: SpaceEvent) -> None: ...

    def subscribe(self, space_id: str | None = None) -> asyncio.Queue[SpaceEvent]: ...

    def unsubscribe(self, queue: asyncio.Queue[SpaceEvent]) -> None: ...


class InProcessEventBus:
    """Fan-out to local subscribers. Each subscriber has a bounded queue; a subscriber that
    falls behind loses its oldest events (it re-reads state on ``StageChanged`` anyway) rather
    than growing memory or slowing the publisher."""

    def __init__(self, queue_size: int = 256) -> None:
        self._queue_size = queue_size
        self._subs: dict[asyncio.Queue[SpaceEvent], str | None] = {}
        self.dropped = 0

    async def publish(self, event: SpaceEvent) -> None:
        for queue, space in list(self._subs.items()):
            if space is not None and space != event.space_id:
                continue
            if queue.full():
                queue.get_nowait()
                self.dropped += 1
            queue.put_nowait(event)

    def subscribe(self, space_id: str | None = None) -> asyncio.Queue[SpaceEvent]:
        queue: asyncio.Queue[SpaceEvent] = asyncio.Queue(self._queue_size)
        self._subs[queue] = space_id
        return queue

    def unsubscribe(self, queue: asyncio.Queue[SpaceEvent]) -> None:
        self._subs.pop(queue, None)

    @asynccontextmanager
    async def listening(self, space_id: str | None = None) -> AsyncIterator[asyncio.Queue[SpaceEvent]]:
        queue = self.subscribe(space_id)
        try:
            yield queue
        finally:
            self.unsubscribe(queue)


# -- across nodes ---------------------------------------------------------------------------------

EVENT_TYPES: dict[str, type[SpaceEvent]] = {
    cls.__name__: cls
    for cls in (
        SpaceStarted,
        SpaceEnded,
        StageChanged,
        SpeakerGranted,
        SpeakerRevoked,
        SpeakerMuted,
        ReactionsTick,
    )
}


def encode_event(event: SpaceEvent, origin: str) -> str:
    """An event as one JSON message, naming the node it came from."""
    return json.dumps(
        {"type": type(event).__name__, "from": origin, "fields": dataclasses.asdict(event)},
        separators=(",", ":"),
    )


def decode_event(raw: str | bytes) -> tuple[SpaceEvent, str]:
    """(event, origin node) from :func:`encode_event`'s output; ``ValueError`` otherwise."""
    try:
        message = json.loads(raw)
        cls = EVENT_TYPES[message["type"]]
        fields = dict(message["fields"])
        if cls is ReactionsTick:
            fields["counts"] = tuple((str(e), int(n)) for e, n in fields["counts"])
        return cls(**fields), str(message["from"])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a townhall event: {exc}") from exc


class RedisEventBus(InProcessEventBus):
    """Local fan-out, plus Redis pub/sub between nodes (the scale-out mode).

    ``publish`` delivers to this node's subscribers at once (the node already applied the
    event's effects before publishing) and sends it on the channel; a reader task delivers the
    other nodes' events to local subscribers and hands each one to ``on_remote`` so that this
    node applies it (a revoked grant, a mute, an end). If Redis is down, local delivery goes
    on, publishing logs and drops, and the reader reconnects with backoff: live spaces keep
    playing and nothing waits on Redis.
    """

    def __init__(
        self,
        url: str,
        node_id: str,
        on_remote: Callable[[SpaceEvent], Awaitable[None]] | None = None,
        channel: str = "townhall:events",
        queue_size: int = 256,
    ) -> None:
        super().__init__(queue_size)
        import redis.asyncio as redis

        self.node_id = node_id
        self.channel = channel
        self.on_remote = on_remote
        self.connected = False
        self.publish_failures = 0
        self._redis = redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._read(), name="redis-event-bus")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._redis.aclose()

    async def ping(self, within: float) -> bool:
        """Whether Redis answers within ``within`` seconds."""
        try:
            async with asyncio.timeout(within):
                return bool(await self._redis.ping())
        except Exception:
            return False

    async def publish(self, event: SpaceEvent) -> None:
        await super().publish(event)
        try:
            await self._redis.publish(self.channel, encode_event(event, self.node_id))
        except Exception as exc:  # Redis down: this node goes on; other nodes catch up on re-read
            self.publish_failures += 1
            logger.warning("event not shared with other nodes: %s", exc, extra={"space": event.space_id})

    async def _read(self) -> None:
        backoff = 0.2
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    self.connected, backoff = True, 0.2
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            await self._deliver(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.connected:
                    logger.warning("event bus lost Redis: %s; reconnecting", exc)
                self.connected = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _deliver(self, raw: str | bytes) -> None:
        try:
            event, origin = decode_event(raw)
        except ValueError:
            logger.warning("ignored a malformed message on the event channel")
            return
        if origin == self.node_id:
            return  # delivered locally when it was published
        if self.on_remote is not None:
            try:
                await self.on_remote(event)
            except Exception:
                logger.exception("applying another node's event failed", extra={"space": event.space_id})
        await super().publish(event)
