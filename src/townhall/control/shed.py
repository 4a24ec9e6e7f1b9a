"""The shedding middleware: the outermost layer, so a shed request costs neither a body read
nor a database call (``admission.shedding`` is the controller and says why)."""

from __future__ import annotations

import asyncio
import random
import time

from starlette.types import ASGIApp, Receive, Scope, Send

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
