"""Speakers' audio decoded inline as aiortc hands over each encoded frame (``InlineDecoding``),
with real Opus packets from libopus and a real aiortc receiver."""

from __future__ import annotations

import asyncio
import fractions
import queue

import av
import numpy as np
import pytest
from aiortc import RTCPeerConnection
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from townhall.stage.jitter import Frame
from townhall.stage.room import InlineDecoding
from townhall.stage.sources import tone, tone_power

RATE = 48000
OPUS = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=RATE, channels=2, payloadType=111)
PCMU = RTCRtpCodecParameters(mimeType="audio/PCMU", clockRate=8000, channels=1, payloadType=0)


def opus_packets(samples: np.ndarray, layout: str) -> list[bytes]:
    """``samples`` (mono int16) as 20 ms Opus packets, coded in ``layout`` as a browser might."""
    codec = av.CodecContext.create("libopus", "w")
    codec.bit_rate = 64000
    codec.format = "s16"
    codec.layout = layout
    codec.sample_rate = RATE
    codec.time_base = fractions.Fraction(1, RATE)
    packets: list[bytes] = []
    for i in range(len(samples) // 960):
        chunk = samples[i * 960 : (i + 1) * 960]
        data = np.repeat(chunk, 2) if layout == "stereo" else chunk
        frame = av.AudioFrame.from_ndarray(data.reshape(1, -1), format="s16", layout=layout)
        frame.sample_rate = RATE
        frame.pts = i * 960
        packets += [bytes(p) for p in codec.encode(frame)]
    return packets


def test_opus_is_decoded_on_put_to_mono_20ms_frames() -> None:
    for layout in ("stereo", "mono"):
        got: list[Frame] = []
        decoding = InlineDecoding(got.extend)
        for i, data in enumerate(opus_packets(tone(700.0, 1.0), layout)):
            decoding.put((OPUS, JitterFrame(data, i * 960)))
        assert len(got) >= 45, layout  # the encoder holds back its look-ahead
        assert all(f.shape == (960,) and f.dtype == np.int16 for f in got), layout
        assert tone_power(np.concatenate(got[5:]), RATE, 700.0) > 0.9, layout
        assert decoding.empty()  # nothing was left for aiortc's decoder thread


def test_a_corrupt_packet_is_lost_audio_and_the_next_one_decodes(caplog: pytest.LogCaptureFixture) -> None:
    got: list[Frame] = []
    decoding = InlineDecoding(got.extend)
    packets = opus_packets(tone(700.0, 0.2), "mono")
    decoding.put((OPUS, JitterFrame(b"\xff" * 3, 0)))  # a code-3 packet with no frame count
    for i, data in enumerate(packets):
        decoding.put((OPUS, JitterFrame(data, i * 960)))
    assert "failed to decode" in caplog.text
    assert len(got) >= len(packets) - 2


def test_other_codecs_go_through_aiortcs_decoder() -> None:
    got: list[Frame] = []
    decoding = InlineDecoding(got.extend)
    mulaw_silence = b"\xff" * 160  # 20 ms at 8 kHz
    for i in range(10):
        decoding.put((PCMU, JitterFrame(mulaw_silence, i * 160)))
    # aiortc decodes G.711 at 8 kHz; resampled to 48 kHz and cut into 960-sample frames.
    assert len(got) >= 8 and all(f.shape == (960,) for f in got)
    assert max(int(np.abs(f).max()) for f in got) < 100


def test_the_end_of_the_track_still_reaches_aiortcs_thread() -> None:
    decoding = InlineDecoding(lambda frames: None)
    decoding.put(None)
    assert decoding.get_nowait() is None  # the decoder thread then ends the track as before


def test_installed_on_a_receiver_before_it_starts() -> None:
    async def scenario() -> tuple[bool, object]:
        pc = RTCPeerConnection()
        try:
            receiver = pc.addTransceiver("audio", direction="recvonly").receiver
            installed = InlineDecoding.install(receiver, lambda frames: None)
            return installed, getattr(receiver, "_RTCRtpReceiver__decoder_queue", None)
        finally:
            await pc.close()

    installed, q = asyncio.run(scenario())
    assert installed and isinstance(q, InlineDecoding) and isinstance(q, queue.Queue)
