"""Priority load shedding by queueing delay (pure: ``now`` and the measured delay are arguments).

Theory of operation, after CoDel (RFC 8289) as Facebook applied it to request queues ("Fail at
scale", 2015): a queue that is *good* empties now and then, so what matters is not its length
but whether its delay has stayed above ``target`` (5 ms) for a whole ``interval`` (100 ms).
While it has, the node is overloaded, and a request that waited more than ``target`` is
refused at once (a cheap 503) instead of being served late. Priority comes from how long the
overload has lasted: after one interval the lowest class (anonymous new joins) is shed, after
two the next (joins of accounts, other API calls), after three renewals and listener media;
classes marked ``NEVER`` (WHIP/WHEP, host actions, health) are never shed. Shedding cheap
requests drains the queue; the first delay under target ends the overload.

The delay is measured by the caller as the time a request waits for the event loop to run it
once more (one ``sleep(0)``): the run queue ahead of it, which is where a flooded node's
requests wait.
"""

from __future__ import annotations

import dataclasses
import enum
import re


class Priority(enum.IntEnum):
    """Lower sheds first."""

    ANONYMOUS_JOIN = 1
    JOIN = 2
    RENEWAL = 3
    NEVER = 9


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
    if _RENEW.match(path) or path.startswith("/hls/"):
        return Priority.RENEWAL
    if method == "POST" and path == "/api/v1/spaces" and authenticated:
        return Priority.NEVER  # a host creating their space
    return Priority.JOIN


@dataclasses.dataclass
class Shedder:
    """The controller: feed it each measured delay; it says whether to refuse the request."""

    target: float = 0.005
    interval: float = 0.100
    good_at: float | None = None  # last time the delay was under target
    shed: int = 0
    admitted: int = 0
    shed_by_class: dict[Priority, int] = dataclasses.field(default_factory=dict)

    def overloaded_for(self, now: float) -> float:
        """How long the delay has stayed above target (0 when it has not for an interval)."""
        if self.good_at is None:
            return 0.0
        over = now - self.good_at
        return over if over >= self.interval else 0.0

    def decide(self, priority: Priority, delay: float, now: float) -> bool:
        """True to shed this request."""
        if self.good_at is None or delay < self.target:
            self.good_at = now
        if priority is Priority.NEVER:
            self.admitted += 1
            return False
        over = self.overloaded_for(now)
        level = int(over / self.interval)  # 1 after one interval, 2 after two...
        if delay > self.target and level >= int(priority):
            self.shed += 1
            self.shed_by_class[priority] = self.shed_by_class.get(priority, 0) + 1
            return True
        self.admitted += 1
        return False
