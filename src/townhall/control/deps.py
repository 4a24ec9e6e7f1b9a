"""Request-scoped dependencies: the node, a database session, the caller."""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import weakref
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from townhall.audience.replay import Replays
from townhall.control.node import Node
from townhall.errors import Forbidden, TooManyRequests, Unauthorized
from townhall.social.accounts import Principal, resolve_token
from townhall.storage.media_store import LocalMediaStore, MediaStore

_bearer = HTTPBearer(auto_error=False, description="A token from POST /api/v1/sessions")


async def get_node(request: Request) -> Node:
    # async on purpose: FastAPI runs a plain ``def`` dependency in its thread pool, a round trip
    # to a worker thread on every request for an attribute read.
    node: Node = request.app.state.node
    return node


NodeDep = Annotated[Node, Depends(get_node)]


async def get_db(node: NodeDep) -> AsyncIterator[AsyncSession]:
    async with node.database.session() as session:
        yield session


DbDep = Annotated[AsyncSession, Depends(get_db)]


def media_store(node: Node) -> MediaStore:
    """The node's media store: ``node.media_store`` once the node carries one, else local
    files under ``DATA/media`` (made once per node)."""
    store: MediaStore | None = getattr(node, "media_store", None)
    if store is None:
        store = _local_stores.get(node.config.data)
        if store is None:
            store = _local_stores[node.config.data] = LocalMediaStore(node.config.data / "media")
    return store


def replays(node: Node) -> Replays:
    """The node's replays (a small cache of finished ones over its media store)."""
    found = _replays.get(id(node))
    if found is None:
        found = _replays[id(node)] = Replays(media_store(node), node.config.hls_part_seconds)
        weakref.finalize(node, _replays.pop, id(node), None)
    return found


_local_stores: dict[object, MediaStore] = {}
_replays: dict[int, Replays] = {}


async def get_media_store(node: NodeDep) -> MediaStore:
    return media_store(node)


async def get_replays(node: NodeDep) -> Replays:
    return replays(node)


MediaStoreDep = Annotated[MediaStore, Depends(get_media_store)]
ReplaysDep = Annotated[Replays, Depends(get_replays)]


def client_address(request: Request) -> str:
    """Who is asking, for per-address limits. The peer's address; but when the peer is a
    trusted proxy (``trusted_proxies``: the listener edge, a load balancer), the address it
    reports in ``X-Forwarded-For`` — the nearest one, reading from the right, that is not
    itself a trusted proxy. Behind an edge every request would otherwise share its address."""
    peer = request.client.host if request.client else "unknown"
    node: Node = request.app.state.node
    trusted = trusted_networks(node.config.trusted_proxies)
    if not trusted or not _within(peer, trusted):
        return peer
    hops = [h.strip() for h in request.headers.get("x-forwarded-for", "").split(",") if h.strip()]
    for hop in reversed(hops):
        inside = _within(hop, trusted)
        if inside is None:
            return peer  # not an address: the header is not to be believed
        if not inside:
            return hop
    return hops[0] if hops else peer


@functools.lru_cache(maxsize=8)
def trusted_networks(spec: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(x.strip(), strict=False) for x in spec.split(",") if x.strip())


def _within(address: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool | None:
    """Whether ``address`` is in one of ``networks``; None if it is not an IP address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    return any(ip in n for n in networks)


async def optional_principal(
    node: NodeDep,
    db: DbDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    request: Request,
) -> Principal | None:
    if credentials is None:
        if request.headers.get("authorization"):
            raise Unauthorized("Authorization must be 'Bearer <token>'", code="invalid_token")
        return None
    token = credentials.credentials
    if len(token) > 256:
        raise Unauthorized("unknown token", code="invalid_token")
    return await resolve_token(db, token, now=node.clock())


async def require_principal(
    principal: Annotated[Principal | None, Depends(optional_principal)],
) -> Principal:
    if principal is None:
        raise Unauthorized("log in first: send Authorization: Bearer <token>", code="login_required")
    return principal


async def require_admin(principal: Annotated[Principal, Depends(require_principal)]) -> Principal:
    if not principal.is_admin:
        raise Forbidden("admins only", code="admin_required")
    return principal


MaybeCaller = Annotated[Principal | None, Depends(optional_principal)]
Caller = Annotated[Principal, Depends(require_principal)]
Admin = Annotated[Principal, Depends(require_admin)]


async def enforce(node: Node, rule: str, *key: str) -> None:
    """Count one hit of ``rule`` for ``key``; 429 with Retry-After when over."""
    decision = await node.limiter.hit(rule, *key)
    if not decision.allowed:
        raise TooManyRequests(
            f"too many attempts; retry in {decision.retry_after} s",
            retry_after=decision.retry_after,
        )


def iso(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC)


def public_base(request: Request, node: Node) -> str:
    """Base of the links handed to clients: ``public_url`` when configured (behind a proxy or
    CDN), else the address this request reached."""
    if node.config.public_url:
        return node.config.public_url.rstrip("/")
    return str(request.base_url).rstrip("/")
