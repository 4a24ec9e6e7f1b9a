"""Run a node: build the app from a ``Config`` and serve it with uvicorn."""

from __future__ import annotations

import logging

import uvicorn

from townhall.config import Config
from townhall.control.app import create_app
from townhall.control.node import Node

logger = logging.getLogger(__name__)


def build_server(config: Config, node: Node | None = None) -> uvicorn.Server:
    node = node or Node.from_config(config)
    app = create_app(node)
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        lifespan="on",
    )
    return uvicorn.Server(uv_config)


def serve(config: Config) -> None:
    build_server(config).run()
