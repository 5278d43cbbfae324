"""What a template sees for one send: customer, cart, recommendations, payload, links (pure).

`build_context(send, profile, ...)` joins the decided send (its payload was
computed by the rule when it fired) with the live profile at send time (the
cart may have changed since) and the signed tracking links of this send.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from engine.content.blocks import Links, cart_data, display_name
from engine.content.recommend import recent_interest
from engine.tracking import TokenSigner

_RESERVED = frozenset(
    {"customer", "cart", "recommendations", "recent_purchase", "payload", "send", "shop", "links"}
)


def email_address(profile: Mapping[str, Any] | None) -> str | None:
    """The customer's email address from identify traits, if it looks like one."""
    if not profile:
        return None
    traits = profile.get("traits") or {}
    value = traits.get("email") or traits.get("Email")
    if isinstance(value, str) and "@" in value and "\n" not in value and "\r" not in value:
        return value.strip()
    return None


def build_context(
    send: Mapping[str, Any],
    profile: Mapping[str, Any] | None,
    *,
    signer: TokenSigner,
    links: Links,
    shop: Mapping[str, str],
    recommendations: int = 4,
    recommended: list[dict] | None = None,
) -> dict[str, Any]:
    """The template context of `send` for `profile` (None: an unknown customer).

    `recommended`: products from the engine's recommender (collaborative filtering),
    best first; without them, the customer's own recent interest fills the block.
    """
    profile = profile or {"id": send["customer"]}
    traits = profile.get("traits") or {}
    payload = dict(send.get("payload") or {})
    first, full = display_name(traits)
    first = first or payload.get("first_name")
    last = traits.get("last_name") or traits.get("lastName")
    cart = cart_data(profile, links)
    if not cart["items"] and isinstance(payload.get("items"), dict):
        # The cart emptied since the rule fired (the rule's exit check ran then):
        # show what the rule saw rather than an empty cart.
        cart = cart_data({**profile, "cart": payload["items"]}, links)
    if cart["items"] and not cart["total"]:
        cart["total"] = round(
            sum(_number(i.get("price")) * _number(i.get("quantity") or 1) for i in cart["items"]), 2
        )
    labels = {"rule": send.get("rule"), "variant": send.get("variant")}
    send_id, customer = send["send_id"], send["customer"]
    purchased = profile.get("purchased") or []
    context: dict[str, Any] = {
        "customer": {
            "id": profile.get("id") or customer,
            "first_name": first,
            "last_name": last,
            "name": full,
            "email": email_address(profile),
        },
        "cart": cart,
        "recommendations": (
            [
                {
                    **{"name": None, "image_url": None, "price": None},
                    **item,
                    "url": item.get("url") or links.product(item),
                }
                for item in recommended[:recommendations]
            ]
            if recommended
            else [
                {**item, "url": links.product(item), "name": None, "image_url": None, "price": None}
                for item in recent_interest(profile, limit=recommendations)
            ]
        ),
        "recent_purchase": (
            {"product_id": purchased[-1][1], "at": purchased[-1][0]} if purchased else None
        ),
        "payload": payload,
        "send": {
            "id": send_id,
            "rule": send.get("rule"),
            "step": send.get("step"),
            "variant": send.get("variant"),
            "template": send.get("template"),
        },
        "shop": dict(shop),
        "links": {
            "unsubscribe": signer.unsubscribe_url(send_id, customer, **labels),
            "open_pixel": signer.open_url(send_id, customer, **labels),
        },
        "_track": _tracker(signer, send_id, customer, labels),
    }
    for key, value in payload.items():  # {{ product_name }}, {{ coupon }} ...
        if key not in _RESERVED and not key.startswith("_"):
            context[key] = value
    return context


def _tracker(
    signer: TokenSigner, send_id: str, customer: str, labels: dict
) -> Callable[[str], str]:
    def track(url: str) -> str:
        return signer.click_url(send_id, customer, url, **labels)

    return track


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0
