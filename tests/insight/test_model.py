from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from engine.errors import ModelError
from engine.insight.live import LiveInsight
from engine.insight.model import Registry, load_model
from engine.partition import Partition
from tests.insight.models import write_model
from tests.insight.test_rfm import T0, order

HEADER = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"


def test_a_model_file_round_trips_and_scores(tmp_path: Path) -> None:
    model = load_model(write_model(tmp_path, version=3), name="churn")
    assert model.version == 3 and model.threshold == 0.5
    one, many = [0.0] * 13, [0.0] * 13
    one[1], many[1] = 1.0, 5.0
    p_one, p_many = model.predict([one, many])
    assert p_one > 0.5 > p_many


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"\x00garbage, not a pickle", "is corrupt"),
        (pickle.dumps({"format": "something-else"}), "not a nudge model file"),
        (pickle.dumps(["a", "list"]), "not a nudge model file"),
    ],
)
def test_bad_files_are_refused_with_a_clear_error(
    tmp_path: Path, body: bytes, problem: str
) -> None:
    path = tmp_path / "churn.model"
    path.write_bytes(body)
    with pytest.raises(ModelError, match=problem):
        load_model(path)


def test_a_model_of_another_feature_schema_is_refused(tmp_path: Path) -> None:
    path = write_model(tmp_path, schema={"version": 0, "features": ["recency", "frequency"]})
    with pytest.raises(ModelError, match="trained on features") as caught:
        load_model(path)
    assert caught.value.code == "schema_mismatch"


def test_a_corrupt_model_is_refused_and_the_old_one_keeps_scoring(tmp_path: Path) -> None:
    write_model(tmp_path, version=1)
    registry = Registry(tmp_path, ("churn",))
    assert registry.reload_all()
    partition = Partition(lambda c: True, insight=LiveInsight(co=None, models=True))
    partition.apply(order("ann", T0, 10.0, 1))
    assert partition.score(registry.models, T0) == 1
    assert partition.profiles["ann"].scores["churn"]["v"] == 1

    path = tmp_path / "churn.model"
    path.write_bytes(b"truncated" + path.read_bytes()[:100])
    os.utime(path, (T0 + 10, T0 + 10))  # a new mtime: the registry looks again
    assert not registry.reload_all()
    assert registry.models["churn"].version == 1
    assert "corrupt" in registry.status()["churn"]["error"]

    partition.apply(order("bob", T0 + 1, 10.0, 2))
    partition.apply(order("bob", T0 + 2, 10.0, 3))
    assert partition.score(registry.models, T0 + 3) == 1  # scored by version 1, still serving
    assert partition.profiles["bob"].scores["churn"]["v"] == 1
    assert (
        partition.profiles["bob"].scores["churn"]["p"]
        < partition.profiles["ann"].scores["churn"]["p"]
    )

    write_model(tmp_path, version=2)
    assert registry.reload_all() and registry.models["churn"].version == 2
    assert registry.status()["churn"] == {"version": 2, "error": None}


def test_train_command_reports_model_and_baseline(tmp_path: Path, capsys) -> None:
    from engine.insight.train import main

    lines, n = [], 0
    for c in range(150):  # loyal customers (c % 3 != 0) buy monthly; the others once
        months = range(1, 12) if c % 3 else [2]
        for month in months:
            n += 1
            lines.append(f"{n},A{c % 7},x,2,2011-{month:02d}-05 10:00:00,{1 + c % 5}.0,{c}.0,UK")
    data = tmp_path / "t.csv"
    data.write_text(HEADER + "\n".join(lines) + "\n")
    code = main(["churn", "--data", str(data), "--out", str(tmp_path), "--folds", "3"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "HistGradientBoosting" in out and "baseline: RFM score" in out
    model = load_model(tmp_path / "churn.model", name="churn")
    assert model.version == 1
    main(["churn", "--data", str(data), "--out", str(tmp_path), "--folds", "3"])
    assert load_model(tmp_path / "churn.model").version == 2


def test_a_backlog_of_customers_is_scored_a_batch_at_a_time(tmp_path: Path) -> None:
    # A model listed before its file existed queued everyone, and the first scoring
    # was one batch of them all (20,000 customers held the shard loop 335 ms).
    from engine.insight.live import SCORE_BATCH

    partition = Partition(lambda c: True, insight=LiveInsight(co=None, models=True))
    customers = SCORE_BATCH + 500
    for n in range(customers):
        partition.apply(order(f"c{n}", T0 + n, 10.0 + n % 50, n))
    assert len(partition.insight.to_score) == customers
    models = {"churn": load_model(write_model(tmp_path), name="churn")}
    assert partition.score(models, T0 + customers) == SCORE_BATCH
    assert len(partition.insight.to_score) == 500
    assert partition.score(models, T0 + customers) == 500
    scored = [p for p in partition.profiles.values() if p.scores and "churn" in p.scores]
    assert len(scored) == customers and not partition.insight.to_score
