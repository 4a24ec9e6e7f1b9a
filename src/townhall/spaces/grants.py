"""Speaking grants: the signed ``speaker_token`` and its revocation (pure: takes ``now``).

A token binds space, account, role and a grant id, and expires after ``ttl`` seconds (short:
the holder renews it). Revocation is by grant id: the control plane deletes the grant and
publishes ``SpeakerRevoked``; every node keeps the revoked ids it has heard of until the
longest-lived token they could be in has expired, so a media node refuses and drops a revoked
speaker within the bus's delivery time.
"""

from __future__ import annotations

import dataclasses
import secrets

from townhall.security.signing import SignatureError, Signer

PURPOSE = "townhall speaker grant v1"


@dataclasses.dataclass(frozen=True)
class Grant:
    space_id: str
    account_id: int
    role: str
    grant_id: str
    expires_at: float


class GrantError(ValueError):
    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def new_grant_id() -> str:
    return secrets.token_urlsafe(12)


class GrantBook:
    """Issues and checks speaker tokens, and remembers revoked grant ids."""

    def __init__(self, signer: Signer, ttl: float) -> None:
        self.signer = signer
        self.ttl = ttl
        self._revoked: dict[str, float] = {}

    def issue(
        self, space_id: str, account_id: int, role: str, grant_id: str, now: float
    ) -> tuple[str, Grant]:
        grant = Grant(space_id, account_id, role, grant_id, now + self.ttl)
        token = self.signer.sign(
            {"s": space_id, "a": account_id, "r": role, "g": grant_id, "e": round(grant.expires_at, 3)}
        )
        return token, grant

    def revoke(self, grant_id: str, now: float) -> None:
        self._revoked[grant_id] = now + self.ttl
        if len(self._revoked) > 1024:
            self._revoked = {g: t for g, t in self._revoked.items() if t > now}

    def is_revoked(self, grant_id: str) -> bool:
        return grant_id in self._revoked

    def check(self, token: str, space_id: str, now: float) -> Grant:
        """The grant a token carries for ``space_id``; ``GrantError`` says why not."""
        try:
            p = self.signer.verify(token)
        except SignatureError as exc:
            raise GrantError(str(exc), "invalid_token") from exc
        try:
            grant = Grant(str(p["s"]), int(p["a"]), str(p["r"]), str(p["g"]), float(p["e"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise GrantError("malformed grant", "invalid_token") from exc
        if grant.space_id != space_id:
            raise GrantError("this token is for another space", "wrong_space")
        if grant.expires_at <= now:
            raise GrantError("speaker token expired; fetch a new one", "token_expired")
        if grant.grant_id in self._revoked:
            raise GrantError("this speaking grant was revoked", "token_revoked")
        return grant
