"""Proof of work for joins in attack mode (pure: ``now`` is an argument).

The server hands out a signed challenge ``{d: difficulty bits, e: expiry, r: random}``; the
client finds a nonce such that ``SHA-256(challenge + "." + nonce)`` starts with ``d`` zero bits
and sends both with its join. Checking costs the server one HMAC (the challenge is its own) and
one SHA-256, whatever ``d``; finding a nonce costs the client 2^d hashes on average. Each
challenge admits once (the caller counts its use), so work cannot be spent twice.

The difficulty follows the rejected-traffic rate (``AttackMode``): ``base_bits`` when attack
mode turns on, one more bit for every doubling of the rejection rate past the threshold, up to
``max_bits``. At 16 bits a browser spends ~0.1-0.3 s; a bot farm pays that per join.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import secrets

from townhall.security.signing import SignatureError, Signer

POW_PURPOSE = "townhall pow challenge v1"


class PowError(ValueError):
    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class Challenge:
    token: str
    difficulty: int
    expires_at: float
    id: str


def leading_zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def digest(challenge: str, nonce: str) -> bytes:
    return hashlib.sha256(f"{challenge}.{nonce}".encode()).digest()


def solve(challenge: str, difficulty: int, *, limit: int | None = None) -> str:
    """The first decimal nonce whose hash has ``difficulty`` leading zero bits (what the CLI
    listener and tests run; the web page does the same with WebCrypto)."""
    for i in itertools.count() if limit is None else range(limit):
        nonce = str(i)
        if leading_zero_bits(digest(challenge, nonce)) >= difficulty:
            return nonce
    raise PowError("no nonce found within the limit", "pow_unsolved")


class PowBook:
    def __init__(self, signer: Signer, ttl: float) -> None:
        self.signer = signer
        self.ttl = ttl

    def issue(self, difficulty: int, now: float) -> Challenge:
        rid = secrets.token_urlsafe(9)
        expires = round(now + self.ttl, 3)
        token = self.signer.sign({"d": difficulty, "e": expires, "r": rid})
        return Challenge(token, difficulty, expires, rid)

    def check(self, token: str, nonce: str, now: float, *, min_difficulty: int = 0) -> Challenge:
        """The challenge if ``nonce`` solves it; ``PowError`` naming why not."""
        if not isinstance(nonce, str) or not 0 < len(nonce) <= 64 or not nonce.isascii():
            raise PowError("the nonce must be 1-64 ASCII characters", "pow_invalid")
        try:
            p = self.signer.verify(token)
            challenge = Challenge(token, int(p["d"]), float(p["e"]), str(p["r"]))
        except SignatureError as exc:
            raise PowError(f"challenge: {exc}", "pow_invalid") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise PowError("malformed challenge", "pow_invalid") from exc
        if challenge.expires_at <= now:
            raise PowError("challenge expired; fetch a new one", "pow_expired")
        if challenge.difficulty < min_difficulty:
            raise PowError("challenge too easy for the current load; fetch a new one", "pow_too_easy")
        if leading_zero_bits(digest(token, nonce)) < challenge.difficulty:
            raise PowError("the nonce does not solve the challenge", "pow_wrong")
        return challenge


@dataclasses.dataclass
class AttackMode:
    """Turns itself on when rejected requests pass ``threshold`` per second (an exponentially
    weighted rate with time constant ``tau``) and off ``hold`` seconds after they fall back;
    an admin can force it either way until ``forced_until``.

    ``tau`` is short (2 s) so that a flood is seen while it lasts: with 5 s, a 10 s flood
    refused at 240/s showed a rate still climbing through 200/s when it ended (the rate reaches
    1 - e^(-t/tau) of the real one after t seconds)."""

    threshold: float = 50.0
    tau: float = 2.0
    hold: float = 60.0
    base_bits: int = 14
    max_bits: int = 22
    rate: float = 0.0
    updated_at: float = 0.0
    on_until: float = 0.0
    forced: bool | None = None
    forced_until: float = 0.0

    def _decay(self, now: float) -> None:
        if now > self.updated_at:
            self.rate *= math.exp(-(now - self.updated_at) / self.tau)
            self.updated_at = now

    def rejected(self, now: float, count: int = 1) -> None:
        self._decay(now)
        self.rate += count / self.tau
        if self.rate >= self.threshold:
            self.on_until = now + self.hold

    def force(self, on: bool | None, now: float, seconds: float) -> None:
        self.forced = on
        self.forced_until = now + seconds if on is not None else 0.0

    def active(self, now: float) -> bool:
        if self.forced is not None and now < self.forced_until:
            return self.forced
        return now < self.on_until

    def difficulty(self, now: float) -> int:
        if not self.active(now):
            return 0
        self._decay(now)
        excess = max(1.0, self.rate / self.threshold) if self.threshold > 0 else 1.0
        return min(self.max_bits, self.base_bits + int(math.log2(excess)))
