"""What the stage's encoders cost per 20 ms frame, by setting, and how far each strays from the input.

``.venv/bin/python bench/codec_cost.py [--repeats 5]``

Opus (libopus through PyAV, mono, 48 kHz, 20 ms frames, what ``stage/room.py`` encodes for
every WHEP return each tick) for the application modes and complexities considered, and AAC-LC
(libav, 64 kb/s, muxed to fragmented MP4, what ``audience/packager.py`` does for every space
each tick) for its coders. The input is 4 s of a speech-like signal: two tones (one amplitude-
modulated) and bursts of noise. For Opus, the waveform error after decoding is given as an SNR
(best alignment over 0-1000 samples, which also gives the codec's delay): a crude measure
for a perceptual codec, used only to compare settings with each other. Each figure is the
median of ``--repeats`` passes; a shared machine makes single figures noisy.
"""

from __future__ import annotations

import argparse
import fractions
import io
import statistics
import time

import av
import numpy as np

RATE = 48000
FRAME = 960


def signal(seconds: float = 4.0) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    rng = np.random.default_rng(1)
    x = (
        0.15 * np.sin(2 * np.pi * 300 * t)
        + 0.1 * np.sin(2 * np.pi * 1370 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
        + 0.05 * rng.standard_normal(len(t)) * (np.sin(2 * np.pi * 2 * t) > 0)
    )
    return np.asarray(x * 32767, dtype=np.int16)


def opus(sig: np.ndarray, application: str, bitrate: int, complexity: int) -> tuple[float, float, int]:
    """(µs per encoded frame, SNR dB, delay in samples)."""
    enc = av.CodecContext.create("libopus", "w")
    enc.bit_rate = bitrate
    enc.format = "s16"
    enc.layout = "mono"
    enc.sample_rate = RATE
    enc.time_base = fractions.Fraction(1, RATE)
    enc.options = {"application": application, "compression_level": str(complexity)}
    dec = av.CodecContext.create("libopus", "r")
    dec.format = "s16"
    dec.layout = "mono"
    dec.sample_rate = RATE
    spent = 0.0
    out = []
    frames = len(sig) // FRAME
    for i in range(frames):
        frame = av.AudioFrame.from_ndarray(
            sig[i * FRAME : (i + 1) * FRAME].reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = RATE
        frame.pts = i * FRAME
        t0 = time.perf_counter()
        packets = enc.encode(frame)
        spent += time.perf_counter() - t0
        for p in packets:
            out += [f.to_ndarray().reshape(-1) for f in dec.decode(av.Packet(bytes(p)))]
    y = np.concatenate(out).astype(float)
    x = sig.astype(float)
    best = (-np.inf, 0)
    for lag in range(1000):
        n = min(len(x), len(y) - lag) - 2000
        err = y[lag + 2000 : lag + n] - x[2000:n]
        snr = 10 * np.log10((x[2000:n] ** 2).sum() / max(float((err**2).sum()), 1.0))
        best = max(best, (snr, lag))
    return spent / frames * 1e6, best[0], best[1]


def aac(sig: np.ndarray, coder: str) -> float:
    """µs per 20 ms frame, encoded and muxed as the packager does."""
    out = av.open(
        io.BytesIO(),
        "w",
        format="mp4",
        options={"movflags": "frag_keyframe+empty_moov+default_base_moof+cmaf", "frag_duration": "478667"},
    )
    stream = out.add_stream("aac", rate=RATE, layout="mono", options={"aac_coder": coder})
    stream.bit_rate = 64000
    frames = len(sig) // FRAME
    t0 = time.perf_counter()
    for i in range(frames):
        frame = av.AudioFrame.from_ndarray(
            sig[i * FRAME : (i + 1) * FRAME].reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = RATE
        frame.pts = i * FRAME
        for packet in stream.encode(frame):
            out.mux(packet)
    return (time.perf_counter() - t0) / frames * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sig = signal()
    print("| Opus setting | µs a frame (median) | SNR dB | delay (samples) |")
    print("|---|---|---|---|")
    for application, bitrate, complexity in [
        ("voip", 96000, 10),
        ("voip", 96000, 0),
        ("lowdelay", 96000, 10),
        ("lowdelay", 96000, 5),
        ("lowdelay", 96000, 0),
        ("lowdelay", 64000, 0),
    ]:
        runs = [opus(sig, application, bitrate, complexity) for _ in range(args.repeats)]
        us = statistics.median(r[0] for r in runs)
        name = f"{application} {bitrate // 1000} kb/s complexity {complexity}"
        print(f"| {name} | {us:.1f} | {runs[0][1]:.1f} | {runs[0][2]} |")
    print("\n| AAC-LC 64 kb/s + fMP4 mux | µs a frame (median) |\n|---|---|")
    for coder in ("twoloop", "fast"):
        print(
            f"| aac_coder={coder} | {statistics.median(aac(sig, coder) for _ in range(args.repeats)):.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
