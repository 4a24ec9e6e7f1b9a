"""The packager: the program mix as AAC-LC in fMP4/CMAF parts, encoded off the event loop.

The room hands every 20 ms program frame to ``Packager.feed`` (non-blocking: a bounded queue
whose drops are counted). A worker thread encodes AAC-LC with libav through PyAV and muxes
fragmented MP4 with a fragment every part; the muxer's output is cut into the init segment
(``ftyp`` + ``moov``) and parts (``moof`` + ``mdat``) by ``fmp4.BoxReader``. AAC frames are 1024
samples, so a fragment is asked for one AAC frame before the part target: every part is then
at most the target (RFC 8216bis §4.4.4.9 requires part durations ≤ PART-TARGET).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import logging
import queue
import threading
from collections.abc import Callable

import av
import numpy as np
import numpy.typing as npt

from townhall.audience.fmp4 import Box, BoxReader, base_decode_time, sample_count

logger = logging.getLogger(__name__)

RATE = 48000
AAC_FRAME = 1024


@dataclasses.dataclass(frozen=True)
class PartReady:
    """One encoded part; ``start`` is the wall-clock time of its first sample."""

    space_id: str
    data: bytes
    duration: float
    start: float


class _Sink(io.RawIOBase):
    def __init__(self, on_bytes: Callable[[bytes], None]) -> None:
        self._on_bytes = on_bytes
        self._pos = 0

    def writable(self) -> bool:
        return True

    def write(self, b: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        data = bytes(b)
        self._pos += len(data)
        self._on_bytes(data)
        return len(data)

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return False


class Packager:
    def __init__(
        self,
        space_id: str,
        *,
        on_init: Callable[[bytes], None],
        on_part: Callable[[PartReady], None],
        bitrate: int = 64000,
        part_target: float = 0.5,
        queue_frames: int = 100,
    ) -> None:
        self.space_id = space_id
        self.on_init = on_init
        self.on_part = on_part
        self.bitrate = bitrate
        self.part_target = part_target
        self.queue: queue.Queue[tuple[npt.NDArray[np.int16], float] | None] = queue.Queue(queue_frames)
        self.dropped = 0
        self._reader = BoxReader()
        self._init = b""
        self._pending_moof: bytes | None = None
        # (first sample's pts, wall-clock time) of each frame fed to the encoder, so that a
        # part's start is the wall-clock time of its own first sample: a stall that skipped
        # mixer ticks shows as a jump in EXT-X-PROGRAM-DATE-TIME, not as a drift after it.
        self._walls: collections.deque[tuple[int, float]] = collections.deque()
        self._thread = threading.Thread(target=self._run, name=f"packager-{space_id}", daemon=True)
        self._thread.start()

    def feed(self, frame: npt.NDArray[np.int16], wall: float) -> None:
        """Called every mixer tick; never blocks. A full queue drops its oldest frame."""
        try:
            self.queue.put_nowait((frame, wall))
        except queue.Full:
            try:
                self.queue.get_nowait()
                self.dropped += 1
            except queue.Empty:
                pass
            self.queue.put_nowait((frame, wall))

    def close(self) -> None:
        self.queue.put(None)
        self._thread.join(timeout=10)

    # -- the worker thread ---------------------------------------------------------------------

    def _on_bytes(self, data: bytes) -> None:
        for box in self._reader.feed(data):
            if box.type in (b"ftyp", b"moov"):
                self._init += box.data
                if box.type == b"moov":
                    self.on_init(self._init)
            elif box.type == b"moof":
                self._pending_moof = box.data
            elif box.type == b"mdat" and self._pending_moof is not None:
                moof = Box(b"moof", self._pending_moof)
                samples = sample_count(moof) * AAC_FRAME
                start = self._wall_at(base_decode_time(moof))
                self.on_part(PartReady(self.space_id, self._pending_moof + box.data, samples / RATE, start))
                self._pending_moof = None

    def _wall_at(self, pts: int) -> float:
        """The wall-clock time of sample ``pts``, from the frame that held it."""
        walls = self._walls
        while len(walls) > 1 and walls[1][0] <= pts:
            walls.popleft()
        if not walls:
            return 0.0
        first_pts, wall = walls[0]
        return wall + (pts - first_pts) / RATE

    def _run(self) -> None:
        fragment_us = int((self.part_target - AAC_FRAME / RATE) * 1_000_000) + 1
        out = av.open(
            _Sink(self._on_bytes),
            "w",
            format="mp4",
            options={
                "movflags": "frag_keyframe+empty_moov+default_base_moof+cmaf",
                "frag_duration": str(fragment_us),
            },
        )
        stream = out.add_stream("aac", rate=RATE, layout="mono")
        stream.bit_rate = self.bitrate
        pts = 0
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    break
                samples, wall = item
                self._walls.append((pts, wall))
                frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
                frame.sample_rate = RATE
                frame.pts = pts
                pts += len(samples)
                for packet in stream.encode(frame):
                    out.mux(packet)
        except Exception:
            logger.exception("packager failed", extra={"space": self.space_id})
        finally:
            try:
                for packet in stream.encode(None):
                    out.mux(packet)
                out.close()
            except Exception:
                logger.exception("packager could not finish", extra={"space": self.space_id})
