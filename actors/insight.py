"""The shard's periodic insight work: flush and merge counts, score, reload models.

A thin shell around engine.insight.live.LiveInsight, driven from the shard's
loop with `await run_due(...)`; it does nothing until one of its intervals has
passed, so the loop pays a clock read per round when idle.

Every `flush_interval_s`: co-occurrence deltas and product descriptions go to
Redis (ZINCRBY: Redis is the merge), this shard's RFM population is published
and every shard's read back and merged; the catalog is reloaded if its
version moved. Every `score_interval_ms`: customers whose features changed
are scored in batches of up to SCORE_BATCH per model. Every `reload_interval_s`: model files are
checked; a bad one is refused and the previous model keeps serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from engine.insight.live import LiveInsight
from engine.insight.model import Registry
from engine.insight.rfm import Population
from engine.insight.settings import ModelsConfig, RfmConfig
from engine.recs.settings import RecsConfig, co_settings
from engine.recs.store import FlushIncomplete, RecsStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InsightSettings:
    """What a shard needs of [recs], [rfm] and [models] (picklable, for Ray)."""

    recs: RecsConfig = field(default_factory=RecsConfig)
    rfm: RfmConfig = field(default_factory=RfmConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    config_path: str | None = None  # for scheduled retraining


def insight_settings(config: Any, config_path: str | None = None) -> InsightSettings:
    """The shard's share of a full Config, with paths made absolute here.

    Shards run in Ray worker processes whose working directory need not be
    the one `nudge serve` was started from.
    """
    models = dataclasses.replace(
        config.models, models_dir=str(Path(config.models.models_dir).resolve())
    )
    path = str(Path(config_path).resolve()) if config_path else None
    return InsightSettings(config.recs, config.rfm, models, path)


class ShardInsight:
    """Owns one shard's LiveInsight and the I/O around it."""

    def __init__(self, index: int, shards: int, settings: InsightSettings | None):
        self.index = index
        self.shards = shards
        self.settings = settings or InsightSettings()
        models = self.settings.models
        self.registry = Registry(models.models_dir, models.active_models)
        self.store: RecsStore | None = None
        self.catalog_version = -1
        self.flushes = 0
        self.scored = 0
        self.score_s = 0.0
        self.errors = 0
        self._next_flush = 0.0
        self._next_score = 0.0
        self._next_reload = 0.0
        self._next_retrain = time.monotonic() + models.retrain_interval_hours * 3600.0
        self._retraining: asyncio.Task | None = None
        self._flushing: asyncio.Task | None = None
        self.redis_url = ""

    def live(self) -> LiveInsight:
        """A fresh LiveInsight for a (new or recovered) partition."""
        s = self.settings
        return LiveInsight(
            co=co_settings(s.recs) if s.recs.recs_enabled else None,
            rfm=s.rfm.rfm_enabled,
            alpha=s.rfm.sketch_accuracy,
            models=bool(s.models.active_models),
        )

    def recheck_s(self) -> float:
        return self.settings.rfm.recheck_hours * 3600.0

    async def start(self, store_client: Any, *, redis_url: str = "") -> None:
        """Connect and load the models (before the shard replays its stream)."""
        self.store = RecsStore(store_client)
        self.redis_url = redis_url
        self.registry.reload_all()
        if self.index == 0:  # one shard is enough; the next start tries again
            try:
                await self.store.drop_retired()
            except (RedisError, OSError) as exc:
                log.warning("shard 0: could not drop retired recommendation keys: %s", exc)

    async def prime(self, insight: LiveInsight) -> None:
        """Load the catalog and every shard's merged population, as the flushes do.

        Before a (re)started shard applies any event: replayed after a crash, or
        new after a start, its events are enriched and scored against what the
        shard had before, not against nothing until the first flush, up to
        `flush_interval_s` later (a replay decided differently from the live run).
        Redis errors are raised: the shard's recovery retries.
        """
        if self.store is None:
            return
        insight.merged = _merge(await self.store.populations(self.shards))
        if self.settings.recs.enrich_events:
            version = await self.store.catalog_version()
            insight.catalog = await self.store.load_catalog()
            self.catalog_version = version

    async def close(self) -> None:
        if self._retraining is not None:
            self._retraining.cancel()
        await self.settle()
        if self.store is not None:
            await self.store.close()

    async def run_due(self, partition: Any, now: float) -> bool:
        """Do whatever work is due; True when profiles changed (a checkpoint is wanted)."""
        mono = time.monotonic()
        changed = False
        insight = partition.insight
        if insight is None or self.store is None:
            return False
        if self.registry.names and mono >= self._next_reload:
            self._next_reload = mono + self.settings.models.reload_interval_s
            self.registry.reload_all()
        if self.registry.models and mono >= self._next_score:
            self._next_score = mono + self.settings.models.score_interval_ms / 1000.0
            if insight.to_score:
                started = time.perf_counter()
                n = partition.score(self.registry.models, now)
                self.score_s += time.perf_counter() - started
                self.scored += n
                changed = n > 0
        if mono >= self._next_flush and (self._flushing is None or self._flushing.done()):
            interval = self.settings.recs.flush_interval_s
            # Shards start together; after the first flush each keeps its own phase,
            # so their flushes (and the Redis work they cause) take turns.
            phase = interval * self.index / self.shards if self.flushes == 0 else 0.0
            self._next_flush = mono + interval + phase
            # In the background: a flush waits tens of ms on Redis, and the shard
            # keeps applying events meanwhile (counted into fresh counts once the
            # task has taken the old ones, at its first step).
            self._flushing = asyncio.get_running_loop().create_task(
                self._flush(partition, bounded=True)
            )
        retrain = self.settings.models.retrain_interval_hours
        if retrain > 0 and self.index == 0 and mono >= self._next_retrain:
            self._next_retrain = mono + retrain * 3600.0
            if self._retraining is None or self._retraining.done():
                self._retraining = asyncio.get_running_loop().create_task(self._retrain())
        return changed

    async def settle(self) -> None:
        """Wait for a flush running in the background, if any."""
        if self._flushing is not None and not self._flushing.done():
            await asyncio.shield(self._flushing)

    async def flush(self, partition: Any) -> None:
        """All counts and descriptions out; every shard's population and the catalog in."""
        await self.settle()
        await self._flush(partition, bounded=False)

    async def _flush(self, partition: Any, *, bounded: bool) -> None:
        insight = partition.insight
        recs = self.settings.recs
        described = insight.take_described()
        population = insight.population.to_dict()  # snapshot before any await
        if bounded and recs.flush_pairs_per_s > 0:
            budget = max(int(recs.flush_pairs_per_s * recs.flush_interval_s), 1)
            # A piece at a time, letting the shard apply events in between: with
            # many pairs carried, one take would hold its loop for 50-150 ms.
            steps = insight.take_counts_steps(budget, recs.carry_pairs)
            while True:
                try:
                    next(steps)
                except StopIteration as done:
                    counts = done.value
                    break
                await asyncio.sleep(0)
        else:
            counts = insight.take_counts()
        try:
            if counts is not None or described:
                await self.store.flush(
                    counts, described, keep_neighbors=self.settings.recs.keep_neighbors
                )
        except FlushIncomplete as exc:  # descriptions and part of the counts are in Redis
            self._failed(exc)
            self._hand_back(insight, exc.unsent, {})
            return
        except Exception as exc:  # never wedge the shard: keep it all for the next flush
            self._failed(exc)
            self._hand_back(insight, counts, described)
            return
        try:
            parts = await self.store.publish_population(self.index, population, self.shards)
            insight.merged = _merge(parts)
            version = await self.store.catalog_version()
            if self.settings.recs.enrich_events and version != self.catalog_version:
                insight.catalog = await self.store.load_catalog()
                self.catalog_version = version
            self.flushes += 1
        except Exception as exc:  # the counts are in Redis; only the merge or catalog failed
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        self.errors += 1
        log.warning("shard %d: insight flush failed (%s)", self.index, exc)

    @staticmethod
    def _hand_back(insight: Any, counts: Any, described: dict) -> None:
        if counts is not None and insight.counts is not None:
            counts.merge(insight.counts)  # what was counted meanwhile comes on top
            insight.counts = counts
        insight.described = {**described, **insight.described}

    async def _retrain(self) -> None:
        """Retrain every active model from the live profiles, in a child process."""
        models = self.settings.models
        env = {**os.environ, "NUDGE_SHARDS": str(self.shards)}
        if self.redis_url:  # the Redis this shard uses, whatever the child's config says
            env["NUDGE_REDIS_URL"] = self.redis_url
        for name in models.active_models:
            try:
                await self._retrain_one(name, env)
            except Exception:  # a retraining that cannot even start must not kill the shard
                log.exception("retraining %s could not run", name)

    async def _retrain_one(self, name: str, env: dict[str, str]) -> None:
        models = self.settings.models
        args = [sys.executable, "-m", "engine.insight.train", name, "--from-profiles"]
        args += ["--out", models.models_dir]
        if self.settings.config_path:
            args += ["--config", self.settings.config_path]
        process = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env
        )
        _, err = await process.communicate()
        if process.returncode:
            log.warning("retraining %s failed: %s", name, err.decode(errors="replace")[-500:])
        else:
            log.info("retrained %s from live profiles", name)

    def status(self) -> dict:
        """Figures for the shard's status."""
        return {
            "flushes": self.flushes,
            "flush_errors": self.errors,
            "scored": self.scored,
            "score_s": round(self.score_s, 4),
            "models": self.registry.status(),
            "catalog_version": self.catalog_version,
        }

    def carried(self, partition: Any) -> dict:
        """Co-occurrence pairs waiting for a later flush, and those given up."""
        counts = partition.insight.counts if partition.insight is not None else None
        if counts is None:
            return {"carried": 0, "dropped": 0}
        return {"carried": counts.pair_count(), "dropped": counts.dropped}


def _merge(parts: list[dict]) -> Population | None:
    """One population of every shard's published one (None if none was)."""
    merged = None
    for part in parts:
        one = Population.from_dict(part)
        if merged is None:
            merged = one
        else:
            merged.merge(one)
    return merged
