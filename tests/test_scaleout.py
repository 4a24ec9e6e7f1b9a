"""Two nodes on one PostgreSQL and one Redis (the machine's own): what one node decides, the
other applies to the speakers it carries."""

from __future__ import annotations

import asyncio
import io
import secrets
import time
from pathlib import Path

import av
import httpx
import numpy as np

from tests.spaces_support import cast, generous_config
from tests.support import RunningServer, running_server
from townhall.config import Config
from townhall.stage.client import publish
from townhall.stage.sources import ToneTrack, tone_power

REDIS = "redis://127.0.0.1:6379/0"
RATE = 48000


def _wait(what: str, ok: object, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not ok():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _bus_up(*nodes: RunningServer) -> None:
    _wait("the event bus never connected", lambda: all(n.node.bus.connected for n in nodes))  # type: ignore[attr-defined]


def test_revocation_mute_and_end_through_one_node_reach_the_stage_on_another(tmp_path: Path) -> None:
    """The space's stage runs on node A (it was started there); the speakers connect through
    node B (relayed to A) and the host acts through B: B's revocation, mute and end reach A's
    stage over Redis."""
    config = generous_config(
        "postgresql", tmp_path / "data", redis_url=REDIS, redis_prefix=f"t-{secrets.token_hex(4)}"
    )
    config_a = Config.from_mapping({"public_url": f"http://127.0.0.1:{_free_port()}"}, config)
    config_b = Config.from_mapping({"public_url": f"http://127.0.0.1:{_free_port()}"}, config)
    with running_server(config_a, keep_schema=True) as a, running_server(config_b) as b:
        _bus_up(a, b)
        c = cast(a)  # the space is started on node A
        a_stage = a.node.stage
        speaker2 = f"a{c.anonymous.get('/api/v1/accounts/speaker2').json()['id']}"

        def token(who: str) -> str:
            return str(c.role(who).post(c.path("/speaker-token")).json()["speaker_token"])

        async def scenario() -> tuple[float, float | None]:
            whip_b = f"{b.url}/whip/{c.space_id}"  # the speakers connect through node B
            revoked = await publish(whip_b, token("speaker"), ToneTrack(660.0))
            muted = await publish(whip_b, token("speaker2"), ToneTrack(990.0))
            try:
                await asyncio.to_thread(_wait, "no sessions on A", lambda: len(a_stage.sessions) == 2)
                assert not b.node.stage.sessions
                async with httpx.AsyncClient(
                    base_url=b.url, headers={"Authorization": f"Bearer {c.host.token}"}
                ) as host_on_b:
                    await asyncio.sleep(1.0)
                    assert (await host_on_b.delete(c.path("/speakers/speaker"))).status_code == 204
                    async with asyncio.timeout(10):
                        await revoked.wait_disconnected()  # node A cut the media off
                    assert (await host_on_b.post(c.path("/speakers/speaker2/mute"))).status_code == 204
                    muted_at = time.time()
                    # A reports its rooms every second: wait for a report from after the mute.
                    await asyncio.to_thread(_wait, "no stats", lambda: a_stage.stats["at"] > muted_at + 0.6)
                    last = a_stage.stats["rooms"][c.space_id]["last_mixed"].get(speaker2)
                    ended = await host_on_b.post(c.path("/end"))
                    assert ended.status_code == 200, ended.text
                return muted_at, last
            finally:
                await revoked.close()
                await muted.close()

        muted_at, last = asyncio.run(scenario())
        # A's mixer had speaker2 in the mix, and stopped mixing them in within a Redis hop of
        # B's answer to the mute.
        assert last is not None and muted_at - 2.0 < last < muted_at + 0.25, (last, muted_at)
        # B's end closed A's stage of the space too.
        _wait("node A still runs the ended space's stage", lambda: not a_stage.hosts(c.space_id))
        _wait("node A still has sessions", lambda: not a_stage.sessions)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _decode(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        return np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])


def test_a_space_runs_on_one_node_and_moves_when_that_node_goes(tmp_path: Path) -> None:
    """The node that starts a space owns its stage (a lease in Redis). A speaker arriving at the
    other node is redirected there (307); a listener entering through the other node hears the
    owner's mix, relayed. When the owner goes, its lease lapses, the speaker's next connection
    claims the space on the surviving node, and the recording goes on after a discontinuity."""
    base = generous_config(
        "postgresql",
        tmp_path / "data",
        redis_url=REDIS,
        redis_prefix=f"t-{secrets.token_hex(4)}",
        stage_lease_seconds=1.5,
    )
    config_a = Config.from_mapping({"public_url": f"http://127.0.0.1:{_free_port()}"}, base)
    config_b = Config.from_mapping({"public_url": f"http://127.0.0.1:{_free_port()}"}, base)
    with running_server(config_b) as b:
        node_a = running_server(config_a, keep_schema=True)
        a = node_a.__enter__()
        try:
            _bus_up(a, b)
            c = cast(a)  # started on A: A claims the space
            token = str(c.role("speaker").post(c.path("/speaker-token")).json()["speaker_token"])

            async def through_b() -> bytes:
                pub = await publish(f"{b.url}/whip/{c.space_id}", token, ToneTrack(660.0))
                try:
                    assert pub.location is not None and pub.location.startswith(b.url), pub.location
                    assert any(s.kind == "whip" for s in a.node.stage.sessions.values())  # media on A
                    assert not b.node.stage.sessions
                    async with httpx.AsyncClient(base_url=b.url) as http:
                        hls = (await http.post(f"/api/v1/spaces/{c.space_id}/join")).json()["hls_url"]
                        assert hls.startswith(b.url)
                        await asyncio.sleep(2.0)
                        playlist = (await http.get(hls)).text  # relayed from A
                        last = [x for x in playlist.splitlines() if x.startswith("#EXT-X-PART:")][-1]
                        part = last.split('URI="')[1].split('"')[0]
                        base_url = hls.split("live.m3u8")[0]
                        init = (await http.get(base_url + "init.mp4")).content
                        return init + (await http.get(base_url + part)).content
                finally:
                    await pub.close()

            media = asyncio.run(through_b())
            assert tone_power(_decode(media), RATE, 660.0) > 0.5
        finally:
            node_a.__exit__(None, None, None)  # node A goes away
        time.sleep(2.0)  # its lease lapses

        async def again() -> None:
            pub = await publish(f"{b.url}/whip/{c.space_id}", token, ToneTrack(660.0))
            try:
                await asyncio.sleep(2.0)
            finally:
                await pub.close()

        asyncio.run(again())
        assert b.node.stage.hosts(c.space_id)  # the space moved to B
        with httpx.Client(base_url=b.url, headers={"Authorization": f"Bearer {c.host.token}"}) as host:
            assert host.post(c.path("/end")).status_code == 200
            replay = host.get(f"/hls/{c.space_id}/replay.m3u8").text
        assert replay.count("#EXT-X-DISCONTINUITY\n") == 1, replay  # A's epoch, then B's


def test_capacity_the_waiting_room_and_limits_hold_across_nodes(tmp_path: Path) -> None:
    """Two nodes share one space's capacity, its waiting room and the per-address join limit
    through Redis: what one node admitted counts at the other."""
    base = generous_config(
        "postgresql",
        tmp_path / "data",
        redis_url=REDIS,
        redis_prefix=f"t-{secrets.token_hex(4)}",
        space_max_listeners=2,
        space_join_rate=0.05,
        space_join_burst=2.0,
        join_limit_per_address="6/minute",
    )
    config_a = Config.from_mapping({"public_url": f"http://127.0.0.1:{_free_port()}"}, base)
    config_b = Config.from_mapping({"public_url": f"http://127.0.0.1:{_free_port()}"}, base)
    with running_server(config_a, keep_schema=True) as a, running_server(config_b) as b:
        c = cast(a)
        path = f"/api/v1/spaces/{c.space_id}/join"

        def join(node: RunningServer) -> httpx.Response:
            with httpx.Client(base_url=node.url) as anonymous:
                return anonymous.post(path)

        assert join(a).status_code == 200
        assert join(b).status_code == 200  # the space's two places, one taken at each node
        waiting = [join(a), join(b), join(a)]
        assert [r.status_code for r in waiting] == [202, 202, 202], [r.text for r in waiting]
        assert [r.json()["position"] for r in waiting] == [1, 2, 3]  # one line across the nodes
        assert join(b).json()["position"] == 4  # the 6th join from this address: the limit's last
        again = join(a)
        assert again.status_code == 429, again.text  # the 7th, counted at both nodes
        assert again.headers.get("retry-after")
