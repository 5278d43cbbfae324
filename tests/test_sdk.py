"""An unmodified Segment SDK delivers to Nudge (gzip batches, Basic auth)."""

from __future__ import annotations

import httpx
from segment.analytics.client import Client

ADMIN = {"Authorization": "Bearer dev-admin-key"}


def test_segment_python_sdk_gzip_batches(local_api) -> None:
    base, _ = local_api
    errors: list = []
    sdk = Client(
        write_key="dev-write-key",
        host=base,
        gzip=True,
        sync_mode=False,
        upload_size=50,
        on_error=lambda exc, batch: errors.append(exc),
        max_retries=0,
    )
    sdk.identify("sdk-user", {"email": "sdk@example.com", "first_name": "Sam"})
    for n in range(120):
        sdk.track("sdk-user", "Product Viewed", {"product_id": f"p{n % 7}", "category": "shoes"})
    sdk.track("sdk-user", "Product Added", {"product_id": "p1", "price": 20.0, "quantity": 2})
    sdk.page("sdk-user", "Shop", "Home")
    sdk.flush()
    sdk.shutdown()
    assert errors == []
    profile = httpx.get(f"{base}/v1/profiles/sdk-user", headers=ADMIN, timeout=10).json()
    assert profile["counts"] == {"Product Viewed": 120, "Product Added": 1, "Page Viewed": 1}
    assert profile["traits"]["first_name"] == "Sam"
    assert profile["cart_total"] == 40.0
