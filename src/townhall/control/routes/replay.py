"""Replays: ``/hls/{space_id}/replay.m3u8`` (a VOD playlist of the whole space, with its
segments and init segments under ``/hls/{space_id}/replay/``) and
``/api/v1/spaces/{space_id}/recording.m4a`` (the whole space as one file), both built from the
stored parts without re-encoding.

Replays are public: no listener ticket (a suspended host's replays are hidden, like their
posts). Segments and init segments are immutable; the playlist and the file are final once the
packager's ``finished`` marker is on disk. Right after the end, a request waits for that
marker at most until ``replay_finish_wait_seconds`` after the end, then serves what is durable
(always every part that was announced live) with a short cache lifetime; see
docs/architecture.md. Names are matched by pattern and looked up among the listed parts, so no
request path reaches the filesystem.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import StreamingResponse

from townhall.audience.replay import Replay, Replays
from townhall.control.deps import DbDep, NodeDep, ReplaysDep, media_store
from townhall.control.deps import replays as node_replays
from townhall.control.node import Node
from townhall.control.ranges import byte_range
from townhall.control.routes.hls import MP4_TYPE, PLAYLIST_TYPE, _media
from townhall.errors import NotFound
from townhall.spaces import recordings
from townhall.spaces.service import get_space
from townhall.storage.media_store import MediaStore
from townhall.storage.models import Space

logger = logging.getLogger(__name__)
router = APIRouter(tags=["replays"])

SpaceId = Annotated[str, Path(min_length=1, max_length=16, pattern="^[A-Za-z0-9]+$")]
_INIT = re.compile(r"e(\d{1,5})\.mp4")
FINAL_CACHE = "public, max-age=300"
PROVISIONAL_CACHE = "public, max-age=1"
POLL_SECONDS = 0.02


async def await_finished(node: Node, store: MediaStore, space_id: str, ended_at: float) -> bool:
    """Right after the end the packager may still be writing its last part: wait for its
    ``finished`` marker until ``replay_finish_wait_seconds`` after the end (bounded)."""
    deadline = ended_at + node.config.replay_finish_wait_seconds
    # The marker is a file another process writes: polled (a stat every 20 ms), not awaited.
    while not store.is_finished(space_id):
        if node.clock() >= deadline:
            return False
        await asyncio.sleep(POLL_SECONDS)
    return True


_after_end_tasks: set[asyncio.Task[None]] = set()


def after_end(node: Node, space: Space) -> None:
    """What follows an end, off the request: once the packager's ``finished`` marker is down
    (bounded wait), a recorded space's replay is built into the cache, so the first listener
    does not wait for it; a space that was not recorded has its media deleted (the retention
    sweep removes anything a packager writes later still)."""
    task = asyncio.create_task(_after_end(node, space.id, space.recorded, space.ended_at or node.clock()))
    _after_end_tasks.add(task)
    task.add_done_callback(_after_end_tasks.discard)


async def _after_end(node: Node, space_id: str, recorded: bool, ended_at: float) -> None:
    store = media_store(node)
    try:
        finished = await await_finished(node, store, space_id, ended_at)
        if recorded:
            if finished:
                await asyncio.to_thread(node_replays(node).get, space_id)
            return
        async with node.database.session() as db:
            space = await get_space(db, space_id)
            await recordings.discard_media(db, store, space, now=node.clock())
    except Exception:
        logger.exception("after the end of a space", extra={"space": space_id})


async def _replay(space_id: str, node: Node, db: DbDep, replays: Replays) -> Replay:
    space = await recordings.replay_space(db, space_id)
    await db.close()  # a download may last minutes: hold no database connection meanwhile
    await await_finished(node, replays.store, space_id, space.ended_at or 0.0)
    replay = await asyncio.to_thread(replays.get, space_id)
    if replay is None:
        raise NotFound("nothing of this space was recorded", code="no_recording")
    return replay


@router.get("/hls/{space_id}/replay.m3u8", response_class=Response)
@router.head("/hls/{space_id}/replay.m3u8", include_in_schema=False)
async def replay_playlist(space_id: SpaceId, node: NodeDep, db: DbDep, replays: ReplaysDep) -> Response:
    """The replay as an HLS VOD playlist (RFC 8216bis §4.4.3.5): every segment of the space,
    a discontinuity and a new init segment where the packager restarted."""
    replay = await _replay(space_id, node, db, replays)
    cache = FINAL_CACHE if replay.finished else PROVISIONAL_CACHE
    return Response(replay.playlist, media_type=PLAYLIST_TYPE, headers={"Cache-Control": cache})


@router.get("/hls/{space_id}/replay/{name}", response_class=Response)
@router.head("/hls/{space_id}/replay/{name}", include_in_schema=False)
async def replay_object(
    space_id: SpaceId,
    name: Annotated[str, Path(max_length=40)],
    request: Request,
    node: NodeDep,
    db: DbDep,
    replays: ReplaysDep,
) -> Response:
    """A replay segment (``r{seq}-{count}.m4s``) or an epoch's init segment (``e{epoch}.mp4``)."""
    replay = await _replay(space_id, node, db, replays)
    m = _INIT.fullmatch(name)
    if m is not None:
        init = replay.inits.get(int(m.group(1)))
        if init is None:
            raise NotFound("no such init segment", code="not_found")
        return _media(request, init, f'"{space_id}-replay-{name}"', MP4_TYPE)
    segment = replay.segments.get(name)
    if segment is None:
        raise NotFound("no such replay segment", code="not_found")
    data = await asyncio.to_thread(replays.segment_bytes, replay, segment)
    return _media(request, data, f'"{space_id}-replay-{name}"', MP4_TYPE)


@router.get(
    "/api/v1/spaces/{space_id}/recording.m4a",
    response_class=StreamingResponse,
    responses={200: {"content": {"audio/mp4": {}}}, 206: {"content": {"audio/mp4": {}}}},
)
@router.head("/api/v1/spaces/{space_id}/recording.m4a", include_in_schema=False)
async def recording_file(
    space_id: SpaceId, request: Request, node: NodeDep, db: DbDep, replays: ReplaysDep
) -> Response:
    """The whole space as one fragmented MP4 (AAC-LC) with its real duration in its header:
    `Content-Length`, single `Range` requests (206), `HEAD`, a strong `ETag`."""
    replay = await _replay(space_id, node, db, replays)
    plan = replay.plan
    headers = {
        "Accept-Ranges": "bytes",
        "ETag": replay.etag,
        "Cache-Control": FINAL_CACHE if replay.finished else "no-cache",
        "Content-Disposition": f'attachment; filename="townhall-{space_id}.m4a"',
    }
    if request.headers.get("if-none-match") == replay.etag:
        return Response(status_code=304, headers=headers)
    wanted = byte_range(request.headers.get("range"), plan.size)
    if_range = request.headers.get("if-range")
    if wanted is not None and if_range is not None and if_range != replay.etag:
        wanted = None  # the client's copy is another version: send the whole file (RFC 9110 §13.1.5)
    status = 200
    start, stop = 0, plan.size
    if wanted is not None:
        start, stop = wanted[0], wanted[1] + 1
        status = 206
        headers["Content-Range"] = f"bytes {wanted[0]}-{wanted[1]}/{plan.size}"
    headers["Content-Length"] = str(stop - start)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=MP4_TYPE)
    return StreamingResponse(
        _body(replays, replay, start, stop), status_code=status, headers=headers, media_type=MP4_TYPE
    )


async def sweeper(node: Node) -> None:
    """Apply recording retention every ``recording_sweep_seconds`` (first pass at start-up)."""
    while True:
        try:
            async with node.database.session() as db:
                await recordings.sweep(
                    db,
                    media_store(node),
                    now=node.clock(),
                    retention_days=node.config.recording_retention_days,
                )
        except Exception:
            logger.exception("recording sweep failed")
        await asyncio.sleep(max(1, node.config.recording_sweep_seconds))


async def _body(replays: Replays, replay: Replay, start: int, stop: int) -> AsyncIterator[bytes]:
    """The file's bytes, read and patched about a megabyte at a time in a worker thread."""
    store = replays.store
    chunks = replay.plan.chunks(start, stop, lambda infos: store.read_parts(replay.space_id, infos))
    while True:
        chunk = await asyncio.to_thread(next, chunks, None)
        if chunk is None:
            return
        yield chunk
