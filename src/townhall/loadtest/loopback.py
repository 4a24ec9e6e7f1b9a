"""Which targets a load test may hit (loopback only) and which source addresses it binds.

Load is only ever sent to this machine: a target whose host is not in 127.0.0.0/8 or ``::1``
is refused before a socket is opened (a hostname is refused too, even ``localhost``: resolving
it could answer anything). Linux routes the whole of 127.0.0.0/8 to the loopback interface, so
a client can bind any 127.x.y.z as its source address, which is how a test on one machine looks
like joiners from many homes (distinct addresses and /24 networks) or like an attacker with a
few addresses.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


class NotLoopback(ValueError):
    """The target is not on this machine's loopback interface."""


def check_target(url: str) -> str:
    """The URL without a trailing slash if it is ``http://`` on loopback; ``NotLoopback`` or
    ``ValueError`` naming the reason otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    host = parts.hostname
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise NotLoopback(
            f"refusing {host!r}: a load test only targets a loopback address (127.0.0.0/8 or ::1), "
            "given as an address, not a name"
        ) from None
    if not ip.is_loopback:
        raise NotLoopback(f"refusing {host}: a load test only targets loopback (127.0.0.0/8 or ::1)")
    return url.rstrip("/")


# Legitimate joiners come from 127.100.0.0 upwards: the first 4096 addresses each in their own
# /24 (127.100.0.1, 127.100.1.1, ..., 127.115.255.1), then a second host in each, and so on.
# Attackers come from 127.66.0.0/16, so they never share a /24 with a legitimate joiner.
_LEGIT_FIRST_OCTET = 100
_NETWORKS = 4096
_ATTACK_PREFIX = (127, 66)


def legit_address(k: int) -> str:
    """The ``k``-th legitimate source address (``k`` >= 0; at most 4096 x 250)."""
    if not 0 <= k < _NETWORKS * 250:
        raise ValueError(f"source address index {k} out of range")
    net, host = k % _NETWORKS, k // _NETWORKS + 1
    return f"127.{_LEGIT_FIRST_OCTET + net // 256}.{net % 256}.{host}"


def attack_address(k: int) -> str:
    """The ``k``-th attacking source address: a few hosts in a few /24s of 127.66.0.0/16."""
    if not 0 <= k < 256 * 250:
        raise ValueError(f"attack address index {k} out of range")
    return f"{_ATTACK_PREFIX[0]}.{_ATTACK_PREFIX[1]}.{k // 250}.{k % 250 + 1}"


def address_for(index: int, pool: int) -> int:
    """Which of ``pool`` source addresses the ``index``-th client uses (round robin)."""
    return index % max(1, pool)
