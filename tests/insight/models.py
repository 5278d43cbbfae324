"""Small real models for tests: scikit-learn fitted on synthetic rows in milliseconds."""

from __future__ import annotations

import random
from pathlib import Path

from engine.insight.features import FEATURES
from engine.insight.model import save_model


def fit_churn(seed: int = 0):
    """A classifier that learned: one order means churn, several mean staying."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    rng = random.Random(seed)
    rows, labels = [], []
    for _ in range(400):
        row = [rng.uniform(0, 100) for _ in FEATURES]
        row[1] = float(rng.randint(1, 6))  # frequency
        rows.append(row)
        labels.append(1 if row[1] < 2 else 0)
    return HistGradientBoostingClassifier(max_iter=20, random_state=seed).fit(rows, labels)


def write_model(directory: Path, name: str = "churn", *, version: int = 1, **extra) -> Path:
    """A valid model file for `name`."""
    path = directory / f"{name}.model"
    data = {
        "name": name,
        "version": version,
        "label": "test",
        "threshold": 0.5,
        "estimator": fit_churn(version),
        **extra,
    }
    save_model(path, data)
    return path
