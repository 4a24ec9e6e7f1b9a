"""Requests for a space whose stage runs on another node, passed on to that node.

A raw ASGI middleware, active only when placement is shared (Redis). Requests under
``/whip/{id}``, ``/whep/{id}`` and ``/hls/{id}/`` for a space another node owns are sent on to
the owner and its answer passed back (status, body, the headers that matter), so speakers,
listeners and edges can use any node. Speakers are relayed rather than redirected: browsers and
HTTP clients drop ``Authorization`` on a redirect to another origin, and a relayed WHIP answer
carries the owner's own ICE candidates anyway, so the media flows straight to the owner. A POST
to a space nobody owns claims it here, which is how a space re-homes after its node died.
Blocking playlist reloads are held at the owner. Requests for spaces this node serves itself go
straight through, at the cost of a dict lookup.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

import httpx

from townhall.scaleout.placement import LocalPlacement, RedisPlacement

if TYPE_CHECKING:
    from townhall.control.node import Node

logger = logging.getLogger(__name__)

SPACE_PATH = re.compile(r"^/(whip|whep|hls)/([A-Za-z0-9]{1,16})(/[^?]*)?$")
PASSED_ON = (
    "cache-control",
    "etag",
    "content-type",
    "content-range",
    "accept-ranges",
    "retry-after",
    "last-modified",
    "location",
    "set-cookie",
    "access-control-allow-origin",
    "access-control-expose-headers",
)
FORWARDED = ("cookie", "range", "if-none-match", "authorization", "content-type", "accept")

Scope = dict[str, Any]


class PlacementRelay:
    def __init__(self, app: Any, node: Node) -> None:
        self.app = app
        self.node = node

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        placement = self.node.placement
        if scope["type"] != "http" or isinstance(placement, LocalPlacement):
            await self.app(scope, receive, send)
            return
        m = SPACE_PATH.match(scope["path"])
        if m is None:
            await self.app(scope, receive, send)
            return
        kind, space_id, rest = m.group(1), m.group(2), m.group(3) or ""
        if kind == "hls":
            stream = self.node.origin.streams.get(space_id)
            if stream is not None and not stream.ended:
                await self.app(scope, receive, send)  # ours
                return
            owner = await placement.owner(space_id)
        elif scope["method"] == "POST" and not rest:
            owner = await placement.claim(space_id)  # a speaker arriving claims a free space
        elif self.node.stage.sessions.get(rest.strip("/")) is not None:
            owner = placement.me  # a session of ours (DELETE, PATCH)
        else:
            owner = await placement.owner(space_id)
        if owner is None or owner == placement.me:
            await self.app(scope, receive, send)
            return
        query = scope.get("query_string", b"").decode("latin-1")
        target = owner + scope["path"] + (f"?{query}" if query else "")
        if isinstance(placement, RedisPlacement):
            body = await _read_body(receive) if scope["method"] in ("POST", "PATCH") else b""
            await _relay(placement.http(), scope, send, target, body)


async def _read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _relay(http: httpx.AsyncClient, scope: Scope, send: Any, target: str, body: bytes) -> None:
    headers = {
        k.decode("latin-1"): v.decode("latin-1")
        for k, v in scope["headers"]
        if k.decode("latin-1").lower() in FORWARDED
    }
    try:
        r = await http.request(scope["method"], target, headers=headers, content=body or None)
    except httpx.HTTPError as exc:
        logger.warning("relay to the space's node failed: %s", exc, extra={"target": target})
        refusal = (
            b'{"error":{"code":"owner_unreachable","message":"the node serving this space did not answer"}}'
        )
        await _respond(send, 503, [(b"content-type", b"application/json"), (b"retry-after", b"1")], refusal)
        return
    out = [(k.encode(), v.encode()) for k, v in r.headers.multi_items() if k.lower() in PASSED_ON]
    await _respond(send, r.status_code, out, r.content)


async def _respond(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    headers = [h for h in headers if h[0] != b"content-length"] + [
        (b"content-length", str(len(body)).encode())
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
