"""Which local addresses WebRTC peers offer as ICE host candidates.

aioice gathers every interface address except loopback. A node serving only on 127.0.0.1 (the
embedded default, tests, load tests) must keep its media on loopback too, and an operator may
want to pin media to one interface; ``Config.media_addresses`` says which. aioice has no
setting for this, so the module-level gatherer it calls is replaced, once per process, by one
that honours the list (empty: aioice's own behaviour).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence

import aioice.ice

_original: Callable[[bool, bool], list[str]] = aioice.ice.get_host_addresses
_allowed: list[str] = []


def _gather(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    if not _allowed:
        return _original(use_ipv4, use_ipv6)
    out = []
    for address in _allowed:
        version = ipaddress.ip_address(address).version
        if (version == 4 and use_ipv4) or (version == 6 and use_ipv6):
            out.append(address)
    return out


def restrict_host_addresses(addresses: Sequence[str]) -> None:
    """Offer only ``addresses`` as host candidates (empty: every interface but loopback)."""
    for address in addresses:
        ipaddress.ip_address(address)  # ValueError on anything that is not an IP address
    _allowed[:] = list(addresses)
    aioice.ice.get_host_addresses = _gather


def media_addresses_for(configured: str, listen_host: str) -> list[str]:
    """The configured list, or loopback when the node itself only listens on loopback."""
    listed = [a.strip() for a in configured.split(",") if a.strip()]
    if listed:
        return listed
    try:
        if ipaddress.ip_address(listen_host).is_loopback:
            return [listen_host]
    except ValueError:
        if listen_host == "localhost":
            return ["127.0.0.1"]
    return []
