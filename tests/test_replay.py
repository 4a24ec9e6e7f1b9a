"""Replays over HTTP: the VOD playlist and its objects, the single .m4a (ranges, HEAD, ETag),
the replay post, not-recorded spaces, deletion and retention, on SQLite and PostgreSQL.

Recordings are made by the real packager (a tone) and written into the node's real media store,
as the stage writes them during a space."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import m3u8
import pytest

from tests.recording_support import decode_mono, store_epochs
from tests.spaces_support import generous_config
from tests.support import Api, RunningServer, assert_error, running_server
from townhall.control.node import Node
from townhall.spaces import recordings
from townhall.stage.sources import tone_power
from townhall.storage.media_store import LocalMediaStore

EPOCHS = [9.0, 5.0]
TONE = 440.0


@dataclasses.dataclass
class World:
    server: RunningServer
    store: LocalMediaStore
    admin: Api
    host: Api
    fan: Api
    other: Api
    anonymous: Api

    def space(self, title: str = "Town hall", *, recorded: bool = True, start: bool = True) -> str:
        r = self.host.post("/api/v1/spaces", json={"title": title, "recorded": recorded})
        assert r.status_code == 201, r.text
        assert r.json()["recorded"] is recorded
        space_id = str(r.json()["id"])
        if start:
            assert self.host.post(f"/api/v1/spaces/{space_id}/start").status_code == 200
        return space_id

    def end(self, space_id: str) -> None:
        r = self.host.post(f"/api/v1/spaces/{space_id}/end")
        assert r.status_code == 200, r.text


@pytest.fixture
def world(backend: str, tmp_path: Path) -> Iterator[World]:
    config = generous_config(backend, tmp_path / "data", replay_finish_wait_seconds=0.3)
    with running_server(config) as server:
        anonymous = server.client()
        admin = server.client(server.create_admin("admin", "password123"))
        host = anonymous.user("host")
        fan = anonymous.user("fan")
        other = anonymous.user("other")
        assert fan.post("/api/v1/accounts/host/follow").status_code == 204
        yield World(server, LocalMediaStore(config.data / "media"), admin, host, fan, other, anonymous)


def wait_for(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def recorded_space(world: World, title: str = "Town hall") -> str:
    """A space whose first packager runs (``EPOCHS``, a tone) are in the store before it goes
    live, as after a stage restart: the node's own stage, if it writes the store, continues in
    the next epoch while the space is live, and writes ``finished`` after the end. Where no
    stage does, the test writes the marker as the stage would."""
    r = world.host.post("/api/v1/spaces", json={"title": title})
    assert r.status_code == 201, r.text
    space_id = str(r.json()["id"])
    store_epochs(world.store, space_id, EPOCHS, TONE, finish=False)
    assert world.host.post(f"/api/v1/spaces/{space_id}/start").status_code == 200
    world.end(space_id)
    with contextlib.suppress(AssertionError):
        wait_for(lambda: world.store.is_finished(space_id), within=2.0)
    if not world.store.is_finished(space_id):
        world.store.finish(space_id)
    return space_id


def posts_of(api: Api, path: str) -> list[dict[str, Any]]:
    r = api.get(path)
    assert r.status_code == 200, (r.status_code, r.text)
    posts: list[dict[str, Any]] = r.json()["posts"]
    return posts


def stored_seconds(world: World, space_id: str) -> float:
    return sum(p.duration for p in world.store.parts(space_id))


def test_replay_playlist_and_its_objects(world: World) -> None:
    space_id = recorded_space(world)
    api = world.anonymous  # replays are public: no ticket
    r = api.get(f"/hls/{space_id}/replay.m3u8")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/vnd.apple.mpegurl")
    assert r.headers["cache-control"] == "public, max-age=300"
    head = api.request("HEAD", f"/hls/{space_id}/replay.m3u8")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(r.content))
    text = r.text
    epochs_stored = world.store.epochs(space_id)
    assert epochs_stored[: len(EPOCHS)] == list(range(len(EPOCHS)))
    assert "#EXT-X-PLAYLIST-TYPE:VOD" in text and text.rstrip().endswith("#EXT-X-ENDLIST")
    assert text.count("#EXT-X-DISCONTINUITY") == len(epochs_stored) - 1
    assert text.count("#EXT-X-MAP:") == len(epochs_stored)
    playlist = m3u8.loads(text, uri=f"{world.server.url}/hls/{space_id}/replay.m3u8")
    assert playlist.playlist_type == "vod" and playlist.is_endlist
    total = sum(s.duration for s in playlist.segments)
    assert abs(total - stored_seconds(world, space_id)) < 0.01
    # Fetch everything the playlist names; decode each epoch (its init and its segments).
    epochs: list[bytes] = []
    current = b""
    for segment in playlist.segments:
        if segment.discontinuity or not current:
            if current:
                epochs.append(current)
            assert segment.init_section is not None
            init = api.get(f"/hls/{space_id}/{segment.init_section.uri}")
            assert init.status_code == 200 and init.headers["content-type"] == "audio/mp4"
            assert "immutable" in init.headers["cache-control"]
            current = init.content
        media = api.get(f"/hls/{space_id}/{segment.uri}")
        assert media.status_code == 200, (segment.uri, media.text)
        assert media.headers["etag"].startswith('"') and "immutable" in media.headers["cache-control"]
        assert int(media.headers["content-length"]) == len(media.content)
        current += media.content
    epochs.append(current)
    assert len(epochs) == len(epochs_stored)
    for data, seconds in zip(epochs, EPOCHS, strict=False):  # the tone's epochs (then live silence)
        samples, _ = decode_mono(data)
        assert abs(len(samples) / 48000 - seconds) <= 0.5
        assert tone_power(samples, 48000, TONE) > 0.9
    # Objects answer HEAD, Range and If-None-Match like live media.
    name = playlist.segments[0].uri
    head = api.request("HEAD", f"/hls/{space_id}/{name}")
    assert head.status_code == 200 and head.content == b""
    partial = api.get(f"/hls/{space_id}/{name}", headers={"Range": "bytes=0-99"})
    assert partial.status_code == 206 and len(partial.content) == 100
    etag = head.headers["etag"]
    assert api.get(f"/hls/{space_id}/{name}", headers={"If-None-Match": etag}).status_code == 304


def test_recording_m4a(world: World, tmp_path: Path) -> None:
    space_id = recorded_space(world)
    api = world.anonymous
    path = f"/api/v1/spaces/{space_id}/recording.m4a"
    r = api.get(path)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "audio/mp4"
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["content-disposition"] == f'attachment; filename="townhall-{space_id}.m4a"'
    assert int(r.headers["content-length"]) == len(r.content)
    body = r.content
    file = tmp_path / "replay.m4a"
    file.write_bytes(body)
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "json", str(file)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert abs(float(json.loads(probe.stdout)["format"]["duration"]) - stored_seconds(world, space_id)) < 0.01
    samples, _ = decode_mono(body)
    assert tone_power(samples[: int((sum(EPOCHS) - 0.5) * 48000)], 48000, TONE) > 0.9
    # HEAD: the same headers, no body.
    head = api.request("HEAD", path)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(body)) and head.headers["etag"] == r.headers["etag"]
    # Ranges: start-end, open-ended, suffix; a range past the end is 416.
    for spec, want in (
        ("bytes=0-0", body[:1]),
        ("bytes=100-5000", body[100:5001]),
        (f"bytes={len(body) - 10}-", body[-10:]),
        ("bytes=-300", body[-300:]),
        (f"bytes=5-{len(body) + 100}", body[5:]),
    ):
        part = api.get(path, headers={"Range": spec})
        assert part.status_code == 206, (spec, part.text)
        assert part.content == want, spec
        assert part.headers["content-length"] == str(len(want))
        assert part.headers["content-range"].endswith(f"/{len(body)}")
    assert_error(api.get(path, headers={"Range": f"bytes={len(body)}-"}), 416, "range_not_satisfiable")
    assert_error(api.get(path, headers={"Range": "bytes=0-1,5-6"}), 416)
    assert api.get(path, headers={"If-None-Match": r.headers["etag"]}).status_code == 304
    # If-Range naming another version: the whole file.
    stale = api.get(path, headers={"Range": "bytes=0-9", "If-Range": '"old"'})
    assert stale.status_code == 200 and stale.content == body


def test_replay_post_on_timeline_and_feed(world: World) -> None:
    space_id = recorded_space(world, "Budget night")
    timeline = posts_of(world.anonymous, "/api/v1/accounts/host/posts")
    assert timeline[0]["kind"] == "replay"
    assert timeline[0]["text"] == "Replay: Budget night" and timeline[0]["space_id"] == space_id
    feed = posts_of(world.fan, "/api/v1/feed")
    assert [(p["kind"], p["space_id"]) for p in feed[:2]] == [
        ("replay", space_id),
        ("announcement", space_id),
    ]


def test_not_ready_not_recorded_unknown(world: World) -> None:
    api = world.anonymous
    live = world.space("Live now")
    store_epochs(world.store, live, [2.0], finish=False)
    for path in (f"/hls/{live}/replay.m3u8", f"/api/v1/spaces/{live}/recording.m4a"):
        assert_error(api.get(path), 409, "space_not_ended")
    assert_error(api.get("/hls/nosuchspace/replay.m3u8"), 404, "space_not_found")
    assert_error(api.get("/api/v1/spaces/nosuchspace/recording.m4a"), 404, "space_not_found")
    # A space ended before it went live has no recording and no replay post.
    never = world.space("Never", start=False)
    world.end(never)
    assert_error(api.get(f"/hls/{never}/replay.m3u8"), 404, "no_recording")
    kinds = [p["kind"] for p in posts_of(api, "/api/v1/accounts/host/posts")]
    assert "replay" not in kinds


def test_a_space_not_recorded_leaves_nothing_behind(world: World) -> None:
    space_id = world.space("Off the record", recorded=False)
    store_epochs(world.store, space_id, [3.0], finish=False)  # what live listeners were served
    assert world.store.has_space(space_id)
    world.end(space_id)
    # Deleted once the packager has written its last part (bounded wait), after the answer.
    wait_for(lambda: not world.store.has_space(space_id))
    assert not (world.server.config.data / "media" / space_id).exists()
    assert_error(world.anonymous.get(f"/hls/{space_id}/replay.m3u8"), 404, "not_recorded")
    assert_error(world.anonymous.get(f"/api/v1/spaces/{space_id}/recording.m4a"), 404, "not_recorded")
    posts = posts_of(world.anonymous, "/api/v1/accounts/host/posts")
    assert [p["kind"] for p in posts if p["space_id"] == space_id] == ["announcement"]


def test_path_tricks(world: World) -> None:
    space_id = recorded_space(world)
    secret = world.server.config.data / "media" / "secret.m4s"
    secret.write_bytes(b"SECRET")
    api = world.anonymous
    for name in (
        "..%2Fsecret.m4s",
        "%2e%2e%2fsecret.m4s",
        "r0-999.m4s",
        "r0-1.m4s.tmp",
        "r00-12.m4s",
        "e99.mp4",
        "e00000.mp4x",
        "finished",
        "init-e00000.mp4",
    ):
        r = api.get(f"/hls/{space_id}/replay/{name}")
        assert r.status_code == 404, (name, r.status_code)
        assert b"SECRET" not in r.content
        assert r.headers["content-type"].startswith("application/json")
    for path in (
        f"/hls/{space_id}/replay/../../secret.m4s",
        f"/hls/..%2F{space_id}/replay.m3u8",
        f"/api/v1/spaces/{space_id}%2F..%2Fx/recording.m4a",
        "/hls/a.b/replay.m3u8",
    ):
        r = api.get(path)
        assert r.status_code in (404, 422), (path, r.status_code)
        assert b"SECRET" not in r.content


def test_right_after_the_end_without_the_finished_marker(world: World) -> None:
    """The packager died before writing ``finished`` (or is slower than the wait): past
    ``replay_finish_wait_seconds`` after the end, the replay serves every durable part, briefly
    cacheable; once the marker is written, the replay is final."""
    space_id = recorded_space(world)
    (world.store.space_dir(space_id) / "finished").unlink()
    began = time.monotonic()
    r = world.anonymous.get(f"/hls/{space_id}/replay.m3u8")
    assert r.status_code == 200 and time.monotonic() - began < 1.0
    assert r.headers["cache-control"] == "public, max-age=1"
    m4a = world.anonymous.get(f"/api/v1/spaces/{space_id}/recording.m4a")
    assert m4a.status_code == 200 and m4a.headers["cache-control"] == "no-cache"
    assert int(m4a.headers["content-length"]) == len(m4a.content)
    world.store.finish(space_id)
    r = world.anonymous.get(f"/hls/{space_id}/replay.m3u8")
    assert r.headers["cache-control"] == "public, max-age=300"


def test_a_replay_request_at_the_end_waits_for_the_marker(world: World) -> None:
    """Asked the instant the space ends, before the last part is durable: the request waits
    for the marker (here written 150 ms after the end) and serves the whole recording."""
    space_id = world.space("Waiting", start=False)
    store_epochs(world.store, space_id, [3.0], TONE, finish=False)
    assert world.host.post(f"/api/v1/spaces/{space_id}/start").status_code == 200
    world.end(space_id)
    with contextlib.suppress(AssertionError):  # a stage of this node writes its own marker
        wait_for(lambda: world.store.is_finished(space_id), within=2.0)
    with contextlib.suppress(FileNotFoundError):
        (world.store.space_dir(space_id) / "finished").unlink()
    world.server.clock.advance(-5.0)  # the server's "now" is just after the end again
    last = LocalMediaStore(world.store.root)

    def late_packager() -> None:
        time.sleep(0.15)
        store_epochs(last, space_id, [1.0], TONE, finish=True)

    writer = threading.Thread(target=late_packager)
    writer.start()
    r = world.anonymous.get(f"/hls/{space_id}/replay.m3u8")
    writer.join()
    assert r.status_code == 200
    listed = m3u8.loads(r.text)
    assert abs(sum(s.duration for s in listed.segments) - stored_seconds(world, space_id)) < 0.01


def test_deletion_removes_media_and_posts(world: World) -> None:
    space_id = recorded_space(world)
    api = world.anonymous
    assert api.get(f"/api/v1/spaces/{space_id}/recording.m4a").status_code == 200
    assert_error(world.other.delete(f"/api/v1/spaces/{space_id}"), 403, "host_only")
    assert_error(api.delete(f"/api/v1/spaces/{space_id}"), 401)
    live = world.space("Still live")
    assert_error(world.host.delete(f"/api/v1/spaces/{live}"), 409, "space_live")
    assert world.host.delete(f"/api/v1/spaces/{space_id}").status_code == 204
    assert not world.store.has_space(space_id)
    assert_error(api.get(f"/api/v1/spaces/{space_id}"), 404, "space_not_found")
    assert_error(api.get(f"/hls/{space_id}/replay.m3u8"), 404, "space_not_found")
    assert_error(api.get(f"/api/v1/spaces/{space_id}/recording.m4a"), 404, "space_not_found")
    posts = posts_of(api, "/api/v1/accounts/host/posts")
    assert space_id not in {p["space_id"] for p in posts}
    assert space_id not in {p["space_id"] for p in posts_of(world.fan, "/api/v1/feed")}
    assert_error(world.host.delete(f"/api/v1/spaces/{space_id}"), 404, "space_not_found")
    # An admin deletes someone else's space: audited.
    second = recorded_space(world, "Second")
    assert world.admin.delete(f"/api/v1/spaces/{second}").status_code == 204
    assert not world.store.has_space(second)
    entries = world.admin.get("/api/v1/admin/audit").json()["entries"]
    assert entries[0]["action"] == "delete_space" and entries[0]["target"] == "host"
    assert second in entries[0]["detail"]


def test_suspended_hosts_replays_are_hidden(world: World) -> None:
    space_id = recorded_space(world)
    r = world.admin.post("/api/v1/admin/accounts/host/suspend", json={"reason": "spam"})
    assert r.status_code == 200, r.text
    assert_error(world.anonymous.get(f"/hls/{space_id}/replay.m3u8"), 404, "replay_unavailable")
    assert world.admin.post("/api/v1/admin/accounts/host/reinstate").status_code == 200
    assert world.anonymous.get(f"/hls/{space_id}/replay.m3u8").status_code == 200


def run_sweep(server: RunningServer, now: float, retention_days: int) -> recordings.SweepResult:
    async def go() -> recordings.SweepResult:
        node = Node.from_config(server.config)
        try:
            async with node.database.session() as db:
                return await recordings.sweep(
                    db, LocalMediaStore(server.config.data / "media"), now=now, retention_days=retention_days
                )
        finally:
            await node.database.close()

    return asyncio.run(go())


def test_retention_sweep(world: World) -> None:
    old = recorded_space(world, "Old")
    world.server.clock.advance(3 * 86400)
    recent = recorded_space(world, "Recent")
    # Leftovers the sweep also removes: a not-recorded space's last part written after the end,
    # and media whose space is gone.
    unrecorded = world.space("Unrecorded", recorded=False)
    store_epochs(world.store, unrecorded, [1.0], finish=False)
    world.end(unrecorded)
    wait_for(lambda: not world.store.has_space(unrecorded))  # deleted after the end
    store_epochs(world.store, unrecorded, [1.0])  # a part written after the deletion
    store_epochs(world.store, "orphan", [1.0])
    now = world.server.clock()
    first = run_sweep(world.server, now, retention_days=0)  # 0: kept forever
    assert first.expired == []
    assert first.not_recorded == [unrecorded] and first.orphans == ["orphan"]
    assert world.store.space_ids() == sorted([old, recent])
    result = run_sweep(world.server, now, retention_days=2)
    assert result == recordings.SweepResult(expired=[old])
    assert world.store.space_ids() == [recent]
    assert_error(world.anonymous.get(f"/hls/{old}/replay.m3u8"), 404, "recording_deleted")
    assert_error(world.anonymous.get(f"/api/v1/spaces/{old}/recording.m4a"), 404, "recording_deleted")
    assert world.anonymous.get(f"/hls/{recent}/replay.m3u8").status_code == 200
    kinds = {(p["kind"], p["space_id"]) for p in posts_of(world.anonymous, "/api/v1/accounts/host/posts")}
    assert ("replay", old) not in kinds and ("replay", recent) in kinds
    # Idempotent.
    again = run_sweep(world.server, now, retention_days=2)
    assert again == recordings.SweepResult()
