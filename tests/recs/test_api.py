"""Catalog, segments and CF recommendations through the real API, shards and Redis."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator

import httpx
import pytest

from engine.rules.files import STARTER
from tests.conftest import LocalShards, serve_app, test_config

ADMIN = {"Authorization": "Bearer dev-admin-key"}
CONTENT = {"Authorization": "Bearer dev-content-key"}
WRITE = {"Authorization": "Bearer dev-write-key"}


def track(user: str, event: str, n: int, **props: object) -> dict:
    return {
        "type": "track",
        "userId": user,
        "event": event,
        "messageId": f"{user}-{n}",
        "timestamp": f"2024-03-04T10:{n:02d}:00Z",
        "properties": props,
    }


def flush(shards) -> None:
    """Every shard flushes its counts and merges populations now (instead of in 5 s)."""

    async def run() -> None:
        for actor in shards.actors:
            await actor.flush_insight()

    loop = shards.actors[0]._task.get_loop()
    asyncio.run_coroutine_threadsafe(run(), loop).result(10)


@pytest.fixture
def local_api(redis_url: str) -> Iterator[tuple[str, LocalShards]]:
    """The real API over loopback, in-process shards with the starter rules (the vip segment)."""
    from engine.api import create_app

    config = dataclasses.replace(test_config(), rules=((STARTER.read_text(), str(STARTER)),))
    shards = LocalShards(config, redis_url)
    with serve_app(create_app(config, redis_url, shards.connect)) as base:
        yield base, shards


def test_catalog_upserts_and_errors(local_api) -> None:
    base, _ = local_api
    with httpx.Client(base_url=base, headers=ADMIN) as client:
        product = {"name": "Wool socks", "price": 9.5, "category": "Socks", "image": "s.png"}
        put = client.put("/v1/catalog/products/sku-1", json=product)
        assert put.status_code == 200
        assert put.json() == {
            "id": "sku-1",
            "name": "Wool socks",
            "price": 9.5,
            "category": "Socks",
            "image_url": "s.png",
            "in_stock": True,
        }
        assert client.get("/v1/catalog/products/sku-1").json()["source"] == "catalog"
        bad = client.put("/v1/catalog/products/sku-2", json={"price": "cheap"})
        assert bad.status_code == 400 and bad.json()["error"]["field"] == "price"
        wrong = client.put("/v1/catalog/products/sku-2", json={"id": "sku-3"})
        assert wrong.status_code == 400 and wrong.json()["error"]["field"] == "id"
        bulk = client.post(
            "/v1/catalog/products",
            json={"products": [{"id": "a"}, {"id": "b", "price": -1}, {"id": "c", "colour": "x"}]},
        )
        assert bulk.json()["upserted"] == 1
        assert [r["field"] for r in bulk.json()["rejected"]] == [
            "products[1].price",
            "products[2].colour",
        ]
        assert client.get("/v1/catalog/products/nope").status_code == 404
        assert httpx.get(f"{base}/v1/catalog/products/sku-1", headers=CONTENT).status_code == 403


def test_recommendations_segments_and_described_products(local_api) -> None:
    base, shards = local_api
    with httpx.Client(base_url=base) as client:
        catalog = [
            {"id": "tent", "name": "Tent", "category": "Camping", "price": 199},
            {"id": "mat", "name": "Sleeping mat", "category": "Camping", "price": 39},
            {"id": "stove", "name": "Stove", "category": "Cooking", "price": 49, "in_stock": False},
            {"id": "mug", "name": "Mug", "category": "Cooking", "price": 9},
        ]
        assert client.post("/v1/catalog/products", json=catalog, headers=ADMIN).json() == {
            "upserted": 4,
            "rejected": [],
        }
        batch = []
        for n, user in enumerate(["c1", "c2", "c3"]):
            lines = [{"product_id": "tent", "price": 199}, {"product_id": "mat", "price": 39}]
            lines.append({"product_id": "stove" if n < 2 else "mug", "price": 49})
            batch.append(track(user, "Order Completed", n, products=lines, revenue=600))
        # a product the catalog lacks, known by what the event says
        batch.append(track("c4", "Product Viewed", 9, product_id="lamp", name="Head lamp"))
        batch.append(track("newbie", "Product Viewed", 10, product_id="tent", category="Camping"))
        assert client.post("/v1/batch", json={"batch": batch}, headers=WRITE).status_code == 200
        for user in ("c1", "c2", "c3", "c4", "newbie"):  # read-your-writes: all applied
            assert client.get(f"/v1/profiles/{user}", headers=ADMIN).status_code == 200
        flush(shards)

        answer = client.get("/v1/content/newbie?blocks=recommendations", headers=CONTENT)
        assert answer.status_code == 200, answer.text
        block = answer.json()["blocks"]["recommendations"]
        items = block["data"]["items"]
        ids = [item["product_id"] for item in items]
        assert ids[0] == "mat"  # bought with a tent by everyone
        assert "stove" not in ids  # out of stock
        assert "mug" in ids
        mat = items[0]
        assert mat["name"] == "Sleeping mat" and mat["price"] == 39
        assert mat["reason"] == "also_liked"

        lamp = client.get("/v1/catalog/products/lamp", headers=ADMIN).json()
        assert lamp == {"id": "lamp", "name": "Head lamp", "source": "events"}

        vip = client.get("/v1/segments/vip?limit=2", headers=ADMIN).json()
        assert vip["count"] == 3 and len(vip["members"]) == 2
        assert set(vip["members"]) <= {"c1", "c2", "c3"}
        counted = client.get("/v1/segments/vip?limit=0", headers=ADMIN).json()
        assert counted == {"segment": "vip", "count": 3, "members": []}
        rfm = client.get("/v1/segments/hibernating", headers=ADMIN).json()
        assert rfm["segment"] == "hibernating"
        assert client.get("/v1/segments/nope", headers=ADMIN).status_code == 404
        assert client.get("/v1/segments/vip?limit=x", headers=ADMIN).status_code == 400
        assert client.get("/v1/segments/vip", headers=CONTENT).status_code == 403
        profile = client.get("/v1/profiles/c1", headers=ADMIN).json()
        assert profile["rfm"]["segment"] and profile["order_log"][0][1] == 600


@pytest.mark.parametrize("path", ["/v1/catalog/products/x", "/v1/segments/vip"])
def test_admin_routes_need_a_key(local_api, path: str) -> None:
    base, _ = local_api
    assert httpx.get(base + path).status_code == 401


def test_a_new_shop_still_recommends_what_the_customer_looked_at(local_api) -> None:
    base, _ = local_api
    with httpx.Client(base_url=base) as client:
        batch = [
            track("solo", "Product Viewed", 1, product_id="kettle", category="Kitchen"),
            track("solo", "Product Viewed", 2, product_id="toaster", category="Kitchen"),
            track("solo", "Product Added", 3, product_id="toaster", category="Kitchen"),
        ]
        assert client.post("/v1/batch", json={"batch": batch}, headers=WRITE).status_code == 200
        assert client.get("/v1/profiles/solo", headers=ADMIN).status_code == 200
        # no flush yet: Redis holds no counts at all
        answer = client.get("/v1/content/solo?blocks=recommendations", headers=CONTENT).json()
        items = answer["blocks"]["recommendations"]["data"]["items"]
        assert [(i["product_id"], i["reason"]) for i in items] == [("kettle", "recent_interest")]


def test_catalog_import_command_against_the_running_engine(local_api, tmp_path) -> None:
    from engine.recs.catalog_cli import main

    base, _ = local_api
    csv_file = tmp_path / "products.csv"
    csv_file.write_text(
        "id,name,price,category,in_stock\n"
        "sku-1,Wool socks,9.5,Socks,yes\n"
        "sku-2,Bad price,cheap,Socks,yes\n"
        "sku-3,Boots,89,Shoes,no\n"
    )
    code = main(["import", str(csv_file), "--url", base, "--key", "dev-admin-key"])
    assert code == 1  # one line rejected
    with httpx.Client(base_url=base, headers=ADMIN) as client:
        boots = client.get("/v1/catalog/products/sku-3").json()
        assert boots["in_stock"] is False and boots["price"] == 89.0
        assert client.get("/v1/catalog/products/sku-2").status_code == 404
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text('{"id": "sku-4", "name": "Hat"}\n\n{"id": "sku-5", "image": "h.png"}\n')
    assert main(["import", str(jsonl), "--url", base, "--key", "dev-admin-key"]) == 0
    with httpx.Client(base_url=base, headers=ADMIN) as client:
        assert client.get("/v1/catalog/products/sku-5").json()["image_url"] == "h.png"
