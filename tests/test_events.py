"""Segment message validation and normalization (engine.events): pure, no I/O."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from engine.errors import PayloadTooLarge, ValidationError
from engine.events import (
    MAX_DEPTH,
    MAX_EVENT_BYTES,
    normalize,
    normalize_batch,
    parse_time,
)

T0 = parse_time("2024-03-04T09:00:00Z", "t")


def nested(levels: int) -> dict:
    """An object `levels` objects deep: nested(1) == {"k": 1}."""
    value: Any = 1
    for _ in range(levels):
        value = {"k": value}
    return value


def good(n: int = 0) -> dict:
    return {"type": "track", "userId": f"u{n}", "event": "Product Viewed", "messageId": f"m{n}"}


# -- bad input: every class, with the field path and code it must name ------------

TRACK = {"type": "track", "userId": "ann", "event": "Product Viewed"}

BAD = [
    # (case id, message, field, code)
    ("type-unknown", {**TRACK, "type": "purchase"}, "type", "invalid_type"),
    ("type-missing", {"userId": "ann", "event": "E"}, "type", "invalid_type"),
    ("type-not-a-string", {**TRACK, "type": ["track"]}, "type", "invalid_type"),
    ("no-ids", {"type": "track", "event": "E"}, "userId", "missing_id"),
    ("null-ids", {**TRACK, "userId": None, "anonymousId": None}, "userId", "missing_id"),
    ("empty-ids", {**TRACK, "userId": "", "anonymousId": ""}, "userId", "missing_id"),
    ("userId-bool", {**TRACK, "userId": True}, "userId", "invalid"),
    ("userId-list", {**TRACK, "userId": ["ann"]}, "userId", "invalid"),
    ("userId-dict", {**TRACK, "userId": {"id": "ann"}}, "userId", "invalid"),
    ("userId-float", {**TRACK, "userId": 1.5}, "userId", "invalid"),
    ("userId-too-long", {**TRACK, "userId": "x" * 1025}, "userId", "invalid"),
    ("anonymousId-bool", {**TRACK, "anonymousId": False}, "anonymousId", "invalid"),
    ("anonymousId-list", {**TRACK, "anonymousId": []}, "anonymousId", "invalid"),
    ("anonymousId-dict", {**TRACK, "anonymousId": {}}, "anonymousId", "invalid"),
    ("track-no-event", {"type": "track", "userId": "ann"}, "event", "invalid"),
    ("track-empty-event", {**TRACK, "event": ""}, "event", "invalid"),
    ("track-blank-event", {**TRACK, "event": "   "}, "event", "invalid"),
    ("track-event-number", {**TRACK, "event": 7}, "event", "invalid"),
    ("page-name-number", {"type": "page", "userId": "ann", "name": 3}, "name", "invalid"),
    (
        "alias-no-previousId",
        {"type": "alias", "userId": "ann"},
        "previousId",
        "missing_id",
    ),
    (
        "alias-no-userId",
        {"type": "alias", "anonymousId": "a1", "previousId": "old"},
        "userId",
        "missing_id",
    ),
    (
        "alias-previousId-bool",
        {"type": "alias", "userId": "ann", "previousId": True},
        "previousId",
        "invalid",
    ),
    ("group-no-groupId", {"type": "group", "userId": "ann"}, "groupId", "missing_id"),
    (
        "group-empty-groupId",
        {"type": "group", "userId": "ann", "groupId": ""},
        "groupId",
        "missing_id",
    ),
    (
        "group-groupId-list",
        {"type": "group", "userId": "ann", "groupId": ["g"]},
        "groupId",
        "invalid",
    ),
    ("properties-list", {**TRACK, "properties": [1, 2]}, "properties", "invalid"),
    ("properties-string", {**TRACK, "properties": "{}"}, "properties", "invalid"),
    ("traits-list", {"type": "identify", "userId": "ann", "traits": []}, "traits", "invalid"),
    ("traits-number", {"type": "identify", "userId": "ann", "traits": 1}, "traits", "invalid"),
    ("context-string", {**TRACK, "context": "web"}, "context", "invalid"),
    ("integrations-list", {**TRACK, "integrations": ["All"]}, "integrations", "invalid"),
    ("timestamp-words", {**TRACK, "timestamp": "yesterday"}, "timestamp", "invalid"),
    ("timestamp-bad-month", {**TRACK, "timestamp": "2024-13-01T00:00:00Z"}, "timestamp", "invalid"),
    ("timestamp-bad-hour", {**TRACK, "timestamp": "2024-01-01T25:00:00Z"}, "timestamp", "invalid"),
    ("timestamp-empty", {**TRACK, "timestamp": ""}, "timestamp", "invalid"),
    ("timestamp-epoch-number", {**TRACK, "timestamp": 1700000000}, "timestamp", "invalid"),
    (
        "originalTimestamp-bad",
        {**TRACK, "originalTimestamp": "soon"},
        "originalTimestamp",
        "invalid",
    ),
    (
        "sentAt-bad",
        {**TRACK, "timestamp": "2024-01-01T00:00:00Z", "sentAt": "later"},
        "sentAt",
        "invalid",
    ),
    ("messageId-empty", {**TRACK, "messageId": ""}, "messageId", "invalid"),
    ("messageId-number", {**TRACK, "messageId": 12}, "messageId", "invalid"),
    (
        "properties-too-deep",
        {**TRACK, "properties": nested(MAX_DEPTH + 1)},
        "properties",
        "too_deep",
    ),
    (
        "context-too-deep",
        {**TRACK, "context": {"page": [nested(MAX_DEPTH)]}},
        "context",
        "too_deep",
    ),
]


@pytest.mark.parametrize(("msg", "field", "code"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_normalize_names_the_bad_field(msg: dict, field: str, code: str) -> None:
    with pytest.raises(ValidationError) as caught:
        normalize(msg, kind=None, received_at=T0)
    assert (caught.value.field, caught.value.code) == (field, code)
    assert caught.value.status == 400


@pytest.mark.parametrize(("msg", "field", "code"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_batch_rejects_the_bad_message_by_index(msg: dict, field: str, code: str) -> None:
    body = {"batch": [good(0), good(1), good(2), msg, good(4)]}
    accepted, rejected = normalize_batch(body, received_at=T0, body_bytes=len(orjson.dumps(body)))
    assert [e["messageId"] for e in accepted] == ["m0", "m1", "m2", "m4"]
    assert [(r["index"], r["field"], r["code"]) for r in rejected] == [
        (3, f"batch[3].{field}", code)
    ]
    assert rejected[0]["message"]


@pytest.mark.parametrize("msg", ["track", 42, None, ["a"], True])
def test_a_message_that_is_not_an_object(msg: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        normalize(msg, kind="track", received_at=T0)
    assert (caught.value.field, caught.value.code) == (None, "invalid")
    body = {"batch": [good(0), msg]}
    accepted, rejected = normalize_batch(body, received_at=T0, body_bytes=100)
    assert len(accepted) == 1
    assert [(r["index"], r["field"], r["code"]) for r in rejected] == [(1, "batch[1]", "invalid")]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([good()], None),
        ("batch", None),
        ({}, "batch"),
        ({"batch": {"0": good()}}, "batch"),
        ({"batch": []}, "batch"),
        ({"batch": [good()], "context": ["web"]}, "context"),
        ({"batch": [good()], "context": {"page": nested(MAX_DEPTH)}}, "context"),
        ({"batch": [good()], "sentAt": "whenever"}, "sentAt"),
        ({"batch": [good()], "sentAt": 1700000000}, "sentAt"),
    ],
)
def test_a_bad_batch_body_is_refused_whole(body: Any, field: str | None) -> None:
    with pytest.raises(ValidationError) as caught:
        normalize_batch(body, received_at=T0, body_bytes=100)
    assert caught.value.field == field


def test_nesting_up_to_the_limit_is_accepted() -> None:
    event = normalize({**TRACK, "properties": nested(MAX_DEPTH)}, kind="track", received_at=T0)
    assert event["properties"] == nested(MAX_DEPTH)
    orjson.dumps([[event]])  # still encodable where it goes: stream entries, forwards


def test_unencodably_deep_message_in_a_big_batch_is_rejected_not_raised() -> None:
    # Nesting past orjson's own limit, in a field Nudge does not even keep: the
    # size check must not blow up with a TypeError (an HTTP 500) for the batch.
    deep: Any = 1
    for _ in range(300):
        deep = [deep]
    filler = {**good(1), "properties": {"blob": "x" * (MAX_EVENT_BYTES // 2)}}
    body = {"batch": [good(0), {**good(9), "extra": deep}, filler, filler]}
    accepted, rejected = normalize_batch(body, received_at=T0, body_bytes=3 * MAX_EVENT_BYTES)
    assert len(accepted) == 3
    assert [(r["index"], r["field"], r["code"]) for r in rejected] == [(1, "batch[1]", "too_deep")]


@pytest.mark.parametrize(
    ("stamps", "field"),
    [
        ({"timestamp": "2300-01-01T00:00:00Z"}, "timestamp"),  # decay factors overflow
        ({"timestamp": "1969-12-31T23:59:59Z"}, "timestamp"),
        ({"originalTimestamp": "0001-01-01T00:00:00Z"}, "originalTimestamp"),
        # in range, then moved out of it by the clock-skew correction
        ({"timestamp": "2020-01-01T00:00:00Z", "sentAt": "9999-12-31T23:59:59Z"}, "timestamp"),
    ],
)
def test_times_outside_1970_to_2100_are_refused(stamps: dict, field: str) -> None:
    # Accepted, they made the shard fail to apply the event (the merge it carried
    # was lost) or to fire anyone's timers in the same tick.
    with pytest.raises(ValidationError) as caught:
        normalize({**TRACK, **stamps}, kind="track", received_at=T0)
    assert (caught.value.field, caught.value.code) == (field, "invalid_timestamp")
    ok = normalize({**TRACK, "timestamp": "2099-12-31T23:59:59Z"}, kind="track", received_at=T0)
    assert ok["ts"] == 4_102_444_799.0


def test_a_page_category_must_be_a_string_or_a_number() -> None:
    # str() of a deeply nested list recursed past Python's limit: a 500 for the batch.
    deep: Any = 1
    for _ in range(1000):
        deep = [deep]
    page = {"userId": "u", "name": "Home"}
    for bad in (deep, ["a"], {"a": 1}, True):
        with pytest.raises(ValidationError) as caught:
            normalize({**page, "category": bad}, kind="page", received_at=T0)
        assert caught.value.field == "category"
    assert normalize({**page, "category": 7}, kind="page", received_at=T0)["category"] == "7"
    body = {"batch": [good(0), {**page, "type": "page", "category": deep}]}
    accepted, rejected = normalize_batch(body, received_at=T0, body_bytes=4000)
    assert len(accepted) == 1 and [r["field"] for r in rejected] == ["batch[1].category"]


# -- normalization ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("msg", "expected"),
    [
        ({"type": "track", "userId": 42, "event": "E"}, {"userId": "42", "customer": "42"}),
        ({"type": "track", "userId": 0, "event": "E"}, {"userId": "0", "customer": "0"}),
        (
            {"type": "track", "anonymousId": 7, "event": "E"},
            {"userId": None, "anonymousId": "7", "customer": "7"},
        ),
        ({"type": "group", "userId": 1, "groupId": 99}, {"groupId": "99", "customer": "1"}),
        (
            {"type": "alias", "userId": 5, "previousId": 4},
            {"userId": "5", "previousId": "4", "customer": "5"},
        ),
    ],
)
def test_integer_ids_become_strings(msg: dict, expected: dict) -> None:
    event = normalize(msg, kind=None, received_at=T0)
    assert {k: event[k] for k in expected} == expected


def test_user_id_owns_the_event_over_anonymous_id() -> None:
    event = normalize(
        {"userId": "u1", "anonymousId": "a1", "event": "E"}, kind="track", received_at=T0
    )
    assert (event["customer"], event["userId"], event["anonymousId"]) == ("u1", "u1", "a1")


@pytest.mark.parametrize(
    ("kind", "msg", "expected"),
    [
        ("page", {"anonymousId": "a", "name": "Home"}, {"event": "Page Viewed", "name": "Home"}),
        ("page", {"anonymousId": "a"}, {"event": "Page Viewed"}),
        (
            "page",
            {"anonymousId": "a", "name": "Shoes", "category": "Shop"},
            {"event": "Page Viewed", "name": "Shoes", "category": "Shop"},
        ),
        ("screen", {"userId": "u", "name": "Cart"}, {"event": "Screen Viewed", "name": "Cart"}),
    ],
)
def test_page_and_screen_become_named_events(kind: str, msg: dict, expected: dict) -> None:
    event = normalize(msg, kind=kind, received_at=T0)
    assert event["type"] == kind
    assert {k: event.get(k) for k in ("event", "name", "category") if k in event} == expected


def test_the_endpoint_decides_the_type() -> None:
    event = normalize(
        {"type": "identify", "userId": "u", "event": "Signed Up"}, kind="track", received_at=T0
    )
    assert (event["type"], event["event"]) == ("track", "Signed Up")


def test_normalized_form() -> None:
    msg = {
        "type": "track",
        "userId": "u",
        "event": "Product Added",
        "messageId": "m-1",
        "properties": {"product_id": "p1"},
        "traits": {"plan": "gold"},
        "context": {"timezone": "Europe/Paris"},
        "integrations": {"All": True},
        "unknownField": 1,
    }
    assert normalize(msg, kind=None, received_at=T0) == {
        "type": "track",
        "event": "Product Added",
        "userId": "u",
        "anonymousId": None,
        "customer": "u",
        "messageId": "m-1",
        "ts": T0,
        "receivedAt": T0,
        "properties": {"product_id": "p1"},
        "traits": {"plan": "gold"},
        "context": {"timezone": "Europe/Paris"},
    }


def test_message_id_is_generated_when_missing_and_kept_when_given() -> None:
    first = normalize({"userId": "u", "event": "E"}, kind="track", received_at=T0)
    second = normalize({"userId": "u", "event": "E"}, kind="track", received_at=T0)
    assert first["messageId"].startswith("nudge-") and len(first["messageId"]) > 20
    assert first["messageId"] != second["messageId"]
    given = normalize(
        {"userId": "u", "event": "E", "messageId": "abc"}, kind="track", received_at=T0
    )
    assert given["messageId"] == "abc"


def at(text: str) -> float:
    return parse_time(text, "t")


@pytest.mark.parametrize(
    ("fields", "batch_sent_at", "expected"),
    [
        # no timestamp: the server's receivedAt
        ({}, None, "2024-01-01T10:01:05Z"),
        # a timestamp without sentAt is trusted as it is
        ({"timestamp": "2024-01-01T10:00:00Z"}, None, "2024-01-01T10:00:00Z"),
        # the client clock is 60 s slow: ts = timestamp + receivedAt - sentAt
        (
            {"timestamp": "2024-01-01T10:00:00Z", "sentAt": "2024-01-01T10:00:05Z"},
            None,
            "2024-01-01T10:01:00Z",
        ),
        # ... or 1 h fast, with the offset written out
        (
            {"timestamp": "2024-01-01T12:00:00+01:00", "sentAt": "2024-01-01T12:01:00+01:00"},
            None,
            "2024-01-01T10:00:05Z",
        ),
        # the batch's sentAt applies to messages without their own
        ({"timestamp": "2024-01-01T10:00:00Z"}, "2024-01-01T10:00:35Z", "2024-01-01T10:00:30Z"),
        # a message's own sentAt wins over the batch's
        (
            {"timestamp": "2024-01-01T10:00:00Z", "sentAt": "2024-01-01T10:00:05Z"},
            "2024-01-01T09:00:00Z",
            "2024-01-01T10:01:00Z",
        ),
        # originalTimestamp stands in for a missing timestamp
        (
            {"originalTimestamp": "2024-01-01T10:00:00Z", "sentAt": "2024-01-01T10:00:05Z"},
            None,
            "2024-01-01T10:01:00Z",
        ),
        # naive times are UTC
        ({"timestamp": "2024-01-01T10:00:00"}, None, "2024-01-01T10:00:00Z"),
        # sentAt without a timestamp changes nothing
        ({"sentAt": "2024-01-01T09:00:00Z"}, None, "2024-01-01T10:01:05Z"),
    ],
)
def test_event_time_is_corrected_for_clock_skew(
    fields: dict, batch_sent_at: str | None, expected: str
) -> None:
    received = at("2024-01-01T10:01:05Z")
    msg = {"type": "track", "userId": "u", "event": "E", **fields}
    body: dict = {"batch": [msg]}
    if batch_sent_at is not None:
        body["sentAt"] = batch_sent_at
    [event], rejected = normalize_batch(body, received_at=received, body_bytes=200)
    assert rejected == []
    assert event["ts"] == at(expected)
    assert event["receivedAt"] == received
    if batch_sent_at is None:
        single = normalize(msg, kind=None, received_at=received)
        assert single["ts"] == at(expected)


def test_batch_context_is_merged_and_the_message_wins() -> None:
    body = {
        "context": {"library": {"name": "analytics-python"}, "timezone": "Europe/London"},
        "batch": [
            {**good(0), "context": {"timezone": "Asia/Tokyo", "ip": "1.2.3.4"}},
            good(1),
        ],
    }
    accepted, rejected = normalize_batch(body, received_at=T0, body_bytes=300)
    assert rejected == []
    assert accepted[0]["context"] == {
        "library": {"name": "analytics-python"},
        "timezone": "Asia/Tokyo",
        "ip": "1.2.3.4",
    }
    assert accepted[1]["context"] == {
        "library": {"name": "analytics-python"},
        "timezone": "Europe/London",
    }


def test_batch_returns_accepted_in_order_and_rejected_by_index() -> None:
    body = {
        "batch": [
            good(0),
            {"type": "track", "event": "E"},
            good(2),
            {"type": "identify", "anonymousId": "a", "traits": {"email": "a@example.com"}},
            {"type": "nope", "userId": "u"},
        ]
    }
    accepted, rejected = normalize_batch(body, received_at=T0, body_bytes=400)
    assert [(e["type"], e["customer"]) for e in accepted] == [
        ("track", "u0"),
        ("track", "u2"),
        ("identify", "a"),
    ]
    assert [(r["index"], r["code"], r["field"]) for r in rejected] == [
        (1, "missing_id", "batch[1].userId"),
        (4, "invalid_type", "batch[4].type"),
    ]


def test_an_oversized_message_in_a_big_batch_is_rejected_by_index() -> None:
    big = {**good(2), "properties": {"blob": "x" * MAX_EVENT_BYTES}}
    small = [good(n) for n in range(5)]
    body = {"batch": [*small[:2], big, *small[2:]]}
    raw = orjson.dumps(body)
    assert len(raw) > MAX_EVENT_BYTES
    accepted, rejected = normalize_batch(body, received_at=T0, body_bytes=len(raw))
    assert [e["messageId"] for e in accepted] == ["m0", "m1", "m2", "m3", "m4"]
    assert [e["customer"] for e in accepted] == ["u0", "u1", "u2", "u3", "u4"]
    assert [(r["index"], r["code"], r["field"]) for r in rejected] == [
        (2, PayloadTooLarge.code, "batch[2]")
    ]
    assert rejected[0]["code"] == "too_large"


def test_a_message_just_under_the_limit_is_accepted() -> None:
    msg = {**good(0), "properties": {"blob": ""}}
    msg["properties"]["blob"] = "x" * (MAX_EVENT_BYTES - len(orjson.dumps(msg)))
    assert len(orjson.dumps(msg)) == MAX_EVENT_BYTES
    body = {"batch": [msg, good(1)]}
    accepted, rejected = normalize_batch(body, received_at=T0, body_bytes=2 * MAX_EVENT_BYTES)
    assert (len(accepted), rejected) == (2, [])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-01-01T10:00:00Z", 1704103200.0),
        ("2024-01-01T10:00:00.250Z", 1704103200.25),
        ("2024-01-01T11:00:00+01:00", 1704103200.0),
        ("2024-01-01 10:00:00", 1704103200.0),
        ("2024-01-01", 1704067200.0),
    ],
)
def test_parse_time(text: str, expected: float) -> None:
    assert parse_time(text, "t") == expected
