"""One typed configuration object, loaded from a TOML file and ``TOWNHALL_*`` variables.

Precedence, lowest to highest: defaults, the TOML file (``--config`` or ``TOWNHALL_CONFIG``),
``TOWNHALL_*`` environment variables, then explicit command-line flags. Every knob is
documented in ``docs/configuration.md``.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_type_hints

ENV_PREFIX = "TOWNHALL_"


class ConfigError(ValueError):
    """A setting could not be parsed; the message names the setting."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a townhall node, with a safe default for the embedded mode."""

    host: str = "127.0.0.1"
    port: int = 8080
    data: Path = Path("./townhall-data")
    # Empty means the embedded default: a SQLite file under ``data``.
    database_url: str = ""
    # PostgreSQL only: a schema (search_path) to keep townhall's tables in; created if missing.
    database_schema: str = ""
    # Empty: counters in process memory. ``redis://host:port`` shares them between nodes.
    redis_url: str = ""
    # Prefix of every key and channel townhall uses in Redis (several deployments may share one).
    redis_prefix: str = "townhall"
    # With Redis, a space's stage runs on one node, which holds a lease on it this long and
    # renews it every third; a dead node's spaces move to the next node a speaker reaches.
    stage_lease_seconds: float = 10.0
    # Addresses or networks (comma-separated CIDRs) of proxies in front of the node, such as
    # the listener edge: from them, X-Forwarded-For names the client for per-address limits.
    trusted_proxies: str = ""
    # Public base URL used in links handed to clients (hls_url, whip_url); derived if empty.
    public_url: str = ""
    # Where the other nodes of a fleet reach this one to relay a space's requests to it (its
    # stage runs here); empty: public_url. Set it when public_url is a CDN or the edge.
    relay_url: str = ""
    log_level: str = "info"
    # Signing keys for speaker tokens and listener tickets: "kid:hex64,kid2:hex64", the first
    # signs, all verify. Empty: one key generated once into DATA/signing.key (single node).
    signing_keys: str = ""
    speaker_token_ttl_seconds: int = 600
    ticket_ttl_seconds: int = 600
    reaction_limit_per_account: str = "5/second"
    # ICE servers for WebRTC peers, comma-separated ("stun:stun.example.net:3478,turn:...").
    # Empty: host candidates only (loopback, LAN, or a public address on the node itself).
    ice_servers: str = ""
    # Addresses offered as ICE host candidates, comma-separated. Empty: loopback when `host` is
    # a loopback address, else every interface address.
    media_addresses: str = ""
    # The stage process asks for real-time scheduling (SCHED_RR) so that its 20 ms ticks are
    # woken on time whatever else runs; it falls back to nice where that is not permitted.
    stage_realtime: bool = True
    # Stage processes on this node, each space placed on one (each mixes on one core at most).
    # 0: one per CPU the node may use. They start as spaces need them: one space, one process.
    stage_processes: int = 0
    # LL-HLS: part duration (0.2-1.0 s), parts per segment, AAC-LC bitrate of the program mix.
    hls_part_seconds: float = 0.5
    hls_segment_parts: int = 4
    aac_bitrate: int = 64000
    # Recordings: days a replay is kept after its space ends (0: forever); how often the
    # retention sweep runs; how long a replay request right after the end waits for the
    # packager's "finished" marker before serving what is already on disk.
    recording_retention_days: int = 0
    # After a node restart (a crash, a deploy), live spaces resume; one whose host has not
    # reconnected (WHIP) within this many seconds is ended and its replay published.
    host_grace_seconds: float = 120.0
    recording_sweep_seconds: int = 3600
    replay_finish_wait_seconds: float = 0.5
    # The web pages' npm packages (hls.js): a node_modules directory. Empty: the repository's
    # (a checkout or an editable install), else ./node_modules.
    web_node_modules: str = ""
    # Largest request body the control plane reads, in bytes.
    max_body_bytes: int = 64 * 1024
    # Bearer sessions.
    session_ttl_seconds: int = 30 * 24 * 3600
    # argon2id cost; the defaults are argon2-cffi's RFC 9106 "low memory" profile.
    argon2_time_cost: int = 3
    argon2_memory_kib: int = 65536
    argon2_parallelism: int = 4
    # Login attempts: "N per period" strings in the `limits` library's notation.
    login_limit_per_account: str = "10/minute"
    login_limit_per_address: str = "30/minute"
    signup_limit_per_address: str = "20/minute"
    post_limit_per_account: str = "30/minute"
    # Feed and listing page sizes.
    page_size_default: int = 20
    page_size_max: int = 100
    # Seconds a readiness probe waits for the database before reporting not ready.
    readiness_timeout_seconds: float = 2.0
    # -- admission (docs/configuration.md, "Admission", says how each default was chosen) ----
    # Capacity of one space and of this node: live tickets at once, new admissions per second
    # (a token bucket with this burst). Over either, joins wait in the space's waiting room.
    space_max_listeners: int = 10_000_000
    space_join_rate: float = 10_000.0
    space_join_burst: float = 10_000.0
    # Independent splits of each space's waiting-room counters (Redis keys, on as many primaries
    # in a cluster), each with 1/K of the space's rate, burst and cap: one Redis thread serves
    # ~7,000-10,000 updates/s of one key (BENCHMARKS.md, "Scale-out plan"; `townhall plan`).
    waiting_room_splits: int = 1
    # Redis servers (comma-separated URLs, the same list in the same order on every node) that
    # hold the splits: split k on server k mod n. Empty: all on redis_url.
    waiting_room_redis_urls: str = ""
    node_max_listeners: int = 20_000
    node_join_rate: float = 10_000.0
    node_join_burst: float = 10_000.0
    # A queue token is good for this long after its arrival.
    queue_token_ttl_seconds: int = 3600
    # Limits of new joins, and of renewals and waiting-room returns (higher): per address, per
    # network (/24 of IPv4, /56 of IPv6), per account or listener.
    join_limit_per_address: str = "60/minute"
    join_limit_per_network: str = "1200/minute"
    join_limit_per_account: str = "30/minute"
    renew_limit_per_address: str = "600/minute"
    renew_limit_per_network: str = "12000/minute"
    renew_limit_per_account: str = "120/minute"
    # Places in a waiting room taken by anonymous joins, per address and per network: a few
    # attacking addresses cannot fill the queue ahead of everyone else.
    queue_limit_per_address: str = "10/minute"
    queue_limit_per_network: str = "300/minute"
    # A space's state and block list are read at most this often per node by joins; a bearer
    # token is resolved at most this often per node by joins.
    admission_snapshot_seconds: float = 1.0
    admission_session_cache_seconds: float = 5.0
    # Shedding (CoDel): the queueing delay target and the interval it must hold for.
    shed_target_ms: float = 5.0
    shed_interval_ms: float = 100.0
    # Attack mode: on when refused requests pass this rate (per second); proof-of-work
    # difficulty in leading zero bits (base, and the cap as the rate rises); challenge life.
    attack_threshold_per_second: float = 50.0
    pow_base_bits: int = 14
    pow_max_bits: int = 22
    pow_challenge_ttl_seconds: int = 120

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data / 'townhall.db').resolve()}"

    @property
    def effective_public_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        return f"http://{self.host}:{self.port}"

    @property
    def effective_relay_url(self) -> str:
        """The base URL this node registers as a space's owner: peers relay to it."""
        return self.relay_url.rstrip("/") if self.relay_url else self.effective_public_url

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: Config | None = None) -> Config:
        """Overlay ``values`` (strings or typed values) on ``base``; unknown keys are errors."""
        base = base or cls()
        hints = get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        changes: dict[str, Any] = {}
        for key, raw in values.items():
            name = key.replace("-", "_").lower()
            if name not in fields:
                raise ConfigError(f"unknown setting {key!r}")
            changes[name] = _coerce(name, hints[name], raw)
        config = dataclasses.replace(base, **changes)
        if config.waiting_room_redis_urls.strip() and not config.redis_url:
            raise ConfigError(
                "waiting_room_redis_urls needs redis_url: the waiting room is in memory without it"
            )
        return config

    @classmethod
    def from_toml(cls, path: Path, base: Config | None = None) -> Config:
        try:
            with path.open("rb") as fh:
                values = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        section = values.get("townhall", values)
        if not isinstance(section, dict):
            raise ConfigError(f"config file {path}: [townhall] must be a table")
        return cls.from_mapping(section, base)

    @classmethod
    def from_env(cls, environ: Mapping[str, str], base: Config | None = None) -> Config:
        skip = {"TOWNHALL_CONFIG"}
        values = {
            key[len(ENV_PREFIX) :]: value
            for key, value in environ.items()
            if key.startswith(ENV_PREFIX) and key not in skip
        }
        return cls.from_mapping(values, base)

    @classmethod
    def load(
        cls,
        config_file: Path | None = None,
        environ: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Config:
        """Defaults, then the TOML file, then the environment, then explicit overrides."""
        environ = os.environ if environ is None else environ
        config = cls()
        file = config_file or (Path(environ["TOWNHALL_CONFIG"]) if environ.get("TOWNHALL_CONFIG") else None)
        if file is not None:
            config = cls.from_toml(file, config)
        config = cls.from_env(environ, config)
        if overrides:
            config = cls.from_mapping({k: v for k, v in overrides.items() if v is not None}, config)
        return config


def _coerce(name: str, kind: Any, raw: Any) -> Any:
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError(text)
        if kind is int:
            if isinstance(raw, bool):
                raise ValueError(raw)
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is Path:
            return Path(str(raw))
        if kind is str:
            return str(raw)
    except ValueError as exc:
        raise ConfigError(f"setting {name!r}: cannot read {raw!r} as {kind.__name__}") from exc
    raise ConfigError(f"setting {name!r} has an unsupported type")
