"""Recommendations: the catalog, live item-to-item collaborative filtering, evaluation.

Pure parts (stdlib and orjson): catalog (checking products, reading files),
cooccur (CoCounts: a shard's partial co-occurrence counts, mergeable),
rank (seeds, scoring, filters, fallback; shared by live and offline), settings
([recs]). Shells: store (the Redis keys), recommender (the content block's
Recommender), routes (catalog and segment HTTP routes), evaluate
(`nudge recs evaluate`), catalog_cli (`nudge catalog import`).

Public surface:
    CoCounts, CoSettings, history_of
    RankSettings, recommend, ranked, pick, seeds_of, excluded
    normalize_product, read_products
    CollaborativeRecommender(redis_url, RecsConfig)
    RecsConfig, co_settings, rank_settings
"""

from __future__ import annotations

from engine.recs.catalog import normalize_product, read_products
from engine.recs.cooccur import CoCounts, CoSettings, history_of
from engine.recs.rank import RankSettings, excluded, pick, ranked, recommend, seeds_of
from engine.recs.settings import RecsConfig, co_settings, rank_settings

__all__ = [
    "CoCounts",
    "CoSettings",
    "RankSettings",
    "RecsConfig",
    "co_settings",
    "excluded",
    "history_of",
    "normalize_product",
    "pick",
    "rank_settings",
    "ranked",
    "read_products",
    "recommend",
    "seeds_of",
]
