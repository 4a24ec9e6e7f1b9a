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
from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

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
    - closing a cursor after its rows were fetched only drops references;
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
