"""Replay benchmark: time from ``POST /api/v1/spaces/{id}/end`` to the first successful
``GET /hls/{id}/replay.m3u8`` and to the last byte of ``GET /api/v1/spaces/{id}/recording.m4a``,
for a 1-minute space and a 3-hour space. Target (DESIGN.md): under 1 s for both, whatever the
length.

Run it from the repository root with the project's venv::

    .venv/bin/python bench/bench_replay.py

It needs ffprobe (Debian's ffmpeg), curl and matplotlib in the venv; about 3 minutes with the
defaults, most of it encoding three hours of audio.

Method
------
``townhall serve`` is started on a free loopback port with a fresh data directory (default
settings: ``replay_finish_wait_seconds`` 0.5). One host registers and logs in over HTTP.

The recordings are real: the real ``Packager`` (AAC-LC 64 kb/s, fMP4 parts of 0.491 s) is fed a
440 Hz tone as fast as it encodes, once per length (60 s: 123 parts; 10,800 s: 22,011 parts).
For each run a space is created over HTTP, and the packaged init segment and parts are written
into the server's media store (``DATA/media/{id}/``) with ``LocalMediaStore`` from this process,
exactly as the stage writes them (each part: temp file, fsync, rename, directory fsync): the
3-hour space is "simulated through the store", its hours not lived in real time. They are
written *before* ``POST .../start``, as if the space had run on a stage process that then
restarted: when the node's own stage starts the space's room it continues the numbering in a
new epoch (``resume_point``), packages the live program mix (silence: nobody speaks) for the
``--hold`` seconds the space stays live, and, at the end, flushes its last part and writes the
``finished`` marker. (A node whose stage does not write the store leaves no marker: the replay
then waits ``replay_finish_wait_seconds`` after the end and serves what is durable; the JSON
says which happened, from the playlist's ``Cache-Control``.) Then, timed with
``time.perf_counter``:

1. ``POST .../end`` (the server commits the end and the replay post),
2. ``GET /hls/{id}/replay.m3u8`` until it answers 200 (it does the first time),
3. ``GET /api/v1/spaces/{id}/recording.m4a`` with ``curl`` (spawned right after the playlist
   answered), reading the whole body (time to first byte and to the last byte), its length
   checked against ``Content-Length`` (a ``HEAD`` afterwards).

Both times are measured from the moment ``POST .../end`` is sent, and the ``.m4a`` request is
made after the playlist's, so its figure includes the playlist's (conservative). A thread
polls the ``finished`` marker every 5 ms and notes when it appeared after the end.

Every recording's ``.m4a`` of the first run of each length is written to a temporary file and
read back by ffprobe, whose duration is reported beside the sum of the parts' durations. Runs
are repeated (``--runs``); medians and maxima are reported. The parts are in the page cache
(they were just written), as they are on a server that just wrote them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from _common import REPO, RESULTS, machine_facts, pyplot, save_figure, write_json
from bench_control import townhall_server

sys.path.insert(0, str(REPO))  # the tests' real-packager helper

from tests.recording_support import Packaged, package_tone
from townhall.audience.packager import PartReady
from townhall.storage.media_store import LocalMediaStore, PartRecord


def packaged_tone(seconds: float, cache: Path | None) -> Packaged:
    """The real packager's output for ``seconds`` of tone; kept in ``cache`` (if given) so a
    rerun on a busy machine does not encode three hours again."""
    if cache is not None:
        data_file, index_file = cache / f"tone-{int(seconds)}.bin", cache / f"tone-{int(seconds)}.json"
        if data_file.exists() and index_file.exists():
            index = json.loads(index_file.read_text())
            blob = data_file.read_bytes()
            init = blob[: index["init"]]
            parts, pos = [], index["init"]
            for size, duration, start in index["parts"]:
                parts.append(PartReady("bench", blob[pos : pos + size], duration, start))
                pos += size
            return Packaged(init, parts)
    packaged = package_tone(seconds)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        data_file.write_bytes(packaged.init + b"".join(p.data for p in packaged.parts))
        index_file.write_text(
            json.dumps(
                {
                    "init": len(packaged.init),
                    "parts": [[len(p.data), p.duration, p.start] for p in packaged.parts],
                }
            )
        )
    return packaged


def write_recording(store: LocalMediaStore, space_id: str, packaged: Packaged, *, finish: bool) -> float:
    """Write one space's recording as the stage does; returns the seconds it took."""
    began = time.perf_counter()
    store.write_init(space_id, 0, packaged.init)
    for seq, part in enumerate(packaged.parts):
        store.write_part(space_id, PartRecord(seq, 0, part.duration, part.start, part.data))
    if finish:
        store.finish(space_id)
    return time.perf_counter() - began


def server_pid(data: Path) -> int | None:
    """The ``townhall serve`` process using ``data`` (its CPU time is read from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in cmd and str(data).encode() in cmd:
            return int(entry.name)
    return None


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of ``pid`` so far (s); 0 when unknown."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(
    client: httpx.Client,
    store: LocalMediaStore,
    packaged: Packaged,
    *,
    hold: float,
    keep: Path | None,
    pid: int | None,
) -> dict[str, Any]:
    r = client.post("/api/v1/spaces", json={"title": "Benchmark"})
    r.raise_for_status()
    space_id = r.json()["id"]
    write_s = write_recording(store, space_id, packaged, finish=False)
    client.post(f"/api/v1/spaces/{space_id}/start").raise_for_status()
    time.sleep(hold)
    marker: dict[str, float] = {}
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set() and "at" not in marker:
            if store.is_finished(space_id):
                marker["at"] = time.perf_counter()
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    cpu_before = cpu_seconds(pid)
    began = time.perf_counter()
    client.post(f"/api/v1/spaces/{space_id}/end").raise_for_status()
    ended = time.perf_counter()
    playlist_attempts = 0
    while True:
        playlist_attempts += 1
        r = client.get(f"/hls/{space_id}/replay.m3u8")
        if r.status_code == 200:
            break
        if time.perf_counter() - began > 30:
            raise RuntimeError(f"replay.m3u8 never answered 200: {r.status_code} {r.text[:200]}")
    playlist_s = time.perf_counter() - began
    final = r.headers.get("cache-control") == "public, max-age=300"
    segments = r.text.count("#EXTINF")
    epochs = r.text.count("#EXT-X-MAP")
    # The download by curl (C, a few ms of CPU), not by this Python process: on two shared
    # cores a Python client parsing 91 MB would be measured as much as the server.
    target = str(keep) if keep else "/dev/null"
    spawned = time.perf_counter()
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--fail",
            "-o",
            target,
            "-w",
            "%{time_starttransfer} %{time_total} %{size_download} %{http_code}",
            f"{client.base_url}/api/v1/spaces/{space_id}/recording.m4a",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    m4a_s = time.perf_counter() - began
    server_cpu_s = cpu_seconds(pid) - cpu_before
    first_byte, _total, size, code = out.stdout.split()
    first_byte_s = spawned - began + float(first_byte)
    received = int(size)
    head = client.head(f"/api/v1/spaces/{space_id}/recording.m4a")
    length = int(head.headers["content-length"])
    watching.set()
    watcher.join()
    if code != "200" or received != length:
        raise RuntimeError(f"recording.m4a: {code}, {received} bytes received, Content-Length {length}")
    parts = store.parts(space_id)
    return {
        "space_id": space_id,
        "store_write_s": round(write_s, 3),
        "stored_parts": len(parts),
        "live_parts": sum(1 for p in parts if p.epoch > 0),
        "recorded_seconds": round(sum(p.duration for p in parts), 3),
        "end_request_s": round(ended - began, 4),
        "finished_marker_s": round(marker["at"] - began, 4) if "at" in marker else None,
        "playlist_final": final,
        "playlist_s": round(playlist_s, 4),
        "playlist_attempts": playlist_attempts,
        "playlist_segments": segments,
        "playlist_epochs": epochs,
        "m4a_first_byte_s": round(first_byte_s or 0.0, 4),
        "m4a_full_s": round(m4a_s, 4),
        "m4a_bytes": received,
        "server_cpu_s": round(server_cpu_s, 3),
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }


def ffprobe_duration(path: Path) -> float:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "json", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(json.loads(out.stdout)["format"]["duration"])


def summarise(runs: list[dict[str, Any]], key: str) -> dict[str, float]:
    values = [r[key] for r in runs]
    return {"median": round(statistics.median(values), 4), "max": round(max(values), 4)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = dt.datetime.now(dt.UTC)
    cases = [("1 minute", 60.0), ("3 hours", 3 * 3600.0)]
    result: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "machine": machine_facts(),
        "settings": {
            "runs": args.runs,
            "hold_s": args.hold,
            "replay_finish_wait_seconds": 0.5,
            "aac_bitrate": 64000,
        },
        "cases": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        work = Path(tmp)
        with townhall_server(work) as base, httpx.Client(base_url=base, timeout=60) as client:
            client.post(
                "/api/v1/accounts", json={"handle": "host", "password": "password123"}
            ).raise_for_status()
            token = client.post("/api/v1/sessions", json={"handle": "host", "password": "password123"})
            token.raise_for_status()
            client.headers["Authorization"] = f"Bearer {token.json()['token']}"
            store = LocalMediaStore(work / "data" / "media")
            pid = server_pid(work / "data")
            for label, seconds in cases:
                print(f"packaging {label} of tone with the real packager ...", flush=True)
                t = time.perf_counter()
                packaged = packaged_tone(seconds, args.cache)
                package_s = time.perf_counter() - t
                audio_s = sum(p.duration for p in packaged.parts)
                runs = []
                for i in range(args.runs):
                    keep = work / "first.m4a" if i == 0 else None
                    runs.append(one_run(client, store, packaged, hold=args.hold, keep=keep, pid=pid))
                    print(f"  {label} run {i + 1}: {runs[-1]}", flush=True)
                probed = ffprobe_duration(work / "first.m4a")
                (work / "first.m4a").unlink()
                result["cases"].append(
                    {
                        "case": label,
                        "seconds": seconds,
                        "parts": len(packaged.parts),
                        "audio_seconds": round(audio_s, 3),
                        "ffprobe_seconds_first_run": probed,
                        "recorded_seconds_first_run": runs[0]["recorded_seconds"],
                        "package_s": round(package_s, 2),
                        "runs": runs,
                        "playlist_s": summarise(runs, "playlist_s"),
                        "m4a_first_byte_s": summarise(runs, "m4a_first_byte_s"),
                        "m4a_full_s": summarise(runs, "m4a_full_s"),
                        "store_write_s": summarise(runs, "store_write_s"),
                        "server_cpu_s": summarise(runs, "server_cpu_s"),
                    }
                )
                del packaged
    result["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return result


def table(result: dict[str, Any]) -> str:
    lines = [
        "| space | parts stored | .m4a bytes | ffprobe s | marker after end "
        "| end → replay.m3u8 (median / max) | end → .m4a first byte | end → .m4a last byte (median / max) "
        "| server CPU (median) | load (1 min) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["cases"]:
        first = c["runs"][0]
        markers = [r["finished_marker_s"] for r in c["runs"] if r["finished_marker_s"] is not None]
        marker = f"{statistics.median(markers) * 1000:.0f} ms" if markers else "none"
        loads = [r["loadavg_1min"] for r in c["runs"]]
        lines.append(
            f"| {c['case']} | {first['stored_parts']:,} | {first['m4a_bytes']:,} "
            f"| {c['ffprobe_seconds_first_run']:.2f} | {marker} "
            f"| {c['playlist_s']['median'] * 1000:.0f} / {c['playlist_s']['max'] * 1000:.0f} ms "
            f"| {c['m4a_first_byte_s']['median'] * 1000:.0f} ms "
            f"| {c['m4a_full_s']['median'] * 1000:.0f} / {c['m4a_full_s']['max'] * 1000:.0f} ms "
            f"| {c['server_cpu_s']['median'] * 1000:.0f} ms "
            f"| {min(loads):.1f}-{max(loads):.1f} |"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = []
    playlist = []
    m4a = []
    for c in result["cases"]:
        labels.append(c["case"])
        playlist.append(c["playlist_s"]["median"])
        m4a.append(c["m4a_full_s"]["median"])
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], playlist, width=0.4, label="end → replay.m3u8 200 (median)")
    ax.bar([i + 0.2 for i in x], m4a, width=0.4, label="end → recording.m4a last byte (median)")
    for i, c in enumerate(result["cases"]):
        every = [(i - 0.2, r["playlist_s"]) for r in c["runs"]]
        every += [(i + 0.2, r["m4a_full_s"]) for r in c["runs"]]
        ax.scatter([a for a, _ in every], [b for _, b in every], color="black", marker="x", zorder=3)
    ax.scatter([], [], color="black", marker="x", label="each run")
    ax.axhline(1.0, color="red", linestyle="--", label="target 1 s")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("seconds after POST /end")
    ax.set_title("Replay availability after the end (loopback, 2 shared cores)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3, help="spaces ended per length")
    parser.add_argument(
        "--cache", type=Path, default=None, help="keep the packaged tones here (reruns skip encoding)"
    )
    parser.add_argument("--hold", type=float, default=2.0, help="seconds a space stays live before its end")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    write_json(RESULTS / "replay.json", result)
    plot(result, RESULTS / "replay.png")
    print(table(result))
    print(f"wrote {RESULTS / 'replay.json'} and {RESULTS / 'replay.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
