"""Space lifecycle: scheduling, announcements, reminders, listing; on both databases."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.spaces_support import generous_config
from tests.support import RunningServer, assert_error, running_server


@pytest.fixture
def srv(backend: str, tmp_path: Path) -> Iterator[RunningServer]:
    with running_server(generous_config(backend, tmp_path / "data")) as server:
        yield server


def test_create_start_end(srv: RunningServer) -> None:
    host = srv.client().user("host")
    r = host.post("/api/v1/spaces", json={"title": "  Launch night  "})
    assert r.status_code == 201
    space = r.json()
    assert space["state"] == "scheduled" and space["title"] == "Launch night" and space["host"] == "host"
    assert space["recorded"] is True and space["your_role"] == "host"
    sid = space["id"]
    assert_error(host.post(f"/api/v1/spaces/{sid}/join"), 409, "space_not_live")
    started = host.post(f"/api/v1/spaces/{sid}/start").json()
    assert started["state"] == "live" and started["started_at"]
    assert_error(host.post(f"/api/v1/spaces/{sid}/start"), 409)
    joined = srv.client().post(f"/api/v1/spaces/{sid}/join").json()
    assert joined["hls_url"].startswith(f"{srv.url}/hls/{sid}/") and joined["ticket"] in joined["hls_url"]
    ended = host.post(f"/api/v1/spaces/{sid}/end").json()
    assert ended["state"] == "ended" and ended["ended_at"] >= ended["started_at"]
    assert_error(host.post(f"/api/v1/spaces/{sid}/end"), 409, "space_ended")
    assert_error(host.post(f"/api/v1/spaces/{sid}/start"), 409, "space_ended")


def test_announcement_reaches_followers_feeds(srv: RunningServer) -> None:
    host = srv.client().user("host")
    fans = [srv.client().user(f"fan{i}") for i in range(3)]
    for fan in fans:
        fan.post("/api/v1/accounts/host/follow")
    sid = host.post("/api/v1/spaces", json={"title": "AMA"}).json()["id"]
    host.post(f"/api/v1/spaces/{sid}/start")
    for fan in fans:
        post = fan.get("/api/v1/feed").json()["posts"][0]
        assert post == {**post, "kind": "announcement", "text": "host is live: AMA", "space_id": sid}
    assert srv.client().get("/api/v1/accounts/host/posts").json()["posts"][0]["kind"] == "announcement"


def test_scheduled_space_reminders_become_notifications(srv: RunningServer) -> None:
    host = srv.client().user("host")
    when = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)).isoformat()
    space = host.post("/api/v1/spaces", json={"title": "Later", "scheduled_for": when}).json()
    sid = space["id"]
    assert space["scheduled_for"]
    fans = [srv.client().user(f"fan{i}") for i in range(3)]
    for fan in fans[:2]:
        assert fan.post(f"/api/v1/spaces/{sid}/reminders").status_code == 204
        assert fan.post(f"/api/v1/spaces/{sid}/reminders").status_code == 204  # idempotent
    assert fans[1].delete(f"/api/v1/spaces/{sid}/reminders").status_code == 204
    assert host.get(f"/api/v1/spaces/{sid}").json()["reminders"] == ["fan0"]
    assert srv.client().get(f"/api/v1/spaces/{sid}").json()["reminders"] is None  # hosts only
    assert fans[0].get("/api/v1/notifications").json()["notifications"] == []
    host.post(f"/api/v1/spaces/{sid}/start")
    notes = fans[0].get("/api/v1/notifications").json()["notifications"]
    assert [(n["kind"], n["space_id"], n["host"], n["title"]) for n in notes] == [
        ("space_started", sid, "host", "Later")
    ]
    assert fans[1].get("/api/v1/notifications").json()["notifications"] == []
    assert_error(fans[2].post(f"/api/v1/spaces/{sid}/reminders"), 409, "space_live")


@pytest.mark.parametrize(
    "body",
    [
        {"title": ""},
        {"title": "x" * 101},
        {"title": "ok", "scheduled_for": "2020-01-01T00:00:00Z"},
        {"title": "ok", "scheduled_for": "2099-01-01T00:00:00Z"},
        {"title": "ok", "scheduled_for": "2026-12-01T00:00:00"},
        {"title": "ok", "scheduled_for": "tomorrow"},
        {"title": "ok", "recorded": "maybe"},
        {"title": "ok", "extra": 1},
    ],
)
def test_bad_space_bodies(srv: RunningServer, body: dict[str, object]) -> None:
    host = srv.client().user("host")
    assert_error(host.post("/api/v1/spaces", json=body), 422)


def test_suspended_accounts_cannot_host(srv: RunningServer) -> None:
    admin = srv.client(srv.create_admin())
    host = srv.client().user("host")
    sid = host.post("/api/v1/spaces", json={"title": "before"}).json()["id"]
    admin.post("/api/v1/admin/accounts/host/suspend", json={"reason": "x"})
    assert_error(host.post("/api/v1/spaces", json={"title": "t"}), 403, "account_suspended")
    assert_error(host.post(f"/api/v1/spaces/{sid}/start"), 403, "account_suspended")
    admin.post("/api/v1/admin/accounts/host/reinstate")
    assert host.post(f"/api/v1/spaces/{sid}/start").status_code == 200


def test_admin_can_end_any_space(srv: RunningServer) -> None:
    admin = srv.client(srv.create_admin())
    host = srv.client().user("host")
    sid = host.post("/api/v1/spaces", json={"title": "t"}).json()["id"]
    host.post(f"/api/v1/spaces/{sid}/start")
    assert admin.post(f"/api/v1/spaces/{sid}/end").json()["state"] == "ended"


def test_listing_by_state_and_host(srv: RunningServer) -> None:
    alice = srv.client().user("alice")
    bob = srv.client().user("bob")
    a1 = alice.post("/api/v1/spaces", json={"title": "a1"}).json()["id"]
    a2 = alice.post("/api/v1/spaces", json={"title": "a2"}).json()["id"]
    b1 = bob.post("/api/v1/spaces", json={"title": "b1"}).json()["id"]
    alice.post(f"/api/v1/spaces/{a1}/start")
    bob.post(f"/api/v1/spaces/{b1}/start")
    bob.post(f"/api/v1/spaces/{b1}/end")
    anon = srv.client()
    ids = lambda q: [s["id"] for s in anon.get("/api/v1/spaces", params=q).json()["spaces"]]  # noqa: E731
    assert ids({"state": "live"}) == [a1]
    assert ids({"state": "scheduled"}) == [a2]
    assert ids({"state": "ended"}) == [b1]
    assert sorted(ids({"host": "ALICE"})) == sorted([a1, a2])
    assert_error(anon.get("/api/v1/spaces", params={"state": "bogus"}), 422)
    assert_error(anon.get("/api/v1/spaces", params={"host": "ghost"}), 404)
