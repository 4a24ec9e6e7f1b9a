"""Spaces: lifecycle, roles, speaking, reactions, joins and live state."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import StreamingResponse

from townhall.control.deps import (
    Caller,
    DbDep,
    MaybeCaller,
    MediaStoreDep,
    NodeDep,
    ReplaysDep,
    enforce,
    iso,
    public_base,
)
from townhall.control.node import Node
from townhall.control.routes import replay
from townhall.control.schemas import (
    HandleBody,
    NotificationList,
    NotificationOut,
    ReactionBody,
    SpaceBody,
    SpaceList,
    SpaceOut,
    SpeakerGrantOut,
    SpeakRequestList,
    SpeakRequestOut,
)
from townhall.errors import Forbidden, UnprocessableEntity
from townhall.events import ReactionsTick, SpaceEnded, StageChanged
from townhall.social import accounts
from townhall.social.accounts import Principal
from townhall.social.posts import require_active
from townhall.spaces import service
from townhall.spaces.reactions import EMOJI
from townhall.storage.models import Account, Space, SpaceMember

router = APIRouter(prefix="/api/v1", tags=["spaces"])

SpaceId = Annotated[str, Path(min_length=1, max_length=16, pattern="^[A-Za-z0-9]+$")]
Handle = Annotated[str, Path(min_length=1, max_length=15)]


def space_out(base: str, space: Space, host: str, **extra: object) -> SpaceOut:
    return SpaceOut(
        id=space.id,
        title=space.title,
        state=space.state,
        host=host,
        recorded=space.recorded,
        created_at=iso(space.created_at),
        scheduled_for=iso(space.scheduled_for) if space.scheduled_for is not None else None,
        started_at=iso(space.started_at) if space.started_at is not None else None,
        ended_at=iso(space.ended_at) if space.ended_at is not None else None,
        state_url=f"{base}/api/v1/spaces/{space.id}/state",
        **extra,
    )


def grant_out(node: Node, base: str, m: SpaceMember, handle: str) -> SpeakerGrantOut:
    assert m.grant_id is not None
    token, grant = node.grants.issue(m.space_id, m.account_id, m.role, m.grant_id, node.clock())
    return SpeakerGrantOut(
        handle=handle,
        role=m.role,
        speaker_token=token,
        expires_at=iso(grant.expires_at),
        whip_url=f"{base}/whip/{m.space_id}",
        whep_url=f"{base}/whep/{m.space_id}",
    )


@router.post("/spaces", status_code=201, response_model=SpaceOut)
async def create(request: Request, body: SpaceBody, caller: Caller, node: NodeDep, db: DbDep) -> SpaceOut:
    """Create a space, now or for later (`scheduled_for`). It goes live with `/start`."""
    when = body.scheduled_for
    if when is not None and when.tzinfo is None:
        raise UnprocessableEntity("scheduled_for needs a time zone", code="invalid_schedule")
    space = await service.create_space(
        db,
        caller,
        body.title,
        scheduled_for=when.timestamp() if when else None,
        recorded=body.recorded,
        now=node.clock(),
    )
    return space_out(public_base(request, node), space, caller.account.handle, your_role="host")


@router.get("/spaces", response_model=SpaceList)
async def listing(
    request: Request,
    node: NodeDep,
    db: DbDep,
    state: Annotated[str | None, Query(pattern="^(scheduled|live|ended)$")] = None,
    host: Annotated[str | None, Query(max_length=15)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
) -> SpaceList:
    """Live, scheduled or ended spaces, optionally of one host."""
    host_account = await accounts.get_account(db, host) if host else None
    rows = await service.list_spaces(db, state=state, host=host_account, limit=limit)
    return SpaceList(spaces=[space_out(public_base(request, node), s, h) for s, h in rows])


@router.get("/spaces/{space_id}", response_model=SpaceOut)
async def show(
    request: Request, space_id: SpaceId, viewer: MaybeCaller, node: NodeDep, db: DbDep
) -> SpaceOut:
    space = await service.get_space(db, space_id)
    host = await db.get(Account, space.host_id)
    assert host is not None
    role = await service.role_of(db, space, viewer.account.id) if viewer else None
    reminders = await service.reminders_of(db, space) if role in service.MANAGERS else None
    return space_out(public_base(request, node), space, host.handle, your_role=role, reminders=reminders)


@router.post("/spaces/{space_id}/start", response_model=SpaceOut)
async def start(request: Request, space_id: SpaceId, caller: Caller, node: NodeDep, db: DbDep) -> SpaceOut:
    """Go live. Posts "<host> is live: <title>" for followers; reminders become notifications."""
    await node.publish(await service.start_space(db, caller, space_id, now=node.clock()))
    space = await service.get_space(db, space_id)
    return space_out(public_base(request, node), space, caller.account.handle, your_role="host")


@router.post("/spaces/{space_id}/end", response_model=SpaceOut)
async def end(request: Request, space_id: SpaceId, caller: Caller, node: NodeDep, db: DbDep) -> SpaceOut:
    """End the space (final). Every speaking grant is revoked. A recorded space's replay is
    published at once (`GET /hls/{id}/replay.m3u8`, `GET .../recording.m4a`, and a "Replay:"
    post by the host); a space that was not recorded has its media deleted."""
    await node.publish(await service.end_space(db, caller, space_id, now=node.clock()))
    space = await service.get_space(db, space_id)
    host = await db.get(Account, space.host_id)
    assert host is not None
    replay.after_end(node, space)
    return space_out(public_base(request, node), space, host.handle)


@router.delete("/spaces/{space_id}", status_code=204)
async def delete_space(
    space_id: SpaceId, caller: Caller, node: NodeDep, db: DbDep, store: MediaStoreDep, replays: ReplaysDep
) -> Response:
    """Delete a space that is not live (its host, or an admin): the space, its recording and
    its announcement and replay posts go together."""
    await service.delete_space(db, caller, space_id, now=node.clock())
    replays.forget(space_id)
    await asyncio.to_thread(store.delete_space, space_id)
    node.hub.invalidate(space_id)
    return Response(status_code=204)


# -- stage ---------------------------------------------------------------------------------------


@router.post("/spaces/{space_id}/speakers", response_model=SpeakerGrantOut)
async def add_speaker(
    request: Request, space_id: SpaceId, body: HandleBody, caller: Caller, node: NodeDep, db: DbDep
) -> SpeakerGrantOut:
    """Host or co-host invites a listener on stage or approves their request; returns the
    speaker's token and WHIP/WHEP URLs (the speaker can also fetch them: `/speaker-token`)."""
    m, target, out = await service.add_speaker(db, caller, space_id, body.handle, now=node.clock())
    await node.publish(out)
    return grant_out(node, public_base(request, node), m, target.handle)


@router.delete("/spaces/{space_id}/speakers/{handle}", status_code=204)
async def remove_speaker(
    space_id: SpaceId, handle: Handle, caller: Caller, node: NodeDep, db: DbDep
) -> Response:
    """A manager moves a speaker back to the audience, or a speaker leaves the stage."""
    await node.publish(await service.remove_speaker(db, caller, space_id, handle))
    return Response(status_code=204)


@router.post("/spaces/{space_id}/speakers/{handle}/mute", status_code=204)
async def mute(space_id: SpaceId, handle: Handle, caller: Caller, node: NodeDep, db: DbDep) -> Response:
    """Mute a speaker; the stage drops their audio on the server."""
    await node.publish(await service.set_muted(db, caller, space_id, handle, True))
    return Response(status_code=204)


@router.post("/spaces/{space_id}/speakers/{handle}/unmute", status_code=204)
async def unmute(space_id: SpaceId, handle: Handle, caller: Caller, node: NodeDep, db: DbDep) -> Response:
    await node.publish(await service.set_muted(db, caller, space_id, handle, False))
    return Response(status_code=204)


@router.post("/spaces/{space_id}/speaker-token", response_model=SpeakerGrantOut)
async def speaker_token(
    request: Request, space_id: SpaceId, caller: Caller, node: NodeDep, db: DbDep
) -> SpeakerGrantOut:
    """A speaker on stage (the host included) fetches or renews their own token."""
    m = await service.speaker_grant(db, caller, space_id)
    return grant_out(node, public_base(request, node), m, caller.account.handle)


@router.post("/spaces/{space_id}/cohosts", response_model=SpeakerGrantOut)
async def appoint_cohost(
    request: Request, space_id: SpaceId, body: HandleBody, caller: Caller, node: NodeDep, db: DbDep
) -> SpeakerGrantOut:
    """The host appoints a co-host (at most 2); a co-host is on stage."""
    m, target, out = await service.appoint_cohost(db, caller, space_id, body.handle, now=node.clock())
    await node.publish(out)
    return grant_out(node, public_base(request, node), m, target.handle)


@router.delete("/spaces/{space_id}/cohosts/{handle}", status_code=204)
async def dismiss_cohost(
    space_id: SpaceId, handle: Handle, caller: Caller, node: NodeDep, db: DbDep
) -> Response:
    await node.publish(await service.dismiss_cohost(db, caller, space_id, handle))
    return Response(status_code=204)


# -- hands and requests --------------------------------------------------------------------------


@router.post("/spaces/{space_id}/speak-requests", status_code=204)
async def request_to_speak(space_id: SpaceId, caller: Caller, node: NodeDep, db: DbDep) -> Response:
    """Raise a hand: a listener asks to speak; a speaker signals they want the floor."""
    await node.publish(await service.raise_hand(db, caller, space_id, now=node.clock()))
    return Response(status_code=204)


@router.get("/spaces/{space_id}/speak-requests", response_model=SpeakRequestList)
async def list_requests(space_id: SpaceId, caller: Caller, db: DbDep) -> SpeakRequestList:
    rows = await service.speak_requests(db, caller, space_id)
    return SpeakRequestList(requests=[SpeakRequestOut(handle=h, asked_at=iso(t)) for h, t in rows])


@router.delete("/spaces/{space_id}/speak-requests/{handle}", status_code=204)
async def drop_request(
    space_id: SpaceId, handle: Handle, caller: Caller, node: NodeDep, db: DbDep
) -> Response:
    """A manager declines a request, or the asker lowers their own hand."""
    if handle.lower() == caller.account.handle.lower():
        await node.publish(await service.lower_hand(db, caller, space_id))
    else:
        await node.publish(await service.decline_request(db, caller, space_id, handle))
    return Response(status_code=204)


# -- blocks and reminders ------------------------------------------------------------------------


@router.post("/spaces/{space_id}/blocks", status_code=204)
async def block(space_id: SpaceId, body: HandleBody, caller: Caller, node: NodeDep, db: DbDep) -> Response:
    """Remove an account from the space (stage or audience) and bar it from rejoining."""
    await node.publish(await service.block(db, caller, space_id, body.handle, now=node.clock()))
    return Response(status_code=204)


@router.delete("/spaces/{space_id}/blocks/{handle}", status_code=204)
async def unblock(space_id: SpaceId, handle: Handle, caller: Caller, node: NodeDep, db: DbDep) -> Response:
    await service.unblock(db, caller, space_id, handle)
    node.admission.snapshots.invalidate(space_id)  # joins on this node see it at once
    return Response(status_code=204)


@router.post("/spaces/{space_id}/reminders", status_code=204)
async def remind(space_id: SpaceId, caller: Caller, node: NodeDep, db: DbDep) -> Response:
    """Ask to be told when a scheduled space starts."""
    await service.set_reminder(db, caller, space_id, True, now=node.clock())
    return Response(status_code=204)


@router.delete("/spaces/{space_id}/reminders", status_code=204)
async def unremind(space_id: SpaceId, caller: Caller, node: NodeDep, db: DbDep) -> Response:
    await service.set_reminder(db, caller, space_id, False, now=node.clock())
    return Response(status_code=204)


@router.get("/notifications", response_model=NotificationList)
async def notifications(
    caller: Caller, db: DbDep, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> NotificationList:
    """Spaces you asked to be reminded of that have started."""
    rows = await service.notifications(db, caller, limit=limit)
    return NotificationList(
        notifications=[
            NotificationOut(
                kind="space_started", space_id=s.id, title=s.title, host=h, at=iso(s.started_at or 0)
            )
            for s, h in rows
        ]
    )


# -- listeners (joins and renewals: control/routes/admission.py) ---------------------------------


@router.post("/spaces/{space_id}/reactions", status_code=202)
async def react(space_id: SpaceId, body: ReactionBody, caller: Caller, node: NodeDep, db: DbDep) -> Response:
    """Send a reaction. Counted per second and broadcast as one tally per second."""
    if body.emoji not in EMOJI:
        raise UnprocessableEntity(f"emoji must be one of {' '.join(EMOJI)}", code="invalid_emoji")
    require_active(caller, "react")
    await enforce(node, node.config.reaction_limit_per_account, "react", str(caller.account.id))
    space = await service.get_space(db, space_id)
    service.require_state(space, ("live",))
    if await service.is_blocked(db, space.id, caller.account.id):
        raise Forbidden("you are blocked from this space", code="blocked")
    await node.hub.react(space.id, body.emoji)
    return Response(status_code=202)


@router.get(
    "/spaces/{space_id}/state",
    responses={200: {"content": {"application/json": {}}, "description": "the live state document"}},
)
async def state(space_id: SpaceId, request: Request, node: NodeDep) -> Response:
    """Who is on stage, co-hosts, hands, listener count, reactions, state. Built at most once a
    second per node and cacheable for a second by any edge: listeners poll this, they do not
    hold connections."""
    doc = await node.hub.document(space_id)
    headers = {"Cache-Control": "public, max-age=1", "ETag": doc.etag}
    if request.headers.get("if-none-match") == doc.etag:
        return Response(status_code=304, headers=headers)
    return Response(doc.body, media_type="application/json", headers=headers)


@router.get("/spaces/{space_id}/events", response_class=StreamingResponse)
async def events(space_id: SpaceId, caller: Caller, node: NodeDep, db: DbDep) -> StreamingResponse:
    """Server-sent events for participants on stage: `state` whenever the stage changes,
    `reactions` once a second while people react, `ended` at the end."""
    space = await service.get_space(db, space_id)
    role = await service.role_of(db, space, caller.account.id)
    if role not in ("host", "cohost", "speaker"):
        raise Forbidden("live events are for participants on stage", code="not_on_stage")
    await db.close()  # the stream may last hours: do not hold a database connection
    return StreamingResponse(
        _stream(node, space.id, caller),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _stream(node: Node, space_id: str, caller: Principal) -> AsyncIterator[bytes]:
    def frame(kind: str, data: bytes) -> bytes:
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    async with node.bus.listening(space_id) as queue:
        yield frame("state", (await node.hub.document(space_id)).body)
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), timeout=15)
            except TimeoutError:
                yield b": keep-alive\n\n"
                continue
            if isinstance(event, StageChanged):
                node.hub.invalidate(space_id)
                yield frame("state", (await node.hub.document(space_id)).body)
            elif isinstance(event, ReactionsTick):
                yield frame(
                    "reactions", json.dumps({"second": event.second, "counts": dict(event.counts)}).encode()
                )
            elif isinstance(event, SpaceEnded):
                yield frame("ended", b"{}")
                return
