"""Just enough ISO BMFF (ISO/IEC 14496-12) to cut a fragmented MP4 stream into CMAF pieces
(pure): the init segment (``ftyp`` + ``moov``) and one part per ``moof`` + ``mdat``."""

from __future__ import annotations

import dataclasses
import struct

CONTAINERS = {b"moof", b"traf", b"moov", b"trak", b"mdia", b"minf", b"stbl", b"mvex"}


@dataclasses.dataclass(frozen=True)
class Box:
    type: bytes
    data: bytes  # the whole box, header included

    @property
    def payload(self) -> bytes:
        size = struct.unpack(">I", self.data[:4])[0]
        return self.data[16:] if size == 1 else self.data[8:]


class BoxReader:
    """Feed bytes as the muxer writes them; take whole top-level boxes out."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Box]:
        self._buffer += data
        out = []
        while len(self._buffer) >= 8:
            size = struct.unpack(">I", self._buffer[:4])[0]
            if size == 1:
                if len(self._buffer) < 16:
                    break
                size = struct.unpack(">Q", self._buffer[8:16])[0]
            if size < 8:
                raise ValueError(f"invalid box size {size}")
            if len(self._buffer) < size:
                break
            out.append(Box(bytes(self._buffer[4:8]), bytes(self._buffer[:size])))
            del self._buffer[:size]
        return out


def children(payload: bytes) -> list[Box]:
    return BoxReader().feed(payload)


def find(box: Box, path: list[bytes]) -> Box | None:
    if not path:
        return box
    for child in children(box.payload):
        if child.type == path[0]:
            return find(child, path[1:])
    return None


def sample_count(moof: Box) -> int:
    """Samples in a fragment: the ``trun`` sample_count of its track (§8.8.8)."""
    trun = find(moof, [b"traf", b"trun"])
    if trun is None:
        raise ValueError("moof without traf/trun")
    return int(struct.unpack(">I", trun.payload[4:8])[0])


def base_decode_time(moof: Box) -> int:
    """The fragment's first sample time in the track timescale (``tfdt``, §8.8.12)."""
    tfdt = find(moof, [b"traf", b"tfdt"])
    if tfdt is None:
        raise ValueError("moof without traf/tfdt")
    version = tfdt.payload[0]
    if version == 1:
        return int(struct.unpack(">Q", tfdt.payload[4:12])[0])
    return int(struct.unpack(">I", tfdt.payload[4:8])[0])
