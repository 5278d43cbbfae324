"""A customer's live profile and how one event changes it (pure, no I/O).

Event and property names follow Segment's e-commerce spec: Product Viewed,
Product Added, Product Removed, Order Completed, and Email Opened / Email Link
Clicked / Unsubscribed for engagement and consent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from sys import intern as _intern
from typing import Any

FORMAT_VERSION = 1

_CART_FIELDS = (
    "product_id",
    "sku",
    "name",
    "brand",
    "category",
    "variant",
    "price",
    "url",
    "image_url",
)
_SHARED_PROPS = ("product_id", "sku", "category")
_OPT_OUT_TRAITS = ("unsubscribed", "email_opt_out", "opted_out")
_CONSENT_TRAITS = frozenset((*_OPT_OUT_TRAITS, "email_opt_in"))
_TRUE_WORDS = frozenset(("true", "yes", "y", "1", "on"))
_FALSE_WORDS = frozenset(("false", "no", "n", "0", "off", ""))
# Amounts past this are treated as garbage: they could only reach inf (which
# checkpoints as null) or integers orjson cannot encode, wedging the shard.
_MAX_NUMBER = 1e15
_MAX_QUANTITY = 1_000_000


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds that keep a profile's memory fixed however busy the customer is."""

    recent_max: int = 50
    recent_window_s: float = 30 * 86400.0
    dedupe_window_s: float = 86400.0
    dedupe_max_ids: int = 100
    purchased_max: int = 50
    order_log_max: int = 24


def product_key(props: dict) -> str | None:
    """The product an event is about: product_id, else sku, as a string."""
    key = props.get("product_id")
    if key is None:
        key = props.get("sku")
    return None if key is None else str(key)


def _number(value: Any, default: float = 0.0) -> float:
    """A finite number from a JSON value ("12.5" too), else `default`."""
    if isinstance(value, bool):
        return default
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return default
    else:
        return default
    # "nan", "inf" and "1e999" parse; none of them is an amount or a quantity.
    return number if math.isfinite(number) and abs(number) <= _MAX_NUMBER else default


def _quantity(value: Any, default: int) -> int:
    return min(max(int(_number(value, default)), 1), _MAX_QUANTITY)


def _flag(value: Any) -> bool | None:
    """A yes/no trait as CRMs send it (true, "false", 0, "yes"); None when unclear."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value != 0
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    return None


# Fields added without a format change: checkpoints written before them load as None.
_ADDED_LATER = frozenset({"merges", "order_log", "rfm", "scores"})


class Profile:
    """Everything Nudge knows about one customer, in plain data."""

    __slots__ = (
        "anonymous",
        "cart",
        "cart_id",
        "cart_updated",
        "consent",
        "counts",
        "email",
        "first_seen",
        "groups",
        "id",
        "journey",
        "last_order_at",
        "last_order_id",
        "last_seen",
        "merged_ids",
        "merges",
        "merging",
        "order_log",
        "orders",
        "purchased",
        "recent",
        "revenue",
        "rfm",
        "scores",
        "seen",
        "timezone",
        "traits",
    )

    def __init__(self, customer_id: str, *, anonymous: bool = False):
        self.id = customer_id
        self.anonymous = anonymous
        self.traits: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self.first_seen: float | None = None
        self.last_seen: float | None = None
        # [ts, event name, product id or None, category or None], oldest first
        self.recent: list[list] = []
        self.cart: dict[str, dict] = {}
        self.cart_id: str | None = None
        self.cart_updated: float | None = None
        self.orders = 0
        self.revenue = 0.0
        self.last_order_at: float | None = None
        self.last_order_id: str | None = None
        self.purchased: list[list] = []  # [ts, product id], oldest first
        self.order_log: list[list] | None = None  # [ts, amount] of the last orders, oldest first
        # RFM scores and segment (engine.insight.rfm) and model scores by model name
        self.rfm: dict[str, Any] | None = None
        self.scores: dict[str, dict] | None = None
        self.email: dict[str, Any] = {
            "opened": 0,
            "clicked": 0,
            "last_opened": None,
            "last_clicked": None,
        }
        self.consent: dict[str, Any] = {"unsubscribed": False, "unsubscribed_at": None}
        self.timezone: str | None = None
        self.groups: dict[str, dict] = {}
        self.merged_ids: list[str] = []
        # Ids of the merges folded in (Partition._start_merge), so a merge delivered
        # twice counts once; None until the first.
        self.merges: list[str] | None = None
        self.merging: list[str] = []
        self.seen: dict[str, float] = {}  # messageId -> receivedAt, oldest first
        # Trigger-rule state (instances, timers, cap history); owned by engine.rules.
        self.journey: dict[str, Any] = {}

    # -- snapshot -----------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain-data form, used for checkpoints and the profile API."""
        data = {name: getattr(self, name) for name in self.__slots__}
        data["v"] = FORMAT_VERSION
        if "ix" in self.journey:
            # The rules' count index is a cache of `recent`, rebuilt on demand: often
            # the larger part of a hot profile, and not state, so never encoded.
            data["journey"] = {k: v for k, v in self.journey.items() if k != "ix"}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Profile:
        """Rebuild a profile from `to_dict` output."""
        version = data.get("v")
        if version != FORMAT_VERSION:
            raise ValueError(f"profile format version {version!r} is not {FORMAT_VERSION}")
        profile = cls.__new__(cls)
        for name in cls.__slots__:
            if name in _ADDED_LATER:
                setattr(profile, name, data.get(name))
            else:
                setattr(profile, name, data[name])
        return profile

    def public(self) -> dict:
        """The profile as the API shows it (without dedupe bookkeeping)."""
        data = self.to_dict()
        del data["seen"], data["merges"], data["merging"], data["v"]
        data["cart_total"] = round(
            sum(_number(i.get("price")) * i.get("quantity", 1) for i in self.cart.values()), 2
        )
        return data

    @property
    def suppressed(self) -> bool:
        """True when the customer must get no email (unsubscribed or opted out)."""
        return bool(self.consent.get("unsubscribed"))

    # -- dedupe -------------------------------------------------------------
    def is_duplicate(self, message_id: str, received_at: float, limits: Limits) -> bool:
        """Remember `message_id`; True if it was already seen inside the window."""
        seen = self.seen
        previous = seen.get(message_id)
        if previous is not None and received_at - previous <= limits.dedupe_window_s:
            return True
        if previous is not None:
            del seen[message_id]
        seen[message_id] = received_at
        # Insertion order is arrival order: trim from the front, oldest first.
        excess = len(seen) - limits.dedupe_max_ids
        if excess > 0:
            while excess > 0:
                del seen[next(iter(seen))]
                excess -= 1
            # Expired ids go only when the memory is full: a replayed or re-forwarded
            # copy keeps its original receivedAt, so forgetting by time alone would
            # let it through after a day of newer events (README: only the cap does).
            horizon = received_at - limits.dedupe_window_s
            while seen:
                oldest = next(iter(seen))
                if seen[oldest] >= horizon:
                    break
                del seen[oldest]
        return False


def share_strings(event: dict) -> None:
    """Swap the event's name, product and category for the one shared copy of each string.

    Profiles keep these in `recent`, carts, rule state and co-occurrence keys. Decoded
    afresh per event, every entry would hold its own copies scattered over the heap, and
    walking or encoding a profile would miss the cache at each one; shared copies stay hot,
    and equal ones compare by identity.
    """
    name = event.get("event")
    if name.__class__ is str:
        event["event"] = _intern(name)
    props = event.get("properties")
    if props:
        value = props.get("product_id")
        if value.__class__ is str:
            props["product_id"] = _intern(value)
        value = props.get("category")
        if value.__class__ is str:
            props["category"] = _intern(value)
        if "sku" in props or "products" in props:
            _share_rest(props)


def _share_rest(props: dict) -> None:
    value = props.get("sku")
    if value.__class__ is str:
        props["sku"] = _intern(value)
    lines = props.get("products")
    if lines.__class__ is list:  # an order's lines
        for line in lines:
            if line.__class__ is dict:
                for field in _SHARED_PROPS:
                    value = line.get(field)
                    if value.__class__ is str:
                        line[field] = _intern(value)


def apply_event(profile: Profile, event: dict, limits: Limits) -> None:
    """Fold one normalized event into `profile` (the caller has deduped it)."""
    ts = event["ts"]
    if profile.first_seen is None or ts < profile.first_seen:
        profile.first_seen = ts
    if profile.last_seen is None or ts > profile.last_seen:
        profile.last_seen = ts
    context = event.get("context")
    if context:
        tz = context.get("timezone")
        if isinstance(tz, str) and tz:
            profile.timezone = tz
        traits = context.get("traits")
        if isinstance(traits, dict) and traits:
            # SDKs copy cached identify traits into every call's context: they may
            # tighten consent but never undo a newer unsubscribe.
            _apply_traits(profile, traits, ts, may_resubscribe=False)

    kind = event["type"]
    if kind == "identify":
        _apply_traits(profile, event.get("traits") or {}, ts)
        return
    if kind == "group":
        profile.groups[event["groupId"]] = event.get("traits") or {}
        return
    if kind == "alias":
        return

    name = event["event"]
    counts = profile.counts
    counts[name] = counts.get(name, 0) + 1
    props = event.get("properties") or {}
    product = product_key(props)
    category = props.get("category")
    _remember(profile, [ts, name, product, category if isinstance(category, str) else None], limits)

    handler = _HANDLERS.get(name)
    if handler is not None:
        handler(profile, props, ts, event, limits)


def _remember(profile: Profile, entry: list, limits: Limits) -> None:
    recent = profile.recent
    if not recent or recent[-1][0] <= entry[0]:
        recent.append(entry)
    else:  # late event: keep time order so windows stay easy to read
        at = len(recent)
        while at and recent[at - 1][0] > entry[0]:
            at -= 1
        recent.insert(at, entry)
    horizon = recent[-1][0] - limits.recent_window_s
    drop = max(len(recent) - limits.recent_max, 0)
    while drop < len(recent) and recent[drop][0] < horizon:
        drop += 1
    if drop:
        del recent[:drop]


def _opts_out(traits: dict) -> bool | None:
    """True when `traits` withdraw email consent, False when they give it, None: silent."""
    if _CONSENT_TRAITS.isdisjoint(traits):
        return None  # nearly always: a cheap answer for every event's context traits
    # Each consent trait votes; unclear values (null, "maybe") abstain, and
    # the stricter answer wins when traits disagree.
    votes = [_flag(traits[name]) for name in _OPT_OUT_TRAITS if name in traits]
    if "email_opt_in" in traits and (opt_in := _flag(traits["email_opt_in"])) is not None:
        votes.append(not opt_in)
    if True in votes:
        return True
    if False in votes:
        return False
    return None


def _apply_traits(
    profile: Profile, traits: dict, ts: float, *, may_resubscribe: bool = True
) -> None:
    profile.traits.update(traits)
    opts_out = _opts_out(traits)
    if opts_out:
        _set_unsubscribed(profile, True, ts)
    elif opts_out is False and may_resubscribe:
        _set_unsubscribed(profile, False, ts)


UNSUBSCRIBES, RESUBSCRIBES, ERASES = "unsubscribed", "resubscribed", "erased"


def consent_change(event: dict) -> str | None:
    """What applying a normalized event does to email consent (UNSUBSCRIBES, ...) or None.

    The same decisions `apply_event` and the erasure make, taken from the event
    alone, so the API can note them in Redis when it stores the event
    (engine.store), before any shard has applied it.
    """
    kind = event.get("type")
    if kind == "_erase":
        return ERASES
    if kind == "track" and event.get("event") == "Unsubscribed":
        return UNSUBSCRIBES
    if kind == "identify":
        traits = event.get("traits")
        if isinstance(traits, dict) and traits:
            # Applied after the context's traits, at the same time: these decide.
            opts_out = _opts_out(traits)
            if opts_out is not None:
                return UNSUBSCRIBES if opts_out else RESUBSCRIBES
    context = event.get("context")
    if context:
        traits = context.get("traits")
        if isinstance(traits, dict) and traits and _opts_out(traits):
            return UNSUBSCRIBES  # context traits tighten consent only (apply_event)
    return None


def _set_unsubscribed(profile: Profile, value: bool, ts: float) -> None:
    consent = profile.consent
    if not value and consent.get("unsubscribed"):
        since = consent.get("unsubscribed_at")
        if since is not None and ts < since:
            return  # a late, older opt-in does not undo a newer unsubscribe
    consent["unsubscribed"] = value
    consent["unsubscribed_at"] = ts if value else None


def _cart_item(props: dict, product: str) -> dict:
    item = {name: props[name] for name in _CART_FIELDS if props.get(name) is not None}
    item["product_id"] = product
    return item


def _product_added(profile: Profile, props: dict, ts: float, event: dict, limits: Limits) -> None:
    product = product_key(props)
    if product is None:
        return
    quantity = _quantity(props.get("quantity"), 1)
    item = profile.cart.get(product)
    if item is None:
        item = _cart_item(props, product)
        item["quantity"] = quantity
        item["added_at"] = ts
        profile.cart[product] = item
    else:
        item["quantity"] = min(item.get("quantity", 1) + quantity, _MAX_QUANTITY)
    if props.get("cart_id") is not None:
        profile.cart_id = str(props["cart_id"])
    _cart_changed(profile, ts)


def _cart_changed(profile: Profile, ts: float) -> None:
    # Every change moves it forward, even two in one second or a late event: content
    # caches key a cart's blocks on it (a source's `vary`), so a change must never
    # leave it where it was, or take it back to a value an older cart had.
    last = profile.cart_updated
    profile.cart_updated = ts if last is None or ts > last else last + 1e-6


def _product_removed(profile: Profile, props: dict, ts: float, event: dict, limits: Limits) -> None:
    product = product_key(props)
    item = profile.cart.get(product) if product is not None else None
    if item is None:
        return
    remaining = item.get("quantity", 1) - _quantity(props.get("quantity"), item.get("quantity", 1))
    if remaining > 0:
        item["quantity"] = remaining
    else:
        del profile.cart[product]
    _cart_changed(profile, ts)


def _order_completed(profile: Profile, props: dict, ts: float, event: dict, limits: Limits) -> None:
    products = props.get("products") if isinstance(props.get("products"), list) else []
    revenue = props.get("revenue")
    if revenue is None:
        revenue = props.get("total")
    if revenue is None:
        revenue = sum(
            _number(p.get("price")) * _number(p.get("quantity"), 1.0)
            for p in products
            if isinstance(p, dict)
        )
    profile.orders += 1
    amount = round(_number(revenue), 2)
    profile.revenue = round(profile.revenue + amount, 2)
    log = profile.order_log
    if log is None:
        log = profile.order_log = []
    log.append([ts, amount])
    if len(log) > 1 and log[-2][0] > ts:  # a late order: keep oldest first
        log.sort(key=lambda entry: entry[0])
    if len(log) > limits.order_log_max:
        del log[: len(log) - limits.order_log_max]
    if profile.last_order_at is None or ts >= profile.last_order_at:
        profile.last_order_at = ts
        if props.get("order_id") is not None:
            profile.last_order_id = str(props["order_id"])
    purchased = profile.purchased
    late = bool(purchased) and purchased[-1][0] > ts
    for line in products:
        if isinstance(line, dict) and (key := product_key(line)) is not None:
            purchased.append([ts, key])
    if late:  # keep oldest first, so trimming drops the oldest
        purchased.sort(key=lambda entry: entry[0])
    if len(purchased) > limits.purchased_max:
        del purchased[: len(purchased) - limits.purchased_max]
    profile.cart.clear()
    profile.cart_id = None
    _cart_changed(profile, ts)


def _email_opened(profile: Profile, props: dict, ts: float, event: dict, limits: Limits) -> None:
    profile.email["opened"] += 1
    profile.email["last_opened"] = ts


def _email_clicked(profile: Profile, props: dict, ts: float, event: dict, limits: Limits) -> None:
    profile.email["clicked"] += 1
    profile.email["last_clicked"] = ts


def _unsubscribed(profile: Profile, props: dict, ts: float, event: dict, limits: Limits) -> None:
    _set_unsubscribed(profile, True, ts)


_HANDLERS = {
    "Product Added": _product_added,
    "Product Removed": _product_removed,
    "Order Completed": _order_completed,
    "Email Opened": _email_opened,
    "Email Link Clicked": _email_clicked,
    "Unsubscribed": _unsubscribed,
}


def merge_profiles(into: Profile, other: Profile, limits: Limits) -> None:
    """Fold `other` (an anonymous or older identity) into `into`, which wins ties."""
    into.traits = {**other.traits, **into.traits}
    for name, n in other.counts.items():
        into.counts[name] = into.counts.get(name, 0) + n
    if other.first_seen is not None and (
        into.first_seen is None or other.first_seen < into.first_seen
    ):
        into.first_seen = other.first_seen
    if other.last_seen is not None and (into.last_seen is None or other.last_seen > into.last_seen):
        into.last_seen = other.last_seen
    recent = sorted(into.recent + other.recent, key=lambda entry: entry[0])
    into.recent = []
    for entry in recent:
        _remember(into, entry, limits)
    for product, item in other.cart.items():
        into.cart.setdefault(product, item)
    if other.cart and (into.cart_updated is None or (other.cart_updated or 0) > into.cart_updated):
        into.cart_updated = other.cart_updated
        into.cart_id = into.cart_id or other.cart_id
    into.orders += other.orders
    into.revenue = round(into.revenue + other.revenue, 2)
    if other.last_order_at is not None and (
        into.last_order_at is None or other.last_order_at > into.last_order_at
    ):
        into.last_order_at = other.last_order_at
        into.last_order_id = other.last_order_id
    into.purchased = sorted(into.purchased + other.purchased, key=lambda e: e[0])[
        -limits.purchased_max :
    ]
    if other.order_log:
        log = sorted((into.order_log or []) + other.order_log, key=lambda e: e[0])
        into.order_log = log[-limits.order_log_max :]
    # `rfm` keeps the values counted for `into`: the shard's insight replaces them after the merge
    for name in ("opened", "clicked"):
        into.email[name] += other.email.get(name, 0)
    for name in ("last_opened", "last_clicked"):
        if (other.email.get(name) or 0) > (into.email.get(name) or 0):
            into.email[name] = other.email[name]
    if other.consent.get("unsubscribed") and not into.consent.get("unsubscribed"):
        into.consent = dict(other.consent)  # the stricter consent wins
    into.timezone = into.timezone or other.timezone
    for group, traits in other.groups.items():
        into.groups.setdefault(group, traits)
    if other.seen:  # oldest first, as is_duplicate expects, and only the newest kept
        seen = sorted({**other.seen, **into.seen}.items(), key=lambda item: item[1])
        into.seen = dict(seen[max(len(seen) - limits.dedupe_max_ids, 0) :])
    for merged in other.merged_ids:
        if merged not in into.merged_ids:
            into.merged_ids.append(merged)
    if other.merges:
        known = into.merges or []
        into.merges = known + [m for m in other.merges if m not in known]
