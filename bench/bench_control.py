"""Control-plane benchmark: logins, warm reads and health checks, each set beside a peer.

Run it from the repository root with the project's venv::

    .venv/bin/python bench/bench_control.py

It needs ``wrk`` and ``nginx`` (Debian: ``apt-get install -y wrk nginx``) and matplotlib in the
venv (``.venv/bin/pip install matplotlib``). Everything runs on 127.0.0.1 and stops by itself;
with the default settings the whole run takes about 80 seconds.

Method
------
Three measurements, each reported as absolute figures and as a ratio to a peer measured in the
same run on the same machine:

1. **Login** (``POST /api/v1/sessions``). The cost is argon2id verification with argon2-cffi's
   default parameters, so the peer is the raw rate of ``argon2.PasswordHasher().verify`` called
   from as many threads as the server's argon2 pool has (the asyncio default executor:
   ``min(32, cpu_count + 4)`` threads), for the same duration. Ratio = server logins/s ÷ raw
   verifies/s: what HTTP, JSON, the rate limiter and the session insert into the database cost.
   The server's per-account and per-address login limits would refuse almost every request, so
   the server is started with ``TOWNHALL_LOGIN_LIMIT_PER_ACCOUNT`` and
   ``TOWNHALL_LOGIN_LIMIT_PER_ADDRESS`` set to ``1000000/minute``. The load uses fewer
   connections than the reads (``--login-connections``) and a long ``--timeout`` so that queued
   logins are measured rather than dropped as wrk timeouts.
2. **Warm account read** (``GET /api/v1/accounts/{handle}``) and 3. **health**
   (``GET /healthz``). The peer is nginx serving the very same response bodies, fetched from the
   server just before, as files on disk. nginx is started by this script as a child process
   (``-g 'daemon off;'``, a temporary prefix, config and port) with ``worker_processes`` set by
   ``--nginx-workers`` (default 1, as townhall is one process). Ratio = townhall ÷ nginx.

The load generator is ``wrk`` (closed loop: each connection sends its next request when the last
answer arrives), with the same settings for both sides of each ratio, after a short warm-up run
that is not counted. A Lua ``done`` hook prints wrk's own summary as JSON: requests/s counts
successful responses only; ``non_2xx`` is wrk's count of responses with a status of 400 or more
(a 3xx would be counted as success, but each endpoint is checked once to answer 200 before the
load); socket errors and timeouts are counted separately. Latency percentiles are wrk's, which
in a closed loop understate queueing delay (coordinated omission): read p99 as "under this many
connections", not as an open-loop service time.

wrk, the server and nginx share the machine's cores, as they would on the 2-core target machine;
the figures are for comparison within one run, not absolute capacity.

Output: a table on stdout, ``bench/results/control.json`` and ``bench/results/control.png``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import argon2
from _common import (
    PASSWORD,
    Comparison,
    Measurement,
    WrkSettings,
    add_wrk_options,
    comparison_table,
    errors_of,
    fmt_ratio,
    http,
    machine_facts,
    nginx_serving,
    plot_pair,
    pyplot,
    run_wrk,
    save_figure,
    shown,
    tools_missing,
    write_json,
    write_lua,
)
from _common import townhall_server as serve_townhall

HANDLE = "bench_account"
LIMIT_ENV = {
    "TOWNHALL_LOGIN_LIMIT_PER_ACCOUNT": "1000000/minute",
    "TOWNHALL_LOGIN_LIMIT_PER_ADDRESS": "1000000/minute",
}
# asyncio.to_thread runs on the loop's default executor, whose size is this (CPython >= 3.8).
SERVER_ARGON2_THREADS = min(32, (os.cpu_count() or 1) + 4)


# -- peers -------------------------------------------------------------------------------------


def raw_argon2_verify(threads: int, duration_s: float) -> Measurement:
    """Verify one argon2id hash (argon2-cffi defaults) in ``threads`` threads for ``duration_s``."""
    hasher = argon2.PasswordHasher()
    stored = hasher.hash(PASSWORD)
    hasher.verify(stored, PASSWORD)  # warm
    start = time.perf_counter()
    deadline = start + duration_s
    lock = threading.Lock()
    samples: list[float] = []
    finished: list[float] = []

    def worker() -> None:
        mine: list[float] = []
        while True:
            t0 = time.perf_counter()
            if t0 >= deadline:
                break
            hasher.verify(stored, PASSWORD)
            mine.append(time.perf_counter() - t0)
        with lock:
            samples.extend(mine)
            finished.append(time.perf_counter())

    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        for future in [pool.submit(worker) for _ in range(threads)]:
            future.result()
    elapsed = max(finished) - start
    cuts = statistics.quantiles(samples, n=100, method="inclusive") if len(samples) > 1 else samples * 99
    return Measurement(
        name="argon2 verify (raw)",
        rps=len(samples) / elapsed,
        p50_ms=cuts[49] * 1e3,
        p99_ms=cuts[98] * 1e3,
        completed=len(samples),
        settings=f"{threads} threads, {duration_s:g}s",
    )


@contextlib.contextmanager
def townhall_server(workdir: Path) -> Iterator[str]:
    """Start ``townhall serve`` on a free loopback port with a fresh data dir; yield its base URL."""
    with serve_townhall(workdir / "data", workdir / "townhall.log", LIMIT_ENV) as server:
        yield server.base


# -- the run -----------------------------------------------------------------------------------


def expect_200(method: str, url: str, body: dict[str, Any] | None = None) -> bytes:
    status, payload = http(method, url, body)
    if status != 200:
        raise RuntimeError(f"{method} {url} answered {status}: {payload[:200]!r}")
    return payload


def run(args: argparse.Namespace) -> dict[str, Any]:
    reads = WrkSettings(args.threads, args.connections, args.duration, args.timeout)
    logins = WrkSettings(args.threads, args.login_connections, args.duration, args.timeout)
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    comparisons: list[Comparison] = []

    with tempfile.TemporaryDirectory(prefix="townhall-bench-") as tmp:
        workdir = Path(tmp)
        print(f"raw argon2id verify, {SERVER_ARGON2_THREADS} threads, {args.duration}s ...", flush=True)
        raw = raw_argon2_verify(SERVER_ARGON2_THREADS, args.duration)

        print(f"townhall serve (with {' '.join(f'{k}={v}' for k, v in LIMIT_ENV.items())}) ...", flush=True)
        with townhall_server(workdir) as base:
            credentials = {"handle": HANDLE, "password": PASSWORD}
            status, payload = http("POST", base + "/api/v1/accounts", credentials)
            if status != 201:
                raise RuntimeError(f"account creation answered {status}: {payload[:200]!r}")
            session = json.loads(expect_200("POST", base + "/api/v1/sessions", credentials))
            assert "token" in session, session
            account_path = f"/api/v1/accounts/{HANDLE}"
            bodies = {path: expect_200("GET", base + path) for path in (account_path, "/healthz")}

            login_lua = write_lua(workdir, "login", "POST", json.dumps(credentials))
            get_lua = write_lua(workdir, "get")
            print(f"wrk POST /api/v1/sessions {logins.describe()} ...", flush=True)
            run_wrk("warm-up", base + "/api/v1/sessions", login_lua, logins, args.warmup)
            login = run_wrk("townhall login", base + "/api/v1/sessions", login_lua, logins)
            comparisons.append(Comparison("POST /api/v1/sessions (login)", login, raw))

            townhall_reads: dict[str, Measurement] = {}
            for path in bodies:
                print(f"wrk GET {path} (townhall) {reads.describe()} ...", flush=True)
                run_wrk("warm-up", base + path, get_lua, reads, args.warmup)
                townhall_reads[path] = run_wrk(f"townhall GET {path}", base + path, get_lua, reads)

        print(f"nginx (worker_processes {args.nginx_workers}) ...", flush=True)
        with nginx_serving(bodies, args.nginx_workers, workdir) as nginx_base:
            for path, body in bodies.items():
                served = expect_200("GET", nginx_base + path)
                assert served == body, "nginx must serve the same bytes"
                print(f"wrk GET {path} (nginx) {reads.describe()} ...", flush=True)
                run_wrk("warm-up", nginx_base + path, get_lua, reads, args.warmup)
                peer = run_wrk(f"nginx GET {path}", nginx_base + path, get_lua, reads)
                label = f"GET {path.replace(HANDLE, '{handle}')} ({len(body)} B)"
                comparisons.append(Comparison(label, townhall_reads[path], peer))

    return {
        "benchmark": "control",
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python bench/bench_control.py", *sys.argv[1:]]),
        "machine": {
            **machine_facts("wrk", "nginx"),
            "argon2_cffi": argon2_version(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "settings": {
            "wrk_reads": reads.describe(),
            "wrk_logins": logins.describe(),
            "warmup_s": args.warmup,
            "nginx_worker_processes": args.nginx_workers,
            "argon2_threads": SERVER_ARGON2_THREADS,
            "argon2_parameters": argon2_parameters(),
            "server_env": LIMIT_ENV,
        },
        "results": [c.as_json() for c in comparisons],
    }


def argon2_parameters() -> dict[str, Any]:
    params = argon2.PasswordHasher()._parameters
    return {
        "type": params.type.name.lower(),
        "time_cost": params.time_cost,
        "memory_kib": params.memory_cost,
        "parallelism": params.parallelism,
    }


def argon2_version() -> str:
    from importlib.metadata import version

    return version("argon2-cffi")


# -- reporting ---------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
    """A Markdown table: absolute figures of both sides, the ratio, and failed requests."""
    return "\n".join(comparison_table(result["results"]))


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    results = result["results"]
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4.6), layout="constrained")
    for ax, r in zip(axes, results, strict=True):
        t, p = r["townhall"], r["peer"]
        plot_pair(ax, ["townhall", p["name"].split(" GET ")[0].replace(" (raw)", "\n(raw)")], t, p)
        ax.set_title(f"{r['case']}\nratio {fmt_ratio(r['ratio'])}", fontsize=10)
        ax.set_ylabel("requests/s" if "GET" in r["case"] else "logins or verifies/s")
        ax.grid(axis="y", alpha=0.3)
    s = result["settings"]
    save_figure(
        fig,
        path,
        dpi=120,
        title=f"townhall control plane, {result['machine']['cpus']} cores, loopback, {result['date'][:10]}  "
        f"(reads: wrk {s['wrk_reads']}; logins: wrk {s['wrk_logins']}; "
        f"nginx workers {s['nginx_worker_processes']})",
        title_size=9,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_wrk_options(parser, duration=10, warmup=2, connections=64, reads="reads")
    parser.add_argument(
        "--login-connections", type=int, default=8, help="wrk connections for logins (default 8)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if tools_missing("bench_control", "wrk", "nginx"):
        return 2
    result = run(args)
    json_path, png_path = write_json(args.out / "control.json", result), args.out / "control.png"
    plot(result, png_path)
    print()
    machine, settings = result["machine"], result["settings"]
    print(f"townhall control plane: {result['date']}, {machine['cpus']} cores ({machine['cpu_model']})")
    print(f"server env: {' '.join(f'{k}={v}' for k, v in LIMIT_ENV.items())}")
    print(f"reads: wrk {settings['wrk_reads']}; logins: wrk {settings['wrk_logins']}")
    print(
        f"nginx worker_processes {args.nginx_workers}; raw argon2id verify: {SERVER_ARGON2_THREADS} threads\n"
    )
    print(table(result))
    failed = sum(errors_of(r["townhall"]) + errors_of(r["peer"]) for r in result["results"])
    print(f"\nfailed = wrk's status >= 400 + socket errors + timeouts; in all measured runs: {failed}")
    print(f"wrote {shown(json_path)}\nwrote {shown(png_path)}")
    if failed:
        print("bench_control: some requests failed; the rates above count successes only", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
