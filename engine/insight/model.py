"""Model files: write, load and check them; the registry the shards score with.

A model file is a pickle of a plain dict (scikit-learn estimators pickle):

    {"format": "nudge-model", "format_version": 1, "name": "churn", "version": 3,
     "label": "no purchase in the next 90 days", "schema": {"version": 1, "features": [...]},
     "threshold": 0.42, "estimator": <fitted classifier>, "metrics": {...}, "trained_at": ...}

Only load model files you wrote yourself (`nudge train`): unpickling runs code.
`load_model` refuses, with a ModelError naming the problem, a file that is
unreadable, corrupt, of another format or feature schema, or whose estimator
cannot score; `Registry.reload` then keeps the model it had.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import ModelError
from engine.insight.features import FEATURES, schema

log = logging.getLogger(__name__)

FORMAT = "nudge-model"
FORMAT_VERSION = 1
_threads_limited = False


def _one_thread() -> None:
    """Score on the calling thread only (once per process).

    scikit-learn's tree ensembles predict with OpenMP threads; on a shard that
    owns one core beside other shards they only fight each other: measured on
    2 cores, a 65-row batch takes 1.8 ms on one thread and 6.4 ms on all.
    """
    global _threads_limited
    if not _threads_limited:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1, user_api="openmp")
        _threads_limited = True


@dataclass(frozen=True)
class Model:
    """A loaded, checked model."""

    name: str
    version: int
    threshold: float
    estimator: Any
    path: str = ""
    mtime: float = 0.0
    label: str = ""

    def predict(self, rows: list[list[float]]) -> list[float]:
        """Probability of the label for each feature row (one batched call)."""
        if not rows:
            return []
        _one_thread()
        probabilities = self.estimator.predict_proba(rows)
        return [float(p[1]) for p in probabilities]


def model_path(directory: str | Path, name: str) -> Path:
    """Where the model called `name` lives."""
    return Path(directory) / f"{name}.model"


def save_model(path: str | Path, data: dict) -> None:
    """Write a model file atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"format": FORMAT, "format_version": FORMAT_VERSION, "schema": schema(), **data}
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as handle:
        pickle.dump(body, handle, protocol=pickle.HIGHEST_PROTOCOL)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def next_version(path: str | Path) -> int:
    """One more than the version of the model at `path` (1 if there is none, or it is bad)."""
    try:
        return load_model(path).version + 1
    except ModelError:
        return 1


def load_model(path: str | Path, *, name: str | None = None) -> Model:
    """Read and check a model file; ModelError says what is wrong with it."""
    path = Path(path)
    where = str(path)
    try:
        raw = path.read_bytes()
        mtime = path.stat().st_mtime
    except OSError as exc:
        raise ModelError(f"cannot read model file {where}: {exc.strerror}", field=where) from exc
    try:
        data = pickle.loads(raw)
    except Exception as exc:
        raise ModelError(
            f"model file {where} is corrupt ({exc.__class__.__name__})", field=where
        ) from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ModelError(f"{where} is not a nudge model file", field=where)
    if data.get("format_version") != FORMAT_VERSION:
        raise ModelError(
            f"{where}: model format {data.get('format_version')!r} is not {FORMAT_VERSION}",
            field=where,
        )
    if name is not None and data.get("name") != name:
        raise ModelError(f"{where} holds model {data.get('name')!r}, not {name!r}", field=where)
    expected = schema()
    if data.get("schema") != expected:
        got = (data.get("schema") or {}).get("features")
        raise ModelError(
            f"{where}: trained on features {got}, this engine computes {list(FEATURES)}; "
            "retrain it with `nudge train`",
            field=where,
            code="schema_mismatch",
        )
    estimator = data.get("estimator")
    version = data.get("version")
    threshold = data.get("threshold")
    if not hasattr(estimator, "predict_proba"):
        raise ModelError(f"{where}: the estimator cannot predict probabilities", field=where)
    if getattr(estimator, "n_features_in_", len(FEATURES)) != len(FEATURES):
        raise ModelError(f"{where}: the estimator expects another number of features", field=where)
    if not isinstance(version, int) or not isinstance(threshold, (int, float)):
        raise ModelError(f"{where}: version or threshold missing", field=where)
    model = Model(
        name=data.get("name", path.stem),
        version=version,
        threshold=float(threshold),
        estimator=estimator,
        path=where,
        mtime=mtime,
        label=str(data.get("label", "")),
    )
    try:  # a model that cannot score one row is not a model
        probe = model.predict([[math.nan] * len(FEATURES)])
    except Exception as exc:
        raise ModelError(f"{where}: the estimator fails to score ({exc})", field=where) from exc
    if len(probe) != 1 or not 0.0 <= probe[0] <= 1.0:
        raise ModelError(f"{where}: the estimator returns no probability", field=where)
    return model


class Registry:
    """The models a shard scores with; a bad file never replaces a good model."""

    def __init__(self, directory: str | Path, names: tuple[str, ...]):
        self.directory = Path(directory)
        self.names = names
        self.models: dict[str, Model] = {}
        self.errors: dict[str, str] = {}

    def reload(self, name: str) -> bool:
        """Load `name` if its file is new; True when a new model now serves."""
        path = model_path(self.directory, name)
        current = self.models.get(name)
        try:
            mtime = path.stat().st_mtime
        except OSError:
            if current is None:
                self.errors[name] = f"no model file {path}"
            return False
        if current is not None and current.mtime == mtime:
            return False
        try:
            model = load_model(path, name=name)
        except ModelError as exc:
            if self.errors.get(name) != exc.message:
                log.error(
                    "model %s refused: %s; %s",
                    name,
                    exc.message,
                    f"version {current.version} keeps serving" if current else "none serving",
                )
            self.errors[name] = exc.message
            return False
        self.models[name] = model
        self.errors.pop(name, None)
        log.info("model %s version %d loaded from %s", name, model.version, path)
        return True

    def reload_all(self) -> bool:
        """Check every configured model; True if any changed."""
        changed = False
        for name in self.names:
            changed |= self.reload(name)
        return changed

    def status(self) -> dict:
        """Per model: the version serving and the last refusal."""
        return {
            name: {
                "version": self.models[name].version if name in self.models else None,
                "error": self.errors.get(name),
            }
            for name in self.names
        }
