"""Redis goes away for a while (cut between the node and the machine's real Redis): the node
stays alive but not ready, listeners already in keep playing, and everything comes back by
itself when Redis does."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from pathlib import Path

import httpx

from tests.spaces_support import cast, generous_config
from tests.support import TcpRelay, running_server
from townhall.stage.client import publish
from townhall.stage.sources import ToneTrack

REDIS_OUTAGE = 15.0  # seconds without Redis (the scale-out issue's figure)
DB_OUTAGE = 6.0  # seconds without PostgreSQL


def _hint(playlist: str) -> tuple[int, int]:
    m = re.search(r'PRELOAD-HINT:TYPE=PART,URI="seg(\d+)\.(\d+)\.m4s"', playlist)
    assert m is not None, playlist
    return int(m.group(1)), int(m.group(2))


def test_a_redis_outage_is_ridden_out(tmp_path: Path) -> None:
    relay = TcpRelay("127.0.0.1", 6379).start()
    config = generous_config(
        "postgresql",
        tmp_path / "data",
        redis_url=f"redis://127.0.0.1:{relay.port}/0",
        redis_prefix=f"t-{secrets.token_hex(4)}",
    )
    try:
        with running_server(config) as server:
            c = cast(server)
            bus = server.node.bus
            token = str(c.host.post(c.path("/speaker-token")).json()["speaker_token"])

            async def scenario() -> dict[str, object]:
                seen: dict[str, object] = {}
                pub = await publish(f"{server.url}/whip/{c.space_id}", token, ToneTrack(440.0))
                try:
                    async with httpx.AsyncClient(base_url=server.url, timeout=20) as listener:
                        joined = await listener.post(f"/api/v1/spaces/{c.space_id}/join")
                        assert joined.status_code == 200, joined.text
                        await asyncio.sleep(1.5)
                        playlist = f"/hls/{c.space_id}/live.m3u8"
                        msn, part = _hint((await listener.get(playlist)).text)
                        assert (await listener.get("/readyz")).status_code == 200

                        relay.cut()  # Redis is gone
                        began = time.monotonic()
                        seen["healthz"] = (await listener.get("/healthz")).status_code
                        seen["readyz"] = (await listener.get("/readyz")).json()
                        late = []
                        while time.monotonic() - began < REDIS_OUTAGE:  # the listener plays on
                            r = await listener.get(playlist, params={"_HLS_msn": msn, "_HLS_part": part})
                            assert r.status_code == 200, r.text
                            late.append(r.elapsed.total_seconds())
                            msn, part = _hint(r.text)
                        seen["parts_during_outage"] = len(late)
                        async with httpx.AsyncClient(base_url=server.url, timeout=20) as newcomer:
                            during = await newcomer.post(f"/api/v1/spaces/{c.space_id}/join")
                        seen["join_during"] = (
                            during.status_code,
                            during.headers.get("retry-after"),
                            during.text,
                        )

                        relay.restore()  # Redis is back
                        deadline = time.monotonic() + 15
                        while (await listener.get("/readyz")).status_code != 200 or not bus.connected:  # type: ignore[attr-defined]
                            assert time.monotonic() < deadline, "never ready again"
                            await asyncio.sleep(0.2)
                        # Joins work again without a restart (a pooled connection that died
                        # with the outage may refuse one more, cleanly, before it is replaced).
                        async with httpx.AsyncClient(base_url=server.url, timeout=20) as newcomer:
                            statuses: list[int] = []
                            while not statuses or statuses[-1] != 200:
                                assert len(statuses) < 5, statuses
                                after = await newcomer.post(f"/api/v1/spaces/{c.space_id}/join")
                                statuses.append(after.status_code)
                                if after.status_code != 200:
                                    assert after.status_code == 503, after.text
                                    await asyncio.sleep(0.3)
                            seen["join_after"] = statuses
                finally:
                    await pub.close()
                return seen

            seen = asyncio.run(scenario())
    finally:
        relay.stop()

    assert seen["healthz"] == 200
    assert seen["readyz"]["error"]["code"] == "redis_unreachable"  # type: ignore[index]
    # About two parts a second kept coming to the listener already in.
    assert int(seen["parts_during_outage"]) >= REDIS_OUTAGE  # type: ignore[call-overload]
    status, retry_after, body = seen["join_during"]  # type: ignore[misc]
    # A new join meanwhile is either served (nothing it needs is in Redis) or refused safely:
    # 503 with Retry-After and a JSON error, never a crash.
    assert status == 200 or (status == 503 and retry_after and '"error"' in body), (status, body)
    assert seen["join_after"][-1] == 200  # type: ignore[index]


def test_a_database_outage_is_ridden_out(tmp_path: Path) -> None:
    """PostgreSQL cut off for a while: alive but not ready; the listener already in plays on;
    a newcomer is served from the node's snapshot of the space or refused cleanly; all of it
    back without a restart."""
    relay = TcpRelay("127.0.0.1", 5432).start()
    config = generous_config(
        "postgresql",
        tmp_path / "data",
        database_url=f"postgresql+asyncpg://postgres@127.0.0.1:{relay.port}/test",
        readiness_timeout_seconds=1.0,
    )
    try:
        with running_server(config) as server:
            c = cast(server)
            token = str(c.host.post(c.path("/speaker-token")).json()["speaker_token"])

            async def scenario() -> dict[str, object]:
                seen: dict[str, object] = {}
                pub = await publish(f"{server.url}/whip/{c.space_id}", token, ToneTrack(440.0))
                try:
                    async with httpx.AsyncClient(base_url=server.url, timeout=20) as listener:
                        assert (await listener.post(f"/api/v1/spaces/{c.space_id}/join")).status_code == 200
                        await asyncio.sleep(1.5)
                        playlist = f"/hls/{c.space_id}/live.m3u8"
                        msn, part = _hint((await listener.get(playlist)).text)
                        relay.cut()  # the database is gone
                        began = time.monotonic()
                        seen["healthz"] = (await listener.get("/healthz")).status_code
                        seen["readyz"] = (await listener.get("/readyz")).json()
                        served = 0
                        while time.monotonic() - began < DB_OUTAGE:
                            r = await listener.get(playlist, params={"_HLS_msn": msn, "_HLS_part": part})
                            assert r.status_code == 200, r.text
                            served += 1
                            msn, part = _hint(r.text)
                        seen["parts_during_outage"] = served
                        async with httpx.AsyncClient(base_url=server.url, timeout=20) as newcomer:
                            during = await newcomer.post(f"/api/v1/spaces/{c.space_id}/join")
                        seen["join_during"] = (
                            during.status_code,
                            during.headers.get("retry-after"),
                            during.text,
                        )
                        relay.restore()
                        deadline = time.monotonic() + 15
                        while (await listener.get("/readyz")).status_code != 200:
                            assert time.monotonic() < deadline, "never ready again"
                            await asyncio.sleep(0.2)
                        seen["after"] = c.anonymous.get(f"/api/v1/spaces/{c.space_id}").status_code
                finally:
                    await pub.close()
                return seen

            seen = asyncio.run(scenario())
    finally:
        relay.stop()

    assert seen["healthz"] == 200
    assert seen["readyz"]["error"]["code"] == "database_unreachable"  # type: ignore[index]
    assert int(seen["parts_during_outage"]) >= DB_OUTAGE  # type: ignore[call-overload]
    status, retry_after, body = seen["join_during"]  # type: ignore[misc]
    assert status == 200 or (status == 503 and retry_after and '"error"' in body), (status, body)
    assert seen["after"] == 200
