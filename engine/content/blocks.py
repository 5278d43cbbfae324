"""The built-in blocks' data, derived from the live public profile (pure).

Every function takes the profile dict a shard returns (`Profile.public()`) and
returns plain JSON-ready data; `render.py` turns that data into HTML.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.content.template import Template, url_value

_CART_ITEM_FIELDS = ("product_id", "name", "price", "quantity", "url", "image_url", "category")
_VIEW_EVENTS = ("Product Viewed", "Product Clicked")


class Links:
    """Product and checkout URL templates (config strings; empty: no link)."""

    def __init__(self, product_url: str = "", checkout_url: str = ""):
        self._product = Template(product_url) if product_url else None
        self._checkout = Template(checkout_url) if checkout_url else None

    def product(self, item: Mapping[str, Any]) -> str | None:
        """The item's own url, else the product template over the item's fields, else None."""
        if item.get("url"):
            return str(item["url"])
        if self._product is None:
            return None
        return self._product.render(item, url_value)

    def checkout(self, profile: Mapping[str, Any]) -> str | None:
        """The checkout link for this customer's cart, or None."""
        if self._checkout is None:
            return None
        context = {"customer_id": profile.get("id"), "cart_id": profile.get("cart_id") or ""}
        return self._checkout.render(context, url_value)


def display_name(traits: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(first name, full name) from identify traits, when known."""
    first = traits.get("first_name") or traits.get("firstName")
    last = traits.get("last_name") or traits.get("lastName")
    full = traits.get("name")
    if not first and isinstance(full, str) and full.strip():
        first = full.split()[0]
    if not full and first:
        full = f"{first} {last}" if last else first
    return (str(first) if first else None), (str(full) if full else None)


def segments(profile: Mapping[str, Any]) -> list[str]:
    """Segments derived from the profile, then any listed in the `segments` trait."""
    out = []
    orders = profile.get("orders") or 0
    out.append("customer" if orders else "prospect")
    if orders >= 2:
        out.append("repeat_customer")
    if profile.get("cart"):
        out.append("open_cart")
    email = profile.get("email") or {}
    if email.get("clicked") or email.get("opened"):
        out.append("email_engaged")
    if (profile.get("consent") or {}).get("unsubscribed"):
        out.append("unsubscribed")
    extra = (profile.get("traits") or {}).get("segments")
    if isinstance(extra, list):
        out.extend(str(s) for s in extra if isinstance(s, (str, int)) and str(s) not in out)
    return out


def profile_data(profile: Mapping[str, Any], *, traits: tuple[str, ...] = ()) -> dict:
    """The profile block: name, segments, traits (all, or only those listed) and totals."""
    all_traits = profile.get("traits") or {}
    first, full = display_name(all_traits)
    shown = {k: all_traits[k] for k in traits if k in all_traits} if traits else dict(all_traits)
    return {
        "id": profile.get("id"),
        "first_name": first,
        "name": full,
        "segments": segments(profile),
        "traits": shown,
        "orders": profile.get("orders") or 0,
        "revenue": profile.get("revenue") or 0.0,
        "timezone": profile.get("timezone"),
        "unsubscribed": bool((profile.get("consent") or {}).get("unsubscribed")),
    }


def cart_data(profile: Mapping[str, Any], links: Links) -> dict:
    """The cart block: items newest first, item count, total and checkout link."""
    cart = profile.get("cart") or {}
    items = []
    for raw in sorted(cart.values(), key=lambda i: i.get("added_at") or 0, reverse=True):
        item = {k: raw.get(k) for k in _CART_ITEM_FIELDS}
        item["url"] = links.product(raw)
        items.append(item)
    return {
        "items": items,
        "count": sum(int(i.get("quantity") or 1) for i in items),
        "total": profile.get("cart_total") or 0.0,
        "updated_at": profile.get("cart_updated"),
        "checkout_url": links.checkout(profile) if items else None,
    }


def recently_viewed_data(profile: Mapping[str, Any], links: Links, *, limit: int) -> dict:
    """Distinct products the customer viewed, newest first (cart details when known)."""
    cart = profile.get("cart") or {}
    seen: set[str] = set()
    items = []
    for ts, event, product, category in reversed(profile.get("recent") or []):
        if event not in _VIEW_EVENTS or product is None or product in seen:
            continue
        seen.add(product)
        known = cart.get(product) or {}
        item = {
            "product_id": product,
            "category": category,
            "viewed_at": ts,
            "name": known.get("name"),
            "price": known.get("price"),
            "image_url": known.get("image_url"),
        }
        item["url"] = links.product({**known, **item})
        items.append(item)
        if len(items) >= limit:
            break
    return {"items": items}


def recommendation_data(items: list[dict], links: Links) -> dict:
    """The recommendations block from a recommender's items (urls filled in)."""
    out = []
    for item in items:
        if not isinstance(item, dict) or item.get("product_id") is None:
            continue
        filled = dict(item)
        filled["product_id"] = str(item["product_id"])
        filled["url"] = links.product(filled)
        out.append(filled)
    return {"items": out}
