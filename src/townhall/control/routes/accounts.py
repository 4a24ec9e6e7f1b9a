"""Accounts, sessions, follows."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from townhall.control.deps import Caller, DbDep, NodeDep, client_address, enforce, iso
from townhall.control.schemas import AccountOut, Credentials, LoginBody, SessionOut
from townhall.social import accounts, posts
from townhall.social.text import handle_key
from townhall.storage.models import Account

router = APIRouter(prefix="/api/v1", tags=["accounts"])


def account_out(account: Account, counts: tuple[int, int] | None = None) -> AccountOut:
    return AccountOut(
        id=account.id,
        handle=account.handle,
        created_at=iso(account.created_at),
        is_admin=account.is_admin,
        suspended=account.suspended_at is not None,
        followers=counts[0] if counts else None,
        following=counts[1] if counts else None,
    )


@router.post("/accounts", status_code=201, response_model=AccountOut)
async def register(body: Credentials, request: Request, node: NodeDep, db: DbDep) -> AccountOut:
    """Create an account. Handles are unique in any letter case."""
    await enforce(node, node.config.signup_limit_per_address, "signup", client_address(request))
    account = await accounts.create_account(db, node.hasher, body.handle, body.password, now=node.clock())
    return account_out(account, (0, 0))


@router.get("/accounts/{handle}", response_model=AccountOut)
async def show_account(handle: str, db: DbDep) -> AccountOut:
    account, counts = await accounts.get_account_with_counts(db, handle)
    return account_out(account, counts)


@router.get("/me", response_model=AccountOut)
async def me(caller: Caller, db: DbDep) -> AccountOut:
    return account_out(caller.account, await accounts.follow_counts(db, caller.account.id))


@router.post("/sessions", response_model=SessionOut)
async def log_in(body: LoginBody, request: Request, node: NodeDep, db: DbDep) -> SessionOut:
    """Exchange a handle and password for a bearer token. Attempts are limited per account
    and per address, counted before the password is checked."""
    await enforce(node, node.config.login_limit_per_address, "login-addr", client_address(request))
    await enforce(node, node.config.login_limit_per_account, "login-acct", handle_key(body.handle))
    token, session = await accounts.open_session(
        db,
        node.hasher,
        body.handle,
        body.password,
        now=node.clock(),
        ttl=node.config.session_ttl_seconds,
    )
    return SessionOut(token=token, expires_at=iso(session.expires_at))


@router.delete("/sessions/current", status_code=204)
async def log_out(caller: Caller, node: NodeDep, db: DbDep) -> Response:
    """Revoke the token this request carries."""
    await accounts.revoke_session(db, caller.session_id, now=node.clock())
    return Response(status_code=204)


@router.post("/accounts/{handle}/follow", status_code=204)
async def follow(handle: str, caller: Caller, node: NodeDep, db: DbDep) -> Response:
    target = await accounts.get_account(db, handle)
    await posts.follow(db, caller, target, now=node.clock())
    return Response(status_code=204)


@router.delete("/accounts/{handle}/follow", status_code=204)
async def unfollow(handle: str, caller: Caller, db: DbDep) -> Response:
    target = await accounts.get_account(db, handle)
    await posts.unfollow(db, caller, target)
    return Response(status_code=204)
