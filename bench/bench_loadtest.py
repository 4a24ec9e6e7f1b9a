"""Admission under load, measured with `townhall loadtest` against a `townhall demo` node.

Starts a demo node (a live space whose host talks: a WHIP tone, so the stage ticks) on a free
loopback port with the space's admission rate set low enough that a storm overflows it, runs
the three scenarios one after the other (listeners in the demo's space; the storm and the flood
each in a fresh live space of the demo host, since a storm leaves its space's queue full), and
keeps their reports and plots in ``bench/results/`` (``loadtest-{scenario}.json`` / ``.png``)
plus a summary (``loadtest.json``). The load generator is one Python process on the same two cores as the
node: its figures are what this machine carries with both on it, not the node's limit.

    .venv/bin/python bench/bench_loadtest.py [--listeners 500] [--storm 5000] [--legit 300]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TOWNHALL = Path(sys.executable).parent / "townhall"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_demo(data: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], str, str]:
    port = free_port()
    proc = subprocess.Popen(
        [str(TOWNHALL), "demo", "--port", str(port), "--data", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **env},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.search(r"live space (http://\S+)/api/v1/spaces/(\w+)", line)
    if m is None:
        proc.kill()
        raise SystemExit(f"the demo did not start: {line!r}")
    time.sleep(5)  # the host's WHIP tone connects and the stage starts ticking
    return proc, m[1], m[2]


def fresh_space(url: str, title: str) -> str:
    """A new live space of the demo host (so that one scenario's waiting room, still full of
    the storm's joiners, does not stand in front of the next one's)."""
    import httpx

    with httpx.Client(base_url=url, timeout=30) as http:
        login = {"handle": "demo_host", "password": "demo-password"}
        token = http.post("/api/v1/sessions", json=login).json()["token"]
        auth = {"Authorization": f"Bearer {token}"}
        space = str(http.post("/api/v1/spaces", json={"title": title}, headers=auth).json()["id"])
        http.post(f"/api/v1/spaces/{space}/start", headers=auth).raise_for_status()
    return space


def loadtest(scenario: str, url: str, space: str, out: Path, *args: str) -> dict[str, object]:
    cmd = [str(TOWNHALL), "loadtest", scenario, "--url", url, "--space", space, *args, "--out", str(out)]
    print("$", " ".join(cmd[1:]), flush=True)
    run = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    files = json.loads(run.stdout.splitlines()[-1])
    for kind in ("json", "png"):
        shutil.copyfile(files[kind], RESULTS / f"loadtest-{scenario}.{kind}")
    return {
        "command": "townhall " + " ".join(cmd[1:]).replace(str(out), "DIR"),
        "report": f"bench/results/loadtest-{scenario}.json",
        "plot": f"bench/results/loadtest-{scenario}.png",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--listeners", type=int, default=500)
    parser.add_argument("--listen-seconds", type=float, default=30)
    parser.add_argument("--storm", type=int, default=5000)
    parser.add_argument("--storm-seconds", type=float, default=10)
    parser.add_argument("--legit", type=int, default=300)
    parser.add_argument("--flood-seconds", type=float, default=10)
    parser.add_argument("--join-rate", type=float, default=20.0, help="the space's admissions per second")
    parser.add_argument("--pause", type=float, default=15.0, help="seconds between scenarios")
    parser.add_argument(
        "--pow-bits",
        type=int,
        default=None,
        help="the node's pow_base_bits (default: as shipped); the generator solves every "
        "legitimate joiner's proof on this machine's cores, which in the field each joiner's "
        "own device does",
    )
    parser.add_argument(
        "--scenarios", default="listeners,join-storm,flood", help="which to run, comma-separated"
    )
    args = parser.parse_args()
    env = {"TOWNHALL_SPACE_JOIN_RATE": str(args.join_rate), "TOWNHALL_SPACE_JOIN_BURST": str(args.join_rate)}
    if args.pow_bits is not None:
        env["TOWNHALL_POW_BASE_BITS"] = str(args.pow_bits)
    RESULTS.mkdir(parents=True, exist_ok=True)
    reports: dict[str, object] = {"node_env": env, "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="townhall-bench-loadtest-") as tmp:
        proc, url, space = start_demo(Path(tmp) / "data", env)
        try:
            out = Path(tmp) / "out"
            chosen = args.scenarios.split(",")
            ls = str(args.listen_seconds)
            if "listeners" in chosen:
                reports["listeners"] = loadtest(
                    "listeners", url, space, out, "-n", str(args.listeners), "--seconds", ls
                )
                time.sleep(args.pause)
            storm = ["-n", str(args.storm), "--seconds", str(args.storm_seconds), "--drain", "20"]
            if "join-storm" in chosen:
                reports["join-storm"] = loadtest("join-storm", url, fresh_space(url, "storm"), out, *storm)
                time.sleep(args.pause)
            flood = [
                "--legit",
                str(args.legit),
                "--attack-factor",
                "10",
                "--seconds",
                str(args.flood_seconds),
            ]
            if "flood" in chosen:
                reports["flood"] = loadtest(
                    "flood", url, fresh_space(url, "flood"), out, *flood, "--drain", "20"
                )
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    (RESULTS / "loadtest.json").write_text(json.dumps(reports, indent=2) + "\n")
    print(f"wrote {RESULTS / 'loadtest.json'}")


if __name__ == "__main__":
    main()
