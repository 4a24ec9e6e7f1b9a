"""What one running node holds: its config and its connections to the swappable edges."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from townhall.admission.limiter import Limiter
from townhall.config import Config
from townhall.security.passwords import PasswordHasher
from townhall.storage.database import Database


@dataclasses.dataclass
class Node:
    config: Config
    database: Database
    hasher: PasswordHasher
    limiter: Limiter
    clock: Callable[[], float] = time.time

    @classmethod
    def from_config(cls, config: Config, limiter: Limiter | None = None) -> Node:
        from townhall.admission.limiter import LimitsLimiter

        return cls(
            config=config,
            database=Database(config.effective_database_url, schema=config.database_schema or None),
            hasher=PasswordHasher(
                config.argon2_time_cost, config.argon2_memory_kib, config.argon2_parallelism
            ),
            limiter=limiter or LimitsLimiter.from_url(config.redis_url or None),
        )

    async def start(self) -> None:
        self.config.data.mkdir(parents=True, exist_ok=True)
        await self.database.migrate()

    async def stop(self) -> None:
        await self.limiter.close()
        await self.database.close()
