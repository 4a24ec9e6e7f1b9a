"""A space's waiting room split over K Redis keys (``waiting_room_splits``): the shares, the
tokens that name a split, and two nodes on the machine's real Redis sharing the splits."""

from __future__ import annotations

import base64
import dataclasses
import json
import socket
import subprocess
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.spaces_support import generous_config
from tests.support import Api, assert_error, running_server
from townhall.admission import waiting_room as wr
from townhall.admission.queue_store import counters_key
from townhall.admission.tickets import TicketBook
from townhall.config import Config, ConfigError
from townhall.security.signing import Signer

REDIS_URL = "redis://127.0.0.1:6379/0"
NO_LIMIT = "1000000/minute"
KEY = {"k1": bytes(range(32))}
T0 = 1_800_000_000.0


def payload(token: str) -> dict[str, Any]:
    body = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))))


# -- pure ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("splits", [1, 2, 3, 7, 10])
def test_the_splits_share_the_space_s_rate_burst_and_cap_exactly(splits: int) -> None:
    whole = wr.Capacity(max_active=1_000_001, rate=2000.0, burst=300.0, ticket_ttl=600.0)
    parts = [wr.split_capacity(whole, k, splits) for k in range(splits)]
    assert sum(p.max_active for p in parts) == whole.max_active
    assert max(p.max_active for p in parts) - min(p.max_active for p in parts) <= 1
    assert sum(p.rate for p in parts) == pytest.approx(whole.rate)
    assert sum(p.burst for p in parts) == pytest.approx(whole.burst)
    assert all(p.ticket_ttl == whole.ticket_ttl for p in parts)
    ids = [f"g{n}" for n in range(3000)]
    hits = [wr.split_of(i, splits) for i in ids]
    assert hits == [wr.split_of(i, splits) for i in ids]  # stable: every node agrees
    assert set(hits) == set(range(splits))
    assert min(hits.count(k) for k in range(splits)) > 3000 / splits * 0.8  # spread evenly


def test_unsplit_tokens_and_tickets_are_byte_for_byte_what_they_were() -> None:
    signer = Signer(KEY, wr.QUEUE_PURPOSE)
    text, token = wr.QueueTokenBook(signer, 3600).issue("abc", 7, T0)
    assert text == signer.sign({"s": "abc", "n": 7, "t": T0, "e": T0 + 3600})
    assert (token.split, token.splits) == (None, 1)
    split_text, _ = wr.QueueTokenBook(signer, 3600).issue("abc", 7, T0, 2, 3)
    checked = wr.QueueTokenBook(signer, 3600).check(split_text, "abc", T0)
    assert (checked.number, checked.split, checked.splits) == (7, 2, 3)
    tickets = TicketBook(Signer(KEY, "townhall listener ticket v1"), 600)
    plain, _ = tickets.issue("abc", "a1", T0)
    assert plain == tickets.signer.sign({"s": "abc", "l": "a1", "e": T0 + 600})
    assert tickets.check(plain, "abc", T0).split is None
    assert tickets.check(tickets.issue("abc", "a1", T0, 1)[0], "abc", T0).split == 1


def test_a_split_s_keys_share_a_cluster_slot_and_the_unsplit_key_is_unchanged() -> None:
    assert counters_key("abc", None) == "abc"
    assert counters_key("abc", 2) == "{abc:s2}"  # hash tag: the split and its :used bitmap


# -- two nodes on Redis --------------------------------------------------------------------------


def split_config(tmp_path: Path, prefix: str, splits: int) -> Any:
    return generous_config(
        "sqlite",
        tmp_path / "data",
        redis_url=REDIS_URL,
        redis_prefix=prefix,
        waiting_room_splits=splits,
        space_join_rate=0.03,  # 0.01 a split: one release per split every 100 s
        space_join_burst=3.0,  # 1 a split
        join_limit_per_address=NO_LIMIT,
        join_limit_per_network=NO_LIMIT,
        renew_limit_per_address=NO_LIMIT,
        renew_limit_per_network=NO_LIMIT,
        queue_limit_per_address=NO_LIMIT,
        queue_limit_per_network=NO_LIMIT,
    )


def join(api: Api, space_id: str, **body: str) -> httpx.Response:
    return api.post(f"/api/v1/spaces/{space_id}/join", json=body or None)


def two_nodes_on_a_live_space(stack: ExitStack, cfg: Any, title: str) -> tuple[Any, Any, str, list[Api]]:
    """Two nodes of one configuration and a live space hosted on the first; an anonymous
    client of each node."""
    a = stack.enter_context(running_server(cfg))
    b = stack.enter_context(running_server(cfg))
    host = a.client().user("host")
    space_id = str(host.post("/api/v1/spaces", json={"title": title}).json()["id"])
    assert host.post(f"/api/v1/spaces/{space_id}/start").status_code == 200
    return a, b, space_id, [a.client(), b.client()]


def test_two_nodes_share_three_splits_each_token_returns_to_its_split_and_the_rate_is_the_space_s(
    tmp_path: Path,
) -> None:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    cfg = split_config(tmp_path, prefix, 3)
    with ExitStack() as stack:
        a, b, space_id, nodes = two_nodes_on_a_live_space(stack, cfg, "Split")
        # 60 anonymous joiners, alternately on each node, each hashed to a split by its own id.
        admitted: dict[int, int] = defaultdict(int)
        tickets: list[str] = []
        waiting: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for n in range(60):
            r = join(nodes[n % 2], space_id)
            if r.status_code == 200:
                ticket = r.json()["ticket"]
                admitted[payload(ticket)["k"]] += 1
                tickets.append(ticket)
                continue
            assert r.status_code == 202, r.text
            body = r.json()
            p = payload(body["queue_token"])
            assert p["K"] == 3
            waiting[p["k"]].append(body)
        # The burst: one admission a split, then each split numbers its own arrivals.
        assert dict(admitted) == {0: 1, 1: 1, 2: 1}
        assert sorted(waiting) == [0, 1, 2]
        for queue in waiting.values():
            assert [w["position"] for w in queue] == list(range(1, len(queue) + 1))
            assert queue[0]["estimated_wait_seconds"] == pytest.approx(100.0)  # 1 / 0.01 a split
        # Each split is its own pair of keys (a hash tag per split); the unsplit key is unused.
        r = redis.Redis.from_url(REDIS_URL)
        try:
            for k in range(3):
                assert r.exists(f"{prefix}:wr:{{{space_id}:s{k}}}")
            assert not r.exists(f"{prefix}:wr:{space_id}")
        finally:
            r.close()
        # Rounds of 100 s: every split releases one, so the fleet admits the space's 0.03/s.
        positions: dict[str, list[int]] = {
            w["queue_token"]: [w["position"]] for q in waiting.values() for w in q
        }
        done: set[str] = set()
        rounds = 3
        for round_ in range(rounds):
            for clock in (a.clock, b.clock):
                clock.advance(100.0)
            came_in: dict[int, int] = defaultdict(int)
            for k, queue in waiting.items():
                for i, w in enumerate(queue):
                    token = w["queue_token"]
                    if token in done:
                        continue
                    r = join(nodes[(i + round_) % 2], space_id, queue_token=token)
                    if r.status_code == 200:
                        assert payload(r.json()["ticket"])["k"] == k  # the ticket names the split
                        came_in[k] += 1
                        done.add(token)
                        # Admitted once: the other node refuses it.
                        assert_error(join(nodes[(i + round_ + 1) % 2], space_id, queue_token=token), 409)
                    else:
                        assert r.status_code == 202, r.text
                        positions[token].append(r.json()["position"])
            assert dict(came_in) == {0: 1, 1: 1, 2: 1}, came_in  # 3 per 100 s = the space's rate
        for seen in positions.values():
            assert seen == sorted(seen, reverse=True)  # positions only go down within a split
        for k, queue in waiting.items():  # arrival order within each split
            assert [w["queue_token"] in done for w in queue] == [True] * rounds + [False] * (
                len(queue) - rounds
            )
        # A renewal goes back to the split that counts the ticket, whichever node serves it.
        ticket = tickets[0]
        k = payload(ticket)["k"]
        renewed = nodes[1].post(f"/api/v1/spaces/{space_id}/tickets/renew", json={"ticket": ticket})
        assert renewed.status_code == 200, renewed.text
        assert payload(renewed.json()["ticket"])["k"] == k


def test_a_queue_token_from_before_a_change_of_k_is_refused_with_a_reason(tmp_path: Path) -> None:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    with ExitStack() as stack:
        three = stack.enter_context(running_server(split_config(tmp_path, prefix, 3)))
        one = stack.enter_context(running_server(split_config(tmp_path, prefix, 1)))
        host = three.client().user("host")
        space_id = str(host.post("/api/v1/spaces", json={"title": "Resplit"}).json()["id"])
        assert host.post(f"/api/v1/spaces/{space_id}/start").status_code == 200
        anon = three.client()
        tickets, queued = [], []
        for _ in range(30):
            r = join(anon, space_id)
            (tickets if r.status_code == 200 else queued).append(r.json())
        split_token = next(q["queue_token"] for q in queued if payload(q["queue_token"])["k"] == 1)
        # A ticket is handled: renewed on the unsplit node, the fresh ticket names no split.
        renewed = one.client().post(
            f"/api/v1/spaces/{space_id}/tickets/renew", json={"ticket": tickets[0]["ticket"]}
        )
        assert renewed.status_code == 200, renewed.text
        assert "k" not in payload(renewed.json()["ticket"])
        for clock in (three.clock, one.clock):
            clock.advance(1000.0)
        refused = join(one.client(), space_id, queue_token=split_token)
        assert_error(refused, 409, "queue_token_resplit")
        assert "re-split" in refused.json()["error"]["message"]
        # The other way round: an unsplit token on the three-way node.
        plain = join(one.client(), space_id)
        while plain.status_code == 200:  # the unsplit bucket's burst first
            plain = join(one.client(), space_id)
        assert plain.status_code == 202 and "K" not in payload(plain.json()["queue_token"])
        assert_error(
            join(anon, space_id, queue_token=plain.json()["queue_token"]), 409, "queue_token_resplit"
        )


@pytest.fixture
def second_redis(tmp_path: Path) -> Iterator[str]:
    """Another real Redis server on a free loopback port, for the splits to spread over."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([*args, "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
                time.sleep(0.05)
        client.close()
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_splits_live_on_the_servers_listed_split_k_on_server_k_mod_n(
    tmp_path: Path, second_redis: str
) -> None:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    servers = [REDIS_URL, second_redis]
    cfg = dataclasses.replace(split_config(tmp_path, prefix, 3), waiting_room_redis_urls=",".join(servers))
    with ExitStack() as stack:
        a, b, space_id, nodes = two_nodes_on_a_live_space(stack, cfg, "Spread")
        queued: dict[int, list[str]] = defaultdict(list)
        for n in range(40):
            r = join(nodes[n % 2], space_id)
            assert r.status_code in (200, 202), r.text
            if r.status_code == 202:
                queued[payload(r.json()["queue_token"])["k"]].append(r.json()["queue_token"])
        assert sorted(queued) == [0, 1, 2]
        clients = [redis.Redis.from_url(url) for url in servers]
        try:
            for k in range(3):
                key = f"{prefix}:wr:{{{space_id}:s{k}}}"
                assert [bool(c.exists(key)) for c in clients] == [k % 2 == 0, k % 2 == 1], k
        finally:
            for c in clients:
                c.close()
        # A waiter's return reaches its split on its server from either node: admitted once.
        a.clock.advance(100.0)
        b.clock.advance(100.0)
        token = queued[1][0]
        assert join(nodes[1], space_id, queue_token=token).status_code == 200
        assert_error(join(nodes[0], space_id, queue_token=token), 409)


def test_split_servers_without_redis_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="waiting_room_redis_urls needs redis_url"):
        Config.from_mapping({"waiting_room_redis_urls": "redis://127.0.0.1:6379/0"})
