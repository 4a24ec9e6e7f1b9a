"""Events between layers, and the bus that carries them.

Frozen dataclasses, not dicts: ``SpaceStarted``, ``StageChanged``, ``SpeakerRevoked`` ... The
``EventBus`` is a small interface with an in-process default (the embedded mode); the
scale-out issue puts Redis pub/sub behind the same interface.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
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
