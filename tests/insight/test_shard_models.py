"""Models in a real shard loop on a real Redis: scored live, a corrupt file refused."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

from actors.insight import InsightSettings
from actors.shard import ShardActor
from engine.config import EngineConfig
from engine.insight.settings import ModelsConfig
from engine.store import Store, connect
from tests.factories import normalized, track
from tests.insight.models import write_model

RULES = """
[segment.churn_risk]
if = "score('churn') >= 0.5"
"""


async def until(check, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_shard_scores_customers_and_keeps_the_old_model_on_a_bad_file(
    redis_url: str, tmp_path: Path
) -> None:
    write_model(tmp_path, version=1)
    models = ModelsConfig(
        models_dir=str(tmp_path),
        active_models=("churn",),
        score_interval_ms=10,
        reload_interval_s=0.05,
    )
    actor = ShardActor(
        0,
        1,
        dataclasses.replace(EngineConfig(shards=1), checkpoint_interval_ms=20),
        redis_url,
        rules=((RULES, "test.toml"),),
        insight=InsightSettings(models=models),
        autostart=False,
    )
    await actor.start()
    store = Store(connect(redis_url), 1)
    try:
        await store.append([normalized(track("ann", "Order Completed", revenue=10))])

        async def ann_scored() -> bool:
            found = (await actor.get_profiles(["ann"]))[0]
            return bool(found and found.get("scores"))

        await until(ann_scored)
        ann = (await actor.get_profiles(["ann"]))[0]
        assert ann["scores"]["churn"]["v"] == 1 and ann["scores"]["churn"]["label"] is True
        assert (await actor.segment_members("churn_risk", 5))["members"] == ["ann"]

        path = tmp_path / "churn.model"
        path.write_bytes(b"not a model at all")
        os.utime(path, (1e9, 1e9))

        async def refused() -> bool:
            status = (await actor.status())["insight"]["models"]["churn"]
            return status["error"] is not None

        await until(refused)
        status = (await actor.status())["insight"]["models"]["churn"]
        assert status["version"] == 1 and "corrupt" in status["error"]

        await store.append([normalized(track("bob", "Order Completed", revenue=10))])

        async def bob_scored() -> bool:
            found = (await actor.get_profiles(["bob"]))[0]
            return bool(found and found.get("scores"))

        await until(bob_scored)  # the refused file changed nothing: version 1 scores bob
        assert (await actor.get_profiles(["bob"]))[0]["scores"]["churn"]["v"] == 1
    finally:
        await actor.stop()
        await store.close()
