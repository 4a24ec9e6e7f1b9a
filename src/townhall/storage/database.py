"""The database behind a small interface.

``Database`` owns one SQLAlchemy async engine. The embedded default is a SQLite file (WAL,
foreign keys on); PostgreSQL is chosen by URL (``postgresql+asyncpg://...``). Both run the same
Alembic migrations at start-up, and on PostgreSQL an advisory lock keeps two nodes starting at
once from migrating twice.

On SQLite the cost of a small request is mostly round trips to aiosqlite's worker thread, so the
engine avoids those that do no work: no pre-ping on checkout (a file opened by this process
cannot drop a connection the way a server can), and no trip for opening or closing a cursor or
for a commit or rollback with no transaction open (see ``_SQLiteConnection``).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from threading import Thread
from typing import Any

import aiosqlite
from aiosqlite.context import contextmanager as aiosqlite_result
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import event, make_url, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry
from sqlalchemy.util import await_only
from sqlalchemy.util.queue import Empty, Full, QueueCommon

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
# Arbitrary constant naming townhall's migration lock in pg_advisory_lock.
_MIGRATION_LOCK_KEY = 0x70776E68616C6C


class Database:
    """An async engine and a session factory, with ``migrate``, ``ping`` and ``close``."""

    def __init__(self, url: str, *, schema: str | None = None) -> None:
        self.url = url
        if schema is not None and not schema.isidentifier():
            raise ValueError(f"database schema {schema!r} is not a plain identifier")
        self.schema = schema
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {}
        if not self.is_sqlite or _is_sqlite_file(url):
            # What SQLAlchemy would pick (a queue pool), but first come, first served.
            kwargs["poolclass"] = _FairQueuePool
        if self.is_sqlite:
            # No pool_pre_ping: the "server" is a file opened in this process, so a pooled
            # connection cannot go stale, and the ping cost a statement (four thread round trips)
            # on every checkout.
            kwargs["async_creator"] = self._connect_sqlite
        else:
            # A server can restart or a network path drop under pooled connections: ping on
            # checkout so that a request gets a live connection rather than an error.
            kwargs.update(pool_pre_ping=True, pool_size=10, max_overflow=20, pool_timeout=10)
            if schema:
                # Used by tests to give each run its own namespace on the shared server.
                kwargs["connect_args"] = {"server_settings": {"search_path": schema}}
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        async with self.sessions() as session:
            yield session

    async def migrate(self) -> None:
        """Bring the schema to the newest revision."""
        async with self.engine.begin() as conn:
            if not self.is_sqlite:
                await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
                if self.schema:
                    await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"'))
            await conn.run_sync(_upgrade, self.url)

    async def ping(self, wait_seconds: float) -> bool:
        """True when a trivial query answers within ``wait_seconds``."""
        try:
            async with asyncio.timeout(wait_seconds):
                async with self.engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
            return True
        except Exception as exc:  # any failure at all means "not ready"
            logger.warning("database ping failed", extra={"error": repr(exc)})
            return False

    async def close(self) -> None:
        await self.engine.dispose()

    async def _connect_sqlite(self) -> aiosqlite.Connection:
        """What the aiosqlite dialect would open for this URL, as a ``_SQLiteConnection``."""
        args, params = self.engine.dialect.create_connect_args(self.engine.url)
        params["timeout"] = 30  # as connect_args did: over any timeout in the URL
        connection = _SQLiteConnection(partial(sqlite3.connect, *args, **params), 64)
        # As SQLAlchemy does for aiosqlite: the worker thread must not keep the process alive.
        thread = connection if isinstance(connection, Thread) else connection._thread
        thread.daemon = True
        return await connection


class _SQLiteConnection(aiosqlite.Connection):
    """aiosqlite's connection, minus the worker-thread round trips for calls that do no I/O.

    aiosqlite queues every call to the connection's worker thread and waits for the answer; on
    the 2-core target a round trip costs about 0.2 ms, more than the query itself, and the
    SQLAlchemy adapter makes six of them for a one-statement read (cursor, execute, fetch,
    close, then two rollbacks when the session closes). Three of those need no thread:

    - ``cursor()`` only builds a Python object (sqlite3 prepares nothing until ``execute``);
    - closing a cursor whose rows were all fetched only drops references (sqlite3 reset the
      statement when it ran out of rows), which is how SQLAlchemy's adapter reads every result;
    - ``commit()`` and ``rollback()`` with no transaction open (``in_transaction`` false) are
      no-ops in sqlite3 itself, and a read never opens one in sqlite3's default mode.

    These run on the calling thread instead. The connection is opened with
    ``check_same_thread=False`` (as SQLAlchemy's dialect always does), and SQLAlchemy never has
    two calls in flight on one connection, so the worker thread is idle whenever they run.
    ``execute`` and the fetches, which do the work, still go to the worker thread.
    """

    @aiosqlite_result
    async def cursor(self) -> aiosqlite.Cursor:
        return _SQLiteCursor(self, self._conn.cursor())

    async def commit(self) -> None:
        if self.in_transaction:
            await super().commit()

    async def rollback(self) -> None:
        if self.in_transaction:
            await super().rollback()


class _SQLiteCursor(aiosqlite.Cursor):
    """See ``_SQLiteConnection``: ``close`` without a round trip to the worker thread."""

    async def close(self) -> None:
        self._cursor.close()


def _is_sqlite_file(url: str) -> bool:
    """A file database (SQLAlchemy's own test): in-memory ones keep the dialect's pool."""
    parsed = make_url(url)
    return bool(parsed.database) and parsed.database != ":memory:" and parsed.query.get("mode") != "memory"


class _FairQueue(QueueCommon[ConnectionPoolEntry]):
    """The pool's queue of idle connections, handing each returned connection to the request
    that has waited longest for one.

    SQLAlchemy's asyncio queue lets a newcomer take a connection that was just returned ahead
    of the requests already waiting (each ``get`` first tries ``get_nowait``), and a waiter
    that loses the race goes back to the end of the line. Once requests are short, that starves
    a few of them under load: with 64 clients on 15 connections, most pool waits were 0 ms but
    the 99th percentile was 4 s (and the pool's timeout, 30 s on SQLite and 10 s on PostgreSQL,
    would turn the worst into errors). Here ``put`` gives the connection straight to the oldest
    live waiter, so waits stay in arrival order.

    Only the calls ``QueuePool`` makes are supported: ``put`` never blocks (a full queue raises
    ``Full`` and the pool closes the surplus connection), and a blocking ``get`` waits on the
    running event loop, from inside SQLAlchemy's greenlet like its own asyncio queue.
    """

    def __init__(self, maxsize: int = 0, use_lifo: bool = False) -> None:
        self.maxsize = maxsize
        self.use_lifo = use_lifo
        self._idle: deque[ConnectionPoolEntry] = deque()
        self._waiters: deque[asyncio.Future[ConnectionPoolEntry]] = deque()

    def empty(self) -> bool:
        return not self._idle

    def full(self) -> bool:
        return 0 < self.maxsize <= len(self._idle)

    def qsize(self) -> int:
        return len(self._idle)

    def put_nowait(self, item: ConnectionPoolEntry) -> None:
        if self._hand_over(item):
            return
        if self.full():
            raise Full()
        self._idle.append(item)

    def put(self, item: ConnectionPoolEntry, block: bool = True, timeout: float | None = None) -> None:
        self.put_nowait(item)

    def get_nowait(self) -> ConnectionPoolEntry:
        if not self._idle:
            raise Empty()
        return self._idle.pop() if self.use_lifo else self._idle.popleft()

    def get(self, block: bool = True, timeout: float | None = None) -> ConnectionPoolEntry:
        # Idle connections and live waiters never coexist (``put`` serves waiters first), so
        # taking an idle one here jumps no queue.
        if self._idle or not block:
            return self.get_nowait()
        return await_only(self._wait(timeout_s=timeout))

    def _hand_over(self, item: ConnectionPoolEntry) -> bool:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():  # skip waiters that timed out or were cancelled
                waiter.set_result(item)
                return True
        return False

    async def _wait(self, *, timeout_s: float | None) -> ConnectionPoolEntry:
        waiter: asyncio.Future[ConnectionPoolEntry] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                return await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                # Handed a connection, then cancelled before taking it: pass it on rather than
                # lose it (over ``maxsize`` if need be: the pool still counts it as open).
                item = waiter.result()
                if not self._hand_over(item):
                    self._idle.append(item)
            else:
                waiter.cancel()
            if isinstance(exc, TimeoutError):
                raise Empty() from exc  # QueuePool turns this into its TimeoutError
            raise


class _FairQueuePool(AsyncAdaptedQueuePool):
    """``AsyncAdaptedQueuePool`` with ``_FairQueue``: same sizes, overflow and timeout."""

    _queue_class = _FairQueue
    # Log under the pool's usual name, inside the "sqlalchemy" logger (WARNING unless configured),
    # not under this module, where the CLI's INFO level would print the pool's chatter.
    _sqla_logger_namespace = "sqlalchemy.pool.impl.AsyncAdaptedQueuePool"


def _upgrade(connection: Connection, url: str) -> None:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
