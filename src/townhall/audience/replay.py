"""A space's replay as served: the VOD playlist, its segments and the single ``.m4a``, read from
the media store (synchronous: call it from a worker thread).

A finished recording never changes, so its listing, plan and playlist are kept in a small
in-memory cache, checked on each use against the ``finished`` marker (one ``stat``: its inode
and modification time): deleting the space's media, or writing the marker anew, invalidates the
entry on any node sharing the files. An unfinished recording (the end was just posted; or the
packager died and nobody has finalised it yet) is reused for at most a second and served as
far as it is durable.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time

from townhall.audience.playlist import Part, PlaylistSpec, Segment, render_vod
from townhall.audience.recording import (
    REPLAY_SEGMENT_SECONDS,
    RecordingPlan,
    ReplaySegment,
    plan_recording,
    replay_segments,
)
from townhall.storage.media_store import MediaStore, PartInfo

REPLAY_DIR = "replay"
# How long an unfinished recording's listing is reused (it can only grow, and only while a
# packager is still writing: right after the end, or never again if it died).
UNFINISHED_TTL = 1.0


def init_uri(epoch: int) -> str:
    return f"{REPLAY_DIR}/e{epoch}.mp4"


@dataclasses.dataclass(frozen=True)
class Replay:
    space_id: str
    finished_token: tuple[int, int] | None  # the marker this was built after; None: unfinished
    inits: dict[int, bytes]
    plan: RecordingPlan
    segments: dict[str, ReplaySegment]  # by name
    playlist: str

    @property
    def finished(self) -> bool:
        return self.finished_token is not None

    @property
    def parts(self) -> tuple[PartInfo, ...]:
        return self.plan.parts

    @property
    def etag(self) -> str:
        """Strong: the same parts make the same bytes."""
        return f'"{self.space_id}-m4a-{len(self.plan.parts)}-{self.plan.size}"'


def build_replay(space_id: str, store: MediaStore, part_target: float) -> Replay | None:
    """Read a space's stored recording; None when nothing playable is stored."""
    token = store.finished_token(space_id)  # before the listing: a finished listing is whole
    parts = store.parts(space_id)
    inits = {e: store.read_init(space_id, e) for e in store.epochs(space_id)}
    if not parts or not inits:
        return None
    plan = plan_recording(inits, parts)
    if not plan.parts:
        return None
    grouped = replay_segments(plan.parts)
    segments = [
        Segment(
            msn=i,
            parts=(Part(0, g.duration),),  # only the segment's duration is written (EXTINF)
            start=g.start,
            complete=True,
            discontinuity=i > 0 and g.epoch != grouped[i - 1].epoch,
            uri=f"{REPLAY_DIR}/{g.name}",
            init_uri=init_uri(g.epoch),
        )
        for i, g in enumerate(grouped)
    ]
    spec = PlaylistSpec(part_target=part_target, segment_target=REPLAY_SEGMENT_SECONDS)
    return Replay(
        space_id=space_id,
        finished_token=token,
        inits=inits,
        plan=plan,
        segments={g.name: g for g in grouped},
        playlist=render_vod(spec, segments),
    )


class Replays:
    """Replays of a store, finished ones cached (least recently used out first)."""

    def __init__(self, store: MediaStore, part_target: float, capacity: int = 16) -> None:
        self.store = store
        self.part_target = part_target
        self.capacity = capacity
        self._cache: collections.OrderedDict[str, Replay] = collections.OrderedDict()
        self._building: dict[str, threading.Lock] = {}
        self._built_at: dict[str, float] = {}
        self._lock = threading.Lock()

    def get(self, space_id: str) -> Replay | None:
        """The space's replay; concurrent callers share one build (the playlist and the file
        are asked for together the moment a space ends)."""
        with self._lock:
            building = self._building.setdefault(space_id, threading.Lock())
        with building:
            token = self.store.finished_token(space_id)
            now = time.monotonic()
            with self._lock:
                cached = self._cache.get(space_id)
                if cached is not None and cached.finished_token == token:
                    built_at = self._built_at.get(space_id, 0.0)
                    if token is not None or now - built_at < UNFINISHED_TTL:
                        self._cache.move_to_end(space_id)
                        return cached
                self._cache.pop(space_id, None)
            replay = build_replay(space_id, self.store, self.part_target)
            with self._lock:
                if replay is not None:
                    # An unfinished one too, briefly: a player fetching the segments of a
                    # recording whose packager died must not rebuild it on every request.
                    self._cache[space_id] = replay
                    self._built_at[space_id] = now
                    while len(self._cache) > self.capacity:
                        old, _ = self._cache.popitem(last=False)
                        self._built_at.pop(old, None)
                self._building.pop(space_id, None)
            return replay

    def forget(self, space_id: str) -> None:
        with self._lock:
            self._cache.pop(space_id, None)
            self._built_at.pop(space_id, None)

    def segment_bytes(self, replay: Replay, segment: ReplaySegment) -> bytes:
        """A VOD segment: its parts as stored (their own epoch's timeline, behind the epoch's
        own ``EXT-X-MAP``)."""
        run = replay.plan.parts[segment.first : segment.first + segment.count]
        return b"".join(self.store.read_parts(replay.space_id, run))
