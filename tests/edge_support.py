"""Debian's nginx as a listener edge in tests: a directory its workers can use, and the process."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@contextmanager
def edge_prefix(*subdirs: str) -> Iterator[Path]:
    """A fresh directory for the edge's cache, temp files, pid and logs. nginx's workers drop
    root for "nobody": the directory lives outside the test's private tmp_path, open to them."""
    prefix = Path(tempfile.mkdtemp(prefix="townhall-edge-"))
    try:
        for path in [prefix, *(prefix / sub for sub in ("tmp", "cache", *subdirs))]:
            path.mkdir(exist_ok=True)
            path.chmod(0o777)
        yield prefix
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


@contextmanager
def running_edge(prefix: Path, config: str, port: int, *, ready_path: str = "/healthz") -> Iterator[str]:
    """nginx running ``config`` (listening on 127.0.0.1:``port``); yields its base URL once
    ``ready_path`` answers through it, stops it afterwards."""
    conf = prefix / "nginx.conf"
    conf.write_text(config)
    edge = subprocess.Popen(
        [NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            assert edge.poll() is None, (prefix / "error.log").read_text()
            try:
                if httpx.get(url + ready_path, timeout=2).status_code < 500:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (prefix / "error.log").read_text()
            time.sleep(0.1)
        yield url
    finally:
        edge.terminate()
        edge.wait(10)
