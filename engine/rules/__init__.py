"""Trigger rules and flows: the pure decision core (stdlib and orjson only).

Public surface:
    RuleSet.from_toml(text, source=...), RuleSet.from_sources([(text, source), ...])
    ruleset.on_event(profile, event, now) -> list[Send]
    ruleset.on_due(profile, now) -> list[Send]
    ruleset.next_deadline(profile) -> float | None
    ruleset.explain(profile, now) -> list[dict]
    TimerIndex: schedule, next_deadline, pop_due, discard, rebuild
    lint(ruleset, known_events=None) -> list[Finding]
    read_rules(config_path) -> RuleSet      (resolves [rules] dir and files)
    merge_journey(into, other, other_id)    (for profile merges)
"""

from __future__ import annotations

from engine.rules.errors import RuleError
from engine.rules.files import read_rules, rule_sources
from engine.rules.lint import Finding, lint
from engine.rules.ruleset import RuleSet
from engine.rules.send import Send, send_id
from engine.rules.state import merge_journey
from engine.rules.timers import TimerIndex

__all__ = [
    "Finding",
    "RuleError",
    "RuleSet",
    "Send",
    "TimerIndex",
    "lint",
    "merge_journey",
    "read_rules",
    "rule_sources",
    "send_id",
]
