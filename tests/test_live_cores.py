"""Pure cores of the spaces plane: counting, aggregation, signing. No sockets, time as input."""

from __future__ import annotations

import pytest

from townhall.admission.tickets import TicketBook, TicketError
from townhall.security.signing import SignatureError, Signer, parse_key_set
from townhall.spaces.grants import GrantBook, GrantError
from townhall.spaces.listeners import EXACT_LIMIT, STANDARD_ERROR, HyperLogLog, ListenerCounter
from townhall.spaces.reactions import ReactionAggregator

K1 = {"k1": b"1" * 32}
K2 = {"k2": b"2" * 32}


def test_hyperloglog_error_is_within_its_bound() -> None:
    for n in (1_000, 50_000, 200_000):
        hll = HyperLogLog()
        for i in range(n):
            hll.add(f"listener-{i}")
        error = abs(hll.estimate() - n) / n
        assert error < 3 * STANDARD_ERROR, (n, error)  # 3 sigma: 2.4 %


def test_counter_is_exact_when_small_and_approximate_when_large() -> None:
    counter = ListenerCounter(window=60)
    for i in range(100):
        counter.seen(f"a{i}", now=1000.0)
        counter.seen(f"a{i}", now=1001.0)  # the same listener twice counts once
    assert counter.count(now=1002.0) == (100, True)
    for i in range(EXACT_LIMIT + 10_000):
        counter.seen(f"b{i}", now=1003.0)
    count, exact = counter.count(now=1004.0)
    true = 100 + EXACT_LIMIT + 10_000
    assert not exact and abs(count - true) / true < 3 * STANDARD_ERROR


def test_counter_forgets_listeners_after_two_windows() -> None:
    counter = ListenerCounter(window=60)
    counter.seen("a", now=0.0)
    counter.seen("b", now=61.0)
    assert counter.count(now=62.0) == (2, True)  # a in the previous window, b in the current
    assert counter.count(now=121.0) == (1, True)  # a has aged out
    assert counter.count(now=1000.0) == (0, True)


def test_reactions_aggregate_per_second() -> None:
    agg = ReactionAggregator()
    assert agg.add("👏", 10.1) == []
    agg.add("👏", 10.5)
    agg.add("🔥", 10.9)
    closed = agg.add("👏", 11.2)
    assert [(t.second, t.counts) for t in closed] == [(10, (("👏", 2), ("🔥", 1)))]
    assert agg.flush(11.9) == []
    assert [(t.second, t.counts) for t in agg.flush(12.0)] == [(11, (("👏", 1),))]
    assert agg.idle and agg.totals == {"👏": 3, "🔥": 1}


def test_signer_rotation_and_purpose() -> None:
    old = Signer(K1, "p")
    token = old.sign({"x": 1})
    rotated = Signer(K2 | K1, "p")  # k2 signs now, k1 still verifies
    assert rotated.verify(token) == {"x": 1}
    assert rotated.sign({"x": 1}).startswith("k2.")
    with pytest.raises(SignatureError, match="unknown key"):
        Signer(K2, "p").verify(token)
    with pytest.raises(SignatureError, match="bad signature"):
        Signer(K1, "another purpose").verify(token)
    for bad in ("", "a.b", "k1.!!!.###", "k1." + "A" * 3000, "k1.e30.AAAA", "ü.a.b"):
        with pytest.raises(SignatureError):
            old.verify(bad)


def test_key_set_parsing() -> None:
    keys = parse_key_set("new:" + "ab" * 32 + ", old:" + "cd" * 32)
    assert list(keys) == ["new", "old"]
    for bad in ("nocolon", "k:zz", "k:abcd"):
        with pytest.raises(ValueError):
            parse_key_set(bad)


def test_tickets_are_bound_and_expire() -> None:
    book = TicketBook(Signer(K1, "tickets"), ttl=600)
    token, ticket = book.issue("SpaceA", "a1", now=100.0)
    assert book.check(token, "SpaceA", now=699.0) == ticket
    with pytest.raises(TicketError, match="expired"):
        book.check(token, "SpaceA", now=700.0)
    with pytest.raises(TicketError, match="another space"):
        book.check(token, "SpaceB", now=101.0)
    grants = GrantBook(Signer(K1, "grants"), ttl=600)
    grant_token, _ = grants.issue("SpaceA", 1, "speaker", "g1", now=100.0)
    with pytest.raises(TicketError):  # a speaker token is not a listener ticket
        book.check(grant_token, "SpaceA", now=101.0)
    with pytest.raises(GrantError):  # nor the reverse
        grants.check(token, "SpaceA", now=101.0)
