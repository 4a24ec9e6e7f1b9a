"""Alembic environment. townhall runs migrations itself at start-up (``Database.migrate``),
handing Alembic an open connection; the ``alembic`` command line works too, from a URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from townhall.storage.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite needs batch mode for ALTER TABLE
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    url = config.get_main_option("sqlalchemy.url") or ""
    # The command line runs synchronously: swap async drivers for their sync twins.
    url = url.replace("+aiosqlite", "").replace("+asyncpg", "+psycopg")
    engine = create_engine(url)
    with engine.begin() as conn:
        _run(conn)
