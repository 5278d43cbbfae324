"""The `[rfm]` and `[models]` sections of config.toml."""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.errors import ConfigError

_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class RfmConfig:
    """Live RFM scores and the re-check of time-dependent segments."""

    rfm_enabled: bool = True
    # relative accuracy of the frequency and monetary sketches
    sketch_accuracy: float = 0.01
    # customers with no new events get their RFM and segments re-checked this often
    recheck_hours: float = 24.0


@dataclass(frozen=True)
class ModelsConfig:
    """Trained models the shards load and score customers with."""

    models_dir: str = "./models"
    # model names to load from models_dir (each NAME.model, written by `nudge train NAME`)
    active_models: tuple[str, ...] = ()
    # customers whose features changed are scored in one batch this often
    score_interval_ms: int = 1000
    # how often shards look for a new model file
    reload_interval_s: float = 10.0
    # retrain every active model from live profiles this often (0: never)
    retrain_interval_hours: float = 0.0


def check(rfm: RfmConfig, models: ModelsConfig) -> None:
    """Refuse [rfm] and [models] settings that cannot work; errors name the key."""
    if not 0 < rfm.sketch_accuracy < 0.5:
        raise ConfigError(
            "rfm.sketch_accuracy must be between 0 and 0.5", field="rfm.sketch_accuracy"
        )
    if rfm.recheck_hours < 0:
        raise ConfigError("rfm.recheck_hours must be 0 (never) or more", field="rfm.recheck_hours")
    for n, name in enumerate(models.active_models):
        if not _MODEL_NAME.match(name):
            raise ConfigError(
                f"models.active_models[{n}] {name!r} is not a model name",
                field=f"models.active_models[{n}]",
            )
    if models.score_interval_ms < 1 or models.reload_interval_s <= 0:
        raise ConfigError(
            "models.score_interval_ms and models.reload_interval_s must be positive",
            field="models",
        )
    if models.retrain_interval_hours < 0:
        raise ConfigError(
            "models.retrain_interval_hours must be 0 (never) or more",
            field="models.retrain_interval_hours",
        )
