"""Several stage processes on one node, each space placed on one of them.

Theory of operation
-------------------
A stage process is one event loop: it mixes every space it holds on one core and no more
(BENCHMARKS.md, "Stage": full past ~7 three-speaker spaces, whatever the machine has). A node
therefore runs up to ``stage_processes`` of them (default: one per CPU) and places each space
on one when its stage starts:

- **Least loaded.** A process's load is ``SPACE_COST`` per space plus one per live speaker
  (WHIP session): the measured cost of a space is ~0.06 core with nobody on stage and ~0.03
  more per speaker with their mix-minus return, so an empty room counts as two speakers. The
  space goes to the process with the least load; ties go to the lowest index.
- **Lazily.** A process that is not running yet is a candidate with load 0, after every
  running one: a node with one space (the embedded demo) runs one stage process, a second
  process starts only when every running one already holds something.
- **Sticky.** A space stays on its process for its whole life (until it ends): every WHIP,
  WHEP, drop, mute and the host's program monitor of that space go there, and a restart of
  that process restarts the space there. Nothing moves a running space: its peers' DTLS and
  ICE state live in that process.

Each process is supervised on its own (``StageProcess``): when one dies, only its spaces are
restarted and only its speakers reconnect; the others' mixers never notice.

Real-time scheduling: every stage process asks for ``SCHED_RR`` (``stage_realtime``). One such
process can take at most one core, so on a 2-core machine the HTTP process always kept the
other; two can take both, and the kernel then leaves ordinary processes 5 % of each CPU. The
pool's guard (``realtime_demotions``) keeps the real-time processes together under the CPUs
less ``RT_RESERVE``: past that the busiest is moved to ``nice`` until it fits again. Under the
no-late-tick load the stage uses far less than that (BENCHMARKS.md, "Stage processes per
core"), so the guard only acts when a node holds more spaces than it can mix on time anyway.
Moving a process back into ``SCHED_RR`` restores each thread's own priority, not one for all:
the event loop at ``REALTIME_PRIORITY`` and its worker threads (Opus encoder, packager) one
below it (``stage/threads.py``), so that the loop's 20 ms timer still preempts them.

``Placement`` is the pure core (no asyncio, no processes), unit-tested alone; ``StagePool``
is the node-facing object with ``StageProcess``'s shape, so routes and the node do not care
how many processes there are.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from townhall.audience.origin import Origin
from townhall.stage.process import Session, StageProcess, StageSettings, process_cpu_seconds
from townhall.stage.threads import NICE, REALTIME_PRIORITY, worker_priority

logger = logging.getLogger(__name__)

SPACE_COST = 2  # a room with nobody on stage costs about what two speakers add (see above)
RT_RESERVE = 0.5  # cores the real-time stage processes leave to the HTTP side (realtime_demotions)
GUARD_EVERY = 1.0  # seconds between two looks at the stage processes' CPU


@dataclasses.dataclass(frozen=True)
class Load:
    """What one stage process holds now."""

    spaces: int
    speakers: int

    @property
    def cost(self) -> int:
        return SPACE_COST * self.spaces + self.speakers


def realtime_demotions(cores: Sequence[float], demoted: set[int], budget: float) -> set[int]:
    """Which stage processes run outside ``SCHED_RR`` next (indices), from what each used over
    the last second (``cores``, by index) and which run outside it now.

    Real-time processes preempt the HTTP process whenever they are runnable; the kernel leaves
    ordinary processes only 5 % of each CPU's second. One real-time stage process on a
    2-core machine can take at most one core; two can take both. So the real-time ones may use
    ``budget`` cores together (the CPUs less a reserve for the HTTP side): above it the busiest
    real-time process is demoted (to ``nice``, where it competes fairly), one per second; a
    demoted one returns when it fits again with a fifth of the budget to spare (hysteresis)."""
    demoted = {i for i in demoted if i < len(cores)}
    realtime = [i for i in range(len(cores)) if i not in demoted]
    used = sum(cores[i] for i in realtime)
    if used > budget and len(realtime) > 1:
        return demoted | {max(realtime, key=lambda i: (cores[i], -i))}
    if demoted:
        lightest = min(demoted, key=lambda i: (cores[i], i))
        if used + cores[lightest] <= 0.8 * budget:
            return demoted - {lightest}
    return demoted


def default_stage_processes() -> int:
    """One stage process per CPU the node may run on (each mixes on one core at most)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def least_loaded(loads: Sequence[Load], limit: int) -> int:
    """The index of the process a new space goes to: ``loads`` are the running processes'
    (indices 0..len-1); while fewer than ``limit`` run, index ``len(loads)`` (a process to
    start) is a candidate with no load, after every running one that costs as little."""
    candidates = list(loads)
    if len(candidates) < limit:
        candidates.append(Load(0, 0))
    if not candidates:
        raise ValueError("no stage process to place a space on (limit 0)")
    return min(range(len(candidates)), key=lambda i: (candidates[i].cost, i))


class Placement:
    """Which stage process holds which space: chosen once, kept until the space ends."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"stage processes must be at least 1, not {limit}")
        self.limit = limit
        self.where: dict[str, int] = {}

    def place(self, space_id: str, loads: Sequence[Load]) -> int:
        """The space's process: where it already is, else the least loaded (``least_loaded``)."""
        index = self.where.get(space_id)
        if index is None:
            index = self.where[space_id] = least_loaded(loads, self.limit)
        return index

    def forget(self, space_id: str) -> None:
        """The space ended: its next life may be placed anywhere."""
        self.where.pop(space_id, None)


def merged_stats(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Stage processes' statistics as one: ``rooms`` merged, ``at`` the oldest report (every
    room in it is at least that fresh)."""
    rooms: dict[str, Any] = {}
    for report in reports:
        rooms.update(report.get("rooms", {}))
    return {"at": min((float(r["at"]) for r in reports), default=0.0), "rooms": rooms}


class StagePool:
    """The node's stage processes, with the shape of one ``StageProcess`` (see the module)."""

    def __init__(self, origin: Origin, settings: StageSettings, processes: int) -> None:
        self.origin = origin
        self.settings = settings
        self.placement = Placement(processes)
        self.processes: list[StageProcess] = []
        # The node's mirror of every process's open sessions, one view over their dicts (each
        # process updates its own in place).
        self.sessions: collections.ChainMap[str, Session] = collections.ChainMap()
        self.demoted: set[int] = set()  # processes the guard moved out of SCHED_RR (by index)
        # Each demoted process's pid and its threads' scheduling before (restored on the way back).
        self._before: dict[int, tuple[int | None, dict[int, Scheduling]]] = {}
        self.budget = max(RT_RESERVE, default_stage_processes() - RT_RESERVE)
        self._guard_task: asyncio.Task[None] | None = None

    @property
    def limit(self) -> int:
        return self.placement.limit

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return any(p.running for p in self.processes)

    async def start(self) -> None:
        """Start the first stage process now (a server does, at start-up); the others start
        when a space is placed on them."""
        await self._process(0).start()

    async def stop(self) -> None:
        if self._guard_task is not None:
            self._guard_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._guard_task
        await asyncio.gather(*(p.stop() for p in self.processes))
        self.origin.close()

    def _process(self, index: int) -> StageProcess:
        while len(self.processes) <= index:
            process = StageProcess(self.origin, self.settings, index=len(self.processes))
            self.processes.append(process)
            self.sessions.maps.append(process.sessions)
        if self._guard_task is None and self.settings.realtime and self.limit > 1:
            self._guard_task = asyncio.create_task(self._guard(), name="stage-realtime-guard")
        return self.processes[index]

    async def _guard(self) -> None:
        """Once a second, ``_look``. A look that fails is logged and the next one runs: the
        guard must not end quietly, leaving a demoted process out of SCHED_RR for good."""
        last: dict[int, tuple[int | None, float, float]] = {}  # index: pid, CPU s, monotonic s
        while True:
            await asyncio.sleep(GUARD_EVERY)
            try:
                self._look(last)
            except Exception:
                logger.exception("stage real-time guard: this look failed, the next one follows")

    def _look(self, last: dict[int, tuple[int | None, float, float]]) -> None:
        """Each stage process's CPU from ``/proc`` since the last look, then ``realtime_demotions``
        applied. A restarted process starts in ``SCHED_RR`` again (it asks for it itself)."""
        now = asyncio.get_running_loop().time()
        cores: list[float] = []
        for p in self.processes:
            seconds, before = process_cpu_seconds(p.pid), last.get(p.index)
            if before is not None and before[0] != p.pid:
                self.demoted.discard(p.index)  # a new process, in SCHED_RR
                self._before.pop(p.index, None)
                before = None
            if seconds is None or before is None:
                cores.append(0.0)
            else:
                cores.append((seconds - before[1]) / max(1e-3, now - before[2]))
            if seconds is not None:
                last[p.index] = (p.pid, seconds, now)
        wanted = realtime_demotions(cores, self.demoted, self.budget)
        for index in sorted(wanted ^ self.demoted):
            realtime = index not in wanted
            pid = self.processes[index].pid
            logger.warning(
                "stage process %s real-time scheduling (stage processes' CPU %s, budget %.2f)",
                "back in" if realtime else "moved out of",
                [round(c, 2) for c in cores],
                self.budget,
                extra={"stage_process": index},
            )
            if realtime:
                recorded_pid, recorded = self._before.pop(index, (None, {}))
                schedule(pid, realtime=True, before=recorded if recorded_pid == pid else None)
            else:
                self._before[index] = (pid, scheduling(pid))
                schedule(pid, realtime=False)
        self.demoted = wanted

    def loads(self) -> list[Load]:
        """Per process (by index): spaces placed on it and live speakers."""
        held = collections.Counter(self.placement.where.values())
        return [
            Load(held[p.index], sum(1 for s in p.sessions.values() if s.kind == "whip"))
            for p in self.processes
        ]

    def _placed(self, space_id: str) -> StageProcess:
        """The space's process, placing the space now if it has none."""
        return self._process(self.placement.place(space_id, self.loads()))

    def _holding(self, space_id: str) -> StageProcess | None:
        """The space's process if it has one (no placement)."""
        index = self.placement.where.get(space_id)
        return None if index is None else self.processes[index]

    # -- reads, merged across processes ----------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The first stage process's pid (``pids`` lists all)."""
        return self.processes[0].pid if self.processes else None

    @property
    def pids(self) -> list[int | None]:
        return [p.pid for p in self.processes]

    @property
    def restarts(self) -> int:
        return sum(p.restarts for p in self.processes)

    def process_of(self, space_id: str) -> int | None:
        """The index of the process that holds the space, if any."""
        return self.placement.where.get(space_id)

    @property
    def levels_by_space(self) -> dict[str, dict[str, float]]:
        merged: dict[str, dict[str, float]] = {}
        for p in self.processes:
            merged.update(p.levels_by_space)
        return merged

    @property
    def stats(self) -> dict[str, Any]:
        """Every process's last statistics: ``rooms`` merged, ``at`` the oldest report among the
        running processes (every room in it is at least that fresh)."""
        return merged_stats([p.stats for p in self.processes if p.running])

    def speaker_seen_since(self, space_id: str, speaker: str, since: float) -> bool:
        return any(p.speaker_seen_since(space_id, speaker, since) for p in self.processes)

    def live_spaces(self) -> list[str]:
        return sorted(s for p in self.processes for s in p.live_spaces())

    def hosts(self, space_id: str) -> bool:
        return any(p.hosts(space_id) for p in self.processes)

    def levels(self, space_id: str) -> dict[str, float]:
        process = self._holding(space_id)
        return process.levels(space_id) if process is not None else {}

    async def fresh_stats(self) -> dict[str, Any]:
        return merged_stats([await p.fresh_stats() for p in self.processes if p.running])

    # -- requests, routed to the space's process ------------------------------------------------

    async def start_space(self, space_id: str) -> None:
        process = self._placed(space_id)
        logger.info("space placed", extra={"space": space_id, "stage_process": process.index})
        await process.start_space(space_id)

    async def end_space(self, space_id: str) -> None:
        process = self._holding(space_id)
        if process is None:
            self.origin.detach(space_id)
            return
        try:
            await process.end_space(space_id)
        finally:
            self.placement.forget(space_id)

    async def open_whip(
        self, space_id: str, speaker: str, grant_id: str, muted: bool, sdp: str
    ) -> tuple[str, str]:
        return await self._placed(space_id).open_whip(space_id, speaker, grant_id, muted, sdp)

    async def open_whep(self, space_id: str, who: str, grant_id: str, sdp: str) -> tuple[str, str]:
        return await self._placed(space_id).open_whep(space_id, who, grant_id, sdp)

    async def drop(self, space_id: str, peer_id: str) -> bool:
        for process in self.processes:
            if peer_id in process.sessions:
                return await process.drop(space_id, peer_id)
        holder = self._holding(space_id)
        return await holder.drop(space_id, peer_id) if holder is not None else False

    async def mute(self, space_id: str, speaker: str, muted: bool) -> None:
        process = self._holding(space_id)
        if process is not None:  # no stage, no speakers: a later speaker is muted from the database
            await process.mute(space_id, speaker, muted)

    async def revoke(self, grant_id: str) -> None:
        """A grant names no space here: every process that runs drops its sessions."""
        await asyncio.gather(*(p.revoke(grant_id) for p in self.processes))


Scheduling = tuple[int, int]  # a thread's policy, and its SCHED_RR priority or its nice value


def scheduling(pid: int | None) -> dict[int, Scheduling]:
    """Each thread of process ``pid`` (by thread id): its policy, and its real-time priority in
    ``SCHED_RR``/``SCHED_FIFO`` or its nice value otherwise. Empty if the process is gone."""
    threads: dict[int, Scheduling] = {}
    for tid in _threads(pid):
        with contextlib.suppress(OSError):
            policy = os.sched_getscheduler(tid)
            if policy in (os.SCHED_RR, os.SCHED_FIFO):
                threads[tid] = (policy, os.sched_getparam(tid).sched_priority)
            else:
                threads[tid] = (policy, os.getpriority(os.PRIO_PROCESS, tid))
    return threads


def schedule(pid: int | None, *, realtime: bool, before: Mapping[int, Scheduling] | None = None) -> bool:
    """Move process ``pid`` out of ``SCHED_RR`` (every thread ordinary at ``NICE``, as the stage
    process sets itself when it may not be real-time) or back into it (``realtime``).

    Back in, each thread gets its own scheduling again: what ``before`` (``scheduling`` taken
    before the demotion) recorded for it; a thread it does not know (started since, or no
    record) is derived: the main thread runs the event loop (``REALTIME_PRIORITY``), any other
    is a worker one priority below it (``worker_priority``), as ``below_the_loop`` would have
    set it had it started in ``SCHED_RR``. False if the process is gone."""
    tids = _threads(pid)
    if not tids:
        return False
    for tid in tids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if not realtime:
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
                os.setpriority(os.PRIO_PROCESS, tid, NICE)
                continue
            policy, value = (before or {}).get(tid) or (
                os.SCHED_RR,
                REALTIME_PRIORITY if tid == pid else worker_priority(REALTIME_PRIORITY),
            )
            if policy in (os.SCHED_RR, os.SCHED_FIFO):
                os.sched_setscheduler(tid, policy, os.sched_param(value))
            else:
                os.sched_setscheduler(tid, policy, os.sched_param(0))
                os.setpriority(os.PRIO_PROCESS, tid, value)
    return True


def _threads(pid: int | None) -> list[int]:
    """The thread ids of process ``pid`` (empty if it is gone)."""
    if pid is None:
        return []
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []
