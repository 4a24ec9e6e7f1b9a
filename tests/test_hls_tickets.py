"""Listener tickets on the LL-HLS origin: as a cookie or a query, one playlist for everyone."""

from __future__ import annotations

import shutil
import subprocess
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.spaces_support import Cast, cast, generous_config
from tests.support import assert_error, running_server
from tests.test_audience import Speaker
from townhall.audience.listener import Follower, parse_media_playlist
from townhall.stage.sources import tone_power

COOKIE = "townhall_ticket"


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Cast]:
    with running_server(generous_config("sqlite", tmp_path / "data")) as server:
        yield cast(server)


@pytest.fixture
def live_asgi(tmp_path: Path) -> Iterator[Cast]:
    """Served by uvicorn's own protocol: listener requests take the ASGI fast path
    (``hls.FastPath``), as under any other ASGI server (``live`` answers them in the HTTP
    protocol, as ``townhall serve`` does; ``test_listener_protocol.py`` covers that layer)."""
    with running_server(generous_config("sqlite", tmp_path / "data"), protocol=False) as server:
        yield cast(server)


def playlist_when_ready(client: httpx.Client, url: str, **params: str) -> httpx.Response:
    deadline = time.monotonic() + 20
    while (r := client.get(url, params=params)).status_code == 503:
        assert time.monotonic() < deadline, "no first part within 20 s"
        time.sleep(0.1)
    assert r.status_code == 200, r.text
    return r


def set_cookie_attributes(response: httpx.Response) -> dict[str, str]:
    header = response.headers["set-cookie"]
    name_value, *attrs = (a.strip() for a in header.split(";"))
    out = {"": name_value}
    for a in attrs:
        key, _, value = a.partition("=")
        out[key.lower()] = value
    return out


def test_join_sets_the_ticket_cookie_and_a_cookie_alone_plays(live: Cast) -> None:
    browser = httpx.Client(base_url=live.server.url, timeout=30)
    try:
        r = browser.post(live.path("/join"))
        assert r.status_code == 200
        ticket = r.json()["ticket"]
        attrs = set_cookie_attributes(r)
        assert attrs[""] == f"{COOKIE}={ticket}"
        assert attrs["path"] == f"/hls/{live.space_id}/"
        assert "httponly" in attrs and attrs["samesite"].lower() == "lax" and "secure" not in attrs
        ttl = live.server.config.ticket_ttl_seconds
        assert ttl - 5 <= int(attrs["max-age"]) <= ttl
        assert "no-store" in r.headers["cache-control"]
        # No ticket in any URL from here on: the cookie carries it.
        base = f"/hls/{live.space_id}/"
        pl = playlist_when_ready(browser, base + "live.m3u8")
        assert "set-cookie" not in pl.headers and pl.headers["cache-control"].startswith("public")
        assert "ticket" not in pl.text  # the same bytes for every listener
        init = browser.get(base + "init.mp4")
        assert init.status_code == 200 and "set-cookie" not in init.headers
        parts = parse_media_playlist(pl.text).parts
        part = browser.get(base + parts[-1].uri)
        assert part.status_code == 200 and part.headers["cache-control"].startswith("public")
        # The cookie is scoped to this space's path: another space's requests never carry it.
        other = live.host.post("/api/v1/spaces", json={"title": "o"}).json()["id"]
        assert live.host.post(f"/api/v1/spaces/{other}/start").status_code == 200
        assert_error(browser.get(f"/hls/{other}/live.m3u8"), 403, "ticket_required")
    finally:
        browser.close()


def test_a_query_alone_plays_and_a_ticketed_playlist_hands_over_the_cookie(live: Cast) -> None:
    ticket = live.listener.post(live.path("/join")).json()["ticket"]
    base = f"{live.server.url}/hls/{live.space_id}/"
    # A client that keeps no cookies at all (a fresh connection per request).
    with httpx.Client(timeout=30) as once:
        pl = playlist_when_ready(once, base + "live.m3u8", ticket=ticket)
    assert pl.headers["cache-control"].startswith("private")  # it carries Set-Cookie
    attrs = set_cookie_attributes(pl)
    assert attrs[""] == f"{COOKIE}={ticket}" and attrs["path"] == f"/hls/{live.space_id}/"
    for uri in ["init.mp4", parse_media_playlist(pl.text).parts[-1].uri]:
        r = httpx.get(base + uri, params={"ticket": ticket})
        assert r.status_code == 200 and "set-cookie" not in r.headers
        assert "immutable" in r.headers["cache-control"] and r.headers["cache-control"].startswith("public")
        assert_error(httpx.get(base + uri), 403, "ticket_required")
    # Once the cookie holds that ticket, a ticketed request is public again: nothing to hand over.
    again = httpx.get(base + "live.m3u8", params={"ticket": ticket}, cookies={COOKIE: ticket})
    assert again.status_code == 200 and "set-cookie" not in again.headers
    assert again.headers["cache-control"].startswith("public")


def test_listeners_get_identical_playlist_bytes_however_the_ticket_travels(live: Cast) -> None:
    a = live.listener.post(live.path("/join")).json()["ticket"]
    b = live.anonymous.post(live.path("/join")).json()["ticket"]
    assert a != b
    url = f"{live.server.url}/hls/{live.space_id}/live.m3u8"
    with httpx.Client(timeout=30) as once:
        first = playlist_when_ready(once, url, ticket=a)
    follower = Follower()
    follower.update(parse_media_playlist(first.text))
    msn, part = follower.blocking_request()
    blocking = {"_HLS_msn": msn, "_HLS_part": part}
    # Same stream state, same bytes: fetch both ways until a pair lists the same newest part (a
    # part may land between two requests).
    for _ in range(5):
        by_query = httpx.get(url, params={**blocking, "ticket": a}, timeout=30)
        by_cookie = httpx.get(url, params=blocking, cookies={COOKIE: b}, timeout=30)
        assert by_query.status_code == by_cookie.status_code == 200
        assert f"seg{msn}.{part}.m4s" in by_cookie.text  # the part asked for is there
        newest = [parse_media_playlist(r.text).parts[-1].key for r in (by_query, by_cookie)]
        if newest[0] == newest[1]:
            break
    assert newest[0] == newest[1]
    assert by_query.content == by_cookie.content
    assert by_cookie.headers["cache-control"].startswith("public, max-age=")


def test_a_ticket_for_one_space_opens_no_other(live: Cast) -> None:
    other = live.host.post("/api/v1/spaces", json={"title": "B"}).json()["id"]
    assert live.host.post(f"/api/v1/spaces/{other}/start").status_code == 200
    ticket_a = live.listener.post(live.path("/join")).json()["ticket"]
    base_b = f"{live.server.url}/hls/{other}/"
    for uri in ["live.m3u8", "init.mp4", "seg0.0.m4s", "seg0.m4s"]:
        assert_error(httpx.get(base_b + uri, params={"ticket": ticket_a}), 403, "wrong_space")
        # Even sent by hand for B's path (a browser never would: the cookie is A's path).
        assert_error(httpx.get(base_b + uri, cookies={COOKIE: ticket_a}), 403, "wrong_space")
    # A refused ticket is never handed over as a cookie.
    refused = httpx.get(base_b + "live.m3u8", params={"ticket": ticket_a})
    assert "set-cookie" not in refused.headers


def test_the_fast_path_answers_exactly_as_the_routes_do(live_asgi: Cast) -> None:
    """Listener GETs in the common case are answered before routing (``hls.FastPath``); a request
    it declines (here: a conditional that does not match, an unknown parameter) takes the
    FastAPI route. Both must give the same status, bytes and headers."""
    live = live_asgi
    ticket = live.listener.post(live.path("/join")).json()["ticket"]
    base = f"{live.server.url}/hls/{live.space_id}/"
    with httpx.Client(timeout=30, cookies={COOKIE: ticket}) as c:
        playlist_when_ready(c, base + "live.m3u8")
        pl = c.get(base + "live.m3u8", params={"_HLS_msn": 0})  # held until segment 0 is whole
        names = ["init.mp4", parse_media_playlist(pl.text).parts[-1].uri]
        names.append(next(s.uri for s in parse_media_playlist(pl.text).segments if s.complete))
        same = ("cache-control", "etag", "content-type", "content-length", "accept-ranges")
        for name in names:
            for method in ("GET", "HEAD"):
                fast = c.request(method, base + name)
                routed = c.request(method, base + name, headers={"If-None-Match": '"not-it"'})
                assert fast.status_code == routed.status_code == 200, (name, method)
                assert fast.content == routed.content
                assert {h: fast.headers.get(h) for h in same} == {h: routed.headers.get(h) for h in same}
        for _ in range(5):  # a part may land between the two requests
            fast, routed = c.get(base + "live.m3u8"), c.get(base + "live.m3u8", params={"x": "1"})
            if fast.content == routed.content:
                break
        assert fast.status_code == routed.status_code == 200 and fast.content == routed.content
        assert {h: fast.headers[h] for h in ("cache-control", "content-type", "content-length")} == {
            h: routed.headers[h] for h in ("cache-control", "content-type", "content-length")
        }
        metrics = httpx.get(f"{live.server.url}/metrics").text
        assert 'route="/hls/{space_id}/{name}",status="200"' in metrics
        assert 'route="/hls/{space_id}/live.m3u8",status="200"' in metrics


def test_a_blocking_reload_that_cannot_be_answered_gets_the_error_model(live_asgi: Cast) -> None:
    """Held on the ASGI fast path: a part that will never come (the space ended) is a 503 in
    the one error model, as the route would answer it."""
    live = live_asgi
    ticket = live.listener.post(live.path("/join")).json()["ticket"]
    url = f"{live.server.url}/hls/{live.space_id}/live.m3u8"
    with httpx.Client(timeout=30, cookies={COOKIE: ticket}) as c:
        follower = Follower()
        follower.update(parse_media_playlist(playlist_when_ready(c, url).text))
        msn, _ = follower.blocking_request()
        assert live.host.post(live.path("/end")).status_code == 200
        later = msn + 1  # past anything the ended stream can still have flushed
        assert_error(c.get(url, params={"_HLS_msn": later, "_HLS_part": 0}), 503, "not_yet_available")
        assert_error(c.get(url, params={"_HLS_msn": later + 5}), 400, "bad_blocking_request")


def test_ffmpeg_plays_the_hls_url_carrying_the_ticket_as_a_cookie(live: Cast, tmp_path: Path) -> None:
    """ffmpeg resolves the playlist's relative URIs without the playlist's query, so the parts
    reach it only through the cookie the ticketed playlist response set."""
    ffmpeg = shutil.which("ffmpeg")
    assert ffmpeg, "ffmpeg is a test peer (make sysdeps installs it)"
    token = live.speaker.post(live.path("/speaker-token")).json()["speaker_token"]
    speaker = Speaker(f"{live.server.url}/whip/{live.space_id}", token, 660.0)
    try:
        hls_url = live.listener.post(live.path("/join")).json()["hls_url"]
        with httpx.Client(timeout=30) as c:
            playlist_when_ready(c, hls_url.split("?")[0], ticket=hls_url.split("ticket=")[1])
            # ffmpeg plays whole segments (it does not know parts): wait for two to be complete.
            pl = c.get(hls_url.split("?")[0], params={"_HLS_msn": 1})
            assert pl.status_code == 200, pl.text
        part = parse_media_playlist(pl.text).parts[-1].uri
        assert_error(httpx.get(f"{live.server.url}/hls/{live.space_id}/{part}"), 403, "ticket_required")
        out = tmp_path / "ffmpeg.wav"
        args = ["-hide_banner", "-loglevel", "error", "-live_start_index", "-4", "-i", hls_url]
        run = subprocess.run(
            [ffmpeg, *args, "-t", "3", "-ac", "1", "-ar", "48000", str(out)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
    finally:
        speaker.close()
    with wave.open(str(out), "rb") as w:
        samples = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    assert len(samples) >= 2.5 * 48000
    assert tone_power(samples, 48000, 660.0) > 0.5
