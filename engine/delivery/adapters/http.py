"""One HTTP POST for the HTTP adapters, its failures classified."""

from __future__ import annotations

import time

import aiohttp

from engine.coerce import whole_number
from engine.delivery.message import TransientError, classify_http
from engine.delivery.policy import parse_retry_after


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    timeout_s: float,
) -> tuple[int, bytes]:
    """POST `body`; (status, body) for a 2xx, else TransientError / PermanentError."""
    try:
        async with session.post(
            url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as reply:
            content = await reply.read()
            retry_after = parse_retry_after(reply.headers.get("Retry-After"), time.time())
            reset_at = whole_number(reply.headers.get("X-RateLimit-Reset", ""))
            if retry_after is None and reset_at is not None:
                # SendGrid's 429: the epoch second the limit resets.
                reset = float(reset_at)
                retry_after = max(reset - time.time(), 0.0)
            classify_http(reply.status, content, retry_after)
            return reply.status, content
    except TimeoutError as exc:
        raise TransientError(f"timed out after {timeout_s:g} s") from exc
    except aiohttp.ClientError as exc:
        raise TransientError(f"{type(exc).__name__}: {exc}") from exc
