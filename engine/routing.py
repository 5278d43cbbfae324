"""Which shard owns a customer: a stable hash, the same in every process."""

from __future__ import annotations

import zlib


def shard_for(customer_id: str, shards: int) -> int:
    """Shard index for `customer_id` (crc32, never the per-process built-in hash)."""
    return zlib.crc32(customer_id.encode()) % shards


def shard_tag(index: int) -> str:
    """The Redis hash tag that keeps one shard's keys in one cluster slot."""
    return f"{{s{index}}}"


def stream_key(index: int) -> str:
    """The events stream of shard `index`."""
    return f"nudge:{shard_tag(index)}:events"
