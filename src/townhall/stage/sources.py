"""Audio sources for driving the stage, and the pure signal helpers that check what comes back.

Theory of operation: every source is a :class:`PacedAudioTrack`, an aiortc ``MediaStreamTrack`` of
kind "audio" that hands out 20 ms frames (960 samples, 48 kHz, s16, mono) with ``pts`` counted in
samples and ``time_base = 1/48000``. Frame *n* is due at ``start + n * 20 ms`` where ``start`` is
the moment the first frame was asked for, so a late wake-up is made up on the next frame and the
stream never drifts from the wall clock (aiortc's ``AudioStreamTrack`` does the same, on
``time.time()``; we pace on ``time.monotonic()`` so a clock step cannot stall or burst the stream).

The helpers below the tracks (:func:`tone`, :func:`chirp`, :func:`tone_power`,
:func:`find_chirps`) are plain numpy and import neither asyncio nor aiortc: a test builds a
signal, sends it through the stage, records it and asks these what arrived.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import math
import time
from abc import abstractmethod
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import numpy.typing as npt
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

logger = logging.getLogger(__name__)

SAMPLE_RATE = 48_000
"""Samples per second of every source (the Opus clock rate)."""
FRAME_SAMPLES = 960
"""Samples per frame: 20 ms at 48 kHz, the packetisation the stage mixes on."""
TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
"""``time_base`` of every frame: ``pts`` counts samples."""

Int16Array = npt.NDArray[np.int16]
FloatArray = npt.NDArray[np.float64]

_FULL_SCALE = 32767.0


# --- pure signal helpers ---------------------------------------------------------------------


def _to_int16(signal: FloatArray) -> Int16Array:
    """Scale a [-1, 1] float signal to int16, clipping rather than wrapping."""
    return np.clip(np.round(signal * _FULL_SCALE), -32768, 32767).astype(np.int16)


def _as_float(samples: npt.ArrayLike) -> FloatArray:
    """Samples as float64 in [-1, 1]: integers are read as full-scale PCM, floats as they are."""
    array = np.asarray(samples)
    if array.ndim != 1:
        raise ValueError(f"expected mono samples (a 1-D array), got shape {array.shape}")
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.float64) / 32768.0
    return array.astype(np.float64)


def _check_amplitude(amplitude: float) -> None:
    if not 0.0 <= amplitude <= 1.0:
        raise ValueError(f"amplitude must be within [0, 1] of full scale, got {amplitude}")


def _sine(frequency: float, start: int, count: int, amplitude: float, rate: int) -> Int16Array:
    """``count`` samples of a sine that started at sample 0, beginning at sample ``start``.

    The phase is taken modulo one cycle before the multiplication by 2π, so a track that has run
    for days still produces a clean, phase-continuous tone.
    """
    n = np.arange(start, start + count, dtype=np.float64)
    cycles = np.mod(n * (frequency / rate), 1.0)
    return _to_int16(amplitude * np.sin(2.0 * np.pi * cycles))


def tone(frequency: float, seconds: float, amplitude: float = 0.3, rate: int = SAMPLE_RATE) -> Int16Array:
    """A sine of ``frequency`` Hz lasting ``seconds``, ``amplitude`` of full scale, as int16 mono."""
    if not 0.0 < frequency < rate / 2:
        raise ValueError(f"frequency must be within (0, {rate / 2}) Hz, got {frequency}")
    _check_amplitude(amplitude)
    return _sine(frequency, 0, round(seconds * rate), amplitude, rate)


def chirp(
    seconds: float = 0.03,
    start_hz: float = 1000.0,
    end_hz: float = 4000.0,
    amplitude: float = 0.5,
    rate: int = SAMPLE_RATE,
    fade_s: float = 0.002,
) -> Int16Array:
    """A linear frequency sweep from ``start_hz`` to ``end_hz``, as int16 mono.

    A sweep correlates with itself in a single sharp peak (about ``1 / (end_hz - start_hz)`` wide),
    which is what lets :func:`find_chirps` time it to a fraction of a millisecond even after a lossy
    codec. Short raised-cosine fades keep the edges from clicking; the defaults stay well inside
    the band any Opus mode carries.
    """
    count = round(seconds * rate)
    if count < 2:
        raise ValueError(f"a chirp needs at least 2 samples, got {seconds} s at {rate} Hz")
    for name, value in (("start_hz", start_hz), ("end_hz", end_hz)):
        if not 0.0 < value < rate / 2:
            raise ValueError(f"{name} must be within (0, {rate / 2}) Hz, got {value}")
    _check_amplitude(amplitude)
    t = np.arange(count, dtype=np.float64) / rate
    sweep_rate = (end_hz - start_hz) / seconds
    signal = np.sin(2.0 * np.pi * (start_hz * t + 0.5 * sweep_rate * t * t))
    fade = min(round(fade_s * rate), count // 2)
    if fade > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(fade, dtype=np.float64) / fade)
        signal[:fade] *= ramp
        signal[count - fade :] *= ramp[::-1]
    return _to_int16(amplitude * signal)


def tone_power(samples: npt.ArrayLike, rate: int, frequency: float, bandwidth: float = 20.0) -> float:
    """The fraction (0..1) of the signal's power within ``frequency ± bandwidth`` Hz.

    Uses a Hann-windowed FFT of the whole input. The window's main lobe is two bins either side,
    so the bin width (``rate / len(samples)``) should be well under ``bandwidth``: with the
    default 20 Hz, give it at least 0.2 s of audio. Silence (zero power) yields 0.0.
    """
    signal = _as_float(samples)
    if signal.size == 0:
        return 0.0
    spectrum = np.fft.rfft(signal * np.hanning(signal.size))
    power = spectrum.real**2 + spectrum.imag**2
    total = float(power.sum())
    if total <= 0.0:
        return 0.0
    freqs = np.fft.rfftfreq(signal.size, d=1.0 / rate)
    band = np.abs(freqs - frequency) <= bandwidth
    return float(power[band].sum()) / total


def find_chirps(
    samples: npt.ArrayLike,
    rate: int,
    template: npt.ArrayLike,
    *,
    threshold: float = 0.5,
    min_separation_s: float | None = None,
    floor_db: float = -50.0,
) -> list[float]:
    """Onset times, in seconds from the first sample, of each copy of ``template`` in ``samples``.

    Normalised cross-correlation: for every lag, the dot product of the template with the window
    of samples it covers, divided by both norms, so the score is 1.0 for an exact (scaled) copy
    whatever the gain on the way. Lags scoring at least ``threshold`` that are local maxima are
    kept, strongest first, each suppressing weaker ones closer than ``min_separation_s`` (default:
    the template's length). Windows quieter than ``floor_db`` relative to the template are scored
    0, so codec noise in near-silence cannot match by accident.
    """
    signal = _as_float(samples)
    pattern = _as_float(template)
    m = pattern.size
    if m == 0:
        raise ValueError("empty template")
    if signal.size < m:
        return []
    pattern_energy = float(pattern @ pattern)
    if pattern_energy <= 0.0:
        raise ValueError("the template is silent")

    lags = signal.size - m + 1
    nfft = 1 << (signal.size + m - 1).bit_length()
    correlation = np.fft.irfft(np.fft.rfft(signal, nfft) * np.conj(np.fft.rfft(pattern, nfft)), nfft)[:lags]
    cumulative = np.concatenate(([0.0], np.cumsum(signal * signal)))
    window_energy = np.maximum(cumulative[m:] - cumulative[:-m], 0.0)
    floor = pattern_energy * 10.0 ** (floor_db / 10.0)
    loud = window_energy > floor
    score = np.zeros(lags, dtype=np.float64)
    score[loud] = correlation[loud] / np.sqrt(window_energy[loud] * pattern_energy)

    # Local maxima above the threshold (a plateau yields several; suppression keeps one).
    padded = np.concatenate(([-np.inf], score, [-np.inf]))
    peaks = np.flatnonzero((score >= threshold) & (score >= padded[:-2]) & (score >= padded[2:]))
    separation = m if min_separation_s is None else max(1, round(min_separation_s * rate))
    kept: list[int] = []
    for lag in peaks[np.argsort(-score[peaks], kind="stable")]:
        if all(abs(int(lag) - other) >= separation for other in kept):
            kept.append(int(lag))
    return [lag / rate for lag in sorted(kept)]


# --- file decoding (pure, blocking: runs in a worker thread under FileTrack) --------------------


class Rechunker:
    """Turns PCM arriving in arbitrary lengths into frames of exactly ``size`` samples."""

    def __init__(self, size: int = FRAME_SAMPLES) -> None:
        if size <= 0:
            raise ValueError(f"frame size must be positive, got {size}")
        self.size = size
        self._pending: Int16Array = np.empty(0, dtype=np.int16)

    @property
    def pending(self) -> int:
        """Samples held that do not yet make a whole frame."""
        return int(self._pending.size)

    def push(self, samples: Int16Array) -> Iterator[Int16Array]:
        """Add samples; yield every whole frame now available."""
        buffer = np.concatenate((self._pending, samples)) if self._pending.size else samples
        whole = buffer.size - buffer.size % self.size
        for offset in range(0, whole, self.size):
            yield buffer[offset : offset + self.size].copy()
        self._pending = buffer[whole:].copy()

    def flush(self) -> Int16Array | None:
        """The held remainder padded with silence to a whole frame, or None if nothing is held."""
        if not self._pending.size:
            return None
        frame = np.zeros(self.size, dtype=np.int16)
        frame[: self._pending.size] = self._pending
        self._pending = np.empty(0, dtype=np.int16)
        return frame


def decode_pcm(path: str | Path) -> Generator[Int16Array]:
    """Decode the first audio stream of any file FFmpeg can open to 48 kHz mono s16, one pass.

    Yields arrays of whatever length the resampler produces; the container is closed when the
    iterator is exhausted or closed.
    """
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError(f"{path}: no audio stream")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        for frame in container.decode(stream):
            # Timing comes from our own sample count; input timestamps with gaps or jumps (common
            # in concatenated MP3s) must not make the resampler insert or drop audio.
            frame.pts = None
            for out in resampler.resample(frame):
                yield np.asarray(out.to_ndarray(), dtype=np.int16).reshape(-1)
        for out in resampler.resample(None):
            yield np.asarray(out.to_ndarray(), dtype=np.int16).reshape(-1)


def pcm_frames(path: str | Path, *, loop: bool, size: int = FRAME_SAMPLES) -> Generator[Int16Array]:
    """Exact ``size``-sample frames of a decoded file.

    With ``loop`` the file repeats seamlessly (the tail of one pass runs straight into the head of
    the next) and the iterator never ends; without, the last frame is padded with silence.
    """
    rechunker = Rechunker(size)
    while True:
        decoded = 0
        for samples in decode_pcm(path):
            decoded += samples.size
            yield from rechunker.push(samples)
        if not loop:
            break
        if decoded == 0:
            raise ValueError(f"{path}: the audio stream decodes to no samples; cannot loop it")
    tail = rechunker.flush()
    if tail is not None:
        yield tail


# --- paced tracks ------------------------------------------------------------------------------


def audio_frame(samples: Int16Array, pts: int) -> av.AudioFrame:
    """Wrap one frame of int16 mono samples as an ``av.AudioFrame`` at 48 kHz, pts in samples."""
    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = SAMPLE_RATE
    frame.pts = pts
    frame.time_base = TIME_BASE
    return frame


class PacedAudioTrack(MediaStreamTrack):
    """An audio track handing out 20 ms frames in real time; subclasses say what is in them.

    Frame *n* carries ``pts = n * 960`` and is returned no earlier than ``n * 20 ms`` after the
    first frame was asked for (see the module docstring).
    """

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._start: float | None = None
        self._pts = 0

    @abstractmethod
    async def _next_samples(self, pts: int) -> Int16Array | None:
        """The 960 samples starting at sample ``pts``, or None when the source has ended."""

    async def recv(self) -> av.AudioFrame:
        """The next frame, once it is due. Raises ``MediaStreamError`` once the track has ended."""
        if self.readyState != "live":
            raise MediaStreamError
        samples = await self._next_samples(self._pts)
        if samples is None or self.readyState != "live":
            self.stop()
            raise MediaStreamError
        if samples.shape != (FRAME_SAMPLES,):
            raise ValueError(f"a source produced {samples.shape} samples, not ({FRAME_SAMPLES},)")
        now = time.monotonic()
        if self._start is None:
            self._start = now
        else:
            delay = self._start + self._pts / SAMPLE_RATE - now
            if delay > 0:
                await asyncio.sleep(delay)
        frame = audio_frame(samples, self._pts)
        self._pts += FRAME_SAMPLES
        return frame


class ToneTrack(PacedAudioTrack):
    """A continuous sine of ``frequency_hz`` at ``amplitude`` of full scale."""

    def __init__(self, frequency_hz: float, amplitude: float = 0.3) -> None:
        if not 0.0 < frequency_hz < SAMPLE_RATE / 2:
            raise ValueError(f"frequency must be within (0, {SAMPLE_RATE / 2}) Hz, got {frequency_hz}")
        _check_amplitude(amplitude)
        super().__init__()
        self.frequency_hz = frequency_hz
        self.amplitude = amplitude

    async def _next_samples(self, pts: int) -> Int16Array:
        return _sine(self.frequency_hz, pts, FRAME_SAMPLES, self.amplitude, SAMPLE_RATE)


@dataclass(frozen=True, slots=True)
class ChirpMarker:
    """One chirp as it left a :class:`ChirpTrack`.

    ``sample`` is the stream position of its first sample; ``wall_time`` the ``time.time()`` at
    which that sample was handed to the sender (the frame's return time plus the chirp's offset
    within the frame).
    """

    index: int
    sample: int
    wall_time: float


class ChirpTrack(PacedAudioTrack):
    """Silence with a short sweep every ``interval_s``: a marker for end-to-end latency.

    The chirps start ``offset_s`` into the stream (default: one interval) and repeat every
    ``interval_s``. Each one emitted is recorded in :attr:`markers`; a listener finds the same
    chirps with :func:`find_chirps` and :attr:`template`, and the differences in wall-clock time
    are the latency through the stage.
    """

    def __init__(
        self,
        interval_s: float = 1.0,
        *,
        chirp_s: float = 0.03,
        start_hz: float = 1000.0,
        end_hz: float = 4000.0,
        amplitude: float = 0.5,
        offset_s: float | None = None,
    ) -> None:
        self.template: Int16Array = chirp(chirp_s, start_hz, end_hz, amplitude)
        if interval_s * SAMPLE_RATE <= self.template.size:
            raise ValueError(f"interval_s ({interval_s}) must be longer than the chirp ({chirp_s} s)")
        offset = interval_s if offset_s is None else offset_s
        if offset < 0:
            raise ValueError(f"offset_s must not be negative, got {offset}")
        super().__init__()
        self.interval_s = interval_s
        self.offset_s = offset
        self.markers: list[ChirpMarker] = []

    @property
    def emitted_at(self) -> list[float]:
        """Wall-clock (``time.time()``) emission time of each chirp's first sample so far."""
        return [marker.wall_time for marker in self.markers]

    def onset(self, index: int) -> int:
        """Stream position (in samples) of chirp number ``index``."""
        return round((self.offset_s + index * self.interval_s) * SAMPLE_RATE)

    def _overlapping(self, pts: int) -> Iterator[int]:
        """Indices of the chirps with at least one sample in ``[pts, pts + FRAME_SAMPLES)``."""
        earliest = (pts - self.template.size) / SAMPLE_RATE - self.offset_s
        index = max(0, math.floor(earliest / self.interval_s))
        while self.onset(index) < pts + FRAME_SAMPLES:
            if self.onset(index) + self.template.size > pts:
                yield index
            index += 1

    async def _next_samples(self, pts: int) -> Int16Array:
        samples = np.zeros(FRAME_SAMPLES, dtype=np.int16)
        for index in self._overlapping(pts):
            start = self.onset(index)
            lo, hi = max(start, pts), min(start + self.template.size, pts + FRAME_SAMPLES)
            samples[lo - pts : hi - pts] = self.template[lo - start : hi - start]
        return samples

    async def recv(self) -> av.AudioFrame:
        frame = await super().recv()
        handed_over = time.time()
        pts = frame.pts if frame.pts is not None else 0
        for index in self._overlapping(pts):
            start = self.onset(index)
            if start >= pts:
                wall_time = handed_over + (start - pts) / SAMPLE_RATE
                self.markers.append(ChirpMarker(index=index, sample=start, wall_time=wall_time))
                logger.debug("chirp emitted", extra={"chirp": index, "sample": start})
        return frame


class FileTrack(PacedAudioTrack):
    """Any audio file FFmpeg can read, resampled to 48 kHz mono s16 and cut into 20 ms frames.

    Decoding runs in a worker thread, one frame per hop, so a slow disk or a heavy codec never
    holds up the event loop. With ``loop`` (the default) the file repeats seamlessly; without,
    the track ends after the last (silence-padded) frame.
    """

    def __init__(self, path: str | Path, loop: bool = True) -> None:
        self.path = Path(path)
        # Open once now so a missing or audio-less file fails here, not in the sender's task.
        with av.open(str(self.path)) as container:
            if not container.streams.audio:
                raise ValueError(f"{self.path}: no audio stream")
        super().__init__()
        self.loop = loop
        self._frames = pcm_frames(self.path, loop=loop)
        self._reading = False

    async def _next_samples(self, pts: int) -> Int16Array | None:
        if self._reading:
            raise RuntimeError("FileTrack.recv() called concurrently")
        self._reading = True
        try:
            samples = await asyncio.to_thread(next, self._frames, None)
        finally:
            self._reading = False
        if self.readyState != "live":
            self._frames.close()
        return samples

    def stop(self) -> None:
        super().stop()
        # A read in flight finishes in its thread; _next_samples closes the decoder after it.
        if not self._reading:
            self._frames.close()


def source_from_spec(spec: str, *, loop: bool = True) -> PacedAudioTrack:
    """A source from a short command-line spec.

    ``tone`` or ``tone:FREQ`` (Hz, default 440), ``chirp`` or ``chirp:INTERVAL`` (seconds,
    default 1), anything else is a path to an audio file.
    """
    kind, _, argument = spec.partition(":")
    if kind == "tone":
        return ToneTrack(float(argument) if argument else 440.0)
    if kind == "chirp":
        return ChirpTrack(float(argument) if argument else 1.0)
    return FileTrack(spec, loop=loop)
