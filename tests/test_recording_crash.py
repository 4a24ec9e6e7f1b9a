"""kill -9 of the server mid-space: the recording keeps every acknowledged part; on restart the
space resumes and, its host gone, is finalised with a complete replay."""

from __future__ import annotations

import asyncio
import io
import os
import time
from pathlib import Path

import av
import m3u8
import numpy as np

from tests.support import Api
from tests.test_cli import free_port, start, stop, wait_healthy
from townhall.stage.client import publish
from townhall.stage.sources import ChirpTrack, find_chirps

RATE = 48000
PART = 0.5  # the default part target
INTERVAL = 0.25  # a chirp every quarter second: the timed markers


def _stage_pid(server_pid: int) -> int:
    """The server's stage process (its only child)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise AssertionError("the server started no stage process")


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def _epochs(playlist: m3u8.M3U8) -> list[tuple[float, float]]:
    """(wall-clock start, duration) of each run of segments between discontinuities."""
    runs: list[tuple[float, float]] = []
    for seg in playlist.segments:
        if not runs or seg.discontinuity:
            assert seg.program_date_time is not None
            runs.append((seg.program_date_time.timestamp(), 0.0))
        start_at, duration = runs[-1]
        runs[-1] = (start_at, duration + float(seg.duration))
    return runs


def test_kill_9_mid_space_loses_at_most_the_part_in_flight(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--port", str(port), "--data", str(tmp_path / "data")]
    env = {"TOWNHALL_HOST_GRACE_SECONDS": "3"}
    first = start(args, env)
    try:
        wait_healthy(url, first)
        with Api(url) as anonymous, anonymous.user("host") as host:
            space_id = host.post("/api/v1/spaces", json={"title": "Crash"}).json()["id"]
            assert host.post(f"/api/v1/spaces/{space_id}/start").status_code == 200
            token = host.post(f"/api/v1/spaces/{space_id}/speaker-token").json()["speaker_token"]
        stage_pid = _stage_pid(first.pid)

        async def speak_then_kill() -> tuple[float, list[float]]:
            track = ChirpTrack(INTERVAL, offset_s=0.5)
            pub = await publish(f"{url}/whip/{space_id}", token, track)
            await asyncio.sleep(5.0)
            first.kill()  # SIGKILL: no shutdown code runs in the node
            killed_at = time.time()
            markers = [m.wall_time for m in track.markers]
            pub.location = None  # nobody to say goodbye to
            await pub.close()
            return killed_at, markers

        killed_at, markers = asyncio.run(speak_then_kill())
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
        first.wait(10)
        if first.stdout is not None:
            first.stdout.close()
    # The orphaned stage process notices the node is gone, flushes its packager and exits.
    deadline = time.monotonic() + 15
    while not _gone(stage_pid):
        assert time.monotonic() < deadline, "the stage process outlived its node"
        time.sleep(0.05)

    second = start(args, env)
    try:
        wait_healthy(url, second)
        with Api(url) as api:
            deadline = time.monotonic() + 30
            while api.get(f"/api/v1/spaces/{space_id}").json()["state"] != "ended":
                assert time.monotonic() < deadline, "the abandoned space was never finalised"
                time.sleep(0.2)
            text = api.get(f"/hls/{space_id}/replay.m3u8").text
            m4a = api.get(f"/api/v1/spaces/{space_id}/recording.m4a", timeout=30)
            assert m4a.status_code == 200
            feed = api.get("/api/v1/accounts/host/posts").json()
    finally:
        stop(second)

    playlist = m3u8.loads(text)
    runs = _epochs(playlist)
    assert len(runs) == 2, text  # before the crash, and the resumed epoch until the grace ran out
    (start0, length0), (_, length1) = runs
    # Everything the stage had mixed before the kill is in the recording: at most the part in
    # flight (one part) is missing, plus the 20 ms ticks' and the network's share of a moment.
    assert start0 + length0 >= killed_at - PART - 0.15, (start0 + length0 - killed_at, text)
    assert 2.5 <= length1 <= 6.0, length1  # the resumed epoch lasted about the grace period

    with av.open(io.BytesIO(m4a.content)) as container:
        duration = float(container.duration or 0) / 1_000_000
        pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
    assert abs(duration - (length0 + length1)) <= PART, (duration, length0 + length1)
    onsets = [
        start0 + t for t in find_chirps(pcm[: round(length0 * RATE)], RATE, ChirpTrack(INTERVAL).template)
    ]
    # Timed markers: the chirps in the replay's first epoch run without a gap from the first
    # one sent to within one part of the kill: every chirp sent is found (the count below). The
    # spacing may wobble by the jitter buffer's 20 ms steps, and once by more when the speaker,
    # in this test's process on a loaded machine, stalls (seen once: one 0.48 s spacing, the
    # server concealing the late packets' time with silence); that is no loss of the recording.
    spacing = np.diff(onsets)
    assert len(spacing) and spacing.min() > INTERVAL - 0.07 and spacing.max() < 2 * INTERVAL, spacing
    assert np.count_nonzero(spacing > INTERVAL + 0.07) <= 1, spacing
    assert 0.0 < onsets[0] - markers[0] < 0.4, onsets[0] - markers[0]  # the first chirp is there
    assert onsets[-1] >= killed_at - PART - 0.15, onsets[-1] - killed_at  # and the last before the kill
    sent = [m for m in markers if m < killed_at - PART - 0.3]
    assert len(onsets) >= len(sent) >= 12, (len(onsets), len(sent))
    assert any(p["text"].startswith("Replay: Crash") for p in feed["posts"]), feed
    assert os.path.isdir(tmp_path / "data" / "media" / space_id)
