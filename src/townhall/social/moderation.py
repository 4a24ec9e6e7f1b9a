"""Suspension, reinstatement and the audit log.

Suspension marks the account; nothing it owns is touched. Every moderation action, whether from
the API (actor = the admin) or the command line (actor = null, the operator), writes one audit
entry in the same transaction as the change itself.
"""

from __future__ import annotations

import dataclasses

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from townhall.errors import Conflict, Forbidden
from townhall.social.accounts import get_account
from townhall.social.text import check_reason
from townhall.spaces.service import Outcome, revoke_account_grants
from townhall.storage.models import Account, AuditEntry
from townhall.storage.paging import keyset_page


@dataclasses.dataclass(frozen=True)
class AuditRow:
    entry: AuditEntry
    actor: str | None
    target: str | None


def audit(
    db: AsyncSession,
    *,
    now: float,
    actor: Account | None,
    action: str,
    target: Account | None = None,
    reason: str | None = None,
    detail: str | None = None,
) -> None:
    """Stage an audit entry; the caller's commit writes it with the change it records."""
    db.add(
        AuditEntry(
            at=now,
            actor_id=actor.id if actor else None,
            action=action,
            target_account_id=target.id if target else None,
            reason=reason,
            detail=detail,
        )
    )


async def suspend(
    db: AsyncSession, handle: str, reason: str, *, actor: Account | None, now: float
) -> tuple[Account, Outcome]:
    """Suspend an account; returns it and the stage events to publish (grants revoked)."""
    reason_text = check_reason(reason, required=True)
    target = await get_account(db, handle)
    if actor is not None and target.id == actor.id:
        raise Forbidden("an admin cannot suspend their own account", code="self_suspend")
    if target.suspended_at is not None:
        raise Conflict(f"{target.handle} is already suspended", code="already_suspended")
    target.suspended_at = now
    target.suspended_reason = reason_text
    audit(db, now=now, actor=actor, action="account.suspend", target=target, reason=reason_text)
    # A suspended account cannot speak: its grants go in the same transaction.
    outcome = await revoke_account_grants(db, target.id)
    await db.commit()
    return target, outcome


async def reinstate(
    db: AsyncSession, handle: str, reason: str | None, *, actor: Account | None, now: float
) -> Account:
    reason_text = check_reason(reason, required=False)
    target = await get_account(db, handle)
    if target.suspended_at is None:
        raise Conflict(f"{target.handle} is not suspended", code="not_suspended")
    target.suspended_at = None
    target.suspended_reason = None
    audit(db, now=now, actor=actor, action="account.reinstate", target=target, reason=reason_text)
    await db.commit()
    return target


async def audit_log(db: AsyncSession, *, cursor: str | None, limit: int) -> tuple[list[AuditRow], str | None]:
    """Newest first, cursor-paginated like feeds."""
    actor = aliased(Account)
    target = aliased(Account)
    query = (
        select(AuditEntry, actor.handle, target.handle)
        .outerjoin(actor, actor.id == AuditEntry.actor_id)
        .outerjoin(target, target.id == AuditEntry.target_account_id)
    )
    rows, next_cursor = await keyset_page(db, query, AuditEntry.id, cursor=cursor, limit=limit)
    return [AuditRow(r[0], r[1], r[2]) for r in rows], next_cursor
