"""Locust users built on the same shopper model as `nudge bench`.

    pip install -e '.[bench]'
    locust -f benchmarks/locustfile.py --host http://127.0.0.1:8000 \
        --headless -u 50 -r 10 -t 2m

Each user is a stream of shopper visits (benchmarks.shoppers: browsing funnels,
carts, purchases, and the retail replay), one POST /v1/batch per visit, and now
and then the send-time content an email of theirs would fetch. Keys come from
NUDGE_WRITE_KEY and NUDGE_CONTENT_KEY (default: the development keys).
`nudge bench` does more (the outbox, engagement, the promise checks); use Locust
when you want its UI, distributed workers or your own user mixes.
"""

from __future__ import annotations

import itertools
import os
import random
import uuid
from datetime import UTC, datetime

from locust import FastHttpUser, between, task

from benchmarks.shoppers import ShopperModel, cycle_retail, retail_sessions

WRITE_KEY = os.environ.get("NUDGE_WRITE_KEY", "dev-write-key")
CONTENT_KEY = os.environ.get("NUDGE_CONTENT_KEY", "dev-content-key")
RETAIL_SHARE = float(os.environ.get("NUDGE_RETAIL_SHARE", "0.3"))
_RETAIL = None


def _retail():
    global _RETAIL
    if _RETAIL is None:
        _RETAIL = cycle_retail(retail_sessions(), f"locust-{uuid.uuid4().hex[:6]}-")
    return _RETAIL


class Shopper(FastHttpUser):
    """One stream of shopper visits."""

    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        """Each user draws its own shoppers (its own seed)."""
        seed = random.getrandbits(32)
        self.model = ShopperModel(seed=seed)
        self.rng = random.Random(seed)
        self.ids = itertools.count()
        self.prefix = uuid.uuid4().hex[:10]
        self.recent: list[str] = []

    @task(20)
    def visit(self) -> None:
        """A visit: its events in one batch, as a Segment SDK would send them."""
        use_retail = self.rng.random() < RETAIL_SHARE
        session = next(_retail()) if use_retail else self.model.session()
        stamp = datetime.now(UTC).isoformat()
        batch = [
            {**m, "messageId": f"{self.prefix}-{next(self.ids)}", "timestamp": stamp}
            for m in session.messages
        ]
        self.client.post("/v1/batch", json={"batch": batch}, auth=(WRITE_KEY, ""), name="/v1/batch")
        self.recent = [session.customer, *self.recent][:50]

    @task(1)
    def content(self) -> None:
        """The blocks an email to a recent shopper would show."""
        if not self.recent:
            return
        customer = self.rng.choice(self.recent)
        with self.client.get(
            f"/v1/content/{customer}?blocks=profile,cart,recommendations",
            headers={"Authorization": f"Bearer {CONTENT_KEY}"},
            name="/v1/content/[customer]",
            catch_response=True,
        ) as reply:
            if reply.status_code in (200, 404):  # a shopper not applied yet is a 404
                reply.success()
