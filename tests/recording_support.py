"""Real recordings for tests and benchmarks: the real ``Packager`` fed with a tone as fast as it
encodes, its init segment and parts written into a real media store as the packager's host
writes them (one epoch per packager start; ``seq`` continues across epochs)."""

from __future__ import annotations

import dataclasses
import io
import time

import av
import numpy as np

from townhall.audience.packager import Packager, PartReady
from townhall.stage.sources import FRAME_SAMPLES, SAMPLE_RATE
from townhall.storage.media_store import MediaStore, PartRecord


@dataclasses.dataclass
class Packaged:
    init: bytes
    parts: list[PartReady]


def package_tone(seconds: float, frequency: float = 440.0, *, t0: float | None = None) -> Packaged:
    """``seconds`` of a tone through the real packager (AAC-LC, fMP4 parts of ~0.49 s)."""
    inits: list[bytes] = []
    parts: list[PartReady] = []
    packager = Packager("test", on_init=inits.append, on_part=parts.append, queue_frames=400)
    start = time.time() if t0 is None else t0
    chunk = 60 * SAMPLE_RATE  # make the tone a minute at a time: 3 hours would not fit in memory
    done = 0
    total = round(seconds * SAMPLE_RATE)
    while done < total:
        n = np.arange(done, done + min(chunk, total - done), dtype=np.float64)
        signal = np.round(0.3 * 32767 * np.sin(2 * np.pi * np.mod(n * frequency / SAMPLE_RATE, 1.0)))
        signal = signal.astype(np.int16)
        for i in range(0, len(signal) - FRAME_SAMPLES + 1, FRAME_SAMPLES):
            # Block instead of dropping: as fast as the encoder goes, never faster.
            packager.queue.put((signal[i : i + FRAME_SAMPLES], start + (done + i) / SAMPLE_RATE))
        done += len(signal)
    packager.queue.put(None)
    packager._thread.join()
    assert len(inits) == 1, "the packager made no init segment"
    return Packaged(inits[0], parts)


def store_epochs(
    store: MediaStore,
    space_id: str,
    epochs: list[float],
    frequency: float = 440.0,
    *,
    finish: bool = True,
    t0: float | None = None,
) -> list[PartRecord]:
    """One packager run per entry of ``epochs`` (its length in seconds), written into ``store``
    as the stage writes a space that crashed and resumed between runs."""
    written: list[PartRecord] = []
    seq, epoch = store.resume_point(space_id)
    start = time.time() if t0 is None else t0
    for seconds in epochs:
        packaged = package_tone(seconds, frequency, t0=start)
        store.write_init(space_id, epoch, packaged.init)
        for part in packaged.parts:
            record = PartRecord(seq, epoch, part.duration, part.start, part.data)
            store.write_part(space_id, record)
            written.append(record)
            seq += 1
        start += seconds + 5.0  # the time a crashed packager was down
        epoch += 1
    if finish:
        store.finish(space_id)
    return written


def decode_mono(data: bytes) -> tuple[np.ndarray, list[float]]:
    """Decode an MP4 (init + parts) to 48 kHz mono samples, and the frames' times (s)."""
    container = av.open(io.BytesIO(data), format="mp4")
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    out = []
    times = []
    for frame in container.decode(audio=0):
        if frame.pts is not None and frame.time_base is not None:
            times.append(float(frame.pts * frame.time_base))
        for f in resampler.resample(frame):
            out.append(f.to_ndarray().reshape(-1))
    container.close()
    return np.concatenate(out), times
