"""Stage processes per node (``stage/pool.py``): placement as a pure core, then real servers with
two stage processes and real aiortc clients over loopback, checked as audio by spectrum."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.spaces_support import generous_config
from tests.support import Api, RunningServer, running_server
from townhall.stage import pool
from townhall.stage.client import Session, publish, record_timed, subscribe
from townhall.stage.pool import (
    SPACE_COST,
    Load,
    Placement,
    least_loaded,
    realtime_demotions,
    schedule,
    scheduling,
)
from townhall.stage.sources import ToneTrack, tone_power

RATE = 48000
HEARD = 0.10  # as in test_stage_media: each other speaker carries well over a tenth of the power
ABSENT = 0.005  # one's own tone, or another space's: below half a percent
WINDOW = 960  # 20 ms


# -- placement, the pure core ------------------------------------------------------------------------


def test_a_space_goes_to_the_least_loaded_process_counting_spaces_and_speakers() -> None:
    assert Load(1, 0).cost == SPACE_COST and Load(2, 3).cost == 2 * SPACE_COST + 3
    assert least_loaded([Load(2, 6), Load(1, 3)], limit=2) == 1
    assert least_loaded([Load(1, 0), Load(0, 3)], limit=2) == 0  # a room costs two speakers: 2 < 3
    assert least_loaded([Load(1, 3), Load(1, 3)], limit=2) == 0  # ties: the lowest index


def test_processes_start_lazily_only_when_every_running_one_holds_something() -> None:
    assert least_loaded([], limit=2) == 0  # the first space starts the first process
    assert least_loaded([Load(0, 0)], limit=2) == 0  # an idle running process before a new one
    assert least_loaded([Load(1, 0)], limit=2) == 1  # the second starts for the second space
    assert least_loaded([Load(1, 0)], limit=1) == 0  # never past the limit
    assert least_loaded([Load(3, 9), Load(1, 0)], limit=3) == 2
    with pytest.raises(ValueError, match="limit 0"):
        least_loaded([], limit=0)
    with pytest.raises(ValueError, match="at least 1"):
        Placement(0)


def test_placement_is_sticky_for_a_space_s_life() -> None:
    placement = Placement(2)
    assert placement.place("a", []) == 0
    assert placement.place("b", [Load(1, 0)]) == 1
    # However the loads move, a placed space stays where it is ...
    assert placement.place("a", [Load(1, 13), Load(1, 0)]) == 0
    assert placement.place("b", [Load(1, 0), Load(5, 13)]) == 1
    # ... until it ends: then its next life is placed afresh.
    placement.forget("a")
    assert placement.place("a", [Load(0, 0), Load(1, 3)]) == 0
    placement.forget("b")
    assert placement.place("b", [Load(1, 3), Load(0, 0)]) == 1
    assert placement.where == {"a": 0, "b": 1}


# -- two stage processes, real clients ----------------------------------------------------------------


@dataclasses.dataclass
class Space:
    id: str
    host: Api
    tokens: dict[str, str]  # handle -> speaker token
    tones: dict[str, float]  # handle -> tone


def live_space(server: RunningServer, name: str, tones: list[float]) -> Space:
    """A live space hosted by ``<name>0`` with ``<name>1``, ``<name>2`` invited on stage."""
    anon = server.client()
    handles = [f"{name}{i}" for i in range(len(tones))]
    people = [anon.user(h) for h in handles]
    host = people[0]
    space_id = host.post("/api/v1/spaces", json={"title": name}).json()["id"]
    assert host.post(f"/api/v1/spaces/{space_id}/start").status_code == 200
    tokens = {handles[0]: host.post(f"/api/v1/spaces/{space_id}/speaker-token").json()["speaker_token"]}
    for h in handles[1:]:
        r = host.post(f"/api/v1/spaces/{space_id}/speakers", json={"handle": h})
        assert r.status_code == 200, r.text
        tokens[h] = r.json()["speaker_token"]
    return Space(space_id, host, tokens, dict(zip(handles, tones, strict=True)))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    with running_server(generous_config("sqlite", tmp_path / "data", stage_processes=2)) as s:
        yield s


async def on_stage(server: RunningServer, space: Space) -> tuple[list[Session], dict[str, Session]]:
    base = server.url
    pubs = [
        await publish(f"{base}/whip/{space.id}", space.tokens[h], ToneTrack(f))
        for h, f in space.tones.items()
    ]
    subs = {h: await subscribe(f"{base}/whep/{space.id}", space.tokens[h]) for h in space.tones}
    return pubs, subs


async def close(*sessions: Session) -> None:
    for s in sessions:
        await s.close()


def check_mix_minus(heard: dict[str, np.ndarray], space: Space, others: dict[str, float]) -> None:
    """Each return holds its space's other two tones, not its own, nothing of another space."""
    for who, samples in heard.items():
        assert len(samples) >= RATE, who
        body = samples[RATE // 4 :]
        for other, freq in space.tones.items():
            share = tone_power(body, RATE, freq)
            if other == who:
                assert share < ABSENT, (who, "hears itself", share)
            else:
                assert share > HEARD, (who, "misses", other, share)
        for other, freq in others.items():
            assert tone_power(body, RATE, freq) < ABSENT, (who, "hears another space's", other)


def test_two_spaces_land_on_two_processes_and_each_mixes_its_own(server: RunningServer) -> None:
    stage = server.node.stage
    a = live_space(server, "alpha", [440.0, 660.0, 990.0])
    assert [p.running for p in stage.processes] == [True]  # one space: one stage process
    b = live_space(server, "beta", [550.0, 770.0, 1210.0])
    assert stage.process_of(a.id) == 0 and stage.process_of(b.id) == 1
    assert len(set(stage.pids)) == 2 and None not in stage.pids

    async def scenario() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str]:
        pubs_a, subs_a = await on_stage(server, a)
        pubs_b, subs_b = await on_stage(server, b)
        try:
            # Every session went to its space's process: the node's mirror says so per process.
            for index, space in ((0, a), (1, b)):
                mine = stage.processes[index].sessions.values()
                assert {s.space_id for s in mine} == {space.id}
                assert sum(1 for s in mine if s.kind == "whip") == 3
            await asyncio.sleep(0.5)  # jitter buffers fill
            tracks = {
                (n, h): await s.remote_track()
                for n, g in (("a", subs_a), ("b", subs_b))
                for h, s in g.items()
            }
            recs = await asyncio.gather(*(record_timed(t, 2.0) for t in tracks.values()))
            heard = {key: r.samples for key, r in zip(tracks, recs, strict=True)}
            async with httpx.AsyncClient(base_url=server.url) as http:
                metrics = (await http.get("/metrics")).text
            return (
                {h: s for (n, h), s in heard.items() if n == "a"},
                {h: s for (n, h), s in heard.items() if n == "b"},
                metrics,
            )
        finally:
            await close(*pubs_a, *pubs_b, *subs_a.values(), *subs_b.values())

    heard_a, heard_b, metrics = asyncio.run(scenario())
    check_mix_minus(heard_a, a, b.tones)
    check_mix_minus(heard_b, b, a.tones)
    # /metrics speaks for the node: both processes' sessions and rooms, their CPU summed.
    assert 'townhall_stage_peers{kind="whip"} 6.0' in metrics
    assert "townhall_stage_rooms 2.0" in metrics
    assert "townhall_stage_processes 2.0" in metrics
    assert 'townhall_stage_worker_cpu_seconds_total{process="1"}' in metrics
    # Sticky: six WHIP and six WHEP sessions later, each space is where it was placed.
    assert stage.process_of(a.id) == 0 and stage.process_of(b.id) == 1
    # An ended space frees its place; the next space goes to the least loaded process.
    assert a.host.post(f"/api/v1/spaces/{a.id}/end").status_code == 200
    assert stage.process_of(a.id) is None and not stage.hosts(a.id)
    c = live_space(server, "gamma", [300.0, 350.0, 400.0])
    assert stage.process_of(c.id) == 0


def silent_runs(samples: np.ndarray, tones: list[float]) -> int:
    """The longest run of 20 ms windows in which the tones together carry under a tenth of
    the power (a gap in what the speaker hears)."""
    longest = run = 0
    for i in range(0, len(samples) - WINDOW + 1, WINDOW):
        w = samples[i : i + WINDOW]
        present = sum(tone_power(w, RATE, f) for f in tones) > 0.1
        run = 0 if present else run + 1
        longest = max(longest, run)
    return longest


def test_a_killed_stage_process_restarts_only_its_spaces(server: RunningServer) -> None:
    """SIGKILL of the process holding space A: it is restarted with A on it again (A's speaker
    reconnects and is mixed), while space B, on the other process, keeps its process, its
    sessions and its mix: B's speakers hear no gap over 100 ms through the kill and restart."""
    stage = server.node.stage
    a = live_space(server, "alpha", [440.0, 660.0])
    b = live_space(server, "beta", [550.0, 770.0, 1210.0])
    assert stage.process_of(a.id) == 0 and stage.process_of(b.id) == 1
    victim, other = stage.processes
    [b_listener, *_] = b.tones

    def wait(what: str, ok: object, within: float = 20.0) -> None:
        deadline = time.monotonic() + within
        while not ok():  # type: ignore[operator]
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    async def scenario() -> tuple[np.ndarray, int, dict[str, np.ndarray]]:
        pubs_a, _ = await on_stage_whip_only(server, a)
        pubs_b, subs_b = await on_stage(server, b)
        try:
            b_peers = set(other.sessions)
            await asyncio.sleep(0.5)
            track = await subs_b[b_listener].remote_track()
            recording = asyncio.create_task(record_timed(track, 6.0))
            await asyncio.sleep(1.5)
            old_pid, other_pid = victim.pid, other.pid
            assert old_pid is not None and other_pid is not None
            late_before = (await stage.fresh_stats())["rooms"][b.id]["late_ticks"]["0.02"]
            os.kill(old_pid, signal.SIGKILL)
            await asyncio.to_thread(
                wait, "no new stage process for A", lambda: victim.restarts == 1 and victim.pid != old_pid
            )
            rec = await recording
            # B never noticed: same process, no restart, the same sessions, no tick over 20 ms.
            assert other.pid == other_pid and other.restarts == 0
            assert b_peers <= set(other.sessions)
            stats = await stage.fresh_stats()
            assert stats["rooms"][b.id]["late_ticks"]["0.02"] == late_before
            # A is back on its process (sticky), and its speakers reconnect with their grants.
            assert stage.process_of(a.id) == 0 and a.id in stats["rooms"]
            await close(*pubs_a)
            pubs_a, subs_a = await on_stage(server, a)
            try:
                await asyncio.sleep(0.5)
                tracks = {h: await s.remote_track() for h, s in subs_a.items()}
                recs = await asyncio.gather(*(record_timed(t, 2.0) for t in tracks.values()))
            finally:
                await close(*subs_a.values())
            return rec.samples, rec.gap_samples, {h: r.samples for h, r in zip(tracks, recs, strict=True)}
        finally:
            await close(*pubs_a, *pubs_b, *subs_b.values())

    samples, gap_samples, heard_a = asyncio.run(scenario())
    assert len(samples) >= 5 * RATE
    others = [f for h, f in b.tones.items() if h != b_listener]
    assert gap_samples < 0.1 * RATE, gap_samples  # frames missing from B's return (RTP timeline)
    assert silent_runs(samples[RATE // 4 :], others) < 5, "B's speakers heard a gap over 100 ms"
    check_mix_minus(heard_a, a, b.tones)


async def on_stage_whip_only(server: RunningServer, space: Space) -> tuple[list[Session], None]:
    pubs = [
        await publish(f"{server.url}/whip/{space.id}", space.tokens[h], ToneTrack(f))
        for h, f in space.tones.items()
    ]
    return pubs, None


# -- real-time scheduling: the guard ------------------------------------------------------------------


def test_real_time_processes_are_kept_under_the_budget_busiest_first() -> None:
    budget = 1.5
    assert realtime_demotions([0.45, 0.45], set(), budget) == set()  # 20 spaces on two: nothing
    assert realtime_demotions([0.9, 0.7], set(), budget) == {0}  # 1.6 > 1.5: the busiest goes
    assert realtime_demotions([0.8, 0.95], set(), budget) == {1}
    assert realtime_demotions([1.6], set(), budget) == set()  # a lone process keeps SCHED_RR
    assert realtime_demotions([0.9, 1.0, 0.6], {0}, budget) == {0, 1}  # one more per look
    # Back once it fits with a fifth of the budget to spare, not before (no flapping).
    assert realtime_demotions([0.6, 0.7], {0}, budget) == {0}  # 1.3 > 1.2
    assert realtime_demotions([0.5, 0.6], {0}, budget) == set()
    assert realtime_demotions([0.5], {0, 3}, budget) == set()  # indices that no longer exist


def test_the_guard_moves_a_stage_process_out_of_real_time_and_back(server: RunningServer) -> None:
    """``schedule`` on a live stage process: every thread (loop, encoder, packager, aiortc's) out
    of SCHED_RR; back in, each at its own priority again: the loop at 10 and the worker threads
    ``below_the_loop`` put at 9 stay there, so the loop's timer still preempts them."""
    live_space(server, "alpha", [440.0])
    pid = server.node.stage.pid
    assert pid is not None
    rr, loop, worker = os.SCHED_RR, (os.SCHED_RR, 10), (os.SCHED_RR, 9)

    # As shipped (the tests run where SCHED_RR is allowed): the process asked for it before its
    # own threads started (the BLAS threads numpy started at import stay ordinary; they idle);
    # the encoder of alpha's room and the packager thread went one below the loop.
    before = scheduling(pid)
    assert before[pid] == loop
    workers = {tid for tid, s in before.items() if s == worker}
    assert len(workers) >= 2  # alpha's Opus encoder and the packager

    assert schedule(pid, realtime=False)
    after = scheduling(pid)
    assert {s for s in after.values()} == {(os.SCHED_OTHER, -5)}
    assert schedule(pid, realtime=True, before=before)
    after = scheduling(pid)
    assert {tid: after[tid] for tid in before if tid in after} == {
        tid: s for tid, s in before.items() if tid in after
    }
    assert after[pid] == loop and all(after[tid] == worker for tid in workers if tid in after)

    # Without a record (or for a thread started while demoted): the main thread is the loop,
    # any other thread is a worker below it.
    assert schedule(pid, realtime=False)
    assert schedule(pid, realtime=True)
    after = scheduling(pid)
    assert after[pid] == loop
    assert {s for tid, s in after.items() if tid != pid} == {worker}
    assert {s[0] for s in after.values()} == {rr}
    assert not schedule(2**22 + 1, realtime=True)  # no such process
    assert scheduling(2**22 + 1) == {}


def test_a_failing_look_is_logged_and_the_guard_keeps_guarding(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The guard runs in the node's loop: a look that raises must not end it quietly (a demoted
    process would stay out of SCHED_RR for good): it is logged and the next look runs."""
    live_space(server, "alpha", [440.0])
    stage = server.node.stage
    guard = stage._guard_task
    assert guard is not None and not guard.done()
    real, looks = pool.realtime_demotions, []

    def failing_once(cores: list[float], demoted: set[int], budget: float) -> set[int]:
        looks.append(cores)
        if len(looks) == 1:
            raise RuntimeError("a look that fails")
        return real(cores, demoted, budget)

    monkeypatch.setattr(pool, "realtime_demotions", failing_once)
    deadline = time.monotonic() + 10
    while len(looks) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(looks) >= 3 and not guard.done()
    assert any(
        r.levelname == "ERROR" and r.exc_info and "a look that fails" in str(r.exc_info[1])
        for r in caplog.records
    )


def test_the_guard_puts_each_thread_back_at_its_own_priority(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard itself (its decision forced, its actions real): out of SCHED_RR and back, the
    stage's loop is at 10 again and its encoder and packager threads at 9, as before."""
    space = live_space(server, "alpha", [440.0])
    stage = server.node.stage
    index = stage.process_of(space.id)
    assert index is not None
    pid = stage.processes[index].pid
    before = scheduling(pid)
    assert before[pid] == (os.SCHED_RR, 10)
    assert sum(1 for s in before.values() if s == (os.SCHED_RR, 9)) >= 2
    decision: set[int] = {index}
    monkeypatch.setattr(pool, "realtime_demotions", lambda cores, demoted, budget: set(decision))

    def wait_for(done: bool) -> None:
        deadline = time.monotonic() + 10
        while (index in stage.demoted) != done and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (index in stage.demoted) == done

    wait_for(True)
    assert os.sched_getscheduler(pid) == os.SCHED_OTHER
    decision.clear()
    wait_for(False)
    after = scheduling(pid)
    assert after[pid] == (os.SCHED_RR, 10)
    assert {tid: s for tid, s in after.items() if tid in before} == {
        tid: s for tid, s in before.items() if tid in after
    }
