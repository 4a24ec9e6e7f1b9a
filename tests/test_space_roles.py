"""Spaces: the role × action matrix, stage limits, revocation and races, on both databases."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.spaces_support import Cast, cast, generous_config
from tests.support import Api, assert_error, running_server

ROLES = ("host", "cohost", "speaker", "listener", "blocked", "suspended", "anonymous")


@pytest.fixture
def live(backend: str, tmp_path: Path) -> Iterator[Cast]:
    with running_server(generous_config(backend, tmp_path / "data")) as server:
        yield cast(server)


Call = Callable[[Cast, Api], Any]
Undo = Callable[[Cast], Any] | None

# (action, call, undo after a success, expected status per role in ROLES order)
MATRIX: list[tuple[str, Call, Undo, tuple[int, ...]]] = [
    ("read space", lambda c, a: a.get(c.path()), None, (200, 200, 200, 200, 200, 200, 200)),
    ("read state", lambda c, a: a.get(c.path("/state")), None, (200, 200, 200, 200, 200, 200, 200)),
    ("join", lambda c, a: a.post(c.path("/join")), None, (200, 200, 200, 200, 403, 200, 200)),
    (
        "start (already live)",
        lambda c, a: a.post(c.path("/start")),
        None,
        (409, 403, 403, 403, 403, 403, 401),
    ),
    (
        "invite speaker",
        lambda c, a: a.post(c.path("/speakers"), json={"handle": "cand"}),
        lambda c: c.host.delete(c.path("/speakers/cand")),
        (200, 200, 403, 403, 403, 403, 401),
    ),
    (
        "move speaker to audience",
        lambda c, a: a.delete(c.path("/speakers/speaker2")),
        lambda c: c.host.post(c.path("/speakers"), json={"handle": "speaker2"}),
        (204, 204, 403, 403, 403, 403, 401),
    ),
    (
        "mute speaker",
        lambda c, a: a.post(c.path("/speakers/speaker2/mute")),
        lambda c: c.host.post(c.path("/speakers/speaker2/unmute")),
        (204, 204, 403, 403, 403, 403, 401),
    ),
    (
        "own speaker token",
        lambda c, a: a.post(c.path("/speaker-token")),
        None,
        (200, 200, 200, 403, 403, 403, 401),
    ),
    (
        "appoint co-host",
        lambda c, a: a.post(c.path("/cohosts"), json={"handle": "cand"}),
        lambda c: c.host.delete(c.path("/speakers/cand")),
        (200, 403, 403, 403, 403, 403, 401),
    ),
    (
        "raise hand",
        lambda c, a: a.post(c.path("/speak-requests")),
        None,
        (204, 204, 204, 204, 403, 403, 401),
    ),
    (
        "see requests",
        lambda c, a: a.get(c.path("/speak-requests")),
        None,
        (200, 200, 403, 403, 403, 403, 401),
    ),
    (
        "block account",
        lambda c, a: a.post(c.path("/blocks"), json={"handle": "victim"}),
        lambda c: c.host.delete(c.path("/blocks/victim")),
        (204, 204, 403, 403, 403, 403, 401),
    ),
    (
        "react",
        lambda c, a: a.post(c.path("/reactions"), json={"emoji": "👏"}),
        None,
        (202, 202, 202, 202, 403, 403, 401),
    ),
    ("end (last)", lambda c, a: a.post(c.path("/end")), None, (200, 403, 403, 403, 403, 403, 401)),
]


def test_role_action_matrix(live: Cast) -> None:
    mismatches = []
    # "end" is last and only the host's call succeeds, so it runs host last.
    for action, call, undo, expected in MATRIX:
        order = list(zip(ROLES, expected, strict=True))
        if action.startswith("end"):
            order = order[1:] + order[:1]
        for role, want in order:
            api = live.role("suspended" if role == "suspended" else role)
            r = call(live, api)
            if r.status_code != want:
                mismatches.append(f"{action} as {role}: got {r.status_code} {r.text[:120]}, want {want}")
            if r.status_code >= 400:
                assert set(r.json()) == {"error"}, r.text
            elif undo is not None:
                undo(live)
    assert not mismatches, "\n".join(mismatches)
    # Ended is final: nothing changes an ended space.
    for call in (
        lambda: live.host.post(live.path("/start")),
        lambda: live.host.post(live.path("/end")),
        lambda: live.host.post(live.path("/speakers"), json={"handle": "cand"}),
        lambda: live.listener.post(live.path("/speak-requests")),
        lambda: live.listener.post(live.path("/join")),
        lambda: live.host.post(live.path("/speaker-token")),
    ):
        assert_error(call(), 409, "space_ended")


def test_stage_holds_at_most_13_and_two_cohosts(live: Cast) -> None:
    on_stage = len(live.stage())
    assert on_stage == 4  # host, cohost, speaker, speaker2
    extra = [live.anonymous.user(f"extra{i}") for i in range(12)]
    results = [live.host.post(live.path("/speakers"), json={"handle": f"extra{i}"}) for i in range(12)]
    assert [r.status_code for r in results] == [200] * 9 + [409] * 3
    assert_error(results[-1], 409, "stage_full")
    assert len(live.stage()) == 13
    # A second co-host fits (already on stage); a third is refused.
    assert live.host.post(live.path("/cohosts"), json={"handle": "extra0"}).status_code == 200
    assert_error(live.host.post(live.path("/cohosts"), json={"handle": "extra1"}), 409, "cohost_limit")
    # Someone leaves: room for one more.
    assert extra[5].delete(live.path("/speakers/extra5")).status_code == 204
    assert live.host.post(live.path("/speakers"), json={"handle": "extra9"}).status_code == 200
    assert len(live.stage()) == 13


def test_request_approve_decline_and_hands(live: Cast) -> None:
    assert live.listener.post(live.path("/speak-requests")).status_code == 204
    assert live.listener.post(live.path("/speak-requests")).status_code == 204  # idempotent
    assert [r["handle"] for r in live.host.get(live.path("/speak-requests")).json()["requests"]] == [
        "listener"
    ]
    assert live.speaker.post(live.path("/speak-requests")).status_code == 204  # a speaker's hand
    state = live.anonymous.get(live.path("/state")).json()
    assert state["hands_raised"] == 2
    assert [s["hand_raised"] for s in state["stage"] if s["handle"] == "speaker"] == [True]
    assert live.cohost.delete(live.path("/speak-requests/listener")).status_code == 204  # declined
    assert_error(live.cohost.delete(live.path("/speak-requests/listener")), 404, "no_request")
    live.listener.post(live.path("/speak-requests"))
    granted = live.cohost.post(live.path("/speakers"), json={"handle": "listener"})
    assert granted.status_code == 200
    body = granted.json()
    assert body["whip_url"].endswith(f"/whip/{live.space_id}") and body["whep_url"].endswith(
        f"/whep/{live.space_id}"
    )
    assert live.host.get(live.path("/speak-requests")).json()["requests"] == []
    # The speaker leaves the stage themself.
    assert live.listener.delete(live.path("/speakers/listener")).status_code == 204
    assert "listener" not in [s["handle"] for s in live.stage()]


def test_mute_rules(live: Cast) -> None:
    assert live.speaker.post(live.path("/speakers/speaker/mute")).status_code == 204
    assert live.speaker.post(live.path("/speakers/speaker/unmute")).status_code == 204
    assert live.cohost.post(live.path("/speakers/speaker/mute")).status_code == 204
    assert [s["muted"] for s in live.stage() if s["handle"] == "speaker"] == [True]
    assert_error(live.speaker.post(live.path("/speakers/speaker/unmute")), 403, "muted_by_host")
    assert_error(live.cohost.post(live.path("/speakers/host/mute")), 403, "host_protected")
    assert_error(live.host.post(live.path("/speakers/listener/mute")), 404, "not_on_stage")
    assert live.host.post(live.path("/speakers/speaker/unmute")).status_code == 204
    assert [s["muted"] for s in live.stage() if s["handle"] == "speaker"] == [False]


def test_speaker_token_is_bound_and_revocable(live: Cast) -> None:
    node, clock = live.server.node, live.server.clock
    token = live.speaker.post(live.path("/speaker-token")).json()["speaker_token"]
    grant = node.grants.check(token, live.space_id, clock())
    assert grant.role == "speaker"
    other = live.host.post("/api/v1/spaces", json={"title": "other"}).json()["id"]
    with pytest.raises(ValueError, match="another space"):
        node.grants.check(token, other, clock())
    with pytest.raises(ValueError, match="expired"):
        node.grants.check(token, live.space_id, clock() + node.config.speaker_token_ttl_seconds + 1)
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    with pytest.raises(ValueError):
        node.grants.check(tampered, live.space_id, clock())
    # Revocation: the moment the host moves the speaker off stage, the node refuses the token.
    assert live.host.delete(live.path("/speakers/speaker")).status_code == 204
    with pytest.raises(ValueError, match="revoked"):
        node.grants.check(token, live.space_id, clock())
    assert_error(live.speaker.post(live.path("/speaker-token")), 403, "not_on_stage")
    # Re-invited: a new grant, the old token stays dead.
    fresh = live.host.post(live.path("/speakers"), json={"handle": "speaker"}).json()["speaker_token"]
    assert node.grants.check(fresh, live.space_id, clock()).grant_id != grant.grant_id
    with pytest.raises(ValueError, match="revoked"):
        node.grants.check(token, live.space_id, clock())


def test_suspension_takes_a_speaker_off_stage(live: Cast) -> None:
    token = live.speaker2.post(live.path("/speaker-token")).json()["speaker_token"]
    live.admin.post("/api/v1/admin/accounts/speaker2/suspend", json={"reason": "abuse"})
    with pytest.raises(ValueError, match="revoked"):
        live.server.node.grants.check(token, live.space_id, live.server.clock())
    assert "speaker2" not in [s["handle"] for s in live.stage()]
    assert_error(live.host.post(live.path("/speakers"), json={"handle": "speaker2"}), 409, "target_suspended")


def test_blocked_accounts_are_removed_and_kept_out(live: Cast) -> None:
    live.listener.post(live.path("/speak-requests"))
    assert live.cohost.post(live.path("/blocks"), json={"handle": "speaker2"}).status_code == 204
    assert "speaker2" not in [s["handle"] for s in live.stage()]
    assert_error(live.speaker2.post(live.path("/join")), 403, "blocked")
    assert_error(live.host.post(live.path("/speakers"), json={"handle": "speaker2"}), 409, "target_blocked")
    assert_error(live.cohost.post(live.path("/blocks"), json={"handle": "host"}), 403)
    assert live.host.delete(live.path("/blocks/speaker2")).status_code == 204
    assert live.speaker2.post(live.path("/join")).status_code == 200


def test_two_managers_approving_one_request_at_once(live: Cast) -> None:
    live.listener.post(live.path("/speak-requests"))

    def approve(api: Api) -> tuple[int, str]:
        r = api.post(live.path("/speakers"), json={"handle": "listener"})
        return r.status_code, r.text

    for _ in range(3):
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            results = list(pool.map(approve, [live.host, live.cohost]))
        assert [s for s, _ in results] == [200, 200], results
        handles = [s["handle"] for s in live.stage()]
        assert handles.count("listener") == 1
        live.host.delete(live.path("/speakers/listener"))
        live.listener.post(live.path("/speak-requests"))


def test_granting_past_13_at_once_never_overfills(live: Cast) -> None:
    for i in range(16):
        live.anonymous.user(f"rush{i}")

    def grant(i: int) -> int:
        return live.host.post(live.path("/speakers"), json={"handle": f"rush{i}"}).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(grant, range(16)))
    assert statuses.count(200) == 9 and statuses.count(409) == 7, statuses
    assert len(live.stage()) == 13


def test_host_ending_while_speakers_join(live: Cast) -> None:
    for i in range(8):
        live.anonymous.user(f"late{i}")
    granted_tokens: list[str] = []

    def grant(i: int) -> int:
        r = live.cohost.post(live.path("/speakers"), json={"handle": f"late{i}"})
        if r.status_code == 200:
            granted_tokens.append(r.json()["speaker_token"])
        return r.status_code

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(grant, i) for i in range(8)]
        end = pool.submit(lambda: live.host.post(live.path("/end")).status_code)
        statuses = [f.result() for f in futures]
    assert end.result() == 200
    assert set(statuses) <= {200, 409}, statuses
    state = live.anonymous.get(live.path("/state")).json()
    assert state["state"] == "ended" and state["stage"] == []
    for token in granted_tokens:  # every grant given before the end is void after it
        with pytest.raises(ValueError, match="revoked"):
            live.server.node.grants.check(token, live.space_id, live.server.clock())


def test_unknown_and_malformed_space_ids(live: Cast) -> None:
    for path in ("/api/v1/spaces/NoSuchSpace1", "/api/v1/spaces/NoSuchSpace1/state"):
        assert_error(live.anonymous.get(path), 404)
    assert_error(live.host.post("/api/v1/spaces/NoSuchSpace1/start"), 404, "space_not_found")
    for bad in ("..%2F..", "a" * 17, "x;y"):
        r = live.anonymous.get(f"/api/v1/spaces/{bad}")
        assert r.status_code in (404, 422), r.text
        assert set(r.json()) == {"error"}
