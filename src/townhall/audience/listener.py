"""An LL-HLS listener: join a space, follow its live playlist part by part, decode and record.

Theory of operation (RFC 8216bis, draft-pantos-hls-rfc8216bis)
----------------------------------------------------------------
- The pure core is :func:`parse_media_playlist` (text -> :class:`MediaPlaylist`) and
  :class:`Follower`, which decides which parts to fetch and which blocking reload to ask for
  next; it takes ``now`` as an argument and does no I/O. :class:`Listener` is the thin httpx
  edge around it.
- Parts are numbered as the server numbers them for blocking reload (§6.2.5.2): ``(msn, i)``,
  the media sequence number of the parent segment and the part's index within it, counted
  from the ``EXT-X-PART`` tags of that segment (a server lists a segment's parts whole or not
  at all, §4.4.4.9).
- Start: the newest part listed (the live edge). Then, for ever: fetch every listed part from
  the next one wanted, in order; ask for the playlist that contains the part after that with
  ``_HLS_msn``/``_HLS_part`` (§6.2.5.2), which the server holds until that part exists. When a
  segment is complete and its last part has been fetched, the next part wanted is part 0 of
  the next segment. A listener that falls behind the playlist's window jumps to its oldest
  part and counts a gap.
- Each part's wall-clock start is its segment's ``EXT-X-PROGRAM-DATE-TIME`` plus the
  durations of the parts before it (§4.4.4.6). The listener's *latency behind the live edge*
  for a part is its arrival (last byte read) minus that start: how far behind real time a
  player that starts the part as soon as it arrives is. It includes the part's own duration,
  since a part exists only once its last sample has been mixed and encoded. The server is
  assumed to share the listener's clock (the same machine, or both on NTP).
- Tickets: a join answers ``{ticket, hls_url}`` and sets the ``townhall_ticket`` cookie for
  ``/hls/{id}/``; the first playlist request carries ``?ticket=`` (the server then sets the
  cookie too). Later requests carry only the cookie, so every listener asks for the same URLs
  and an edge cache can answer them all from one copy. Without a cookie (an edge that does
  not pass ``Set-Cookie``), the ticket rides on every request's query instead. An expired
  ticket is renewed by joining again when the listener was given the space's URL.
- Admission: the join follows ``admission.client.admit``: in the waiting room it waits its
  turn (202, ``Retry-After``, the queue token), it retries a 429 or a shed 503 after
  ``Retry-After``, and in attack mode an anonymous join solves the proof of work.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import io
import math
import re
import statistics
import time
import wave
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import av
import httpx
import numpy as np
import numpy.typing as npt

from townhall.admission.client import AdmissionRefused, admit

RATE = 48000
TICKET_COOKIE = "townhall_ticket"
SPACE_PATH = re.compile(r"^(?P<base>.*)/api/v1/spaces/(?P<id>[A-Za-z0-9]{1,16})(?:/join)?/?$")
# The space's web page, as a browser's address bar shows it.
PAGE_PATH = re.compile(r"^(?P<base>.*)/spaces/(?P<id>[A-Za-z0-9]{1,16})/?$")
HLS_PATH = re.compile(r"^(?P<base>.*)/hls/(?P<id>[A-Za-z0-9]{1,16})/[^/]+\.m3u8$")
_ATTRIBUTE = re.compile(r'([A-Z0-9-]+)=("[^"]*"|[^,]*)')

Int16Array = npt.NDArray[np.int16]


class ListenError(Exception):
    """The listener cannot go on: a refusal, an unusable URL or playlist, a lost server."""


# -- the playlist (pure) -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PartRef:
    """One ``EXT-X-PART``: ``(msn, index)`` as blocking reload counts it, and its wall-clock start."""

    msn: int
    index: int
    uri: str
    duration: float
    start: float

    @property
    def key(self) -> tuple[int, int]:
        return (self.msn, self.index)


@dataclasses.dataclass(frozen=True)
class SegmentRef:
    msn: int
    uri: str | None  # None while the segment is being built (its parts only)
    duration: float
    start: float
    parts: int

    @property
    def complete(self) -> bool:
        return self.uri is not None


@dataclasses.dataclass(frozen=True)
class MediaPlaylist:
    media_sequence: int
    target_duration: float
    part_target: float | None
    can_block_reload: bool
    part_hold_back: float | None
    init_uri: str | None
    segments: tuple[SegmentRef, ...]
    parts: tuple[PartRef, ...]
    preload_hint: str | None
    ended: bool

    def segment(self, msn: int) -> SegmentRef | None:
        first = self.segments[0].msn if self.segments else 0
        i = msn - first
        return self.segments[i] if 0 <= i < len(self.segments) else None


def _attributes(text: str) -> dict[str, str]:
    return {k: v.strip('"') for k, v in _ATTRIBUTE.findall(text)}


def _timestamp(text: str) -> float:
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError as exc:
        raise ValueError(f"bad EXT-X-PROGRAM-DATE-TIME {text!r}") from exc


def parse_media_playlist(text: str) -> MediaPlaylist:
    """Parse a live or VOD media playlist (the tags an LL-HLS listener needs). ``ValueError``
    with the reason when it is not one."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines or lines[0] != "#EXTM3U":
        raise ValueError("not an M3U8 playlist (no #EXTM3U)")
    if any(ln.startswith("#EXT-X-STREAM-INF") for ln in lines):
        raise ValueError("a multivariant playlist: give the media playlist's URL")
    media_sequence = 0
    target: float | None = None
    part_target = hold_back = None
    can_block = ended = False
    init_uri = hint = None
    segments: list[SegmentRef] = []
    parts: list[PartRef] = []
    pending: list[PartRef] = []
    clock: float | None = None  # wall-clock start of the segment being read
    offset = 0.0  # seconds of parts already read in it
    extinf: float | None = None

    def msn() -> int:
        return media_sequence + len(segments)

    for line in lines[1:]:
        tag, _, value = line.partition(":")
        if tag == "#EXT-X-MEDIA-SEQUENCE":
            media_sequence = int(value)
        elif tag == "#EXT-X-TARGETDURATION":
            target = float(value)
        elif tag == "#EXT-X-PART-INF":
            part_target = float(_attributes(value)["PART-TARGET"])
        elif tag == "#EXT-X-SERVER-CONTROL":
            attrs = _attributes(value)
            can_block = attrs.get("CAN-BLOCK-RELOAD") == "YES"
            hold_back = float(attrs["PART-HOLD-BACK"]) if "PART-HOLD-BACK" in attrs else None
        elif tag == "#EXT-X-MAP":
            init_uri = _attributes(value).get("URI")
        elif tag == "#EXT-X-PROGRAM-DATE-TIME":
            clock, offset = _timestamp(value), 0.0
        elif tag == "#EXT-X-PART":
            attrs = _attributes(value)
            if "URI" not in attrs or "DURATION" not in attrs:
                raise ValueError(f"EXT-X-PART without URI or DURATION: {line!r}")
            duration = float(attrs["DURATION"])
            start = (clock if clock is not None else math.nan) + offset
            pending.append(PartRef(msn(), len(pending), attrs["URI"], duration, start))
            offset += duration
        elif tag == "#EXTINF":
            extinf = float(value.split(",", 1)[0])
        elif tag == "#EXT-X-PRELOAD-HINT":
            attrs = _attributes(value)
            if attrs.get("TYPE") == "PART":
                hint = attrs.get("URI")
        elif tag == "#EXT-X-ENDLIST":
            ended = True
        elif not line.startswith("#"):
            if extinf is None:
                raise ValueError(f"segment {line!r} without #EXTINF")
            start = clock if clock is not None else math.nan
            segments.append(SegmentRef(msn(), line, extinf, start, len(pending)))
            parts.extend(pending)
            pending = []
            clock = None if clock is None else start + extinf
            offset, extinf = 0.0, None
    if pending:
        building = sum(p.duration for p in pending)
        start = clock if clock is not None else math.nan
        segments.append(SegmentRef(msn(), None, building, start, len(pending)))
        parts.extend(pending)
    if target is None:
        raise ValueError("no #EXT-X-TARGETDURATION")
    return MediaPlaylist(
        media_sequence=media_sequence,
        target_duration=target,
        part_target=part_target,
        can_block_reload=can_block,
        part_hold_back=hold_back,
        init_uri=init_uri,
        segments=tuple(segments),
        parts=tuple(parts),
        preload_hint=hint,
        ended=ended,
    )


@dataclasses.dataclass(frozen=True)
class Arrival:
    """A part as the listener received it: ``latency`` = arrival − the part's wall-clock start."""

    part: PartRef
    arrived: float
    size: int

    @property
    def latency(self) -> float:
        return self.arrived - self.part.start


class Follower:
    """Which parts to fetch and which playlist to ask for next (pure: playlists and ``now`` in).

    Feed every playlist to :meth:`update` (it returns the parts to fetch, in order), report
    each fetched part to :meth:`arrived`, and ask :meth:`blocking_request` for the next
    ``_HLS_msn``/``_HLS_part``.
    """

    def __init__(self) -> None:
        self.next: tuple[int, int] | None = None
        self.playlist: MediaPlaylist | None = None
        self.arrivals: list[Arrival] = []
        self.gaps = 0
        self.skipped_seconds = 0.0
        self._last_end: float | None = None  # wall-clock end of the last part fetched

    def update(self, playlist: MediaPlaylist) -> list[PartRef]:
        if not playlist.parts:
            raise ValueError("the playlist lists no parts (EXT-X-PART): not a low-latency stream")
        self.playlist = playlist
        if self.next is None:
            self.next = playlist.parts[-1].key  # start at the live edge
        self._roll_over()
        assert self.next is not None
        wanted = [p for p in playlist.parts if p.key >= self.next]
        if wanted and wanted[0].key != self.next and self.next < playlist.parts[0].key:
            # Fell behind the window: the parts between are gone from the playlist.
            self.gaps += 1
            if self._last_end is not None:
                self.skipped_seconds += max(0.0, wanted[0].start - self._last_end)
        return wanted

    def arrived(self, part: PartRef, size: int, now: float) -> Arrival:
        arrival = Arrival(part, now, size)
        self.arrivals.append(arrival)
        self.next = (part.msn, part.index + 1)
        self._last_end = part.start + part.duration
        self._roll_over()
        return arrival

    def missing(self, part: PartRef) -> None:
        """A listed part the server no longer has: go on without it, and count a gap."""
        self.gaps += 1
        self.skipped_seconds += part.duration
        self.next = (part.msn, part.index + 1)
        self._roll_over()

    def _roll_over(self) -> None:
        """(m, i) past the last part of a complete segment m is (m + 1, 0)."""
        if self.next is None or self.playlist is None:
            return
        msn, index = self.next
        segment = self.playlist.segment(msn)
        if segment is not None and segment.complete and index >= segment.parts:
            self.next = (msn + 1, 0)

    def blocking_request(self) -> tuple[int, int]:
        """``(_HLS_msn, _HLS_part)`` for the playlist that lists the next part wanted."""
        if self.next is None:
            raise ValueError("no playlist seen yet")
        return self.next


# -- latency figures (pure) ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    count: int
    median: float
    p95: float
    min: float
    max: float


def latency_stats(samples: Sequence[float]) -> LatencyStats | None:
    if not samples:
        return None
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
    return LatencyStats(
        count=len(ordered),
        median=round(statistics.median(ordered), 4),
        p95=round(p95, 4),
        min=round(ordered[0], 4),
        max=round(ordered[-1], 4),
    )


# -- decoding and recording ----------------------------------------------------------------------


class AacDecoder:
    """AAC in fMP4 parts -> 48 kHz mono int16, with one decoder across parts (no re-priming at
    part boundaries). CPU work: callers run :meth:`decode` off the event loop."""

    def __init__(self, init: bytes) -> None:
        self.init = init
        self._decoder: Any = None
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)

    def decode(self, part: bytes) -> Int16Array:
        out: list[Int16Array] = []
        with av.open(io.BytesIO(self.init + part), mode="r", format="mp4") as container:
            stream = container.streams.audio[0]
            if self._decoder is None:
                self._decoder = av.CodecContext.create(stream.codec_context.name, "r")
                self._decoder.extradata = stream.codec_context.extradata
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                for frame in self._decoder.decode(packet):
                    for f in self._resampler.resample(frame):
                        out.append(f.to_ndarray().reshape(-1).astype(np.int16, copy=False))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int16)


class Recorder:
    """Writes what arrives: ``.wav`` gets decoded 48 kHz mono PCM; ``.m4a``/``.mp4`` gets the init
    segment followed by the parts as received (a fragmented MP4, no re-encoding)."""

    SUFFIXES = (".wav", ".m4a", ".mp4")

    def __init__(self, path: Path) -> None:
        suffix = path.suffix.lower()
        if suffix not in self.SUFFIXES:
            raise ListenError(f"--out must end in {', '.join(self.SUFFIXES)}, not {path.name!r}")
        self.path = path
        self.pcm = suffix == ".wav"
        self._wav: wave.Wave_write | None = None
        self._raw: io.BufferedWriter | None = None
        if self.pcm:
            self._wav = wave.open(str(path), "wb")  # closed in close()
            self._wav.setnchannels(1)
            self._wav.setsampwidth(2)
            self._wav.setframerate(RATE)
        else:
            self._raw = path.open("wb")
        self._wrote_init = False

    def write(self, init: bytes, part: bytes, samples: Int16Array | None) -> None:
        if self._wav is not None and samples is not None:
            self._wav.writeframes(samples.astype("<i2").tobytes())
        elif self._raw is not None:
            if not self._wrote_init:
                self._raw.write(init)
                self._wrote_init = True
            self._raw.write(part)

    def close(self) -> None:
        if self._wav is not None:
            self._wav.close()
        if self._raw is not None:
            self._raw.close()


def level_dbfs(samples: Int16Array) -> float:
    if samples.size == 0:
        return -math.inf
    rms = math.sqrt(float(np.mean(samples.astype(np.float64) ** 2))) / 32768.0
    return 20 * math.log10(rms) if rms > 0 else -math.inf


# -- the I/O edge ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PartAudio:
    """A fetched part and, when decoding, its samples."""

    arrival: Arrival
    samples: Int16Array | None


@dataclasses.dataclass(frozen=True)
class ListenProgress:
    elapsed: float
    parts: int
    audio_seconds: float
    kib: int
    latency: float
    median_latency: float
    level_dbfs: float
    part: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class ListenResult:
    reason: str
    space_id: str
    playlist_url: str
    elapsed: float
    parts: int
    audio_seconds: float
    bytes: int
    gaps: int
    skipped_seconds: float
    rejoins: int
    latency: LatencyStats | None
    out: str | None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Target:
    """What a URL names: a space to join (``join_url``), or a playlist that already has a ticket."""

    space_id: str
    playlist_url: str  # without the ticket
    join_url: str | None
    ticket: str | None


def resolve(url: str) -> Target:
    """Accept a space URL (``{base}/api/v1/spaces/{id}``, as ``townhall demo`` prints it, or
    its ``/join``), the space's web page (``{base}/spaces/{id}``) or a playlist URL (the
    join's ``hls_url``, ticket in ``?ticket=``)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ListenError(f"not an http(s) URL: {url!r}")
    origin = f"{parts.scheme}://{parts.netloc}"
    if m := SPACE_PATH.match(parts.path):
        space = m["id"]
        return Target(space, f"{origin}{m['base']}/hls/{space}/live.m3u8", f"{url.split('?')[0]}", None)
    if m := PAGE_PATH.match(parts.path):
        space, base = m["id"], f"{origin}{m['base']}"
        return Target(space, f"{base}/hls/{space}/live.m3u8", f"{base}/api/v1/spaces/{space}", None)
    if m := HLS_PATH.match(parts.path):
        ticket = parse_qs(parts.query).get("ticket", [None])[0]
        return Target(m["id"], f"{origin}{parts.path}", None, ticket)
    raise ListenError(
        f"{url!r} is neither a space URL (.../api/v1/spaces/ID or the page .../spaces/ID) nor a "
        "playlist URL (.../hls/ID/live.m3u8)"
    )


def _error_code(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""


def _refusal(what: str, response: httpx.Response) -> ListenError:
    try:
        detail = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        detail = response.text[:200].strip()
    return ListenError(f"{what} answered HTTP {response.status_code}: {detail}")


class Listener:
    """Follows one space's live playlist until told to stop; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        out: Path | None = None,
        decode: bool = True,
        on_progress: Callable[[ListenProgress], None] | None = None,
        on_audio: Callable[[PartAudio], None] | None = None,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.target = resolve(url)
        self.token = token
        self.recorder = Recorder(out) if out is not None else None
        self.decode = decode or (self.recorder is not None and self.recorder.pcm)
        self.on_progress = on_progress
        self.on_audio = on_audio
        self.clock = clock
        self.follower = Follower()
        self.ticket = self.target.ticket
        self.rejoins = 0
        self.bytes = 0
        self._owns_http = http is None
        self.http = http or httpx.AsyncClient(timeout=httpx.Timeout(15.0, connect=10.0))
        self._init: bytes | None = None
        self._decoder: AacDecoder | None = None
        self._started = 0.0
        self._audio = 0.0
        self._stalled_since: float | None = None

    # -- requests ------------------------------------------------------------------------------

    async def join(self) -> None:
        if self.target.join_url is None:
            raise ListenError("the ticket has expired and this URL cannot be joined again")
        join = self.target.join_url.removesuffix("/").removesuffix("/join") + "/join"
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            # Admission's client: waits its turn in the waiting room, retries 429/503 after
            # Retry-After, solves the proof of work in attack mode (admission/client.py).
            joined = await admit(self.http, join, headers=headers)
        except httpx.TransportError as exc:
            raise ListenError(f"POST {join}: {exc!r}") from exc
        except AdmissionRefused as exc:
            raise ListenError(f"POST {join}: {exc}") from exc
        self.ticket = str(joined["ticket"])

    def _ticket_query(self) -> dict[str, str]:
        """The ticket rides in the query only when no cookie carries it."""
        if not self.ticket:
            return {}
        carried = any(c.name == TICKET_COOKIE and c.value == self.ticket for c in self.http.cookies.jar)
        return {} if carried else {"ticket": self.ticket}

    async def _get(self, url: str, params: dict[str, Any]) -> httpx.Response:
        for attempt in range(3):
            try:
                r = await self.http.get(url, params={**params, **self._ticket_query()})
            except httpx.TransportError as exc:
                if attempt == 2:
                    raise ListenError(f"GET {url}: {exc!r}") from exc
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            if r.status_code == 403 and _error_code(r) == "ticket_expired" and self.target.join_url:
                await self.join()
                self.rejoins += 1
                continue
            return r
        raise ListenError(f"GET {url}: refused after rejoining")

    def _url(self, uri: str) -> str:
        return str(httpx.URL(self.target.playlist_url).join(uri))

    async def _playlist(self, blocking: tuple[int, int] | None) -> MediaPlaylist | None:
        params = {"_HLS_msn": blocking[0], "_HLS_part": blocking[1]} if blocking else {}
        r = await self._get(self.target.playlist_url, params)
        if r.status_code == 503:
            return None  # not there yet (or the part did not come in time)
        if r.status_code == 400 and blocking is not None:
            return await self._playlist(None)  # asked too far ahead: resynchronise
        if r.status_code != 200:
            raise _refusal(f"GET {self.target.playlist_url}", r)
        try:
            return parse_media_playlist(r.text)
        except ValueError as exc:
            raise ListenError(f"unusable playlist: {exc}") from exc

    async def _fetch_part(self, part: PartRef) -> None:
        r = await self._get(self._url(part.uri), {})
        if r.status_code == 404:
            self.follower.missing(part)  # listed, but gone already
            return
        if r.status_code != 200:
            raise _refusal(f"GET {part.uri}", r)
        now = self.clock()
        arrival = self.follower.arrived(part, len(r.content), now)
        self.bytes += len(r.content)
        self._audio += part.duration
        samples = None
        assert self._init is not None
        if self.decode:
            if self._decoder is None:
                self._decoder = AacDecoder(self._init)
            samples = await asyncio.to_thread(self._decoder.decode, r.content)
        if self.recorder is not None:
            self.recorder.write(self._init, r.content, samples)
        if self.on_audio is not None:
            self.on_audio(PartAudio(arrival, samples))
        if self.on_progress is not None:
            lat = [a.latency for a in self.follower.arrivals]
            self.on_progress(
                ListenProgress(
                    elapsed=now - self._started,
                    parts=len(lat),
                    audio_seconds=self._audio,
                    kib=self.bytes // 1024,
                    latency=arrival.latency,
                    median_latency=statistics.median(lat),
                    level_dbfs=level_dbfs(samples) if samples is not None else math.nan,
                    part=part.key,
                )
            )

    async def _fetch_init(self, playlist: MediaPlaylist) -> None:
        if self._init is not None:
            return
        if playlist.init_uri is None:
            raise ListenError("the playlist has no EXT-X-MAP: not an fMP4 stream")
        r = await self._get(self._url(playlist.init_uri), {})
        if r.status_code != 200:
            raise _refusal(f"GET {playlist.init_uri}", r)
        self._init = r.content

    # -- the loop ------------------------------------------------------------------------------

    async def _follow(self) -> str:
        playlist = None
        while playlist is None:
            playlist = await self._playlist(None)
            if playlist is None:
                await asyncio.sleep(0.5)
        await self._fetch_init(playlist)
        while True:
            for part in self.follower.update(playlist):
                await self._fetch_part(part)
            if playlist.ended:
                return "the stream ended"
            new = await self._playlist(
                self.follower.blocking_request() if playlist.can_block_reload else None
            )
            now = self.clock()
            if new is None or (not playlist.can_block_reload and new.parts == playlist.parts):
                # Nothing new in time: the stage is quiet or the space has ended.
                self._stalled_since = self._stalled_since or now
                if now - self._stalled_since > max(6.0, 3 * playlist.target_duration):
                    return await self._why_stalled()
                await asyncio.sleep(playlist.part_target or 0.5)
                continue
            self._stalled_since = None
            playlist = new

    async def _why_stalled(self) -> str:
        if self.target.join_url is not None:
            space = self.target.join_url.removesuffix("/").removesuffix("/join")
            try:
                r = await self.http.get(space)
            except httpx.TransportError as exc:
                raise ListenError(f"GET {space}: {exc!r}") from exc
            if r.status_code == 200 and r.json().get("state") == "ended":
                return "the space ended"
        return "the stream stalled"

    async def run(self, seconds: float | None = None, stop: asyncio.Event | None = None) -> ListenResult:
        """Listen until ``seconds`` have passed, ``stop`` is set, or the stream ends."""
        self._started = self.clock()
        reason = "stopped"
        try:
            if self.ticket is None and self.target.join_url is not None:
                await self.join()  # a playlist URL without a ticket is tried as it is (403 then)
            follow = asyncio.ensure_future(self._follow())
            waits: list[asyncio.Future[Any]] = [follow]
            if stop is not None:
                waits.append(asyncio.ensure_future(stop.wait()))
            done, _ = await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
            if follow in done:
                reason = follow.result()  # raises what the loop raised
            elif not done:
                reason = "elapsed"
        finally:
            if self.recorder is not None:
                self.recorder.close()
            if self._owns_http:
                await self.http.aclose()
        return ListenResult(
            reason=reason,
            space_id=self.target.space_id,
            playlist_url=self.target.playlist_url,
            elapsed=round(self.clock() - self._started, 3),
            parts=len(self.follower.arrivals),
            audio_seconds=round(self._audio, 3),
            bytes=self.bytes,
            gaps=self.follower.gaps,
            skipped_seconds=round(self.follower.skipped_seconds, 3),
            rejoins=self.rejoins,
            latency=latency_stats([a.latency for a in self.follower.arrivals]),
            out=str(self.recorder.path) if self.recorder is not None else None,
        )


async def listen(
    url: str,
    *,
    seconds: float | None = None,
    out: Path | None = None,
    token: str | None = None,
    on_progress: Callable[[ListenProgress], None] | None = None,
    on_audio: Callable[[PartAudio], None] | None = None,
    stop: asyncio.Event | None = None,
) -> ListenResult:
    """Join (if ``url`` names a space) and follow its live audio; see :class:`Listener`."""
    listener = Listener(url, token=token, out=out, on_progress=on_progress, on_audio=on_audio)
    return await listener.run(seconds, stop)
