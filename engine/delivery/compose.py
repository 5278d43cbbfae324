"""From a decided send and the live profile to an Email, or a reason not to send (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.content.blocks import Links
from engine.delivery.config import DeliveryConfig, EspConfig
from engine.delivery.context import build_context, email_address
from engine.delivery.message import Email
from engine.delivery.templates import TemplateSet
from engine.profile import ERASES, UNSUBSCRIBES
from engine.tracking import TokenSigner

UNKNOWN_CUSTOMER, UNSUBSCRIBED, NO_ADDRESS = "unknown_customer", "unsubscribed", "no_address"
ERASED = "erased"


def suppression(profile: Mapping[str, Any] | None) -> str | None:
    """Why this customer must get no email now, or None.

    Consent is read at send time: an unsubscribe that arrived after the rule
    fired still stops the email. An erased or unknown customer gets nothing.
    """
    if profile is None:
        return UNKNOWN_CUSTOMER
    if (profile.get("consent") or {}).get("unsubscribed"):
        return UNSUBSCRIBED
    if email_address(profile) is None:
        return NO_ADDRESS
    return None


def withdrawn(change: str | None) -> str | None:
    """The suppression a consent change noted at ingest (engine.store) calls for, or None.

    An unsubscribe or erasure the API has stored stops the email even when the
    profile in hand (the send's copy, or a shard still behind its stream) does
    not show it yet. A later opt-in replaces the note, so it never blocks one.
    """
    if change == UNSUBSCRIBES:
        return UNSUBSCRIBED
    if change == ERASES:
        return ERASED
    return None


class Composer:
    """Builds the Email of a send: context, rendering (when the adapter needs it), headers."""

    def __init__(
        self,
        delivery: DeliveryConfig,
        *,
        signer: TokenSigner,
        links: Links,
        templates: TemplateSet,
    ):
        self.delivery = delivery
        self.signer = signer
        self.links = links
        self.templates = templates
        self.shop = {"name": delivery.brand_name, "url": delivery.site_url}

    def context(
        self,
        send: Mapping[str, Any],
        profile: Mapping[str, Any] | None,
        recommended: list[dict] | None = None,
    ) -> dict:
        """The template context of `send` for `profile`."""
        return build_context(
            send,
            profile,
            signer=self.signer,
            links=self.links,
            shop=self.shop,
            recommended=recommended,
        )

    def compose(
        self,
        send: Mapping[str, Any],
        profile: Mapping[str, Any],
        esp: EspConfig,
        *,
        render: bool,
        recommended: list[dict] | None = None,
    ) -> Email:
        """The Email for `send`; TemplateError if rendering fails."""
        context = self.context(send, profile, recommended)
        rendered = self.templates.render(send["template"], context) if render else None
        customer = context["customer"]
        return Email(
            send_id=send["send_id"],
            customer=send["customer"],
            to_email=customer["email"],
            to_name=customer["name"],
            from_email=esp.from_email or self.delivery.from_email,
            from_name=esp.from_name or self.delivery.from_name,
            subject=rendered.subject if rendered else None,
            html=rendered.html if rendered else None,
            text=rendered.text if rendered else None,
            unsubscribe_url=context["links"]["unsubscribe"],
            open_url=context["links"]["open_pixel"],
            rule=send.get("rule"),
            step=send.get("step"),
            variant=send.get("variant"),
            template=send.get("template"),
            due_at=send.get("at"),
            payload=dict(send.get("payload") or {}),
        )
