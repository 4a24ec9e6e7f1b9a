"""The command line as a person runs it: `townhall serve` and `townhall demo` as processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support import FAST_ARGON2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env.update({f"TOWNHALL_{k.upper()}": str(v) for k, v in FAST_ARGON2.items()})
    env.update(env_extra or {})
    return subprocess.Popen(
        [sys.executable, "-m", "townhall", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def wait_healthy(url: str, proc: subprocess.Popen[str], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("server did not become healthy")


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    return out


def test_serve_reads_flags_env_and_file(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "townhall.toml"
    config.write_text("[townhall]\nport = 1\nmax_body_bytes = 2048\n")
    proc = start(["serve", "--port", str(port), "--data", str(tmp_path / "d"), "--config", str(config)])
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        assert httpx.get(f"{url}/readyz").status_code == 200
        r = httpx.post(
            f"{url}/api/v1/posts", content=b"x" * 4096, headers={"content-type": "application/json"}
        )
        assert r.status_code == 413  # the file's max_body_bytes is in force; the flag's port too
    finally:
        out = stop(proc)
    assert proc.returncode == 0, out
    assert (tmp_path / "d" / "townhall.db").exists()


def test_serve_refuses_a_bad_setting(tmp_path: Path) -> None:
    proc = start(["serve", "--data", str(tmp_path)], {"TOWNHALL_PORT": "eighty"})
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "port" in out and "Traceback" not in out


def test_demo_prints_its_url_and_is_live(tmp_path: Path) -> None:
    port = free_port()
    proc = start(["demo", "--port", str(port), "--data", str(tmp_path / "demo")])
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        url = f"http://127.0.0.1:{port}/"
        assert url in first, first
        wait_healthy(url.rstrip("/"), proc)
        token = httpx.post(
            f"{url}api/v1/sessions", json={"handle": "demo_host", "password": "demo-password"}
        ).json()["token"]
        me = httpx.get(f"{url}api/v1/me", headers={"Authorization": f"Bearer {token}"}).json()
        assert me["handle"] == "demo_host"
        posts = httpx.get(f"{url}api/v1/accounts/demo_host/posts").json()["posts"]
        assert [p["text"] for p in posts] == ["demo_host is live: townhall demo", "Welcome to townhall."]
        assert "townhall" in httpx.get(url).text
        live = httpx.get(f"{url}api/v1/spaces", params={"state": "live"}).json()["spaces"]
        assert [s["host"] for s in live] == ["demo_host"] and live[0]["id"] in first
    finally:
        stop(proc)
