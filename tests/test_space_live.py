"""Live state: the cacheable document, reactions per second, listener counts, SSE pushes."""

from __future__ import annotations

import concurrent.futures
import json
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.spaces_support import Cast, cast, generous_config
from tests.support import assert_error, running_server


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Cast]:
    with running_server(generous_config("sqlite", tmp_path / "data")) as server:
        yield cast(server)


class EventStream:
    """An SSE client on its own thread, collecting (event, data) pairs."""

    def __init__(self, url: str, token: str) -> None:
        self.events: queue.Queue[tuple[str, dict[str, object]]] = queue.Queue()
        self.status: int | None = None
        self.closed = threading.Event()
        self.client = httpx.Client(timeout=httpx.Timeout(30, read=60))
        self.thread = threading.Thread(target=self._run, args=(url, token), daemon=True)
        self.thread.start()

    def _run(self, url: str, token: str) -> None:
        try:
            with self.client.stream("GET", url, headers={"Authorization": f"Bearer {token}"}) as r:
                self.status = r.status_code
                kind = ""
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: "):
                        self.events.put((kind, json.loads(line[6:])))
        except httpx.TransportError:
            pass  # closed by the test
        self.closed.set()

    def next(self, kind: str, timeout: float = 10) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while True:
            k, data = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            if k == kind:
                return data

    def close(self) -> None:
        self.client.close()


def test_state_document_is_small_cacheable_and_built_once_a_second(live: Cast) -> None:
    r = live.anonymous.get(live.path("/state"))
    assert r.headers["cache-control"] == "public, max-age=1"
    assert len(r.content) < 2048
    doc = r.json()
    assert doc["state"] == "live" and doc["host"] == "host"
    assert [s["handle"] for s in doc["stage"]] == ["host", "cohost", "speaker", "speaker2"]
    assert doc["cohosts"] == ["cohost"]
    again = live.anonymous.get(live.path("/state"), headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304
    hub = live.server.node.hub
    hub.invalidate(live.space_id)
    before = hub.builds
    clients = [live.server.client() for _ in range(16)]
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda i: clients[i % 16].get(live.path("/state")).status_code, range(400)))
    elapsed = time.monotonic() - started
    assert statuses == [200] * 400
    builds = hub.builds - before
    # At most one build per second of the burst (plus the one at its start), not one per request.
    assert 1 <= builds <= int(elapsed) + 2, (builds, elapsed)


def test_listener_count_is_exact_for_small_spaces(live: Cast) -> None:
    for _ in range(3):
        live.listener.post(live.path("/join"))  # one account joining thrice is one listener
    for _ in range(4):
        live.server.client().post(live.path("/join"))  # four anonymous listeners
    live.server.node.hub.invalidate(live.space_id)
    listeners = live.anonymous.get(live.path("/state")).json()["listeners"]
    assert listeners == {"count": 5, "exact": True, "relative_error": 0.0}


def test_reactions_are_pushed_once_per_second_aggregated(live: Cast) -> None:
    stream = EventStream(f"{live.server.url}{live.path('/events')}", live.host.token or "")
    try:
        assert stream.next("state")["id"] == live.space_id
        reactors = [live.speaker, live.listener, live.cohost]
        sent = 0
        for api in reactors:
            for _ in range(3):
                assert api.post(live.path("/reactions"), json={"emoji": "👏"}).status_code == 202
                sent += 1
        received = 0
        ticks = 0
        while received < sent:
            tick = stream.next("reactions", timeout=5)
            counts = tick["counts"]
            assert isinstance(counts, dict)
            received += int(counts.get("👏", 0))
            ticks += 1
        assert received == sent and ticks <= 3, (received, ticks)
        live.server.node.hub.invalidate(live.space_id)  # the document may be up to 1 s old
        totals = live.anonymous.get(live.path("/state")).json()["reactions"]["totals"]
        assert totals == {"👏": sent}
    finally:
        stream.close()


def test_reaction_rules(live: Cast) -> None:
    assert_error(live.listener.post(live.path("/reactions"), json={"emoji": "💩"}), 422, "invalid_emoji")
    statuses = [
        live.listener.post(live.path("/reactions"), json={"emoji": "🔥"}).status_code for _ in range(8)
    ]
    assert statuses.count(202) == 5 and statuses[-1] == 429, statuses


def test_stage_changes_are_pushed_and_the_end_closes_the_stream(live: Cast) -> None:
    stream = EventStream(f"{live.server.url}{live.path('/events')}", live.speaker.token or "")
    try:
        stream.next("state")
        live.host.post(live.path("/speakers"), json={"handle": "cand"})
        deadline = time.monotonic() + 5
        while True:
            stage = stream.next("state")["stage"]
            assert isinstance(stage, list)
            if "cand" in [s["handle"] for s in stage]:
                break
            assert time.monotonic() < deadline
        live.host.post(live.path("/end"))
        stream.next("ended")
        assert stream.closed.wait(10)
    finally:
        stream.close()


def test_events_are_for_the_stage_only(live: Cast) -> None:
    assert_error(live.listener.get(live.path("/events")), 403, "not_on_stage")
    assert_error(live.anonymous.get(live.path("/events")), 401)
