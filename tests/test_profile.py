"""A customer's profile and how events change it (engine.profile): pure, no I/O."""

from __future__ import annotations

import itertools

import orjson
import pytest

from engine.events import normalize
from engine.profile import (
    ERASES,
    FORMAT_VERSION,
    RESUBSCRIBES,
    UNSUBSCRIBES,
    Limits,
    Profile,
    apply_event,
    consent_change,
    merge_profiles,
    product_key,
    share_strings,
)

DAY = 86400.0
T0 = 1_700_000_000.0
LIMITS = Limits(
    recent_max=5,
    recent_window_s=7 * DAY,
    dedupe_window_s=100.0,
    dedupe_max_ids=3,
    purchased_max=4,
)
_ids = itertools.count()


def event(msg: dict, at: float, kind: str | None = None) -> dict:
    """`msg` normalized as the API stores it, received at `at` (no timestamp: ts == at)."""
    return normalize({"messageId": f"m{next(_ids)}", **msg}, kind=kind, received_at=at)


def track(name: str, at: float, /, user: str = "ann", **props: object) -> dict:
    return event({"userId": user, "event": name, "properties": props}, at, "track")


def identify(at: float, user: str = "ann", **traits: object) -> dict:
    return event({"userId": user, "traits": traits}, at, "identify")


def build(*events: dict, customer: str = "ann", limits: Limits = LIMITS) -> Profile:
    profile = Profile(customer)
    for ev in events:
        apply_event(profile, ev, limits)
    return profile


def quantities(profile: Profile) -> dict[str, int]:
    return {product: item["quantity"] for product, item in profile.cart.items()}


def round_trip(profile: Profile) -> Profile:
    return Profile.from_dict(orjson.loads(orjson.dumps(profile.to_dict())))


# -- cart --------------------------------------------------------------------------


def test_product_added_puts_the_product_in_the_cart() -> None:
    profile = build(
        track(
            "Product Added",
            T0,
            product_id="p1",
            name="Sock",
            price=5.5,
            brand="Acme",
            cart_id=77,
            coupon="ignored",
        )
    )
    assert profile.cart == {
        "p1": {
            "product_id": "p1",
            "name": "Sock",
            "price": 5.5,
            "brand": "Acme",
            "quantity": 1,
            "added_at": T0,
        }
    }
    assert (profile.cart_id, profile.cart_updated) == ("77", T0)
    assert profile.public()["cart_total"] == 5.5


def test_adding_again_adds_quantities_and_keeps_the_first_add_time() -> None:
    profile = build(
        track("Product Added", T0, product_id="p1", price=2.0),
        track("Product Added", T0 + 10, product_id="p1", price=2.0, quantity=3),
        track("Product Added", T0 + 20, sku=42, price=1.25),
    )
    assert quantities(profile) == {"p1": 4, "42": 1}
    assert profile.cart["p1"]["added_at"] == T0
    assert profile.cart_updated == T0 + 20
    assert profile.public()["cart_total"] == 9.25


def test_every_cart_change_moves_cart_updated_forward() -> None:
    # Content caches key cart blocks on it: two changes in one second, or a late
    # event, left it where it was (or took it back), and the old block was served.
    profile = build(
        track("Product Added", T0, product_id="p1"),
        track("Product Added", T0, product_id="p2"),
    )
    assert profile.cart_updated > T0
    first = profile.cart_updated
    apply_event(profile, track("Product Removed", T0 - 60, product_id="p1"), Limits())
    assert profile.cart_updated > first and list(profile.cart) == ["p2"]


@pytest.mark.parametrize(
    ("removed", "left"),
    [
        ({"quantity": 1}, {"p1": 2, "p2": 1}),  # partial
        ({"quantity": "2"}, {"p1": 1, "p2": 1}),  # quantities may come as strings
        ({}, {"p2": 1}),  # no quantity: the whole line goes
        ({"quantity": 3}, {"p2": 1}),
        ({"quantity": 10}, {"p2": 1}),  # more than there is
        ({"quantity": 0}, {"p1": 2, "p2": 1}),  # at least one goes
    ],
)
def test_product_removed(removed: dict, left: dict) -> None:
    profile = build(
        track("Product Added", T0, product_id="p1", quantity=3),
        track("Product Added", T0 + 1, product_id="p2"),
        track("Product Removed", T0 + 2, product_id="p1", **removed),
    )
    assert quantities(profile) == left
    assert profile.cart_updated == T0 + 2


def test_removing_a_product_not_in_the_cart_changes_nothing() -> None:
    profile = build(
        track("Product Added", T0, product_id="p1"),
        track("Product Removed", T0 + 5, product_id="other"),
        track("Product Removed", T0 + 6),
    )
    assert quantities(profile) == {"p1": 1} and profile.cart_updated == T0


@pytest.mark.parametrize(
    ("props", "key"),
    [
        ({"product_id": "p1", "sku": "s1"}, "p1"),
        ({"sku": "s1"}, "s1"),
        ({"product_id": None, "sku": "s1"}, "s1"),  # SDKs send explicit nulls
        ({"product_id": 12}, "12"),
        ({"name": "Sock"}, None),
    ],
)
def test_product_key(props: dict, key: str | None) -> None:
    assert product_key(props) == key


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [
        ("3", 3),
        (2.9, 2),
        (-4, 1),
        (0, 1),
        (True, 1),
        ("many", 1),
        # Values that parse as floats but are no quantity: they used to raise
        # OverflowError / ValueError, or make an int orjson cannot checkpoint.
        ("inf", 1),
        ("-Infinity", 1),
        ("nan", 1),
        ("1e999", 1),
        (1e300, 1),
        (10**30, 1),
    ],
)
def test_strange_quantities_never_break_the_profile(quantity: object, expected: int) -> None:
    profile = build(track("Product Added", T0, product_id="p1", quantity=quantity))
    assert quantities(profile) == {"p1": expected}
    assert round_trip(profile).cart == profile.cart


def test_cart_quantity_is_capped_so_checkpoints_stay_encodable() -> None:
    profile = build(
        *[
            track("Product Added", T0 + n, product_id="p1", quantity=999_999_999_999)
            for n in range(20)
        ]
    )
    assert 1 <= profile.cart["p1"]["quantity"] <= 1_000_000
    orjson.dumps(profile.to_dict())


# -- orders ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("props", "revenue"),
    [
        ({"revenue": 42.5}, 42.5),
        ({"revenue": "19.99"}, 19.99),
        ({"total": 12}, 12.0),
        ({"revenue": 30, "total": 35}, 30.0),  # revenue first, as Segment's spec
        ({"revenue": None, "total": 35}, 35.0),
        ({"products": [{"price": 2, "quantity": 3}, {"price": "1.5"}]}, 7.5),
        ({"products": [{"price": 2}, "junk", {"quantity": 4}]}, 2.0),
        ({"revenue": 0, "products": [{"price": 9}]}, 0.0),
        ({}, 0.0),
        ({"revenue": "free"}, 0.0),
        ({"revenue": "inf"}, 0.0),
        ({"revenue": "nan"}, 0.0),
    ],
)
def test_order_revenue(props: dict, revenue: float) -> None:
    profile = build(
        track("Order Completed", T0, **props), track("Order Completed", T0 + 1, revenue=1)
    )
    assert profile.orders == 2
    assert profile.revenue == round(revenue + 1, 2)
    assert round_trip(profile).revenue == profile.revenue


def test_order_completed_clears_the_cart_and_records_purchases() -> None:
    profile = build(
        track("Product Added", T0, product_id="p1", price=5.0, quantity=2, cart_id="c1"),
        track("Product Added", T0 + 1, product_id="p2", price=1.0),
        track(
            "Order Completed",
            T0 + 10,
            order_id=1001,
            products=[{"product_id": "p1", "price": 5, "quantity": 2}, {"sku": "p2", "price": 1}],
        ),
    )
    assert profile.cart == {} and profile.cart_id is None and profile.cart_updated == T0 + 10
    assert (profile.orders, profile.revenue) == (1, 11.0)
    assert (profile.last_order_at, profile.last_order_id) == (T0 + 10, "1001")
    assert profile.purchased == [[T0 + 10, "p1"], [T0 + 10, "p2"]]
    assert profile.counts == {"Product Added": 2, "Order Completed": 1}


def test_purchased_is_bounded_and_oldest_first_even_with_late_orders() -> None:
    profile = build(
        track("Order Completed", T0 + 10, order_id="o2", products=[{"product_id": "b"}]),
        # a late order (an offline client's queue): still kept in time order
        track("Order Completed", T0, order_id="o1", products=[{"product_id": "a"}]),
    )
    assert profile.purchased == [[T0, "a"], [T0 + 10, "b"]]
    assert profile.last_order_id == "o2"  # the late order is not the last one
    for n, product in enumerate("cdefg"):
        apply_event(
            profile,
            track("Order Completed", T0 + 20 + n, products=[{"product_id": product}]),
            LIMITS,
        )
    assert [p for _, p in profile.purchased] == ["d", "e", "f", "g"]  # purchased_max = 4


# -- counts and recent events --------------------------------------------------------


def test_counts_per_event_name() -> None:
    profile = build(
        track("Product Viewed", T0, product_id="p1"),
        track("Product Viewed", T0 + 1, product_id="p2"),
        event({"userId": "ann", "name": "Home"}, T0 + 2, "page"),
        event({"userId": "ann"}, T0 + 3, "screen"),
        track("Email Opened", T0 + 4),
        identify(T0 + 5, plan="gold"),  # identify, group and alias are not counted
        event({"userId": "ann", "groupId": "g1", "traits": {"n": 1}}, T0 + 6, "group"),
    )
    assert profile.counts == {
        "Product Viewed": 2,
        "Page Viewed": 1,
        "Screen Viewed": 1,
        "Email Opened": 1,
    }
    assert profile.email["opened"] == 1 and profile.email["last_opened"] == T0 + 4
    assert profile.groups == {"g1": {"n": 1}} and profile.traits == {"plan": "gold"}
    assert (profile.first_seen, profile.last_seen) == (T0, T0 + 6)


def test_recent_events_keep_product_and_category() -> None:
    profile = build(
        track("Product Viewed", T0, product_id="p1", category="shoes"),
        track("Product Viewed", T0 + 1, sku="s2", category=["not", "a", "string"]),
        track("Checkout Started", T0 + 2),
    )
    assert profile.recent == [
        [T0, "Product Viewed", "p1", "shoes"],
        [T0 + 1, "Product Viewed", "s2", None],
        [T0 + 2, "Checkout Started", None, None],
    ]


def test_recent_is_bounded_by_recent_max() -> None:
    profile = build(*[track("Product Viewed", T0 + n, product_id=str(n)) for n in range(8)])
    assert profile.counts == {"Product Viewed": 8}
    assert [entry[2] for entry in profile.recent] == ["3", "4", "5", "6", "7"]


def test_late_events_are_inserted_in_time_order() -> None:
    profile = build(
        track("Product Viewed", T0 + 10, product_id="b"),
        track("Product Viewed", T0 + 30, product_id="d"),
        track("Product Viewed", T0 + 20, product_id="c"),
        track("Product Viewed", T0 + 30, product_id="e"),  # same time: after its equal
        track("Product Viewed", T0 + 5, product_id="a"),
    )
    assert [(e[0] - T0, e[2]) for e in profile.recent] == [
        (5, "a"),
        (10, "b"),
        (20, "c"),
        (30, "d"),
        (30, "e"),
    ]
    assert (profile.first_seen, profile.last_seen) == (T0 + 5, T0 + 30)
    # One more late event pushes out the oldest, not the newest.
    apply_event(profile, track("Product Viewed", T0 + 15, product_id="x"), LIMITS)
    assert [e[2] for e in profile.recent] == ["b", "x", "c", "d", "e"]


def test_a_late_event_goes_after_the_events_of_its_own_time() -> None:
    profile = build(
        track("Product Viewed", T0 + 10, product_id="b"),
        track("Product Viewed", T0 + 20, product_id="c"),
        track("Product Viewed", T0 + 30, product_id="d"),
        track("Product Viewed", T0 + 20, product_id="late"),
    )
    assert [e[2] for e in profile.recent] == ["b", "c", "late", "d"]


def test_recent_is_bounded_by_the_time_window() -> None:
    profile = build(
        track("Product Viewed", T0, product_id="old"),
        track("Product Viewed", T0 + 3 * DAY, product_id="mid"),
    )
    apply_event(profile, track("Product Viewed", T0 + 8 * DAY, product_id="new"), LIMITS)
    assert [e[2] for e in profile.recent] == ["mid", "new"]  # 7-day window
    # A late event older than the window is counted but not remembered.
    apply_event(profile, track("Product Viewed", T0 - DAY, product_id="ancient"), LIMITS)
    assert [e[2] for e in profile.recent] == ["mid", "new"]
    assert profile.counts["Product Viewed"] == 4


# -- dedupe ----------------------------------------------------------------------------


def test_dedupe_within_and_after_the_window() -> None:
    profile = Profile("ann")
    assert not profile.is_duplicate("m1", 0.0, LIMITS)
    assert profile.is_duplicate("m1", 50.0, LIMITS)
    assert profile.is_duplicate("m1", 100.0, LIMITS)  # the window's edge is inside
    assert not profile.is_duplicate("m1", 100.5, LIMITS)  # outside the 100 s window
    assert profile.is_duplicate("m1", 150.0, LIMITS)  # remembered again from 100.5
    assert list(profile.seen) == ["m1"] and profile.seen["m1"] == 100.5


def test_dedupe_remembers_at_most_dedupe_max_ids() -> None:
    profile = Profile("ann")
    for n in range(6):
        assert not profile.is_duplicate(f"m{n}", float(n), LIMITS)
    assert list(profile.seen) == ["m3", "m4", "m5"]  # dedupe_max_ids = 3, newest kept
    assert profile.is_duplicate("m5", 10.0, LIMITS)
    assert not profile.is_duplicate("m0", 10.0, LIMITS)  # forgotten: counts again
    assert list(profile.seen) == ["m4", "m5", "m0"]


def test_a_replayed_copy_is_a_duplicate_however_late_it_comes() -> None:
    # A stream replay or a re-sent forward keeps the original receivedAt: only
    # the cap may forget it, not newer events moving the clock on.
    profile = Profile("ann")
    assert not profile.is_duplicate("m1", 0.0, LIMITS)
    assert not profile.is_duplicate("m2", 500.0, LIMITS)  # far past the 100 s window
    assert profile.is_duplicate("m1", 0.0, LIMITS)
    for n, at in ((3, 501.0), (4, 502.0)):
        profile.is_duplicate(f"m{n}", at, LIMITS)
    assert list(profile.seen) == ["m2", "m3", "m4"]  # full: the oldest went first


def test_seen_survives_a_checkpoint_in_order() -> None:
    profile = Profile("ann")
    for n in range(3):
        profile.is_duplicate(f"m{n}", float(n), LIMITS)
    restored = round_trip(profile)
    assert restored.is_duplicate("m2", 5.0, LIMITS)
    restored.is_duplicate("m9", 6.0, LIMITS)
    assert list(restored.seen) == ["m1", "m2", "m9"]


# -- consent ---------------------------------------------------------------------------


def test_unsubscribed_event_suppresses() -> None:
    profile = build(track("Product Viewed", T0), track("Unsubscribed", T0 + 5))
    assert profile.suppressed
    assert profile.consent == {"unsubscribed": True, "unsubscribed_at": T0 + 5}


@pytest.mark.parametrize(
    ("traits", "suppressed"),
    [
        ({"unsubscribed": True}, True),
        ({"email_opt_out": True}, True),
        ({"opted_out": 1}, True),
        ({"email_opt_in": False}, True),
        ({"email_opt_in": "false"}, True),  # CRMs send strings
        ({"email_opt_in": "No"}, True),
        ({"unsubscribed": "yes"}, True),
        ({"email_opt_in": 0}, True),
        ({"email_opt_in": True}, False),
        ({"unsubscribed": False}, False),
        ({"unsubscribed": "false"}, False),
        ({"unsubscribed": None}, False),
        ({"email": "ann@example.com"}, False),
        # disagreeing traits in one call: the stricter wins
        ({"email_opt_in": True, "unsubscribed": True}, True),
        ({"email_opt_in": False, "unsubscribed": False}, True),
    ],
)
def test_consent_from_traits(traits: dict, suppressed: bool) -> None:
    profile = build(identify(T0, **traits))
    assert profile.suppressed is suppressed
    assert profile.consent["unsubscribed_at"] == (T0 if suppressed else None)


@pytest.mark.parametrize(
    ("traits", "suppressed"),
    [
        ({"email_opt_in": True}, False),
        ({"unsubscribed": False}, False),
        ({"unsubscribed": "0"}, False),
        # values that say nothing clear leave an unsubscribe in place
        ({"unsubscribed": None}, True),
        ({"email_opt_in": None}, True),
        ({"email_opt_in": "maybe"}, True),
        ({"email_opt_in": {"v": True}}, True),
    ],
)
def test_opting_back_in(traits: dict, suppressed: bool) -> None:
    profile = build(track("Unsubscribed", T0), identify(T0 + 60, **traits))
    assert profile.suppressed is suppressed


def test_a_late_older_opt_in_does_not_undo_a_newer_unsubscribe() -> None:
    profile = build(track("Unsubscribed", T0 + 60), identify(T0, email_opt_in=True))
    assert profile.suppressed
    apply_event(profile, identify(T0 + 120, email_opt_in=True), LIMITS)
    assert not profile.suppressed


def test_context_traits_can_opt_out_but_never_back_in() -> None:
    # analytics.js copies the cached identify traits into every call's context.
    cached = {"traits": {"email_opt_in": True, "name": "Ann"}}
    profile = build(
        track("Unsubscribed", T0),
        event({"userId": "ann", "event": "Product Viewed", "context": cached}, T0 + 60, "track"),
    )
    assert profile.suppressed and profile.traits["name"] == "Ann"
    opted_out = {"traits": {"email_opt_in": False}, "timezone": "Europe/Oslo"}
    other = build(
        event({"userId": "ann", "event": "Product Viewed", "context": opted_out}, T0, "track")
    )
    assert other.suppressed and other.timezone == "Europe/Oslo"


@pytest.mark.parametrize(
    "context",
    [None, {"traits": {"email_opt_in": True}}, {"traits": {"unsubscribed": True}}],
)
@pytest.mark.parametrize(
    "msg",
    [
        {"event": "Unsubscribed"},
        {"event": "Product Viewed"},
        {"traits": {"unsubscribed": True}},
        {"traits": {"email_opt_in": "no"}},
        {"traits": {"email_opt_in": True}},
        {"traits": {"unsubscribed": "false", "name": "Ann"}},
        {"traits": {"email_opt_in": "maybe"}},
        {"traits": {"email_opt_in": True, "opted_out": 1}},
        {"traits": {"name": "Ann"}},
    ],
)
@pytest.mark.parametrize("before", [False, True])
def test_consent_change_says_what_applying_the_event_does(
    before: bool, msg: dict, context: dict | None
) -> None:
    # The API notes consent_change(event) before a shard applies the event; the
    # dispatcher trusts that note, so it must agree with apply_event exactly.
    kind = "identify" if "traits" in msg else "track"
    ev = event({"userId": "ann", **msg, **({"context": context} if context else {})}, T0, kind)
    profile = build(*([track("Unsubscribed", T0 - 60)] if before else []))
    apply_event(profile, ev, LIMITS)
    change = consent_change(ev)
    if change == UNSUBSCRIBES:
        assert profile.suppressed
    elif change == RESUBSCRIBES:
        assert not profile.suppressed
    else:
        assert change is None and profile.suppressed is before


def test_consent_change_of_an_erasure() -> None:
    erase = {"type": "_erase", "customer": "ann", "messageId": "erase-1", "ts": T0}
    assert consent_change(erase) == ERASES


# -- snapshot ----------------------------------------------------------------------------


def busy_profile() -> Profile:
    return build(
        identify(T0, plan="gold", email="ann@example.com"),
        track("Product Viewed", T0 + 1, product_id="p1", category="shoes"),
        track("Product Added", T0 + 2, product_id="p1", price=3.5, quantity=2),
        track("Order Completed", T0 + 3, order_id="o1", revenue=7, products=[{"sku": "p1"}]),
        track("Product Added", T0 + 4, product_id="p2", price=1.0),
        track("Email Opened", T0 + 5),
        track("Email Link Clicked", T0 + 6),
        event({"userId": "ann", "groupId": "g1", "traits": {"name": "Acme"}}, T0 + 7, "group"),
        event(
            {"userId": "ann", "event": "X", "context": {"timezone": "Europe/Rome"}}, T0 + 8, "track"
        ),
    )


def test_to_dict_from_dict_round_trip() -> None:
    profile = busy_profile()
    data = profile.to_dict()
    assert data["v"] == FORMAT_VERSION
    restored = round_trip(profile)
    assert restored.to_dict() == data
    assert restored.public() == profile.public()
    # The restored profile keeps working the same as the original.
    later = [
        track("Product Added", T0 + 9, product_id="p2"),
        track("Unsubscribed", T0 + 10),
    ]
    for ev in later:
        apply_event(profile, ev, LIMITS)
        apply_event(restored, ev, LIMITS)
    assert restored.to_dict() == profile.to_dict()


@pytest.mark.parametrize("version", [None, 0, FORMAT_VERSION + 1, str(FORMAT_VERSION)])
def test_from_dict_refuses_another_format_version(version: object) -> None:
    data = busy_profile().to_dict()
    if version is None:
        del data["v"]
    else:
        data["v"] = version
    with pytest.raises(ValueError, match="version"):
        Profile.from_dict(data)


def test_public_hides_bookkeeping() -> None:
    public = busy_profile().public()
    assert "seen" not in public and "merging" not in public and "v" not in public
    assert public["cart_total"] == 1.0 and public["id"] == "ann"


# -- merge -------------------------------------------------------------------------------


def anonymous(*events: dict) -> Profile:
    return build(*events, customer="a1")


def test_merge_sums_counts_and_history() -> None:
    user = build(
        identify(T0 + 500, name="Ann", plan="gold"),
        track("Product Viewed", T0 + 501, product_id="p1"),
        track("Order Completed", T0 + 502, order_id="o2", revenue=20, products=[{"sku": "b"}]),
        track("Email Opened", T0 + 503),
    )
    anon = anonymous(
        identify(T0 + 100, name="anon", city="Leeds"),
        track("Product Viewed", T0 + 101, product_id="p9"),
        track("Order Completed", T0 + 102, order_id="o1", revenue=5.5, products=[{"sku": "a"}]),
        track("Email Opened", T0 + 103),
        track("Email Link Clicked", T0 + 104),
        track("Product Added", T0 + 105, product_id="p9", price=2.0),
    )
    merge_profiles(user, anon, LIMITS)
    assert user.counts == {
        "Product Viewed": 2,
        "Order Completed": 2,
        "Email Opened": 2,
        "Email Link Clicked": 1,
        "Product Added": 1,
    }
    assert user.traits == {"name": "Ann", "plan": "gold", "city": "Leeds"}  # the target wins
    assert (user.first_seen, user.last_seen) == (T0 + 100, T0 + 503)
    assert (user.orders, user.revenue) == (2, 25.5)
    assert (user.last_order_at, user.last_order_id) == (T0 + 502, "o2")
    assert user.purchased == [[T0 + 102, "a"], [T0 + 502, "b"]]
    assert quantities(user) == {"p9": 1}
    assert user.email["opened"] == 2 and user.email["clicked"] == 1
    assert user.email["last_opened"] == T0 + 503 and user.email["last_clicked"] == T0 + 104
    recent = [e[0] for e in user.recent]
    assert recent == sorted(recent) and len(recent) == LIMITS.recent_max
    assert recent[-1] == T0 + 503


def test_merge_takes_the_newer_order_and_keeps_the_target_cart_line() -> None:
    user = build(track("Product Added", T0, product_id="p1", quantity=2, cart_id="u-cart"))
    anon = anonymous(
        track("Product Added", T0 + 5, product_id="p1", quantity=7),
        track("Order Completed", T0 - 50, order_id="old"),
        track("Order Completed", T0 + 9, order_id="newer", revenue=3),
        track("Product Added", T0 + 10, product_id="p2"),
    )
    merge_profiles(user, anon, LIMITS)
    assert quantities(user) == {"p1": 2, "p2": 1}
    assert user.cart_updated == T0 + 10 and user.cart_id == "u-cart"
    assert (user.last_order_at, user.last_order_id) == (T0 + 9, "newer")


@pytest.mark.parametrize(
    ("user_out", "anon_out", "suppressed"),
    [(False, False, False), (True, False, True), (False, True, True), (True, True, True)],
)
def test_merge_keeps_the_stricter_consent(user_out: bool, anon_out: bool, suppressed: bool) -> None:
    user = build(*([track("Unsubscribed", T0 + 50)] if user_out else []))
    anon = anonymous(*([track("Unsubscribed", T0 + 10)] if anon_out else []))
    merge_profiles(user, anon, LIMITS)
    assert user.suppressed is suppressed
    expected_at = (T0 + 50) if user_out else (T0 + 10) if anon_out else None
    assert user.consent["unsubscribed_at"] == expected_at


def test_merge_first_and_last_seen_from_an_empty_side() -> None:
    empty = Profile("u")
    merge_profiles(empty, anonymous(track("E", T0), track("E", T0 + 9)), LIMITS)
    assert (empty.first_seen, empty.last_seen) == (T0, T0 + 9)
    user = build(track("E", T0 + 1))
    merge_profiles(user, Profile("a1"), LIMITS)
    assert (user.first_seen, user.last_seen) == (T0 + 1, T0 + 1)


def test_merge_keeps_groups_timezone_and_merged_ids_of_the_target() -> None:
    user = build(event({"userId": "ann", "groupId": "g", "traits": {"by": "u"}}, T0, "group"))
    anon = anonymous(
        event({"anonymousId": "a1", "groupId": "g", "traits": {"by": "a"}}, T0, "group"),
        event({"anonymousId": "a1", "groupId": "h"}, T0, "group"),
        event({"anonymousId": "a1", "event": "E", "context": {"timezone": "UTC"}}, T0, "track"),
    )
    anon.merged_ids = ["a0"]
    merge_profiles(user, anon, LIMITS)
    assert user.groups == {"g": {"by": "u"}, "h": {}}
    assert user.timezone == "UTC"
    assert user.merged_ids == ["a0"]


def test_merge_keeps_the_newest_seen_ids_oldest_first() -> None:
    user, anon = Profile("u"), Profile("a1")
    for n, at in enumerate([10.0, 30.0]):
        user.is_duplicate(f"u{n}", at, LIMITS)
    for n, at in enumerate([5.0, 20.0, 40.0]):
        anon.is_duplicate(f"a{n}", at, LIMITS)
    anon.is_duplicate("u1", 31.0, LIMITS)  # also seen by the user
    merge_profiles(user, anon, LIMITS)
    # dedupe_max_ids = 3: the oldest go, the rest stay in time order, the target's time wins
    assert list(user.seen.items()) == [("a1", 20.0), ("u1", 30.0), ("a2", 40.0)]
    assert user.is_duplicate("a1", 50.0, LIMITS)
    assert not user.is_duplicate("u0", 50.0, LIMITS)


def test_shared_strings_make_equal_names_products_and_categories_one_object() -> None:
    # Two events decoded separately hold separate copies of equal strings.
    first, second = (
        orjson.loads(
            orjson.dumps(
                track(
                    "Order Completed",
                    T0 + n,
                    product_id="p-1",
                    category="Shoes",
                    products=[{"product_id": "p-2", "sku": "s-2", "category": "Bags"}],
                )
            )
        )
        for n in range(2)
    )
    assert first["event"] is not second["event"]
    before = orjson.dumps(first), orjson.dumps(second)
    for ev in (first, second):
        share_strings(ev)
    assert (orjson.dumps(first), orjson.dumps(second)) == before  # values unchanged
    assert first["event"] is second["event"]
    a, b = first["properties"], second["properties"]
    assert a["product_id"] is b["product_id"] and a["category"] is b["category"]
    line_a, line_b = a["products"][0], b["products"][0]
    assert all(line_a[k] is line_b[k] for k in ("product_id", "sku", "category"))
    profile = build(first, second)
    assert profile.recent[0][1] is profile.recent[1][1] is second["event"]
    assert profile.purchased[0][1] is profile.purchased[1][1]


def test_sharing_leaves_other_types_and_fields_alone() -> None:
    ev = track("Product Viewed", T0, product_id=12, category=None, name="Shoe")
    props = dict(ev["properties"])
    share_strings(ev)
    assert ev["properties"] == props and ev["properties"]["product_id"] == 12
