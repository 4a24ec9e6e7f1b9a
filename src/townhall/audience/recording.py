"""A whole space as one ``.m4a`` (fragmented MP4) and as VOD segments, from the stored parts,
without re-encoding (pure: bytes and metadata in, bytes out; the caller reads the files).

Theory of operation (ISO/IEC 14496-12)
--------------------------------------
- The file is ``ftyp`` + ``moov`` of the first epoch's init segment, rewritten so that its
  durations state the real total: ``mvhd`` and ``tkhd`` (movie timescale), ``mdhd`` (media
  timescale) and an ``mvex/mehd`` fragment duration (§8.8.2), all written as version 1 (64-bit).
  Then every part (``moof`` + ``mdat``) in order.
- A part is copied as it is stored except for two fields patched in place (same size, so every
  offset is known from the stored sizes alone): ``mfhd`` sequence_number (§8.8.5, must
  increase: the packager restarts it at 1 every epoch) and ``tfdt`` baseMediaDecodeTime
  (§8.8.12, the packager restarts it at 0 every epoch). The new ``tfdt`` is the sum of the
  durations of every earlier part, so the timeline runs on without a gap across epochs (the
  time a crashed packager was down is not in the recording: there is no audio for it).
  ``tfhd`` carries default-base-is-moof, so data offsets are relative to each ``moof`` and moving
  a part changes nothing else.
- Every epoch's init segment must describe the same track (same ``stsd`` but for its bitrate
  fields: an operator may change ``aac_bitrate`` between a crash and the restart), so one
  ``moov`` serves all.
- The file is never built whole: :class:`RecordingPlan` maps byte offsets onto the init and the
  parts, so a ``Range`` request reads only the parts it touches.
- VOD segments group consecutive parts of one epoch up to a target duration (a new epoch starts
  a new segment, behind an ``EXT-X-DISCONTINUITY`` and its own ``EXT-X-MAP``).
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence

from townhall.audience.fmp4 import CONTAINERS, Box, BoxReader, children, find
from townhall.storage.media_store import PartInfo

logger = logging.getLogger(__name__)

REPLAY_SEGMENT_SECONDS = 6.0
MAX_SEGMENT_PARTS = 32


# -- boxes -----------------------------------------------------------------------------------------


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def _full_header(payload: bytes) -> tuple[int, bytes]:
    return payload[0], payload[1:4]


def _with_duration(box: Box, duration: int) -> bytes:
    """``mvhd``, ``tkhd`` or ``mdhd`` rewritten as version 1 with ``duration``."""
    p = box.payload
    version, flags = _full_header(p)
    if box.type == b"tkhd":
        # creation, modification, track_ID, reserved, duration; then the rest.
        if version == 1:
            created, modified, track_id = struct.unpack(">QQI", p[4:24])
            rest = p[36:]
        else:
            created, modified, track_id = struct.unpack(">III", p[4:16])
            rest = p[24:]
        body = struct.pack(">QQIIQ", created, modified, track_id, 0, duration) + rest
    else:
        # mvhd, mdhd: creation, modification, timescale, duration; then the rest.
        if version == 1:
            created, modified, timescale = struct.unpack(">QQI", p[4:24])
            rest = p[32:]
        else:
            created, modified, timescale = struct.unpack(">III", p[4:16])
            rest = p[20:]
        body = struct.pack(">QQIQ", created, modified, timescale, duration) + rest
    return _box(box.type, b"\x01" + flags + body)


def _timescale(box: Box) -> int:
    p = box.payload
    offset = 20 if p[0] == 1 else 12
    return int(struct.unpack(">I", p[offset : offset + 4])[0])


def _rewrite(box: Box, movie_duration: int, media_duration: int) -> bytes:
    if box.type in (b"mvhd", b"tkhd"):
        return _with_duration(box, movie_duration)
    if box.type == b"mdhd":
        return _with_duration(box, media_duration)
    if box.type == b"mvex":
        mehd = _box(b"mehd", b"\x01\x00\x00\x00" + struct.pack(">Q", movie_duration))
        kept = b"".join(c.data for c in children(box.payload) if c.type != b"mehd")
        return _box(b"mvex", mehd + kept)  # mehd comes first in mvex (§8.8.2)
    if box.type in CONTAINERS:
        inner = b"".join(_rewrite(c, movie_duration, media_duration) for c in children(box.payload))
        return _box(box.type, inner)
    return box.data


@dataclasses.dataclass(frozen=True)
class Track:
    """What a recording needs to know of an init segment."""

    movie_timescale: int
    timescale: int
    stsd: bytes


def read_track(init: bytes) -> Track:
    """The timescales and sample description of an init segment (``ftyp`` + ``moov``)."""
    boxes = {b.type: b for b in BoxReader().feed(init)}
    moov = boxes.get(b"moov")
    if moov is None:
        raise ValueError("init segment without moov")
    mvhd = find(moov, [b"mvhd"])
    mdhd = find(moov, [b"trak", b"mdia", b"mdhd"])
    stsd = find(moov, [b"trak", b"mdia", b"minf", b"stbl", b"stsd"])
    if mvhd is None or mdhd is None or stsd is None:
        raise ValueError("init segment without mvhd, mdhd or stsd")
    if sum(1 for c in children(moov.payload) if c.type == b"trak") != 1:
        raise ValueError("a recording has exactly one track")
    return Track(_timescale(mvhd), _timescale(mdhd), stsd.data)


def _descriptor_length(data: bytes, pos: int) -> tuple[int, int]:
    """An MPEG-4 descriptor length (ISO/IEC 14496-1 §8.3.3: 7 bits a byte, high bit = more)."""
    length = 0
    for _ in range(4):
        byte = data[pos]
        pos += 1
        length = (length << 7) | (byte & 0x7F)
        if not byte & 0x80:
            break
    return length, pos


def codec_key(stsd: bytes) -> bytes:
    """The sample description without its bitrate fields (``esds`` DecoderConfigDescriptor
    bufferSizeDB/maxBitrate/avgBitrate, §7.2.6.6 of 14496-1, and ``btrt``): two inits that
    differ only there decode alike, so their parts can share one ``moov``."""
    out = bytearray(stsd)
    try:
        at = stsd.find(b"esds")
        if at >= 0:
            pos = at + 8  # the fourcc, then version and flags
            if stsd[pos] == 0x03:  # ES_Descriptor
                _, pos = _descriptor_length(stsd, pos + 1)
                flags = stsd[pos + 2]
                pos += 3
                pos += 2 if flags & 0x80 else 0
                pos += 1 + stsd[pos] if flags & 0x40 else 0
                pos += 2 if flags & 0x20 else 0
            if stsd[pos] == 0x04:  # DecoderConfigDescriptor
                _, pos = _descriptor_length(stsd, pos + 1)
                out[pos + 2 : pos + 13] = bytes(11)
        at = stsd.find(b"btrt")
        if at >= 0:
            out[at + 4 : at + 16] = bytes(12)
    except IndexError:
        return stsd
    return bytes(out)


def init_with_duration(init: bytes, media_duration: int) -> bytes:
    """``init`` with its durations set to ``media_duration`` (in the media timescale)."""
    track = read_track(init)
    movie_duration = round(media_duration * track.movie_timescale / track.timescale)
    return b"".join(
        _rewrite(b, movie_duration, media_duration) if b.type == b"moov" else b.data
        for b in BoxReader().feed(init)
    )


_last_layout = (-1, -1, -1)


def _fields(moof: bytes) -> tuple[int, int, int]:
    """Offsets in a ``moof`` of the ``mfhd`` sequence number and the ``tfdt`` time, and the
    ``tfdt`` version. Every part of a packager has the same layout, so the last one found is
    tried first (checked by the box types at those offsets); else the box headers are walked."""
    global _last_layout
    seq_at, tfdt_at, version = _last_layout
    if (
        tfdt_at > 0
        and seq_at > 0
        and moof[4:8] == b"moof"
        and moof[seq_at - 8 : seq_at - 4] == b"mfhd"
        and moof[tfdt_at - 8 : tfdt_at - 4] == b"tfdt"
        and moof[tfdt_at - 4] == version
        and tfdt_at + (8 if version == 1 else 4) <= struct.unpack(">I", moof[:4])[0]
    ):
        return _last_layout
    _last_layout = _walk(moof)
    return _last_layout


def _walk(moof: bytes) -> tuple[int, int, int]:
    if moof[4:8] != b"moof":
        raise ValueError("a part must begin with moof")
    end = struct.unpack(">I", moof[:4])[0]
    seq_at = tfdt_at = version = -1
    pos = 8
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", moof[pos : pos + 8])
        if size < 8:
            raise ValueError(f"invalid box size {size} in moof")
        if kind == b"mfhd":
            seq_at = pos + 12
        elif kind == b"traf":
            inner, traf_end = pos + 8, pos + size
            while inner + 8 <= traf_end:
                isize, ikind = struct.unpack(">I4s", moof[inner : inner + 8])
                if isize < 8:
                    raise ValueError(f"invalid box size {isize} in traf")
                if ikind == b"tfdt":
                    version = moof[inner + 8]
                    tfdt_at = inner + 12
                inner += isize
        pos += size
    if seq_at < 0 or tfdt_at < 0:
        raise ValueError("moof without mfhd or traf/tfdt")
    return seq_at, tfdt_at, version


def patch_part(data: bytes, *, sequence: int, decode_time: int) -> bytes:
    """A part with its ``mfhd`` sequence number and ``tfdt`` time replaced (same size)."""
    out = bytearray(data)
    _patch_into(out, 0, data, sequence, decode_time)
    return bytes(out)


def _patch_into(out: bytearray, at: int, data: bytes, sequence: int, decode_time: int) -> None:
    """Patch the part ``data``, already copied into ``out`` at ``at``, in place."""
    seq_at, tfdt_at, version = _fields(data)
    struct.pack_into(">I", out, at + seq_at, sequence)
    if version == 1:
        struct.pack_into(">Q", out, at + tfdt_at, decode_time)
    elif decode_time < 2**32:
        struct.pack_into(">I", out, at + tfdt_at, decode_time)
    else:
        raise ValueError("a version 0 tfdt cannot hold this decode time")


# -- the single file -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RecordingPlan:
    """Where every byte of the ``.m4a`` comes from. ``offsets[i]`` is where part ``i`` begins;
    ``decode_times[i]`` its new ``tfdt``; the part's ``mfhd`` sequence number is ``i + 1``."""

    init: bytes
    parts: tuple[PartInfo, ...]
    offsets: tuple[int, ...]
    decode_times: tuple[int, ...]
    timescale: int
    duration_ticks: int
    size: int

    @property
    def duration(self) -> float:
        return self.duration_ticks / self.timescale

    def part_bytes(self, index: int, stored: bytes) -> bytes:
        """Part ``index`` as it appears in the file, from its stored bytes."""
        return patch_part(stored, sequence=index + 1, decode_time=self.decode_times[index])

    def chunks(
        self,
        start: int,
        stop: int,
        read: Callable[[Sequence[PartInfo]], list[bytes]],
        chunk_bytes: int = 4 << 20,
    ) -> Iterator[bytes]:
        """Bytes ``[start, stop)`` of the file, about ``chunk_bytes`` at a time; ``read`` gives
        the stored bytes of a run of parts. Only the parts that overlap the range are read. Each
        chunk is one buffer: parts are copied in and patched in place."""
        if not 0 <= start <= stop <= self.size:
            raise ValueError(f"range {start}-{stop} outside the file ({self.size} bytes)")
        pos = start
        init_size = len(self.init)
        if pos < init_size:
            piece = self.init[pos : min(stop, init_size)]
            pos += len(piece)
            if piece:
                yield piece
        offsets, count = self.offsets, len(self.parts)
        index = bisect.bisect_right(offsets, pos) - 1
        while pos < stop:
            first = index
            base = offsets[first]
            end = base
            while index < count and end < stop and (index == first or end - base < chunk_bytes):
                end = offsets[index + 1] if index + 1 < count else self.size
                index += 1
            buffer = bytearray(end - base)
            for i, data in enumerate(read(self.parts[first:index]), start=first):
                info = self.parts[i]
                if len(data) != info.size:
                    raise ValueError(f"part {info.seq} is {len(data)} bytes, not {info.size}")
                at = offsets[i] - base
                buffer[at : at + info.size] = data
                _patch_into(buffer, at, data, i + 1, self.decode_times[i])
            lo, hi = pos - base, min(stop, end) - base
            yield bytes(buffer) if (lo, hi) == (0, len(buffer)) else bytes(memoryview(buffer)[lo:hi])
            pos = base + hi


def plan_recording(inits: Mapping[int, bytes], parts: Sequence[PartInfo]) -> RecordingPlan:
    """The layout of the whole recording. Parts of an epoch without an init segment cannot be
    played and are left out (logged)."""
    if not inits:
        raise ValueError("a recording needs an init segment")
    first = inits[min(inits)]
    track = read_track(first)
    for epoch, init in inits.items():
        if codec_key(read_track(init).stsd) != codec_key(track.stsd):
            raise ValueError(f"epoch {epoch} has another sample description: cannot join without re-encoding")
    playable = [p for p in parts if p.epoch in inits]
    if len(playable) != len(parts):
        logger.warning("parts without an init segment left out", extra={"count": len(parts) - len(playable)})
    decode_times = []
    ticks = 0
    for p in playable:
        decode_times.append(ticks)
        ticks += round(p.duration * track.timescale)
    init = init_with_duration(first, ticks)
    offsets = []
    pos = len(init)
    for p in playable:
        offsets.append(pos)
        pos += p.size
    return RecordingPlan(
        init=init,
        parts=tuple(playable),
        offsets=tuple(offsets),
        decode_times=tuple(decode_times),
        timescale=track.timescale,
        duration_ticks=ticks,
        size=pos,
    )


# -- VOD segments ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReplaySegment:
    """Consecutive parts ``parts[first : first + count]`` of one epoch."""

    first: int  # index into the parts list
    count: int
    epoch: int
    first_seq: int
    duration: float
    start: float

    @property
    def name(self) -> str:
        return f"r{self.first_seq}-{self.count}.m4s"


def replay_segments(parts: Sequence[PartInfo], target: float = REPLAY_SEGMENT_SECONDS) -> list[ReplaySegment]:
    """Group parts into VOD segments of at most ``target`` seconds (at least one part), never
    across an epoch or a gap in ``seq`` (a lost part): each segment is a run of parts that
    follow each other exactly."""
    out: list[ReplaySegment] = []
    i = 0
    while i < len(parts):
        j = i + 1
        total = parts[i].duration
        while (
            j < len(parts)
            and j - i < MAX_SEGMENT_PARTS
            and parts[j].epoch == parts[i].epoch
            and parts[j].seq == parts[j - 1].seq + 1
            and total + parts[j].duration <= target + 1e-9
        ):
            total += parts[j].duration
            j += 1
        out.append(ReplaySegment(i, j - i, parts[i].epoch, parts[i].seq, total, parts[i].start))
        i = j
    return out
