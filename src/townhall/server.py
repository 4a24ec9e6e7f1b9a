"""Run a node: build the app from a ``Config`` and serve it with uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import uvicorn

from townhall.config import Config
from townhall.control.app import create_app
from townhall.control.fastproto import listener_protocol
from townhall.control.node import Node

logger = logging.getLogger(__name__)


def build_server(config: Config, node: Node | None = None) -> uvicorn.Server:
    node = node or Node.from_config(config)
    app = create_app(node, warm_stage=True)
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        lifespan="on",
        # Listener requests answered in the HTTP protocol itself, everything else through ASGI.
        http=listener_protocol(node, app),
        # Long-lived streams (SSE) must not hold a shutdown for long.
        timeout_graceful_shutdown=3,
    )
    return uvicorn.Server(uv_config)


def serve(config: Config, companion: Callable[[], Coroutine[Any, Any, None]] | None = None) -> None:
    """Serve until stopped. ``companion`` runs beside the server once it is up (the demo's
    speaker) and is cancelled when the server stops."""
    server = build_server(config)
    if companion is None:
        server.run()
        return

    async def run() -> None:
        serving = asyncio.create_task(server.serve())
        while not server.started and not serving.done():  # noqa: ASYNC110 - uvicorn has only a flag
            await asyncio.sleep(0.05)
        side = asyncio.create_task(companion())
        try:
            await serving
        finally:
            side.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await side

    asyncio.run(run())
