"""The audience plane end to end: a WHIP speaker's tone, heard by decoding the LL-HLS output."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import av
import m3u8
import numpy as np
import pytest

from tests.spaces_support import Cast, cast, generous_config
from tests.support import assert_error, running_server
from townhall.stage.client import publish
from townhall.stage.sources import ToneTrack, tone_power

RATE = 48000


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Cast]:
    with running_server(generous_config("sqlite", tmp_path / "data")) as server:
        yield cast(server)


class Speaker:
    """A WHIP speaker on its own thread and loop for the length of a test."""

    def __init__(self, url: str, token: str, frequency: float) -> None:
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.thread = threading.Thread(
            target=lambda: asyncio.run(self._run(url, token, frequency)), daemon=True
        )
        self.thread.start()
        assert self.ready.wait(20), "the speaker did not connect"

    async def _run(self, url: str, token: str, frequency: float) -> None:
        session = await publish(url, token, ToneTrack(frequency))
        self.ready.set()
        while not self.stop.is_set():  # noqa: ASYNC110 - a threading.Event set from the test thread
            await asyncio.sleep(0.05)
        await session.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(20)


def decode(init: bytes, media: list[bytes]) -> np.ndarray:
    container = av.open(io.BytesIO(init + b"".join(media)), format="mp4")
    resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
    out = []
    for frame in container.decode(audio=0):
        for f in resampler.resample(frame):
            out.append(f.to_ndarray().reshape(-1))
    container.close()
    return np.concatenate(out)


def test_a_speakers_tone_reaches_hls_listeners(live: Cast) -> None:
    token = live.speaker.post(live.path("/speaker-token")).json()["speaker_token"]
    speaker = Speaker(f"{live.server.url}/whip/{live.space_id}", token, 660.0)
    try:
        joined = live.listener.post(live.path("/join")).json()
        hls = live.server.client()
        url = joined["hls_url"]
        deadline = time.monotonic() + 20
        while True:
            r = hls.get(url)
            if r.status_code == 200 and m3u8.loads(r.text).segments and len(m3u8.loads(r.text).segments) >= 3:
                break
            assert time.monotonic() < deadline, r.text
            time.sleep(0.2)
        assert r.headers["content-type"].startswith("application/vnd.apple.mpegurl")
        playlist = m3u8.loads(r.text)
        assert playlist.server_control.can_block_reload == "YES"
        ticket = {"ticket": joined["ticket"]}
        base = url.split("live.m3u8")[0]
        init = hls.get(base + "init.mp4", params=ticket)
        assert init.status_code == 200 and "immutable" in init.headers["cache-control"]
        head = hls.http.head(base + "init.mp4", params=ticket)
        assert head.status_code == 200 and head.headers["etag"] == init.headers["etag"] and not head.content
        ranged = hls.get(base + "init.mp4", params=ticket, headers={"Range": "bytes=0-7"})
        assert ranged.status_code == 206 and ranged.content == init.content[:8]
        assert ranged.headers["content-range"] == f"bytes 0-7/{len(init.content)}"
        done = [s for s in playlist.segments if s.uri]
        media = [hls.get(base + s.uri, params=ticket).content for s in done[-2:]]
        samples = decode(init.content, media)
        assert len(samples) > RATE  # two segments: ~4 s of audio
        assert tone_power(samples, RATE, 660.0) > 0.5  # the speaker's tone, decoded from HLS
        # Parts decode alike, and numbering is continuous.
        parts = [p for s in playlist.segments for p in s.parts]
        part_audio = decode(init.content, [hls.get(base + p.uri, params=ticket).content for p in parts[-3:]])
        assert tone_power(part_audio, RATE, 660.0) > 0.5
        # A blocking reload for the next part returns once it exists, within about a part.
        hint = playlist.preload_hint.uri  # seg{msn}.{i}.m4s
        msn, part = (int(x) for x in hint[3:-4].split("."))
        asked = time.monotonic()
        blocked = hls.get(url, params={"_HLS_msn": msn, "_HLS_part": part, **ticket})
        waited = time.monotonic() - asked
        assert blocked.status_code == 200 and hint in blocked.text.replace("PRELOAD-HINT", "")
        assert waited < 1.5, waited
        assert "max-age" in blocked.headers["cache-control"]
        assert_error(hls.get(url, params={"_HLS_msn": msn + 5, **ticket}), 400, "bad_blocking_request")
    finally:
        speaker.close()


def test_tickets_and_names_are_enforced(live: Cast) -> None:
    joined = live.listener.post(live.path("/join")).json()
    base = f"/hls/{live.space_id}"
    anon = live.server.client()
    assert_error(anon.get(f"{base}/live.m3u8"), 403, "ticket_required")
    assert_error(anon.get(f"{base}/live.m3u8", params={"ticket": "k1.e30.AAAA"}), 403)
    other = live.host.post("/api/v1/spaces", json={"title": "o"}).json()["id"]
    live.host.post(f"/api/v1/spaces/{other}/start")
    other_ticket = live.listener.post(f"/api/v1/spaces/{other}/join").json()["ticket"]
    assert_error(anon.get(f"{base}/live.m3u8", params={"ticket": other_ticket}), 403, "wrong_space")
    assert_error(anon.get(f"{base}/init.mp4", params={"ticket": other_ticket}), 403)
    live.server.clock.advance(live.server.config.ticket_ttl_seconds + 1)
    assert_error(anon.get(f"{base}/live.m3u8", params={"ticket": joined["ticket"]}), 403, "ticket_expired")
    live.server.clock.advance(-(live.server.config.ticket_ttl_seconds + 1))
    anon.http.cookies.set("townhall_ticket", joined["ticket"])
    for name in [
        "..%2F..%2Fetc%2Fpasswd",
        "seg1.m4s.bak",
        "seg-1.m4s",
        "init.mp4%00",
        "seg1.2.3.m4s",
        "%2e%2e",
    ]:
        r = anon.http.get(f"{base}/{name}")
        assert r.status_code == 404, (name, r.status_code)
    assert anon.http.get(f"{base}/seg999999.m4s").status_code == 404
    assert anon.http.get(f"{base}/live.m3u8").status_code in (200, 503)  # the cookie is a ticket
