"""The edge's ticket verifier: a tiny ASGI app that nginx's ``auth_request`` asks, on the edge
machine itself, whether a listener ticket opens a space (deploy/nginx/ticket.md).

It holds the fleet's key set and nothing else: the same ``TicketBook.check`` as the origin (one
HMAC, constant-time compare, expiry and space binding), no database, no call to any node. nginx
sends the space id and the ticket in two headers and caches the answer per (space, ticket) for
as long as the answer's ``Cache-Control`` says: at most ``MAX_CACHE`` seconds and never past the
ticket's expiry, so a listener costs the verifier one request per ``MAX_CACHE`` seconds rather
than one per part.

Run it next to nginx with the fleet's ``signing_keys`` (``TOWNHALL_SIGNING_KEYS`` or a config
file), for example::

    uvicorn --factory townhall.admission.edge_verifier:from_environment \\
        --host 127.0.0.1 --port 9100 --no-access-log
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping

from starlette.types import ASGIApp, Receive, Scope, Send

from townhall.admission.tickets import PURPOSE, TicketBook, TicketError
from townhall.config import Config
from townhall.security.signing import Signer, load_or_create_key_set

MAX_CACHE = 10
_SPACE = re.compile(r"[A-Za-z0-9]{1,16}")


def create_verifier(keys: Mapping[str, bytes], clock: Callable[[], float] = time.time) -> ASGIApp:
    """``GET`` anything with ``X-Townhall-Space`` and ``X-Townhall-Ticket``: 200 when the ticket
    opens the space, else 403 with the reason in ``X-Ticket-Error`` (``ticket_required``,
    ``invalid_ticket``, ``wrong_space``, ``ticket_expired``)."""
    book = TicketBook(Signer(keys, PURPOSE), ttl=0)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        space = token = b""
        for name, value in scope["headers"]:
            if name == b"x-townhall-space":
                space = value
            elif name == b"x-townhall-ticket":
                token = value
        now = clock()
        status, headers = 200, [(b"content-length", b"0")]
        try:
            space_id = space.decode("ascii")
            if not _SPACE.fullmatch(space_id):
                raise TicketError("no space in the path", "invalid_path")
            if not token:
                raise TicketError("a listener ticket is required", "ticket_required")
            ticket = book.check(token.decode("ascii"), space_id, now)
            life = max(0, min(MAX_CACHE, math.floor(ticket.expires_at - now)))
            headers.append((b"cache-control", b"max-age=%d" % life if life else b"no-store"))
        except UnicodeDecodeError:
            status = 403
            headers += [(b"x-ticket-error", b"invalid_ticket"), (b"cache-control", b"max-age=1")]
        except TicketError as exc:
            status = 403
            headers += [(b"x-ticket-error", exc.code.encode()), (b"cache-control", b"max-age=1")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    return app


def from_environment() -> ASGIApp:
    """The verifier with the key set of ``Config.load()`` (``TOWNHALL_CONFIG``,
    ``TOWNHALL_SIGNING_KEYS``, or the embedded node's ``DATA/signing.key``)."""
    config = Config.load()
    return create_verifier(load_or_create_key_set(config.signing_keys, config.data))
