"""A per-speaker jitter buffer of fixed 20 ms frames (pure: takes ``now``).

Rules:
- Play-out starts once ``prefill`` frames are queued (absorbs arrival jitter).
- One frame leaves per mixer tick. An empty buffer at a tick is an underrun: the previous
  frame is repeated once at half level (concealment), then silence; the mix never waits.
- A buffer deeper than ``max_depth`` frames drops its oldest frames, so a burst cannot queue
  more than ``max_depth`` frames.
- A standing surplus drains: frames arriving at the steady rate never empty a queue that a burst
  (the set-up, a stall) filled, so the delay it added would stay for good (measured: the added
  speaker-to-speaker latency was ~120 ms or ~200 ms from one run to the next, the latter with
  the buffer held at ``max_depth``). When the queue has held more than ``prefill`` frames at
  every tick for ``settle`` ticks, the oldest frame is dropped (20 ms of audio skipped, at most
  once per ``settle`` ticks) until it no longer does.
"""

from __future__ import annotations

import collections

import numpy as np
import numpy.typing as npt

Frame = npt.NDArray[np.int16]


class JitterBuffer:
    def __init__(
        self, frame_samples: int = 960, prefill: int = 2, max_depth: int = 6, settle: int = 25
    ) -> None:
        self.frame_samples = frame_samples
        self.prefill = prefill
        self.max_depth = max_depth
        self.settle = settle
        self._surplus_ticks = 0  # consecutive ticks that found more than ``prefill`` frames
        self.trimmed = 0
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
            if len(self._frames) > self.prefill:
                self._surplus_ticks += 1
                if self._surplus_ticks >= self.settle:
                    self._frames.popleft()
                    self.trimmed += 1
                    self._surplus_ticks = 0
            else:
                self._surplus_ticks = 0
            self._last = self._frames.popleft()
            self._concealed = 0
            return self._last
        self._surplus_ticks = 0
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
