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
    return parser


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

    async def seed(node: Node) -> str:
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
            if live is not None:
                return live
            space = await service.create_space(
                db, host, "townhall demo", scheduled_for=None, recorded=True, now=node.clock()
            )
            await service.start_space(db, host, space.id, now=node.clock())
            return space.id

    space_id = _with_node(config, seed)
    url = config.effective_public_url + "/"
    print(
        f"townhall demo: open {url}  (log in as {DEMO_HOST} / {DEMO_PASSWORD}; "
        f"live space {url}api/v1/spaces/{space_id})",
        flush=True,
    )
    serve(config)
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
