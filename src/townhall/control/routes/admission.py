"""Admission routes: join (ticket, or a place in the waiting room), ticket renewal, the
proof-of-work challenge, and the admins' attack-mode switch.

A join touches no database row on its way in: limits, the proof and the ticket are arithmetic;
the space's state and block list come from the node's snapshot (``admission.gate``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, Field, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from townhall.admission.gate import Admission, Admitted, bearer_token
from townhall.control.deps import Admin, NodeDep, client_address, iso, public_base
from townhall.control.node import Node
from townhall.control.routes.hls import TICKET_COOKIE, ticket_cookie
from townhall.control.schemas import ErrorOut, JoinOut
from townhall.errors import ApiError, BadRequest, Forbidden, Unauthorized, UnprocessableEntity, error_body

router = APIRouter(prefix="/api/v1", tags=["admission"])

SpaceId = Annotated[str, Path(min_length=1, max_length=16, pattern="^[A-Za-z0-9]+$")]
Token = Annotated[str | None, Field(default=None, max_length=2048)]

_REFUSALS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (401, 403, 404, 409, 429, 503)
}


class JoinBody(BaseModel):
    """All optional. `queue_token`: the token of a 202 answer, re-presented after its
    `Retry-After`. `pow_challenge` + `pow_nonce`: a solved proof of work, required of anonymous
    joins while the node is in attack mode (see `GET /api/v1/pow/challenge`)."""

    queue_token: Token = None
    pow_challenge: Token = None
    pow_nonce: Annotated[str | None, Field(default=None, max_length=64)] = None


class QueuedOut(BaseModel):
    """In the waiting room. Re-present `queue_token` (`POST .../join` with
    `{"queue_token": ...}`) after `retry_after` seconds; `position` 1 is next, and it only goes
    down. The token is signed and holds the arrival number and time: the server keeps no
    record of you."""

    queue_token: str
    position: int
    retry_after: int
    estimated_wait_seconds: float
    arrived_at: dt.datetime
    expires_at: dt.datetime


class RenewBody(BaseModel):
    """The still valid ticket to renew (or none: the `townhall_ticket` cookie, when the
    request carries it)."""

    ticket: Token = None


class ChallengeOut(BaseModel):
    """Find a `nonce` (1-64 ASCII characters; a decimal counter will do) such that
    SHA-256(`challenge` + "." + `nonce`) begins with `difficulty` zero bits, then join with
    `{"pow_challenge": challenge, "pow_nonce": nonce}`. Each challenge admits once."""

    challenge: str
    difficulty: int
    expires_at: dt.datetime
    algorithm: str = "sha256-leading-zero-bits"
    attack_mode: bool


class AttackModeBody(BaseModel):
    """`on`: true or false forces attack mode for `seconds`; null returns it to automatic."""

    on: bool | None
    seconds: Annotated[float, Field(ge=1, le=86400)] = 3600


class AttackModeOut(BaseModel):
    active: bool
    forced: bool | None
    difficulty: int
    refused_per_second: float
    threshold_per_second: float
    refused_total: int
    shed_total: int


# -- the join, for every way in --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class JoinCall:
    """What a join or a renewal needs of its request, whichever way it came in (the ASGI
    route, ``JoinFastPath`` or the HTTP protocol itself, ``control.fastproto``): the asker's
    address (after trusted proxies), its ``Authorization`` header, the ticket cookie, and the
    base of the links to hand back."""

    space_id: str
    what: str  # "join" or "tickets/renew"
    address: str
    authorization: str | None
    cookie_ticket: str | None
    base: str


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """A complete answer: status, headers (lower-case names, in order, without the server's
    ``date``/``server``) and body. The ASGI path sends these headers as they are and the
    protocol path writes them as they are: the two cannot drift apart."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


_JSON = (b"content-type", b"application/json")
_PRIVATE = (b"cache-control", b"private, no-store")


def _reply(status: int, body: bytes, *extra: tuple[bytes, bytes]) -> Reply:
    return Reply(status, [(b"content-length", str(len(body)).encode()), _JSON, *extra], body)


def error_reply(exc: ApiError) -> Reply:
    """An ``ApiError`` as the app's error handler renders it (``control.app.error_response``)."""
    body = error_body(exc.code, exc.message)
    if exc.retry_after is None:
        return _reply(exc.status, body)
    return _reply(exc.status, body, (b"retry-after", str(exc.retry_after).encode()))


def _admitted(call: JoinCall, node: Node, done: Admitted) -> Reply:
    space_id = call.space_id
    out = JoinOut(
        ticket=done.token,
        hls_url=f"{call.base}/hls/{space_id}/live.m3u8?ticket={done.token}",
        expires_at=iso(done.ticket.expires_at),
        listener=done.ticket.listener,
    )
    node.hub.listener_seen(space_id, done.ticket.listener)
    return _reply(200, out.model_dump_json().encode(), ticket_cookie(node, done.token, done.ticket), _PRIVATE)


async def _account(gate: Admission, header: str | None) -> int | None:
    if not header:
        return None
    token = bearer_token(header)
    if token is None:
        raise Unauthorized("Authorization must be 'Bearer <token>'", code="invalid_token")
    return await gate.sessions.account_id(token)


async def _join(node: Node, call: JoinCall, body: JoinBody) -> Reply:
    """The join, for the route and both fast paths alike."""
    gate = node.admission
    address = call.address
    returning = body.queue_token is not None
    await gate.limit_address("renew" if returning else "join", address)
    account = await _account(gate, call.authorization)
    if account is not None:
        await gate.limit_listener("renew" if returning else "join", f"a{account}")
    elif not returning:
        await gate.check_pow(body.pow_challenge, body.pow_nonce)
    done = await gate.join(call.space_id, account, body.queue_token, address)
    if isinstance(done, Admitted):
        return _admitted(call, node, done)
    out = QueuedOut(
        queue_token=done.token,
        position=done.wait.position,
        retry_after=done.wait.retry_after,
        estimated_wait_seconds=done.wait.wait_seconds,
        arrived_at=iso(done.queue.arrived_at),
        expires_at=iso(done.queue.expires_at),
    )
    retry = (b"retry-after", str(done.wait.retry_after).encode())
    return _reply(202, out.model_dump_json().encode(), retry, _PRIVATE)


async def _renew(node: Node, call: JoinCall, body: RenewBody) -> Reply:
    gate = node.admission
    token = body.ticket or call.cookie_ticket
    await gate.limit_address("renew", call.address)
    if not token:
        raise Forbidden('send the ticket to renew: {"ticket": ...}', code="ticket_required")
    listener = gate.listener_of(token, call.space_id)
    if listener is not None:
        await gate.limit_listener("renew", listener)
    return _admitted(call, node, await gate.renew(call.space_id, token))


def _parse(what: str, raw: bytes) -> JoinBody | RenewBody:
    model = JoinBody if what == "join" else RenewBody
    try:
        return model.model_validate_json(raw) if raw.strip() else model()
    except ValidationError as exc:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            raise BadRequest("the request body is not valid JSON", code="malformed_json") from None
        where = ".".join(str(p) for p in errors[0].get("loc", ())) or "body"
        raise UnprocessableEntity(f"{where}: {errors[0].get('msg', 'invalid')}") from None


async def answer(node: Node, call: JoinCall, raw: bytes) -> Reply:
    """A join or renewal from its raw body to its complete answer, refusals included: the one
    implementation every path runs. With memory limits and waiting room, a cached snapshot and
    (for an account) a cached session, it never suspends, which is what lets
    ``control.fastproto`` run it to the end inside the protocol's callback."""
    try:
        body = _parse(call.what, raw)
        if call.what == "join":
            return await _join(node, call, body)  # type: ignore[arg-type]
        return await _renew(node, call, body)  # type: ignore[arg-type]
    except ApiError as exc:
        return error_reply(exc)


def _call(request: Request, node: Node, space_id: str, what: str) -> JoinCall:
    return JoinCall(
        space_id,
        what,
        client_address(request),
        request.headers.get("authorization"),
        request.cookies.get(TICKET_COOKIE) if what != "join" else None,
        public_base(request, node),
    )


def _response(reply: Reply) -> Response:
    response = Response(reply.body, status_code=reply.status)
    response.raw_headers = list(reply.headers)
    return response


@router.post(
    "/spaces/{space_id}/join",
    response_model=JoinOut,
    responses={**_REFUSALS, 202: {"model": QueuedOut, "description": "in the waiting room"}},
)
async def join(request: Request, space_id: SpaceId, node: NodeDep, body: JoinBody | None = None) -> Any:
    """Join as a listener. **200**: a signed ticket and the live playlist's URL; the ticket is
    also set as the `townhall_ticket` cookie of `/hls/{id}/`, so players need not carry it.
    **202**: the space or node is at capacity: a `queue_token`, your `position` and
    `Retry-After`; send the token back then. **429**: too many joins from your address,
    network or account (`Retry-After`). **403** `pow_required`: the node is under attack and
    anonymous joins need a proof of work (log in, or solve `GET /api/v1/pow/challenge`).
    **503**: shed under overload (`Retry-After`). (Served in the HTTP protocol or by
    `JoinFastPath`; this route is their description and their fallback.)"""
    reply = await _join(node, _call(request, node, space_id, "join"), body or JoinBody())
    return _response(reply)


@router.post("/spaces/{space_id}/tickets/renew", response_model=JoinOut, responses=_REFUSALS)
async def renew(request: Request, space_id: SpaceId, node: NodeDep, body: RenewBody | None = None) -> Any:
    """Trade a still valid ticket of this space for a fresh one (same listener), before it
    expires. No database call; limited per address, network and listener at a higher
    allowance than joins. A listener who was blocked, or a space that ended, is refused."""
    reply = await _renew(node, _call(request, node, space_id, "tickets/renew"), body or RenewBody())
    return _response(reply)


# -- the fast path -------------------------------------------------------------------------------

FAST_PATH = re.compile(r"/api/v1/spaces/([A-Za-z0-9]{1,16})/(join|tickets/renew)")


class _Template:
    """What the metrics middleware reads of a route: its path template."""

    def __init__(self, path: str) -> None:
        self.path = path


TEMPLATES = {
    "join": _Template("/api/v1/spaces/{space_id}/join"),
    "tickets/renew": _Template("/api/v1/spaces/{space_id}/tickets/renew"),
}


class JoinFastPath:
    """ASGI middleware: joins and renewals answered before routing. FastAPI's routing (matching
    the path against every route, building the dependency graph) costs more than the whole
    admission; a join storm is exactly where that matters. Same code, same answers: the route
    above, this path and the protocol's (``control.fastproto``) all run ``_join``/``_renew``.
    Install inside the metrics middleware."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith("/api/v1/"):
            m = FAST_PATH.fullmatch(scope["path"])
            if m is not None:
                scope["route"] = TEMPLATES[m.group(2)]
                scope["path_params"] = {"space_id": m.group(1)}
                request = Request(scope, receive)
                node: Node = scope["app"].state.node
                raw = await request.body()
                reply = await answer(node, _call(request, node, m.group(1), m.group(2)), raw)
                await send({"type": "http.response.start", "status": reply.status, "headers": reply.headers})
                await send({"type": "http.response.body", "body": reply.body})
                return
        await self.app(scope, receive, send)


@router.get("/pow/challenge", response_model=ChallengeOut)
async def challenge(node: NodeDep, response: Response) -> ChallengeOut:
    """A proof-of-work challenge at the current difficulty (it rises with the refused-traffic
    rate while the node is in attack mode). Costs the server one HMAC."""
    gate = node.admission
    issued = gate.challenge()
    response.headers["Cache-Control"] = "no-store"
    return ChallengeOut(
        challenge=issued.token,
        difficulty=issued.difficulty,
        expires_at=iso(issued.expires_at),
        attack_mode=gate.attack.active(node.clock()),
    )


def _attack_out(gate: Admission, now: float) -> AttackModeOut:
    a = gate.attack
    a.difficulty(now)  # decays the rate to now
    return AttackModeOut(
        active=a.active(now),
        forced=a.forced if a.forced is not None and now < a.forced_until else None,
        difficulty=a.difficulty(now),
        refused_per_second=round(a.rate, 3),
        threshold_per_second=a.threshold,
        refused_total=gate.refused,
        shed_total=gate.shedder.shed,
    )


@router.get("/admin/attack-mode", response_model=AttackModeOut, tags=["moderation"])
async def attack_mode(admin: Admin, node: NodeDep) -> AttackModeOut:
    """Whether this node requires proof of work of anonymous joins, and why."""
    del admin
    return _attack_out(node.admission, node.clock())


@router.post("/admin/attack-mode", response_model=AttackModeOut, tags=["moderation"])
async def set_attack_mode(body: AttackModeBody, admin: Admin, node: NodeDep) -> AttackModeOut:
    """Force attack mode on or off on this node for a while, or give it back to the
    automatic switch (`{"on": null}`)."""
    del admin
    now = node.clock()
    node.admission.attack.force(body.on, now, body.seconds)
    return _attack_out(node.admission, now)
