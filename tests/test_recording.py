"""The single-file recording and the VOD segments, from real packager output in a real store:
opened by PyAV and ffprobe, decoded, and the tone found throughout."""

from __future__ import annotations

import itertools
import json
import random
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
import pytest

from tests.recording_support import decode_mono, package_tone, store_epochs
from townhall.audience.fmp4 import Box, BoxReader, base_decode_time, find
from townhall.audience.packager import Packager
from townhall.audience.recording import (
    MAX_SEGMENT_PARTS,
    RecordingPlan,
    codec_key,
    init_with_duration,
    plan_recording,
    read_track,
    replay_segments,
)
from townhall.stage.sources import tone_power
from townhall.storage.media_store import LocalMediaStore, PartInfo

RATE = 48000
TONE = 440.0
# A 3-minute space that crashed twice: three packager runs, three epochs.
EPOCHS = [70.0, 45.0, 65.0]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalMediaStore, RecordingPlan, bytes]:
    store = LocalMediaStore(tmp_path_factory.mktemp("rec") / "media")
    store_epochs(store, "space", EPOCHS, TONE)
    plan = plan_recording(
        {e: store.read_init("space", e) for e in store.epochs("space")}, store.parts("space")
    )
    data = b"".join(plan.chunks(0, plan.size, lambda infos: store.read_parts("space", infos)))
    return store, plan, data


def part_seconds(store: LocalMediaStore) -> float:
    return max(p.duration for p in store.parts("space"))


def test_the_file_states_its_real_duration(recorded: tuple[LocalMediaStore, RecordingPlan, bytes]) -> None:
    store, plan, data = recorded
    assert len(data) == plan.size
    expected = sum(p.duration for p in store.parts("space"))
    assert abs(plan.duration - expected) < 1e-6
    assert abs(plan.duration - sum(EPOCHS)) <= part_seconds(store)
    moov = next(b for b in BoxReader().feed(data[: len(plan.init)]) if b.type == b"moov")
    for path, scale in (([b"mvhd"], 1000), ([b"trak", b"tkhd"], 1000), ([b"trak", b"mdia", b"mdhd"], RATE)):
        box = find(moov, path)
        assert box is not None and box.payload[0] == 1  # version 1: 64-bit durations
        at = 28 if box.type == b"tkhd" else 24
        (duration,) = struct.unpack(">Q", box.payload[at : at + 8])
        assert abs(duration / scale - plan.duration) < 0.002, path
    mehd = find(moov, [b"mvex", b"mehd"])
    assert mehd is not None
    assert abs(struct.unpack(">Q", mehd.payload[4:12])[0] / 1000 - plan.duration) < 0.002


def test_pyav_and_ffprobe_read_the_duration(
    recorded: tuple[LocalMediaStore, RecordingPlan, bytes], tmp_path: Path
) -> None:
    store, plan, data = recorded
    path = tmp_path / "space.m4a"
    path.write_bytes(data)
    with av.open(str(path)) as container:
        assert container.duration is not None
        assert abs(container.duration / 1e6 - sum(EPOCHS)) <= part_seconds(store)
        assert container.streams.audio[0].codec_context.name == "aac"
    probe = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-show_entries",
            "format=duration:stream=duration",
            "-of",
            "json",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    info = json.loads(probe.stdout)
    assert abs(float(info["format"]["duration"]) - sum(EPOCHS)) <= part_seconds(store)
    assert abs(float(info["streams"][0]["duration"]) - plan.duration) < 0.01
    # ffmpeg reads every packet without an error.
    check = subprocess.run(
        ["ffmpeg", "-v", "error", "-xerror", "-i", str(path), "-f", "null", "-"],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0 and not check.stderr.strip(), check.stderr


def test_the_tone_runs_throughout_on_one_timeline(
    recorded: tuple[LocalMediaStore, RecordingPlan, bytes],
) -> None:
    store, plan, data = recorded
    samples, times = decode_mono(data)
    assert abs(len(samples) / RATE - plan.duration) <= part_seconds(store)
    # The decoder's timeline is continuous: every frame begins where the last one ended.
    steps = np.diff(np.asarray(times))
    assert steps.min() > 0 and steps.max() <= 1024 / RATE + 1e-6
    # The tone in every 50 ms window; the longest run of windows without it is the gap.
    window = RATE // 20
    longest = run = 0
    for i in range(0, len(samples) - window + 1, window):
        if tone_power(samples[i : i + window], RATE, TONE, bandwidth=60.0) < 0.5:
            run += 1
            longest = max(longest, run)
        else:
            run = 0
    assert longest * window / RATE <= part_seconds(store), f"a gap of {longest * window / RATE:.2f} s"


def test_fragments_are_renumbered_and_retimed(recorded: tuple[LocalMediaStore, RecordingPlan, bytes]) -> None:
    store, plan, data = recorded
    moofs = [b for b in BoxReader().feed(data) if b.type == b"moof"]
    assert len(moofs) == len(store.parts("space"))
    sequences = [struct.unpack(">I", find(m, [b"mfhd"]).payload[4:8])[0] for m in moofs]  # type: ignore[union-attr]
    assert sequences == list(range(1, len(moofs) + 1))
    times = [base_decode_time(m) for m in moofs]
    assert times == list(plan.decode_times)
    assert times[0] == 0 and all(b > a for a, b in itertools.pairwise(times))


def test_ranges_map_onto_the_pieces(recorded: tuple[LocalMediaStore, RecordingPlan, bytes]) -> None:
    store, plan, data = recorded
    rng = random.Random(6)
    edges = [0, 1, len(plan.init) - 1, len(plan.init), len(plan.init) + 1, *plan.offsets[:3], plan.size - 1]
    cases = [(a, min(plan.size, a + n)) for a in edges for n in (1, 7, 5000)]
    cases += [tuple(sorted((rng.randrange(plan.size), rng.randrange(plan.size)))) for _ in range(50)]
    cases += [(0, plan.size), (plan.size, plan.size)]
    for start, stop in cases:
        got = b"".join(
            plan.chunks(start, stop, lambda infos: store.read_parts("space", infos), chunk_bytes=3000)
        )
        assert got == data[start:stop], (start, stop)


def test_a_range_reads_only_the_parts_it_touches(
    recorded: tuple[LocalMediaStore, RecordingPlan, bytes],
) -> None:
    store, plan, data = recorded
    read: list[int] = []

    def reading(infos: Sequence[PartInfo]) -> list[bytes]:
        read.extend(info.seq for info in infos)
        return store.read_parts("space", infos)

    start = plan.offsets[100] + 10
    stop = plan.offsets[102] + 1
    assert b"".join(plan.chunks(start, stop, reading)) == data[start:stop]
    assert read == [plan.parts[i].seq for i in (100, 101, 102)]
    with pytest.raises(ValueError):
        list(plan.chunks(0, plan.size + 1, reading))


def test_init_rewrite_keeps_the_track() -> None:
    packaged = package_tone(1.0)
    rewritten = init_with_duration(packaged.init, 48000 * 3600 * 30)  # 30 h: past 32-bit durations
    assert read_track(rewritten) == read_track(packaged.init)
    types = [b.type for b in BoxReader().feed(rewritten)]
    assert types == [b.type for b in BoxReader().feed(packaged.init)]
    with av.open(__import__("io").BytesIO(rewritten + b"".join(p.data for p in packaged.parts))) as c:
        assert abs(c.duration / 1e6 - 30 * 3600) < 1  # type: ignore[operator]


def test_another_bitrate_joins_but_not_another_track() -> None:
    """A restart with another ``aac_bitrate`` changes only the bitrate fields of the sample
    description (the decoder's configuration is the same): the epochs join."""
    low = package_tone(1.0)
    inits: list[bytes] = []
    parts: list[object] = []
    packager = Packager("b", on_init=inits.append, on_part=parts.append, bitrate=32000, queue_frames=400)
    for i in range(50):
        packager.queue.put((np.zeros(960, dtype=np.int16), 1000.0 + i * 0.02))
    packager.queue.put(None)
    packager._thread.join()
    assert read_track(inits[0]).stsd != read_track(low.init).stsd
    assert codec_key(read_track(inits[0]).stsd) == codec_key(read_track(low.init).stsd)
    plan_recording({0: low.init, 1: inits[0]}, [])


def test_a_different_track_cannot_be_joined(tmp_path: Path) -> None:
    packaged = package_tone(1.0)
    other = bytearray(packaged.init)
    stsd = find(next(b for b in BoxReader().feed(packaged.init) if b.type == b"moov"), [b"trak"])
    assert stsd is not None
    at = bytes(other).index(b"mp4a")
    other[at + 24 : at + 26] = b"\x00\x02"  # channel count 2: another sample description
    with pytest.raises(ValueError, match="sample description"):
        plan_recording({0: packaged.init, 1: bytes(other)}, [])
    with pytest.raises(ValueError):
        plan_recording({}, [])


def test_parts_without_their_init_are_left_out(tmp_path: Path) -> None:
    store = LocalMediaStore(tmp_path / "media")
    store_epochs(store, "s", [2.0, 2.0])
    (store.space_dir("s") / "init-e00001.mp4").unlink()
    plan = plan_recording({e: store.read_init("s", e) for e in store.epochs("s")}, store.parts("s"))
    assert {p.epoch for p in plan.parts} == {0}


def info(seq: int, epoch: int, duration: float = 0.49) -> PartInfo:
    return PartInfo(seq, epoch, duration, 1000.0 + seq, 100)


def test_replay_segments_never_cross_an_epoch_or_a_gap() -> None:
    parts = (
        [info(s, 0) for s in range(30)] + [info(s, 1) for s in range(31, 40)] + [info(s, 1) for s in (41, 42)]
    )
    segments = replay_segments(parts, target=6.0)
    assert sum(s.count for s in segments) == len(parts)
    assert [s.first for s in segments] == list(np.cumsum([0] + [s.count for s in segments[:-1]]))
    for s in segments:
        run = parts[s.first : s.first + s.count]
        assert {p.epoch for p in run} == {s.epoch}
        assert [p.seq for p in run] == list(range(run[0].seq, run[0].seq + s.count))
        assert s.duration <= 6.0 + 1e-9 and s.count <= MAX_SEGMENT_PARTS
        assert s.name == f"r{run[0].seq}-{s.count}.m4s"
    assert [s.count for s in segments] == [12, 12, 6, 9, 2]
    assert replay_segments([]) == []
    # A part longer than the target still makes a segment of its own.
    assert [s.count for s in replay_segments([info(0, 0, 7.0), info(1, 0, 7.0)])] == [1, 1]


def test_stored_parts_are_real_fragments(recorded: tuple[LocalMediaStore, RecordingPlan, bytes]) -> None:
    store, _plan, _data = recorded
    first = store.parts("space")[0]
    moof = BoxReader().feed(store.read_part("space", first))[0]
    assert isinstance(moof, Box) and moof.type == b"moof" and base_decode_time(moof) == 0
