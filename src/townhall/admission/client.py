"""The client's side of admission: join a space the way the API asks to be joined.

``admit`` posts the join and follows every answer a storm can give until it has a ticket: a
202 waits ``Retry-After`` and comes back with its queue token (the position only falls); a 429
or a shed 503 waits ``Retry-After`` and tries again; a 403 ``pow_required`` (attack mode) fetches
a challenge and solves it in a worker thread. Anything else is a refusal to report. Used by
``townhall listen``; the web page does the same in ``web/static/js/space.js``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from townhall.admission.pow import solve

POW_RETRY = {"pow_required", "pow_expired", "pow_reused", "pow_too_easy", "pow_wrong"}


class AdmissionRefused(Exception):
    def __init__(self, message: str, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _code(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""


async def _challenge(
    http: httpx.AsyncClient, base: str, sleep: Callable[[float], Awaitable[None]], deadline: float
) -> dict[str, Any]:
    """A proof-of-work challenge; a shed or limited answer is waited out (``Retry-After``)."""
    while True:
        r = await http.get(f"{base}/api/v1/pow/challenge")
        if r.status_code == 200:
            return dict(r.json())
        wait = r.headers.get("retry-after", "")
        if r.status_code not in (429, 503) or not wait.isdigit() or time.monotonic() + int(wait) > deadline:
            raise AdmissionRefused(f"no proof-of-work challenge ({r.status_code} {_code(r)})", r.status_code)
        await sleep(float(wait))


async def admit(
    http: httpx.AsyncClient,
    join_url: str,
    *,
    headers: dict[str, str] | None = None,
    give_up_after: float = 3600.0,
    on_wait: Callable[[int, float], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> dict[str, Any]:
    """The join's 200 body (``ticket``, ``hls_url``, ``expires_at``, ``listener``).
    ``on_wait(position, estimated_seconds)`` is told each place in the waiting room."""
    base = join_url.split("/api/v1/", 1)[0]
    body: dict[str, str] = {}
    proofs = 0
    deadline = time.monotonic() + give_up_after
    while True:
        r = await http.post(join_url, json=body or None, headers=headers)
        if r.status_code == 200:
            return dict(r.json())
        code = _code(r)
        if r.status_code == 202:
            queued = r.json()
            body = {"queue_token": str(queued["queue_token"])}
            if on_wait is not None:
                on_wait(int(queued["position"]), float(queued["estimated_wait_seconds"]))
            wait = float(r.headers.get("retry-after", queued.get("retry_after", 1)))
        elif r.status_code in (429, 503) and r.headers.get("retry-after", "").isdigit():
            wait = float(r.headers["retry-after"])
        elif r.status_code == 403 and code in POW_RETRY and "queue_token" not in body and proofs < 3:
            proofs += 1
            challenge = await _challenge(http, base, sleep, deadline)
            nonce = await asyncio.to_thread(solve, challenge["challenge"], int(challenge["difficulty"]))
            body = {"pow_challenge": str(challenge["challenge"]), "pow_nonce": nonce}
            continue
        else:
            try:
                message = str(r.json()["error"]["message"])
            except (ValueError, KeyError, TypeError):
                message = r.text[:200]
            raise AdmissionRefused(f"join refused ({r.status_code} {code}): {message}", r.status_code, code)
        if time.monotonic() + wait > deadline:
            raise AdmissionRefused(f"still not admitted after {give_up_after:.0f} s", r.status_code, code)
        await sleep(wait)
