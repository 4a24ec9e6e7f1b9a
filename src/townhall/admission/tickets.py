"""Listener tickets: proof of admission that any node or edge checks alone (pure: ``now``).

A ticket binds one space and one listener id and expires; the join endpoint issues it, and
every listener request carries it (query parameter or cookie). Checking it is one HMAC with
no database or network call.
"""

from __future__ import annotations

import base64
import dataclasses
import secrets

from townhall.security.signing import SignatureError, Signer

PURPOSE = "townhall listener ticket v1"


@dataclasses.dataclass(frozen=True)
class Ticket:
    space_id: str
    listener: str
    expires_at: float
    split: int | None = None  # the waiting-room split that counts it (None: not split)


class TicketError(ValueError):
    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class _RandomPool:
    """Random bytes from the OS drawn 4 KiB at a time: one ``getrandom`` call per ~450 anonymous
    joins instead of one per join (a join storm's path; the bytes are the same CSPRNG's)."""

    def __init__(self, size: int = 4608) -> None:
        self.size = size
        self.buffer = b""
        self.at = 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.buffer):
            self.buffer, self.at = secrets.token_bytes(self.size), 0
        self.at += n
        return self.buffer[self.at - n : self.at]


_POOL = _RandomPool()


def listener_id(account_id: int | None) -> str:
    """Accounts listen as ``a<id>``; anonymous listeners get a random id per join (72 bits, in
    the form of ``secrets.token_urlsafe(9)``)."""
    if account_id is not None:
        return f"a{account_id}"
    return "g" + base64.urlsafe_b64encode(_POOL.take(9)).decode("ascii")


class TicketBook:
    def __init__(self, signer: Signer, ttl: float) -> None:
        self.signer = signer
        self.ttl = ttl

    def issue(self, space_id: str, listener: str, now: float, split: int | None = None) -> tuple[str, Ticket]:
        ticket = Ticket(space_id, listener, round(now + self.ttl, 3), split)
        payload: dict[str, object] = {"s": space_id, "l": listener, "e": ticket.expires_at}
        if split is not None:  # unsplit tickets stay byte for byte what they were
            payload["k"] = split
        return self.signer.sign(payload), ticket

    def check(self, token: str, space_id: str, now: float) -> Ticket:
        try:
            p = self.signer.verify(token)
            split = None if p.get("k") is None else int(p["k"])
            ticket = Ticket(str(p["s"]), str(p["l"]), float(p["e"]), split)
        except SignatureError as exc:
            raise TicketError(str(exc), "invalid_ticket") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise TicketError("malformed ticket", "invalid_ticket") from exc
        if ticket.space_id != space_id:
            raise TicketError("this ticket is for another space", "wrong_space")
        if ticket.expires_at <= now:
            raise TicketError("ticket expired; join again", "ticket_expired")
        return ticket
