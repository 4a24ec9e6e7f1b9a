"""The product rules of recordings: who may hear a replay, and when media is deleted.

Theory of operation
-------------------
- A replay exists for a space that was recorded, went live and has ended, while its media is
  kept. Replays are public, like the space's posts: no listener ticket. A suspended host's
  replays are hidden like their posts (a read-time flag) and come back on reinstatement.
- The media of a space that was *not* recorded is deleted as soon as it ends: only live
  listeners could need those parts, and there are none after the end.
- Retention (``recording_retention_days``, 0 = forever) is applied by :func:`sweep`, which the
  server runs every ``recording_sweep_seconds`` with ``now`` as an argument. It deletes the media
  and the replay post of recordings past retention, the media of not-recorded spaces that
  escaped deletion at the end (a packager still writing its last part), and media whose space
  no longer exists (a crash between a deletion's commit and the removal of its files).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from townhall.errors import Conflict, NotFound
from townhall.spaces.service import get_space
from townhall.storage.media_store import MediaStore
from townhall.storage.models import Account, Post, Space

logger = logging.getLogger(__name__)

DAY = 24 * 3600


async def replay_space(db: AsyncSession, space_id: str) -> Space:
    """The space whose replay is asked for, or the clear error saying why there is none."""
    space = await get_space(db, space_id)
    host = await db.get(Account, space.host_id)
    if host is None or host.suspended_at is not None:
        raise NotFound("this replay is not available", code="replay_unavailable")
    if space.state != "ended":
        raise Conflict(
            "this space has not ended: its replay is published when it ends", code="space_not_ended"
        )
    if not space.recorded:
        raise NotFound("this space was not recorded", code="not_recorded")
    if space.started_at is None:
        raise NotFound("this space never went live: there is no recording", code="no_recording")
    if space.media_deleted_at is not None:
        raise NotFound("this recording has been deleted", code="recording_deleted")
    return space


async def discard_media(db: AsyncSession, store: MediaStore, space: Space, *, now: float) -> None:
    """Delete a space's media and note when (the space row stays)."""
    await asyncio.to_thread(store.delete_space, space.id)
    await db.execute(update(Space).where(Space.id == space.id).values(media_deleted_at=now))
    await db.commit()


@dataclasses.dataclass
class SweepResult:
    expired: list[str] = dataclasses.field(default_factory=list)
    not_recorded: list[str] = dataclasses.field(default_factory=list)
    orphans: list[str] = dataclasses.field(default_factory=list)


async def sweep(db: AsyncSession, store: MediaStore, *, now: float, retention_days: int) -> SweepResult:
    """Apply retention and clean up after interrupted deletions (see the module's notes)."""
    result = SweepResult()
    if retention_days > 0:
        cutoff = now - retention_days * DAY
        expired = (
            await db.scalars(
                select(Space.id).where(
                    Space.state == "ended",
                    Space.recorded.is_(True),
                    Space.media_deleted_at.is_(None),
                    Space.ended_at < cutoff,
                )
            )
        ).all()
        for space_id in expired:
            # The post goes with the media: no replay post links to nothing.
            await db.execute(delete(Post).where(Post.space_id == space_id, Post.kind == "replay"))
            await db.execute(update(Space).where(Space.id == space_id).values(media_deleted_at=now))
            await db.commit()
            await asyncio.to_thread(store.delete_space, space_id)
            result.expired.append(space_id)
    await asyncio.to_thread(store.remove_leftovers)
    stored = await asyncio.to_thread(store.space_ids)
    known: dict[str, tuple[str, bool]] = {}
    for i in range(0, len(stored), 500):  # bounded IN lists
        rows = await db.execute(
            select(Space.id, Space.state, Space.recorded).where(Space.id.in_(stored[i : i + 500]))
        )
        known.update({space_id: (state, recorded) for space_id, state, recorded in rows})
    if stored:
        for space_id in stored:
            if space_id not in known:
                await asyncio.to_thread(store.delete_space, space_id)
                result.orphans.append(space_id)
                continue
            state, recorded = known[space_id]
            if state == "ended" and not recorded:
                await asyncio.to_thread(store.delete_space, space_id)
                await db.execute(update(Space).where(Space.id == space_id).values(media_deleted_at=now))
                await db.commit()
                result.not_recorded.append(space_id)
    if result.expired or result.not_recorded or result.orphans:
        logger.info(
            "recording sweep",
            extra={
                "expired": len(result.expired),
                "not_recorded": len(result.not_recorded),
                "orphans": len(result.orphans),
            },
        )
    return result
