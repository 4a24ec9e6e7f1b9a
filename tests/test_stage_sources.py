"""The stage's test sources and signal helpers, and the WHIP client's error path (no stage needed)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError

from townhall.stage import client, sources
from townhall.stage.sources import FRAME_SAMPLES, SAMPLE_RATE, TIME_BASE

# --- pure helpers ------------------------------------------------------------------------------


def test_tone_power_finds_the_tone_and_nothing_else() -> None:
    samples = sources.tone(1000, 1.0)
    assert samples.dtype == np.int16 and samples.size == SAMPLE_RATE
    assert sources.tone_power(samples, SAMPLE_RATE, 1000) > 0.99
    assert sources.tone_power(samples, SAMPLE_RATE, 1500) < 1e-6
    assert sources.tone_power(samples, SAMPLE_RATE, 1060) < 1e-6  # just outside ±20 Hz


def test_tone_power_of_a_mixture_splits_by_power() -> None:
    mix = sources.tone(500, 1.0, amplitude=0.4).astype(np.int32) + sources.tone(2000, 1.0, amplitude=0.2)
    assert sources.tone_power(mix, SAMPLE_RATE, 500) == pytest.approx(0.8, abs=0.01)
    assert sources.tone_power(mix, SAMPLE_RATE, 2000) == pytest.approx(0.2, abs=0.01)
    assert sources.tone_power(np.zeros(4800, dtype=np.int16), SAMPLE_RATE, 500) == 0.0


def test_find_chirps_recovers_onsets_through_gain_and_noise() -> None:
    template = sources.chirp()
    onsets = [0.25, 1.1234, 1.9, 2.5]
    signal = np.zeros(3 * SAMPLE_RATE, dtype=np.float64)
    for onset, gain in zip(onsets, [1.0, 0.3, 0.05, 0.6], strict=True):
        start = round(onset * SAMPLE_RATE)
        signal[start : start + template.size] += gain * template
    signal += np.random.default_rng(7).normal(0.0, 100.0, signal.size)
    noisy = np.clip(signal, -32768, 32767).astype(np.int16)

    found = sources.find_chirps(noisy, SAMPLE_RATE, template)

    assert len(found) == len(onsets)
    for got, want in zip(found, onsets, strict=True):
        assert abs(got - want) < 0.005


def test_find_chirps_ignores_silence_and_tones() -> None:
    template = sources.chirp()
    assert sources.find_chirps(np.zeros(SAMPLE_RATE, dtype=np.int16), SAMPLE_RATE, template) == []
    assert sources.find_chirps(sources.tone(2500, 1.0), SAMPLE_RATE, template) == []
    assert sources.find_chirps(template[:100], SAMPLE_RATE, template) == []


def test_rechunker_cuts_exact_frames_and_pads_the_tail() -> None:
    rechunker = sources.Rechunker(4)
    stream = np.arange(1, 11, dtype=np.int16)
    frames = [*rechunker.push(stream[:3]), *rechunker.push(stream[3:9]), *rechunker.push(stream[9:])]
    assert [f.tolist() for f in frames] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    tail = rechunker.flush()
    assert tail is not None and tail.tolist() == [9, 10, 0, 0]
    assert rechunker.flush() is None


# --- tracks ------------------------------------------------------------------------------------


def _write_wav(path: Path, samples: np.ndarray, rate: int, channels: int) -> None:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(np.repeat(samples, channels).astype("<i2").tobytes())


def test_file_track_resamples_to_48k_mono_frames_with_continuous_pts(tmp_path: Path) -> None:
    path = tmp_path / "tone.wav"
    _write_wav(path, sources.tone(440, 0.2, rate=44_100), rate=44_100, channels=2)

    async def drain() -> list[av.AudioFrame]:
        track = sources.FileTrack(path, loop=False)
        frames = []
        with pytest.raises(MediaStreamError):
            while True:
                frames.append(await track.recv())
        assert track.readyState == "ended"
        return frames

    frames = asyncio.run(drain())

    assert len(frames) == 10  # 0.2 s at 48 kHz is exactly 10 frames of 20 ms
    for index, frame in enumerate(frames):
        assert frame.samples == FRAME_SAMPLES
        assert frame.format.name == "s16" and frame.layout.name == "mono"
        assert frame.sample_rate == SAMPLE_RATE and frame.time_base == TIME_BASE
        assert frame.pts == index * FRAME_SAMPLES
    pcm = np.concatenate([frame.to_ndarray().reshape(-1) for frame in frames])
    assert sources.tone_power(pcm, SAMPLE_RATE, 440) > 0.99


def test_file_track_loops_seamlessly(tmp_path: Path) -> None:
    path = tmp_path / "short.wav"
    # 700 samples: not a multiple of 960, so a seam would show as padding if looping were naive.
    _write_wav(path, np.full(700, 1000, dtype=np.int16), rate=SAMPLE_RATE, channels=1)
    frames = sources.pcm_frames(path, loop=True)
    pcm = np.concatenate([next(frames) for _ in range(5)])
    frames.close()
    assert (pcm == 1000).all()


def test_file_track_fails_early_on_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        sources.FileTrack(tmp_path / "missing.wav")


def test_tone_track_is_paced_in_real_time_and_catches_up() -> None:
    async def run() -> tuple[float, float, list[int | None]]:
        track = sources.ToneTrack(440)
        start = time.monotonic()
        frames = [await track.recv() for _ in range(3)]
        three = time.monotonic() - start
        # A stalled loop (here: a blocking sleep) is made up at once; the schedule keeps its start.
        time.sleep(0.05)  # noqa: ASYNC251 - stalls the loop on purpose
        frames += [await track.recv() for _ in range(3)]
        six = time.monotonic() - start
        track.stop()
        return three, six, [frame.pts for frame in frames]

    three, six, pts = asyncio.run(run())
    # Frame n is due n * 20 ms after the first: 3 frames take 40 ms. The upper bounds leave room
    # for a loaded machine; the lower bounds are the pacing itself.
    assert 0.039 <= three < 0.1
    assert 0.099 <= six < 0.16  # frame 5 is due at 100 ms, not 40 + 50 + 60
    assert pts == [n * FRAME_SAMPLES for n in range(6)]


def test_chirp_track_markers_match_what_was_sent() -> None:
    async def run() -> tuple[sources.ChirpTrack, np.ndarray]:
        track = sources.ChirpTrack(0.1, offset_s=0.03)
        frames = [await track.recv() for _ in range(14)]  # the third chirp ends in frame 13
        track.stop()
        return track, np.concatenate([frame.to_ndarray().reshape(-1) for frame in frames])

    track, pcm = asyncio.run(run())

    onsets = sources.find_chirps(pcm, SAMPLE_RATE, track.template)
    assert [m.sample for m in track.markers] == [1440, 6240, 11040]
    assert [round(t * SAMPLE_RATE) for t in onsets] == [1440, 6240, 11040]
    gaps = np.diff(track.emitted_at)
    assert np.allclose(gaps, 0.1, atol=0.01)


def test_source_from_spec() -> None:
    tone = sources.source_from_spec("tone:880")
    assert isinstance(tone, sources.ToneTrack) and tone.frequency_hz == 880
    chirps = sources.source_from_spec("chirp:0.5")
    assert isinstance(chirps, sources.ChirpTrack) and chirps.interval_s == 0.5


# --- recording timeline ------------------------------------------------------------------------


def test_timeline_fills_gaps_trims_overlaps_and_wraps() -> None:
    timeline = client.PcmTimeline(capacity=14, max_gap=10)
    ones = np.ones(3, dtype=np.int16)
    timeline.add(2**32 - 3, ones)  # positions 2**32-3 .. 2**32-1
    timeline.add(2, ones * 2)  # wrapped; 2 samples lost -> 2 of silence
    timeline.add(4, ones * 3)  # overlaps the last sample of the previous chunk
    timeline.add(1, ones * 9)  # wholly late: dropped
    timeline.add(10_000, ones * 4)  # a restarted sender: appended, not filled
    assert timeline.samples().tolist() == [1, 1, 1, 0, 0, 2, 2, 2, 3, 3, 4, 4, 4]
    assert timeline.gap_samples == 2 and timeline.discontinuities == 1
    timeline.add(None, ones * 5)
    assert timeline.full and timeline.samples().tolist()[-1] == 5 and timeline.length == 14


# --- client error handling against a tiny HTTP server ------------------------------------------


@dataclass
class FakeEndpoint:
    """A WHIP endpoint that answers every POST with a fixed response and records requests."""

    status: int
    body: bytes
    headers: dict[str, str]
    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def endpoint() -> Iterator[FakeEndpoint]:
    fake = FakeEndpoint(
        401,
        json.dumps({"error": {"code": "unauthorized", "message": "bad speaker token"}}).encode(),
        {"Content-Type": "application/json"},
    )

    class Handler(BaseHTTPRequestHandler):
        def _record(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            fake.requests.append((self.command, self.path, dict(self.headers), body))

        def do_POST(self) -> None:
            self._record()
            self.send_response(fake.status)
            for name, value in fake.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(fake.body)))
            self.end_headers()
            self.wfile.write(fake.body)

        def do_DELETE(self) -> None:
            self._record()
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/whip/space-1"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_publish_raises_whip_error_on_401(endpoint: FakeEndpoint) -> None:
    async def run() -> client.WhipError:
        track = sources.ToneTrack(440)
        with pytest.raises(client.WhipError) as caught:
            await client.publish(endpoint.url, "not-a-token", track, timeout=5)
        track.stop()
        return caught.value

    error = asyncio.run(run())

    assert error.status == 401
    assert error.code == "unauthorized" and error.message == "bad speaker token"
    assert "401" in str(error)
    ((method, path, headers, body),) = endpoint.requests  # no DELETE: no session was created
    assert (method, path) == ("POST", "/whip/space-1")
    assert headers["Content-Type"] == "application/sdp"
    assert headers["Authorization"] == "Bearer not-a-token"
    sdp = body.decode()
    assert sdp.startswith("v=0") and "a=sendonly" in sdp and "opus/48000/2" in sdp
    assert "a=candidate:" in sdp  # gathered before the POST: no trickle (RFC 9725 §4.3.2)


def test_subscribe_deletes_the_session_when_the_answer_is_unusable(endpoint: FakeEndpoint) -> None:
    endpoint.status, endpoint.body = 201, b"this is not SDP"
    endpoint.headers = {"Content-Type": "application/sdp", "Location": "../session/abc"}

    async def run() -> client.WhipError:
        with pytest.raises(client.WhipError) as caught:
            await client.subscribe(endpoint.url, "tok", timeout=5)
        return caught.value

    error = asyncio.run(run())

    assert error.status == 201 and "SDP" in str(error)
    post, delete = endpoint.requests
    assert post[0] == "POST" and "a=recvonly" in post[3].decode()
    # The relative Location resolves against the endpoint URL and is cleaned up with the token.
    assert (delete[0], delete[1]) == ("DELETE", "/session/abc")
    assert delete[2]["Authorization"] == "Bearer tok"


def test_publish_refuses_a_201_without_location(endpoint: FakeEndpoint) -> None:
    endpoint.status, endpoint.body, endpoint.headers = 201, b"v=0\r\n", {"Content-Type": "application/sdp"}

    async def run() -> None:
        track = sources.ToneTrack(440)
        with pytest.raises(client.WhipError, match="Location"):
            await client.publish(endpoint.url, "tok", track, timeout=5)
        track.stop()

    asyncio.run(run())
    assert [request[0] for request in endpoint.requests] == ["POST"]


def test_publish_reports_an_unreachable_endpoint() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def run() -> None:
        track = sources.ToneTrack(440)
        with pytest.raises(client.TransportError):
            await client.publish(f"http://127.0.0.1:{port}/whip/x", "tok", track, timeout=5)
        track.stop()

    asyncio.run(run())
