"""HTML fragments of blocks (pure). Every value is escaped; URLs keep only safe schemes.

Fragments are built from `Template`s with `html_value`, so a customer's name or
an upstream's title can never inject markup; only fragments this module made
(`Markup`) are inserted as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.content.config import SourceConfig
from engine.content.template import Markup, Template, html_value


def _esc(value: Any) -> str:
    return html_value(value, "")


def _href(value: Any) -> str:
    return html_value(value, "url")


def _money(value: Any) -> str:
    return html_value(value, "money")


# Built-in fragments are f-strings for speed (about 20 per answer); every value in
# them goes through _esc, _href or _money, and nothing else is interpolated.


def _linked(url: Any, label: Any) -> str:
    if not url:
        return _esc(label)
    return f'<a href="{_href(url)}">{_esc(label)}</a>'


def _image(item: Mapping[str, Any], label: Any) -> str:
    if not item.get("image_url"):
        return ""
    return f'<img src="{_href(item["image_url"])}" alt="{_esc(label)}" width="80">'


def profile_html(data: Mapping[str, Any]) -> str:
    """The customer's first name in a span that carries their segments."""
    segments = _esc(" ".join(data.get("segments", ())))
    return (
        f'<span class="nudge-profile" data-segments="{segments}">'
        f'<span class="nudge-first-name">{_esc(data.get("first_name"))}</span></span>'
    )


def cart_html(data: Mapping[str, Any]) -> str:
    """A table of the cart's items with its total and checkout link; "" when empty."""
    items = data.get("items") or []
    if not items:
        return ""
    rows = []
    for item in items:
        label = item.get("name") or item.get("product_id")
        rows.append(
            f'<tr class="nudge-cart-item"><td>{_image(item, label)}</td>'
            f"<td>{_linked(item.get('url'), label)}</td>"
            f"<td>{_esc(item.get('quantity') or 1)}</td><td>{_money(item.get('price'))}</td></tr>"
        )
    checkout = ""
    if data.get("checkout_url"):
        checkout = f'<a class="nudge-checkout" href="{_href(data["checkout_url"])}">Checkout</a>'
    return (
        f'<table class="nudge-cart">{"".join(rows)}<tr class="nudge-cart-total">'
        f'<td colspan="3">Total</td><td>{_money(data.get("total"))}</td></tr></table>{checkout}'
    )


def products_html(data: Mapping[str, Any], kind: str) -> str:
    """A list of product links (recommendations, recently viewed); "" when empty."""
    items = data.get("items") or []
    if not items:
        return ""
    parts = []
    for item in items:
        label = item.get("name") or item.get("product_id")
        parts.append(
            f'<li class="nudge-product" data-product-id="{_esc(item.get("product_id"))}">'
            f"{_image(item, label)}{_linked(item.get('url'), label)}</li>"
        )
    return f'<ul class="nudge-{_esc(kind)}">{"".join(parts)}</ul>'


class SourceRenderer:
    """A source's `html` and `item_html` templates, compiled once."""

    def __init__(self, config: SourceConfig):
        self._html = Template(config.html) if config.html else None
        self._item = Template(config.item_html) if config.item_html else None

    def render(self, data: Any) -> str:
        """The fragment for `data`: items rendered one by one, then the wrapper."""
        items = ""
        if self._item is not None and isinstance(data, list):
            items = "".join(
                self._item.render(item if isinstance(item, dict) else {"value": item}, html_value)
                for item in data
            )
        if self._html is None:
            return items
        context = dict(data) if isinstance(data, dict) else {}
        context["items"] = Markup(items)
        return self._html.render(context, html_value)


def fallback_html(template: Template | None, customer_id: str) -> str:
    """A configured fallback fragment; it may name {customer_id}, escaped like any value."""
    if template is None:
        return ""
    return template.render({"customer_id": customer_id}, html_value)
