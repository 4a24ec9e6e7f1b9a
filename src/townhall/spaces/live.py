"""Live state of spaces on one node: reactions, listener counts and the state document.

Millions of listeners must not each hold a connection for "who is on stage": they fetch a small
JSON document that is built at most once per second per space per node and is cacheable for
one second by any edge, so N listeners cost the origin about one build per second. Participants
on stage get the same document pushed over SSE when it changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

from townhall.events import InProcessEventBus, ReactionsTick, SpaceEnded, SpaceEvent, StageChanged
from townhall.spaces import service
from townhall.spaces.listeners import STANDARD_ERROR, ListenerCounter
from townhall.spaces.reactions import ReactionAggregator, SecondTally
from townhall.stage.mixer import SPEAKING_DBFS
from townhall.storage.database import Database
from townhall.storage.models import Account

logger = logging.getLogger(__name__)


def _level(db: float) -> float:
    """dBFS to a 0-1 meter value: -60 dBFS and below is 0, full scale is 1."""
    return round(min(1.0, max(0.0, (db + 60.0) / 60.0)), 3)


class StateDocument:
    __slots__ = ("body", "built_at", "etag")

    def __init__(self, body: bytes, built_at: float) -> None:
        self.body = body
        self.built_at = built_at
        self.etag = '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


class LiveHub:
    def __init__(
        self,
        database: Database,
        bus: InProcessEventBus,
        clock: Callable[[], float],
        *,
        state_ttl: float = 1.0,
        listener_window: float = 60.0,
        levels: Callable[[str], dict[str, float]] | None = None,
    ) -> None:
        # Speaker levels (dBFS by "a<account id>") from the stage, when it runs on this node.
        self.levels = levels
        self.database = database
        self.bus = bus
        self.clock = clock
        self.state_ttl = state_ttl
        self.listener_window = listener_window
        self._reactions: dict[str, ReactionAggregator] = {}
        self._listeners: dict[str, ListenerCounter] = {}
        self._docs: dict[str, StateDocument] = {}
        self._building: dict[str, asyncio.Future[StateDocument]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.builds = 0

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._tick()), asyncio.create_task(self._follow_bus())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- inputs --------------------------------------------------------------------------------

    async def react(self, space_id: str, emoji: str) -> None:
        agg = self._reactions.setdefault(space_id, ReactionAggregator())
        for tally in agg.add(emoji, self.clock()):
            await self._publish_tally(space_id, tally)

    def listener_seen(self, space_id: str, listener: str) -> None:
        counter = self._listeners.get(space_id)
        if counter is None:
            counter = self._listeners[space_id] = ListenerCounter(self.listener_window)
        counter.seen(listener, self.clock())

    def listener_count(self, space_id: str) -> tuple[int, bool]:
        counter = self._listeners.get(space_id)
        return counter.count(self.clock()) if counter else (0, True)

    # -- the state document -------------------------------------------------------------------

    async def document(self, space_id: str) -> StateDocument:
        """The space's state, rebuilt at most once per ``state_ttl``. Requests that arrive while
        a build runs await that same build (one future per space), so a burst costs one build
        and every waiter is released together when it lands."""
        doc = self._docs.get(space_id)
        if doc is not None and self.clock() - doc.built_at < self.state_ttl:
            return doc
        pending = self._building.get(space_id)
        if pending is None:
            pending = asyncio.ensure_future(self._rebuild(space_id))
            self._building[space_id] = pending
            pending.add_done_callback(lambda _: self._building.pop(space_id, None))
        return await asyncio.shield(pending)

    async def _rebuild(self, space_id: str) -> StateDocument:
        state = await self.build(space_id)
        body = json.dumps(state, separators=(",", ":"), ensure_ascii=False).encode()
        doc = StateDocument(body, self.clock())
        self._docs[space_id] = doc
        self.builds += 1
        return doc

    async def build(self, space_id: str) -> dict[str, Any]:
        async with self.database.session() as db:
            space = await service.get_space(db, space_id)
            host = await db.get(Account, space.host_id)
            stage = await service.stage_rows(db, space.id)
            requests = await service.request_count(db, space.id)
            reminders = len(await service.reminders_of(db, space)) if space.state == "scheduled" else 0
        count, exact = self.listener_count(space.id)
        levels = self.levels(space.id) if self.levels else {}
        agg = self._reactions.get(space.id)
        last = agg.last if agg else None
        return {
            "id": space.id,
            "title": space.title,
            "state": space.state,
            "host": host.handle if host else None,
            "scheduled_for": space.scheduled_for,
            "started_at": space.started_at,
            "ended_at": space.ended_at,
            "recorded": space.recorded,
            "stage": [
                {
                    "handle": handle,
                    "role": m.role,
                    "muted": m.muted,
                    "hand_raised": m.hand_raised,
                    "speaking": not m.muted and levels.get(f"a{m.account_id}", -120.0) > SPEAKING_DBFS,
                    "level": _level(levels.get(f"a{m.account_id}", -120.0)),
                }
                for m, handle in stage
            ],
            "cohosts": [handle for m, handle in stage if m.role == "cohost"],
            "hands_raised": requests + sum(1 for m, _ in stage if m.hand_raised),
            "reminders": reminders,
            "listeners": {
                "count": count,
                "exact": exact,
                "relative_error": 0.0 if exact else round(STANDARD_ERROR, 4),
            },
            "reactions": {
                "second": last.second if last else None,
                "counts": dict(last.counts) if last else {},
                "totals": dict(agg.totals) if agg else {},
            },
        }

    def invalidate(self, space_id: str) -> None:
        self._docs.pop(space_id, None)

    # -- background ----------------------------------------------------------------------------

    async def _publish_tally(self, space_id: str, tally: SecondTally) -> None:
        await self.bus.publish(ReactionsTick(space_id, tally.second, tally.counts))

    async def _tick(self) -> None:
        """Once a second: close every space's reaction second into one message."""
        while True:
            await asyncio.sleep(1.0 - (self.clock() % 1.0) + 0.005)
            now = self.clock()
            for space_id, agg in list(self._reactions.items()):
                for tally in agg.flush(now):
                    await self._publish_tally(space_id, tally)

    async def _follow_bus(self) -> None:
        async with self.bus.listening() as queue:
            while True:
                event: SpaceEvent = await queue.get()
                if isinstance(event, StageChanged | SpaceEnded):
                    self.invalidate(event.space_id)
