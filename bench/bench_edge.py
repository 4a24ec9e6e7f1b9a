"""Edge benchmark: origin requests per part with 100, 1,000 and 10,000 loopback listeners behind
one nginx edge (the shipped configuration), and listeners per edge core.

    .venv/bin/python bench/bench_edge.py [--listeners 100,1000,10000] [--seconds 15]

What runs, all on 127.0.0.1: ``townhall serve`` (the origin) with a live space whose host
speaks a tone over WHIP (aiortc, in this process), and Debian's nginx with the configuration
``townhall.scaleout.edge.render`` makes (the one shipped in ``deploy/nginx/edge.conf``). The
listeners are wrk connections running a Lua script that behaves as an LL-HLS player does:
ask for the playlist with a blocking reload of the next part (``_HLS_msn``/``_HLS_part`` from
the last preload hint), then fetch the newest part it lists, and again. wrk's Lua state is per
thread, so the connections of a thread move along the live edge together — as real players of
one space do. The origin's own ``/metrics`` counts what reaches it, read ``--settle`` seconds
after wrk stops (wrk closes every connection then, many of them waiting at the edge: what that
costs the origin counts for the run); the parts produced over the window are the window
divided by the part duration. The peer this is measured against is the
ideal: one request per object per edge (a blocking playlist and a part per part: 2).

Output: a table, ``bench/results/edge.json`` and ``bench/results/edge.png``
(``edge-without-*`` with ``--without DIRECTIVES``: the shipped edge minus those directives,
for a before/after of each in one session). ``--trace`` logs every edge request with its cache
status (``$upstream_cache_status``), the origin's time and its ``Cache-Control``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    HOST,
    free_port,
    git_state,
    nginx_command,
    pyplot,
    save_figure,
    session_cpu_seconds,
    stop,
    townhall_server,
    write_json,
)

from townhall.scaleout.edge import EdgeSettings, render
from townhall.stage.client import publish
from townhall.stage.ice import restrict_host_addresses
from townhall.stage.sources import ToneTrack

PART_S = 0.4907  # the packager's part at the default 0.5 s target (one AAC frame short)
SEGMENT_PARTS = 4  # the default hls_segment_parts

LUA = """
local space = "%(space)s"
wrk.headers["Cookie"] = "townhall_ticket=%(ticket)s"
local msn, part = %(msn)d, %(part)d          -- the next part (blocking reload target)
local have_msn, have_part = %(have_msn)d, %(have_part)d  -- the newest part listed
local flip = false
request = function()
  flip = not flip
  if flip then
    return wrk.format("GET", string.format("/hls/%%s/live.m3u8?_HLS_msn=%%d&_HLS_part=%%d", space, msn, part))
  end
  return wrk.format("GET", string.format("/hls/%%s/seg%%d.%%d.m4s", space, have_msn, have_part))
end
-- Only playlists are read (a part's body is not scanned), and only the preload hint in them:
-- the newest listed part is the one before it. A thread's listeners only move forward.
response = function(status, headers, body)
  if string.byte(body, 1) ~= 35 then return end
  local m, p = string.match(body, 'PRELOAD%%-HINT:TYPE=PART,URI="seg(%%d+)%%.(%%d+)%%.m4s"')
  if m then
    m, p = tonumber(m), tonumber(p)
    if m > msn or (m == msn and p > part) then
      msn, part = m, p
      if p > 0 then have_msn, have_part = m, p - 1 else have_msn, have_part = m - 1, %(last_part)d end
    end
  end
end
"""


def origin_counts(base: str) -> dict[str, float]:
    """The origin's listener requests so far, by route and status."""
    text = httpx.get(base + "/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("townhall_http_requests_total{") and 'route="/hls/' in line:
            labels, value = line.rsplit(" ", 1)
            counts[labels.removeprefix("townhall_http_requests_total")] = float(value)
    return counts


def origin_requests(base: str) -> float:
    return sum(origin_counts(base).values())


def hint(playlist: str) -> tuple[int, int, int, int]:
    import re

    nxt = re.search(r'PRELOAD-HINT:TYPE=PART,URI="seg(\d+)\.(\d+)\.m4s"', playlist)
    listed = re.findall(r'#EXT-X-PART:[^\n]*URI="seg(\d+)\.(\d+)\.m4s"', playlist)
    assert nxt is not None and listed, playlist
    return int(nxt.group(1)), int(nxt.group(2)), int(listed[-1][0]), int(listed[-1][1])


def run(args: argparse.Namespace) -> dict[str, Any]:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))  # wrk and nginx inherit it
    restrict_host_addresses([HOST])
    work = Path(tempfile.mkdtemp(prefix="townhall-bench-edge-"))
    work.chmod(0o755)
    results: dict[str, Any] = {"runs": []}
    with townhall_server(work / "data", work / "server.log", {"TOWNHALL_LOG_LEVEL": "warning"}) as server:
        api = httpx.Client(base_url=server.base, timeout=30)
        api.post("/api/v1/accounts", json={"handle": "edgehost", "password": "password123"})
        token = api.post("/api/v1/sessions", json={"handle": "edgehost", "password": "password123"}).json()[
            "token"
        ]
        api.headers["Authorization"] = f"Bearer {token}"
        space = api.post("/api/v1/spaces", json={"title": "Edge"}).json()["id"]
        api.post(f"/api/v1/spaces/{space}/start").raise_for_status()
        speaker_token = api.post(f"/api/v1/spaces/{space}/speaker-token").json()["speaker_token"]
        prefix = work / "edge"
        for sub in ("tmp", "cache"):
            (prefix / sub).mkdir(parents=True)
        for path in (prefix, prefix / "tmp", prefix / "cache"):
            path.chmod(0o777)
        port = free_port()
        origin = server.base.removeprefix("http://")
        conf = prefix / "nginx.conf"
        text = render(EdgeSettings([origin], listen=f"{HOST}:{port}", prefix=str(prefix), workers="1"))
        text = text.replace("worker_connections 8192", f"worker_connections {min(30000, hard - 100)}")
        for directive in args.without:
            # The shipped edge minus a directive (a before/after of each fix in one session).
            text = "\n".join(x for x in text.splitlines() if x.split()[:1] != [directive]) + "\n"
        if args.trace:
            # Every listener request with its cache status and the origin's time, for tracing.
            text = text.replace("access_log off;", TRACE_LOG % {"path": prefix / "access.log"})
            text = text.replace("error.log warn;", "error.log info;")  # "cache lock timeout" is info
            print(f"edge access log: {prefix / 'access.log'}", flush=True)
        conf.write_text(text)
        edge = subprocess.Popen(nginx_command(prefix, conf), start_new_session=True)
        edge_url = f"http://{HOST}:{port}"

        async def speak_and_measure() -> None:
            pub = await publish(f"{server.base}/whip/{space}", speaker_token, ToneTrack(440.0))
            try:
                await asyncio.sleep(3.0)
                for n in args.listeners:
                    results["runs"].append(await asyncio.to_thread(one_run, n))
            finally:
                await pub.close()

        def one_run(n: int) -> dict[str, Any]:
            with httpx.Client(base_url=edge_url, timeout=30) as listener:
                listener.post(f"/api/v1/spaces/{space}/join").raise_for_status()
                ticket = listener.cookies["townhall_ticket"]
                msn, part, have_msn, have_part = hint(listener.get(f"/hls/{space}/live.m3u8").text)
            script = work / f"listeners-{n}.lua"
            script.write_text(
                LUA
                % {
                    "space": space,
                    "ticket": ticket,
                    "msn": msn,
                    "part": part,
                    "have_msn": have_msn,
                    "have_part": have_part,
                    "last_part": SEGMENT_PARTS - 1,
                }
                + DONE
            )
            access_log = prefix / "access.log"
            log_from = access_log.stat().st_size if access_log.exists() else 0
            counts0 = origin_counts(server.base)
            before, cpu0, t0 = sum(counts0.values()), session_cpu_seconds(edge.pid), time.monotonic()
            threads = 2 if n >= 2 else 1
            out = subprocess.run(
                [
                    "wrk",
                    f"-t{threads}",
                    f"-c{n}",
                    f"-d{args.seconds}s",
                    "--timeout=15s",
                    "-s",
                    str(script),
                    edge_url,
                ],
                capture_output=True,
                text=True,
                timeout=args.seconds + 60,
                check=False,
            )
            wall = time.monotonic() - t0
            cpu1 = session_cpu_seconds(edge.pid)
            # What the run's listeners cost the origin after they left (a waiter's turn on the
            # lock comes round every 500 ms, up to the lock's timeout) is counted for the run.
            time.sleep(args.settle)
            counts1 = origin_counts(server.base)
            after = sum(counts1.values())
            by_kind = {k: v - counts0.get(k, 0.0) for k, v in counts1.items() if v - counts0.get(k, 0.0) > 0}
            line = next((x for x in out.stdout.splitlines() if x.startswith("EDGE_JSON ")), None)
            if line is None:
                raise RuntimeError(f"wrk: {out.stdout}\n{out.stderr}")
            w = json.loads(line.removeprefix("EDGE_JSON "))
            parts = wall / PART_S
            edge_cores = (cpu1 - cpu0) / wall
            row = {
                "listeners": n,
                "window_s": round(wall, 2),
                "edge_requests": w["requests"],
                "non_2xx": w["status"],
                "socket_errors": w["errors"],
                "p50_ms": w["p50_us"] / 1000,
                "p99_ms": w["p99_us"] / 1000,
                "origin_requests": after - before,
                "origin_requests_by_route": by_kind,
                "parts": round(parts, 1),
                "origin_requests_per_part": round((after - before) / parts, 2),
                "edge_cores": round(edge_cores, 3),
                "edge_requests_per_cpu_s": round(w["requests"] / (cpu1 - cpu0)) if cpu1 > cpu0 else None,
                "listeners_per_edge_core": round(n / edge_cores) if edge_cores > 0 else None,
            }
            if args.trace:
                time.sleep(1.5)  # the access log's buffer is flushed every second
                row.update(collapse(access_log, log_from))
            print(
                f"{n:>6} listeners: origin {row['origin_requests_per_part']:.2f} req/part, "
                f"edge {w['requests'] / wall:,.0f} req/s on {edge_cores:.2f} cores, "
                f"p50 {row['p50_ms']:.0f} ms p99 {row['p99_ms']:.0f} ms, non-2xx {w['status']}"
                + (
                    f"; {row['objects']} objects asked, {row['origin_fetches_per_object']:.2f} origin "
                    f"fetches each (most {row['most_fetches_of_one_object']})"
                    if args.trace
                    else ""
                ),
                flush=True,
            )
            return row

        try:
            asyncio.run(speak_and_measure())
        finally:
            stop(edge)
            api.close()
    results["without"] = args.without
    results["command"] = " ".join([".venv/bin/python bench/bench_edge.py", *sys.argv[1:]])
    results["git"] = git_state()
    return results


def collapse(access_log: Path, start: int) -> dict[str, Any]:
    """From the edge's access log (``--trace``) since byte ``start``: the listener objects asked
    for (distinct paths with their blocking-reload parameters) and how many times each reached
    the origin (requests with an upstream status): 1 is perfect collapsing."""
    fetches: dict[str, int] = {}
    with access_log.open("rb") as f:
        f.seek(start)
        for raw in f:
            fields = raw.decode("latin-1").split()
            if len(fields) < 9 or not fields[1].startswith("/hls/"):
                continue
            fetches[fields[1]] = fetches.get(fields[1], 0) + (fields[8] != "-")
    objects, total = len(fetches), sum(fetches.values())
    return {
        "objects": objects,
        "origin_fetches": total,
        "origin_fetches_per_object": round(total / objects, 3) if objects else None,
        "most_fetches_of_one_object": max(fetches.values(), default=0),
    }


TRACE_LOG = """log_format trace '$msec $request_uri $status $upstream_cache_status '
                     '$upstream_response_time $request_time $connection $connection_requests '
                     '$upstream_status $upstream_header_time $upstream_bytes_received '
                     '"$upstream_http_cache_control" "$upstream_http_set_cookie"';
    access_log %(path)s trace buffer=256k flush=1s;"""

DONE = """
done = function(summary, latency, requests)
  io.write(string.format('EDGE_JSON {"requests":%d,"status":%d,"errors":%d,"p50_us":%d,"p99_us":%d}\\n',
    summary.requests, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def plot(results: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    runs = results["runs"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [r["listeners"] for r in runs]
    ax1.plot(xs, [r["origin_requests_per_part"] for r in runs], "o-", label="measured")
    ax1.axhline(2.0, color="grey", linestyle="--", label="ideal: one playlist + one part per part")
    ax1.set_xscale("log")
    ax1.set_ylim(0, max(4.0, max(r["origin_requests_per_part"] for r in runs) * 1.2))
    ax1.set_xlabel("listeners behind one edge")
    ax1.set_ylabel("origin requests per part")
    ax1.set_title("Request collapsing at the edge")
    ax1.legend()
    ax2.plot(xs, [r["p99_ms"] for r in runs], "o-", label="p99")
    ax2.plot(xs, [r["p50_ms"] for r in runs], "o-", label="p50")
    ax2.set_xscale("log")
    ax2.set_xlabel("listeners behind one edge")
    ax2.set_ylabel("ms (a blocking reload waits for the next part)")
    ax2.set_title("Listener request latency through the edge")
    ax2.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--listeners", default="100,1000,10000", type=lambda s: [int(x) for x in s.split(",")]
    )
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument(
        "--settle",
        type=float,
        default=11.0,
        help="seconds after each run before the origin's counts are read (default 11: past the "
        "edge's 10 s lock timeout, so requests the run's departing listeners cause count for it)",
    )
    parser.add_argument(
        "--trace",
        action="store_true",
        help="log every edge request with its cache status and the origin's time (printed path)",
    )
    parser.add_argument(
        "--without",
        default=[],
        type=lambda s: [x for x in s.split(",") if x],
        help="nginx directives to take out of the shipped edge, comma-separated (a before/after: "
        "proxy_cache_min_uses,proxy_ignore_client_abort is the edge before they were added)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    results = run(args)
    without = [d.removeprefix("proxy_") for d in args.without]
    name = "-".join(["edge", "without", *without]) if without else "edge"
    write_json(args.out / f"{name}.json", results)
    plot(results, args.out / f"{name}.png")
    print(f"wrote {args.out / name}.json and .png")


if __name__ == "__main__":
    main()
