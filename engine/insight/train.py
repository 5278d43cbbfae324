"""`nudge train MODEL --data FILE | --from-profiles`: fit, cross-validate, save a model.

Models (the label, over the `--horizon-days` after the cut, 90 by default):
  churn       no purchase in the next 90 days
  purchase    a purchase in the next 90 days (churn's complement)
  high_value  spend in the next 90 days in the top decile of the population

Rows are the customers who had bought by the cut. With `--data`, the
transactions up to 90 days before the last one are replayed into profiles
(exactly as the shards apply them) and the last 90 days give the labels:
"trained on the first nine months, judged on the last three". With
`--from-profiles`, the live profiles checkpointed in Redis are read and
features are taken as of 90 days ago (engine.insight.features).

Prints cross-validated AUC, PR-AUC and lift in the top decile next to the
plain RFM score (R + F + M against the population at the cut) as baseline,
then fits on every row and writes MODELS_DIR/MODEL.model with a new version.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from engine.insight.features import FEATURES, features, spend_between
from engine.insight.rfm import Population

DAY = 86400.0
MODELS = {
    "churn": "no purchase in the next {days:g} days",
    "purchase": "a purchase in the next {days:g} days",
    "high_value": "spend in the next {days:g} days in the top decile",
}


@dataclass
class Dataset:
    """Feature rows, labels and the RFM baseline score of each row."""

    rows: list[list[float]]
    labels: list[int]
    baseline: list[float]
    cut: float
    label: str


def build_dataset(
    profiles: Iterable[Any],
    model: str,
    cut: float,
    horizon_s: float,
    end: float | None = None,
    future: dict[str, list[tuple[float, float]]] | None = None,
) -> Dataset:
    """Rows for `model`: features as of `cut`, labels from orders in (cut, end].

    The orders after the cut come from `future` (customer -> [(ts, amount)])
    when given, else from each profile's own order log.
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r} (known: {', '.join(MODELS)})")
    end = cut + horizon_s if end is None else end
    buyers = []
    for profile in profiles:
        row = features(profile, cut)
        if row[1] >= 1:  # frequency as of the cut
            buyers.append((profile, row))
    population = Population()
    values = []
    for _profile, row in buyers:
        last = cut - row[0] * DAY if not math.isnan(row[0]) else cut - 365 * DAY
        v = (last, row[1], row[2])
        values.append(v)
        population.add(v)
    if future is None:
        spend = [spend_between(p, cut, end) for p, _ in buyers]
    else:
        spend = []
        for profile, _ in buyers:
            mine = [amount for ts, amount in future.get(profile.id, ()) if cut < ts <= end]
            spend.append((len(mine), sum(mine)))
    if model == "churn":
        labels = [1 if orders == 0 else 0 for orders, _ in spend]
        sign = -1.0  # a high RFM score means a customer unlikely to churn
    elif model == "purchase":
        labels = [1 if orders > 0 else 0 for orders, _ in spend]
        sign = 1.0
    else:
        amounts = sorted(amount for _, amount in spend)
        top = amounts[int(0.9 * (len(amounts) - 1))] if amounts else 0.0
        top = max(top, 1e-9)
        labels = [1 if amount >= top else 0 for _, amount in spend]
        sign = 1.0
    baseline = [sign * sum(population.scores(v)) for v in values]
    label = MODELS[model].format(days=horizon_s / DAY)
    return Dataset([row for _, row in buyers], labels, baseline, cut, label)


def lift_at(scores: list[float], labels: list[int], share: float = 0.1) -> float:
    """Positive rate in the top `share` by score over the overall positive rate."""
    if not labels or not any(labels):
        return 0.0
    ranked = sorted(zip(scores, labels, strict=True), key=lambda pair: -pair[0])
    top = ranked[: max(1, int(len(ranked) * share))]
    return (sum(label for _, label in top) / len(top)) / (sum(labels) / len(labels))


def metrics(scores: list[float], labels: list[int]) -> dict[str, float]:
    """AUC, PR-AUC (average precision) and lift in the top decile."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    return {
        "auc": float(roc_auc_score(labels, scores)),
        "pr_auc": float(average_precision_score(labels, scores)),
        "lift_top_decile": lift_at(scores, labels),
        "positive_rate": sum(labels) / len(labels),
    }


def _estimator(rows: int) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    # shallow and slow: a few thousand customers, a dozen features (tuned by 5-fold CV);
    # leaves of 50 customers, fewer when there are few rows, so a small shop still learns
    return HistGradientBoostingClassifier(
        max_iter=150,
        learning_rate=0.03,
        max_depth=3,
        min_samples_leaf=max(5, min(50, rows // 20)),
        l2_regularization=1.0,
        random_state=0,
    )


def _matrix(rows: list[list[float]]) -> Any:
    """The rows as an array; a feature missing for every row becomes 0.

    scikit-learn cannot bin a column that is all NaN (no products in any
    order, say); constant, it simply never splits, whatever it holds later.
    """
    import numpy as np

    x = np.asarray(rows, dtype=float)
    if len(x):
        empty = np.isnan(x).all(axis=0)
        x[:, empty] = 0.0
    return x


def cross_validate(data: Dataset, folds: int = 5) -> tuple[list[float], dict, dict]:
    """Out-of-fold probabilities, the model's metrics and the baseline's."""
    import numpy as np
    from sklearn.model_selection import StratifiedKFold

    x = _matrix(data.rows)
    y = np.asarray(data.labels)
    if len(set(data.labels)) < 2:
        raise ValueError("every row has the same label: nothing to learn")
    predicted = np.zeros(len(y))
    for train_at, test_at in StratifiedKFold(folds, shuffle=True, random_state=0).split(x, y):
        fitted = _estimator(len(train_at)).fit(x[train_at], y[train_at])
        predicted[test_at] = fitted.predict_proba(x[test_at])[:, 1]
    scores = predicted.tolist()
    return scores, metrics(scores, data.labels), metrics(data.baseline, data.labels)


def best_threshold(scores: list[float], labels: list[int]) -> float:
    """The probability cut with the best F1 on out-of-fold predictions (the profile's label)."""
    ranked = sorted(zip(scores, labels, strict=True), key=lambda pair: -pair[0])
    positives = sum(labels)
    best, best_f1, hits = 0.5, -1.0, 0
    for n, (score, label) in enumerate(ranked, start=1):
        hits += label
        f1 = 2 * hits / (n + positives) if positives else 0.0
        if f1 > best_f1:
            best, best_f1 = score, f1
    return float(best)


def fit_and_save(
    data: Dataset, name: str, directory: str, scores: list[float], report: dict
) -> Any:
    """Fit on every row and write the next version of the model file."""
    import numpy as np

    from engine.insight.model import model_path, next_version, save_model

    estimator = _estimator(len(data.rows)).fit(_matrix(data.rows), np.asarray(data.labels))
    path = model_path(directory, name)
    version = next_version(path)
    save_model(
        path,
        {
            "name": name,
            "version": version,
            "label": data.label,
            "threshold": best_threshold(scores, data.labels),
            "estimator": estimator,
            "metrics": report,
            "rows": len(data.rows),
            "trained_at": time.time(),
        },
    )
    return path, version


# -- sources ------------------------------------------------------------------------------
def profiles_from_file(path: str, until: float) -> tuple[list[Any], float]:
    """Profiles replaying the file's invoices up to `until`, and the last invoice's time."""
    from engine.insight.retail import order_event, read_invoices
    from engine.profile import Limits, Profile, apply_event

    invoices = read_invoices(path)
    limits = Limits()
    profiles: dict[str, Profile] = {}
    for invoice in invoices:
        if invoice.ts > until:
            continue
        profile = profiles.get(invoice.customer)
        if profile is None:
            profile = profiles[invoice.customer] = Profile(invoice.customer)
        apply_event(profile, order_event(invoice), limits)
    return list(profiles.values()), invoices[-1].ts if invoices else 0.0


async def profiles_from_redis(redis_url: str, shards: int) -> list[Any]:
    """Every profile in the shards' Redis checkpoints."""
    import orjson

    from engine.profile import Profile
    from engine.store import Store, connect

    store = Store(connect(redis_url), shards)
    try:
        out = []
        for index in range(shards):
            _, profiles, _, _ = await store.load_checkpoint(index)
            out.extend(Profile.from_dict(orjson.loads(v)) for v in profiles.values())
        return out
    finally:
        await store.close()


def _redis_url(config: Any) -> str:
    from pathlib import Path

    sock = Path(config.engine.data_dir).resolve() / "redis" / "redis.sock"  # the embedded one
    return config.engine.redis_url or f"unix://{sock}"


def train(
    name: str,
    *,
    data: str | None = None,
    from_profiles: bool = False,
    config: Any,
    horizon_days: float = 90.0,
    folds: int = 5,
    out: str | None = None,
    now: float | None = None,
    echo: Any = print,
) -> dict:
    """Build the dataset, cross-validate, print the comparison, save; returns the figures."""
    horizon = horizon_days * DAY
    if data is not None:
        from engine.insight.retail import read_invoices

        invoices = read_invoices(data)
        last = invoices[-1].ts if invoices else 0.0
        cut = last - horizon
        profiles, _ = profiles_from_file(data, cut)
        # labels come from what the file says happened after the cut
        after: dict[str, list[tuple[float, float]]] = {}
        for invoice in invoices:
            if invoice.ts > cut:
                after.setdefault(invoice.customer, []).append((invoice.ts, invoice.amount))
        dataset = build_dataset(profiles, name, cut, horizon, end=last, future=after)
        source = f"{data}: features up to {_day(cut)}, labels to {_day(last)}"
    elif from_profiles:
        profiles = asyncio.run(profiles_from_redis(_redis_url(config), config.engine.shards))
        now = time.time() if now is None else now
        cut = now - horizon
        dataset = build_dataset(profiles, name, cut, horizon, end=now)
        source = f"{len(profiles)} live profiles: features as of {_day(cut)}"
    else:
        raise ValueError("give --data FILE or --from-profiles")
    echo(f"nudge train {name}: {source}")
    echo(f"  rows {len(dataset.rows)}, label '{dataset.label}', positives {sum(dataset.labels)}")
    scores, model_metrics, baseline = cross_validate(dataset, folds)
    echo(f"  {folds}-fold cross-validated:")
    echo(f"  {'':34}{'AUC':>8}{'PR-AUC':>9}{'lift@10%':>10}")
    for label, m in (("HistGradientBoosting", model_metrics), ("baseline: RFM score", baseline)):
        echo(f"  {label:34}{m['auc']:>8.3f}{m['pr_auc']:>9.3f}{m['lift_top_decile']:>10.2f}")
    echo(f"  (positive rate {model_metrics['positive_rate']:.3f}; PR-AUC of chance equals it)")
    report = {"model": model_metrics, "baseline": baseline, "folds": folds}
    path, version = fit_and_save(dataset, name, out or config.models.models_dir, scores, report)
    echo(f"  wrote {path} version {version} ({len(FEATURES)} features)")
    return {**report, "path": str(path), "version": version, "rows": len(dataset.rows)}


def _day(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def main(argv: list[str] | None = None) -> int:
    """Entry point of `nudge train`."""
    parser = argparse.ArgumentParser(prog="nudge train", description=__doc__.split("\n")[0])
    parser.add_argument("model", choices=sorted(MODELS))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="transactions CSV (Online Retail layout)")
    source.add_argument("--from-profiles", action="store_true", help="the live profiles in Redis")
    parser.add_argument("--horizon-days", type=float, default=90.0)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--out", help="models directory (default: [models] models_dir)")
    parser.add_argument("--config")
    args = parser.parse_args(argv)
    from engine.config import load
    from engine.errors import EngineError

    try:
        train(
            args.model,
            data=args.data,
            from_profiles=args.from_profiles,
            config=load(args.config),
            horizon_days=args.horizon_days,
            folds=args.folds,
            out=args.out,
        )
    except (EngineError, ValueError) as exc:
        print(f"nudge train: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
