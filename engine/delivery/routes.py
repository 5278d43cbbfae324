"""The HTTP shell of delivery (admin key): outcomes, and the dead-letter stream.

GET  /v1/delivery            outcome counters per rule and variant, outbox backlog, dead letters
GET  /v1/dlq?limit=100       dead letters, oldest first
GET  /v1/dlq/{id}            one dead letter
POST /v1/dlq/replay          {"ids": ["2:1700000000000-0", ...]} or {"all": true}
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
from engine.config import AuthConfig
from engine.delivery.ledger import Ledger
from engine.errors import NotFound, ValidationError

_JSON = "application/json"


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type=_JSON)


async def summary(ledger: Ledger) -> dict:
    """Outcomes per rule and variant, with the outbox backlog and the dead letters waiting."""
    # The backlog first: a send leaves the outbox in the transaction that counts its
    # outcome, so a backlog read as empty is then matched by every outcome. Counts read
    # first could miss sends finished between the two reads.
    backlog = await ledger.backlog()
    pending = await ledger.pending()
    dead_letters = await ledger.dead_letter_count()
    return {
        "outcomes": await ledger.counts(),
        "backlog": backlog,
        "pending": pending,
        "dead_letters": dead_letters,
    }


async def replay(ledger: Ledger, ids: list[str] | None) -> list[dict]:
    """Replay the named dead letters (all of them when `ids` is None)."""
    every = ids is None
    if ids is None:
        ids = [letter["id"] for letter in await ledger.dead_letters(count=100_000)]
    replayed = []
    for letter_id in ids:
        try:
            replayed.append({"id": letter_id, "outbox_id": await ledger.replay(letter_id)})
        except NotFound:
            if not every:
                raise
            # replayed by someone else since the list was read: it is not dead any more
    return replayed


def delivery_routes(*, auth: AuthConfig, ledger: Callable[[], Ledger]) -> list[Route]:
    """The routes; `ledger()` returns the app's Ledger once it has started."""
    keys = KeyRing(auth)

    async def get_summary(request: Request) -> Response:
        keys.require(request.headers.get("authorization"), ADMIN)
        return _json(await summary(ledger()))

    async def list_letters(request: Request) -> Response:
        keys.require(request.headers.get("authorization"), ADMIN)
        raw = request.query_params.get("limit", "100")
        limit = whole_number(raw)
        if limit is None or not 1 <= limit <= 10_000:
            raise ValidationError("limit must be 1-10000", field="limit")
        letters = await ledger().dead_letters(count=limit)
        return _json({"dead_letters": letters})

    async def get_letter(request: Request) -> Response:
        keys.require(request.headers.get("authorization"), ADMIN)
        return _json(await ledger().dead_letter_get(request.path_params["letter_id"]))

    async def post_replay(request: Request) -> Response:
        keys.require(request.headers.get("authorization"), ADMIN)
        try:
            body = orjson.loads(await request.body() or b"{}")
        except orjson.JSONDecodeError:
            raise ValidationError("malformed JSON", field="body", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ValidationError("the body must be an object", field="body")
        if body.get("all") is True:
            ids = None
        else:
            ids = body.get("ids")
            if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
                raise ValidationError('send {"ids": [...]} or {"all": true}', field="ids")
        return _json({"replayed": await replay(ledger(), ids)})

    return [
        Route("/v1/delivery", get_summary, methods=["GET"]),
        Route("/v1/dlq", list_letters, methods=["GET"]),
        Route("/v1/dlq/replay", post_replay, methods=["POST"]),
        Route("/v1/dlq/{letter_id}", get_letter, methods=["GET"]),
    ]
