"""A per-speaker jitter buffer of fixed 20 ms frames (pure: takes ``now``).

Rules:
- Play-out starts once ``prefill`` frames are queued (absorbs arrival jitter).
- One frame leaves per mixer tick. An empty buffer at a tick is an underrun: the previous
  frame is repeated once at half level (concealment), then silence; the mix never waits.
- A buffer deeper than ``max_depth`` frames drops its oldest frames, so a burst after a network
  stall cannot add lasting delay.
"""

from __future__ import annotations

import collections

import numpy as np
import numpy.typing as npt

Frame = npt.NDArray[np.int16]


class JitterBuffer:
    def __init__(self, frame_samples: int = 960, prefill: int = 2, max_depth: int = 6) -> None:
        self.frame_samples = frame_samples
        self.prefill = prefill
        self.max_depth = max_depth
        self._frames: collections.deque[Frame] = collections.deque()
        self._playing = False
        self._last: Frame | None = None
        self._concealed = 0
        self.underruns = 0
        self.dropped = 0
        self.last_arrival: float | None = None

    def push(self, frame: Frame, now: float) -> None:
        if frame.shape != (self.frame_samples,):
            raise ValueError(f"frame must be {self.frame_samples} mono samples, got {frame.shape}")
        self._frames.append(frame)
        self.last_arrival = now
        while len(self._frames) > self.max_depth:
            self._frames.popleft()
            self.dropped += 1
        if len(self._frames) >= self.prefill:
            self._playing = True

    def pop(self) -> Frame | None:
        """The frame for this tick, a concealment frame, or None for silence."""
        if self._playing and self._frames:
            self._last = self._frames.popleft()
            self._concealed = 0
            return self._last
        if self._playing:
            self.underruns += 1
            self._playing = False  # refill before playing again
        if self._last is not None and self._concealed == 0:
            self._concealed = 1
            return (self._last // 2).astype(np.int16)
        return None

    @property
    def depth(self) -> int:
        return len(self._frames)
