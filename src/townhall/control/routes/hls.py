"""The LL-HLS origin: ``/hls/{space_id}/`` playlists, init segment, segments and parts.

Every object is the same bytes for every listener. Media objects are immutable (long
``max-age``, ``immutable``, strong ``ETag``, ``HEAD`` and single ``Range`` support). The live
playlist is served fresh, and blocking reloads (``_HLS_msn``/``_HLS_part``, RFC 8216bis
§6.2.5.2) are cacheable by their query, since the answer to one is the same for everybody.
A listener ticket travels as the ``ticket`` query parameter or the ``townhall_ticket`` cookie
and is checked on every request, without a database call. Names are matched by pattern and
served from memory: no request reaches the filesystem.

Tickets and caching: the playlist's URIs are relative and carry no ticket, so its bytes are
the same for every listener. The ticket reaches the media requests as a cookie scoped to
``/hls/{space_id}/``, set by the join response and by a playlist request that carries a valid
``?ticket=`` the client's cookie does not already hold (hls.js, Safari and ffmpeg all keep
it). Only such a response carries ``Set-Cookie``, and it is marked ``private`` so that no
shared cache stores it; every other response is public. An edge in front keys its cache on
the path and ``_HLS_msn``/``_HLS_part`` only and checks the ticket itself (docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
import re
import weakref
from collections.abc import Callable, Iterable
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from townhall.admission.tickets import Ticket, TicketBook, TicketError
from townhall.audience.origin import SpaceStream
from townhall.audience.playlist import BlockingRequestError, check_blocking_request, has_part
from townhall.control.deps import NodeDep
from townhall.control.node import Node
from townhall.errors import (
    ApiError,
    BadRequest,
    Forbidden,
    NotFound,
    NotYetAvailable,
    RangeNotSatisfiable,
    error_body,
)

router = APIRouter(tags=["listeners"])

SpaceId = Annotated[str, Path(min_length=1, max_length=16, pattern="^[A-Za-z0-9]+$")]
MEDIA = re.compile(r"seg(\d{1,9})(?:\.(\d{1,3}))?\.m4s")
IMMUTABLE = "public, max-age=31536000, immutable"
PLAYLIST_TYPE = "application/vnd.apple.mpegurl"
MP4_TYPE = "audio/mp4"


TICKET_COOKIE = "townhall_ticket"


def _check_ticket(node: Node, request: Request, space_id: str) -> tuple[str, Ticket]:
    """The request's ticket (query first, then cookie) and what it says; 403 if none is good."""
    token = request.query_params.get("ticket") or request.cookies.get(TICKET_COOKIE)
    if not token:
        raise Forbidden(
            "a listener ticket is required: POST /api/v1/spaces/{id}/join", code="ticket_required"
        )
    try:
        return token, node.tickets.check(token, space_id, node.clock())
    except TicketError as exc:
        raise Forbidden(str(exc), code=exc.code) from exc


def ticket_cookie(node: Node, token: str, ticket: Ticket) -> tuple[bytes, bytes]:
    """The ``townhall_ticket`` cookie of ``/hls/{space_id}/`` (a path of its own per space, so a
    listener of several spaces keeps one ticket for each), living as long as the ticket, as one
    ``set-cookie`` header (what Starlette's ``set_cookie`` writes; the token is base64url and
    dots: nothing to quote). The join answers carry it too, whichever way they are answered."""
    max_age = max(1, int(ticket.expires_at - node.clock()))
    secure = "; Secure" if node.config.effective_public_url.startswith("https:") else ""
    path = f"/hls/{ticket.space_id}/"
    value = f"{TICKET_COOKIE}={token}; HttpOnly; Max-Age={max_age}; Path={path}; SameSite=lax{secure}"
    return (b"set-cookie", value.encode("latin-1"))


def set_ticket_cookie(response: Response, node: Node, token: str, ticket: Ticket) -> None:
    """Hand the ticket over as its cookie (``ticket_cookie``). The response becomes
    ``private``: a shared cache must not store it."""
    response.raw_headers.append(ticket_cookie(node, token, ticket))
    cache = response.headers.get("cache-control", "no-cache")
    response.headers["Cache-Control"] = "private, " + cache.removeprefix("public, ")


def _stream(node: Node, space_id: str) -> SpaceStream:
    stream = node.origin.streams.get(space_id)
    if stream is None:
        raise NotFound("this space has no live audio on this node", code="no_stream")
    return stream


def _media(request: Request, data: bytes, etag: str, media_type: str) -> Response:
    headers = {"Cache-Control": IMMUTABLE, "ETag": etag, "Accept-Ranges": "bytes"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    spec = request.headers.get("range")
    if spec:
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", spec.strip())
        if not m or (not m.group(1) and not m.group(2)):
            raise RangeNotSatisfiable("only a single bytes=start-end range is supported")
        size = len(data)
        if m.group(1):
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        else:
            start, end = max(0, size - int(m.group(2))), size - 1
        if start > end or start >= size:
            raise RangeNotSatisfiable(f"the object is {size} bytes")
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        return Response(data[start : end + 1], status_code=206, media_type=media_type, headers=headers)
    return Response(data, media_type=media_type, headers=headers)


@router.get("/hls/{space_id}/live.m3u8", response_class=Response)
@router.head("/hls/{space_id}/live.m3u8", include_in_schema=False)
async def live_playlist(
    space_id: SpaceId,
    request: Request,
    node: NodeDep,
    hls_msn: Annotated[int | None, Query(alias="_HLS_msn", ge=0, le=10**9)] = None,
    hls_part: Annotated[int | None, Query(alias="_HLS_part", ge=0, le=999)] = None,
    ticket: Annotated[str | None, Query(max_length=1024)] = None,
) -> Response:
    """The live LL-HLS media playlist, with blocking reload."""
    del ticket  # read by _check_ticket (declared here for the API description)
    token, admitted = _check_ticket(node, request, space_id)
    stream = _stream(node, space_id)
    blocking = hls_msn is not None
    if hls_part is not None and hls_msn is None:
        raise BadRequest("_HLS_part needs _HLS_msn", code="bad_blocking_request")
    if blocking:
        assert hls_msn is not None
        try:
            check_blocking_request(stream.segments, hls_msn, hls_part, stream.segment_parts)
        except BlockingRequestError as exc:
            raise BadRequest(str(exc), code="bad_blocking_request") from exc
        # The spec's bound: answer within three target durations.
        if not await stream.wait_for(hls_msn, hls_part, 3 * stream.spec.target_duration):
            raise NotYetAvailable("the requested part did not appear in time")
    text = stream.playlist()
    if text is None:
        raise NotYetAvailable("the stream has not produced its first part yet")
    cache = (
        f"public, max-age={6 * stream.spec.target_duration}"
        if blocking
        else "public, max-age=0, must-revalidate"
    )
    response = Response(text, media_type=PLAYLIST_TYPE, headers={"Cache-Control": cache})
    if request.query_params.get("ticket") == token and request.cookies.get(TICKET_COOKIE) != token:
        set_ticket_cookie(response, node, token, admitted)
    return response


@router.get("/hls/{space_id}/init.mp4", response_class=Response)
@router.head("/hls/{space_id}/init.mp4", include_in_schema=False)
async def init_segment(space_id: SpaceId, request: Request, node: NodeDep) -> Response:
    _check_ticket(node, request, space_id)
    stream = _stream(node, space_id)
    if stream.init is None:
        raise NotYetAvailable("the stream has not started")
    return _media(request, stream.init, f'"{space_id}-init"', MP4_TYPE)


@router.get("/hls/{space_id}/{name}", response_class=Response)
@router.head("/hls/{space_id}/{name}", include_in_schema=False)
async def media_object(
    space_id: SpaceId,
    name: Annotated[str, Path(max_length=64)],
    request: Request,
    node: NodeDep,
) -> Response:
    """A segment (``seg{msn}.m4s``) or a part (``seg{msn}.{part}.m4s``)."""
    m = MEDIA.fullmatch(name)
    if m is None:
        raise NotFound("no such object", code="not_found")
    _check_ticket(node, request, space_id)
    stream = _stream(node, space_id)
    msn = int(m.group(1))
    if m.group(2) is None:
        data = stream.segment_bytes.get(msn)
    else:
        data = stream.part_bytes.get((msn, int(m.group(2))))
    if data is None:
        raise NotFound("no such segment or part (yet, or any more)", code="not_found")
    return _media(request, data, f'"{space_id}-{name}"', MP4_TYPE)


# -- the fast path -------------------------------------------------------------------------------
# Listener GETs are the origin's whole load, and nearly all of them are the common case: a good
# ticket, an object in memory, no Range, no conditional, nothing to hand over. Through FastAPI's
# routing (every included router is tried in turn), dependency injection, validation and
# response classes that case cost several times what the work does (BENCHMARKS.md, "Audience").
# ``hot_request`` decides whether a request is exactly that case and gives its answer, built once
# per object and reused; two layers call it: the HTTP protocol itself (``control/fastproto.py``,
# under a server started by ``townhall serve``) and, for any other ASGI server, ``FastPath`` in
# raw ASGI before routing. Everything else goes on to the routes above: errors, Range, 304,
# blocking reloads that are invalid, and the Set-Cookie hand-over keep a single implementation.

_HLS_PATH = re.compile(r"/hls/([A-Za-z0-9]{1,16})/([A-Za-z0-9.]{1,64})")


class _Template:
    """What ``MetricsMiddleware`` reads from ``scope["route"]``: the route's path template."""

    def __init__(self, path: str) -> None:
        self.path = path


_ROUTES = {
    "live_playlist": _Template("/hls/{space_id}/live.m3u8"),
    "init_segment": _Template("/hls/{space_id}/init.mp4"),
    "media_object": _Template("/hls/{space_id}/{name}"),
}
_ROUTE_OF_NAME = {"live.m3u8": "live_playlist", "init.mp4": "init_segment"}


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    """A whole response, built once and served to every listener who asks for it: the status,
    the route template it is counted under, the headers (ASGI form and as header lines, without
    the server's own ``date``) and the body."""

    status: int
    route: _Template
    headers: list[tuple[bytes, bytes]]
    lines: bytes
    body: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Hold:
    """A blocking reload whose point the playlist does not have yet, within the bounds: wait
    (``SpaceStream.hold``/``wait_for``, ``within`` s), then answer ``playlist_answer``."""

    space_id: str
    stream: SpaceStream
    msn: int
    part: int | None
    within: float


def _answer(status: int, route: str, headers: list[tuple[bytes, bytes]], body: bytes) -> Answer:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    lines = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    return Answer(status, _ROUTES[route], headers, lines, body)


def error_answer(exc: ApiError, route: str) -> Answer:
    """The one error model (``control/app.py``), for an error met on the fast path."""
    body = error_body(exc.code, exc.message)
    headers = [(b"content-type", b"application/json")]
    if exc.retry_after is not None:
        headers.append((b"retry-after", str(exc.retry_after).encode()))
    return _answer(exc.status, route, headers, body)


LATE = error_answer(NotYetAvailable("the requested part did not appear in time"), "live_playlist")

_ID = re.compile(r"[A-Za-z0-9]{1,16}")
_MP4 = MP4_TYPE.encode()
_M3U8 = PLAYLIST_TYPE.encode()
_IMMUTABLE = IMMUTABLE.encode()
_LIVE_CACHE = b"public, max-age=0, must-revalidate"
_COOKIE = TICKET_COOKIE.encode()
_NO_FAST_HEADERS = frozenset((b"range", b"if-none-match", b"content-length", b"transfer-encoding", b"expect"))

# Answers built, keyed by what they answer, each beside the object it was built from (held, so
# that ``is`` is a sound test of "unchanged"): a media object's once, a playlist's once per
# change. Spaces come and go: cleared when full (a few rebuilds after a clear are cheap).
_built: dict[tuple[str, str], tuple[object, Answer]] = {}
_BUILT_MAX = 8192


def _built_for(key: tuple[str, str], source: object, build: Callable[[], Answer]) -> Answer:
    last = _built.get(key)
    if last is None or last[0] is not source:
        if last is None and len(_built) >= _BUILT_MAX:
            _built.clear()
        last = _built[key] = (source, build())
    return last[1]


def playlist_answer(space_id: str, stream: SpaceStream, *, blocking: bool) -> Answer | None:
    """The live playlist as it is now (None before the first part), with the cache lifetime of
    a plain or a blocking request."""
    text = stream.playlist()
    if text is None:
        return None

    def build() -> Answer:
        cache = f"public, max-age={6 * stream.spec.target_duration}".encode() if blocking else _LIVE_CACHE
        return _answer(
            200, "live_playlist", [(b"cache-control", cache), (b"content-type", _M3U8)], text.encode()
        )

    return _built_for((space_id, "blocking" if blocking else "live.m3u8"), text, build)


def _media_answer(space_id: str, name: str, data: bytes) -> Answer:
    return _built_for(
        (space_id, name),
        data,
        lambda: _answer(
            200,
            "init_segment" if name == "init.mp4" else "media_object",
            [
                (b"cache-control", _IMMUTABLE),
                (b"etag", f'"{space_id}-{name.removesuffix(".mp4")}"'.encode()),
                (b"accept-ranges", b"bytes"),
                (b"content-type", _MP4),
            ],
            data,
        ),
    )


# Tickets whose signature this process has checked: the HMAC and the JSON are done once per
# ticket, not once per request (a listener makes two or more requests a second). Sound because
# a node's keys are fixed for its lifetime and tickets cannot be revoked, only expire; space
# and expiry are still checked on every request. Bounded: cleared when full.
_checked: weakref.WeakKeyDictionary[TicketBook, dict[bytes, Ticket]] = weakref.WeakKeyDictionary()
_CHECKED_MAX = 1 << 16


def _admitted(node: Node, token: bytes, space_id: str) -> bool:
    now = node.clock()
    memo = _checked.setdefault(node.tickets, {})
    ticket = memo.get(token)
    if ticket is None:
        try:
            ticket = node.tickets.check(token.decode("ascii"), space_id, now)
        except (TicketError, UnicodeDecodeError):
            return False
        if len(memo) >= _CHECKED_MAX:
            memo.clear()
        memo[token] = ticket
    return ticket.space_id == space_id and ticket.expires_at > now


def _cookie(header: bytes) -> bytes | None:
    for chunk in header.split(b";"):
        name, _, value = chunk.strip().partition(b"=")
        if name == _COOKIE:
            return value
    return None


def _number(value: bytes, top: int) -> int | None:
    return int(value) if value.isdigit() and len(value) <= 10 and int(value) <= top else None


def hot_request(
    node: Node, method: str, path: str, query: bytes, headers: Iterable[tuple[bytes, bytes]]
) -> Answer | Hold | None:
    """The common case of a listener GET/HEAD (``path`` decoded, ``headers`` with lower-case
    names): its answer, or the wait of a blocking reload; None for anything else (the routes
    answer it: errors, Range, conditionals, a body, the cookie hand-over)."""
    if method not in ("GET", "HEAD"):
        return None
    m = _HLS_PATH.fullmatch(path)
    if m is None:
        return None
    space_id, name = m.groups()
    route = _ROUTE_OF_NAME.get(name, "media_object")
    cookie = None
    for key, value in headers:
        if key == b"cookie":
            cookie = _cookie(value)
        elif key in _NO_FAST_HEADERS:
            return None
    query_ticket = None
    msn = part = None
    if query:
        for pair in query.split(b"&"):
            key, _, value = pair.partition(b"=")
            if key == b"ticket" and b"%" not in value:
                query_ticket = value
            elif key == b"_HLS_msn" and route == "live_playlist":
                if (msn := _number(value, 10**9)) is None:
                    return None
            elif key == b"_HLS_part" and route == "live_playlist":
                if (part := _number(value, 999)) is None:
                    return None
            else:
                return None
    token = query_ticket or cookie
    if not token or len(token) > 1024:
        return None
    if not _admitted(node, token, space_id):
        return None
    stream = node.origin.streams.get(space_id)
    if stream is None:
        return None
    if route == "live_playlist":
        if query_ticket is not None and cookie != query_ticket:
            return None  # the route hands the ticket over as a cookie
        if msn is None:
            return None if part is not None else playlist_answer(space_id, stream, blocking=False)
        if not has_part(stream.segments, msn, part):
            try:
                check_blocking_request(stream.segments, msn, part, stream.segment_parts)
            except BlockingRequestError:
                return None  # the route answers 400
            # The route's bound: three target durations.
            return Hold(space_id, stream, msn, part, 3 * stream.spec.target_duration)
        if part is not None and part >= stream.segment_parts:
            return None  # the route answers 400
        return playlist_answer(space_id, stream, blocking=True)
    if route == "init_segment":
        data = stream.init
    else:
        media = MEDIA.fullmatch(name)
        if media is None:
            return None
        msn = int(media.group(1))
        data = (
            stream.segment_bytes.get(msn)
            if media.group(2) is None
            else stream.part_bytes.get((msn, int(media.group(2))))
        )
    return None if data is None else _media_answer(space_id, name, data)


class FastPath:
    """ASGI middleware: ``hot_request`` answered before routing; every other request goes on to
    ``app`` untouched. Install it inside the metrics middleware so that what it answers is
    counted under the same route templates."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/hls/"):
            m = _HLS_PATH.fullmatch(scope["path"])
            if m is not None:
                # Routing sets both again if this declines.
                scope["path_params"] = {"space_id": m.group(1), "name": m.group(2)}
                scope["route"] = _ROUTES[_ROUTE_OF_NAME.get(m.group(2), "media_object")]
                node: Node = scope["app"].state.node
                found = hot_request(
                    node, scope["method"], scope["path"], scope["query_string"], scope["headers"]
                )
                if isinstance(found, Hold):
                    # Held here (thousands at once near the live edge): the route's rules and
                    # bound, without its cost per waiting request.
                    if await found.stream.wait_for(found.msn, found.part, found.within):
                        found = playlist_answer(found.space_id, found.stream, blocking=True)
                    else:
                        found = LATE
                if found is not None:
                    await send(
                        {"type": "http.response.start", "status": found.status, "headers": found.headers}
                    )
                    body = b"" if scope["method"] == "HEAD" else found.body
                    await send({"type": "http.response.body", "body": body})
                    return
        await self.app(scope, receive, send)
