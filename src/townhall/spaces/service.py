"""Space lifecycle and roles: the database operations behind the spaces API.

Theory of operation
-------------------
- States go ``scheduled -> live -> ended``; ``ended`` is final and every change to an ended
  space is a 409.
- Roles: one host, at most ``MAX_COHOSTS`` co-hosts, at most ``MAX_STAGE`` people on stage
  (host and co-hosts included), listeners without a fixed limit. Hosts and co-hosts
  ("managers") invite, approve, decline, mute, move speakers back to listeners and block; only
  the host appoints co-hosts, starts the space, and ends it (an admin may end any space).
- Every operation that changes who is on stage starts with ``_lock``: an ``UPDATE`` bumping the
  space's version. Being the transaction's first write, it serialises changes to one space on
  SQLite (the database write lock) and on PostgreSQL (the row lock) *before* any count is
  read, so two hosts approving at once, or a host ending the space while speakers are
  granted, always leave a consistent stage: never 14 on stage, never a grant after the end.
- Events are published only after the commit, so no node ever acts on a change that was
  rolled back.
"""

from __future__ import annotations

import dataclasses
import secrets
import string

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from townhall.errors import BadRequest, Conflict, Forbidden, NotFound, UnprocessableEntity
from townhall.events import (
    SpaceEnded,
    SpaceEvent,
    SpaceStarted,
    SpeakerGranted,
    SpeakerMuted,
    SpeakerRevoked,
    StageChanged,
)
from townhall.social.accounts import Principal, get_account
from townhall.social.posts import require_active
from townhall.social.text import POST_MAX_CHARS, clean_text
from townhall.spaces.grants import new_grant_id
from townhall.storage.models import (
    Account,
    AuditEntry,
    Post,
    Space,
    SpaceBlock,
    SpaceMember,
    SpaceReminder,
    SpeakRequest,
)

MAX_STAGE = 13
MAX_COHOSTS = 2
TITLE_MAX = 100
SCHEDULE_HORIZON = 90 * 24 * 3600
_ID_ALPHABET = string.ascii_letters + string.digits
MANAGERS = ("host", "cohost")


def new_space_id() -> str:
    """13 random base62 characters (~77 bits), the shape of an X Spaces id."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(13))


def valid_space_id(space_id: str) -> bool:
    return 1 <= len(space_id) <= 16 and all(c in _ID_ALPHABET for c in space_id)


@dataclasses.dataclass
class Outcome:
    """What an operation changed, and the events to publish once it is committed."""

    events: list[SpaceEvent] = dataclasses.field(default_factory=list)


async def get_space(db: AsyncSession, space_id: str) -> Space:
    if not valid_space_id(space_id):
        raise NotFound("no such space", code="space_not_found")
    space = await db.get(Space, space_id)
    if space is None:
        raise NotFound("no such space", code="space_not_found")
    return space


async def _lock(db: AsyncSession, space_id: str, *, states: tuple[str, ...]) -> Space:
    """Serialise with every other change to this space; 404 / 409 by state."""
    if not valid_space_id(space_id):
        raise NotFound("no such space", code="space_not_found")
    result = await db.execute(update(Space).where(Space.id == space_id).values(version=Space.version + 1))
    if result.rowcount == 0:  # type: ignore[attr-defined]
        raise NotFound("no such space", code="space_not_found")
    space = await db.get(Space, space_id, populate_existing=True)
    assert space is not None
    require_state(space, states)
    return space


def require_state(space: Space, states: tuple[str, ...]) -> None:
    if space.state in states:
        return
    if space.state == "ended":
        raise Conflict("this space has ended", code="space_ended")
    if space.state == "scheduled":
        raise Conflict("this space has not started", code="space_not_live")
    raise Conflict("this space is already live", code="space_live")


async def member(db: AsyncSession, space_id: str, account_id: int) -> SpaceMember | None:
    return await db.get(SpaceMember, (space_id, account_id), populate_existing=True)


async def is_blocked(db: AsyncSession, space_id: str, account_id: int) -> bool:
    return await db.get(SpaceBlock, (space_id, account_id)) is not None


async def role_of(db: AsyncSession, space: Space, account_id: int | None) -> str:
    """host | cohost | speaker | blocked | listener (anyone else, anonymous included)."""
    if account_id is None:
        return "listener"
    if space.host_id == account_id:
        return "host"
    m = await member(db, space.id, account_id)
    if m is not None and m.role == "cohost":
        return "cohost"
    if m is not None and m.on_stage:
        return "speaker"
    if await is_blocked(db, space.id, account_id):
        return "blocked"
    return "listener"


async def _require_manager(db: AsyncSession, space: Space, actor: Principal, action: str) -> str:
    role = await role_of(db, space, actor.account.id)
    if role not in MANAGERS:
        raise Forbidden(f"only the host and co-hosts can {action}", code="hosts_only")
    require_active(actor, action)
    return role


def _stage_count(space_id: str) -> object:
    return (
        select(func.count())
        .select_from(SpaceMember)
        .where(SpaceMember.space_id == space_id, SpaceMember.on_stage.is_(True))
    )


async def _revoke(db: AsyncSession, m: SpaceMember, out: Outcome) -> None:
    if m.grant_id:
        out.events.append(SpeakerRevoked(m.space_id, m.account_id, m.grant_id))
    m.grant_id = None


# -- lifecycle --------------------------------------------------------------------------------


async def create_space(
    db: AsyncSession,
    host: Principal,
    title: str,
    *,
    scheduled_for: float | None,
    recorded: bool,
    now: float,
) -> Space:
    require_active(host, "host a space")
    title = clean_text(title, field="title", max_chars=TITLE_MAX)
    if scheduled_for is not None and not (now - 60 <= scheduled_for <= now + SCHEDULE_HORIZON):
        raise UnprocessableEntity("scheduled_for must be in the next 90 days", code="invalid_schedule")
    space = Space(
        id=new_space_id(),
        host_id=host.account.id,
        title=title,
        state="scheduled",
        recorded=recorded,
        created_at=now,
        scheduled_for=scheduled_for,
        version=0,
    )
    db.add(space)
    await db.flush()
    db.add(
        SpaceMember(
            space_id=space.id,
            account_id=host.account.id,
            role="host",
            on_stage=True,
            grant_id=new_grant_id(),
            since=now,
        )
    )
    await db.commit()
    return space


async def start_space(db: AsyncSession, host: Principal, space_id: str, *, now: float) -> Outcome:
    """Go live, and post the announcement followers see (one row: read-time fan-out)."""
    space = await _lock(db, space_id, states=("scheduled", "live", "ended"))
    if space.host_id != host.account.id:
        raise Forbidden("only the host can start a space", code="host_only")
    require_active(host, "host a space")
    require_state(space, ("scheduled",))
    space.state = "live"
    space.started_at = now
    text = _post_text(f"{host.account.handle} is live: {space.title}")
    db.add(
        Post(account_id=host.account.id, kind="announcement", text=text, space_id=space.id, created_at=now)
    )
    await db.commit()
    return Outcome([SpaceStarted(space.id), StageChanged(space.id)])


async def end_space(db: AsyncSession, actor: Principal, space_id: str, *, now: float) -> Outcome:
    """End a space (host, or an admin); every speaking grant is revoked with it."""
    space = await _lock(db, space_id, states=("scheduled", "live", "ended"))
    if space.host_id != actor.account.id and not actor.is_admin:
        raise Forbidden("only the host can end a space", code="host_only")
    require_state(space, ("scheduled", "live"))
    out = await close_space(db, space, now=now)
    await db.commit()
    return out


async def live_space_hosts(db: AsyncSession) -> list[tuple[str, int]]:
    """(space id, host account id) of every live space: what a restarting node resumes."""
    rows = await db.execute(select(Space.id, Space.host_id).where(Space.state == "live").order_by(Space.id))
    return [(space_id, host_id) for space_id, host_id in rows]


async def end_abandoned(db: AsyncSession, space_id: str, *, now: float) -> Outcome:
    """End a live space whose host never came back after a restart (the system finaliser):
    the same end as the host's own, replay post included. Nothing if it is no longer live."""
    space = await _lock(db, space_id, states=("scheduled", "live", "ended"))
    if space.state != "live":
        await db.rollback()
        return Outcome()
    out = await close_space(db, space, now=now)
    await db.commit()
    return out


async def close_space(db: AsyncSession, space: Space, *, now: float) -> Outcome:
    """The end itself, inside the caller's transaction (the caller holds ``_lock`` and commits):
    the state, every grant revoked, and, for a recorded space that went live, the host's replay
    post, so that it is on the host's timeline and in followers' feeds the moment the space has
    ended. A system finaliser (a space whose host never came back) ends a space through here."""
    out = Outcome()
    space.state = "ended"
    space.ended_at = now
    members = (await db.scalars(select(SpaceMember).where(SpaceMember.space_id == space.id))).all()
    for m in members:
        await _revoke(db, m, out)
        m.on_stage = False
        m.hand_raised = False
    await db.execute(delete(SpeakRequest).where(SpeakRequest.space_id == space.id))
    if space.recorded and space.started_at is not None:
        db.add(
            Post(
                account_id=space.host_id,
                kind="replay",
                text=_post_text(f"Replay: {space.title}"),
                space_id=space.id,
                created_at=now,
            )
        )
    out.events += [SpaceEnded(space.id), StageChanged(space.id)]
    return out


async def delete_space(db: AsyncSession, actor: Principal, space_id: str, *, now: float) -> Space:
    """Delete a space that is not live (the host, or an admin): the row with its members,
    blocks and reminders, and its announcement and replay posts, in one transaction. The
    caller removes the media after the commit (a crash in between leaves media whose space is
    gone, which the retention sweep removes). An admin deleting someone else's space is a
    moderation action: audited."""
    space = await _lock(db, space_id, states=("scheduled", "live", "ended"))
    if space.host_id != actor.account.id and not actor.is_admin:
        raise Forbidden("only the host or an admin can delete a space", code="host_only")
    if space.state == "live":
        raise Conflict("this space is live: end it first", code="space_live")
    await db.execute(delete(Post).where(Post.space_id == space.id, Post.kind.in_(("announcement", "replay"))))
    if space.host_id != actor.account.id:
        db.add(
            AuditEntry(
                at=now,
                actor_id=actor.account.id,
                action="delete_space",
                target_account_id=space.host_id,
                detail=f"space {space.id}: {space.title}"[:500],
            )
        )
    await db.delete(space)
    await db.commit()
    return space


def _post_text(text: str) -> str:
    if len(text) > POST_MAX_CHARS:
        return text[: POST_MAX_CHARS - 1] + "…"
    return text


# -- co-hosts and speakers --------------------------------------------------------------------


async def _target(db: AsyncSession, space: Space, handle: str) -> Account:
    target = await get_account(db, handle)
    if target.suspended_at is not None:
        raise Conflict(f"{target.handle} is suspended and cannot speak", code="target_suspended")
    if await is_blocked(db, space.id, target.id):
        raise Conflict(f"{target.handle} is blocked from this space", code="target_blocked")
    return target


async def _put_on_stage(
    db: AsyncSession, space: Space, target: Account, role: str, now: float, out: Outcome
) -> SpaceMember:
    m = await member(db, space.id, target.id)
    if m is None or not m.on_stage:
        if int(await db.scalar(_stage_count(space.id)) or 0) >= MAX_STAGE:  # type: ignore[call-overload]
            raise Conflict(f"the stage is full ({MAX_STAGE} speakers)", code="stage_full")
    if m is None:
        m = SpaceMember(space_id=space.id, account_id=target.id, role=role, since=now)
        db.add(m)
    if not m.on_stage:
        m.on_stage = True
        m.muted = False
        m.muted_by_host = False
        m.since = now
    if m.role != "host" and (role == "cohost" or m.role != "cohost"):
        m.role = role
    if m.grant_id is None:
        m.grant_id = new_grant_id()
        out.events.append(SpeakerGranted(space.id, target.id, m.grant_id))
    await db.execute(
        delete(SpeakRequest).where(SpeakRequest.space_id == space.id, SpeakRequest.account_id == target.id)
    )
    out.events.append(StageChanged(space.id))
    return m


async def add_speaker(
    db: AsyncSession, actor: Principal, space_id: str, handle: str, *, now: float
) -> tuple[SpaceMember, Account, Outcome]:
    """Invite a listener on stage, or approve their request. Idempotent: approving someone
    already on stage returns their current grant."""
    space = await _lock(db, space_id, states=("scheduled", "live"))
    await _require_manager(db, space, actor, "add speakers")
    target = await _target(db, space, handle)
    out = Outcome()
    m = await _put_on_stage(db, space, target, "speaker", now, out)
    await _commit(db)
    return m, target, out


async def appoint_cohost(
    db: AsyncSession, actor: Principal, space_id: str, handle: str, *, now: float
) -> tuple[SpaceMember, Account, Outcome]:
    space = await _lock(db, space_id, states=("scheduled", "live"))
    if space.host_id != actor.account.id:
        raise Forbidden("only the host can appoint co-hosts", code="host_only")
    require_active(actor, "appoint co-hosts")
    target = await _target(db, space, handle)
    if target.id == space.host_id:
        raise Conflict("the host cannot be a co-host", code="already_host")
    current = await member(db, space.id, target.id)
    if current is None or current.role != "cohost":
        cohosts = await db.scalar(
            select(func.count())
            .select_from(SpaceMember)
            .where(SpaceMember.space_id == space.id, SpaceMember.role == "cohost")
        )
        if int(cohosts or 0) >= MAX_COHOSTS:
            raise Conflict(f"a space has at most {MAX_COHOSTS} co-hosts", code="cohost_limit")
    out = Outcome()
    m = await _put_on_stage(db, space, target, "cohost", now, out)
    await _commit(db)
    return m, target, out


async def dismiss_cohost(db: AsyncSession, actor: Principal, space_id: str, handle: str) -> Outcome:
    """The host (or the co-host themself) makes a co-host a plain speaker; they stay on stage."""
    space = await _lock(db, space_id, states=("scheduled", "live"))
    target = await get_account(db, handle)
    if actor.account.id not in (space.host_id, target.id):
        raise Forbidden("only the host can dismiss a co-host", code="host_only")
    m = await member(db, space.id, target.id)
    if m is None or m.role != "cohost":
        raise NotFound(f"{target.handle} is not a co-host", code="not_cohost")
    m.role = "speaker"
    await db.commit()
    return Outcome([StageChanged(space.id)])


async def remove_speaker(db: AsyncSession, actor: Principal, space_id: str, handle: str) -> Outcome:
    """Move a speaker back to the audience (a manager), or leave the stage (the speaker)."""
    space = await _lock(db, space_id, states=("scheduled", "live"))
    target = await get_account(db, handle)
    if target.id != actor.account.id:
        actor_role = await _require_manager(db, space, actor, "remove speakers")
        if target.id == space.host_id:
            raise Forbidden("the host cannot be removed from the stage", code="host_protected")
        target_member = await member(db, space.id, target.id)
        if actor_role == "cohost" and target_member is not None and target_member.role == "cohost":
            raise Forbidden("only the host can remove a co-host", code="host_only")
    elif target.id == space.host_id:
        raise Conflict("the host stays on stage; end the space instead", code="host_protected")
    m = await member(db, space.id, target.id)
    if m is None or not m.on_stage:
        raise NotFound(f"{target.handle} is not on stage", code="not_on_stage")
    out = Outcome()
    await _revoke(db, m, out)
    await db.delete(m)
    await db.commit()
    out.events.append(StageChanged(space.id))
    return out


async def set_muted(db: AsyncSession, actor: Principal, space_id: str, handle: str, muted: bool) -> Outcome:
    """Speakers mute and unmute themselves; managers mute anyone on stage but the host (and
    only the host mutes a co-host). A speaker muted by a manager cannot unmute themself."""
    space = await _lock(db, space_id, states=("scheduled", "live"))
    target = await get_account(db, handle)
    m = await member(db, space.id, target.id)
    if m is None or not m.on_stage:
        raise NotFound(f"{target.handle} is not on stage", code="not_on_stage")
    if target.id == actor.account.id:
        if not muted and m.muted_by_host and m.role not in MANAGERS:
            raise Forbidden("a host muted you; ask them to unmute you", code="muted_by_host")
        m.muted = muted
        m.muted_by_host = False
    else:
        actor_role = await _require_manager(db, space, actor, "mute speakers")
        if target.id == space.host_id:
            raise Forbidden("nobody mutes the host", code="host_protected")
        if actor_role == "cohost" and m.role == "cohost":
            raise Forbidden("only the host can mute a co-host", code="host_only")
        m.muted = muted
        m.muted_by_host = muted
    await db.commit()
    return Outcome([SpeakerMuted(space.id, target.id, muted), StageChanged(space.id)])


async def speaker_grant(db: AsyncSession, who: Principal, space_id: str) -> SpaceMember:
    """The caller's own current grant (to fetch or renew a speaker token)."""
    space = await get_space(db, space_id)
    require_state(space, ("scheduled", "live"))
    require_active(who, "speak")
    m = await member(db, space.id, who.account.id)
    if m is None or not m.on_stage or m.grant_id is None:
        raise Forbidden("you are not on this space's stage", code="not_on_stage")
    return m


# -- hands, requests, blocks, reminders --------------------------------------------------------


async def raise_hand(db: AsyncSession, who: Principal, space_id: str, *, now: float) -> Outcome:
    """A listener's raised hand is a request to speak; a speaker's is a flag on stage."""
    space = await _lock(db, space_id, states=("live",))
    require_active(who, "speak")
    if await is_blocked(db, space.id, who.account.id):
        raise Forbidden("you are blocked from this space", code="blocked")
    m = await member(db, space.id, who.account.id)
    if m is not None and m.on_stage:
        m.hand_raised = True
    elif await db.get(SpeakRequest, (space.id, who.account.id)) is None:
        db.add(SpeakRequest(space_id=space.id, account_id=who.account.id, created_at=now))
    await _commit(db)
    return Outcome([StageChanged(space.id)])


async def lower_hand(db: AsyncSession, who: Principal, space_id: str) -> Outcome:
    space = await _lock(db, space_id, states=("scheduled", "live", "ended"))
    m = await member(db, space.id, who.account.id)
    if m is not None:
        m.hand_raised = False
    await db.execute(
        delete(SpeakRequest).where(
            SpeakRequest.space_id == space.id, SpeakRequest.account_id == who.account.id
        )
    )
    await db.commit()
    return Outcome([StageChanged(space.id)])


async def decline_request(db: AsyncSession, actor: Principal, space_id: str, handle: str) -> Outcome:
    space = await _lock(db, space_id, states=("live",))
    await _require_manager(db, space, actor, "decline requests")
    target = await get_account(db, handle)
    result = await db.execute(
        delete(SpeakRequest).where(SpeakRequest.space_id == space.id, SpeakRequest.account_id == target.id)
    )
    if result.rowcount == 0:  # type: ignore[attr-defined]
        raise NotFound(f"{target.handle} has not asked to speak", code="no_request")
    await db.commit()
    return Outcome([StageChanged(space.id)])


async def speak_requests(db: AsyncSession, actor: Principal, space_id: str) -> list[tuple[str, float]]:
    space = await get_space(db, space_id)
    await _require_manager(db, space, actor, "see requests")
    rows = await db.execute(
        select(Account.handle, SpeakRequest.created_at)
        .join(Account, Account.id == SpeakRequest.account_id)
        .where(SpeakRequest.space_id == space.id)
        .order_by(SpeakRequest.created_at)
    )
    return [(h, t) for h, t in rows]


async def block(db: AsyncSession, actor: Principal, space_id: str, handle: str, *, now: float) -> Outcome:
    """Remove an account from the space (stage, requests) and bar it from coming back."""
    space = await _lock(db, space_id, states=("scheduled", "live"))
    actor_role = await _require_manager(db, space, actor, "block accounts")
    target = await get_account(db, handle)
    if target.id in (space.host_id, actor.account.id):
        raise Forbidden("the host and yourself cannot be blocked", code="host_protected")
    out = Outcome()
    m = await member(db, space.id, target.id)
    if m is not None:
        if m.role == "cohost" and actor_role != "host":
            raise Forbidden("only the host can block a co-host", code="host_only")
        await _revoke(db, m, out)
        await db.delete(m)
    await db.execute(
        delete(SpeakRequest).where(SpeakRequest.space_id == space.id, SpeakRequest.account_id == target.id)
    )
    if not await is_blocked(db, space.id, target.id):
        db.add(SpaceBlock(space_id=space.id, account_id=target.id, created_at=now, by_id=actor.account.id))
    await db.commit()
    out.events.append(StageChanged(space.id))
    return out


async def unblock(db: AsyncSession, actor: Principal, space_id: str, handle: str) -> None:
    space = await _lock(db, space_id, states=("scheduled", "live"))
    await _require_manager(db, space, actor, "unblock accounts")
    target = await get_account(db, handle)
    await db.execute(
        delete(SpaceBlock).where(SpaceBlock.space_id == space.id, SpaceBlock.account_id == target.id)
    )
    await db.commit()


async def set_reminder(db: AsyncSession, who: Principal, space_id: str, on: bool, *, now: float) -> None:
    space = await get_space(db, space_id)
    if on:
        require_state(space, ("scheduled",))
        if await db.get(SpaceReminder, (space.id, who.account.id)) is None:
            db.add(SpaceReminder(space_id=space.id, account_id=who.account.id, created_at=now))
    else:
        await db.execute(
            delete(SpaceReminder).where(
                SpaceReminder.space_id == space.id, SpaceReminder.account_id == who.account.id
            )
        )
    await _commit(db)


async def reminders_of(db: AsyncSession, space: Space) -> list[str]:
    rows = await db.scalars(
        select(Account.handle)
        .join(SpaceReminder, SpaceReminder.account_id == Account.id)
        .where(SpaceReminder.space_id == space.id)
        .order_by(SpaceReminder.created_at)
        .limit(1000)
    )
    return list(rows)


async def notifications(db: AsyncSession, who: Principal, *, limit: int) -> list[tuple[Space, str]]:
    """Spaces the caller asked to be reminded of that have started, newest first: computed on
    read, so a space with a million reminders costs nothing extra when it starts."""
    host = Account.__table__.alias("host")
    rows = await db.execute(
        select(Space, host.c.handle)
        .join(SpaceReminder, SpaceReminder.space_id == Space.id)
        .join(host, host.c.id == Space.host_id)
        .where(SpaceReminder.account_id == who.account.id, Space.started_at.is_not(None))
        .order_by(Space.started_at.desc())
        .limit(limit)
    )
    return [(s, h) for s, h in rows]


async def list_spaces(
    db: AsyncSession, *, state: str | None, host: Account | None, limit: int
) -> list[tuple[Space, str]]:
    query = select(Space, Account.handle).join(Account, Account.id == Space.host_id)
    if state is not None:
        if state not in ("scheduled", "live", "ended"):
            raise BadRequest("state is one of scheduled, live, ended", code="invalid_state")
        query = query.where(Space.state == state)
    if host is not None:
        query = query.where(Space.host_id == host.id)
    else:
        query = query.where(Account.suspended_at.is_(None))
    order = {
        "live": Space.started_at.desc(),
        "scheduled": Space.scheduled_for.asc(),
        "ended": Space.ended_at.desc(),
    }.get(state or "", Space.created_at.desc())
    rows = await db.execute(query.order_by(order, Space.id).limit(limit))
    return [(s, h) for s, h in rows]


async def stage_rows(db: AsyncSession, space_id: str) -> list[tuple[SpaceMember, str]]:
    rows = await db.execute(
        select(SpaceMember, Account.handle)
        .join(Account, Account.id == SpaceMember.account_id)
        .where(SpaceMember.space_id == space_id, SpaceMember.on_stage.is_(True))
        .order_by(SpaceMember.since)
    )
    return [(m, h) for m, h in rows]


async def request_count(db: AsyncSession, space_id: str) -> int:
    return int(
        await db.scalar(
            select(func.count()).select_from(SpeakRequest).where(SpeakRequest.space_id == space_id)
        )
        or 0
    )


async def revoke_account_grants(db: AsyncSession, account_id: int) -> Outcome:
    """Suspension takes an account off every stage (a host stays listed but loses its grant)."""
    out = Outcome()
    members = (
        await db.scalars(
            select(SpaceMember).where(SpaceMember.account_id == account_id, SpaceMember.on_stage.is_(True))
        )
    ).all()
    for m in members:
        await _revoke(db, m, out)
        if m.role != "host":
            m.on_stage = False
        out.events.append(StageChanged(m.space_id))
    return out


async def _commit(db: AsyncSession) -> None:
    try:
        await db.commit()
    except IntegrityError as exc:  # a duplicate from a concurrent identical request
        await db.rollback()
        raise Conflict("a concurrent change won; retry", code="conflict") from exc
