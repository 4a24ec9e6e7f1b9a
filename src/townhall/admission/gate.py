"""The admission gate: what a join or a renewal goes through, in order of cost.

1. Limits per address, per network (/24 of IPv4, /56 of IPv6) and per account (``limits``
   moving windows; memory or Redis).
2. In attack mode, an anonymous join must carry a solved proof of work (one HMAC, one SHA-256).
3. The space's state and block list, from a per-node snapshot rebuilt at most once per
   ``snapshot_ttl`` and dropped at once when a local event changes the space: a join storm on
   one space costs the database one small read a second, not one per join.
4. Capacity: the node's own caps (in memory: a node knows what it carries), then the space's
   waiting room (``waiting_room`` arithmetic on a ``QueueStore``). An anonymous join that would
   queue must first pass the stricter limits of places in the queue, per address and per
   network: a few attacking addresses cannot fill the queue ahead of the people behind them
   (the place is asked for only once the limits allow it, so a refused join draws no arrival
   number and costs the queue nothing). In attack mode the proof (2.) comes before any place.
   With ``waiting_room_splits`` K > 1 the space's waiting room is K independent splits: a new
   joiner is hashed by the listener id it will get, and its queue token and ticket name the
   split (``waiting_room`` says what a position means then).
5. A ticket: one HMAC. Nothing is written to the database.

Every refusal that names a culprit (429 of a limit, a missing, wrong or reused proof) is counted
towards attack mode; a shed 503 is not: shedding answers overload, whoever causes it (a
legitimate storm too), and counting it would ask proofs of a storm's listeners.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import select

from townhall.admission import waiting_room as wr
from townhall.admission.limiter import Limiter
from townhall.admission.pow import AttackMode, Challenge, PowBook, PowError
from townhall.admission.queue_store import AlreadyUsed, QueueStore
from townhall.admission.shedding import Priority, Shedder
from townhall.admission.tickets import Ticket, TicketBook, TicketError, listener_id
from townhall.admission.waiting_room import QueueTokenBook, QueueTokenError
from townhall.config import Config
from townhall.errors import Conflict, Forbidden, NotFound, TooManyRequests, Unauthorized
from townhall.security.tokens import token_digest
from townhall.storage.database import Database
from townhall.storage.models import Session, Space, SpaceBlock

logger = logging.getLogger(__name__)


def network_of(address: str) -> str:
    """The /24 of an IPv4 address or the /56 of an IPv6 one (a home or an office: what one
    party controls), as text; the address itself when it is not an IP."""
    head, dot, last = address.rpartition(".")
    if dot and last.isdigit() and head.count(".") == 2 and head.replace(".", "").isdigit():
        return f"{head}.0/24"  # the common case, without ipaddress's parsing (a join storm's path)
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 56
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def bearer_token(authorization: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None if it is not one (a
    join refuses that with 401; the protocol's join path leaves it to the ASGI way)."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token or len(token) > 256:
        return None
    return token.strip()


@dataclasses.dataclass(frozen=True)
class SpaceSnapshot:
    state: str
    blocked: frozenset[int]
    built_at: float


class SpaceSnapshots:
    """State and block list of spaces, read at most once per ``AHEAD`` × ``ttl`` per space per
    node; concurrent readers share one read. A snapshot asked for once it is ``AHEAD`` of its
    life old is still answered, and a read to replace it starts in the background: under
    steady joins a space's snapshot never lapses, so no join waits for the database (before,
    the joins of the moment each second's snapshot lapsed all waited for its read)."""

    AHEAD = 0.8

    def __init__(self, database: Database, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.database = database
        self.ttl = ttl
        self.clock = clock
        self._snaps: dict[str, SpaceSnapshot | None] = {}
        self._built: dict[str, float] = {}
        self._pending: dict[str, asyncio.Future[SpaceSnapshot | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._generation: dict[str, int] = {}
        self.reads = 0

    def _cached(self, space_id: str, now: float) -> bool:
        built = self._built.get(space_id)
        if built is None or space_id not in self._snaps:
            return False
        age = now - built
        if age >= self.ttl * self.AHEAD and space_id not in self._pending:
            self._start(space_id, now).add_done_callback(self._refreshed)
        return age < self.ttl

    @staticmethod
    def _refreshed(future: asyncio.Future[SpaceSnapshot | None]) -> None:
        if not future.cancelled() and future.exception() is not None:
            logger.warning("space snapshot refresh failed", exc_info=future.exception())

    def fresh(self, space_id: str) -> bool:
        """Whether ``get`` would answer from memory now (no read, no wait)."""
        return self._cached(space_id, self.clock())

    async def get(self, space_id: str) -> SpaceSnapshot | None:
        now = self.clock()
        if self._cached(space_id, now):
            return self._snaps[space_id]
        pending = self._pending.get(space_id) or self._start(space_id, now)
        return await asyncio.shield(pending)

    def _start(self, space_id: str, now: float) -> asyncio.Future[SpaceSnapshot | None]:
        """One read of the space, in a task of its own; its future is the space's pending read
        from now on (registered before the task runs, so a second asker in the same turn of
        the loop waits for this one rather than starting another)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[SpaceSnapshot | None] = loop.create_future()
        self._pending[space_id] = future
        task = loop.create_task(self._load(space_id, now, future))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return future

    async def _load(self, space_id: str, now: float, future: asyncio.Future[SpaceSnapshot | None]) -> None:
        generation = self._generation.get(space_id, 0)
        try:
            snap = await self._read(space_id, now)
            if len(self._snaps) > 10_000:  # unknown ids from a scan must not grow memory
                self._snaps.clear()
                self._built.clear()
                self._generation.clear()
            if self._generation.get(space_id, 0) == generation:  # no local change since the read began
                self._snaps[space_id], self._built[space_id] = snap, now
            future.set_result(snap)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody waited
        finally:
            if self._pending.get(space_id) is future:
                del self._pending[space_id]

    async def _read(self, space_id: str, now: float) -> SpaceSnapshot | None:
        self.reads += 1
        async with self.database.session() as db:
            state = (await db.execute(select(Space.state).where(Space.id == space_id))).scalar()
            if state is None:
                return None
            blocked = (
                await db.execute(select(SpaceBlock.account_id).where(SpaceBlock.space_id == space_id))
            ).scalars()
            return SpaceSnapshot(state, frozenset(blocked), now)

    def invalidate(self, space_id: str) -> None:
        """A local change (the space ended, someone was blocked): the next asker reads anew. A
        read already on its way began before the change, so it is no longer the space's pending
        read (its askers keep its answer; nobody later gets it, and it is not stored)."""
        self._snaps.pop(space_id, None)
        self._pending.pop(space_id, None)
        self._generation[space_id] = self._generation.get(space_id, 0) + 1

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()


class SessionCache:
    """Bearer token -> account id for joins, remembered ``ttl`` seconds (a join storm of logged
    in listeners costs one read per listener, not per retry). A logout or expiry takes effect
    on joins within ``ttl``."""

    def __init__(self, database: Database, ttl: float, clock: Callable[[], float]) -> None:
        self.database = database
        self.ttl = ttl
        self.clock = clock  # wall time: sessions expire at an epoch second
        self._known: dict[str, tuple[int | None, float]] = {}

    async def account_id(self, token: str) -> int:
        now = self.clock()
        digest = token_digest(token)
        hit = self._known.get(digest)
        if hit is None or not 0 <= now - hit[1] < self.ttl:
            async with self.database.session() as db:
                row = (
                    await db.execute(
                        select(Session.account_id, Session.expires_at, Session.revoked_at).where(
                            Session.token_hash == digest
                        )
                    )
                ).first()
            account = None if row is None or row[2] is not None or row[1] <= now else int(row[0])
            if len(self._known) > 100_000:
                self._known.clear()
            hit = self._known[digest] = (account, now)
        if hit[0] is None:
            raise Unauthorized("unknown, expired or revoked token", code="invalid_token")
        return hit[0]

    def known(self, token: str) -> bool:
        """Whether ``account_id`` would answer from memory now."""
        hit = self._known.get(token_digest(token))
        return hit is not None and 0 <= self.clock() - hit[1] < self.ttl


@dataclasses.dataclass(frozen=True)
class Admitted:
    token: str
    ticket: Ticket


@dataclasses.dataclass(frozen=True)
class Queued:
    token: str
    queue: wr.QueueToken
    wait: wr.Wait


class Admission:
    """A node's admission: limits, attack mode, shedding, capacity and the waiting room."""

    def __init__(
        self,
        config: Config,
        *,
        database: Database,
        limiter: Limiter,
        store: QueueStore,
        tickets: TicketBook,
        queue_tokens: QueueTokenBook,
        pow_book: PowBook,
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.limiter = limiter
        self.store = store
        self.tickets = tickets
        self.queue_tokens = queue_tokens
        self.pow_book = pow_book
        self.clock = clock
        self.snapshots = SpaceSnapshots(database, config.admission_snapshot_seconds)
        self.sessions = SessionCache(database, config.admission_session_cache_seconds, lambda: self.clock())
        self.attack = AttackMode(
            threshold=config.attack_threshold_per_second,
            base_bits=config.pow_base_bits,
            max_bits=config.pow_max_bits,
        )
        self.shedder = Shedder(target=config.shed_target_ms / 1000, interval=config.shed_interval_ms / 1000)
        ttl = float(config.ticket_ttl_seconds)
        self.space_cap = wr.Capacity(
            config.space_max_listeners, config.space_join_rate, config.space_join_burst, ttl
        )
        self.node_cap = wr.Capacity(
            config.node_max_listeners, config.node_join_rate, config.node_join_burst, ttl
        )
        self.splits = max(1, config.waiting_room_splits)
        self.split_caps = [wr.split_capacity(self.space_cap, k, self.splits) for k in range(self.splits)]
        self.node_counters = wr.Counters()
        self.refused = 0
        self.admitted = 0
        self.queued = 0

    def in_memory(self, space_id: str, authorization: str | None) -> bool:
        """Whether a join or renewal on ``space_id`` needs no I/O now: limits and waiting room
        in process memory, the space's snapshot fresh, the bearer token's session (if any)
        remembered. Then the async join runs to its end without suspending (what lets the HTTP
        protocol answer it in its callback, ``control.fastproto``); else it takes the ASGI way."""
        if not (self.limiter.in_memory and self.store.in_memory and self.snapshots.fresh(space_id)):
            return False
        if authorization is None:
            return True
        token = bearer_token(authorization)
        return token is not None and self.sessions.known(token)

    # -- refusals --------------------------------------------------------------------------------

    def rejected(self, count: int = 1, *, attack: bool = True) -> None:
        """Count refusals; ``attack``: towards attack mode as well (see the module's note)."""
        self.refused += count
        if attack:
            self.attack.rejected(self.clock(), count)

    async def _limit(self, rule: str, *key: str, what: str = "joins") -> None:
        decision = await self.limiter.hit(rule, *key)
        if not decision.allowed:
            self.rejected()
            raise TooManyRequests(
                f"too many {what} from here; retry in {decision.retry_after} s",
                retry_after=decision.retry_after,
            )

    def _rules(self, kind: str) -> tuple[str, str, str]:
        c = self.config
        if kind == "join":
            return c.join_limit_per_address, c.join_limit_per_network, c.join_limit_per_account
        return c.renew_limit_per_address, c.renew_limit_per_network, c.renew_limit_per_account

    async def limit_address(self, kind: str, address: str) -> None:
        """``kind`` "join" (new joins) or "renew" (renewals and queue returns: a higher
        allowance). Counted per address and per network."""
        rules = self._rules(kind)
        await self._limit(rules[0], kind, "addr", address)
        await self._limit(rules[1], kind, "net", network_of(address))

    async def limit_queue_place(self, address: str) -> None:
        """Places in a waiting room taken by anonymous joins, per address and per network."""
        c, what = self.config, "places in the waiting room"
        await self._limit(c.queue_limit_per_address, "queue", "addr", address, what=what)
        await self._limit(c.queue_limit_per_network, "queue", "net", network_of(address), what=what)

    async def limit_listener(self, kind: str, who: str) -> None:
        """Per account (``a<id>``) or per anonymous listener id."""
        await self._limit(self._rules(kind)[2], kind, "who", who)

    # -- proof of work ---------------------------------------------------------------------------

    def challenge(self) -> Challenge:
        now = self.clock()
        bits = self.attack.difficulty(now) or self.config.pow_base_bits
        return self.pow_book.issue(bits, now)

    async def check_pow(self, challenge: str | None, nonce: str | None) -> None:
        now = self.clock()
        if not self.attack.active(now):
            return
        if not challenge or not nonce:
            self.rejected()
            raise Forbidden(
                "the node is under attack: anonymous joins need a proof of work "
                "(GET /api/v1/pow/challenge, then send pow_challenge and pow_nonce), or log in",
                code="pow_required",
            )
        # Accept any challenge at least the base difficulty: a client that fetched one just
        # before the difficulty rose has already spent its work.
        try:
            solved = self.pow_book.check(challenge, nonce, now, min_difficulty=self.config.pow_base_bits)
        except PowError as exc:
            self.rejected()
            raise Forbidden(str(exc), code=exc.code) from exc
        once = await self.limiter.hit(f"1/{int(self.pow_book.ttl) + 1}second", "pow", solved.id)
        if not once.allowed:
            self.rejected()
            raise Forbidden("this proof of work has already been used", code="pow_reused")

    # -- joins -----------------------------------------------------------------------------------

    async def live_space(self, space_id: str) -> SpaceSnapshot:
        snap = await self.snapshots.get(space_id)
        if snap is None:
            raise NotFound("no such space", code="space_not_found")
        if snap.state == "ended":
            raise Conflict("this space has ended", code="space_ended")
        if snap.state != "live":
            raise Conflict("this space has not started", code="space_not_live")
        return snap

    async def join(
        self, space_id: str, account: int | None, queue_token: str | None, address: str | None = None
    ) -> Admitted | Queued:
        """After limits and proof: the snapshot, the block list, capacity, then a ticket or a
        place in the queue (for an anonymous joiner from ``address``, within the limits of
        places)."""
        snap = await self.live_space(space_id)
        if account is not None and account in snap.blocked:
            raise Forbidden("you are blocked from this space", code="blocked")
        now = self.clock()
        expires = round(now + self.tickets.ttl, 3)
        node_ok = wr.has_room(self.node_counters, self.node_cap, now)
        listener = listener_id(account)
        if queue_token:
            try:
                queued = self.queue_tokens.check(queue_token, space_id, now)
            except QueueTokenError as exc:
                raise Forbidden(str(exc), code=exc.code) from exc
            if queued.splits != self.splits:
                # Its number was drawn in a split that no longer exists as it was: it means
                # nothing in any split now.
                raise Conflict(
                    f"the space's waiting room has been re-split ({queued.splits} -> {self.splits} "
                    "splits) since this queue token was issued; join again without it",
                    code="queue_token_resplit",
                )
            split = queued.split
            try:
                decision = await self.store.claim(
                    space_id, self._cap(split), queued.number, now, expires, elsewhere_ok=node_ok, split=split
                )
            except AlreadyUsed:
                raise Conflict(
                    "this queue token has already admitted a listener", code="queue_token_used"
                ) from None
            text = queue_token
        else:
            split = self._split_of(listener)
            decision = await self._fresh(
                space_id, split, now, expires, node_ok, address if account is None else None
            )
            if isinstance(decision, wr.Wait):
                text, queued = self.queue_tokens.issue(space_id, decision.number, now, split, self.splits)
        if isinstance(decision, wr.Wait):
            self.queued += 1
            return Queued(text, queued, decision)
        self.admitted += 1
        if not wr.take(self.node_counters, self.node_cap, now, expires):
            wr.count_ticket(self.node_counters, self.node_cap, expires)  # admitted from the queue
        token, ticket = self.tickets.issue(space_id, listener, now, split)
        return Admitted(token, ticket)

    def _split_of(self, listener: str) -> int | None:
        """A new joiner's split (``None``: the space is not split)."""
        return wr.split_of(listener, self.splits) if self.splits > 1 else None

    def _cap(self, split: int | None) -> wr.Capacity:
        return self.space_cap if split is None else self.split_caps[split]

    async def _fresh(
        self, space_id: str, split: int | None, now: float, expires: float, node_ok: bool, limited: str | None
    ) -> wr.Decision:
        """A join without a queue token; one from the ``limited`` address (anonymous) takes a
        place only within the limits of places: asked not to queue first, it draws a number
        only once they allow it."""
        cap = self._cap(split)
        decision = await self.store.join(
            space_id, cap, now, expires, elsewhere_ok=node_ok, may_queue=not limited, split=split
        )
        if isinstance(decision, wr.Full):
            assert limited is not None
            await self.limit_queue_place(limited)
            decision = await self.store.join(space_id, cap, now, expires, elsewhere_ok=node_ok, split=split)
        assert not isinstance(decision, wr.Full)
        return decision

    async def renew(self, space_id: str, token: str) -> Admitted:
        """A fresh ticket for a still valid one of the same space and listener: no database
        (the snapshot answers whether the space is live and the listener not blocked)."""
        now = self.clock()
        try:
            old = self.tickets.check(token, space_id, now)
        except TicketError as exc:
            raise Forbidden(str(exc), code=exc.code) from exc
        snap = await self.live_space(space_id)
        who = old.listener
        if who.startswith("a") and who[1:].isdigit() and int(who[1:]) in snap.blocked:
            raise Forbidden("you are blocked from this space", code="blocked")
        # The split that counted the old ticket; after a change of K, the listener's split now
        # (the old ticket's count then lapses with it: counts are by expiry, never carried over).
        split = old.split if self.splits > 1 and old.split is not None and old.split < self.splits else None
        split = self._split_of(who) if split is None else split
        text, ticket = self.tickets.issue(space_id, old.listener, now, split)
        await self.store.renew(space_id, self._cap(split), old.expires_at, ticket.expires_at, now, split)
        wr.renew(self.node_counters, self.node_cap, old.expires_at, ticket.expires_at, now)
        return Admitted(text, ticket)

    def listener_of(self, token: str, space_id: str) -> str | None:
        """The listener id of a ticket (for the renewal limit), if it is genuine."""
        try:
            return self.tickets.check(token, space_id, self.clock()).listener
        except TicketError:
            return None

    async def close(self) -> None:
        self.snapshots.close()
        await self.store.close()


class AdmissionCollector:
    """Prometheus view of a node's admission: what it admitted, queued, refused and shed, and
    whether it is in attack mode (shed requests never reach the metrics middleware)."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    def collect(self) -> Iterator[Metric]:
        a = self.admission
        now = a.clock()
        joins = CounterMetricFamily("townhall_admission_joins", "joins by outcome", labels=["outcome"])
        joins.add_metric(["admitted"], a.admitted)
        joins.add_metric(["queued"], a.queued)
        yield joins
        refused = CounterMetricFamily(
            "townhall_admission_refused", "requests refused (429, shed 503, bad or missing proofs)"
        )
        refused.add_metric([], a.refused)
        yield refused
        shed = CounterMetricFamily(
            "townhall_admission_shed", "requests shed under overload", labels=["class"]
        )
        for priority in Priority:
            if priority is not Priority.NEVER:
                shed.add_metric([priority.name.lower()], a.shedder.shed_by_class.get(priority, 0))
        yield shed
        attack = GaugeMetricFamily("townhall_admission_attack_mode", "1 while anonymous joins need a proof")
        attack.add_metric([], 1.0 if a.attack.active(now) else 0.0)
        yield attack
        bits = GaugeMetricFamily(
            "townhall_admission_pow_difficulty", "proof-of-work bits asked now (0: none)"
        )
        bits.add_metric([], a.attack.difficulty(now))
        yield bits
        tickets = GaugeMetricFamily("townhall_admission_node_tickets", "live tickets this node has issued")
        tickets.add_metric([], a.node_counters.active_count(a.node_cap, now))
        yield tickets
