"""Accounts and bearer sessions."""

from __future__ import annotations

import dataclasses

from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from townhall.errors import Conflict, NotFound, Unauthorized
from townhall.security.passwords import PasswordHasher
from townhall.security.tokens import new_token, token_digest
from townhall.social.text import check_password, handle_key, normalize_handle
from townhall.storage.models import Account, Session


@dataclasses.dataclass(frozen=True)
class Principal:
    """The account behind a request and the session it used."""

    account: Account
    session_id: int

    @property
    def is_admin(self) -> bool:
        return self.account.is_admin

    @property
    def is_suspended(self) -> bool:
        return self.account.suspended_at is not None


async def create_account(
    db: AsyncSession,
    hasher: PasswordHasher,
    handle: str,
    password: str,
    *,
    now: float,
    is_admin: bool = False,
) -> Account:
    """Register ``handle``; 409 if it exists in any letter case."""
    handle = normalize_handle(handle)
    check_password(password)
    key = handle_key(handle)
    if await db.scalar(select(Account.id).where(Account.handle_key == key)) is not None:
        raise Conflict(f"handle {handle!r} is taken", code="handle_taken")
    account = Account(
        handle=handle,
        handle_key=key,
        password_hash=await hasher.hash(password),
        is_admin=is_admin,
        created_at=now,
    )
    db.add(account)
    try:
        await db.commit()
    except IntegrityError as exc:  # lost a race with a concurrent registration
        await db.rollback()
        raise Conflict(f"handle {handle!r} is taken", code="handle_taken") from exc
    return account


# The statements of the hot reads are built once, with bound parameters, and reused: building
# an ORM select per call (attribute comparisons, coercions, a fresh cache key) cost more than
# running it. Each still goes through SQLAlchemy's compiled cache like any other statement.
_ACCOUNT_BY_KEY = select(Account).where(Account.handle_key == bindparam("key"))
_FOLLOW_COUNTS = select(Account.followers_count, Account.following_count).where(
    Account.id == bindparam("account_id")
)


def _lookup_key(handle: str) -> str:
    """The handle key to look ``handle`` up by; 404 for what no handle can be."""
    if not isinstance(handle, str) or len(handle) > 15:
        raise NotFound("no such account", code="account_not_found")
    return handle_key(handle)


async def get_account(db: AsyncSession, handle: str) -> Account:
    """The account with this handle in any letter case, or 404."""
    account = await db.scalar(_ACCOUNT_BY_KEY, {"key": _lookup_key(handle)})
    if account is None:
        raise NotFound("no such account", code="account_not_found")
    return account


async def get_account_with_counts(db: AsyncSession, handle: str) -> tuple[Account, tuple[int, int]]:
    """``get_account`` with its (followers, following): stored counters, one row read."""
    account = await get_account(db, handle)
    return account, (account.followers_count, account.following_count)


async def follow_counts(db: AsyncSession, account_id: int) -> tuple[int, int]:
    """(followers, following) of an account, from its stored counters."""
    row = (await db.execute(_FOLLOW_COUNTS, {"account_id": account_id})).one()
    return int(row[0]), int(row[1])


async def open_session(
    db: AsyncSession,
    hasher: PasswordHasher,
    handle: str,
    password: str,
    *,
    now: float,
    ttl: float,
) -> tuple[str, Session]:
    """Check the password and return a new bearer token (shown once) with its session."""
    account = None
    if isinstance(handle, str) and len(handle) <= 15:
        account = await db.scalar(select(Account).where(Account.handle_key == handle_key(handle)))
    ok = await hasher.verify(account.password_hash if account else None, password)
    if account is None or not ok:
        raise Unauthorized("wrong handle or password", code="bad_credentials")
    token = new_token()
    session = Session(
        account_id=account.id, token_hash=token_digest(token), created_at=now, expires_at=now + ttl
    )
    db.add(session)
    await db.commit()
    return token, session


async def resolve_token(db: AsyncSession, token: str, *, now: float) -> Principal:
    """The principal of a live session, or 401 naming why."""
    row = (
        await db.execute(
            select(Session, Account)
            .join(Account, Account.id == Session.account_id)
            .where(Session.token_hash == token_digest(token))
        )
    ).first()
    if row is None:
        raise Unauthorized("unknown token", code="invalid_token")
    session, account = row
    if session.revoked_at is not None:
        raise Unauthorized("this session was logged out", code="token_revoked")
    if session.expires_at <= now:
        raise Unauthorized("this session has expired; log in again", code="token_expired")
    return Principal(account=account, session_id=session.id)


async def revoke_session(db: AsyncSession, session_id: int, *, now: float) -> None:
    await db.execute(
        update(Session).where(Session.id == session_id, Session.revoked_at.is_(None)).values(revoked_at=now)
    )
    await db.commit()
