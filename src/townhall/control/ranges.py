"""HTTP byte ranges (RFC 9110 §14): one ``bytes=start-end`` range, as media players send."""

from __future__ import annotations

import re

from townhall.errors import RangeNotSatisfiable

_RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")


def byte_range(spec: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive ``(first, last)`` byte of ``spec`` within ``size`` bytes, or None for no
    range; 416 for a range that cannot be served (several ranges, past the end, malformed)."""
    if not spec:
        return None
    m = _RANGE.fullmatch(spec.strip())
    if not m or (not m.group(1) and not m.group(2)):
        raise RangeNotSatisfiable("only a single bytes=start-end range is supported")
    if m.group(1):
        start = int(m.group(1))
        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
    else:
        start, end = max(0, size - int(m.group(2))), size - 1
    if start > end or start >= size:
        raise RangeNotSatisfiable(f"the object is {size} bytes")
    return start, end
