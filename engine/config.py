"""Typed, frozen settings: defaults here, config.toml over them, NUDGE_* over that.

Every setting has one environment variable, NUDGE_ plus its name in capitals
(NUDGE_PORT, NUDGE_REDIS_URL, NUDGE_WRITE_KEYS="k1,k2"); RAY_ADDRESS is also
honoured, as Ray's own tools set it. The environment is read once, in `load`.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from engine.coerce import section_values
from engine.content.config import ContentConfig, content_config_from_mapping
from engine.delivery.config import DeliveryConfig, delivery_config_from_mapping
from engine.errors import ConfigError
from engine.inbound.origins import check_origins
from engine.inbound.webhooks import WebhookSource, webhooks_from_mapping
from engine.insight.settings import ModelsConfig, RfmConfig
from engine.insight.settings import check as check_insight
from engine.profile import Limits
from engine.recs.settings import RecsConfig
from engine.recs.settings import check as check_recs

log = logging.getLogger(__name__)

DEV_KEYS = frozenset({"dev-write-key", "dev-content-key", "dev-admin-key", "dev-tracking-secret"})


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP API."""

    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    shutdown_timeout_s: float = 5.0


@dataclass(frozen=True)
class EngineConfig:
    """Shards, storage and the cluster."""

    shards: int = 4
    data_dir: str = "./data"
    redis_url: str = ""
    ray_address: str = ""
    ray_namespace: str = "nudge"
    redis_fsync: str = "everysec"
    redis_aof_rewrite_percentage: int = 400
    redis_aof_rewrite_min_mb: int = 1024
    checkpoint_interval_ms: int = 5000
    checkpoint_events: int = 20_000
    urgent_checkpoint_ms: int = 1000
    read_count: int = 200
    dedupe_window_s: float = 86_400.0
    dedupe_max_ids: int = 100
    recent_max: int = 50
    recent_window_days: float = 30.0
    shard_niceness: int = 10
    # Profile reads from other processes over a socket of each shard's own, not a Ray call.
    direct_reads: bool = True


@dataclass(frozen=True)
class AuthConfig:
    """API keys by role: write (ingest), content (read content only), admin (all)."""

    write_keys: tuple[str, ...] = ("dev-write-key",)
    content_keys: tuple[str, ...] = ("dev-content-key",)
    admin_keys: tuple[str, ...] = ("dev-admin-key",)


@dataclass(frozen=True)
class TrackingConfig:
    """Signed open, click and unsubscribe links in emails."""

    # HMAC secret of tracking tokens; changing it breaks the links of every email sent.
    tracking_secret: str = "dev-tracking-secret"
    # Where recipients' browsers reach this engine (the links' base URL).
    public_url: str = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class MetricsConfig:
    """/metrics (Prometheus) and the /console page."""

    # "admin": scrapers send an admin key as a Bearer token; "open": no key needed.
    metrics_auth: str = "admin"
    # Serve the /console page (admin key, through a login form).
    console: bool = True
    # How long a console login lasts.
    console_session_h: float = 12.0
    # How long a scrape waits for each shard's metrics.
    scrape_timeout_s: float = 2.0


@dataclass(frozen=True)
class BrowserConfig:
    """Browsers posting events themselves (/sdk.js): the shop origins allowed by CORS."""

    # e.g. ["https://shop.example"]; "*" allows any origin; once listed, pages of other
    # origins are refused (403). Empty: no CORS answers and no origin check.
    allowed_origins: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    """All settings, passed in to whatever needs them."""

    server: ServerConfig = field(default_factory=ServerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # (TOML text, where it came from) of every rule document: compiled by each
    # shard, since compiled rules cannot travel between processes.
    rules: tuple[tuple[str, str], ...] = ()
    content: ContentConfig = field(default_factory=ContentConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    recs: RecsConfig = field(default_factory=RecsConfig)
    rfm: RfmConfig = field(default_factory=RfmConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    browser: BrowserConfig = field(default_factory=BrowserConfig)
    # Platform webhook sources, [webhooks.NAME] (engine.inbound.webhooks).
    webhooks: tuple[WebhookSource, ...] = ()

    @property
    def dev_keys_in_use(self) -> list[str]:
        """The shipped development keys still configured, if any."""
        keys = self.auth.write_keys + self.auth.content_keys + self.auth.admin_keys
        keys += (self.tracking.tracking_secret,)
        return sorted(DEV_KEYS.intersection(keys))


_SECTIONS = {
    "server": ServerConfig,
    "engine": EngineConfig,
    "auth": AuthConfig,
    "tracking": TrackingConfig,
    "metrics": MetricsConfig,
    "recs": RecsConfig,
    "rfm": RfmConfig,
    "models": ModelsConfig,
    "browser": BrowserConfig,
}
# Sections read by their own modules: trigger rules (engine.rules) and content.
_FOREIGN = frozenset({"rules", "rule", "segment", "content", "delivery", "esp", "webhooks"})


def from_mapping(data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    """Build a Config from parsed TOML and environment overrides; errors name the key."""
    env = dict(env or {})
    if env.get("RAY_ADDRESS") and "NUDGE_RAY_ADDRESS" not in env:
        env["NUDGE_RAY_ADDRESS"] = env["RAY_ADDRESS"]  # Ray's own variable, below ours
    sections = {}
    for name in data:
        if name not in _SECTIONS and name not in _FOREIGN:
            raise ConfigError(f"unknown section [{name}]", field=name)
    for name, cls in _SECTIONS.items():
        given = data.get(name, {})
        if not isinstance(given, dict):
            raise ConfigError(f"[{name}] must be a table", field=name)
        sections[name] = cls(**section_values(cls, given, name, env, "NUDGE_"))
    config = Config(
        **sections,
        content=content_config_from_mapping(data.get("content"), env),
        delivery=delivery_config_from_mapping(data.get("delivery"), data.get("esp"), env),
        webhooks=webhooks_from_mapping(data.get("webhooks"), env),
    )
    validate(config)
    return config


_REDIS_INT_MAX = 2**31 - 1  # auto-aof-rewrite-percentage is a C int in Redis
_REDIS_MAX_MB = (2**63 - 1) >> 20  # auto-aof-rewrite-min-size is a long long of bytes


def validate(config: Config) -> None:
    """Reject settings that cannot work or are unsafe."""
    checks = [
        (
            1 <= config.server.port <= 65535 or config.server.port == 0,
            "server.port",
            "must be 0-65535",
        ),
        (config.server.workers >= 1, "server.workers", "must be at least 1"),
        (1 <= config.engine.shards <= 1024, "engine.shards", "must be 1-1024"),
        (
            config.engine.checkpoint_interval_ms >= 1,
            "engine.checkpoint_interval_ms",
            "must be positive",
        ),
        (config.engine.checkpoint_events >= 1, "engine.checkpoint_events", "must be positive"),
        (
            config.engine.urgent_checkpoint_ms >= 1,
            "engine.urgent_checkpoint_ms",
            "must be positive",
        ),
        (config.engine.read_count >= 1, "engine.read_count", "must be positive"),
        (
            config.engine.redis_fsync in ("everysec", "always", "no"),
            "engine.redis_fsync",
            "must be everysec, always or no",
        ),
        (
            0 <= config.engine.redis_aof_rewrite_percentage <= _REDIS_INT_MAX,
            "engine.redis_aof_rewrite_percentage",
            f"must be 0 (never rewrite) to {_REDIS_INT_MAX} (Redis's limit)",
        ),
        (
            1 <= config.engine.redis_aof_rewrite_min_mb <= _REDIS_MAX_MB,
            "engine.redis_aof_rewrite_min_mb",
            f"must be 1 to {_REDIS_MAX_MB} (Redis's limit)",
        ),
        (config.engine.dedupe_max_ids >= 1, "engine.dedupe_max_ids", "must be positive"),
        (config.engine.recent_max >= 1, "engine.recent_max", "must be positive"),
        (0 <= config.engine.shard_niceness <= 19, "engine.shard_niceness", "must be 0-19"),
        (
            config.metrics.metrics_auth in ("admin", "open"),
            "metrics.metrics_auth",
            "must be admin or open",
        ),
    ]
    durations = (
        ("server.shutdown_timeout_s", config.server.shutdown_timeout_s),
        ("engine.dedupe_window_s", config.engine.dedupe_window_s),
        ("engine.recent_window_days", config.engine.recent_window_days),
        ("metrics.scrape_timeout_s", config.metrics.scrape_timeout_s),
        ("metrics.console_session_h", config.metrics.console_session_h),
    )
    for path, value in durations:
        # NaN passes no comparison and infinity waits forever: both are refused
        checks.append((0 < value < math.inf, path, "must be a positive number"))
    for role in ("write_keys", "content_keys", "admin_keys"):
        # "" would be the key of a bare "Authorization: Bearer" (or "Basic Og==")
        keys = getattr(config.auth, role)
        checks.append((all(k.strip() for k in keys), f"auth.{role}", "must not hold an empty key"))
    for ok, path, problem in checks:
        if not ok:
            raise ConfigError(f"{path} {problem}", field=path)
    check_recs(config.recs)
    check_insight(config.rfm, config.models)
    check_origins(config.browser.allowed_origins)
    if config.dev_keys_in_use and not _is_loopback(config.server.host):
        raise ConfigError(
            f"refusing to listen on {config.server.host} with the development keys "
            f"({', '.join(config.dev_keys_in_use)}): set your own in [auth] and [tracking]",
            field="auth",
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_toml(path: str | os.PathLike) -> dict:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist", field="config") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}", field="config") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text: {exc.reason}", field="config") from None
    except OSError as exc:  # a directory, no permission
        raise ConfigError(f"cannot read {path}: {exc.strerror}", field="config") from None


def load(path: str | os.PathLike | None = None, *, env: Mapping[str, str] | None = None) -> Config:
    """Read config.toml (the given path, else ./config.toml if present, else defaults).

    Also reads and compiles the trigger rules it holds or names, so a broken
    rule stops the engine at start with its file and line; with no config file
    the starter rules apply.
    """
    env = dict(os.environ) if env is None else env
    if path is None and env.get("NUDGE_CONFIG"):
        path = env["NUDGE_CONFIG"]
    if path is None and Path("config.toml").is_file():
        path = "config.toml"
    data = _read_toml(path) if path is not None else {}
    config = from_mapping(data, env)
    from engine.rules import RuleSet, rule_sources
    from engine.rules.files import STARTER

    if path is None:
        sources = [(STARTER.read_text(encoding="utf-8"), str(STARTER))]
    else:
        sources = rule_sources(path)
    RuleSet.from_sources(sources)  # refuse to start on a rule that does not compile
    return replace(config, rules=tuple(sources))


def file_settings(
    path: str | os.PathLike, env: Mapping[str, str] | None = None
) -> tuple[EngineConfig, RfmConfig]:
    """A config file's [engine] and [rfm] settings, with their NUDGE_* overrides, checked
    as the engine checks them: what lint and the simulator take from it. The server's
    own settings and checks (host, keys) are left out: CI may lack the secrets."""
    env = dict(os.environ) if env is None else env
    data = _read_toml(path)
    tables = {name: data[name] for name in ("engine", "rfm") if name in data}
    own = {"NUDGE_" + f.name.upper() for cls in (EngineConfig, RfmConfig) for f in fields(cls)}
    config = from_mapping(tables, {k: v for k, v in env.items() if k in own})
    return config.engine, config.rfm


def profile_limits(engine: EngineConfig) -> Limits:
    """The profile limits a shard keeps with these settings (simulate and lint use them too)."""
    return Limits(
        recent_max=engine.recent_max,
        recent_window_s=engine.recent_window_days * 86400.0,
        dedupe_window_s=engine.dedupe_window_s,
        dedupe_max_ids=engine.dedupe_max_ids,
    )


def warn_dev_keys(config: Config) -> None:
    """Log a warning when the shipped development keys are configured."""
    if config.dev_keys_in_use:
        log.warning(
            "using the development API keys %s: fine on this machine, never in production",
            ", ".join(config.dev_keys_in_use),
        )
