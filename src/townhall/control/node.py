"""What one running node holds: its config and its connections to the swappable edges."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable

from townhall.admission.gate import Admission
from townhall.admission.limiter import Limiter, LimitsLimiter
from townhall.admission.pow import POW_PURPOSE, PowBook
from townhall.admission.queue_store import queue_store_from_url
from townhall.admission.tickets import PURPOSE as TICKET_PURPOSE
from townhall.admission.tickets import TicketBook
from townhall.admission.waiting_room import QUEUE_PURPOSE, QueueTokenBook
from townhall.audience.origin import Origin
from townhall.audience.playlist import PlaylistSpec
from townhall.config import Config, ConfigError
from townhall.events import (
    InProcessEventBus,
    RedisEventBus,
    SpaceEnded,
    SpaceEvent,
    SpaceStarted,
    SpeakerMuted,
    SpeakerRevoked,
    StageChanged,
)
from townhall.scaleout.placement import LocalPlacement, Placement, RedisPlacement
from townhall.security.passwords import PasswordHasher
from townhall.security.signing import Signer, load_or_create_key_set
from townhall.spaces import service
from townhall.spaces.grants import PURPOSE as GRANT_PURPOSE
from townhall.spaces.grants import GrantBook
from townhall.spaces.live import LiveHub
from townhall.spaces.service import Outcome
from townhall.stage.channel import StageError
from townhall.stage.ice import media_addresses_for
from townhall.stage.pool import StagePool, default_stage_processes
from townhall.stage.process import StageSettings, speaker_key
from townhall.storage.database import Database

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Node:
    config: Config
    database: Database
    hasher: PasswordHasher
    limiter: Limiter
    bus: InProcessEventBus
    grants: GrantBook
    tickets: TicketBook
    hub: LiveHub
    stage: StagePool
    origin: Origin
    placement: Placement
    admission: Admission
    clock: Callable[[], float] = time.time
    _tasks: list[asyncio.Task[None]] = dataclasses.field(default_factory=list)

    @classmethod
    def from_config(cls, config: Config, limiter: Limiter | None = None) -> Node:
        keys = load_or_create_key_set(config.signing_keys, config.data)
        database = Database(config.effective_database_url, schema=config.database_schema or None)
        bus: InProcessEventBus = (
            RedisEventBus(config.redis_url, node_name(), channel=f"{config.redis_prefix}:events")
            if config.redis_url
            else InProcessEventBus()
        )
        try:
            for network in config.trusted_proxies.split(","):
                if network.strip():
                    ipaddress.ip_network(network.strip(), strict=False)
        except ValueError as exc:
            raise ConfigError(f"trusted_proxies: {exc}") from exc
        if not 0.2 <= config.hls_part_seconds <= 1.0 or not 1 <= config.hls_segment_parts <= 12:
            raise ConfigError("hls_part_seconds must be 0.2-1.0 and hls_segment_parts 1-12")
        spec = PlaylistSpec(
            part_target=config.hls_part_seconds,
            segment_target=config.hls_part_seconds * config.hls_segment_parts,
        )
        origin = Origin(spec, config.hls_segment_parts)
        if config.stage_processes < 0:
            raise ConfigError("stage_processes must be 0 (one per CPU) or more")
        stage = StagePool(
            origin,
            StageSettings(
                media_root=str(config.data / "media"),
                ice_servers=[u.strip() for u in config.ice_servers.split(",") if u.strip()],
                media_addresses=media_addresses_for(config.media_addresses, config.host),
                part_target=config.hls_part_seconds,
                bitrate=config.aac_bitrate,
                log_level=config.log_level,
                realtime=config.stage_realtime,
            ),
            config.stage_processes or default_stage_processes(),
        )
        limiter = limiter or LimitsLimiter.from_url(config.redis_url or None, config.redis_prefix)
        tickets = TicketBook(Signer(keys, TICKET_PURPOSE), config.ticket_ttl_seconds)
        admission = Admission(
            config,
            database=database,
            limiter=limiter,
            store=queue_store_from_url(
                config.redis_url or None,
                config.redis_prefix,
                [u.strip() for u in config.waiting_room_redis_urls.split(",") if u.strip()],
            ),
            tickets=tickets,
            queue_tokens=QueueTokenBook(Signer(keys, QUEUE_PURPOSE), config.queue_token_ttl_seconds),
            pow_book=PowBook(Signer(keys, POW_PURPOSE), config.pow_challenge_ttl_seconds),
            clock=time.time,
        )
        node = cls(
            config=config,
            database=database,
            hasher=PasswordHasher(
                config.argon2_time_cost, config.argon2_memory_kib, config.argon2_parallelism
            ),
            limiter=limiter,
            bus=bus,
            grants=GrantBook(Signer(keys, GRANT_PURPOSE), config.speaker_token_ttl_seconds),
            tickets=tickets,
            hub=LiveHub(database, bus, time.time, levels=stage.levels),
            stage=stage,
            origin=origin,
            placement=(
                RedisPlacement(
                    config.redis_url,
                    config.effective_relay_url,
                    prefix=config.redis_prefix,
                    lease_seconds=config.stage_lease_seconds,
                )
                if config.redis_url
                else LocalPlacement(config.effective_relay_url)
            ),
            admission=admission,
        )
        if isinstance(bus, RedisEventBus):
            bus.on_remote = node.apply_remote
        return node

    def set_clock(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.hub.clock = clock
        self.admission.clock = clock

    async def start(self) -> None:
        self.config.data.mkdir(parents=True, exist_ok=True)
        await self.database.migrate()
        await self.hub.start()
        if isinstance(self.bus, RedisEventBus):
            await self.bus.start()
        self._tasks.append(asyncio.create_task(self._renew_leases()))
        self._tasks.append(asyncio.create_task(self._resume_live_spaces()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.stage.stop()
        await self.hub.stop()
        await self.placement.close()
        if isinstance(self.bus, RedisEventBus):
            await self.bus.close()
        await self.admission.close()
        await self.limiter.close()
        await self.database.close()

    async def publish(self, outcome: Outcome) -> None:
        """Announce what a committed operation changed, once this node has applied it: the
        stage applies it before the API answers (a revoked speaker is cut off, a mute is in
        the mixer, an ended space's last part is encoded)."""
        for event in outcome.events:
            await self._apply(event, local=True)
            await self.bus.publish(event)

    async def redis_ping(self, within: float) -> bool:
        """Whether Redis answers (True when none is configured)."""
        if not isinstance(self.bus, RedisEventBus):
            return True
        return await self.bus.ping(within)

    async def apply_remote(self, event: SpaceEvent) -> None:
        """Another node's event (over Redis): its effects here, as a local one's."""
        await self._apply(event, local=False)

    async def _apply(self, event: SpaceEvent, *, local: bool) -> None:
        """What an event changes on this node: a revoked grant refused (before anyone hears of
        it: no window where this node accepts it) and its media cut, a mute in the mixer, a
        space started here staged where it is claimed (here, unless another node holds it),
        an ended space's stage closed and its claim released, cached state re-read."""
        if isinstance(event, SpeakerRevoked):
            self.grants.revoke(event.grant_id, self.clock())
        try:
            if isinstance(event, SpeakerRevoked):
                await self.stage.revoke(event.grant_id)
            elif isinstance(event, SpeakerMuted):
                await self.stage.mute(event.space_id, speaker_key(event.account_id), event.muted)
            elif isinstance(event, SpaceStarted) and local:
                if await self.placement.claim(event.space_id) == self.placement.me:
                    await self.stage.start_space(event.space_id)
            elif isinstance(event, SpaceEnded) and (local or self.stage.hosts(event.space_id)):
                await self.stage.end_space(event.space_id)
                await self.placement.release(event.space_id)
        except StageError:
            # The stage is restarting: it comes back with no sessions, and every speaker who
            # reconnects is checked (and muted) against the database again.
            logger.warning("stage unavailable for an event", extra={"space": event.space_id})
        if isinstance(event, StageChanged | SpaceEnded | SpaceStarted):
            self.hub.invalidate(event.space_id)  # read-your-writes for the caller
            self.admission.snapshots.invalidate(event.space_id)  # joins see ends and blocks

    async def _renew_leases(self) -> None:
        """Keep this node's claim on the spaces whose stage it runs (a third of the lease)."""
        while True:
            await asyncio.sleep(self.config.stage_lease_seconds / 3)
            try:
                lost = await self.placement.renew(self.stage.live_spaces())
            except Exception as exc:  # Redis down: the leases run on; the stages go on here
                logger.warning("could not renew stage leases: %s", exc)
                continue
            for space_id in lost:
                logger.error("another node took over a space this node runs", extra={"space": space_id})

    async def _resume_live_spaces(self) -> None:
        """After a restart, every space still live in the database gets its stage back (the
        recording continues in a new epoch, after a discontinuity); a space whose host has not
        reconnected within ``host_grace_seconds`` is ended and its replay published, so that
        nothing is left half-finished."""
        async with self.database.session() as db:
            live = await service.live_space_hosts(db)
        if not live:
            return
        resumed_at = time.time()
        live = [(s, h) for s, h in live if await self.placement.claim(s) == self.placement.me]
        for space_id, _ in live:
            logger.info("resuming a live space after a restart", extra={"space": space_id})
            try:
                await self.stage.start_space(space_id)
            except StageError:
                logger.exception("could not resume a space", extra={"space": space_id})
        await asyncio.sleep(self.config.host_grace_seconds)
        for space_id, host_id in live:
            if self.stage.speaker_seen_since(space_id, speaker_key(host_id), resumed_at):
                continue
            async with self.database.session() as db:
                outcome = await service.end_abandoned(db, space_id, now=self.clock())
            if outcome.events:
                logger.warning("host did not return; space ended", extra={"space": space_id})
                await self.publish(outcome)


def node_name() -> str:
    """This node's name on the event bus: unique per process, readable in logs."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
