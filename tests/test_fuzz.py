"""A bounded schemathesis pass over /openapi.json against the real server: no 5xx, ever."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import make_config, running_server

pytestmark = pytest.mark.fuzz


# Three passes cover every caller kind and both databases. The boundary-value ("coverage")
# phase is the slow one (~1,100 cases over the whole API), so it runs once; the other passes
# fuzz with random bodies. WHIP/WHEP take application/sdp, which schemathesis cannot generate;
# tests/test_stage_http.py covers their bad input.
#
# Random cases per operation and pass: every operation is still exercised by every pass (the
# test counts them in the schema and checks schemathesis tested each), and the seed is fixed. 6 instead of 12
# halves the random cases (~270 a pass instead of ~540) and the fuzz file's time with them.
EXAMPLES = 6
# Left out, each for the reason given above or beside it.
EXCLUDED_PREFIX = re.compile(r"^/(whip|whep)/")  # application/sdp
EXCLUDED_PATHS = {
    "/api/v1/sessions/current",  # logging out would end the pass's own session
    "/api/v1/spaces/{space_id}/events",  # a stream that stays open
}
METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


def operations_to_test(schema: dict[str, Any]) -> int:
    return sum(
        1
        for path, item in schema["paths"].items()
        for method in item
        if method in METHODS and not EXCLUDED_PREFIX.match(path) and path not in EXCLUDED_PATHS
    )


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
                str(EXAMPLES),
                "--seed",
                "20261124",
                "--request-timeout",
                "10",
                "--phases",
                phases,
                "--exclude-path-regex",
                EXCLUDED_PREFIX.pattern,
                *(arg for path in sorted(EXCLUDED_PATHS) for arg in ("--exclude-path", path)),
                *headers,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
        assert "generated" in run.stdout, run.stdout[-3000:]
        # Every operation of the schema but those left out was tested: fewer examples per
        # operation never means fewer operations.
        expected = operations_to_test(server.client().get("/openapi.json").json())
        assert f"Selected: {expected}/" in run.stdout, (expected, run.stdout[-3000:])
        assert f"Tested: {expected}\n" in run.stdout, (expected, run.stdout[-3000:])
