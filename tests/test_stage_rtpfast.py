"""The stage's RTP beside aiortc (``stage/rtpfast.py``), with real aiortc peers over loopback in
this process: a speaker's packets reach the mixer through ``InboundBypass`` (its socket read at
the tick, out of the event loop's selector), a return goes out through ``OutboundBypass``, and
what the listening aiortc client decodes is still the speaker's tone."""

from __future__ import annotations

import asyncio
import struct

import aioice
import av
import numpy as np
import pylibsrtp
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from townhall.stage.ice import restrict_host_addresses
from townhall.stage.room import MixTrack, Peer, Room
from townhall.stage.rtpfast import InboundBypass
from townhall.stage.sources import ToneTrack, tone_power

RATE = 48000
TONE = 440.0


async def _connect(offerer: RTCPeerConnection, answerer: RTCPeerConnection) -> None:
    await offerer.setLocalDescription(await offerer.createOffer())
    await answerer.setRemoteDescription(offerer.localDescription)
    await answerer.setLocalDescription(await answerer.createAnswer())
    await offerer.setRemoteDescription(RTCSessionDescription(answerer.localDescription.sdp, "answer"))


async def _record(track: MediaStreamTrack, seconds: float) -> np.ndarray:
    chunks = []
    got = 0
    while got < seconds * RATE:
        frame = await asyncio.wait_for(track.recv(), 5)
        assert isinstance(frame, av.AudioFrame)
        samples = frame.to_ndarray()
        mono = samples.reshape(-1, frame.layout.nb_channels)[:, 0] if frame.format.is_packed else samples[0]
        chunks.append(mono.astype(np.int16))
        got += len(mono)
    return np.concatenate(chunks)


def test_a_speaker_and_a_return_bypass_aiortcs_packet_path_and_stay_audio() -> None:
    restrict_host_addresses(["127.0.0.1"])

    async def scenario() -> tuple[np.ndarray, dict[str, object]]:
        room = Room("rtpfast")
        # The speaker: an aiortc client publishing a tone to the stage's peer connection.
        speaker = RTCPeerConnection()
        speaker.addTrack(ToneTrack(TONE))
        whip = Peer(RTCPeerConnection(), "whip", "a1", None)
        room.register(whip)

        @whip.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            receiver = next(t.receiver for t in whip.pc.getTransceivers() if t.receiver.track is track)
            room.add_speaker(whip, track, muted=False, receiver=receiver)

        await _connect(speaker, whip.pc)
        # A listener: the program (everyone but "a2", who is not on stage) back to a client.
        whep = Peer(RTCPeerConnection(), "whep", "a2", None)
        track = room.add_listener(whep)
        whep.pc.addTransceiver(track, direction="sendonly")
        listener = RTCPeerConnection()
        listener.addTransceiver("audio", direction="recvonly")
        heard: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()
        listener.on("track", lambda t: heard.set_result(t))
        await _connect(listener, whep.pc)
        try:
            remote = await asyncio.wait_for(heard, 10)
            await _record(remote, 1.0)  # set-up and the jitter buffers filling
            recording = await _record(remote, 1.0)
            decoding = room._inbound[whip.id]
            assert isinstance(track, MixTrack)
            facts: dict[str, object] = {
                "inbound": decoding.bypass is not None and decoding.bypass.packets,
                "polled": decoding.bypass is not None and decoding.bypass._polled is not None,
                "outbound": track.bypass is not None and track.bypass.sent,
                "packed": track.bypass is not None and track.bypass._template is not None,
                "sender_counted": getattr(whep.pc.getTransceivers()[0].sender, "_RTCRtpSender__packet_count"),
            }
            return recording, facts
        finally:
            for pc in (speaker, listener):
                await pc.close()
            await room.close()

    recording, facts = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert facts["inbound"], facts  # packets reached the mixer through the bypass
    assert facts["polled"], facts  # the speaker's socket is read at the tick
    assert facts["outbound"], facts  # the return was sent by the room, not aiortc's sender task
    assert facts["sender_counted"] == facts["outbound"], facts  # RTCP sender reports count them
    assert facts["packed"], facts  # the MID-only header is packed, not built through RtpPacket
    assert tone_power(recording, RATE, TONE) > 0.5, "the speaker's tone is what the listener hears"


def _srtp_pair() -> tuple[pylibsrtp.Session, pylibsrtp.Session]:
    key = bytes(range(30))  # AES-CM-128 key (16) + salt (14), as DTLS-SRTP derives them
    tx = pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND)
    rx = pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND)
    return pylibsrtp.Session(tx), pylibsrtp.Session(rx)


def _rtp(
    seq: int, payload: bytes, *, pt: int = 111, csrcs: int = 0, extension: bytes = b"", padding: int = 0
) -> bytes:
    first = 0x80 | csrcs | (0x10 if extension else 0) | (0x20 if padding else 0)
    header = struct.pack("!BBHII", first, pt, seq, seq * 960, 0x1234) + bytes(4 * csrcs)
    if extension:
        header += b"\xbe\xde" + struct.pack("!H", len(extension) // 4) + extension
    return header + payload + (bytes(padding - 1) + bytes([padding]) if padding else b"")


def test_inbound_bypass_takes_payloads_in_order_and_leaves_the_rest_to_aioice() -> None:
    tx, rx = _srtp_pair()
    conn = aioice.Connection(ice_controlling=False)
    got: list[bytes] = []
    bypass = InboundBypass(conn, rx, 111, got.append)
    conn.data_received(tx.protect(_rtp(10, b"plain")), 1)
    conn.data_received(tx.protect(_rtp(12, b"with csrcs", csrcs=2)), 1)  # 11 is late (below)
    conn.data_received(tx.protect(_rtp(13, b"with extension", extension=b"\x10\x30\x00\x00")), 1)
    conn.data_received(tx.protect(_rtp(14, b"with padding", padding=4)), 1)
    conn.data_received(tx.protect(_rtp(11, b"late")), 1)  # older than one already taken
    conn.data_received(tx.protect(_rtp(15, b"other type", pt=96)), 1)  # not the negotiated type
    conn.data_received(tx.protect(_rtp(0, b"far behind")), 1)  # 14 -> 0: behind, not a wrap
    conn.data_received(tx.protect(_rtp(16, b"after")), 1)
    assert got == [b"plain", b"with csrcs", b"with extension", b"with padding", b"after"]
    assert bypass.late == 2
    # What is not RTP (here DTLS-looking bytes) still reaches aioice's queue, as before.
    conn.data_received(b"\x16\xfe\xfd" + bytes(20), 1)
    assert conn._queue.qsize() == 1
    bypass.remove()
    assert "data_received" not in vars(conn)


def test_inbound_bypass_follows_the_sequence_across_its_wrap() -> None:
    tx, rx = _srtp_pair()
    conn = aioice.Connection(ice_controlling=False)
    got: list[bytes] = []
    InboundBypass(conn, rx, 111, got.append)
    for seq in (65534, 65535, 0, 1):
        conn.data_received(tx.protect(_rtp(seq, seq.to_bytes(2, "big"))), 1)
    assert got == [b"\xff\xfe", b"\xff\xff", b"\x00\x00", b"\x00\x01"]
