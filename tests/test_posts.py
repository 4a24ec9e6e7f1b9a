"""Posts, follows and the home feed, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from tests.support import RunningServer, assert_error


def test_post_and_timeline(server: RunningServer) -> None:
    alice = server.client().user("alice")
    r = alice.post("/api/v1/posts", json={"text": "  hello world  "})
    assert r.status_code == 201
    post = r.json()
    assert post["text"] == "hello world" and post["author"] == "alice" and post["kind"] == "text"
    timeline = server.client().get("/api/v1/accounts/ALICE/posts").json()
    assert [p["id"] for p in timeline["posts"]] == [post["id"]]
    assert server.client().get(f"/api/v1/posts/{post['id']}").json() == post


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("x" * 280, True),
        ("x" * 281, False),
        # 280 family emoji: 5 code points and 18 UTF-8 bytes each, one character to a person.
        ("\U0001f468\u200d\U0001f469\u200d\U0001f467" * 280, True),
        ("\U0001f468\u200d\U0001f469\u200d\U0001f467" * 281, False),
        # e + combining acute, 280 times: NFC makes each one code point.
        ("e\u0301" * 280, True),
        ("日本語" * 93 + "x", True),
        ("", False),
        ("   \n\t ", False),
        ("bell\x07", False),
        ("nul\x00", False),
        ("line one\nline two\ttab", True),
    ],
)
def test_post_length_counts_what_people_see(server: RunningServer, text: str, ok: bool) -> None:
    alice = server.client().user("alice")
    r = alice.post("/api/v1/posts", json={"text": text})
    if ok:
        assert r.status_code == 201, r.text
    else:
        assert_error(r, 422)


def test_delete_own_post_but_not_anothers(server: RunningServer) -> None:
    alice = server.client().user("alice")
    bob = server.client().user("bob")
    post_id = alice.post("/api/v1/posts", json={"text": "mine"}).json()["id"]
    assert_error(bob.delete(f"/api/v1/posts/{post_id}"), 403, "not_author")
    assert alice.delete(f"/api/v1/posts/{post_id}").status_code == 204
    assert_error(alice.delete(f"/api/v1/posts/{post_id}"), 404)
    assert_error(server.client().get(f"/api/v1/posts/{post_id}"), 404)


def test_admin_deletes_any_post(server: RunningServer) -> None:
    admin = server.client(server.create_admin())
    alice = server.client().user("alice")
    post_id = alice.post("/api/v1/posts", json={"text": "spam"}).json()["id"]
    assert admin.delete(f"/api/v1/posts/{post_id}").status_code == 204


def test_feed_pulls_followed_accounts_and_own_posts(server: RunningServer) -> None:
    reader = server.client().user("reader")
    followed = server.client().user("followed")
    stranger = server.client().user("stranger")
    assert reader.post("/api/v1/accounts/Followed/follow").status_code == 204
    assert reader.post("/api/v1/accounts/followed/follow").status_code == 204  # idempotent
    followed.post("/api/v1/posts", json={"text": "from followed"})
    stranger.post("/api/v1/posts", json={"text": "from stranger"})
    reader.post("/api/v1/posts", json={"text": "from reader"})
    feed = reader.get("/api/v1/feed").json()
    assert [p["text"] for p in feed["posts"]] == ["from reader", "from followed"]
    assert server.client().get("/api/v1/accounts/followed").json()["followers"] == 1
    assert server.client().get("/api/v1/accounts/reader").json()["following"] == 1
    assert reader.delete("/api/v1/accounts/followed/follow").status_code == 204
    assert reader.delete("/api/v1/accounts/followed/follow").status_code == 204  # idempotent
    assert server.client().get("/api/v1/accounts/followed").json()["followers"] == 0
    assert reader.get("/api/v1/me").json()["following"] == 0
    assert [p["text"] for p in reader.get("/api/v1/feed").json()["posts"]] == ["from reader"]


def test_feed_pagination_has_no_gaps_or_repeats(server: RunningServer) -> None:
    reader = server.client().user("reader")
    writers = [server.client().user(f"w{i}") for i in range(3)]
    for w in writers:
        reader.post(f"/api/v1/accounts/{w.get('/api/v1/me').json()['handle']}/follow")
    written = []
    for n in range(23):
        r = writers[n % 3].post("/api/v1/posts", json={"text": f"post {n}"})
        written.append(r.json()["id"])
    seen: list[int] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 5} | ({"cursor": cursor} if cursor else {})
        page = reader.get("/api/v1/feed", params=params).json()
        seen += [p["id"] for p in page["posts"]]
        pages += 1
        # A post written mid-pagination must not shift later pages.
        if pages == 2:
            writers[0].post("/api/v1/posts", json={"text": "late"})
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(written, reverse=True)
    assert pages == 5


@pytest.mark.parametrize("cursor", ["abc", "-1", "1.5", "9" * 30, "١٢"])
def test_bad_cursor_is_400(server: RunningServer, cursor: str) -> None:
    reader = server.client().user("reader")
    assert_error(reader.get("/api/v1/feed", params={"cursor": cursor}), 400, "invalid_cursor")


def test_follow_rules(server: RunningServer) -> None:
    alice = server.client().user("alice")
    assert_error(alice.post("/api/v1/accounts/alice/follow"), 400, "self_follow")
    assert_error(alice.post("/api/v1/accounts/ghost/follow"), 404)
