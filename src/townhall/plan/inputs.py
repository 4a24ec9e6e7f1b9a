"""The planner's inputs: figures measured by the benchmarks here, or documented defaults.

Each input names where its value came from, so the plan can print it: a benchmark result file
and the key inside it, the operator's ``--inputs`` file, or the default written below (with the
reason for it). Reading the files is the caller's job; everything here is a function of the
parsed JSON documents, keyed by file name (``"audience.json"``).

A key path is dotted names and list selectors: ``rates.rows[object=part].peer.requests_per_cpu_s``
takes the first element of ``rows`` whose ``object`` is ``"part"``; ``runs[0]`` takes by index.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

_STEP = re.compile(r"([^.\[\]]+)|\[([^\]=]+)=([^\]]*)\]|\[(\d+)\]")


def lookup(doc: Any, path: str) -> Any:
    """The value at ``path`` in a parsed JSON document, or None if any step is missing."""
    at = doc
    for name, key, value, index in _STEP.findall(path):
        if name:
            if not isinstance(at, Mapping) or name not in at:
                return None
            at = at[name]
        elif key:
            if not isinstance(at, Sequence):
                return None
            at = next((x for x in at if isinstance(x, Mapping) and str(x.get(key)) == value), None)
            if at is None:
                return None
        else:
            if not isinstance(at, Sequence) or int(index) >= len(at):
                return None
            at = at[int(index)]
    return at


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        return None
    return float(value)


@dataclasses.dataclass(frozen=True)
class Source:
    """One place a measured figure can be read from: ``file`` and a description of the key;
    ``read`` takes the parsed file and returns the figure (None when it is not there)."""

    file: str
    key: str
    read: Callable[[Any], float | None]

    @classmethod
    def at(cls, file: str, path: str, note: str = "") -> Source:
        return cls(file, path + (f" ({note})" if note else ""), lambda doc: _number(lookup(doc, path)))


@dataclasses.dataclass(frozen=True)
class Spec:
    """An input: its name, unit, meaning, default with the reason for it, and where a measured
    value is looked for (first found wins)."""

    name: str
    unit: str
    meaning: str
    default: float
    why_default: str
    sources: tuple[Source, ...] = ()


@dataclasses.dataclass(frozen=True)
class Figure:
    """A resolved input: the value and where it came from."""

    name: str
    value: float
    unit: str
    meaning: str
    origin: str  # "measured", "--inputs" or "default"
    source: str  # file and key, the inputs file, or the reason for the default


def _media_rate(doc: Any) -> float | None:
    size = _number(lookup(doc, "cases[case=1 minute].runs[0].m4a_bytes"))
    seconds = _number(lookup(doc, "cases[case=1 minute].audio_seconds"))
    return size / seconds if size and seconds else None


def _edge_rate(listeners: int) -> Callable[[Any], float | None]:
    """Requests per edge CPU-second in the edge benchmark's run with ``listeners`` players."""

    def read(doc: Any) -> float | None:
        run = f"runs[listeners={listeners}]"
        requests = _number(lookup(doc, run + ".edge_requests"))
        seconds = _number(lookup(doc, run + ".window_s"))
        cores = _number(lookup(doc, run + ".edge_cores"))
        return requests / seconds / cores if requests and seconds and cores else None

    return read


def _edge_source(listeners: int) -> Source:
    run = f"runs[listeners={listeners}]"
    key = f"{run}: edge_requests ÷ window_s ÷ edge_cores (the shipped edge, LL-HLS players)"
    return Source("edge.json", key, _edge_rate(listeners))


HEALTHZ = "results[case=GET /healthz (15 B)]"

SPECS: tuple[Spec, ...] = (
    Spec(
        "origin_part_rps_per_core",
        "req/s/core",
        "origin (townhall node) rate for a cached part, per core",
        4000.0,
        "the order of the control benchmark's /healthz in one process (~4,500/s)",
        (
            Source.at("audience.json", "rates.rows[object=part].townhall.requests_per_cpu_s"),
            Source.at(
                "control.json",
                HEALTHZ + ".townhall.rps",
                "one process: the framework's ceiling; the HLS fast path skips routing, so low",
            ),
        ),
    ),
    Spec(
        "origin_playlist_rps_per_core",
        "req/s/core",
        "origin rate for a live playlist, per core",
        4000.0,
        "as for parts",
        (
            Source.at("audience.json", "rates.rows[object=playlist].townhall.requests_per_cpu_s"),
            Source.at("control.json", HEALTHZ + ".townhall.rps", "one process: the framework's ceiling"),
        ),
    ),
    Spec(
        "edge_rps_per_core",
        "req/s/core",
        "nginx rate for a cached small object, per core (plain HTTP, keep-alive, loopback)",
        40000.0,
        "nginx with one worker in the control benchmark served ~41,000/s",
        (
            _edge_source(10000),
            _edge_source(1000),
            Source.at("audience.json", "rates.rows[object=part].peer.requests_per_cpu_s"),
            Source.at("control.json", HEALTHZ + ".peer.rps", "nginx, worker_processes 1: one core at most"),
        ),
    ),
    Spec(
        "edge_listeners_per_core",
        "listeners/core",
        "LL-HLS listeners one edge core holds, as measured on real edges (caps the CPU limit)",
        0.0,
        "none: derived from the edge's request rate (0 = not given; set it with --inputs)",
    ),
    Spec(
        "verifier_rps_per_core",
        "req/s/core",
        "the edge's ticket verifier (townhall.admission.edge_verifier, a small ASGI app), per core",
        10000.0,
        "a small ASGI app under uvicorn; not measured",
        (
            Source.at(
                "audience.json",
                "rates.rows[object=part].uvicorn_floor.requests_per_cpu_s",
                "a bare ASGI app under the same uvicorn: the verifier's ceiling",
            ),
        ),
    ),
    Spec(
        "joins_per_core",
        "req/s/core",
        "admission requests (join, waiting-room return, renewal) one townhall node process answers",
        2000.0,
        "a fleet's node on Redis answers joins the ASGI way: ~2,000-2,400 per node CPU-second "
        "measured here (docs/scaleout.md; BENCHMARKS.md, Admission); no result file carries it",
    ),
    Spec(
        "media_bytes_per_second",
        "B/s",
        "fMP4 bytes per second of audio at 64 kb/s AAC (payload and boxes)",
        8486.0,
        "a 60 s recording measured at 509,441 B",
        (Source("replay.json", "cases[case=1 minute].runs[0].m4a_bytes ÷ audio_seconds", _media_rate),),
    ),
    Spec(
        "playlist_bytes",
        "B",
        "one live media playlist (0.5 s parts, 2 s segments)",
        1430.0,
        "the golden playlist tests/resources/live_6_2.m3u8",
        (Source.at("audience.json", "rates.runs[object=playlist].bytes"),),
    ),
    Spec(
        "state_bytes",
        "B",
        "the live state document a listener's page polls",
        1200.0,
        "a space with a few speakers; not measured",
    ),
    Spec(
        "redis_ops_per_core",
        "commands/s",
        "Redis commands per second on its one thread (no pipelining, small values)",
        100000.0,
        "Redis's own benchmarks give 100-200k/s per thread",
        (Source.at("redis.json", "incr.per_redis_cpu_s", "INCRs per Redis CPU-second"),),
    ),
    Spec(
        "redis_key_updates_per_s",
        "updates/s",
        "a waiting-room counter update as a WATCH/MULTI transaction on one key (uncontended; "
        "used if the script is not measured)",
        0.0,
        "none (0 = not measured)",
        (Source.at("redis.json", "waiting_room_update.transaction_1.updates_per_redis_cpu_s"),),
    ),
    Spec(
        "redis_key_updates_per_s_script",
        "updates/s",
        "waiting-room counter updates one Redis thread serialises on one key: the store's Lua script",
        0.0,
        "none: redis_ops_per_core / redis_script_incrs (0 = not measured)",
        (
            Source.at("redis.json", "waiting_room_update.store_16.updates_per_redis_cpu_s"),
            Source.at("redis.json", "waiting_room_update.store_1.updates_per_redis_cpu_s"),
            Source.at("redis.json", "waiting_room_update.script_16.updates_per_redis_cpu_s"),
            Source.at("redis.json", "waiting_room_update.script_1.updates_per_redis_cpu_s"),
        ),
    ),
)

MEDIA_BITRATE = 64000  # the bitrate media_bytes_per_second was measured at (replay.json settings)


def resolve(
    results: Mapping[str, Any], overrides: Mapping[str, float], inputs_name: str = "--inputs"
) -> dict[str, Figure]:
    """Every input, from ``overrides`` (the operator's file) first, then the result files, then
    the defaults. ``results`` maps a file name to its parsed JSON."""
    unknown = set(overrides) - {s.name for s in SPECS}
    if unknown:
        raise ValueError(f"unknown input(s) in {inputs_name}: {', '.join(sorted(unknown))}")
    out: dict[str, Figure] = {}
    for spec in SPECS:
        if spec.name in overrides:
            value = float(overrides[spec.name])
            out[spec.name] = Figure(spec.name, value, spec.unit, spec.meaning, "--inputs", inputs_name)
            continue
        found = None
        for src in spec.sources:
            if src.file in results:
                value_ = src.read(results[src.file])
                if value_ is not None:
                    found = Figure(
                        spec.name, value_, spec.unit, spec.meaning, "measured", f"{src.file}: {src.key}"
                    )
                    break
        out[spec.name] = found or Figure(
            spec.name, spec.default, spec.unit, spec.meaning, "default", spec.why_default
        )
    return out


def files_wanted() -> list[str]:
    """The result files any input is looked for in."""
    return sorted({src.file for spec in SPECS for src in spec.sources})
