"""The local media store: durable writes, listing from names, crash leftovers, deletion."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.recording_support import package_tone, store_epochs
from townhall.storage.media_store import (
    LocalMediaStore,
    MediaStoreError,
    MissingMedia,
    PartRecord,
    parse_part_name,
    part_name,
)

REPO = Path(__file__).resolve().parents[1]


def test_round_trip_of_real_parts(tmp_path: Path) -> None:
    store = LocalMediaStore(tmp_path / "media")
    packaged = package_tone(3.0, t0=1_790_000_000.0)
    assert store.resume_point("abc") == (0, 0)
    store.write_init("abc", 0, packaged.init)
    for seq, part in enumerate(packaged.parts):
        store.write_part("abc", PartRecord(seq, 0, part.duration, part.start, part.data))
    listed = store.parts("abc")
    assert [p.seq for p in listed] == list(range(len(packaged.parts)))
    for info, part in zip(listed, packaged.parts, strict=True):
        assert info.epoch == 0 and info.size == len(part.data)
        assert abs(info.duration - part.duration) < 1e-9
        assert abs(info.start - part.start) < 1e-6
        assert store.read_part("abc", info) == part.data
    assert store.epochs("abc") == [0]
    assert store.read_init("abc", 0) == packaged.init
    assert not store.is_finished("abc")
    store.finish("abc")
    assert store.is_finished("abc")
    assert store.resume_point("abc") == (len(packaged.parts), 1)
    assert store.space_ids() == ["abc"]


def test_part_names_carry_exact_metadata() -> None:
    record = PartRecord(42, 3, 23 * 1024 / 48000, 1_790_000_123.456789, b"x" * 10)
    info = parse_part_name(part_name(record, 10))
    assert info is not None
    assert (info.seq, info.epoch, info.size) == (42, 3, 10)
    # The duration survives to the sample: what the recording's timeline is summed from.
    assert round(info.duration * 48000) == 23 * 1024
    assert abs(info.start - record.start) < 1e-6
    for name in ("p0000000001-e00000-n1-d1-t1.m4s.tmp", ".tmp-abcdef", "finished", "../x", "init-e00000.mp4"):
        assert parse_part_name(name) is None


def test_torn_temp_file_and_missing_marker_after_a_crash(tmp_path: Path) -> None:
    """What a kill -9 leaves: a temp file mid-write and no ``finished`` marker. Readers ignore
    the temp file, every acknowledged part is listed, and a resuming writer continues."""
    store = LocalMediaStore(tmp_path / "media")
    written = store_epochs(store, "crashy", [2.0], finish=False)
    directory = store.space_dir("crashy")
    (directory / ".tmp-0123456789ab").write_bytes(written[0].data[:100])  # torn mid-write
    assert [p.seq for p in store.parts("crashy")] == [r.seq for r in written]
    assert not store.is_finished("crashy")
    seq, epoch = store.resume_point("crashy")
    assert (seq, epoch) == (len(written), 1)
    assert not (directory / ".tmp-0123456789ab").exists()  # the resuming writer cleaned it
    more = store_epochs(store, "crashy", [1.0])
    assert more[0].seq == seq and more[0].epoch == 1
    assert [p.seq for p in store.parts("crashy")] == list(range(len(written) + len(more)))
    assert store.epochs("crashy") == [0, 1]
    assert store.is_finished("crashy")


def test_kill_9_mid_write_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """A real writer process killed with SIGKILL while writing parts as fast as it can: every
    part it acknowledged (printed after ``write_part`` returned) is listed and whole."""
    root = tmp_path / "media"
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from townhall.storage.media_store import LocalMediaStore, PartRecord
        store = LocalMediaStore(Path({str(root)!r}))
        store.write_init("victim", 0, b"init")
        seq = 0
        while True:
            store.write_part("victim", PartRecord(seq, 0, 0.49, 1.0 + seq, bytes([seq % 251]) * 40000))
            print(seq, flush=True)
            seq += 1
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO
    ) as proc:
        assert proc.stdout is not None
        acknowledged = -1
        for line in proc.stdout:
            acknowledged = int(line)
            if acknowledged >= 200:
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        rest = proc.stdout.read().split()
        acknowledged = int(rest[-1]) if rest else acknowledged
    store = LocalMediaStore(root)
    listed = store.parts("victim")
    seqs = [p.seq for p in listed]
    assert seqs[: acknowledged + 1] == list(range(acknowledged + 1))
    assert len(seqs) <= acknowledged + 2  # at most the part in flight beyond the acknowledged
    for info in listed:
        assert store.read_part("victim", info) == bytes([info.seq % 251]) * 40000
    assert not store.is_finished("victim")


def test_path_tricks_never_reach_the_filesystem(tmp_path: Path) -> None:
    store = LocalMediaStore(tmp_path / "media")
    (tmp_path / "secret").mkdir()
    for bad in ("..", "../secret", "a/b", "", "a" * 17, "a.b", "%2e%2e"):
        with pytest.raises(MediaStoreError):
            store.parts(bad)
        with pytest.raises(MediaStoreError):
            store.delete_space(bad)
    assert (tmp_path / "secret").is_dir()
    with pytest.raises(MissingMedia):
        store.read_init("nothing", 0)
    with pytest.raises(MissingMedia):
        store.read_init("nothing", -1)
    assert store.parts("nothing") == [] and store.epochs("nothing") == []


def test_delete_space_removes_everything(tmp_path: Path) -> None:
    store = LocalMediaStore(tmp_path / "media")
    store_epochs(store, "gone", [1.0])
    store_epochs(store, "kept", [1.0])
    assert store.delete_space("gone") is True
    assert store.delete_space("gone") is False
    assert store.parts("gone") == [] and not store.has_space("gone")
    assert store.space_ids() == ["kept"]
    assert sorted(os.listdir(tmp_path / "media")) == ["kept"]


def test_range_checks(tmp_path: Path) -> None:
    store = LocalMediaStore(tmp_path / "media")
    with pytest.raises(MediaStoreError):
        store.write_part("s", PartRecord(-1, 0, 0.5, 1.0, b"x"))
    with pytest.raises(MediaStoreError):
        store.write_part("s", PartRecord(0, 0, 0.0, 1.0, b"x"))
    with pytest.raises(MediaStoreError):
        store.write_init("s", 100_000, b"x")
