"""Opaque bearer tokens: random, shown once, stored only as their SHA-256."""

from __future__ import annotations

import hashlib
import secrets

TOKEN_BYTES = 32


def new_token() -> str:
    """A fresh URL-safe token with 256 bits of entropy."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_digest(token: str) -> str:
    """The stored form of a token (hex SHA-256). A fast hash suffices: tokens are random."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
