"""Debian's nginx as a listener edge in tests: a directory its workers can use, and the process."""

from __future__ import annotations

import asyncio
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


async def raw_gets(
    port: int, path: str, cookie: str, n: int, *, leave_after: float | None = None
) -> list[bytes]:
    """``n`` GETs of ``path`` through the edge at 127.0.0.1:``port``, one connection each, all
    connected first and then sent together (so they wait on the edge at once); each answer as
    raw bytes. With ``leave_after``, every client hangs up that many seconds after sending,
    without reading (listeners leaving while their request waits), and nothing is returned."""
    conns = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(n)))
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nCookie: townhall_ticket={cookie}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    for _, writer in conns:
        writer.write(request)
    await asyncio.gather(*(writer.drain() for _, writer in conns))
    if leave_after is not None:
        await asyncio.sleep(leave_after)
        for _, writer in conns:
            writer.close()
        return []
    answers = await asyncio.gather(*(reader.read() for reader, _ in conns))
    for _, writer in conns:
        writer.close()
    return list(answers)
