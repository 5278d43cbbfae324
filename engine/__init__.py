"""Nudge's engine: the pure core (events, profiles, partitions, routing, config)
and the thin shells around it (store, API, CLI)."""

__version__ = "0.1.0"
