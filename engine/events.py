"""Segment messages: validate what clients send and normalize it for the stream.

A normalized event is a plain dict with the Segment field names plus three of
ours: `customer` (the id that owns it: userId, else anonymousId), `ts` (event
time, epoch seconds, corrected for client clock skew as Segment does) and
`receivedAt` (server time, epoch seconds).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import orjson

from engine.errors import PayloadTooLarge, ValidationError

TYPES = ("track", "identify", "page", "screen", "group", "alias")
MAX_EVENT_BYTES = 32 * 1024
MAX_BATCH_BYTES = 500 * 1024
_OBJECT_FIELDS = ("properties", "traits", "context", "integrations")
_MAX_ID_CHARS = 1024
# Nesting allowed inside properties, traits and context. orjson refuses to encode
# past 255 levels, and events are nested a few levels deeper in stream entries,
# forwards and checkpoints; a deeper message must be a 400 here, not a 500 later.
MAX_DEPTH = 64


def parse_time(value: Any, field: str) -> float:
    """Epoch seconds from an ISO-8601 string (naive times are UTC)."""
    if not isinstance(value, str):
        raise ValidationError(f"{field} must be an ISO-8601 string", field=field)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValidationError(
            f"{field} is not an ISO-8601 time: {value[:40]!r}", field=field
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _identifier(msg: dict, name: str, prefix: str) -> str | None:
    value = msg.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValidationError(f"{name} must be a string", field=prefix + name)
    value = str(value)
    if len(value) > _MAX_ID_CHARS:
        raise ValidationError(
            f"{name} is longer than {_MAX_ID_CHARS} characters", field=prefix + name
        )
    return value


def _nesting_ok(value: dict | list, budget: int) -> bool:
    """True when `value` holds at most `budget` levels of objects and arrays."""
    if budget <= 0:
        return False
    for child in value.values() if isinstance(value, dict) else value:
        if isinstance(child, (dict, list)) and not _nesting_ok(child, budget - 1):
            return False
    return True


# messageIds the engine makes for its own events; refused from clients.
RESERVED_ID_PREFIX = "nudge-"
# Event times accepted (after clock-skew correction): 1970-01-01 up to 2100-01-01.
_EARLIEST_TS, _LATEST_TS = 0.0, 4_102_444_800.0


def _check_nesting(value: dict, field: str) -> None:
    if not _nesting_ok(value, MAX_DEPTH):
        raise ValidationError(
            f"{field} is nested deeper than {MAX_DEPTH} levels", field=field, code="too_deep"
        )


def normalize(
    msg: Any,
    *,
    kind: str | None,
    received_at: float,
    prefix: str = "",
    sent_at: float | None = None,
    batch_context: dict | None = None,
    client: bool = False,
) -> dict:
    """Validate one Segment message and return its normalized form.

    `kind` is the type the endpoint implies (None inside a batch, where each
    message names its own). Raises ValidationError naming the field at fault.
    `client`: from the public ingest API, where messageIds may not begin with the
    prefix of the engine's own (tracking hits).
    """
    if not isinstance(msg, dict):
        raise ValidationError(
            "each message must be a JSON object", field=prefix.rstrip(".") or None
        )
    msg_type = msg.get("type", kind) if kind is None else kind
    if msg_type not in TYPES:
        raise ValidationError(
            f"type must be one of {', '.join(TYPES)}", field=prefix + "type", code="invalid_type"
        )
    for name in _OBJECT_FIELDS:
        value = msg.get(name)
        if value is not None and not isinstance(value, dict):
            raise ValidationError(f"{name} must be an object", field=prefix + name)
        if value and name != "integrations":  # integrations are not kept
            _check_nesting(value, prefix + name)

    user_id = _identifier(msg, "userId", prefix)
    anonymous_id = _identifier(msg, "anonymousId", prefix)
    out: dict[str, Any] = {"type": msg_type}

    if msg_type == "alias":
        previous = _identifier(msg, "previousId", prefix)
        if previous is None:
            raise ValidationError(
                "alias needs previousId", field=prefix + "previousId", code="missing_id"
            )
        if user_id is None:
            raise ValidationError("alias needs userId", field=prefix + "userId", code="missing_id")
        out["previousId"] = previous
    elif user_id is None and anonymous_id is None:
        raise ValidationError(
            "userId or anonymousId is required", field=prefix + "userId", code="missing_id"
        )

    if msg_type == "track":
        name = msg.get("event")
        if not isinstance(name, str) or not name.strip():
            raise ValidationError("track needs an event name", field=prefix + "event")
        out["event"] = name
    elif msg_type in ("page", "screen"):
        name = msg.get("name")
        if name is not None and not isinstance(name, str):
            raise ValidationError("name must be a string", field=prefix + "name")
        out["event"] = "Page Viewed" if msg_type == "page" else "Screen Viewed"
        if name:
            out["name"] = name
        category = msg.get("category")
        if category is not None:
            if category.__class__ not in (str, int, float):
                raise ValidationError(
                    "category must be a string or a number", field=prefix + "category"
                )
            out["category"] = str(category)
    elif msg_type == "group":
        group_id = _identifier(msg, "groupId", prefix)
        if group_id is None:
            raise ValidationError(
                "group needs groupId", field=prefix + "groupId", code="missing_id"
            )
        out["groupId"] = group_id

    message_id = msg.get("messageId")
    if message_id is None:
        message_id = "nudge-" + uuid.uuid4().hex
    elif not isinstance(message_id, str) or not message_id:
        raise ValidationError("messageId must be a non-empty string", field=prefix + "messageId")
    elif client and message_id.startswith(RESERVED_ID_PREFIX):
        # the engine's own ids (opens, clicks, unsubscribes): one sent first by a
        # client would make the real event a duplicate, and drop it
        raise ValidationError(
            f"messageIds beginning {RESERVED_ID_PREFIX!r} are the engine's own",
            field=prefix + "messageId",
        )

    stamp_field = "timestamp" if msg.get("timestamp") is not None else "originalTimestamp"
    stamp = msg.get(stamp_field)
    if stamp is None:
        ts = received_at
    else:
        ts = parse_time(stamp, prefix + stamp_field)
        own_sent = msg.get("sentAt")
        sent = parse_time(own_sent, prefix + "sentAt") if own_sent is not None else sent_at
        if sent is not None:
            ts += received_at - sent  # Segment's clock-skew correction
        if not _EARLIEST_TS <= ts < _LATEST_TS:
            # Far outside, decay factors overflow and dates cannot be formatted: the
            # shard would fail to apply an event this API had accepted.
            raise ValidationError(
                f"{stamp_field} must fall between 1970 and 2100"
                + (" (after correction by sentAt)" if sent is not None else ""),
                field=prefix + stamp_field,
                code="invalid_timestamp",
            )

    context = msg.get("context")
    if batch_context:
        context = {**batch_context, **(context or {})}

    out["userId"] = user_id
    out["anonymousId"] = anonymous_id
    out["customer"] = user_id if user_id is not None else anonymous_id
    out["messageId"] = message_id
    out["ts"] = ts
    out["receivedAt"] = received_at
    if msg.get("properties"):
        out["properties"] = msg["properties"]
    if msg.get("traits"):
        out["traits"] = msg["traits"]
    if context:
        out["context"] = context
    return out


def normalize_batch(
    body: Any, *, received_at: float, body_bytes: int
) -> tuple[list[dict], list[dict]]:
    """Validate a /v1/batch body from a client: (accepted events, rejections by index).

    A rejection is `{"index", "code", "message", "field"}`; the caller decides
    what to answer when nothing was accepted.
    """
    if not isinstance(body, dict):
        raise ValidationError("the body must be a JSON object", field=None)
    batch = body.get("batch")
    if not isinstance(batch, list):
        raise ValidationError("batch must be an array of messages", field="batch")
    if not batch:
        raise ValidationError("batch is empty", field="batch")
    sent_at = parse_time(body["sentAt"], "sentAt") if body.get("sentAt") is not None else None
    batch_context = body.get("context")
    if batch_context is not None and not isinstance(batch_context, dict):
        raise ValidationError("context must be an object", field="context")
    if batch_context:
        _check_nesting(batch_context, "context")
    check_sizes = body_bytes > MAX_EVENT_BYTES  # smaller bodies cannot hold an oversized event
    accepted: list[dict] = []
    rejected: list[dict] = []
    for index, msg in enumerate(batch):
        prefix = f"batch[{index}]."
        try:
            if check_sizes and _encoded_size(msg, f"batch[{index}]") > MAX_EVENT_BYTES:
                raise PayloadTooLarge(
                    f"message is larger than {MAX_EVENT_BYTES} bytes", field=f"batch[{index}]"
                )
            accepted.append(
                normalize(
                    msg,
                    kind=None,
                    received_at=received_at,
                    prefix=prefix,
                    sent_at=sent_at,
                    batch_context=batch_context,
                    client=True,
                )
            )
        except ValidationError as exc:
            rejected.append(
                {"index": index, "code": exc.code, "message": exc.message, "field": exc.field}
            )
    return accepted, rejected


def _encoded_size(msg: Any, field: str) -> int:
    try:
        return len(orjson.dumps(msg))
    except orjson.JSONEncodeError:  # nested past orjson's limit, in any field
        raise ValidationError(
            f"{field} is nested too deeply", field=field, code="too_deep"
        ) from None
