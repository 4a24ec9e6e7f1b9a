"""The stage process: ``python -m townhall.stage.worker FD``, started by a node.

Why a process of its own: the mixer's 20 ms clock must not wait behind HTTP work. In the
node's process a flood of listener or API requests holds the event loop (and the GIL) for
hundreds of milliseconds at a time; here the only work is the speakers' media, so the clock
runs on an event loop and a GIL that no HTTP request can touch. What is left is the operating
system's scheduler, which shares the cores: a niced process gets a larger share of a busy core
but no bound on how long it waits to be woken, so with ``stage_realtime`` (the default) the
process asks for ``SCHED_RR`` before it starts any thread (every thread inherits it; the
kernel's real-time throttling still leaves the rest of the machine 5 % of every second), and
falls back to ``nice`` where that is not allowed. Measured in BENCHMARKS.md ("Stage"): tick
p99 under HTTP floods 1.6-1.9 ms in ``SCHED_RR`` against 5.9-17.9 ms niced.

The process serves requests arriving over the socket ``FD`` (see ``stage/channel.py``) and
pushes encoded parts, levels (every 250 ms) and statistics (every second) back. When the node
goes away (its end of the socket closes, even by ``kill -9``), every room is closed and every
packager flushed before the process exits: the parts in flight still reach the store.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from townhall.stage.channel import Channel, Message, StageError
from townhall.stage.hub import StageHub
from townhall.stage.ice import restrict_host_addresses
from townhall.stage.threads import NICE, REALTIME_PRIORITY
from townhall.storage.media_store import LocalMediaStore

logger = logging.getLogger("townhall.stage.worker")

LEVELS_EVERY = 0.25
STATS_EVERY = 1.0


class Worker:
    def __init__(self) -> None:
        self.hub: StageHub | None = None
        self.channel: Channel | None = None

    def _hub(self) -> StageHub:
        if self.hub is None:
            raise StageError(503, "stage_starting", "the stage process is not configured yet")
        return self.hub

    def _notify(self, op: str, payload: bytes = b"", **fields: Any) -> None:
        if self.channel is not None:
            self.channel.notify(op, payload, **fields)

    async def handle(self, message: Message, payload: bytes) -> Message | None:
        op = message["op"]
        if op == "configure":
            restrict_host_addresses(message["media_addresses"])
            self.hub = StageHub(
                self._notify,
                LocalMediaStore(Path(message["media_root"])),
                message["ice_servers"],
                float(message["part_target"]),
                int(message["bitrate"]),
            )
            settle_heap()
            return {"pid": os.getpid()}
        hub = self._hub()
        if op == "start":
            hub.room(message["space"])
            return {}
        if op == "end":
            await hub.end(message["space"])
            return {}
        if op == "whip":
            peer = await hub.open_whip(
                message["space"], message["speaker"], message["grant"], bool(message["muted"]), message["sdp"]
            )
            return {"peer": peer.id, "answer": peer.pc.localDescription.sdp}
        if op == "whep":
            peer = await hub.open_whep(message["space"], message["who"], message["grant"], message["sdp"])
            return {"peer": peer.id, "answer": peer.pc.localDescription.sdp}
        if op == "drop":
            return {"found": await hub.drop(message["space"], message["peer"])}
        if op == "mute":
            hub.mute(message["space"], message["speaker"], bool(message["muted"]))
            return {}
        if op == "revoke":
            await hub.revoke(message["grant"])
            return {}
        if op == "stats":
            return hub.stats()
        raise StageError(400, "unknown_op", f"unknown stage request {op!r}")

    async def report(self) -> None:
        n = 0
        while True:
            await asyncio.sleep(LEVELS_EVERY)
            n += 1
            if self.hub is None:
                continue
            self._notify("levels", levels=self.hub.levels())
            if n % round(STATS_EVERY / LEVELS_EVERY) == 0:
                self._notify("stats", **self.hub.stats())


def settle_heap() -> None:
    """Move everything alive now (modules, aiortc, PyAV, the hub) out of the collector's reach.

    A full collection walks every tracked object while holding the loop: with 13 speakers on
    stage that was 41 ms over ~63,000 objects, two late ticks each time one ran; with the start-up
    heap frozen it was 8.6 ms over ~15,600 (BENCHMARKS.md, "Stage"). Called while no room
    runs (start-up, configuration), after a collection, so no garbage is frozen with it."""
    gc.collect()
    gc.freeze()


async def serve(fd: int) -> None:
    settle_heap()
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_connection(sock=sock)
    worker = Worker()
    worker.channel = Channel(reader, writer, worker.handle)
    reporting = asyncio.create_task(worker.report())
    try:
        await worker.channel.run()
    finally:
        reporting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporting
        if worker.hub is not None:
            await worker.hub.close()
        await worker.channel.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="townhall-stage", description=__doc__.splitlines()[0])
    parser.add_argument("fd", type=int, help="the socket shared with the node")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--realtime", action="store_true", help="ask for SCHED_RR (else nice)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="stage %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("townhall").setLevel(args.log_level.upper())  # aioice/aiortc stay at WARNING
    logger.info("stage process scheduling: %s", prioritise(args.realtime))
    asyncio.run(serve(args.fd))


def prioritise(realtime: bool) -> str:
    """Ask to be woken promptly: ``SCHED_RR`` if asked and allowed, else a lower nice value.
    Called before any thread starts, so that every thread of the process inherits it."""
    if realtime:
        try:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(REALTIME_PRIORITY))
            return "SCHED_RR"
        except (PermissionError, OSError, AttributeError):
            pass
    try:
        os.nice(NICE)
        return f"nice {NICE}"
    except (PermissionError, OSError):
        return "default"


if __name__ == "__main__":
    main()
