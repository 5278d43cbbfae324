"""Small builders of Segment messages for tests."""

from __future__ import annotations

import itertools
import uuid

from engine.events import normalize

_counter = itertools.count()


def track(
    customer: str, event: str = "Product Viewed", *, anonymous: bool = False, **props: object
) -> dict:
    """A raw Segment track message with a fresh messageId; keyword arguments are properties."""
    who = {"anonymousId": customer} if anonymous else {"userId": customer}
    return {
        "type": "track",
        "event": event,
        "messageId": f"m-{uuid.uuid4().hex}",
        "properties": props,
        **who,
    }


def normalized(msg: dict, at: float | None = None) -> dict:
    """`msg` as the API would store it, received at `at` (default: a fixed increasing time)."""
    received = at if at is not None else 1_700_000_000.0 + next(_counter)
    return normalize(msg, kind=None, received_at=received)
