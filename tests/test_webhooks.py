"""Platform webhooks: signatures as Shopify and WooCommerce compute them, the shipped
mappings over realistic payloads, and POST /webhooks/{source} into real profiles."""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import hmac
import json
import re
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from engine import events as ev
from engine.config import from_mapping
from engine.errors import AuthError, ConfigError, ValidationError
from engine.inbound.webhooks import map_payload, sign, verify_signature, webhooks_from_mapping
from tests.conftest import LocalShards, serve_app, test_config

FIXTURES = Path(__file__).parent / "fixtures" / "webhooks"
ADMIN = {"Authorization": "Bearer dev-admin-key"}
TABLE = {
    "shopify": {"secret": "shpss_0123456789abcdef", "mapping": "shopify"},
    "woo": {"secret": "wc-webhook-secret", "mapping": "woocommerce"},
    # named like the engine's own messageIds (nudge-...), which clients may not send
    "nudge-shop": {"secret": "shpss_nudge", "mapping": "shopify"},
}


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture(scope="module")
def sources() -> dict:
    return {s.name: s for s in webhooks_from_mapping(TABLE)}


# --- pure mapping ---------------------------------------------------------------------------


def test_shopify_checkout_maps_to_checkout_started_and_one_product_added_per_line(sources):
    messages = map_payload(
        sources["shopify"],
        "checkouts/create",
        fixture("shopify_checkouts_create.json"),
        delivery_id="d1",
    )
    assert [m["event"] for m in messages] == ["Checkout Started", "Product Added", "Product Added"]
    started, runner, socks = messages
    assert started["userId"] == 7012345678901
    assert started["anonymousId"] == "Z2NwLWV1cm9wZS13ZXN0MTowMUhYQ0FSVDEyMzQ1Njc4OTA"
    assert started["properties"]["revenue"] == 166.0
    assert started["properties"]["checkout_url"].endswith("/recover?key=0f1e2d3c4b5a")
    assert started["properties"]["products"][1] == {
        "product_id": 8012345678902,
        "variant": 44012345678902,
        "sku": "MS-M",
        "name": "Merino Socks",
        "price": 18.5,
        "quantity": 2,
    }
    assert started["context"]["traits"] == {
        "email": "ada@example.com",
        "first_name": "Ada",
        "last_name": "Lovelace",
    }
    assert socks["properties"]["price"] == 18.5 and socks["properties"]["quantity"] == 2
    assert runner["messageId"] == (
        "shopify:shopify-checkout-9b8a1c0e4f2d4e6a8b7c6d5e4f3a2b1c-line-44012345678901"
    )
    normalized = [ev.normalize(m, kind=None, received_at=1e9) for m in messages]
    assert normalized[0]["customer"] == "7012345678901"
    assert normalized[0]["ts"] == datetime(2026, 11, 23, 15, 2, 11, tzinfo=UTC).timestamp()


def test_a_shopify_custom_line_without_a_variant_keeps_the_rest_of_the_checkout(sources):
    # Custom line items (draft orders) have variant_id null: the line's messageId
    # template failed and the whole webhook was refused, so Shopify retried and dropped it.
    payload = fixture("shopify_checkouts_create.json")
    payload["line_items"][1]["variant_id"] = None
    messages = map_payload(sources["shopify"], "checkouts/create", payload, delivery_id="d7")
    assert [m["event"] for m in messages] == ["Checkout Started", "Product Added", "Product Added"]
    ids = [m["messageId"] for m in messages]
    assert ids[1].endswith("-line-44012345678901")
    assert ids[2].endswith("-line-#1")  # its place in the list stands in for the variant
    again = map_payload(sources["shopify"], "checkouts/create", payload, delivery_id="d8")
    assert [m["messageId"] for m in again] == ids  # another delivery: the same ids


def test_woocommerce_guest_checkout_then_paid_order_share_one_order_message_id(sources):
    order = fixture("woocommerce_order_created.json")
    created = map_payload(sources["woo"], "order.created", order, delivery_id="a")
    assert [m["event"] for m in created] == ["Checkout Started", "Product Added", "Product Added"]
    assert created[0]["userId"] == "grace@example.com"  # customer_id 0 is a guest
    assert created[0]["properties"]["revenue"] == 53.8
    paid = dict(order, status="processing")
    first = map_payload(sources["woo"], "order.created", paid, delivery_id="b")
    again = map_payload(sources["woo"], "order.updated", paid, delivery_id="c")
    assert [m["event"] for m in first] == ["Order Completed"]
    assert first[0]["messageId"] == again[0]["messageId"] == "woo:woo-order-727"
    assert map_payload(sources["woo"], "order.updated", order, delivery_id="d") == []


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda p: p.update(customer=None, cart_token=None, checkout_token=None), "customer.id"),
        (lambda p: p.update(total_price="free"), "total_price"),
        (lambda p: p.update(line_items={"a": 1}), "line_items"),
        (lambda p: p["line_items"].__setitem__(0, "x"), "line_items.0"),
        (lambda p: p.pop("id"), "id"),
        (lambda p: p.update(created_at="yesterday"), "created_at"),
    ],
)
def test_bad_payloads_name_the_field(sources, mutate, field) -> None:
    payload = fixture("shopify_orders_create.json")
    mutate(payload)
    with pytest.raises(ValidationError) as raised:
        map_payload(sources["shopify"], "orders/create", payload, delivery_id="x")
    assert raised.value.field == field


def test_signatures_as_the_platforms_compute_them(sources) -> None:
    body = (FIXTURES / "shopify_orders_create.json").read_bytes()
    good = sign("shpss_0123456789abcdef", body)
    verify_signature(sources["shopify"], {"X-Shopify-Hmac-Sha256": good}, body)
    for headers, payload in [
        ({"X-Shopify-Hmac-Sha256": good}, body + b" "),
        ({"X-Shopify-Hmac-Sha256": sign("other-secret", body)}, body),
        ({"X-WC-Webhook-Signature": good}, body),  # the other platform's header
        ({}, body),
    ]:
        with pytest.raises(AuthError):
            verify_signature(sources["shopify"], headers, payload)


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ({"shop": {"mapping": "shopify"}}, "webhooks.shop.secret"),
        ({"shop": {"secret": "s", "mapping": "magento"}}, "webhooks.shop.mapping"),
        (
            {"shop": {"secret": "s", "mapping": "shopify", "signature": "md5"}},
            "webhooks.shop.signature",
        ),
        ({"shop": {"secret": "s", "mapping": "shopify", "sekret": "x"}}, "webhooks.shop.sekret"),
        ({"Shop!": {"secret": "s"}}, "webhooks.Shop!"),
        (
            {
                "shop": {
                    "secret": "s",
                    "signature": "shopify",
                    "topic_header": "X-T",
                    "topic": {"a": {"event": "E"}},
                }
            },
            'webhooks.shop.topic."a"[0].user_id',
        ),
    ],
)
def test_config_errors_name_the_key(table, field) -> None:
    with pytest.raises(ConfigError) as raised:
        from_mapping({"webhooks": table}, {})
    assert raised.value.field == field


def test_secret_from_the_environment() -> None:
    config = from_mapping(
        {"webhooks": {"my-shop": {"mapping": "shopify"}}},
        {"NUDGE_WEBHOOKS_MY_SHOP_SECRET": "from-env"},
    )
    assert config.webhooks[0].secret == "from-env"


# --- over HTTP, into profiles ---------------------------------------------------------------


@pytest.fixture
def webhook_api(redis_url: str) -> Iterator[str]:
    from engine.api import create_app

    config = dataclasses.replace(
        test_config(), webhooks=from_mapping({"webhooks": TABLE}, {}).webhooks
    )
    shards = LocalShards(config, redis_url)
    with serve_app(create_app(config, redis_url, shards.connect)) as base:
        yield base


def post(
    base: str,
    source: str,
    topic: str,
    payload: dict | bytes,
    *,
    secret: str,
    delivery: str = "1",
    header: str | None = None,
) -> httpx.Response:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    if source == "woo":
        headers = {
            "X-WC-Webhook-Topic": topic,
            "X-WC-Webhook-Delivery-ID": delivery,
            "X-WC-Webhook-Signature": sign(secret, body),
        }
    else:
        headers = {
            "X-Shopify-Topic": topic,
            "X-Shopify-Webhook-Id": delivery,
            header or "X-Shopify-Hmac-Sha256": sign(secret, body),
        }
    headers["Content-Type"] = "application/json"
    return httpx.post(f"{base}/webhooks/{source}", content=body, headers=headers, timeout=10)


def profile(base: str, customer: str) -> dict:
    answer = httpx.get(f"{base}/v1/profiles/{customer}", headers=ADMIN, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_shopify_checkout_fills_the_cart_and_the_order_empties_it(webhook_api: str) -> None:
    secret = TABLE["shopify"]["secret"]
    checkout = fixture("shopify_checkouts_create.json")
    answer = post(webhook_api, "shopify", "checkouts/create", checkout, secret=secret)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"success": True, "events": 3}
    before = profile(webhook_api, "7012345678901")
    assert sorted(before["cart"]) == ["8012345678901", "8012345678902"]
    assert before["cart_total"] == 166.0
    assert before["traits"]["first_name"] == "Ada"

    order = fixture("shopify_orders_create.json")
    for delivery in ("order-1", "order-1", "order-1-retry"):  # redeliveries are deduplicated
        answer = post(
            webhook_api, "shopify", "orders/create", order, secret=secret, delivery=delivery
        )
        assert answer.status_code == 200, answer.text
    after = profile(webhook_api, "7012345678901")
    assert after["orders"] == 1
    assert after["revenue"] == 176.0
    assert after["cart"] == {}
    assert after["counts"]["Order Completed"] == 1


def test_a_source_named_like_the_engines_own_ids_is_served(webhook_api: str) -> None:
    # Only client ingest refuses messageIds beginning nudge-: a source named nudge-shop
    # had every delivery refused.
    reply = post(
        webhook_api,
        "nudge-shop",
        "checkouts/create",
        fixture("shopify_checkouts_create.json"),
        secret="shpss_nudge",
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["events"] == 3


def test_woocommerce_guest_order_reaches_the_profile_once(webhook_api: str) -> None:
    secret = TABLE["woo"]["secret"]
    order = fixture("woocommerce_order_created.json")
    assert post(webhook_api, "woo", "order.created", order, secret=secret).json()["events"] == 3
    paid = dict(order, status="processing", date_paid_gmt="2026-11-23T15:04:00")
    for n, topic in enumerate(["order.updated", "order.updated", "order.created"]):
        answer = post(webhook_api, "woo", topic, paid, secret=secret, delivery=f"d{n}")
        assert answer.status_code == 200, answer.text
    guest = profile(webhook_api, "grace@example.com")
    assert guest["counts"]["Checkout Started"] == 1
    assert guest["orders"] == 1 and guest["revenue"] == 53.8
    assert guest["traits"]["last_name"] == "Hopper"


def test_errors_401_404_400(webhook_api: str) -> None:
    secret = TABLE["shopify"]["secret"]
    order = fixture("shopify_orders_create.json")
    forged = post(webhook_api, "shopify", "orders/create", order, secret="guessed")
    assert forged.status_code == 401
    assert forged.json()["error"]["field"] == "X-Shopify-Hmac-Sha256"
    unknown = post(webhook_api, "bigcartel", "orders/create", order, secret=secret)
    assert unknown.status_code == 404 and unknown.json()["error"]["field"] == "source"
    broken = copy.deepcopy(order)
    broken["total_price"] = "lots"
    bad = post(webhook_api, "shopify", "orders/create", broken, secret=secret)
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "total_price"
    garbled = post(webhook_api, "shopify", "orders/create", b"{not json", secret=secret)
    assert garbled.status_code == 400 and garbled.json()["error"]["field"] == "body"
    ignored = post(webhook_api, "shopify", "products/update", {"id": 1}, secret=secret)
    assert ignored.status_code == 200 and ignored.json()["events"] == 0
    assert "not mapped" in ignored.json()["ignored"]
    missing = httpx.get(f"{webhook_api}/v1/profiles/7012345678901", headers=ADMIN, timeout=10)
    assert missing.status_code == 404  # nothing above reached a profile


def test_the_commented_examples_in_config_toml_load() -> None:
    text = (Path(__file__).resolve().parent.parent / "config.toml").read_text()
    block = text[text.index("# [webhooks.shopify]") : text.index("\n\n[content]")]
    toml = [
        line[2:]
        for line in block.splitlines()
        if re.match(r"^# (\[|[a-z_]+ = )", line)  # the settings, not the prose
    ]
    config = from_mapping(tomllib.loads("\n".join(toml)), {})
    assert [(s.name, s.signature) for s in config.webhooks] == [
        ("shopify", "shopify"),
        ("woo", "woocommerce"),
        ("myshop", "shopify"),
    ]
    assert config.webhooks[2].emits("carts/update")[0].event == "Cart Viewed"


# --- behaviours carried over from the unmerged `edges` branch ------------------------------


def test_sign_is_the_computation_the_platforms_document() -> None:
    body = (FIXTURES / "shopify_orders_create.json").read_bytes()
    documented = base64.b64encode(hmac.new(b"s3cret", body, hashlib.sha256).digest()).decode()
    assert sign("s3cret", body) == documented


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda p: p["customer"].update(id={"nested": 1}), "customer.id"),
        (lambda p: p["customer"].update(id=[7012345678901]), "customer.id"),
        (lambda p: p["customer"].update(id=True), "customer.id"),
    ],
)
def test_an_id_that_is_no_scalar_names_its_field_instead_of_falling_back(
    sources, mutate, field
) -> None:
    # A malformed customer id must not quietly file the order under the cart token.
    payload = fixture("shopify_orders_create.json")
    mutate(payload)
    with pytest.raises(ValidationError) as raised:
        map_payload(sources["shopify"], "orders/create", payload, delivery_id="x")
    assert raised.value.field == field and raised.value.status == 400


def test_a_mapping_from_a_toml_file(tmp_path: Path) -> None:
    own = tmp_path / "crm.toml"
    own.write_text(
        'signature = "shopify"\ntopic_header = "X-Topic"\n'
        '[[topic."deal.won"]]\nevent = "Order Completed"\nuser_id = "contact.id"\n'
        'properties = { revenue = "amount:number" }\n'
    )
    [crm] = webhooks_from_mapping({"crm": {"secret": "k", "mapping": str(own)}})
    assert crm.topic_header == "X-Topic"
    [message] = map_payload(
        crm, "deal.won", {"contact": {"id": 9}, "amount": "12.5"}, delivery_id="d"
    )
    assert message["userId"] == 9 and message["properties"] == {"revenue": 12.5}
    broken = tmp_path / "broken.toml"
    broken.write_text('signature = "shopify"\ntopic_header = \n')
    for mapping in (str(broken), str(tmp_path / "missing.toml")):
        with pytest.raises(ConfigError) as raised:
            webhooks_from_mapping({"crm": {"secret": "k", "mapping": mapping}})
        assert raised.value.field == "webhooks.crm.mapping"


def stored(base: str) -> int:
    """How many events the API's Redis holds, read through /v1/status."""
    status = httpx.get(f"{base}/v1/status", headers=ADMIN, timeout=10).json()
    return sum(shard["stream_length"] for shard in status["shards"])


def test_a_request_the_platform_did_not_sign_or_name_is_refused(webhook_api: str) -> None:
    secret = TABLE["shopify"]["secret"]
    order = json.dumps(fixture("shopify_orders_create.json")).encode()
    unsigned = httpx.post(
        f"{webhook_api}/webhooks/shopify",
        content=order,
        headers={"X-Shopify-Topic": "orders/create"},
        timeout=10,
    )
    assert unsigned.status_code == 401
    assert unsigned.json()["error"]["field"] == "X-Shopify-Hmac-Sha256"
    no_topic = httpx.post(
        f"{webhook_api}/webhooks/shopify",
        content=order,
        headers={"X-Shopify-Hmac-Sha256": sign(secret, order)},
        timeout=10,
    )
    assert no_topic.status_code == 400
    assert no_topic.json()["error"]["field"] == "X-Shopify-Topic"
    not_an_object = post(webhook_api, "shopify", "orders/create", b"[1, 2]", secret=secret)
    assert not_an_object.status_code == 400
    assert not_an_object.json()["error"]["field"] == "body"
    assert stored(webhook_api) == 0


def test_woocommerce_ping_is_acknowledged_and_stores_nothing(webhook_api: str) -> None:
    # Saving a webhook in WooCommerce posts an unsigned `webhook_id=N` and keeps the
    # hook only if the answer is exactly 200 (WC_Webhook::deliver_ping).
    ping = httpx.post(
        f"{webhook_api}/webhooks/woo",
        content=b"webhook_id=17",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=10,
    )
    assert ping.status_code == 200, ping.text
    assert ping.json() == {"success": True, "events": 0, "ping": True}
    # Anything else unsigned is still refused, and Shopify has no such ping.
    for source, body in (
        ("woo", b"webhook_id=17&x=1"),
        ("woo", b"{}"),
        ("shopify", b"webhook_id=17"),
    ):
        refused = httpx.post(f"{webhook_api}/webhooks/{source}", content=body, timeout=10)
        assert refused.status_code == 401, (source, body)
    assert stored(webhook_api) == 0
    # A paid order, then the same order completed later: still one order.
    secret = TABLE["woo"]["secret"]
    order = fixture("woocommerce_order_created.json")
    for n, status in enumerate(("processing", "completed")):
        paid = dict(order, status=status)
        answer = post(webhook_api, "woo", "order.updated", paid, secret=secret, delivery=f"p{n}")
        assert answer.status_code == 200, answer.text
    assert profile(webhook_api, "grace@example.com")["orders"] == 1
