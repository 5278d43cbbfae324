"""The `[recs]` section of config.toml, and the pure settings built from it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.errors import ConfigError
from engine.recs.cooccur import CoSettings, min_half_life_s
from engine.recs.rank import RankSettings

DAY = 86400.0


@dataclass(frozen=True)
class RecsConfig:
    """Collaborative filtering: weights, decay, filters and how shards merge counts."""

    recs_enabled: bool = True
    view_weight: float = 1.0
    add_weight: float = 3.0
    purchase_weight: float = 5.0
    half_life_days: float = 90.0
    pair_half_life_days: float = 60.0
    history_items: int = 5
    history_window_days: float = 365.0
    seed_half_life_days: float = 14.0
    exclude_bought_days: float = 7.0
    popularity_blend: float = 2.0
    max_per_category: int = 0
    category_limits: tuple[str, ...] = ()
    neighbors: int = 50
    keep_neighbors: int = 200
    flush_interval_s: float = 5.0
    flush_pairs_per_s: int = 500
    carry_pairs: int = 200_000
    enrich_events: bool = True


def co_settings(config: RecsConfig) -> CoSettings:
    """How the shards count co-occurrence."""
    return CoSettings(
        view_weight=config.view_weight,
        add_weight=config.add_weight,
        purchase_weight=config.purchase_weight,
        half_life_s=config.half_life_days * DAY,
        pair_half_life_s=config.pair_half_life_days * DAY,
        history_items=config.history_items,
        history_window_s=config.history_window_days * DAY,
    )


def category_limits(config: RecsConfig) -> dict[str, int]:
    """`["Shoes=2", "Socks=1"]` as a table; errors name the entry."""
    out: dict[str, int] = {}
    for n, entry in enumerate(config.category_limits):
        name, sep, value = entry.rpartition("=")
        if not sep or not name.strip() or not value.strip().isdigit():
            raise ConfigError(
                f'recs.category_limits[{n}] must look like "Category=2", got {entry!r}',
                field=f"recs.category_limits[{n}]",
            )
        out[name.strip()] = int(value)
    return out


def rank_settings(config: RecsConfig) -> RankSettings:
    """Filters and limits of every recommendation list."""
    return RankSettings(
        seed_half_life_s=config.seed_half_life_days * DAY,
        exclude_bought_s=config.exclude_bought_days * DAY,
        max_per_category=config.max_per_category,
        popularity_blend=config.popularity_blend,
        category_limits=category_limits(config),
    )


def check(config: RecsConfig) -> None:
    """Refuse [recs] settings that cannot work; errors name the key."""
    positive = (
        "half_life_days",
        "pair_half_life_days",
        "history_window_days",
        "seed_half_life_days",
        "flush_interval_s",
    )
    for name in positive:
        if getattr(config, name) <= 0:
            raise ConfigError(f"recs.{name} must be positive", field=f"recs.{name}")
    shortest = math.ceil(min_half_life_s() / DAY)
    if config.half_life_days < shortest:
        raise ConfigError(
            f"recs.half_life_days must be at least {shortest}: forward decay scales each "
            "contribution by 2^(days since 2020 / half-life), which a shorter half-life "
            "overflows before 2100 (docs/recommendations.md)",
            field="recs.half_life_days",
        )
    for name in ("view_weight", "add_weight", "purchase_weight", "popularity_blend"):
        if getattr(config, name) < 0:
            raise ConfigError(f"recs.{name} must be 0 or more", field=f"recs.{name}")
    for name in ("history_items", "neighbors", "keep_neighbors", "carry_pairs"):
        if getattr(config, name) < 1:
            raise ConfigError(f"recs.{name} must be at least 1", field=f"recs.{name}")
    if config.flush_pairs_per_s < 0:
        raise ConfigError(
            "recs.flush_pairs_per_s must be 0 (no limit) or more", field="recs.flush_pairs_per_s"
        )
    if config.exclude_bought_days < 0 or config.max_per_category < 0:
        raise ConfigError(
            "recs.exclude_bought_days and recs.max_per_category must be 0 or more", field="recs"
        )
    category_limits(config)
