"""Two nodes on one PostgreSQL and one Redis (the machine's own): what one node decides, the
other applies to the speakers it carries."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import httpx

from tests.spaces_support import cast, generous_config
from tests.support import RunningServer, running_server
from townhall.stage.client import publish
from townhall.stage.sources import ToneTrack

REDIS = "redis://127.0.0.1:6379/0"


def _wait(what: str, ok: object, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not ok():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _bus_up(*nodes: RunningServer) -> None:
    _wait("the event bus never connected", lambda: all(n.node.bus.connected for n in nodes))  # type: ignore[attr-defined]


def test_revocation_mute_and_end_on_one_node_reach_speakers_on_another(tmp_path: Path) -> None:
    config = generous_config(
        "postgresql", tmp_path / "data", redis_url=REDIS, redis_prefix=f"t-{secrets.token_hex(4)}"
    )
    with running_server(config) as a, running_server(config) as b:
        _bus_up(a, b)
        c = cast(a)  # the space is started on node A
        b_stage = b.node.stage

        def token(who: str) -> str:
            return str(c.role(who).post(c.path("/speaker-token")).json()["speaker_token"])

        speaker2 = f"a{c.anonymous.get('/api/v1/accounts/speaker2').json()['id']}"

        async def scenario() -> tuple[float, float | None]:
            whip_b = f"{b.url}/whip/{c.space_id}"  # the speakers connect to node B
            revoked = await publish(whip_b, token("speaker"), ToneTrack(660.0))
            muted = await publish(whip_b, token("speaker2"), ToneTrack(990.0))
            try:
                await asyncio.to_thread(
                    _wait, "no sessions on B", lambda: len([s for s in b_stage.sessions.values()]) == 2
                )
                async with httpx.AsyncClient(
                    base_url=a.url, headers={"Authorization": f"Bearer {c.host.token}"}
                ) as host_on_a:
                    assert (await host_on_a.delete(c.path("/speakers/speaker"))).status_code == 204
                    async with asyncio.timeout(10):
                        await revoked.wait_disconnected()  # node B cut the media off
                    assert (await host_on_a.post(c.path("/speakers/speaker2/mute"))).status_code == 204
                    muted_at = time.time()
                    # B reports its rooms every second: wait for a report from after the mute.
                    await asyncio.to_thread(_wait, "no stats", lambda: b_stage.stats["at"] > muted_at + 0.6)
                    last = b_stage.stats["rooms"][c.space_id]["last_mixed"].get(speaker2)
                    ended = await host_on_a.post(c.path("/end"))
                    assert ended.status_code == 200, ended.text
                return muted_at, last
            finally:
                await revoked.close()
                await muted.close()

        muted_at, last = asyncio.run(scenario())
        # B's mixer had speaker2 in the mix, and stopped mixing them in within a Redis hop of
        # A's answer to the mute.
        assert last is not None and muted_at - 2.0 < last < muted_at + 0.25, (last, muted_at)
        # A's end closed B's stage of the space too.
        _wait("node B still runs the ended space's stage", lambda: not b_stage.hosts(c.space_id))
        _wait("node B still has sessions", lambda: not b_stage.sessions)
