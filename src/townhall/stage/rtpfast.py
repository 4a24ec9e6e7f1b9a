"""Speakers' and listeners' RTP beside aiortc's per-packet Python path, once DTLS-SRTP is up.

aiortc stays the signalling, ICE, DTLS and RTCP stack; what is bypassed is the path of every
20 ms media packet, which cost the stage more than the mixing and the codecs together:

- In (a WHIP speaker): aioice puts each datagram on an ``asyncio.Queue``; the DTLS transport's
  task wakes, unprotects, parses the RTP packet into objects, routes it to the receiver, which
  keeps statistics, runs a jitter buffer that holds every packet until the next one arrives
  (20 ms), and hands the frame to our ``InlineDecoding``. ``InboundBypass`` takes the datagram
  where aioice hands it over (``Connection.data_received``, a plain call from the socket's
  callback): an RTP packet of the negotiated payload type is unprotected with the transport's
  own SRTP session, its header skipped and its payload given to the decoder, on the spot;
  everything else (DTLS, SRTCP, anything unexpected) goes the usual way.
- Out (a WHEP return): the encoded packet went on the track's ``asyncio.Queue``, woke the
  sender's task, which built an ``RtpPacket``, serialised, protected it and awaited two
  coroutines down to ``sendto``. ``OutboundBypass`` does the same work in one plain call per
  packet from the tick's delivery (one loop callback for all returns of the tick), with the
  sender's own SSRC, MID and header-extension map, and keeps the counters aiortc's RTCP
  sender reports are made of.

Both depend on aiortc's and aioice's private layout (aiortc 1.9-1.16, aioice 0.9-0.13):
``install`` checks every attribute it uses and returns None where it does not match, and the
stage then uses aiortc's path as before. What is given up: the receiver's statistics (its RTCP
receiver reports and ``getStats`` stop counting inbound packets once bypassed), the RTP history
for NACK retransmission of returns (aiortc negotiates no NACK for audio), and reordering (a
packet older than the last one taken is dropped as late: the mixer's jitter buffer conceals it;
a new SSRC or a sequence more than ``MAX_MISORDER`` behind is a restarted sender, followed).
Nothing a datagram holds raises out of ``InboundBypass.poll``, so junk sent to a speaker's port
cannot skip a room's tick.
"""

from __future__ import annotations

import logging
import secrets
import struct
import time
from collections.abc import Callable
from typing import Any

import pylibsrtp
from aiortc.rtp import RtpPacket

logger = logging.getLogger(__name__)

NTP_EPOCH = 2208988800  # seconds from 1900 (NTP) to 1970 (Unix)
POLL_LIMIT = 64  # datagrams read from one speaker's socket per tick at most (50 packets/s normal)
RECV_SIZE = 65536  # what asyncio's datagram transport reads at most
HEADER = struct.Struct("!BBHII")  # RTP: V/P/X/CC, M/PT, sequence number, timestamp, SSRC
MAX_MISORDER = 1000  # a sequence this far behind the last taken is a restarted sender, not late
LOG_INTERVAL = 60.0  # seconds between two log lines about the same recurring failure


def _ntp_now() -> int:
    """The wall clock as a 64-bit NTP timestamp (as aiortc's ``clock.current_ntp_time``)."""
    t = time.time() + NTP_EPOCH
    seconds = int(t)
    return (seconds << 32) | int((t - seconds) * (1 << 32))


def in_order(last: int | None, seq: int) -> bool:
    """Whether an RTP packet numbered ``seq`` is to be taken after one numbered ``last``.

    Ahead (modulo 2^16, up to half the space) is taken; a duplicate or a packet a little behind
    is late (the mixer's jitter buffer conceals it); a packet more than ``MAX_MISORDER`` behind
    is a sender that restarted its sequence, which is followed from there (as aiortc's jitter
    buffer resets on a large jump) instead of muted until it overtakes the old one."""
    if last is None:
        return True
    ahead = (seq - last) & 0xFFFF
    return 0 < ahead < 0x8000 or (ahead >= 0x8000 and 0x10000 - ahead > MAX_MISORDER)


class ErrorLog:
    """A failure that may recur on every packet or tick, logged with its traceback at most once
    per ``interval`` seconds (with how many happened since), never once per packet."""

    def __init__(self, message: str, interval: float = LOG_INTERVAL) -> None:
        self._message = message
        self._interval = interval
        self._last = -interval
        self.count = 0
        self._unlogged = 0

    def report(self, **extra: Any) -> None:
        """Call from an ``except`` block."""
        self.count += 1
        self._unlogged += 1
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            logger.warning(
                "%s (%d since the last report)", self._message, self._unlogged, exc_info=True, extra=extra
            )
            self._unlogged = 0


def _connection(dtls: Any) -> Any:
    """The aioice ``Connection`` under an ``RTCDtlsTransport``, or None."""
    ice = getattr(dtls, "transport", None)
    conn = getattr(ice, "_connection", None)
    if conn is None or not callable(getattr(conn, "data_received", None)):
        return None
    if not isinstance(getattr(conn, "_nominated", None), dict):
        return None
    return conn


class InboundBypass:
    """A WHIP session's RTP payloads of ``payload_type`` straight from the ICE connection."""

    def __init__(
        self, conn: Any, srtp: pylibsrtp.Session, payload_type: int, on_payload: Callable[[bytes], None]
    ):
        self._conn = conn
        self._srtp = srtp
        self._pt = payload_type
        self._on_payload = on_payload
        self._original = conn.data_received
        self._last_seq: int | None = None
        self._last_ssrc = b""
        self.packets = 0
        self.late = 0
        self.errors = ErrorLog("a speaker's datagram could not be handled")
        conn.data_received = self._data_received  # an instance attribute: shadows the method
        # The socket is read on the mixer's tick, not whenever a datagram lands (see ``poll``).
        self._polled: tuple[Any, Any, Any] | None = None
        pair = conn._nominated.get(1)
        protocol = getattr(pair, "protocol", None)
        transport = getattr(protocol, "transport", None)
        sock = getattr(transport, "_sock", None)
        if transport is not None and sock is not None and callable(getattr(transport, "pause_reading", None)):
            transport.pause_reading()
            self._polled = (transport, sock, protocol)

    @classmethod
    def install(
        cls, receiver: Any, payload_type: int, on_payload: Callable[[bytes], None]
    ) -> InboundBypass | None:
        """Bypass ``receiver``'s transport for RTP of ``payload_type`` (its DTLS is up), or None
        where the layout is not the one this was written against."""
        dtls = getattr(receiver, "transport", None)
        srtp = getattr(dtls, "_rx_srtp", None)
        conn = _connection(dtls)
        if (
            not isinstance(srtp, pylibsrtp.Session)
            or conn is None
            or getattr(dtls, "state", None) != "connected"
        ):
            return None
        if "data_received" in vars(conn):  # already bypassed (or patched by someone else)
            return None
        return cls(conn, srtp, payload_type, on_payload)

    def remove(self) -> None:
        if vars(self._conn).get("data_received") == self._data_received:
            del self._conn.data_received
        if self._polled is not None:
            transport = self._polled[0]
            self._polled = None
            if not transport.is_closing():
                transport.resume_reading()

    def poll(self, limit: int = POLL_LIMIT) -> None:
        """Read what the speaker's socket holds (called by the room just before each mix).

        With the socket out of the event loop's selector, the loop no longer wakes for every
        speaker's every packet (each wake-up costs a pass of the loop: ~1,500 a second for 8
        spaces); the packets of all speakers are read in the clock's one wake-up a tick. It adds
        no delay to the mix: a frame arriving between two ticks waited for the next tick in the
        jitter buffer before, as it waits in the socket now. STUN (consent checks) and DTLS on
        the same socket are answered at the tick, up to 20 ms later than before."""
        if self._polled is None:
            return
        transport, sock, protocol = self._polled
        if transport.is_closing():
            self._polled = None
            return
        for _ in range(limit):
            try:
                data, addr = sock.recvfrom(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._polled = None
                return
            if not data:
                continue
            # Whatever arrives (junk from anyone who reaches the port included) must not raise
            # out of the room's tick: that would skip its mix.
            try:
                if 127 < data[0] < 192:  # RTP or RTCP: not STUN, which aioice would try first
                    self._data_received(data, 1)
                else:
                    protocol.datagram_received(data, addr)
            except Exception:
                self.errors.report()

    def _data_received(self, data: bytes, component: int) -> None:
        if not data:
            return  # aioice hands over an empty datagram when it fails to parse it as STUN
        first = data[0]
        # RTP, not RTCP (RFC 5761 §4: payload types 64-95 with the marker bit are RTCP).
        if 127 < first < 192 and len(data) >= 12 and not 191 < data[1] < 224:
            try:
                plain = self._srtp.unprotect(data)
            except pylibsrtp.Error:
                return  # a replay or a forgery: aiortc drops it too
            if len(plain) < 12 or plain[1] & 0x7F != self._pt:
                return  # a WHIP session sends one audio stream; anything else is not mixed
            ssrc = plain[8:12]
            if ssrc != self._last_ssrc:  # a new stream (a restarted sender): a new sequence
                self._last_ssrc = ssrc
                self._last_seq = None
            seq = (plain[2] << 8) | plain[3]
            if not in_order(self._last_seq, seq):
                self.late += 1  # a duplicate or a packet older than one already taken
                return
            self._last_seq = seq
            offset = 12 + 4 * (first & 0x0F)
            if first & 0x10:  # a header extension: 4 bytes, then its length in 32-bit words
                if len(plain) < offset + 4:
                    return
                offset += 4 + 4 * ((plain[offset + 2] << 8) | plain[offset + 3])
            end = len(plain) - (plain[-1] if first & 0x20 else 0)
            if end > offset:
                self.packets += 1
                self._on_payload(plain[offset:end])
            return
        self._original(data, component)


class OutboundBypass:
    """A WHEP sender's packets built, protected and sent in one call each (see the module)."""

    def __init__(self, sender: Any, dtls: Any, conn: Any, payload_type: int) -> None:
        self._sender = sender
        self._dtls = dtls
        self._conn = conn
        self._srtp: pylibsrtp.Session = dtls._tx_srtp
        self._pt = payload_type
        self._ssrc: int = sender._ssrc
        self._mid: str | None = sender._RTCRtpSender__mid
        self._extensions = sender._RTCRtpSender__rtp_header_extensions_map
        self._seq = secrets.randbits(16)
        self._timestamp = secrets.randbits(32)
        self.sent = 0
        # Where the header extensions are the same on every packet (the MID alone: aiortc
        # negotiates no abs-send-time or transport-wide sequence for audio), a packet is a packed
        # 12-byte header, those extensions as aiortc serialises them, and the payload.
        self._template: tuple[int, int, bytes] | None = None
        ids = getattr(self._extensions, "_HeaderExtensionsMap__ids", None)
        if ids is not None and ids.abs_send_time is None and ids.transport_sequence_number is None:
            probe = RtpPacket(
                self._pt, marker=1, sequence_number=0, timestamp=0, ssrc=self._ssrc, payload=b"\0"
            )
            probe.extensions.mid = self._mid
            raw = probe.serialize(self._extensions)
            self._template = (raw[0], raw[1], raw[12:-1])

    @classmethod
    def install(cls, transceiver: Any) -> OutboundBypass | None:
        """Send for ``transceiver``'s sender (its DTLS is up, its codec negotiated), or None
        where the layout is not the one this was written against."""
        sender = transceiver.sender
        dtls = getattr(sender, "transport", None)
        conn = _connection(dtls)
        codecs = getattr(transceiver, "_codecs", None)
        codec = codecs[0] if isinstance(codecs, list) and codecs else None  # what the sender sends
        needed = (
            "_RTCRtpSender__mid",
            "_RTCRtpSender__rtp_header_extensions_map",
            "_RTCRtpSender__ntp_timestamp",
            "_RTCRtpSender__rtp_timestamp",
            "_RTCRtpSender__octet_count",
            "_RTCRtpSender__packet_count",
            "_ssrc",
        )
        if (
            conn is None
            or not isinstance(getattr(dtls, "_tx_srtp", None), pylibsrtp.Session)
            or getattr(dtls, "state", None) != "connected"
            or codec is None
            or not all(hasattr(sender, name) for name in needed)
        ):
            return None
        return cls(sender, dtls, conn, codec.payloadType)

    def packet(self, payload: bytes, ntp: int) -> bytes:
        """The next RTP packet (unprotected) carrying ``payload``, sent at ``ntp``."""
        template = self._template
        if template is not None:
            first, second, extensions = template
            return HEADER.pack(first, second, self._seq, self._timestamp, self._ssrc) + extensions + payload
        packet = RtpPacket(
            payload_type=self._pt, marker=1, sequence_number=self._seq, timestamp=self._timestamp
        )
        packet.ssrc = self._ssrc
        packet.payload = payload
        packet.extensions.abs_send_time = (ntp >> 14) & 0x00FFFFFF
        packet.extensions.mid = self._mid
        return packet.serialize(self._extensions)

    def send(self, payload: bytes, samples: int) -> bool:
        """One encoded frame of ``samples`` samples as one RTP packet; False if it could not be
        sent (the session is going away)."""
        pair = self._conn._nominated.get(1)
        if pair is None or self._dtls.state != "connected":
            return False
        ntp = _ntp_now()
        data = self._srtp.protect(self.packet(payload, ntp))
        pair.protocol.transport.sendto(data, pair.remote_addr)
        sender = self._sender
        sender._RTCRtpSender__ntp_timestamp = ntp
        sender._RTCRtpSender__rtp_timestamp = self._timestamp
        sender._RTCRtpSender__octet_count += len(payload)
        sender._RTCRtpSender__packet_count += 1
        self._seq = (self._seq + 1) & 0xFFFF
        self._timestamp = (self._timestamp + samples) & 0xFFFFFFFF
        self.sent += 1
        return True
