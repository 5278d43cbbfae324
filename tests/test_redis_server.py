from __future__ import annotations

import time
from pathlib import Path

import pytest
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


def test_a_data_set_that_loads_longer_than_the_timeout_is_waited_for(tmp_path: Path) -> None:
    # The start gave Redis 15 s in all, loading included, then killed it mid-load:
    # an append-only file past a few GB could never be served again. Here the
    # timeout is shorter than the load instead.
    data = tmp_path / "redis"
    data.mkdir()
    value = b"x" * 100
    with open(data / "appendonly.aof", "wb") as aof:
        for i in range(900_000):  # about 1.5 s to load here, against a 0.5 s timeout
            key = b"key:%d" % i
            aof.write(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$100\r\n%s\r\n" % (len(key), key, value))
    server = EmbeddedRedis(data)
    started = time.monotonic()
    server.start(timeout=0.5)
    loaded_s = time.monotonic() - started
    try:
        client = redis.Redis.from_url(server.url)
        assert client.dbsize() == 900_000
        assert loaded_s > 0.5  # the test waited past its timeout (else it proves nothing)
        client.close()
    finally:
        server.stop()


def test_a_stale_pid_file_of_any_content_is_ignored(tmp_path: Path) -> None:
    data = tmp_path / "redis"
    data.mkdir()
    (data / "redis.pid").write_text("not a pid\n")
    server = EmbeddedRedis(data)
    server.start()
    server.stop()


def test_a_data_dir_that_cannot_be_made_is_a_config_error(tmp_path: Path) -> None:
    from engine.errors import ConfigError

    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError) as caught:
        EmbeddedRedis(tmp_path / "a-file" / "redis").start()
    assert caught.value.field == "engine.data_dir" and "a-file" in caught.value.message


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("rediss://app:pw@[::1]:6380/1", "rediss://app:***@[::1]:6380/1"),
        ("redis://cache:6379/0", "redis://cache:6379/0"),
        ("unix:///data/redis.sock", "unix:///data/redis.sock"),
        # the ones a URL parser refuses are the ones printed in errors
        ("user:s3cret@cache:6379", "user:***@cache:6379"),
        ("redis://:s3cret@[::1", "redis://:***@[::1"),
        ("redis://:pa/ss@cache/0", "redis://:***@cache/0"),
        ("redis://:pa#ss@cache/0", "redis://:***@cache/0"),
        ("redis://cache/0?password=s3cret&db=1", "redis://cache/0?password=***&db=1"),
        ("redis://app@cache:6379/0", "redis://app@cache:6379/0"),
    ],
)
def test_a_redis_url_is_printed_without_its_password(url: str, shown: str) -> None:
    from engine.store import shown_url

    assert shown_url(url) == shown
