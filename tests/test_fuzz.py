"""A bounded schemathesis pass over /openapi.json against the real server: no 5xx, ever."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import make_config, running_server

pytestmark = pytest.mark.fuzz


# Three passes cover every caller kind and both databases. The boundary-value ("coverage")
# phase is the slow one (~1,400 cases over the whole API), so it runs once; the other passes
# fuzz with random bodies. WHIP/WHEP take application/sdp, which schemathesis cannot generate;
# tests/test_stage_http.py covers their bad input.
@pytest.mark.parametrize(
    ("backend", "who", "phases"),
    [
        ("sqlite", "anonymous", "coverage,fuzzing"),
        ("postgresql", "user", "fuzzing"),
        ("postgresql", "admin", "fuzzing"),
    ],
)
def test_fuzz_finds_no_server_error(backend: str, who: str, phases: str, tmp_path: Path) -> None:
    generous = "1000000/minute"
    config = make_config(
        backend,
        tmp_path / "data",
        login_limit_per_address=generous,
        login_limit_per_account=generous,
        signup_limit_per_address=generous,
        post_limit_per_account=generous,
    )
    with running_server(config) as server:
        headers: list[str] = []
        if who == "admin":
            headers = ["-H", f"Authorization: Bearer {server.create_admin()}"]
        elif who == "user":
            headers = ["-H", f"Authorization: Bearer {server.client().user('fuzzer').token}"]
        server.client().user("target").post("/api/v1/posts", json={"text": "fuzz me"})
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "run",
                f"{server.url}/openapi.json",
                "--checks",
                "not_a_server_error",
                "--max-examples",
                "12",
                "--seed",
                "20261124",
                "--request-timeout",
                "10",
                "--phases",
                phases,
                "--exclude-path-regex",
                "^/(whip|whep)/",
                "--exclude-path",
                "/api/v1/sessions/current",
                "--exclude-path",
                "/api/v1/spaces/{space_id}/events",
                *headers,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
        assert "generated" in run.stdout, run.stdout[-3000:]
