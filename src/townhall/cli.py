"""The ``townhall`` command line: a thin mapper from flags onto ``Config`` and library calls."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from townhall.config import Config, ConfigError
from townhall.control.node import Node
from townhall.errors import ApiError
from townhall.plan.command import add_parser as add_plan_parser

T = TypeVar("T")

DEMO_HOST = "demo_host"
DEMO_PASSWORD = "demo-password"  # noqa: S105 - a loopback demo; printed for the person running it


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, help="data directory (TOWNHALL_DATA)")
    parser.add_argument("--config", type=Path, help="TOML config file (TOWNHALL_CONFIG)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="townhall", description="Live audio rooms.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server")
    _common(serve)
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")

    demo = sub.add_parser("demo", help="the embedded default with a live demo; prints the URL")
    _common(demo)
    demo.add_argument("--port", type=int, help="port to listen on (default 8080)")

    admin = sub.add_parser("admin", help="bootstrap and moderation")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    create = admin_sub.add_parser("create-account", help="create an account")
    _common(create)
    create.add_argument("handle")
    create.add_argument("--password", required=True)
    create.add_argument("--admin", action="store_true", help="make it an admin")
    suspend = admin_sub.add_parser("suspend", help="suspend an account")
    _common(suspend)
    suspend.add_argument("handle")
    suspend.add_argument("--reason", required=True)
    reinstate = admin_sub.add_parser("reinstate", help="reinstate a suspended account")
    _common(reinstate)
    reinstate.add_argument("handle")
    reinstate.add_argument("--reason")
    speak = sub.add_parser("speak", help="speak into a space over WHIP (a tone or an audio file)")
    speak.add_argument("url", help="the whip_url from POST /api/v1/spaces/{id}/speakers")
    speak.add_argument("--token", required=True, help="the speaker_token")
    what = speak.add_mutually_exclusive_group(required=True)
    what.add_argument("--tone", type=float, metavar="HZ", help="a sine tone of this frequency")
    what.add_argument("--file", metavar="AUDIO", help="any audio file PyAV can decode (looped)")
    speak.add_argument("--seconds", type=float, help="stop after this long (default: until Ctrl-C)")
    monitor = sub.add_parser(
        "monitor", help="record what the stage sends over WHEP (a mix-minus, or a host's program) to WAV"
    )
    monitor.add_argument("url", help="the whep_url from POST /api/v1/spaces/{id}/speakers")
    monitor.add_argument("--token", required=True, help="the speaker_token")
    monitor.add_argument("--out", type=Path, required=True, help="the WAV file to write (48 kHz mono)")
    monitor.add_argument(
        "--program",
        action="store_true",
        help="the full program mix (hosts and co-hosts) instead of mix-minus",
    )
    monitor.add_argument("--seconds", type=float, help="stop after this long (default: until Ctrl-C)")
    listen = sub.add_parser(
        "listen", help="listen to a space over LL-HLS, record it, and report the latency behind live"
    )
    listen.add_argument(
        "url",
        help="a space URL (BASE/api/v1/spaces/ID: joins first) or a playlist URL with its ticket "
        "(the hls_url from POST /api/v1/spaces/ID/join)",
    )
    listen.add_argument("--seconds", type=float, help="stop after this long (default: until Ctrl-C)")
    listen.add_argument(
        "--out", type=Path, help="record to FILE: .wav (decoded PCM) or .m4a (the AAC parts as received)"
    )
    listen.add_argument("--token", help="a bearer token from POST /api/v1/sessions, to join as an account")
    listen.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    add_plan_parser(sub)
    _loadtest_parser(sub)
    return parser


def _loadtest_parser(sub: Any) -> None:
    load = sub.add_parser(
        "loadtest", help="bounded load against a node on loopback; writes a JSON report and a PNG plot"
    )
    scenarios = load.add_subparsers(dest="scenario", required=True)
    what = {
        "listeners": "N listeners playing LL-HLS; part latency behind live",
        "join-storm": "N distinct joins spread over --seconds; queued joiners come back with their token",
        "flood": "a legitimate storm beside attackers at --attack-factor times its rate from a few addresses",
    }
    for name, help_text in what.items():
        p = scenarios.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--url", required=True, help="the node's base URL (loopback only: 127.0.0.0/8 or ::1)")
        p.add_argument("--space", required=True, help="the id of a live space")
        p.add_argument("--seconds", type=float, required=True, help="how long (listeners) or over how long")
        if name == "flood":
            p.add_argument("--legit", type=int, required=True, help="legitimate joins over --seconds")
            p.add_argument("--attack-factor", type=float, default=10.0, help="attack rate / legitimate rate")
            p.add_argument("--attack-sources", type=int, default=4, help="attacking addresses (default 4)")
        else:
            p.add_argument("-n", type=int, required=True, help="listeners or joins")
        if name == "listeners":
            p.add_argument(
                "--ramp", type=float, help="spread the joins over this long (default seconds/4, <= 5)"
            )
        else:
            p.add_argument(
                "--drain", type=float, default=10.0, help="queued joiners keep returning this long"
            )
            p.add_argument(
                "--accounts", type=int, default=0, help="this many joiners are registered accounts"
            )
        p.add_argument(
            "--sources", type=int, help="legitimate source addresses (default one per client, <= 4096)"
        )
        p.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
        p.add_argument("--out", type=Path, default=Path("loadtest-results"), help="report directory")
        p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")


def load_config(args: argparse.Namespace, **overrides: Any) -> Config:
    values = {"data": getattr(args, "data", None), **overrides}
    return Config.load(config_file=getattr(args, "config", None), overrides=values)


def _with_node(config: Config, work: Callable[[Node], Awaitable[T]]) -> T:
    async def run() -> T:
        node = Node.from_config(config)
        await node.start()
        try:
            return await work(node)
        finally:
            await node.stop()

    return asyncio.run(run())


def cmd_admin(args: argparse.Namespace) -> int:
    from townhall.social import accounts, moderation

    config = load_config(args)

    async def act(node: Node) -> str:
        now = node.clock()
        async with node.database.session() as db:
            if args.admin_command == "create-account":
                account = await accounts.create_account(
                    db, node.hasher, args.handle, args.password, now=now, is_admin=args.admin
                )
                role = "admin" if account.is_admin else "account"
                return f"created {role} {account.handle}"
            if args.admin_command == "suspend":
                # Speaking grants are cleared in the database; a running node refuses their
                # renewal at once and the tokens lapse within speaker_token_ttl_seconds.
                account, _ = await moderation.suspend(db, args.handle, args.reason, actor=None, now=now)
                return f"suspended {account.handle}"
            account = await moderation.reinstate(db, args.handle, args.reason, actor=None, now=now)
            return f"reinstated {account.handle}"

    print(_with_node(config, act))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from townhall.server import serve

    config = load_config(args, host=args.host, port=args.port)
    serve(config)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from townhall.server import serve
    from townhall.social import accounts, posts

    config = load_config(args, host="127.0.0.1", port=args.port)

    async def seed(node: Node) -> tuple[str, str]:
        from sqlalchemy import select

        from townhall.spaces import service
        from townhall.storage.models import Space

        async with node.database.session() as db:
            try:
                await accounts.create_account(db, node.hasher, DEMO_HOST, DEMO_PASSWORD, now=node.clock())
                fresh = True
            except ApiError:
                fresh = False  # seeded by an earlier run
            token, _ = await accounts.open_session(
                db, node.hasher, DEMO_HOST, DEMO_PASSWORD, now=node.clock(), ttl=60
            )
            host = await accounts.resolve_token(db, token, now=node.clock())
            if fresh:
                await posts.create_post(db, host, "Welcome to townhall.", now=node.clock())
            live = await db.scalar(
                select(Space.id).where(Space.host_id == host.account.id, Space.state == "live")
            )
            if live is None:
                space = await service.create_space(
                    db, host, "townhall demo", scheduled_for=None, recorded=True, now=node.clock()
                )
                await service.start_space(db, host, space.id, now=node.clock())
                live = space.id
            grant = await service.speaker_grant(db, host, live)
            assert grant.grant_id is not None
            speaker_token, _ = node.grants.issue(live, host.account.id, "host", grant.grant_id, node.clock())
            return live, speaker_token

    space_id, speaker_token = _with_node(config, seed)
    url = config.effective_public_url + "/"
    print(
        f"townhall demo: open {url}  (log in as {DEMO_HOST} / {DEMO_PASSWORD}; "
        f"live space {url}api/v1/spaces/{space_id})",
        flush=True,
    )

    async def demo_speaker() -> None:
        """The demo host talks: a WHIP speaker publishing a tone into the live space."""
        from townhall.stage.client import StageClientError, speak
        from townhall.stage.sources import ToneTrack

        whip = f"{config.effective_public_url}/whip/{space_id}"
        while True:
            try:
                await speak(whip, speaker_token, ToneTrack(440.0, amplitude=0.2))
            except StageClientError as exc:
                logging.getLogger("townhall.demo").warning("demo speaker: %s; retrying", exc)
            await asyncio.sleep(2)

    serve(config, companion=demo_speaker)
    return 0


def cmd_speak(args: argparse.Namespace) -> int:
    from townhall.stage.client import SpeakProgress, StageClientError, speak
    from townhall.stage.sources import FileTrack, ToneTrack

    if args.seconds is not None and args.seconds <= 0:
        print("townhall: --seconds must be positive", file=sys.stderr)
        return 2
    try:
        source = ToneTrack(args.tone) if args.tone is not None else FileTrack(args.file)
    except (ValueError, OSError) as exc:
        print(f"townhall: {exc}", file=sys.stderr)
        return 2

    def progress(p: SpeakProgress) -> None:
        total = f"/{args.seconds:.0f}" if args.seconds else ""
        end = "\n" if p.state == "finished" else "\r"
        print(
            f"speaking {p.elapsed_s:5.1f}{total} s  {p.packets_sent} packets  {p.bytes_sent // 1024} KiB",
            end=end,
        )
        sys.stdout.flush()

    from urllib.parse import urlparse

    from townhall.stage.ice import media_addresses_for, restrict_host_addresses

    # Speaking to a loopback server keeps the media on loopback too.
    restrict_host_addresses(media_addresses_for("", urlparse(args.url).hostname or ""))
    try:
        result = asyncio.run(speak(args.url, args.token, source, args.seconds, on_progress=progress))
    except StageClientError as exc:
        print(f"\ntownhall: {exc}", file=sys.stderr)
        return 1
    if result.reason not in ("elapsed", "stopped", "source ended"):
        print(f"townhall: the stage ended the session ({result.reason})", file=sys.stderr)
        return 1
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    from urllib.parse import urlparse

    from townhall.stage.client import MonitorProgress, StageClientError, monitor
    from townhall.stage.ice import media_addresses_for, restrict_host_addresses

    if args.seconds is not None and args.seconds <= 0:
        print("townhall: --seconds must be positive", file=sys.stderr)
        return 2
    url = args.url + (("&" if "?" in args.url else "?") + "mix=program" if args.program else "")

    def progress(p: MonitorProgress) -> None:
        total = f"/{args.seconds:.0f}" if args.seconds else ""
        end = "\n" if p.finished else "\r"
        print(
            f"recording {p.seconds_written:5.1f}{total} s  peak {p.peak_dbfs:6.1f} dBFS  -> {args.out}",
            end=end,
        )
        sys.stdout.flush()

    restrict_host_addresses(media_addresses_for("", urlparse(args.url).hostname or ""))
    try:
        result = asyncio.run(monitor(url, args.token, str(args.out), args.seconds, on_progress=progress))
    except StageClientError as exc:
        print(f"\ntownhall: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"\ntownhall: cannot write {args.out}: {exc}", file=sys.stderr)
        return 2
    return 0 if result.seconds_written > 0 else 1


def cmd_listen(args: argparse.Namespace) -> int:
    import json
    import signal

    from townhall.audience.listener import Listener, ListenError, ListenProgress

    if args.seconds is not None and args.seconds <= 0:
        print("townhall: --seconds must be positive", file=sys.stderr)
        return 2
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury progress

    def progress(p: ListenProgress) -> None:
        total = f"/{args.seconds:.0f}" if args.seconds else ""
        print(
            f"listening {p.elapsed:5.1f}{total} s  part {p.part[0]}.{p.part[1]}  {p.parts} parts  "
            f"{p.kib} KiB  {p.level_dbfs:6.1f} dBFS  {p.latency:.2f} s behind live "
            f"(median {p.median_latency:.2f})",
            end="\r",
            file=sys.stderr,
            flush=True,
        )

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        try:
            listener = Listener(args.url, token=args.token, out=args.out, on_progress=progress)
            result = await listener.run(args.seconds, stop)
        except ListenError as exc:
            print(f"\ntownhall: {exc}", file=sys.stderr)
            return 1
        print(file=sys.stderr)
        lat = result.latency
        summary = (
            f"{result.reason}: {result.parts} parts, {result.audio_seconds:.1f} s of audio in "
            f"{result.elapsed:.1f} s, {result.gaps} gaps"
        )
        if lat is not None:
            summary += f"; behind live: median {lat.median:.2f} s, p95 {lat.p95:.2f} s, max {lat.max:.2f} s"
        if result.out:
            summary += f"; wrote {result.out}"
        print(summary, file=sys.stderr)
        if args.json:
            print(json.dumps(result.as_dict()))
        return 0 if result.parts else 1

    return asyncio.run(run())


def cmd_loadtest(args: argparse.Namespace) -> int:
    import json

    from townhall.loadtest import runner

    logging.getLogger("httpx").setLevel(logging.WARNING)
    plan: runner.Plan
    try:
        common = runner.Common(
            url=args.url,
            space=args.space,
            seconds=args.seconds,
            out=args.out,
            sources=args.sources,
            timeout=args.timeout,
            drain=getattr(args, "drain", 0.0),
            progress=not args.no_progress,
        )
        if args.scenario == "listeners":
            plan = runner.ListenersPlan(common, args.n, args.ramp)
        elif args.scenario == "join-storm":
            plan = runner.StormPlan(common, args.n, args.accounts)
        else:
            plan = runner.FloodPlan(
                common, args.legit, args.attack_factor, args.attack_sources, accounts=args.accounts
            )
        report = runner.run_plan(plan)
    except (runner.LoadtestError, ValueError) as exc:
        print(f"townhall: {exc}", file=sys.stderr)
        return 2
    print(runner.summary(report), file=sys.stderr)
    print(json.dumps(report["files"]))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "demo":
            return cmd_demo(args)
        if args.command == "speak":
            return cmd_speak(args)
        if args.command == "monitor":
            return cmd_monitor(args)
        if args.command == "listen":
            return cmd_listen(args)
        if args.command == "plan":
            from townhall.plan.command import run as cmd_plan

            return cmd_plan(args)
        if args.command == "loadtest":
            return cmd_loadtest(args)
        return cmd_admin(args)
    except KeyboardInterrupt:
        # uvicorn re-raises Ctrl-C after its graceful shutdown; that shutdown is a normal exit.
        return 0
    except ConfigError as exc:
        print(f"townhall: configuration error: {exc}", file=sys.stderr)
        return 2
    except ApiError as exc:
        print(f"townhall: {exc.message}", file=sys.stderr)
        return 1
