"""Admission on a real server: tickets and their renewal, the waiting room, limits, shedding and
attack mode, in memory and on the machine's real Redis (two nodes sharing limits and queue)."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.spaces_support import generous_config
from tests.support import Api, RunningServer, assert_error, running_server
from townhall.admission.client import AdmissionRefused, admit
from townhall.admission.limiter import LimitsLimiter
from townhall.admission.pow import solve
from townhall.admission.shedding import Priority

REDIS_URL = "redis://127.0.0.1:6379/0"
NO_LIMIT = "1000000/minute"


def live_space(server: RunningServer, host: str = "host") -> tuple[Api, str]:
    api = server.client().user(host)
    space = api.post("/api/v1/spaces", json={"title": "Storm"})
    assert space.status_code == 201, space.text
    space_id = str(space.json()["id"])
    assert api.post(f"/api/v1/spaces/{space_id}/start").status_code == 200
    return api, space_id


def config(tmp_path: Path, **extra: Any) -> Any:
    return generous_config("sqlite", tmp_path / "data", **extra)


@pytest.fixture
def small(tmp_path: Path) -> Iterator[tuple[RunningServer, str]]:
    """A node that admits one listener every 20 s (burst 1) into spaces of at most 3: slow
    enough that no real second of a loaded machine frees a place; tests move the clock."""
    cfg = config(tmp_path, space_join_rate=0.05, space_join_burst=1.0, space_max_listeners=3)
    with running_server(cfg) as server:
        _, space_id = live_space(server)
        yield server, space_id


def join(api: Api, space_id: str, **body: str) -> httpx.Response:
    return api.post(f"/api/v1/spaces/{space_id}/join", json=body or None)


# -- tickets -------------------------------------------------------------------------------------


def test_a_join_issues_a_compact_ticket_and_a_renewal_trades_it_for_a_fresh_one(
    small: tuple[RunningServer, str],
) -> None:
    server, space_id = small
    anon = server.client()
    r = join(anon, space_id)
    assert r.status_code == 200, r.text
    first = r.json()
    assert len(first["ticket"]) < 160 and r.headers["cache-control"] == "private, no-store"
    server.clock.advance(300)
    renewed = anon.post(f"/api/v1/spaces/{space_id}/tickets/renew", json={"ticket": first["ticket"]})
    assert renewed.status_code == 200, renewed.text
    second = renewed.json()
    assert second["listener"] == first["listener"] and second["ticket"] != first["ticket"]
    assert second["expires_at"] > first["expires_at"]
    assert f"Path=/hls/{space_id}/" in renewed.headers["set-cookie"]
    # The fresh ticket opens the space's media (past the ticket check: the playlist, or 503
    # while the stream has no first part yet).
    media = anon.get(f"/hls/{space_id}/live.m3u8", params={"ticket": second["ticket"]})
    assert media.status_code in (200, 503), media.text
    # A renewal moves the listener: the space still counts one live ticket, not two.
    assert (
        server.node.admission.store.counters[space_id].active_count(  # type: ignore[attr-defined]
            server.node.admission.space_cap, server.clock()
        )
        == 1
    )


def test_forged_expired_and_other_space_tickets_are_refused_by_renewal(
    small: tuple[RunningServer, str],
) -> None:
    server, space_id = small
    anon = server.client()
    _, other = live_space(server, "host2")
    ticket = join(anon, space_id).json()["ticket"]
    renew = f"/api/v1/spaces/{space_id}/tickets/renew"
    kid, body, mac = ticket.split(".")
    forged = f"{kid}.{body}.{mac[:-2]}{'AA' if not mac.endswith('AA') else 'BB'}"
    assert_error(anon.post(renew, json={"ticket": forged}), 403, "invalid_ticket")
    assert_error(anon.post(renew, json={"ticket": "nonsense"}), 403, "invalid_ticket")
    assert_error(anon.post(renew, json={}), 403, "ticket_required")
    assert_error(
        anon.post(f"/api/v1/spaces/{other}/tickets/renew", json={"ticket": ticket}), 403, "wrong_space"
    )
    server.clock.advance(601)
    assert_error(anon.post(renew, json={"ticket": ticket}), 403, "ticket_expired")


def test_a_renewal_is_refused_once_the_space_has_ended(small: tuple[RunningServer, str]) -> None:
    server, space_id = small
    anon = server.client()
    host = server.client().login("host")
    ticket = join(anon, space_id).json()["ticket"]
    assert server.client(host).post(f"/api/v1/spaces/{space_id}/end").status_code == 200
    r = anon.post(f"/api/v1/spaces/{space_id}/tickets/renew", json={"ticket": ticket})
    assert_error(r, 409, "space_ended")
    assert_error(join(anon, space_id), 409, "space_ended")


# -- waiting room --------------------------------------------------------------------------------


def test_over_capacity_joins_wait_in_order_and_are_admitted_as_capacity_frees(
    small: tuple[RunningServer, str],
) -> None:
    server, space_id = small
    people = [server.client() for _ in range(5)]
    assert join(people[0], space_id).status_code == 200
    waiting: list[dict[str, Any]] = []
    for n, person in enumerate(people[1:], start=1):
        r = join(person, space_id)
        assert r.status_code == 202, r.text
        body = r.json()
        assert body["position"] == n and int(r.headers["retry-after"]) == body["retry_after"] >= 1
        assert body["estimated_wait_seconds"] == pytest.approx(20 * n, abs=0.01)  # 1 join/20 s
        waiting.append(body)
    positions: list[list[int]] = [[w["position"]] for w in waiting]
    admitted: list[int] = []
    for _ in range(8):
        server.clock.advance(20.0)
        for i, w in enumerate(waiting):
            if i in admitted:
                continue
            r = join(people[i + 1], space_id, queue_token=w["queue_token"])
            if r.status_code == 200:
                admitted.append(i)
            else:
                assert r.status_code == 202, r.text
                positions[i].append(r.json()["position"])
                assert r.json()["queue_token"] == w["queue_token"]
    # The space holds 3: the first joiner and the first two waiters, in arrival order.
    assert admitted == [0, 1]
    for p in positions:
        assert p == sorted(p, reverse=True)  # positions only go down
    assert positions[2][-1] == 1  # next, once a place frees
    # A used queue token cannot admit a second listener.
    assert_error(join(people[1], space_id, queue_token=waiting[0]["queue_token"]), 409, "queue_token_used")
    # Tickets lapse (nobody renews): the next waiter comes in.
    server.clock.advance(601)
    assert join(people[3], space_id, queue_token=waiting[2]["queue_token"]).status_code == 200


def test_forged_expired_and_other_space_queue_tokens_are_refused(small: tuple[RunningServer, str]) -> None:
    server, space_id = small
    anon = server.client()
    _, other = live_space(server, "host2")
    join(anon, space_id)
    token = join(anon, space_id).json()["queue_token"]
    kid, body, mac = token.split(".")
    forged = f"{kid}.{body[:-1]}{'A' if body[-1] != 'A' else 'B'}.{mac}"
    assert_error(join(anon, space_id, queue_token=forged), 403, "invalid_queue_token")
    assert_error(join(anon, other, queue_token=token), 403, "wrong_space")
    ticket = join(server.client(), other).json()["ticket"]
    assert_error(join(anon, space_id, queue_token=ticket), 403, "invalid_queue_token")  # not a queue token
    server.clock.advance(3601)
    assert_error(join(anon, space_id, queue_token=token), 403, "queue_token_expired")


def test_the_node_cap_queues_joins_of_every_space(tmp_path: Path) -> None:
    with running_server(config(tmp_path, node_max_listeners=2)) as server:
        _, a = live_space(server, "host")
        _, b = live_space(server, "host2")
        assert join(server.client(), a).status_code == 200
        assert join(server.client(), b).status_code == 200
        r = join(server.client(), a)
        assert r.status_code == 202 and r.json()["position"] == 1


# -- limits --------------------------------------------------------------------------------------


def test_joins_over_the_address_limit_get_429_with_retry_after(tmp_path: Path) -> None:
    with running_server(config(tmp_path, join_limit_per_address="3/minute")) as server:
        _, space_id = live_space(server)
        anon = server.client()
        assert [join(anon, space_id).status_code for _ in range(3)] == [200, 200, 200]
        r = join(anon, space_id)
        assert_error(r, 429, "rate_limited")
        assert 1 <= int(r.headers["retry-after"]) <= 60
        # Renewals have their own, higher allowance.
        ticket = join(server.client(), space_id)
        assert ticket.status_code == 429


def test_joins_are_limited_per_account(tmp_path: Path) -> None:
    with running_server(config(tmp_path, join_limit_per_account="2/minute")) as server:
        _, space_id = live_space(server)
        alice = server.client().user("alice")
        assert [join(alice, space_id).status_code for _ in range(2)] == [200, 200]
        assert_error(join(alice, space_id), 429, "rate_limited")
        assert join(server.client(), space_id).status_code == 200  # anonymous, same address


@pytest.mark.parametrize("url", [None, REDIS_URL], ids=["memory", "redis"])
def test_limits_hold_across_a_window_edge_with_no_double_burst(url: str | None) -> None:
    async def scenario() -> None:
        limiter = LimitsLimiter.from_url(url, f"t{uuid.uuid4().hex[:12]}")
        key = uuid.uuid4().hex
        # Fill the allowance just before a 2 s boundary (where a fixed window would reset).
        await asyncio.sleep((1.8 - time.time() % 2) % 2)
        for _ in range(5):
            assert (await limiter.hit("5 per 2 seconds", key)).allowed
        refused = await limiter.hit("5 per 2 seconds", key)
        assert not refused.allowed and refused.retry_after >= 1
        await asyncio.sleep(0.4)  # past the boundary: still five hits in the last 2 s
        assert not (await limiter.hit("5 per 2 seconds", key)).allowed
        await asyncio.sleep(1.8)  # the first five are now older than 2 s
        assert (await limiter.hit("5 per 2 seconds", key)).allowed
        await limiter.close()

    asyncio.run(scenario())


def test_joins_are_limited_per_slash_24_across_its_addresses(tmp_path: Path) -> None:
    cfg = config(tmp_path, join_limit_per_network="3/minute", join_limit_per_address="100/minute")
    with running_server(cfg) as server:
        _, space_id = live_space(server)

        def from_address(address: str) -> httpx.Response:
            transport = httpx.HTTPTransport(local_address=address)
            with httpx.Client(base_url=server.url, transport=transport, timeout=30) as http:
                return http.post(f"/api/v1/spaces/{space_id}/join")

        assert [from_address(f"127.0.0.{i}").status_code for i in (2, 3, 4)] == [200, 200, 200]
        assert_error(from_address("127.0.0.5"), 429, "rate_limited")  # same /24, new address
        assert from_address("127.0.1.2").status_code == 200  # the next /24 has its own


def test_a_few_addresses_cannot_fill_the_waiting_room_ahead_of_others(
    small: tuple[RunningServer, str],
) -> None:
    """Anonymous joins that would queue take at most ``queue_limit_per_address`` (10 a minute)
    places per address; the 11th is refused before it draws a number, so the next joiner from
    elsewhere is right behind the 10th. In attack mode the proof comes before any place."""
    server, space_id = small

    def from_address(address: str, token: str | None = None, **body: str) -> httpx.Response:
        transport = httpx.HTTPTransport(local_address=address)
        headers = {"authorization": f"Bearer {token}"} if token else {}
        with httpx.Client(base_url=server.url, transport=transport, timeout=30, headers=headers) as http:
            return http.post(f"/api/v1/spaces/{space_id}/join", json=body or None)

    attacker = "127.0.31.2"
    assert from_address(attacker).status_code == 200  # the space's one admission of the burst
    places = [from_address(attacker) for _ in range(10)]
    assert [r.status_code for r in places] == [202] * 10
    assert [r.json()["position"] for r in places] == list(range(1, 11))
    refused = from_address(attacker)
    assert_error(refused, 429, "rate_limited")
    assert "waiting room" in refused.json()["error"]["message"] and int(refused.headers["retry-after"]) >= 1
    counters = server.node.admission.store.counters[space_id]  # type: ignore[attr-defined]
    assert counters.arrivals == 10, "the refused join drew no arrival number"
    other = from_address("127.0.32.2")
    assert other.status_code == 202 and other.json()["position"] == 11
    # An account from the same address is limited per account, not by the address's places.
    alice = server.client().user("alice").token
    assert from_address(attacker, alice).json()["position"] == 12
    # A waiter's return is not a new place: the attacker's own tokens still work.
    back = from_address(attacker, queue_token=places[0].json()["queue_token"])
    assert back.status_code == 202 and back.json()["position"] == 1
    # Attack mode: no proof, no place (and no number drawn).
    admin = server.client(server.create_admin())
    assert admin.post("/api/v1/admin/attack-mode", json={"on": True}).json()["active"] is True
    assert_error(from_address("127.0.33.2"), 403, "pow_required")
    assert counters.arrivals == 12
    ch = httpx.get(f"{server.url}/api/v1/pow/challenge").json()
    solved = from_address(
        "127.0.34.2", pow_challenge=ch["challenge"], pow_nonce=solve(ch["challenge"], ch["difficulty"])
    )
    assert solved.status_code == 202 and solved.json()["position"] == 13


def test_a_join_storm_costs_the_database_one_read_a_second(tmp_path: Path) -> None:
    with running_server(config(tmp_path)) as server:
        _, space_id = live_space(server)
        snapshots = server.node.admission.snapshots
        anon = server.client()
        join(anon, space_id)
        reads = snapshots.reads
        start = time.monotonic()
        codes = [join(anon, space_id).status_code for _ in range(40)]
        elapsed = time.monotonic() - start
        assert codes == [200] * 40
        # One read per 0.8 s (a second's snapshot is replaced in the background at 80 % of its
        # life, so that no join waits for the read) per space at most.
        assert snapshots.reads - reads <= int(elapsed / (snapshots.AHEAD * snapshots.ttl)) + 1
        ticket = join(anon, space_id).json()["ticket"]
        reads = snapshots.reads
        for _ in range(10):
            r = anon.post(f"/api/v1/spaces/{space_id}/tickets/renew", json={"ticket": ticket})
            assert r.status_code == 200
            ticket = r.json()["ticket"]
        assert snapshots.reads - reads <= 2


def test_an_expired_or_revoked_session_cannot_join_as_its_account(tmp_path: Path) -> None:
    with running_server(config(tmp_path, session_ttl_seconds=100)) as server:
        _, space_id = live_space(server)
        bob = server.client().user("bob")
        assert join(bob, space_id).json()["listener"].startswith("a")
        server.clock.advance(101)  # past the session's life (and the join's cache of it)
        assert_error(join(bob, space_id), 401, "invalid_token")
        carol = server.client().user("carol")
        assert join(carol, space_id).status_code == 200
        assert carol.delete("/api/v1/sessions/current").status_code in (204, 200)
        server.clock.advance(6)  # a logout reaches joins within admission_session_cache_seconds
        assert_error(join(carol, space_id), 401, "invalid_token")


def test_a_blocked_listener_can_neither_join_nor_renew(tmp_path: Path) -> None:
    with running_server(config(tmp_path)) as server:
        host, space_id = live_space(server)
        bob = server.client().user("bob")
        ticket = join(bob, space_id).json()["ticket"]
        assert host.post(f"/api/v1/spaces/{space_id}/blocks", json={"handle": "bob"}).status_code == 204
        assert_error(join(bob, space_id), 403, "blocked")
        renewal = bob.post(f"/api/v1/spaces/{space_id}/tickets/renew", json={"ticket": ticket})
        assert_error(renewal, 403, "blocked")
        assert host.delete(f"/api/v1/spaces/{space_id}/blocks/bob").status_code == 204
        assert join(bob, space_id).status_code == 200


# -- shedding ------------------------------------------------------------------------------------


def _stall_loop(server: RunningServer, stop: threading.Event) -> None:
    """Saturate the node's event loop as a flood would: every turn of the loop does 6 ms of
    blocking work, so whatever waits for a turn waits over the 5 ms target."""
    loop = server.node._tasks[0].get_loop()

    def busy() -> None:
        if not stop.is_set():
            time.sleep(0.006)
            loop.call_soon(busy)

    loop.call_soon_threadsafe(busy)


def test_an_overloaded_node_sheds_anonymous_joins_first_and_never_speakers_or_hosts(tmp_path: Path) -> None:
    with running_server(config(tmp_path, shed_target_ms=5.0)) as server:  # the shipped target
        host, space_id = live_space(server)
        anon = server.client()
        stop = threading.Event()
        _stall_loop(server, stop)
        try:
            deadline = time.monotonic() + 10
            while (r := join(anon, space_id)).status_code != 503:
                assert time.monotonic() < deadline, "no join was shed under a saturated loop"
            assert_error(r, 503, "overloaded")
            assert 1 <= int(r.headers["retry-after"]) <= 5
            # A waiter coming back with its queue token is not a new join that has shown
            # nothing: at 6 ms (under the 10 ms of account joins) it reaches the join (this
            # token is forged: 403), while new anonymous joins keep being shed.
            plain, back = [], []
            for _ in range(10):
                plain.append(join(anon, space_id).status_code)
                back.append(join(anon, space_id, queue_token="forged.token.x").status_code)
            assert plain.count(503) >= 5 and back.count(403) >= 8, (plain, back)
            for _ in range(10):  # meanwhile, speakers and hosts always get through
                whip = anon.post(
                    f"/whip/{space_id}", content=b"v=0", headers={"content-type": "application/sdp"}
                )
                assert whip.status_code != 503 and whip.json()["error"]["code"] != "overloaded"
                again = host.post(f"/api/v1/spaces/{space_id}/start")
                assert_error(again, 409, "space_live")
        finally:
            stop.set()
        assert server.node.admission.shedder.shed >= 1
        metrics = anon.get("/metrics").text
        shed = [line for line in metrics.splitlines() if line.startswith("townhall_admission_shed_total")]
        assert any('class="anonymous_join"' in line and not line.endswith(" 0.0") for line in shed), shed
        time.sleep(0.3)
        assert join(anon, space_id).status_code == 200  # the overload over, joins come back


def test_under_a_real_flood_new_anonymous_joins_are_shed_first_and_pages_and_renewals_served(
    tmp_path: Path,
) -> None:
    """wrk floods the node with anonymous joins from 128 connections (loopback, 5 s) at the
    shipped 5 ms target, while a listener renews its ticket, a visitor reads the space's page
    and a host calls the API: anonymous joins are the first and by far the most shed;
    renewals, pages and host calls keep being served. The node answers the flood's joins in
    its HTTP protocol for less CPU than wrk spends sending them, so the flood alone may not
    overload it on two cores: from the second flood on, a hog on the node's event loop (busy
    8 ms in every 10) stands for the rest of an overloaded machine."""
    unlimited = {"join_limit_per_address": NO_LIMIT, "join_limit_per_network": NO_LIMIT}
    cfg = config(tmp_path, shed_target_ms=5.0, **unlimited)
    with running_server(cfg) as server:
        host, space_id = live_space(server)
        listener = server.client()
        ticket = join(listener, space_id).json()["ticket"]
        script = tmp_path / "join.lua"
        script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n')
        probes: dict[str, list[int]] = {"renew": [], "page": [], "host": []}
        shedder = server.node.admission.shedder
        # The flood must overload the node for shedding to show; how soon it does depends on
        # the machine (it once did not in 5 s beside the suite's other worker): up to 3 floods.
        target = f"{server.url}/api/v1/spaces/{space_id}/join"
        loop = server.server.servers[0].get_loop()
        hogging = threading.Event()

        def hog() -> None:
            if hogging.is_set():
                time.sleep(0.008)
                loop.call_later(0.002, hog)

        for attempt in range(3):
            if attempt == 1:
                hogging.set()
                loop.call_soon_threadsafe(hog)
            flood = subprocess.Popen(
                ["wrk", "-t1", "-c128", "-d5s", "-s", str(script), target],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                time.sleep(1.0)  # the flood is on
                deadline = time.monotonic() + 3.0
                while time.monotonic() < deadline:
                    r = listener.post(f"/api/v1/spaces/{space_id}/tickets/renew", json={"ticket": ticket})
                    probes["renew"].append(r.status_code)
                    if r.status_code == 200:
                        ticket = r.json()["ticket"]
                    probes["page"].append(listener.get(f"/api/v1/spaces/{space_id}").status_code)
                    probes["host"].append(host.post(f"/api/v1/spaces/{space_id}/start").status_code)
                    time.sleep(0.02)
            finally:
                out, _ = flood.communicate(timeout=30)
            assert "requests in" in out, out
            if shedder.shed_by_class.get(Priority.ANONYMOUS_JOIN, 0) >= 10:
                break
        hogging.clear()
        by_class = dict(shedder.shed_by_class)
        anonymous = by_class.get(Priority.ANONYMOUS_JOIN, 0)
        assert anonymous >= 10, (by_class, out)  # the flood overloaded the node
        others = sum(n for p, n in by_class.items() if p is not Priority.ANONYMOUS_JOIN)
        assert others * 20 <= anonymous, by_class
        first = shedder.first_shed_at
        assert first[Priority.ANONYMOUS_JOIN] == min(first.values()), first
        assert set(probes["host"]) == {409}, probes  # never shed: "already live"
        for what in ("renew", "page"):
            # Served; on a machine so loaded that the delay stands past 50-100 ms, a page or a
            # renewal may be shed too (by design), but never more than one in ten here.
            assert probes[what] and set(probes[what]) <= {200, 503}, probes
            assert probes[what].count(503) <= max(1, len(probes[what]) // 10), (what, probes, by_class)


# -- attack mode ---------------------------------------------------------------------------------


def test_attack_mode_requires_a_proof_of_work_of_anonymous_joins(tmp_path: Path) -> None:
    with running_server(config(tmp_path, pow_base_bits=8)) as server:
        _, space_id = live_space(server)
        admin = server.client(server.create_admin())
        anon = server.client()
        assert join(anon, space_id).status_code == 200  # not under attack: no proof needed
        on = admin.post("/api/v1/admin/attack-mode", json={"on": True, "seconds": 3600})
        assert on.status_code == 200 and on.json()["active"] is True, on.text
        assert_error(anon.post("/api/v1/admin/attack-mode", json={"on": False}), 401, "login_required")
        assert_error(join(anon, space_id), 403, "pow_required")
        ch = anon.get("/api/v1/pow/challenge").json()
        assert ch["difficulty"] == 8 and ch["attack_mode"] is True
        nonce = solve(ch["challenge"], ch["difficulty"])
        wrong = next(str(i) for i in range(1000) if str(i) != nonce and _bits(ch["challenge"], str(i)) < 8)
        assert_error(join(anon, space_id, pow_challenge=ch["challenge"], pow_nonce=wrong), 403, "pow_wrong")
        ok = join(anon, space_id, pow_challenge=ch["challenge"], pow_nonce=nonce)
        assert ok.status_code == 200, ok.text
        again = join(anon, space_id, pow_challenge=ch["challenge"], pow_nonce=nonce)
        assert_error(again, 403, "pow_reused")
        assert join(server.client().user("alice"), space_id).status_code == 200  # accounts need none
        server.clock.advance(121)
        assert_error(join(anon, space_id, pow_challenge=ch["challenge"], pow_nonce=nonce), 403, "pow_expired")
        assert admin.post("/api/v1/admin/attack-mode", json={"on": None}).json()["active"] is False
        assert join(anon, space_id).status_code == 200


def test_the_client_solves_the_proof_waits_its_turn_and_gets_a_ticket(tmp_path: Path) -> None:
    """``admission.client.admit`` (what ``townhall listen`` joins with) against a node in attack
    mode whose space is at its join rate: a proof, a place in the queue, then a ticket."""
    cfg = config(tmp_path, pow_base_bits=8, space_join_rate=0.05, space_join_burst=1.0)
    with running_server(cfg) as server:
        _, space_id = live_space(server)
        admin = server.client(server.create_admin())
        assert admin.post("/api/v1/admin/attack-mode", json={"on": True}).json()["active"] is True
        assert join(server.client().user("alice"), space_id).status_code == 200  # takes the burst
        positions: list[int] = []
        slept: list[float] = []

        async def scenario() -> dict[str, Any]:
            async def advance(seconds: float) -> None:  # the server's clock, not a real sleep
                slept.append(seconds)
                server.clock.advance(seconds)

            async with httpx.AsyncClient(timeout=30) as http:
                return await admit(
                    http,
                    f"{server.url}/api/v1/spaces/{space_id}/join",
                    on_wait=lambda position, _wait: positions.append(position),
                    sleep=advance,
                )

        joined = asyncio.run(scenario())
        assert joined["listener"].startswith("g") and joined["ticket"]
        assert positions == [1] and slept == [20.0]  # one join per 20 s: next in 20 s

        async def refused() -> None:
            async with httpx.AsyncClient(timeout=30) as http:
                await admit(http, f"{server.url}/api/v1/spaces/nosuchspace/join")

        with pytest.raises(AdmissionRefused) as info:
            asyncio.run(refused())
        assert info.value.status == 404 and info.value.code == "space_not_found"


def _bits(challenge: str, nonce: str) -> int:
    from townhall.admission.pow import digest, leading_zero_bits

    return leading_zero_bits(digest(challenge, nonce))


def test_attack_mode_switches_itself_on_when_refusals_pass_the_threshold(tmp_path: Path) -> None:
    cfg = config(tmp_path, join_limit_per_address="2/minute", attack_threshold_per_second=2.0)
    with running_server(cfg) as server:
        _, space_id = live_space(server)
        admin = server.client(server.create_admin())
        anon = server.client()
        codes = [join(anon, space_id).status_code for _ in range(30)]
        assert codes[:2] == [200, 200] and set(codes[2:]) == {429}
        state = admin.get("/api/v1/admin/attack-mode").json()
        assert state["active"] is True and state["refused_total"] >= 28 and state["difficulty"] >= 14


def test_the_challenge_and_the_solved_join_are_in_the_openapi_document(tmp_path: Path) -> None:
    with running_server(config(tmp_path)) as server:
        doc = server.client().get("/openapi.json").json()
        assert "/api/v1/pow/challenge" in doc["paths"]
        join_op = doc["paths"]["/api/v1/spaces/{space_id}/join"]["post"]
        assert {"200", "202", "403", "429", "503"} <= set(join_op["responses"])
        fields = doc["components"]["schemas"]["JoinBody"]["properties"]
        assert {"queue_token", "pow_challenge", "pow_nonce"} <= set(fields)
        assert "/api/v1/spaces/{space_id}/tickets/renew" in doc["paths"]


# -- Redis: two nodes share limits and the queue -------------------------------------------------


def test_two_nodes_on_redis_share_the_limits_and_the_waiting_room(tmp_path: Path) -> None:
    limit = "8/minute"
    cfg = config(
        tmp_path,
        redis_url=REDIS_URL,
        redis_prefix=f"t{uuid.uuid4().hex[:12]}",  # this run's keys apart from any other's
        space_join_rate=0.01,
        space_join_burst=1.0,
        join_limit_per_address=limit,
    )
    allowed = 8
    with ExitStack() as stack:
        a = stack.enter_context(running_server(cfg))
        b = stack.enter_context(running_server(cfg))
        _, space_id = live_space(a)
        on_a, on_b = a.client(), b.client()
        assert join(on_a, space_id).status_code == 200
        first = join(on_b, space_id)
        second = join(on_a, space_id)
        assert (first.status_code, second.status_code) == (202, 202)
        assert (first.json()["position"], second.json()["position"]) == (1, 2)  # one queue
        for clock in (a.clock, b.clock):
            clock.advance(100.0)
        assert join(on_b, space_id, queue_token=first.json()["queue_token"]).status_code == 200
        used = join(on_a, space_id, queue_token=first.json()["queue_token"])
        assert_error(used, 409, "queue_token_used")  # admitted on b, refused on a
        later = join(on_a, space_id, queue_token=second.json()["queue_token"])
        assert later.status_code == 202 and later.json()["position"] == 1
        # The address limit counts joins on both nodes together (3 fresh joins so far).
        codes = [join(on_a if i % 2 else on_b, space_id).status_code for i in range(allowed - 3)]
        assert 429 not in codes
        assert_error(join(on_a, space_id), 429, "rate_limited")
        assert_error(join(on_b, space_id), 429, "rate_limited")


def test_a_second_server_process_shares_the_queue_and_the_limits_on_redis(tmp_path: Path) -> None:
    """As deployed: `townhall serve` in its own process beside a node, on one Redis (and one
    SQLite file and key set through the shared data directory)."""
    from tests.test_cli import free_port, start, stop, wait_healthy

    prefix = f"t{uuid.uuid4().hex[:12]}"
    settings: dict[str, Any] = {
        "redis_url": REDIS_URL,
        "redis_prefix": prefix,
        "space_join_rate": 0.01,
        "space_join_burst": 1.0,
        "join_limit_per_address": "6/minute",
    }
    with running_server(config(tmp_path, **settings)) as a:
        port = free_port()
        env = {f"TOWNHALL_{k.upper()}": str(v) for k, v in settings.items()}
        proc = start(["serve", "--port", str(port), "--data", str(tmp_path / "data")], env)
        try:
            b_url = f"http://127.0.0.1:{port}"
            wait_healthy(b_url, proc, 60)
            _, space_id = live_space(a)
            on_a = a.client()
            with Api(b_url) as on_b:
                assert join(on_a, space_id).status_code == 200
                first, second = join(on_b, space_id), join(on_a, space_id)
                assert (first.status_code, second.status_code) == (202, 202), (first.text, second.text)
                assert (first.json()["position"], second.json()["position"]) == (1, 2)
                a.clock.advance(100.0)  # a's clock moves the shared bucket on: the first is released
                assert join(on_a, space_id, queue_token=first.json()["queue_token"]).status_code == 200
                assert_error(
                    join(on_b, space_id, queue_token=first.json()["queue_token"]), 409, "queue_token_used"
                )
                assert join(on_b, space_id, queue_token=second.json()["queue_token"]).json()["position"] == 1
                # Fresh joins so far: 3 of the address's 6 a minute, counted across both processes.
                assert [join(on_b, space_id).status_code for _ in range(3)] == [202, 202, 202]
                assert_error(join(on_a, space_id), 429, "rate_limited")
                assert_error(join(on_b, space_id), 429, "rate_limited")
        finally:
            stop(proc)
