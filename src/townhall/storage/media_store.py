"""The media store: every space's init segments and parts, written durably as they are made.

Theory of operation
-------------------
- The recording *is* the live parts: the packager writes each init segment and each part here
  before it announces the part to the live origin, and nothing is ever encoded twice.
- One directory per space (``ROOT/{space_id}/``). Every object is one file, written the way a
  crash cannot tear: bytes into a temporary file (``.tmp-*``), ``fsync``, ``rename`` onto the
  final name (atomic), ``fsync`` of the directory (so the new name itself survives a power
  cut). A ``kill -9`` at any instant leaves either the whole object under its final name, or a
  temporary file that every reader ignores (and :meth:`LocalMediaStore.resume_point` removes).
- The directory is the index. A part's metadata is in its file name::

      p{seq:010d}-e{epoch:05d}-n{size}-d{duration_ns}-t{start_us}.m4s

  so listing a space is one ``scandir`` and no ``stat``: a write is acknowledged exactly when
  its name exists, and a name exists only with its whole content (the rename comes after the
  fsync). ``seq`` is the global part number of the space (it continues across restarts);
  ``epoch`` counts packager starts (a crashed space that resumes begins a new epoch: a
  discontinuity, with its own init segment ``init-e{epoch:05d}.mp4``).
- ``finished`` is the durable marker that the packager wrote its last part: the recording is
  complete. A space that ended without it (its packager died) is still served from what is
  on disk.

Methods are synchronous (they run on the packager's worker thread); async callers hop to a
thread with ``asyncio.to_thread`` where the call touches many files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

logger = logging.getLogger(__name__)

_SPACE_ID = re.compile(r"[A-Za-z0-9]{1,16}")
_PART = re.compile(r"p(\d{10})-e(\d{5})-n(\d{1,10})-d(\d{1,15})-t(\d{1,18})\.m4s")
_INIT = re.compile(r"init-e(\d{5})\.mp4")
_TMP_PREFIX = ".tmp-"
FINISHED = "finished"
MAX_EPOCH = 99_999
MAX_SEQ = 9_999_999_999


class MediaStoreError(Exception):
    """A store operation could not be done (unknown object, bad name, corrupt object)."""


class MissingMedia(MediaStoreError):
    """The object asked for is not in the store (never written, or deleted)."""


@dataclasses.dataclass(frozen=True)
class PartRecord:
    """One part to store: ``seq`` is the space's global part number, ``epoch`` the packager
    start it belongs to, ``duration`` in seconds, ``start`` the wall-clock time (epoch seconds)
    of its first sample, ``data`` the ``moof`` + ``mdat`` bytes."""

    seq: int
    epoch: int
    duration: float
    start: float
    data: bytes


class PartInfo(NamedTuple):
    """A stored part's metadata (what :meth:`MediaStore.parts` lists), without its bytes. A
    named tuple, not a dataclass: a 3-hour space lists 22,000 of them per read."""

    seq: int
    epoch: int
    duration: float
    start: float
    size: int
    name: str = ""  # the stored object's name, when it came from a listing


class MediaStore(Protocol):
    """Where recordings live. Local files by default; an object store later (same names)."""

    def write_init(self, space_id: str, epoch: int, data: bytes) -> None: ...

    def write_part(self, space_id: str, record: PartRecord) -> None: ...

    def finish(self, space_id: str) -> None: ...

    def parts(self, space_id: str) -> list[PartInfo]: ...

    def epochs(self, space_id: str) -> list[int]: ...

    def read_init(self, space_id: str, epoch: int) -> bytes: ...

    def read_part(self, space_id: str, info: PartInfo) -> bytes: ...

    def read_parts(self, space_id: str, infos: Sequence[PartInfo]) -> list[bytes]: ...

    def is_finished(self, space_id: str) -> bool: ...

    def finished_token(self, space_id: str) -> tuple[int, int] | None: ...

    def has_space(self, space_id: str) -> bool: ...

    def space_ids(self) -> list[str]: ...

    def resume_point(self, space_id: str) -> tuple[int, int]: ...

    def delete_space(self, space_id: str) -> bool: ...

    def remove_leftovers(self) -> int: ...


def part_name(record: PartRecord | PartInfo, size: int) -> str:
    duration_ns = round(record.duration * 1e9)
    start_us = round(record.start * 1e6)
    return f"p{record.seq:010d}-e{record.epoch:05d}-n{size}-d{duration_ns}-t{start_us}.m4s"


def parse_part_name(name: str) -> PartInfo | None:
    """The metadata in a part's file name, or None for anything else (temp files included)."""
    # str.split rather than the regex on the hot path (a listing parses every name); the regex
    # still has the last word, so nothing the pattern refuses is ever accepted.
    fields = name[1:-4].split("-") if name[:1] == "p" and name[-4:] == ".m4s" else ()
    if len(fields) != 5 or _PART.fullmatch(name) is None:
        return None
    seq, epoch, size, duration, start = fields
    return PartInfo(
        int(seq), int(epoch[1:]), int(duration[1:]) / 1e9, int(start[1:]) / 1e6, int(size[1:]), name
    )


def init_name(epoch: int) -> str:
    return f"init-e{epoch:05d}.mp4"


class LocalMediaStore:
    """Files under ``root`` (``config.data / "media"``), one directory per space."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._root = str(root)

    # -- paths -----------------------------------------------------------------------------------

    def space_dir(self, space_id: str) -> Path:
        """The space's directory; the id is checked first, so no name reaches the filesystem
        outside ``root``."""
        if not _SPACE_ID.fullmatch(space_id):
            raise MediaStoreError(f"invalid space id {space_id!r}")
        return self.root / space_id

    # -- writing (the packager) ------------------------------------------------------------------

    def write_init(self, space_id: str, epoch: int, data: bytes) -> None:
        """Store the init segment (``ftyp`` + ``moov``) of one epoch, durably."""
        if not 0 <= epoch <= MAX_EPOCH:
            raise MediaStoreError(f"epoch {epoch} out of range")
        self._write(self.space_dir(space_id), init_name(epoch), data)

    def write_part(self, space_id: str, record: PartRecord) -> None:
        """Store one part durably: when this returns, the part is on disk and listed."""
        if not 0 <= record.seq <= MAX_SEQ or not 0 <= record.epoch <= MAX_EPOCH:
            raise MediaStoreError(f"part seq {record.seq} / epoch {record.epoch} out of range")
        if not record.duration > 0 or record.start < 0:
            raise MediaStoreError("a part needs a positive duration and a start time")
        self._write(self.space_dir(space_id), part_name(record, len(record.data)), record.data)

    def finish(self, space_id: str) -> None:
        """Mark the recording complete (after the last part), durably."""
        self._write(self.space_dir(space_id), FINISHED, b"")

    def _write(self, directory: Path, name: str, data: bytes) -> None:
        created = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        if created:
            _fsync_dir(directory.parent)  # the space's directory entry itself
        tmp = directory / f"{_TMP_PREFIX}{secrets.token_hex(6)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, directory / name)
        _fsync_dir(directory)

    def resume_point(self, space_id: str) -> tuple[int, int]:
        """Where a (re)starting packager continues: ``(next seq, next epoch)``; ``(0, 0)`` for
        a new space. Torn temporary files of a crashed writer are removed here: call it only
        from the space's one writer, before it writes."""
        directory = self.space_dir(space_id)
        if not directory.is_dir():
            return 0, 0
        next_seq, next_epoch = 0, 0
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith(_TMP_PREFIX):
                    Path(entry.path).unlink(missing_ok=True)
                    continue
                info = parse_part_name(entry.name)
                if info is not None:
                    next_seq = max(next_seq, info.seq + 1)
                    next_epoch = max(next_epoch, info.epoch + 1)
                m = _INIT.fullmatch(entry.name)
                if m is not None:
                    next_epoch = max(next_epoch, int(m.group(1)) + 1)
        return next_seq, next_epoch

    # -- reading (the replay) --------------------------------------------------------------------

    def parts(self, space_id: str) -> list[PartInfo]:
        """Every stored part of a space in ``seq`` order (empty if none). Temporary files are
        ignored; should one ``seq`` be stored twice, the later epoch wins."""
        directory = self.space_dir(space_id)
        by_seq: dict[int, PartInfo] = {}
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    info = parse_part_name(entry.name)
                    if info is None:
                        continue
                    old = by_seq.get(info.seq)
                    if old is None or info.epoch > old.epoch:
                        by_seq[info.seq] = info
        except FileNotFoundError:
            return []
        return [by_seq[seq] for seq in sorted(by_seq)]

    def epochs(self, space_id: str) -> list[int]:
        """The epochs that have an init segment, in order."""
        directory = self.space_dir(space_id)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for name in names if (m := _INIT.fullmatch(name)))

    def read_init(self, space_id: str, epoch: int) -> bytes:
        if not 0 <= epoch <= MAX_EPOCH:
            raise MissingMedia(f"no init segment for epoch {epoch}")
        return self._read(self.space_dir(space_id) / init_name(epoch))

    def read_part(self, space_id: str, info: PartInfo) -> bytes:
        return self.read_parts(space_id, [info])[0]

    def read_parts(self, space_id: str, infos: Sequence[PartInfo]) -> list[bytes]:
        """Several parts' bytes, in order. The space's directory is opened once and each part
        relative to it: a whole 3-hour recording is 22,000 opens, and path resolution and
        pathlib would cost more than the reads."""
        directory = os.open(self.space_dir(space_id), os.O_RDONLY | os.O_DIRECTORY)
        out = []
        try:
            for info in infos:
                name = info.name or part_name(info, info.size)
                if "/" in name or name[:1] != "p":  # a listed name matched the pattern already
                    raise MediaStoreError(f"invalid part name {name!r}")
                try:
                    fd = os.open(name, os.O_RDONLY, dir_fd=directory)
                except FileNotFoundError as exc:
                    raise MissingMedia(f"{name} is not stored") from exc
                try:
                    data = os.read(fd, info.size + 1)
                finally:
                    os.close(fd)
                if len(data) != info.size:
                    raise MediaStoreError(
                        f"part {info.seq} of {space_id} is {len(data)} bytes, not {info.size}"
                    )
                out.append(data)
        finally:
            os.close(directory)
        return out

    def _read(self, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise MissingMedia(f"{path.name} is not stored") from exc

    def is_finished(self, space_id: str) -> bool:
        return (self.space_dir(space_id) / FINISHED).exists()

    def finished_token(self, space_id: str) -> tuple[int, int] | None:
        """Identifies this space's ``finished`` marker (None without one): a cache of the
        finished recording stays valid while the token is the same."""
        try:
            st = os.stat(self.space_dir(space_id) / FINISHED)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    def has_space(self, space_id: str) -> bool:
        return self.space_dir(space_id).is_dir()

    def space_ids(self) -> list[str]:
        """Every space with a directory in the store (for the retention sweep)."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if _SPACE_ID.fullmatch(n) and (self.root / n).is_dir())

    # -- deleting --------------------------------------------------------------------------------

    def delete_space(self, space_id: str) -> bool:
        """Remove everything of a space; False if there was nothing. The directory is first
        renamed aside (atomic), so a reader never sees half a recording."""
        directory = self.space_dir(space_id)
        if not directory.exists():
            return False
        doomed = self.root / f"{_TMP_PREFIX}deleted-{space_id}-{secrets.token_hex(4)}"
        try:
            os.replace(directory, doomed)
        except FileNotFoundError:
            return False
        _fsync_dir(self.root)
        shutil.rmtree(doomed, ignore_errors=True)
        logger.info("media deleted", extra={"space": space_id})
        return True

    def remove_leftovers(self) -> int:
        """Remove what an interrupted :meth:`delete_space` left aside (a crash mid-``rmtree``)."""
        removed = 0
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if entry.name.startswith(f"{_TMP_PREFIX}deleted-") and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed += 1
        return removed


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
