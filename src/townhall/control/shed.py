"""The shedding middleware: the outermost layer, so a shed request costs neither a body read
nor a database call (``admission.shedding`` is the controller and says why). The join answered
in the HTTP protocol (``control.fastproto``) sheds through the same functions: ``vouches``,
``shed`` and ``SHED_BODY``/``shed_headers``, with its queueing delay from ``LoopDelay``."""

from __future__ import annotations

import asyncio
import random
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from townhall.admission.gate import Admission
from townhall.admission.shedding import Priority, classify
from townhall.errors import error_body

SHED_BODY = error_body("overloaded", "the node is overloaded; retry later")


def shed_headers() -> list[tuple[bytes, bytes]]:
    """The headers of a shed 503: ``Retry-After`` 1-5 s, spread so the retries do not arrive
    together."""
    return [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(SHED_BODY)).encode()),
        (b"retry-after", str(random.randint(1, 5)).encode()),  # noqa: S311 (jitter, not a secret)
        (b"cache-control", b"no-store"),
    ]


def vouches(body: bytes) -> bool:
    """Whether an anonymous join's body brings a queue token (a waiter coming back for its
    place) or a solved proof of work: then it is shed with the joins of accounts, not as a new
    join that has shown nothing. Only the field's name is looked for (no parsing); the claim
    itself is checked by the join (a forged one costs one HMAC and counts towards attack
    mode)."""
    return b'"queue_token"' in body or b'"pow_nonce"' in body


def shed(admission: Admission, priority: Priority, delay: float, now: float) -> bool:
    """The controller's decision for one request; a shed one is counted as refused (overload,
    not abuse: ``admission.gate``)."""
    if not admission.shedder.decide(priority, delay, now):
        return False
    admission.rejected(attack=False)
    return True


class LoopDelay:
    """The queueing delay of a request answered inside a protocol callback, where it cannot
    wait one turn of the event loop itself (the middleware's measure): a probe is put at the
    end of the loop's ready queue and times its own wait; a request sees the last probe's wait,
    or the wait of the one still queued if that is already longer. One probe at a time: at most
    one extra callback per turn of the loop, however many requests it answers."""

    __slots__ = ("_measured_at", "_queued_at", "last")

    FRESH = 0.1  # a probe's wait speaks for this long (the controller's interval) after it ran

    def __init__(self) -> None:
        self.last = 0.0
        self._measured_at = 0.0
        self._queued_at: float | None = None

    def delay(self, loop: asyncio.AbstractEventLoop, now: float) -> float:
        queued = self._queued_at
        if queued is None:
            self._queued_at = now
            loop.call_soon(self._probe)
            # After a quiet spell the last wait is an old stall's, not this moment's.
            return self.last if now - self._measured_at < self.FRESH else 0.0
        return max(self.last, now - queued)

    def _probe(self) -> None:
        queued, self._queued_at = self._queued_at, None
        if queued is not None:
            self._measured_at = time.perf_counter()
            self.last = self._measured_at - queued


class SheddingMiddleware:
    """Classify each request by method, path and whether it carries credentials; measure its
    queueing delay as the time one more turn of the event loop takes; let the controller
    decide; answer 503 with ``Retry-After`` (1-5 s, spread so that the retries do not arrive
    together) to what it sheds."""

    def __init__(self, app: ASGIApp, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path.startswith("/hls/"):
            # Listeners already in: one HMAC and bytes from memory, never shed, not measured
            # (the audience's fast path stays a single hop).
            await self.app(scope, receive, send)
            return
        authenticated = any(name == b"authorization" for name, _ in scope["headers"])
        priority = classify(scope["method"], path, authenticated)
        if priority is Priority.NEVER:
            await self.app(scope, receive, send)
            return
        if priority is Priority.ANONYMOUS_JOIN and scope["method"] == "POST":
            priority, receive = await _vouched(receive)
        start = time.perf_counter()
        await asyncio.sleep(0)
        now = time.perf_counter()
        if not shed(self.admission, priority, now - start, now):
            await self.app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 503, "headers": shed_headers()})
        await send({"type": "http.response.body", "body": SHED_BODY})


async def _vouched(receive: Receive) -> tuple[Priority, Receive]:
    """The class of an anonymous join by its body (``vouches``). Only the body's first message
    is looked at (a join's body is a few hundred bytes, already read with its headers); it is
    handed on to the app unchanged."""
    first = await receive()
    body = first.get("body", b"") if first["type"] == "http.request" else b""
    vouched = vouches(body)
    given = False

    async def replay() -> Message:
        nonlocal given
        if not given:
            given = True
            return first
        return await receive()

    return (Priority.JOIN if vouched else Priority.ANONYMOUS_JOIN), replay
