"""`townhall listen`: the LL-HLS listener, against a real server with a real WHIP speaker."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import av
import httpx
import numpy as np
import pytest

from tests.spaces_support import Cast, cast, generous_config
from tests.support import Api, running_server
from tests.test_audience import Speaker
from townhall.audience.listener import (
    Follower,
    Listener,
    ListenError,
    PartAudio,
    parse_media_playlist,
    resolve,
)
from townhall.audience.playlist import Part, PlaylistSpec, Segment, render_live
from townhall.stage.sources import tone_power

RATE = 48000
RESOURCES = Path(__file__).parent / "resources"
TOWNHALL = Path(sys.executable).parent / "townhall"


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[Cast, Speaker]]:
    with running_server(generous_config("sqlite", tmp_path / "data")) as server:
        c = cast(server)
        token = c.speaker.post(c.path("/speaker-token")).json()["speaker_token"]
        speaker = Speaker(f"{server.url}/whip/{c.space_id}", token, 660.0)
        try:
            yield c, speaker
        finally:
            speaker.close()


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, RATE)
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


def decode_file(path: Path) -> np.ndarray:
    resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
    out = []
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            out.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
    return np.concatenate(out)


def first_playlist(hls: Api, url: str, params: dict[str, str]) -> httpx.Response:
    """The live playlist once the stream has its first part (503 until then)."""
    deadline = time.monotonic() + 20
    while (r := hls.get(url, params=params)).status_code == 503:
        assert time.monotonic() < deadline, "no first part within 20 s"
        time.sleep(0.1)
    assert r.status_code == 200, r.text
    return r


# -- the command, end to end ------------------------------------------------------------------


def test_listen_command_records_the_speaker_and_reports_its_latency(
    live: tuple[Cast, Speaker], tmp_path: Path
) -> None:
    c, _ = live
    out = tmp_path / "heard.wav"
    space_url = f"{c.server.url}/api/v1/spaces/{c.space_id}"
    run = subprocess.run(
        [str(TOWNHALL), "listen", space_url, "--seconds", "6", "--out", str(out), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["reason"] == "elapsed" and result["space_id"] == c.space_id
    assert result["parts"] >= 8 and result["gaps"] == 0  # ~12 parts of 0.49 s in 6 s
    # Behind live: at least the part's own duration, and (LL-HLS) well under plain HLS's 6-10 s.
    latency = result["latency"]
    assert latency["count"] == result["parts"]
    assert 0.45 < latency["min"] <= latency["median"] <= latency["p95"] < 3.0, latency
    assert "behind live: median" in run.stderr and "listening" in run.stderr
    samples = read_wav(out)
    assert abs(len(samples) / RATE - result["audio_seconds"]) < 0.1
    assert tone_power(samples, RATE, 660.0) > 0.5  # the speaker's tone, decoded from LL-HLS


def test_library_listener_as_an_account_records_m4a_and_its_parts_in_order(
    live: tuple[Cast, Speaker], tmp_path: Path
) -> None:
    c, _ = live
    out = tmp_path / "heard.m4a"
    heard: list[PartAudio] = []
    listener = Listener(
        f"{c.server.url}/api/v1/spaces/{c.space_id}/", token=c.listener.token, out=out, on_audio=heard.append
    )
    result = asyncio.run(listener.run(seconds=4))
    assert result.reason == "elapsed" and result.parts == len(heard) >= 5
    # A logged-in listener's ticket names its account ("a<id>"), not a random guest id ("g...").
    assert listener.ticket is not None
    body = listener.ticket.split(".")[1]
    assert json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))["l"].startswith("a")
    # Consecutive parts, no gaps: (msn, i) then (msn, i + 1) or (msn + 1, 0).
    keys = [a.arrival.part.key for a in heard]
    for (m0, i0), (m1, i1) in itertools.pairwise(keys):
        assert (m1, i1) in ((m0, i0 + 1), (m0 + 1, 0)), keys
    # Each part starts where the previous one ended, on the PROGRAM-DATE-TIME clock (to the
    # playlist's precision: milliseconds, and durations of 3 decimals summed over 4 parts).
    starts = [a.arrival.part for a in heard]
    for a, b in itertools.pairwise(starts):
        assert abs(b.start - (a.start + a.duration)) < 0.004
    # The m4a is the init segment and the parts as received: it decodes to the tone.
    audio = decode_file(out)
    assert abs(len(audio) / RATE - result.audio_seconds) < 0.1
    assert tone_power(audio, RATE, 660.0) > 0.5
    decoded = np.concatenate([a.samples for a in heard if a.samples is not None])
    assert tone_power(decoded, RATE, 660.0) > 0.5


def test_blocking_reload_answers_within_a_part_of_the_parts_creation(live: tuple[Cast, Speaker]) -> None:
    """A part exists no earlier than its last sample (PROGRAM-DATE-TIME + offset + duration); a
    blocking reload for it must answer within one part duration of that."""
    c, _ = live
    joined = c.listener.post(c.path("/join")).json()
    hls = c.server.client()
    url = joined["hls_url"].split("?")[0]
    first = first_playlist(hls, url, {"ticket": joined["ticket"]})
    follower = Follower()
    follower.update(parse_media_playlist(first.text))
    lateness = []
    for _ in range(8):
        msn, part = follower.blocking_request()
        r = hls.get(url, params={"_HLS_msn": msn, "_HLS_part": part})  # the cookie is the ticket
        answered = time.time()
        assert r.status_code == 200, r.text
        listed = {p.key: p for p in parse_media_playlist(r.text).parts}
        wanted = listed[(msn, part)]
        lateness.append(answered - (wanted.start + wanted.duration))
        follower.update(parse_media_playlist(r.text))
        follower.arrived(wanted, 0, answered)
    part_target = 0.5
    assert min(lateness) > -0.05, lateness  # never before the part could exist (AAC priming: 21 ms)
    assert sorted(lateness)[len(lateness) // 2] < part_target, lateness
    assert max(lateness) < 2 * part_target, lateness


def test_an_expired_ticket_is_renewed_by_joining_again(live: tuple[Cast, Speaker]) -> None:
    c, _ = live
    clock, ttl = c.server.clock, c.server.config.ticket_ttl_seconds

    async def scenario() -> tuple[int, int, int]:
        listener = Listener(f"{c.server.url}/api/v1/spaces/{c.space_id}")
        stop = asyncio.Event()
        before: list[int] = []

        def on_audio(part: PartAudio) -> None:
            if len(listener.follower.arrivals) == 2:
                before.append(len(listener.follower.arrivals))
                clock.advance(ttl + 5)  # every ticket issued so far has now expired
            if len(listener.follower.arrivals) == 6:
                stop.set()

        listener.on_audio = on_audio
        result = await listener.run(seconds=20, stop=stop)
        return result.rejoins, result.parts, result.gaps

    try:
        rejoins, parts, gaps = asyncio.run(scenario())
    finally:
        clock.advance(-(ttl + 5))
    assert rejoins == 1 and parts == 6 and gaps == 0


def test_a_playlist_url_with_its_ticket_is_followed_without_joining(live: tuple[Cast, Speaker]) -> None:
    c, _ = live
    hls_url = c.listener.post(c.path("/join")).json()["hls_url"]
    result = asyncio.run(Listener(hls_url).run(seconds=2))
    assert result.parts >= 2 and result.rejoins == 0
    bad = f"{c.server.url}/hls/{c.space_id}/live.m3u8?ticket=k1.e30.AAAA"
    with pytest.raises(ListenError, match="403"):
        asyncio.run(Listener(bad).run(seconds=2))


def test_listen_refuses_what_it_cannot_follow(tmp_path: Path) -> None:
    for url in ["ftp://x/y", "http://127.0.0.1:1/somewhere", "http://h/hls/a b/live.m3u8"]:
        with pytest.raises(ListenError):
            resolve(url)
    with pytest.raises(ListenError, match="--out must end in"):
        Listener("http://127.0.0.1:1/api/v1/spaces/abc", out=tmp_path / "x.mp3")
    run = subprocess.run(
        [str(TOWNHALL), "listen", "http://127.0.0.1:1/api/v1/spaces/abc", "--seconds", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 1 and "townhall:" in run.stderr  # nothing listens on port 1


# -- the pure core ------------------------------------------------------------------------------


def test_urls_resolve_to_a_space_and_its_playlist() -> None:
    t = resolve("http://h:8080/api/v1/spaces/Ab12")
    assert (t.space_id, t.playlist_url, t.join_url, t.ticket) == (
        "Ab12",
        "http://h:8080/hls/Ab12/live.m3u8",
        "http://h:8080/api/v1/spaces/Ab12",
        None,
    )
    page = resolve("https://h/prefix/spaces/Ab12")  # the web page, as a browser shows it
    assert (page.space_id, page.playlist_url, page.join_url, page.ticket) == (
        "Ab12",
        "https://h/prefix/hls/Ab12/live.m3u8",
        "https://h/prefix/api/v1/spaces/Ab12",
        None,
    )
    t = resolve("https://h/prefix/hls/Ab12/live.m3u8?ticket=k1.x.y")
    assert (t.space_id, t.playlist_url, t.join_url, t.ticket) == (
        "Ab12",
        "https://h/prefix/hls/Ab12/live.m3u8",
        None,
        "k1.x.y",
    )


def test_parse_the_golden_live_playlist() -> None:
    pl = parse_media_playlist((RESOURCES / "live_6_2.m3u8").read_text())
    assert (pl.media_sequence, pl.target_duration, pl.part_target, pl.part_hold_back) == (2, 2, 0.5, 1.5)
    assert pl.can_block_reload and pl.init_uri == "init.mp4" and not pl.ended
    assert [(s.msn, s.complete, s.parts) for s in pl.segments] == [
        (2, True, 0),
        (3, True, 4),
        (4, True, 4),
        (5, True, 4),
        (6, False, 2),
    ]
    assert [p.uri for p in pl.parts][:2] == ["seg3.0.m4s", "seg3.1.m4s"] and pl.parts[-1].key == (6, 1)
    assert all(p.uri == f"seg{p.msn}.{p.index}.m4s" for p in pl.parts)
    # 2026-09-21T14:13:32Z is segment 6; its second part starts half a second later.
    assert pl.parts[-1].start - pl.segments[-1].start == 0.5
    assert pl.preload_hint == "seg6.2.m4s"
    for bad in ["", "#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1\nx.m3u8\n", "#EXTM3U\nseg.m4s\n"]:
        with pytest.raises(ValueError):
            parse_media_playlist(bad)


SPEC = PlaylistSpec(part_target=0.5, segment_target=2.0, window_segments=4)


def playlist(complete: int, building: int, first: int = 0) -> str:
    segs = [
        Segment(m, tuple(Part(i, 0.5) for i in range(4)), 100.0 + 2 * m, True) for m in range(first, complete)
    ]
    if building:
        segs.append(
            Segment(complete, tuple(Part(i, 0.5) for i in range(building)), 100.0 + 2 * complete, False)
        )
    return render_live(SPEC, segs)


def test_follower_starts_at_the_edge_rolls_over_segments_and_counts_gaps() -> None:
    f = Follower()
    wanted = f.update(parse_media_playlist(playlist(5, 2)))
    assert [p.key for p in wanted] == [(5, 1)]  # the newest part
    f.arrived(wanted[0], 10, now=111.2)
    assert f.arrivals[0].latency == pytest.approx(111.2 - 110.5)
    assert f.blocking_request() == (5, 2)
    wanted = f.update(parse_media_playlist(playlist(6, 0)))  # segment 5 completed
    assert [p.key for p in wanted] == [(5, 2), (5, 3)]
    for p in wanted:
        f.arrived(p, 10, now=112.0)
    assert f.blocking_request() == (6, 0)  # past the last part of a complete segment
    # Twelve segments later, the parts wanted have left the playlist: jump, and count a gap.
    wanted = f.update(parse_media_playlist(playlist(18, 1, first=10)))
    assert wanted[0].key == (15, 0) and f.gaps == 1
    assert f.skipped_seconds == pytest.approx((100.0 + 30) - (100.0 + 12))
    # A listed part the server answers 404 for is skipped too, not asked for again.
    f.missing(wanted[0])
    assert f.blocking_request() == (15, 1) and f.gaps == 2


def test_the_listener_stops_by_itself_when_the_space_ends(live: tuple[Cast, Speaker]) -> None:
    c, _ = live
    ended: list[float] = []

    def on_audio(part: PartAudio) -> None:
        if not ended:
            assert c.host.post(c.path("/end")).status_code == 200
            ended.append(time.monotonic())

    listener = Listener(f"{c.server.url}/api/v1/spaces/{c.space_id}", on_audio=on_audio)
    result = asyncio.run(listener.run(seconds=60))
    assert result.reason == "the space ended", result
    # Within the stall bound (three target durations, at least 6 s) of the end, not at --seconds.
    assert time.monotonic() - ended[0] < 15
    assert result.parts >= 1
