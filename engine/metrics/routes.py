"""GET /metrics: the Prometheus text exposition (admin key as Bearer, or open)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engine.auth import ADMIN, KeyRing
from engine.config import MetricsConfig
from engine.metrics.collect import MetricsCollector


def metrics_routes(
    config: MetricsConfig, keys: KeyRing, collector: MetricsCollector
) -> list[Route]:
    """The /metrics route."""

    async def metrics(request: Request) -> Response:
        if config.metrics_auth != "open":
            keys.require(request.headers.get("authorization"), ADMIN)
        body = await collector.text()
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return [Route("/metrics", metrics, methods=["GET"])]
