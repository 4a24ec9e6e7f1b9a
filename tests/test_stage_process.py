"""The stage in its own process: the channel between node and stage, and surviving a crash."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import av
import httpx
import numpy as np
import pytest

from tests.spaces_support import Cast, cast, generous_config
from tests.support import running_server
from townhall.audience.origin import SpaceStream
from townhall.stage.channel import HEADER, Channel, ChannelClosed, Message, StageError, encode
from townhall.stage.client import publish
from townhall.stage.sources import ToneTrack, tone_power

# -- the channel -----------------------------------------------------------------------------------


async def _pair(handler_b: object) -> tuple[Channel, Channel, list[asyncio.Task[None]]]:
    a_sock, b_sock = socket.socketpair()
    ra, wa = await asyncio.open_connection(sock=a_sock)
    rb, wb = await asyncio.open_connection(sock=b_sock)
    heard: list[Message] = []

    async def handler_a(message: Message, payload: bytes) -> Message | None:
        heard.append({**message, "payload": payload})
        return None

    a = Channel(ra, wa, handler_a)
    b = Channel(rb, wb, handler_b)  # type: ignore[arg-type]
    a.heard = heard  # type: ignore[attr-defined]
    return a, b, [asyncio.create_task(a.run()), asyncio.create_task(b.run())]


def test_channel_requests_replies_errors_and_notifications() -> None:
    async def scenario() -> None:
        async def handler(message: Message, payload: bytes) -> Message | None:
            if message["op"] == "add":
                await asyncio.sleep(0.05 if message["x"] == 1 else 0)  # replies may overtake
                return {"sum": message["x"] + message["y"]}
            if message["op"] == "refuse":
                raise StageError(400, "malformed_sdp", "no")
            if message["op"] == "crash":
                raise RuntimeError("a bug")
            b.notify("part", payload + b"!", space="s1")
            return None

        a, b, tasks = await _pair(handler)
        slow, fast = await asyncio.gather(a.request("add", x=1, y=2), a.request("add", x=5, y=5))
        assert (slow["sum"], fast["sum"]) == (3, 10)
        with pytest.raises(StageError) as refused:
            await a.request("refuse")
        assert (refused.value.status, refused.value.code) == (400, "malformed_sdp")
        with pytest.raises(StageError) as crashed:
            await a.request("crash")
        assert crashed.value.status == 500  # reported, and the channel carries on
        a.notify("echo", b"\x00\x01binary")
        for _ in range(100):
            if a.heard:  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.01)
        assert a.heard == [{"op": "part", "space": "s1", "payload": b"\x00\x01binary!"}]  # type: ignore[attr-defined]
        assert (await a.request("add", x=2, y=2))["sum"] == 4
        await b.close()
        with pytest.raises((ChannelClosed, StageError)):
            await a.request("add", x=1, y=1)
        await a.close()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())


def test_channel_refuses_a_malformed_or_oversize_frame() -> None:
    async def scenario(frame: bytes) -> bool:
        async def handler(message: Message, payload: bytes) -> Message | None:
            await asyncio.sleep(10)  # the answer never comes before the bad frame
            return None

        a, b, tasks = await _pair(handler)
        pending = asyncio.create_task(a.request("slow", wait=5))
        await asyncio.sleep(0.05)
        b._writer.write(frame)  # what arrives at a is not a frame
        with pytest.raises(ChannelClosed):
            await pending
        closed = a.closed
        await b.close()
        await a.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        return closed

    assert asyncio.run(scenario(HEADER.pack(1 << 30, 0)))  # a 1 GiB header is refused
    assert asyncio.run(scenario(HEADER.pack(5, 0) + b"nope!"))  # not JSON
    assert asyncio.run(scenario(encode({"neither": 1})))  # no op, no reply id
    with pytest.raises(ValueError):
        encode({"op": "part"}, b"x" * (17 << 20))


# -- a crash of the stage process ------------------------------------------------------------------


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Cast]:
    with running_server(generous_config("sqlite", tmp_path / "data")) as server:
        yield cast(server)


def _decode(init: bytes, part: bytes) -> np.ndarray:
    with av.open(io.BytesIO(init + part), "r") as container:
        return np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])


def _since_restart(stream: SpaceStream) -> list[bytes]:
    """The parts encoded by the new stage process: from the first discontinuity on."""
    out: list[bytes] = []
    after = False
    for seg in list(stream.segments):
        after = after or seg.discontinuity
        if after:
            out.extend(stream.part_bytes[(seg.msn, p.index)] for p in seg.parts)
    return out


def test_a_killed_stage_process_is_restarted_and_the_space_goes_on(live: Cast) -> None:
    """kill -9 of the stage process: the API keeps answering, a new stage process takes over
    within seconds, the speaker reconnects with the same grant, and listeners see the live
    playlist carry on after an EXT-X-DISCONTINUITY, with the speaker's voice in the new parts."""
    stage = live.server.node.stage
    whip = f"{live.server.url}/whip/{live.space_id}"
    speaker_token = str(live.role("speaker").post(live.path("/speaker-token")).json()["speaker_token"])

    def wait(what: str, ok: object, within: float = 20.0) -> None:
        deadline = time.monotonic() + within
        while not ok():  # type: ignore[operator]
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    async def scenario() -> None:
        first = await publish(whip, speaker_token, ToneTrack(660.0))
        stream = live.server.node.origin.streams[live.space_id]
        await asyncio.to_thread(wait, "no parts before the crash", lambda: len(stream.part_bytes) >= 3)
        old_pid = stage.pid
        assert old_pid is not None and old_pid != os.getpid()
        os.kill(old_pid, signal.SIGKILL)
        async with httpx.AsyncClient(base_url=live.server.url) as http:
            assert (await http.get("/healthz")).status_code == 200  # the API never noticed
            assert (await http.get(live.path(""))).status_code == 200
        await asyncio.to_thread(
            wait, "no new stage process", lambda: stage.restarts == 1 and stage.pid != old_pid
        )
        await first.close()
        second = await publish(whip, speaker_token, ToneTrack(660.0))  # the client reconnects
        try:
            before = len(_since_restart(stream))
            await asyncio.to_thread(
                wait, "no parts after the restart", lambda: len(_since_restart(stream)) >= before + 4
            )
            playlist = stream.playlist()
            assert playlist is not None and "#EXT-X-DISCONTINUITY" in playlist
            assert stream.init is not None
            pcm = np.concatenate([_decode(stream.init, part) for part in _since_restart(stream)[-2:]])
            assert tone_power(pcm, 48000, 660.0) > 0.5
        finally:
            await second.close()
        with pytest.raises(ProcessLookupError):
            os.kill(old_pid, 0)  # reaped: no zombie left behind

    asyncio.run(scenario())


def test_a_space_s_first_segments_carry_no_discontinuity(live: Cast) -> None:
    """The stage process started for a space's first second is not a restart: its live
    playlist begins without a discontinuity (nor a DISCONTINUITY-SEQUENCE later on)."""
    stream = live.server.node.origin.streams[live.space_id]
    deadline = time.monotonic() + 20
    while len(stream.segments) < 2:
        assert time.monotonic() < deadline, "no segments"
        time.sleep(0.1)
    assert not any(s.discontinuity for s in stream.segments)
    assert live.server.node.stage.restarts == 0
