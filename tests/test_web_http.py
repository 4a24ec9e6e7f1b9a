"""The web pages over plain HTTP (no browser): what the node serves, its headers, and the page
a node without the npm packages answers. The browser tests are in test_web.py."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.spaces_support import generous_config
from tests.support import RunningServer, assert_error, running_server
from townhall.config import Config
from townhall.web import pages

# Not a test of overload: a busy machine must not get these requests shed (see test_web.py).
RELAXED = (
    {"shed_target_ms": 500.0} if "shed_target_ms" in {f.name for f in dataclasses.fields(Config)} else {}
)
PAGES = ["/", "/login", "/signup", "/spaces/abc", "/spaces/abc/replay", "/@someone", "/admin"]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[RunningServer]:
    with running_server(generous_config("sqlite", tmp_path / "data", **RELAXED)) as server:
        yield server


def test_every_page_is_an_html_shell_with_a_strict_policy(node: RunningServer) -> None:
    http = node.client()
    for path in PAGES:
        page = http.get(path)
        assert page.status_code == 200, (path, page.text[:200])
        assert page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "script-src 'self'" in policy
        assert "'unsafe-inline'" not in policy
        # One module of our own per page; nothing from another host, no inline script.
        scripts = re.findall(r"<script[^>]*>", page.text)
        assert scripts and all(
            re.fullmatch(r'<script type="module" src="/static/js/\w+\.js">', s) for s in scripts
        )
        module = re.search(r'src="(/static/js/\w+\.js)"', page.text)
        assert module and http.get(module.group(1)).status_code == 200
    # Values put into the page are escaped attributes, and shapes are checked by the router.
    assert 'data-handle="someone"' in http.get("/@someone").text
    assert_error(http.get("/@no<script>"), 422)
    assert_error(http.get("/spaces/not-an-id!"), 422)
    # The page routes stay out of the API description.
    paths = http.get("/openapi.json").json()["paths"]
    assert not [
        p
        for p in paths
        if not p.startswith(("/api/", "/hls/", "/whip/", "/whep/", "/healthz", "/readyz", "/metrics"))
    ]


def test_hls_js_is_served_from_the_lockfile_install(node: RunningServer) -> None:
    installed = pages.hls_js()
    if installed is None:
        pytest.skip("npm packages not installed (run `npm ci`)")
    vendor = node.client().get("/vendor/hls.mjs")
    assert vendor.status_code == 200 and vendor.headers["content-type"].startswith("text/javascript")
    assert vendor.content == installed.read_bytes()
    assert "lowLatencyMode" in vendor.text
    lock = (Path(__file__).parents[1] / "package-lock.json").read_text()
    assert '"node_modules/hls.js"' in lock and '"integrity": "sha512-' in lock


def test_a_node_without_npm_packages_says_how_to_install_them(tmp_path: Path) -> None:
    empty = tmp_path / "node_modules"  # as on a node installed from a wheel
    empty.mkdir()
    config = generous_config("sqlite", tmp_path / "data", web_node_modules=str(empty), **RELAXED)
    with running_server(config) as bare:
        http = bare.client()
        for path in ("/spaces/abc", "/spaces/abc/replay"):
            page = http.get(path)
            assert page.status_code == 503 and page.headers["content-type"].startswith("text/html")
            assert "npm ci" in page.text and str(empty) in page.text
        missing = http.get("/vendor/hls.mjs")
        assert missing.status_code == 404 and "npm ci" in missing.text
        assert http.get("/").status_code == 200  # the pages without audio still work


def test_the_policy_admits_the_public_url_origin_and_nothing_else(tmp_path: Path) -> None:
    """Links handed out on another origin (``public_url``: a CDN for the playlists, the WHIP
    and WHEP endpoints) must be reachable from the page; nothing else is."""
    config = generous_config("sqlite", tmp_path / "data", public_url="https://cdn.example.net/th/", **RELAXED)
    with running_server(config) as behind_cdn:
        policy = behind_cdn.client().get("/spaces/abc").headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["connect-src"] == "'self' https://cdn.example.net"
    assert directives["media-src"] == "'self' blob: https://cdn.example.net"
    assert directives["script-src"] == "'self'"
