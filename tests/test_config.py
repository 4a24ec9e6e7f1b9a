"""Config: defaults, TOML file, TOWNHALL_* environment and flags, in that order."""

from __future__ import annotations

from pathlib import Path

import pytest

from townhall.config import Config, ConfigError


def test_defaults_are_the_embedded_mode() -> None:
    config = Config()
    assert config.host == "127.0.0.1" and config.port == 8080
    assert config.effective_database_url.startswith("sqlite+aiosqlite:///")
    assert config.effective_database_url.endswith("townhall-data/townhall.db")


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    toml = tmp_path / "townhall.toml"
    toml.write_text('[townhall]\nport = 9000\nhost = "127.0.0.2"\nlog_level = "debug"\n')
    env = {"TOWNHALL_PORT": "9100", "TOWNHALL_DATA": str(tmp_path / "d"), "OTHER": "x"}
    config = Config.load(config_file=toml, environ=env, overrides={"host": None, "port": 9200})
    assert config.port == 9200  # flag beats env beats file
    assert config.host == "127.0.0.2"  # a flag left unset does not override
    assert config.log_level == "debug"
    assert config.data == tmp_path / "d"


def test_config_file_from_environment(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("max_body_bytes = 1024\n")
    assert Config.load(environ={"TOWNHALL_CONFIG": str(toml)}).max_body_bytes == 1024


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TOWNHALL_PORT": "eighty"}, "port"),
        ({"TOWNHALL_NO_SUCH_THING": "1"}, "unknown setting"),
        ({"TOWNHALL_ARGON2_TIME_COST": "1.5"}, "argon2_time_cost"),
    ],
)
def test_bad_settings_name_themselves(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.load(environ=env)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        Config.from_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("port = = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Config.from_toml(bad)
