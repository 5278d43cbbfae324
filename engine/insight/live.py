"""What a shard learns from each event beyond the profile itself (pure, no I/O).

`LiveInsight` sits beside a Partition:
- co-occurrence counts for collaborative filtering (engine.recs.cooccur),
  handed over at each flush (`take_counts`) to be merged with every shard's;
- this shard's share of the RFM population (engine.insight.rfm), published
  at each flush, and the merged population of all shards the scores use;
- products as events describe them, for products missing from the catalog;
- the catalog itself (kept fresh by the shard), to enrich events that carry
  only a product id;
- the customers whose model features changed, scored in batches by `score`.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from engine.insight.features import FEATURE_EVENTS, features
from engine.insight.rfm import Population, rfm_record, values_of
from engine.profile import product_key
from engine.recs.catalog import event_facts
from engine.recs.cooccur import ADD, PURCHASE, VIEW, CoCounts, CoSettings, history_of

_ENRICHED = ("category", "name", "price", "url", "image_url")
_SEEN_MAX = 10_000  # products described per flush, at most
SCORE_BATCH = 2_000  # customers scored per call, at most (about 35 ms with a boosted model)


class LiveInsight:
    """A shard's recommendation counts, RFM population and scoring queue."""

    def __init__(
        self,
        *,
        co: CoSettings | None = None,
        rfm: bool = True,
        alpha: float = 0.01,
        models: bool = False,
    ):
        self.co = co
        self.counts = CoCounts(co) if co is not None else None
        self.rfm = rfm
        self.alpha = alpha
        self.population = Population(alpha=alpha)  # this shard's buyers
        self.merged: Population | None = None  # every shard's, as of the last merge
        self.catalog: dict[str, dict] = {}
        self.described: dict[str, dict] = {}  # products events described since the last flush
        self.models = models
        self.to_score: set[str] = set()

    # -- events ------------------------------------------------------------------------
    def enrich(self, event: dict) -> None:
        """Fill a product event's missing category, name, price and links from the catalog."""
        props = event.get("properties")
        if not props:
            return
        pid = props.get("product_id")
        if pid is None:
            return
        product = self.catalog.get(str(pid))
        if product is None:
            return
        for name in _ENRICHED:
            if props.get(name) is None and product.get(name) is not None:
                props[name] = product[name]

    def on_applied(self, profile: Any, event: dict) -> bool:
        """Learn from one applied event; True when the profile itself changed (RFM)."""
        name = event.get("event")
        if name is None:
            return False
        changed = False
        # Counted as of when it arrived, if the client's timestamp is later: forward
        # decay weighs by time, and one view stamped in 2099 outweighed a shop's traffic.
        ts = event["ts"]
        received = event.get("receivedAt")
        if received is not None and ts > received:
            ts = received
        if name == PURCHASE:
            props = event.get("properties") or {}
            if self.counts is not None:
                self._count_order(profile, props, ts)
            if self.rfm:
                changed = self._rescore_rfm(profile, event["ts"])
        elif name in (VIEW, ADD):
            props = event.get("properties") or {}
            product = product_key(props)
            if product is not None:
                if self.counts is not None:
                    weight = self.co.view_weight if name == VIEW else self.co.add_weight
                    self.counts.observe_one(profile, product, weight, ts, props.get("category"))
                if product not in self.catalog and product not in self.described:
                    self._describe(product, props)
        if self.models and name in FEATURE_EVENTS:
            self.to_score.add(profile.id)
        return changed

    def _count_order(self, profile: Any, props: dict, ts: float) -> None:
        items: list[str] = []
        categories: dict[str, str] = {}
        for line in props.get("products") or ():
            if isinstance(line, dict) and (pid := product_key(line)) is not None:
                if pid not in items:
                    items.append(pid)
                category = line.get("category")
                known = self.catalog.get(pid)
                if known is None:
                    if pid not in self.described:
                        self._describe(pid, line)
                elif category is None:
                    category = known.get("category")  # order lines are enriched too
                if category.__class__ is str:
                    categories[pid] = category
        if items:
            history = history_of(profile, ts, self.co, items)
            self.counts.observe(items, self.co.purchase_weight, ts, history, categories)

    def _describe(self, product: str, props: dict) -> None:
        if len(self.described) >= _SEEN_MAX:
            return
        described = event_facts(props)
        if described:
            self.described[product] = described

    # -- RFM ---------------------------------------------------------------------------
    def _rescore_rfm(self, profile: Any, now: float) -> bool:
        old = profile.rfm
        values = values_of(profile)
        if old is not None and old.get("k") is not None:
            self.population.remove(tuple(old["k"]))
        if values is None:
            profile.rfm = None
            return old is not None
        self.population.add(values)
        profile.rfm = rfm_record(values, self.scoring_population(), now)
        return True

    def scoring_population(self) -> Population:
        """Every shard's population as of the last merge, unless this shard's own is better.

        The merged one is at most a flush old, and ranking against it is a binary
        search (its index is built once per merge, not once per order). Before
        the first merge, or while the merge knows fewer than half as many buyers
        as this shard alone (a new shop filling up), the shard's own is used.
        """
        merged = self.merged
        if merged is not None and len(merged) > 0 and 2 * len(merged) >= len(self.population):
            return merged
        return self.population

    def refresh(self, profile: Any, now: float) -> bool:
        """Rescore RFM against the current population (the periodic re-check)."""
        if not self.rfm or profile.rfm is None:
            return False
        values = tuple(profile.rfm["k"])
        record = rfm_record(values, self.scoring_population(), now)
        if record["score"] == profile.rfm["score"]:
            profile.rfm["recency_days"] = record["recency_days"]
            profile.rfm["at"] = now
            return False
        profile.rfm = record
        return True

    def on_merged(self, profile: Any, now: float) -> None:
        """A profile absorbed another identity: its values changed."""
        if self.rfm:
            self._rescore_rfm(profile, now)
        if self.models:
            self.to_score.add(profile.id)

    def on_removed(self, profile: Any) -> None:
        """A profile left this shard (erased or merged away): forget its values."""
        old = profile.rfm
        if old is not None and old.get("k") is not None:
            self.population.remove(tuple(old["k"]))
        self.to_score.discard(profile.id)

    def rebuild(self, profiles: Any) -> None:
        """The population of restored profiles (after loading a checkpoint).

        Buyers checkpointed before RFM existed are counted from their orders
        and scored against the rebuilt population.
        """
        self.population = Population(alpha=self.alpha)
        unscored = []
        for profile in profiles:
            old = profile.rfm
            if old is not None and old.get("k") is not None:
                self.population.add(tuple(old["k"]))
            elif self.rfm and (values := values_of(profile)) is not None:
                self.population.add(values)
                unscored.append((profile, values))
        for profile, values in unscored:
            profile.rfm = rfm_record(values, self.population, profile.last_seen or values[0])

    # -- flush -------------------------------------------------------------------------
    def take_counts(
        self, max_pairs: int | None = None, carry: int | None = None
    ) -> CoCounts | None:
        """Co-occurrence counted since the last call (None when there is none).

        `max_pairs` and `carry` as in CoCounts.take: the lightest pairs may wait.
        """
        if self.counts is None or not (self.counts or self.counts.pair_count()):
            return None
        return self.counts.take(max_pairs, carry)

    def take_counts_steps(
        self, max_pairs: int | None = None, carry: int | None = None
    ) -> Generator[None, None, CoCounts | None]:
        """`take_counts` a piece at a time (CoCounts.take_steps); yields between pieces."""
        if self.counts is None or not (self.counts or self.counts.pair_count()):
            return None
        return (yield from self.counts.take_steps(max_pairs, carry))

    def take_described(self) -> dict[str, dict]:
        """Products described by events since the last call."""
        described, self.described = self.described, {}
        return described

    # -- models ------------------------------------------------------------------------
    def score(self, profiles: dict[str, Any], models: dict[str, Any], now: float) -> list[Any]:
        """Score up to SCORE_BATCH queued customers with every model, in one batch each;
        the changed profiles. The rest stay queued for the next call."""
        queued = self.to_score
        if len(queued) <= SCORE_BATCH:
            self.to_score = set()
        else:
            # A model listed before its file existed, or a shard's first scoring after
            # a restart, queues everyone: one batch of 20,000 held the shard 335 ms.
            queued = [queued.pop() for _ in range(SCORE_BATCH)]
        batch = [profiles[c] for c in queued if c in profiles]
        if not batch or not models:
            return []
        rows = [features(p, now) for p in batch]
        changed: dict[str, Any] = {}
        for name, model in models.items():
            for profile, p in zip(batch, model.predict(rows), strict=True):
                p = round(p, 4)
                label = p >= model.threshold
                scores = profile.scores
                if scores is None:
                    scores = profile.scores = {}
                old = scores.get(name)
                if old is not None and old["p"] == p and old["v"] == model.version:
                    continue
                scores[name] = {"p": p, "label": label, "v": model.version, "at": now}
                changed[profile.id] = profile
        return list(changed.values())
