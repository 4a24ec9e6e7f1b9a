"""Behind the listener edge every request comes from the edge's address: with the edge listed in
``trusted_proxies``, per-address join limits count the client it names in X-Forwarded-For."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.spaces_support import cast, generous_config
from tests.support import running_server
from townhall.config import ConfigError
from townhall.control.node import Node

LIMITS = {"join_limit_per_address": "2/minute", "join_limit_per_network": "1000/minute"}


def _joins(url: str, space_id: str, forwarded: list[str | None]) -> list[int]:
    import httpx

    out = []
    for hop in forwarded:
        headers = {"X-Forwarded-For": hop} if hop is not None else {}
        with httpx.Client(base_url=url) as anonymous:
            out.append(anonymous.post(f"/api/v1/spaces/{space_id}/join", headers=headers).status_code)
    return out


def test_a_trusted_edge_names_the_client(tmp_path: Path) -> None:
    config = generous_config("sqlite", tmp_path / "data", trusted_proxies="127.0.0.0/8", **LIMITS)
    with running_server(config) as server:
        c = cast(server)
        # Two joins for each client; a third from the first is over its limit.
        assert _joins(server.url, c.space_id, ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"]) == [200] * 4
        assert _joins(server.url, c.space_id, ["10.0.0.1"]) == [429]
        # A chain: the nearest untrusted hop counts (the edge appended what it saw).
        assert _joins(server.url, c.space_id, ["10.0.0.9, 10.0.0.3"]) == [200]
        # A header that is not an address is not believed: the peer (127.0.0.1) counts.
        assert _joins(server.url, c.space_id, ["nonsense", "nonsense", "nonsense"]) == [200, 200, 429]


def test_an_untrusted_peer_cannot_pick_its_own_address(tmp_path: Path) -> None:
    config = generous_config("sqlite", tmp_path / "data", **LIMITS)  # no trusted proxies
    with running_server(config) as server:
        c = cast(server)
        assert _joins(server.url, c.space_id, ["10.0.0.1", "10.0.0.2", "10.0.0.3"]) == [200, 200, 429]


def test_a_bad_trusted_proxies_setting_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trusted_proxies"):
        Node.from_config(generous_config("sqlite", tmp_path / "data", trusted_proxies="10.0.0.0/33"))
