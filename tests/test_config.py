from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from engine.config import Config, from_mapping, load
from engine.errors import ConfigError
from engine.rules import RuleSet
from engine.rules.files import STARTER

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_is_exactly_the_defaults() -> None:
    shipped = from_mapping(tomllib.loads((ROOT / "config.toml").read_text()), {})
    assert shipped == Config()


def test_shipped_rules_are_the_starter_set() -> None:
    shipped = RuleSet.from_sources(load(ROOT / "config.toml", env={}).rules)
    starter = RuleSet.from_sources([(STARTER.read_text(), "starter.toml")])
    assert [r.name for r in shipped.rules] == [r.name for r in starter.rules]
    assert len(shipped.rules) == 5


def test_a_broken_rule_stops_loading_with_its_line(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[server]\nport = 8000\n\n[[rule]]\nname = "x"\non = "Product Added"\nif = "count(("\n'
    )
    with pytest.raises(ConfigError, match=r"config\.toml:\d"):
        load(config, env={})


def test_environment_overrides_file() -> None:
    env = {
        "NUDGE_PORT": "9100",
        "NUDGE_SHARDS": "8",
        "NUDGE_WRITE_KEYS": "a, b",
        "RAY_ADDRESS": "10.0.0.1:6379",
    }
    config = from_mapping({"server": {"port": 8001}}, env)
    assert config.server.port == 9100
    assert config.engine.shards == 8
    assert config.auth.write_keys == ("a", "b")
    assert config.engine.ray_address == "10.0.0.1:6379"


@pytest.mark.parametrize(
    ("data", "env", "field"),
    [
        ({"engine": {"shards": "four"}}, {}, "engine.shards"),
        ({"engine": {"shards": 0}}, {}, "engine.shards"),
        ({"engine": {"shardz": 4}}, {}, "engine.shardz"),
        ({"bogus": {}}, {}, "bogus"),
        ({}, {"NUDGE_PORT": "eighty"}, "NUDGE_PORT"),
        ({"auth": {"write_keys": "k"}}, {}, "auth.write_keys"),
        ({"engine": {"redis_fsync": "sometimes"}}, {}, "engine.redis_fsync"),
        (
            {"engine": {"redis_aof_rewrite_percentage": -1}},
            {},
            "engine.redis_aof_rewrite_percentage",
        ),
        ({}, {"NUDGE_REDIS_AOF_REWRITE_MIN_MB": "0"}, "engine.redis_aof_rewrite_min_mb"),
        (
            {},
            {"NUDGE_REDIS_AOF_REWRITE_PERCENTAGE": "3000000000"},
            "engine.redis_aof_rewrite_percentage",
        ),
        # durations: no grace at SIGTERM, no dedupe, no window, or waiting forever
        ({}, {"NUDGE_SHUTDOWN_TIMEOUT_S": "-3"}, "server.shutdown_timeout_s"),
        ({}, {"NUDGE_SHUTDOWN_TIMEOUT_S": "nan"}, "server.shutdown_timeout_s"),
        ({}, {"NUDGE_DEDUPE_WINDOW_S": "-1"}, "engine.dedupe_window_s"),
        ({}, {"NUDGE_RECENT_WINDOW_DAYS": "nan"}, "engine.recent_window_days"),
        ({}, {"NUDGE_SCRAPE_TIMEOUT_S": "-inf"}, "metrics.scrape_timeout_s"),
        ({"metrics": {"console_session_h": float("inf")}}, {}, "metrics.console_session_h"),
    ],
)
def test_errors_name_the_setting(data: dict, env: dict, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        from_mapping(data, env)
    assert caught.value.field == field


def test_dev_keys_refuse_public_address() -> None:
    with pytest.raises(ConfigError, match="development keys"):
        from_mapping({"server": {"host": "0.0.0.0"}}, {})
    own_keys = {"write_keys": ["w"], "content_keys": ["c"], "admin_keys": ["a"]}
    public = {"host": "0.0.0.0"}
    with pytest.raises(ConfigError, match="dev-tracking-secret"):
        from_mapping({"server": public, "auth": own_keys}, {})
    own_secret = {"tracking_secret": "t0p"}
    config = from_mapping({"server": public, "auth": own_keys, "tracking": own_secret}, {})
    assert config.server.host == "0.0.0.0"
    assert from_mapping({}, {"NUDGE_TRACKING_SECRET": "x"}).tracking.tracking_secret == "x"


def test_load_reports_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nport = 1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load(bad, env={})


@pytest.mark.parametrize("role", ["write_keys", "content_keys", "admin_keys"])
def test_an_empty_key_is_refused(role: str) -> None:
    # "" was the key of a bare "Authorization: Bearer" (and of "Basic Og==")
    with pytest.raises(ConfigError) as caught:
        from_mapping({"auth": {role: ["a-real-key", " "]}}, env={})
    assert caught.value.field == f"auth.{role}"


def test_a_templates_dir_that_does_not_load_stops_the_start(tmp_path: Path) -> None:
    # It passed the config and failed first in the dispatchers, after Ray and the
    # shards had started: an ActorDiedError traceback ten seconds later. Only serve
    # checks it: the commands that call a running engine need no templates here.
    import subprocess
    import sys

    config = tmp_path / "config.toml"
    config.write_text(f'[delivery]\ntemplates_dir = "{tmp_path / "nowhere"}"\n')
    assert load(config, env={}).delivery.templates_dir.endswith("nowhere")
    done = subprocess.run(
        [sys.executable, "-m", "engine", "serve", "--config", str(config),
         "--data-dir", str(tmp_path / "data"), "--port", "0"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "templates.toml" in done.stderr and not (tmp_path / "data").exists()
