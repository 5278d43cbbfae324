"""Faults injected into real clients: a Redis transaction that never lands."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import redis


@contextlib.contextmanager
def transactions_fail(
    client: Any, message: str = "the process died at the commit"
) -> Iterator[None]:
    """Every MULTI/EXEC `client` runs meanwhile fails unsent; other pipelines go through."""
    real = client.pipeline

    def pipeline(transaction: bool = True, **options: Any) -> Any:
        pipe = real(transaction=transaction, **options)
        if transaction:

            async def lost(*args: Any, **kwargs: Any) -> Any:
                raise redis.exceptions.ConnectionError(message)

            pipe.execute = lost
        return pipe

    client.pipeline = pipeline
    try:
        yield
    finally:
        client.pipeline = real
