"""Request bodies read with a bound: never more than a route allows is held in memory."""

from __future__ import annotations

from starlette.requests import Request

from engine.coerce import whole_number
from engine.errors import PayloadTooLarge


async def read_limited(request: Request, limit: int, *, stated: int | None = None) -> bytes:
    """The body's bytes as sent (no decoding), refusing it once past `limit` bytes.

    `stated` is the limit the error names, when `limit` allows for compression.
    """
    shown = limit if stated is None else stated
    declared = request.headers.get("content-length")
    size = whole_number(declared) if declared is not None else None
    if declared is not None and (size is None or size > limit):
        raise PayloadTooLarge(f"body is larger than {shown} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body is larger than {shown} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
