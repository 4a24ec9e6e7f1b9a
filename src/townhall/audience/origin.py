"""The LL-HLS origin's memory: each live space's init segment, recent parts and segments, and
the playlist, with a wait for blocking playlist reloads.

Parts arrive from the stage process (``stage/process.py``) and are applied on the event loop.
Nothing here is per listener: every listener of a space is served the same bytes, rendered once
per change. When the stage process restarts mid-space, the stream closes the segment it was
building and marks the next one as a discontinuity (timestamps start again; the init segment is
byte-identical, since the encoder settings are the same).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

from townhall.audience.packager import PartReady
from townhall.audience.playlist import Part, PlaylistSpec, Segment, has_part, render_live

RETAIN_SEGMENTS = 12


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
        self._changed = asyncio.Event()
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
        self._changed.set()
        self._changed = asyncio.Event()

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

    async def wait_for(self, msn: int, part: int | None, within: float) -> bool:
        """Until the playlist has segment ``msn`` (part ``part``), at most ``within`` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not has_part(self.segments, msn, part):
            remaining = deadline - loop.time()
            if remaining <= 0 or self.ended:
                return False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
        return True


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
