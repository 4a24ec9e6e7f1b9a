"""Registration, login, sessions: edge cases, on SQLite and PostgreSQL."""

from __future__ import annotations

import concurrent.futures

import pytest

from tests.support import RunningServer, assert_error


def test_register_and_read_back(server: RunningServer) -> None:
    api = server.client()
    r = api.register("Alice_1")
    assert r.status_code == 201
    body = r.json()
    assert body["handle"] == "Alice_1" and body["suspended"] is False and body["is_admin"] is False
    shown = api.get("/api/v1/accounts/alice_1").json()
    assert shown["handle"] == "Alice_1" and shown["followers"] == 0


def test_duplicate_handle_in_another_case_is_refused(server: RunningServer) -> None:
    api = server.client()
    assert api.register("Bob").status_code == 201
    assert_error(api.register("bOB"), 409, "handle_taken")
    assert_error(api.register("Bob"), 409, "handle_taken")


def test_concurrent_registrations_of_one_handle_create_one_account(server: RunningServer) -> None:
    def register(_: int) -> int:
        return server.client().register("Racer", "password123").status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = sorted(pool.map(register, range(8)))
    assert statuses.count(201) == 1 and statuses.count(409) == 7, statuses


@pytest.mark.parametrize(
    "handle", ["", "a" * 16, "has space", "dash-ed", "ünï", "semi;colon", "x\u0000y", "👍"]
)
def test_handle_rules(server: RunningServer, handle: str) -> None:
    r = server.client().register(handle)
    assert_error(r, 422)


def test_handle_boundaries_accepted(server: RunningServer) -> None:
    api = server.client()
    assert api.register("a").status_code == 201
    assert api.register("Z" * 15).status_code == 201
    assert api.register("_0_").status_code == 201


@pytest.mark.parametrize("password", ["short", "x" * 257, 12345678, None])
def test_password_rules(server: RunningServer, password: object) -> None:
    r = server.client().post("/api/v1/accounts", json={"handle": "pw", "password": password})
    assert_error(r, 422)


def test_login_is_case_insensitive_and_token_works(server: RunningServer) -> None:
    api = server.client()
    api.register("Carol")
    token = api.login("CAROL")
    me = server.client(token).get("/api/v1/me")
    assert me.status_code == 200 and me.json()["handle"] == "Carol"


def test_bad_password_and_unknown_handle_look_the_same(server: RunningServer) -> None:
    api = server.client()
    api.register("Dave")
    wrong = api.post("/api/v1/sessions", json={"handle": "Dave", "password": "not-the-password"})
    unknown = api.post("/api/v1/sessions", json={"handle": "Nobody", "password": "password123"})
    assert assert_error(wrong, 401, "bad_credentials") == assert_error(unknown, 401, "bad_credentials")


def test_logout_revokes_the_token(server: RunningServer) -> None:
    user = server.client().user("Erin")
    assert user.get("/api/v1/me").status_code == 200
    assert user.delete("/api/v1/sessions/current").status_code == 204
    assert_error(user.get("/api/v1/me"), 401, "token_revoked")
    assert_error(user.delete("/api/v1/sessions/current"), 401, "token_revoked")


def test_other_sessions_survive_a_logout(server: RunningServer) -> None:
    first = server.client().user("Fay")
    second = server.client(server.client().login("Fay"))
    first.delete("/api/v1/sessions/current")
    assert second.get("/api/v1/me").status_code == 200


def test_expired_token_is_refused(server: RunningServer) -> None:
    user = server.client().user("Gus")
    server.clock.advance(server.config.session_ttl_seconds + 1)
    assert_error(user.get("/api/v1/me"), 401, "token_expired")


@pytest.mark.parametrize(
    "header", ["Bearer", "Bearer not-a-token", "Basic Zm9vOmJhcg==", "bearer " + "x" * 300, "Token abc"]
)
def test_malformed_or_unknown_authorization(server: RunningServer, header: str) -> None:
    r = server.client().get("/api/v1/me", headers={"Authorization": header})
    assert_error(r, 401)


def test_login_attempts_are_limited_per_account(server: RunningServer) -> None:
    api = server.client()
    api.register("Hal")
    statuses = [
        api.post("/api/v1/sessions", json={"handle": "hal", "password": "wrong-password"}).status_code
        for _ in range(12)
    ]
    assert statuses[:10] == [401] * 10, statuses
    limited = api.post("/api/v1/sessions", json={"handle": "Hal", "password": "password123"})
    err = assert_error(limited, 429, "rate_limited")
    assert int(limited.headers["Retry-After"]) >= 1, err
    # Another account from the same address is not locked out by Hal's limit.
    api.register("Ivy")
    assert api.login("Ivy")


def test_login_attempts_are_limited_per_address(server: RunningServer) -> None:
    api = server.client()
    statuses = [
        api.post("/api/v1/sessions", json={"handle": f"u{i}", "password": "password123"}).status_code
        for i in range(31)
    ]
    assert statuses[:30] == [401] * 30 and statuses[30] == 429, statuses


def test_unknown_account_is_404(server: RunningServer) -> None:
    assert_error(server.client().get("/api/v1/accounts/nobody"), 404, "account_not_found")
    assert_error(server.client().get("/api/v1/accounts/" + "x" * 40), 404)
