"""A space's stage at run time: WebRTC peers around the pure mixer, on a fixed 20 ms clock.

The I/O edge of the stage. Inbound speaker audio is decoded on the event loop as each Opus
frame leaves aiortc's receive jitter buffer (``InlineDecoding``: a mono libopus decode is ~50 µs,
less than the hand-over to aiortc's per-speaker decoder thread and back, which woke the loop
twice per packet), converted to 20 ms mono frames and pushed into the ``Mixer``. One clock task
per process (``StageClock``) ticks every room every 20 ms against absolute deadlines (no
drift); each tick's program mix goes to the program sinks (the packager), and the frames for
the outbound WebRTC tracks (mix-minus for a speaker, program for a host's monitor) of every
room go to the process's one encoder thread, which turns them into Opus packets, one encoder
per track, and hands each track its packet. aiortc's sender then only
packetises: no second encode on its thread pool, no per-sample audio-level loop in Python.
Every queue on the way is bounded and drops its oldest entry when full: a slow consumer loses
audio, it never delays the mixer. Tick lateness is recorded for measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpReceiver
from aiortc.codecs import get_decoder
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from townhall.stage.jitter import Frame
from townhall.stage.lateness import LatenessWindow
from townhall.stage.mixer import FRAME_SAMPLES, RATE, TICK, Mixer, MixOutput
from townhall.stage.rtpfast import ErrorLog, InboundBypass, OutboundBypass
from townhall.stage.threads import below_the_loop

logger = logging.getLogger(__name__)

TIME_BASE = fractions.Fraction(1, RATE)
OUT_QUEUE = 5  # 100 ms of audio per outbound consumer at most
ENCODE_QUEUE = 5  # ticks waiting for the room's encoder thread at most
OPUS_BITRATE = 96000  # what aiortc's own Opus encoder uses
# CELT only ("lowdelay": no SILK, 2.5 ms look-ahead instead of 6.5 ms) at complexity 0: ~40 µs
# a 20 ms mono frame against ~78 µs for VoIP mode at complexity 10 (the default), with the
# waveform error of complexity 10 at this bit rate (SNR 16.2 against 16.3 dB on a speech-like
# test signal; VoIP mode 10.6 dB: bench/codec_cost.py, BENCHMARKS.md "Stage: the cost of a
# space"). At 96 kb/s for one mono voice mix, what higher complexities add (pitch pre-filter,
# TF analysis) buys nothing audible; the stage encodes a mix-minus per speaker every tick.
OPUS_APPLICATION = "lowdelay"
OPUS_COMPLEXITY = 0
# Speakers' and returns' RTP beside aiortc's per-packet path once DTLS-SRTP is up (rtpfast.py).
RTP_BYPASS = True


class OpusEncoder:
    """Mono Opus for one outbound stream (libopus through PyAV, 20 ms frames, CELT only at
    complexity 0: see ``OPUS_APPLICATION``).

    The mix is mono, so it is coded as mono: half the work of aiortc's encoder, which upmixes
    every frame to stereo first. Any Opus decoder plays a mono stream (RFC 7587 §3.4) and a
    CELT-only one (a mode every decoder has)."""

    def __init__(self, bitrate: int = OPUS_BITRATE) -> None:
        self._codec = av.CodecContext.create("libopus", "w")
        self._codec.bit_rate = bitrate
        self._codec.format = "s16"
        self._codec.layout = "mono"
        self._codec.sample_rate = RATE
        self._codec.time_base = TIME_BASE
        self._codec.options = {"application": OPUS_APPLICATION, "compression_level": str(OPUS_COMPLEXITY)}
        self._pts = 0

    def encode(self, samples: Frame) -> list[av.Packet[Any]]:
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self._pts
        self._pts += len(samples)
        return self._codec.encode(frame)


class MixTrack(MediaStreamTrack):
    """An outbound audio track fed by the room: Opus packets of the mix-minus of one speaker,
    or of the program. aiortc's sender takes them as they are (it only packetises them)."""

    kind = "audio"

    def __init__(self, pc: RTCPeerConnection | None = None) -> None:
        super().__init__()
        self.queue: asyncio.Queue[av.Packet[Any]] = asyncio.Queue(OUT_QUEUE)
        self.encoder = OpusEncoder()  # used on the room's encoder thread only
        # Nothing is encoded for a track before its sender first asks (before the peer connects).
        self.wanted = False
        self._pts = 0
        self.dropped = 0
        self._pc = pc
        # Once the sender first asks (DTLS is up), packets go out through this, not the queue.
        self.bypass: OutboundBypass | None = None
        self._ended = asyncio.Event()

    def stop(self) -> None:
        super().stop()
        self._ended.set()

    def offer(self, packet: av.Packet[Any]) -> None:
        if self.bypass is not None:
            self.bypass.send(bytes(packet), FRAME_SAMPLES)
            return
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(packet)

    async def recv(self) -> av.Packet[Any]:
        if self.readyState != "live":
            raise MediaStreamError
        if not self.wanted:
            self.wanted = True
            self.bypass = self._bypass()
        if self.bypass is not None:  # the room sends; aiortc's sender task just waits here
            await self._ended.wait()
            raise MediaStreamError
        packet = await self.queue.get()
        # The RTP timestamp follows the packets sent, so a dropped packet is skipped audio, not a gap.
        packet.pts = self._pts
        packet.time_base = TIME_BASE
        self._pts += FRAME_SAMPLES
        return packet

    def _bypass(self) -> OutboundBypass | None:
        if not RTP_BYPASS or self._pc is None:
            return None
        for transceiver in self._pc.getTransceivers():
            if transceiver.sender.track is self:
                return OutboundBypass.install(transceiver)
        return None


class _Encoder:
    """The room's encoder thread: each tick's outbound frames become Opus packets off the event
    loop (libopus runs without the GIL), and all of one tick's packets come back to the loop in
    a single call. The queue holds ``ENCODE_QUEUE`` ticks; when it is full the oldest tick is
    dropped and counted (``dropped``), so a starved thread loses audio and never delays a tick."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: queue.Queue[list[tuple[MixTrack, Frame]] | None] = queue.Queue(ENCODE_QUEUE)
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, work: list[tuple[MixTrack, Frame]]) -> None:
        while True:
            try:
                self._queue.put_nowait(work)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()
                    self.dropped += 1

    def close(self) -> None:
        """Stop the thread once it has encoded what it holds (call from a worker thread)."""
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        below_the_loop()
        while (work := self._queue.get()) is not None:
            try:
                done = [(track, p) for track, samples in work for p in track.encoder.encode(samples)]
            except Exception:
                logger.exception("opus encoding failed")
                continue
            with contextlib.suppress(RuntimeError):  # the loop is closing: nobody is listening
                self._loop.call_soon_threadsafe(_deliver, done)


_DELIVERY_FAILED = ErrorLog("a mix-minus packet could not be sent")


def _deliver(done: list[tuple[MixTrack, av.Packet[Any]]]) -> None:
    for track, packet in done:
        try:
            track.offer(packet)
        except Exception:  # one return that fails (e.g. SRTP protect) costs the others nothing
            _DELIVERY_FAILED.report()


class _Rechunker:
    """Decoded frames of any size and layout -> exact 960-sample mono int16 frames.

    aiortc's Opus decoder gives packed 16-bit stereo at 48 kHz, 960 samples a frame: that case
    is downmixed with numpy, exactly as libswresample does it (the mean of the two channels,
    halves rounded up), and handed on without copying; anything else goes through a resampler.
    """

    def __init__(self) -> None:
        self._resampler: av.AudioResampler | None = None
        self._pending = np.zeros(0, dtype=np.int16)

    def _mono(self, frame: av.AudioFrame) -> list[Frame]:
        channels = frame.layout.nb_channels
        if frame.sample_rate == RATE and channels in (1, 2) and frame.format.name == "s16":
            # Packed: one plane of interleaved samples (the plane's buffer may be padded).
            samples = np.frombuffer(memoryview(frame.planes[0]), np.int16, count=frame.samples * channels)
            if channels == 1:
                return [samples]
            both = np.add(samples[0::2], samples[1::2], dtype=np.int32)
            both += 1
            both >>= 1
            return [both.astype(np.int16)]
        if self._resampler is None:
            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        return [
            f.to_ndarray().reshape(-1).astype(np.int16, copy=False) for f in self._resampler.resample(frame)
        ]

    def feed(self, frame: av.AudioFrame) -> list[Frame]:
        parts = self._mono(frame)
        if not len(self._pending) and len(parts) == 1 and len(parts[0]) == FRAME_SAMPLES:
            return parts  # the usual case: one decoded frame is one mixer frame
        if parts:
            self._pending = np.concatenate([self._pending, *parts]).astype(np.int16)
        out = []
        while len(self._pending) >= FRAME_SAMPLES:
            out.append(self._pending[:FRAME_SAMPLES].copy())
            self._pending = self._pending[FRAME_SAMPLES:]
        return out


class _SpeakerDecoder:
    """One speaker's inbound audio -> 20 ms mono frames. Opus (what every WHIP client sends) is
    decoded straight to mono by libopus; any other codec aiortc negotiated goes through aiortc's
    own decoder and the rechunker's downmix."""

    def __init__(self) -> None:
        self._opus: av.AudioCodecContext | None = None
        self._other: Any = None
        self._chunker = _Rechunker()

    def decode_opus(self, payload: bytes) -> list[Frame]:
        opus = self._opus
        if opus is None:
            opus = self._opus = av.CodecContext.create("libopus", "r")
            opus.format = "s16"
            opus.layout = "mono"
            opus.sample_rate = RATE
        return [chunk for frame in opus.decode(av.Packet(payload)) for chunk in self._chunker.feed(frame)]

    def decode(self, codec: RTCRtpCodecParameters, data: Any) -> list[Frame]:
        if codec.name.lower() == "opus":
            return self.decode_opus(data.data)
        else:
            if self._other is None:
                self._other = get_decoder(codec)
            frames: list[Any] = list(self._other.decode(data))
        return [chunk for frame in frames for chunk in self._chunker.feed(frame)]


class InlineDecoding(queue.Queue[Any]):
    """Stands in for the queue between an aiortc ``RTCRtpReceiver`` and its decoder thread.

    aiortc puts each complete encoded frame on that queue from the event loop; its decoder thread
    decodes it and posts the decoded frame back to the loop: two thread hand-overs and two
    wake-ups of the loop per 20 ms packet per speaker, which cost more than the decode itself
    (~50 µs for mono Opus). Here ``put`` decodes on the spot and hands the frames to
    ``on_frames``; the thread, given this queue, waits in ``get`` until aiortc stops the receiver
    (``put(None)``), which still ends the track as before."""

    def __init__(
        self, on_frames: Callable[[list[Frame]], None], receiver: RTCRtpReceiver | None = None
    ) -> None:
        super().__init__()
        self._on_frames = on_frames
        self._decoder = _SpeakerDecoder()
        self._receiver = receiver
        self.bypass: InboundBypass | None = None

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if item is None:
            self.close()
            super().put(None, block, timeout)
            return
        codec, encoded = item
        if self._receiver is not None and RTP_BYPASS and codec.name.lower() == "opus":
            # The first frame: DTLS is up and the payload type known; from now on the
            # speaker's packets come straight from the ICE connection (``_payload``).
            self.bypass = InboundBypass.install(self._receiver, codec.payloadType, self._payload)
            self._receiver = None
        try:
            frames = self._decoder.decode(codec, encoded)
        except av.FFmpegError as exc:  # a corrupt packet is lost audio, never a stalled speaker
            logger.warning("speaker audio failed to decode: %s", exc)
            return
        if frames:
            self._on_frames(frames)

    def _payload(self, payload: bytes) -> None:
        try:
            frames = self._decoder.decode_opus(payload)
        except av.FFmpegError as exc:
            logger.warning("speaker audio failed to decode: %s", exc)
            return
        if frames:
            self._on_frames(frames)

    def close(self) -> None:
        """Give the speaker's socket back to aiortc's path (once; the session is ending)."""
        bypass, self.bypass = self.bypass, None
        if bypass is not None:
            bypass.remove()

    def poll(self) -> None:
        """Read the speaker's packets waiting in its socket, once they bypass aiortc."""
        if self.bypass is not None:
            self.bypass.poll()

    @staticmethod
    def install(receiver: RTCRtpReceiver, on_frames: Callable[[list[Frame]], None]) -> InlineDecoding | None:
        """Decode ``receiver``'s audio inline, if it has not started yet and is laid out as in the
        aiortc versions this was written against (1.9-1.16); otherwise leave it alone (False) and
        the track's decoded frames are read as usual."""
        queue_attr, thread_attr = "_RTCRtpReceiver__decoder_queue", "_RTCRtpReceiver__decoder_thread"
        if not isinstance(getattr(receiver, queue_attr, None), queue.Queue):
            return None
        if getattr(receiver, thread_attr, True) is not None:
            return None
        decoding = InlineDecoding(on_frames, receiver)
        setattr(receiver, queue_attr, decoding)
        return decoding


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

    def __init__(self, space_id: str, clock: StageClock | None = None) -> None:
        self.space_id = space_id
        self.mixer = Mixer()
        self.peers: dict[str, Peer] = {}
        self.program_sinks: list[Callable[[MixOutput], None]] = []
        self.lateness = LatenessWindow()
        # Per speaker, the loudest tick since the levels were last taken (``take_levels``).
        self._peaks: dict[str, float] = {}
        # Wall-clock time of the last tick that mixed each speaker's (unmuted) audio in.
        self.last_mixed: dict[str, float] = {}
        self.on_peer_closed: Callable[[Peer], None] | None = None
        # The process's clock (shared by every room), or one of its own.
        self._own_clock = clock is None
        self._clock = StageClock() if clock is None else clock
        self._background: set[asyncio.Task[bool]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Speakers' inline decoders by peer: their sockets are read at each tick (``poll``).
        self._inbound: dict[str, InlineDecoding] = {}
        self.poll_errors = ErrorLog("a speaker's socket could not be read at the tick")

    # -- lifecycle -----------------------------------------------------------------------------

    def ensure_running(self) -> None:
        self._clock.add(self)

    async def close(self) -> None:
        for peer in list(self.peers.values()):
            await self.drop(peer.id)
        self._clock.remove(self)
        if self._own_clock:
            await self._clock.close()

    def now(self) -> float:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop.time()

    # -- peers ---------------------------------------------------------------------------------

    def add_speaker(
        self, peer: Peer, track: MediaStreamTrack, *, muted: bool, receiver: RTCRtpReceiver | None = None
    ) -> None:
        """An inbound WHIP track: replaces any earlier session of the same speaker. Given the
        track's ``receiver`` (before the connection starts), its audio is decoded inline."""
        for other in list(self.peers.values()):
            if other.kind == "whip" and other.speaker == peer.speaker and other.id != peer.id:
                task = asyncio.create_task(self.drop(other.id))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        self.peers[peer.id] = peer
        self.mixer.add_speaker(peer.speaker, muted=muted)

        def push(frames: list[Frame]) -> None:
            now = self.now()
            for frame in frames:
                self.mixer.push(peer.speaker, frame, now)

        decoding = InlineDecoding.install(receiver, push) if receiver is not None else None
        inline = decoding is not None
        if decoding is not None:
            self._inbound[peer.id] = decoding
        peer.reader = asyncio.create_task(self._read(peer, track, push, inline), name=f"stage-read-{peer.id}")
        self.ensure_running()

    def add_listener(self, peer: Peer) -> MixTrack:
        """An outbound WHEP track: the mix minus ``peer.speaker`` (or the program for "*")."""
        peer.track = MixTrack(peer.pc)
        self.peers[peer.id] = peer
        self.ensure_running()
        return peer.track

    def register(self, peer: Peer) -> None:
        self.peers[peer.id] = peer

    async def drop(self, peer_id: str) -> bool:
        peer = self.peers.pop(peer_id, None)
        decoding = self._inbound.pop(peer_id, None)
        if decoding is not None:
            decoding.close()  # its socket back to aiortc before the peer connection closes
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

    async def _read(
        self, peer: Peer, track: MediaStreamTrack, push: Callable[[list[Frame]], None], inline: bool
    ) -> None:
        """Until the track ends: its decoded frames into the mixer, unless they are decoded
        inline (then nothing arrives here but the end)."""
        chunker = _Rechunker()
        try:
            while True:
                frame = await track.recv()
                if not inline and isinstance(frame, av.AudioFrame):
                    push(chunker.feed(frame))
        except MediaStreamError:
            logger.info("speaker track ended", extra={"space": self.space_id, "peer": peer.id})
            await self.drop(peer.id)

    # -- the clock -----------------------------------------------------------------------------

    def tick(self, deadline: float, late: float) -> list[tuple[MixTrack, Frame]]:
        """One 20 ms tick (called by the clock): mix, hand the program to its sinks, and return
        the frames the outbound tracks are to carry, for the clock's encoder thread."""
        self.lateness.add(late)
        for peer_id, decoding in list(self._inbound.items()):
            try:
                decoding.poll()  # what each speaker sent since the last tick, into the mixer
            except Exception:  # one speaker's socket must never skip the room's mix
                self.poll_errors.report(space=self.space_id, peer=peer_id)
        out = self.mixer.tick(deadline)
        peaks = self._peaks
        wall = time.time()
        for speaker, level in out.levels.items():
            if level > peaks.get(speaker, -120.0):
                peaks[speaker] = level
            if level > -120.0:
                self.last_mixed[speaker] = wall
        for sink in self.program_sinks:
            sink(out)
        return [
            (peer.track, out.program if peer.speaker == "*" else out.minus.get(peer.speaker, out.program))
            for peer in self.peers.values()
            if peer.track is not None and peer.track.wanted
        ]

    def take_levels(self) -> dict[str, float]:
        """Each present speaker's loudest 20 ms level (dBFS) since the last call: the "who is
        speaking" indicator holds its peak over the reporting interval, so one lost or late
        frame just before a report does not show a talking speaker as silent."""
        peaks, self._peaks = self._peaks, {}
        return {speaker: peaks.get(speaker, -120.0) for speaker in self.mixer.speakers}

    @property
    def encoder_dropped(self) -> int:
        """Ticks the clock's encoder thread fell too far behind to encode (its queue was full),
        counted for the whole process when the clock is shared."""
        return self._clock.encoder_dropped


class StageClock:
    """One 20 ms clock and one Opus encoder thread for every room of the process.

    Every room ticks on the same absolute deadlines (no drift), so however many spaces the
    process stages, the event loop wakes once per 20 ms for all of them and the encoder thread
    is handed one batch per tick: N rooms each on a clock and a thread of their own woke the
    loop and a thread N times per tick, at N different moments. A room is mixed in the order it
    joined; one room's work never waits on another's I/O, only on its few hundred microseconds
    of mixing."""

    def __init__(self) -> None:
        self._rooms: dict[int, Room] = {}
        self._task: asyncio.Task[None] | None = None
        self._encoder: _Encoder | None = None

    def add(self, room: Room) -> None:
        self._rooms[id(room)] = room
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="stage-clock")
        if self._encoder is None:
            self._encoder = _Encoder("opus-encoder")

    def remove(self, room: Room) -> None:
        self._rooms.pop(id(room), None)

    @property
    def encoder_dropped(self) -> int:
        return self._encoder.dropped if self._encoder is not None else 0

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._encoder is not None:
            await asyncio.to_thread(self._encoder.close)
            self._encoder = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        n = 0
        while True:
            n += 1
            deadline = start + n * TICK
            delay = deadline - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            late = loop.time() - deadline
            work: list[tuple[MixTrack, Frame]] = []
            for room in list(self._rooms.values()):
                try:
                    work += room.tick(deadline, late)
                except Exception:  # one room's bug must not silence every other room
                    logger.exception("stage tick failed", extra={"space": room.space_id})
            if work and self._encoder is not None:
                self._encoder.submit(work)
            if late > 1.0:  # a stall longer than a second: restart the schedule, do not burst
                start, n = loop.time(), 0
