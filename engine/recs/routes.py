"""HTTP routes of the catalog and segments (admin key).

PUT  /v1/catalog/products/{id}   one product (body: the product)
GET  /v1/catalog/products/{id}   the catalog's product, else what events said of it
POST /v1/catalog/products        bulk upsert: {"products": [...]} (at most 5,000 a call)
GET  /v1/segments/{name}         ?limit=100 members (0: just count), from every shard
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engine.auth import ADMIN, KeyRing
from engine.coerce import whole_number
from engine.errors import NotFound, ValidationError
from engine.recs.catalog import normalize_product
from engine.recs.store import RecsStore

MAX_BULK = 5000
_MAX_BODY = 8 * 1024 * 1024
_MAX_MEMBERS = 10_000


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


async def _body(request: Request) -> Any:
    from engine.api import read_body

    body = await read_body(request, _MAX_BODY)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValidationError(f"malformed JSON: {exc}", field="body", code="invalid_json") from None


def recs_routes(keys: KeyRing, store: Callable[[], RecsStore], shards: Callable[[], Any]) -> list:
    """The catalog and segment routes; `store` and `shards` are resolved per request."""

    async def put_product(request: Request) -> Response:
        keys.require(request.headers.get("authorization"), ADMIN)
        product = normalize_product(await _body(request), request.path_params["product_id"])
        await store().put_products([product])
        return _json(product)

    async def get_product(request: Request) -> Response:
        keys.require(request.headers.get("authorization"), ADMIN)
        pid = request.path_params["product_id"]
        found = (await store().get_products([pid])).get(pid)
        if found is None:
            raise NotFound(f"no product {pid!r}", field="product_id")
        return _json(found)

    async def bulk(request: Request) -> Response:
        keys.require(request.headers.get("authorization"), ADMIN)
        data = await _body(request)
        items = data.get("products") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise ValidationError('the body must be {"products": [...]}', field="products")
        if len(items) > MAX_BULK:
            raise ValidationError(f"at most {MAX_BULK} products a call", field="products")
        accepted, rejected = [], []
        for n, item in enumerate(items):
            try:
                accepted.append(normalize_product(item, prefix=f"products[{n}]."))
            except ValidationError as exc:
                rejected.append(
                    {"index": n, "code": exc.code, "message": exc.message, "field": exc.field}
                )
        await store().put_products(accepted)
        return _json({"upserted": len(accepted), "rejected": rejected})

    async def segment(request: Request) -> Response:
        keys.require(request.headers.get("authorization"), ADMIN)
        name = request.path_params["name"]
        raw = request.query_params.get("limit", "100")
        limit = whole_number(raw)
        if limit is None or limit > _MAX_MEMBERS:
            raise ValidationError(f"limit must be 0-{_MAX_MEMBERS}", field="limit")
        found = await shards().segment_members(name, limit)
        if found is None:
            raise NotFound(f"no segment {name!r}", field="name")
        return _json({"segment": name, **found})

    return [
        Route("/v1/catalog/products", bulk, methods=["POST"]),
        Route("/v1/catalog/products/{product_id:path}", put_product, methods=["PUT"]),
        Route("/v1/catalog/products/{product_id:path}", get_product, methods=["GET"]),
        Route("/v1/segments/{name}", segment, methods=["GET"]),
    ]
