"""ESP adapters: each builds its request purely, then sends it. Chosen per rule by `esp`."""

from __future__ import annotations

from typing import Protocol

from engine.delivery.config import EspConfig
from engine.delivery.message import Email


class Adapter(Protocol):
    """Hands one Email to an ESP; raises TransientError or PermanentError on failure."""

    esp: EspConfig
    renders: bool  # True: the adapter needs subject/html/text rendered by Nudge

    async def send(self, email: Email) -> str: ...

    async def close(self) -> None: ...


def make_adapter(esp: EspConfig, *, session: object = None) -> Adapter:
    """The adapter for `esp.kind` (HTTP adapters share the aiohttp `session`)."""
    if esp.kind == "webhook":
        from engine.delivery.adapters.webhook import WebhookAdapter

        return WebhookAdapter(esp, session)
    if esp.kind == "sendgrid":
        from engine.delivery.adapters.sendgrid import SendGridAdapter

        return SendGridAdapter(esp, session)
    if esp.kind == "smtp":
        from engine.delivery.adapters.smtp import SmtpAdapter

        return SmtpAdapter(esp)
    raise ValueError(f"unknown ESP kind {esp.kind!r}")
