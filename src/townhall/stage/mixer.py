"""The 20 ms mixer with mix-minus (pure: takes ``now`` and frames; no sockets, no asyncio).

Theory of operation
-------------------
Every tick takes one frame per speaker from its jitter buffer (silence when none), sums them
in floating point, and derives:
- the program mix: everyone, for the packager and a host's monitor;
- one mix-minus per speaker: everyone but that speaker, so nobody hears their own voice;
- a level per speaker (RMS, dBFS) for the "who is speaking" indicator.
A muted or removed speaker's frames are still taken from its buffer (so nothing piles up) but
never mixed: mute is enforced here, on the server. Each output passes a soft-knee limiter: below
half scale it is untouched; above, it bends smoothly towards full scale and can never reach it,
so a loud room is compressed, never wrapped around.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import numpy.typing as npt

from townhall.stage.jitter import Frame, JitterBuffer

RATE = 48000
FRAME_SAMPLES = 960  # 20 ms at 48 kHz
TICK = FRAME_SAMPLES / RATE
SPEAKING_DBFS = -45.0
KNEE = 0.5

Float = npt.NDArray[np.float32]


def limit(x: Float) -> Float:
    """Soft-knee limiter: identity below ``KNEE``, then ``KNEE + (1-KNEE)·tanh(..)``, which
    approaches full scale and reaches it only where float32 rounds."""
    mag = np.abs(x)
    over = mag > KNEE
    if not over.any():
        return x
    out = x.copy()
    out[over] = np.sign(x[over]) * (KNEE + (1 - KNEE) * np.tanh((mag[over] - KNEE) / (1 - KNEE)))
    return out


def to_int16(x: Float) -> Frame:
    return np.round(x * 32767.0).astype(np.int16)


def dbfs(x: Float) -> float:
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    return -120.0 if rms <= 1e-6 else max(-120.0, 20 * math.log10(rms))


def dbfs_rows(frames: Float) -> list[float]:
    """``dbfs`` of every row of a matrix of frames, in one pass."""
    rms = np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1))
    return [-120.0 if r <= 1e-6 else max(-120.0, 20 * math.log10(r)) for r in rms.tolist()]


@dataclasses.dataclass(frozen=True)
class MixOutput:
    tick: int
    program: Frame
    minus: dict[str, Frame]
    levels: dict[str, float]

    def speaking(self, speaker: str) -> bool:
        return self.levels.get(speaker, -120.0) > SPEAKING_DBFS


@dataclasses.dataclass
class _Speaker:
    buffer: JitterBuffer
    muted: bool = False


class Mixer:
    def __init__(self, prefill: int = 2, max_depth: int = 6) -> None:
        self._prefill = prefill
        self._max_depth = max_depth
        self._speakers: dict[str, _Speaker] = {}
        self.ticks = 0

    @property
    def speakers(self) -> list[str]:
        return list(self._speakers)

    def add_speaker(self, speaker: str, *, muted: bool = False) -> None:
        if speaker not in self._speakers:
            self._speakers[speaker] = _Speaker(JitterBuffer(FRAME_SAMPLES, self._prefill, self._max_depth))
        self._speakers[speaker].muted = muted

    def remove_speaker(self, speaker: str) -> None:
        self._speakers.pop(speaker, None)

    def set_muted(self, speaker: str, muted: bool) -> None:
        if speaker in self._speakers:
            self._speakers[speaker].muted = muted

    def is_muted(self, speaker: str) -> bool:
        s = self._speakers.get(speaker)
        return s is not None and s.muted

    def push(self, speaker: str, frame: Frame, now: float) -> None:
        """A decoded 20 ms frame from a speaker; frames of unknown speakers are dropped."""
        s = self._speakers.get(speaker)
        if s is not None:
            s.buffer.push(frame, now)

    def buffer(self, speaker: str) -> JitterBuffer | None:
        s = self._speakers.get(speaker)
        return s.buffer if s else None

    def tick(self, now: float) -> MixOutput:
        """Mix one 20 ms frame. ``now`` is accepted for symmetry with the other cores and for
        future time-based rules; the mixer itself is driven by the count of ticks.

        The speakers heard this tick are mixed as one matrix (a row each), so the cost is a
        fixed handful of numpy calls per tick rather than a dozen per speaker."""
        del now
        levels: dict[str, float] = {}
        heard: list[str] = []
        raws: list[Frame] = []
        for name, s in self._speakers.items():
            raw = s.buffer.pop()
            if raw is None or s.muted:
                levels[name] = -120.0
            else:
                heard.append(name)
                raws.append(raw)
        own_removed: dict[str, Frame] = {}
        if raws:
            frames = np.stack(raws).astype(np.float32)
            frames /= 32768.0
            # Row by row, in speaker order: the same float32 sums as adding the frames one by one.
            total = frames.sum(axis=0, dtype=np.float32)
            for name, level in zip(heard, dbfs_rows(frames), strict=True):
                levels[name] = level
            program = to_int16(limit(total))
            own_removed = dict(zip(heard, to_int16(limit(total - frames)), strict=True))
        else:
            program = np.zeros(FRAME_SAMPLES, dtype=np.int16)
        minus = {name: own_removed.get(name, program) for name in self._speakers}
        self.ticks += 1
        return MixOutput(self.ticks, program, minus, levels)
