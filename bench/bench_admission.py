"""Admission: what one join costs the node, in process and over loopback HTTP.

1. In process (no sockets): every join goes through the whole app (shedding, body limit,
   metrics, the join fast path, the limits, the snapshot, the waiting room, the ticket, the
   cookie) with limits and caps out of the way; the CPU time per join bounds the joins/s one
   core can admit before HTTP parsing.
2. Over loopback (``--http``, on by default): a ``townhall serve`` node (limits and caps out of
   the way, shedding as shipped) under ``wrk`` POSTing anonymous joins at several connection
   counts, beside its own ``GET /healthz`` at the same counts (the peer: the same server's
   cheapest answer, so the ratio is what admission costs over the HTTP floor). Admitted
   joins/s, p50/p99, shed answers, and joins per CPU-second of the node's processes; a plot
   in ``bench/results/admission.png`` and the figures in ``admission.json``.

    PYTHONPATH=. .venv/bin/python bench/bench_admission.py [--joins N] [--profile]
        [--no-http] [--connections 1,4,16,64] [--seconds 6] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    RESULTS,
    WrkSettings,
    git_state,
    http,
    run_wrk,
    townhall_server,
    write_lua,
)

from tests.support import make_config
from townhall.control.app import create_app
from townhall.control.node import Node
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


def over_http(connections: list[int], seconds: int, repeat: int) -> dict[str, Any]:
    env = {f"TOWNHALL_{k.upper()}": str(v) for k, v in UNLIMITED.items()}
    env["TOWNHALL_SIGNUP_LIMIT_PER_ADDRESS"] = "1000/minute"
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="townhall-bench-admission-") as tmp:
        work = Path(tmp)
        join_lua = write_lua(work, "join", "POST", "{}")
        health_lua = write_lua(work, "health")
        with townhall_server(work / "data", work / "serve.log", env) as server:
            space = _live_space(server.base)
            join_url = f"{server.base}/api/v1/spaces/{space}/join"
            for c in connections:
                settings = WrkSettings(threads=1, connections=c, duration_s=seconds, timeout_s=5)
                for attempt in range(repeat):
                    cpu = server.cpu_seconds()
                    joins = run_wrk("join", join_url, join_lua, settings)
                    join_cpu = server.cpu_seconds() - cpu
                    cpu = server.cpu_seconds()
                    peer = run_wrk("healthz", f"{server.base}/healthz", health_lua, settings)
                    peer_cpu = server.cpu_seconds() - cpu
                    row = {
                        "connections": c,
                        "attempt": attempt,
                        "load": round(os.getloadavg()[0], 2),
                        "joins_per_s": round(joins.rps, 1),
                        "join_p50_ms": joins.p50_ms,
                        "join_p99_ms": joins.p99_ms,
                        "join_non_2xx": joins.non_2xx,
                        "join_errors": joins.socket_errors + joins.timeouts,
                        "joins_per_cpu_s": round(joins.rps * seconds / max(join_cpu, 1e-9), 1),
                        "healthz_per_s": round(peer.rps, 1),
                        "healthz_p99_ms": peer.p99_ms,
                        "healthz_per_cpu_s": round(peer.rps * seconds / max(peer_cpu, 1e-9), 1),
                    }
                    row["ratio"] = round(row["joins_per_s"] / max(row["healthz_per_s"], 1e-9), 3)
                    row["ratio_per_cpu_s"] = round(
                        row["joins_per_cpu_s"] / max(row["healthz_per_cpu_s"], 1e-9), 3
                    )
                    rows.append(row)
                    print(
                        f"  -c{c} #{attempt}: {row['joins_per_s']:,.0f} joins/s "
                        f"(p50 {joins.p50_ms:.1f} ms, p99 {joins.p99_ms:.1f} ms, "
                        f"{joins.non_2xx} shed), {row['joins_per_cpu_s']:,.0f} per node CPU-s; "
                        f"/healthz {row['healthz_per_s']:,.0f}/s; ratio {row['ratio']:.2f} "
                        f"(per CPU-s {row['ratio_per_cpu_s']:.2f}); load {row['load']}",
                        flush=True,
                    )
    keys = ("joins_per_s", "join_p50_ms", "join_p99_ms", "joins_per_cpu_s", "healthz_per_s", "ratio")
    medians = [
        {
            "connections": c,
            **{k: statistics.median(r[k] for r in rows if r["connections"] == c) for k in keys},
        }
        for c in connections
    ]
    return {"rows": rows, "medians": medians, "seconds": seconds, "repeat": repeat}


def plot(figures: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = figures["medians"]
    cs = [m["connections"] for m in med]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(cs, [m["joins_per_s"] for m in med], "o-", label="admitted joins/s")
    left.plot(cs, [m["healthz_per_s"] for m in med], "s--", label="/healthz/s (peer)")
    left.plot(cs, [m["joins_per_cpu_s"] for m in med], "^:", label="joins per node CPU-second")
    left.set_xscale("log", base=2)
    left.set_xlabel("wrk connections")
    left.set_ylabel("per second")
    left.legend()
    left.set_title("joins over loopback (median of runs)")
    right.plot(cs, [m["join_p50_ms"] for m in med], "o-", label="p50")
    right.plot(cs, [m["join_p99_ms"] for m in med], "s-", label="p99")
    right.axhline(50, color="grey", linestyle=":", label="target p99 50 ms")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("wrk connections")
    right.set_ylabel("join latency, ms")
    right.legend()
    right.set_title("join latency")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--joins", type=int, default=3000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-http", dest="http", action="store_false")
    parser.add_argument("--connections", default="1,4,16,64")
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    r = asyncio.run(run(args.joins, args.profile))
    print(
        f"{r['joins']:.0f} joins: {r['us_wall']:.0f} µs wall, {r['us_cpu']:.0f} µs CPU each "
        f"-> {r['per_core']:.0f} joins/s per core (app only, no HTTP parsing)",
        flush=True,
    )
    if not args.http:
        return
    connections = [int(c) for c in args.connections.split(",")]
    figures = over_http(connections, args.seconds, args.repeat)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"in_process": r, "over_http": figures, "git": git_state(), "cpus": os.cpu_count()}
    (RESULTS / "admission.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(figures, RESULTS / "admission.png")
    for m in figures["medians"]:
        print(
            f"median -c{m['connections']}: {m['joins_per_s']:,.0f} joins/s, p99 {m['join_p99_ms']:.1f} ms, "
            f"{m['joins_per_cpu_s']:,.0f} per node CPU-s, ratio to /healthz {m['ratio']:.2f}"
        )
    print(f"wrote {RESULTS / 'admission.json'} and {RESULTS / 'admission.png'}")


if __name__ == "__main__":
    main()
