"""The mixer and jitter buffer as pure cores: frames in, frames out, no sockets."""

from __future__ import annotations

import numpy as np
import pytest

from townhall.stage.jitter import JitterBuffer
from townhall.stage.mixer import FRAME_SAMPLES, RATE, Mixer, limit

F = FRAME_SAMPLES


def tone(freq: float, n: int, amp: float = 0.3, start: int = 0) -> np.ndarray:
    t = (np.arange(n) + start) / RATE
    return np.round(amp * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def power_at(x: np.ndarray, freq: float) -> float:
    spec = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(len(x)))) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / RATE)
    band = (freqs > freq - 30) & (freqs < freq + 30)
    return float(spec[band].sum() / max(spec.sum(), 1e-12))


def run(mixer: Mixer, sources: dict[str, float], ticks: int, amp: float = 0.3) -> list:
    outs = []
    for i in range(ticks):
        for name, freq in sources.items():
            mixer.push(name, tone(freq, F, amp, start=i * F), now=i * 0.02)
        outs.append(mixer.tick(now=i * 0.02))
    return outs


def test_mix_minus_never_contains_your_own_voice() -> None:
    mixer = Mixer()
    sources = {"a": 440.0, "b": 660.0, "c": 990.0}
    for name in sources:
        mixer.add_speaker(name)
    outs = run(mixer, sources, 50)[5:]
    for name, freq in sources.items():
        heard = np.concatenate([o.minus[name] for o in outs])
        assert power_at(heard, freq) < 1e-4, name  # own voice: nothing
        for other, f in sources.items():
            if other != name:
                assert power_at(heard, f) > 0.3, (name, other)  # each other voice: a large share
    program = np.concatenate([o.program for o in outs])
    assert all(power_at(program, f) > 0.25 for f in sources.values())


def test_mute_is_enforced_in_the_mix() -> None:
    mixer = Mixer()
    mixer.add_speaker("a")
    mixer.add_speaker("b")
    run(mixer, {"a": 440.0, "b": 660.0}, 10)
    mixer.set_muted("a", True)
    outs = run(mixer, {"a": 440.0, "b": 660.0}, 20)
    heard_by_b = np.concatenate([o.minus["b"] for o in outs])
    assert np.abs(heard_by_b).max() == 0  # b hears nobody: a is muted
    program = np.concatenate([o.program for o in outs])
    assert power_at(program, 440.0) < 1e-4 and power_at(program, 660.0) > 0.9
    assert all(o.levels["a"] == -120.0 for o in outs)
    assert mixer.buffer("a").depth <= 6  # a's frames are consumed, not piled up


def test_limiter_compresses_instead_of_wrapping() -> None:
    mixer = Mixer()
    names = [f"s{i}" for i in range(13)]
    for n in names:
        mixer.add_speaker(n)
    outs = run(mixer, dict.fromkeys(names, 300.0), 10, amp=0.9)  # 13 loud speakers in phase
    program = np.concatenate([o.program for o in outs[3:]]).astype(np.int32)
    assert program.max() <= 32767 and program.min() >= -32767  # saturates smoothly, never wraps
    # No wrap-around: the waveform keeps the sign of the summed tone everywhere.
    expected = np.sign(np.concatenate([tone(300.0, F, start=i * F) for i in range(3, 10)]))
    nonzero = expected != 0
    assert np.all(np.sign(program[nonzero]) == expected[nonzero])
    x = np.linspace(-20, 20, 1001, dtype=np.float32)
    y = limit(x)
    assert np.all(np.abs(y) <= 1.0) and np.all(np.diff(y) >= 0)  # bounded and monotonic
    quiet = np.linspace(-0.5, 0.5, 11, dtype=np.float32)
    assert np.array_equal(limit(quiet), quiet)


def test_levels_say_who_is_speaking() -> None:
    mixer = Mixer()
    mixer.add_speaker("loud")
    mixer.add_speaker("silent")
    outs = run(mixer, {"loud": 500.0}, 5)
    assert outs[-1].speaking("loud") and not outs[-1].speaking("silent")
    assert -14 < outs[-1].levels["loud"] < -13  # a 0.3 sine: RMS 0.212 = -13.5 dBFS


def test_a_late_speaker_never_stalls_the_mix() -> None:
    mixer = Mixer()
    mixer.add_speaker("steady")
    mixer.add_speaker("flaky")
    outs = []
    for i in range(40):
        mixer.push("steady", tone(440.0, F, start=i * F), now=i * 0.02)
        if i < 10 or i >= 30:  # flaky goes silent for 400 ms
            mixer.push("flaky", tone(880.0, F, start=i * F), now=i * 0.02)
        outs.append(mixer.tick(now=i * 0.02))
    assert len(outs) == 40  # one output per tick, whatever the inputs did
    gap = np.concatenate([o.program for o in outs[13:30]])
    assert power_at(gap, 440.0) > 0.9  # the steady speaker carries on through the gap
    assert mixer.buffer("flaky").underruns >= 1


def test_jitter_buffer_rules() -> None:
    jb = JitterBuffer(frame_samples=4, prefill=2, max_depth=3)
    frame = lambda v: np.full(4, v, dtype=np.int16)  # noqa: E731
    jb.push(frame(1), 0.0)
    assert jb.pop() is None  # not prefilled yet
    jb.push(frame(2), 0.0)
    assert jb.pop()[0] == 1 and jb.pop()[0] == 2
    concealed = jb.pop()
    assert concealed is not None and concealed[0] == 1  # the last frame at half level, once
    assert jb.pop() is None and jb.underruns == 1
    for v in range(10, 16):
        jb.push(frame(v), 1.0)
    assert jb.depth == 3 and jb.dropped == 3  # a burst keeps only the newest
    assert jb.pop()[0] == 13
    with pytest.raises(ValueError):
        jb.push(np.zeros(5, dtype=np.int16), 2.0)


def test_a_standing_surplus_drains_back_to_the_target_depth() -> None:
    """A burst fills the buffer; arrivals at the steady rate then keep it full, so without a
    rule the burst's delay would stay for good. One frame is dropped per ``settle`` ticks
    of surplus, down to the prefill depth, and then nothing more is dropped."""
    jb = JitterBuffer(frame_samples=4, prefill=2, max_depth=6, settle=5)
    frame = lambda v: np.full(4, v, dtype=np.int16)  # noqa: E731
    n = 0
    for _ in range(6):  # the burst: 6 frames at once
        jb.push(frame(n), 0.0)
        n += 1
    popped = []
    for tick in range(60):  # then one frame in, one frame out per tick
        jb.push(frame(n), tick * 0.02)
        n += 1
        popped.append(int(jb.pop()[0]))
    assert jb.trimmed == 4 and jb.depth == 1  # as deep as steady arrivals keep it (below)
    assert popped[-1] == n - 2  # one frame queued behind it: the steady delay, no more
    assert popped == sorted(popped) and len(set(popped)) == len(popped)  # skips, never repeats
    assert jb.underruns == 0 and jb.dropped == 1  # the 7th frame of the burst hit max_depth


def test_steady_arrivals_at_the_target_depth_are_never_trimmed() -> None:
    jb = JitterBuffer(frame_samples=4, prefill=2, max_depth=6, settle=5)
    frame = np.zeros(4, dtype=np.int16)
    jb.push(frame, 0.0)
    for tick in range(200):
        jb.push(frame, tick * 0.02)
        assert jb.pop() is not None
    assert jb.trimmed == 0 and jb.depth == 1
