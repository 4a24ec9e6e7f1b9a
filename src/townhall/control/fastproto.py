"""Listener requests answered in the HTTP protocol itself, below ASGI.

Written against uvicorn 0.54's httptools protocol (pinned in ``constraints.txt``): it subclasses
``HttpToolsProtocol`` and relies on its parser callbacks and attributes (``url``, ``headers``,
``cycle``, ``pipeline``, ``flow``, ``server_state``, ``on_response_complete``). Check this module
against uvicorn's source when the pin moves.

Theory of operation. A listener's requests are nearly all the same few kinds: a part, a segment,
the init segment or the live playlist, with a good ticket, the object in memory, nothing
conditional. Through ASGI each costs a scope, a task, receive/send coroutines and a middleware
stack: more than the answer (BENCHMARKS.md, "Audience"). So, once httptools has parsed a
request's URL and headers, ``ListenerProtocol`` asks ``hls.hot_request`` (the one place that
knows the rules: the ticket check, the name patterns, the blocking-request bounds) whether this is
such a request:

- an ``Answer``: its bytes were built once per object (``hls``); the status line and the server's
  ``date`` line go in front, and the whole response is written to the transport at once (for the
  common GET on a kept-alive connection, the same bytes object for every listener in the same
  second). No scope, no task, no coroutine.
- a ``Hold`` (a blocking reload for a part still to come): the connection is parked in the
  stream's list for that point (``SpaceStream.hold``: one list and one timer per point, no
  per-request task or timer); when the playlist gets the point, the answer is built once and
  written to every waiting connection; past the bound, the route's 503.
- a join or a ticket renewal (``POST /api/v1/spaces/{id}/join`` or ``.../tickets/renew``) whose
  admission needs no I/O (``Admission.in_memory``: memory limits and waiting room, the space's
  snapshot fresh, the bearer token's session remembered), with a declared body within the
  limit and no trusted proxies to read ``X-Forwarded-For`` through: its body is collected, the
  shedder decides as the shedding middleware would (the same ``control.shed`` functions, the
  queueing delay from a ``LoopDelay`` probe), and ``routes.admission.answer`` (the one
  implementation the ASGI route runs too) is driven to its end inside the callback: it does
  not suspend, so no task is made. Should it suspend after all (a snapshot expiring in
  between), the same coroutine goes on as a task and its answer is written when it ends.
- anything else: the request goes to the ASGI app exactly as uvicorn would send it, so every
  error and rare case keeps its one implementation in the routes.

Connection rules kept: only a connection with nothing in flight is answered here (a request that
arrives behind one in flight, pipelined, is queued for the ASGI app in order, as uvicorn does);
keep-alive follows uvicorn (HTTP/1.0 or ``Connection: close`` → ``connection: close`` and the
connection closed after the answer); a connection whose writes are paused (flow control) is not
answered here, so the ASGI path's drain applies; a connection closed mid-hold is skipped when
its list wakes. Requests answered here are counted in the app's metrics middleware under the
same route templates and statuses.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import logging
import time
from collections.abc import Coroutine, Generator
from typing import Any, ClassVar, Protocol

from prometheus_client import Histogram
from starlette.requests import cookie_parser
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from townhall.admission.shedding import Priority, classify
from townhall.audience.origin import SpaceStream
from townhall.control.app import MetricsMiddleware
from townhall.control.node import Node
from townhall.control.routes import hls
from townhall.control.routes.admission import FAST_PATH, TEMPLATES, JoinCall, Reply, answer
from townhall.control.routes.hls import TICKET_COOKIE
from townhall.control.shed import SHED_BODY, LoopDelay, shed, shed_headers, vouches

logger = logging.getLogger(__name__)


class _InFlight:
    """Stands for a held request where uvicorn looks for the cycle in flight, so that a request
    pipelined behind it is queued (``HttpToolsProtocol.on_headers_complete``)."""

    response_complete = False


_IN_FLIGHT: Any = _InFlight()


class _Route(Protocol):
    path: str


class _Sendable(Protocol):
    """What ``ListenerProtocol._send`` writes: an ``hls.Answer`` or a ``_Written`` reply."""

    @property
    def status(self) -> int: ...
    @property
    def route(self) -> _Route | None: ...
    @property
    def lines(self) -> bytes: ...
    @property
    def body(self) -> bytes: ...


class _Written:
    """A join's ``Reply`` as ``_send`` writes it (``route`` None: not counted, as a shed
    request is not in the ASGI path either)."""

    __slots__ = ("body", "lines", "route", "status")

    def __init__(self, reply: Reply, route: _Route | None) -> None:
        self.status = reply.status
        self.route = route
        self.lines = b"".join(name + b": " + value + b"\r\n" for name, value in reply.headers)
        self.body = reply.body


_INTERNAL = Reply(
    500,
    [(b"content-length", b"67"), (b"content-type", b"application/json")],
    b'{"error":{"code":"internal","message":"internal error; it has been logged"}}',
)
_INTERNAL.headers[0] = (b"content-length", str(len(_INTERNAL.body)).encode())


class _Resumed:
    """A coroutine that suspended after it was started by hand, as an awaitable a task can run
    on from where it stopped (its first wait handed back as it was)."""

    def __init__(self, coro: Coroutine[Any, Any, Reply], first: Any) -> None:
        self.coro = coro
        self.first = first

    def __await__(self) -> Generator[Any, Any, Reply]:
        coro, value = self.coro, self.first
        while True:
            try:
                sent = yield value
            except BaseException as exc:  # a cancellation: into the coroutine, as a task would
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]


class _Tally:
    """Observations of one histogram child, summed until flushed into it. Uses the child's
    private ``_upper_bounds``, ``_buckets`` and ``_sum`` (prometheus_client 0.26, pinned in
    ``constraints.txt``), which ``Histogram.observe`` itself updates; without them, each
    observation goes through ``observe`` at the flush."""

    __slots__ = ("amounts", "bounds", "child", "counts", "total")

    def __init__(self, child: Any) -> None:
        self.child = child
        bulk = all(hasattr(child, name) for name in ("_upper_bounds", "_buckets", "_sum"))
        self.bounds: list[float] | None = list(child._upper_bounds) if bulk else None
        self.counts = [0] * len(self.bounds or ())
        self.total = 0.0
        self.amounts: list[float] = []

    def add(self, amount: float) -> None:
        if self.bounds is None:
            self.amounts.append(amount)
            return
        # The bucket observe() picks: the first upper bound >= amount.
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1
        self.total += amount

    def flush(self) -> None:
        for amount in self.amounts:
            self.child.observe(amount)
        self.amounts.clear()
        if self.total or any(self.counts):
            self.child._sum.inc(self.total)
            for i, count in enumerate(self.counts):
                if count:
                    self.child._buckets[i].inc(count)
                    self.counts[i] = 0
            self.total = 0.0


class _Metrics:
    """The app's request counter and latency histogram (``MetricsMiddleware``) and the wake
    histogram, for the requests answered here. Counted in plain Python and flushed into them
    once per turn of the event loop (``call_soon``): a prometheus update costs 1-2.5 µs, more
    than a tenth of an answer here, and a part's arrival answers thousands at once."""

    def __init__(self, layer: MetricsMiddleware | None, wake: Histogram | None) -> None:
        self.layer = layer
        self.counts: dict[tuple[str, str, int], int] = {}
        self.counters: dict[tuple[str, str, int], Any] = {}
        self.latency: dict[str, _Tally] = {}
        self.wake = _Tally(wake) if wake is not None else None
        self.flush_pending = False

    def count(self, method: str, answer: _Sendable, seconds: float) -> None:
        if self.layer is None or answer.route is None:
            return
        route = answer.route.path
        key = (method, route, answer.status)
        self.counts[key] = self.counts.get(key, 0) + 1
        tally = self.latency.get(route)
        if tally is None:
            tally = self.latency[route] = _Tally(self.layer.latency.labels(route))
        tally.add(seconds)
        self._soon()

    def woke(self, seconds: float) -> None:
        if self.wake is not None:
            self.wake.add(seconds)
            self._soon()

    def _soon(self) -> None:
        if not self.flush_pending:
            self.flush_pending = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flush_pending = False
        for key, n in self.counts.items():
            counter = self.counters.get(key)
            if counter is None and self.layer is not None:
                counter = self.counters[key] = self.layer.requests.labels(key[0], key[1], str(key[2]))
            if counter is not None:
                counter.inc(n)
        self.counts.clear()
        for tally in self.latency.values():
            tally.flush()
        if self.wake is not None:
            self.wake.flush()


def _metrics_layer(app: ASGIApp) -> MetricsMiddleware | None:
    """The app's metrics middleware, found in its built middleware stack (Starlette builds it
    at startup, before the first request)."""
    layer: object = getattr(app, "middleware_stack", None)
    while layer is not None:
        if isinstance(layer, MetricsMiddleware):
            return layer
        layer = getattr(layer, "app", None)
    return None


class ListenerProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, answering hot listener requests itself (module docstring).
    Made per app by ``listener_protocol``."""

    # Slots, not the instance dict: uvicorn's protocol already has 28 attributes, and past 30 a
    # dict no longer shares its keys with the class's other instances (~1.4 KiB more for every
    # connection, measured with 10,000 held).
    __slots__ = (
        "_closing_after_join",
        "_date_lines",
        "_held",
        "_hot",
        "_idle_since",
        "_idle_timer",
        "_join",
        "_join_body",
        "_joining",
        "_wire_date",
    )

    node: ClassVar[Node]
    asgi_app: ClassVar[ASGIApp]
    loop_delay: ClassVar[LoopDelay]
    _metrics: ClassVar[_Metrics | None] = None
    # Joins and renewals answered here (shed ones included), for tests and inspection.
    joins_here: ClassVar[int] = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._hot = False  # the request being parsed is answered (or held) here
        self._wire_date: object = None  # the date headers the cached line was built from
        self._date_lines = b""
        # The blocking reload held on this connection: its space, method, keep-alive and start.
        self._held: tuple[str, str, bool, float] | None = None
        # Keep-alive after an answer given here: one timer that checks when the connection
        # last went idle, not a timer armed and cancelled per request (uvicorn's way).
        self._idle_since: float | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        # The join being read here: its call, keep-alive, start; its body so far; and the task
        # of one that suspended (``_Resumed``), in flight.
        self._join: tuple[JoinCall, bool, float] | None = None
        self._join_body: list[bytes] = []
        self._joining: asyncio.Future[Reply] | None = None
        self._closing_after_join = False

    @classmethod
    def metrics(cls) -> _Metrics:
        if cls._metrics is not None:
            return cls._metrics
        state = getattr(cls.asgi_app, "state", None)
        found = _Metrics(_metrics_layer(cls.asgi_app), getattr(state, "hls_wake_seconds", None))
        if found.layer is not None:  # else the app's stack is not built yet: look again next time
            cls._metrics = found
        return found

    # -- parser callbacks ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._idle_since = None
        super().data_received(data)

    def on_message_begin(self) -> None:
        # A request has begun: the connection is busy, not idle, even when it came in the same
        # read as an answer given here (else the idle check could close it mid-request).
        self._idle_since = None
        # The scope is built only for a request that goes to the ASGI app (``_to_asgi``).
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self._hot = False
        self._join = None

    def on_headers_complete(self) -> None:
        if not self._answer_here() and not self._join_here():
            self._to_asgi()

    def on_body(self, body: bytes) -> None:
        if self._join is not None:
            self._join_body.append(body)
        elif not self._hot:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._join is not None:
            self._run_join()
        elif not self._hot:
            super().on_message_complete()

    # -- the ASGI way ----------------------------------------------------------------------------

    def _to_asgi(self) -> None:
        url, headers, expect = self.url, self.headers, self.expect_100_continue
        super().on_message_begin()  # uvicorn's scope for this request
        self.url, self.headers, self.expect_100_continue = url, headers, expect
        self.scope["headers"] = headers
        if self._held is None and self._joining is None:
            super().on_headers_complete()
            return
        previous, self.cycle = self.cycle, _IN_FLIGHT
        super().on_headers_complete()  # queued behind the held request
        if self.cycle is _IN_FLIGHT:
            self.cycle = previous

    # -- the hot way -----------------------------------------------------------------------------

    def _answer_here(self) -> bool:
        url = self.url
        if not url.startswith(b"/hls/") or self._held is not None or self.pipeline:
            return False
        if self._joining is not None:  # a join before it is still being answered: in order
            return False
        cycle = self.cycle
        if (cycle is not None and not cycle.response_complete) or self.flow.write_paused:
            return False
        if self.limit_concurrency is not None or self.parser.should_upgrade():
            return False
        path, _, query = url.partition(b"?")
        if b"%" in path or b"#" in query:
            return False
        start = time.perf_counter()
        method = self.parser.get_method().decode("ascii")
        found = hls.hot_request(self.node, method, path.decode("ascii", "replace"), query, self.headers)
        if found is None:
            return False
        self._hot = True
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        if isinstance(found, hls.Hold):
            self._held = (found.space_id, method, keep_alive, start)
            found.stream.hold(found.msn, found.part, self, found.within)
        else:
            self._send(method, keep_alive, start, found)
        return True

    # -- a join or a renewal -----------------------------------------------------------------------

    def _join_here(self) -> bool:
        """Whether this request is a join or renewal to answer here (module docstring); if so,
        its body is collected and ``_run_join`` answers it once complete."""
        url = self.url
        if not url.startswith(b"/api/v1/spaces/") or self._held is not None or self._joining is not None:
            return False
        cycle = self.cycle
        if self.pipeline or (cycle is not None and not cycle.response_complete) or self.flow.write_paused:
            return False
        if self.limit_concurrency is not None or self.parser.should_upgrade() or self.root_path:
            return False
        if self.parser.get_method() != b"POST":
            return False
        m = FAST_PATH.fullmatch(url.decode("ascii", "replace"))  # a query or an escape: ASGI's
        node = self.node
        if m is None or node.config.trusted_proxies or self.client is None:
            return False
        length = host = authorization = cookie = None
        for name, value in self.headers:
            if name == b"content-length" and length is None:
                length = value
            elif name == b"host" and host is None:
                host = value
            elif name == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
            elif name == b"cookie" and cookie is None:
                cookie = value.decode("latin-1")
            elif name in (b"transfer-encoding", b"expect"):
                return False
        if length is None or not length.isdigit() or int(length) > node.config.max_body_bytes:
            return False  # the body-limit middleware's 413, or a body of unknown length
        base = node.config.public_url.rstrip("/")
        if not base:
            if not host:
                return False
            base = f"{self.scheme}://{host.decode('latin-1')}"
        space_id, what = m.group(1), m.group(2)
        if not node.admission.in_memory(space_id, authorization):
            return False
        ticket = cookie_parser(cookie).get(TICKET_COOKIE) if cookie and what != "join" else None
        call = JoinCall(space_id, what, self.client[0], authorization, ticket, base)
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        self._join = (call, keep_alive, time.perf_counter())
        self._join_body = []
        return True

    def _run_join(self) -> None:
        join, self._join = self._join, None
        assert join is not None
        call, keep_alive, start = join
        type(self).joins_here += 1
        body = b"".join(self._join_body)
        self._join_body = []
        node = self.node
        # The shedding middleware's decision, on the same class and the same controller.
        priority = classify(
            "POST", f"/api/v1/spaces/{call.space_id}/{call.what}", call.authorization is not None
        )
        if priority is Priority.ANONYMOUS_JOIN and vouches(body):
            priority = Priority.JOIN
        now = time.perf_counter()
        if shed(node.admission, priority, self.loop_delay.delay(self.loop, now), now):
            self._send("POST", keep_alive, start, _Written(Reply(503, shed_headers(), SHED_BODY), None))
            return
        coro = answer(node, call, body)
        try:
            first = coro.send(None)
        except StopIteration as done:
            reply: Reply = done.value
        except Exception:
            logger.exception("join failed", extra={"space_id": call.space_id})
            reply = _INTERNAL
        else:  # it waits for I/O after all: the same coroutine goes on as a task
            joining = self._joining = asyncio.ensure_future(_Resumed(coro, first))
            joining.add_done_callback(functools.partial(self._joined, call, keep_alive, start))
            return
        self._send("POST", keep_alive, start, _Written(reply, TEMPLATES[call.what]))

    def _joined(self, call: JoinCall, keep_alive: bool, start: float, joining: asyncio.Future[Reply]) -> None:
        self._joining = None
        if self.transport.is_closing():
            return
        exc = None if joining.cancelled() else joining.exception()
        if exc is not None:
            logger.error("join failed", exc_info=exc, extra={"space_id": call.space_id})
        # A cancelled join (the server shutting down) still gets an answer, not silence.
        reply = _INTERNAL if exc is not None or joining.cancelled() else joining.result()
        if self._closing_after_join:
            keep_alive = False
        self._send("POST", keep_alive, start, _Written(reply, TEMPLATES[call.what]))

    def _send(self, method: str, keep_alive: bool, start: float, answer: _Sendable) -> None:
        dates = self.server_state.default_headers
        if dates is not self._wire_date:
            self._wire_date = dates
            self._date_lines = b"".join(name + b": " + value + b"\r\n" for name, value in dates)
        body = b"" if method == "HEAD" else answer.body
        ending = b"\r\n" if keep_alive else b"connection: close\r\n\r\n"
        self.transport.write(
            b"".join((STATUS_LINE[answer.status], self._date_lines, answer.lines, ending, body))
        )
        self.metrics().count(method, answer, time.perf_counter() - start)
        if not keep_alive:
            self.transport.close()
        if self.pipeline or self.transport.is_closing():
            self.on_response_complete()  # uvicorn's: counts it, runs what queued behind
            return
        self.server_state.total_requests += 1
        self._idle_since = self.loop.time()
        if self._idle_timer is None:
            self._idle_timer = self.loop.call_later(self.timeout_keep_alive, self._idle_check)

    def _idle_check(self) -> None:
        """uvicorn's keep-alive rule: a connection idle for ``timeout_keep_alive`` s is closed."""
        self._idle_timer = None
        if self._idle_since is None or self.transport.is_closing():
            return  # busy (a request arrived since); whoever answers it re-arms
        left = self._idle_since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self._idle_timer = self.loop.call_later(left, self._idle_check)
        else:
            self.transport.close()

    # -- a held blocking reload (``SpaceStream.hold``) -------------------------------------------

    def ready(self, stream: SpaceStream) -> None:
        held, self._held = self._held, None
        if held is None or self.transport.is_closing():
            return
        space_id, method, keep_alive, start = held
        answer = hls.playlist_answer(space_id, stream, blocking=True)  # built once for the list
        self._send(method, keep_alive, start, answer if answer is not None else hls.LATE)
        self.metrics().woke(time.perf_counter() - stream.changed_at)

    def expired(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self.transport.is_closing():
            _, method, keep_alive, start = held
            self._send(method, keep_alive, start, hls.LATE)

    # -- connection ------------------------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        self._held = None  # its list skips it when it wakes
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        super().connection_lost(exc)

    def shutdown(self) -> None:
        if self._joining is not None:
            self._closing_after_join = True  # its answer closes the connection
            return
        if self._held is not None:
            # As uvicorn does for a request in flight: let it finish (its answer or the route's
            # 503 at the bound), then close, within the server's graceful-shutdown time.
            space_id, method, _, start = self._held
            self._held = (space_id, method, False, start)
            return
        super().shutdown()


def listener_protocol(node: Node, app: ASGIApp) -> type[ListenerProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` serving ``app`` of ``node``. Adds to
    the app's metrics ``townhall_hls_held_wake_seconds``: from a change of the playlist to the
    answer of each blocking reload it woke, written (the origin's own delivery time)."""
    state = getattr(app, "state", None)
    registry = getattr(state, "metrics_registry", None)
    if state is not None and registry is not None and getattr(state, "hls_wake_seconds", None) is None:
        state.hls_wake_seconds = Histogram(
            "townhall_hls_held_wake_seconds",
            "From the playlist change to each held blocking reload's answer, written",
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
    attributes = {"node": node, "asgi_app": app, "loop_delay": LoopDelay()}
    return type("NodeListenerProtocol", (ListenerProtocol,), attributes)
