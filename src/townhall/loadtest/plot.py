"""The load test's PNG: answers over time, latency percentiles, and the stage's tick lateness."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from townhall.loadtest.accounting import ERRORS, REJECTED, Sampled


@dataclasses.dataclass(frozen=True)
class Series:
    """What the top two panels show: per-bucket counts (name -> values, with a line style) and
    latency percentiles, on bucket start times ``t``."""

    t: list[float]
    width: float
    counts: dict[str, tuple[list[float], str]]
    count_label: str
    latency: dict[str, tuple[list[float], list[float]]]  # name -> (t, seconds)
    latency_label: str


def _width(rows: Sequence[Mapping[str, Any]]) -> float:
    return float(rows[1]["t"] - rows[0]["t"]) if len(rows) > 1 else 1.0


def _col(rows: Sequence[Mapping[str, Any]], *keys: str, per: float = 1.0) -> list[float]:
    return [sum(float(r.get(k, 0)) for k in keys) / per for r in rows]


def _lat(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(float(r["t"]), float(r[key])) for r in rows if key in r]
    return [t for t, _ in pts], [v for _, v in pts]


def join_series(rows: Sequence[Mapping[str, Any]], attack: Sequence[Mapping[str, Any]] = ()) -> Series:
    width = _width(rows or attack)
    t = [float(r["t"]) for r in rows]
    counts = {
        "admitted": (_col(rows, "admitted", per=width), "-"),
        "queued (202)": (_col(rows, "queued", per=width), "-"),
        "rejected (429/403/503/4xx)": (_col(rows, *REJECTED, per=width), "-"),
        "errors (5xx, transport)": (_col(rows, *ERRORS, per=width), "-"),
        "waiting (joiners, not per second)": (_col(rows, "waiting"), ":"),
    }
    latency = {"join p50": _lat(rows, "p50"), "join p99": _lat(rows, "p99")}
    if attack:
        at = [float(r["t"]) for r in attack]
        counts["attack turned away"] = (_col(attack, *REJECTED, per=width), "--")
        counts["attack let in (200/202)"] = (_col(attack, "admitted", "queued", per=width), "--")
        latency["attack p99"] = _lat(attack, "p99")
        # Put the legitimate series on the attack's time axis when it is the longer one.
        if len(at) > len(t):
            pad = len(at) - len(t)
            t = at
            counts = {
                k: ((v + [0.0] * pad) if not k.startswith("attack") else v, s) for k, (v, s) in counts.items()
            }
        elif len(t) > len(at):
            pad = len(t) - len(at)
            counts = {
                k: ((v + [0.0] * pad) if k.startswith("attack") else v, s) for k, (v, s) in counts.items()
            }
    return Series(t, width, counts, "answers per second", latency, "join request latency (s)")


def listener_series(parts: Sequence[Mapping[str, Any]], joins: Sequence[Mapping[str, Any]]) -> Series:
    width = _width(parts or joins)
    n = max(len(parts), len(joins))
    t = [i * width for i in range(n)]

    def pad(v: list[float]) -> list[float]:
        return v + [0.0] * (n - len(v))

    counts = {
        "parts delivered": (pad(_col(parts, "part", per=width)), "-"),
        "joins admitted": (pad(_col(joins, "admitted", per=width)), "--"),
        "joins queued or rejected": (pad(_col(joins, "queued", *REJECTED, *ERRORS, per=width)), "--"),
    }
    latency = {"part p50 behind live": _lat(parts, "p50"), "part p99 behind live": _lat(parts, "p99")}
    return Series(t, width, counts, "per second", latency, "part latency behind live edge (s)")


def draw(path: Path, title: str, series: Series, lateness: Sampled) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, mid, low) = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    try:
        for name, (values, style) in series.counts.items():
            if any(values):
                top.plot(series.t[: len(values)], values, style, label=name, drawstyle="steps-post")
        top.set_ylabel(series.count_label)
        top.set_title(title)
        top.legend(loc="upper right", fontsize=8)
        top.grid(alpha=0.3)
        for name, (t, v) in series.latency.items():
            if v:
                mid.plot(t, v, ".-", label=name)
        mid.set_ylabel(series.latency_label)
        mid.set_yscale("log")
        mid.legend(loc="upper right", fontsize=8)
        mid.grid(alpha=0.3, which="both")
        ts = [t for t, _ in lateness.samples]
        for q, label in (("0.5", "p50"), ("0.99", "p99"), ("1.0", "max")):
            vals = [v.get(q, float("nan")) * 1000 for _, v in lateness.samples]
            if ts:
                low.plot(ts, vals, ".-", label=f"tick lateness {label}")
        low.axhline(5.0, color="grey", linestyle=":", label="5 ms target (p99)")
        low.set_ylabel("stage tick lateness (ms)\n(node's 10-min window)")
        low.set_xlabel("seconds since the start")
        low.legend(loc="upper left", fontsize=8)
        low.grid(alpha=0.3)
        late = lateness.late_since_start()
        if late and any(v for _, v in late):
            twin = low.twinx()
            for key, style in (("late>0.005", "--"), ("late>0.01", "-."), ("late>0.02", ":")):
                twin.plot(
                    [t for t, _ in late],
                    [v.get(key, 0.0) for _, v in late],
                    style,
                    color="black",
                    linewidth=1,
                    label=f"ticks late > {float(key[5:]) * 1000:.0f} ms, this run",
                )
            twin.set_ylabel("late ticks since the start")
            twin.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
