"""Suspension hides, reinstatement restores, every action is audited."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support import RunningServer, assert_error


def test_suspension_hides_posts_and_reinstatement_restores_them(server: RunningServer) -> None:
    admin = server.client(server.create_admin())
    alice = server.client().user("alice")
    fan = server.client().user("fan")
    fan.post("/api/v1/accounts/alice/follow")
    ids = [alice.post("/api/v1/posts", json={"text": f"post {i}"}).json()["id"] for i in range(3)]
    before = server.client().get("/api/v1/accounts/alice/posts").json()

    r = admin.post("/api/v1/admin/accounts/alice/suspend", json={"reason": "spam wave"})
    assert r.status_code == 200 and r.json()["suspended"] is True

    # Hidden from others: timeline, feed and single post.
    assert server.client().get("/api/v1/accounts/alice/posts").json()["posts"] == []
    assert fan.get("/api/v1/feed").json()["posts"] == []
    assert_error(fan.get(f"/api/v1/posts/{ids[0]}"), 404)
    # The author still reads their own, and admins see everything.
    assert len(alice.get("/api/v1/accounts/alice/posts").json()["posts"]) == 3
    assert len(admin.get("/api/v1/accounts/alice/posts").json()["posts"]) == 3
    # Suspended: can log in and read, cannot post or follow.
    relogged = server.client(server.client().login("alice"))
    assert relogged.get("/api/v1/me").json()["suspended"] is True
    assert_error(alice.post("/api/v1/posts", json={"text": "still here"}), 403, "account_suspended")
    assert_error(alice.post("/api/v1/accounts/fan/follow"), 403, "account_suspended")

    r = admin.post("/api/v1/admin/accounts/alice/reinstate", json={"reason": "appeal upheld"})
    assert r.status_code == 200 and r.json()["suspended"] is False
    assert server.client().get("/api/v1/accounts/alice/posts").json() == before
    assert [p["id"] for p in fan.get("/api/v1/feed").json()["posts"]] == ids[::-1]
    assert alice.post("/api/v1/posts", json={"text": "back"}).status_code == 201


def test_moderation_errors(server: RunningServer) -> None:
    admin = server.client(server.create_admin())
    server.client().user("alice")
    assert_error(admin.post("/api/v1/admin/accounts/alice/suspend", json={}), 422)
    assert_error(admin.post("/api/v1/admin/accounts/alice/suspend", json={"reason": "   "}), 422)
    assert_error(admin.post("/api/v1/admin/accounts/ghost/suspend", json={"reason": "x"}), 404)
    assert_error(admin.post("/api/v1/admin/accounts/alice/reinstate"), 409, "not_suspended")
    assert admin.post("/api/v1/admin/accounts/alice/suspend", json={"reason": "x"}).status_code == 200
    assert_error(admin.post("/api/v1/admin/accounts/alice/suspend", json={"reason": "x"}), 409)
    assert_error(admin.post("/api/v1/admin/accounts/admin/suspend", json={"reason": "x"}), 403)


def test_audit_log_records_who_what_when_why(server: RunningServer) -> None:
    admin = server.client(server.create_admin("root"))
    server.client().user("alice")
    admin.post("/api/v1/admin/accounts/alice/suspend", json={"reason": "spam"})
    admin.post("/api/v1/admin/accounts/alice/reinstate", json={"reason": "appeal"})
    entries = admin.get("/api/v1/admin/audit").json()["entries"]
    assert [(e["actor"], e["action"], e["target"], e["reason"]) for e in entries] == [
        ("root", "account.reinstate", "alice", "appeal"),
        ("root", "account.suspend", "alice", "spam"),
    ]
    assert entries[0]["at"] >= entries[1]["at"]
    page = admin.get("/api/v1/admin/audit", params={"limit": 1}).json()
    assert len(page["entries"]) == 1 and page["next_cursor"]


def test_cli_moderates_the_server_on_the_same_data_dir(server: RunningServer) -> None:
    """`townhall admin ... --data DIR` acts on the server started with that data dir (and the
    same TOWNHALL_* environment), and the audit log names the operator as a null actor."""
    alice = server.client().user("alice")
    alice.post("/api/v1/posts", json={"text": "hi"})
    env = dict(os.environ)
    env["TOWNHALL_DATABASE_URL"] = server.config.database_url
    env["TOWNHALL_DATABASE_SCHEMA"] = server.config.database_schema

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "townhall", "admin", *args, "--data", str(server.config.data)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    done = cli("suspend", "ALICE", "--reason", "from the console")
    assert done.returncode == 0, done.stderr
    assert "suspended alice" in done.stdout
    assert server.client().get("/api/v1/accounts/alice").json()["suspended"] is True
    again = cli("suspend", "alice", "--reason", "twice")
    assert again.returncode == 1 and "already suspended" in again.stderr
    assert cli("reinstate", "alice").returncode == 0
    made = cli("create-account", "boss", "--password", "boss-password", "--admin")
    assert made.returncode == 0, made.stderr
    boss = server.client(server.client().login("boss", "boss-password"))
    entries = boss.get("/api/v1/admin/audit").json()["entries"]
    assert [(e["actor"], e["action"]) for e in entries] == [
        (None, "account.reinstate"),
        (None, "account.suspend"),
    ]
    assert cli("create-account", "bad handle!", "--password", "whatever12").returncode == 1
