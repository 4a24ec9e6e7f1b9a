"""Compact signed tokens: HMAC-SHA256 over a JSON payload, with a rotating key set.

Form: ``<kid>.<base64url payload>.<base64url mac>``. The first key signs; every key in the set
verifies, so a key can be rotated in before it signs and kept after it stops signing until the
tokens it signed have expired. Verification is one HMAC and a constant-time compare: no
database or network call, which is what lets an edge or a media node check a token alone.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class SignatureError(ValueError):
    """The token is malformed, signed by an unknown key, or its MAC does not match."""


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """Signs and verifies payloads under a purpose label (so a token of one kind can never be
    accepted as another: the label is mixed into the MAC)."""

    def __init__(self, keys: Mapping[str, bytes], purpose: str) -> None:
        if not keys:
            raise ValueError("a signer needs at least one key")
        for kid in keys:
            if not kid.isalnum() or len(kid) > 16:
                raise ValueError(f"key id {kid!r} must be 1-16 letters or digits")
        self._keys = dict(keys)
        self._active = next(iter(keys))
        self._purpose = purpose.encode()

    def _mac(self, key: bytes, kid: str, body: str) -> bytes:
        msg = self._purpose + b"\x00" + kid.encode() + b"." + body.encode()
        return hmac.new(key, msg, hashlib.sha256).digest()

    def sign(self, payload: Mapping[str, Any]) -> str:
        body = _b64e(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
        mac = self._mac(self._keys[self._active], self._active, body)
        return f"{self._active}.{body}.{_b64e(mac)}"

    def verify(self, token: str) -> dict[str, Any]:
        """The payload of a genuine token; ``SignatureError`` otherwise (expiry is the caller's
        rule, since it depends on ``now``)."""
        if not isinstance(token, str) or len(token) > 2048 or not token.isascii():
            raise SignatureError("malformed token")
        parts = token.split(".")
        if len(parts) != 3:
            raise SignatureError("malformed token")
        kid, body, mac_text = parts
        key = self._keys.get(kid)
        if key is None:
            raise SignatureError("token signed by an unknown key")
        try:
            mac = _b64d(mac_text)
            raw = _b64d(body)
        except (ValueError, TypeError) as exc:
            raise SignatureError("malformed token") from exc
        if not hmac.compare_digest(mac, self._mac(key, kid, body)):
            raise SignatureError("bad signature")
        try:
            payload = json.loads(raw)
        except ValueError as exc:
            raise SignatureError("malformed token payload") from exc
        if not isinstance(payload, dict):
            raise SignatureError("malformed token payload")
        return payload


def parse_key_set(text: str) -> dict[str, bytes]:
    """``"kid:hexsecret,kid2:hexsecret"`` (first signs) into a key map."""
    keys: dict[str, bytes] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        kid, sep, secret = item.partition(":")
        if not sep:
            raise ValueError("signing keys are 'kid:hexsecret' separated by commas")
        try:
            raw = bytes.fromhex(secret)
        except ValueError as exc:
            raise ValueError(f"signing key {kid!r} is not hex") from exc
        if len(raw) < 32:
            raise ValueError(f"signing key {kid!r} must be at least 32 bytes (64 hex digits)")
        keys[kid] = raw
    return keys


def load_or_create_key_set(configured: str, data_dir: Path) -> dict[str, bytes]:
    """The configured key set, or for the embedded mode one random key kept in the data dir
    (created once, readable only by its owner). Several nodes must share configured keys."""
    if configured:
        return parse_key_set(configured)
    path = data_dir / "signing.key"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"k1:{secrets.token_hex(32)}\n")
        tmp.chmod(0o600)
        tmp.replace(path)
    return parse_key_set(path.read_text().strip())
