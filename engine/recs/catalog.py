"""Products: checking one, and reading catalog files (CSV or JSONL). Pure, stdlib only.

A product is {id, name, url, image_url, price, category, in_stock} plus
optional brand, sku and currency. `image` is accepted for image_url and
`product_id` for id. In CSV files, in_stock reads true/false/yes/no/1/0.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator
from typing import Any

import orjson

from engine.errors import ValidationError

_TEXT = ("name", "url", "image_url", "category", "brand", "sku", "currency")
_FIELDS = frozenset((*_TEXT, "id", "product_id", "image", "price", "in_stock"))
_TRUE = frozenset(("true", "yes", "y", "1", "on"))
_FALSE = frozenset(("false", "no", "n", "0", "off"))
MAX_ID = 256


def normalize_product(data: Any, product_id: str | None = None, *, prefix: str = "") -> dict:
    """A checked product; ValidationError names the field at fault (after `prefix`)."""
    if not isinstance(data, dict):
        raise ValidationError("a product must be a JSON object", field=prefix.rstrip(".") or None)
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise ValidationError(
            f"unknown product field {unknown[0]!r} (known: {', '.join(sorted(_FIELDS))})",
            field=prefix + unknown[0],
        )
    given = data.get("id", data.get("product_id"))
    if product_id is not None and given is not None and str(given) != product_id:
        raise ValidationError(
            f"id {given!r} differs from the id in the path {product_id!r}", field=prefix + "id"
        )
    pid = product_id if product_id is not None else given
    if pid is None or isinstance(pid, (bool, dict, list)) or str(pid).strip() == "":
        raise ValidationError("a product needs an id", field=prefix + "id")
    pid = str(pid).strip()
    if len(pid) > MAX_ID:
        raise ValidationError(f"id is longer than {MAX_ID} characters", field=prefix + "id")
    out: dict[str, Any] = {"id": pid}
    if data.get("image_url") is None and data.get("image") is not None:
        data = {**data, "image_url": data["image"]}
    for name in _TEXT:
        value = data.get(name)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise ValidationError(f"{name} must be text", field=prefix + name)
        out[name] = value
    price = data.get("price")
    if price is not None and price != "":
        try:
            number = float(price) if not isinstance(price, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number) or number < 0:
            raise ValidationError("price must be a number >= 0", field=prefix + "price")
        out["price"] = number
    stock = data.get("in_stock", True)
    if isinstance(stock, str):
        word = stock.strip().lower()
        if word in _TRUE or word == "":
            stock = True
        elif word in _FALSE:
            stock = False
    if not isinstance(stock, bool):
        raise ValidationError("in_stock must be true or false", field=prefix + "in_stock")
    out["in_stock"] = stock
    return out


def event_facts(props: Any) -> dict:
    """What a product event's properties say about the product, well-typed or left out.

    Events are not checked as catalog entries are (a list for a category, a price
    in words): what is kept here is shown and ranked as if it came from the catalog.
    """
    if not isinstance(props, dict):
        return {}
    out: dict[str, Any] = {}
    for name in ("name", "url", "image_url", "category", "brand"):
        value = props.get(name)
        if value.__class__ in (int, float) and name == "category" and math.isfinite(value):
            value = str(value)  # as the API takes a page's category
        if isinstance(value, str) and value:
            out[name] = value
    price = props.get("price")
    if price.__class__ is str:
        try:
            price = float(price)
        except ValueError:
            price = None
    if price.__class__ in (int, float) and math.isfinite(price) and price >= 0:
        out["price"] = price
    return out


def read_products(text: str, *, fmt: str) -> Iterator[tuple[int, dict | ValidationError]]:
    """(line number, product or the error on that line) for each record of a CSV or JSONL text."""
    if fmt == "jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield n, normalize_product(orjson.loads(line))
            except orjson.JSONDecodeError as exc:
                yield n, ValidationError(f"malformed JSON: {exc}", field="line")
            except ValidationError as exc:
                yield n, exc
        return
    if fmt != "csv":
        raise ValueError(f"unknown catalog format {fmt!r} (csv or jsonl)")
    reader = csv.DictReader(io.StringIO(text))
    for n, row in enumerate(reader, start=2):
        try:
            yield n, normalize_product({k: v for k, v in row.items() if k and v != ""})
        except ValidationError as exc:
            yield n, exc
