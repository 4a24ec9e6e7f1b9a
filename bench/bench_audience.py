"""Audience benchmark: the LL-HLS origin beside nginx, mouth-to-ear latency, 10,000 held reloads.

Run it from the repository root with the project's venv::

    .venv/bin/python bench/bench_audience.py

It needs ``wrk`` and ``nginx`` (Debian: ``apt-get install -y wrk nginx``) and matplotlib in the
venv. Everything runs on 127.0.0.1 and stops by itself; with the default settings the whole run
takes about four to five minutes.

Method
------
``townhall serve`` runs as a subprocess on a fresh data directory (signup and login limits at
``1000000/minute``), with its file-descriptor limit raised to the hard limit. One space is
created and started over HTTP; a live space runs its stage and packager from the start, so
parts flow even before anyone speaks.

1. **Origin rate beside nginx.** ``--rounds`` (3) interleaved rounds; in each, the newest part
   (``seg{msn}.{i}.m4s``, chosen then so that it stays in the origin's window) and the live
   playlist (``live.m3u8``, no blocking parameters) are fetched from the origin and written where
   the peers serve them, then each server is loaded in turn with ``wrk -t2 -c64 -d5s`` after an
   uncounted 1 s warm-up, the listener ticket in a ``Cookie`` header as a player sends it after
   its first request. The peer is nginx (``worker_processes 1``: one process, like the origin)
   serving the very same bytes from disk with ``sendfile``. A second peer shows the ceiling of
   the Python stack itself: a bare ASGI app under the same uvicorn (httptools, uvloop, one
   process, no proxy headers) that answers with the same bytes from memory. Each run also reads
   the serving process's CPU time (``/proc/<pid>/stat``; for nginx its master and worker; for
   the origin its own process less its idle rate), so besides requests/s and the median of the
   per-round ratios, requests per CPU-second are compared: the per-core ratio, which other work
   on the two cores disturbs far less than the rate.
2. **Mouth-to-ear latency.** A WHIP speaker in this process publishes a ``ChirpTrack`` (a 30 ms
   sweep every ``--chirp-interval`` s); the LL-HLS listener of ``townhall listen``
   (``townhall.audience.listener.Listener``, started from the space URL: it joins, then follows
   blocking reloads part by part) decodes every part as it arrives. Chirp onsets are found in
   the decoded audio (``find_chirps``). The *ear time* of a chirp is the arrival time of the
   part that carries it plus the onset's offset inside that part: a player that starts each part
   the moment it arrives. Matched to the wall-clock time at which the speaker's track handed
   that chirp to its sender (``ChirpTrack.markers``): mouth-to-ear = ear − mouth. Also reported:
   the stream time of each chirp (its part's ``EXT-X-PROGRAM-DATE-TIME`` + offsets) minus the
   mouth, i.e. WHIP + jitter buffer + mixer up to the packager; and the listener's own latency
   behind live. A player that holds ``PART-HOLD-BACK`` behind the live edge (hls.js in
   low-latency mode aims near it) would add up to that hold-back; that is computed, not measured.
3. **Memory with 10,000 blocking reloads held open.** ``--held`` keep-alive connections (default
   10,000) from this process (uvloop; each a plain ``asyncio.Protocol``, no task or stream
   reader, so that the client costs less than the server it measures), all opened first. Then
   each one asks for the playlist with ``_HLS_msn`` two segments past the live edge and
   ``_HLS_part=0`` (as far ahead as the origin accepts: held 2.5-4.5 s), reads the answer, and
   asks again, for ``--hold-seconds``. A separate follower notes when each part appears (its
   ``PROGRAM-DATE-TIME`` + duration, i.e. when it could first exist). Sampled every 0.25 s:
   the requests held (sent and not yet answered) and the server's RSS (``VmRSS`` of every
   process of its session; the origin's own process separately). Reported: the baseline RSS,
   the RSS with every connection open and at the most requests held, the difference per
   connection and per held request on top, how late held requests were answered (the first
   byte of the answer read) after their part could exist (p50/p99), the origin's own part of
   that (its ``townhall_hls_held_wake_seconds`` histogram: from the playlist change to each
   answer written; bucket bounds), and the server's CPU.

The load generators share the two cores with the server: figures are for comparison within
one run, not capacity. Output: a table on stdout, ``bench/results/audience.json`` and
``bench/results/audience.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from _common import (
    CLK_TCK,
    HOST,
    MANY_ACCOUNTS_ENV,
    PASSWORD,
    WRK_DONE_LUA,
    Server,
    WrkSettings,
    add_wrk_options,
    busy_cpu_s,
    errors_of,
    fmt_rate,
    fmt_ratio,
    free_port,
    git_state,
    lua_long_string,
    machine_facts,
    nginx_serving,
    own_cpu_s,
    pyplot,
    run_wrk,
    save_figure,
    say,
    session_cpu_seconds,
    session_rss_bytes,
    shown,
    stop,
    tail,
    tools_missing,
    townhall_server,
    wait_http_ok,
    write_json,
)

from townhall.audience.listener import Follower, Listener, PartAudio, parse_media_playlist
from townhall.stage.client import publish
from townhall.stage.ice import restrict_host_addresses
from townhall.stage.sources import ChirpTrack, find_chirps

RATE = 48000
MIME = {"m4s": "audio/mp4", "mp4": "audio/mp4", "m3u8": "application/vnd.apple.mpegurl"}


def raise_fd_limit() -> tuple[int, int]:
    """Soft limit up to the hard one, for this process and the server it starts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, hard


def pct(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


# -- the space ----------------------------------------------------------------------------------


def live_space(base: str) -> dict[str, str]:
    """A host, a live space, the host's speaker token and an anonymous listener's ticket."""
    with httpx.Client(base_url=base, timeout=60) as c:
        c.post("/api/v1/accounts", json={"handle": "host", "password": PASSWORD}).raise_for_status()
        token = c.post("/api/v1/sessions", json={"handle": "host", "password": PASSWORD}).json()["token"]
        auth = {"Authorization": f"Bearer {token}"}
        space = c.post("/api/v1/spaces", json={"title": "bench"}, headers=auth).json()["id"]
        c.post(f"/api/v1/spaces/{space}/start", headers=auth).raise_for_status()
        speaker = c.post(f"/api/v1/spaces/{space}/speaker-token", headers=auth).json()["speaker_token"]
        ticket = c.post(f"/api/v1/spaces/{space}/join").json()["ticket"]
    return {"space": space, "host_token": token, "speaker_token": speaker, "ticket": ticket}


def playlist_now(base: str, space: str, ticket: str, min_segments: int = 2) -> str:
    deadline = time.monotonic() + 30
    with httpx.Client(timeout=30, cookies={"townhall_ticket": ticket}) as c:
        while True:
            r = c.get(f"{base}/hls/{space}/live.m3u8")
            if r.status_code == 200 and sum(s.complete for s in parse_media_playlist(r.text).segments) >= (
                min_segments
            ):
                return r.text
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"no playlist with {min_segments} segments: {r.status_code} {r.text[:200]}"
                )
            time.sleep(0.2)


# -- 1. rates ----------------------------------------------------------------------------------

FLOOR_APP = """\
import pathlib
_root = pathlib.Path(__file__).parent / "html"
_cache = {}
_TYPES = {"m4s": b"audio/mp4", "mp4": b"audio/mp4", "m3u8": b"application/vnd.apple.mpegurl"}

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    path = scope["path"]
    if path == "/__forget":  # the bench rewrote the files
        _cache.clear()
    body = _cache.get(path)
    if body is None:  # first request for a path: read once, then from memory
        body = _cache[path] = (_root / path.lstrip("/")).read_bytes() if path != "/__forget" else b""
    kind = _TYPES.get(path.rsplit(".", 1)[-1], b"text/plain")
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", kind), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
"""


@contextlib.contextmanager
def uvicorn_floor(html: Path, workdir: Path, probe: str) -> Iterator[tuple[str, int]]:
    """A bare ASGI app under uvicorn (as townhall runs it: httptools, uvloop, one process) that
    answers each path with the bytes of the file under ``html`` (read once, then from memory)."""
    home = workdir / "floor"
    home.mkdir(exist_ok=True)
    (home / "floor_app.py").write_text(FLOOR_APP)
    with contextlib.suppress(FileExistsError):
        (home / "html").symlink_to(html)
    port = free_port()
    log = home / "uvicorn.log"
    cmd = [sys.executable, "-m", "uvicorn", "floor_app:app", "--app-dir", str(home), "--host", HOST]
    cmd += ["--port", str(port), "--no-access-log", "--log-level", "warning", "--no-server-header"]
    cmd += ["--no-proxy-headers"]  # as townhall.server runs uvicorn
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://{HOST}:{port}"
        wait_http_ok(base + probe, proc, 20.0, log)
        yield base, proc.pid
    finally:
        stop(proc)


def cookie_lua(directory: Path, ticket: str) -> Path:
    path = directory / "cookie.lua"
    path.write_text(
        'wrk.method = "GET"\n'
        f'wrk.headers["Cookie"] = "townhall_ticket=" .. {lua_long_string(ticket)}\n' + WRK_DONE_LUA
    )
    return path


def pid_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def session_of(fragment: str) -> int:
    """The session (= leader pid) of the process whose command line contains ``fragment``."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if fragment.encode() in cmdline.read_bytes():
                stat = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()
                return int(stat[3])
    raise RuntimeError(f"no process with {fragment!r} in its command line")


def rates(args: argparse.Namespace, server: Server, s: dict[str, str], workdir: Path) -> dict[str, Any]:
    """Interleaved rounds: in each, the newest part and the playlist are fetched from the origin
    and written where nginx and the bare app serve them, then each of the three is loaded in turn
    (wrk, same settings). Each run also reads the serving process's CPU time, so that requests
    per CPU-second (per core) can be compared even when other work shares the cores."""
    settings = WrkSettings(args.threads, args.connections, args.duration, args.timeout)
    script = cookie_lua(workdir, s["ticket"])
    prefix = f"/hls/{s['space']}/"
    playlist_path = prefix + "live.m3u8"
    with httpx.Client(timeout=30, cookies={"townhall_ticket": s["ticket"]}) as c:
        first = {playlist_path: c.get(server.base + playlist_path).content}
    # The origin's idle CPU (the stage's parts arriving, timers), subtracted from its runs.
    idle0, t0 = pid_cpu_seconds(server.proc.pid), time.monotonic()
    time.sleep(3)
    idle_cores = (pid_cpu_seconds(server.proc.pid) - idle0) / (time.monotonic() - t0)
    runs: list[dict[str, Any]] = []
    with (
        nginx_serving(first, args.nginx_workers, workdir, types=MIME) as nginx,
        uvicorn_floor(workdir / "nginx" / "html", workdir, playlist_path) as (floor, floor_pid),
    ):
        nginx_sid = session_of(str(workdir / "nginx" / "nginx.conf"))
        targets = {
            "townhall": (server.base, lambda: pid_cpu_seconds(server.proc.pid), idle_cores),
            "nginx": (nginx, lambda: session_cpu_seconds(nginx_sid), 0.0),
            "uvicorn": (floor, lambda: pid_cpu_seconds(floor_pid), 0.0),
        }
        for round_ in range(args.rounds):
            with httpx.Client(timeout=30, cookies={"townhall_ticket": s["ticket"]}) as c:
                newest = parse_media_playlist(c.get(server.base + playlist_path).text).parts[-1].uri
                paths = {"part": prefix + newest, "playlist": playlist_path}
                bodies = {obj: c.get(server.base + path).content for obj, path in paths.items()}
            for obj, path in paths.items():
                target = workdir / "nginx" / "html" / path.lstrip("/")
                target.write_bytes(bodies[obj])
                target.chmod(0o644)
            httpx.get(floor + "/__forget").raise_for_status()
            for obj, path in paths.items():
                for name, (base, cpu, idle) in targets.items():
                    if name != "townhall":  # the origin's playlist may have moved on meanwhile
                        got = httpx.get(base + path).content
                        assert got == bodies[obj], f"{name} must serve the same bytes"
                    say(f"round {round_ + 1}: wrk GET {path} ({name}) {settings.describe()} ...")
                    run_wrk("warm-up", base + path, script, settings, args.warmup)
                    c0, w0 = cpu(), time.monotonic()
                    m = run_wrk(f"{name} {obj}", base + path, script, settings)
                    cpu_s = cpu() - c0 - idle * (time.monotonic() - w0)
                    runs.append(
                        {
                            "round": round_ + 1,
                            "object": obj,
                            "server": name,
                            "bytes": len(bodies[obj]),
                            "measurement": vars(m),
                            "cpu_s": round(cpu_s, 3),
                            "requests_per_cpu_s": round(m.completed / cpu_s, 1) if cpu_s > 0 else None,
                        }
                    )
    out = []
    for obj in ("part", "playlist"):
        mine = [r for r in runs if r["object"] == obj]

        def pick(name: str, mine: list[dict[str, Any]] = mine) -> list[dict[str, Any]]:
            return [r for r in mine if r["server"] == name]

        def median_m(name: str) -> dict[str, Any]:
            ms = [r["measurement"] for r in pick(name)]
            return {
                "name": name,
                "rps": statistics.median(m["rps"] for m in ms),
                "p50_ms": statistics.median(m["p50_ms"] for m in ms),
                "p99_ms": statistics.median(m["p99_ms"] for m in ms),
                "completed": sum(m["completed"] for m in ms),
                "non_2xx": sum(m["non_2xx"] for m in ms),
                "socket_errors": sum(m["socket_errors"] for m in ms),
                "timeouts": sum(m["timeouts"] for m in ms),
                "requests_per_cpu_s": round(
                    sum(r["measurement"]["completed"] for r in pick(name))
                    / sum(r["cpu_s"] for r in pick(name)),
                    1,
                ),
            }

        t, n, f = median_m("townhall"), median_m("nginx"), median_m("uvicorn")
        per_round = [
            a["measurement"]["rps"] / b["measurement"]["rps"]
            for a, b in zip(pick("townhall"), pick("nginx"), strict=True)
        ]
        path = prefix + ("live.m3u8" if obj == "playlist" else "seg{msn}.{i}.m4s")
        out.append(
            {
                "case": f"GET {path.replace(s['space'], '{id}')} (~{mine[0]['bytes']} B)",
                "object": obj,
                "townhall": t,
                "peer": n,
                "uvicorn_floor": f,
                "ratio": round(statistics.median(per_round), 5),
                "ratio_per_round": [round(x, 4) for x in per_round],
                "ratio_per_cpu": round(t["requests_per_cpu_s"] / n["requests_per_cpu_s"], 4),
                "ratio_to_floor": round(t["rps"] / f["rps"], 4),
                "ratio_to_floor_per_cpu": round(t["requests_per_cpu_s"] / f["requests_per_cpu_s"], 4),
                "floor_to_nginx_per_cpu": round(f["requests_per_cpu_s"] / n["requests_per_cpu_s"], 4),
            }
        )
    return {"rows": out, "runs": runs, "origin_idle_cores": round(idle_cores, 4)}


# -- 2. mouth to ear ---------------------------------------------------------------------------


async def mouth_to_ear(base: str, s: dict[str, str], seconds: float, interval: float) -> dict[str, Any]:
    restrict_host_addresses([HOST])
    track = ChirpTrack(interval)
    heard: list[PartAudio] = []
    session = await publish(f"{base}/whip/{s['space']}", s["speaker_token"], track, timeout=30)
    try:
        listener = Listener(f"{base}/api/v1/spaces/{s['space']}", on_audio=heard.append)
        result = await listener.run(seconds)
    finally:
        await session.close()
    playlist = listener.follower.playlist
    hold_back = playlist.part_hold_back if playlist and playlist.part_hold_back else 0.0
    # Where each part's samples sit in the decoded stream.
    chunks = [a.samples for a in heard if a.samples is not None]
    pcm = np.concatenate(chunks)
    bounds = np.cumsum([0] + [len(c) for c in chunks])
    onsets = find_chirps(pcm, RATE, track.template, threshold=0.5, min_separation_s=interval / 2)
    mouths = [m.wall_time for m in track.markers]
    rows = []
    for onset in onsets:
        sample = round(onset * RATE)
        i = int(np.searchsorted(bounds, sample, side="right") - 1)
        part = heard[i].arrival
        offset = (sample - bounds[i]) / RATE
        ear = part.arrived + offset
        stream = part.part.start + offset
        # The chirp whose emission is closest before its stream time (WHIP + mixer: well under
        # half an interval).
        candidates = [m for m in mouths if m <= stream + 0.1 and stream - m < interval / 2]
        if not candidates:
            continue
        mouth = max(candidates)
        rows.append({"mouth": mouth, "ear": ear, "stream": stream, "part": list(part.part.key)})
    m2e = [r["ear"] - r["mouth"] for r in rows]
    to_packager = [r["stream"] - r["mouth"] for r in rows]
    ends = [a.arrival.arrived - (a.arrival.part.start + a.arrival.part.duration) for a in heard]
    return {
        "seconds": seconds,
        "chirp_interval_s": interval,
        "chirps_emitted": len(mouths),
        "chirps_found": len(onsets),
        "chirps_matched": len(rows),
        "mouth_to_ear_s": summary(m2e),
        "mouth_to_stream_s": summary(to_packager),
        "part_end_to_arrival_s": summary(ends),
        "listener": result.as_dict(),
        "part_hold_back_s": hold_back,
        "with_part_hold_back_s": {  # computed: a player holding PART-HOLD-BACK behind the edge
            "median": round(statistics.median(to_packager) + hold_back + statistics.median(ends), 4)
            if rows
            else None,
        },
        "chirps": rows,
    }


def summary(samples: Sequence[float]) -> dict[str, Any]:
    if not samples:
        return {"n": 0}
    return {
        "n": len(samples),
        "median": round(statistics.median(samples), 4),
        "p95": round(pct(samples, 0.95), 4),
        "p99": round(pct(samples, 0.99), 4),
        "min": round(min(samples), 4),
        "max": round(max(samples), 4),
    }


# -- 3. held blocking reloads ------------------------------------------------------------------


WAKE = "townhall_hls_held_wake_seconds"


def wake_quantiles(metrics: str) -> dict[str, float]:
    """The origin's own delivery of held reloads, from its histogram: from the playlist change
    to each answer written (upper bucket bounds for p50/p99; empty if the origin has none)."""
    buckets: list[tuple[float, float]] = []
    for line in metrics.splitlines():
        if line.startswith(WAKE + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(le), float(line.rsplit(" ", 1)[1])))
    if not buckets or buckets[-1][1] == 0:
        return {}
    total = buckets[-1][1]
    out: dict[str, float] = {"n": total}
    for name, q in (("p50_at_most", 0.5), ("p99_at_most", 0.99)):
        out[name] = next(le for le, count in buckets if count >= q * total)
    return out


class _HeldConnection(asyncio.Protocol):
    """One listener's connection, as a plain protocol (the client must cost far less than the
    server it measures: no stream reader, no task): asks for the load's current target, notes
    when the answer's first bytes arrive, asks again at once."""

    def __init__(self, load: HeldLoad) -> None:
        self.load = load
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.target: tuple[int, int] | None = None
        self.first_byte = 0.0
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport
        self.open = True

    def ask(self) -> None:
        load = self.load
        if self.transport is None or load.target is None or time.time() >= load.deadline:
            self.close()
            return
        self.target = load.target
        self.transport.write(load.request(self.target))
        load.held += 1

    def data_received(self, data: bytes) -> None:
        if not self.buffer:
            self.first_byte = time.time()
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].lower()
        at = head.find(b"content-length:")
        length = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
        if len(self.buffer) < end + 4 + length:
            return
        self.buffer = self.buffer[end + 4 + length :]
        self.load.held -= 1
        assert self.target is not None
        self.load.answers.append((self.target, self.first_byte, int(head[9:12])))
        self.ask()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.open and self.target is not None and time.time() < self.load.deadline:
            self.load.failures += 1
        self.open = False

    def close(self) -> None:
        self.open = False
        if self.transport is not None:
            self.transport.close()


class HeldLoad:
    """``count`` listeners each holding a blocking reload open, renewed as each is answered."""

    def __init__(self, base: str, space: str, ticket: str, count: int, seconds: float) -> None:
        self.host, self.port = HOST, int(base.rsplit(":", 1)[1])
        self.path = f"/hls/{space}/live.m3u8"
        self.base = base
        self.ticket = ticket
        self.count = count
        self.seconds = seconds
        self.target: tuple[int, int] | None = None
        self.part_end: dict[tuple[int, int], float] = {}
        self.held = 0
        self.connected = 0
        self.answers: list[tuple[tuple[int, int], float, int]] = []  # target, arrival, status
        self.failures = 0
        self.deadline = 0.0

    def request(self, target: tuple[int, int]) -> bytes:
        return (
            f"GET {self.path}?_HLS_msn={target[0]}&_HLS_part={target[1]} HTTP/1.1\r\n"
            f"Host: {self.host}:{self.port}\r\nCookie: townhall_ticket={self.ticket}\r\n\r\n"
        ).encode()

    async def follow(self, deadline: float) -> None:
        """One more listener, following part by part: when did each part appear, and what is
        the farthest the origin lets a request wait for (two segments past the edge, part 0)."""
        follower = Follower()
        async with httpx.AsyncClient(timeout=30, cookies={"townhall_ticket": self.ticket}) as c:
            r = await c.get(self.base + self.path)
            while time.time() < deadline + 10:
                pl = parse_media_playlist(r.text)
                for p in pl.parts:
                    self.part_end.setdefault(p.key, p.start + p.duration)
                self.target = (pl.segments[-1].msn + 2, 0)
                follower.update(pl)
                follower.arrived(pl.parts[-1], 0, time.time())  # only the newest part matters here
                msn, part = follower.blocking_request()
                r = await c.get(self.base + self.path, params={"_HLS_msn": msn, "_HLS_part": part})
                if r.status_code != 200:
                    await asyncio.sleep(0.1)
                    r = await c.get(self.base + self.path)

    async def listener(self, gate: asyncio.Semaphore) -> _HeldConnection | None:
        loop = asyncio.get_running_loop()
        try:
            async with gate:
                _, conn = await loop.create_connection(lambda: _HeldConnection(self), self.host, self.port)
        except OSError:
            self.failures += 1
            return None
        self.connected += 1
        return conn

    def sample(self, start: float, main_pid: int, rss_main: Callable[[], int]) -> dict[str, float]:
        return {
            "t": round(time.time() - start, 3),
            "held": self.held,
            "connected": self.connected,
            "rss_session": session_rss_bytes(main_pid),
            "rss_main": rss_main(),
        }

    async def run(self, server: Server) -> dict[str, Any]:
        samples: list[dict[str, float]] = []
        main_pid = server.proc.pid

        def rss_main() -> int:
            with contextlib.suppress(OSError, ValueError, IndexError):
                for line in Path(f"/proc/{main_pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
            return 0

        baseline = []
        for _ in range(8):
            baseline.append((session_rss_bytes(main_pid), rss_main()))
            await asyncio.sleep(0.25)
        start = time.time()
        self.deadline = start + 60 + self.seconds  # until every connection is open
        follower = asyncio.create_task(self.follow(self.deadline))
        while self.target is None:  # noqa: ASYNC110 - the follower's first playlist, polled
            await asyncio.sleep(0.05)
        gate = asyncio.Semaphore(256)
        tasks = [asyncio.create_task(self.listener(gate)) for _ in range(self.count)]
        connect_by = time.time() + 60
        while self.connected + self.failures < self.count and time.time() < connect_by:
            samples.append(self.sample(start, main_pid, rss_main))
            await asyncio.sleep(0.25)
        connect_s = time.time() - start
        conns = [
            c for c in await asyncio.gather(*tasks, return_exceptions=True) if isinstance(c, _HeldConnection)
        ]
        connected_rss = []
        for _ in range(4):
            connected_rss.append(rss_main())
            await asyncio.sleep(0.25)
        cpu0, t0 = server.cpu_seconds(), time.monotonic()
        self.deadline = time.time() + self.seconds
        for conn in conns:  # every connection first, then every request at once
            conn.ask()
        while time.time() < self.deadline + 6 and any(c.open for c in conns):
            samples.append(self.sample(start, main_pid, rss_main))
            await asyncio.sleep(0.25)
        cpu1, t1 = server.cpu_seconds(), time.monotonic()
        for conn in conns:
            conn.close()
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        base_connected = statistics.median(connected_rss)
        async with httpx.AsyncClient(timeout=30) as c:
            wake = wake_quantiles((await c.get(self.base + "/metrics")).text)
        base_session = statistics.median(b[0] for b in baseline)
        base_main = statistics.median(b[1] for b in baseline)
        peak = max(samples, key=lambda x: (x["held"], x["rss_session"]))
        ok = [(t, at) for t, at, status in self.answers if status == 200]
        late = [at - self.part_end[t] for t, at in ok if t in self.part_end]
        statuses: dict[str, int] = {}
        for _, _, status in self.answers:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        return {
            "listeners": self.count,
            "hold_seconds": self.seconds,
            "connected": self.connected,
            "seconds_to_connect_all": round(connect_s, 2),
            "connect_failures_or_resets": self.failures,
            "most_held": peak["held"],
            "rss_baseline_session_mib": round(base_session / 2**20, 1),
            "rss_baseline_main_mib": round(base_main / 2**20, 1),
            "rss_at_most_held_session_mib": round(peak["rss_session"] / 2**20, 1),
            "rss_at_most_held_main_mib": round(peak["rss_main"] / 2**20, 1),
            "rss_max_session_mib": round(max(x["rss_session"] for x in samples) / 2**20, 1),
            "rss_connected_main_mib": round(base_connected / 2**20, 1),
            "kib_per_connection": round((base_connected - base_main) / 1024 / max(1, self.connected), 2),
            "kib_per_held_request": round((peak["rss_main"] - base_main) / 1024 / max(1, peak["held"]), 2),
            "kib_per_held_request_on_top": round(
                (peak["rss_main"] - base_connected) / 1024 / max(1, peak["held"]), 2
            ),
            "answers": statuses,
            "answered_after_part_could_exist_s": summary(late),
            "origin_wake_to_written_s": wake,
            "server_cores": round((cpu1 - cpu0) / (t1 - t0), 3),
            "timeline": samples,
        }


# -- the run -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = dt.datetime.now(dt.UTC)
    fd_soft, fd_hard = raise_fd_limit()
    if fd_hard < args.held + 1000:
        raise SystemExit(
            f"bench_audience: the hard open-file limit ({fd_hard}) is too low for --held {args.held}"
        )
    load_before = os.getloadavg()
    busy0, own0, wall0 = busy_cpu_s(), own_cpu_s(), time.monotonic()
    with tempfile.TemporaryDirectory(prefix="townhall-bench-audience-") as tmp:
        workdir = Path(tmp)
        with townhall_server(
            workdir / "data", workdir / "townhall.log", MANY_ACCOUNTS_ENV, warn=say
        ) as server:
            s = live_space(server.base)
            playlist_now(server.base, s["space"], s["ticket"])
            rate_rows: dict[str, Any] = {"rows": []}
            latency: dict[str, Any] = {}
            held: dict[str, Any] = {}
            if "rates" in args.sections:
                say("1. origin rates beside nginx ...")
                rate_rows = rates(args, server, s, workdir)
            if "latency" in args.sections:
                say(f"2. mouth-to-ear: chirps over WHIP to the LL-HLS listener, {args.latency_seconds} s ...")
                latency = asyncio.run(mouth_to_ear(server.base, s, args.latency_seconds, args.chirp_interval))
            if "held" in args.sections:
                say(f"3. {args.held} blocking reloads held for {args.hold_seconds} s ...")
                import uvloop

                held = uvloop.run(
                    HeldLoad(server.base, s["space"], s["ticket"], args.held, args.hold_seconds).run(server)
                )
            log_tail = tail(workdir / "townhall.log", 200)
    other_cpu = (busy_cpu_s() - busy0) - (own_cpu_s() - own0)
    return {
        "benchmark": "audience",
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python bench/bench_audience.py", *sys.argv[1:]]),
        "git": git_state(),
        "machine": {
            **machine_facts("wrk", "nginx"),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "other_cpu_share": round(other_cpu / ((time.monotonic() - wall0) * (os.cpu_count() or 1)), 3),
            "open_files_limit": [fd_soft, fd_hard],
        },
        "settings": {
            "wrk": WrkSettings(args.threads, args.connections, args.duration, args.timeout).describe(),
            "warmup_s": args.warmup,
            "nginx_worker_processes": args.nginx_workers,
            "server_env": MANY_ACCOUNTS_ENV,
        },
        "rates": rate_rows,
        "latency": latency,
        "held": held,
        "server_log_errors": [ln for ln in log_tail.splitlines() if "Traceback" in ln or " ERROR " in ln],
    }


# -- reporting ---------------------------------------------------------------------------------


def tables(result: dict[str, Any]) -> str:
    if not (result["rates"]["rows"] and result["latency"] and result["held"]):
        summary_ = {"rates": result["rates"]["rows"], "latency": result["latency"], "held": result["held"]}
        return json.dumps(summary_, indent=1)[:6000]
    rows = [
        "| case | townhall req/s | p50 ms | p99 ms | nginx req/s | p50 ms | p99 ms "
        "| ratio (median of rounds) | bare uvicorn req/s "
        "| req per CPU-s: townhall / nginx / bare uvicorn | ratio per CPU-s "
        "| townhall ÷ bare uvicorn per CPU-s | failed (townhall / nginx / uvicorn) |",
        "|" + "---|" * 13,
    ]
    for r in result["rates"]["rows"]:
        t, p, f = r["townhall"], r["peer"], r["uvicorn_floor"]
        rows.append(
            f"| {r['case']} | {fmt_rate(t['rps'])} | {t['p50_ms']:.1f} | {t['p99_ms']:.1f} "
            f"| {fmt_rate(p['rps'])} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | {fmt_ratio(r['ratio'])} "
            f"| {fmt_rate(f['rps'])} | {fmt_rate(t['requests_per_cpu_s'])} "
            f"/ {fmt_rate(p['requests_per_cpu_s'])} / {fmt_rate(f['requests_per_cpu_s'])} "
            f"| {fmt_ratio(r['ratio_per_cpu'])} "
            f"| {fmt_ratio(r['ratio_to_floor_per_cpu'])} | {errors_of(t)} / {errors_of(p)} / {errors_of(f)} |"
        )
    lat = result["latency"]
    m, st, e = lat["mouth_to_ear_s"], lat["mouth_to_stream_s"], lat["part_end_to_arrival_s"]
    listener = lat["listener"]["latency"] or {}
    rows += [
        "",
        "| latency (s) | n | median | p95 | min | max |",
        "|---|---|---|---|---|---|",
        f"| mouth to ear (chirp over WHIP → decoded in the LL-HLS listener) | {m.get('n')} "
        f"| {m.get('median')} | {m.get('p95')} | {m.get('min')} | {m.get('max')} |",
        f"| mouth to stream time (WHIP, jitter buffer, mixer) | {st.get('n')} | {st.get('median')} "
        f"| {st.get('p95')} | {st.get('min')} | {st.get('max')} |",
        f"| part end to arrival at the listener | {e.get('n')} | {e.get('median')} | {e.get('p95')} "
        f"| {e.get('min')} | {e.get('max')} |",
        f"| listener behind live (arrival − part start) | {listener.get('count')} | {listener.get('median')} "
        f"| {listener.get('p95')} | {listener.get('min')} | {listener.get('max')} |",
    ]
    h = result["held"]
    late = h["answered_after_part_could_exist_s"]
    rows += [
        "",
        "| held reloads | most held at once | RSS baseline MiB (origin process / all) | RSS at most held MiB "
        "| KiB per held request | answers | answered after the part could exist, p50 / p99 s "
        "| server cores |",
        "|---|---|---|---|---|---|---|---|",
        f"| {h['listeners']:,} connections, {h['hold_seconds']} s | {h['most_held']:,} "
        f"| {h['rss_baseline_main_mib']} / {h['rss_baseline_session_mib']} "
        f"| {h['rss_at_most_held_main_mib']} / {h['rss_at_most_held_session_mib']} "
        f"| {h['kib_per_held_request']} | {h['answers']} | {late.get('median')} / "
        f"{late.get('p99')} | {h['server_cores']} |",
    ]
    return "\n".join(rows)


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), layout="constrained")
    ax = axes[0]
    rows = result["rates"]["rows"]
    x = np.arange(len(rows))
    series = [
        ("townhall", "townhall origin", "#3b6ea8"),
        ("uvicorn_floor", "bare ASGI app, same uvicorn", "#8fb3d9"),
        ("peer", "nginx, same bytes from disk", "#9aa5b1"),
    ]
    for k, (key, name, color) in enumerate(series):
        per_cpu = [r[key]["requests_per_cpu_s"] for r in rows]
        bars = ax.bar(x + (k - 1) * 0.27, per_cpu, 0.27, label=name, color=color)
        for bar, v in zip(bars, per_cpu, strict=True):
            at = (bar.get_x() + bar.get_width() / 2, v)
            ax.annotate(fmt_rate(v), at, ha="center", va="bottom", fontsize=7)
    ticks = [f"{r['object']}\nratio per CPU-s {fmt_ratio(r['ratio_per_cpu'])}" for r in rows]
    ax.set_xticks(x, ticks)
    ax.set_ylabel("requests per CPU-second of the serving process")
    ax.set_title(f"origin vs nginx, one process each, wrk {result['settings']['wrk']}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)

    ax = axes[1]
    lat = result["latency"]
    m2e = sorted(c["ear"] - c["mouth"] for c in lat["chirps"])
    stream = sorted(c["stream"] - c["mouth"] for c in lat["chirps"])
    if m2e:
        ax.plot(m2e, np.linspace(0, 1, len(m2e)), label="mouth → ear (LL-HLS listener)")
        ax.plot(stream, np.linspace(0, 1, len(stream)), label="mouth → stream time (to the packager)")
    ax.axvline(2.0, color="#c44", ls="--", lw=1, label="target 2.0 s median")
    ax.set_xlabel("seconds")
    ax.set_ylabel("fraction of chirps")
    ax.set_title(f"mouth-to-ear, {lat['chirps_matched']} chirps", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)

    ax = axes[2]
    tl = result["held"]["timeline"]
    t = [s["t"] for s in tl]
    ax.plot(t, [s["held"] for s in tl], color="#3b6ea8", label="requests held")
    ax.set_xlabel("seconds")
    ax.set_ylabel("blocking reloads held open")
    ax2 = ax.twinx()
    ax2.plot(t, [s["rss_main"] / 2**20 for s in tl], color="#c47a2c", label="origin RSS")
    ax2.set_ylabel("origin process RSS, MiB")
    ax.set_title(f"{result['held']['listeners']:,} listeners on blocking reload", fontsize=9)
    ax.grid(alpha=0.3)
    save_figure(
        fig,
        path,
        dpi=120,
        title=f"townhall audience, {result['machine']['cpus']} cores, loopback, {result['date'][:16]} UTC",
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_wrk_options(parser, duration=5, warmup=1, connections=64)
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds of the rate runs (default 3)"
    )
    parser.add_argument("--latency-seconds", type=float, default=40.0, help="chirp run length (default 40)")
    parser.add_argument(
        "--chirp-interval", type=float, default=1.0, help="seconds between chirps (default 1)"
    )
    parser.add_argument("--held", type=int, default=10_000, help="blocking reloads held open (default 10000)")
    parser.add_argument(
        "--hold-seconds", type=float, default=20.0, help="how long they are held (default 20)"
    )
    parser.add_argument(
        "--sections",
        type=lambda v: v.split(","),
        default=["rates", "latency", "held"],
        help="which measurements, comma-separated (default rates,latency,held)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if tools_missing("bench_audience", "wrk", "nginx"):
        return 2
    result = run(args)
    json_path, png_path = write_json(args.out / "audience.json", result), args.out / "audience.png"
    if result["rates"]["rows"] and result["latency"] and result["held"]:
        plot(result, png_path)
    print()
    machine = result["machine"]
    print(f"townhall audience: {result['date']}, {machine['cpus']} cores ({machine['cpu_model']})")
    print(f"other processes used {machine['other_cpu_share']:.0%} of the cores during the run\n")
    print(tables(result))
    print(f"\nwrote {shown(json_path)}\nwrote {shown(png_path)}")
    failed = sum(errors_of(r["townhall"]) + errors_of(r["peer"]) for r in result["rates"]["rows"])
    if failed or result["server_log_errors"]:
        print(f"bench_audience: {failed} failed requests; server log errors: {result['server_log_errors']}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
