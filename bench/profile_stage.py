"""Where a stage's CPU goes: N live 3-speaker spaces held steady, the stage process's CPU per thread.

``.venv/bin/python bench/profile_stage.py --spaces 8 --seconds 20 [--py-spy OUT.svg|OUT.txt]``

Starts ``townhall serve`` (as ``bench_stage.py`` does, with its clients: pre-encoded Opus tones
for the speakers, WHEP returns counted without decoding), opens ``--spaces`` spaces of 3 speakers
with their mix-minus returns, warms up, then reads the stage process's CPU per thread from
``/proc/PID/task/*/stat`` (and voluntary / involuntary context switches from ``status``) over a
``--seconds`` window, and, with ``--py-spy``, records the process with ``py-spy record --nonblocking``
over the same window (py-spy installed in the venv for measuring only; ``.txt`` gives the raw
collapsed stacks, anything else a flame graph). Prints one table and writes it as JSON next to
``--json``. Threads of the same role are summed (``aiortc`` thread pools, packagers).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_stage as bs
from _common import CLK_TCK


def thread_times(pid: int) -> dict[int, tuple[str, float, int, int, float]]:
    """tid -> (name, CPU seconds, voluntary switches, involuntary switches, system seconds)."""
    out: dict[int, tuple[str, float, int, int, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            stat = (task / "stat").read_text()
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat.rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
            status = dict(
                line.split(":\t", 1) for line in (task / "status").read_text().splitlines() if ":\t" in line
            )
            out[int(task.name)] = (
                name,
                cpu,
                int(status.get("voluntary_ctxt_switches", "0")),
                int(status.get("nonvoluntary_ctxt_switches", "0")),
                int(fields[12]) / CLK_TCK,
            )
    return out


def python_names(pid: int) -> dict[int, str]:
    """Native thread id -> Python thread name, from ``py-spy dump`` (empty without py-spy)."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        return {}
    text = subprocess.run([str(spy), "dump", "-p", str(pid)], capture_output=True, text=True).stdout
    return {int(tid): name for tid, name in re.findall(r"Thread (\d+) \([a-z]+\): \"([^\"]*)\"", text)}


def role(name: str, tid: int, pid: int) -> str:
    if tid == pid:
        return "event loop (main)"
    if name.startswith("packager"):
        return "packager threads"
    if name.startswith("opus"):
        return "Opus encoder thread"
    return f"other ({name.rstrip('0123456789-_')})"


def per_role(
    pid: int, before: dict[int, Any], after: dict[int, Any], wall: float, names: dict[int, str]
) -> dict[str, dict[str, float]]:
    roles: dict[str, dict[str, float]] = {}
    for tid, (name, cpu, vol, invol, system) in after.items():
        _, cpu0, vol0, invol0, system0 = before.get(tid, (name, 0.0, 0, 0, 0.0))
        zero = {"cores": 0.0, "system_cores": 0.0, "voluntary_per_s": 0.0, "involuntary_per_s": 0.0}
        r = roles.setdefault(role(names.get(tid, name), tid, pid), zero)
        r["cores"] += (cpu - cpu0) / wall
        r["system_cores"] += (system - system0) / wall
        r["voluntary_per_s"] += (vol - vol0) / wall
        r["involuntary_per_s"] += (invol - invol0) / wall
    return roles


async def run(args: argparse.Namespace) -> dict[str, Any]:
    bs.count_without_decoding()
    with tempfile.TemporaryDirectory(prefix="profile-stage-") as tmp, bs.townhall_server(Path(tmp)) as server:
        api = bs.Api(server.base)
        try:
            await api.ensure_accounts(3 * args.spaces)
            stages = list(
                await asyncio.gather(
                    *(
                        bs.open_stage(api, api.accounts[3 * i : 3 * i + 3], bs.tones_for(3), 0.2)
                        for i in range(args.spaces)
                    )
                )
            )
            try:
                await asyncio.sleep(args.warmup)
                pid = bs.stage_pid(server)
                assert pid is not None, "no stage process"
                names = python_names(pid)
                spy = None
                if args.py_spy:
                    fmt = ["--format", "raw"] if args.py_spy.suffix == ".txt" else []
                    spy = await asyncio.create_subprocess_exec(
                        *[
                            str(Path(sys.executable).parent / "py-spy"),
                            "record",
                            "--threads",
                            "--nonblocking",
                            "-p",
                            str(pid),
                            "-d",
                            str(int(args.seconds)),
                            "-o",
                            str(args.py_spy),
                            *fmt,
                        ],
                        stdout=asyncio.subprocess.DEVNULL,
                        stderr=asyncio.subprocess.DEVNULL,
                    )
                before, t0 = thread_times(pid), time.monotonic()
                step = await bs.measure_stages(stages, api, server, args.seconds)
                after, t1 = thread_times(pid), time.monotonic()
                if spy is not None:
                    await spy.wait()
            finally:
                for st in stages:
                    await st.close(api)
        finally:
            await api.aclose()
    roles = per_role(pid, before, after, t1 - t0, names)
    return {"spaces": args.spaces, "window": step, "threads": roles}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--spaces", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--warmup", type=float, default=4)
    parser.add_argument("--py-spy", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    w = result["window"]
    print(
        f"{args.spaces} spaces: stage {w['stage_cores']:.3f} cores "
        f"({w['stage_cores'] / args.spaces:.4f} a space), "
        f"clients {w['client_cores']:.2f}, tick p99 {w['lateness']['end_of_window']['p99_ms']:.2f} ms, "
        f"late in window {w['lateness']['window_late_ticks']['0.01']:.0f}, "
        f"min WHIP/WHEP {w['whip_packets_per_s_min']:.0f}/{w['whep_frames_per_s_min']:.0f}"
    )
    for name, r in sorted(result["threads"].items(), key=lambda kv: -kv[1]["cores"]):
        print(
            f"  {name:24s} {r['cores']:.3f} cores (system {r['system_cores']:.3f})  "
            f"{r['voluntary_per_s']:7.0f} vol/s  "
            f"{r['involuntary_per_s']:6.0f} invol/s"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
