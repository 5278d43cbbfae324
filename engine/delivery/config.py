"""Typed, frozen settings of delivery: the [delivery] table and the [[esp]] array.

`delivery_config_from_mapping(delivery, esps, env)` takes the parsed tables and
returns a DeliveryConfig; every error names its key path (`esp[1].url`).
Environment overrides: NUDGE_DELIVERY_<KEY> for [delivery] scalars, and
NUDGE_ESP_<NAME>_<KEY> for one ESP's setting (NAME in capitals, - as _), so
secrets such as `password`, `api_key` or `secret` need not live in the file.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from engine.coerce import coerce_setting, section_values
from engine.errors import ConfigError

ESP_KINDS = ("webhook", "smtp", "sendgrid")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,39}$")


@dataclass(frozen=True)
class EspConfig:
    """One email service provider adapter ([[esp]])."""

    name: str
    kind: str
    # Sends per second through this ESP, shared by the dispatchers (0: unlimited).
    rate_per_s: float = 0.0
    timeout_s: float = 10.0
    # Sender; empty: [delivery] from_email / from_name.
    from_email: str = ""
    from_name: str = ""
    # webhook: where to POST, and the HMAC-SHA256 secret of the signature header.
    url: str = ""
    secret: str = ""
    # webhook: also render the template and include subject, html and text.
    render: bool = False
    # smtp
    host: str = "127.0.0.1"
    port: int = 25
    username: str = ""
    password: str = ""
    starttls: bool = False  # upgrade a plain connection with STARTTLS
    use_tls: bool = False  # implicit TLS (port 465)
    validate_certs: bool = True
    # sendgrid: the API key (url: the mail/send endpoint, https://api.sendgrid.com/v3/mail/send)
    api_key: str = ""


@dataclass(frozen=True)
class DeliveryConfig:
    """Dispatchers, retries, the circuit breaker, templates and the ESPs."""

    dispatchers: int = 2
    # Outbox entries a dispatcher reads per round trip, and sends it has in flight at once.
    read_count: int = 100
    max_inflight: int = 64
    # Retries: attempts per send (the first included), then the dead-letter stream.
    max_attempts: int = 6
    backoff_initial_ms: int = 500
    backoff_max_ms: int = 60_000
    # A 429's Retry-After is honoured up to this many seconds.
    max_retry_after_s: float = 300.0
    # Circuit breaker per ESP: open after this many failures in a row, probe after reset.
    breaker_failures: int = 5
    breaker_reset_s: float = 30.0
    # An entry another dispatcher holds this long without progress is taken over.
    claim_idle_ms: int = 60_000
    # How long each send's delivery record (what makes a replay a no-op) is kept.
    ledger_days: float = 30.0
    # A send carries its customer's profile as the shard had it when the send left;
    # younger than this, the dispatcher uses it instead of asking the shard again
    # (0: always ask). Older sends (a backlog, a retry, a claim) read the live profile.
    snapshot_max_age_ms: int = 250
    # Templates: a directory with templates.toml, or empty for the packaged set.
    templates_dir: str = ""
    from_email: str = "hello@example.com"
    from_name: str = "Nudge"
    brand_name: str = "Our shop"
    site_url: str = "https://shop.example"
    esps: tuple[EspConfig, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {e.name: e for e in self.esps})

    def esp(self, name: str) -> EspConfig | None:
        """The ESP called `name`, if configured."""
        return self._by_name.get(name)


def delivery_config_from_mapping(
    data: Mapping[str, Any] | None,
    esps: Any = None,
    env: Mapping[str, str] | None = None,
) -> DeliveryConfig:
    """DeliveryConfig from the parsed [delivery] table and [[esp]] array."""
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError("[delivery] must be a table", field="delivery")
    env = env or {}
    data = dict(data or {})
    values = section_values(
        DeliveryConfig, data, "delivery", env, "NUDGE_DELIVERY_", skip=("esps",)
    )
    config = DeliveryConfig(**values, esps=_parse_esps(esps, env))
    _validate(config)
    return config


def _parse_esps(raw: Any, env: Mapping[str, str]) -> tuple[EspConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("esp must be an array of tables ([[esp]])", field="esp")
    known = {f.name for f in fields(EspConfig)}
    sample = EspConfig(name="x", kind="webhook")
    out: list[EspConfig] = []
    seen: set[str] = set()
    for i, table in enumerate(raw):
        path = f"esp[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{path} must be a table", field=path)
        for required in ("name", "kind"):
            if not isinstance(table.get(required), str):
                raise ConfigError(f"{path}.{required} is required", field=f"{path}.{required}")
        name = table["name"]
        if not _NAME.match(name):
            raise ConfigError(
                f"{path}.name must be letters, digits, _ and - (got {name!r})", field=f"{path}.name"
            )
        if name in seen:
            raise ConfigError(f"{path}.name {name!r} is taken", field=f"{path}.name")
        seen.add(name)
        values: dict[str, Any] = {"name": name, "kind": table["kind"]}
        for key, value in table.items():
            if key not in known:
                raise ConfigError(f"unknown setting {path}.{key}", field=f"{path}.{key}")
            if key not in ("name", "kind"):
                values[key] = coerce_setting(value, getattr(sample, key), f"{path}.{key}")
        prefix = "NUDGE_ESP_" + name.upper().replace("-", "_") + "_"
        for key in known - {"name", "kind"}:
            if prefix + key.upper() in env:
                values[key] = coerce_setting(
                    env[prefix + key.upper()],
                    getattr(sample, key),
                    prefix + key.upper(),
                    from_env=True,
                )
        esp = EspConfig(**values)
        _check_esp(esp, path)
        out.append(esp)
    return tuple(out)


def _check_esp(esp: EspConfig, path: str) -> None:
    if esp.kind not in ESP_KINDS:
        raise ConfigError(
            f"{path}.kind must be one of {', '.join(ESP_KINDS)} (got {esp.kind!r})",
            field=f"{path}.kind",
        )
    if esp.rate_per_s < 0 or not math.isfinite(esp.rate_per_s):
        raise ConfigError(f"{path}.rate_per_s must be zero or more", field=f"{path}.rate_per_s")
    if esp.timeout_s <= 0:
        raise ConfigError(f"{path}.timeout_s must be positive", field=f"{path}.timeout_s")
    needs_url = esp.kind == "webhook" or (esp.kind == "sendgrid" and esp.url)
    if needs_url and not esp.url.startswith(("http://", "https://")):
        raise ConfigError(f"{path}.url must be an http(s) URL", field=f"{path}.url")
    if esp.kind == "webhook" and not esp.secret:
        raise ConfigError(f"{path}.secret is required to sign webhooks", field=f"{path}.secret")
    if esp.kind == "sendgrid" and not esp.api_key:
        raise ConfigError(f"{path}.api_key is required", field=f"{path}.api_key")
    if esp.kind == "smtp":
        if not 1 <= esp.port <= 65535:
            raise ConfigError(f"{path}.port must be 1-65535", field=f"{path}.port")
        if esp.starttls and esp.use_tls:
            raise ConfigError(
                f"{path}: starttls and use_tls exclude each other", field=f"{path}.starttls"
            )


def _validate(config: DeliveryConfig) -> None:
    checks = [
        (0 <= config.dispatchers <= 256, "dispatchers", "must be 0-256"),
        (config.read_count >= 1, "read_count", "must be positive"),
        (config.max_inflight >= 1, "max_inflight", "must be positive"),
        (config.max_attempts >= 1, "max_attempts", "must be positive"),
        (config.backoff_initial_ms >= 1, "backoff_initial_ms", "must be positive"),
        (
            config.backoff_max_ms >= config.backoff_initial_ms,
            "backoff_max_ms",
            "must be >= backoff_initial_ms",
        ),
        (config.max_retry_after_s >= 0, "max_retry_after_s", "must be zero or more"),
        (config.breaker_failures >= 1, "breaker_failures", "must be positive"),
        (config.breaker_reset_s > 0, "breaker_reset_s", "must be positive"),
        (config.claim_idle_ms >= 100, "claim_idle_ms", "must be at least 100"),
        (config.ledger_days > 0, "ledger_days", "must be positive"),
        (config.snapshot_max_age_ms >= 0, "snapshot_max_age_ms", "must be zero or more"),
    ]
    for ok, key, problem in checks:
        if not ok:
            raise ConfigError(f"delivery.{key} {problem}", field=f"delivery.{key}")
