"""The LL-HLS origin's memory: each live space's init segment, recent parts and segments, and
the playlist, with a wait for blocking playlist reloads.

Parts arrive from the stage process (``stage/process.py``) and are applied on the event loop.
Nothing here is per listener: every listener of a space is served the same bytes, rendered once
per change. When the stage process restarts mid-space, the stream closes the segment it was
building and marks the next one as a discontinuity (timestamps start again; the init segment is
byte-identical, since the encoder settings are the same).

Blocking reloads wait in one list per requested point (``msn``, ``part``) with one timer per
list, not a task or a timer per request: when a change makes a point available, its whole list
is woken at once (``Waiter.ready``), so whoever answers can build the answer once for all of
them; when the list's oldest waiter reaches its bound, it and every waiter due within
``EXPIRY_SLACK`` of it are told so (``Waiter.expired``). The HTTP protocol
(``control/fastproto.py``) parks connections here directly; ``wait_for`` puts a future in the
same lists for the ASGI routes.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from typing import Protocol

from townhall.audience.packager import PartReady
from townhall.audience.playlist import Part, PlaylistSpec, Segment, has_part, render_live

logger = logging.getLogger(__name__)

RETAIN_SEGMENTS = 12
# Waiters of one list due this close together are expired by the same timer call: a request
# may be answered "not in time" up to this much before its bound (seconds, against bounds of
# three target durations), so that a list with a steady stream of arrivals costs one timer
# call per slack, not one per request.
EXPIRY_SLACK = 0.05


class Waiter(Protocol):
    """What waits in a list for a point of the playlist."""

    def ready(self, stream: SpaceStream) -> None:
        """The playlist now has the point (called once, on the event loop)."""

    def expired(self) -> None:
        """The bound passed first, or the stream ended without it (called once)."""


class _Held:
    """The waiters for one point, oldest first, each with its deadline (loop time), and the
    list's one timer, armed for the oldest."""

    __slots__ = ("timer", "waiters")

    def __init__(self) -> None:
        self.waiters: collections.deque[tuple[float, Waiter]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None


class _FutureWaiter:
    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[bool]) -> None:
        self.future = future

    def ready(self, stream: SpaceStream) -> None:
        if not self.future.done():
            self.future.set_result(True)

    def expired(self) -> None:
        if not self.future.done():
            self.future.set_result(False)


@dataclasses.dataclass
class _Building:
    msn: int
    start: float
    parts: list[bytes]
    durations: list[float]
    discontinuity: bool


class SpaceStream:
    def __init__(self, spec: PlaylistSpec, segment_parts: int) -> None:
        self.spec = spec
        self.segment_parts = segment_parts
        self.init: bytes | None = None
        self.segments: list[Segment] = []
        self.part_bytes: dict[tuple[int, int], bytes] = {}
        self.segment_bytes: dict[int, bytes] = {}
        self._building: _Building | None = None
        self._next_msn = 0
        self._held: dict[tuple[int, int | None], _Held] = {}
        self.changed_at = 0.0  # perf_counter() at the last change: what woken waiters measure from
        self._playlist: str | None = None
        self._discontinuity = False
        self._discontinuities_evicted = 0
        self.ended = False

    # -- from the packager ---------------------------------------------------------------------

    def set_init(self, data: bytes) -> None:
        self.init = data

    def add_part(self, part: PartReady, seq: int = 0) -> None:
        """A new part; ``seq`` is its number in the space's recording. The first part of a
        space that ran before this node started (it resumed after a restart) continues the
        media sequence past what earlier listeners may have seen, after a discontinuity."""
        if seq and not self.segments and self._building is None:
            self._next_msn = max(self._next_msn, seq // self.segment_parts + 1)
            self._discontinuity = True
        b = self._building
        if b is None:
            b = self._building = _Building(self._next_msn, part.start, [], [], self._discontinuity)
            self._next_msn += 1
            self._discontinuity = False
        index = len(b.parts)
        b.parts.append(part.data)
        b.durations.append(part.duration)
        self.part_bytes[(b.msn, index)] = part.data
        self._place(b, complete=len(b.parts) == self.segment_parts)
        self._announce()

    def restart(self) -> None:
        """The encoder started again (the stage process was restarted): the segment being
        built ends short, and the next one begins after a discontinuity."""
        if self._building is not None:
            self._place(self._building, complete=True)
            self._announce()
        self._discontinuity = True

    def end(self) -> None:
        self.ended = True
        self._announce()

    def _place(self, b: _Building, *, complete: bool) -> None:
        parts = tuple(Part(i, d) for i, d in enumerate(b.durations))
        segment = Segment(b.msn, parts, b.start, complete, b.discontinuity)
        if self.segments and self.segments[-1].msn == b.msn:
            self.segments[-1] = segment
        else:
            self.segments.append(segment)
        if complete:
            self.segment_bytes[b.msn] = b"".join(b.parts)
            self._building = None
            self._evict()

    def _announce(self) -> None:
        self._playlist = None
        self.changed_at = time.perf_counter()
        if self._held:
            self._release()

    def _release(self) -> None:
        """Wake every list whose point the playlist now has; once the stream has ended, tell
        the others that their point will not come."""
        for point in [p for p in self._held if self.ended or has_part(self.segments, *p)]:
            held = self._held.pop(point)
            if held.timer is not None:
                held.timer.cancel()
            ready = has_part(self.segments, *point)
            for _, waiter in held.waiters:
                _wake(waiter, self if ready else None)

    def _evict(self) -> None:
        while len(self.segments) > RETAIN_SEGMENTS:
            old = self.segments.pop(0)
            self._discontinuities_evicted += old.discontinuity
            self.segment_bytes.pop(old.msn, None)
            for i in range(self.segment_parts):
                self.part_bytes.pop((old.msn, i), None)

    # -- for listeners -------------------------------------------------------------------------

    def playlist(self) -> str | None:
        if not self.segments:
            return None
        if self._playlist is None:
            self._playlist = render_live(
                self.spec, self.segments, discontinuities_before=self._discontinuities_evicted
            )
        return self._playlist

    def hold(self, msn: int, part: int | None, waiter: Waiter, within: float) -> None:
        """Park ``waiter`` until the playlist has segment ``msn`` (part ``part``), at most
        ``within`` s. The caller has checked that it does not have it yet."""
        if self.ended:
            waiter.expired()
            return
        loop = asyncio.get_running_loop()
        point = (msn, part)
        held = self._held.get(point)
        if held is None:
            held = self._held[point] = _Held()
        deadline = loop.time() + within
        held.waiters.append((deadline, waiter))
        if held.timer is None:
            held.timer = loop.call_at(deadline, self._expire, point)

    def _expire(self, point: tuple[int, int | None]) -> None:
        held = self._held.get(point)
        if held is None:
            return
        held.timer = None
        loop = asyncio.get_running_loop()
        due = loop.time() + EXPIRY_SLACK
        waiters = held.waiters
        while waiters and waiters[0][0] <= due:
            _wake(waiters.popleft()[1], None)
        if waiters:
            held.timer = loop.call_at(waiters[0][0], self._expire, point)
        else:
            del self._held[point]

    async def wait_for(self, msn: int, part: int | None, within: float) -> bool:
        """Whether the playlist has segment ``msn`` (part ``part``) within ``within`` s."""
        if has_part(self.segments, msn, part):
            return True
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.hold(msn, part, _FutureWaiter(future), within)
        return await future


class Origin:
    """Every live space's stream on this node, fed with the parts the stage process encodes."""

    def __init__(self, spec: PlaylistSpec, segment_parts: int) -> None:
        self.spec = spec
        self.segment_parts = segment_parts
        self.streams: dict[str, SpaceStream] = {}

    def attach(self, space_id: str) -> SpaceStream:
        """The space's stream, created when its first part (or its start) arrives."""
        stream = self.streams.get(space_id)
        if stream is None or stream.ended:
            stream = self.streams[space_id] = SpaceStream(self.spec, self.segment_parts)
        return stream

    def detach(self, space_id: str) -> None:
        """The space ended: blocking reloads waiting for parts that will never come return."""
        stream = self.streams.get(space_id)
        if stream is not None:
            stream.end()

    def close(self) -> None:
        for space_id in list(self.streams):
            self.detach(space_id)


def _wake(waiter: Waiter, stream: SpaceStream | None) -> None:
    """Answer one held waiter (``ready`` with the stream, else ``expired``). One waiter's
    failure is logged and does not leave the rest of its list unanswered or stop the stream."""
    try:
        if stream is not None:
            waiter.ready(stream)
        else:
            waiter.expired()
    except Exception:
        logger.exception("a held blocking reload could not be answered")
