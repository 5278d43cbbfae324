"""Training from the live profiles checkpointed in Redis, on demand and on a schedule."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from actors.insight import InsightSettings, ShardInsight
from engine.config import Config, EngineConfig
from engine.insight.live import LiveInsight
from engine.insight.model import load_model
from engine.insight.settings import ModelsConfig
from engine.insight.train import train
from engine.partition import Partition
from engine.store import Store, connect
from tests.insight.test_rfm import order

DAY = 86400.0


async def checkpoint_buyers(redis_url: str, now: float) -> Partition:
    """120 buyers in Redis: two in three buy every 20 days up to now, the rest stopped."""
    partition = Partition(lambda c: True, insight=LiveInsight(co=None))
    n = 0
    for c in range(120):
        loyal = c % 3 != 0
        last = now - 5 * DAY if loyal else now - 150 * DAY
        for k in range(8 if loyal else 2):
            n += 1
            partition.apply(order(f"c{c}", last - k * 20 * DAY, 10.0 + c % 7, n))
    store = Store(connect(redis_url), 1)
    try:
        await store.save_checkpoint(0, partition.take_changes(), "1-0")
    finally:
        await store.close()
    return partition


async def test_train_from_profiles_takes_features_as_of_ninety_days_ago(
    redis_url: str, tmp_path: Path
) -> None:
    now = time.time()
    await checkpoint_buyers(redis_url, now)
    config = Config(engine=EngineConfig(shards=1, redis_url=redis_url))
    lines: list[str] = []
    result = await _in_thread(
        lambda: train(
            "churn",
            from_profiles=True,
            config=config,
            out=str(tmp_path),
            folds=3,
            now=now,
            echo=lines.append,
        )
    )
    assert "120 live profiles" in lines[0]
    assert result["rows"] == 120  # everyone had bought 90 days ago
    assert result["model"]["positive_rate"] == 40 / 120  # the stopped third
    assert result["model"]["auc"] > 0.9  # stopping is visible in recency as of the cut
    assert load_model(tmp_path / "churn.model", name="churn").version == 1


@pytest.mark.slow  # a child process: `nudge train` imports scikit-learn
async def test_scheduled_retraining_writes_a_model_the_shards_pick_up(
    redis_url: str, tmp_path: Path
) -> None:
    now = time.time()
    partition = await checkpoint_buyers(redis_url, now)
    models = tmp_path / "models"
    config_file = tmp_path / "config.toml"
    config_file.write_text(
        '[models]\nactive_models = ["churn"]\n'
    )  # Redis and dir come from the shard
    settings = InsightSettings(
        models=ModelsConfig(
            models_dir=str(models), active_models=("churn",), retrain_interval_hours=1e-9
        ),
        config_path=str(config_file),
    )
    insight = ShardInsight(0, 1, settings)
    await insight.start(connect(redis_url), redis_url=redis_url)
    try:
        await insight.run_due(partition, now)
        assert insight._retraining is not None
        await insight._retraining  # `nudge train churn --from-profiles` in a child process
        assert insight.registry.reload_all()
        assert insight.registry.models["churn"].version == 1
    finally:
        await insight.close()


async def _in_thread(fn):
    import asyncio

    return await asyncio.get_running_loop().run_in_executor(None, fn)
