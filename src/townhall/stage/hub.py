"""The stages of all spaces on a node, inside the stage process: rooms, peers and packagers.

Everything here runs in the stage process (``stage/worker.py``), never in the process that
serves HTTP: the node asks for a WHIP or WHEP session, a mute, a revocation or the end of a
space through the channel (``stage/channel.py``), and hears back about encoded parts, levels,
closed peers and tick lateness. The WebRTC negotiation (SDP offer to answer) happens here, next
to the peer connections it creates. Every part the packager makes is written durably to the
media store (the recording) before the node hears of it (the live origin).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.rtcrtpreceiver import RemoteStreamTrack

from townhall.audience.packager import Packager, PackagerThread, PartReady
from townhall.stage.channel import StageError
from townhall.stage.room import Peer, Room, StageClock
from townhall.stage.threads import below_the_loop
from townhall.storage.media_store import MediaStore, PartRecord

logger = logging.getLogger(__name__)

# notify(op, payload, **fields): a message to the node.
Notify = Callable[..., None]


class StageHub:
    def __init__(
        self, notify: Notify, store: MediaStore, ice_servers: list[str], part_target: float, bitrate: int
    ) -> None:
        self.notify = notify
        self.store = store
        self.rooms: dict[str, Room] = {}
        self.packagers: dict[str, Packager] = {}
        self.part_target = part_target
        self.bitrate = bitrate
        self._ice = [RTCIceServer(urls=u) for u in ice_servers]
        self.clock = StageClock()  # one 20 ms clock and encoder thread for every room
        # One AAC/fMP4 thread for every space's packager, a real-time priority below the loop.
        self.packaging = PackagerThread(on_start=below_the_loop)

    # -- rooms ---------------------------------------------------------------------------------

    def room(self, space_id: str) -> Room:
        """The space's room, created (with its packager and clock) on first use."""
        room = self.rooms.get(space_id)
        if room is None:
            room = self.rooms[space_id] = Room(space_id, self.clock)
            loop = asyncio.get_running_loop()
            # A space that ran before (a restart of this process or of the node) continues its
            # part numbering in a new epoch: a discontinuity, nothing overwritten.
            seq, epoch = self.store.resume_point(space_id)
            numbering = itertools.count(seq)

            # Both run on the packager's thread: the fsync waits there, never on the clock.
            def on_init(data: bytes) -> None:
                self.store.write_init(space_id, epoch, data)
                loop.call_soon_threadsafe(functools.partial(self.notify, "init", data, space=space_id))

            def on_part(part: PartReady) -> None:
                n = next(numbering)
                self.store.write_part(space_id, PartRecord(n, epoch, part.duration, part.start, part.data))
                note = functools.partial(
                    self.notify,
                    "part",
                    part.data,
                    space=space_id,
                    duration=part.duration,
                    start=part.start,
                    seq=n,
                    epoch=epoch,
                )
                loop.call_soon_threadsafe(note)  # announced only once it is durable

            packager = self.packagers[space_id] = Packager(
                space_id,
                on_init=on_init,
                on_part=on_part,
                bitrate=self.bitrate,
                part_target=self.part_target,
                thread=self.packaging,
            )
            room.program_sinks.append(lambda out: packager.feed(out.program, time.time()))
            room.on_peer_closed = lambda peer: self.notify("peer_closed", space=space_id, peer=peer.id)
            room.ensure_running()
        return room

    async def end(self, space_id: str, *, finished: bool = True) -> None:
        """Close the room and flush its packager: the last part is out before this returns.
        ``finished`` marks the recording complete (the space ended); a node going down
        mid-space leaves it unmarked, for the node that resumes it."""
        room = self.rooms.pop(space_id, None)
        if room is not None:
            await room.close()
        packager = self.packagers.pop(space_id, None)
        if packager is not None:
            await asyncio.to_thread(packager.close)
            if finished:
                await asyncio.to_thread(self.store.finish, space_id)

    async def close(self) -> None:
        """The node is going away (or died): every part in flight is flushed to the store,
        no recording is marked finished."""
        for space_id in list(self.rooms):
            await self.end(space_id, finished=False)
        await self.clock.close()
        await asyncio.to_thread(self.packaging.stop)

    # -- sessions ------------------------------------------------------------------------------

    def _peer_connection(self) -> RTCPeerConnection:
        return RTCPeerConnection(RTCConfiguration(iceServers=self._ice))

    async def open_whip(self, space_id: str, speaker: str, grant_id: str, muted: bool, sdp: str) -> Peer:
        room = self.room(space_id)
        peer = Peer(self._peer_connection(), "whip", speaker, grant_id)

        @peer.pc.on("track")
        def on_track(track: RemoteStreamTrack) -> None:
            if track.kind == "audio":
                receiver = next(
                    (t.receiver for t in peer.pc.getTransceivers() if t.receiver.track is track), None
                )
                room.add_speaker(peer, track, muted=muted, receiver=receiver)

        room.register(peer)
        await self._negotiate(room, peer, sdp)
        return peer

    async def open_whep(self, space_id: str, who: str, grant_id: str, sdp: str) -> Peer:
        room = self.room(space_id)
        peer = Peer(self._peer_connection(), "whep", who, grant_id)
        track = room.add_listener(peer)
        transceiver = peer.pc.addTransceiver(track, direction="sendonly")
        # The room hands the sender Opus packets (see ``MixTrack``): Opus is the only codec to
        # answer with (the route has checked that the offer carries it).
        transceiver.setCodecPreferences(
            [c for c in RTCRtpSender.getCapabilities("audio").codecs if c.mimeType.lower() == "audio/opus"]
        )
        await self._negotiate(room, peer, sdp)
        return peer

    async def _negotiate(self, room: Room, peer: Peer, sdp: str) -> None:
        """Answer the offer (full ICE gathering, no trickle); a refused offer leaves the room.
        A peer whose network drops (no DELETE) is removed when ICE gives up."""

        @peer.pc.on("connectionstatechange")
        async def changed() -> None:
            if peer.pc.connectionState in ("failed", "closed"):
                await room.drop(peer.id)

        try:
            await peer.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            await peer.pc.setLocalDescription(await peer.pc.createAnswer())
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            await room.drop(peer.id)
            raise StageError(400, "malformed_sdp", f"the SDP offer was refused: {exc}") from exc
        logger.info(
            "stage session",
            extra={"space": room.space_id, "peer": peer.id, "kind": peer.kind, "speaker": peer.speaker},
        )

    async def drop(self, space_id: str, peer_id: str) -> bool:
        room = self.rooms.get(space_id)
        return room is not None and await room.drop(peer_id)

    def mute(self, space_id: str, speaker: str, muted: bool) -> None:
        room = self.rooms.get(space_id)
        if room is not None:
            room.set_muted(speaker, muted)

    async def revoke(self, grant_id: str) -> None:
        for room in list(self.rooms.values()):
            await room.drop_grant(grant_id)

    # -- what the node is told -----------------------------------------------------------------

    def levels(self) -> dict[str, dict[str, float]]:
        """Per space, each speaker's peak level since the last call (``Room.take_levels``)."""
        return {space_id: room.take_levels() for space_id, room in self.rooms.items()}

    def stats(self) -> dict[str, Any]:
        """Per room: peers, tick lateness quantiles over the last 10 minutes (to 0.1 ms below
        50 ms; see ``stage/lateness.py``), counts of late ticks, ticks, and when each speaker was
        last mixed in (wall clock) — the evidence that a mute took effect."""
        rooms: dict[str, Any] = {}
        for space_id, room in self.rooms.items():
            packager = self.packagers.get(space_id)
            rooms[space_id] = {
                "peers": {p.id: [p.kind, p.speaker, p.grant_id] for p in room.peers.values()},
                "lateness": {str(q): room.lateness.quantile(q) for q in (0.5, 0.99, 1.0)},
                # Since the room started: ticks later than each threshold (seconds).
                "late_ticks": {str(t): n for t, n in room.lateness.late.items()},
                "ticks": room.mixer.ticks,
                "last_mixed": dict(room.last_mixed),
                "packager_dropped": packager.dropped if packager else 0,
                "encoder_dropped": room.encoder_dropped,
            }
        return {"at": time.time(), "rooms": rooms}
