"""WHIP ingest and WHEP egress for speakers (RFC 9725 and the WHEP draft).

- ``POST /whip/{space_id}``: an SDP offer (``application/sdp``) with ``Authorization: Bearer
  <speaker_token>``; answered ``201 Created`` with the SDP answer, ``Location`` of the session
  and an ``ETag`` (RFC 9725 §4.2). ICE: full gathering on both sides, no trickle; ``PATCH``
  answers 405 (RFC 9725 §4.3.1 lets a server refuse trickle).
- ``POST /whep/{space_id}``: the same handshake; the answer carries the room as this speaker
  should hear it, the mix minus their own voice. A host or co-host adding ``?mix=program``
  gets the full program mix (a monitor).
- ``DELETE`` on the session URL ends it (RFC 9725 §4.2); ``OPTIONS`` answers CORS pre-flight
  so browser pages can publish (RFC 9725 §4.1).
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response

from townhall.control.deps import DbDep, NodeDep
from townhall.control.node import Node
from townhall.errors import (
    ApiError,
    BadRequest,
    Forbidden,
    NotFound,
    ServiceUnavailable,
    Unauthorized,
    UnsupportedMediaType,
)
from townhall.spaces import service
from townhall.spaces.grants import Grant, GrantError
from townhall.stage.channel import StageError
from townhall.stage.process import speaker_key

logger = logging.getLogger(__name__)

router = APIRouter(tags=["media"])

SpaceId = Annotated[str, Path(min_length=1, max_length=16, pattern="^[A-Za-z0-9]+$")]
SessionId = Annotated[str, Path(min_length=1, max_length=32, pattern="^[A-Za-z0-9_-]+$")]
MAX_SDP = 32 * 1024

CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match",
    "Access-Control-Expose-Headers": "Location, ETag, Link",
}
_SDP_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/sdp": {"schema": {"type": "string", "maxLength": MAX_SDP}}},
    }
}


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("send Authorization: Bearer <speaker_token>", code="login_required")
    return token.strip()


def _grant(node: Node, request: Request, space_id: str) -> Grant:
    try:
        return node.grants.check(_bearer(request), space_id, node.clock())
    except GrantError as exc:
        if exc.code == "wrong_space":
            raise Forbidden(str(exc), code="wrong_space") from exc
        raise Unauthorized(str(exc), code=exc.code) from exc


async def _offer(request: Request) -> str:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/sdp":
        raise UnsupportedMediaType("the offer must be sent as application/sdp")
    raw = await request.body()
    if len(raw) > MAX_SDP:
        raise BadRequest(f"the offer is larger than {MAX_SDP} bytes", code="sdp_too_large")
    try:
        sdp = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest("the offer is not UTF-8 text", code="malformed_sdp") from exc
    lines = [line.strip() for line in sdp.splitlines() if line.strip()]
    if not lines or lines[0] != "v=0" or not any(line.startswith("m=") for line in lines):
        raise BadRequest("the body is not an SDP offer (RFC 8866)", code="malformed_sdp")
    if not any(line.startswith("m=audio ") for line in lines):
        raise BadRequest("the offer has no audio section; townhall carries audio only", code="no_audio")
    if not any("opus/48000" in line.lower() for line in lines):
        raise BadRequest("the offer does not include Opus", code="no_opus")
    return sdp


async def _current_member(node: Node, db: DbDep, grant: Grant) -> tuple[str, bool]:
    """The grant must still be current in the database (survives restarts of the revoked set)."""
    space = await service.get_space(db, grant.space_id)
    service.require_state(space, ("live",))
    m = await service.member(db, grant.space_id, grant.account_id)
    if m is None or not m.on_stage or m.grant_id != grant.grant_id:
        node.grants.revoke(grant.grant_id, node.clock())
        raise Unauthorized("this speaking grant is no longer valid", code="token_revoked")
    return m.role, m.muted


def _created(kind: str, space_id: str, peer_id: str, answer: str) -> Response:
    headers = {
        "Location": f"/{kind}/{space_id}/{peer_id}",
        "ETag": f'"{peer_id}"',
        **CORS,
    }
    return Response(answer, status_code=201, media_type="application/sdp", headers=headers)


def _stage_error(exc: StageError) -> ApiError:
    """A refusal from the stage process, as the API's own error."""
    kinds: dict[int, type[ApiError]] = {400: BadRequest, 404: NotFound, 503: ServiceUnavailable}
    return kinds.get(exc.status, ServiceUnavailable)(exc.message, code=exc.code)


@router.options("/whip/{space_id}", include_in_schema=False)
@router.options("/whep/{space_id}", include_in_schema=False)
@router.options("/whip/{space_id}/{session_id}", include_in_schema=False)
@router.options("/whep/{space_id}/{session_id}", include_in_schema=False)
async def preflight() -> Response:
    return Response(status_code=204, headers={**CORS, "Accept-Post": "application/sdp"})


@router.post("/whip/{space_id}", status_code=201, openapi_extra=_SDP_BODY, response_class=Response)
async def whip(space_id: SpaceId, request: Request, node: NodeDep, db: DbDep) -> Response:
    """Publish a speaker's microphone (WHIP, RFC 9725)."""
    grant = _grant(node, request, space_id)
    sdp = await _offer(request)
    _, muted = await _current_member(node, db, grant)
    await db.close()
    speaker = speaker_key(grant.account_id)
    try:
        peer_id, answer = await node.stage.open_whip(space_id, speaker, grant.grant_id, muted, sdp)
    except StageError as exc:
        raise _stage_error(exc) from exc
    logger.info("whip session", extra={"space": space_id, "peer": peer_id, "speaker": speaker})
    return _created("whip", space_id, peer_id, answer)


@router.post("/whep/{space_id}", status_code=201, openapi_extra=_SDP_BODY, response_class=Response)
async def whep(
    space_id: SpaceId,
    request: Request,
    node: NodeDep,
    db: DbDep,
    mix: Annotated[str, Query(pattern="^(minus|program)$")] = "minus",
) -> Response:
    """Hear the room: the mix minus your own voice, or (hosts) the full program."""
    grant = _grant(node, request, space_id)
    sdp = await _offer(request)
    role, _ = await _current_member(node, db, grant)
    await db.close()
    if mix == "program" and role not in service.MANAGERS:
        raise Forbidden("only hosts and co-hosts may monitor the program mix", code="hosts_only")
    who = "*" if mix == "program" else speaker_key(grant.account_id)
    try:
        peer_id, answer = await node.stage.open_whep(space_id, who, grant.grant_id, sdp)
    except StageError as exc:
        raise _stage_error(exc) from exc
    logger.info("whep session", extra={"space": space_id, "peer": peer_id, "who": who})
    return _created("whep", space_id, peer_id, answer)


@router.delete("/whip/{space_id}/{session_id}", status_code=200, response_class=Response)
@router.delete(
    "/whep/{space_id}/{session_id}", status_code=200, response_class=Response, include_in_schema=False
)
async def end_session(space_id: SpaceId, session_id: SessionId, request: Request, node: NodeDep) -> Response:
    """End a WHIP or WHEP session (RFC 9725 §4.2). Needs the token that opened it."""
    token = _bearer(request)
    session = node.stage.sessions.get(session_id)
    if session is None or session.space_id != space_id:
        raise NotFound("no such session", code="session_not_found")
    try:
        grant = node.grants.signer.verify(token)
    except ValueError as exc:
        raise Unauthorized("invalid token", code="invalid_token") from exc
    if grant.get("g") != session.grant_id:
        raise Forbidden("this session belongs to another grant", code="not_yours")
    try:
        await node.stage.drop(space_id, session_id)
    except StageError as exc:
        raise _stage_error(exc) from exc
    return Response(status_code=200, headers=CORS)


@router.patch("/whip/{space_id}/{session_id}", include_in_schema=False)
@router.patch("/whep/{space_id}/{session_id}", include_in_schema=False)
async def no_trickle() -> Response:
    """Trickle ICE and ICE restarts are not supported: candidates are all in the offer/answer."""
    return Response(
        '{"error":{"code":"trickle_unsupported","message":"send all ICE candidates in the offer"}}',
        status_code=405,
        media_type="application/json",
        headers={"Allow": "DELETE, OPTIONS", **CORS},
    )
