"""The space snapshots a join reads instead of the database (``admission.gate.SpaceSnapshots``),
on a real SQLite database: one read for many concurrent askers, a replacement read started in
the background (once) before a snapshot lapses, and a local change during a read."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tests.support import make_config
from townhall.admission.gate import SpaceSnapshots
from townhall.control.node import Node
from townhall.social import accounts
from townhall.spaces import service


async def live_space(tmp_path: Path) -> tuple[Node, accounts.Principal, str]:
    """A node on a real SQLite database with one live space, and its host."""
    node = Node.from_config(make_config("sqlite", tmp_path / "data"))
    await node.database.migrate()
    async with node.database.session() as db:
        host = await accounts.create_account(db, node.hasher, "host", "password123", now=time.time())
        principal = accounts.Principal(account=host, session_id=0)
        space = await service.create_space(
            db, principal, "s", scheduled_for=None, recorded=False, now=time.time()
        )
        await service.start_space(db, principal, space.id, now=time.time())
    return node, principal, space.id


def test_one_read_for_many_askers_one_refresh_ahead_and_no_stale_store(tmp_path: Path) -> None:
    async def scenario() -> None:
        node, _host, space_id = await live_space(tmp_path)
        now = [100.0]
        snaps = SpaceSnapshots(node.database, ttl=1.0, clock=lambda: now[0])
        try:
            assert not snaps.fresh(space_id)
            got = await asyncio.gather(*(snaps.get(space_id) for _ in range(20)))
            assert snaps.reads == 1 and {s.state for s in got if s is not None} == {"live"}

            now[0] += 0.85  # past 80 % of its life: answered, and replaced in the background
            assert all(snaps.fresh(space_id) for _ in range(20))
            assert len(await asyncio.gather(*(snaps.get(space_id) for _ in range(5)))) == 5
            for _ in range(500):
                if not snaps._pending:
                    break
                await asyncio.sleep(0.01)
            assert snaps.reads == 2  # one replacement, however many asked meanwhile
            now[0] += 0.5  # the replacement is half its life old
            assert snaps.fresh(space_id) and snaps.reads == 2

            now[0] += 5  # lapsed: the next asker reads; a local change lands during that read
            asking = asyncio.ensure_future(snaps.get(space_id))
            for _ in range(3):
                await asyncio.sleep(0)
            assert snaps._pending, "the read is under way"
            snaps.invalidate(space_id)
            await asking
            assert not snaps.fresh(space_id)  # the read from before the change was not kept
            await snaps.get(space_id)
            assert snaps.fresh(space_id) and snaps.reads == 4
        finally:
            await node.database.close()

    asyncio.run(scenario())


def test_an_asker_after_a_local_change_does_not_share_the_read_from_before_it(tmp_path: Path) -> None:
    """The host ends the space while a snapshot read is on its way: a join asking after the
    change gets a read of its own (the space ended), not the read begun before it (live)."""

    async def scenario() -> None:
        node, principal, space_id = await live_space(tmp_path)
        snaps = SpaceSnapshots(node.database, ttl=60.0)
        try:
            before = asyncio.ensure_future(snaps.get(space_id))
            await asyncio.sleep(0)
            assert snaps._pending, "the read is under way"
            async with node.database.session() as db:
                await service.end_space(db, principal, space_id, now=time.time())
            snaps.invalidate(space_id)
            after = await snaps.get(space_id)
            assert after is not None and after.state == "ended"
            assert snaps.reads == 2
            await before  # its asker keeps the answer of the read it joined
            cached = await snaps.get(space_id)
            assert cached is not None and cached.state == "ended"  # the older read was not stored
        finally:
            snaps.close()
            await node.database.close()

    asyncio.run(scenario())
