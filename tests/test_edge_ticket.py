"""The edge checks listener tickets itself: Debian's nginx (auth_request) with the shipped
snippets in the scale-out edge's config, the local verifier, and a real node behind them.
Refused tickets never reach the origin; a verified ticket is asked about once per cache life."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from tests.spaces_support import Cast, cast, generous_config
from tests.support import running_server
from townhall.admission.edge_verifier import create_verifier
from townhall.admission.tickets import PURPOSE, TicketBook
from townhall.scaleout.edge import EdgeSettings, render
from townhall.security.signing import Signer, load_or_create_key_set

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
DEPLOY = Path(__file__).parent.parent / "deploy" / "nginx"

pytestmark = pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Cast]:
    with running_server(generous_config("sqlite", tmp_path / "data")) as server:
        yield cast(server)


class Counted:
    """The verifier, counting the questions nginx asks it."""

    def __init__(self, keys: dict[str, bytes]) -> None:
        self.app = create_verifier(keys)
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.calls += 1
        await self.app(scope, receive, send)


def _origin_hls_requests(c: Cast) -> float:
    total = 0.0
    for line in c.anonymous.get("/metrics").text.splitlines():
        if line.startswith("townhall_http_requests_total{") and 'route="/hls/' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _edge_config(prefix: Path, origin: int, listen: int, verifier: int) -> str:
    """The scale-out edge as rendered for a fleet, with the three ticket snippets included
    where ticket.md says (their paths and the verifier's port moved into the test's prefix)."""
    http = (DEPLOY / "ticket-http.conf").read_text()
    http = http.replace("/var/cache/townhall-edge/tickets", str(prefix / "tickets"))
    http = http.replace("127.0.0.1:9100", f"127.0.0.1:{verifier}")
    (prefix / "ticket-http.conf").write_text(http)
    shutil.copy(DEPLOY / "ticket-server.conf", prefix / "ticket-server.conf")
    shutil.copy(DEPLOY / "ticket.conf", prefix / "ticket.conf")
    text = render(
        EdgeSettings(
            origins=[f"127.0.0.1:{origin}"],
            listen=f"127.0.0.1:{listen}",
            prefix=str(prefix),
            workers="1",
            ticket_dir=str(prefix),
        )
    )
    return text


def test_the_edge_verifies_tickets_without_the_origin(live: Cast) -> None:
    keys = load_or_create_key_set(live.server.config.signing_keys, live.server.config.data)
    verifier = Counted(keys)
    verifier_port = _free_port()
    vserver = uvicorn.Server(
        uvicorn.Config(verifier, host="127.0.0.1", port=verifier_port, log_level="warning", access_log=False)
    )
    vthread = threading.Thread(target=lambda: asyncio.run(vserver.serve()), daemon=True)
    vthread.start()
    prefix = Path(tempfile.mkdtemp(prefix="townhall-edge-ticket-"))
    for sub in ("tmp", "cache", "tickets"):
        (prefix / sub).mkdir()
    for path in (prefix, prefix / "tmp", prefix / "cache", prefix / "tickets"):
        path.chmod(0o777)  # nginx's workers run as nobody
    edge_port = _free_port()
    origin_port = int(live.server.url.rsplit(":", 1)[1])
    conf = prefix / "nginx.conf"
    conf.write_text(_edge_config(prefix, origin_port, edge_port, verifier_port))
    edge = subprocess.Popen(
        [NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    space = live.space_id
    base = f"/hls/{space}"
    http = httpx.Client(base_url=f"http://127.0.0.1:{edge_port}", timeout=20)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                http.get("/healthz")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, (prefix / "error.log").read_text()
                time.sleep(0.1)
        while not vserver.started:
            time.sleep(0.05)

        ticket = live.listener.post(live.path("/join")).json()["ticket"]
        other_space = live.host.post("/api/v1/spaces", json={"title": "Other"}).json()["id"]
        assert live.host.post(f"/api/v1/spaces/{other_space}/start").status_code == 200
        other = live.listener.post(f"/api/v1/spaces/{other_space}/join").json()["ticket"]
        expired, _ = TicketBook(Signer(keys, PURPOSE), ttl=-1).issue(space, "g1", time.time())
        kid, body, mac = ticket.split(".")
        forged = f"{kid}.{body}.{mac[:-2]}{'AA' if not mac.endswith('AA') else 'BB'}"

        before = _origin_hls_requests(live)
        for params, code in [
            ({}, "ticket_required"),
            ({"ticket": forged}, "invalid_ticket"),
            ({"ticket": "x.y"}, "invalid_ticket"),
            ({"ticket": other}, "wrong_space"),
            ({"ticket": expired}, "ticket_expired"),
        ]:
            r = http.get(f"{base}/live.m3u8", params=params)
            assert r.status_code == 403, (params, r.status_code, r.text, (prefix / "error.log").read_text())
            assert r.json()["error"]["code"] == code
        cookie_refused = http.get(f"{base}/init.mp4", headers={"cookie": f"townhall_ticket={forged}"})
        assert (
            cookie_refused.status_code == 403 and cookie_refused.json()["error"]["code"] == "invalid_ticket"
        )
        assert _origin_hls_requests(live) == before  # refused at the edge: the origin never asked

        # A good ticket (query or cookie) is let through to the (caching) origin path.
        deadline = time.monotonic() + 20
        while (r := http.get(f"{base}/live.m3u8", params={"ticket": ticket})).status_code == 503:
            assert time.monotonic() < deadline, "no first part within 20 s"
            time.sleep(0.2)
        assert r.status_code == 200 and r.text.startswith("#EXTM3U"), r.text
        assert "set-cookie" not in {k.lower() for k in r.headers}  # the origin's answer stayed public
        init = http.get(f"{base}/init.mp4", headers={"cookie": f"townhall_ticket={ticket}"})
        assert init.status_code == 200 and init.content[4:8] == b"ftyp"
        # Another listener's ticket: verified once by the edge, and the object comes from its cache.
        second = live.anonymous.post(live.path("/join")).json()["ticket"]
        calls = verifier.calls
        origin_before = _origin_hls_requests(live)
        again = [http.get(f"{base}/init.mp4", params={"ticket": second}) for _ in range(5)]
        assert [a.status_code for a in again] == [200] * 5
        assert again[-1].headers["x-cache"] == "HIT"
        assert verifier.calls == calls + 1  # the verifier's answer is cached per ticket
        assert _origin_hls_requests(live) == origin_before
    finally:
        http.close()
        edge.terminate()
        edge.wait(10)
        vserver.should_exit = True
        vthread.join(10)
        shutil.rmtree(prefix, ignore_errors=True)
