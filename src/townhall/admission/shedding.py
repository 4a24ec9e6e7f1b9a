"""Priority load shedding by queueing delay (pure: ``now`` and the measured delay are arguments).

Theory of operation, after CoDel (RFC 8289) as Facebook applied it to request queues ("Fail at
scale", 2015): a queue that is *good* empties now and then, so what matters is not its length
but whether its delay has *stood* above a target for a whole interval. While it has, the node is
overloaded, and a request that waited more than the target is refused at once (a cheap 503)
instead of being served late.

Each class has its own target and its own interval, both rising with its rank, so that the
order of shedding follows from the depth *and* the length of the overload:

=================  ==============  ===============  ======================================
class              delay over      standing for     requests
=================  ==============  ===============  ======================================
ANONYMOUS_JOIN     1 × target      1 × interval     new joins without credentials
JOIN               2 × target      2 × interval     joins of accounts, anonymous joins that
                                                    bring a queue token or a proof (the
                                                    middleware's look at the body), challenges
API                10 × target     3 × interval     pages and every other API call
RENEWAL            20 × target     4 × interval     ticket renewals of listeners already in
NEVER              —               —                WHIP/WHEP, host and admin calls, health
=================  ==============  ===============  ======================================

At the shipped 5 ms / 100 ms, a busy node (a shared machine, a storm of new joins) sheds new
anonymous joins within 100 ms of a standing 5 ms delay, while a page or an API call is shed only
once requests have been waiting 50 ms apiece for 300 ms: a real overload, not the noise of a
busy core. Shedding the cheap classes drains the run queue; the first delay under a class's
target ends that class's shedding.

The delay is measured by the caller as the time a request waits for the event loop to run it
once more (one ``sleep(0)``): the run queue ahead of it, which is where a flooded node's
requests wait.
"""

from __future__ import annotations

import dataclasses
import enum
import re


class Priority(enum.IntEnum):
    """Lower sheds first (the value is also the class's rank in the table above)."""

    ANONYMOUS_JOIN = 1
    JOIN = 2
    API = 3
    RENEWAL = 4
    NEVER = 9


# How many times the target a class's queueing delay must pass (see the table above).
DEPTH = {Priority.ANONYMOUS_JOIN: 1.0, Priority.JOIN: 2.0, Priority.API: 10.0, Priority.RENEWAL: 20.0}

_SPACE = r"/api/v1/spaces/[A-Za-z0-9]{1,16}"
_HOST_ACTIONS = re.compile(
    _SPACE + r"/(start|end|speakers|cohosts|blocks|speaker-token|events|speak-requests)(/|$)"
)
_JOIN = re.compile(_SPACE + r"/join$")
_RENEW = re.compile(_SPACE + r"/tickets/renew$")


def classify(method: str, path: str, authenticated: bool) -> Priority:
    """The class of a request from its method, path and whether it carries credentials: no
    body is read."""
    if path.startswith(("/whip/", "/whep/")) or path in ("/healthz", "/readyz", "/metrics"):
        return Priority.NEVER
    if path.startswith("/api/v1/admin/"):
        return Priority.NEVER
    if _HOST_ACTIONS.match(path) and authenticated:
        return Priority.NEVER
    if _JOIN.match(path):
        return Priority.JOIN if authenticated else Priority.ANONYMOUS_JOIN
    if path == "/api/v1/pow/challenge":
        # One HMAC, asked by a joiner about to spend its own work on a proof: shed after the
        # joins themselves, so that a node shedding anonymous joins still hands out challenges.
        return Priority.JOIN
    if _RENEW.match(path) or path.startswith("/hls/"):
        return Priority.RENEWAL
    if method == "POST" and path == "/api/v1/spaces" and authenticated:
        return Priority.NEVER  # a host creating their space
    return Priority.API


@dataclasses.dataclass
class Shedder:
    """The controller: feed it each measured delay; it says whether to refuse the request."""

    target: float = 0.005
    interval: float = 0.100
    # Per class: the last time the delay was under the class's target (None: never measured).
    good_at: dict[Priority, float] = dataclasses.field(default_factory=dict)
    shed: int = 0
    admitted: int = 0
    shed_by_class: dict[Priority, int] = dataclasses.field(default_factory=dict)
    first_shed_at: dict[Priority, float] = dataclasses.field(default_factory=dict)

    def overloaded_for(self, priority: Priority, now: float) -> float:
        """How long the delay has stood above ``priority``'s target (0 until it has for the
        class's interval)."""
        good = self.good_at.get(priority)
        if good is None or priority is Priority.NEVER:
            return 0.0
        over = now - good
        return over if over >= self.interval * int(priority) else 0.0

    def decide(self, priority: Priority, delay: float, now: float) -> bool:
        """True to shed this request."""
        for p, depth in DEPTH.items():  # every measurement informs every class
            if p not in self.good_at or delay < self.target * depth:
                self.good_at[p] = now
        if priority is Priority.NEVER:
            self.admitted += 1
            return False
        if delay > self.target * DEPTH[priority] and self.overloaded_for(priority, now) > 0:
            self.shed += 1
            self.shed_by_class[priority] = self.shed_by_class.get(priority, 0) + 1
            self.first_shed_at.setdefault(priority, now)
            return True
        self.admitted += 1
        return False
