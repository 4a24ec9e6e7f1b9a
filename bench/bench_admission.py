"""Admission: what one join costs the node's process, driven in process (no sockets).

Every join goes through the whole app (shedding, body limit, metrics, the join fast path, the
limits, the snapshot, the waiting room, the ticket, the cookie) with limits and caps out of
the way; the CPU time per join bounds the joins/s one core can admit before HTTP parsing.

    PYTHONPATH=. .venv/bin/python bench/bench_admission.py [--joins N] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--joins", type=int, default=3000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    r = asyncio.run(run(args.joins, args.profile))
    print(
        f"{r['joins']:.0f} joins: {r['us_wall']:.0f} µs wall, {r['us_cpu']:.0f} µs CPU each "
        f"-> {r['per_core']:.0f} joins/s per core (app only, no HTTP parsing)"
    )


if __name__ == "__main__":
    main()
