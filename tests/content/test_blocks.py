"""Built-in blocks from a live profile, the interim recommender, and their HTML."""

from __future__ import annotations

from engine.content import blocks as b
from engine.content import render
from engine.content.recommend import recent_interest
from engine.partition import Partition
from engine.profile import Limits
from tests.content.conftest import event, identify
from tests.factories import normalized

LINKS = b.Links("https://shop.example/p/{product_id}", "https://shop.example/cart?c={cart_id}")


def profile_of(customer: str, *messages: dict) -> dict:
    """The public profile after applying `messages` in order."""
    part = Partition(lambda c: True, limits=Limits())
    for i, msg in enumerate(messages):
        part.apply(normalized(msg, at=1_700_000_000.0 + i * 60))
    return part.lookup(customer).public()


def view(customer: str, product: str, category: str = "Shoes") -> dict:
    return event(customer, "Product Viewed", product_id=product, category=category)


def test_recommendations_rank_recent_interest_and_skip_cart_and_purchases() -> None:
    p = profile_of(
        "ann",
        view("ann", "bag-1", "Bags"),
        view("ann", "shoe-1"),
        view("ann", "shoe-2"),
        view("ann", "shoe-1"),
        view("ann", "bought"),
        event("ann", "Product Added", product_id="dropped", price=5, category="Shoes"),
        event("ann", "Order Completed", products=[{"product_id": "bought", "price": 1}]),
        event("ann", "Product Added", product_id="kept", price=5, category="Shoes"),
    )
    # The order emptied the cart without "dropped": added once, never bought, so it leads;
    # "kept" is in the cart now and "bought" was bought: neither is suggested.
    ranked = [item["product_id"] for item in recent_interest(p, limit=5)]
    assert ranked == ["dropped", "shoe-1", "shoe-2", "bag-1"]
    assert recent_interest(p, limit=1)[0]["product_id"] == "dropped"
    assert recent_interest(profile_of("new", identify("new", first_name="N")), limit=4) == []


def test_cart_block_items_total_and_checkout() -> None:
    p = profile_of(
        "bo",
        event(
            "bo",
            "Product Added",
            product_id="s1",
            name="Socks",
            price=4.5,
            quantity=2,
            cart_id="c-9",
        ),
        event(
            "bo",
            "Product Added",
            product_id="h1",
            name="Hat",
            price=10,
            url="https://shop.example/hat",
            image_url="https://img.example/h.png",
        ),
    )
    data = b.cart_data(p, LINKS)
    assert [i["product_id"] for i in data["items"]] == ["h1", "s1"]  # newest first
    assert data["items"][1]["url"] == "https://shop.example/p/s1"
    assert data["items"][0]["url"] == "https://shop.example/hat"
    assert data["total"] == 19.0 and data["count"] == 3
    assert data["checkout_url"] == "https://shop.example/cart?c=c-9"
    html = render.cart_html(data)
    assert '<a href="https://shop.example/p/s1">Socks</a>' in html and "19.00" in html
    assert render.cart_html(b.cart_data(profile_of("cy", identify("cy")), LINKS)) == ""


def test_hostile_values_from_a_profile_are_escaped_in_every_fragment() -> None:
    evil = '<img src=x onerror="alert(1)">'
    p = profile_of(
        "eve",
        identify("eve", first_name=evil, segments=[evil]),
        event(
            "eve",
            "Product Added",
            product_id=evil,
            name=evil,
            price=1,
            url="javascript:alert(1)",
            image_url="javascript:alert(2)",
        ),
        view("eve", evil),
    )
    fragments = [
        render.profile_html(b.profile_data(p)),
        render.cart_html(b.cart_data(p, LINKS)),
        render.products_html(b.recently_viewed_data(p, LINKS, limit=4), "recently_viewed"),
        render.products_html(
            b.recommendation_data([{"product_id": evil, "name": evil}], LINKS), "recommendations"
        ),
    ]
    for html in fragments:
        assert "<img src=x" not in html and "javascript:" not in html
        assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in html


def test_profile_block_name_segments_and_trait_allowlist() -> None:
    p = profile_of(
        "di",
        identify("di", name="Di Allen", email="di@example.com", segments=["vip"]),
        event("di", "Order Completed", revenue=50),
        event("di", "Order Completed", revenue=20),
        event("di", "Email Opened"),
    )
    data = b.profile_data(p)
    assert data["first_name"] == "Di" and data["name"] == "Di Allen"
    assert data["segments"] == ["customer", "repeat_customer", "email_engaged", "vip"]
    assert data["revenue"] == 70.0
    assert b.profile_data(p, traits=("email",))["traits"] == {"email": "di@example.com"}


def test_recently_viewed_is_distinct_newest_first_and_limited() -> None:
    p = profile_of("fo", view("fo", "a"), view("fo", "b"), view("fo", "a"), view("fo", "c"))
    items = b.recently_viewed_data(p, LINKS, limit=2)["items"]
    assert [i["product_id"] for i in items] == ["c", "a"]
