"""A WHIP / WHEP client on aiortc: speak into a stage, listen to it, record what arrives.

Theory of operation (RFC 9725, WHIP; WHEP, draft-ietf-wish-whep, mirrors it for playback):

- One HTTP POST carries the whole SDP offer (``Content-Type: application/sdp``) to the endpoint
  URL; success is "201 Created" with the SDP answer as the body and a ``Location`` header naming
  the session URL (RFC 9725 §4.2). Any other status is a refusal, reported as :class:`WhipError`
  with the status and body; we do not guess a cause from the code (RFC 9725 §4.1).
- We do not trickle: aiortc gathers every local candidate inside ``setLocalDescription``, so the
  offer already lists them all, which RFC 9725 §4.3.2 allows. No STUN or TURN by default: the
  stage is reached over loopback or a LAN; pass ``ice_servers`` otherwise (RFC 9725 §4.6).
- The token rides in ``Authorization: Bearer`` on every request, the POST and the DELETE alike
  (RFC 9725 §4.7.1, RFC 6750). A 307 from a load balancer is followed, keeping method and body
  (RFC 9725 §4.5); httpx drops the token if the redirect leaves the origin.
- :meth:`Session.close` ends the session with an HTTP DELETE to the session URL (RFC 9725 §4.2),
  then closes the peer connection.

Recording (:func:`record`) places decoded frames on their RTP timeline, so a lost or late packet
leaves silence of the right length instead of shifting everything after it; that is what makes
chirp onsets (see :mod:`townhall.stage.sources`) usable as latency markers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

import av
import httpx
import numpy as np
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCOutboundRtpStreamStats,
    RTCPeerConnection,
    RTCRtpSender,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from townhall.stage.sources import SAMPLE_RATE, TIME_BASE, Int16Array

logger = logging.getLogger(__name__)

SDP_MEDIA_TYPE = "application/sdp"
SessionKind = Literal["whip", "whep"]


class StageClientError(Exception):
    """Base of every error the stage client raises."""


class WhipError(StageClientError):
    """The WHIP or WHEP endpoint refused or botched the offer (anything but a usable 201).

    ``status`` and ``body`` are the response's; ``code`` and ``message`` are read from a townhall
    JSON error body (``{"error": {"code", "message"}}``) when there is one.
    """

    def __init__(self, status: int, body: str, *, url: str = "", reason: str = "") -> None:
        self.status = status
        self.body = body
        self.url = url
        self.code: str | None = None
        self.message: str | None = None
        try:
            error = json.loads(body)["error"]
            self.code, self.message = str(error["code"]), str(error["message"])
        except (ValueError, KeyError, TypeError):
            pass
        detail = reason or (f"{self.code}: {self.message}" if self.code else body[:200].strip())
        super().__init__(f"{url or 'endpoint'} answered HTTP {status}: {detail}")


class MediaConnectError(StageClientError):
    """The offer was accepted but ICE/DTLS did not connect, or the connection was lost."""


class TransportError(StageClientError):
    """The endpoint could not be reached over HTTP at all."""


def _prefer_opus(transceiver: RTCRtpTransceiver) -> None:
    """List Opus first in the offer; the other codecs aiortc knows stay as fallbacks."""
    codecs = RTCRtpSender.getCapabilities("audio").codecs
    opus = [codec for codec in codecs if codec.mimeType.lower() == "audio/opus"]
    transceiver.setCodecPreferences(opus + [codec for codec in codecs if codec not in opus])


async def _wait_any(waits: Iterable[Awaitable[object]], within: float | None) -> bool:
    """Wait until one of ``waits`` finishes or ``within`` seconds pass; True if one finished."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        done, _ = await asyncio.wait(tasks, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        return bool(done)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Session:
    """One WHIP (publish) or WHEP (subscribe) session: the peer connection and its session URL.

    Made by :func:`publish` or :func:`subscribe`; end it with :meth:`close` or ``async with``.
    """

    def __init__(
        self,
        kind: SessionKind,
        *,
        token: str,
        timeout: float,
        ice_servers: Sequence[RTCIceServer] = (),
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.kind: SessionKind = kind
        # An explicit (empty) list: given None, aiortc would reach out to a public STUN server.
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=list(ice_servers)))
        self.location: str | None = None
        """The session URL (RFC 9725 §4.2), absolute, once the endpoint has answered."""
        self.etag: str | None = None
        """The ETag of the 201, identifying the ICE session (RFC 9725 §4.3.1), if sent."""
        self._token = token
        self._timeout = timeout
        self._owns_http = http is None
        self._http = http if http is not None else httpx.AsyncClient(timeout=timeout, follow_redirects=True)
        self._connected = asyncio.Event()
        self._down = asyncio.Event()
        self._track_or_closed = asyncio.Event()
        self._track: MediaStreamTrack | None = None
        self._closed = False
        self.pc.add_listener("connectionstatechange", self._on_connection_state)
        self.pc.add_listener("track", self._on_track)

    def __repr__(self) -> str:
        return f"<Session {self.kind} {self.location or 'unanswered'} {self.connection_state}>"

    @property
    def connection_state(self) -> str:
        """The peer connection's state: new, connecting, connected, failed or closed."""
        return str(self.pc.connectionState)

    def _headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}", **extra}

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        logger.info("%s connection %s", self.kind, state, extra={"session": self.location, "state": state})
        if state == "connected":
            self._connected.set()
        elif state in ("failed", "closed"):
            self._down.set()

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and self._track is None:
            self._track = track
            self._track_or_closed.set()

    async def _negotiate(self, endpoint: str) -> None:
        """Offer, POST, answer, then wait until media can flow (RFC 9725 §4.2)."""
        phase = "creating the offer"
        try:
            async with asyncio.timeout(self._timeout):
                offer = await self.pc.createOffer()
                phase = "gathering candidates"
                await self.pc.setLocalDescription(offer)
                phase = f"POST {endpoint}"
                response = await self._post(endpoint, self.pc.localDescription.sdp)
                await self._accept(response)
                phase = "connecting ICE/DTLS"
                await _wait_any((self._connected.wait(), self._down.wait()), None)
        except TimeoutError as exc:
            message = f"{self.kind} setup did not finish within {self._timeout} s ({phase})"
            if self.location is None:
                raise TransportError(message) from exc
            raise MediaConnectError(f"{message}; connection {self.connection_state}") from exc
        if self.connection_state != "connected":
            raise MediaConnectError(f"{self.kind} connection {self.connection_state} ({endpoint})")
        logger.info("%s session live at %s", self.kind, self.location, extra={"session": self.location})

    async def _post(self, endpoint: str, sdp: str) -> httpx.Response:
        try:
            return await self._http.post(
                endpoint, content=sdp.encode(), headers=self._headers(**{"Content-Type": SDP_MEDIA_TYPE})
            )
        except httpx.TimeoutException as exc:
            raise TimeoutError(str(exc)) from exc
        except httpx.HTTPError as exc:
            raise TransportError(f"cannot reach {endpoint}: {exc}") from exc

    async def _accept(self, response: httpx.Response) -> None:
        """Check the 201 and apply its answer; raise :class:`WhipError` for anything else."""
        url = str(response.request.url)
        if response.status_code != 201:
            raise WhipError(response.status_code, response.text, url=url)
        location = response.headers.get("location")
        if not location:
            raise WhipError(201, response.text, url=url, reason="201 without a Location header")
        # Location may be relative; it resolves against the URL that answered (after redirects).
        self.location = str(response.url.join(location))
        self.etag = response.headers.get("etag")
        media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != SDP_MEDIA_TYPE:
            raise WhipError(201, response.text, url=url, reason=f"answer has Content-Type {media_type!r}")
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=response.text, type="answer"))
        except ValueError as exc:
            raise WhipError(201, response.text, url=url, reason=f"unusable SDP answer: {exc}") from exc

    async def remote_track(self) -> MediaStreamTrack:
        """The audio track the stage sends (WHEP sessions only), once it has arrived.

        :func:`subscribe` returns after the answer is applied, which is when aiortc announces the
        track, so this normally returns at once; bound it with ``asyncio.timeout`` if in doubt.
        """
        if self.kind != "whep":
            raise RuntimeError("a WHIP (publish) session receives no media")
        await self._track_or_closed.wait()
        if self._track is None:
            raise MediaConnectError("the session closed before a remote track arrived")
        return self._track

    async def wait_disconnected(self) -> None:
        """Return once the connection has failed or closed (e.g. the stage dropped us)."""
        await self._down.wait()

    async def close(self) -> None:
        """DELETE the session URL (RFC 9725 §4.2), then close the peer connection. Idempotent.

        A failed DELETE is logged and otherwise ignored: the stage also notices the ICE consent
        expiring, and the caller is leaving either way.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self.location is not None:
                try:
                    response = await self._http.delete(self.location, headers=self._headers())
                    if not response.is_success:
                        logger.warning(
                            "DELETE %s answered %s",
                            self.location,
                            response.status_code,
                            extra={"session": self.location, "status": response.status_code},
                        )
                except httpx.HTTPError as exc:
                    logger.warning(
                        "DELETE %s failed: %s", self.location, exc, extra={"session": self.location}
                    )
            await self.pc.close()
        finally:
            self._down.set()
            self._track_or_closed.set()
            if self._owns_http:
                await self._http.aclose()

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


async def _open(endpoint: str, session: Session, add: Callable[[], None]) -> Session:
    """Add the transceiver and negotiate; on any failure close what was opened, then re-raise."""
    try:
        add()
        await session._negotiate(endpoint)
    except BaseException:
        await session.close()
        raise
    return session


async def publish(
    endpoint: str,
    token: str,
    track: MediaStreamTrack,
    *,
    # Not just a cancel scope: it also bounds each HTTP request and turns into a precise error.
    timeout: float = 10,  # noqa: ASYNC109
    ice_servers: Sequence[RTCIceServer] = (),
    http: httpx.AsyncClient | None = None,
) -> Session:
    """Send ``track`` to a WHIP endpoint; return once media flows (RFC 9725 §4.2).

    The offer has one sendonly audio section with Opus listed first. ``timeout`` bounds the whole
    setup: HTTP, ICE and DTLS. Raises :class:`WhipError` when the endpoint answers anything but a
    usable 201, :class:`MediaConnectError` when the connection does not come up in time and
    :class:`TransportError` when the endpoint cannot be reached. ``http`` lends a client (then not
    closed here); by default each session has its own.
    """
    if track.kind != "audio":
        raise ValueError(f"the stage takes audio, not {track.kind}")
    session = Session("whip", token=token, timeout=timeout, ice_servers=ice_servers, http=http)

    def add() -> None:
        _prefer_opus(session.pc.addTransceiver(track, direction="sendonly"))

    return await _open(endpoint, session, add)


async def subscribe(
    endpoint: str,
    token: str,
    *,
    timeout: float = 10,  # noqa: ASYNC109 - as for publish
    ice_servers: Sequence[RTCIceServer] = (),
    http: httpx.AsyncClient | None = None,
) -> Session:
    """Receive the stage's audio from a WHEP endpoint; ``await session.remote_track()`` for it.

    The same exchange as :func:`publish` (WHEP follows RFC 9725 §4.2) with one recvonly audio
    section, Opus first; the same errors.
    """
    session = Session("whep", token=token, timeout=timeout, ice_servers=ice_servers, http=http)

    def add() -> None:
        _prefer_opus(session.pc.addTransceiver("audio", direction="recvonly"))

    return await _open(endpoint, session, add)


# --- recording -------------------------------------------------------------------------------


class PcmTimeline:
    """Lays 48 kHz mono chunks end to end by their RTP position, up to ``capacity`` samples.

    A chunk that starts after the expected position is preceded by silence for the gap (a lost
    or discarded packet); one that starts before it has its overlap cut (a late duplicate). A jump
    of more than ``max_gap`` samples either way is a new timeline (a restarted sender): the
    chunk is appended as it is. Positions wrap modulo ``wrap`` (RTP timestamps are 32 bits).
    Pure: no clock, no I/O.
    """

    def __init__(self, capacity: int, *, max_gap: int = SAMPLE_RATE, wrap: int | None = 2**32) -> None:
        self.capacity = capacity
        self.max_gap = max_gap
        self.wrap = wrap
        self.gap_samples = 0
        """Samples of silence inserted for gaps."""
        self.discontinuities = 0
        """Jumps larger than ``max_gap`` (re-anchored, not filled)."""
        self._next: int | None = None
        self._chunks: list[Int16Array] = []
        self._length = 0

    @property
    def length(self) -> int:
        return min(self._length, self.capacity)

    @property
    def full(self) -> bool:
        return self._length >= self.capacity

    def add(self, position: int | None, samples: Int16Array) -> None:
        """Place ``samples`` starting at RTP ``position`` (None: right after the previous chunk)."""
        count = int(samples.size)
        delta = 0
        if position is not None and self._next is not None:
            delta = position - self._next
            if self.wrap is not None:
                delta = (delta + self.wrap // 2) % self.wrap - self.wrap // 2
            if abs(delta) > self.max_gap:
                self.discontinuities += 1
                delta = 0
        elif position is not None:
            self._next = position
        if delta > 0:
            self._append(np.zeros(delta, dtype=np.int16))
            self.gap_samples += delta
        self._append(samples[-delta:] if delta < 0 else samples)
        advance = delta + count
        if advance > 0:
            base = self._next if self._next is not None else 0
            self._next = base + advance if self.wrap is None else (base + advance) % self.wrap

    def _append(self, samples: Int16Array) -> None:
        room = self.capacity - self._length
        if room > 0 and samples.size:
            piece = samples[:room]
            self._chunks.append(piece)
            self._length += int(piece.size)

    def samples(self) -> Int16Array:
        if not self._chunks:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate(self._chunks)


@dataclass(frozen=True, slots=True)
class Recording:
    """What :func:`record_timed` heard.

    ``started_at`` is the ``time.time()`` at which the first frame came out of the receiver (the
    moment its first sample would be played), or None if nothing arrived; the sample at index
    ``i`` belongs to ``started_at + i / 48000``.
    """

    samples: Int16Array
    started_at: float | None
    gap_samples: int
    discontinuities: int


async def record_timed(
    track: MediaStreamTrack, seconds: float, *, give_up_after: float | None = None
) -> Recording:
    """Receive ``seconds`` of audio from ``track`` as 48 kHz mono int16, with its start time.

    Stops early when the track ends or ``give_up_after`` seconds (default ``seconds + 5``) pass
    since the call, keeping what it has: the result can be shorter than asked (this is logged). Decoded frames
    (aiortc's Opus decoder gives stereo s16) are downmixed and resampled by ``av.AudioResampler``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (seconds + 5.0 if give_up_after is None else give_up_after)
    timeline = PcmTimeline(round(seconds * SAMPLE_RATE))
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    started_at: float | None = None
    while not timeline.full:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            async with asyncio.timeout(remaining):
                frame = await track.recv()
        except (TimeoutError, MediaStreamError):
            break
        if not isinstance(frame, av.AudioFrame):
            raise TypeError(f"expected audio frames, got {type(frame).__name__}")
        if started_at is None:
            started_at = time.time()
        position: int | None = None
        if frame.pts is not None and frame.time_base is not None:
            position = round(frame.pts * frame.time_base * SAMPLE_RATE)
            # RTP timestamps wrap at 2**32 only when the clock is already 48 kHz (Opus).
            timeline.wrap = 2**32 if frame.time_base == TIME_BASE else None
        frame.pts = None  # our timeline does the timing; see sources.decode_pcm
        for out in resampler.resample(frame):
            chunk = np.asarray(out.to_ndarray(), dtype=np.int16).reshape(-1)
            timeline.add(position, chunk)
            position = None
    if timeline.length < timeline.capacity:
        logger.warning(
            "recorded %.2f s of %.2f s",
            timeline.length / SAMPLE_RATE,
            seconds,
            extra={"recorded_samples": timeline.length},
        )
    return Recording(
        samples=timeline.samples(),
        started_at=started_at,
        gap_samples=timeline.gap_samples,
        discontinuities=timeline.discontinuities,
    )


async def record(
    track: MediaStreamTrack, seconds: float, *, give_up_after: float | None = None
) -> Int16Array:
    """Receive ``seconds`` of audio from ``track`` as 48 kHz mono int16 (see :func:`record_timed`)."""
    return (await record_timed(track, seconds, give_up_after=give_up_after)).samples


# --- speaking ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpeakProgress:
    """A report from :func:`speak`: ``state`` is "live" while speaking, then "finished".

    ``reason`` says why it finished: "elapsed", "stopped", "source ended" or "disconnected".
    """

    state: Literal["live", "finished"]
    elapsed_s: float
    packets_sent: int
    bytes_sent: int
    location: str | None
    reason: str | None = None


async def _sent(session: Session) -> tuple[int, int]:
    packets = sent_bytes = 0
    for stats in (await session.pc.getStats()).values():
        if isinstance(stats, RTCOutboundRtpStreamStats):
            packets += stats.packetsSent
            sent_bytes += stats.bytesSent
    return packets, sent_bytes


async def speak(
    endpoint: str,
    token: str,
    source: MediaStreamTrack,
    seconds: float | None = None,
    *,
    timeout: float = 10,  # noqa: ASYNC109 - the setup timeout handed to publish
    on_progress: Callable[[SpeakProgress], None] | None = None,
    progress_interval_s: float = 1.0,
    stop: asyncio.Event | None = None,
    ice_servers: Sequence[RTCIceServer] = (),
) -> SpeakProgress:
    """Publish ``source`` for ``seconds`` (None: until ``stop`` is set or the task is cancelled).

    ``on_progress`` gets a "live" report when media flows and every ``progress_interval_s``, then
    a "finished" one; the last is also returned. The source is stopped and the session closed
    (HTTP DELETE, RFC 9725 §4.2) however it ends. Raises :class:`MediaConnectError` if the
    connection is lost while speaking, and the errors of :func:`publish`.
    """
    ended = asyncio.Event()
    source.add_listener("ended", ended.set)
    try:
        session = await publish(endpoint, token, source, timeout=timeout, ice_servers=ice_servers)
        async with session:
            loop = asyncio.get_running_loop()
            began = loop.time()
            deadline = None if seconds is None else began + seconds

            async def report(state: Literal["live", "finished"], reason: str | None = None) -> SpeakProgress:
                packets, sent_bytes = await _sent(session)
                progress = SpeakProgress(
                    state, loop.time() - began, packets, sent_bytes, session.location, reason
                )
                if on_progress is not None:
                    on_progress(progress)
                return progress

            await report("live")
            reason = "elapsed"
            while True:
                wait = (
                    progress_interval_s
                    if deadline is None
                    else min(progress_interval_s, deadline - loop.time())
                )
                if wait <= 0:
                    break
                waits: list[Awaitable[object]] = [ended.wait(), session.wait_disconnected()]
                if stop is not None:
                    waits.append(stop.wait())
                if await _wait_any(waits, wait):
                    if stop is not None and stop.is_set():
                        reason = "stopped"
                    elif session.connection_state in ("failed", "closed"):
                        reason = "disconnected"
                    else:
                        reason = "source ended"
                    break
                await report("live")
            final = await report("finished", reason)
            logger.info(
                "stopped speaking (%s) after %.1f s",
                reason,
                final.elapsed_s,
                extra={"session": session.location, "reason": reason},
            )
        if reason == "disconnected":
            raise MediaConnectError(f"lost the connection to {endpoint} after {final.elapsed_s:.1f} s")
        return final
    finally:
        source.stop()


# --- monitoring ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MonitorProgress:
    """A report from :func:`monitor`: seconds of audio written so far and its level."""

    seconds_written: float
    peak_dbfs: float
    finished: bool = False


async def monitor(
    endpoint: str,
    token: str,
    out: str,
    seconds: float | None = None,
    *,
    on_progress: Callable[[MonitorProgress], None] | None = None,
    timeout: float = 10,  # noqa: ASYNC109 - as for publish
    stop: asyncio.Event | None = None,
) -> MonitorProgress:
    """Record a WHEP stream (a speaker's mix-minus, or with ``?mix=program`` a host's program
    monitor) into the WAV file ``out`` (48 kHz mono 16-bit), written as it arrives, for
    ``seconds`` (None: until ``stop`` is set, the task is cancelled or the stage ends it)."""
    import wave

    session = await subscribe(endpoint, token, timeout=timeout)
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    written = 0
    peak = 0
    limit = None if seconds is None else round(seconds * SAMPLE_RATE)
    async with session:
        track = await session.remote_track()
        with wave.open(out, "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(SAMPLE_RATE)
            next_report = SAMPLE_RATE
            while limit is None or written < limit:
                if stop is not None and stop.is_set():
                    break
                try:
                    async with asyncio.timeout(timeout):
                        frame = await track.recv()
                except (TimeoutError, MediaStreamError):
                    break
                if not isinstance(frame, av.AudioFrame):
                    continue
                frame.pts = None
                for chunk in resampler.resample(frame):
                    pcm = np.asarray(chunk.to_ndarray(), dtype=np.int16).reshape(-1)
                    if limit is not None:
                        pcm = pcm[: limit - written]
                    wav.writeframes(pcm.tobytes())
                    written += len(pcm)
                    if len(pcm):
                        peak = max(peak, int(np.abs(pcm.astype(np.int32)).max()))
                if on_progress is not None and written >= next_report:
                    next_report += SAMPLE_RATE
                    on_progress(MonitorProgress(written / SAMPLE_RATE, _dbfs(peak)))
    final = MonitorProgress(written / SAMPLE_RATE, _dbfs(peak), finished=True)
    if on_progress is not None:
        on_progress(final)
    return final


def _dbfs(peak: int) -> float:
    return -120.0 if peak <= 0 else round(20 * float(np.log10(peak / 32768.0)), 1)
