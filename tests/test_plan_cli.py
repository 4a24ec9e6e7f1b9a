"""`townhall plan` as a person runs it: the plan printed with its assumptions, JSON and PNG written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def plan(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "townhall", "plan", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_plan_prints_its_inputs_and_writes_json_and_png(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "control.json").write_text(
        json.dumps(
            {"results": [{"case": "GET /healthz (15 B)", "townhall": {"rps": 4000}, "peer": {"rps": 30000}}]}
        )
    )
    (tmp_path / "mine.json").write_text(json.dumps({"joins_per_core": 2500, "edge_ram_gib": 128}))
    out = tmp_path / "out"
    done = plan(
        "--listeners", "400000", "--bitrate", "96k", "--first-minute", "100000",
        "--inputs", "mine.json", "--results", str(results), "--out", str(out),
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "400,000 listeners" in text and "AAC 96 kb/s" in text
    assert "Inputs" in text and "Assumptions" in text
    assert (
        "edge_rps_per_core = 30,000.0 req/s/core  [measured: control.json: results[case=GET /healthz" in text
    )
    assert "joins_per_core = 2,500.0 req/s/core  [--inputs: mine.json]" in text
    assert "playlist_bytes = 1,430.0 B  [default:" in text
    assert "128 GiB RAM" in text and "10 Gb/s NIC" in text
    assert "Result files not found" in text and "audience.json" in text
    assert "edges (nginx):" in text and "Redis:" in text
    assert "An --inputs file is a JSON object setting any of: origin_part_rps_per_core" in text
    keys = next(line for line in text.splitlines() if line.startswith("An --inputs file"))
    assert "edge_nic_gbps" in keys and "joins_per_core" in keys
    document = json.loads((out / "plan.json").read_text())
    assert document["stream"]["listeners"] == 400_000
    assert document["inputs"]["joins_per_core"]["origin"] == "--inputs"
    assert document["storm"]["admitted"] == 400_000
    assert document["command"].startswith("townhall plan --listeners 400000 --bitrate 96000")
    assert document["fleet"]["edges"] >= 1
    png = (out / "plan.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_plan_reads_the_repository_results_by_default(tmp_path: Path) -> None:
    if not (RESULTS / "control.json").exists():
        return  # nothing measured in this checkout; the test above covers reading a file
    shutil.copytree(RESULTS, tmp_path / "bench" / "results", ignore=shutil.ignore_patterns("*.png"))
    done = plan("--listeners", "100000", "--first-minute", "20000", "--no-plot", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "[measured: control.json" in done.stdout or "[measured: audience.json" in done.stdout
    assert (tmp_path / "plan-results" / "plan.json").exists()
    assert not (tmp_path / "plan-results" / "plan.png").exists()


def test_plan_refuses_what_it_cannot_use(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text(json.dumps({"cores_per_edge": 8}))
    done = plan("--listeners", "1000", "--inputs", "bad.json", "--out", "o", cwd=tmp_path)
    assert done.returncode == 2
    assert "cores_per_edge" in done.stderr
    done = plan("--listeners", "1000", "--bitrate", "fast", cwd=tmp_path)
    assert done.returncode == 2
    assert "not a bitrate" in done.stderr
