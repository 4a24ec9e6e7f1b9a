"""The LL-HLS playlist writer, pinned by golden files and checked against the RFC's rules."""

from __future__ import annotations

from pathlib import Path

import m3u8
import pytest

from townhall.audience.playlist import (
    BlockingRequestError,
    Part,
    PlaylistSpec,
    Segment,
    check_blocking_request,
    has_part,
    render_live,
    render_vod,
)

RESOURCES = Path(__file__).parent / "resources"
SPEC = PlaylistSpec(part_target=0.5, segment_target=2.0, window_segments=4)
T0 = 1_790_000_000.0


def segments(complete: int, building_parts: int, *, discontinuity_at: int | None = None) -> list[Segment]:
    out = []
    for msn in range(complete):
        parts = tuple(Part(i, 0.5) for i in range(4))
        out.append(Segment(msn, parts, T0 + 2 * msn, True, discontinuity=msn == discontinuity_at))
    if building_parts:
        parts = tuple(Part(i, 0.5) for i in range(building_parts))
        out.append(Segment(complete, parts, T0 + 2 * complete, False))
    return out


def golden(name: str, text: str) -> None:
    path = RESOURCES / name
    if not path.exists():
        path.write_text(text)
        pytest.fail(f"golden file {name} was missing and has been written: review it and commit it")
    assert text == path.read_text()


def test_live_playlist_golden() -> None:
    golden("live_6_2.m3u8", render_live(SPEC, segments(6, 2)))
    golden("live_3_0.m3u8", render_live(SPEC, segments(3, 0)))


def test_vod_playlist_golden() -> None:
    golden("replay_5_disc2.m3u8", render_vod(SPEC, segments(5, 1, discontinuity_at=2)))


@pytest.mark.parametrize(("complete", "building"), [(0, 1), (1, 0), (6, 2), (30, 3), (30, 0)])
def test_live_playlist_follows_the_rules(complete: int, building: int) -> None:
    segs = segments(complete, building)
    text = render_live(SPEC, segs)
    pl = m3u8.loads(text)
    assert pl.target_duration == SPEC.target_duration
    assert pl.part_inf.part_target == 0.5
    assert pl.server_control.can_block_reload == "YES"
    assert pl.server_control.part_hold_back >= 3 * 0.5
    for seg in pl.segments:
        if seg.uri:  # the segment being built has parts only
            assert round(seg.duration) <= pl.target_duration
    parts = [p for seg in pl.segments for p in seg.parts]
    assert all(p.duration <= pl.part_inf.part_target for p in parts)
    assert all(p.independent == "YES" for p in parts)
    # The window starts at the media sequence and numbers run without gaps.
    msns = [int(s.uri[3:-4]) for s in pl.segments if s.uri]
    assert msns == list(range(pl.media_sequence, pl.media_sequence + len(msns)))
    # The preload hint names the part after the last one listed.
    last = segs[-1]
    expected = f"seg{last.msn}.{len(last.parts)}.m4s" if not last.complete else f"seg{last.msn + 1}.0.m4s"
    assert pl.preload_hint.uri == expected and pl.preload_hint.hint_type == "PART"


def test_vod_is_ended_and_complete() -> None:
    pl = m3u8.loads(render_vod(SPEC, segments(10, 2)))
    assert pl.playlist_type == "vod" and pl.is_endlist
    assert [s.uri for s in pl.segments] == [f"seg{i}.m4s" for i in range(10)]
    with pytest.raises(ValueError):
        render_vod(SPEC, segments(0, 1))


def test_blocking_reload_readiness() -> None:
    segs = segments(3, 2)  # complete 0..2, segment 3 has parts 0..1
    assert has_part(segs, 2, None) and not has_part(segs, 3, None)
    assert has_part(segs, 3, 1) and not has_part(segs, 3, 2)
    assert not has_part(segs, 4, 0)
    check_blocking_request(segs, 4, 0, 4)  # the next segment: wait for it
    check_blocking_request(segs, 5, None, 4)  # one beyond the next: still allowed
    for msn, part in [(6, 0), (-1, None), (3, 4), (3, -1)]:
        with pytest.raises(BlockingRequestError):
            check_blocking_request(segs, msn, part, 4)


def test_vod_playlist_with_an_init_segment_per_epoch_golden() -> None:
    """The replay of a space whose packager restarted: each epoch behind a discontinuity and
    its own EXT-X-MAP; segments named by the replay, not by their media sequence number."""
    segs = []
    for msn in range(5):
        epoch = 0 if msn < 3 else 1
        parts = tuple(Part(i, 0.5) for i in range(4 if msn != 2 else 3))
        segs.append(
            Segment(
                msn,
                parts,
                T0 + 2 * msn + (10 if epoch else 0),
                True,
                discontinuity=msn == 3,
                uri=f"replay/r{msn * 4}-{len(parts)}.m4s",
                init_uri=f"replay/e{epoch}.mp4",
            )
        )
    text = render_vod(SPEC, segs)
    golden("replay_epochs.m3u8", text)
    pl = m3u8.loads(text)
    assert pl.is_endlist and pl.playlist_type == "vod"
    assert [s.init_section.uri for s in pl.segments] == ["replay/e0.mp4"] * 3 + ["replay/e1.mp4"] * 2
    assert [s.discontinuity for s in pl.segments] == [False, False, False, True, False]


def test_discontinuity_sequence_counts_the_discontinuities_that_left_the_window() -> None:
    """RFC 8216bis §4.4.3.3: once a discontinuity is no longer in the live playlist,
    EXT-X-DISCONTINUITY-SEQUENCE says how many came before the first segment shown."""
    segs = segments(12, 1, discontinuity_at=3)  # the window shows the last 6 complete segments
    text = render_live(SPEC, segs)
    pl = m3u8.loads(text)
    assert pl.media_sequence > 3 and "#EXT-X-DISCONTINUITY-SEQUENCE:1" in text
    assert "#EXT-X-DISCONTINUITY\n" not in text
    assert "#EXT-X-DISCONTINUITY-SEQUENCE:3" in render_live(SPEC, segs, discontinuities_before=2)
    shown = render_live(SPEC, segments(12, 1, discontinuity_at=11))  # still in the window
    assert "#EXT-X-DISCONTINUITY\n" in shown and "DISCONTINUITY-SEQUENCE" not in shown
    assert "DISCONTINUITY-SEQUENCE" not in render_live(SPEC, segments(6, 2))  # golden files unchanged
