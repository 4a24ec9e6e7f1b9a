"""Events between nodes over the machine's real Redis (127.0.0.1:6379)."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from townhall.events import (
    EVENT_TYPES,
    ReactionsTick,
    RedisEventBus,
    SpaceEnded,
    SpaceEvent,
    SpeakerMuted,
    SpeakerRevoked,
    decode_event,
    encode_event,
)

REDIS = "redis://127.0.0.1:6379/0"


def test_every_event_round_trips_through_its_wire_form() -> None:
    samples = [
        SpaceEnded("s1"),
        SpeakerRevoked("s1", 7, "g-1"),
        SpeakerMuted("s1", 7, True),
        ReactionsTick("s1", 1700000000, (("👏", 3), ("🔥", 1))),
    ]
    assert {type(e).__name__ for e in samples} <= set(EVENT_TYPES)
    for event in samples:
        back, origin = decode_event(encode_event(event, "node-a"))
        assert back == event and origin == "node-a"
    for junk in ("", "{}", '{"type":"Nope","from":"x","fields":{}}', '{"type":"SpaceEnded","from":"x"}'):
        with pytest.raises(ValueError):
            decode_event(junk)
    with pytest.raises(ValueError):
        decode_event('{"type":"SpaceEnded","from":"x","fields":{"space_id":"s","extra":1}}')


def test_nodes_hear_each_other_and_apply_what_they_hear() -> None:
    """Node A's event reaches node B's subscribers and B's ``on_remote`` (B applies it), not A's
    own ``on_remote`` (A applied it before publishing); malformed messages are ignored."""
    channel = f"townhall-test:{secrets.token_hex(4)}:events"

    async def scenario() -> None:
        applied: dict[str, list[SpaceEvent]] = {"a": [], "b": []}

        def applier(name: str):  # type: ignore[no-untyped-def]
            async def apply(event: SpaceEvent) -> None:
                applied[name].append(event)

            return apply

        a = RedisEventBus(REDIS, "node-a", applier("a"), channel=channel)
        b = RedisEventBus(REDIS, "node-b", applier("b"), channel=channel)
        await a.start()
        await b.start()
        try:
            for _ in range(100):
                if a.connected and b.connected:
                    break
                await asyncio.sleep(0.02)
            assert a.connected and b.connected
            async with a.listening() as at_a, b.listening("s1") as at_b:
                await b._redis.publish(channel, "not json")  # ignored, the reader goes on
                await a.publish(SpeakerRevoked("s1", 7, "g-1"))
                await a.publish(SpeakerMuted("s2", 8, True))  # another space: not for at_b
                await a.publish(SpaceEnded("s1"))
                got_b = [await asyncio.wait_for(at_b.get(), 5) for _ in range(2)]
                got_a = [at_a.get_nowait() for _ in range(3)]  # local delivery is immediate
            assert got_b == [SpeakerRevoked("s1", 7, "g-1"), SpaceEnded("s1")]
            assert got_a == [SpeakerRevoked("s1", 7, "g-1"), SpeakerMuted("s2", 8, True), SpaceEnded("s1")]
            assert applied["b"] == [
                SpeakerRevoked("s1", 7, "g-1"),
                SpeakerMuted("s2", 8, True),
                SpaceEnded("s1"),
            ]
            assert applied["a"] == []
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_a_bus_without_redis_keeps_delivering_locally() -> None:
    """Redis unreachable: local subscribers still get every event, publishing does not raise
    or wait long, and the failure is counted."""

    async def scenario() -> None:
        bus = RedisEventBus("redis://127.0.0.1:1/0", "lonely", channel="townhall-test:nowhere")
        await bus.start()
        try:
            async with bus.listening() as queue:
                loop = asyncio.get_running_loop()
                began = loop.time()
                await bus.publish(SpaceEnded("s1"))
                assert loop.time() - began < 3
                assert queue.get_nowait() == SpaceEnded("s1")
            assert bus.publish_failures == 1 and not bus.connected
        finally:
            await bus.close()

    asyncio.run(scenario())
