"""A synthetic shopper population and a replay of real retail transactions (pure, no I/O).

Used by `nudge bench` (benchmarks.bench) and the locustfile. A `Session` is what
one visit sends, in order; the caller stamps ids and times when it sends it.

- Shoppers: a power-law population (a few shoppers visit often); each visit is a
  browsing funnel: page views, product views of power-law popular products, maybe
  cart adds, maybe a purchase of the cart. First visits identify the shopper.
- Email engagement: for each delivered email, opens, clicks and attributed
  purchases with fixed probabilities, carrying the send's id, rule and variant.
- Daily seasonality: a visit-rate curve over the hour of day (quiet at night,
  peaks at lunch and in the evening) that paced runs follow.
- Replay: the real invoices in benchmarks/data/online_retail_sample.csv.gz, each as a
  cart filled line by line then ordered, in invoice-date order.
"""

from __future__ import annotations

import bisect
import csv
import gzip
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The UCI Online Retail sample, bundled (benchmarks/data/README.md: source and licence).
RETAIL_CSV = Path(__file__).resolve().parent / "data" / "online_retail_sample.csv.gz"
_CATEGORIES = (
    "Shoes", "Dresses", "Shirts", "Jeans", "Jackets", "Bags", "Watches", "Jewelry",
    "Beauty", "Home", "Kitchen", "Toys", "Books", "Sports", "Outdoor", "Electronics",
)  # fmt: skip
_NAMES = ("Ann", "Bob", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kai", "Lu")
_TIMEZONES = ("Europe/London", "Europe/Paris", "America/New_York", "Asia/Tokyo", "UTC")

# Relative visit rate by hour of day (UTC), from typical e-commerce traffic curves.
HOURLY = (
    0.30, 0.20, 0.15, 0.12, 0.12, 0.18, 0.30, 0.50, 0.70, 0.80, 0.85, 0.90,
    0.95, 0.90, 0.85, 0.85, 0.90, 0.95, 1.00, 1.00, 0.95, 0.80, 0.60, 0.40,
)  # fmt: skip


def seasonality(hour: float) -> float:
    """Relative visit rate (0-1] at fractional `hour` of day, interpolated between hours."""
    h = hour % 24.0
    low = int(h)
    frac = h - low
    return HOURLY[low] * (1 - frac) + HOURLY[(low + 1) % 24] * frac


def _zipf_cumulative(n: int, exponent: float) -> list[float]:
    total, out = 0.0, []
    for rank in range(1, n + 1):
        total += rank**-exponent
        out.append(total)
    return out


@dataclass
class Session:
    """One visit's messages (Segment format, without messageId and timestamp yet)."""

    customer: str
    kind: str  # browse, cart, purchase, engagement, retail
    messages: list[dict[str, Any]]


@dataclass
class Odds:
    """The model's probabilities (defaults: typical e-commerce funnels)."""

    add_to_cart: float = 0.25  # a visit adds at least one product
    purchase: float = 0.30  # a visit with a cart buys it
    open: float = 0.35  # an email is opened
    click: float = 0.30  # an opened email is clicked
    convert: float = 0.25  # a click ends in a purchase
    views_mean: float = 3.0  # product views per visit (geometric)


@dataclass
class ShopperModel:
    """Shoppers, products and their behaviour; deterministic for a given seed."""

    seed: int = 7
    shoppers: int = 20_000
    products: int = 2_000
    odds: Odds = field(default_factory=Odds)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        rng = self.rng
        self._products = [
            (f"p-{i:05d}", round(rng.lognormvariate(3.3, 0.8), 2), rng.choice(_CATEGORIES))
            for i in range(self.products)
        ]
        self._product_cum = _zipf_cumulative(self.products, 1.05)
        self._shopper_cum = _zipf_cumulative(self.shoppers, 0.8)
        self._seen: set[int] = set()

    def product(self) -> tuple[str, float, str]:
        """A product, popular ones far more often (power law)."""
        cum = self._product_cum
        return self._products[bisect.bisect(cum, self.rng.random() * cum[-1])]

    def shopper(self) -> int:
        """A shopper number, frequent visitors more often (power law)."""
        cum = self._shopper_cum
        return bisect.bisect(cum, self.rng.random() * cum[-1])

    def session(self) -> Session:
        """One visit of a shopper: a browsing funnel that may end in a purchase."""
        rng, odds = self.rng, self.odds
        n = self.shopper()
        customer = f"shopper-{n:06d}"
        msgs: list[dict[str, Any]] = []
        if n not in self._seen:
            self._seen.add(n)
            msgs.append(
                {
                    "type": "identify",
                    "userId": customer,
                    "traits": {
                        "first_name": _NAMES[n % len(_NAMES)],
                        "email": f"{customer}@example.com",
                    },
                    "context": {"timezone": _TIMEZONES[n % len(_TIMEZONES)]},
                }
            )
        msgs.append({"type": "page", "userId": customer, "name": "Home"})
        views = 1 + int(rng.expovariate(1.0 / max(odds.views_mean - 1, 0.1)))
        cart: list[tuple[str, float, str]] = []
        adding = rng.random() < odds.add_to_cart
        for _ in range(views):
            product = self.product()
            msgs.append(_track(customer, "Product Viewed", product))
            if adding and (not cart or rng.random() < 0.3):
                cart.append(product)
                msgs.append(_track(customer, "Product Added", product))
        kind = "cart" if cart else "browse"
        if cart and rng.random() < odds.purchase:
            msgs.append(_order(customer, cart, rng))
            kind = "purchase"
        return Session(customer, kind, msgs)

    def engagement(self, send: dict[str, Any]) -> list[Session]:
        """What the recipient of a delivered email does: open, click, maybe buy."""
        rng, odds = self.rng, self.odds
        if not send.get("deliver", True) or rng.random() >= odds.open:
            return []
        customer = send["customer"]
        props = {"send_id": send["send_id"], "rule": send["rule"], "variant": send.get("variant")}
        msgs = [{"type": "track", "userId": customer, "event": "Email Opened", "properties": props}]
        if rng.random() < odds.click:
            msgs.append(
                {
                    "type": "track",
                    "userId": customer,
                    "event": "Email Link Clicked",
                    "properties": {**props, "url": "https://shop.example/cart"},
                }
            )
            if rng.random() < odds.convert:
                msgs.append(_order(customer, [self.product()], rng))
        return [Session(customer, "engagement", msgs)]


def _track(customer: str, name: str, product: tuple[str, float, str]) -> dict[str, Any]:
    pid, price, category = product
    return {
        "type": "track",
        "userId": customer,
        "event": name,
        "properties": {"product_id": pid, "price": price, "category": category, "name": pid},
    }


def _order(customer: str, cart: list[tuple[str, float, str]], rng: random.Random) -> dict:
    products = [{"product_id": p, "price": price, "quantity": 1} for p, price, _ in cart]
    return {
        "type": "track",
        "userId": customer,
        "event": "Order Completed",
        "properties": {
            "order_id": f"o-{rng.getrandbits(48):012x}",
            "revenue": round(sum(p["price"] for p in products), 2),
            "products": products,
        },
    }


def retail_sessions(path: Path = RETAIL_CSV) -> list[Session]:
    """Every invoice of the retail sample as one visit: its lines added, then ordered."""
    invoices: dict[str, list[dict[str, str]]] = {}
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", newline="", encoding="utf-8", errors="replace") as f:
        for row in csv.DictReader(f):
            invoices.setdefault(row["InvoiceNo"], []).append(row)
    ordered = sorted(invoices.items(), key=lambda kv: (kv[1][0]["InvoiceDate"], kv[0]))
    out = []
    for invoice, rows in ordered:
        if invoice.startswith("C"):
            continue  # cancellations
        cid = rows[0]["CustomerID"].split(".")[0]
        ident = {"userId": f"retail-{cid}"} if cid else {"anonymousId": f"retail-anon-{invoice}"}
        customer = next(iter(ident.values()))
        msgs: list[dict[str, Any]] = []
        products = []
        for row in rows:
            try:
                quantity = max(int(row["Quantity"]), 1)
                price = float(row["UnitPrice"])
            except ValueError:
                continue
            props = {
                "product_id": row["StockCode"],
                "name": row["Description"].strip()[:80],
                "price": price,
                "quantity": quantity,
            }
            msgs.append({"type": "track", **ident, "event": "Product Added", "properties": props})
            products.append(props)
        if not products:
            continue
        revenue = round(sum(p["price"] * p["quantity"] for p in products), 2)
        order = {"order_id": invoice, "revenue": revenue, "products": products}
        msgs.append({"type": "track", **ident, "event": "Order Completed", "properties": order})
        out.append(Session(customer, "retail", msgs))
    return out


def cycle_retail(sessions: list[Session], laps_prefix: str = "lap") -> Iterator[Session]:
    """The replay over and over; each lap renames customers so a lap is new shoppers."""
    lap = 0
    while True:
        for s in sessions:
            if lap == 0:
                yield s
                continue
            rename = f"{laps_prefix}{lap}-"
            msgs = []
            for m in s.messages:
                m = dict(m)
                for key in ("userId", "anonymousId"):
                    if m.get(key):
                        m[key] = rename + m[key]
                msgs.append(m)
            yield Session(rename + s.customer, s.kind, msgs)
        lap += 1


def poisson_gap(rng: random.Random, rate: float) -> float:
    """Seconds to the next arrival of a Poisson process of `rate` per second."""
    return -math.log(1.0 - rng.random()) / rate if rate > 0 else math.inf
