"""Listener requests answered in the HTTP protocol (``control/fastproto.py``), over real sockets:
the same answers as the routes, keep-alive, pipelining, HTTP/1.0, held blocking reloads (woken
together, closed mid-hold, past their bound) and a client that does not read."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import h11
import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from tests.spaces_support import Cast, cast, generous_config
from tests.support import assert_error, running_server
from tests.test_hls_tickets import COOKIE, playlist_when_ready
from townhall.audience.listener import Follower, parse_media_playlist
from townhall.control.fastproto import _Tally


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Cast]:
    with running_server(generous_config("sqlite", tmp_path / "data"), protocol=True) as server:
        yield cast(server)


class Joined:
    """A listener of the live space: its ticket, the space's base URL and raw HTTP/1.1 on
    its own sockets (h11 reads the answers)."""

    def __init__(self, live: Cast) -> None:
        self.ticket = live.listener.post(live.path("/join")).json()["ticket"]
        self.base = f"{live.server.url}/hls/{live.space_id}/"
        self.path = f"/hls/{live.space_id}/"
        self.address = ("127.0.0.1", int(live.server.url.rsplit(":", 1)[1]))
        self.http = httpx.Client(timeout=30, cookies={COOKIE: self.ticket})
        live.server.clients.append(self)  # type: ignore[arg-type]  # closed with the server
        playlist_when_ready(self.http, self.base + "live.m3u8")
        held = self.http.get(self.base + "live.m3u8", params={"_HLS_msn": 0})  # until seg 0 is whole
        assert held.status_code == 200, held.text
        self.playlist = parse_media_playlist(held.text)

    def close(self) -> None:
        self.http.close()

    def request(self, target: str, method: str = "GET", version: str = "1.1", **headers: str) -> bytes:
        lines = [
            f"{method} {self.path}{target} HTTP/{version}",
            "Host: 127.0.0.1",
            f"Cookie: {COOKIE}={self.ticket}",
        ]
        lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def connect(self) -> socket.socket:
        return socket.create_connection(self.address, timeout=30)

    def next_blocking(self) -> tuple[int, int]:
        """The next part still to come, as a blocking reload asks for it."""
        follower = Follower()
        follower.update(parse_media_playlist(self.http.get(self.base + "live.m3u8").text))
        msn, part = follower.blocking_request()
        return msn, part if part is not None else 0


def read_answers(
    sock: socket.socket, count: int, methods: list[str] | None = None
) -> list[tuple[h11.Response, bytes]]:
    """``count`` answers read off ``sock`` in order (HEAD answers carry no body)."""
    conn = h11.Connection(h11.CLIENT)
    out: list[tuple[h11.Response, bytes]] = []
    methods = methods or ["GET"] * count
    while len(out) < count:
        # h11 needs to know each request to frame its answer.
        conn.send(h11.Request(method=methods[len(out)], target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        response: h11.Response | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = sock.recv(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise AssertionError(f"closed after {len(out)} answers")
        assert response is not None
        out.append((response, body))
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            break
        conn.start_next_cycle()
    return out


def headers_of(response: h11.Response) -> dict[bytes, bytes]:
    return dict(response.headers)


def test_answers_match_the_routes_header_for_header(live: Cast) -> None:
    """A part, a segment, init and the playlist answered in the protocol carry the same status,
    bytes and header set as the FastAPI route gives (a conditional that does not match sends
    the request there), and are counted under the routes' templates."""
    j = Joined(live)
    names = ["init.mp4", j.playlist.parts[-1].uri]
    names.append(str(next(s.uri for s in j.playlist.segments if s.complete)))
    with j.connect() as sock:
        for name in names:
            for method in ("GET", "HEAD"):
                sock.sendall(j.request(name, method) + j.request(name, method, If_None_Match='"not-it"'))
                (fast, fast_body), (routed, routed_body) = read_answers(sock, 2, [method, method])
                assert fast.status_code == routed.status_code == 200, (name, method)
                assert fast_body == routed_body and (method == "HEAD" or len(fast_body) > 0)
                assert headers_of(fast).keys() == headers_of(routed).keys(), name
                for h in (b"cache-control", b"etag", b"content-type", b"content-length", b"accept-ranges"):
                    assert headers_of(fast)[h] == headers_of(routed)[h], (name, h)
        for _ in range(5):  # a part may land between the two requests
            sock.sendall(j.request("live.m3u8") + j.request("live.m3u8?x=1"))
            (fast, fast_body), (routed, routed_body) = read_answers(sock, 2)
            if fast_body == routed_body:
                break
        assert fast.status_code == routed.status_code == 200 and fast_body == routed_body
        assert headers_of(fast).keys() == headers_of(routed).keys()
        for h in (b"cache-control", b"content-type", b"content-length"):
            assert headers_of(fast)[h] == headers_of(routed)[h]
    metrics = httpx.get(f"{live.server.url}/metrics").text
    assert 'method="HEAD",route="/hls/{space_id}/{name}",status="200"' in metrics
    assert 'method="GET",route="/hls/{space_id}/init.mp4",status="200"' in metrics
    assert 'method="GET",route="/hls/{space_id}/live.m3u8",status="200"' in metrics


def test_errors_still_come_from_the_routes(live: Cast) -> None:
    """What the protocol declines goes through the ASGI app with its rules: no ticket, an
    unknown name, a blocking reload too far ahead, a Range, a ticket of no space."""
    j = Joined(live)
    part = j.playlist.parts[-1].uri
    assert_error(httpx.get(j.base + part), 403, "ticket_required")
    assert_error(j.http.get(j.base + "seg1.m4s.bak"), 404, "not_found")
    assert_error(j.http.get(j.base + "live.m3u8", params={"_HLS_msn": 10**6}), 400, "bad_blocking_request")
    ranged = j.http.get(j.base + part, headers={"Range": "bytes=0-9"})
    assert ranged.status_code == 206 and len(ranged.content) == 10
    assert_error(httpx.get(j.base + part, cookies={COOKIE: "forged"}), 403)


def test_keep_alive_pipelining_and_http_1_0(live: Cast) -> None:
    """Pipelined requests, answered here or by the app, come back in order on one connection,
    which is closed once idle for uvicorn's keep-alive timeout (5 s); HTTP/1.0 and
    ``Connection: close`` get ``connection: close`` and the connection ends."""
    j = Joined(live)
    part = j.playlist.parts[-1].uri
    with j.connect() as sock:
        burst = [
            j.request(part),
            j.request(part, If_None_Match='"x"'),
            j.request("live.m3u8"),
            j.request(part),
        ]
        sock.sendall(b"".join(burst * 5))
        answers = read_answers(sock, 20)
        assert [r.status_code for r, _ in answers] == [200] * 20
        kinds = [headers_of(r)[b"content-type"] for r, _ in answers]
        assert kinds == [b"audio/mp4", b"audio/mp4", b"application/vnd.apple.mpegurl", b"audio/mp4"] * 5
        time.sleep(3)
        sock.sendall(j.request(part))  # still open after 3 s; this answer restarts the wait
        assert read_answers(sock, 1)[0][0].status_code == 200
        idle = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server once idle long enough
        assert 4.5 < time.monotonic() - idle < 8
    for request in (j.request(part, version="1.0"), j.request(part, Connection="close")):
        with j.connect() as sock:
            sock.sendall(request)
            [(response, body)] = read_answers(sock, 1)
            assert response.status_code == 200 and body
            assert headers_of(response)[b"connection"] == b"close"
            assert sock.recv(1) == b""  # closed by the server


def test_held_reloads_are_woken_together_in_order_with_what_follows(live: Cast) -> None:
    """Connections holding a blocking reload for the next part are all answered with the same
    playlist once it exists; one closed mid-hold costs nothing; a request pipelined behind a
    held one is answered after it."""
    j = Joined(live)
    msn, part = j.next_blocking()
    msn += 1  # a whole segment away: every connection is surely held before it comes
    target = f"live.m3u8?_HLS_msn={msn}&_HLS_part={part}"
    socks = [j.connect() for _ in range(40)]
    try:
        for s in socks:
            s.sendall(j.request(target))
        socks[0].close()  # gone mid-hold
        behind = j.connect()
        socks.append(behind)
        behind.sendall(j.request(target) + j.request("init.mp4"))
        started = time.monotonic()
        bodies = set()
        for s in socks[1:-1]:
            [(response, body)] = read_answers(s, 1)
            assert response.status_code == 200
            assert headers_of(response)[b"cache-control"].startswith(b"public, max-age=")
            bodies.add(body)
        assert len(bodies) <= 2  # the same bytes (unless a second part landed meanwhile)
        assert time.monotonic() - started < 10
        (first, pl), (second, init) = read_answers(behind, 2)
        assert first.status_code == second.status_code == 200
        assert pl.startswith(b"#EXTM3U") and init[4:8] == b"ftyp"
        got = parse_media_playlist(pl.decode())
        assert any(p.uri == f"seg{msn}.{part}.m4s" for p in got.parts)
    finally:
        for s in socks:
            s.close()
    # The server is well: a fresh request is answered at once.
    assert j.http.get(j.base + "live.m3u8").status_code == 200
    # Its own delivery time for woken reloads is measured.
    metrics = httpx.get(f"{live.server.url}/metrics").text
    woken = next(
        line for line in metrics.splitlines() if line.startswith("townhall_hls_held_wake_seconds_count")
    )
    assert float(woken.split()[-1]) >= 39


def test_a_held_reload_past_its_point_of_no_return_is_a_503(live: Cast) -> None:
    """Held in the protocol: the space ends, so the part never comes: the one error model."""
    j = Joined(live)
    msn, _ = j.next_blocking()
    with j.connect() as sock:
        # As far ahead as allowed: two segments away, so it cannot come in the time it takes.
        sock.sendall(j.request(f"live.m3u8?_HLS_msn={msn + 2}&_HLS_part=0"))
        time.sleep(0.2)
        assert live.host.post(live.path("/end")).status_code == 200
        [(response, body)] = read_answers(sock, 1)
        assert response.status_code == 503
        assert b'"not_yet_available"' in body and headers_of(response)[b"content-type"] == b"application/json"


def test_a_client_that_does_not_read_gets_everything_in_order(live: Cast) -> None:
    """Thousands of pipelined segment requests (megabytes of answers) from a client that reads
    nothing for a while: the server's writes pause (flow control), the rest wait their turn,
    and every answer arrives whole and in order once the client reads."""
    j = Joined(live)
    segment = str(next(s.uri for s in j.playlist.segments if s.complete))
    n = 4000
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect(j.address)
    with sock:
        sender = threading.Thread(target=lambda: sock.sendall(j.request(segment) * n))
        sender.start()
        time.sleep(1.0)  # the server fills its buffers and the socket's
        connections = list(live.server.server.server_state.connections)
        assert any(c.flow.write_paused for c in connections)  # flow control engaged
        answers = read_answers(sock, n)
        sender.join()
        assert len(answers) == n
        sizes = {len(body) for _, body in answers}
        assert [r.status_code for r, _ in answers] == [200] * n and len(sizes) == 1 and sizes.pop() > 500


def test_counts_flushed_in_bulk_equal_observe() -> None:
    """What the protocol tallies and flushes into a histogram child at once is exactly what
    ``observe`` would have made of the same values (bucket edges included)."""
    buckets = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
    one, other = CollectorRegistry(), CollectorRegistry()
    observed = Histogram("h", "h", ["route"], registry=one, buckets=buckets).labels("r")
    tally = _Tally(Histogram("h", "h", ["route"], registry=other, buckets=buckets).labels("r"))
    values = [*buckets, 0.0, 20.0, *(i / 997 for i in range(3000))]
    for value in values:
        observed.observe(value)
        tally.add(value)
    tally.flush()
    tally.flush()  # nothing left: a second flush adds nothing

    def samples(registry: CollectorRegistry) -> list[str]:
        return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]

    assert samples(one) == samples(other)


def test_a_request_behind_an_answer_in_the_same_read_is_not_closed_as_idle(live: Cast) -> None:
    """A hot answer and, in the same packet, a request whose body comes later: the keep-alive
    check must not take the connection for idle while that request is under way."""
    j = Joined(live)
    part = j.playlist.parts[-1].uri
    with j.connect() as sock:
        sock.sendall(j.request(part) + b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        time.sleep(6)  # past uvicorn's 5 s keep-alive
        sock.sendall(b"hello")
        answers = read_answers(sock, 2)
    assert [response.status_code for response, _ in answers] == [200, 405]


def test_a_reload_held_at_shutdown_is_answered_then_closed(live: Cast) -> None:
    """As uvicorn finishes a request in flight when it stops: the held reload gets its
    playlist (within the graceful-shutdown time), marked ``connection: close``."""
    j = Joined(live)
    msn, part = j.next_blocking()
    with j.connect() as sock:
        # A part one segment (~2 s) ahead: still held when the server is told to stop.
        sock.sendall(j.request(f"live.m3u8?_HLS_msn={msn + 1}&_HLS_part={part}"))
        time.sleep(0.1)
        live.server.server.should_exit = True
        [(response, body)] = read_answers(sock, 1)
        assert response.status_code == 200 and body.startswith(b"#EXTM3U")
        assert headers_of(response)[b"connection"] == b"close"
        sock.settimeout(5)
        assert sock.recv(1) == b""  # then closed
