"""SendGrid v3 Mail Send (POST /v3/mail/send): the wire format, built purely.

As SendGrid documents it: `personalizations` (1..1000, each with `to`),
`from`, `subject`, `content` with text/plain before text/html, optional
`headers` (string values) and `custom_args` (string values; carried back on
SendGrid's event webhook, so opens and bounces can be tied to the send).
Success is 202 Accepted with an empty body; errors are
{"errors": [{"message", "field", "help"}]}. SendGrid has no idempotency header:
`custom_args.send_id` names the send, and Nudge's ledger prevents re-sends.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from engine.delivery.adapters.http import post
from engine.delivery.config import EspConfig
from engine.delivery.message import Email, PermanentError

DEFAULT_URL = "https://api.sendgrid.com/v3/mail/send"


def _address(email: str, name: str | None) -> dict[str, str]:
    return {"email": email, "name": name} if name else {"email": email}


def build_body(email: Email) -> dict[str, Any]:
    """The mail/send JSON for one rendered email."""
    if email.subject is None or email.html is None or email.text is None:
        raise PermanentError("SendGrid needs a rendered subject, text and HTML")
    custom = {
        "send_id": email.send_id,
        "customer": email.customer,
        "rule": email.rule or "",
        "variant": email.variant or "",
    }
    return {
        "personalizations": [
            {"to": [_address(email.to_email, email.to_name)], "custom_args": custom}
        ],
        "from": _address(email.from_email, email.from_name),
        "subject": email.subject,
        "content": [
            {"type": "text/plain", "value": email.text},
            {"type": "text/html", "value": email.html},
        ],
        "headers": email.headers,
        "categories": [c for c in (email.rule, email.template) if c][:10],
        # Nudge signs its own open and click links: SendGrid's would track twice.
        "tracking_settings": {
            "click_tracking": {"enable": False, "enable_text": False},
            "open_tracking": {"enable": False},
        },
    }


def build_request(esp: EspConfig, email: Email) -> tuple[str, dict, bytes]:
    """(url, headers, body) of the mail/send call."""
    headers = {
        "Authorization": f"Bearer {esp.api_key}",
        "Content-Type": "application/json",
        "User-Agent": "nudge-sendgrid/1",
    }
    return esp.url or DEFAULT_URL, headers, orjson.dumps(build_body(email))


class SendGridAdapter:
    """Sends through SendGrid's v3 API."""

    renders = True

    def __init__(self, esp: EspConfig, session: aiohttp.ClientSession | None):
        self.esp = esp
        self.session = session

    async def send(self, email: Email) -> str:
        """POST mail/send; SendGrid answers 202 when it accepted the message."""
        url, headers, body = build_request(self.esp, email)
        status, _ = await post(self.session, url, body, headers, timeout_s=self.esp.timeout_s)
        return f"HTTP {status}"

    async def close(self) -> None:
        """Nothing of its own to close (the session is shared)."""
