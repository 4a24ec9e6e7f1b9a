"""``townhall plan``: the I/O edge of the planner. Reads the benchmark result files and the
operator's ``--inputs``, prints the plan, writes ``plan.json`` and ``plan.png`` to ``--out``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from townhall.plan.capacity import Assumptions, Stream
from townhall.plan.inputs import files_wanted, resolve
from townhall.plan.planner import StormSpec, make_plan
from townhall.plan.report import render, to_json


def bitrate(text: str) -> int:
    """``64k``, ``96000`` or ``0.128M`` as bits per second."""
    scale = {"k": 1000, "m": 1_000_000}.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a bitrate: {text!r} (say 64k or 64000)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("the bitrate must be positive")
    return int(value)


def add_parser(sub: Any) -> None:
    """The ``plan`` subcommand's flags."""
    plan = sub.add_parser(
        "plan",
        help="capacity plan and join-storm simulation for N listeners (edges, origin, Redis, bandwidth)",
    )
    plan.add_argument("--listeners", type=int, required=True, help="listeners of one space, all in")
    plan.add_argument("--bitrate", type=bitrate, default=64000, help="AAC bitrate (default 64k)")
    plan.add_argument("--part", type=float, default=0.5, help="LL-HLS part duration, s (default 0.5)")
    plan.add_argument("--segment-parts", type=int, default=4, help="parts per segment (default 4)")
    plan.add_argument(
        "--first-minute", type=int, default=1_000_000, help="joiners in the storm's first minute (default 1M)"
    )
    plan.add_argument(
        "--max-wait", type=float, default=300.0, help="longest wait in the waiting room, s (default 300)"
    )
    plan.add_argument("--join-rate", type=float, help="the fleet's admission rate (default: from --max-wait)")
    plan.add_argument(
        "--max-retry-after",
        type=int,
        default=30,
        help="the waiting room's longest Retry-After, s (default 30, as the admission code)",
    )
    plan.add_argument("--nic-gbps", type=float, help="edge NIC, Gb/s (default 10)")
    plan.add_argument("--edge-cores", type=int, help="cores per edge machine (default 16)")
    plan.add_argument(
        "--inputs",
        type=Path,
        help="JSON object of figures and assumptions to use instead of the measured or default ones",
    )
    plan.add_argument(
        "--results",
        type=Path,
        default=Path("bench/results"),
        help="benchmark results (default bench/results)",
    )
    plan.add_argument("--out", type=Path, default=Path("plan-results"), help="output directory")
    plan.add_argument("--no-plot", action="store_true", help="write the JSON only")


def command_line(args: argparse.Namespace) -> str:
    """The command that made this plan, every value spelled out."""
    words = [
        f"townhall plan --listeners {args.listeners} --bitrate {args.bitrate} --part {args.part:g}",
        f"--segment-parts {args.segment_parts} --first-minute {args.first_minute}",
        f"--max-wait {args.max_wait:g} --max-retry-after {args.max_retry_after}",
    ]
    for flag, value in (
        ("--join-rate", args.join_rate),
        ("--nic-gbps", args.nic_gbps),
        ("--edge-cores", args.edge_cores),
        ("--inputs", args.inputs),
    ):
        if value is not None:
            words.append(f"{flag} {value}")
    words.append(f"--results {args.results} --out {args.out}")
    return " ".join(words)


def _read_json(path: Path) -> Any:
    with path.open(encoding="utf-8") as fh:
        return json.load(fh)


def run(args: argparse.Namespace) -> int:
    results: dict[str, Any] = {}
    missing = []
    for name in files_wanted():
        path = args.results / name
        try:
            results[name] = _read_json(path)
        except FileNotFoundError:
            missing.append(name)
        except (OSError, ValueError) as exc:
            print(f"townhall plan: ignoring {path}: {exc}", file=sys.stderr)
            missing.append(name)
    given: dict[str, Any] = {}
    if args.inputs:
        try:
            given = _read_json(args.inputs)
        except (OSError, ValueError) as exc:
            print(f"townhall plan: cannot read --inputs {args.inputs}: {exc}", file=sys.stderr)
            return 2
        if not isinstance(given, dict):
            print(f"townhall plan: --inputs {args.inputs} must hold a JSON object", file=sys.stderr)
            return 2
    fields = {f.name for f in dataclasses.fields(Assumptions)}
    flags = {"edge_nic_gbps": args.nic_gbps, "edge_cores": args.edge_cores}
    try:
        assumptions = Assumptions(
            **{k: v for k, v in given.items() if k in fields},
            **{k: v for k, v in flags.items() if v is not None},
        )
        figures = resolve(
            results,
            {k: v for k, v in given.items() if k not in fields},
            inputs_name=str(args.inputs) if args.inputs else "--inputs",
        )
        spec = StormSpec(
            first_minute=args.first_minute,
            max_wait_seconds=args.max_wait,
            admission_rate=args.join_rate,
            max_retry_after=args.max_retry_after,
        )
        stream = Stream(args.listeners, args.bitrate, args.part, args.segment_parts)
        plan = make_plan(stream, figures, assumptions, spec)
    except (TypeError, ValueError) as exc:
        print(f"townhall plan: {exc}", file=sys.stderr)
        return 2
    lines = render(plan)
    if missing:
        lines[2:2] = [f"Result files not found in {args.results}: {', '.join(missing)} (defaults used)", ""]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    document = to_json(plan)
    document["command"] = command_line(args)
    document["result_files"] = {name: str(args.results / name) for name in results}
    json_path = args.out / "plan.json"
    json_path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    print(f"\nwrote {json_path}")
    if not args.no_plot:
        if importlib.util.find_spec("matplotlib") is None:
            print("townhall plan: no PNG without matplotlib (pip install 'townhall[bench]')", file=sys.stderr)
            return 1
        from townhall.plan.plot import write_png

        png_path = args.out / "plan.png"
        write_png(plan, png_path)
        print(f"wrote {png_path}")
    return 0
