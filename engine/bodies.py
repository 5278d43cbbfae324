"""Request bodies read with a bound: never more than a route allows is held in memory."""

from __future__ import annotations

from starlette.requests import Request

from engine.coerce import whole_number
from engine.errors import PayloadTooLarge, ValidationError


def check_declared_length(declared: str | None, limit: int, shown: int | None = None) -> None:
    """Refuse a body by its Content-Length header: 400 if it is no number, 413 past `limit`."""
    if declared is None:
        return
    if not (declared.isascii() and declared.isdigit()):
        raise ValidationError("Content-Length must be a number of bytes", field="Content-Length")
    size = whole_number(declared)  # None: more digits than any body could have
    if size is None or size > limit:
        raise PayloadTooLarge(f"body is larger than {limit if shown is None else shown} bytes")


async def read_limited(request: Request, limit: int, *, stated: int | None = None) -> bytes:
    """The body's bytes as sent (no decoding), refusing it once past `limit` bytes.

    `stated` is the limit the error names, when `limit` allows for compression.
    """
    shown = limit if stated is None else stated
    check_declared_length(request.headers.get("content-length"), limit, shown)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body is larger than {shown} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
