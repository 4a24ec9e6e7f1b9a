"""The HTTP surface: one error model, body limits, health, readiness, metrics, OpenAPI."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import RunningServer, TcpRelay, assert_error, make_config, running_server


def test_health_and_metrics(server: RunningServer) -> None:
    api = server.client()
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz").json() == {"status": "ready"}
    api.get("/api/v1/accounts/nobody")
    metrics = api.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert (
        'townhall_http_requests_total{method="GET",route="/api/v1/accounts/{handle}",status="404"} 1.0'
        in metrics.text
    )
    assert "townhall_http_request_seconds_bucket" in metrics.text


def test_openapi_describes_the_public_contract(server: RunningServer) -> None:
    spec = server.client().get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    for path, method in [
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
        ("/api/v1/accounts", "post"),
        ("/api/v1/sessions", "post"),
        ("/api/v1/posts", "post"),
        ("/api/v1/accounts/{handle}/posts", "get"),
        ("/api/v1/admin/accounts/{handle}/suspend", "post"),
        ("/api/v1/admin/accounts/{handle}/reinstate", "post"),
    ]:
        assert method in spec["paths"][path], path


def test_oversize_bodies_are_413(server: RunningServer) -> None:
    user = server.client().user("alice")
    limit = server.config.max_body_bytes
    big = '{"text": "' + "x" * limit + '"}'
    assert_error(
        user.post("/api/v1/posts", content=big, headers={"content-type": "application/json"}),
        413,
        "payload_too_large",
    )

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold on the stream
        yield b'{"text": "'
        for _ in range(limit // 1024 + 2):
            yield b"x" * 1024
        yield b'"}'

    assert_error(
        user.post("/api/v1/posts", content=chunks(), headers={"content-type": "application/json"}),
        413,
    )
    # A body just under the limit is read and judged on its content.
    assert_error(user.post("/api/v1/posts", json={"text": "x" * (limit - 100)}), 422)


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"{not json", "application/json", 400),
        (b"", "application/json", 422),
        (b"[]", "application/json", 422),
        (b'{"text": 5}', "application/json", 422),
        (b'{"text": "hi", "extra": 1}', "application/json", 422),
        (b"text=hi", "application/x-www-form-urlencoded", 422),
        (b"\xff\xfe\x00", "application/json", 400),
    ],
)
def test_malformed_bodies_get_json_4xx(
    server: RunningServer, body: bytes, content_type: str, status: int
) -> None:
    user = server.client().user("alice")
    r = user.post("/api/v1/posts", content=body, headers={"content-type": content_type})
    assert_error(r, status)


def test_unknown_routes_and_methods(server: RunningServer) -> None:
    api = server.client()
    assert_error(api.get("/api/v1/nothing-here"), 404, "not_found")
    assert_error(api.request("PUT", "/api/v1/posts"), 405, "method_not_allowed")
    assert_error(api.get("/api/v1/posts/not-a-number"), 422)
    assert_error(api.get("/api/v1/posts/99999999999999999999999"), 422)
    assert_error(api.get("/api/v1/posts/0"), 422)


def test_readiness_follows_the_database(tmp_path: Path) -> None:
    """PostgreSQL reached through a relay the test cuts: /readyz fails while it is unreachable,
    /healthz stays up, and readiness returns without a restart when the database does."""
    relay = TcpRelay("127.0.0.1", 5432).start()
    try:
        url = f"postgresql+asyncpg://postgres@127.0.0.1:{relay.port}/test"
        config = make_config("postgresql", tmp_path, database_url=url, readiness_timeout_seconds=1.0)
        with running_server(config) as server:
            api = server.client()
            assert api.get("/readyz").status_code == 200
            relay.cut()
            assert_error(api.get("/readyz"), 503, "database_unreachable")
            assert api.get("/healthz").status_code == 200
            relay.restore()
            assert api.get("/readyz").status_code == 200
            assert api.get("/api/v1/accounts/nobody").status_code == 404
    finally:
        relay.stop()
