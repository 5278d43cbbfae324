"""Generic webhook ESP: a signed JSON POST for ESPs that render their own templates.

The request (built by `build_request`, pure):

    POST {url}
    Content-Type: application/json
    Idempotency-Key: {send_id}
    X-Nudge-Timestamp: {unix seconds}
    X-Nudge-Signature: v1={hex HMAC-SHA256(secret, "{timestamp}.{body}")}

    {"send_id": ..., "idempotency_key": ..., "rule": ..., "step": ..., "variant": ...,
     "template": ..., "due_at": ..., "to": {"email": ..., "name": ...}, "from": {...},
     "customer": ...,
     "payload": {...}, "links": {"unsubscribe": ..., "open_pixel": ...},
     "headers": {"List-Unsubscribe": ..., "List-Unsubscribe-Post": ...},
     "message": {"subject": ..., "html": ..., "text": ...}}   # only with render = true

A receiver verifies with `verify` (or the same three lines in its own language):
recompute the HMAC over the timestamp, a dot and the raw body, compare in
constant time, reject timestamps more than five minutes away from its clock
(replay protection), and treat a repeated Idempotency-Key as already done.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import aiohttp
import orjson

from engine.coerce import whole_number
from engine.delivery.adapters.http import post
from engine.delivery.config import EspConfig
from engine.delivery.message import Email

SIGNATURE = "X-Nudge-Signature"
TIMESTAMP = "X-Nudge-Timestamp"
IDEMPOTENCY = "Idempotency-Key"
TOLERANCE_S = 300


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header value: v1= and the hex HMAC-SHA256 of "timestamp.body"."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def verify(
    secret: str,
    body: bytes,
    timestamp: str | None,
    signature: str | None,
    *,
    now: float,
    tolerance_s: float = TOLERANCE_S,
) -> bool:
    """True if `signature` signs `body` at `timestamp` and the timestamp is fresh."""
    at = whole_number(timestamp) if timestamp else None
    if at is None or not signature:
        return False
    if abs(now - at) > tolerance_s:
        return False
    expected = sign(secret, at, body)
    # Several v1= values may be sent while a secret is rotated.
    return any(hmac.compare_digest(expected, part.strip()) for part in signature.split(","))


def build_body(email: Email) -> dict[str, Any]:
    """The JSON document a webhook receives for `email`."""
    body: dict[str, Any] = {
        "send_id": email.send_id,
        "idempotency_key": email.send_id,
        "rule": email.rule,
        "step": email.step,
        "variant": email.variant,
        "template": email.template,
        "due_at": email.due_at,
        "customer": email.customer,
        "to": {"email": email.to_email, "name": email.to_name},
        "from": {"email": email.from_email, "name": email.from_name},
        "payload": email.payload,
        "links": {"unsubscribe": email.unsubscribe_url, "open_pixel": email.open_url},
        "headers": email.headers,
    }
    if email.subject is not None:
        body["message"] = {"subject": email.subject, "html": email.html, "text": email.text}
    return body


def build_request(esp: EspConfig, email: Email, *, now: float) -> tuple[str, dict, bytes]:
    """(url, headers, body) of the signed POST for `email` at time `now`."""
    body = orjson.dumps(build_body(email))
    timestamp = int(now)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "nudge-webhook/1",
        IDEMPOTENCY: email.send_id,
        TIMESTAMP: str(timestamp),
        SIGNATURE: sign(esp.secret, timestamp, body),
    }
    return esp.url, headers, body


class WebhookAdapter:
    """POSTs signed JSON to `esp.url`."""

    def __init__(self, esp: EspConfig, session: aiohttp.ClientSession | None):
        self.esp = esp
        self.renders = esp.render
        self.session = session

    async def send(self, email: Email) -> str:
        """POST the signed request; the receiver's status as the outcome detail."""
        import time

        url, headers, body = build_request(self.esp, email, now=time.time())
        status, _ = await post(self.session, url, body, headers, timeout_s=self.esp.timeout_s)
        return f"HTTP {status}"

    async def close(self) -> None:
        """Nothing of its own to close (the session is shared)."""
