"""The profile and how events change it: pure, no I/O."""

from __future__ import annotations

import pytest

from engine.profile import FORMAT_VERSION, Limits, Profile, apply_event, merge_profiles
from tests.factories import normalized, track

LIMITS = Limits(recent_max=5, recent_window_s=7 * 86400, dedupe_window_s=100, dedupe_max_ids=3)


def applied(*messages: dict, start: float = 1_000.0) -> Profile:
    profile = Profile("ann")
    for n, msg in enumerate(messages):
        apply_event(profile, normalized(msg, at=start + n), LIMITS)
    return profile


def test_cart_follows_add_remove_and_order() -> None:
    profile = applied(
        track("ann", "Product Added", product_id="p1", price=5.0, name="Sock"),
        track("ann", "Product Added", product_id="p1", price=5.0, quantity=2),
        track("ann", "Product Added", sku="p2", price=3.0),
        track("ann", "Product Removed", product_id="p1", quantity=1),
    )
    assert {k: v["quantity"] for k, v in profile.cart.items()} == {"p1": 2, "p2": 1}
    assert profile.public()["cart_total"] == 13.0
    apply_event(
        profile,
        normalized(
            track(
                "ann",
                "Order Completed",
                order_id="o1",
                products=[{"product_id": "p1", "price": 5, "quantity": 2}],
            ),
            at=2000.0,
        ),
        LIMITS,
    )
    assert profile.cart == {} and profile.orders == 1 and profile.revenue == 10.0
    assert profile.last_order_id == "o1" and profile.purchased == [[2000.0, "p1"]]


@pytest.mark.parametrize(
    ("props", "revenue"),
    [
        ({"revenue": 42.5}, 42.5),
        ({"total": "12"}, 12.0),
        ({"products": [{"price": 2, "quantity": 3}]}, 6.0),
        ({}, 0.0),
    ],
)
def test_order_revenue_sources(props: dict, revenue: float) -> None:
    assert applied(track("ann", "Order Completed", **props)).revenue == revenue


def test_counts_and_recent_are_bounded_and_ordered() -> None:
    profile = applied(
        *[track("ann", "Product Viewed", product_id=str(n), category="shoes") for n in range(8)]
    )
    assert profile.counts == {"Product Viewed": 8}
    assert [entry[2] for entry in profile.recent] == ["3", "4", "5", "6", "7"]  # recent_max = 5
    late = normalized(track("ann", "Product Viewed", product_id="late"), at=1004.5)
    apply_event(profile, late, LIMITS)
    assert [entry[0] for entry in profile.recent] == sorted(entry[0] for entry in profile.recent)
    # Eight days later everything older than the 7-day window is gone.
    apply_event(profile, normalized(track("ann", "Page Viewed"), at=1000.0 + 8 * 86400), LIMITS)
    assert [entry[1] for entry in profile.recent] == ["Page Viewed"]


def test_dedupe_window_and_cap() -> None:
    profile = Profile("ann")
    assert not profile.is_duplicate("m1", 0.0, LIMITS)
    assert profile.is_duplicate("m1", 50.0, LIMITS)
    assert not profile.is_duplicate("m1", 151.0, LIMITS)  # outside the 100 s window
    for n in range(2, 6):
        profile.is_duplicate(f"m{n}", 160.0 + n, LIMITS)
    assert len(profile.seen) == 3  # at most dedupe_max_ids remembered
    assert not profile.is_duplicate("m1", 170.0, LIMITS)  # forgotten: counts again


def test_consent_from_events_and_traits() -> None:
    assert applied(track("ann", "Unsubscribed")).suppressed
    assert applied(
        {"type": "identify", "userId": "ann", "traits": {"email_opt_in": False}}
    ).suppressed
    profile = applied({"type": "identify", "userId": "ann", "traits": {"unsubscribed": True}})
    apply_event(
        profile,
        normalized({"type": "identify", "userId": "ann", "traits": {"unsubscribed": False}}),
        LIMITS,
    )
    assert not profile.suppressed


def test_snapshot_round_trip_and_version_check() -> None:
    profile = applied(
        track("ann", "Product Added", product_id="p1", price=1.0), track("ann", "Email Opened")
    )
    data = profile.to_dict()
    assert Profile.from_dict(data).to_dict() == data
    with pytest.raises(ValueError, match="version"):
        Profile.from_dict({**data, "v": FORMAT_VERSION + 1})


def test_merge_sums_history_and_keeps_the_stricter_consent() -> None:
    user = applied(
        {"type": "identify", "userId": "ann", "traits": {"name": "Ann"}},
        track("ann", "Product Viewed"),
        start=500.0,
    )
    anon = applied(
        {"type": "identify", "anonymousId": "a1", "traits": {"name": "anon", "city": "Leeds"}},
        track("a1", "Product Viewed", anonymous=True),
        track("a1", "Product Added", anonymous=True, product_id="p9", price=2.0),
        track("a1", "Unsubscribed", anonymous=True),
        start=100.0,
    )
    merge_profiles(user, anon, LIMITS)
    assert user.counts == {"Product Viewed": 2, "Product Added": 1, "Unsubscribed": 1}
    assert user.traits == {"name": "Ann", "city": "Leeds"}  # the user's own traits win
    assert user.first_seen == 100.0 and user.last_seen == 501.0
    assert "p9" in user.cart and user.suppressed
