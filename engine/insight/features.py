"""Model features of one customer as of a moment, from the live profile (pure).

The same function serves training and live scoring, so a model sees in
production exactly what it was trained on. `at` may be in the past (training
from live profiles: features as of 90 days ago, labels from what followed):
orders after `at` are taken back out using the profile's order log, and a
feature that cannot be known as of `at` is NaN, which the gradient-boosted
models handle natively.
"""

from __future__ import annotations

import math
from typing import Any

DAY = 86400.0
NAN = math.nan

# The schema: a model records it, and the shards refuse a model whose schema differs.
SCHEMA_VERSION = 1
FEATURES = (
    "recency_days",  # days since the last order
    "frequency",  # orders
    "monetary",  # revenue
    "avg_order_value",
    "tenure_days",  # days since first seen
    "orders_90d",
    "revenue_90d",
    "distinct_products",  # product affinity: breadth...
    "top_product_share",  # ...and concentration on one product
    "email_opened",  # engagement
    "email_clicked",
    "views_30d",
    "adds_30d",
)
# What can move a feature: events after which a customer is scored again.
FEATURE_EVENTS = frozenset(
    {"Order Completed", "Email Opened", "Email Link Clicked", "Product Added"}
)


def schema() -> dict:
    """The feature schema a model file must carry."""
    return {"version": SCHEMA_VERSION, "features": list(FEATURES)}


def orders_as_of(profile: Any, at: float) -> tuple[int, float, float | None]:
    """(orders, revenue, last order time) counting only orders up to `at`."""
    orders, revenue, last = profile.orders, profile.revenue, profile.last_order_at
    log = profile.order_log or ()
    later = [entry for entry in log if entry[0] > at]
    if not later and (last is None or last <= at):
        return orders, revenue, last
    orders -= len(later)
    revenue -= sum(entry[1] for entry in later)
    earlier = [entry[0] for entry in log if entry[0] <= at]
    if earlier:
        last = max(earlier)
    elif orders > 0:
        last = None  # older than the log reaches: unknown
    else:
        last = None
    return max(orders, 0), revenue, last


def features(profile: Any, at: float) -> list[float]:
    """The FEATURES of `profile` as of `at`, in schema order."""
    orders, revenue, last = orders_as_of(profile, at)
    log = profile.order_log or ()
    recency = (at - last) / DAY if last is not None else NAN
    recent_orders = [e for e in log if at - 90 * DAY < e[0] <= at]
    bought = [item for ts, item in profile.purchased if ts <= at]
    if bought:
        tally: dict[str, int] = {}
        for item in bought:
            tally[item] = tally.get(item, 0) + 1
        distinct, top_share = float(len(tally)), max(tally.values()) / len(bought)
    else:
        distinct, top_share = 0.0, NAN
    email = profile.email
    opened = NAN if (email.get("last_opened") or 0) > at else float(email.get("opened", 0))
    clicked = NAN if (email.get("last_clicked") or 0) > at else float(email.get("clicked", 0))
    views = adds = 0.0
    horizon = at - 30 * DAY
    for entry in profile.recent:
        if horizon < entry[0] <= at:
            if entry[1] == "Product Viewed":
                views += 1
            elif entry[1] == "Product Added":
                adds += 1
    first = profile.first_seen
    return [
        recency,
        float(orders),
        float(revenue),
        revenue / orders if orders else NAN,
        (at - first) / DAY if first is not None and first <= at else NAN,
        float(len(recent_orders)),
        float(sum(e[1] for e in recent_orders)),
        distinct,
        top_share,
        opened,
        clicked,
        views,
        adds,
    ]


def spend_between(profile: Any, start: float, end: float) -> tuple[int, float]:
    """(orders, revenue) in (start, end], from the order log."""
    entries = [e for e in (profile.order_log or ()) if start < e[0] <= end]
    return len(entries), sum(e[1] for e in entries)
