"""A space's stage at run time: WebRTC peers around the pure mixer, on a fixed 20 ms clock.

The I/O edge of the stage. Inbound speaker tracks are decoded by aiortc (its decoder runs in a
worker thread), converted to 20 ms mono frames and pushed into the ``Mixer``. A clock task
ticks every 20 ms against absolute deadlines (no drift); each tick's outputs go into small
bounded queues, one per outbound WebRTC track (mix-minus for a speaker, program for a host's
monitor) and one per program sink (the packager). A full queue drops its oldest frame: a slow
consumer loses audio, it never delays the mixer. Tick lateness is recorded for measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import logging
import secrets
import time
from collections.abc import Callable

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError

from townhall.stage.jitter import Frame
from townhall.stage.lateness import LatenessWindow
from townhall.stage.mixer import FRAME_SAMPLES, RATE, TICK, Mixer, MixOutput

logger = logging.getLogger(__name__)

TIME_BASE = fractions.Fraction(1, RATE)
OUT_QUEUE = 5  # 100 ms of audio per outbound consumer at most


class MixTrack(MediaStreamTrack):
    """An outbound audio track fed by the room: the mix-minus of one speaker, or the program."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self.queue: asyncio.Queue[Frame] = asyncio.Queue(OUT_QUEUE)
        self._pts = 0
        self.dropped = 0

    def offer(self, frame: Frame) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(frame)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        samples = await self.queue.get()
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self._pts
        frame.time_base = TIME_BASE
        self._pts += FRAME_SAMPLES
        return frame


class _Rechunker:
    """Decoded frames of any size and layout -> exact 960-sample mono int16 frames."""

    def __init__(self) -> None:
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        self._pending = np.zeros(0, dtype=np.int16)

    def feed(self, frame: av.AudioFrame) -> list[Frame]:
        parts = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        if parts:
            self._pending = np.concatenate([self._pending, *parts]).astype(np.int16)
        out = []
        while len(self._pending) >= FRAME_SAMPLES:
            out.append(self._pending[:FRAME_SAMPLES].copy())
            self._pending = self._pending[FRAME_SAMPLES:]
        return out


class Peer:
    """One WHIP or WHEP session."""

    def __init__(self, pc: RTCPeerConnection, kind: str, speaker: str, grant_id: str | None) -> None:
        self.id = secrets.token_urlsafe(12)
        self.pc = pc
        self.kind = kind  # "whip" or "whep"
        self.speaker = speaker  # the account it belongs to ("a<id>")
        self.grant_id = grant_id
        self.track: MixTrack | None = None
        self.reader: asyncio.Task[None] | None = None


class Room:
    """The stage of one space on this node."""

    def __init__(self, space_id: str, clock: Callable[[], float] | None = None) -> None:
        self.space_id = space_id
        self.mixer = Mixer()
        self.peers: dict[str, Peer] = {}
        self.program_sinks: list[Callable[[MixOutput], None]] = []
        self.lateness = LatenessWindow()
        self.levels: dict[str, float] = {}
        # Wall-clock time of the last tick that mixed each speaker's (unmuted) audio in.
        self.last_mixed: dict[str, float] = {}
        self.on_peer_closed: Callable[[Peer], None] | None = None
        self._clock_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[bool]] = set()
        self._loop_time = clock

    # -- lifecycle -----------------------------------------------------------------------------

    def ensure_running(self) -> None:
        if self._clock_task is None:
            self._clock_task = asyncio.create_task(self._run_clock(), name=f"stage-clock-{self.space_id}")

    async def close(self) -> None:
        for peer in list(self.peers.values()):
            await self.drop(peer.id)
        if self._clock_task is not None:
            self._clock_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._clock_task
            self._clock_task = None

    def now(self) -> float:
        return self._loop_time() if self._loop_time else asyncio.get_running_loop().time()

    # -- peers ---------------------------------------------------------------------------------

    def add_speaker(self, peer: Peer, track: MediaStreamTrack, *, muted: bool) -> None:
        """An inbound WHIP track: replaces any earlier session of the same speaker."""
        for other in list(self.peers.values()):
            if other.kind == "whip" and other.speaker == peer.speaker and other.id != peer.id:
                task = asyncio.create_task(self.drop(other.id))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        self.peers[peer.id] = peer
        self.mixer.add_speaker(peer.speaker, muted=muted)
        peer.reader = asyncio.create_task(self._read(peer, track), name=f"stage-read-{peer.id}")
        self.ensure_running()

    def add_listener(self, peer: Peer) -> MixTrack:
        """An outbound WHEP track: the mix minus ``peer.speaker`` (or the program for "*")."""
        peer.track = MixTrack()
        self.peers[peer.id] = peer
        self.ensure_running()
        return peer.track

    def register(self, peer: Peer) -> None:
        self.peers[peer.id] = peer

    async def drop(self, peer_id: str) -> bool:
        peer = self.peers.pop(peer_id, None)
        if peer is None:
            return False
        if peer.kind == "whip" and not any(
            p.kind == "whip" and p.speaker == peer.speaker for p in self.peers.values()
        ):
            self.mixer.remove_speaker(peer.speaker)
        if peer.reader is not None:
            peer.reader.cancel()
        if peer.track is not None:
            peer.track.stop()
        await peer.pc.close()
        if self.on_peer_closed is not None:
            self.on_peer_closed(peer)
        logger.info("stage peer closed", extra={"space": self.space_id, "peer": peer.id, "kind": peer.kind})
        return True

    async def drop_grant(self, grant_id: str) -> None:
        """A revoked grant: close every session it opened, at once."""
        for peer in list(self.peers.values()):
            if peer.grant_id == grant_id:
                await self.drop(peer.id)

    def set_muted(self, speaker: str, muted: bool) -> None:
        self.mixer.set_muted(speaker, muted)

    async def _read(self, peer: Peer, track: MediaStreamTrack) -> None:
        chunker = _Rechunker()
        try:
            while True:
                frame = await track.recv()
                if not isinstance(frame, av.AudioFrame):
                    continue
                now = self.now()
                for chunk in chunker.feed(frame):
                    self.mixer.push(peer.speaker, chunk, now)
        except MediaStreamError:
            logger.info("speaker track ended", extra={"space": self.space_id, "peer": peer.id})
            await self.drop(peer.id)

    # -- the clock -----------------------------------------------------------------------------

    async def _run_clock(self) -> None:
        start = self.now()
        n = 0
        while True:
            n += 1
            deadline = start + n * TICK
            delay = deadline - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            late = self.now() - deadline
            self.lateness.add(late)
            out = self.mixer.tick(deadline)
            self.levels = out.levels
            wall = time.time()
            for speaker, level in out.levels.items():
                if level > -120.0:
                    self.last_mixed[speaker] = wall
            for peer in self.peers.values():
                if peer.track is not None:
                    peer.track.offer(
                        out.program if peer.speaker == "*" else out.minus.get(peer.speaker, out.program)
                    )
            for sink in self.program_sinks:
                sink(out)
            if late > 1.0:  # a stall longer than a second: restart the schedule, do not burst
                start, n = self.now(), 0
