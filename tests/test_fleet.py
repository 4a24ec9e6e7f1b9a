"""The fleet on loopback, every part started for real: the machine's PostgreSQL and Redis, two
`townhall serve` nodes, and Debian's nginx as the listener edge in front of both. A speaker on
node A is heard through the edge and through node B; `kill -9` of node A moves the space to B
and the replay keeps everything but the part in flight. As behind a CDN, the nodes' public URL
is the edge's and each relays to its peer's own address (``relay_url``)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import secrets
import shutil
import time
from pathlib import Path

import av
import httpx
import m3u8
import numpy as np
import redis

from tests.edge_support import edge_prefix, running_edge
from tests.support import POSTGRES_URL, drop_schema, make_config
from tests.test_cli import free_port, start, stop, wait_healthy
from townhall.scaleout.edge import EdgeSettings, render
from townhall.stage.client import StageClientError, publish
from townhall.stage.sources import ToneTrack, tone_power

RATE = 48000
PART = 0.5
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def _heard(http: httpx.Client, hls_url: str) -> float:
    """The tone's share of the newest part's audio, fetched the way a player does."""
    playlist = http.get(hls_url).text
    last = [x for x in playlist.splitlines() if x.startswith("#EXT-X-PART:")][-1]
    base = hls_url.split("live.m3u8")[0]
    data = http.get(base + "init.mp4").content + http.get(base + last.split('URI="')[1].split('"')[0]).content
    with av.open(io.BytesIO(data)) as container:
        pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
    return tone_power(pcm, RATE, 660.0)


def test_two_nodes_behind_an_edge_and_a_node_killed(tmp_path: Path) -> None:
    config = make_config("postgresql", tmp_path / "data")  # a schema of its own in the real PostgreSQL
    ports = {"a": free_port(), "b": free_port()}
    common = {
        "TOWNHALL_DATABASE_URL": POSTGRES_URL,
        "TOWNHALL_DATABASE_SCHEMA": config.database_schema,
        "TOWNHALL_REDIS_URL": "redis://127.0.0.1:6379/0",
        "TOWNHALL_REDIS_PREFIX": f"t-{secrets.token_hex(4)}",
        "TOWNHALL_STAGE_LEASE_SECONDS": "2",
        "TOWNHALL_HOST_GRACE_SECONDS": "120",
        "TOWNHALL_SIGNUP_LIMIT_PER_ADDRESS": "1000/minute",
        "TOWNHALL_LOGIN_LIMIT_PER_ADDRESS": "1000/minute",
    }
    edge_port = free_port()
    public = f"http://127.0.0.1:{edge_port}"  # links handed to clients name the edge
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    nodes = {
        name: start(
            ["serve", "--port", str(port), "--data", str(tmp_path / "data")],
            {**common, "TOWNHALL_PUBLIC_URL": public, "TOWNHALL_RELAY_URL": url[name]},
        )
        for name, port in ports.items()
    }
    edge = contextlib.ExitStack()
    try:
        for name in ("a", "b"):
            wait_healthy(url[name], nodes[name])
        prefix = edge.enter_context(edge_prefix())
        settings = EdgeSettings(
            origins=[f"127.0.0.1:{p}" for p in ports.values()],
            listen=f"127.0.0.1:{edge_port}",
            prefix=str(prefix),
            workers="1",
        )
        edge_url = edge.enter_context(running_edge(prefix, render(settings), edge_port))
        with httpx.Client(base_url=url["a"], timeout=20) as a:
            assert (
                a.post("/api/v1/accounts", json={"handle": "host", "password": "password123"}).status_code
                == 201
            )
            token = a.post("/api/v1/sessions", json={"handle": "host", "password": "password123"}).json()[
                "token"
            ]
            a.headers["Authorization"] = f"Bearer {token}"
            space = a.post("/api/v1/spaces", json={"title": "Fleet"}).json()["id"]
            assert a.post(f"/api/v1/spaces/{space}/start").status_code == 200  # node A owns it
            # A registered its relay address, not the public one: B relays to A directly.
            lease = f"{common['TOWNHALL_REDIS_PREFIX']}:space:{space}:node"
            with redis.Redis.from_url(common["TOWNHALL_REDIS_URL"], decode_responses=True) as r:
                assert r.get(lease) == url["a"]
            speaker_token = a.post(f"/api/v1/spaces/{space}/speaker-token").json()["speaker_token"]

        async def speak(seconds: float, at: str) -> None:
            for _ in range(30):  # a speaker's client retries while the fleet re-homes the space
                try:
                    pub = await publish(f"{at}/whip/{space}", speaker_token, ToneTrack(660.0))
                    break
                except StageClientError:
                    await asyncio.sleep(0.5)
            else:
                raise AssertionError("the speaker never got on stage")
            try:
                await asyncio.sleep(seconds)
            finally:
                pub.location = None if nodes["a"].poll() is not None else pub.location
                await pub.close()

        async def first_half() -> tuple[float, float, float]:
            speaking = asyncio.create_task(speak(5.0, edge_url))  # through the edge, relayed to A
            await asyncio.sleep(3.0)
            through_edge = await asyncio.to_thread(listen, edge_url)
            through_b = await asyncio.to_thread(listen, url["b"])
            nodes["a"].kill()  # kill -9 of node A, its stage process orphaned
            killed_at = time.time()
            await speaking
            return through_edge, through_b, killed_at

        def listen(at: str) -> float:
            with httpx.Client(base_url=at, timeout=20) as listener:
                joined = listener.post(f"/api/v1/spaces/{space}/join")
                assert joined.status_code == 200, joined.text
                hls_url = joined.json()["hls_url"]
                assert hls_url.startswith(public + "/hls/"), hls_url
                return _heard(listener, hls_url.replace(public, at))

        through_edge, through_b, killed_at = asyncio.run(first_half())
        assert through_edge > 0.5 and through_b > 0.5, (through_edge, through_b)
        time.sleep(3.0)  # A's lease lapses
        asyncio.run(speak(3.0, edge_url))  # the speaker comes back through the edge: lands on B
        with httpx.Client(base_url=url["b"], timeout=20, headers={"Authorization": f"Bearer {token}"}) as b:
            assert b.post(f"/api/v1/spaces/{space}/end").status_code == 200
            replay = m3u8.loads(b.get(f"/hls/{space}/replay.m3u8").text)
        starts = [s for s in replay.segments if s.discontinuity or s is replay.segments[0]]
        assert len(starts) == 2, [s.uri for s in replay.segments]  # A's epoch, then B's
        first_epoch = replay.segments[: replay.segments.index(starts[1])]
        assert starts[0].program_date_time is not None
        end_of_a = starts[0].program_date_time.timestamp() + sum(float(s.duration) for s in first_epoch)
        assert end_of_a >= killed_at - PART - 0.25, end_of_a - killed_at  # at most the part in flight
    finally:
        edge.close()
        for proc in nodes.values():
            if proc.poll() is None:
                stop(proc)
            if proc.stdout is not None:
                proc.stdout.close()
        asyncio.run(drop_schema(config))
