"""The plot of "Stage: the cost of a space" in BENCHMARKS.md, from the runs kept in a directory.

``.venv/bin/python bench/plot_stage_cost.py bench/results/stage-cost``

Reads ``ramp-old*.json`` and ``ramp-new*.json`` (``bench_stage.py --only ramp`` on the code before
and after), ``profile-{old,new}-*.json`` (``profile_stage.py --json``: per-thread CPU of 8 spaces)
and ``cpu13-{old,new}-*.json`` (``bench_stage.py --only cpu``), and writes ``stage-cost.png``
beside them: stage cores against spaces for both, the per-thread split at 8 spaces (medians),
and the 13-speaker runs.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

THREADS = ("event loop (main)", "Opus encoder thread", "packager threads")


def load(path: Path) -> Any:
    return json.loads(path.read_text())


def main(directory: str) -> int:
    root = Path(directory)
    fig, (ramp_ax, thread_ax, cpu_ax) = plt.subplots(1, 3, figsize=(16, 5))
    ramps = [("old", "tab:red", p) for p in sorted(root.glob("ramp-old*.json"))]
    ramps += [("new", "tab:blue", p) for p in sorted(root.glob("ramp-new*.json"))]
    for label, colour, path in ramps:
        steps = load(path)["results"]["ramp"]["steps"]
        ns = [s["spaces"] for s in steps]
        when = load(path)["date"][11:16]
        name = path.stem.removeprefix("ramp-")
        style = "s--" if "prio" in name else "o-"  # the workers below the loop's priority
        ramp_ax.plot(ns, [s["stage_cores"] for s in steps], style, color=colour, label=f"{name} ({when} UTC)")
        late = [s for s in steps if s["late_tick_in_window"]]
        if late:
            xs, ys = [s["spaces"] for s in late], [s["stage_cores"] for s in late]
            ramp_ax.plot(xs, ys, "x", color="black", markersize=12)
    ramp_ax.axvline(20, color="grey", linestyle=":", label="target: 20 spaces")
    ramp_ax.set_xlabel("concurrent 3-speaker spaces (3 WHIP + 3 WHEP each)")
    ramp_ax.set_ylabel("stage process CPU, cores")
    ramp_ax.set_title("Ramp (x: late tick in the window)")
    ramp_ax.legend(fontsize=7)
    ramp_ax.grid(alpha=0.3)

    width = 0.38
    for i, (label, colour) in enumerate((("old", "tab:red"), ("new", "tab:blue"))):
        runs = [load(p)["threads"] for p in sorted(root.glob(f"profile-{label}-*.json"))]
        medians = [statistics.median(r.get(t, {"cores": 0.0})["cores"] for r in runs) for t in THREADS]
        xs = [x + (i - 0.5) * width for x in range(len(THREADS))]
        thread_ax.bar(xs, medians, width, color=colour, label=f"{label} (median of {len(runs)})")
        for x, m in zip(xs, medians, strict=True):
            thread_ax.text(x, m, f"{m:.3f}", ha="center", va="bottom", fontsize=8)
    thread_ax.set_xticks(range(len(THREADS)), [t.replace(" thread", "") for t in THREADS])
    thread_ax.set_ylabel("cores")
    thread_ax.set_title("8 spaces: stage CPU by thread")
    thread_ax.legend()

    for i, (label, colour) in enumerate((("old", "tab:red"), ("new", "tab:blue"))):
        values = [
            load(p)["results"]["cpu_13"]["stage_cores"] for p in sorted(root.glob(f"cpu13-{label}-*.json"))
        ]
        cpu_ax.plot([i] * len(values), values, "o", color=colour, markersize=9)
        if values:
            cpu_ax.text(i + 0.08, statistics.median(values), f"median {statistics.median(values):.3f}")
    cpu_ax.set_xticks([0, 1], ["old", "new"])
    cpu_ax.set_xlim(-0.5, 1.8)
    cpu_ax.set_ylim(bottom=0)
    cpu_ax.set_ylabel("stage process CPU, cores")
    cpu_ax.set_title("One space, 13 speakers + 13 returns (target < 0.5)")
    fig.suptitle("Stage: the cost of a space, before and after (2 cores, shared machine)")
    fig.tight_layout()
    out = root / "stage-cost.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/stage-cost"))
