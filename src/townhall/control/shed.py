"""The shedding middleware: the outermost layer, so a shed request costs neither a body read
nor a database call (``admission.shedding`` is the controller and says why)."""

from __future__ import annotations

import asyncio
import random
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from townhall.admission.gate import Admission
from townhall.admission.shedding import Priority, classify


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
        if not self.admission.shedder.decide(priority, now - start, now):
            await self.app(scope, receive, send)
            return
        self.admission.rejected(attack=False)  # overload, not abuse (``admission.gate``)
        body = b'{"error":{"code":"overloaded","message":"the node is overloaded; retry later"}}'
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    # jitter, not a secret
                    (b"retry-after", str(random.randint(1, 5)).encode()),  # noqa: S311
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


async def _vouched(receive: Receive) -> tuple[Priority, Receive]:
    """An anonymous join that carries a queue token (a waiter coming back for its place) or a
    solved proof of work is not a new join that has shown nothing: it is shed with the joins of
    accounts. Only the body's first message is looked at, for the field's name (no parsing: a
    join's body is a few hundred bytes, already read with its headers); the claim itself is
    checked by the join (a forged one costs one HMAC and counts towards attack mode). The
    message is handed on to the app unchanged."""
    first = await receive()
    body = first.get("body", b"") if first["type"] == "http.request" else b""
    vouched = b'"queue_token"' in body or b'"pow_nonce"' in body
    given = False

    async def replay() -> Message:
        nonlocal given
        if not given:
            given = True
            return first
        return await receive()

    return (Priority.JOIN if vouched else Priority.ANONYMOUS_JOIN), replay
