"""The packager: the program mix as AAC-LC in fMP4/CMAF parts, encoded off the event loop.

The room hands every 20 ms program frame to ``Packager.feed`` (non-blocking: a bounded queue
whose drops are counted). A worker thread encodes AAC-LC with libav through PyAV and muxes
fragmented MP4 with a fragment every part; the muxer's output is cut into the init segment
(``ftyp`` + ``moov``) and parts (``moof`` + ``mdat``) by ``fmp4.BoxReader``. AAC frames are 1024
samples, so a fragment is asked for one AAC frame before the part target: every part is then
at most the target (RFC 8216bis §4.4.4.9 requires part durations ≤ PART-TARGET).

The worker thread is the packager's own, or one ``PackagerThread`` shared by every packager of
a process (the stage's): a thread per space woke 50 times a second each and fought the event
loop for the GIL at every frame (~800 context switches a second per space), where the shared
thread is handed all spaces' frames of a tick in one batch. libav's AAC encoder runs with its
``fast`` coder: ~75 µs a 20 ms frame with the muxing against ~135-210 µs for the default
``twoloop`` search (BENCHMARKS.md, "Stage: the cost of a space").
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import io
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import av
import numpy as np
import numpy.typing as npt

from townhall.audience.fmp4 import Box, BoxReader, base_decode_time, sample_count

logger = logging.getLogger(__name__)

RATE = 48000
AAC_FRAME = 1024
AAC_CODER = "fast"  # libav's AAC coder: "twoloop" (its default) costs twice the CPU
SHARED_QUEUE_TICKS = 100  # ticks (2 s) of every space's frames waiting for a shared thread


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
    """One space's AAC-LC/fMP4 packaging. With ``thread`` (shared by the process's packagers)
    it runs there; without, on a thread of its own fed through ``queue``."""

    def __init__(
        self,
        space_id: str,
        *,
        on_init: Callable[[bytes], None],
        on_part: Callable[[PartReady], None],
        bitrate: int = 64000,
        part_target: float = 0.5,
        queue_frames: int = 100,
        thread: PackagerThread | None = None,
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
        self._out: Any = None
        self._stream: Any = None
        self._pts = 0
        self._failed = False
        self._finished = False
        self._shared = thread
        if thread is None:
            self._thread = threading.Thread(target=self._run, name=f"packager-{space_id}", daemon=True)
            self._thread.start()

    def feed(self, frame: npt.NDArray[np.int16], wall: float) -> None:
        """Called every mixer tick; never blocks. A full queue drops its oldest frame."""
        if self._shared is not None:
            self._shared.feed(self, frame, wall)
            return
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
        """Encode what is queued, flush the last part and stop (blocks: call off the loop)."""
        if self._shared is not None:
            self._shared.close(self)
            return
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

    def _open(self) -> None:
        fragment_us = int((self.part_target - AAC_FRAME / RATE) * 1_000_000) + 1
        self._out = av.open(
            _Sink(self._on_bytes),
            "w",
            format="mp4",
            options={
                "movflags": "frag_keyframe+empty_moov+default_base_moof+cmaf",
                "frag_duration": str(fragment_us),
            },
        )
        self._stream = self._out.add_stream("aac", rate=RATE, layout="mono", options={"aac_coder": AAC_CODER})
        self._stream.bit_rate = self.bitrate

    def _encode(self, samples: npt.NDArray[np.int16], wall: float) -> None:
        """One frame into the encoder and muxer (on the worker thread). A failure is logged
        once and ends this packager's encoding; the others sharing its thread go on."""
        if self._failed or self._finished:
            return
        try:
            if self._out is None:
                self._open()
            self._walls.append((self._pts, wall))
            frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = RATE
            frame.pts = self._pts
            self._pts += len(samples)
            for packet in self._stream.encode(frame):
                self._out.mux(packet)
        except Exception:
            self._failed = True
            logger.exception("packager failed", extra={"space": self.space_id})

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._out is None:
            return
        try:
            for packet in self._stream.encode(None):
                self._out.mux(packet)
            self._out.close()
        except Exception:
            logger.exception("packager could not finish", extra={"space": self.space_id})

    def _run(self) -> None:
        self._open()
        while True:
            item = self.queue.get()
            if item is None:
                break
            self._encode(*item)
        self._finish()


_Batch = list[tuple[Packager, npt.NDArray[np.int16], float]]


class PackagerThread:
    """One worker thread for every packager of a process (the stage's).

    ``feed`` (on the event loop, from the mixer's tick) collects frames; they go to the thread
    in one batch once the loop finishes the current callback (the clock ticks every room in
    one), so the thread wakes once per tick however many spaces there are. A thread per
    packager woke once per frame each and took the GIL from the loop every time. The queue
    holds ``queue_ticks`` batches; when it is full the oldest batch is dropped and its frames
    counted in each packager's ``dropped``: a starved thread loses audio, never delays a tick.
    Fed from outside an event loop, a frame goes to the thread at once."""

    def __init__(
        self,
        name: str = "packager",
        queue_ticks: int = SHARED_QUEUE_TICKS,
        on_start: Callable[[], None] | None = None,
    ) -> None:
        self._on_start = on_start  # called on the thread as it starts (the stage lowers its priority)
        self._queue: queue.Queue[_Batch | None] = queue.Queue(queue_ticks)
        self._pending: _Batch = []
        self._lock = threading.Lock()
        self._closing: list[tuple[Packager, threading.Event]] = []
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def feed(self, packager: Packager, frame: npt.NDArray[np.int16], wall: float) -> None:
        if not self._pending:
            loop = asyncio_running_loop()
            if loop is None:
                self._submit([(packager, frame, wall)])
                return
            loop.call_soon(self._flush)
        self._pending.append((packager, frame, wall))

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            self._submit(batch)

    def _submit(self, batch: _Batch) -> None:
        while True:
            try:
                self._queue.put_nowait(batch)
                return
            except queue.Full:
                try:
                    dropped = self._queue.get_nowait()
                except queue.Empty:
                    continue
                for packager, _, _ in dropped or ():
                    packager.dropped += 1

    def close(self, packager: Packager) -> None:
        """Encode what the thread holds for ``packager``, then flush its last part (blocks)."""
        done = threading.Event()
        with self._lock:
            self._closing.append((packager, done))
        self._queue.put([])  # wakes the thread (an empty batch)
        if not done.wait(timeout=10):
            logger.warning("packager close timed out", extra={"space": packager.space_id})

    def stop(self) -> None:
        """End the thread once it has done what it holds (blocks)."""
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        if self._on_start is not None:
            self._on_start()
        stopping = False
        while not stopping:
            batch = self._queue.get()
            while True:
                if batch is None:
                    stopping = True
                else:
                    for packager, frame, wall in batch:
                        packager._encode(frame, wall)
                try:  # everything queued before a close is encoded before it
                    batch = self._queue.get_nowait()
                except queue.Empty:
                    break
            with self._lock:
                closing, self._closing = self._closing, []
            for packager, done in closing:
                packager._finish()
                done.set()


def asyncio_running_loop() -> asyncio.AbstractEventLoop | None:
    """The running event loop of this thread, or None."""
    return asyncio._get_running_loop()
