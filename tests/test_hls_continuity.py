"""Minutes of LL-HLS in seconds: the real packager and origin stream, fed faster than real time,
with every playlist they render on the way checked against the RFC's rules (RFC 8216bis)."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
import threading
import time

import m3u8
import pytest

from townhall.audience.origin import SpaceStream
from townhall.audience.packager import Packager, PartReady
from townhall.audience.playlist import PlaylistSpec
from townhall.stage.sources import FRAME_SAMPLES, SAMPLE_RATE, tone

MINUTES = 5
T0 = 1_790_000_000.0  # wall clock of the first frame (the packager takes it as given)
SPEC = PlaylistSpec(part_target=0.5, segment_target=2.0)
SEGMENT_PARTS = 4


def next_part(msn: int, index: int) -> tuple[int, int]:
    return (msn, index + 1) if index + 1 < SEGMENT_PARTS else (msn + 1, 0)


def key_of(uri: str) -> tuple[int, int]:
    msn, index = uri.removeprefix("seg").removesuffix(".m4s").split(".")
    return int(msn), int(index)


class Checker:
    """The rules, checked on one playlist and between each playlist and the one before it."""

    def __init__(self) -> None:
        self.playlists = 0
        self.last_part: tuple[int, int] | None = None
        self.media_sequence = -1
        self.pdt: dict[int, float] = {}  # msn -> PROGRAM-DATE-TIME, as first seen
        self.extinf: dict[int, float] = {}

    def check(self, text: str) -> None:
        pl = m3u8.loads(text)
        self.playlists += 1
        part_target = pl.part_inf.part_target
        assert part_target == SPEC.part_target and pl.target_duration == SPEC.target_duration
        assert pl.server_control.can_block_reload == "YES"
        assert pl.server_control.part_hold_back >= 3 * part_target
        # Media sequence: never goes back; segments numbered from it without a hole.
        assert pl.media_sequence >= self.media_sequence
        self.media_sequence = pl.media_sequence
        complete = [s for s in pl.segments if s.uri]
        assert [int(s.uri[3:-4]) for s in complete] == list(
            range(pl.media_sequence, pl.media_sequence + len(complete))
        )
        previous_start: float | None = None
        previous_duration = 0.0
        for i, seg in enumerate(pl.segments):
            msn = pl.media_sequence + i
            # Durations: parts within PART-TARGET, segments within TARGETDURATION (§4.4.3.1).
            assert all(0 < p.duration <= part_target for p in seg.parts), seg.parts
            assert all(p.independent == "YES" for p in seg.parts)
            assert [key_of(p.uri) for p in seg.parts] == [(msn, j) for j in range(len(seg.parts))]
            if seg.uri:
                assert seg.duration <= pl.target_duration and round(seg.duration) <= pl.target_duration
                if seg.parts:
                    assert abs(sum(p.duration for p in seg.parts) - seg.duration) < 0.002
                assert self.extinf.setdefault(msn, seg.duration) == seg.duration  # never rewritten
            # PROGRAM-DATE-TIME: on every segment, each one where the one before ended, and a
            # segment's time never changes from one playlist to the next.
            # (m3u8 gives the segment being built, which has parts only, its first part's time.)
            pdt = seg.program_date_time if seg.uri else seg.parts[0].program_date_time
            assert pdt is not None
            start = pdt.timestamp()
            assert abs(self.pdt.setdefault(msn, start) - start) < 0.0005
            if previous_start is not None:
                assert start > previous_start
                assert abs(start - (previous_start + previous_duration)) < 0.002
            previous_start, previous_duration = start, seg.duration
        # Part numbering: every playlist adds exactly the part after the last one.
        parts = [key_of(p.uri) for s in pl.segments for p in s.parts]
        assert parts, "a live playlist lists parts near the edge"
        for a, b in itertools.pairwise(parts):
            assert b == next_part(*a), (a, b)
        if self.last_part is not None:
            assert parts[-1] == next_part(*self.last_part), (self.last_part, parts[-1])
        self.last_part = parts[-1]
        # The preload hint names the part after the last one listed (§4.4.5.3).
        assert pl.preload_hint.hint_type == "PART"
        assert key_of(pl.preload_hint.uri) == next_part(*parts[-1])
        # Parts cover at least three target durations back from the edge (§4.4.4.9).
        with_parts = [s for s in pl.segments if s.parts]
        listed = sum(p.duration for s in with_parts for p in s.parts)
        assert len(with_parts) == len(pl.segments) or listed >= 3 * pl.target_duration


def test_minutes_of_playlists_keep_every_rule() -> None:
    frames = MINUTES * 60 * SAMPLE_RATE // FRAME_SAMPLES
    signal = tone(440.0, 1.0)  # one second, repeated: a whole number of cycles

    async def scenario() -> tuple[Checker, SpaceStream, Packager, float]:
        loop = asyncio.get_running_loop()
        stream = SpaceStream(SPEC, SEGMENT_PARTS)
        checker = Checker()
        applied = asyncio.Event()
        errors: list[BaseException] = []

        def apply(part: PartReady) -> None:
            try:
                stream.add_part(part)
                text = stream.playlist()
                assert text is not None
                checker.check(text)
            except BaseException as exc:  # reported after the run, with the playlist count
                errors.append(exc)
                applied.set()

        packager = Packager(
            "continuity",
            on_init=lambda data: loop.call_soon_threadsafe(stream.set_init, data),
            on_part=lambda part: loop.call_soon_threadsafe(apply, part),
            part_target=SPEC.part_target,
        )

        def feed() -> None:
            for n in range(frames):
                at = n * FRAME_SAMPLES % SAMPLE_RATE
                while packager.queue.full():  # as fast as the encoder goes, never dropping
                    time.sleep(0.0005)
                packager.feed(signal[at : at + FRAME_SAMPLES], T0 + n * FRAME_SAMPLES / SAMPLE_RATE)
            packager.close()
            loop.call_soon_threadsafe(applied.set)  # after every part callback already queued

        started = time.perf_counter()
        feeder = threading.Thread(target=feed)
        feeder.start()
        await applied.wait()
        await asyncio.to_thread(feeder.join)
        if errors:
            raise AssertionError(f"playlist {checker.playlists + 1} broke a rule") from errors[0]
        return checker, stream, packager, time.perf_counter() - started

    checker, stream, packager, took = asyncio.run(scenario())
    assert packager.dropped == 0
    assert stream.init is not None and stream.init.startswith(b"\x00\x00\x00") and b"ftyp" in stream.init[:8]
    # Minutes of audio, every part's playlist checked, faster than real time.
    assert checker.playlists >= MINUTES * 60 / SPEC.part_target * 0.95
    assert took < MINUTES * 60 / 2, took
    last = stream.segments[-1]
    assert checker.media_sequence > MINUTES * 60 / SPEC.segment_target - 20  # the window slid on
    # The clock of the last segment is the first frame's plus the audio before it.
    before_last = last.msn * SEGMENT_PARTS * 23 * 1024 / SAMPLE_RATE
    assert abs(last.start - (T0 + before_last)) < 0.001
    end = dt.datetime.fromtimestamp(last.start + last.duration, tz=dt.UTC)
    assert abs(end.timestamp() - (T0 + frames * FRAME_SAMPLES / SAMPLE_RATE)) < 1.0


def test_one_failing_waiter_leaves_the_rest_of_its_list_answered(caplog: pytest.LogCaptureFixture) -> None:
    """A held reload whose answer fails (its connection broke in a way nobody foresaw) is
    logged; the others waiting on the same point are still told, on wake and on expiry."""

    class Recorder:
        def __init__(self, fail: bool) -> None:
            self.fail, self.told = fail, ""

        def ready(self, stream: SpaceStream) -> None:
            self.told = "ready"
            if self.fail:
                raise RuntimeError("boom")

        def expired(self) -> None:
            self.told = "expired"
            if self.fail:
                raise RuntimeError("boom")

    async def scenario() -> tuple[list[Recorder], list[Recorder]]:
        ended = SpaceStream(SPEC, SEGMENT_PARTS)
        on_end = [Recorder(fail=i == 0) for i in range(3)]
        for waiter in on_end:
            ended.hold(0, 0, waiter, within=5.0)
        ended.end()  # the point will not come: every waiter is told so
        timed = SpaceStream(SPEC, SEGMENT_PARTS)
        on_timer = [Recorder(fail=i == 1) for i in range(3)]
        for waiter in on_timer:
            timed.hold(0, 0, waiter, within=0.05)
        await asyncio.sleep(0.3)  # past the bound: the list's timer tells them
        return on_end, on_timer

    with caplog.at_level(logging.ERROR, logger="townhall.audience.origin"):
        on_end, on_timer = asyncio.run(scenario())
    assert [w.told for w in on_end] == ["expired"] * 3
    assert [w.told for w in on_timer] == ["expired"] * 3
    assert sum("could not be answered" in r.getMessage() for r in caplog.records) == 2
