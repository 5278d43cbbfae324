"""Typed, frozen settings of the content endpoint: the [content] table of config.toml.

`content_config_from_mapping(table)` takes the parsed `[content]` table (with its
`[[content.source]]` array and `[content.blocks.NAME]` tables) and returns a
ContentConfig; every error names its key path, e.g. `content.source[0].url`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from engine.coerce import coerce_setting, section_values
from engine.content.template import Template, TemplateError, body_fields
from engine.errors import ConfigError

BUILTIN_BLOCKS = ("profile", "cart", "recommendations", "recently_viewed")
FORMATS = ("json", "html")
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_METHODS = ("GET", "POST", "PUT")
# Template fields that need no profile: a source using only these can start before
# the profile read returns (and still answers for a customer Nudge does not know).
_ID_ONLY = "customer_id"


@dataclass(frozen=True)
class BlockSettings:
    """Per built-in block: its budget, what to show when it fails, and its item limit."""

    timeout_ms: int = 0  # 0: the whole request deadline
    on_failure: str = "fallback"  # or "omit": leave the block out of the answer
    fallback_html: str = ""
    fallback_data: Any = None
    limit: int = 4  # items, for recommendations and recently_viewed


@dataclass(frozen=True)
class SourceConfig:
    """One external HTTP content source ([[content.source]])."""

    name: str
    url: str
    method: str = "GET"
    headers: tuple[tuple[str, str], ...] = ()
    body: Any = None  # JSON body whose string leaves are templates
    timeout_ms: int = 100
    ttl_s: float = 60.0
    stale_s: float = 300.0  # past ttl_s, serve the old value while refreshing it
    cache: bool = True
    select: str = ""  # dotted path of the data inside the JSON answer ("" = all of it)
    fields: tuple[tuple[str, str], ...] = ()  # output name -> dotted path in each item
    html: str = ""  # HTML template over the data (an object), or around {items}
    item_html: str = ""  # HTML template for each item when the data is a list
    on_failure: str = "fallback"
    fallback_html: str = ""
    fallback_data: Any = None
    vary: tuple[str, ...] = ()  # profile fields that are part of the cache key
    max_inflight: int = 64  # upstream calls at once; more fall back at once
    max_bytes: int = 262_144

    @property
    def template_fields(self) -> frozenset[str]:
        """Every field the URL, header and body templates name."""
        names = set(Template(self.url).fields)
        for _, value in self.headers:
            names |= Template(value).fields
        return frozenset(names | body_fields(self.body))

    @property
    def needs_profile(self) -> bool:
        """True unless the request can be built from the customer id and options alone."""
        if self.vary:
            return True
        return any(f != _ID_ONLY and not f.startswith("options.") for f in self.template_fields)


@dataclass(frozen=True)
class ContentConfig:
    """The content endpoint: deadlines, caches, built-in blocks and external sources."""

    deadline_ms: int = 200
    max_deadline_ms: int = 2000
    reserve_ms: int = 3  # kept back from the deadline to assemble and send the answer
    default_blocks: tuple[str, ...] = ("profile", "cart", "recommendations")
    default_format: str = "json"
    unknown_customer: str = "404"  # or "fallback": answer 200 with every block's fallback
    local_cache_entries: int = 50_000
    redis_cache: bool = True
    redis_timeout_ms: int = 50
    max_age_s: int = 5  # Cache-Control max-age of an answer without fallbacks
    http_max_connections: int = 512
    product_url: str = ""  # e.g. "https://shop.example/p/{product_id}"
    checkout_url: str = ""  # e.g. "https://shop.example/cart?c={cart_id}"
    profile_traits: tuple[str, ...] = ()  # traits the profile block shows; empty: all
    blocks: tuple[tuple[str, BlockSettings], ...] = ()
    sources: tuple[SourceConfig, ...] = ()

    def block(self, name: str) -> BlockSettings:
        """Settings of built-in block `name` (defaults when not configured)."""
        return self._blocks.get(name, _DEFAULT_BLOCK)

    def __post_init__(self) -> None:
        # A lookup table derived from `sources`, not part of the value.
        object.__setattr__(self, "_by_name", {s.name: s for s in self.sources})
        names = BUILTIN_BLOCKS + tuple(s.name for s in self.sources)
        object.__setattr__(self, "_names", names)
        object.__setattr__(self, "_blocks", dict(self.blocks))

    def source(self, name: str) -> SourceConfig | None:
        """The external source called `name`, if configured."""
        return self._by_name.get(name)

    @property
    def block_names(self) -> tuple[str, ...]:
        """Every block a request may ask for."""
        return self._names


_DEFAULT_BLOCK = BlockSettings()


def content_config_from_mapping(
    data: Mapping[str, Any] | None, env: Mapping[str, str] | None = None
) -> ContentConfig:
    """ContentConfig from the parsed [content] table; NUDGE_CONTENT_<KEY> overrides scalars."""
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError("[content] must be a table", field="content")
    data = dict(data or {})
    env = env or {}
    blocks_raw = data.pop("blocks", {})
    sources_raw = data.pop("source", [])
    values = section_values(
        ContentConfig, data, "content", env, "NUDGE_CONTENT_", skip=("blocks", "sources")
    )
    config = ContentConfig(
        **values, blocks=_parse_blocks(blocks_raw), sources=_parse_sources(sources_raw)
    )
    _validate(config)
    return config


def _parse_blocks(raw: Any) -> tuple[tuple[str, BlockSettings], ...]:
    if not isinstance(raw, dict):
        raise ConfigError("content.blocks must be a table of tables", field="content.blocks")
    out = []
    for name, table in raw.items():
        path = f"content.blocks.{name}"
        if name not in BUILTIN_BLOCKS:
            known = ", ".join(BUILTIN_BLOCKS)
            raise ConfigError(f"{path}: no built-in block {name!r} (known: {known})", field=path)
        out.append((name, _table(BlockSettings, table, path)))
    return tuple(out)


def _parse_sources(raw: Any) -> tuple[SourceConfig, ...]:
    if not isinstance(raw, list):
        raise ConfigError("content.source must be an array of tables", field="content.source")
    out: list[SourceConfig] = []
    seen: set[str] = set()
    for i, table in enumerate(raw):
        path = f"content.source[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{path} must be a table", field=path)
        for required in ("name", "url"):
            if required not in table:
                raise ConfigError(f"{path}.{required} is required", field=f"{path}.{required}")
        source = _table(SourceConfig, table, path)
        if not _NAME.match(source.name):
            raise ConfigError(
                f"{path}.name must be lower-case letters, digits and _ (got {source.name!r})",
                field=f"{path}.name",
            )
        if source.name in BUILTIN_BLOCKS or source.name in seen:
            raise ConfigError(f"{path}.name {source.name!r} is taken", field=f"{path}.name")
        seen.add(source.name)
        _check_source(source, path)
        out.append(source)
    return tuple(out)


def _table(cls: type, table: Any, path: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{path} must be a table", field=path)
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"unknown setting {path}.{key}", field=f"{path}.{key}")
        at = f"{path}.{key}"
        if key in ("fallback_data", "body"):
            values[key] = value  # any JSON-like value
        elif key in ("headers", "fields"):
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                raise ConfigError(f"{at} must be a table of strings", field=at)
            values[key] = tuple(value.items())
        elif key in ("name", "url") and not isinstance(value, str):
            raise ConfigError(f"{at} must be a string", field=at)
        elif key in ("name", "url"):
            values[key] = value
        elif key == "method" and isinstance(value, str):
            values[key] = value.upper()
        else:
            default = getattr(cls(name="x", url="x") if cls is SourceConfig else cls(), key)
            values[key] = coerce_setting(value, default, at)
    if "on_failure" in values and values["on_failure"] not in ("fallback", "omit"):
        raise ConfigError(f"{path}.on_failure must be fallback or omit", field=f"{path}.on_failure")
    for key in ("timeout_ms", "limit", "max_inflight", "max_bytes"):
        if key in values and values[key] < (0 if key == "timeout_ms" else 1):
            raise ConfigError(f"{path}.{key} must be positive", field=f"{path}.{key}")
    for key in ("ttl_s", "stale_s"):
        if key in values and (values[key] < 0 or not math.isfinite(values[key])):
            raise ConfigError(f"{path}.{key} must be zero or more", field=f"{path}.{key}")
    for key in ("fallback_html", "html", "item_html"):
        if key in values:
            _check_template(values[key], f"{path}.{key}")
    return cls(**values)


def _check_source(source: SourceConfig, path: str) -> None:
    if not source.url.startswith(("http://", "https://", "{")):
        raise ConfigError(f"{path}.url must be an http(s) URL", field=f"{path}.url")
    if source.method.upper() not in _METHODS:
        raise ConfigError(f"{path}.method must be GET, POST or PUT", field=f"{path}.method")
    if source.timeout_ms < 1:
        raise ConfigError(f"{path}.timeout_ms must be positive", field=f"{path}.timeout_ms")
    _check_template(source.url, f"{path}.url")
    for name, value in source.headers:
        _check_template(value, f"{path}.headers.{name}")
    try:
        body_fields(source.body)
    except TemplateError as exc:
        raise ConfigError(f"{path}.body: {exc}", field=f"{path}.body") from None


def _check_template(text: str, path: str) -> None:
    try:
        Template(text)
    except TemplateError as exc:
        raise ConfigError(f"{path}: {exc}", field=path) from None


def _validate(config: ContentConfig) -> None:
    checks = [
        (config.deadline_ms >= 1, "deadline_ms", "must be positive"),
        (config.max_deadline_ms >= config.deadline_ms, "max_deadline_ms", "must be >= deadline_ms"),
        (0 <= config.reserve_ms < config.deadline_ms, "reserve_ms", "must be below deadline_ms"),
        (config.default_format in FORMATS, "default_format", "must be json or html"),
        (
            config.unknown_customer in ("404", "fallback"),
            "unknown_customer",
            "must be 404 or fallback",
        ),
        (config.local_cache_entries >= 0, "local_cache_entries", "must be zero or more"),
        (config.redis_timeout_ms >= 1, "redis_timeout_ms", "must be positive"),
        (config.max_age_s >= 0, "max_age_s", "must be zero or more"),
        (config.http_max_connections >= 1, "http_max_connections", "must be positive"),
    ]
    for ok, key, problem in checks:
        if not ok:
            raise ConfigError(f"content.{key} {problem}", field=f"content.{key}")
    known = set(config.block_names)
    for i, name in enumerate(config.default_blocks):
        if name not in known:
            path = f"content.default_blocks[{i}]"
            raise ConfigError(f"{path}: no block {name!r}", field=path)
    for key in ("product_url", "checkout_url"):
        _check_template(getattr(config, key), f"content.{key}")
