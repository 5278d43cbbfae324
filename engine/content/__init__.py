"""Send-time content: personalized blocks for an ESP, always within the request deadline.

Public:
  content_config_from_mapping(table, env) -> ContentConfig   the [content] table of config.toml
  ContentService(config, redis_url=...)                      start() / close() with the app
  content_routes(config, auth=..., service=..., shards=...)  GET|POST /v1/content/{customer_id}
  content_first(app, routes)                                 the same, ahead of app's middleware
  Recommender, RecentInterestRecommender                     the recommendations seam (interim)
  signed_url(key, path, params, expires=...)                 URLs for ESPs that cannot send headers
"""

from __future__ import annotations

from engine.content.config import (
    BUILTIN_BLOCKS,
    BlockSettings,
    ContentConfig,
    SourceConfig,
    content_config_from_mapping,
)
from engine.content.recommend import RecentInterestRecommender, Recommender
from engine.content.signing import signed_url

_LAZY = {
    "content_routes": "engine.content.routes",
    "content_first": "engine.content.routes",
    "Answer": "engine.content.service",
    "BlockResult": "engine.content.service",
    "ContentService": "engine.content.service",
}


def __getattr__(name: str) -> object:
    # Loaded on first use: they import engine.auth -> engine.config, and engine.config
    # imports engine.content.config, so importing them here would be circular.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BUILTIN_BLOCKS",
    "Answer",
    "BlockResult",
    "BlockSettings",
    "ContentConfig",
    "ContentService",
    "RecentInterestRecommender",
    "Recommender",
    "SourceConfig",
    "content_config_from_mapping",
    "content_first",
    "content_routes",
    "signed_url",
]
