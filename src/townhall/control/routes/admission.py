"""Admission routes: join (ticket, or a place in the waiting room), ticket renewal, the
proof-of-work challenge, and the admins' attack-mode switch.

A join touches no database row on its way in: limits, the proof and the ticket are arithmetic;
the space's state and block list come from the node's snapshot (``admission.gate``).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from townhall.admission.gate import Admission, Admitted
from townhall.control.deps import Admin, NodeDep, client_address, iso, public_base
from townhall.control.node import Node
from townhall.control.routes.hls import TICKET_COOKIE, set_ticket_cookie
from townhall.control.schemas import ErrorOut, JoinOut
from townhall.errors import ApiError, BadRequest, Forbidden, Unauthorized, UnprocessableEntity

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


def _admitted(request: Request, node: Node, space_id: str, done: Admitted) -> Response:
    out = JoinOut(
        ticket=done.token,
        hls_url=f"{public_base(request, node)}/hls/{space_id}/live.m3u8?ticket={done.token}",
        expires_at=iso(done.ticket.expires_at),
        listener=done.ticket.listener,
    )
    response = Response(out.model_dump_json().encode(), media_type="application/json")
    set_ticket_cookie(response, node, done.token, done.ticket)
    response.headers["Cache-Control"] = "private, no-store"
    node.hub.listener_seen(space_id, done.ticket.listener)
    return response


async def _account(gate: Admission, request: Request) -> int | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token or len(token) > 256:
        raise Unauthorized("Authorization must be 'Bearer <token>'", code="invalid_token")
    return await gate.sessions.account_id(token.strip())


async def _join(request: Request, node: Node, space_id: str, body: JoinBody) -> Response:
    """The join, for the route and the fast path alike."""
    gate = node.admission
    address = client_address(request)
    returning = body.queue_token is not None
    await gate.limit_address("renew" if returning else "join", address)
    account = await _account(gate, request)
    if account is not None:
        await gate.limit_listener("renew" if returning else "join", f"a{account}")
    elif not returning:
        await gate.check_pow(body.pow_challenge, body.pow_nonce)
    done = await gate.join(space_id, account, body.queue_token, address)
    if isinstance(done, Admitted):
        return _admitted(request, node, space_id, done)
    out = QueuedOut(
        queue_token=done.token,
        position=done.wait.position,
        retry_after=done.wait.retry_after,
        estimated_wait_seconds=done.wait.wait_seconds,
        arrived_at=iso(done.queue.arrived_at),
        expires_at=iso(done.queue.expires_at),
    )
    return Response(
        out.model_dump_json().encode(),
        status_code=202,
        media_type="application/json",
        headers={"Retry-After": str(done.wait.retry_after), "Cache-Control": "private, no-store"},
    )


async def _renew(request: Request, node: Node, space_id: str, body: RenewBody) -> Response:
    gate = node.admission
    token = body.ticket or request.cookies.get(TICKET_COOKIE)
    await gate.limit_address("renew", client_address(request))
    if not token:
        raise Forbidden('send the ticket to renew: {"ticket": ...}', code="ticket_required")
    listener = gate.listener_of(token, space_id)
    if listener is not None:
        await gate.limit_listener("renew", listener)
    return _admitted(request, node, space_id, await gate.renew(space_id, token))


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
    **503**: shed under overload (`Retry-After`). (Served by `JoinFastPath`; this route is
    its description and its fallback.)"""
    return await _join(request, node, space_id, body or JoinBody())


@router.post("/spaces/{space_id}/tickets/renew", response_model=JoinOut, responses=_REFUSALS)
async def renew(request: Request, space_id: SpaceId, node: NodeDep, body: RenewBody | None = None) -> Any:
    """Trade a still valid ticket of this space for a fresh one (same listener), before it
    expires. No database call; limited per address, network and listener at a higher
    allowance than joins. A listener who was blocked, or a space that ended, is refused."""
    return await _renew(request, node, space_id, body or RenewBody())


# -- the fast path -------------------------------------------------------------------------------

_FAST = re.compile(r"/api/v1/spaces/([A-Za-z0-9]{1,16})/(join|tickets/renew)")


class _Template:
    """What the metrics middleware reads of a route: its path template."""

    def __init__(self, path: str) -> None:
        self.path = path


_TEMPLATES = {
    "join": _Template("/api/v1/spaces/{space_id}/join"),
    "tickets/renew": _Template("/api/v1/spaces/{space_id}/tickets/renew"),
}


class JoinFastPath:
    """ASGI middleware: joins and renewals answered before routing. FastAPI's routing (matching
    the path against every route, building the dependency graph) costs more than the whole
    admission; a join storm is exactly where that matters. Same code, same answers: the route
    above and this path both call ``_join``/``_renew``. Install inside the metrics middleware."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith("/api/v1/"):
            m = _FAST.fullmatch(scope["path"])
            if m is not None:
                scope["route"] = _TEMPLATES[m.group(2)]
                scope["path_params"] = {"space_id": m.group(1)}
                await self._answer(m.group(1), m.group(2), scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _answer(self, space_id: str, what: str, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        node: Node = scope["app"].state.node
        try:
            raw = await request.body()
            model = JoinBody if what == "join" else RenewBody
            try:
                body = model.model_validate_json(raw) if raw.strip() else model()
            except ValidationError as exc:
                errors = exc.errors()
                if any(e.get("type") == "json_invalid" for e in errors):
                    raise BadRequest("the request body is not valid JSON", code="malformed_json") from None
                where = ".".join(str(p) for p in errors[0].get("loc", ())) or "body"
                raise UnprocessableEntity(f"{where}: {errors[0].get('msg', 'invalid')}") from None
            if what == "join":
                response = await _join(request, node, space_id, body)  # type: ignore[arg-type]
            else:
                response = await _renew(request, node, space_id, body)  # type: ignore[arg-type]
        except ApiError as exc:
            payload = {"error": {"code": exc.code, "message": exc.message}}
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
            response = JSONResponse(payload, exc.status, headers=headers)
        await response(scope, receive, send)


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
