"""Real servers for tests: a townhall node under uvicorn on a loopback port, a TCP relay that
can cut a connection to a real service, and a small HTTP client with the API's shapes."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from townhall.config import Config
from townhall.control.app import create_app
from townhall.control.fastproto import listener_protocol
from townhall.control.node import Node
from townhall.social import accounts

POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
# argon2id at the library's RFC 9106 cost makes each registration ~50 ms; tests use a light
# setting so the suite stays fast. The algorithm and code path are the same.
FAST_ARGON2 = {"argon2_time_cost": 1, "argon2_memory_kib": 1024, "argon2_parallelism": 1}


class Clock:
    """Wall time plus an offset a test can advance (expiry tests without sleeping)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def make_config(backend: str, data: Path, **extra: Any) -> Config:
    values: dict[str, Any] = {"data": data, **FAST_ARGON2, **extra}
    # Test servers share two cores with the suite, other servers and stage processes: the
    # event loop's own turn often passes admission's 5 ms shedding target there, and a node
    # would shed a test's ordinary requests. Tests of shedding set the target themselves.
    values.setdefault("shed_target_ms", 500.0)
    if backend == "postgresql":
        values.setdefault("database_url", POSTGRES_URL)
        values.setdefault("database_schema", "t_" + uuid.uuid4().hex[:12])
    return Config.from_mapping(values)


async def drop_schema(config: Config) -> None:
    if not config.database_schema:
        return
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(POSTGRES_URL)
    async with engine.begin() as conn:
        await conn.execute(text(f'DROP SCHEMA IF EXISTS "{config.database_schema}" CASCADE'))
    await engine.dispose()


@dataclasses.dataclass
class RunningServer:
    config: Config
    node: Node
    url: str
    clock: Clock
    server: uvicorn.Server
    thread: threading.Thread

    clients: list[Api] = dataclasses.field(default_factory=list)

    def client(self, token: str | None = None) -> Api:
        return Api(self.url, token, self.clients)

    def create_admin(self, handle: str = "admin", password: str = "admin-password") -> str:
        """An admin account, made as the operator's CLI makes it; returns a bearer token."""

        async def make() -> None:
            node = Node.from_config(self.config)
            async with node.database.session() as db:
                await accounts.create_account(
                    db, node.hasher, handle, password, now=time.time(), is_admin=True
                )
            await node.database.close()

        asyncio.run(make())
        return self.client().login(handle, password)


@contextmanager
def running_server(
    config: Config, *, keep_schema: bool = False, protocol: bool = True
) -> Iterator[RunningServer]:
    """A node serving ``config`` in a thread; its PostgreSQL schema is dropped at the end unless
    ``keep_schema`` (another node of the same test still uses it). ``protocol``: listener
    requests answered in the HTTP protocol (``control/fastproto.py``), as ``townhall serve``
    does; without it, uvicorn's own protocol and the ASGI fast path (``hls.FastPath``)."""
    clock = Clock()
    node = Node.from_config(config)
    node.set_clock(clock)
    app = create_app(node)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # A node that must know its own address (placement between nodes) names it in public_url.
    sock.bind(("127.0.0.1", urllib.parse.urlparse(config.public_url).port or 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="warning",
            lifespan="on",
            access_log=False,
            timeout_graceful_shutdown=3,
            proxy_headers=False,  # as server.py runs it: only trusted_proxies may name a client
            http=listener_protocol(node, app) if protocol else "auto",
        )
    )
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("townhall test server did not start")
        time.sleep(0.01)
    running = RunningServer(config, node, f"http://127.0.0.1:{port}", clock, server, thread)
    try:
        yield running
    finally:
        for client in running.clients:
            client.close()
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        if not keep_schema:
            asyncio.run(drop_schema(config))


class Api:
    """httpx against the real server, with helpers named after the API's verbs."""

    def __init__(self, url: str, token: str | None = None, registry: list[Api] | None = None) -> None:
        self.url = url
        self.token = token
        self.http = httpx.Client(base_url=url, timeout=30)
        # Every client made from a server's registry is closed when that server stops.
        self.registry = registry if registry is not None else []
        self.registry.append(self)

    def as_token(self, token: str) -> Api:
        return Api(self.url, token, self.registry)

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}) or {})
        if self.token and "authorization" not in {k.lower() for k in headers}:
            headers["Authorization"] = f"Bearer {self.token}"
        return self.http.request(method, path, headers=headers, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", path, **kwargs)

    def register(self, handle: str, password: str = "password123") -> httpx.Response:
        return self.post("/api/v1/accounts", json={"handle": handle, "password": password})

    def login(self, handle: str, password: str = "password123") -> str:
        r = self.post("/api/v1/sessions", json={"handle": handle, "password": password})
        assert r.status_code == 200, r.text
        return str(r.json()["token"])

    def user(self, handle: str, password: str = "password123") -> Api:
        """Register ``handle`` and return a client logged in as it."""
        r = self.register(handle, password)
        assert r.status_code == 201, r.text
        return self.as_token(self.login(handle, password))


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The one error model: JSON ``{"error": {"code", "message"}}`` with the right status."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    if code is not None:
        assert body["error"]["code"] == code, body
    return dict(body["error"])


class TcpRelay:
    """A loopback TCP relay to a real service that a test can cut and restore (outages)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.base_events.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    def start(self) -> TcpRelay:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self.loop).result(10)
        return self

    async def _listen(self, port: int = 0) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", port or self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.writers.update({writer, up_writer})

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        """Stop accepting and drop every open connection."""

        async def cut() -> None:
            assert self.server is not None
            self.server.close()
            for w in list(self.writers):
                w.transport.abort()
            self.writers.clear()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(cut(), self.loop).result(10)

    def restore(self) -> None:
        asyncio.run_coroutine_threadsafe(self._listen(self.port), self.loop).result(10)

    def stop(self) -> None:
        self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()
