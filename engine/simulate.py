"""Run scripted events through the real core on a virtual clock: a day in about a second.

A scenario is a small TOML (or JSONL) file::

    description = "cart abandoned, no purchase"
    start = "2024-03-04T09:00:00Z"   # the virtual clock's start
    until = "+3d"                    # keep firing timers until then (default: last event + 31d)
    rules = "rules.toml"             # optional: a rule file next to the scenario (default: starter)

    [[event]]
    at = "+0s"                       # ISO time, "+duration" from start (or `after = "5m"`)
    user = "ann"                     # userId (or `anonymous = "a-1"`)
    event = "Product Added"          # a track event; or type = "identify" with traits
    properties = { product_id = "p1", name = "Trail shoe", price = 90 }
    context = { timezone = "Europe/Paris" }
    repeat = 3                       # optional: the same event 3 times, `every` apart
    every = "1m"
    timestamp = "+5m"                # optional: its own time, if earlier than `at` (late)

    [[expect]]                       # optional: the exact sends, in order
    at = "+15m"
    user = "ann"
    rule = "cart_abandonment"
    step = 1
    template = "cart-reminder-classic"   # any Send field; payload matches as a subset

JSONL holds one object per line: events as above, `{"start": ...}` settings and
`{"expect": {...}}` lines. Events go through engine.events.normalize and a real
Partition holding the rules; between events, `Partition.tick` fires timers in
deadline order, exactly as a shard does, and sends leave through `take_changes`.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from engine.clock import ManualClock
from engine.errors import ConfigError, EngineError
from engine.events import normalize
from engine.partition import Partition
from engine.profile import Limits
from engine.rules.durations import format_duration, parse_duration
from engine.rules.ruleset import RuleSet
from engine.rules.send import Send
from engine.rules.timers import TimerIndex

DEFAULT_TAIL = 31 * 86400.0  # after the last event, long enough for a 30-day inactivity rule
_EVENT_KEYS = {
    "at",
    "after",
    "user",
    "anonymous",
    "type",
    "event",
    "name",
    "properties",
    "traits",
    "context",
    "message_id",
    "repeat",
    "every",
    "timestamp",
}


class ScenarioError(ConfigError):
    """A scenario file that cannot be read; the message names the place."""

    code = "scenario_error"


@dataclass
class Scenario:
    """Parsed scenario: start time, events as Segment messages with their times, expectations."""

    start: float
    events: list[tuple[float, dict]]
    until: float | None = None
    expect: list[dict] = field(default_factory=list)
    description: str = ""
    rules: str | None = None  # a rule file, relative to the scenario's folder
    source: str = "<scenario>"
    folder: Path | None = None


# -- parsing ---------------------------------------------------------------------------
def parse_time(value: Any, *, start: float | None, what: str) -> float:
    """Epoch seconds from an ISO time, a "+duration" or "-duration" offset, or a number."""
    if isinstance(value, bool):
        raise ScenarioError(f"{what}: not a time: {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime):  # TOML offset date-times arrive parsed
        moment = value if value.tzinfo else value.replace(tzinfo=UTC)
        return moment.timestamp()
    if isinstance(value, str) and value[:1] in ("+", "-"):
        if start is None:
            raise ScenarioError(f"{what}: a '+offset' time needs a start")
        try:
            offset = parse_duration(value[1:])
            return start + offset if value[0] == "+" else start - offset
        except ValueError as exc:
            raise ScenarioError(f"{what}: {exc}") from None
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise ScenarioError(f"{what}: {value!r} is not an ISO time or '+duration'") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    raise ScenarioError(f"{what}: not a time: {value!r}")


def load_scenario(scenario: str | Path) -> Scenario:
    """A Scenario from a path (.toml or .jsonl) or from the text itself."""
    path: Path | None = None
    if isinstance(scenario, Path) or (
        "\n" not in scenario and scenario.endswith((".toml", ".jsonl"))
    ):
        path = Path(scenario)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ScenarioError(f"cannot read scenario {path}: {exc.strerror}") from None
    else:
        text = str(scenario)
    source = str(path) if path else "<scenario>"
    jsonl = path.suffix == ".jsonl" if path else text.lstrip().startswith("{")
    data = _from_jsonl(text, source) if jsonl else _from_toml(text, source)
    parsed = _build(data, source)
    parsed.folder = path.parent if path else None
    return parsed


def _from_toml(text: str, source: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{source}: invalid TOML: {exc}") from None


def _from_jsonl(text: str, source: str) -> dict:
    data: dict[str, Any] = {"event": [], "expect": []}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            item = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ScenarioError(f"{source}:{number}: invalid JSON: {exc}") from None
        if not isinstance(item, dict):
            raise ScenarioError(f"{source}:{number}: each line must be a JSON object")
        if "expect" in item:
            data["expect"].append(item["expect"])
        elif "event" in item or "type" in item:
            data["event"].append(item)
        else:
            data.update(item)
    return data


def _build(data: dict, source: str) -> Scenario:
    raw_events = data.get("event", [])
    if not isinstance(raw_events, list) or not raw_events:
        raise ScenarioError(f"{source}: a scenario needs at least one [[event]]")
    start = data.get("start")
    if start is None:
        first = raw_events[0].get("at")
        if first is None or (isinstance(first, str) and first[:1] in ("+", "-")):
            raise ScenarioError(f"{source}: set `start`, or give the first event an absolute `at`")
        start = first
    start_ts = parse_time(start, start=None, what="start")
    events: list[tuple[float, dict]] = []
    previous = start_ts
    for index, raw in enumerate(raw_events):
        what = f"{source}: event {index + 1}"
        if not isinstance(raw, dict):
            raise ScenarioError(f"{what}: must be a table")
        unknown = set(raw) - _EVENT_KEYS
        if unknown:
            raise ScenarioError(f"{what}: unknown key {sorted(unknown)[0]!r}")
        if "at" in raw:
            at = parse_time(raw["at"], start=start_ts, what=f"{what} at")
        elif "after" in raw:
            try:
                at = previous + parse_duration(raw["after"])
            except ValueError as exc:
                raise ScenarioError(f"{what} after: {exc}") from None
        else:
            at = previous
        repeat = raw.get("repeat", 1)
        try:
            every = parse_duration(raw.get("every", "0s"))
        except ValueError as exc:
            raise ScenarioError(f"{what} every: {exc}") from None
        stamped = None
        if "timestamp" in raw:  # the event's own time: earlier than `at` is a late delivery
            ts = parse_time(raw["timestamp"], start=start_ts, what=f"{what} timestamp")
            stamped = datetime.fromtimestamp(ts, UTC).isoformat()
        for n in range(repeat if isinstance(repeat, int) and repeat > 0 else 1):
            when = at + n * every
            message = _message(raw, what, f"sim-{index + 1}" + (f".{n + 1}" if repeat != 1 else ""))
            if stamped is not None:
                message["timestamp"] = stamped
            events.append((when, message))
            previous = when
    events.sort(key=lambda item: item[0])  # stable: same-time events keep file order
    until = data.get("until")
    until_ts = parse_time(until, start=start_ts, what="until") if until is not None else None
    expect = data.get("expect", [])
    if not isinstance(expect, list):
        raise ScenarioError(f"{source}: expect must be a list of [[expect]] tables")
    resolved = []
    for index, item in enumerate(expect):
        entry = dict(item)
        if "at" in entry:
            entry["at"] = parse_time(
                entry["at"], start=start_ts, what=f"{source}: expect {index + 1} at"
            )
        if "user" in entry:
            entry["customer"] = entry.pop("user")
        resolved.append(entry)
    rules = data.get("rules")
    return Scenario(
        start_ts,
        events,
        until_ts,
        resolved,
        str(data.get("description", "")),
        rules if isinstance(rules, str) else None,
        source,
    )


def _message(raw: dict, what: str, message_id: str) -> dict:
    kind = raw.get("type", "track")
    msg: dict[str, Any] = {"type": kind, "messageId": str(raw.get("message_id", message_id))}
    if "user" in raw:
        msg["userId"] = raw["user"]
    if "anonymous" in raw:
        msg["anonymousId"] = raw["anonymous"]
    if "userId" not in msg and "anonymousId" not in msg:
        raise ScenarioError(f"{what}: needs `user` or `anonymous`")
    if kind == "track":
        if "event" not in raw:
            raise ScenarioError(f"{what}: a track event needs `event`")
        msg["event"] = raw["event"]
    if "name" in raw:
        msg["name"] = raw["name"]
    for key in ("properties", "traits", "context"):
        if key in raw:
            msg[key] = raw[key]
    return msg


# -- running ---------------------------------------------------------------------------
class Simulator:
    """A one-shard engine on a virtual clock: a real Partition with the rules, driven as a shard.

    Events go in with `partition.apply` (which runs the rules); between events,
    `partition.tick` fires timers in deadline order; decided sends leave through
    `take_changes`, as a shard hands them to its outbox. Like a shard, which
    checkpoints per batch rather than per event, changes are taken only when
    `sends` is read (the profile encodings they carry are the costly part).
    """

    def __init__(
        self,
        ruleset: RuleSet,
        *,
        start: float,
        limits: Limits | None = None,
        recheck_s: float | None = None,
    ):
        self.ruleset = ruleset
        self.clock = ManualClock(start)
        # RFM and the periodic segment re-check, as a shard runs them (engine.insight):
        # recheck_s from the config ([rfm] recheck_hours; 0: never), else its default.
        from engine.insight.live import LiveInsight
        from engine.insight.settings import RfmConfig

        if recheck_s is not None:
            ruleset.recheck_s = recheck_s
        elif not ruleset.recheck_s:
            ruleset.recheck_s = RfmConfig().recheck_hours * 3600.0
        self.partition = Partition(
            lambda customer: True, limits=limits, rules=ruleset, insight=LiveInsight(co=None)
        )
        self._sends: list[Send] = []
        self._taken = 0  # partition.sent as of the last take_changes

    @property
    def timers(self) -> TimerIndex:
        """The partition's timer index."""
        return self.partition.timers

    @property
    def sends(self) -> list[Send]:
        """Every send decided so far, in order."""
        partition = self.partition
        if partition.sent != self._taken:
            self._sends += [Send.from_dict(data) for data in partition.take_changes().sends]
            self._taken = partition.sent
        return self._sends

    def event(self, at: float, message: dict) -> int:
        """Deliver one Segment message at virtual time `at` (timers due before it fire first).

        Returns how many sends the event decided (timers that fired first not included).
        """
        self.run_until(at, inclusive=False)
        self.clock.set(max(self.clock.now(), at))
        before = self.partition.sent
        self.partition.apply(normalize(message, kind=None, received_at=at))
        return self.partition.sent - before

    def run_until(self, limit: float, *, inclusive: bool = True) -> int:
        """Fire every timer due before `limit` (or at it), in deadline order; returns the sends."""
        partition = self.partition
        fired = 0
        while True:
            deadline = partition.next_deadline()
            if deadline is None or deadline > limit or (deadline == limit and not inclusive):
                break
            self.clock.set(max(self.clock.now(), deadline))
            fired += partition.tick(deadline)
        if limit > self.clock.now():
            self.clock.set(limit)
        return fired


def simulate(
    scenario: str | Path | Scenario,
    ruleset: RuleSet,
    *,
    until: float | None = None,
    limits: Limits | None = None,
) -> list[dict]:
    """Every send of the scenario, in order, as dicts (Send.to_dict plus `at_iso`)."""
    sim = run(scenario, ruleset, until=until, limits=limits)
    return [_with_iso(send.to_dict()) for send in sim.sends]


def run(
    scenario: str | Path | Scenario,
    ruleset: RuleSet,
    *,
    until: float | None = None,
    limits: Limits | None = None,
    recheck_s: float | None = None,
) -> Simulator:
    """Run the scenario and return the Simulator (its sends, profiles and timers)."""
    parsed = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
    start = min(parsed.start, parsed.events[0][0])
    sim = Simulator(ruleset, start=start, limits=limits, recheck_s=recheck_s)
    for at, message in parsed.events:
        if until is not None and at > until:
            break
        sim.event(at, message)
    last = parsed.events[-1][0]
    end = (
        until
        if until is not None
        else parsed.until
        if parsed.until is not None
        else last + DEFAULT_TAIL
    )
    sim.run_until(end)
    return sim


def _with_iso(data: dict) -> dict:
    data["at_iso"] = iso(data["at"])
    return data


def iso(ts: float) -> str:
    """UTC ISO-8601 with a Z, to the second."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_sends(sends: list[dict], *, start: float | None = None) -> str:
    """One line per send: time, offset, customer, rule#step, variant, template, payload."""
    if not sends:
        return "(no sends)"
    lines = []
    for send in sends:
        offset = ""
        if start is not None:
            delta = send["at"] - start
            offset = ("+" + format_duration(delta)) if delta >= 0 else "-" + format_duration(-delta)
        variant = f" variant={send['variant']}" if send.get("variant") else ""
        held = "  (holdout: not delivered)" if not send.get("deliver", True) else ""
        payload = orjson.dumps(send.get("payload") or {}, option=orjson.OPT_SORT_KEYS).decode()
        if len(payload) > 160:
            payload = payload[:157] + "..."
        lines.append(
            f"{iso(send['at'])}  {offset:>9}  {send['customer']:<10} {send['rule']}#{send['step']}"
            f"{variant}  {send['template']}{held}  {payload}"
        )
    return "\n".join(lines)


def check(scenario: Scenario, sends: list[dict]) -> list[str]:
    """Differences between the scenario's [[expect]] list and the actual sends (empty: all good)."""
    problems = []
    if len(sends) != len(scenario.expect):
        problems.append(f"expected {len(scenario.expect)} send(s), got {len(sends)}")
    for index, (want, got) in enumerate(zip(scenario.expect, sends, strict=False)):
        for key, value in want.items():
            actual = got.get(key)
            if key == "payload" and isinstance(value, dict) and isinstance(actual, dict):
                for name, expected in value.items():
                    if actual.get(name) != expected:
                        problems.append(
                            f"send {index + 1}: payload.{name} is {actual.get(name)!r}, "
                            f"expected {expected!r}"
                        )
            elif key == "at" and actual is not None and abs(actual - value) > 1e-6:
                problems.append(f"send {index + 1}: at {iso(actual)}, expected {iso(value)}")
            elif key != "at" and actual != value:
                problems.append(f"send {index + 1}: {key} is {actual!r}, expected {value!r}")
    return problems


# -- command-line tools -------------------------------------------------------------------
def _settings_for(scenario: Scenario, rules: str | None, config: str | None) -> dict:
    """The rules, and with --config the profile limits and re-check a shard would use."""
    if not config:
        return {"ruleset": _ruleset_for(scenario, rules, None)}
    from engine.config import file_settings, profile_limits

    engine, rfm = file_settings(config)
    return {
        "ruleset": _ruleset_for(scenario, None, config),
        "limits": profile_limits(engine),
        "recheck_s": rfm.recheck_hours * 3600.0,
    }


def _ruleset_for(scenario: Scenario, rules: str | None, config: str | None) -> RuleSet:
    from engine.rules.files import STARTER, read_rules

    if config:
        return read_rules(config)
    if rules:
        return read_rules(rules)
    if scenario.rules:
        base = scenario.folder or Path.cwd()
        target = STARTER if scenario.rules == "starter" else base / scenario.rules
        return read_rules(target)
    return read_rules(STARTER)


def main(argv: list[str] | None = None) -> int:
    """`nudge simulate SCENARIO [--rules FILE | --config FILE] [--until T] [--json] [--check]`."""
    parser = argparse.ArgumentParser(
        prog="nudge simulate", description="run a scenario on a virtual clock"
    )
    parser.add_argument("scenario", help="a .toml or .jsonl scenario")
    parser.add_argument(
        "--rules", help="a rule file (default: the scenario's `rules`, else the starter set)"
    )
    parser.add_argument("--config", help="a config.toml whose [rules] and rule files to use")
    parser.add_argument("--until", help="fire timers until this time (ISO or +duration from start)")
    parser.add_argument("--json", action="store_true", help="print the sends as JSON lines")
    parser.add_argument(
        "--check", action="store_true", help="compare with the scenario's [[expect]]"
    )
    args = parser.parse_args(argv)
    try:
        scenario = load_scenario(args.scenario)
        settings = _settings_for(scenario, args.rules, args.config)
        until = parse_time(args.until, start=scenario.start, what="--until") if args.until else None
        sim = run(scenario, until=until, **settings)
        sends = [_with_iso(send.to_dict()) for send in sim.sends]
    except EngineError as exc:
        print(f"nudge simulate: {exc.message}", file=sys.stderr)
        return 2
    if args.json:
        for send in sends:
            print(orjson.dumps(send).decode())
    else:
        print(format_sends(sends, start=scenario.start))
    if args.check:
        problems = check(scenario, sends)
        for problem in problems:
            print(f"MISMATCH {problem}", file=sys.stderr)
        return 1 if problems else 0
    return 0


def explain_main(argv: list[str] | None = None) -> int:
    """`nudge explain SCENARIO --user ID [--at T]`: run a scenario, then explain one customer."""
    parser = argparse.ArgumentParser(
        prog="nudge explain", description="why each rule did or did not fire"
    )
    parser.add_argument("scenario")
    parser.add_argument("--user", required=True, help="the customer to explain")
    parser.add_argument(
        "--at", help="stop the clock here (ISO or +duration from start; default: the end)"
    )
    parser.add_argument("--rules")
    parser.add_argument("--config")
    args = parser.parse_args(argv)
    try:
        scenario = load_scenario(args.scenario)
        settings = _settings_for(scenario, args.rules, args.config)
        until = parse_time(args.at, start=scenario.start, what="--at") if args.at else None
        sim = run(scenario, until=until, **settings)
    except EngineError as exc:
        print(f"nudge explain: {exc.message}", file=sys.stderr)
        return 2
    report = sim.partition.explain(args.user, sim.clock.now())
    if isinstance(report, str):  # an id merged into another customer: explain that one
        print(f"nudge explain: {args.user!r} was merged into {report!r}", file=sys.stderr)
        report = sim.partition.explain(report, sim.clock.now())
    if not isinstance(report, list):
        print(f"nudge explain: no customer {args.user!r} in the scenario", file=sys.stderr)
        return 2
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
