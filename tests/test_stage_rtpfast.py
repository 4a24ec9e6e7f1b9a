"""The stage's RTP beside aiortc (``stage/rtpfast.py``), with real aiortc peers over loopback in
this process: a speaker's packets reach the mixer through ``InboundBypass`` (its socket read at
the tick, out of the event loop's selector), a return goes out through ``OutboundBypass``, and
what the listening aiortc client decodes is still the speaker's tone."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import Any

import aioice
import av
import numpy as np
import pylibsrtp
from aioice.candidate import Candidate
from aioice.ice import CandidatePair, StunProtocol
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from aiortc.rtp import RtpPacket

from townhall.stage.ice import restrict_host_addresses
from townhall.stage.room import InlineDecoding, MixTrack, Peer, Room
from townhall.stage.rtpfast import MAX_MISORDER, InboundBypass, in_order
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
            # Dropping the speaker gives its socket back to aiortc's path at once.
            bypass = decoding.bypass
            assert bypass is not None and bypass._polled is not None
            conn = bypass._conn
            await room.drop(whip.id)
            facts["released"] = (
                decoding.bypass is None and bypass._polled is None and "data_received" not in vars(conn)
            )
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
    assert facts["released"], facts  # drop() gave the socket back and unhooked the connection
    assert tone_power(recording, RATE, TONE) > 0.5, "the speaker's tone is what the listener hears"


def _srtp_pair() -> tuple[pylibsrtp.Session, pylibsrtp.Session]:
    key = bytes(range(30))  # AES-CM-128 key (16) + salt (14), as DTLS-SRTP derives them
    tx = pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND)
    rx = pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND)
    return pylibsrtp.Session(tx), pylibsrtp.Session(rx)


def _rtp(
    seq: int,
    payload: bytes,
    *,
    pt: int = 111,
    csrcs: int = 0,
    extension: bytes = b"",
    padding: int = 0,
    ssrc: int = 0x1234,
) -> bytes:
    first = 0x80 | csrcs | (0x10 if extension else 0) | (0x20 if padding else 0)
    header = struct.pack("!BBHII", first, pt, seq, seq * 960, ssrc) + bytes(4 * csrcs)
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


def test_the_order_rule_takes_ahead_drops_a_little_behind_and_follows_a_restart() -> None:
    assert in_order(None, 5)
    assert in_order(10, 11) and in_order(65535, 0) and in_order(10, 10 + 0x7FFF)
    assert not in_order(10, 10)  # a duplicate
    assert not in_order(10, 9) and not in_order(0, 65535)  # a little behind (across the wrap too)
    assert not in_order(5000, 5000 - MAX_MISORDER)
    assert in_order(5000, 5000 - MAX_MISORDER - 1)  # far behind: the sender restarted its sequence
    assert in_order(100, (100 - 20000) & 0xFFFF)


def test_a_speaker_whose_ssrc_changes_is_followed_from_its_new_sequence() -> None:
    # A restarted sender: a new SSRC and a new random sequence, here behind the old one by less
    # than half the space, which looked "late" until it passed the old one (minutes of silence).
    tx, rx = _srtp_pair()
    conn = aioice.Connection(ice_controlling=False)
    got: list[bytes] = []
    bypass = InboundBypass(conn, rx, 111, got.append)
    for seq in range(30000, 30010):
        conn.data_received(tx.protect(_rtp(seq, b"old")), 1)
    for seq in range(29990, 30040):
        conn.data_received(tx.protect(_rtp(seq, b"new", ssrc=0x9999)), 1)
    assert got == [b"old"] * 10 + [b"new"] * 50
    assert bypass.late == 0
    conn.data_received(tx.protect(_rtp(30041, b"ahead", ssrc=0x9999)), 1)
    conn.data_received(tx.protect(_rtp(30040, b"late", ssrc=0x9999)), 1)  # still late in the new one
    assert got[-1] == b"ahead" and len(got) == 61 and bypass.late == 1


def _junk() -> list[bytes]:
    """Datagrams anyone who reaches a speaker's ICE port could send."""
    fingerprint = struct.pack("!HH", 0x8028, 1) + b"\0" + bytes(3)  # a FINGERPRINT 1 byte long
    stun = struct.pack("!HHI12s", 0x0001, len(fingerprint), 0x2112A442, bytes(12)) + fingerprint
    return [
        b"",
        b"\x80",
        b"\x80" + bytes(10),  # 11 bytes: shorter than an RTP header
        struct.pack("!BBHII", 0x80, 111, 7, 7 * 960, 0x1234) + bytes(20),  # RTP failing SRTP
        struct.pack("!BBHII", 0x80, 111, 8, 8 * 960, 0x1234),  # a bare header
        stun,  # STUN-looking, which aioice's parser fails on with struct.error
        bytes(range(256)) * 4,
    ]


def test_junk_datagrams_reach_the_bypass_without_raising() -> None:
    tx, rx = _srtp_pair()
    conn = aioice.Connection(ice_controlling=False)
    got: list[bytes] = []
    bypass = InboundBypass(conn, rx, 111, got.append)
    for data in _junk():
        bypass._data_received(data, 1)
        conn.data_received(data, 1)
    conn.data_received(tx.protect(_rtp(1, b"after")), 1)
    assert got == [b"after"]


async def _polled_bypass(
    rx: pylibsrtp.Session, on_payload: Callable[[bytes], None]
) -> tuple[InboundBypass, int, Any]:
    """A bypass on a real UDP socket of aioice's, read by ``poll`` as in a room."""
    loop = asyncio.get_running_loop()
    conn = aioice.Connection(ice_controlling=False)
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: StunProtocol(conn), local_addr=("127.0.0.1", 0)
    )
    port = transport.get_extra_info("sockname")[1]
    protocol.local_candidate = Candidate("1", 1, "udp", 1, "127.0.0.1", port, "host")
    conn._nominated[1] = CandidatePair(protocol, Candidate("2", 1, "udp", 1, "127.0.0.1", 9, "host"))
    bypass = InboundBypass(conn, rx, 111, on_payload)
    assert bypass._polled is not None
    return bypass, port, transport


def test_junk_on_a_polled_socket_never_raises_out_of_poll() -> None:
    async def scenario() -> tuple[list[bytes], int]:
        tx, rx = _srtp_pair()
        got: list[bytes] = []
        bypass, port, transport = await _polled_bypass(rx, got.append)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for data in _junk():
                sock.sendto(data, ("127.0.0.1", port))
            sock.sendto(tx.protect(_rtp(1, b"after the junk")), ("127.0.0.1", port))
            await asyncio.sleep(0.05)
            bypass.poll()
        bypass.remove()
        transport.close()
        return got, bypass.errors.count

    got, errors = asyncio.run(scenario())
    assert got == [b"after the junk"]  # read past the junk in the same poll
    assert errors == 1  # the STUN-looking one, which aioice's own parser raises on


def test_a_room_still_mixes_its_other_speakers_while_one_speakers_socket_gets_junk() -> None:
    async def scenario() -> tuple[int, int]:
        _, rx = _srtp_pair()
        room = Room("junk")
        room.mixer.add_speaker("a1")
        room.mixer.add_speaker("a2")
        decoding = InlineDecoding(lambda frames: [room.mixer.push("a1", f, room.now()) for f in frames])
        bypass, port, transport = await _polled_bypass(rx, decoding._payload)
        decoding.bypass = bypass
        room._inbound["p1"] = decoding
        tone = (np.sin(np.arange(960) * 2 * np.pi * TONE / RATE) * 8000).astype(np.int16)
        mixed = 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for n in range(50):  # a second of empty datagrams, as an attacker would send them
                sock.sendto(b"", ("127.0.0.1", port))
                sock.sendto(_junk()[n % len(_junk())], ("127.0.0.1", port))
                room.mixer.push("a2", tone, room.now())
                await asyncio.sleep(0.002)
                room.tick(room.now(), 0.0)
                mixed += room.last_mixed.get("a2", 0.0) > 0
                room.last_mixed.clear()
        bypass.remove()
        transport.close()
        await room.close()
        return mixed, room.poll_errors.count

    mixed, poll_errors = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert mixed >= 45, mixed  # every tick mixed a2 (but the jitter buffer's prefill)
    assert poll_errors == 0  # the junk was handled inside the speaker's poll


def test_a_return_packet_is_the_bytes_aiortc_would_have_built() -> None:
    restrict_host_addresses(["127.0.0.1"])

    async def scenario() -> tuple[list[tuple[bytes, bytes]], dict[str, object]]:
        # A return as the stage makes it: a MixTrack, whose first ``recv`` installs the bypass
        # (aiortc's sender task then never sends a packet of its own).
        sending, receiving = RTCPeerConnection(), RTCPeerConnection()
        track = MixTrack(sending)
        transceiver = sending.addTransceiver(track, direction="sendonly")
        receiving.addTransceiver("audio", direction="recvonly")
        await _connect(sending, receiving)
        try:
            for _ in range(200):
                if track.bypass is not None:
                    break
                await asyncio.sleep(0.05)
            bypass = track.bypass
            assert bypass is not None and bypass._template is not None
            pairs = []
            payload = b"opus" * 20
            for seq, timestamp in ((0, 0), (65534, 2**32 - 960), (65535, 2**32 - 1), (1234, 5678)):
                bypass._seq, bypass._timestamp = seq, timestamp
                packet = RtpPacket(bypass._pt, marker=1, sequence_number=seq, timestamp=timestamp)
                packet.ssrc = bypass._ssrc
                packet.payload = payload
                packet.extensions.mid = bypass._mid
                pairs.append((bypass.packet(payload, 0), packet.serialize(bypass._extensions)))
                template, bypass._template = bypass._template, None  # the RtpPacket fallback
                pairs.append((bypass.packet(payload, 0), packet.serialize(bypass._extensions)))
                bypass._template = template
            # Sending moves the sequence and the timestamp on across their wraps, and keeps the
            # counters of aiortc's RTCP sender reports.
            bypass._seq, bypass._timestamp = 65534, 2**32 - 960
            sent = [bypass.send(payload, 960) for _ in range(3)]
            sender = transceiver.sender
            facts: dict[str, object] = {
                "sent": sent,
                "next": (bypass._seq, bypass._timestamp),
                "rtp_timestamp": getattr(sender, "_RTCRtpSender__rtp_timestamp"),
                "packets": getattr(sender, "_RTCRtpSender__packet_count"),
                "octets": getattr(sender, "_RTCRtpSender__octet_count"),
            }
            return pairs, facts
        finally:
            await sending.close()
            await receiving.close()

    pairs, facts = asyncio.run(asyncio.wait_for(scenario(), 30))
    for packed, built in pairs:
        assert packed == built
    assert facts["sent"] == [True] * 3
    assert facts["next"] == (1, 960 * 2), facts
    assert facts["rtp_timestamp"] == 960, facts  # the last packet's
    assert facts["packets"] == 3 and facts["octets"] == 3 * 80, facts


def test_a_return_that_fails_to_send_costs_the_other_returns_nothing() -> None:
    """The tick's delivery: one return whose packet cannot be protected (as SRTP refuses it)
    is counted and logged, and every other return of the tick still gets its packet."""
    from townhall.stage import room as room_module

    class Refusing:
        def send(self, payload: bytes, samples: int) -> bool:
            raise pylibsrtp.Error("protect failed")

    async def scenario() -> tuple[int, int, int]:
        first, failing, last = MixTrack(), MixTrack(), MixTrack()
        failing.bypass = Refusing()  # type: ignore[assignment]
        packet = av.Packet(b"\xfc" * 10)
        before = room_module._DELIVERY_FAILED.count
        room_module._deliver([(first, packet), (failing, packet), (last, packet)])
        return first.queue.qsize(), last.queue.qsize(), room_module._DELIVERY_FAILED.count - before

    assert asyncio.run(scenario()) == (1, 1, 1)
