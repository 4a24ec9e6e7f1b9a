"""The admission's pure cores, without sockets: waiting-room arithmetic, queue tokens, tickets
and their renewal, proof of work, attack mode, shedding classes and the CoDel controller."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest

from townhall.admission import waiting_room as wr
from townhall.admission.gate import network_of
from townhall.admission.pow import AttackMode, PowBook, PowError, leading_zero_bits, solve
from townhall.admission.queue_store import AlreadyUsed, MemoryQueueStore, RedisQueueStore
from townhall.admission.shedding import Priority, Shedder, classify
from townhall.admission.tickets import TicketBook, TicketError
from townhall.security.signing import Signer

KEY = {"k1": bytes(range(32))}
ROTATED = {"k2": bytes(range(1, 33)), "k1": bytes(range(32))}
T0 = 1_800_000_000.0
REDIS_URL = "redis://127.0.0.1:6379/0"


def cap(**kw: float) -> wr.Capacity:
    values: dict[str, float] = {"max_active": 10, "rate": 2.0, "burst": 2.0, "ticket_ttl": 600.0}
    values.update(kw)
    return wr.Capacity(int(values["max_active"]), values["rate"], values["burst"], values["ticket_ttl"])


# -- waiting room --------------------------------------------------------------------------------


def test_joins_within_the_rate_are_admitted_then_queued_in_arrival_order() -> None:
    c, k = wr.Counters(), cap()
    assert wr.join(c, k, T0, T0 + 600) == wr.Admit()
    assert wr.join(c, k, T0, T0 + 600) == wr.Admit()  # the burst of 2
    waits = [wr.join(c, k, T0, T0 + 600) for _ in range(5)]
    assert all(isinstance(w, wr.Wait) for w in waits)
    assert [w.number for w in waits if isinstance(w, wr.Wait)] == [0, 1, 2, 3, 4]
    assert [w.position for w in waits if isinstance(w, wr.Wait)] == [1, 2, 3, 4, 5]
    last = waits[-1]
    assert isinstance(last, wr.Wait)
    assert last.wait_seconds == 2.5 and last.retry_after == 3  # 5 ahead at 2/s


def test_waiters_are_admitted_in_order_as_the_rate_frees_places_and_positions_only_fall() -> None:
    c, k = wr.Counters(), cap(burst=1.0)
    assert wr.join(c, k, T0, T0 + 600) == wr.Admit()
    numbers = []
    for _ in range(4):
        w = wr.join(c, k, T0, T0 + 600)
        assert isinstance(w, wr.Wait)
        numbers.append(w.number)
    seen: dict[int, list[int]] = {n: [] for n in numbers}
    admitted_at: dict[int, float] = {}
    now = T0
    while len(admitted_at) < len(numbers):
        now += 0.1
        for n in numbers:
            if n in admitted_at:
                continue
            d = wr.claim(c, k, n, now, now + 600)
            if isinstance(d, wr.Admit):
                admitted_at[n] = now
            else:
                seen[n].append(d.position)
    assert sorted(admitted_at, key=admitted_at.__getitem__) == numbers  # arrival order
    for positions in seen.values():
        assert positions == sorted(positions, reverse=True)  # only goes down
    # 2 per second: four waiters in about two seconds
    assert admitted_at[numbers[-1]] - T0 == pytest.approx(2.0, abs=0.15)


def test_a_join_that_may_not_queue_is_told_full_and_draws_no_number() -> None:
    c, k = wr.Counters(), cap(burst=1.0, rate=1.0)
    assert wr.join(c, k, T0, T0 + 600, may_queue=False) == wr.Admit()  # room: admitted as ever
    assert wr.join(c, k, T0, T0 + 600, may_queue=False) == wr.Full()
    assert (c.arrivals, c.released) == (0, 0)  # no place taken, no rate token spent later
    w = wr.join(c, k, T0, T0 + 600)
    assert isinstance(w, wr.Wait) and (w.number, w.position) == (0, 1)
    assert wr.join(c, k, T0 + 0.5, T0 + 600, may_queue=False) == wr.Full()  # someone waits
    assert c.arrivals == 1


def test_a_newcomer_does_not_overtake_the_queue() -> None:
    c, k = wr.Counters(), cap(burst=1.0)
    wr.join(c, k, T0, T0 + 600)
    first = wr.join(c, k, T0, T0 + 600)
    assert isinstance(first, wr.Wait)
    # Half a second later a token has come back: it releases the waiter, not the newcomer.
    late = wr.join(c, k, T0 + 0.5, T0 + 600.5)
    assert isinstance(late, wr.Wait) and late.number == first.number + 1
    assert wr.claim(c, k, first.number, T0 + 0.5, T0 + 600.5) == wr.Admit()


def test_the_active_cap_holds_and_frees_as_tickets_expire() -> None:
    c, k = wr.Counters(), cap(max_active=3, rate=100.0, burst=100.0, ticket_ttl=60.0)
    assert [wr.join(c, k, T0, T0 + 60) for _ in range(3)] == [wr.Admit()] * 3
    w = wr.join(c, k, T0, T0 + 60)
    assert isinstance(w, wr.Wait) and w.position == 1
    assert isinstance(wr.claim(c, k, w.number, T0 + 30, T0 + 90), wr.Wait)  # still full
    assert c.active_count(k, T0 + 30) == 3
    assert wr.claim(c, k, w.number, T0 + 71, T0 + 131) == wr.Admit()  # the first three lapsed
    assert c.active_count(k, T0 + 71) == 1


def test_a_renewal_moves_a_listener_rather_than_adding_one() -> None:
    c, k = wr.Counters(), cap(ticket_ttl=60.0)
    wr.join(c, k, T0, T0 + 60)
    wr.renew(c, k, T0 + 60, T0 + 100, T0 + 40)
    assert c.active_count(k, T0 + 40) == 1
    assert c.active_count(k, T0 + 80) == 1  # alive past the first ticket's expiry


def test_counters_round_trip_through_a_flat_hash() -> None:
    c, k = wr.Counters(), cap()
    for _ in range(4):
        wr.join(c, k, T0, T0 + 600)
    again = wr.Counters.from_fields(c.to_fields())
    assert again == c
    assert wr.Counters.from_fields({}) == wr.Counters()


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_store_admits_an_arrival_number_once(kind: str) -> None:
    async def scenario() -> None:
        store = _store(kind)
        k = cap(burst=1.0, rate=1.0)
        try:
            assert await store.join("s", k, T0, T0 + 600, elsewhere_ok=True) == wr.Admit()
            w = await store.join("s", k, T0, T0 + 600, elsewhere_ok=True)
            assert isinstance(w, wr.Wait) and w.position == 1
            n = w.number
            assert await store.claim("s", k, n, T0 + 2, T0 + 602, elsewhere_ok=True) == wr.Admit()
            with pytest.raises(AlreadyUsed):
                await store.claim("s", k, n, T0 + 3, T0 + 603, elsewhere_ok=True)
        finally:
            await store.close()

    asyncio.run(scenario())


def _store(kind: str) -> MemoryQueueStore | RedisQueueStore:
    if kind == "memory":
        return MemoryQueueStore()
    return RedisQueueStore(REDIS_URL, f"t{uuid.uuid4().hex[:12]}:wr:")


def test_the_redis_script_is_the_pure_arithmetic() -> None:
    """The same random sequence of joins, returns, renewals and lapses of time on the pure
    core (memory) and on the Redis script: the same decisions and the same counters."""

    async def scenario() -> None:
        memory, redis = MemoryQueueStore(), RedisQueueStore(REDIS_URL, f"t{uuid.uuid4().hex[:12]}:wr:")
        rng = random.Random(7)
        k = wr.Capacity(max_active=25, rate=3.0, burst=4.0, ticket_ttl=60.0, bucket_seconds=10.0)
        now, waiting, tickets = T0, [], []
        seen: set[str] = set()
        try:
            for step in range(400):
                now += rng.choice([0.0, 0.05, 0.3, 1.0, 7.0])
                roll = rng.random()
                ok = rng.random() > 0.1
                queue = rng.random() > 0.2  # a join that may not take a place unless it fits
                if roll < 0.45:
                    got = [
                        await s.join("s", k, now, now + 60, elsewhere_ok=ok, may_queue=queue)
                        for s in (memory, redis)
                    ]
                    if isinstance(got[0], wr.Wait):
                        waiting.append(got[0].number)
                    elif isinstance(got[0], wr.Admit):
                        tickets.append(now + 60)
                elif roll < 0.8 and waiting:
                    n = rng.choice(waiting)
                    got = []
                    for s in (memory, redis):
                        try:
                            got.append(await s.claim("s", k, n, now, now + 60, elsewhere_ok=ok))
                        except AlreadyUsed:
                            got.append(None)
                    if isinstance(got[0], wr.Admit):
                        tickets.append(now + 60)
                elif tickets:
                    old = tickets.pop(rng.randrange(len(tickets)))
                    for s in (memory, redis):
                        await s.renew("s", k, old, now + 60, now)
                    tickets.append(now + 60)
                    got = [None, None]
                else:
                    continue
                assert got[0] == got[1], (step, got)
                seen.add(f"{roll < 0.45}-{type(got[0]).__name__}")
                mine, theirs = memory.counters["s"], await redis.counters("s")
                assert (mine.arrivals, mine.released, mine.active) == (
                    theirs.arrivals,
                    theirs.released,
                    theirs.active,
                )
                assert mine.tokens == pytest.approx(theirs.tokens, abs=1e-9), step
            # Every path was taken: admitted and queued joins, admitted, waiting and reused returns.
            assert seen >= {
                "True-Admit",
                "True-Wait",
                "True-Full",
                "False-Admit",
                "False-Wait",
                "False-NoneType",
            }, seen
        finally:
            await redis.close()

    asyncio.run(scenario())


def test_queue_tokens_are_bound_to_their_space_signature_and_life() -> None:
    book = wr.QueueTokenBook(Signer(KEY, wr.QUEUE_PURPOSE), ttl=100)
    text, token = book.issue("abc", 7, T0)
    assert book.check(text, "abc", T0 + 50) == token
    with pytest.raises(wr.QueueTokenError) as info:
        book.check(text, "other", T0)
    assert info.value.code == "wrong_space"
    with pytest.raises(wr.QueueTokenError) as info:
        book.check(text, "abc", T0 + 100)
    assert info.value.code == "queue_token_expired"
    kid, body, mac = text.split(".")
    forged = f"{kid}.{body[:-2]}AA.{mac}"
    with pytest.raises(wr.QueueTokenError) as info:
        book.check(forged, "abc", T0)
    assert info.value.code == "invalid_queue_token"
    # A ticket is not a queue token (the purpose is in the MAC), even under the same key.
    ticket, _ = TicketBook(Signer(KEY, "townhall listener ticket v1"), 600).issue("abc", "a1", T0)
    with pytest.raises(wr.QueueTokenError):
        book.check(ticket, "abc", T0)


def test_tickets_verify_across_a_key_rotation_and_refuse_tampering() -> None:
    old = TicketBook(Signer(KEY, "townhall listener ticket v1"), 600)
    new = TicketBook(Signer(ROTATED, "townhall listener ticket v1"), 600)
    text, ticket = old.issue("abc", "g123", T0)
    assert new.check(text, "abc", T0 + 1) == ticket  # signed by k1, k2 now signs
    assert new.issue("abc", "g123", T0)[0].startswith("k2.")
    assert len(text) < 160  # compact: fits a cookie and a URL comfortably
    with pytest.raises(TicketError) as info:
        kid, body, mac = text.split(".")
        old.check(f"{kid}.{body[:-1]}{'A' if body[-1] != 'A' else 'B'}.{mac}", "abc", T0)
    assert info.value.code == "invalid_ticket"
    with pytest.raises(TicketError) as info:
        old.check(text, "abc", T0 + 600)
    assert info.value.code == "ticket_expired"


# -- proof of work -------------------------------------------------------------------------------


def test_a_solved_challenge_is_accepted_and_a_wrong_or_stale_one_refused() -> None:
    book = PowBook(Signer(KEY, "townhall pow challenge v1"), ttl=60)
    ch = book.issue(10, T0)
    nonce = solve(ch.token, ch.difficulty)
    assert book.check(ch.token, nonce, T0 + 1).id == ch.id
    wrong = next(str(i) for i in range(10_000) if leading_zero_bits(_digest(ch.token, str(i))) < 10)
    for token, n, now, code in [
        (ch.token, wrong, T0, "pow_wrong"),
        (ch.token, nonce, T0 + 60, "pow_expired"),
        (ch.token[:-3] + "AAA", nonce, T0, "pow_invalid"),
        (ch.token, "", T0, "pow_invalid"),
    ]:
        with pytest.raises(PowError) as info:
            book.check(token, n, now)
        assert info.value.code == code
    with pytest.raises(PowError) as info:
        book.check(ch.token, nonce, T0, min_difficulty=12)
    assert info.value.code == "pow_too_easy"


def _digest(challenge: str, nonce: str) -> bytes:
    from townhall.admission.pow import digest

    return digest(challenge, nonce)


def test_attack_mode_turns_on_past_the_threshold_rises_with_load_and_falls_back() -> None:
    a = AttackMode(threshold=100, tau=1.0, hold=10, base_bits=12, max_bits=20)
    assert not a.active(T0) and a.difficulty(T0) == 0
    for i in range(50):
        a.rejected(T0 + i * 0.01, 1)  # 100/s for half a second: rate still under threshold
    assert not a.active(T0 + 0.5)
    a.rejected(T0 + 0.5, 400)  # a burst: the weighted rate passes 100/s
    assert a.active(T0 + 0.5)
    assert a.difficulty(T0 + 0.5) >= 13  # above threshold by more than 2x: more bits
    assert a.active(T0 + 9) and not a.active(T0 + 11)
    a.force(True, T0 + 20, 5)
    assert a.active(T0 + 21) and a.difficulty(T0 + 21) == 12
    assert not a.active(T0 + 26)
    a.force(False, T0 + 30, 100)
    a.rejected(T0 + 30, 10_000)
    assert not a.active(T0 + 30)


# -- shedding ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "auth", "expected"),
    [
        ("POST", "/whip/abc", False, Priority.NEVER),
        ("DELETE", "/whep/abc/session/1", True, Priority.NEVER),
        ("POST", "/api/v1/spaces/abc/start", True, Priority.NEVER),
        ("POST", "/api/v1/spaces/abc/speakers", True, Priority.NEVER),
        ("POST", "/api/v1/spaces/abc/speakers/bob/mute", True, Priority.NEVER),
        ("POST", "/api/v1/admin/attack-mode", True, Priority.NEVER),
        ("GET", "/healthz", False, Priority.NEVER),
        ("POST", "/api/v1/spaces/abc/tickets/renew", False, Priority.RENEWAL),
        ("GET", "/hls/abc/live.m3u8", False, Priority.RENEWAL),
        ("POST", "/api/v1/spaces/abc/join", True, Priority.JOIN),
        ("POST", "/api/v1/spaces/abc/join", False, Priority.ANONYMOUS_JOIN),
        ("GET", "/api/v1/pow/challenge", False, Priority.JOIN),
        ("POST", "/api/v1/spaces/abc/start", False, Priority.API),  # no credentials: no host
        ("GET", "/api/v1/spaces", False, Priority.API),
        ("GET", "/", False, Priority.API),  # pages
    ],
)
def test_requests_are_classified_without_a_body(
    method: str, path: str, auth: bool, expected: Priority
) -> None:
    assert classify(method, path, auth) is expected


def _first_sheds(s: Shedder, delay: float, start: float, seconds: float) -> dict[Priority, float]:
    """Every class asks every 5 ms under a standing ``delay``: when each was first shed."""
    shed_at: dict[Priority, float] = {}
    t = start
    while t < start + seconds:
        t += 0.005
        for p in Priority:
            if s.decide(p, delay, t) and p not in shed_at:
                shed_at[p] = round(t - start, 6)
    return shed_at


def test_codel_sheds_nothing_below_target_and_by_priority_as_overload_lasts() -> None:
    s = Shedder(target=0.005, interval=0.1)
    now = T0
    for _ in range(100):  # a busy but good queue: delays under target
        now += 0.001
        assert not s.decide(Priority.ANONYMOUS_JOIN, 0.004, now)
    # A short spike above target (less than an interval) sheds nothing.
    assert not s.decide(Priority.ANONYMOUS_JOIN, 0.050, now + 0.05)
    # A deep standing delay (every class's target passed): the classes go one interval apart.
    assert not s.decide(Priority.ANONYMOUS_JOIN, 0.001, now + 0.06)
    shed_at = _first_sheds(s, 0.200, now + 0.06, 0.6)
    assert Priority.NEVER not in shed_at
    assert 0.1 <= shed_at[Priority.ANONYMOUS_JOIN] < 0.2
    assert 0.2 <= shed_at[Priority.JOIN] < 0.3
    assert 0.3 <= shed_at[Priority.API] < 0.4
    assert 0.4 <= shed_at[Priority.RENEWAL] < 0.5
    # One delay under target ends the overload at once.
    t = now + 1
    assert not s.decide(Priority.ANONYMOUS_JOIN, 0.001, t)
    assert not s.decide(Priority.ANONYMOUS_JOIN, 0.020, t + 0.001)


def test_a_busy_node_sheds_new_anonymous_joins_and_keeps_pages_and_renewals() -> None:
    """A delay standing at 20 ms (four times the target: a busy node, not a collapsed one):
    new joins are shed, anonymous first; pages, API calls and renewals are served however long
    it lasts. At 60 ms the API goes too, renewals still served; past 100 ms, everything."""
    s = Shedder(target=0.005, interval=0.1)
    busy = _first_sheds(s, 0.020, T0, 2.0)
    assert set(busy) == {Priority.ANONYMOUS_JOIN, Priority.JOIN}
    assert busy[Priority.ANONYMOUS_JOIN] < busy[Priority.JOIN]
    s = Shedder(target=0.005, interval=0.1)
    assert set(_first_sheds(s, 0.060, T0, 2.0)) == {Priority.ANONYMOUS_JOIN, Priority.JOIN, Priority.API}
    s = Shedder(target=0.005, interval=0.1)
    assert set(_first_sheds(s, 0.150, T0, 2.0)) == set(Priority) - {Priority.NEVER}
    assert s.first_shed_at[Priority.ANONYMOUS_JOIN] == min(s.first_shed_at.values())


def test_networks_are_a_slash_24_or_a_slash_56() -> None:
    assert network_of("203.0.113.77") == "203.0.113.0/24"
    assert network_of("2001:db8:abcd:12ff::1") == "2001:db8:abcd:1200::/56"
    assert network_of("::ffff:198.51.100.9") == "198.51.100.0/24"
    assert network_of("unknown") == "unknown"


def test_the_memory_limiter_forgets_keys_whose_window_has_passed_as_it_goes() -> None:
    """No pass over every key: each hit drops up to ``SWEEP`` keys of its window length whose
    last hit has left the window, so the old keys are gone after a few new hits; a key still
    in its window is kept and still counted."""
    from townhall.admission.limiter import LimitsLimiter, QuietMemoryStorage

    async def scenario() -> None:
        limiter = LimitsLimiter.from_url(None)
        storage = limiter._storage
        assert isinstance(storage, QuietMemoryStorage)
        for i in range(50):
            assert (await limiter.hit("2 per 1 second", "k", str(i))).allowed
        assert (await limiter.hit("2 per 1 minute", "kept")).allowed  # another window length
        assert len(storage.events) == 51
        await asyncio.sleep(1.2)  # every "per 1 second" hit has left its window
        late = -(-50 // storage.SWEEP)
        for i in range(late):
            assert (await limiter.hit("2 per 1 second", "late", str(i))).allowed
        assert len(storage.events) == late + 1, len(storage.events)
        assert (await limiter.hit("2 per 1 minute", "kept")).allowed
        assert not (await limiter.hit("2 per 1 minute", "kept")).allowed  # its hits still count
        await limiter.close()

    asyncio.run(scenario())
