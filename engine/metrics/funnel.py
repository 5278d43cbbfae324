"""Per-rule funnel inside a shard: fired, queued, opened, clicked, converted (pure, no I/O).

Fed with the sends a shard writes to its outbox (at checkpoint) and with the
engagement and order events it applies. Conversions are counted once per send,
for every attribution window the order falls within (last touch: the customer's
latest send), so the console can show "converted within 1h / 1d / 3d / 7d".
Holdout records (deliver = false) go through the same funnel: their conversions
are the baseline an experiment's variants are compared with.

Engagement events are attributed by `properties.send_id` (unique per send), else
by `properties.rule` / `properties.variant` as sent by the tracking links, when
they name a configured rule and one of its variants: a client with the public
write key could otherwise make a counter series per made-up name.
"""

from __future__ import annotations

from engine.metrics.actor import ActorMetrics

OPENED, CLICKED, ORDER = "Email Opened", "Email Link Clicked", "Order Completed"
WATCHED = frozenset({OPENED, CLICKED, ORDER})
WINDOWS = (("1h", 3600.0), ("1d", 86400.0), ("3d", 3 * 86400.0), ("7d", 7 * 86400.0))
STAGES = ("fired", "queued", "opened", "clicked")
NO_VARIANT = "-"

_OPENED_FLAG, _CLICKED_FLAG, _CONVERTED_FLAG = 1, 2, 4


class Funnel:
    """Counts per (rule, variant); remembers the latest sends to attribute engagement."""

    def __init__(
        self,
        metrics: ActorMetrics,
        *,
        max_sends: int = 100_000,
        variants: dict[str, frozenset[str]] | None = None,
    ):
        self.stages = metrics.counter(
            "nudge_funnel_total",
            "Per rule and variant: sends fired (holdouts too), queued for delivery, "
            "opened and clicked (unique per send)",
            ("rule", "variant", "stage"),
        )
        self.conversions = metrics.counter(
            "nudge_funnel_conversions_total",
            "Orders within the attribution window after a rule's send (last touch, once per send)",
            ("rule", "variant", "within"),
        )
        self.max_sends = max_sends
        # rule -> its variant names (NO_VARIANT and holdout among them): who may be named
        self.variants = variants or {}
        # send_id -> [rule, variant, at, flags]; customer -> their latest send_id
        self._sends: dict[str, list] = {}
        self._latest: dict[str, str] = {}

    def on_send(self, send: dict) -> None:
        """A send written to the outbox (a holdout's record too)."""
        rule, variant = send["rule"], send.get("variant") or NO_VARIANT
        inc = self.stages.inc
        inc((rule, variant, "fired"))
        if send.get("deliver", True):
            inc((rule, variant, "queued"))
        sid = send["send_id"]
        self._sends[sid] = [rule, variant, float(send["at"]), 0]
        self._latest[send["customer"]] = sid
        if len(self._sends) > self.max_sends:  # forget the oldest (dicts keep insertion order)
            del self._sends[next(iter(self._sends))]
        if len(self._latest) > self.max_sends:
            del self._latest[next(iter(self._latest))]

    def on_event(self, event: dict) -> None:
        """An applied event whose name is in WATCHED."""
        name = event.get("event")
        if name == ORDER:
            self._order(event)
            return
        flag, stage = (_OPENED_FLAG, "opened") if name == OPENED else (_CLICKED_FLAG, "clicked")
        props = event.get("properties") or {}
        entry = self._sends.get(props.get("send_id")) if props.get("send_id") else None
        if entry is not None:
            if entry[3] & flag:
                return  # unique per send: a second open of the same email is not a new one
            entry[3] |= flag
            if flag == _CLICKED_FLAG and not entry[3] & _OPENED_FLAG:
                entry[3] |= _OPENED_FLAG  # a click proves an open the pixel missed
                self.stages.inc((entry[0], entry[1], "opened"))
            self.stages.inc((entry[0], entry[1], stage))
        elif props.get("rule"):
            rule, variant = str(props["rule"]), str(props.get("variant") or NO_VARIANT)
            if variant in self.variants.get(rule, ()):
                self.stages.inc((rule, variant, stage))

    def _order(self, event: dict) -> None:
        sid = self._latest.get(event["customer"])
        entry = self._sends.get(sid) if sid else None
        if entry is None or entry[3] & _CONVERTED_FLAG:
            return
        delay = float(event.get("ts") or event.get("receivedAt") or 0.0) - entry[2]
        if delay < 0:
            return  # the order came before the email was due
        if delay > WINDOWS[-1][1]:
            return
        entry[3] |= _CONVERTED_FLAG
        for name, seconds in WINDOWS:
            if delay <= seconds:
                self.conversions.inc((entry[0], entry[1], name))
