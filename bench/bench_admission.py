"""Admission: what one join costs the node, in process and over loopback HTTP.

1. In process (no sockets), two figures with limits and caps out of the way: the join's own
   work as the HTTP protocol runs it (``routes.admission.answer`` driven to its end without
   an event loop turn: limits, snapshot, waiting room, ticket, cookie and JSON), and the same
   join through the whole ASGI app (shedding, body limit, metrics, ``JoinFastPath``), the way
   a join takes when it cannot be answered in the protocol. CPU time per join.
2. Over loopback (``--http``, on by default): a ``townhall serve`` node (limits and caps out of
   the way, shedding as shipped; joins answered in its HTTP protocol, ``control.fastproto``)
   under ``wrk`` POSTing anonymous joins at several connection counts, beside two peers at
   the same counts: the same node's ``GET /healthz`` (its cheapest ASGI answer) and nginx (one
   worker) answering a static 200 of the join's size. Admitted joins/s, p50/p99, shed answers,
   joins per CPU-second of the node's processes, the load average; a plot in
   ``bench/results/admission.png`` and the figures in ``admission.json``.

    PYTHONPATH=. .venv/bin/python bench/bench_admission.py [--joins N] [--profile]
        [--no-http] [--no-nginx] [--connections 1,2,4,8,16,64] [--seconds 6] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    RESULTS,
    Measurement,
    WrkSettings,
    find_tool,
    git_state,
    http,
    nginx_serving,
    pyplot,
    run_wrk,
    save_figure,
    townhall_server,
    write_json,
    write_lua,
)

from tests.support import make_config
from townhall.control.app import create_app
from townhall.control.node import Node
from townhall.control.routes.admission import JoinCall, Reply, answer
from townhall.social import accounts
from townhall.spaces import service

UNLIMITED = {
    "join_limit_per_address": "1000000000/minute",
    "join_limit_per_network": "1000000000/minute",
    "space_join_rate": 1e9,
    "space_join_burst": 1e9,
    "node_join_rate": 1e9,
    "node_join_burst": 1e9,
    "node_max_listeners": 10**9,
    "space_max_listeners": 10**9,
}


def unlimited_env() -> dict[str, str]:
    """``UNLIMITED`` as a node's environment, with room for the host's sign-up."""
    env = {f"TOWNHALL_{k.upper()}": str(v) for k, v in UNLIMITED.items()}
    env["TOWNHALL_SIGNUP_LIMIT_PER_ADDRESS"] = "1000/minute"
    return env


def join_row(connections: int, attempt: int, joins: Measurement) -> dict[str, Any]:
    """What every run of joins records: its place in the sweep, the load, and wrk's figures."""
    return {
        "connections": connections,
        "attempt": attempt,
        "load": round(os.getloadavg()[0], 2),
        "joins_per_s": round(joins.rps, 1),
        "join_p50_ms": joins.p50_ms,
        "join_p99_ms": joins.p99_ms,
        "join_non_2xx": joins.non_2xx,
    }


def medians(
    rows: list[dict[str, Any]], groups: list[dict[str, Any]], keys: list[str]
) -> list[dict[str, Any]]:
    """Per group (the fields a row must match, e.g. ``{"connections": 4}``), the median of each
    of ``keys`` over its rows."""
    return [
        {
            **group,
            **{
                k: statistics.median(r[k] for r in rows if all(r[f] == v for f, v in group.items()))
                for k in keys
            },
        }
        for group in groups
    ]


async def run(joins: int, profile: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        node = Node.from_config(make_config("sqlite", Path(tmp) / "data", **UNLIMITED))
        app = create_app(node)
        await node.database.migrate()
        await node.hub.start()
        async with node.database.session() as db:
            host = await accounts.create_account(db, node.hasher, "host", "password123", now=time.time())
            principal = accounts.Principal(account=host, session_id=0)
            space = await service.create_space(
                db, principal, "bench", scheduled_for=None, recorded=False, now=time.time()
            )
            space_id = space.id
            await service.start_space(db, principal, space_id, now=time.time())
        path = f"/api/v1/spaces/{space_id}/join"

        async def one() -> None:
            scope: dict[str, Any] = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": path,
                "raw_path": path.encode(),
                "query_string": b"",
                "root_path": "",
                "headers": [(b"host", b"bench"), (b"content-length", b"0")],
                "client": ("127.0.0.1", 5000),
                "server": ("127.0.0.1", 80),
                "state": {},
            }
            sent: list[dict[str, Any]] = []

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            await app(scope, receive, send)
            assert sent[0]["status"] == 200, sent

        for _ in range(200):  # warm caches (the snapshot, the routes' templates)
            await one()
        # The protocol's way: the same coroutine, never suspending, driven by hand.
        call = JoinCall(space_id, "join", "127.0.0.1", None, None, "http://127.0.0.1:8000")

        def core() -> Reply:
            coro = answer(node, call, b"{}")
            try:
                coro.send(None)
            except StopIteration as done:
                reply: Reply = done.value
                assert reply.status == 200, reply
                return reply
            raise AssertionError("the join suspended: not answerable in the protocol")

        node.admission.snapshots.ttl = 1e9  # the snapshot stays fresh for the whole run
        for _ in range(200):
            core()
        core_cpu = time.process_time()
        for _ in range(joins):
            core()
        core_cpu = time.process_time() - core_cpu
        prof = cProfile.Profile() if profile else None
        if prof:
            prof.enable()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(joins):
            await one()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if prof:
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
        await node.hub.stop()
        await node.admission.close()
        await node.database.close()
    return {
        "joins": joins,
        "us_wall": wall / joins * 1e6,
        "us_cpu": cpu / joins * 1e6,
        "per_core": joins / cpu,
        "core_us_cpu": core_cpu / joins * 1e6,
        "core_per_core": joins / core_cpu,
    }


def _live_space(base: str) -> str:
    """A host registers, logs in, creates a space and starts it (public API)."""
    login = {"handle": "benchhost", "password": "bench-password-1"}
    http("POST", f"{base}/api/v1/accounts", login)
    status, body = http("POST", f"{base}/api/v1/sessions", login)
    assert status == 200, body
    token = json.loads(body)["token"]

    def call(method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        import urllib.request

        data = json.dumps(payload).encode() if payload is not None else b""
        req = urllib.request.Request(f"{base}{path}", data=data, method=method)
        req.add_header("Authorization", f"Bearer {token}")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    space = str(call("POST", "/api/v1/spaces", {"title": "bench"})["id"])
    call("POST", f"/api/v1/spaces/{space}/start")
    return space


def over_http(connections: list[int], seconds: int, repeat: int, with_nginx: bool) -> dict[str, Any]:
    env = unlimited_env()
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="townhall-bench-admission-")))
        join_lua = write_lua(work, "join", "POST", "{}")
        health_lua = write_lua(work, "health")
        server = stack.enter_context(townhall_server(work / "data", work / "serve.log", env))
        space = _live_space(server.base)
        join_url = f"{server.base}/api/v1/spaces/{space}/join"
        status, sample = http("POST", join_url, {})
        assert status == 200, sample
        nginx_url = None
        if with_nginx and find_tool("nginx"):
            # The same number of bytes as a join's answer, from disk, one worker process.
            base = stack.enter_context(nginx_serving({"/join.json": sample}, "1", work))
            nginx_url = f"{base}/join.json"
        for c in connections:
            settings = WrkSettings(threads=1, connections=c, duration_s=seconds, timeout_s=5)
            for attempt in range(repeat):
                cpu = server.cpu_seconds()
                joins = run_wrk("join", join_url, join_lua, settings)
                join_cpu = server.cpu_seconds() - cpu
                cpu = server.cpu_seconds()
                peer = run_wrk("healthz", f"{server.base}/healthz", health_lua, settings)
                peer_cpu = server.cpu_seconds() - cpu
                static = run_wrk("nginx", nginx_url, health_lua, settings) if nginx_url else None
                row = {
                    **join_row(c, attempt, joins),
                    "join_errors": joins.socket_errors + joins.timeouts,
                    "joins_per_cpu_s": round(joins.rps * seconds / max(join_cpu, 1e-9), 1),
                    "healthz_per_s": round(peer.rps, 1),
                    "healthz_p99_ms": peer.p99_ms,
                    "healthz_per_cpu_s": round(peer.rps * seconds / max(peer_cpu, 1e-9), 1),
                    "nginx_per_s": round(static.rps, 1) if static else None,
                    "nginx_p99_ms": static.p99_ms if static else None,
                }
                row["ratio"] = round(row["joins_per_s"] / max(row["healthz_per_s"], 1e-9), 3)
                row["ratio_nginx"] = round(row["joins_per_s"] / static.rps, 3) if static else None
                row["ratio_per_cpu_s"] = round(
                    row["joins_per_cpu_s"] / max(row["healthz_per_cpu_s"], 1e-9), 3
                )
                rows.append(row)
                print(
                    f"  -c{c} #{attempt}: {row['joins_per_s']:,.0f} joins/s "
                    f"(p50 {joins.p50_ms:.1f} ms, p99 {joins.p99_ms:.1f} ms, "
                    f"{joins.non_2xx} shed), {row['joins_per_cpu_s']:,.0f} per node CPU-s; "
                    f"/healthz {row['healthz_per_s']:,.0f}/s; ratio {row['ratio']:.2f} "
                    f"(per CPU-s {row['ratio_per_cpu_s']:.2f}); nginx {row['nginx_per_s'] or 0:,.0f}/s "
                    f"(ratio {row['ratio_nginx'] or 0:.2f}); load {row['load']}",
                    flush=True,
                )
    keys = ["joins_per_s", "join_p50_ms", "join_p99_ms", "joins_per_cpu_s", "healthz_per_s", "ratio", "load"]
    if any(r["nginx_per_s"] for r in rows):
        keys += ["nginx_per_s", "ratio_nginx"]
    groups = [{"connections": c} for c in connections]
    return {"rows": rows, "medians": medians(rows, groups, keys), "seconds": seconds, "repeat": repeat}


# -- several node processes on one port (SO_REUSEPORT), sharing limits and waiting room in Redis --


def serve_node(port: int) -> None:
    """One node process of ``--nodes``: ``townhall serve``'s server (``server.build_server``) on
    a listening socket of its own with SO_REUSEPORT, so the kernel spreads connections over
    the nodes on ``port``. Its settings come from the environment (``TOWNHALL_*``)."""
    import socket

    from townhall.config import Config
    from townhall.server import build_server

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(2048)
    config = Config.load(overrides={"host": "127.0.0.1", "port": port})
    build_server(config).run(sockets=[sock])


@contextlib.contextmanager
def node_processes(count: int, work: Path, env: dict[str, str]) -> Any:
    """``count`` node processes on one loopback port; yields (base URL, their processes)."""
    import subprocess

    from _common import free_port, stop, wait_http_ok

    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for k in range(count):
            log = work / f"node{k}.log"
            with log.open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, __file__, "--serve-node", str(port)],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env={**os.environ, **env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                        start_new_session=True,
                    )
                )
            # One at a time: the first creates the database and the signing key they share.
            wait_http_ok(f"http://127.0.0.1:{port}/healthz", procs[-1], 60.0, log)
        yield f"http://127.0.0.1:{port}", procs
    finally:
        for proc in procs:
            stop(proc)


def over_nodes(
    counts: list[int], connections: list[int], seconds: int, repeat: int, redis_url: str
) -> dict[str, Any]:
    """Admitted joins/s of 1..N node processes sharing limits and the waiting room in Redis
    (their joins take the ASGI way: the limits and the queue are a network call away)."""
    import uuid

    from _common import session_cpu_seconds

    rows: list[dict[str, Any]] = []
    for count in counts:
        with tempfile.TemporaryDirectory(prefix="townhall-bench-nodes-") as tmp:
            work = Path(tmp)
            env = unlimited_env() | {
                "TOWNHALL_DATA": str(work / "data"),
                "TOWNHALL_REDIS_URL": redis_url,
                "TOWNHALL_REDIS_PREFIX": f"bench{uuid.uuid4().hex[:10]}",
            }
            join_lua = write_lua(work, "join", "POST", "{}")
            with node_processes(count, work, env) as (base, procs):
                space = _live_space(base)
                url = f"{base}/api/v1/spaces/{space}/join"
                for c in connections:
                    settings = WrkSettings(threads=1, connections=c, duration_s=seconds, timeout_s=5)
                    for attempt in range(repeat):
                        cpu = sum(session_cpu_seconds(p.pid) for p in procs)
                        joins = run_wrk("join", url, join_lua, settings)
                        cpu = sum(session_cpu_seconds(p.pid) for p in procs) - cpu
                        row = {
                            "nodes": count,
                            **join_row(c, attempt, joins),
                            "joins_per_node_cpu_s": round(joins.rps * seconds / max(cpu, 1e-9), 1),
                        }
                        rows.append(row)
                        print(
                            f"  {count} node(s) on Redis, -c{c} #{attempt}: "
                            f"{row['joins_per_s']:,.0f} joins/s (p50 {joins.p50_ms:.1f} ms, "
                            f"p99 {joins.p99_ms:.1f} ms, {joins.non_2xx} non-2xx), "
                            f"{row['joins_per_node_cpu_s']:,.0f} per node CPU-s; load {row['load']}",
                            flush=True,
                        )
    keys = ["joins_per_s", "join_p50_ms", "join_p99_ms", "joins_per_node_cpu_s", "load"]
    groups = [{"nodes": n, "connections": c} for n in counts for c in connections]
    return {
        "rows": rows,
        "medians": medians(rows, groups, keys),
        "seconds": seconds,
        "repeat": repeat,
        "redis": redis_url,
    }


def plot(figures: dict[str, Any], path: Path) -> None:
    med = figures["medians"]
    cs = [m["connections"] for m in med]
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(11, 4))
    left.plot(cs, [m["joins_per_s"] for m in med], "o-", label="admitted joins/s")
    left.plot(cs, [m["healthz_per_s"] for m in med], "s--", label="/healthz/s (same node, ASGI)")
    if "nginx_per_s" in med[0]:
        left.plot(cs, [m["nginx_per_s"] for m in med], "d-.", label="nginx static 200/s (1 worker)")
    right.plot(cs, [m["join_p50_ms"] for m in med], "o-", label="p50")
    right.plot(cs, [m["join_p99_ms"] for m in med], "s-", label="p99")
    targets(left, right)
    left.plot(cs, [m["joins_per_cpu_s"] for m in med], "^:", label="joins per node CPU-second")
    left.set_title("joins over loopback (median of runs)")
    right.set_title("join latency")
    finish(fig, left, right, "per second", path)


def plot_nodes(figures: dict[str, Any], path: Path) -> None:
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(11, 4))
    for n in sorted({m["nodes"] for m in figures["medians"]}):
        med = [m for m in figures["medians"] if m["nodes"] == n]
        cs = [m["connections"] for m in med]
        left.plot(cs, [m["joins_per_s"] for m in med], "o-", label=f"{n} node(s) on Redis")
        right.plot(cs, [m["join_p99_ms"] for m in med], "s-", label=f"p99, {n} node(s)")
    targets(left, right)
    left.set_title("node processes sharing limits and waiting room (Redis)")
    finish(fig, left, right, "admitted joins/s", path)


def targets(left: Any, right: Any) -> None:
    """The targets both plots measure against: joins/s on the left, join p99 on the right."""
    left.axhline(10_000, color="grey", linestyle=":", label="target 10,000 joins/s")
    right.axhline(50, color="grey", linestyle=":", label="target p99 50 ms")


def finish(fig: Any, left: Any, right: Any, left_label: str, path: Path) -> None:
    """Both plots' axes (connections doubling on x; latency on a log scale) and the PNG."""
    for ax, label in ((left, left_label), (right, "join latency, ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("wrk connections")
        ax.set_ylabel(label)
        ax.legend()
    right.set_yscale("log")
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def write_results(
    name: str, out: dict[str, Any], draw: Callable[[dict[str, Any], Path], None], figures: dict[str, Any]
) -> None:
    """``bench/results/<name>.json`` (``out``, the git state and the core count) and the plot
    ``draw`` makes of ``figures`` beside it, ``<name>.png``."""
    write_json(RESULTS / f"{name}.json", {**out, "git": git_state(), "cpus": os.cpu_count()})
    draw(figures, RESULTS / f"{name}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--joins", type=int, default=3000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-http", dest="http", action="store_false")
    parser.add_argument("--no-nginx", dest="nginx", action="store_false")
    parser.add_argument(
        "--nodes", default="", help="also N node processes on one port sharing Redis, e.g. 1,2"
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--serve-node", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--connections", default="1,2,4,8,16,64")
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.serve_node:
        serve_node(args.serve_node)
        return
    connections = [int(c) for c in args.connections.split(",")]
    if args.nodes:
        counts = [int(n) for n in args.nodes.split(",")]
        nodes = over_nodes(counts, connections, args.seconds, args.repeat, args.redis)
        write_results("admission_nodes", {"over_nodes": nodes}, plot_nodes, nodes)
        for m in nodes["medians"]:
            print(
                f"median {m['nodes']} node(s) -c{m['connections']}: {m['joins_per_s']:,.0f} joins/s, "
                f"p99 {m['join_p99_ms']:.1f} ms, {m['joins_per_node_cpu_s']:,.0f} per node CPU-s"
            )
        return
    r = asyncio.run(run(args.joins, args.profile))
    print(
        f"{r['joins']:.0f} joins: {r['us_wall']:.0f} µs wall, {r['us_cpu']:.0f} µs CPU each "
        f"-> {r['per_core']:.0f} joins/s per core through the ASGI app (no HTTP parsing); "
        f"the join's own work as the protocol runs it {r['core_us_cpu']:.1f} µs CPU "
        f"-> {r['core_per_core']:.0f}/s per core",
        flush=True,
    )
    if not args.http:
        return
    figures = over_http(connections, args.seconds, args.repeat, args.nginx)
    write_results("admission", {"in_process": r, "over_http": figures}, plot, figures)
    for m in figures["medians"]:
        print(
            f"median -c{m['connections']}: {m['joins_per_s']:,.0f} joins/s, p99 {m['join_p99_ms']:.1f} ms, "
            f"{m['joins_per_cpu_s']:,.0f} per node CPU-s, ratio to /healthz {m['ratio']:.2f}"
        )
    print(f"wrote {RESULTS / 'admission.json'} and {RESULTS / 'admission.png'}")


if __name__ == "__main__":
    main()
