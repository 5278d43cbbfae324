"""The pure cores of the ESP adapters: webhook signing, SendGrid wire format, MIME."""

from __future__ import annotations

import email
import email.policy

import orjson
import pytest

from engine.delivery.adapters import sendgrid, smtp, webhook
from engine.delivery.config import EspConfig
from engine.delivery.message import Email, PermanentError, TransientError, classify_http
from tests.delivery.servers import sendgrid_errors

MAIL = Email(
    send_id="abc123",
    customer="ann",
    to_email="ann@example.com",
    to_name="Ann Lee",
    from_email="hi@shop.example",
    from_name="Shop",
    subject="Your cart",
    html="<p>Hi Ann</p>",
    text="Hi Ann\n",
    unsubscribe_url="https://t.example/u/tok",
    open_url="https://t.example/t/o/tok.gif",
    rule="cart",
    step=1,
    variant="classic",
    template="cart-reminder-classic",
    payload={"items": {"p": {"name": "Hat"}}},
)
HOOK = EspConfig(name="hook", kind="webhook", url="https://esp.example/in", secret="k3y")


def test_webhook_request_is_signed_and_carries_the_idempotency_key() -> None:
    url, headers, body = webhook.build_request(HOOK, MAIL, now=1_700_000_000.4)
    assert url == "https://esp.example/in"
    assert headers["Idempotency-Key"] == "abc123"
    assert headers["X-Nudge-Timestamp"] == "1700000000"
    assert webhook.verify(
        "k3y", body, "1700000000", headers["X-Nudge-Signature"], now=1_700_000_100
    )
    doc = orjson.loads(body)
    assert doc["idempotency_key"] == "abc123" and doc["payload"]["items"]["p"]["name"] == "Hat"
    assert doc["headers"]["List-Unsubscribe"] == "<https://t.example/u/tok>"
    assert doc["message"]["subject"] == "Your cart"


@pytest.mark.parametrize(
    ("secret", "body_change", "ts", "now"),
    [
        ("other", b"", "1700000000", 1_700_000_000),  # wrong secret
        ("k3y", b" ", "1700000000", 1_700_000_000),  # body tampered
        ("k3y", b"", "1700000001", 1_700_000_000),  # timestamp swapped
        ("k3y", b"", "1700000000", 1_700_000_301),  # replayed after 5 minutes
        ("k3y", b"", "1700000000", 1_699_999_699),  # from the future
    ],
)
def test_webhook_verification_rejects(secret: str, body_change: bytes, ts: str, now: float):
    _, headers, body = webhook.build_request(HOOK, MAIL, now=1_700_000_000)
    assert not webhook.verify(secret, body + body_change, ts, headers["X-Nudge-Signature"], now=now)


def test_webhook_without_rendering_sends_no_message() -> None:
    unrendered = Email(**{**MAIL.__dict__, "subject": None, "html": None, "text": None})
    assert "message" not in webhook.build_body(unrendered)


def test_sendgrid_body_is_what_sendgrid_accepts() -> None:
    esp = EspConfig(name="sg", kind="sendgrid", api_key="SG.x")
    url, headers, body = sendgrid.build_request(esp, MAIL)
    assert url == "https://api.sendgrid.com/v3/mail/send"
    assert headers["Authorization"] == "Bearer SG.x"
    doc = orjson.loads(body)
    assert sendgrid_errors(doc) == []
    assert [c["type"] for c in doc["content"]] == ["text/plain", "text/html"]
    assert doc["personalizations"][0]["to"] == [{"email": "ann@example.com", "name": "Ann Lee"}]
    assert doc["personalizations"][0]["custom_args"]["send_id"] == "abc123"
    assert doc["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_the_sendgrid_validator_catches_what_sendgrid_rejects() -> None:
    doc = orjson.loads(
        sendgrid.build_request(EspConfig(name="s", kind="sendgrid", api_key="k"), MAIL)[2]
    )
    doc["content"].reverse()
    doc["personalizations"][0]["to"][0]["email"] = "not-an-address"
    del doc["subject"]
    fields = {e["field"] for e in sendgrid_errors(doc)}
    assert {"content.0.type", "personalizations.0.to.0.email", "subject"} <= fields


def test_mime_message_has_both_parts_and_one_click_unsubscribe() -> None:
    long_link = "https://t.example/u/" + "x" * 200
    message = smtp.build_message(
        Email(**{**MAIL.__dict__, "unsubscribe_url": long_link}),
        now=1_700_000_000,
        domain="shop.example",
    )
    raw = smtp.to_bytes(message)
    assert f"List-Unsubscribe: <{long_link}>\r\n".encode() in raw  # verbatim, not RFC 2047
    parsed = email.message_from_bytes(bytes(message), policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in parsed.iter_parts()] == ["text/plain", "text/html"]
    assert parsed["Message-ID"] == "<abc123@shop.example>"
    assert parsed["List-Unsubscribe"] == f"<{long_link}>"
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert parsed["To"].addresses[0].display_name == "Ann Lee"
    assert parsed.get_body(("html",)).get_content().strip() == "<p>Hi Ann</p>"


def test_unrendered_mail_cannot_go_by_smtp_or_sendgrid() -> None:
    bare = Email(**{**MAIL.__dict__, "html": None})
    with pytest.raises(PermanentError):
        smtp.build_message(bare, now=0)
    with pytest.raises(PermanentError):
        sendgrid.build_body(bare)


@pytest.mark.parametrize(
    ("status", "error", "retry_after"),
    [
        (200, None, None),
        (202, None, None),
        (429, TransientError, 4.0),
        (500, TransientError, None),
        (503, TransientError, 4.0),
        (408, TransientError, None),
        (400, PermanentError, None),
        (401, PermanentError, None),
        (404, PermanentError, None),
    ],
)
def test_http_answers_are_classified(status: int, error: type | None, retry_after) -> None:
    if error is None:
        classify_http(status, b"", 4.0)
        return
    with pytest.raises(error) as caught:
        classify_http(status, b"nope", 4.0)
    assert f"HTTP {status}" in caught.value.message
    if error is TransientError:
        assert caught.value.retry_after == retry_after
