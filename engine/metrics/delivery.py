"""Metrics of the delivery dispatchers (Ray actors), by the names the dashboard uses.

A dispatcher holds one `DeliveryMetrics`, counts into it, and reports it from a
Ray method the API collects at scrape time:

    self.meters = DeliveryMetrics()
    self.meters.sent(send, "sent", now)          # the final outcome of a send
    async def metrics(self): return self.meters.snapshot()

and the API registers the dispatchers once:
`app.state.metrics.add_actor_source(fn, label="dispatcher")` (engine.metrics.collect).
Sends by outcome and the DLQ depth are not counted here: the scrape reads them from
Redis (the ledger's counters, the dead-letter streams).
"""

from __future__ import annotations

from engine.metrics.actor import ActorMetrics

SENT, FAILED, RETRIED, DEAD_LETTERED, SKIPPED = (
    "sent",
    "failed",
    "retried",
    "dead_lettered",
    "skipped",
)


class DeliveryMetrics:
    """nudge_send_latency_seconds and nudge_esp_requests_total.

    (Sends by rule, variant and outcome, nudge_sends_total, are read at scrape time from
    the delivery ledger's counters in Redis, which survive restarts: not counted here.)
    """

    def __init__(self) -> None:
        self.registry = ActorMetrics()
        self.latency = self.registry.histogram(
            "nudge_send_latency_seconds",
            "From when a send became due (its event's timestamp or its timer) to the ESP's accept",
        )
        self.esp = self.registry.counter(
            "nudge_esp_requests_total",
            "Requests to ESP adapters by ESP and outcome (ok, error, timeout)",
            ("esp", "outcome"),
        )

    def sent(self, send: dict, outcome: str, now: float) -> None:
        """A send's final outcome; a successful one counts its event-to-ESP latency."""
        if outcome == SENT:
            self.latency.observe((), max(now - float(send["at"]), 0.0))

    def esp_request(self, esp: str, outcome: str) -> None:
        """Count one ESP request."""
        self.esp.inc((esp, outcome))

    def snapshot(self) -> list[dict]:
        """Plain data for `ActorMetrics.merge`."""
        return self.registry.snapshot()
