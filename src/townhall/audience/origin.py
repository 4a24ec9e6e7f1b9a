"""The LL-HLS origin's memory: each live space's init segment, recent parts and segments, and
the playlist, with a wait for blocking playlist reloads.

Parts arrive from the packager thread and are applied on the event loop. Nothing here is per
listener: every listener of a space is served the same bytes, rendered once per change.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

from townhall.audience.packager import Packager, PartReady
from townhall.audience.playlist import Part, PlaylistSpec, Segment, has_part, render_live

RETAIN_SEGMENTS = 12


@dataclasses.dataclass
class _Building:
    msn: int
    start: float
    parts: list[bytes]
    durations: list[float]


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
        self.ended = False

    # -- from the packager ---------------------------------------------------------------------

    def set_init(self, data: bytes) -> None:
        self.init = data

    def add_part(self, part: PartReady) -> None:
        b = self._building
        if b is None:
            b = self._building = _Building(self._next_msn, part.start, [], [])
            self._next_msn += 1
        index = len(b.parts)
        b.parts.append(part.data)
        b.durations.append(part.duration)
        self.part_bytes[(b.msn, index)] = part.data
        complete = len(b.parts) == self.segment_parts
        segment = Segment(b.msn, tuple(Part(i, d) for i, d in enumerate(b.durations)), b.start, complete)
        if self.segments and self.segments[-1].msn == b.msn:
            self.segments[-1] = segment
        else:
            self.segments.append(segment)
        if complete:
            self.segment_bytes[b.msn] = b"".join(b.parts)
            self._building = None
            self._evict()
        self._playlist = None
        self._changed.set()
        self._changed = asyncio.Event()

    def _evict(self) -> None:
        while len(self.segments) > RETAIN_SEGMENTS:
            old = self.segments.pop(0)
            self.segment_bytes.pop(old.msn, None)
            for i in range(self.segment_parts):
                self.part_bytes.pop((old.msn, i), None)

    # -- for listeners -------------------------------------------------------------------------

    def playlist(self) -> str | None:
        if not self.segments:
            return None
        if self._playlist is None:
            self._playlist = render_live(self.spec, self.segments)
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
    """Every live space's stream on this node, fed by packagers attached to stage rooms."""

    def __init__(self, spec: PlaylistSpec, segment_parts: int, bitrate: int) -> None:
        self.spec = spec
        self.segment_parts = segment_parts
        self.bitrate = bitrate
        self.streams: dict[str, SpaceStream] = {}
        self.packagers: dict[str, Packager] = {}

    def attach(self, space_id: str) -> Packager:
        """Start packaging a space: returns the packager to feed with program frames."""
        packager = self.packagers.get(space_id)
        if packager is not None:
            return packager
        loop = asyncio.get_running_loop()
        stream = self.streams[space_id] = SpaceStream(self.spec, self.segment_parts)

        def on_init(data: bytes) -> None:
            loop.call_soon_threadsafe(stream.set_init, data)

        def on_part(part: PartReady) -> None:
            loop.call_soon_threadsafe(stream.add_part, part)

        packager = Packager(
            space_id,
            on_init=on_init,
            on_part=on_part,
            bitrate=self.bitrate,
            part_target=self.spec.part_target,
        )
        self.packagers[space_id] = packager
        return packager

    async def detach(self, space_id: str) -> None:
        packager = self.packagers.pop(space_id, None)
        if packager is not None:
            await asyncio.to_thread(packager.close)
        stream = self.streams.get(space_id)
        if stream is not None:
            stream.ended = True

    async def close(self) -> None:
        for space_id in list(self.packagers):
            await self.detach(space_id)
