"""Redis benchmark for the capacity planner: what one Redis thread does per CPU-second, and how
many updates a second one waiting-room counter key takes, as a transaction and as one script.

Run it from the repository root with the project's venv::

    .venv/bin/python bench/bench_redis.py

It needs ``redis-server`` and ``redis-benchmark`` (Debian's ``redis-server`` and
``redis-tools``). It starts a Redis of its own on a free loopback port (no persistence), so no
other client's traffic shares the measured server, and stops it at the end. About 30 s.

Method
------
Redis runs one command at a time on one thread, so its capacity is best read as work per
CPU-second of the ``redis-server`` process (``INFO cpu``: ``used_cpu_user + used_cpu_sys``),
which the load generators' own CPU does not blur: they share the machine's two cores with it.

1. **Simple commands** (the peer): ``redis-benchmark -t incr -c 50 -n N`` (no pipelining):
   INCRs per Redis CPU-second, the ceiling of one thread for the cheapest command.
2. **A waiting-room counter update, as the admission code first made it** (``RedisQueueStore``):
   ``WATCH`` the space's hash, ``HGETALL`` it (64 fields: four counters and 60 ticket-expiry
   buckets, a 600 s ticket life in 10 s buckets), then ``MULTI``, ``DEL``, ``HSET`` of every
   field, ``EXPIRE``, ``EXEC``; retried when another client changed the key in between.
   One asyncio client (redis-py), then ``--clients`` on the same key, each for ``--seconds``.
   Reported: updates per second, aborted transactions per update, and updates per Redis
   CPU-second (aborted attempts cost the server too). The server's idle CPU (its timers,
   measured for 2 s first) is subtracted from every run.
3. **The same update as one Lua script** (``EVALSHA``): read the hash, add one to a counter and
   to a bucket, write back the fields that changed, ``EXPIRE``. The same clients and time.
   Ratio = script ÷ transaction, per Redis CPU-second, with ``--clients`` clients.
4. **The waiting room's own store** (``RedisQueueStore.join``, the script the admission code
   runs for every join, waiting-room return and renewal) on a space whose hash holds 60
   ticket-expiry buckets, as in a storm, with a rate so low that every join after the first
   queues (the storm's common case). The same clients and time. This is the figure the
   planner takes for one key's ceiling (``redis_key_updates_per_s_script``).

The clients are Python on the same two cores, so updates per second say more about them and
about the machine's other work (the run reports the load average) than about Redis; the
per-CPU-second figures are the server's own. Output: a table on stdout and
``bench/results/redis.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import WatchError

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, free_port, wait_ready, write_json

from townhall.admission import waiting_room as wr
from townhall.admission.queue_store import RedisQueueStore

KEY = "bench:plan:space"
BUCKETS = 60

LUA = """
local fields = redis.call('HGETALL', KEYS[1])
local a = 0
local b = 0
for i = 1, #fields, 2 do
  if fields[i] == 'a' then a = tonumber(fields[i + 1]) end
  if fields[i] == ARGV[1] then b = tonumber(fields[i + 1]) end
end
redis.call('HSET', KEYS[1], 'a', a + 1, ARGV[1], b + 1, 't', ARGV[2])
redis.call('EXPIRE', KEYS[1], 3600)
return a + 1
"""


def redis_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def initial_fields() -> dict[str, str]:
    fields = {"a": "0", "r": "0", "k": "2000.0", "t": "0.0"}
    fields.update({f"b{1000 + i}": "1000" for i in range(BUCKETS)})
    return fields


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A Redis of our own on a free loopback port; its URL."""
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"

    def pong() -> bool:
        try:
            return bool(redis.Redis.from_url(url).ping())
        except redis.ConnectionError:
            return False

    try:
        wait_ready(pong, proc, 10.0, None, f"redis-server at {url} did not answer PING", every_s=0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def incr_peer(url: str, requests: int, idle: float) -> dict[str, Any]:
    """redis-benchmark INCR, and the server's CPU for it."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    db = int(parts.path.strip("/") or 0)
    client = redis.Redis.from_url(url)
    cpu0, t0 = redis_cpu_s(client), time.monotonic()
    out = subprocess.run(
        [
            "redis-benchmark", "-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379),
            "--dbnum", str(db), "-t", "incr", "-c", "50", "-n", str(requests), "--csv",
        ],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    wall = time.monotonic() - t0
    cpu = max(1e-6, redis_cpu_s(client) - cpu0 - idle * wall)
    client.delete("counter:__rand_int__")
    rows = [line.split(",") for line in out.stdout.splitlines() if line.startswith('"INCR"')]
    rps = float(rows[0][1].strip('"'))
    return {
        "requests": requests,
        "rps": round(rps, 1),
        "wall_s": round(wall, 3),
        "redis_cpu_s": round(cpu, 3),
        "per_redis_cpu_s": round(requests / cpu, 1) if cpu > 0 else None,
        "settings": "redis-benchmark -t incr -c 50, no pipelining",
    }


async def transaction_update(r: Any) -> int:
    """One update as RedisQueueStore makes it; the number of aborted attempts before it won."""
    aborted = 0
    async with r.pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(KEY)
                fields = await pipe.hgetall(KEY)
                fields["a"] = str(int(fields.get("a", 0)) + 1)
                bucket = f"b{1000 + int(fields['a']) % BUCKETS}"
                fields[bucket] = str(int(fields.get(bucket, 0)) + 1)
                fields["t"] = repr(time.time())
                pipe.multi()
                pipe.delete(KEY)
                pipe.hset(KEY, mapping=fields)
                pipe.expire(KEY, 3600)
                await pipe.execute()
                return aborted
            except WatchError:
                aborted += 1


def idle_cpu_per_s(url: str, seconds: float = 2.0) -> float:
    """The server's own CPU per second with no client (its timers), subtracted from every run."""
    client = redis.Redis.from_url(url)
    cpu0, t0 = redis_cpu_s(client), time.monotonic()
    time.sleep(seconds)
    return max(0.0, (redis_cpu_s(client) - cpu0) / (time.monotonic() - t0))


async def load(url: str, kind: str, clients: int, seconds: float, idle: float) -> dict[str, Any]:
    sync = redis.Redis.from_url(url)
    sync.delete(KEY)
    sync.hset(KEY, mapping=initial_fields())
    pool = aioredis.ConnectionPool.from_url(url, decode_responses=True, max_connections=clients)
    r = aioredis.Redis(connection_pool=pool)
    sha = await r.script_load(LUA)
    store = RedisQueueStore(url, prefix="bench:wr:")
    space, now = "space", time.time()
    cap = wr.Capacity(max_active=10**9, rate=1e-9, burst=1, ticket_ttl=600.0)
    full = wr.Counters(active={math.ceil(now / cap.bucket_seconds) + i: 1000 for i in range(BUCKETS)})
    sync.delete(store.prefix + space)
    sync.hset(store.prefix + space, mapping=full.to_fields())
    done = aborted = 0
    stop = time.monotonic() + seconds

    async def one_client(k: int) -> None:
        nonlocal done, aborted
        n = 0
        while time.monotonic() < stop:
            if kind == "transaction":
                aborted += await transaction_update(r)
            elif kind == "script":
                await r.evalsha(sha, 1, KEY, f"b{1000 + (n + k) % BUCKETS}", repr(time.time()))
            else:
                t = time.time()
                await store.join(space, cap, t, t + cap.ticket_ttl, elsewhere_ok=True)
            done += 1
            n += 1

    cpu0, t0, own0 = redis_cpu_s(sync), time.monotonic(), time.process_time()
    await asyncio.gather(*(one_client(k) for k in range(clients)))
    wall, own = time.monotonic() - t0, time.process_time() - own0
    cpu = max(1e-6, redis_cpu_s(sync) - cpu0 - idle * wall)
    await r.aclose()
    await pool.aclose()
    await store.close()
    sync.delete(KEY, store.prefix + space)
    commands = 7 if kind == "transaction" else 1
    return {
        "kind": kind,
        "clients": clients,
        "seconds": round(wall, 3),
        "updates": done,
        "updates_per_s": round(done / wall, 1),
        "aborted_per_update": round(aborted / done, 4) if done else None,
        "commands_per_update": commands,
        "redis_cpu_s": round(cpu, 3),
        "redis_cores": round(cpu / wall, 3),
        "updates_per_redis_cpu_s": round(done / cpu, 1) if cpu > 0 else None,
        "client_cpu_s": round(own, 3),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    with redis_server() as url:
        version = redis.Redis.from_url(url).info("server")["redis_version"]
        idle = idle_cpu_per_s(url)
        incr = incr_peer(url, args.requests, idle)
        runs = {
            f"{kind}_{n}": asyncio.run(load(url, kind, n, args.seconds, idle))
            for kind in ("transaction", "script", "store")
            for n in (1, args.clients)
        }
    tx, script = runs[f"transaction_{args.clients}"], runs[f"script_{args.clients}"]
    ratio = None
    if tx["updates_per_redis_cpu_s"] and script["updates_per_redis_cpu_s"]:
        ratio = round(script["updates_per_redis_cpu_s"] / tx["updates_per_redis_cpu_s"], 3)
    return {
        "benchmark": "redis",
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python bench/bench_redis.py", *sys.argv[1:]]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "redis": version,
            "redis_py": redis.__version__,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "settings": {"clients": args.clients, "seconds": args.seconds, "hash_fields": BUCKETS + 4},
        "incr": incr,
        "redis_idle_cores": round(idle, 5),
        "waiting_room_update": {**runs, "script_over_transaction": ratio},
    }


def table(result: dict[str, Any]) -> str:
    incr, w = result["incr"], result["waiting_room_update"]
    rows = [
        "| measurement | per second | Redis cores | per Redis CPU-second | aborted per update |",
        "|---|---|---|---|---|",
        f"| INCR (redis-benchmark, 50 connections) | {incr['rps']:,.0f} "
        f"| {incr['redis_cpu_s'] / incr['wall_s']:.2f} | {incr['per_redis_cpu_s']:,.0f} | - |",
    ]
    names = {
        "transaction": "WATCH/MULTI update (the first RedisQueueStore)",
        "script": "one Lua script",
        "store": "RedisQueueStore.join (its Lua script, 60 buckets)",
    }
    for m in (v for v in w.values() if isinstance(v, dict)):
        rows.append(
            f"| {names[m['kind']]}, {m['clients']} client(s) on one key | {m['updates_per_s']:,.0f} "
            f"| {m['redis_cores']:.2f} | {m['updates_per_redis_cpu_s']:,.0f} | {m['aborted_per_update']} |"
        )
    return "\n".join(rows) + f"\n\nscript ÷ transaction per Redis CPU-second: {w['script_over_transaction']}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients on the key (default 16)")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per update run (default 8)")
    parser.add_argument("--requests", type=int, default=300_000, help="INCRs for redis-benchmark")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default bench/results)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [tool for tool in ("redis-server", "redis-benchmark") if shutil.which(tool) is None]
    if missing:
        print(f"bench_redis: {' and '.join(missing)} not found (apt-get install -y redis)", file=sys.stderr)
        return 2
    result = run(args)
    path = write_json(args.out / "redis.json", result)
    machine = result["machine"]
    print(f"townhall redis: {result['date']}, Redis {machine['redis']}, {machine['cpus']} cores")
    print(table(result))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
