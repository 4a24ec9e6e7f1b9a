"""WHIP/WHEP endpoints refuse what they must, with clear JSON 4xx and no media."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.spaces_support import Cast, cast, generous_config
from tests.support import assert_error, running_server

AUDIO_OFFER = """v=0
o=- 1 1 IN IP4 127.0.0.1
s=-
t=0 0
m=audio 9 UDP/TLS/RTP/SAVPF 111
c=IN IP4 0.0.0.0
a=rtpmap:111 opus/48000/2
a=sendonly
"""
VIDEO_OFFER = """v=0
o=- 1 1 IN IP4 127.0.0.1
s=-
t=0 0
m=video 9 UDP/TLS/RTP/SAVPF 96
c=IN IP4 0.0.0.0
a=rtpmap:96 VP8/90000
"""


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Cast]:
    with running_server(generous_config("sqlite", tmp_path / "data")) as server:
        yield cast(server)


def token_of(c: Cast, who: str = "speaker") -> str:
    return str(c.role(who).post(c.path("/speaker-token")).json()["speaker_token"])


def whip(
    c: Cast, body: str | bytes, token: str | None, ctype: str = "application/sdp", space: str | None = None
):  # type: ignore[no-untyped-def]
    headers = {"content-type": ctype}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    return c.anonymous.http.post(f"/whip/{space or c.space_id}", content=body, headers=headers)


def test_whip_refusals(live: Cast) -> None:
    token = token_of(live)
    assert_error(whip(live, AUDIO_OFFER, None), 401)
    assert_error(whip(live, AUDIO_OFFER, "garbage"), 401, "invalid_token")
    assert_error(whip(live, AUDIO_OFFER, token, ctype="application/json"), 415)
    assert_error(whip(live, "not sdp at all", token), 400, "malformed_sdp")
    assert_error(whip(live, b"\xff\xfe\x00v=0", token), 400, "malformed_sdp")
    assert_error(whip(live, VIDEO_OFFER, token), 400, "no_audio")
    assert_error(whip(live, AUDIO_OFFER.replace("opus", "PCMU"), token), 400, "no_opus")
    assert_error(whip(live, AUDIO_OFFER + "a=x:" + "y" * 70000 + "\n", token), 413)
    # A syntactically plausible offer aiortc cannot use (no ICE credentials, no fingerprint).
    assert_error(whip(live, AUDIO_OFFER, token), 400, "malformed_sdp")


def test_tokens_must_be_current_and_for_this_space(live: Cast) -> None:
    token = token_of(live)
    other = live.host.post("/api/v1/spaces", json={"title": "other"}).json()["id"]
    live.host.post(f"/api/v1/spaces/{other}/start")
    assert_error(whip(live, AUDIO_OFFER, token, space=other), 403, "wrong_space")
    listener_ticket = live.listener.post(live.path("/join")).json()["ticket"]
    assert_error(whip(live, AUDIO_OFFER, listener_ticket), 401)
    live.host.delete(live.path("/speakers/speaker"))
    assert_error(whip(live, AUDIO_OFFER, token), 401, "token_revoked")


def test_protocol_edges(live: Cast) -> None:
    http = live.anonymous.http
    pre = http.options(f"/whip/{live.space_id}")
    assert pre.status_code == 204 and pre.headers["accept-post"] == "application/sdp"
    assert "Location" in pre.headers["access-control-expose-headers"]
    assert_error(http.patch(f"/whip/{live.space_id}/abc"), 405, "trickle_unsupported")
    assert_error(
        http.delete(f"/whip/{live.space_id}/nosuch", headers={"authorization": f"Bearer {token_of(live)}"}),
        404,
    )
    assert_error(
        http.post(f"/whep/{live.space_id}", content=AUDIO_OFFER, headers={"content-type": "application/sdp"}),
        401,
    )
    assert_error(
        http.post(
            f"/whep/{live.space_id}?mix=program",
            content=AUDIO_OFFER,
            headers={"content-type": "application/sdp", "authorization": f"Bearer {token_of(live)}"},
        ),
        403,
        "hosts_only",
    )
