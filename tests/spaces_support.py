"""A live space with people in every role, for the spaces tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tests.support import Api, RunningServer, make_config
from townhall.config import Config

GENEROUS = "1000000/minute"


def generous_config(backend: str, data: Path, **extra: object) -> Config:
    return make_config(
        backend,
        data,
        login_limit_per_address=GENEROUS,
        login_limit_per_account=GENEROUS,
        signup_limit_per_address=GENEROUS,
        post_limit_per_account=GENEROUS,
        **extra,
    )


@dataclasses.dataclass
class Cast:
    server: RunningServer
    space_id: str
    admin: Api
    host: Api
    cohost: Api
    speaker: Api
    speaker2: Api
    listener: Api
    blocked: Api
    suspended: Api
    anonymous: Api

    def role(self, name: str) -> Api:
        api: Api = getattr(self, name)
        return api

    def path(self, rest: str = "") -> str:
        return f"/api/v1/spaces/{self.space_id}{rest}"

    def stage(self) -> list[dict[str, object]]:
        stage: list[dict[str, object]] = self.anonymous.get(self.path("/state")).json()["stage"]
        return stage


def cast(server: RunningServer, *, live: bool = True) -> Cast:
    anon = server.client()
    admin = server.client(server.create_admin("admin", "password123"))
    people = {
        name: anon.user(name)
        for name in ("host", "cohost", "speaker", "speaker2", "listener", "blocked", "susp")
    }
    for extra in ("cand", "victim"):
        anon.user(extra)
    space = people["host"].post("/api/v1/spaces", json={"title": "Town hall"})
    assert space.status_code == 201, space.text
    space_id = space.json()["id"]
    c = Cast(
        server,
        space_id,
        admin,
        people["host"],
        people["cohost"],
        people["speaker"],
        people["speaker2"],
        people["listener"],
        people["blocked"],
        people["susp"],
        anon,
    )
    if live:
        assert c.host.post(c.path("/start")).status_code == 200
    assert c.host.post(c.path("/cohosts"), json={"handle": "cohost"}).status_code == 200
    for h in ("speaker", "speaker2"):
        assert c.host.post(c.path("/speakers"), json={"handle": h}).status_code == 200
    assert c.host.post(c.path("/blocks"), json={"handle": "blocked"}).status_code == 204
    assert admin.post("/api/v1/admin/accounts/susp/suspend", json={"reason": "test"}).status_code == 200
    return c
