from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import RunningServer, make_config, running_server

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def server(backend: str, tmp_path: Path) -> Iterator[RunningServer]:
    """A real townhall node on a loopback port, on SQLite or on the machine's PostgreSQL."""
    with running_server(make_config(backend, tmp_path / "data")) as running:
        yield running
