"""What a load test counts, and what it concludes (pure: every time is an argument).

Theory of operation
-------------------
- Every answer a simulated client gets is *classified* (``classify``) into one of a few kinds:
  ``admitted`` (200), ``queued`` (202, a place in the waiting room), ``limited`` (429),
  ``pow`` (403 asking for, or refusing, a proof of work), ``shed`` (503), ``refused`` (any
  other 4xx), ``server_error`` (other 5xx) and ``transport`` (no HTTP answer at all). A
  :class:`Timeline` counts kinds per time bucket and keeps the request latencies of each bucket.
- A joiner's next step follows from its last answer alone (``next_step``): come back with the
  queue token after ``Retry-After``, retry a limit or a shed after ``Retry-After``, solve a
  proof of work when asked, or stop. It never acts past the run's deadline.
- :class:`JoinLedger` keeps one :class:`JoinRecord` per joiner, and from them the figures of a
  run: outcomes (each joiner ends ``admitted``, ``queued`` holding a token, ``refused`` or
  ``error``), latency percentiles, and the waiting room's honesty as a client can see it:

  * a joiner's position never goes up between its answers (``position_increases``);
  * arrival numbers follow arrival order: whoever was queued (answer received) before another
    sent its first join has the smaller number (``arrival_inversions``);
  * nobody is told to keep waiting behind a later arrival: once arrival ``m`` was admitted from
    the queue, every earlier number is released, so a later answer to any ``n < m`` must say
    position 1 at most (``order_violations``). Released numbers only go up, which is what
    makes this a strict check and not a heuristic.

  The arrival number is read from the queue token's payload (signed, not secret: base64url
  JSON with ``n``); a token of another shape just leaves the two order checks without data.
- Percentiles are nearest-rank (the smallest sample with at least q of the samples at or
  below it), so every reported figure is a latency some request really had.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

KINDS = ("admitted", "queued", "limited", "pow", "shed", "refused", "server_error", "transport")
# The plot's three families: in, waiting, turned away (errors apart).
REJECTED = ("limited", "pow", "shed", "refused")
ERRORS = ("server_error", "transport")
POW_CODES = frozenset(
    {"pow_required", "pow_invalid", "pow_wrong", "pow_expired", "pow_too_easy", "pow_reused"}
)
QUANTILES = (0.5, 0.9, 0.99, 0.999)


def classify(status: int, code: str = "") -> str:
    """The kind of an answer; ``status`` 0 means no HTTP answer (connection refused, reset,
    timeout)."""
    if status == 0:
        return "transport"
    if status == 200:
        return "admitted"
    if status == 202:
        return "queued"
    if status == 429:
        return "limited"
    if status == 503:
        return "shed"
    if status == 403 and code in POW_CODES:
        return "pow"
    if 400 <= status < 500:
        return "refused"
    return "server_error"


# -- percentiles and time buckets ----------------------------------------------------------------


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted samples (``q`` in 0..1)."""
    if not ordered:
        raise ValueError("no samples")
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize(samples: Iterable[float], quantiles: Sequence[float] = QUANTILES) -> dict[str, float | int]:
    """Count, mean, nearest-rank quantiles (keys ``p50``, ``p99``, ``p99.9``...) and max,
    in seconds rounded to 0.1 ms; just the count when there are no samples."""
    ordered = sorted(samples)
    out: dict[str, float | int] = {"count": len(ordered)}
    if not ordered:
        return out
    out["mean"] = round(sum(ordered) / len(ordered), 4)
    for q in quantiles:
        out[_qname(q)] = round(percentile(ordered, q), 4)
    out["max"] = round(ordered[-1], 4)
    return out


def _qname(q: float) -> str:
    return "p" + f"{q * 100:.3f}".rstrip("0").rstrip(".")


class Timeline:
    """Counts of answer kinds and request latencies per bucket of ``width`` seconds from
    ``start``."""

    def __init__(self, start: float, width: float = 1.0) -> None:
        if width <= 0:
            raise ValueError("bucket width must be positive")
        self.start = start
        self.width = width
        self._counts: dict[int, Counter[str]] = {}
        self._latency: dict[int, list[float]] = {}

    def bucket(self, now: float) -> int:
        return max(0, math.floor((now - self.start) / self.width))

    def add(self, now: float, kind: str, latency: float | None = None) -> None:
        b = self.bucket(now)
        self._counts.setdefault(b, Counter())[kind] += 1
        if latency is not None:
            self._latency.setdefault(b, []).append(latency)

    def rows(self, until: float | None = None) -> list[dict[str, Any]]:
        """One row per bucket from the first to the last seen (or to ``until``): its start
        offset ``t``, a count per kind, and latency ``p50``/``p99`` when it had any."""
        last = max([*self._counts, *self._latency], default=-1)
        if until is not None:
            last = max(last, self.bucket(until) - 1)
        rows = []
        for b in range(last + 1):
            counts = self._counts.get(b, Counter())
            row: dict[str, Any] = {"t": round(b * self.width, 3)}
            row.update({k: counts[k] for k in sorted(counts)})
            lat = sorted(self._latency.get(b, ()))
            if lat:
                row["p50"] = round(percentile(lat, 0.5), 4)
                row["p99"] = round(percentile(lat, 0.99), 4)
            rows.append(row)
        return rows


# -- a joiner's next step ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Answer:
    """One answer to a join as the client saw it (``status`` 0: no answer)."""

    sent_at: float
    received_at: float
    status: int
    code: str = ""
    retry_after: float | None = None  # the header, seconds
    queue_token: str | None = None
    position: int | None = None
    estimated_wait: float | None = None

    @property
    def kind(self) -> str:
        return classify(self.status, self.code)

    @property
    def latency(self) -> float:
        return self.received_at - self.sent_at


Action = Literal["done", "retry", "solve", "stop"]


@dataclasses.dataclass(frozen=True)
class Step:
    """What a joiner does next: ``retry`` at ``at`` (with ``queue_token`` if it holds one),
    ``solve`` a proof of work and retry at once, or ``done``/``stop``."""

    action: Action
    at: float = 0.0
    queue_token: str | None = None


TRANSPORT_RETRY_SECONDS = 1.0


def next_step(answer: Answer, held_token: str | None, deadline: float, *, solves_pow: bool) -> Step:
    """A well-behaved joiner's reaction to ``answer``, holding ``held_token`` (its queue token
    from an earlier 202, if any), never acting at or after ``deadline``."""
    kind = answer.kind
    now = answer.received_at
    if kind == "admitted":
        return Step("done")
    token = answer.queue_token if kind == "queued" else held_token
    if kind == "queued" or kind in ("limited", "shed"):
        wait = answer.retry_after if answer.retry_after is not None else 1.0
        at = now + max(0.0, wait)
        return Step("retry", at, token) if at < deadline else Step("stop", queue_token=token)
    if kind == "transport":
        at = now + TRANSPORT_RETRY_SECONDS
        return Step("retry", at, token) if at < deadline else Step("stop", queue_token=token)
    if kind == "pow" and solves_pow and held_token is None and now < deadline:
        return Step("solve", now)
    return Step("stop", queue_token=token if kind != "refused" else None)


def queue_number(token: str) -> int | None:
    """The arrival number a queue token carries (``kid.payload.mac``, payload base64url JSON
    with ``n``), or None when the token has another shape."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        return int(payload["n"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None


# -- the ledger ----------------------------------------------------------------------------------


@dataclasses.dataclass
class JoinRecord:
    """One simulated joiner and everything it was told."""

    index: int
    source: str
    account: bool = False
    answers: list[Answer] = dataclasses.field(default_factory=list)
    queue_token: str | None = None
    number: int | None = None
    pow_solved: int = 0
    pow_seconds: float = 0.0
    due: float | None = None  # when the schedule meant it to start

    @property
    def started_at(self) -> float | None:
        return self.answers[0].sent_at if self.answers else None

    @property
    def admitted_at(self) -> float | None:
        return next((a.received_at for a in self.answers if a.kind == "admitted"), None)

    @property
    def queued_at(self) -> float | None:
        return next((a.received_at for a in self.answers if a.kind == "queued"), None)

    @property
    def outcome(self) -> str:
        """``admitted``; ``queued`` (holds a token, not yet in); ``refused`` (its last answer
        turned it away); ``error`` (its last try had no answer or a 5xx other than a shed);
        ``unstarted``."""
        if not self.answers:
            return "unstarted"
        if self.admitted_at is not None:
            return "admitted"
        if self.queue_token is not None:
            return "queued"
        return "error" if self.answers[-1].kind in ERRORS else "refused"


@dataclasses.dataclass(frozen=True)
class Honesty:
    queued_joiners: int
    admitted_from_queue: int
    position_increases: int
    arrival_inversions: int
    order_violations: int
    numbers_known: int
    # Seconds from the first 202 to admission, minus that answer's estimated wait.
    wait_minus_estimate: dict[str, float | int]

    @property
    def honest(self) -> bool:
        return self.position_increases == 0 and self.arrival_inversions == 0 and self.order_violations == 0


class JoinLedger:
    """Every joiner of a run and every answer, bucketed on a :class:`Timeline`."""

    def __init__(self, start: float, width: float = 1.0) -> None:
        self.start = start
        self.timeline = Timeline(start, width)
        self.records: list[JoinRecord] = []

    def joiner(self, source: str, *, account: bool = False) -> JoinRecord:
        rec = JoinRecord(len(self.records), source, account)
        self.records.append(rec)
        return rec

    def record(self, rec: JoinRecord, answer: Answer) -> None:
        rec.answers.append(answer)
        self.timeline.add(answer.received_at, answer.kind, answer.latency if answer.status else None)
        if answer.kind == "queued" and answer.queue_token:
            if rec.queue_token is None:
                rec.number = queue_number(answer.queue_token)
            rec.queue_token = answer.queue_token
        elif answer.kind in ("admitted", "refused"):
            # In, or the token itself was refused (used, expired, another space): none held.
            rec.queue_token = None

    # -- figures ---------------------------------------------------------------------------------

    def outcomes(self) -> dict[str, int]:
        counts = Counter(r.outcome for r in self.records)
        return {k: counts[k] for k in ("admitted", "queued", "refused", "error", "unstarted")}

    def answers(self) -> dict[str, int]:
        counts = Counter(a.kind for r in self.records for a in r.answers)
        return {k: counts[k] for k in KINDS}

    def gave_up(self) -> dict[str, int]:
        """Joiners neither admitted nor queued, by their last answer (``503 overloaded``...):
        the run ended before the ``Retry-After`` they were given, or they were turned away."""
        counts = Counter(
            f"{r.answers[-1].status} {r.answers[-1].code}".strip()
            for r in self.records
            if r.outcome in ("refused", "error")
        )
        return dict(sorted(counts.items()))

    def waiting(self, until: float) -> list[int]:
        """Joiners holding a queue token and not yet admitted at the end of each bucket."""
        width, start = self.timeline.width, self.start
        n = self.timeline.bucket(until) + 1
        delta = [0] * (n + 1)
        for r in self.records:
            queued = r.queued_at
            if queued is None:
                continue
            left = r.admitted_at
            if left is None and r.queue_token is None:
                left = r.answers[-1].received_at  # its token was refused
            first = min(n, max(0, math.ceil((queued - start) / width) - 1))
            delta[first] += 1
            if left is not None:
                delta[min(n, max(0, math.ceil((left - start) / width) - 1))] -= 1
        out, level = [], 0
        for d in delta[:n]:
            level += d
            out.append(level)
        return out

    def rows(self, until: float) -> list[dict[str, Any]]:
        """The timeline's rows, each with ``waiting`` (see :meth:`waiting`)."""
        rows = self.timeline.rows(until)
        waiting = self.waiting(until)
        for i, row in enumerate(rows):
            row["waiting"] = waiting[i] if i < len(waiting) else 0
        return rows

    def statuses(self) -> dict[str, int]:
        counts = Counter(f"{a.status} {a.code}".strip() for r in self.records for a in r.answers)
        return dict(sorted(counts.items()))

    def latency(self, kinds: Sequence[str] = KINDS) -> dict[str, float | int]:
        """Request latency (sent to answered) over answers of ``kinds``."""
        return summarize(a.latency for r in self.records for a in r.answers if a.kind in kinds and a.status)

    def start_lag(self) -> dict[str, float | int]:
        """How late joiners sent their first request against the schedule: the load
        generator's own saturation (a late start is load that was not offered on time)."""
        return summarize(
            max(0.0, r.started_at - r.due)
            for r in self.records
            if r.due is not None and r.started_at is not None
        )

    def time_to_admission(self) -> dict[str, float | int]:
        """From a joiner's first request to its admission, waiting room included."""
        return summarize(
            r.admitted_at - r.started_at
            for r in self.records
            if r.admitted_at is not None and r.started_at is not None
        )

    def honesty(self) -> Honesty:
        queued = [r for r in self.records if r.queued_at is not None]
        numbered = [r for r in queued if r.number is not None]
        increases = 0
        for r in queued:
            positions = [a.position for a in r.answers if a.kind == "queued" and a.position is not None]
            increases += any(b > a for a, b in itertools.pairwise(positions))
        return Honesty(
            queued_joiners=len(queued),
            admitted_from_queue=sum(1 for r in queued if r.admitted_at is not None),
            position_increases=increases,
            arrival_inversions=_arrival_inversions(numbered),
            order_violations=_order_violations(numbered),
            numbers_known=len(numbered),
            wait_minus_estimate=summarize(_wait_errors(queued), (0.5, 0.9)),
        )


def _arrival_inversions(numbered: Sequence[JoinRecord]) -> int:
    """Joiners whose number is below that of someone queued before they even asked."""
    firsts = []
    for r in numbered:
        first = next(a for a in r.answers if a.kind == "queued")
        assert r.number is not None
        firsts.append((first.sent_at, first.received_at, r.number))
    answered = sorted((received, number) for _, received, number in firsts)
    inversions = 0
    i, highest = 0, -1
    for sent, _, number in sorted(firsts):
        while i < len(answered) and answered[i][0] < sent:
            highest = max(highest, answered[i][1])
            i += 1
        inversions += highest > number
    return inversions


def _order_violations(numbered: Sequence[JoinRecord]) -> int:
    """Answers telling arrival ``n`` to wait (position > 1) after a later arrival was admitted."""
    admissions = sorted(
        (r.admitted_at, r.number) for r in numbered if r.admitted_at is not None and r.number is not None
    )
    waits = sorted(
        (a.sent_at, r.number, a.position or 0)
        for r in numbered
        for a in r.answers
        if a.kind == "queued" and r.number is not None
    )
    violations = 0
    i, highest = 0, -1
    for sent, number, position in waits:
        while i < len(admissions) and admissions[i][0] < sent:
            highest = max(highest, admissions[i][1])
            i += 1
        violations += number < highest and position > 1
    return violations


def _wait_errors(queued: Sequence[JoinRecord]) -> list[float]:
    """Actual wait minus the first estimate, seconds (a return comes after a whole-second
    ``Retry-After``, so up to about a second late is the protocol, not a wrong estimate)."""
    errors = []
    for r in queued:
        first = next(a for a in r.answers if a.kind == "queued")
        if r.admitted_at is not None and first.estimated_wait is not None:
            errors.append(r.admitted_at - first.received_at - first.estimated_wait)
    return errors


# -- the server's own figures --------------------------------------------------------------------

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of metric ``name`` in Prometheus text format: (labels, value)."""
    out = []
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = _SAMPLE.match(line)
        if m is None or m["name"] != name:
            continue
        try:
            value = float(m["value"])
        except ValueError:
            continue
        out.append((dict(_LABEL.findall(m["labels"] or "")), value))
    return out


TICK_LATENESS = "townhall_stage_tick_lateness_seconds"
TICKS = "townhall_stage_ticks_total"
LATE_TICKS = "townhall_stage_late_ticks"
LATE_OVER = ("0.005", "0.01", "0.02")
# CPU seconds of the node's HTTP process and of its stage process, to tell who was busy.
NODE_CPU = "process_cpu_seconds_total"
STAGE_CPU = "townhall_stage_process_cpu_seconds_total"
# Whether the node asked anonymous joins for a proof of work, and how hard.
ADMISSION = (
    ("townhall_admission_attack_mode", "attack_mode"),
    ("townhall_admission_pow_difficulty", "pow_bits"),
)


def tick_lateness(text: str) -> dict[str, float]:
    """The stage's figures from a ``/metrics`` page: tick lateness by quantile over the node's
    last 10 minutes (``"0.5"``, ``"0.99"``, ``"1.0"``, seconds), ticks run (``"ticks"``) and
    ticks later than 5, 10 and 20 ms (``"late>0.005"``...), both counted since each live room
    started; empty when the node exposes none."""
    out = {
        labels["quantile"]: value
        for labels, value in metric_samples(text, TICK_LATENESS)
        if "quantile" in labels
    }
    if not out:
        return out
    for _, value in metric_samples(text, TICKS):
        out["ticks"] = value
    for labels, value in metric_samples(text, LATE_TICKS):
        if "over_seconds" in labels:
            out[f"late>{labels['over_seconds']}"] = value
    for name, key in ((NODE_CPU, "node_cpu"), (STAGE_CPU, "stage_cpu"), *ADMISSION):
        for _, value in metric_samples(text, name):
            out[key] = value
    return out


@dataclasses.dataclass
class Sampled:
    """The node's own figures, read from ``/metrics`` during a run (``tick_lateness`` of each
    read): the stage's ticks, its CPU, and the admission's attack mode."""

    start: float
    samples: list[tuple[float, dict[str, float]]] = dataclasses.field(default_factory=list)
    failures: int = 0

    def add(self, now: float, values: Mapping[str, float]) -> None:
        self.samples.append((round(now - self.start, 3), dict(values)))

    def late_since_start(self) -> list[tuple[float, dict[str, float]]]:
        """Per sample: ticks later than each threshold since the first sample of the run."""
        if not self.samples:
            return []
        first = self.samples[0][1]
        keys = [f"late>{o}" for o in LATE_OVER]
        return [
            (t, {k: v[k] - first[k] for k in keys if k in v and k in first and v[k] >= first[k]})
            for t, v in self.samples
        ]

    def during_run(self) -> dict[str, float] | None:
        """Ticks run, ticks late by more than 5, 10, 20 ms, and CPU seconds of the node's HTTP
        and stage processes between the first and the last read (``seconds`` apart; None if
        a counter went back, as a restarted room's or process's does)."""
        if len(self.samples) < 2:
            return None
        first, last = self.samples[0][1], self.samples[-1][1]
        out = {}
        for key in ("ticks", *(f"late>{o}" for o in LATE_OVER), "node_cpu", "stage_cpu"):
            if key in first and key in last:
                if last[key] < first[key]:
                    return None
                out[key] = round(last[key] - first[key], 3)
        out["seconds"] = round(self.samples[-1][0] - self.samples[0][0], 3)
        return out

    def as_dict(self) -> dict[str, Any]:
        worst = {
            q: max((v[q] for _, v in self.samples if q in v), default=None) for q in ("0.5", "0.99", "1.0")
        }
        attack = [t for t, v in self.samples if v.get("attack_mode")]
        return {
            "metric": TICK_LATENESS,
            "attack_mode": {
                "first_seen_at": attack[0] if attack else None,
                "samples_on": len(attack),
                "max_pow_bits": max((v.get("pow_bits", 0.0) for _, v in self.samples), default=None),
            },
            "note": "quantiles are the node's figure over its last 10 minutes (worst room); "
            "during_run counts ticks and late ticks between the first and last read of this run",
            "samples": [{"t": t, **v} for t, v in self.samples],
            "worst": worst,
            "during_run": self.during_run(),
            "failed_reads": self.failures,
        }
