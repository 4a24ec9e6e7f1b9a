"""LL-HLS media playlists, written as text (pure: no I/O, time as input).

Theory of operation (RFC 8216bis, draft-pantos-hls-rfc8216bis)
----------------------------------------------------------------
- A *segment* (``seg{msn}.m4s``) is ``segment_parts`` consecutive *parts*
  (``seg{msn}.{i}.m4s``); every AAC part is independent, so each part carries
  ``INDEPENDENT=YES`` (§4.4.4.9).
- The live playlist lists a sliding window of whole segments; parts are listed for the
  segments within the last three target durations and for the segment being built
  (§4.4.4.9: parts older than that MAY be dropped), followed by an ``EXT-X-PRELOAD-HINT`` naming
  the next part (§4.4.5.3).
- ``EXT-X-SERVER-CONTROL`` advertises ``CAN-BLOCK-RELOAD=YES`` and
  ``PART-HOLD-BACK`` = 3 × part target (§4.4.3.8 asks at least 2×; 3× is the common practice).
- Blocking reload (§6.2.5.2): a request for ``_HLS_msn=M`` (and ``_HLS_part=P``) waits until
  the playlist contains that segment (or part); one for a segment more than one beyond the
  next is a 400.
- The VOD playlist (the replay) lists every segment with ``EXT-X-PLAYLIST-TYPE:VOD`` and
  ``EXT-X-ENDLIST``; a discontinuity (a restart after a crash) is marked
  ``EXT-X-DISCONTINUITY``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Sequence

VERSION = 9


@dataclasses.dataclass(frozen=True)
class Part:
    index: int
    duration: float


@dataclasses.dataclass(frozen=True)
class Segment:
    msn: int
    parts: tuple[Part, ...]
    # Wall-clock time of the segment's first sample (EXT-X-PROGRAM-DATE-TIME).
    start: float
    complete: bool
    discontinuity: bool = False
    # VOD only: the segment's URI when not ``seg{msn}.m4s``, and its init segment when it is
    # not the playlist's (a new EXT-X-MAP is written where it changes).
    uri: str | None = None
    init_uri: str | None = None

    @property
    def duration(self) -> float:
        return sum(p.duration for p in self.parts)


@dataclasses.dataclass(frozen=True)
class PlaylistSpec:
    part_target: float
    segment_target: float
    window_segments: int = 6

    @property
    def target_duration(self) -> int:
        """EXT-X-TARGETDURATION: segment durations rounded to the nearest integer must not
        exceed it (§4.4.3.1)."""
        return max(1, math.ceil(self.segment_target - 1e-9))

    @property
    def part_hold_back(self) -> float:
        return round(3 * self.part_target, 3)


def segment_uri(msn: int) -> str:
    return f"seg{msn}.m4s"


def part_uri(msn: int, index: int) -> str:
    return f"seg{msn}.{index}.m4s"


def _pdt(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def render_live(
    spec: PlaylistSpec,
    segments: Sequence[Segment],
    *,
    init_uri: str = "init.mp4",
    discontinuities_before: int = 0,
) -> str:
    """The live LL-HLS playlist for ``segments`` (oldest first; the last may be incomplete).

    ``discontinuities_before`` counts the discontinuities of segments no longer in
    ``segments``: with those still held but outside the window, it gives
    ``EXT-X-DISCONTINUITY-SEQUENCE`` (§4.4.3.3), written once a discontinuity has left the
    playlist so that players keep their timelines apart."""
    if not segments:
        raise ValueError("a live playlist needs at least one segment or part")
    complete = [s for s in segments if s.complete]
    window = complete[-spec.window_segments :]
    building = segments[-1] if not segments[-1].complete else None
    shown = [*window, *([building] if building else [])]
    first = shown[0]
    lines = [
        "#EXTM3U",
        f"#EXT-X-VERSION:{VERSION}",
        f"#EXT-X-TARGETDURATION:{spec.target_duration}",
        f"#EXT-X-PART-INF:PART-TARGET={_fmt(spec.part_target)}",
        f"#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK={_fmt(spec.part_hold_back)}",
        f"#EXT-X-MEDIA-SEQUENCE:{first.msn}",
    ]
    # The first shown segment's own discontinuity is not tagged (nothing precedes it here), so
    # it counts in the sequence number, as every one before it does.
    sequence = discontinuities_before + sum(1 for s in segments if s.discontinuity and s.msn <= first.msn)
    if sequence:
        lines.append(f"#EXT-X-DISCONTINUITY-SEQUENCE:{sequence}")
    lines.append(f'#EXT-X-MAP:URI="{init_uri}"')
    # Parts are listed for the segments within three target durations of the live edge.
    edge_window = 3 * spec.target_duration
    listed_from = len(shown)
    covered = 0.0
    for i in range(len(shown) - 1, -1, -1):
        listed_from = i
        covered += shown[i].duration
        if covered >= edge_window:
            break
    for i, seg in enumerate(shown):
        if seg.discontinuity and i > 0:
            lines.append("#EXT-X-DISCONTINUITY")
        lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{_pdt(seg.start)}")
        if i >= listed_from:
            for part in seg.parts:
                uri = part_uri(seg.msn, part.index)
                lines.append(f'#EXT-X-PART:DURATION={_fmt(part.duration)},URI="{uri}",INDEPENDENT=YES')
        if seg.complete:
            lines.append(f"#EXTINF:{_fmt(seg.duration)},")
            lines.append(segment_uri(seg.msn))
    last = shown[-1]
    if last.complete:
        hint_msn, hint_part = last.msn + 1, 0
    else:
        hint_msn, hint_part = last.msn, len(last.parts)
    lines.append(f'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="{part_uri(hint_msn, hint_part)}"')
    return "\n".join(lines) + "\n"


def render_vod(spec: PlaylistSpec, segments: Sequence[Segment], *, init_uri: str = "init.mp4") -> str:
    """The replay: every complete segment, ended (§4.4.3.5, §4.4.3.4). A segment naming its own
    ``init_uri`` gets an ``EXT-X-MAP`` where the init segment changes (§4.4.4.5), which is after
    an ``EXT-X-DISCONTINUITY`` (§4.4.4.3: a new encoder run)."""
    done = [s for s in segments if s.complete]
    if not done:
        raise ValueError("a replay needs at least one complete segment")
    target = max(spec.target_duration, max(round(s.duration) for s in done))
    current_map = done[0].init_uri or init_uri
    lines = [
        "#EXTM3U",
        f"#EXT-X-VERSION:{VERSION}",
        f"#EXT-X-TARGETDURATION:{target}",
        "#EXT-X-PLAYLIST-TYPE:VOD",
        f"#EXT-X-MEDIA-SEQUENCE:{done[0].msn}",
        f'#EXT-X-MAP:URI="{current_map}"',
    ]
    for i, seg in enumerate(done):
        if seg.discontinuity and i > 0:
            lines.append("#EXT-X-DISCONTINUITY")
        wanted_map = seg.init_uri or init_uri
        if wanted_map != current_map:
            lines.append(f'#EXT-X-MAP:URI="{wanted_map}"')
            current_map = wanted_map
        if i == 0 or seg.discontinuity:
            lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{_pdt(seg.start)}")
        lines.append(f"#EXTINF:{_fmt(seg.duration)},")
        lines.append(seg.uri or segment_uri(seg.msn))
    lines.append("#EXT-X-ENDLIST")
    return "\n".join(lines) + "\n"


class BlockingRequestError(ValueError):
    """A blocking reload asked for something the server will never be able to answer soon."""


def has_part(segments: Sequence[Segment], msn: int, part: int | None) -> bool:
    """Whether a playlist of ``segments`` satisfies ``_HLS_msn=msn`` (``_HLS_part=part``)."""
    if not segments:
        return False
    last = segments[-1]
    if part is None:
        # Without _HLS_part, the segment itself must be complete (§6.2.5.2).
        return any(s.msn == msn and s.complete for s in segments) or last.msn > msn
    if last.msn > msn:
        return True
    if last.msn < msn:
        return False
    return len(last.parts) > part or last.complete


def check_blocking_request(
    segments: Sequence[Segment], msn: int, part: int | None, segment_parts: int
) -> None:
    """400 territory (§6.2.5.2): a segment more than one past the next, or a part index the
    segment can never have."""
    if msn < 0 or (part is not None and part < 0):
        raise BlockingRequestError("_HLS_msn and _HLS_part must not be negative")
    if part is not None and part >= segment_parts:
        raise BlockingRequestError(f"_HLS_part must be below {segment_parts}")
    next_msn = (segments[-1].msn + 1) if segments else 0
    if msn > next_msn + 1:
        raise BlockingRequestError(f"_HLS_msn={msn} is too far ahead of the live edge ({next_msn})")
