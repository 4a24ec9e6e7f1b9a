"""Moderation, for admins only."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from townhall.control.deps import Admin, DbDep, NodeDep, iso
from townhall.control.routes.accounts import account_out
from townhall.control.schemas import AccountOut, AuditOut, AuditPage, OptionalReasonBody, ReasonBody
from townhall.social import moderation

router = APIRouter(prefix="/api/v1/admin", tags=["moderation"])


@router.post("/accounts/{handle}/suspend", response_model=AccountOut)
async def suspend(handle: str, body: ReasonBody, admin: Admin, node: NodeDep, db: DbDep) -> AccountOut:
    """Suspend an account: it can log in and read, but not post, host, speak or follow, and
    its posts are hidden from others until it is reinstated."""
    account, outcome = await moderation.suspend(
        db, handle, body.reason, actor=admin.account, now=node.clock()
    )
    await node.publish(outcome)
    return account_out(account)


@router.post("/accounts/{handle}/reinstate", response_model=AccountOut)
async def reinstate(
    handle: str, admin: Admin, node: NodeDep, db: DbDep, body: OptionalReasonBody | None = None
) -> AccountOut:
    reason = body.reason if body else None
    account = await moderation.reinstate(db, handle, reason, actor=admin.account, now=node.clock())
    return account_out(account)


@router.get("/audit", response_model=AuditPage)
async def audit(
    admin: Admin,
    db: DbDep,
    cursor: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
) -> AuditPage:
    """The audit log, newest first."""
    rows, next_cursor = await moderation.audit_log(db, cursor=cursor, limit=limit)
    return AuditPage(
        entries=[
            AuditOut(
                id=r.entry.id,
                at=iso(r.entry.at),
                actor=r.actor,
                action=r.entry.action,
                target=r.target,
                reason=r.entry.reason,
                detail=r.entry.detail,
            )
            for r in rows
        ],
        next_cursor=next_cursor,
    )
