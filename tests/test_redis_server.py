from __future__ import annotations

from pathlib import Path

import redis

from engine.config import EngineConfig
from engine.redis_server import EmbeddedRedis


def running_settings(server: EmbeddedRedis, pattern: str) -> dict[str, str]:
    """Start `server`, read its CONFIG GET `pattern`, and stop it."""
    server.start()
    try:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        try:
            return client.config_get(pattern)
        finally:
            client.close()
    finally:
        server.stop()


def test_embedded_redis_rewrites_its_aof_at_the_configured_growth(tmp_path: Path) -> None:
    server = EmbeddedRedis(
        tmp_path / "redis", fsync="always", rewrite_percentage=250, rewrite_min_mb=300
    )
    settings = running_settings(server, "*")
    assert settings["appendonly"] == "yes"
    assert settings["appendfsync"] == "always"
    assert settings["auto-aof-rewrite-percentage"] == "250"
    assert settings["auto-aof-rewrite-min-size"] == str(300 * 1024 * 1024)


def test_embedded_redis_defaults_are_the_engine_settings_defaults(tmp_path: Path) -> None:
    settings = running_settings(EmbeddedRedis(tmp_path / "redis"), "auto-aof-rewrite-*")
    defaults = EngineConfig()
    assert int(settings["auto-aof-rewrite-percentage"]) == defaults.redis_aof_rewrite_percentage
    assert int(settings["auto-aof-rewrite-min-size"]) == defaults.redis_aof_rewrite_min_mb << 20
