"""The authorization matrix: anonymous / user / suspended user / admin × every endpoint."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support import Api, RunningServer, make_config, running_server

ROLES = ("anonymous", "user", "suspended", "admin")
_seq = itertools.count()


@dataclasses.dataclass
class World:
    server: RunningServer
    admin: Api
    target_post: int

    def as_role(self, role: str) -> Api:
        """A fresh session for ``role`` (fresh so that logging out in one row cannot leak)."""
        if role == "anonymous":
            return self.server.client()
        handle = {"user": "user", "suspended": "susp", "admin": "admin"}[role]
        return self.server.client(self.server.client().login(handle, "password123"))

    def own_post(self, api: Api) -> int:
        """A post owned by the caller, made while not suspended (by an admin round-trip)."""
        me = api.get("/api/v1/me").json()["handle"]
        if me == "susp":
            self.admin.post("/api/v1/admin/accounts/susp/reinstate")
        post = api.post("/api/v1/posts", json={"text": "own"}).json()["id"]
        if me == "susp":
            self.admin.post("/api/v1/admin/accounts/susp/suspend", json={"reason": "matrix"})
        return int(post)


Call = Callable[[World, Api], Any]

# (name, call, expected status for anonymous, user, suspended, admin)
MATRIX: list[tuple[str, Call, tuple[int, int, int, int]]] = [
    ("GET /healthz", lambda w, a: a.get("/healthz"), (200, 200, 200, 200)),
    ("GET /readyz", lambda w, a: a.get("/readyz"), (200, 200, 200, 200)),
    ("GET /metrics", lambda w, a: a.get("/metrics"), (200, 200, 200, 200)),
    ("GET /openapi.json", lambda w, a: a.get("/openapi.json"), (200, 200, 200, 200)),
    (
        "POST /accounts",
        lambda w, a: a.register(f"new{next(_seq)}"),
        (201, 201, 201, 201),
    ),
    (
        "POST /sessions",
        lambda w, a: a.post("/api/v1/sessions", json={"handle": "target", "password": "password123"}),
        (200, 200, 200, 200),
    ),
    ("DELETE /sessions/current", lambda w, a: a.delete("/api/v1/sessions/current"), (401, 204, 204, 204)),
    ("GET /me", lambda w, a: a.get("/api/v1/me"), (401, 200, 200, 200)),
    ("GET /accounts/{h}", lambda w, a: a.get("/api/v1/accounts/target"), (200, 200, 200, 200)),
    ("GET /accounts/{h}/posts", lambda w, a: a.get("/api/v1/accounts/target/posts"), (200, 200, 200, 200)),
    ("GET /posts/{id}", lambda w, a: a.get(f"/api/v1/posts/{w.target_post}"), (200, 200, 200, 200)),
    ("GET /feed", lambda w, a: a.get("/api/v1/feed"), (401, 200, 200, 200)),
    ("POST /posts", lambda w, a: a.post("/api/v1/posts", json={"text": "hi"}), (401, 201, 403, 201)),
    (
        "DELETE /posts/{other's}",
        lambda w, a: a.delete(f"/api/v1/posts/{w.target_post}"),
        (401, 403, 403, 204),
    ),
    (
        "DELETE /posts/{own}",
        lambda w, a: a.delete(f"/api/v1/posts/{w.own_post(a)}") if a.token else a.delete("/api/v1/posts/1"),
        (401, 204, 204, 204),
    ),
    (
        "POST /accounts/{h}/follow",
        lambda w, a: a.post("/api/v1/accounts/target/follow"),
        (401, 204, 403, 204),
    ),
    (
        "DELETE /accounts/{h}/follow",
        lambda w, a: a.delete("/api/v1/accounts/target/follow"),
        (401, 204, 204, 204),
    ),
    (
        "POST /admin/accounts/{h}/suspend",
        lambda w, a: a.post("/api/v1/admin/accounts/target/suspend", json={"reason": "r"}),
        (401, 403, 403, 200),
    ),
    (
        "POST /admin/accounts/{h}/reinstate",
        lambda w, a: a.post("/api/v1/admin/accounts/target/reinstate", json={}),
        (401, 403, 403, 409),  # 409: target is not suspended; reaching the check proves admission
    ),
    ("GET /admin/audit", lambda w, a: a.get("/api/v1/admin/audit"), (401, 403, 403, 200)),
]


def test_authorization_matrix(backend: str, tmp_path: Path) -> None:
    config = make_config(
        backend,
        tmp_path / "data",
        login_limit_per_address="100000/minute",
        login_limit_per_account="100000/minute",
        signup_limit_per_address="100000/minute",
        post_limit_per_account="100000/minute",
    )
    with running_server(config) as server:
        anon = server.client()
        admin = server.client(server.create_admin("admin", "password123"))
        target = anon.user("target")
        anon.user("user")
        anon.user("susp")
        target_post = target.post("/api/v1/posts", json={"text": "target's"}).json()["id"]
        assert admin.post("/api/v1/admin/accounts/susp/suspend", json={"reason": "m"}).status_code == 200
        world = World(server, admin, target_post)

        mismatches = []
        for name, call, expected in MATRIX:
            for role, want in zip(ROLES, expected, strict=True):
                response = call(world, world.as_role(role))
                if response.status_code != want:
                    mismatches.append(f"{name} as {role}: got {response.status_code}, want {want}")
                if response.status_code >= 400:
                    assert set(response.json()) == {"error"}, (name, role, response.text)
                # Undo what changed shared state, so every row starts from the same world.
                if name.startswith("POST /admin/accounts/{h}/suspend") and response.status_code == 200:
                    admin.post("/api/v1/admin/accounts/target/reinstate")
                if name.startswith("DELETE /posts/{other's}") and response.status_code == 204:
                    world.target_post = target.post("/api/v1/posts", json={"text": "again"}).json()["id"]
        assert not mismatches, "\n".join(mismatches)
