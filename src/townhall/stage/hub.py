"""The stages of all spaces on this node, and how control-plane events reach them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator

import numpy as np
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from townhall.audience.origin import Origin
from townhall.events import InProcessEventBus, SpaceEnded, SpaceStarted, SpeakerMuted, SpeakerRevoked
from townhall.stage.room import Room

logger = logging.getLogger(__name__)


def speaker_key(account_id: int) -> str:
    return f"a{account_id}"


class StageHub:
    def __init__(self, bus: InProcessEventBus, ice_servers: list[str], origin: Origin) -> None:
        self.bus = bus
        self.origin = origin
        self.rooms: dict[str, Room] = {}
        self._ice = [RTCIceServer(urls=u) for u in ice_servers]
        self._task: asyncio.Task[None] | None = None

    def new_peer_connection(self) -> RTCPeerConnection:
        return RTCPeerConnection(RTCConfiguration(iceServers=self._ice))

    def room(self, space_id: str) -> Room:
        room = self.rooms.get(space_id)
        if room is None:
            room = self.rooms[space_id] = Room(space_id)
            packager = self.origin.attach(space_id)
            room.program_sinks.append(lambda out: packager.feed(out.program, time.time()))
            room.ensure_running()
        return room

    def levels(self, space_id: str) -> dict[str, float]:
        room = self.rooms.get(space_id)
        return dict(room.levels) if room else {}

    async def start(self) -> None:
        self._task = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for room in list(self.rooms.values()):
            await room.close()
        self.rooms.clear()
        await self.origin.close()

    async def _follow(self) -> None:
        async with self.bus.listening() as queue:
            while True:
                event = await queue.get()
                if isinstance(event, SpaceStarted):
                    self.room(event.space_id)  # listeners hear the room from the first second
                    continue
                room = self.rooms.get(event.space_id)
                if room is None:
                    continue
                if isinstance(event, SpeakerMuted):
                    room.set_muted(speaker_key(event.account_id), event.muted)
                elif isinstance(event, SpeakerRevoked):
                    await room.drop_grant(event.grant_id)
                elif isinstance(event, SpaceEnded):
                    await room.close()
                    self.rooms.pop(event.space_id, None)
                    await self.origin.detach(event.space_id)


class StageCollector:
    """Prometheus view of the stage: speakers, peers and 20 ms tick lateness per room."""

    def __init__(self, hub: StageHub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        rooms = GaugeMetricFamily("townhall_stage_rooms", "spaces with a running stage on this node")
        rooms.add_metric([], len(self.hub.rooms))
        yield rooms
        peers = GaugeMetricFamily("townhall_stage_peers", "WebRTC sessions by kind", labels=["kind"])
        for kind in ("whip", "whep"):
            peers.add_metric(
                [kind], sum(1 for r in self.hub.rooms.values() for p in r.peers.values() if p.kind == kind)
            )
        yield peers
        late = GaugeMetricFamily(
            "townhall_stage_tick_lateness_seconds",
            "lateness of the mixer's 20 ms ticks over the last 10 minutes, by quantile (all rooms)",
            labels=["quantile"],
        )
        samples = [x for r in self.hub.rooms.values() for x in r.lateness]
        for q in (0.5, 0.99, 1.0):
            late.add_metric([str(q)], float(np.quantile(samples, q)) if samples else 0.0)
        yield late
        ticks = CounterMetricFamily("townhall_stage_ticks", "mixer ticks run")
        ticks.add_metric([], sum(r.mixer.ticks for r in self.hub.rooms.values()))
        yield ticks
