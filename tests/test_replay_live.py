"""A live space end to end: a WHIP speaker's tone goes through the stage's packager into the
media store while the space is live; the moment it ends, the replay is the whole space, with the
speaker's tone from the moment they spoke, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import m3u8
import pytest

from tests.recording_support import decode_mono
from tests.spaces_support import Cast, cast, generous_config
from tests.support import running_server
from tests.test_audience import Speaker
from townhall.stage.sources import tone_power
from townhall.storage.media_store import LocalMediaStore

RATE = 48000
TONE = 660.0
SPEAK_SECONDS = 8.0


@pytest.fixture
def live(backend: str, tmp_path: Path) -> Iterator[Cast]:
    with running_server(generous_config(backend, tmp_path / "data")) as server:
        yield cast(server)


def test_the_replay_of_a_live_space_holds_the_speakers_tone(live: Cast, tmp_path: Path) -> None:
    store = LocalMediaStore(live.server.config.data / "media")
    token = live.speaker.post(live.path("/speaker-token")).json()["speaker_token"]
    speaker = Speaker(f"{live.server.url}/whip/{live.space_id}", token, TONE)
    try:
        # Speak until the store holds SPEAK_SECONDS more audio than when the speaker connected.
        deadline = time.monotonic() + 60
        spoken_from = sum(p.duration for p in store.parts(live.space_id))
        while sum(p.duration for p in store.parts(live.space_id)) < spoken_from + SPEAK_SECONDS:
            assert time.monotonic() < deadline, "the stage wrote no parts"
            time.sleep(0.2)
        ended_at = time.monotonic()
        assert live.host.post(live.path("/end")).status_code == 200
        r = live.anonymous.get(f"/hls/{live.space_id}/replay.m3u8")
        playlist_s = time.monotonic() - ended_at
    finally:
        speaker.close()
    assert r.status_code == 200, r.text
    assert playlist_s < 1.0
    assert store.is_finished(live.space_id)  # the stage marked the recording complete
    parts = store.parts(live.space_id)
    total = sum(p.duration for p in parts)
    assert [p.seq for p in parts] == list(range(len(parts)))  # nothing missing
    vod = m3u8.loads(r.text)
    assert vod.is_endlist and abs(sum(s.duration for s in vod.segments) - total) < 0.01
    m4a = live.anonymous.get(live.path("/recording.m4a"))
    assert m4a.status_code == 200 and int(m4a.headers["content-length"]) == len(m4a.content)
    file = tmp_path / "space.m4a"
    file.write_bytes(m4a.content)
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "json", str(file)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert abs(float(json.loads(probe.stdout)["format"]["duration"]) - total) < 0.01
    samples, _ = decode_mono(m4a.content)
    assert abs(len(samples) / RATE - total) <= max(p.duration for p in parts)
    # The tone from its first 50 ms window on, with no gap longer than one part, up to the
    # last part (the speaker was still talking when the space ended).
    window = RATE // 20
    heard = [
        tone_power(samples[i : i + window], RATE, TONE, bandwidth=60.0) > 0.5
        for i in range(0, len(samples) - window + 1, window)
    ]
    first = heard.index(True)
    spoken = heard[first : len(heard) - round(max(p.duration for p in parts) * 20)]
    assert len(spoken) * window / RATE >= SPEAK_SECONDS - 1.0
    longest = run = 0
    for ok in spoken:
        run = 0 if ok else run + 1
        longest = max(longest, run)
    assert longest * window / RATE <= max(p.duration for p in parts), f"a gap of {longest * window / RATE} s"
    # And the host's replay post is there at the end.
    timeline = live.anonymous.get("/api/v1/accounts/host/posts")
    assert timeline.status_code == 200
    assert timeline.json()["posts"][0]["kind"] == "replay"
    assert timeline.json()["posts"][0]["space_id"] == live.space_id
