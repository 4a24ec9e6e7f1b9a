"""argon2id password hashing, kept off the event loop.

argon2 is deliberately slow and memory-hard; each hash runs in a worker thread so that a burst
of logins cannot stall the event loop that also serves other requests.
"""

from __future__ import annotations

import asyncio

from argon2 import PasswordHasher as _Argon2
from argon2 import Type
from argon2.exceptions import InvalidHashError, VerificationError


class PasswordHasher:
    """argon2id with configurable cost (``Config.argon2_*``)."""

    def __init__(self, time_cost: int = 3, memory_kib: int = 65536, parallelism: int = 4) -> None:
        self._argon2 = _Argon2(
            time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism, type=Type.ID
        )
        # A real hash to verify against when the account does not exist, so that a login for an
        # unknown handle costs the same time as one with a wrong password.
        self._decoy = self._argon2.hash("decoy password for timing equality")

    def hash_sync(self, password: str) -> str:
        return self._argon2.hash(password)

    def verify_sync(self, stored: str | None, password: str) -> bool:
        try:
            return self._argon2.verify(stored or self._decoy, password) and stored is not None
        except (VerificationError, InvalidHashError):
            return False

    async def hash(self, password: str) -> str:
        return await asyncio.to_thread(self.hash_sync, password)

    async def verify(self, stored: str | None, password: str) -> bool:
        return await asyncio.to_thread(self.verify_sync, stored, password)
