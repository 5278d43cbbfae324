"""Which shard owns a customer (a stable hash, the same in every process), and stream ids."""

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


def parse_id(stream_id: str | bytes) -> tuple[int, int]:
    """A stream id as a comparable (milliseconds, sequence) pair."""
    if isinstance(stream_id, bytes):
        stream_id = stream_id.decode()
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)
