"""Redis goes away for a while (cut between the node and the machine's real Redis): the node
stays alive but not ready, listeners already in keep playing, and everything comes back by
itself when Redis does."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from tests.spaces_support import Cast, cast, generous_config
from tests.support import RunningServer, TcpRelay, running_server
from townhall.stage.client import publish
from townhall.stage.sources import ToneTrack

REDIS_OUTAGE = 15.0  # seconds without Redis (the scale-out issue's figure)
DB_OUTAGE = 6.0  # seconds without PostgreSQL


def _hint(playlist: str) -> tuple[int, int]:
    m = re.search(r'PRELOAD-HINT:TYPE=PART,URI="seg(\d+)\.(\d+)\.m4s"', playlist)
    assert m is not None, playlist
    return int(m.group(1)), int(m.group(2))


async def _ride_out(
    server: RunningServer,
    c: Cast,
    relay: TcpRelay,
    outage: float,
    ready: Callable[[], bool],
    after: Callable[[httpx.AsyncClient], Awaitable[object]],
) -> dict[str, object]:
    """A speaker on stage and a listener in; the relay to the service cut for ``outage``
    seconds while the listener follows blocking reloads and a newcomer tries to join; the
    relay restored, then the node waited for until ``/readyz`` and ``ready()`` say it is back,
    and ``after`` run. What was seen, by name."""
    seen: dict[str, object] = {}
    token = str(c.host.post(c.path("/speaker-token")).json()["speaker_token"])
    pub = await publish(f"{server.url}/whip/{c.space_id}", token, ToneTrack(440.0))
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as listener:
            joined = await listener.post(f"/api/v1/spaces/{c.space_id}/join")
            assert joined.status_code == 200, joined.text
            await asyncio.sleep(1.5)
            playlist = f"/hls/{c.space_id}/live.m3u8"
            msn, part = _hint((await listener.get(playlist)).text)
            assert (await listener.get("/readyz")).status_code == 200

            relay.cut()  # the service is gone
            began = time.monotonic()
            seen["healthz"] = (await listener.get("/healthz")).status_code
            seen["readyz"] = (await listener.get("/readyz")).json()
            served = 0
            while time.monotonic() - began < outage:  # the listener plays on
                r = await listener.get(playlist, params={"_HLS_msn": msn, "_HLS_part": part})
                assert r.status_code == 200, r.text
                served += 1
                msn, part = _hint(r.text)
            seen["parts_during_outage"] = served
            async with httpx.AsyncClient(base_url=server.url, timeout=20) as newcomer:
                during = await newcomer.post(f"/api/v1/spaces/{c.space_id}/join")
            seen["join_during"] = (during.status_code, during.headers.get("retry-after"), during.text)

            relay.restore()  # the service is back
            deadline = time.monotonic() + 15
            while (await listener.get("/readyz")).status_code != 200 or not ready():
                assert time.monotonic() < deadline, "never ready again"
                await asyncio.sleep(0.2)
            seen["after"] = await after(listener)
    finally:
        await pub.close()
    return seen


def _assert_ridden_out(seen: dict[str, object], unreachable: str, outage: float) -> None:
    assert seen["healthz"] == 200
    assert seen["readyz"]["error"]["code"] == unreachable  # type: ignore[index]
    # About two parts a second kept coming to the listener already in.
    assert int(seen["parts_during_outage"]) >= outage  # type: ignore[call-overload]
    status, retry_after, body = seen["join_during"]  # type: ignore[misc]
    # A new join meanwhile is either served (nothing it needs is missing) or refused safely:
    # 503 with Retry-After and a JSON error, never a crash.
    assert status == 200 or (status == 503 and retry_after and '"error"' in body), (status, body)


def test_a_redis_outage_is_ridden_out(tmp_path: Path) -> None:
    relay = TcpRelay("127.0.0.1", 6379).start()
    config = generous_config(
        "postgresql",
        tmp_path / "data",
        redis_url=f"redis://127.0.0.1:{relay.port}/0",
        redis_prefix=f"t-{secrets.token_hex(4)}",
    )

    async def joins_again(_: httpx.AsyncClient) -> list[int]:
        # Joins work again without a restart (a pooled connection that died with the outage
        # may refuse one more, cleanly, before it is replaced).
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as newcomer:
            statuses: list[int] = []
            while not statuses or statuses[-1] != 200:
                assert len(statuses) < 5, statuses
                after = await newcomer.post(f"/api/v1/spaces/{c.space_id}/join")
                statuses.append(after.status_code)
                if after.status_code != 200:
                    assert after.status_code == 503, after.text
                    await asyncio.sleep(0.3)
            return statuses

    try:
        with running_server(config) as server:
            c = cast(server)
            bus = server.node.bus
            seen = asyncio.run(
                _ride_out(server, c, relay, REDIS_OUTAGE, lambda: bool(bus.connected), joins_again)  # type: ignore[attr-defined]
            )
    finally:
        relay.stop()
    _assert_ridden_out(seen, "redis_unreachable", REDIS_OUTAGE)
    assert seen["after"][-1] == 200  # type: ignore[index]


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

    async def space_again(_: httpx.AsyncClient) -> int:
        return c.anonymous.get(f"/api/v1/spaces/{c.space_id}").status_code

    try:
        with running_server(config) as server:
            c = cast(server)
            seen = asyncio.run(_ride_out(server, c, relay, DB_OUTAGE, lambda: True, space_again))
    finally:
        relay.stop()
    _assert_ridden_out(seen, "database_unreachable", DB_OUTAGE)
    assert seen["after"] == 200
