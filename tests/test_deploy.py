"""deploy/: what can be checked without a container engine. Every setting the fleet passes a
node is a real `Config` setting of the right type; ports, volumes and service names agree with
each other and with the settings; the Dockerfile copies only files that exist and are sent."""

from __future__ import annotations

import ast
import fnmatch
import importlib
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from townhall.cli import build_parser
from townhall.config import Config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
NODES = ("node1", "node2")


def example_env() -> dict[str, str]:
    values = {}
    for line in (DEPLOY / "env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} against ``env`` (like deploy/.env)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise AssertionError(f"{name} is required: {arg}")
        return arg or ""

    return re.sub(r"\$\{([A-Z0-9_]+)(?:(:-|:\?)([^}]*))?\}", one, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    raw = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return interpolate(raw, example_env())


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_the_fleet_has_its_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {*NODES, "postgres", "redis", "edge", "edge-verifier"}
    for name, service in services.items():
        for needed in service.get("depends_on") or []:
            assert needed in services, f"{name} depends on unknown service {needed}"


def test_every_node_setting_is_a_real_setting(compose: dict[str, Any]) -> None:
    for service in compose["services"].values():  # any service that passes townhall settings
        Config.from_env({k: v for k, v in environment(service).items() if k.startswith("TOWNHALL_")})
    for name in NODES:
        env = environment(compose["services"][name])
        assert {"TOWNHALL_DATABASE_URL", "TOWNHALL_REDIS_URL"} <= set(env)
        # Unknown names and values of the wrong type raise ConfigError.
        config = Config.from_env(env)
        assert config.database_url.startswith("postgresql+asyncpg://")
        assert config.redis_url.startswith("redis://")
    a, b = (Config.from_env(environment(compose["services"][n])) for n in NODES)
    assert a.signing_keys == b.signing_keys != ""
    assert a.database_url == b.database_url and a.redis_url == b.redis_url
    # One public URL for the clients (the edge); each node's own relay address for its peer.
    assert a.public_url == b.public_url != ""
    assert a.effective_relay_url != b.effective_relay_url != b.effective_public_url


def test_urls_name_services_and_ports_that_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    pg = environment(services["postgres"])
    for name in NODES:
        config = Config.from_env(environment(services[name]))
        db = urlsplit(config.database_url)
        assert db.hostname == "postgres" and db.port == 5432
        assert (db.username, db.password, db.path) == (
            pg["POSTGRES_USER"],
            pg["POSTGRES_PASSWORD"],
            "/" + pg["POSTGRES_DB"],
        )
        assert urlsplit(config.redis_url).hostname == "redis"
        own = urlsplit(config.relay_url)  # where the other node relays to: this node
        assert own.hostname == name and own.port == config.port
        assert str(config.port) in [str(p) for p in services[name]["expose"]]


def test_nodes_share_the_media_volume_where_the_media_store_writes(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    targets = []
    for name, service in compose["services"].items():
        for volume in service.get("volumes") or []:
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (DEPLOY / source).resolve().is_relative_to(DEPLOY), volume
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
            if name in NODES:
                targets.append((source, target))
    for name in NODES:
        config = Config.from_env(environment(compose["services"][name]))
        assert ("media", str(config.data / "media")) in targets


def edge_conf_path(compose: dict[str, Any]) -> Path:
    """Where on disk the file the edge runs (``nginx -c PATH``) comes from."""
    edge = compose["services"]["edge"]
    words = shlex.split(" ".join(edge["command"][2:] if edge["command"][0] == "sh" else edge["command"]))
    conf = Path(words[words.index("-c") + 1])
    for volume in edge["volumes"]:
        source, target = volume.split(":")[:2]
        if conf.is_relative_to(target):
            return (DEPLOY / source / conf.relative_to(target)).resolve()
    raise AssertionError(f"{conf} is not in a mounted directory")


def test_the_edge_runs_the_shipped_config(compose: dict[str, Any]) -> None:
    assert edge_conf_path(compose) == DEPLOY / "nginx" / "edge.conf"


def nginx_conf() -> str:
    return (DEPLOY / "nginx" / "edge.conf").read_text()


def test_the_edge_config_agrees_with_the_fleet(compose: dict[str, Any]) -> None:
    services = compose["services"]
    text = nginx_conf()
    ports = {Config.from_env(environment(services[n])).port for n in NODES}
    upstreams = set(re.findall(r"^\s*server\s+([\w.-]+:\d+)", text, re.M))
    assert upstreams == {f"{n}:{p}" for n in NODES for p in ports}
    listen = re.findall(r"^\s*listen\s+(?:[\d.]+:)?(\d+)", text, re.M)
    published = {str(p).split(":")[-1] for p in services["edge"]["ports"]}
    assert set(listen) == published
    # Every snippet the edge includes is shipped beside it.
    edge = services["edge"]
    mount = next(v.split(":")[1] for v in edge["volumes"] if v.startswith("./nginx:"))
    for include in re.findall(r"^\s*include\s+([^;\s]+);", text, re.M):
        assert include.startswith(mount + "/"), include
        assert (DEPLOY / "nginx" / include.removeprefix(mount + "/")).exists(), include
    # Its cache, temp files and logs are on the edge's volume.
    cache = next(v.split(":")[1] for v in edge["volumes"] if v.startswith("edge-cache:"))
    for path in re.findall(r"^\s*(?:error_log|pid|proxy_cache_path)\s+(\S+)", text, re.M):
        assert Path(path).is_relative_to(cache), path


def test_the_ticket_verifier_sits_on_the_edges_loopback(compose: dict[str, Any]) -> None:
    services = compose["services"]
    verifier = services["edge-verifier"]
    assert verifier["network_mode"] == "service:edge"
    words = verifier["entrypoint"]
    module, _, factory = words[words.index("--factory") + 1].partition(":")
    assert callable(getattr(importlib.import_module(module), factory))
    host, port = words[words.index("--host") + 1], words[words.index("--port") + 1]
    upstream = (DEPLOY / "nginx" / "ticket-http.conf").read_text()
    assert f"server {host}:{port};" in upstream
    keys = Config.from_env(environment(verifier)).signing_keys
    assert keys and keys == Config.from_env(environment(services[NODES[0]])).signing_keys


def dockerfile() -> list[str]:
    """Instructions, continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            lines.append(current.strip())
            current = ""
    return lines


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore ``patterns`` leave ``path`` out (last match wins, ! re-includes)."""
    out = False
    parts = Path(path).parts
    for pattern in patterns:
        negate = pattern.startswith("!")
        p = pattern.lstrip("!").rstrip("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(x, p) for x in prefixes):
            out = not negate
    return out


def test_the_dockerfile_copies_only_what_exists_and_is_sent() -> None:
    patterns = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = [shlex.split(i)[1:] for i in dockerfile() if i.startswith(("COPY ", "ADD "))]
    assert copies
    local = [args for args in copies if not any(a.startswith("--from=") for a in args)]
    assert {"pyproject.toml", "constraints.txt", "src"} <= {s for args in local for s in args[:-1]}
    for args in local:
        for source in args[:-1]:
            assert (ROOT / source).exists(), f"COPY source {source} does not exist"
            assert not ignored(source, patterns), f"COPY source {source} is left out by the dockerignore"
    stages = {shlex.split(i)[-1] for i in dockerfile() if i.startswith("FROM ") and " AS " in i}
    for args in copies:
        for a in args:
            if a.startswith("--from="):
                assert a.removeprefix("--from=") in stages


def test_the_image_runs_townhall_serve_as_a_user_with_a_health_check() -> None:
    steps = dockerfile()
    froms = [i for i in steps if i.startswith("FROM ")]
    assert froms[-1] == "FROM python:3.11-slim"
    assert any("pip install -c constraints.txt ." in i for i in steps)
    users = [i.split()[1] for i in steps if i.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    entry = json.loads(next(i for i in steps if i.startswith("ENTRYPOINT ")).removeprefix("ENTRYPOINT "))
    cmd = json.loads(next(i for i in steps if i.startswith("CMD ")).removeprefix("CMD "))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry == ["townhall"] and "townhall" in scripts
    assert cmd == ["serve"]
    build_parser().parse_args(cmd)
    env: dict[str, str] = {}
    for step in steps:
        if step.startswith("ENV "):
            env.update(dict(kv.split("=", 1) for kv in shlex.split(step.removeprefix("ENV "))))
    config = Config.from_env({k: v for k, v in env.items() if k.startswith("TOWNHALL_")})
    assert config.host == "0.0.0.0"
    assert any(i == f"EXPOSE {config.port}" for i in steps)
    check = next(i for i in steps if i.startswith("HEALTHCHECK "))
    probe = json.loads(check[check.index("CMD ") + 4 :])
    assert probe[:2] == ["python", "-c"]
    ast.parse(probe[2])
    assert "/healthz" in probe[2] and "TOWNHALL_PORT" in probe[2]


def test_a_node_relays_at_its_public_url_unless_told_otherwise() -> None:
    behind_cdn = Config(public_url="https://live.example/")
    assert behind_cdn.effective_relay_url == "https://live.example"
    own = Config(public_url="https://live.example/", relay_url="http://10.0.0.7:8080/")
    assert (own.effective_public_url, own.effective_relay_url) == (
        "https://live.example",
        "http://10.0.0.7:8080",
    )
    assert Config(host="127.0.0.1", port=9000).effective_relay_url == "http://127.0.0.1:9000"
