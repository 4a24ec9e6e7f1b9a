"""The waiting room's arithmetic (pure: every function takes ``now``).

Theory of operation. A space admits listeners at a rate (``Capacity.rate`` joins/s, a token
bucket of ``burst``) while fewer than ``max_active`` tickets are alive. When a join finds no
room, or finds people already waiting, it is not admitted: it draws the next arrival number,
like the paper ticket at a bakery counter, and is handed a signed queue token carrying that
number. The server keeps only counters per space:

- ``arrivals``: numbers handed out; ``released``: every number below it may come in;
- ``tokens``/``refilled_at``: the admission-rate bucket;
- ``active``: live tickets counted by the bucket of time in which they expire.

Time moves ``released`` on: each rate token, while live tickets are under the cap, releases the
next number in arrival order. A waiter re-presents its token; if its number is released and the
cap has room, it is admitted (once: the caller keeps one bit per arrival number so a token
cannot admit twice). Its position is ``number - released + 1``, which only goes down, since
``released`` only goes up; the estimated wait is ``position / rate``.

Nobody says when they leave: a listener counts as active until its ticket expires, and a
renewal moves it from its old ticket's bucket to the new one's. A released waiter who never
comes back costs one rate token, never a place under the cap; the cap is checked when a waiter
actually comes in, so a burst of returns can never push the room over it (a released waiter who
finds it full is told it is next, position 1).

Splits. One pool's counters are one Redis hash, served by one Redis thread; past what it takes
(BENCHMARKS.md, "Scale-out plan") a space's waiting room is cut into ``splits`` independent
pools, each with its share of the rate, burst and cap (``split_capacity``), its own arrival
numbers and its own ``released``. A new joiner is hashed to a split (``split_of``) and its queue
token and ticket name the split, so its returns and renewals go back there. A position is then
the position within the joiner's split; every split drains at 1/``splits`` of the space's rate,
so ``position / split rate`` is still the honest wait.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

from townhall.security.signing import SignatureError, Signer

QUEUE_PURPOSE = "townhall queue token v1"
# Refills are sums of float products: a token due at t must not wait for the next request.
EPSILON = 1e-4


@dataclasses.dataclass(frozen=True)
class Capacity:
    """Limits of one pool of listeners (a space, or a whole node)."""

    max_active: int
    rate: float  # admissions per second
    burst: float  # admissions allowed at once after a quiet spell
    ticket_ttl: float  # a ticket counts as active until it expires
    bucket_seconds: float = 10.0
    max_retry_after: int = 30


@dataclasses.dataclass
class Counters:
    """Everything the server keeps about one pool: counters, no per-waiter state."""

    arrivals: int = 0
    released: int = 0
    tokens: float = 0.0
    refilled_at: float = -1.0  # never touched: the bucket starts full
    # Live tickets by expiry bucket (bucket index = ceil(expires_at / bucket_seconds)).
    active: dict[int, int] = dataclasses.field(default_factory=dict)

    def active_count(self, cap: Capacity, now: float) -> int:
        floor = math.ceil(now / cap.bucket_seconds)
        return sum(n for b, n in self.active.items() if b >= floor)

    # Flat form for a Redis hash.
    def to_fields(self) -> dict[str, str]:
        fields = {
            "a": str(self.arrivals),
            "r": str(self.released),
            "k": repr(self.tokens),
            "t": repr(self.refilled_at),
        }
        fields.update({f"b{b}": str(n) for b, n in self.active.items()})
        return fields

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> Counters:
        c = cls()
        if not fields:
            return c
        c.arrivals = int(fields.get("a", 0))
        c.released = int(fields.get("r", 0))
        c.tokens = float(fields.get("k", 0.0))
        c.refilled_at = float(fields.get("t", -1.0))
        c.active = {int(k[1:]): int(v) for k, v in fields.items() if k.startswith("b")}
        return c


@dataclasses.dataclass(frozen=True)
class Admit:
    """Come in: issue a ticket (and count it with ``count_ticket``)."""


@dataclasses.dataclass(frozen=True)
class Wait:
    """Not yet: the arrival number, its honest position (1 = next), an estimated wait."""

    number: int
    position: int
    wait_seconds: float
    retry_after: int


@dataclasses.dataclass(frozen=True)
class Full:
    """No room now, and the caller asked not to queue (``join(..., may_queue=False)``): nothing
    was counted and no arrival number drawn, so the caller may check whether this joiner may
    take a place in the queue before asking again."""


Decision = Admit | Wait
JoinDecision = Admit | Wait | Full


def split_capacity(cap: Capacity, split: int, splits: int) -> Capacity:
    """Split ``split`` of ``splits``' share of ``cap``: 1/``splits`` of the rate and burst, and
    of the listener cap rounded so the splits' caps add up to the whole."""
    if splits <= 1:
        return cap
    share = cap.max_active // splits + (1 if split < cap.max_active % splits else 0)
    return dataclasses.replace(cap, max_active=share, rate=cap.rate / splits, burst=cap.burst / splits)


def split_of(key: str, splits: int) -> int:
    """The split a new joiner is hashed to (``key``: its listener id); stable across nodes."""
    return zlib.crc32(key.encode()) % splits if splits > 1 else 0


def _bucket(cap: Capacity, expires_at: float) -> int:
    return math.ceil(expires_at / cap.bucket_seconds)


def refresh(c: Counters, cap: Capacity, now: float) -> None:
    """Refill the rate bucket, forget expired tickets, release waiters in arrival order."""
    burst = max(1.0, cap.burst)
    if c.refilled_at < 0:
        c.tokens, c.refilled_at = burst, now
    elif now > c.refilled_at:
        c.tokens = min(burst, c.tokens + (now - c.refilled_at) * cap.rate)
        c.refilled_at = now
    floor = math.ceil(now / cap.bucket_seconds)
    for b in [b for b in c.active if b < floor]:
        del c.active[b]
    if c.arrivals > c.released and c.active_count(cap, now) < cap.max_active:
        k = min(c.arrivals - c.released, int(c.tokens + EPSILON))
        c.released += k
        c.tokens -= k


def count_ticket(c: Counters, cap: Capacity, expires_at: float) -> None:
    b = _bucket(cap, expires_at)
    c.active[b] = c.active.get(b, 0) + 1


def has_room(c: Counters, cap: Capacity, now: float) -> bool:
    """Whether a new (unqueued) admission fits right now: nobody waiting, a rate token, and
    space under the cap."""
    refresh(c, cap, now)
    return c.arrivals == c.released and c.tokens + EPSILON >= 1 and c.active_count(cap, now) < cap.max_active


def waiting(c: Counters, cap: Capacity, number: int) -> Wait:
    position = max(1, number - c.released + 1)
    wait = position / cap.rate if cap.rate > 0 else float(cap.max_retry_after)
    return Wait(number, position, round(wait, 3), max(1, min(cap.max_retry_after, math.ceil(wait))))


def join(
    c: Counters,
    cap: Capacity,
    now: float,
    expires_at: float,
    *,
    elsewhere_ok: bool = True,
    may_queue: bool = True,
) -> JoinDecision:
    """A join without a queue token. ``elsewhere_ok`` is the node's own verdict (its caps): a
    join the node cannot carry queues like any other. With ``may_queue`` false a join that
    would queue is answered ``Full`` and leaves the counters as they were (but refreshed)."""
    if has_room(c, cap, now) and elsewhere_ok:
        c.tokens -= 1
        count_ticket(c, cap, expires_at)
        return Admit()
    if not may_queue:
        return Full()
    number = c.arrivals
    c.arrivals += 1
    return waiting(c, cap, number)


def claim(
    c: Counters, cap: Capacity, number: int, now: float, expires_at: float, *, elsewhere_ok: bool = True
) -> Decision:
    """A waiter re-presents arrival ``number`` (its token's signature already checked, and its
    single use by the caller). Admitted if released and under the cap."""
    refresh(c, cap, now)
    if number >= c.arrivals:
        # Counters younger than the token (an embedded node restarted): honour its place.
        c.arrivals = number + 1
    if number < c.released and c.active_count(cap, now) < cap.max_active and elsewhere_ok:
        count_ticket(c, cap, expires_at)
        return Admit()
    return waiting(c, cap, number)


def renew(c: Counters, cap: Capacity, old_expires_at: float, new_expires_at: float, now: float) -> None:
    """A renewal moves a listener from its old ticket's bucket to its new one's."""
    refresh(c, cap, now)
    old = _bucket(cap, old_expires_at)
    if c.active.get(old, 0) > 0:
        c.active[old] -= 1
    count_ticket(c, cap, new_expires_at)


def take(c: Counters, cap: Capacity, now: float, expires_at: float) -> bool:
    """For a pool without a queue (a node): count one admission if it fits."""
    if not has_room(c, cap, now):
        return False
    c.tokens -= 1
    count_ticket(c, cap, expires_at)
    return True


# -- queue tokens --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QueueToken:
    space_id: str
    number: int
    arrived_at: float
    expires_at: float
    split: int | None = None  # None: the space's counters are not split
    splits: int = 1  # how many splits the space had when the number was drawn


class QueueTokenError(ValueError):
    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class QueueTokenBook:
    """Signed queue tokens ``{s: space, n: arrival number, t: arrival time, e: expiry}``, plus
    ``k: split, K: splits`` when the space's counters are split: all a waiter's state, carried
    by the waiter."""

    def __init__(self, signer: Signer, ttl: float) -> None:
        self.signer = signer
        self.ttl = ttl

    def issue(
        self, space_id: str, number: int, arrived_at: float, split: int | None = None, splits: int = 1
    ) -> tuple[str, QueueToken]:
        t, e = round(arrived_at, 3), round(arrived_at + self.ttl, 3)
        token = QueueToken(space_id, number, t, e, split, splits if split is not None else 1)
        payload: dict[str, object] = {"s": space_id, "n": number, "t": t, "e": e}
        if split is not None:  # unsplit tokens stay byte for byte what they were
            payload.update(k=split, K=token.splits)
        return self.signer.sign(payload), token

    def check(self, text: str, space_id: str, now: float) -> QueueToken:
        try:
            p = self.signer.verify(text)
            split = None if p.get("k") is None else int(p["k"])
            splits = int(p.get("K", 1))
            token = QueueToken(str(p["s"]), int(p["n"]), float(p["t"]), float(p["e"]), split, splits)
        except SignatureError as exc:
            raise QueueTokenError(str(exc), "invalid_queue_token") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise QueueTokenError("malformed queue token", "invalid_queue_token") from exc
        if token.space_id != space_id:
            raise QueueTokenError("this queue token is for another space", "wrong_space")
        if token.expires_at <= now:
            raise QueueTokenError("queue token expired; join again", "queue_token_expired")
        return token
