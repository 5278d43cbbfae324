"""Segment message validation details that the HTTP table in test_api does not reach."""

from __future__ import annotations

import pytest

from engine.errors import ValidationError
from engine.events import normalize, normalize_batch, parse_time


def test_clock_skew_is_corrected_with_sent_at() -> None:
    msg = {
        "userId": "a",
        "event": "E",
        "timestamp": "2024-01-01T10:00:00Z",
        "sentAt": "2024-01-01T10:00:05Z",
    }
    received = parse_time("2024-01-01T10:01:05Z", "t")  # the client clock is 60 s slow
    event = normalize(msg, kind="track", received_at=received)
    assert event["ts"] == parse_time("2024-01-01T10:01:00Z", "t")


def test_ids_are_strings_and_message_id_is_generated() -> None:
    event = normalize({"userId": 42, "event": "E"}, kind="track", received_at=1.0)
    assert event["userId"] == "42" and event["customer"] == "42"
    assert event["messageId"].startswith("nudge-")
    with pytest.raises(ValidationError) as caught:
        normalize({"userId": True, "event": "E"}, kind="track", received_at=1.0)
    assert caught.value.field == "userId"


def test_batch_context_is_merged_and_message_wins() -> None:
    body = {
        "context": {"library": {"name": "x"}, "timezone": "Europe/London"},
        "batch": [
            {"type": "track", "userId": "a", "event": "E", "context": {"timezone": "Asia/Tokyo"}}
        ],
    }
    [event], rejected = normalize_batch(body, received_at=1.0, body_bytes=100)
    assert rejected == []
    assert event["context"] == {"library": {"name": "x"}, "timezone": "Asia/Tokyo"}


def test_page_and_anonymous_ownership() -> None:
    event = normalize({"anonymousId": "an", "name": "Home"}, kind="page", received_at=1.0)
    assert (event["event"], event["customer"], event["name"]) == ("Page Viewed", "an", "Home")
    both = normalize(
        {"anonymousId": "an", "userId": "u", "event": "E"}, kind="track", received_at=1.0
    )
    assert both["customer"] == "u"
