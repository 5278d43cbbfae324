"""`nudge rfm --data FILE`: replay transactions through a real partition, report RFM.

Each invoice becomes an `Order Completed` event applied by the same
Partition and LiveInsight the shards run (one partition holds everyone, so
its population is the whole one). Prints the customers per named segment
and the R/F/M quintile boundaries.
"""

from __future__ import annotations

import argparse
import sys

from engine.insight.live import LiveInsight
from engine.insight.retail import order_event, read_invoices
from engine.insight.rfm import SEGMENTS, segment_sizes
from engine.partition import Partition


def replay(path: str) -> Partition:
    """A partition that applied every invoice of the file, in time order."""
    partition = Partition(lambda customer: True, insight=LiveInsight(co=None))
    last = 0.0
    for invoice in read_invoices(path):
        partition.apply(order_event(invoice))
        last = invoice.ts
    # score everyone against the final population, as the periodic re-check would
    for profile in partition.profiles.values():
        partition.insight.refresh(profile, last)
    return partition


def main(argv: list[str] | None = None) -> int:
    """Entry point of `nudge rfm`."""
    parser = argparse.ArgumentParser(prog="nudge rfm", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="transactions CSV (Online Retail layout)")
    args = parser.parse_args(argv)
    partition = replay(args.data)
    records = [p.rfm for p in partition.profiles.values() if p.rfm is not None]
    sizes = segment_sizes(records)
    population = partition.insight.population
    print(f"{len(records)} buyers (of {len(partition.profiles)} customers)")
    for name in SEGMENTS:
        print(f"  {name:20}{sizes[name]:>6}  {sizes[name] / max(len(records), 1):6.1%}")
    for label, sketch in (("orders", population.frequency), ("revenue", population.monetary)):
        cuts = [sketch.quantile(q) for q in (0.2, 0.4, 0.6, 0.8)]
        print(f"  {label} quintile cuts: " + ", ".join(f"{c:.2f}" for c in cuts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
