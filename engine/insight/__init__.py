"""What Nudge learns about customers beyond the profile: RFM, model features, models.

Pure parts (stdlib only): sketch (mergeable quantile sketches), rfm
(quintiles and named segments), features (the model feature schema),
live (a shard's LiveInsight), retail (transaction files). With
scikit-learn: model (model files and the Registry shards score with) and
train (`nudge train`). report is `nudge rfm`.

Public surface:
    LiveInsight(co=..., rfm=..., alpha=..., models=...)   beside a Partition
    Population, rfm_record, segment_of, SEGMENTS
    DDSketch, LinearSketch
    features(profile, at), FEATURES, schema()
    load_model(path), save_model(path, data), Registry(dir, names)
"""

from __future__ import annotations

from engine.insight.features import FEATURES, features, schema
from engine.insight.live import LiveInsight
from engine.insight.model import Model, Registry, load_model, save_model
from engine.insight.rfm import SEGMENTS, Population, rfm_record, segment_of
from engine.insight.sketch import DDSketch, LinearSketch

__all__ = [
    "FEATURES",
    "SEGMENTS",
    "DDSketch",
    "LinearSketch",
    "LiveInsight",
    "Model",
    "Population",
    "Registry",
    "features",
    "load_model",
    "rfm_record",
    "save_model",
    "schema",
    "segment_of",
]
