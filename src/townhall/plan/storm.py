"""A discrete-event simulation of the 8 PM join storm against the fleet's admission (pure: the
clock is the simulation's own ``now``; no I/O, no asyncio).

Theory of operation. Joiners arrive along an ``ArrivalCurve``. Admission follows the rules of
the waiting room (``townhall.admission.waiting_room``) for a fleet that shares its counters in
Redis: a token bucket of ``rate`` admissions per second (``burst`` at once) and a cap of
``max_active`` listeners. A join that finds nobody waiting and a token is admitted at once;
otherwise it draws the next arrival number and is told its position (number - released + 1)
and ``Retry-After`` = ceil(position / rate), at most ``max_retry_after``. Each token releases the
next number in arrival order; a waiter is admitted when it returns with a released number. An
admitted listener renews its ticket every ``renew_every`` seconds. Nobody gives up and nobody
leaves within the horizon (both would lighten the load, so the figures are an upper bound).

People are simulated in cohorts rather than one by one: the joiners of one arrival step (0.5 s
by default) share an arrival time, and waiters whose ``Retry-After`` is the same return
together, so a cohort is split whenever its members would be told different times. Events are
arrival steps, returns, renewals and samples, taken from one heap in time order.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import math
from collections.abc import Iterator

EPSILON = 1e-6


@dataclasses.dataclass(frozen=True)
class ArrivalCurve:
    """Arrivals per second, linear between ``points`` (seconds after 8 PM, rate); zero after the
    last point."""

    points: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        times = [t for t, _ in self.points]
        if len(self.points) < 2 or times != sorted(times) or any(r < 0 for _, r in self.points):
            raise ValueError("an arrival curve needs two or more points in time order, rates >= 0")

    @classmethod
    def storm(cls, total: int, first_minute: int, span: float = 1800.0) -> ArrivalCurve:
        """``first_minute`` joiners in the first 60 s, the rest by ``span`` s: the rate falls
        linearly from its peak at 8 PM to the rest's starting rate at one minute, then linearly
        to zero at ``span``."""
        first = min(first_minute, total)
        rest = total - first
        if span <= 60 and rest > 0:
            raise ValueError("the storm's span must be longer than its first minute")
        r1 = 2.0 * rest / (span - 60.0) if rest > 0 else 0.0
        r0 = 2.0 * first / 60.0 - r1
        if r0 < 0:
            raise ValueError("the first minute holds too few joiners for the rest's starting rate")
        if rest == 0:
            return cls(((0.0, r0), (60.0, r1)))
        return cls(((0.0, r0), (60.0, r1), (span, 0.0)))

    @property
    def end(self) -> float:
        return self.points[-1][0]

    def rate(self, t: float) -> float:
        pts = self.points
        if t < pts[0][0] or t > pts[-1][0]:
            return 0.0
        k = max(1, bisect.bisect_right([p[0] for p in pts], t))
        (t0, r0), (t1, r1) = pts[min(k, len(pts) - 1) - 1], pts[min(k, len(pts) - 1)]
        return r0 + (r1 - r0) * (t - t0) / (t1 - t0) if t1 > t0 else r1

    def cumulative(self, t: float) -> float:
        """Arrivals from the first point up to ``t`` (exact for the linear pieces)."""
        total = 0.0
        for (t0, r0), (t1, r1) in zip(self.points, self.points[1:], strict=False):
            if t <= t0:
                break
            u = min(t, t1)
            ru = r0 + (r1 - r0) * (u - t0) / (t1 - t0) if t1 > t0 else r1
            total += (r0 + ru) / 2.0 * (u - t0)
        return total

    @property
    def total(self) -> float:
        return self.cumulative(self.end)

    def describe(self) -> str:
        return ", then ".join(f"{r:,.0f}/s at {t:g} s" for t, r in self.points) + " (linear between)"


@dataclasses.dataclass(frozen=True)
class Admission:
    """The fleet's admission: rate and burst of the shared bucket, cap, longest Retry-After."""

    rate: float
    burst: float
    max_active: int
    max_retry_after: int = 30
    renew_every: float = 480.0

    def retry_after(self, position: int) -> int:
        """As ``waiting_room.waiting``: the estimated wait, rounded up, within [1, max]."""
        return max(1, min(self.max_retry_after, math.ceil(position / self.rate)))


@dataclasses.dataclass(frozen=True)
class Cohort:
    """Joiners admitted together: arrival indexes ``first`` .. ``first + count - 1`` (arrival
    order over everyone), when they arrived, when the room released them (None: admitted on
    arrival) and when they came in."""

    first: int
    count: int
    arrived_at: float
    released_at: float | None
    admitted_at: float

    @property
    def wait(self) -> float:
        return self.admitted_at - self.arrived_at


@dataclasses.dataclass(frozen=True)
class Sample:
    """The room at time ``t``, and the rates of requests in the interval that ends there."""

    t: float
    arrived: int
    admitted: int  # listeners in
    waiting: int  # arrived, not yet in (queued, or released and not yet back)
    released_waiting: int  # released, not yet back
    longest_position: int
    oldest_wait: float  # how long the longest waiter present has waited
    joins_per_s: float  # first joins
    returns_per_s: float  # waiting-room returns (re-presented queue tokens)
    renewals_per_s: float
    admitted_per_s: float
    admitted_from_queue_per_s: float


@dataclasses.dataclass(frozen=True)
class StormResult:
    curve: ArrivalCurve
    admission: Admission
    step: float
    samples: tuple[Sample, ...]
    cohorts: tuple[Cohort, ...]
    finished_at: float  # when the last joiner came in
    returns: int  # waiting-room returns in all

    def waits(self) -> tuple[list[float], list[int]]:
        return [c.wait for c in self.cohorts], [c.count for c in self.cohorts]

    def wait_quantile(self, q: float) -> float:
        """The wait (seconds) under which fraction ``q`` of joiners came in."""
        pairs = sorted((c.wait, c.count) for c in self.cohorts)
        total = sum(n for _, n in pairs)
        if total == 0:
            return 0.0
        seen = 0
        for w, n in pairs:
            seen += n
            if seen >= q * total:
                return w
        return pairs[-1][0]

    @property
    def mean_wait(self) -> float:
        total = sum(c.count for c in self.cohorts)
        return sum(c.wait * c.count for c in self.cohorts) / total if total else 0.0

    @property
    def admitted(self) -> int:
        return sum(c.count for c in self.cohorts)


@dataclasses.dataclass
class _Waiters:
    number: int  # first arrival number of the group
    count: int
    index: int  # arrival index of its first member
    arrived_at: float


class Storm:
    """The simulation's state and its event loop (``run``)."""

    def __init__(
        self,
        curve: ArrivalCurve,
        admission: Admission,
        *,
        step: float = 0.5,
        sample_every: float = 5.0,
        horizon: float | None = None,
        max_seconds: float = 6 * 3600.0,
    ) -> None:
        if admission.rate <= 0 or step <= 0 or sample_every <= 0:
            raise ValueError("rate, step and sample interval must be positive")
        self.curve, self.adm, self.step, self.every = curve, admission, step, sample_every
        self.horizon = curve.end if horizon is None else horizon
        self.max_seconds = max_seconds
        self.tokens, self.refilled_at = max(1.0, admission.burst), 0.0
        self.arrived = 0  # everyone, in arrival order (the arrival index of the next joiner)
        self.numbers = 0  # arrival numbers handed out
        self.released = 0
        self.release_marks: list[tuple[int, float]] = []  # (released up to, time)
        self.active = 0
        self.back = 0  # released waiters who came back in
        self.cohorts: list[Cohort] = []
        self.waiting: dict[int, _Waiters] = {}  # by first number: who is queued now
        self.counts = {"joins": 0, "returns": 0, "renewals": 0, "admitted": 0, "from_queue": 0}
        self.last = dict(self.counts)
        self.samples: list[Sample] = []
        self.events: list[tuple[float, int, str, object]] = []
        self.seq = 0

    # -- events ----------------------------------------------------------------------------

    def _at(self, t: float, kind: str, what: object = None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, what))

    def _refresh(self, now: float) -> None:
        """Refill the bucket; release waiting numbers in arrival order while under the cap."""
        if now > self.refilled_at:
            self.tokens = min(
                max(1.0, self.adm.burst), self.tokens + (now - self.refilled_at) * self.adm.rate
            )
            self.refilled_at = now
        if self.numbers > self.released and self.active < self.adm.max_active:
            k = min(self.numbers - self.released, int(self.tokens + EPSILON))
            if k > 0:
                self.released += k
                self.tokens -= k
                self.release_marks.append((self.released, now))

    def released_at(self, number: int) -> float:
        """When arrival ``number`` was released."""
        k = bisect.bisect_right(self.release_marks, number, key=lambda m: m[0])
        return self.release_marks[k][1]

    def _admit(self, index: int, count: int, arrived_at: float, released: float | None, now: float) -> None:
        self.cohorts.append(Cohort(index, count, arrived_at, released, now))
        self.active += count
        self.counts["admitted"] += count
        if released is not None:
            self.counts["from_queue"] += count
        self._at(now + self.adm.renew_every, "renew", count)

    def _queue(self, group: _Waiters, now: float) -> None:
        """Tell a group its Retry-After, splitting it where its members' answers differ."""
        while group.count > 0:
            position = group.number - self.released + 1
            retry = self.adm.retry_after(position)
            if retry >= self.adm.max_retry_after:
                size = group.count
            else:  # members whose ceil(position / rate) is still ``retry``
                size = max(1, min(group.count, int(retry * self.adm.rate + EPSILON) - position + 1))
            part = _Waiters(group.number, size, group.index, group.arrived_at)
            self.waiting[part.number] = part
            self._at(now + retry, "return", part)
            group = _Waiters(group.number + size, group.count - size, group.index + size, group.arrived_at)

    def _arrive(self, now: float) -> None:
        n = round(self.curve.cumulative(now)) - self.arrived
        if n <= 0:
            return
        self._refresh(now)
        self.counts["joins"] += n
        direct = 0
        if self.numbers == self.released:  # nobody waiting: the bucket and the cap decide
            direct = max(0, min(n, int(self.tokens + EPSILON), self.adm.max_active - self.active))
            self.tokens -= direct
            if direct:
                self._admit(self.arrived, direct, now, None, now)
        rest = n - direct
        if rest:
            self._queue(_Waiters(self.numbers, rest, self.arrived + direct, now), now)
            self.numbers += rest
        self.arrived += n

    def _return(self, group: _Waiters, now: float) -> None:
        self._refresh(now)
        del self.waiting[group.number]
        self.counts["returns"] += group.count
        room = max(0, self.adm.max_active - self.active)
        k = max(0, min(group.count, self.released - group.number, room))
        if k:
            self._admit(group.index, k, group.arrived_at, self.released_at(group.number), now)
            self.back += k
        if k < group.count:
            rest = _Waiters(group.number + k, group.count - k, group.index + k, group.arrived_at)
            self._queue(rest, now)

    def _sample(self, now: float) -> None:
        self._refresh(now)
        c, last = self.counts, self.last
        rate = {k: (c[k] - last[k]) / self.every for k in c}
        self.last = dict(c)
        oldest = min((g.arrived_at for g in self.waiting.values()), default=now)
        self.samples.append(
            Sample(
                t=now,
                arrived=self.arrived,
                admitted=self.active,
                waiting=self.arrived - self.active,
                released_waiting=self.released - self.back,
                longest_position=max(0, self.numbers - self.released),
                oldest_wait=now - oldest,
                joins_per_s=rate["joins"],
                returns_per_s=rate["returns"],
                renewals_per_s=rate["renewals"],
                admitted_per_s=rate["admitted"],
                admitted_from_queue_per_s=rate["from_queue"],
            )
        )

    def _times(self, start: float, every: float, end: float) -> Iterator[float]:
        k = 1
        while start + k * every <= end + EPSILON:
            yield start + k * every
            k += 1

    def run(self) -> StormResult:
        """Run until the horizon has passed and everyone who arrived is in."""
        for t in self._times(0.0, self.step, self.curve.end):
            self._at(t, "arrive")
        self._at(self.every, "sample")
        total = round(self.curve.total)
        now = 0.0
        while self.events:
            now, _, kind, what = heapq.heappop(self.events)
            if now > self.max_seconds:
                break
            if kind == "arrive":
                self._arrive(now)
            elif kind == "return":
                assert isinstance(what, _Waiters)
                self._return(what, now)
            elif kind == "renew":
                assert isinstance(what, int)
                self.counts["renewals"] += what
                self._at(now + self.adm.renew_every, "renew", what)  # the loop ends the run
            else:
                self._sample(now)
                if now < self.horizon or self.waiting or self.active < total:
                    self._at(now + self.every, "sample")
            if now >= self.horizon and self.active >= total and not self.waiting:
                break
        finished = max((c.admitted_at for c in self.cohorts), default=0.0)
        return StormResult(
            curve=self.curve,
            admission=self.adm,
            step=self.step,
            samples=tuple(self.samples),
            cohorts=tuple(self.cohorts),
            finished_at=finished,
            returns=self.counts["returns"],
        )


def simulate(curve: ArrivalCurve, admission: Admission, **kwargs: float) -> StormResult:
    """Run the join storm of ``curve`` against ``admission``."""
    return Storm(curve, admission, **kwargs).run()


def fluid_max_wait(curve: ArrivalCurve, rate: float, step: float = 0.5) -> float:
    """The longest wait of a first-come-first-served queue served at ``rate`` (a fluid
    approximation: the wait of someone arriving with ``q`` ahead is ``q / rate``)."""
    q, worst, t = 0.0, 0.0, 0.0
    before = 0.0
    while t < curve.end:
        t = min(curve.end, t + step)
        now = curve.cumulative(t)
        q = max(0.0, q + (now - before) - rate * step)
        before = now
        worst = max(worst, q / rate)
    return worst


def rate_for_max_wait(curve: ArrivalCurve, max_wait: float, step: float = 0.5) -> float:
    """The lowest admission rate (joins/s, to 1 %) whose longest wait is ``max_wait`` or less."""
    if max_wait < 0:
        raise ValueError("the longest wait must be >= 0")
    hi = max(1.0, max(r for _, r in curve.points))
    lo = 1.0
    if fluid_max_wait(curve, lo, step) <= max_wait:
        return lo
    while hi / lo > 1.01:
        mid = math.sqrt(lo * hi)
        if fluid_max_wait(curve, mid, step) <= max_wait:
            hi = mid
        else:
            lo = mid
    return hi
