"""The `[rfm]` and `[models]` sections of config.toml."""

from __future__ import annotations

from dataclasses import dataclass


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

    dir: str = "./models"
    # model names to load from dir (each NAME.model, written by `nudge train NAME`)
    active: tuple[str, ...] = ()
    # customers whose features changed are scored in one batch this often
    score_interval_ms: int = 1000
    # how often shards look for a new model file
    reload_interval_s: float = 10.0
    # retrain every active model from live profiles this often (0: never)
    retrain_interval_hours: float = 0.0
