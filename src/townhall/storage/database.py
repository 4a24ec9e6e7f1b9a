"""The database behind a small interface.

``Database`` owns one SQLAlchemy async engine. The embedded default is a SQLite file (WAL,
foreign keys on); PostgreSQL is chosen by URL (``postgresql+asyncpg://...``). Both run the same
Alembic migrations at start-up, and on PostgreSQL an advisory lock keeps two nodes starting at
once from migrating twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

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
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": 30}
        elif schema:
            # Used by tests to give each run its own namespace on the shared server.
            kwargs["connect_args"] = {"server_settings": {"search_path": schema}}
        if not self.is_sqlite:
            kwargs.update(pool_size=10, max_overflow=20, pool_timeout=10)
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
