"""Stage benchmark: added latency, CPU of a full stage, spaces per machine, ticks under HTTP load.

Run it from the repository root with the project's venv::

    .venv/bin/python bench/bench_stage.py

It needs ``wrk`` (Debian: ``apt-get install -y wrk``) and matplotlib in the venv. Everything runs
on 127.0.0.1 (the client process calls ``townhall.stage.ice.restrict_host_addresses`` so that ICE
offers only loopback candidates; the server does the same because it listens on 127.0.0.1) and
stops by itself; with the default settings the whole run takes about five minutes.
By default the stage runs as shipped: it asks for ``SCHED_RR`` itself (``stage_realtime``);
``--stage-niced`` starts the server with ``TOWNHALL_STAGE_REALTIME=false``, the fallback where
real-time scheduling is not permitted (``os.nice(-5)``). The policy the stage process actually
runs in is read back from the kernel and reported. ``--only cpu,ramp`` runs some of the four
measurements (results then go to ``stage-<scheduling>-only.json``, without a plot).

Method
------
``townhall serve`` runs as a subprocess on a fresh data directory, started with the signup and
login limits at ``1000000/minute``. Every WebRTC client (WHIP speakers, WHEP returns, the direct
peer) runs in *this* process on one asyncio loop, built on ``townhall.stage.client``. The machine
has two cores, shared by the server, the clients and (in 4) wrk, so the clients of 2-4 are made
cheap, without changing what the server does: a speaker replays its tone as Opus packets encoded
once in advance (``OpusLoopTrack``: no encoder per speaker), and a WHEP return is counted packet
by packet without being decoded (``NullDecoder`` stands in for aiortc's decoder in this process
after measurement 1). Measurement 1 uses real encoding and decoding clients, since it listens.

Server CPU is split: the whole server's CPU seconds come from ``/proc`` (every process of its
session), the stage processes' from ``/proc/<stage pid>/stat`` at the same instants (the server's
children running ``townhall.stage.worker``, summed; the node also exports the sum as
``townhall_stage_process_cpu_seconds_total``); the HTTP process is the difference. The
machine's busy CPU (``/proc/stat``) is reported too: what the server and the clients did not
use was taken by other work on the machine.

Tick lateness comes from the server's ``/metrics``. **A tick is late when it runs more than
10 ms past its deadline** (half a tick: the mixer's 2-frame jitter buffers and the clients' own
absorb that much without a gap; a tick over 20 ms means two ticks ran back to back). The counts
of ticks later than 5, 10 and 20 ms (``townhall_stage_late_ticks``, per live room since it
started) are read before and after a window, so the late ticks *in the window* are exact.
``townhall_stage_tick_lateness_seconds`` gives the 0.5, 0.99 and 1.0 quantiles (to 0.1 ms below
50 ms) over every tick of the worst live room; those cannot be read for a window, so each
measurement uses rooms of its own (the spaces of one measurement are ended, which removes their
rooms, before the next starts) and its quantiles cover its rooms' whole lives: setup (ICE/DTLS
handshakes), warm-up and the window.

1. **Added latency**, speaker to speaker. Speaker B opens a WHEP return and starts recording
   (``record_timed``) before speaker A publishes a ``ChirpTrack`` (a 30 ms sweep every 0.5 s).
   Chirp onsets are found in B's recording (``find_chirps``), turned into wall-clock time with
   ``started_at + sample / 48000``, and matched to the wall-clock times at which A's track handed
   each chirp to its sender. The peer is the same chirp over a direct aiortc connection in this
   process (sending ``RTCPeerConnection`` to receiving one, no server). Reported: median and p95
   of both, and their difference (what the server adds: decode, jitter buffer, the 20 ms tick,
   mix, encode, one more hop). As a check, each onset is also timed from the arrival time of the
   frame that carried it (``frame_arrival`` in the JSON).
2. **CPU of one full stage**: 13 speakers (the maximum) publishing tones and 13 WHEP mix-minus
   returns. After a warm-up, CPU time is read over a 20 s window: cores used = CPU seconds / wall
   seconds, for the stage process, the HTTP process and this process (the clients). The packets
   every client sent and received in the window are reported too, to show whether they kept up.
3. **Spaces per machine**: N = 1, 2, 4, 8, 12, 16, 20 concurrent spaces of 3 speakers (3 WHIP + 3
   WHEP each); per step, fresh spaces, a warm-up, then ~10 s read through ``/metrics``. A step is
   "late" if any tick of the window was late (over 10 ms). The ramp stops at the first late step,
   or when the clients fall behind (a WHIP sender or a WHEP return moves less than 90% of its 50
   packets/s); reported: the largest N with no late tick. The server runs its default number
   of stage processes (``stage_processes``: one per CPU, started as spaces are placed on them);
   ``--stage-processes 1,2`` instead runs the ramp on a fresh server per value, with exactly
   that many (``TOWNHALL_STAGE_PROCESSES``), alternating for ``--pool-repeats`` rounds: the
   one-process peer and the pool in the same run. Stage CPU is then summed over the stage
   processes and given per process, and each step also times ``GET /healthz`` every 0.1 s from
   a small process of its own (an ordinary process, as the node's HTTP process is): whether
   two ``SCHED_RR`` stage processes leave the HTTP side its CPU. Output: ``stage-pool.json``
   and ``stage-pool.png``.
4. **Ticks under a control-plane flood**: one space with 3 speakers, first without load, then
   (each in fresh spaces) while ``wrk -t2 -c128 -d15s`` hits ``GET /api/v1/spaces/{id}/state``,
   ``GET /healthz``, and ``POST /api/v1/sessions`` with wrong passwords (argon2id verifications).
   The stage runs in a process of its own; this says whether the HTTP process's load still
   reaches its clock (through the two shared cores only). The peer, in every window: a bare
   asyncio process that only wakes every 20 ms (``TICKER``), niced like the stage (or in
   SCHED_RR as shipped): how late the machine itself wakes a clock that has no work.

Output: a table on stdout, ``bench/results/stage.json`` and ``bench/results/stage.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import fractions
import json
import logging
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import aiortc.rtcrtpreceiver
import av
import httpx
import numpy as np
from _common import (
    CLK_TCK,
    HOST,
    MANY_ACCOUNTS_ENV,
    PASSWORD,
    REPO,
    RESULTS,
    Server,
    busy_cpu_s,
    cpu_model,
    pyplot,
    save_figure,
    say,
    tool_version,
    write_json,
    write_lua,
)
from _common import townhall_server as serve_townhall
from aiortc import RTCConfiguration, RTCOutboundRtpStreamStats, RTCPeerConnection, RTCRtpSender
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from townhall.stage.client import Session, publish, record_timed, subscribe
from townhall.stage.ice import restrict_host_addresses
from townhall.stage.sources import ChirpTrack, find_chirps

RATE = 48000
FRAME = 960
TIME_BASE = fractions.Fraction(1, RATE)
TICK_S = 0.020
KEEP_UP = 0.9  # a client moving less than this share of its 50 frames/s has fallen behind
LATE_MS = 10.0  # a tick more than this past its deadline is late
OVERS = ("0.005", "0.01", "0.02")  # townhall_stage_late_ticks thresholds, seconds

logger = logging.getLogger("bench_stage")


# -- the server --------------------------------------------------------------------------------


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def stage_pids(server: Server) -> list[int]:
    """The stage processes: the server's children running ``townhall.stage.worker`` (one per
    ``stage_processes`` in use; the node starts them as spaces are placed on them)."""
    pids: list[int] = []
    for task in Path(f"/proc/{server.proc.pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    if "townhall.stage.worker" in Path(f"/proc/{child}/cmdline").read_text():
                        pids.append(int(child))
    return sorted(set(pids))


def stage_pid(server: Server) -> int | None:
    """The first stage process (``profile_stage.py`` profiles one)."""
    pids = stage_pids(server)
    return pids[0] if pids else None


def stage_policy(server: Server) -> str:
    """The scheduling class the stage processes run in, as the kernel has it."""
    pids = stage_pids(server)
    if not pids:
        raise RuntimeError("no stage process under the server")
    policies = set()
    for pid in pids:
        if os.sched_getscheduler(pid) == os.SCHED_RR:
            policies.add(
                f"SCHED_RR priority {os.sched_getparam(pid).sched_priority} (stage_realtime, as shipped)"
            )
        else:
            policies.add(f"SCHED_OTHER nice {os.getpriority(os.PRIO_PROCESS, pid)} (stage_realtime off)")
    return "; ".join(sorted(policies))


def stage_cpu_by_pid(server: Server) -> dict[int, float]:
    """utime + stime of each stage process."""
    out: dict[int, float] = {}
    for pid in stage_pids(server):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def stage_cpu_seconds(server: Server) -> float:
    """utime + stime of the stage processes, summed (0 if there is none)."""
    return sum(stage_cpu_by_pid(server).values())


@contextlib.contextmanager
def townhall_server(workdir: Path, niced: bool = False, processes: int | None = None) -> Iterator[Server]:
    """``townhall serve`` as shipped; ``niced``: without SCHED_RR; ``processes``: that many stage
    processes (``TOWNHALL_STAGE_PROCESSES``; None: the default, one per CPU)."""
    env = dict(MANY_ACCOUNTS_ENV)
    if niced:
        env["TOWNHALL_STAGE_REALTIME"] = "false"
    if processes is not None:
        env["TOWNHALL_STAGE_PROCESSES"] = str(processes)
    with serve_townhall(workdir / "data", workdir / "townhall.log", env, warn=say) as server:
        yield server


# -- the control API ----------------------------------------------------------------------------


class Api:
    """Accounts, spaces and speaker tokens over HTTP."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.http = httpx.AsyncClient(base_url=base, timeout=60)
        self.accounts: list[str] = []
        self._tokens: dict[str, str] = {}

    async def _call(self, method: str, path: str, expect: int, token: str | None = None, **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        for _ in range(20):  # a loaded node sheds (503) or limits (429): set-up calls wait and retry
            r = await self.http.request(method, path, headers=headers, **kw)
            if r.status_code not in (429, 503):
                break
            await asyncio.sleep(min(5.0, float(r.headers.get("retry-after", "1"))))
        if r.status_code != expect:
            raise RuntimeError(f"{method} {path} answered {r.status_code}: {r.text[:300]}")
        return r.json() if r.content else None

    async def ensure_accounts(self, count: int) -> None:
        """Register accounts u0, u1, ... until there are ``count`` (a few at a time: argon2)."""
        sem = asyncio.Semaphore(4)

        async def one(handle: str) -> None:
            async with sem:
                await self._call(
                    "POST", "/api/v1/accounts", 201, json={"handle": handle, "password": PASSWORD}
                )

        wanted = [f"u{i}" for i in range(len(self.accounts), count)]
        await asyncio.gather(*(one(h) for h in wanted))
        self.accounts.extend(wanted)

    async def token(self, handle: str) -> str:
        if handle not in self._tokens:
            body = await self._call(
                "POST", "/api/v1/sessions", 200, json={"handle": handle, "password": PASSWORD}
            )
            self._tokens[handle] = body["token"]
        return self._tokens[handle]

    async def live_space(self, host: str, speakers: Sequence[str]) -> tuple[str, str, list[str]]:
        """A live space hosted by ``host`` with ``speakers`` on stage: (id, host token, speaker
        tokens, the host's first)."""
        token = await self.token(host)
        space = (await self._call("POST", "/api/v1/spaces", 201, token, json={"title": "bench"}))["id"]
        await self._call("POST", f"/api/v1/spaces/{space}/start", 200, token)
        tokens = [
            (await self._call("POST", f"/api/v1/spaces/{space}/speaker-token", 200, token))["speaker_token"]
        ]
        for handle in speakers:
            grant = await self._call(
                "POST", f"/api/v1/spaces/{space}/speakers", 200, token, json={"handle": handle}
            )
            tokens.append(grant["speaker_token"])
        return space, token, tokens

    async def end(self, space: str, token: str) -> None:
        await self._call("POST", f"/api/v1/spaces/{space}/end", 200, token)

    async def metrics(self) -> dict[str, float]:
        r = await self.http.get("/metrics")
        r.raise_for_status()
        return parse_metrics(r.text)

    async def aclose(self) -> None:
        await self.http.aclose()


_METRIC = re.compile(r"^(townhall_stage_[a-z_]+)(\{[^}]*\})?\s+(\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    """The ``townhall_stage_*`` samples, keyed ``name`` or ``name{labels}``."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC.match(line.strip())
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


@dataclasses.dataclass(frozen=True)
class Lateness:
    """The server's tick lateness quantiles (ms) and tick count at one moment."""

    p50_ms: float
    p99_ms: float
    max_ms: float
    ticks: float
    rooms: float
    whip: float
    whep: float
    late: dict[str, float]  # ticks of the live rooms later than 5, 10, 20 ms, since they started

    @classmethod
    def of(cls, m: dict[str, float]) -> Lateness:
        q = "townhall_stage_tick_lateness_seconds"
        return cls(
            p50_ms=m.get(f'{q}{{quantile="0.5"}}', float("nan")) * 1e3,
            p99_ms=m.get(f'{q}{{quantile="0.99"}}', float("nan")) * 1e3,
            max_ms=m.get(f'{q}{{quantile="1.0"}}', float("nan")) * 1e3,
            ticks=m.get("townhall_stage_ticks_total", m.get("townhall_stage_ticks", float("nan"))),
            rooms=m.get("townhall_stage_rooms", float("nan")),
            whip=m.get('townhall_stage_peers{kind="whip"}', float("nan")),
            whep=m.get('townhall_stage_peers{kind="whep"}', float("nan")),
            late={o: m.get(f'townhall_stage_late_ticks{{over_seconds="{o}"}}', float("nan")) for o in OVERS},
        )


def window(before: Lateness, after: Lateness) -> dict[str, Any]:
    """What can be said about the ticks between two reads of the same rooms."""
    return {
        "before_window": dataclasses.asdict(before),
        "end_of_window": dataclasses.asdict(after),
        "window_ticks": after.ticks - before.ticks,
        # Exact: ticks of the window later than 5, 10 and 20 ms ("late" is over 10 ms).
        "window_late_ticks": {o: after.late[o] - before.late[o] for o in OVERS},
        # The maximum grew: the window holds a tick exactly this late.
        "max_reached_in_window": after.max_ms > before.max_ms,
        # p99 over the rooms' lives beyond anything seen before: the window's own p99 is at least this.
        "p99_lower_bound_for_window": after.p99_ms > before.max_ms,
    }


# -- clients ------------------------------------------------------------------------------------


class OpusLoopTrack(MediaStreamTrack):
    """A speaker that costs its client almost nothing: one second of its tone encoded once (mono
    Opus, 20 ms packets), replayed as packets in real time; aiortc's sender only packetises
    them. An integer frequency makes the loop seamless."""

    kind = "audio"

    def __init__(self, frequency: float, amplitude: float) -> None:
        super().__init__()
        codec = av.CodecContext.create("libopus", "w")
        codec.bit_rate = 64000
        codec.format = "s16"
        codec.layout = "mono"
        codec.sample_rate = RATE
        codec.time_base = TIME_BASE
        t = np.arange(RATE) / RATE
        tone = np.round(amplitude * 32767 * np.sin(2 * np.pi * round(frequency) * t)).astype(np.int16)
        self._packets: list[bytes] = []
        for i in range(RATE // FRAME):
            samples = tone[i * FRAME : (i + 1) * FRAME].reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
            frame.sample_rate = RATE
            frame.pts = i * FRAME
            self._packets += [bytes(p) for p in codec.encode(frame)]
        self._n = 0
        self._start: float | None = None

    async def recv(self) -> av.Packet[Any]:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
        elif (delay := self._start + self._n * TICK_S - now) > 0:
            await asyncio.sleep(delay)
        packet = av.Packet(self._packets[self._n % len(self._packets)])
        packet.pts = self._n * FRAME
        packet.time_base = TIME_BASE
        self._n += 1
        return packet


def _silent_frame() -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 2 * FRAME), np.int16), format="s16", layout="stereo")
    frame.sample_rate = RATE
    return frame


class NullDecoder:
    """Stands in for aiortc's Opus decoder in this process once ``count_without_decoding`` was
    called: every packet becomes the same silent frame, so a WHEP return is counted, not decoded."""

    frame = _silent_frame()

    def decode(self, encoded_frame: Any) -> list[av.AudioFrame]:
        return [self.frame]


def count_without_decoding() -> None:
    """From now on, receivers created in this process count packets instead of decoding them."""
    aiortc.rtcrtpreceiver.get_decoder = lambda codec: NullDecoder()  # type: ignore[assignment,return-value]


class Drain:
    """Reads every frame of a WHEP return as it comes, counting them."""

    def __init__(self, track: MediaStreamTrack) -> None:
        self.frames = 0
        self._task = asyncio.create_task(self._run(track))

    async def _run(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()
                self.frames += 1

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def packets_sent(session: Session) -> int:
    stats = await session.pc.getStats()
    return sum(s.packetsSent for s in stats.values() if isinstance(s, RTCOutboundRtpStreamStats))


@dataclasses.dataclass
class Stage:
    """One live space with its speakers publishing and their mix-minus returns drained."""

    space: str
    host_token: str
    whip: list[Session]
    whep: list[Session]
    drains: list[Drain]

    async def counters(self) -> tuple[list[int], list[int]]:
        return [await packets_sent(s) for s in self.whip], [d.frames for d in self.drains]

    async def close(self, api: Api) -> None:
        for d in self.drains:
            await d.stop()
        for s in [*self.whip, *self.whep]:
            await s.close()
        await api.end(self.space, self.host_token)


async def open_stage(api: Api, handles: Sequence[str], tones: Sequence[float], amplitude: float) -> Stage:
    """``handles[0]`` hosts; every handle publishes a tone and hears its mix-minus."""
    space, host_token, tokens = await api.live_space(handles[0], handles[1:])
    whip_url, whep_url = f"{api.base}/whip/{space}", f"{api.base}/whep/{space}"
    whip = [
        await publish(whip_url, t, OpusLoopTrack(f, amplitude), timeout=30)
        for t, f in zip(tokens, tones, strict=True)
    ]
    whep = [await subscribe(whep_url, t, timeout=30) for t in tokens]
    drains = [Drain(await s.remote_track()) for s in whep]
    return Stage(space, host_token, whip, whep, drains)


async def measure_stages(stages: Sequence[Stage], api: Api, server: Server, seconds: float) -> dict[str, Any]:
    """CPU, lateness and client throughput over ``seconds`` of already running stages."""
    sent0 = [await st.counters() for st in stages]
    lat0 = Lateness.of(await api.metrics())
    each0 = stage_cpu_by_pid(server)
    cpu0, stage0, own0 = server.cpu_seconds(), sum(each0.values()), own_cpu_seconds()
    busy0, t0 = busy_cpu_s(), time.monotonic()
    probe = asyncio.create_task(http_probe(api, seconds))
    await asyncio.sleep(seconds)
    each1 = stage_cpu_by_pid(server)
    cpu1, stage1, own1 = server.cpu_seconds(), sum(each1.values()), own_cpu_seconds()
    busy1, t1 = busy_cpu_s(), time.monotonic()
    healthz = await probe
    lat1 = Lateness.of(await api.metrics())
    sent1 = [await st.counters() for st in stages]
    wall = t1 - t0
    whip_rates = [
        (b - a) / wall
        for (p0, _), (p1, _) in zip(sent0, sent1, strict=True)
        for a, b in zip(p0, p1, strict=True)
    ]
    whep_rates = [
        (b - a) / wall
        for (_, d0), (_, d1) in zip(sent0, sent1, strict=True)
        for a, b in zip(d0, d1, strict=True)
    ]
    stage = (stage1 - stage0) / wall
    return {
        "window_s": round(wall, 2),
        "server_cores": (cpu1 - cpu0) / wall,
        "stage_cores": stage,
        # Per stage process (by pid; a process started or restarted in the window counts from 0).
        "stage_cores_by_process": {
            str(pid): (each1[pid] - each0.get(pid, 0.0)) / wall for pid in sorted(each1)
        },
        "healthz_ms": healthz,
        "http_cores": (cpu1 - cpu0) / wall - stage,
        "client_cores": (own1 - own0) / wall,
        "machine_busy_cores": (busy1 - busy0) / wall,
        "whip_packets_per_s_min": min(whip_rates),
        "whip_packets_per_s_median": float(np.median(whip_rates)),
        "whep_frames_per_s_min": min(whep_rates),
        "whep_frames_per_s_median": float(np.median(whep_rates)),
        "clients_kept_up": min(whip_rates + whep_rates) >= KEEP_UP * 50,
        "lateness": window(lat0, lat1),
    }


HTTP_PROBE = """
import http.client, json, sys, time
host, port, seconds, every = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
took = []
end = time.monotonic() + seconds
while time.monotonic() < end:
    t0 = time.monotonic()
    c = http.client.HTTPConnection(host, port, timeout=30)
    c.request("GET", "/healthz")
    c.getresponse().read()
    c.close()
    took.append((time.monotonic() - t0) * 1e3)
    time.sleep(max(0.0, every - (time.monotonic() - t0)))
print(json.dumps(took))
"""


async def http_probe(api: Api, seconds: float, every: float = 0.1) -> dict[str, Any]:
    """``GET /healthz`` every ``every`` s for ``seconds``, from a process of its own (an ordinary
    SCHED_OTHER process, as the node's HTTP process is, not this busy client loop): how promptly
    the HTTP side is served while the stage processes (SCHED_RR) mix."""
    host, port = api.base.removeprefix("http://").rsplit(":", 1)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HTTP_PROBE, host, port, str(seconds), str(every), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    took = json.loads(out)
    return {
        "count": len(took),
        "p50_ms": float(np.percentile(took, 50)),
        "p99_ms": float(np.percentile(took, 99)),
        "max_ms": max(took),
    }


# -- 1. latency ---------------------------------------------------------------------------------


class StampedTrack(MediaStreamTrack):
    """Passes a track's frames through, noting each frame's pts and wall-clock arrival."""

    kind = "audio"

    def __init__(self, inner: MediaStreamTrack) -> None:
        super().__init__()
        self.inner = inner
        self.arrivals: list[tuple[float, int]] = []

    async def recv(self) -> av.AudioFrame:
        frame = await self.inner.recv()
        self.arrivals.append((time.time(), int(frame.pts or 0)))
        return frame


async def chirp_latencies(source: ChirpTrack, track: MediaStreamTrack, seconds: float) -> dict[str, Any]:
    """Record ``track`` for ``seconds`` and time every chirp of ``source`` found in it."""
    stamped = StampedTrack(track)
    recording = await record_timed(stamped, seconds)
    source.stop()
    if recording.started_at is None:
        raise RuntimeError("nothing was received")
    onsets = find_chirps(recording.samples, RATE, source.template)
    emitted = np.array(source.emitted_at)
    arrivals = np.array([a for a, _ in stamped.arrivals])
    positions = np.array([p for _, p in stamped.arrivals], dtype=np.int64) - stamped.arrivals[0][1]
    latency, by_frame = [], []
    for onset in onsets:
        heard = recording.started_at + onset
        earlier = emitted[emitted <= heard]
        if not earlier.size or heard - earlier[-1] >= source.interval_s:
            continue
        latency.append(heard - earlier[-1])
        sample = round(onset * RATE)
        i = int(np.searchsorted(positions, sample, side="right")) - 1
        by_frame.append(arrivals[i] + (sample - positions[i]) / RATE - earlier[-1])
    if not latency:
        raise RuntimeError(f"no chirp found ({len(onsets)} onsets, {emitted.size} emitted)")
    lat = np.array(latency) * 1e3
    frame = np.array(by_frame) * 1e3
    return {
        "chirps_emitted": int(emitted.size),
        "chirps_found": len(onsets),
        "chirps_matched": len(latency),
        "median_ms": float(np.median(lat)),
        "p95_ms": float(np.percentile(lat, 95)),
        "min_ms": float(lat.min()),
        "max_ms": float(lat.max()),
        "frame_arrival": {"median_ms": float(np.median(frame)), "p95_ms": float(np.percentile(frame, 95))},
        "gap_samples": recording.gap_samples,
        "samples_ms": [round(x, 2) for x in lat],
    }


async def latency_through_server(api: Api, seconds: float) -> dict[str, Any]:
    await api.ensure_accounts(2)
    space, host_token, (token_a, token_b) = await api.live_space("u0", ["u1"])
    listener = await subscribe(f"{api.base}/whep/{space}", token_b, timeout=30)
    try:
        track = await listener.remote_track()
        source = ChirpTrack(0.5)
        recorder = asyncio.create_task(chirp_latencies(source, track, seconds))
        await asyncio.sleep(0.5)  # the recording runs (room silence) before anything is published
        speaker = await publish(f"{api.base}/whip/{space}", token_a, source, timeout=30)
        try:
            return await recorder
        finally:
            await speaker.close()
    finally:
        await listener.close()
        await api.end(space, host_token)


def prefer_opus(pc: RTCPeerConnection, track: MediaStreamTrack) -> None:
    transceiver = pc.addTransceiver(track, direction="sendonly")
    codecs = RTCRtpSender.getCapabilities("audio").codecs
    opus = [c for c in codecs if c.mimeType.lower() == "audio/opus"]
    transceiver.setCodecPreferences(opus + [c for c in codecs if c not in opus])


async def latency_direct(seconds: float) -> dict[str, Any]:
    sender = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    receiver = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    arrived: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()

    @receiver.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        if not arrived.done():
            arrived.set_result(track)

    source = ChirpTrack(0.5)
    try:
        prefer_opus(sender, source)
        await sender.setLocalDescription(await sender.createOffer())
        await receiver.setRemoteDescription(sender.localDescription)
        await receiver.setLocalDescription(await receiver.createAnswer())
        await sender.setRemoteDescription(receiver.localDescription)
        track = await asyncio.wait_for(arrived, 10)
        # The first frame the receiver hands out is the first one sent: half a second of silence
        # before the first chirp, so the recording starts before the chirps do.
        return await chirp_latencies(source, track, seconds)
    finally:
        await sender.close()
        await receiver.close()


# -- 4. flood -------------------------------------------------------------------------------------

# The peer of the stage's clock: a process that does nothing but wake every 20 ms against
# absolute deadlines, scheduled like the stage (SCHED_RR as shipped, niced under --stage-niced).
TICKER = r"""
import asyncio, json, os, sys
os.nice(int(sys.argv[2]))
async def main(seconds):
    loop = asyncio.get_running_loop()
    start, late, n = loop.time(), [], 0
    while (n := n + 1) * 0.02 <= seconds:
        deadline = start + n * 0.02
        await asyncio.sleep(max(0.0, deadline - loop.time()))
        late.append(loop.time() - deadline)
    late.sort()
    q = lambda p: late[min(len(late) - 1, int(p * len(late)))] * 1e3
    print(json.dumps({"ticks": len(late), "p50_ms": q(0.5), "p99_ms": q(0.99), "max_ms": late[-1] * 1e3,
                      "late": {str(t): sum(x > t for x in late) for t in (0.005, 0.01, 0.02)}}))
asyncio.run(main(float(sys.argv[1])))
"""


async def bare_ticker(seconds: float, rt: bool) -> dict[str, Any]:
    """Run ``TICKER`` for ``seconds`` beside the stage: how late a clock with no work at all is
    woken on this machine right now, under the stage's scheduling."""
    cmd = [sys.executable, "-c", TICKER, str(seconds), "0" if rt else "-5"]
    if rt:
        cmd = ["chrt", "-r", "10", *cmd]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), seconds + 30)
    return dict(json.loads(out))


async def run_wrk(url: str, script: Path, threads: int, connections: int, duration_s: int) -> dict[str, Any]:
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration_s}s",
        "--timeout=10s",
        "-s",
        str(script),
        url,
    ]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), duration_s + 60)
    line = next((ln for ln in out.decode().splitlines() if ln.startswith("BENCH_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.decode().strip()} {out.decode()}")
    raw = json.loads(line.removeprefix("BENCH_JSON "))
    seconds = raw["duration_us"] / 1e6
    return {
        "settings": f"wrk -t{threads} -c{connections} -d{duration_s}s",
        "requests_per_s": raw["requests"] / seconds,
        "status_ge_400": raw["status"],
        "socket_errors": raw["connect"] + raw["read"] + raw["write"],
        "timeouts": raw["timeout"],
        "p50_ms": raw["p50_us"] / 1e3,
        "p99_ms": raw["p99_us"] / 1e3,
    }


# -- the run -----------------------------------------------------------------------------------


def tones_for(count: int, base: float = 300.0, step: float = 70.0) -> list[float]:
    return [base + step * i for i in range(count)]


PARTS = ("latency", "cpu", "flood", "ramp")


async def run_all(
    args: argparse.Namespace, server: Server, workdir: Path, only: Sequence[str]
) -> dict[str, Any]:
    api = Api(server.base)
    out: dict[str, Any] = {}
    try:
        if "latency" in only:
            out["latency"] = await latency(args, api)
        count_without_decoding()  # 2-4 measure the server: WHEP returns are counted, not decoded
        if "cpu" in only:
            out["cpu_13"] = await cpu_13(args, api, server)
        if "flood" in only:  # (before 3, which may stop early or run long)
            out["flood"] = await flood(args, api, server, workdir)
        if "ramp" in only:
            out["ramp"] = await ramp(args, api, server)
    finally:
        await api.aclose()
    return out


async def ramp_by_stage_processes(args: argparse.Namespace, workdir: Path) -> dict[str, list[dict[str, Any]]]:
    """The ramp once per ``--stage-processes`` value, each on a server of its own started with
    that many stage processes, the values alternating (``--pool-repeats`` rounds) so that the
    machine's other load falls on each alike."""
    count_without_decoding()
    out: dict[str, list[dict[str, Any]]] = {}
    for round_ in range(args.pool_repeats):
        for n in args.stage_processes:
            say(f"3. ramp with {n} stage process(es), round {round_ + 1} of {args.pool_repeats}:")
            sub = workdir / f"pool-{n}-{round_}"
            sub.mkdir()
            load_before = os.getloadavg()
            with townhall_server(sub, args.stage_niced, n) as server:
                api = Api(server.base)
                try:
                    result = await ramp(args, api, server)
                finally:
                    await api.aclose()
                result["stage_scheduling"] = stage_policy(server)
                result["stage_processes_started"] = len(stage_pids(server))
            result["stage_processes"] = n
            result["loadavg_before"] = load_before
            result["loadavg_after"] = os.getloadavg()
            say(
                f"   largest N with no late tick: {result['largest_n_without_late_tick']} "
                f"({result['stopped']})"
            )
            out.setdefault(str(n), []).append(result)
    return out


async def latency(args: argparse.Namespace, api: Api) -> dict[str, Any]:
    say(f"1. latency: chirp every 0.5 s, {args.latency_seconds:g} s through the server, then direct ...")
    through = await latency_through_server(api, args.latency_seconds)
    direct = await latency_direct(args.latency_seconds)
    say(
        f"   server {through['median_ms']:.1f} / {through['p95_ms']:.1f} ms, direct "
        f"{direct['median_ms']:.1f} / {direct['p95_ms']:.1f} ms (median / p95)"
    )
    return {
        "server": through,
        "direct": direct,
        "added_median_ms": through["median_ms"] - direct["median_ms"],
        "added_p95_ms": through["p95_ms"] - direct["p95_ms"],
        "target_ms": 150,
    }


async def cpu_13(args: argparse.Namespace, api: Api, server: Server) -> dict[str, Any]:
    say(f"2. CPU: 13 speakers + 13 returns, warm-up {args.cpu_warmup:g} s, window {args.cpu_seconds:g} s ...")
    await api.ensure_accounts(13)
    setup0 = time.monotonic()
    stage = await open_stage(api, api.accounts[:13], tones_for(13), 0.05)
    setup_s = time.monotonic() - setup0
    try:
        await asyncio.sleep(args.cpu_warmup)
        cpu = await measure_stages([stage], api, server, args.cpu_seconds)
    finally:
        await stage.close(api)
    cpu["setup_s"] = round(setup_s, 2)
    cpu["target_cores"] = 0.5
    lat = cpu["lateness"]["end_of_window"]
    say(
        f"   stage {cpu['stage_cores']:.3f} cores, HTTP {cpu['http_cores']:.3f}, clients "
        f"{cpu['client_cores']:.3f}; lateness p99 {lat['p99_ms']:.2f} ms, max {lat['max_ms']:.2f} ms, "
        f"late ticks in the window {cpu['lateness']['window_late_ticks']['0.01']:.0f}; machine busy "
        f"{cpu['machine_busy_cores']:.2f} cores"
    )
    return cpu


async def flood(args: argparse.Namespace, api: Api, server: Server, workdir: Path) -> dict[str, Any]:
    await api.ensure_accounts(3)
    victim = "u13" if len(api.accounts) > 13 else api.accounts[-1]
    get_lua = write_lua(workdir, "state")
    wrong = json.dumps({"handle": victim, "password": "wrong password, for the flood"})
    login_lua = write_lua(workdir, "wrong_login", "POST", wrong)
    cases: dict[str, Any] = {}
    for name, path, script in (
        ("no load", None, None),
        ("GET /api/v1/spaces/{id}/state", "state", get_lua),
        ("GET /healthz", "/healthz", get_lua),
        ("POST /api/v1/sessions (wrong password)", "/api/v1/sessions", login_lua),
    ):
        say(f"4. flood: {name} ...")
        stage = await open_stage(api, api.accounts[:3], tones_for(3), 0.2)
        try:
            await asyncio.sleep(args.warmup)
            before = Lateness.of(await api.metrics())
            cpu0, stage0, busy0, t0 = (
                server.cpu_seconds(),
                stage_cpu_seconds(server),
                busy_cpu_s(),
                time.monotonic(),
            )
            load = None
            ticker = asyncio.create_task(bare_ticker(args.flood_seconds, not args.stage_niced))
            if script is None:
                await asyncio.sleep(args.flood_seconds)
            else:
                url = api.base + (f"/api/v1/spaces/{stage.space}/state" if path == "state" else str(path))
                load = await run_wrk(url, script, 2, args.flood_connections, args.flood_seconds)
            bare = await ticker
            wall = time.monotonic() - t0
            cpu, busy = (server.cpu_seconds() - cpu0) / wall, (busy_cpu_s() - busy0) / wall
            stage_cores = (stage_cpu_seconds(server) - stage0) / wall
            after = Lateness.of(await api.metrics())
        finally:
            await stage.close(api)
        cases[name] = {
            "wrk": load,
            "bare_ticker": bare,
            "server_cores": cpu,
            "stage_cores": stage_cores,
            "http_cores": cpu - stage_cores,
            "machine_busy_cores": busy,
            "lateness": window(before, after),
        }
        late = cases[name]["lateness"]["window_late_ticks"]
        say(
            f"   p50 {after.p50_ms:.2f} ms, p99 {after.p99_ms:.2f} ms, max {after.max_ms:.2f} ms; late ticks "
            f"(>5/10/20 ms) in the window {late['0.005']:.0f}/{late['0.01']:.0f}/{late['0.02']:.0f}"
            + (f"; {load['requests_per_s']:.0f} req/s" if load else "")
            + f"; bare ticker p99 {bare['p99_ms']:.2f} ms, max {bare['max_ms']:.2f} ms"
        )
    return {"cases": cases, "target_p99_ms": 5.0, "connections": args.flood_connections}


async def ramp(args: argparse.Namespace, api: Api, server: Server) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    best = strict = 0
    stopped = "completed the ramp"
    deadline = time.monotonic() + args.ramp_budget
    for n in args.ramp:
        if time.monotonic() > deadline:
            stopped = f"time budget ({args.ramp_budget:g} s) spent before N={n}"
            break
        say(f"3. ramp: {n} spaces x 3 speakers ...")
        await api.ensure_accounts(3 * n)
        setup0 = time.monotonic()
        stages: list[Stage] = []
        try:
            stages = list(
                await asyncio.gather(
                    *(open_stage(api, api.accounts[3 * i : 3 * i + 3], tones_for(3), 0.2) for i in range(n))
                )
            )
            setup_s = time.monotonic() - setup0
            await asyncio.sleep(args.warmup)
            step = await measure_stages(stages, api, server, args.ramp_seconds)
        finally:
            for st in stages:
                await st.close(api)
        step["spaces"] = n
        step["setup_s"] = round(setup_s, 2)
        step["loadavg"] = os.getloadavg()
        lw = step["lateness"]
        end = lw["end_of_window"]
        late_in_window = lw["window_late_ticks"]["0.01"] > 0
        late_anywhere = end["late"]["0.01"] > 0
        step["late_tick_in_window"] = late_in_window
        step["late_tick_in_setup"] = late_anywhere and not late_in_window
        steps.append(step)
        say(
            f"   max {end['max_ms']:.2f} ms, p99 {end['p99_ms']:.2f} ms, late ticks in the window "
            f"{lw['window_late_ticks']['0.01']:.0f}; stage {step['stage_cores']:.2f} cores, HTTP "
            f"{step['http_cores']:.2f}, clients {step['client_cores']:.2f}, "
            f"kept up: {step['clients_kept_up']}; per stage process "
            + " / ".join(f"{c:.2f}" for c in step["stage_cores_by_process"].values())
            + f"; healthz p99 {step['healthz_ms']['p99_ms']:.1f} ms; load {step['loadavg'][0]:.2f}"
        )
        if late_in_window:
            stopped = f"late tick at N={n}"
            break
        if not step["clients_kept_up"]:
            stopped = f"clients fell behind at N={n}"
            break
        best = n
        if not late_anywhere and strict == n_before(args.ramp, n):
            strict = n
    return {
        "steps": steps,
        "largest_n_without_late_tick": best,
        "largest_n_without_late_tick_incl_setup": strict,
        "stopped": stopped,
    }


def n_before(ramp: Sequence[int], n: int) -> int:
    """The step before ``n`` in the ramp (0 for the first)."""
    i = list(ramp).index(n)
    return ramp[i - 1] if i else 0


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    restrict_host_addresses([HOST])
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="townhall-bench-stage-") as tmp:
        workdir = Path(tmp)
        pooled = "ramp" in args.only and bool(args.stage_processes)
        only = [p for p in args.only if not (pooled and p == "ramp")]
        results: dict[str, Any] = {}
        policy = ""
        if only:
            with townhall_server(workdir, args.stage_niced) as server:
                results = await run_all(args, server, workdir, only)
                policy = stage_policy(server)  # once it has long been running: set as it starts
        if pooled:
            by = results["ramp_by_stage_processes"] = await ramp_by_stage_processes(args, workdir)
            results["ramp"] = by[str(max(args.stage_processes))][-1]
            policy = policy or results["ramp"]["stage_scheduling"]
    return {
        "benchmark": "stage",
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python bench/bench_stage.py", *sys.argv[1:]]),
        "clients": (
            "all WebRTC clients in the benchmark process (one asyncio loop), server in a subprocess; "
            "in 2-4 speakers replay pre-encoded Opus and WHEP returns are counted without decoding"
        ),
        "stage_scheduling": policy,
        "late_means": f"more than {LATE_MS:g} ms past the tick's deadline",
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_model": cpu_model(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "wrk": tool_version(["wrk", "-v"]),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "server_env": MANY_ACCOUNTS_ENV,
        "results": results,
    }


# -- reporting ---------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
    r = result["results"]
    lat, cpu, fl, rp = r["latency"], r["cpu_13"], r["flood"], r["ramp"]
    rows = ["| measurement | result | peer / reference | target |", "|---|---|---|---|"]
    rows.append(
        f"| 1. speaker→speaker latency, median / p95 | through townhall {lat['server']['median_ms']:.1f} / "
        f"{lat['server']['p95_ms']:.1f} ms; **added {lat['added_median_ms']:.1f} / "
        f"{lat['added_p95_ms']:.1f} ms** | direct aiortc peer {lat['direct']['median_ms']:.1f} / "
        f"{lat['direct']['p95_ms']:.1f} ms | ≤ 150 ms |"
    )
    end = cpu["lateness"]["end_of_window"]
    rows.append(
        f"| 2. one space, 13 WHIP + 13 WHEP: stage process CPU | **{cpu['stage_cores']:.3f} cores** (HTTP "
        f"process {cpu['http_cores']:.3f}); tick p99 {end['p99_ms']:.2f} ms, max {end['max_ms']:.2f} ms, "
        f"{cpu['lateness']['window_late_ticks']['0.01']:.0f} late in the window | clients (this process) "
        f"{cpu['client_cores']:.3f} cores; min WHEP {cpu['whep_frames_per_s_min']:.0f} packets/s "
        "| < 0.5 core |"
    )
    steps = rp["steps"]
    last = steps[-1] if steps else None
    rows.append(
        f"| 3. most 3-speaker spaces with no late tick (> {LATE_MS:g} ms) in a window | "
        f"**{rp['largest_n_without_late_tick']}** "
        f"in the window ({rp['stopped']}); {rp['largest_n_without_late_tick_incl_setup']} counting setup | "
        + (
            f"at N={last['spaces']}: stage {last['stage_cores']:.2f}, HTTP {last['http_cores']:.2f}, "
            f"clients {last['client_cores']:.2f} cores"
            if last
            else "-"
        )
        + " | - |"
    )
    for name, case in fl["cases"].items():
        e = case["lateness"]["end_of_window"]
        load = case["wrk"]
        rate = f"{load['requests_per_s']:,.0f} req/s" if load else "no HTTP load"
        late = case["lateness"]["window_late_ticks"]
        bare = case["bare_ticker"]
        rows.append(
            f"| 4. tick lateness p50 / p99 / max, {name} | {e['p50_ms']:.2f} / **{e['p99_ms']:.2f}** / "
            f"{e['max_ms']:.2f} ms; late ticks (> 5 / 10 / 20 ms) in the window {late['0.005']:.0f} / "
            f"{late['0.01']:.0f} / {late['0.02']:.0f} of {case['lateness']['window_ticks']:.0f} | {rate}; "
            f"stage {case['stage_cores']:.2f}, HTTP {case['http_cores']:.2f} cores; bare ticker p99 "
            f"{bare['p99_ms']:.2f}, max {bare['max_ms']:.2f} ms, {bare['late']['0.01']} late | p99 < 5 ms |"
        )
    return "\n".join(rows)


def partial_summary(result: dict[str, Any]) -> str:
    """The measurements run under ``--only``, one line each."""
    r, lines = result["results"], []
    if "latency" in r:
        lat = r["latency"]
        lines.append(
            f"1. added latency median / p95: {lat['added_median_ms']:.1f} / {lat['added_p95_ms']:.1f} ms"
        )
    if "cpu_13" in r:
        c = r["cpu_13"]
        lines.append(
            f"2. 13 speakers: stage {c['stage_cores']:.3f} cores, clients {c['client_cores']:.3f}, busy "
            f"{c['machine_busy_cores']:.2f}; late {c['lateness']['window_late_ticks']['0.01']:.0f}; min WHEP "
            f"{c['whep_frames_per_s_min']:.0f}/s"
        )
    if "flood" in r:
        for name, case in r["flood"]["cases"].items():
            e = case["lateness"]["end_of_window"]
            lines.append(f"4. {name}: p99 {e['p99_ms']:.2f} ms, max {e['max_ms']:.2f} ms")
    if "ramp" in r:
        lines.append(ramp_table(result))
        lines.append(f"3. largest N without a late tick: {r['ramp']['largest_n_without_late_tick']}")
    return "\n".join(lines)


def ramp_table(result: dict[str, Any]) -> str:
    rows = [
        "| spaces | WHIP / WHEP | tick p50 / p99 / max (ms) | late ticks / ticks in window | stage cores "
        "| HTTP cores | client cores | min WHIP / WHEP pkt/s | verdict |",
        "|" + "---|" * 9,
    ]
    for s in result["results"]["ramp"]["steps"]:
        e = s["lateness"]["end_of_window"]
        verdict = (
            "late tick"
            if s["late_tick_in_window"]
            else ("late tick during setup only" if s["late_tick_in_setup"] else "no late tick")
        )
        if not s["clients_kept_up"]:
            verdict += ", clients behind"
        rows.append(
            f"| {s['spaces']} | {e['whip']:.0f} / {e['whep']:.0f} | {e['p50_ms']:.2f} / {e['p99_ms']:.2f} / "
            f"{e['max_ms']:.2f} | {late_ticks(s)} | {s['stage_cores']:.2f} | {s['http_cores']:.2f} | "
            f"{s['client_cores']:.2f} | {slowest_rates(s)} | {verdict} |"
        )
    return "\n".join(rows)


def late_ticks(step: dict[str, Any]) -> str:
    """A ramp step's table cell: late ticks / ticks, in its window."""
    lateness = step["lateness"]
    return f"{lateness['window_late_ticks']['0.01']:.0f} / {lateness['window_ticks']:.0f}"


def slowest_rates(step: dict[str, Any]) -> str:
    """A ramp step's table cell: the slowest WHIP client's packets/s / the slowest WHEP's."""
    return f"{step['whip_packets_per_s_min']:.0f} / {step['whep_frames_per_s_min']:.0f}"


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    r = result["results"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), layout="constrained")

    ax = axes[0][0]
    lat = r["latency"]
    data = [lat["direct"]["samples_ms"], lat["server"]["samples_ms"]]
    ax.boxplot(data, whis=(5, 95), showfliers=True)
    ax.set_xticks([1, 2], ["direct aiortc\n(no server)", "through townhall\n(WHIP → mix → WHEP)"])
    for i, side in enumerate(("direct", "server"), start=1):
        s = lat[side]
        ax.annotate(
            f"median {s['median_ms']:.1f} ms\np95 {s['p95_ms']:.1f} ms",
            (i + 0.3, s["median_ms"]),
            fontsize=8,
            va="center",
        )
    ax.axhline(150, color="#c0392b", ls="--", lw=1)
    ax.text(0.55, 152, "target 150 ms", color="#c0392b", fontsize=8, va="bottom")
    ax.set_ylim(0, max(170, max(max(d) for d in data) * 1.1))
    ax.set_ylabel("chirp latency, ms")
    ax.set_title(
        f"1. speaker→speaker latency: added by the server {lat['added_median_ms']:.1f} ms (median), "
        f"{lat['added_p95_ms']:.1f} ms (p95)",
        fontsize=9,
    )
    ax.grid(axis="y", alpha=0.3)

    ax = axes[0][1]
    cpu = r["cpu_13"]
    bars = ax.bar(
        ["stage process", "HTTP process", "clients (bench process)"],
        [cpu["stage_cores"], cpu["http_cores"], cpu["client_cores"]],
        color=["#3b6ea8", "#7fa7d1", "#9aa5b1"],
        width=0.55,
    )
    for bar in bars:
        ax.annotate(
            f"{bar.get_height():.3f}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax.axhline(0.5, color="#c0392b", ls="--", lw=1)
    ax.text(1.0, 0.51, "target < 0.5 core (stage)", color="#c0392b", fontsize=8, ha="center")
    ax.set_ylim(0, max(1.0, cpu["server_cores"], cpu["client_cores"]) * 1.15)
    ax.set_ylabel("cores (CPU s / wall s)")
    end = cpu["lateness"]["end_of_window"]
    ax.set_title(
        f"2. one space, 13 WHIP + 13 WHEP, {cpu['window_s']:.0f} s window; tick p99 {end['p99_ms']:.2f} ms",
        fontsize=9,
    )
    ax.grid(axis="y", alpha=0.3)

    ax = axes[1][0]
    steps = r["ramp"]["steps"]
    if steps:
        ns = [s["spaces"] for s in steps]
        ax.plot(
            ns, [s["lateness"]["end_of_window"]["max_ms"] for s in steps], "o-", label="max", color="#c0392b"
        )
        ax.plot(
            ns, [s["lateness"]["end_of_window"]["p99_ms"] for s in steps], "s-", label="p99", color="#3b6ea8"
        )
        ax.plot(
            ns, [s["lateness"]["end_of_window"]["p50_ms"] for s in steps], "^-", label="p50", color="#7f8c8d"
        )
        ax.axhline(LATE_MS, color="#c0392b", ls="--", lw=1)
        ax.text(ns[0], LATE_MS * 1.05, f"late = over {LATE_MS:g} ms", color="#c0392b", fontsize=8)
        ax.set_yscale("symlog", linthresh=1)
        ax.set_ylim(bottom=0)
        ax.set_xticks(ns)
        ax2 = ax.twinx()
        ax2.bar(ns, [s["stage_cores"] for s in steps], alpha=0.15, color="#3b6ea8", width=0.8)
        ax2.set_ylabel("stage process cores (bars)")
        ax2.set_ylim(0, 2.2)
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel("concurrent spaces (3 WHIP + 3 WHEP each)")
    ax.set_ylabel("tick lateness, ms (symlog)")
    ax.set_title(
        f"3. spaces per machine: largest N with no late tick = {r['ramp']['largest_n_without_late_tick']} "
        f"({r['ramp']['stopped']})",
        fontsize=9,
    )
    ax.grid(alpha=0.3)

    ax = axes[1][1]
    cases = r["flood"]["cases"]
    labels = [
        n.replace(" (wrong password)", "\n(wrong password)").replace("GET /api", "GET\n/api") for n in cases
    ]
    x = np.arange(len(cases))
    width = 0.26
    for k, (key, color) in enumerate((("p50_ms", "#7f8c8d"), ("p99_ms", "#3b6ea8"), ("max_ms", "#c0392b"))):
        values = [c["lateness"]["end_of_window"][key] for c in cases.values()]
        bars = ax.bar(x + (k - 1) * width, values, width, label=key.replace("_ms", ""), color=color)
        for bar, v in zip(bars, values, strict=True):
            ax.annotate(
                f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=7
            )
    ax.axhline(5, color="#c0392b", ls="--", lw=1)
    ax.text(-0.45, 5.3, "target p99 < 5 ms", color="#c0392b", fontsize=8)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_ylim(bottom=0)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("tick lateness, ms (symlog)")
    ax.set_title(f"4. one 3-speaker space under wrk -t2 -c{r['flood']['connections']} (15 s)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)

    m = result["machine"]
    save_figure(
        fig,
        path,
        dpi=110,
        title=f"townhall stage ({result['stage_scheduling']}), {m['cpus']} cores shared by server, clients "
        f"and wrk, loopback, {result['date'][:10]}",
    )


def pool_table(result: dict[str, Any]) -> str:
    rows = [
        "| stage processes | round | largest N, no late tick | stopped | at that N: stage cores (per "
        "process) | HTTP / client cores | healthz p99 (ms) | load avg (1 min) |",
        "|" + "---|" * 8,
    ]
    for n, runs in result["results"]["ramp_by_stage_processes"].items():
        for i, r in enumerate(runs, start=1):
            best = r["largest_n_without_late_tick"]
            step = next((s for s in r["steps"] if s["spaces"] == best), None)
            if step is None:
                rows.append(f"| {n} | {i} | {best} | {r['stopped']} | - | - | - | - |")
                continue
            rows.append(
                f"| {n} | {i} | **{best}** | {r['stopped']} | {pool_cores(step)} | "
                f"{step['http_cores']:.2f} / {step['client_cores']:.2f} | "
                f"{step['healthz_ms']['p99_ms']:.1f} | "
                f"{step['loadavg'][0]:.2f} |"
            )
    return "\n".join(rows)


def pool_cores(step: dict[str, Any]) -> str:
    """A pool ramp step's table cell: the stage processes' cores, summed (each process's)."""
    each = " / ".join(f"{c:.2f}" for c in step["stage_cores_by_process"].values())
    return f"{step['stage_cores']:.2f} ({each})"


def pool_steps_table(result: dict[str, Any]) -> str:
    rows = [
        "| stage processes | round | spaces | late ticks / ticks in window | tick p99 / max (ms) "
        "| stage cores (per process) | HTTP | clients | min WHIP / WHEP pkt/s "
        "| healthz p50 / p99 / max (ms) | load |",
        "|" + "---|" * 11,
    ]
    for n, runs in result["results"]["ramp_by_stage_processes"].items():
        for i, r in enumerate(runs, start=1):
            for s in r["steps"]:
                e, h = s["lateness"]["end_of_window"], s["healthz_ms"]
                rows.append(
                    f"| {n} | {i} | {s['spaces']} | {late_ticks(s)} | {e['p99_ms']:.2f} / "
                    f"{e['max_ms']:.2f} | {pool_cores(s)} | {s['http_cores']:.2f} | "
                    f"{s['client_cores']:.2f} | {slowest_rates(s)} | {h['p50_ms']:.1f} / {h['p99_ms']:.1f} / "
                    f"{h['max_ms']:.1f} | {s['loadavg'][0]:.2f} |"
                )
    return "\n".join(rows)


def plot_pool(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    by = result["results"]["ramp_by_stage_processes"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5), layout="constrained")
    colors = ["#7f8c8d", "#3b6ea8", "#27ae60", "#8e44ad"]
    for k, (n, runs) in enumerate(by.items()):
        for i, r in enumerate(runs):
            ns = [s["spaces"] for s in r["steps"]]
            label = f"{n} stage process{'es' if n != '1' else ''}" + (
                f", round {i + 1}" if len(runs) > 1 else ""
            )
            style = dict(color=colors[k % len(colors)], alpha=1.0 if i == 0 else 0.55)
            ax.plot(
                ns,
                [s["lateness"]["window_late_ticks"]["0.01"] for s in r["steps"]],
                "o-",
                label=label,
                **style,
            )
            behind = [s for s in r["steps"] if not s["clients_kept_up"]]
            ax.plot(
                [s["spaces"] for s in behind],
                [s["lateness"]["window_late_ticks"]["0.01"] for s in behind],
                "x",
                color="#c0392b",
                markersize=12,
                label="clients fell behind (step not counted)" if k == 0 and i == 0 else None,
            )
            ax2.plot(ns, [s["stage_cores"] for s in r["steps"]], "o-", label=f"{label}: stage", **style)
            ax2.plot(ns, [s["client_cores"] for s in r["steps"]], "x--", label=f"{label}: clients", **style)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_ylim(bottom=-0.3)
    ax.set_xlabel("concurrent 3-speaker spaces (3 WHIP + 3 WHEP each)")
    ax.set_ylabel(f"ticks later than {LATE_MS:g} ms in the step's window (symlog; 0: none)")
    best = ", ".join(
        f"{n} proc: " + "/".join(str(r["largest_n_without_late_tick"]) for r in runs)
        for n, runs in by.items()
    )
    ax.set_title(f"largest N with no late tick in the window: {best}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax2.axhline(result["machine"]["cpus"], color="#c0392b", ls=":", lw=1)
    ax2.set_xlabel("concurrent 3-speaker spaces")
    ax2.set_ylabel("cores (CPU s / wall s)")
    ax2.set_title("stage processes' CPU (summed) and the bench clients' CPU, same machine", fontsize=9)
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    m = result["machine"]
    save_figure(
        fig,
        path,
        dpi=110,
        title=f"townhall stage pool ({result['stage_scheduling']}), {m['cpus']} cores shared by server and "
        f"clients, loopback, {result['date'][:16]} UTC, load avg before {m['loadavg_before'][0]:.2f}",
    )


def write_pool(result: dict[str, Any], out: Path, name: str) -> int:
    json_path, png_path = write_json(out / f"{name}-pool.json", result), out / f"{name}-pool.png"
    plot_pool(result, png_path)
    say(f"\ntownhall stage pool: {result['date']}, {result['run_seconds']} s; {result['stage_scheduling']}")
    if set(result["results"]) - {"ramp", "ramp_by_stage_processes"}:
        say(partial_summary({"results": {k: v for k, v in result["results"].items() if k != "ramp"}}))
    say(pool_table(result))
    say("\n" + pool_steps_table(result))
    for p in (json_path, png_path):
        say(f"wrote {p.relative_to(REPO) if p.is_relative_to(REPO) else p}")
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--latency-seconds", type=float, default=12, help="recording per path (default 12)")
    parser.add_argument("--warmup", type=float, default=3, help="warm-up before each window, s (default 3)")
    parser.add_argument("--cpu-warmup", type=float, default=6, help="warm-up of the 13-speaker stage, s")
    parser.add_argument("--cpu-seconds", type=float, default=20, help="CPU window, s (default 20)")
    parser.add_argument("--ramp-seconds", type=float, default=10, help="window per ramp step, s (default 10)")
    parser.add_argument(
        "--ramp",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 2, 4, 8, 12, 16, 20],
        help="spaces per step (default 1,2,4,8,12,16,20)",
    )
    parser.add_argument("--ramp-budget", type=float, default=150, help="no new ramp step after this, s")
    parser.add_argument("--flood-seconds", type=int, default=15, help="wrk duration, s (default 15)")
    parser.add_argument("--flood-connections", type=int, default=128, help="wrk connections (default 128)")
    parser.add_argument(
        "--stage-niced",
        action="store_true",
        help="start the server with TOWNHALL_STAGE_REALTIME=false (nice, not SCHED_RR); results as "
        "stage-niced.json/png",
    )
    parser.add_argument(
        "--stage-processes",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[],
        help="run the ramp (3) on a server of its own per value, with that many stage processes "
        "(e.g. 1,2: the one-process peer and the pool in the same run); results as stage-pool.json/png",
    )
    parser.add_argument(
        "--pool-repeats", type=int, default=1, help="rounds of the --stage-processes ramps (default 1)"
    )
    parser.add_argument(
        "--only",
        type=lambda s: [x for x in s.split(",") if x],
        default=list(PARTS),
        help=f"run only these measurements, comma-separated, of {','.join(PARTS)} (default: all)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default bench/results)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if tool_version(["wrk", "-v"]) == "not found":
        print(
            "bench_stage: wrk not found; install with: apt-get update && apt-get install -y wrk",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.WARNING)
    began = time.monotonic()
    result = asyncio.run(main_async(args))
    result["run_seconds"] = round(time.monotonic() - began, 1)
    name = "stage-niced" if args.stage_niced else "stage"
    if "ramp_by_stage_processes" in result["results"]:
        return write_pool(result, args.out, name)
    whole = set(args.only) == set(PARTS)
    json_path = write_json(args.out / (f"{name}.json" if whole else f"{name}-only.json"), result)
    written = [json_path]
    m = result["machine"]
    say(
        f"\ntownhall stage: {result['date']}, {m['cpus']} cores ({m['cpu_model']}), {result['run_seconds']} s"
    )
    say(result["clients"] + f"; stage scheduling: {result['stage_scheduling']}\n")
    if whole:
        png_path = args.out / f"{name}.png"
        plot(result, png_path)
        written.append(png_path)
        say(table(result))
        say("\n" + ramp_table(result))
    else:
        say(partial_summary(result))
    for p in written:
        say(f"wrote {p.relative_to(REPO) if p.is_relative_to(REPO) else p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
