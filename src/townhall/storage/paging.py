"""Keyset pagination: newest first by a monotonically increasing id; the cursor is the id of
the last row of the previous page. Stable under concurrent inserts, O(page) per request."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVarTuple

from sqlalchemy import Row, Select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from townhall.errors import BadRequest

Ts = TypeVarTuple("Ts")


def parse_cursor(cursor: str | None) -> int | None:
    """Cursors are decimal ids this server issued; anything else is a 400."""
    if cursor is None or cursor == "":
        return None
    if not cursor.isascii() or not cursor.isdigit() or len(cursor) > 18:
        raise BadRequest("cursor is not one this server issued", code="invalid_cursor")
    return int(cursor)


async def keyset_page(
    db: AsyncSession,
    query: Select[*Ts],
    id_column: InstrumentedAttribute[int],
    *,
    cursor: str | None,
    limit: int,
) -> tuple[Sequence[Row[*Ts]], str | None]:
    """One page of ``query`` (whose first entity owns ``id_column``) and the next cursor."""
    before = parse_cursor(cursor)
    if before is not None:
        query = query.where(id_column < before)
    rows = (await db.execute(query.order_by(id_column.desc()).limit(limit + 1))).all()
    page = rows[:limit]
    next_cursor = None
    if len(rows) > limit and page:
        last: Any = page[-1]
        next_cursor = str(getattr(last[0], id_column.key))
    return page, next_cursor
