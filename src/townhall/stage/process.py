"""The node's side of its stage process: start it, keep it running, talk to it.

``StageProcess`` is what the HTTP routes and the node use: open a WHIP or WHEP session, drop
one, mute, revoke, start or end a space. Each call is a request over the channel and returns
once the stage process has applied it (a mute is in the mixer before the API answers). What the
stage pushes back lands here: encoded parts go to the origin, levels and statistics are kept
for the live state document and ``/metrics``, and a mirror of the open sessions answers
"whose session is this" without a round trip.

Supervision: if the stage process dies, the node starts a new one within a second, restarts
the stage of every live space (listeners see a discontinuity in the playlist, not an end) and
the speakers' WHIP clients reconnect. Nothing is shared but the socket pair, so nothing the HTTP
side does can stall a mixer tick, and a crash of the media code cannot take the API down.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from townhall.audience.origin import Origin
from townhall.audience.packager import PartReady
from townhall.stage.channel import Channel, ChannelClosed, Message, StageError

if TYPE_CHECKING:
    from townhall.stage.pool import StagePool

logger = logging.getLogger(__name__)

RESTART_DELAY = 0.5
READY_TIMEOUT = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def speaker_key(account_id: int) -> str:
    """How the stage names a speaker (mixer inputs, mix-minus outputs, levels)."""
    return f"a{account_id}"


@dataclasses.dataclass(frozen=True)
class StageSettings:
    media_root: str
    ice_servers: list[str]
    media_addresses: list[str]
    part_target: float
    bitrate: int
    log_level: str = "info"
    realtime: bool = True


@dataclasses.dataclass(frozen=True)
class Session:
    """A WHIP or WHEP session as the node knows it."""

    space_id: str
    kind: str  # "whip" or "whep"
    speaker: str  # "a<account id>", or "*" for a host's program monitor
    grant_id: str


class StageProcess:
    """One stage process, supervised. A node runs several (``stage/pool.py``, ``StagePool``,
    places each space on one); ``index`` names this one in logs and ``/metrics``."""

    def __init__(self, origin: Origin, settings: StageSettings, index: int = 0) -> None:
        self.origin = origin
        self.settings = settings
        self.index = index
        self.sessions: dict[str, Session] = {}
        self.levels_by_space: dict[str, dict[str, float]] = {}
        self.stats: dict[str, Any] = {"at": 0.0, "rooms": {}}
        self.pid: int | None = None
        self.restarts = 0
        self._live: set[str] = set()
        self._whip_opened: dict[tuple[str, str], float] = {}
        self._channel: Channel | None = None
        self._ready = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._task is not None

    async def start(self) -> None:
        """Start the stage process now (a server does, at start-up). Otherwise it starts on
        first need: an admin command or a node that never hosts a space never spawns one."""
        if self._task is None and not self._stopping:
            self._task = asyncio.create_task(self._supervise(), name=f"stage-process-{self.index}")

    async def stop(self) -> None:
        """Close the channel: the stage process closes its rooms, flushes its packagers and
        exits; it is killed if it has not within 10 s. The origin is the pool's, closed by it."""
        self._stopping = True
        if self._channel is not None:
            await self._channel.close()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _supervise(self) -> None:
        while not self._stopping:
            try:
                await self._run_once()
            except ChannelClosed:
                pass  # it died before it was configured: restarted below
            except Exception:
                logger.exception("stage process failed to start")
            if self._stopping:
                break
            self.restarts += 1
            logger.error(
                "stage process exited; restarting",
                extra={"stage_process": self.index, "restarts": self.restarts},
            )
            await asyncio.sleep(RESTART_DELAY)

    async def _run_once(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            self._proc = subprocess.Popen(  # noqa: S603, ASYNC220 - our own module; fork+exec is quick
                [
                    sys.executable,
                    "-m",
                    "townhall.stage.worker",
                    str(theirs.fileno()),
                    "--log-level",
                    self.settings.log_level,
                    *(["--realtime"] if self.settings.realtime else []),
                ],
                pass_fds=[theirs.fileno()],
            )
        finally:
            theirs.close()
        self.pid = self._proc.pid
        reader, writer = await asyncio.open_connection(sock=ours)
        channel = self._channel = Channel(reader, writer, self._on_notification)
        running = asyncio.create_task(channel.run())
        try:
            s = self.settings
            await channel.request(
                "configure",
                wait=READY_TIMEOUT,
                media_root=s.media_root,
                ice_servers=s.ice_servers,
                media_addresses=s.media_addresses,
                part_target=s.part_target,
                bitrate=s.bitrate,
            )
            if self.restarts:  # a new process after one died: every live space again
                for space_id in sorted(self._live):
                    self.origin.attach(space_id).restart()
                    await channel.request("start", space=space_id)
            self._ready.set()
            logger.info("stage process ready", extra={"stage_process": self.index, "pid": self.pid})
            await running
        finally:
            self._ready.clear()
            self._channel = None
            self.sessions.clear()
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
            await channel.close()
            await self._reap()

    async def _reap(self) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            logger.error("stage process did not exit; killing it", extra={"pid": proc.pid})
            proc.kill()
            await asyncio.to_thread(proc.wait)

    async def _request(self, op: str, **fields: Any) -> Message:
        await self.start()
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await self._ready.wait()
            assert self._channel is not None
            return await self._channel.request(op, **fields)
        except (ChannelClosed, TimeoutError) as exc:
            raise StageError(503, "stage_unavailable", "the stage is restarting; try again") from exc

    # -- what the stage pushes -----------------------------------------------------------------

    async def _on_notification(self, message: Message, payload: bytes) -> None:
        op = message["op"]
        if op == "part":
            part = PartReady(message["space"], payload, float(message["duration"]), float(message["start"]))
            self.origin.attach(part.space_id).add_part(part, seq=int(message["seq"]))
        elif op == "init":
            self.origin.attach(message["space"]).set_init(payload)
        elif op == "levels":
            self.levels_by_space = message["levels"]
        elif op == "stats":
            self.stats = {"at": message["at"], "rooms": message["rooms"]}
            now_open = {
                peer_id: Session(space_id, kind, speaker, grant)
                for space_id, room in message["rooms"].items()
                for peer_id, (kind, speaker, grant) in room["peers"].items()
            }
            self.sessions.clear()  # in place: the mirror is one long-lived dict
            self.sessions.update(now_open)
        elif op == "peer_closed":
            self.sessions.pop(message["peer"], None)

    # -- what the node asks --------------------------------------------------------------------

    def speaker_seen_since(self, space_id: str, speaker: str, since: float) -> bool:
        """Whether ``speaker`` opened a WHIP session in the space at or after ``since``."""
        return self._whip_opened.get((space_id, speaker), 0.0) >= since

    def live_spaces(self) -> list[str]:
        """The spaces whose stage runs here."""
        return sorted(self._live)

    def hosts(self, space_id: str) -> bool:
        """Whether this node runs the space's stage."""
        return space_id in self._live

    def levels(self, space_id: str) -> dict[str, float]:
        return dict(self.levels_by_space.get(space_id, {}))

    async def start_space(self, space_id: str) -> None:
        """Listeners hear the room from the first second, speakers or not."""
        self._live.add(space_id)
        self.origin.attach(space_id)
        await self._request("start", space=space_id)

    async def end_space(self, space_id: str) -> None:
        """Close the room; returns once its last part has been encoded and handed on."""
        self._live.discard(space_id)
        if not self.running:
            self.origin.detach(space_id)
            return
        try:
            await self._request("end", space=space_id)
        finally:
            self.origin.detach(space_id)
            for peer_id in [p for p, s in self.sessions.items() if s.space_id == space_id]:
                self.sessions.pop(peer_id, None)

    async def open_whip(
        self, space_id: str, speaker: str, grant_id: str, muted: bool, sdp: str
    ) -> tuple[str, str]:
        self._live.add(space_id)
        r = await self._request("whip", space=space_id, speaker=speaker, grant=grant_id, muted=muted, sdp=sdp)
        self.sessions[r["peer"]] = Session(space_id, "whip", speaker, grant_id)
        self._whip_opened[(space_id, speaker)] = time.time()
        return str(r["peer"]), str(r["answer"])

    async def open_whep(self, space_id: str, who: str, grant_id: str, sdp: str) -> tuple[str, str]:
        self._live.add(space_id)
        r = await self._request("whep", space=space_id, who=who, grant=grant_id, sdp=sdp)
        self.sessions[r["peer"]] = Session(space_id, "whep", who, grant_id)
        return str(r["peer"]), str(r["answer"])

    async def drop(self, space_id: str, peer_id: str) -> bool:
        self.sessions.pop(peer_id, None)
        if not self.running:
            return False
        r = await self._request("drop", space=space_id, peer=peer_id)
        return bool(r["found"])

    async def mute(self, space_id: str, speaker: str, muted: bool) -> None:
        if not self.running:
            return  # no stage, no speakers: a speaker who connects later is muted from the database
        await self._request("mute", space=space_id, speaker=speaker, muted=muted)

    async def revoke(self, grant_id: str) -> None:
        for peer_id in [p for p, s in self.sessions.items() if s.grant_id == grant_id]:
            self.sessions.pop(peer_id, None)
        if self.running:
            await self._request("revoke", grant=grant_id)

    async def fresh_stats(self) -> dict[str, Any]:
        """Statistics read now rather than from the last push (tests and benchmarks)."""
        if not self.running:
            return {"at": 0.0, "rooms": {}}
        return await self._request("stats")


class StageCollector:
    """Prometheus view of the node's stage processes: rooms, sessions and 20 ms tick lateness.

    Per room figures are merged across processes the way they were across rooms (a room lives
    in one process): rooms, peers, ticks and late ticks are sums, the lateness quantiles are
    the worst room's. CPU is the sum over the running processes, and per process by index."""

    def __init__(self, stage: StagePool) -> None:
        self.stage = stage

    def collect(self) -> Iterator[Metric]:
        rooms_now: dict[str, Any] = self.stage.stats.get("rooms", {})
        rooms = GaugeMetricFamily("townhall_stage_rooms", "spaces with a running stage on this node")
        rooms.add_metric([], len(rooms_now))
        yield rooms
        peers = GaugeMetricFamily("townhall_stage_peers", "WebRTC sessions by kind", labels=["kind"])
        for kind in ("whip", "whep"):
            peers.add_metric([kind], sum(1 for s in self.stage.sessions.values() if s.kind == kind))
        yield peers
        late = GaugeMetricFamily(
            "townhall_stage_tick_lateness_seconds",
            "lateness of the mixer's 20 ms ticks over the last 10 minutes, by quantile (worst room)",
            labels=["quantile"],
        )
        for q in ("0.5", "0.99", "1.0"):
            late.add_metric([q], max((r["lateness"][q] for r in rooms_now.values()), default=0.0))
        yield late
        ticks = CounterMetricFamily("townhall_stage_ticks", "mixer ticks run")
        ticks.add_metric([], sum(int(r["ticks"]) for r in rooms_now.values()))
        yield ticks
        restarts = CounterMetricFamily(
            "townhall_stage_restarts", "times a stage process was restarted (all processes)"
        )
        restarts.add_metric([], self.stage.restarts)
        yield restarts
        late_ticks = GaugeMetricFamily(
            "townhall_stage_late_ticks",
            "ticks of the live rooms later than over_seconds past their deadline, since each room started",
            labels=["over_seconds"],
        )
        for over in ("0.005", "0.01", "0.02"):
            late_ticks.add_metric(
                [over], sum(int(r.get("late_ticks", {}).get(over, 0)) for r in rooms_now.values())
            )
        yield late_ticks
        processes = GaugeMetricFamily(
            "townhall_stage_processes", "stage processes running (at most stage_processes)"
        )
        processes.add_metric([], sum(1 for p in self.stage.processes if p.running))
        yield processes
        demoted = GaugeMetricFamily(
            "townhall_stage_processes_demoted",
            "stage processes moved out of SCHED_RR to leave the HTTP side CPU (stage/pool.py)",
        )
        demoted.add_metric([], len(self.stage.demoted))
        yield demoted
        spaces = GaugeMetricFamily(
            "townhall_stage_process_spaces", "spaces placed on each stage process", labels=["process"]
        )
        for index, load in enumerate(self.stage.loads()):
            spaces.add_metric([str(index)], load.spaces)
        yield spaces
        each = {p.index: process_cpu_seconds(p.pid) for p in self.stage.processes if p.running}
        if any(s is not None for s in each.values()):
            cpu = CounterMetricFamily(
                "townhall_stage_process_cpu_seconds",
                "user + system CPU time of the running stage processes, summed (each restarts at 0 with "
                "its process)",
            )
            cpu.add_metric([], sum(s for s in each.values() if s is not None))
            yield cpu
            by_process = CounterMetricFamily(
                "townhall_stage_worker_cpu_seconds",
                "user + system CPU time of each running stage process",
                labels=["process"],
            )
            for index, seconds in each.items():
                if seconds is not None:
                    by_process.add_metric([str(index)], seconds)
            yield by_process


def process_cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process from ``/proc/<pid>/stat`` (Linux), read when scraped: the
    stage's own CPU, apart from the HTTP process's ``process_cpu_seconds_total``."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command: state ppid pgrp session ... utime (14th field) stime (15th).
    return (int(fields[11]) + int(fields[12])) / CLK_TCK
