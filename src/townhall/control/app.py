"""The ASGI application: routes, the one error model, body limits and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from townhall.admission.gate import AdmissionCollector
from townhall.control.node import Node
from townhall.control.routes import accounts, admin, admission, hls, media, posts, replay, spaces
from townhall.control.schemas import ErrorOut, Health
from townhall.control.shed import SheddingMiddleware
from townhall.errors import ApiError, error_body
from townhall.scaleout.relay import PlacementRelay
from townhall.stage.process import StageCollector
from townhall.web import pages

logger = logging.getLogger(__name__)

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 413, 422, 429, 503)
}


def error_response(status: int, code: str, message: str, retry_after: int | None = None) -> Response:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return Response(error_body(code, message), status, headers=headers, media_type="application/json")


def create_app(node: Node, *, warm_stage: bool = False) -> FastAPI:
    """The node's HTTP app. ``warm_stage`` starts the stage process with the app (a server
    does) rather than at the first space that needs it."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await node.start()
        if warm_stage:
            await node.stage.start()
        logger.info("townhall node ready", extra={"database": node.database.url.split("://")[0]})
        sweeper = asyncio.create_task(replay.sweeper(node))  # recording retention
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await node.stop()

    app = FastAPI(
        title="townhall",
        version="1",
        description="Live audio rooms: control plane API (public contract v1).",
        lifespan=lifespan,
        responses=_ERROR_RESPONSES,
        # The interactive docs pages load scripts from a third-party host: not served.
        docs_url=None,
        redoc_url=None,
    )
    app.state.node = node
    _install_error_handlers(app)
    registry = CollectorRegistry()
    app.state.metrics_registry = registry
    registry.register(StageCollector(node.stage))
    registry.register(AdmissionCollector(node.admission))
    app.add_middleware(PlacementRelay, node=node)  # spaces another node runs
    app.add_middleware(hls.FastPath)  # inside the metrics: listener requests are counted too
    app.add_middleware(admission.JoinFastPath)  # joins and renewals before routing (counted too)
    app.add_middleware(MetricsMiddleware, registry=registry)
    app.add_middleware(BodyLimitMiddleware, max_bytes=node.config.max_body_bytes)
    # Outermost: a shed request costs no body read, no metrics label, no database call.
    app.add_middleware(SheddingMiddleware, admission=node.admission)

    @app.get("/healthz", response_model=Health, tags=["ops"])
    async def healthz() -> Health:
        """Liveness: the process answers."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, tags=["ops"], responses={503: {"model": ErrorOut}})
    async def readyz() -> Any:
        """Readiness: fails (503) while the database, or Redis when one is configured, is
        unreachable. Liveness (``/healthz``) does not: live spaces play on meanwhile."""
        if not await node.database.ping(node.config.readiness_timeout_seconds):
            return error_response(503, "database_unreachable", "the database does not answer")
        if not await node.redis_ping(node.config.readiness_timeout_seconds):
            return error_response(503, "redis_unreachable", "Redis does not answer")
        return Health(status="ready")

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        """Prometheus text exposition."""
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(accounts.router)
    app.include_router(posts.router)
    app.include_router(admin.router)
    app.include_router(spaces.router)
    app.include_router(admission.router)
    app.include_router(media.router)
    app.include_router(replay.router)  # before hls: its /hls/{id}/{name} would take replay.m3u8
    app.include_router(hls.router)
    pages.install(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.retry_after)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "malformed_json", "the request body is not valid JSON")
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        message = f"{where}: {first.get('msg', 'invalid')}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more)"
        return error_response(422, "validation_error", message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404:
            message = "no such resource"
        response = error_response(exc.status_code, codes.get(exc.status_code, "error"), message)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> Response:
        if isinstance(exc, RedisError):
            # Shared limits and the waiting room live in Redis: without it, a request that
            # needs them (a new join) is refused for a moment rather than admitted unchecked.
            # Listeners already in, speakers and the stage never touch Redis on their path.
            logger.warning("Redis unavailable: %s", exc)
            return error_response(503, "redis_unreachable", "shared state is unavailable; retry shortly", 2)
        if isinstance(exc, SQLAlchemyError | OSError):
            # The database (or a connection to it) is gone: a clean refusal to retry, while
            # what needs no database (listeners in, the stage, cached state) carries on.
            logger.warning("backing service unavailable: %s", exc)
            return error_response(503, "database_unreachable", "the database is unavailable; retry soon", 2)
        logger.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal", "internal error; it has been logged")


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413 before any handler parses them.

    A declared ``Content-Length`` over the limit is refused without reading; a chunked body is
    read up to the limit and refused when it passes it.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.max_bytes:
                    await self._refuse(scope, receive, send)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413, "payload_too_large", f"request body is larger than {self.max_bytes} bytes"
        )
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


class MetricsMiddleware:
    """Count requests and time them by route template (never by raw path: bounded labels)."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter(
            "townhall_http_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "townhall_http_request_seconds",
            "HTTP request latency by route",
            ["route"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            self.requests.labels(scope["method"], template, str(status)).inc()
            self.latency.labels(template).observe(time.perf_counter() - start)
