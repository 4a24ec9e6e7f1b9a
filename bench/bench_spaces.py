"""Spaces benchmark: fan-out with a million followers, the live-state document, reactions.

Run it from the repository root with the project's venv::

    .venv/bin/python bench/bench_spaces.py

Like ``bench_control.py`` (with the helpers of ``_common.py``), it needs ``wrk`` and ``nginx`` (Debian:
``apt-get install -y wrk nginx``) and matplotlib in the venv. Everything runs on 127.0.0.1 and
stops by itself; with the default settings the whole run takes about 90 seconds (plus any
``--wait-quiet``).

Method
------
Setup. ``townhall serve`` is started once on a fresh data directory so that it migrates the
SQLite database; two hosts, ``big_host`` and ``small_host``, are registered and logged in over
HTTP, and the server is stopped. Then, in one SQLite transaction (a recursive CTE), the script
inserts 1,000,000 synthetic accounts (dummy password hash) following ``big_host`` and 10 more
following ``small_host``, and session rows (SHA-256 of a fresh token, as the server stores them)
for the first 1,000 of the big host's followers and one of the small host's. The server is
restarted on that database with ``TOWNHALL_POST_LIMIT_PER_ACCOUNT=1000000/minute`` (the default,
30 a minute, would refuse most of the posts below); the reaction limit is left at its default
(5 a second per account), and any 429 is counted and reported.

1. **Fan-out cost.** One keep-alive HTTP/1.1 connection per client, calls made one at a time,
   the two hosts alternating (ABBA order) so that drift hits both equally: ``POST /api/v1/posts``,
   ``POST /api/v1/spaces`` followed by ``POST /api/v1/spaces/{id}/start`` (which writes the
   "is live" announcement post), the home feed ``GET /api/v1/feed`` of a follower of each, and
   the profile ``GET /api/v1/accounts/{handle}`` (which counts followers). Reported: median and
   p99 of ``--samples`` calls after a few uncounted ones, and the ratio big ÷ small. Fan-out on
   read makes a post one row, so the write ratios should be about 1.
2. **Live-state document** (``GET /api/v1/spaces/{id}/state`` of a live space) with wrk, beside
   nginx serving the very same bytes from disk, as ``bench_control.py`` does for reads (same wrk
   settings for both, uncounted warm-up first). The server builds the document at most once a
   second; how many builds happened is not observable from outside, so only rates and latencies
   are reported.
3. **Reactions.** The host holds ``GET /api/v1/spaces/{id}/events`` (SSE) open in a thread and
   records every ``reactions`` message (one per space per second by design) with its arrival
   time. wrk then sends ``POST .../reactions`` ``{"emoji": "👏"}`` over ``--reaction-connections``
   connections (default 1,000: as many as reacting accounts) with a Lua script that rotates the
   1,000 bearer tokens (each wrk thread from its own offset), after an uncounted warm-up; then a
   lighter load (``--light-connections``) to show that the broadcast rate does not follow the
   reaction rate. After each run the script waits until the server has drained (its own request
   counter in ``/metrics`` stops moving) and the open second has closed. Reported:

   - reactions accepted per second: the server's rate under load, the mean of the per-second
     counts (from the SSE messages) of the whole seconds inside wrk's run; and wrk's own rate of
     202 answers;
   - 429s and other failures, from the server's counters (``/metrics``) and wrk's;
   - SSE ``reactions`` messages per second of activity, the most received in any one
     wall-clock second, and whether any second was broadcast twice;
   - the reconciliation: the sum of the counts in the messages against the accepted reactions,
     i.e. the server's own count of 202 answers on that route (``/metrics``). wrk stops with a
     request in flight on every connection, which the server completes and counts but wrk never
     sees, so wrk's 202 count is lower by up to the number of connections. The state document's
     cumulative ``totals`` are checked as a third view;
   - latency three ways, because with 1,000 connections in a closed loop wrk's percentiles
     describe only the requests that completed before it stopped, and an unfair server lets some
     connections cycle fast while others wait: wrk's p50/p99, the server's own histogram for the
     route (``townhall_http_request_seconds``; the bucket the percentile falls in) and the mean
     time in the loop by Little's law (connections ÷ accepted rate).

wrk, the server and nginx share the machine's cores, and nothing keeps other programs off them:
the run reports the CPU time used meanwhile by processes other than its own
(``other_cpu_share``: /proc/stat's busy time minus this process's and its children's), and
``--wait-quiet N`` first waits up to N seconds for the machine to be idle. Latencies are
closed-loop figures.

Output: tables on stdout, ``bench/results/spaces.json`` and ``bench/results/spaces.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import http.client
import json
import os
import socket
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from _common import (
    HOST,
    PASSWORD,
    WRK_DONE_LUA,
    Comparison,
    Measurement,
    WrkSettings,
    add_wrk_options,
    busy_cpu_s,
    comparison_table,
    fmt_rate,
    fmt_ratio,
    git_state,
    lua_long_string,
    machine_facts,
    measurement_of,
    memory_gib,
    nginx_serving,
    own_cpu_s,
    plot_pair,
    pyplot,
    run_wrk,
    save_figure,
    shown,
    tools_missing,
    townhall_server,
    wait_quiet,
    write_lua,
    wrk_summary,
)

from townhall.security.tokens import new_token, token_digest

BIG, SMALL = "big_host", "small_host"
SMALL_FOLLOWERS = 10
EMOJI = "👏"
SERVER_ENV = {"TOWNHALL_POST_LIMIT_PER_ACCOUNT": "1000000/minute"}
REACTIONS_ROUTE = "/api/v1/spaces/{space_id}/reactions"
SHORT_NAMES = {
    "POST /api/v1/posts": "POST /posts",
    "POST /api/v1/spaces + /start": "POST /spaces\n+ /start",
    "GET /api/v1/feed (a follower's)": "GET /feed\n(a follower's)",
    "GET /api/v1/accounts/{handle}": "GET /accounts/{handle}\n(profile: counts)",
}


# -- a keep-alive client -----------------------------------------------------------------------


class Client:
    """One keep-alive HTTP/1.1 connection, as one app would hold it; calls one at a time."""

    def __init__(self, base: str) -> None:
        parts = urlsplit(base)
        self.host, self.port = parts.hostname or HOST, parts.port or 80
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None
    ) -> tuple[int, bytes, float, http.client.HTTPMessage]:
        """Status, body, seconds from sending to the last byte, headers."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        for attempt in (1, 2):
            start = time.perf_counter()
            try:
                self.conn.request(method, path, body=data, headers=headers)
                response = self.conn.getresponse()
                payload = response.read()
                return response.status, payload, time.perf_counter() - start, response.headers
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # The server closed an idle keep-alive connection before reading this request.
                self.conn.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def expect(
        self,
        status: int,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        token: str | None = None,
    ) -> tuple[bytes, float]:
        got, payload, elapsed, _ = self.call(method, path, body, token)
        if got != status:
            raise RuntimeError(f"{method} {path} answered {got}, expected {status}: {payload[:300]!r}")
        return payload, elapsed

    def close(self) -> None:
        self.conn.close()


# -- the server --------------------------------------------------------------------------------


@contextlib.contextmanager
def townhall_node(data: Path, log: Path, env: dict[str, str]) -> Iterator[str]:
    """``townhall serve`` on a free loopback port with ``data`` and ``env``; yield its base URL."""
    with townhall_server(data, log, env, ready_s=60.0, grace_s=15.0, append=True) as server:
        yield server.base


def _labels(text: str) -> dict[str, str]:
    return {k: v.strip('"') for k, v in (part.split("=", 1) for part in text.split('",') if "=" in part)}


def scrape(base: str) -> tuple[Counter[tuple[str, str, str]], dict[str, dict[float, float]]]:
    """From the server's ``/metrics``: ``townhall_http_requests_total`` by (method, route, status),
    and the cumulative buckets of ``townhall_http_request_seconds`` by route."""
    client = Client(base)
    try:
        payload, _ = client.expect(200, "GET", "/metrics")
    finally:
        client.close()
    counts: Counter[tuple[str, str, str]] = Counter()
    buckets: dict[str, dict[float, float]] = {}
    for line in payload.decode().splitlines():
        name, _, rest = line.partition("{")
        if name not in ("townhall_http_requests_total", "townhall_http_request_seconds_bucket"):
            continue
        labels_text, value = rest.rsplit("} ", 1)
        labels = _labels(labels_text)
        if name == "townhall_http_requests_total":
            counts[(labels.get("method", ""), labels.get("route", ""), labels.get("status", ""))] += float(
                value
            )
        else:
            buckets.setdefault(labels.get("route", ""), {})[float(labels["le"])] = float(value)
    return counts, buckets


def request_counts(base: str) -> Counter[tuple[str, str, str]]:
    return scrape(base)[0]


def bucket_quantiles(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """p50 and p99 of the requests between two scrapes, as the histogram bucket they fall in."""
    delta = sorted((le, after.get(le, 0.0) - before.get(le, 0.0)) for le in after)
    total = delta[-1][1] if delta else 0.0
    out: dict[str, Any] = {"n": int(total)}
    for name, q in (("p50_le_s", 0.5), ("p99_le_s", 0.99)):
        out[name] = next((le for le, n in delta if total and n >= q * total), None)
    return out


def server_errors(counts: Counter[tuple[str, str, str]]) -> dict[str, int]:
    """Requests the server answered with a 5xx, by "METHOD route status"."""
    return {f"{m} {r} {s}": int(n) for (m, r, s), n in counts.items() if s.startswith("5") and n}


# -- setup -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Population:
    host_tokens: dict[str, str]
    reactor_tokens: list[str]
    reader_tokens: dict[str, str]  # host handle -> token of one of its followers
    followers: int
    load_seconds: float
    db_bytes: int


def register_hosts(base: str) -> dict[str, str]:
    client = Client(base)
    tokens = {}
    try:
        for handle in (BIG, SMALL):
            client.expect(201, "POST", "/api/v1/accounts", {"handle": handle, "password": PASSWORD})
            payload, _ = client.expect(
                200, "POST", "/api/v1/sessions", {"handle": handle, "password": PASSWORD}
            )
            tokens[handle] = json.loads(payload)["token"]
    finally:
        client.close()
    return tokens


def bulk_load(db_path: Path, followers: int, reactors: int) -> tuple[list[str], dict[str, str], float]:
    """Insert the synthetic followers, their follows and sessions in one transaction."""
    started = time.perf_counter()
    now = time.time()
    expires = now + 30 * 24 * 3600
    db = sqlite3.connect(db_path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA cache_size=-262144")
        db.execute("BEGIN")
        ids = dict(db.execute("SELECT handle, id FROM accounts WHERE handle IN (?, ?)", (BIG, SMALL)))
        first = db.execute("SELECT coalesce(max(id), 0) + 1 FROM accounts").fetchone()[0]
        # f1 .. fN follow the big host, s1 .. s10 the small one; ids are consecutive from `first`.
        for prefix, count in (("f", followers), ("s", SMALL_FOLLOWERS)):
            db.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
                "INSERT INTO accounts (handle, handle_key, password_hash, is_admin, created_at) "
                "SELECT ? || i, ? || i, '!synthetic', 0, ? FROM n",
                (count, prefix, prefix, now),
            )
        db.execute(
            "INSERT INTO follows (follower_id, followee_id, created_at) "
            "SELECT id, ?, ? FROM accounts WHERE id >= ? AND id < ?",
            (ids[BIG], now, first, first + followers),
        )
        db.execute(
            "INSERT INTO follows (follower_id, followee_id, created_at) "
            "SELECT id, ?, ? FROM accounts WHERE id >= ?",
            (ids[SMALL], now, first + followers),
        )
        # The app keeps follower counters with each follow; rows inserted here must move them too.
        db.execute(
            "UPDATE accounts SET followers_count = "
            "(SELECT count(*) FROM follows WHERE followee_id = accounts.id) WHERE id IN (?, ?)",
            (ids[BIG], ids[SMALL]),
        )
        db.execute("UPDATE accounts SET following_count = 1 WHERE id >= ?", (first,))
        session_owners = [first + i for i in range(reactors)] + [first + followers]
        tokens = [new_token() for _ in session_owners]
        db.executemany(
            "INSERT INTO sessions (account_id, token_hash, created_at, expires_at, revoked_at) "
            "VALUES (?, ?, ?, ?, NULL)",
            [
                (owner, token_digest(tok), now, expires)
                for owner, tok in zip(session_owners, tokens, strict=True)
            ],
        )
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return tokens[:reactors], {BIG: tokens[0], SMALL: tokens[-1]}, time.perf_counter() - started


# -- 1. fan-out --------------------------------------------------------------------------------


def summarize(samples: list[float]) -> dict[str, Any]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {
        "n": len(samples),
        "p50_ms": round(statistics.median(samples) * 1e3, 3),
        "p99_ms": round(cuts[98] * 1e3, 3),
        "mean_ms": round(statistics.fmean(samples) * 1e3, 3),
        "max_ms": round(max(samples) * 1e3, 3),
    }


def fanout(base: str, pop: Population, samples: int, warmup: int) -> list[dict[str, Any]]:
    client = Client(base)
    counter = iter(range(10**9))

    def post(host: str) -> float:
        body = {"text": f"bench post {next(counter)} by {host}"}
        return client.expect(201, "POST", "/api/v1/posts", body, pop.host_tokens[host])[1]

    def space(host: str) -> float:
        token = pop.host_tokens[host]
        payload, created = client.expect(201, "POST", "/api/v1/spaces", {"title": f"bench {host}"}, token)
        space_id = json.loads(payload)["id"]
        started = client.expect(200, "POST", f"/api/v1/spaces/{space_id}/start", None, token)[1]
        # A live space runs a stage (20 ms mixer clock, AAC packager) from its first second;
        # two hundred of them would load the node and skew the later calls. End each one,
        # outside the timed part.
        client.expect(200, "POST", f"/api/v1/spaces/{space_id}/end", None, token)
        return created + started

    def feed(host: str) -> float:
        payload, elapsed = client.expect(200, "GET", "/api/v1/feed", None, pop.reader_tokens[host])
        first = json.loads(payload)["posts"][0]
        assert first["author"] == host, f"a follower of {host} must see {host}'s posts first: {first}"
        return elapsed

    def profile(host: str) -> float:
        return client.expect(200, "GET", f"/api/v1/accounts/{host}")[1]

    cases: list[tuple[str, Callable[[str], float]]] = [
        ("POST /api/v1/posts", post),
        ("POST /api/v1/spaces + /start", space),
        ("GET /api/v1/feed (a follower's)", feed),
        ("GET /api/v1/accounts/{handle}", profile),
    ]
    out = []
    try:
        for name, op in cases:
            print(f"  {name}: {warmup} + {samples} calls per host ...", flush=True)
            timings: dict[str, list[float]] = {BIG: [], SMALL: []}
            for i in range(warmup + samples):
                order = (BIG, SMALL) if i % 4 in (0, 3) else (SMALL, BIG)
                for host in order:
                    elapsed = op(host)
                    if i >= warmup:
                        timings[host].append(elapsed)
            big, small = summarize(timings[BIG]), summarize(timings[SMALL])
            out.append(
                {
                    "case": name,
                    "big": big,
                    "small": small,
                    "ratio_p50": round(big["p50_ms"] / small["p50_ms"], 4),
                    "ratio_p99": round(big["p99_ms"] / small["p99_ms"], 4),
                }
            )
    finally:
        client.close()
    return out


# -- 3. reactions ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SseEvent:
    at: float  # time.time() of arrival
    kind: str
    data: bytes


class SseRecorder(threading.Thread):
    """Holds one SSE stream open and records every event with its arrival time."""

    def __init__(self, base: str, path: str, token: str) -> None:
        super().__init__(name="sse", daemon=True)
        parts = urlsplit(base)
        self.conn = http.client.HTTPConnection(parts.hostname or HOST, parts.port or 80, timeout=60)
        self.path, self.token = path, token
        self.events: list[SseEvent] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.closing = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        try:
            self.conn.request(
                "GET",
                self.path,
                headers={"Authorization": f"Bearer {self.token}", "Accept": "text/event-stream"},
            )
            response = self.conn.getresponse()
            if response.status != 200:
                self.error = f"GET {self.path} answered {response.status}: {response.read()[:300]!r}"
                return
            kind, data = "message", []
            while True:
                line = response.readline()
                if not line:
                    if not self.closing.is_set():
                        self.error = "the event stream ended"
                    return
                line = line.rstrip(b"\r\n")
                if not line:
                    if data:
                        with self.lock:
                            self.events.append(SseEvent(time.time(), kind, b"\n".join(data)))
                        if kind == "state":
                            self.ready.set()
                    kind, data = "message", []
                elif line.startswith(b":"):
                    continue
                elif line.startswith(b"event:"):
                    kind = line[6:].strip().decode()
                elif line.startswith(b"data:"):
                    data.append(line[5:].removeprefix(b" "))
        except OSError as exc:
            if not self.closing.is_set():
                self.error = f"event stream failed: {exc!r}"
        finally:
            self.ready.set()

    def snapshot(self) -> list[SseEvent]:
        with self.lock:
            return list(self.events)

    def close(self) -> None:
        self.closing.set()
        if self.conn.sock is not None:
            with contextlib.suppress(OSError):
                self.conn.sock.shutdown(socket.SHUT_RDWR)
        self.join(timeout=5)
        self.conn.close()


REACTION_LUA = r"""
local tokens = {
%(tokens)s
}
local body = %(body)s
local threads = {}
local per_thread = math.floor(#tokens / %(threads)d)

function setup(thread)
  thread:set("offset", #threads * per_thread)
  table.insert(threads, thread)
end

function init(args)
  i = offset
  c202, c429, cother = 0, 0, 0
end

function request()
  i = i %% #tokens + 1
  local headers = {["Authorization"] = "Bearer " .. tokens[i], ["Content-Type"] = "application/json"}
  return wrk.format("POST", nil, headers, body)
end

function response(status, headers, body)
  if status == 202 then c202 = c202 + 1 elseif status == 429 then c429 = c429 + 1 else cother = cother + 1 end
end
"""

REACTION_DONE_LUA = r"""
local summary_done = done
done = function(summary, latency, requests)
  summary_done(summary, latency, requests)
  local a, b, o = 0, 0, 0
  for _, t in ipairs(threads) do
    a = a + t:get("c202"); b = b + t:get("c429"); o = o + t:get("cother")
  end
  io.write(string.format('BENCH_STATUS {"202":%d,"429":%d,"other":%d}\n', a, b, o))
end
"""


def write_reaction_lua(directory: Path, tokens: list[str], threads: int) -> Path:
    body = lua_long_string(json.dumps({"emoji": EMOJI}, ensure_ascii=False))
    script = REACTION_LUA % {
        "tokens": ",\n".join(f'"{t}"' for t in tokens),
        "body": body,
        "threads": threads,
    }
    path = directory / "reactions.lua"
    path.write_text(script + WRK_DONE_LUA + REACTION_DONE_LUA)
    return path


def run_wrk_statuses(
    name: str, url: str, script: Path, settings: WrkSettings
) -> tuple[Measurement, dict[str, int]]:
    """Like ``run_wrk``, also returning the Lua script's count of answers by status; the rate
    counts 202s only."""
    lines = wrk_summary(url, script, settings)
    if "STATUS" not in lines:
        raise RuntimeError(f"wrk printed no status counts: {lines}")
    raw, statuses = lines["JSON"], lines["STATUS"]
    return measurement_of(name, raw, statuses["202"], f"wrk {settings.describe()}"), statuses


def settle(base: str, key: tuple[str, str, str], quiet_s: float = 1.5, limit_s: float = 30.0) -> None:
    """Wait until the server's count for ``key`` has not moved for ``quiet_s``, then for the open
    reaction second to close (the hub's tick runs 5 ms after each second)."""
    deadline = time.monotonic() + limit_s
    last, since = request_counts(base)[key], time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now_count = request_counts(base)[key]
        if now_count != last:
            last, since = now_count, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    time.sleep(1.2)


def reaction_run(
    base: str,
    space_id: str,
    sse: SseRecorder,
    label: str,
    script: Path,
    settings: WrkSettings,
) -> dict[str, Any]:
    path = f"/api/v1/spaces/{space_id}/reactions"
    key = ("POST", REACTIONS_ROUTE, "202")
    (before, hist_before), seen = scrape(base), len(sse.snapshot())
    started = time.time()
    print(f"  {label}: wrk POST {path} {settings.describe()} ...", flush=True)
    measurement, statuses = run_wrk_statuses(f"townhall reactions ({label})", base + path, script, settings)
    ended = time.time()
    settle(base, key)
    after, hist_after = scrape(base)
    delta = {k: int(after[k] - before[k]) for k in after if k[1] == REACTIONS_ROUTE and after[k] != before[k]}
    accepted = delta.get(key, 0)
    events = [e for e in sse.snapshot()[seen:] if e.kind == "reactions"]
    tallies = [json.loads(e.data) for e in events]
    seconds = [t["second"] for t in tallies]
    total = sum(sum(t["counts"].values()) for t in tallies)
    emoji_total = sum(t["counts"].get(EMOJI, 0) for t in tallies)
    # The server's rate under load: the tallies of the whole seconds inside wrk's run.
    full = [sum(t["counts"].values()) for t in tallies if started <= t["second"] and t["second"] + 1 <= ended]
    span = seconds[-1] - seconds[0] + 1 if seconds else 0
    per_wall_second = Counter(int(e.at) for e in events)
    lags = [e.at - (t["second"] + 1) for t, e in zip(tallies, events, strict=True)]
    return {
        "load": label,
        "started": round(started, 3),
        "ended": round(ended, 3),
        "wrk": dataclasses.asdict(measurement),
        "wrk_statuses": statuses,
        "server_statuses": {s: n for (_m, _r, s), n in sorted(delta.items())},
        "accepted": accepted,
        "accepted_per_s": round(statistics.fmean(full), 1)
        if full
        else round(accepted / (ended - started), 1),
        "accepted_per_s_basis": f"mean of {len(full)} whole seconds" if full else "accepted / wrk window",
        "rejected_429": delta.get(("POST", REACTIONS_ROUTE, "429"), 0),
        "in_flight_at_wrk_stop": accepted - statuses["202"],
        # Time inside the server (ASGI app, from the first byte it handles to the last it sends).
        "server_latency": bucket_quantiles(hist_before.get(REACTIONS_ROUTE, {}), hist_after[REACTIONS_ROUTE]),
        # Little's law on the server's rate: mean time a request spends in the closed loop.
        "littles_law_mean_ms": round(settings.connections / statistics.fmean(full) * 1e3, 1)
        if full
        else None,
        "window_s": round(ended - started, 3),
        "broadcasts": len(events),
        "seconds_with_reactions": span,
        "broadcasts_per_s": round(len(events) / span, 3) if span else 0.0,
        "max_broadcasts_in_one_second": max(per_wall_second.values(), default=0),
        "broadcast_lag_ms": {
            "p50": round(statistics.median(lags) * 1e3, 1) if lags else None,
            "max": round(max(lags) * 1e3, 1) if lags else None,
        },
        "duplicate_seconds": len(seconds) - len(set(seconds)),
        "sum_of_counts": total,
        "sum_of_counts_matches": total == accepted and emoji_total == total,
        "timeline": [
            {"second": t["second"], "count": sum(t["counts"].values()), "arrived": round(e.at, 3)}
            for t, e in zip(tallies, events, strict=True)
        ],
    }


# -- the run -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    reads = WrkSettings(args.threads, args.connections, args.duration, args.timeout)
    heavy = WrkSettings(args.threads, args.reaction_connections, args.duration, args.timeout)
    light = WrkSettings(args.threads, args.light_connections, args.light_duration, args.timeout)
    started = dt.datetime.now(dt.UTC)
    if args.wait_quiet:
        print(f"waiting up to {args.wait_quiet} s for the machine to be quiet ...", flush=True)
        print(f"  waited {wait_quiet(args.wait_quiet):.0f} s", flush=True)
    load_before = os.getloadavg()
    busy_before, own_before, wall_before = busy_cpu_s(), own_cpu_s(), time.monotonic()
    git = git_state()

    with tempfile.TemporaryDirectory(prefix="townhall-bench-spaces-") as tmp:
        workdir = Path(tmp)
        data, log = workdir / "data", workdir / "townhall.log"

        print("townhall serve (first start: migrate, register the two hosts) ...", flush=True)
        with townhall_node(data, log, {}) as base:
            host_tokens = register_hosts(base)
        print(
            f"bulk load: {args.followers:,} followers of {BIG}, {SMALL_FOLLOWERS} of {SMALL} ...", flush=True
        )
        reactor_tokens, reader_tokens, load_s = bulk_load(data / "townhall.db", args.followers, args.reactors)
        pop = Population(
            host_tokens,
            reactor_tokens,
            reader_tokens,
            args.followers,
            load_s,
            (data / "townhall.db").stat().st_size,
        )
        print(f"  {load_s:.1f} s, database {pop.db_bytes / 2**20:.0f} MiB", flush=True)

        print(f"townhall serve (with {' '.join(f'{k}={v}' for k, v in SERVER_ENV.items())}) ...", flush=True)
        with townhall_node(data, log, SERVER_ENV) as base:
            client = Client(base)
            counts = {
                h: json.loads(client.expect(200, "GET", f"/api/v1/accounts/{h}")[0])["followers"]
                for h in (BIG, SMALL)
            }
            if counts != {BIG: args.followers, SMALL: SMALL_FOLLOWERS}:
                raise RuntimeError(f"follower counts seen by the server: {counts}")
            print("1. fan-out", flush=True)
            fan = fanout(base, pop, args.samples, args.sample_warmup)

            payload, _ = client.expect(
                201, "POST", "/api/v1/spaces", {"title": "bench room"}, host_tokens[BIG]
            )
            space_id = json.loads(payload)["id"]
            client.expect(200, "POST", f"/api/v1/spaces/{space_id}/start", None, host_tokens[BIG])
            state_path = f"/api/v1/spaces/{space_id}/state"
            status, state_body, _, state_headers = client.call("GET", state_path)
            assert status == 200, (status, state_body)
            client.close()

            print("2. live-state document", flush=True)
            get_lua = write_lua(workdir, "get")
            print(f"  wrk GET {state_path} (townhall) {reads.describe()} ...", flush=True)
            run_wrk("warm-up", base + state_path, get_lua, reads, args.warmup)
            state_townhall = run_wrk("townhall GET state", base + state_path, get_lua, reads)

            print(f"3. reactions: {args.reactors:,} accounts, the host on SSE", flush=True)
            sse = SseRecorder(base, f"/api/v1/spaces/{space_id}/events", host_tokens[BIG])
            sse.start()
            if not sse.ready.wait(10) or sse.error:
                raise RuntimeError(sse.error or "no state event on the SSE stream within 10 s")
            reaction_lua = write_reaction_lua(workdir, reactor_tokens, args.threads)
            react_url = f"{base}/api/v1/spaces/{space_id}/reactions"
            warm = WrkSettings(args.threads, args.reaction_connections, args.warmup, args.timeout)
            print(f"  warm-up {warm.describe()} ...", flush=True)
            run_wrk_statuses("warm-up", react_url, reaction_lua, warm)
            settle(base, ("POST", REACTIONS_ROUTE, "202"))
            reactions = [
                reaction_run(
                    base, space_id, sse, f"{args.reaction_connections} clients", reaction_lua, heavy
                ),
                reaction_run(base, space_id, sse, f"{args.light_connections} clients", reaction_lua, light),
            ]
            sse_error = sse.error
            sse.close()
            time.sleep(1.1)  # the document is rebuilt at most once a second
            client = Client(base)
            doc = json.loads(client.expect(200, "GET", state_path)[0])
            client.close()
            final_counts = request_counts(base)
            all_accepted = int(final_counts[("POST", REACTIONS_ROUTE, "202")])

        print(f"nginx (worker_processes {args.nginx_workers}) ...", flush=True)
        # A directory of its own: nginx's workers (user nobody) must be able to walk to the files.
        www = Path(tempfile.mkdtemp(prefix="www-", dir=workdir))
        workdir.chmod(0o711)
        with nginx_serving({state_path: state_body}, args.nginx_workers, www) as nginx_base:
            client = Client(nginx_base)
            assert client.expect(200, "GET", state_path)[0] == state_body, "nginx must serve the same bytes"
            client.close()
            print(f"  wrk GET {state_path} (nginx) {reads.describe()} ...", flush=True)
            run_wrk("warm-up", nginx_base + state_path, get_lua, reads, args.warmup)
            state_nginx = run_wrk("nginx, same bytes", nginx_base + state_path, get_lua, reads)
        log_text = log.read_text(errors="replace")
    # CPU that something else on the machine used meanwhile (other users, other benchmarks).
    other_cpu = (busy_cpu_s() - busy_before) - (own_cpu_s() - own_before)
    wall = time.monotonic() - wall_before

    return {
        "benchmark": "spaces",
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python bench/bench_spaces.py", *sys.argv[1:]]),
        "git": git,
        "machine": {
            **machine_facts("wrk", "nginx"),
            "memory_gib": memory_gib(),
            "sqlite": sqlite3.sqlite_version,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "other_cpu_s": round(other_cpu, 1),
            "other_cpu_share": round(other_cpu / (wall * (os.cpu_count() or 1)), 3),
        },
        "settings": {
            "followers": args.followers,
            "small_host_followers": SMALL_FOLLOWERS,
            "reactors": args.reactors,
            "samples": args.samples,
            "sample_warmup": args.sample_warmup,
            "wrk_reads": reads.describe(),
            "wrk_reactions": heavy.describe(),
            "wrk_reactions_light": light.describe(),
            "warmup_s": args.warmup,
            "nginx_worker_processes": args.nginx_workers,
            "server_env": SERVER_ENV,
            "reaction_limit_per_account": "5/second (default)",
        },
        "setup": {
            "bulk_load_s": round(pop.load_seconds, 2),
            "database_mib": round(pop.db_bytes / 2**20, 1),
            "followers_reported": counts,
        },
        "fanout": fan,
        "state_document": {
            **Comparison(
                f"GET /api/v1/spaces/{{id}}/state ({len(state_body)} B)", state_townhall, state_nginx
            ).as_json(),
            "bytes": len(state_body),
            "cache_control": state_headers.get("Cache-Control"),
            "etag": state_headers.get("ETag"),
        },
        "reactions": reactions,
        "reaction_checks": {
            "sse_error": sse_error,
            "document_totals": doc["reactions"]["totals"],
            "server_accepted_all_runs": all_accepted,
            "document_totals_match": doc["reactions"]["totals"].get(EMOJI, 0) == all_accepted,
        },
        "server_5xx": server_errors(final_counts),
        "server_log_tracebacks": log_text.count("Traceback"),
    }


# -- reporting ---------------------------------------------------------------------------------


def tables(result: dict[str, Any]) -> str:
    f = result["settings"]["followers"]
    rows = [
        f"| operation | {f:,} followers p50 ms | p99 ms | {SMALL_FOLLOWERS} followers p50 ms | p99 ms "
        "| ratio p50 | ratio p99 |",
        "|" + "---|" * 7,
    ]
    for r in result["fanout"]:
        b, s = r["big"], r["small"]
        rows.append(
            f"| {r['case']} | {b['p50_ms']:.2f} | {b['p99_ms']:.2f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} "
            f"| {r['ratio_p50']:.2f} | {r['ratio_p99']:.2f} |"
        )
    rows += [
        "",
        *comparison_table([result["state_document"]]),
        "",
        "| load | accepted/s (server) | wrk 202/s | 429 | other failed | in flight at wrk stop "
        "| broadcasts/s | most in 1 s | seconds sent twice | sum of counts / accepted |",
        "|" + "---|" * 10,
    ]
    for r in result["reactions"]:
        w = r["wrk"]
        other = sum(n for s, n in r["server_statuses"].items() if s not in ("202", "429"))
        other += w["socket_errors"] + w["timeouts"]
        rows.append(
            f"| {r['load']} ({w['settings']}) | {fmt_rate(r['accepted_per_s'])} | {fmt_rate(w['rps'])} "
            f"| {r['rejected_429']} | {other} | {r['in_flight_at_wrk_stop']} "
            f"| {r['broadcasts_per_s']:.2f} | {r['max_broadcasts_in_one_second']} | {r['duplicate_seconds']} "
            f"| {r['sum_of_counts']:,} / {r['accepted']:,} |"
        )
    rows += [
        "",
        "| load | wrk p50 ms | wrk p99 ms | in the server: p50 | p99 | mean by Little's law ms |",
        "|" + "---|" * 6,
    ]
    for r in result["reactions"]:
        w, sl = r["wrk"], r["server_latency"]
        rows.append(
            f"| {r['load']} | {w['p50_ms']:.1f} | {w['p99_ms']:.1f} | ≤ {sl['p50_le_s'] * 1e3:g} ms "
            f"| ≤ {sl['p99_le_s'] * 1e3:g} ms | {r['littles_law_mean_ms']} |"
        )
    return "\n".join(rows)


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(18.5, 5.4), layout="constrained", width_ratios=[1.5, 0.8, 1.7])
    f = result["settings"]["followers"]

    # Fan-out: median with a whisker up to p99, the two hosts side by side.
    ax = axes[0]
    fan = result["fanout"]
    xs = range(len(fan))
    width = 0.38
    for offset, side, label, color in (
        (-width / 2, "big", f"{f:,} followers", "#3b6ea8"),
        (width / 2, "small", f"{SMALL_FOLLOWERS} followers", "#9aa5b1"),
    ):
        p50 = [r[side]["p50_ms"] for r in fan]
        p99 = [r[side]["p99_ms"] for r in fan]
        ax.bar(
            [x + offset for x in xs],
            p50,
            width,
            label=label,
            color=color,
            yerr=[[0] * len(fan), [b - a for a, b in zip(p50, p99, strict=True)]],
            capsize=3,
            error_kw={"elinewidth": 0.8},
        )
    top = max(max(r["big"]["p99_ms"], r["small"]["p99_ms"]) for r in fan)
    for x, r in zip(xs, fan, strict=True):
        peak = max(r["big"]["p99_ms"], r["small"]["p99_ms"])
        ax.annotate(
            f"×{r['ratio_p50']:.2f}",
            (x, peak),
            ha="center",
            va="bottom",
            fontsize=9,
            xytext=(0, 3),
            textcoords="offset points",
        )
    names = [SHORT_NAMES.get(r["case"], r["case"]) for r in fan]
    ax.set_xticks(list(xs), names, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(1, top * 2)
    ax.set_ylabel("latency, ms, log scale (bar: median, whisker: p99)")
    ax.set_title(f"1. fan-out: {f:,} followers vs {SMALL_FOLLOWERS}\n(×: ratio of medians)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)

    # Live-state document against nginx.
    ax = axes[1]
    sd = result["state_document"]
    plot_pair(ax, ["townhall", "nginx\n(same bytes)"], sd["townhall"], sd["peer"])
    ax.set_ylabel("requests/s")
    ax.set_title(
        f"2. {sd['case']}\nwrk {result['settings']['wrk_reads']}; ratio {fmt_ratio(sd['ratio'])}", fontsize=10
    )
    ax.grid(axis="y", alpha=0.3)

    # Reactions: accepted per tallied second (bars) and broadcasts per wall-clock second (dots).
    ax = axes[2]
    runs = result["reactions"]
    origin = int(min(r["started"] for r in runs))
    colors = ["#3b6ea8", "#6aa36f"]
    ax2 = ax.twinx()
    for r, color in zip(runs, colors, strict=False):
        ax.axvspan(r["started"] - origin, r["ended"] - origin, color=color, alpha=0.08, lw=0)
        label = (
            f"{r['load']}: {fmt_rate(r['accepted_per_s'])} accepted/s; wrk p50 {r['wrk']['p50_ms']:.0f} ms, "
            f"p99 {r['wrk']['p99_ms']:.0f} ms; in server p50 ≤ {r['server_latency']['p50_le_s']:g} s"
        )
        xs2 = [e["second"] - origin for e in r["timeline"]]
        counts = [e["count"] for e in r["timeline"]]
        ax.bar(xs2, counts, width=0.85, align="edge", color=color, alpha=0.85, label=label)
        per_second = Counter(int(e["arrived"]) - origin for e in r["timeline"])
        secs = sorted(per_second)
        ax2.plot([x + 0.5 for x in secs], [per_second[x] for x in secs], "o", color="#c0392b", ms=4)
    ax.plot([], [], " ", label="shaded: while wrk ran; bars after it: requests in flight at its stop")
    ax2.plot([], [], "o", color="#c0392b", ms=4, label="reactions messages the host received in that second")
    ax2.axhline(1, color="#c0392b", lw=0.6, ls="--")
    ax2.set_ylim(0, 4)
    ax2.set_ylabel("SSE reactions messages per second", color="#c0392b")
    ax.set_xlabel("seconds since the first reaction run started")
    ax.set_ylabel("reactions counted in that second")
    peak = max((e["count"] for r in runs for e in r["timeline"]), default=1)
    ax.set_ylim(0, peak * 1.6)
    sums = ", ".join(f"{r['sum_of_counts']:,}/{r['accepted']:,}" for r in runs)
    ax.set_title(
        f"3. reactions from {result['settings']['reactors']:,} accounts, the host on SSE\n"
        f"sum of counts in the messages / reactions accepted (202): {sums}",
        fontsize=10,
    )
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(handles, labels, fontsize=7.5, loc="upper left")
    ax.grid(axis="y", alpha=0.3)

    m = result["machine"]
    save_figure(
        fig,
        path,
        dpi=120,
        title=f"townhall spaces, {m['cpus']} cores, loopback, SQLite, {result['date'][:10]}  "
        f"(wrk, server and nginx share the cores; latencies are closed-loop)",
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--followers", type=int, default=1_000_000, help="followers of the big host")
    parser.add_argument("--reactors", type=int, default=1000, help="reacting accounts (default 1000)")
    parser.add_argument(
        "--samples", type=int, default=100, help="fan-out calls per host and case (default 100)"
    )
    parser.add_argument(
        "--sample-warmup", type=int, default=5, help="uncounted fan-out calls first (default 5)"
    )
    add_wrk_options(parser, duration=10, warmup=2, connections=64, reads="state reads")
    parser.add_argument(
        "--reaction-connections", type=int, default=1000, help="wrk connections reacting (default 1000)"
    )
    parser.add_argument(
        "--light-connections", type=int, default=16, help="wrk connections of the lighter reaction load"
    )
    parser.add_argument(
        "--light-duration", type=int, default=5, help="seconds of the lighter load (default 5)"
    )
    parser.add_argument(
        "--wait-quiet", type=int, default=0, help="first wait up to N s for the machine's CPU to be idle"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.reactors <= args.followers:
        parser.error("--reactors must be between 1 and --followers (reactors are the first followers)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if tools_missing("bench_spaces", "wrk", "nginx"):
        return 2
    t0 = time.monotonic()
    result = run(args)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / "spaces.json", args.out / "spaces.png"
    json_path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    plot(result, png_path)
    print()
    machine, setup = result["machine"], result["setup"]
    print(
        f"townhall spaces: {result['date']}, {machine['cpus']} cores ({machine['cpu_model']}), "
        f"whole run {result['wall_s']} s"
    )
    print(
        f"{args.followers:,} synthetic followers loaded in {setup['bulk_load_s']} s "
        f"({setup['database_mib']} MiB); server env: {' '.join(f'{k}={v}' for k, v in SERVER_ENV.items())}\n"
    )
    print(
        f"other load on the machine during the run: {machine['other_cpu_s']} CPU s "
        f"({machine['other_cpu_share']:.0%} of the cores)\n"
    )
    print(tables(result))
    checks = result["reaction_checks"]
    print(
        f"\nstate document totals {checks['document_totals']} vs server-accepted reactions "
        f"(all runs, warm-up included) {checks['server_accepted_all_runs']:,}: "
        f"{'match' if checks['document_totals_match'] else 'MISMATCH'}"
    )
    problems = []
    if result["server_5xx"] or result["server_log_tracebacks"]:
        problems.append(
            f"server 5xx {result['server_5xx']}, tracebacks in log {result['server_log_tracebacks']}"
        )
    if checks["sse_error"]:
        problems.append(f"SSE: {checks['sse_error']}")
    for r in result["reactions"]:
        if not r["sum_of_counts_matches"]:
            problems.append(f"{r['load']}: sum of counts {r['sum_of_counts']} != accepted {r['accepted']}")
        if r["duplicate_seconds"] or r["max_broadcasts_in_one_second"] > 2:
            problems.append(f"{r['load']}: more than one broadcast for a second")
    if not checks["document_totals_match"]:
        problems.append("state document totals do not match the accepted reactions")
    print(f"wrote {shown(json_path)}\nwrote {shown(png_path)}")
    for problem in problems:
        print(f"bench_spaces: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
