"""The shipped nginx edge (Debian's nginx, started for real) in front of a real node: N identical
listener requests cost the origin one, blocking reloads included, and an origin outage does not
reach listeners of what the edge already holds."""

from __future__ import annotations

import asyncio
import re
import resource
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.edge_support import edge_prefix, raw_gets, running_edge
from tests.spaces_support import Cast, cast, generous_config
from tests.support import TcpRelay, running_server
from townhall.scaleout.edge import EdgeSettings, render
from townhall.stage.client import publish
from townhall.stage.sources import ToneTrack

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
LISTENERS = 50
WAITERS = 1100  # past the 1,024 lookups nginx counts per cache node (a 10-bit field)
LEAVERS = 40
LIVE = "/hls/{space_id}/live.m3u8"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Cast]:
    with running_server(generous_config("sqlite", tmp_path / "data")) as server:
        yield cast(server)


def _origin_requests(c: Cast, route: str) -> float:
    text = c.anonymous.get("/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("townhall_http_requests_total{") and f'route="{route}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _next_part(playlist: str) -> tuple[int, int]:
    hint = re.search(r'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="seg(\d+)\.(\d+)\.m4s"', playlist)
    assert hint is not None, playlist
    return int(hint.group(1)), int(hint.group(2))


def test_the_edge_collapses_listeners_and_rides_out_an_origin_outage(live: Cast) -> None:
    origin_port = int(live.server.url.rsplit(":", 1)[1])
    relay = TcpRelay("127.0.0.1", origin_port).start()  # nginx -> relay -> origin: cuttable
    edge_port = _free_port()
    space = live.space_id
    with edge_prefix() as prefix:
        settings = EdgeSettings(
            origins=[f"127.0.0.1:{relay.port}"],
            listen=f"127.0.0.1:{edge_port}",
            prefix=str(prefix),
            workers="1",
        )
        try:
            with running_edge(prefix, render(settings), edge_port) as edge_url:
                asyncio.run(_collapse_and_outage(live, relay, edge_url, space))
        finally:
            relay.stop()


async def _collapse_and_outage(live: Cast, relay: TcpRelay, edge_url: str, space: str) -> None:
    pub = await publish(f"{live.server.url}/whip/{space}", live_token(live), ToneTrack(440.0))
    try:
        async with httpx.AsyncClient(base_url=edge_url, timeout=20) as http:
            joined = await http.post(f"/api/v1/spaces/{space}/join")
            assert joined.status_code == 200, joined.text
            assert "townhall_ticket" in http.cookies  # the ticket travels as the cookie
            await asyncio.sleep(1.5)
            first = await http.get(f"/hls/{space}/live.m3u8")
            assert first.status_code == 200, first.text
            msn, part = _next_part(first.text)

            # LISTENERS blocking reloads for the part not made yet: one reaches the origin.
            before = _origin_requests(live, "/hls/{space_id}/live.m3u8")
            query = f"/hls/{space}/live.m3u8?_HLS_msn={msn}&_HLS_part={part}"
            answers = await asyncio.gather(*(http.get(query) for _ in range(LISTENERS)))
            assert {a.status_code for a in answers} == {200}
            assert len({a.content for a in answers}) == 1  # the same bytes for all
            assert f"seg{msn}.{part}.m4s" in answers[0].text
            assert _origin_requests(live, "/hls/{space_id}/live.m3u8") - before == 1

            # LISTENERS fetch that new part: one origin request.
            before = _origin_requests(live, "/hls/{space_id}/{name}")
            name = f"/hls/{space}/seg{msn}.{part}.m4s"
            parts = await asyncio.gather(*(http.get(name) for _ in range(LISTENERS)))
            assert {p.status_code for p in parts} == {200} and len({p.content for p in parts}) == 1
            assert _origin_requests(live, "/hls/{space_id}/{name}") - before == 1

            # The origin drops off the network: what the edge holds is still served.
            relay.cut()
            again = await http.get(name)
            assert again.status_code == 200 and again.content == parts[0].content
            stale = await http.get(query)
            assert stale.status_code == 200 and stale.content == answers[0].content
            relay.restore()
    finally:
        await pub.close()


def live_token(c: Cast) -> str:
    return str(c.host.post(c.path("/speaker-token")).json()["speaker_token"])


def test_the_shipped_edge_config_is_the_rendered_one() -> None:
    """deploy/nginx/edge.conf is what the renderer makes for the compose fleet (no drift), and
    it keys the cache on the path and the blocking-reload parameters only."""
    from townhall.scaleout.edge import SHIPPED

    shipped = (Path(__file__).parent.parent / "deploy" / "nginx" / "edge.conf").read_text()
    assert shipped == render(SHIPPED)
    assert 'proxy_cache_key "$uri|$arg__HLS_msn|$arg__HLS_part";' in shipped
    assert "ticket" not in shipped.split("proxy_cache_key")[1].split(";")[0]
    with pytest.raises(ValueError):
        render(EdgeSettings(origins=[]))
    with pytest.raises(ValueError):
        render(EdgeSettings(origins=["no-port"]))


def test_the_lock_holds_past_1024_waiters_and_when_the_waiters_leave(live: Cast) -> None:
    """Two ways nginx's cache lock used to let requests through to the origin (BENCHMARKS.md,
    "Edge"): the 1,024th request waiting for one object, and every waiter in turn once the
    one whose request held the lock had hung up. The shipped edge sends one request either way."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 3 * WAITERS + 1000  # the test's sockets and, inherited, nginx's
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, want), hard))
    edge_port = _free_port()
    try:
        with edge_prefix() as prefix:
            settings = EdgeSettings(
                origins=[live.server.url.removeprefix("http://")],
                listen=f"127.0.0.1:{edge_port}",
                prefix=str(prefix),
                workers="1",
            )
            with running_edge(prefix, render(settings), edge_port) as edge_url:
                asyncio.run(_many_waiters_and_leavers(live, edge_url, edge_port))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def _many_waiters_and_leavers(live: Cast, edge_url: str, edge_port: int) -> None:
    space = live.space_id
    pub = await publish(f"{live.server.url}/whip/{space}", live_token(live), ToneTrack(440.0))
    try:
        async with httpx.AsyncClient(base_url=edge_url, timeout=20) as http:
            assert (await http.post(f"/api/v1/spaces/{space}/join")).status_code == 200
            ticket = http.cookies["townhall_ticket"]
            await asyncio.sleep(1.5)

            # WAITERS blocking reloads for a part a segment ahead (held ~2 s at the origin).
            msn, part = _next_part((await http.get(f"/hls/{space}/live.m3u8")).text)
            ahead = f"/hls/{space}/live.m3u8?_HLS_msn={msn + 1}&_HLS_part={part}"
            before = _origin_requests(live, LIVE)
            answers = await raw_gets(edge_port, ahead, ticket, WAITERS)
            assert all(a.startswith(b"HTTP/1.1 200 ") for a in answers), {a[:40] for a in answers}
            bodies = {a.split(b"\r\n\r\n", 1)[1] for a in answers}
            assert len(bodies) == 1 and f"seg{msn + 1}.{part}.m4s".encode() in bodies.pop()
            assert _origin_requests(live, LIVE) - before == 1

            # LEAVERS wait for another part a segment ahead and hang up before it exists.
            msn, part = _next_part((await http.get(f"/hls/{space}/live.m3u8")).text)
            ahead = f"/hls/{space}/live.m3u8?_HLS_msn={msn + 1}&_HLS_part={part}"
            before = _origin_requests(live, LIVE)
            await raw_gets(edge_port, ahead, ticket, LEAVERS, leave_after=0.3)
            async with httpx.AsyncClient(
                base_url=live.server.url, timeout=20, cookies={"townhall_ticket": ticket}
            ) as origin:
                for _ in range(100):  # the part exists at the origin (asked by its name: another route)
                    if (await origin.get(f"/hls/{space}/seg{msn + 1}.{part}.m4s")).status_code == 200:
                        break
                    await asyncio.sleep(0.1)
            await asyncio.sleep(1.5)  # the waiters' lock polls (every 500 ms) have all come round
            again = await http.get(ahead)
            assert again.status_code == 200 and again.headers["x-cache"] == "HIT"
            assert _origin_requests(live, LIVE) - before == 1
    finally:
        await pub.close()
