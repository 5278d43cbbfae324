"""The HTTP API over loopback with in-process shards on a real Redis."""

from __future__ import annotations

import gzip
import itertools
import time
import uuid

import httpx
import orjson
import pytest
import redis

from engine.routing import stream_key
from tests.factories import track

WRITE = ("dev-write-key", "")
ADMIN = {"Authorization": "Bearer dev-admin-key"}


@pytest.fixture
def api(local_api):
    base, _ = local_api
    with httpx.Client(base_url=base, timeout=10) as client:
        yield client


def stream_lengths(r: redis.Redis) -> list[int]:
    return [r.xlen(stream_key(i)) for i in range(4)]


def test_track_then_read_profile(api: httpx.Client) -> None:
    reply = api.post(
        "/v1/track", auth=WRITE, json=track("ann", "Product Added", product_id="p1", price=4.0)
    )
    assert reply.status_code == 200 and reply.json() == {"success": True}
    profile = api.get("/v1/profiles/ann", headers=ADMIN).json()
    assert profile["counts"] == {"Product Added": 1}
    assert profile["cart"]["p1"]["price"] == 4.0 and profile["cart_total"] == 4.0


def test_bearer_auth_and_every_message_type(api: httpx.Client) -> None:
    headers = {"Authorization": "Bearer dev-write-key"}
    for kind, body in [
        ("identify", {"userId": "bo", "traits": {"email": "bo@example.com"}}),
        ("page", {"userId": "bo", "name": "Home"}),
        ("screen", {"userId": "bo", "name": "Cart"}),
        ("group", {"userId": "bo", "groupId": "acme", "traits": {"plan": "pro"}}),
        ("alias", {"userId": "bo", "previousId": "old-bo"}),
        ("track", {"userId": "bo", "event": "Signed Up"}),
    ]:
        assert api.post(f"/v1/{kind}", headers=headers, json=body).status_code == 200, kind
    profile = api.get("/v1/profiles/bo", headers=ADMIN).json()
    assert profile["traits"]["email"] == "bo@example.com"
    assert profile["groups"] == {"acme": {"plan": "pro"}}
    assert profile["counts"] == {"Page Viewed": 1, "Screen Viewed": 1, "Signed Up": 1}


def test_gzip_batch_with_invalid_members_rejected_by_index(api: httpx.Client) -> None:
    batch = {
        "batch": [
            track("cy"),
            {"type": "track", "userId": "cy"},
            track("cy"),
            {"type": "nope", "userId": "cy"},
        ]
    }
    reply = api.post(
        "/v1/batch",
        auth=WRITE,
        content=gzip.compress(orjson.dumps(batch)),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert reply.status_code == 200
    body = reply.json()
    assert body["success"] is True and body["accepted"] == 2
    assert [(r["index"], r["field"]) for r in body["rejected"]] == [
        (1, "batch[1].event"),
        (3, "batch[3].type"),
    ]
    assert api.get("/v1/profiles/cy", headers=ADMIN).json()["counts"] == {"Product Viewed": 2}


def test_duplicate_message_ids_count_once(api: httpx.Client) -> None:
    msg = track("dee", "Product Viewed", product_id="p1")
    for _ in range(3):  # an SDK retry and two page refreshes
        assert api.post("/v1/track", auth=WRITE, json=msg).status_code == 200
    api.post("/v1/batch", auth=WRITE, json={"batch": [msg, track("dee")]})
    assert api.get("/v1/profiles/dee", headers=ADMIN).json()["counts"] == {"Product Viewed": 2}


BIG = "x" * (33 * 1024)


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "code", "field"),
    [
        ("/v1/track", {"content": b'{"userId": "a", "event":'}, 400, "invalid_json", "body"),
        ("/v1/track", {"content": b"[1, 2]"}, 400, "invalid", None),
        (
            "/v1/track",
            {"json": {"userId": "a", "event": "E", "properties": [1]}},
            400,
            "invalid",
            "properties",
        ),
        ("/v1/track", {"json": {"userId": ["a"], "event": "E"}}, 400, "invalid", "userId"),
        ("/v1/track", {"json": {"event": "E"}}, 400, "missing_id", "userId"),
        ("/v1/track", {"json": {"userId": "a"}}, 400, "invalid", "event"),
        (
            "/v1/track",
            {"json": {"userId": "a", "event": "E", "timestamp": "yesterday"}},
            400,
            "invalid",
            "timestamp",
        ),
        ("/v1/alias", {"json": {"userId": "a"}}, 400, "missing_id", "previousId"),
        ("/v1/group", {"json": {"userId": "a"}}, 400, "missing_id", "groupId"),
        (
            "/v1/track",
            {"json": {"userId": "a", "event": "E", "properties": {"b": BIG}}},
            413,
            "too_large",
            None,
        ),
        (
            "/v1/batch",
            {"json": {"batch": [track("a", blob=BIG[:20000]) for _ in range(30)]}},
            413,
            "too_large",
            None,
        ),
        ("/v1/batch", {"json": {"batch": "nope"}}, 400, "invalid", "batch"),
        ("/v1/batch", {"json": {"batch": []}}, 400, "invalid", "batch"),
        ("/v1/batch", {"json": {"batch": [{"type": "track"}]}}, 400, "invalid_batch", "batch"),
        (
            "/v1/track",
            {"content": b"not gzip", "headers": {"Content-Encoding": "gzip"}},
            400,
            "invalid",
            "Content-Encoding",
        ),
        (
            "/v1/track",
            {"content": b"{}", "headers": {"Content-Encoding": "br"}},
            400,
            "unsupported_encoding",
            "Content-Encoding",
        ),
    ],
)
def test_bad_input_gets_a_clear_4xx_and_stores_nothing(
    api: httpx.Client,
    sync_redis: redis.Redis,
    path: str,
    kwargs: dict,
    status: int,
    code: str,
    field: str | None,
) -> None:
    before = stream_lengths(sync_redis)
    reply = api.post(path, auth=WRITE, **kwargs)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == code and error["field"] == field and error["message"]
    assert stream_lengths(sync_redis) == before  # never half-applied


def test_oversized_event_inside_a_batch_is_rejected_alone(api: httpx.Client) -> None:
    reply = api.post(
        "/v1/batch", auth=WRITE, json={"batch": [track("eve"), track("eve", blob=BIG)]}
    )
    assert reply.status_code == 200
    assert reply.json()["rejected"][0]["code"] == "too_large"


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "unauthorized"),
        ({"Authorization": "Bearer wrong"}, 401, "unauthorized"),
        ({"Authorization": "Basic !!!"}, 401, "unauthorized"),
        ({"Authorization": "Digest x"}, 401, "unauthorized"),
        ({"Authorization": "Bearer dev-content-key"}, 403, "forbidden"),
    ],
)
def test_ingest_needs_a_write_key(api: httpx.Client, headers: dict, status: int, code: str) -> None:
    reply = api.post("/v1/track", headers=headers, json=track("x"))
    assert (reply.status_code, reply.json()["error"]["code"]) == (status, code)


def test_profiles_need_the_admin_key(api: httpx.Client) -> None:
    reply = api.get("/v1/profiles/x", headers={"Authorization": "Bearer dev-write-key"})
    assert reply.status_code == 403
    assert api.get("/v1/profiles/x", headers=ADMIN).status_code == 404
    assert api.get("/v1/nowhere", headers=ADMIN).json()["error"]["code"] == "not_found"


def test_anonymous_history_follows_identify(api: httpx.Client) -> None:
    anon = "anon-" + uuid.uuid4().hex[:6]
    api.post(
        "/v1/track", auth=WRITE, json=track(anon, "Product Viewed", anonymous=True, product_id="p1")
    )
    api.post("/v1/identify", auth=WRITE, json={"userId": "fay", "anonymousId": anon})
    api.post(
        "/v1/track", auth=WRITE, json=track(anon, "Product Viewed", anonymous=True, product_id="p2")
    )
    # The merge crosses shards through forwards; poll until it lands.
    for _ in range(200):
        profile = api.get("/v1/profiles/fay", headers=ADMIN).json()
        if profile["counts"].get("Product Viewed") == 2:
            break
    assert profile["counts"]["Product Viewed"] == 2 and profile["merged_ids"] == [anon]
    assert api.get(f"/v1/profiles/{anon}", headers=ADMIN).json()["id"] == "fay"


def test_erase_removes_from_memory_and_redis(
    api: httpx.Client, local_api, sync_redis: redis.Redis
) -> None:
    _, shards = local_api
    api.post(
        "/v1/identify", auth=WRITE, json={"userId": "gus", "traits": {"email": "gus@example.com"}}
    )
    assert api.get("/v1/profiles/gus", headers=ADMIN).status_code == 200
    owner = next(a for a in shards.actors if "gus" in a.partition.profiles)
    for _ in range(500):  # wait until a checkpoint holds the profile
        if sync_redis.hexists(f"nudge:{{s{owner.index}}}:profiles", "gus"):
            break
        time.sleep(0.01)
    assert sync_redis.hexists(f"nudge:{{s{owner.index}}}:profiles", "gus")
    reply = api.delete("/v1/profiles/gus", headers=ADMIN)
    assert reply.status_code == 200 and reply.json() == {"erased": ["gus"], "existed": True}
    assert api.get("/v1/profiles/gus", headers=ADMIN).status_code == 404
    assert "gus" not in owner.partition.profiles
    for _ in range(500):  # the erasure reaches Redis with the next checkpoint (20 ms)
        if not sync_redis.hexists(f"nudge:{{s{owner.index}}}:profiles", "gus"):
            break
        time.sleep(0.01)
    assert not sync_redis.hexists(f"nudge:{{s{owner.index}}}:profiles", "gus")
    # Later events for an erased customer are dropped.
    api.post("/v1/track", auth=WRITE, json=track("gus"))
    assert api.get("/v1/profiles/gus", headers=ADMIN).status_code == 404


def test_a_customer_renamed_many_times_is_read_and_erased_through_the_first_name(
    api: httpx.Client,
) -> None:
    # Reads followed 3 aliases: after 4 renames the first name was unknown, and an
    # erasure through it left the person, email and all, under the last one.
    names = [f"rn{n}-{uuid.uuid4().hex[:6]}" for n in range(6)]
    api.post("/v1/identify", auth=WRITE, json={"userId": names[0], "traits": {"email": "r@x.io"}})
    for old, new in itertools.pairwise(names):
        api.post("/v1/alias", auth=WRITE, json={"userId": new, "previousId": old})
        deadline = time.monotonic() + 10  # each merge crosses shards through forwards
        while old not in api.get(f"/v1/profiles/{new}", headers=ADMIN).json().get("merged_ids", []):
            assert time.monotonic() < deadline, f"{old} was never merged into {new}"
            time.sleep(0.01)
    profile = api.get(f"/v1/profiles/{names[0]}", headers=ADMIN)
    assert profile.status_code == 200 and profile.json()["id"] == names[-1]
    assert profile.json()["traits"]["email"] == "r@x.io"
    reply = api.delete(f"/v1/profiles/{names[0]}", headers=ADMIN)
    assert reply.status_code == 200 and reply.json()["existed"] is True
    assert set(reply.json()["erased"]) == {names[0], names[-1]}
    assert api.get(f"/v1/profiles/{names[-1]}", headers=ADMIN).status_code == 404


def test_health_and_readiness(api: httpx.Client) -> None:
    assert api.get("/healthz").json() == {"status": "ok", "shards_ready": 4, "shards": 4}
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["redis"] is True


def test_content_served_by_the_default_app_to_content_keys_only(api: httpx.Client) -> None:
    customer = f"cc-{uuid.uuid4().hex[:8]}"
    api.post("/v1/track", auth=WRITE, json=track(customer, "Product Added", product_id="p9"))
    api.get(f"/v1/profiles/{customer}", headers=ADMIN)  # waits until applied
    content = {"Authorization": "Bearer dev-content-key"}
    reply = api.get(f"/v1/content/{customer}?blocks=cart", headers=content)
    assert reply.status_code == 200, reply.text
    cart = reply.json()["blocks"]["cart"]
    assert [item["product_id"] for item in cart["data"]["items"]] == ["p9"]
    assert api.get(f"/v1/profiles/{customer}", headers=content).status_code == 403
    assert api.get(f"/v1/content/{customer}", auth=WRITE).status_code in (401, 403)


def test_sign_url_command_gives_a_url_the_content_endpoint_accepts(
    api: httpx.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.cli import main

    customer = f"sig ned/{uuid.uuid4().hex[:6]}"  # a space and a slash survive encoding
    api.post("/v1/track", auth=WRITE, json=track(customer, "Product Added", product_id="p2"))
    api.get(f"/v1/profiles/{customer}", headers=ADMIN)
    assert main(["sign-url", customer, "--blocks", "cart", "--base", "", "--expires-in", "5m"]) == 0
    url = capsys.readouterr().out.strip()
    reply = api.get(url)
    assert reply.status_code == 200, reply.text
    assert reply.json()["blocks"]["cart"]["data"]["items"][0]["product_id"] == "p2"
    tampered = url.replace("blocks=cart", "blocks=profile")
    assert api.get(tampered).status_code == 401
