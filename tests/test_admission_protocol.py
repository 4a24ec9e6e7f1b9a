"""Joins and renewals answered in the HTTP protocol (``control/fastproto.py``) against the same
requests through the ASGI app, over real sockets: a join, a queued join (202 and its queue
token), a return with the token (still waiting, then admitted), a renewal by body and by cookie,
a 429, a proof-of-work 403, bad bodies and a forged ticket give the same status, header names
in the same order, the same fixed header values and the same body shape either way.

A request goes the ASGI way when its target carries a query string (``?via=asgi``: the
protocol's pattern is the bare path; ``JoinFastPath`` matches the path alone); each pair asks
ASGI first, which also refreshes the space's snapshot, then the protocol. Which way each went is
checked with the protocol's own count of the joins it answered."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.spaces_support import generous_config
from tests.support import RunningServer, assert_error, running_server
from tests.test_admission import live_space
from tests.test_listener_protocol import read_answers
from townhall.admission.pow import solve
from townhall.admission.shedding import Priority
from townhall.control.fastproto import _Resumed
from townhall.control.routes.admission import Reply

# Headers whose values differ between two answers of the same kind for a good reason.
VARYING = {"date", "content-length"}


def config(tmp_path: Path, **extra: Any) -> Any:
    # A snapshot lasting the whole test: each request is answered from memory, none is sent the
    # ASGI way by an expiry on a slow machine.
    return generous_config("sqlite", tmp_path / "data", admission_snapshot_seconds=300.0, **extra)


class Both:
    """Sends the same request the ASGI way and the protocol's way, and checks the way taken."""

    def __init__(self, server: RunningServer, space_id: str) -> None:
        self.server = server
        self.space_id = space_id
        self.protocol = server.server.config.http
        assert isinstance(self.protocol, type) and hasattr(self.protocol, "joins_here")

    def post(self, api: Any, what: str, fast: bool, **kwargs: Any) -> httpx.Response:
        path = f"/api/v1/spaces/{self.space_id}/{what}" + ("" if fast else "?via=asgi")
        before = self.protocol.joins_here
        response: httpx.Response = api.post(path, **kwargs)
        assert self.protocol.joins_here - before == (1 if fast else 0), (what, fast, response.text)
        return response

    def pair(self, api: Any, what: str = "join", **kwargs: Any) -> tuple[httpx.Response, httpx.Response]:
        routed = self.post(api, what, False, **kwargs)
        fast = self.post(api, what, True, **kwargs)
        same(routed, fast)
        return routed, fast


def shape(value: Any) -> Any:
    """A JSON value's shape: keys and types, not values."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    return type(value).__name__


def same(routed: httpx.Response, fast: httpx.Response) -> None:
    assert fast.status_code == routed.status_code, (routed.text, fast.text)
    names = [name for name, _ in routed.headers.raw]
    assert [name for name, _ in fast.headers.raw] == names, (routed.headers, fast.headers)
    assert b"server" in names and b"date" in names  # the server's own lines, on both
    for (name, value), (_, other) in zip(routed.headers.raw, fast.headers.raw, strict=True):
        if name.decode() in VARYING:
            continue
        if name == b"set-cookie":
            value, other = (re.sub(rb"=[^;]+; (.*)Max-Age=\d+", rb"=T; \1", v) for v in (value, other))
        if name == b"retry-after" and routed.status_code == 202:
            continue  # from the position, one apart
        assert value == other, (name, value, other)
    assert int(fast.headers["content-length"]) == len(fast.content)
    body, other = routed.json(), fast.json()
    assert shape(body) == shape(other), (body, other)
    if "error" in body:
        assert body["error"]["code"] == other["error"]["code"], (body, other)
        if routed.status_code != 429:  # the 429's message names its seconds
            assert body == other


@pytest.fixture
def slow(tmp_path: Path) -> Iterator[tuple[RunningServer, Both]]:
    """A node admitting one listener every 20 s of its clock (burst 1)."""
    with running_server(config(tmp_path, space_join_rate=0.05, space_join_burst=1.0)) as server:
        _, space_id = live_space(server)
        yield server, Both(server, space_id)


def test_joins_queue_returns_and_renewals_answer_alike_both_ways(slow: tuple[RunningServer, Both]) -> None:
    server, both = slow
    anon = server.client()
    # Two joins admitted, each with a place freed by the clock.
    server.clock.advance(20)
    admitted = both.post(anon, "join", False)
    server.clock.advance(20)
    again = both.post(anon, "join", True)
    same(admitted, again)
    assert admitted.status_code == 200, admitted.text
    ticket = again.json()
    assert ticket["hls_url"].startswith(f"{server.url}/hls/{both.space_id}/live.m3u8?ticket=")
    assert admitted.json()["hls_url"].startswith(f"{server.url}/hls/{both.space_id}/live.m3u8?ticket=")
    assert "townhall_ticket=" in again.headers["set-cookie"]

    # Over capacity: 202, a queue token, a position, Retry-After.
    first, second = both.pair(anon)
    assert first.status_code == 202 and second.json()["position"] == first.json()["position"] + 1
    assert "retry-after" in second.headers

    # Coming back too early: still waiting, same token, same position or lower.
    early = both.post(anon, "join", False, json={"queue_token": first.json()["queue_token"]})
    early_fast = both.post(anon, "join", True, json={"queue_token": second.json()["queue_token"]})
    same(early, early_fast)
    assert early.status_code == 202 and early_fast.json()["position"] <= second.json()["position"]

    # As places free, each token admits its holder, once.
    server.clock.advance(20)
    back = both.post(anon, "join", False, json={"queue_token": first.json()["queue_token"]})
    server.clock.advance(20)
    back_fast = both.post(anon, "join", True, json={"queue_token": second.json()["queue_token"]})
    same(back, back_fast)
    assert back.status_code == 200, back.text
    reused = both.post(anon, "join", False, json={"queue_token": first.json()["queue_token"]})
    reused_fast = both.post(anon, "join", True, json={"queue_token": second.json()["queue_token"]})
    same(reused, reused_fast)
    assert_error(reused_fast, 409, "queue_token_used")

    # Renewals: by body, by cookie, and a forged ticket.
    renewed, _ = both.pair(anon, "tickets/renew", json={"ticket": ticket["ticket"]})
    assert renewed.status_code == 200 and renewed.json()["listener"] == ticket["listener"]
    by_cookie = httpx.Client(base_url=server.url, cookies={"townhall_ticket": ticket["ticket"]})
    server.clients.append(by_cookie)  # type: ignore[arg-type]  # closed with the server
    _, cookie_fast = both.pair(by_cookie, "tickets/renew")
    assert cookie_fast.status_code == 200 and cookie_fast.json()["listener"] == ticket["listener"]
    forged = ticket["ticket"][:-3] + ("AAA" if not ticket["ticket"].endswith("AAA") else "BBB")
    _, forged_fast = both.pair(anon, "tickets/renew", json={"ticket": forged})
    assert_error(forged_fast, 403, "invalid_ticket")
    _, none_fast = both.pair(anon, "tickets/renew")
    assert_error(none_fast, 403, "ticket_required")

    # Bad bodies: not JSON, a wrong type, a field too long.
    headers = {"content-type": "application/json"}
    _, bad = both.pair(anon, content=b"{not json", headers=headers)
    assert_error(bad, 400, "malformed_json")
    _, wrong = both.pair(anon, json={"queue_token": 5})
    assert wrong.status_code == 422
    _, long = both.pair(anon, json={"pow_nonce": "x" * 65})
    assert long.status_code == 422
    # An unknown space has no snapshot in memory: the ASGI way, 404.
    assert_error(anon.post("/api/v1/spaces/nosuchspace/join"), 404, "space_not_found")


def test_limits_proof_of_work_and_accounts_answer_alike_both_ways(tmp_path: Path) -> None:
    cfg = config(tmp_path, join_limit_per_address="9/minute", pow_base_bits=4)
    with running_server(cfg) as server:
        _, space_id = live_space(server)
        both = Both(server, space_id)
        admin = server.client(server.create_admin())
        anon = server.client()
        ok, _ = both.pair(anon)  # hits 1 and 2 of the address
        assert ok.status_code == 200

        # An account: its first join reads its session the ASGI way (a database read), the
        # next one is answered in the protocol (the session is remembered).
        alice = server.client().user("alice")
        routed, fast = both.pair(alice)  # 3, 4
        assert fast.status_code == 200 and fast.json()["listener"] == routed.json()["listener"]
        assert fast.json()["listener"].startswith("a")
        unknown = server.client("not-a-session-token")
        assert_error(unknown.post(f"/api/v1/spaces/{space_id}/join"), 401, "invalid_token")  # 5

        assert admin.post("/api/v1/admin/attack-mode", json={"on": True}).json()["active"] is True
        _, refused = both.pair(anon)  # 6, 7
        assert_error(refused, 403, "pow_required")
        challenges = [anon.get("/api/v1/pow/challenge").json() for _ in range(2)]
        proofs = [
            {"pow_challenge": c["challenge"], "pow_nonce": solve(c["challenge"], c["difficulty"])}
            for c in challenges
        ]
        solved = both.post(anon, "join", False, json=proofs[0])  # 8
        solved_fast = both.post(anon, "join", True, json=proofs[1])  # 9
        same(solved, solved_fast)
        assert solved_fast.status_code == 200, solved_fast.text

        _, limited = both.pair(anon)  # 10, 11: over the address's minute
        assert_error(limited, 429, "rate_limited")
        assert 1 <= int(limited.headers["retry-after"]) <= 60


def test_a_shed_join_answers_alike_both_ways_and_by_the_same_classes(tmp_path: Path) -> None:
    """Once the controller's target is a microsecond over a millisecond, any measured queueing
    delay is an overload: both ways shed anonymous new joins with the same 503, through the
    same controller (its count of shed anonymous joins rises by one per shed answer, either
    way)."""
    with running_server(config(tmp_path)) as server:
        _, space_id = live_space(server)
        both = Both(server, space_id)
        anon = server.client()
        both.pair(anon)  # admitted both ways (and the space's snapshot is in memory)
        shedder = server.node.admission.shedder
        shedder.target, shedder.interval = 1e-6, 1e-3
        answers: dict[bool, httpx.Response] = {}
        deadline = time.monotonic() + 20
        while len(answers) < 2 and time.monotonic() < deadline:
            for fast in (False, True):
                before = shedder.shed_by_class.get(Priority.ANONYMOUS_JOIN, 0)
                r = both.post(anon, "join", fast)
                if r.status_code == 503:
                    assert shedder.shed_by_class[Priority.ANONYMOUS_JOIN] == before + 1
                    answers[fast] = r
                else:
                    assert r.status_code == 200, r.text
            time.sleep(0.005)
        assert set(answers) == {False, True}, "never shed one way or the other"
        routed, fast = answers[False], answers[True]
        assert [n for n, _ in routed.headers.raw] == [n for n, _ in fast.headers.raw]
        assert routed.content == fast.content
        assert_error(fast, 503, "overloaded")
        assert 1 <= int(fast.headers["retry-after"]) <= 5
        assert fast.headers["cache-control"] == routed.headers["cache-control"] == "no-store"


def test_pipelined_joins_and_http_1_0_are_answered_in_order_and_closed_as_asked(tmp_path: Path) -> None:
    """Three joins sent in one write on a kept-alive connection are answered in the protocol in
    order (a renewal between them uses the first one's ticket); an HTTP/1.0 join is answered
    with ``connection: close`` and the connection closed."""
    with running_server(config(tmp_path)) as server:
        _, space_id = live_space(server)
        both = Both(server, space_id)
        both.pair(server.client())  # the space's snapshot is in memory
        port = int(server.url.rsplit(":", 1)[1])
        path = f"/api/v1/spaces/{space_id}/join"

        def post(target: str, body: bytes = b"{}", version: str = "1.1") -> bytes:
            head = f"POST {target} HTTP/{version}\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            return head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body

        before = both.protocol.joins_here
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(post(path) * 3)
            answers = read_answers(sock, 3, ["POST"] * 3)
        assert [r.status_code for r, _ in answers] == [200, 200, 200]
        tickets = [json.loads(body)["ticket"] for _, body in answers]
        assert len(set(tickets)) == 3
        assert both.protocol.joins_here - before == 3

        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            renew = f"/api/v1/spaces/{space_id}/tickets/renew"
            sock.sendall(post(path, version="1.0"))
            ((response, body),) = read_answers(sock, 1, ["POST"])
            assert response.status_code == 200 and json.loads(body)["ticket"]
            assert dict(response.headers).get(b"connection") == b"close"
            assert sock.recv(1) == b""  # closed by the server
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(post(renew, json.dumps({"ticket": tickets[0]}).encode()) + post(path))
            (renewed, renewed_body), (joined, _) = read_answers(sock, 2, ["POST", "POST"])
            assert renewed.status_code == 200 and joined.status_code == 200
            assert json.loads(renewed_body)["listener"] == json.loads(answers[0][1])["listener"]
        assert both.protocol.joins_here - before == 6


def test_a_join_that_suspends_after_all_goes_on_as_a_task_from_where_it_stopped() -> None:
    """``_Resumed``: a coroutine started by hand that waits on a future is handed to a task
    and finishes there with its result; a failure inside it reaches the task."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        gate: asyncio.Future[int] = loop.create_future()
        steps: list[str] = []

        async def join() -> Reply:
            steps.append("started")
            value = await gate
            steps.append("resumed")
            await asyncio.sleep(0)
            return Reply(200, [], str(value).encode())

        coro = join()
        first = coro.send(None)  # runs to its first real wait
        assert steps == ["started"]
        task = asyncio.ensure_future(_Resumed(coro, first))
        loop.call_later(0.01, gate.set_result, 7)
        reply = await asyncio.wait_for(task, 5)
        assert reply.body == b"7" and steps == ["started", "resumed"]

        async def failing() -> Reply:
            await asyncio.sleep(0.001)
            raise ValueError("boom")

        coro = failing()
        task = asyncio.ensure_future(_Resumed(coro, coro.send(None)))
        with pytest.raises(ValueError, match="boom"):
            await task

    asyncio.run(scenario())


def test_joins_answered_in_the_protocol_are_counted_like_routed_ones(tmp_path: Path) -> None:
    """``/metrics``: joins answered either way are counted under the route's template and
    status, and the admission's own counters (admitted, refused) move for both."""
    with running_server(config(tmp_path, join_limit_per_address="5/minute")) as server:
        _, space_id = live_space(server)
        both = Both(server, space_id)
        anon = server.client()
        route = 'route="/api/v1/spaces/{space_id}/join"'

        def counted(status: int) -> float:
            text = anon.get("/metrics").text
            lines = [ln for ln in text.splitlines() if ln.startswith("townhall_http_requests_total")]
            mine = [ln for ln in lines if route in ln and f'status="{status}"' in ln]
            return sum(float(ln.rsplit(" ", 1)[1]) for ln in mine)

        def admission(name: str) -> float:
            text = anon.get("/metrics").text
            return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(name))

        ok, refused = counted(200), counted(429)
        admitted = admission('townhall_admission_joins_total{outcome="admitted"}')
        refusals = admission("townhall_admission_refused_total")
        both.pair(anon)
        both.pair(anon)  # hits 1-4 of the address
        both.post(anon, "join", True)  # 5
        _, fast = both.pair(anon)  # 6, 7: refused
        assert fast.status_code == 429
        assert counted(200) - ok == 5 and counted(429) - refused == 2
        assert admission('townhall_admission_joins_total{outcome="admitted"}') - admitted == 5
        assert admission("townhall_admission_refused_total") - refusals == 2


def test_a_hot_request_pipelined_behind_a_join_that_suspends_waits_its_turn(tmp_path: Path) -> None:
    """A join answered in the protocol that waits for I/O after all goes on as a task; a hot
    listener GET pipelined behind it on the same connection is answered after it, not before
    (the client would read the GET's answer as its POST's)."""
    from tests.spaces_support import cast
    from tests.test_listener_protocol import Joined

    with running_server(config(tmp_path)) as server:
        live = cast(server)
        listener = Joined(live)
        admission = server.node.admission
        join = admission.join
        waited: list[bool] = []

        async def slow_join(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(0.3)  # as a lapsed read between the check and the join would
            waited.append(True)
            return await join(*args, **kwargs)

        admission.join = slow_join  # type: ignore[method-assign]
        body = b"{}"
        post = (
            f"POST /api/v1/spaces/{live.space_id}/join HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        before = Both(server, live.space_id).protocol.joins_here
        with listener.connect() as sock:
            sock.sendall(post + listener.request("init.mp4"))
            (joined, joined_body), (init, init_body) = read_answers(sock, 2, ["POST", "GET"])
        assert waited == [True]
        assert Both(server, live.space_id).protocol.joins_here - before == 1  # the protocol's way
        assert joined.status_code == 200 and json.loads(joined_body)["ticket"]
        assert init.status_code == 200 and dict(init.headers)[b"content-type"] == b"audio/mp4"
        assert init_body[4:8] == b"ftyp"


def test_the_protocols_delay_probe_speaks_for_its_moment_not_for_an_old_stall() -> None:
    """``LoopDelay``: a probe queued behind a stalled callback measures the stall; a request a
    quiet while later does not see that old stall as its delay (it would be shed for it)."""
    from townhall.control.shed import LoopDelay

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        probe = LoopDelay()
        assert probe.delay(loop, time.perf_counter()) == 0.0  # queues the first probe
        loop.call_soon(time.sleep, 0.05)  # a stall ahead of... nothing: the probe ran first
        await asyncio.sleep(0.1)
        loop.call_soon(time.sleep, 0.06)  # this stall is ahead of the next probe
        probe.delay(loop, time.perf_counter())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert probe.last >= 0.05  # measured
        assert probe.delay(loop, time.perf_counter()) >= 0.05  # fresh: it speaks for now
        await asyncio.sleep(0.25)  # quiet
        assert probe.delay(loop, time.perf_counter()) == 0.0

    asyncio.run(scenario())
