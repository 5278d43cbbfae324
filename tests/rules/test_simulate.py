"""The simulator: every scenario under tests/scenarios sends exactly what it expects."""

from __future__ import annotations

import re
import time
from dataclasses import asdict
from pathlib import Path

import orjson
import pytest

from engine.rules.files import STARTER, read_rules
from engine.rules.send import Send
from engine.simulate import (
    ScenarioError,
    Simulator,
    check,
    explain_main,
    format_sends,
    load_scenario,
    main,
    simulate,
)

SCENARIOS = sorted((Path(__file__).parent.parent / "scenarios").glob("*.toml"))
CART = Path(__file__).parent.parent / "scenarios" / "cart_abandonment.toml"


@pytest.fixture(scope="module")
def starter():
    return read_rules(STARTER)


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario_sends_exactly_what_it_expects(path: Path, starter) -> None:
    scenario = load_scenario(path)
    assert scenario.expect, "every scenario states its expected sends"
    ruleset = read_rules(path.parent / scenario.rules) if scenario.rules else starter
    sends = simulate(scenario, ruleset)
    assert check(scenario, sends) == []


def test_every_starter_journey_has_a_scenario(starter) -> None:
    covered = {e["rule"] for path in SCENARIOS for e in load_scenario(path).expect}
    assert {r.name for r in starter.rules} <= covered


def test_check_reports_differences(starter) -> None:
    scenario = load_scenario(CART)
    sends = simulate(scenario, starter)
    sends[0] = {**sends[0], "at": sends[0]["at"] + 60, "template": "other"}
    problems = check(scenario, sends[:-1])
    assert problems[0].startswith("expected ") and any("template is 'other'" in p for p in problems)


JSONL = """\
{"start": "2024-03-04T09:00:00Z", "until": "+1d"}
{"at": "+0m", "user": "bob", "event": "Product Added", \
"properties": {"product_id": "p1", "price": 5}}
{"expect": {"at": "+15m", "user": "bob", "rule": "cart_abandonment", "step": 1}}
"""


def test_jsonl_scenarios_and_formatting(starter) -> None:
    scenario = load_scenario(JSONL)
    sends = simulate(scenario, starter)
    assert check(scenario, sends) == []
    text = format_sends(sends, start=scenario.start)
    assert text.startswith(
        "2024-03-04T09:15:00Z       +15m  bob        cart_abandonment#1 variant=classic"
    )
    assert format_sends([]) == "(no sends)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("start = '2024-03-04T09:00:00Z'\n", "needs at least one [[event]]"),
        ("[[event]]\nat = '+1m'\nuser = 'a'\nevent = 'X'\n", "set `start`"),
        ("start = 'soon'\n[[event]]\nuser = 'a'\nevent = 'X'\n", "not an ISO time"),
        ("start = 1\n[[event]]\nuser = 'a'\nevent = 'X'\ncolour = 'red'\n", "unknown key 'colour'"),
        ("start = 1\n[[event]]\nevent = 'X'\n", "needs `user` or `anonymous`"),
        ("start = 1\n[[event]]\nuser = 'a'\nat = '+1 day'\nevent = 'X'\n", "not a duration"),
        # a traceback (ValueError) before
        ("start = 1\n[[event]]\nuser = 'a'\nevent = 'X'\nevery = '5 mins'\n", "event 1 every"),
        ("start = 1\n[[event]]\nuser = 'a'\nevent = 'X'\ntimestamp = 'soon'\n", "timestamp"),
    ],
)
def test_scenario_errors(text: str, message: str) -> None:
    with pytest.raises(ScenarioError, match=re.escape(message)):
        load_scenario(text)


def test_the_simulator_drives_a_real_partition(starter) -> None:
    start = load_scenario(CART).start
    sim = Simulator(starter, start=start)
    added = {"type": "track", "userId": "bob", "messageId": "m1", "event": "Product Added"}
    added["properties"] = {"product_id": "p1", "price": 5}
    assert sim.event(start, added) == 0
    assert sim.timers is sim.partition.timers
    assert sim.partition.next_deadline() == start + 900  # the 15-minute reminder
    assert sim.event(start + 60, added) == 0  # a duplicate: the partition drops it
    assert sim.partition.stats["duplicate"] == 1
    assert sim.run_until(start + 900, inclusive=False) == 0
    assert sim.run_until(start + 900) == 1 and sim.clock.now() == start + 900
    [send] = sim.sends
    assert isinstance(send, Send) and (send.rule, send.customer) == ("cart_abandonment", "bob")
    assert sim.sends == [send] and sim.partition.take_changes().sends == []


def test_send_to_dict_matches_asdict() -> None:
    send = Send("id", "r", 1, None, "bob", 1.0, "t", payload={"items": {"p1": {"n": [1, 2.5]}}})
    data = send.to_dict()
    assert data == asdict(send) and Send.from_dict(data) == send
    data["payload"]["items"]["p1"]["n"].append(3)  # a copy: the send itself is unchanged
    assert send.payload == {"items": {"p1": {"n": [1, 2.5]}}}


def test_anonymous_events_follow_an_identify_merge(starter) -> None:
    text = """
    start = "2024-03-04T09:00:00Z"
    until = "+1h"
    [[event]]
    anonymous = "anon-1"
    event = "Product Viewed"
    properties = { product_id = "p1" }
    [[event]]
    at = "+1m"
    user = "bob"
    anonymous = "anon-1"
    type = "identify"
    traits = { email = "bob@example.com" }
    [[event]]
    at = "+2m"
    anonymous = "anon-1"
    event = "Product Added"
    properties = { product_id = "p1", price = 5 }
    """
    sends = simulate(text, starter)
    assert [(s["customer"], s["rule"], s["at_iso"]) for s in sends] == [
        ("bob", "cart_abandonment", "2024-03-04T09:17:00Z"),
    ]


def test_main_prints_checks_and_explains(capsys, tmp_path) -> None:
    path = str(CART)
    assert main([path, "--check"]) == 0
    assert main([path, "--json", "--until", "+1h"]) == 0
    assert main([str(tmp_path / "missing.toml")]) == 2
    out = capsys.readouterr().out.splitlines()
    assert any("cart_abandonment#1" in line for line in out)
    assert orjson.loads(out[-1])["rule"] == "cart_abandonment"
    assert explain_main([path, "--user", "bob", "--at", "+10m"]) == 0
    report = orjson.loads(capsys.readouterr().out)
    assert report[0]["rule"] == "cart_abandonment" and report[0]["status"] == "waiting"
    assert explain_main([path, "--user", "nobody"]) == 2


def test_explain_follows_a_merged_id(capsys, tmp_path) -> None:
    path = tmp_path / "merge.jsonl"
    path.write_text(
        '{"start": "2024-03-04T09:00:00Z", "until": "+1h"}\n'
        '{"at": "+0m", "anonymous": "anon-1", "event": "Product Added", '
        '"properties": {"product_id": "p1", "price": 5}}\n'
        '{"at": "+1m", "user": "bob", "anonymous": "anon-1", "type": "identify"}\n'
    )
    assert explain_main([str(path), "--user", "anon-1", "--at", "+5m"]) == 0
    captured = capsys.readouterr()
    assert "'anon-1' was merged into 'bob'" in captured.err
    assert orjson.loads(captured.out)[0]["status"] == "waiting"


def test_a_simulated_day_of_traffic_takes_about_a_second(starter) -> None:
    """1,000 customers, 10,000 events over a day (plus a month of timers) on the virtual clock."""
    lines = ['{"start": "2024-03-04T00:00:00Z", "until": "+2d"}']
    names = ["Product Viewed"] * 6 + [
        "Product Added",
        "Email Opened",
        "Page Viewed",
        "Order Completed",
    ]
    for i in range(10_000):
        at = i * 8.64
        name = names[(i * 7) % len(names)]
        props = {"product_id": f"p{i % 37}", "price": 10, "name": "x", "category": "c"}
        if name == "Order Completed":
            props = {"order_id": f"o{i}", "revenue": 40, "products": [{"product_id": f"p{i % 37}"}]}
        lines.append(
            orjson.dumps(
                {"at": at, "user": f"u{i % 1000}", "event": name, "properties": props}
            ).decode()
        )
    scenario = load_scenario("\n".join(lines))
    started = time.perf_counter()
    sends = simulate(scenario, starter)
    elapsed = time.perf_counter() - started
    assert sends and elapsed < 5.0  # about a second on our 2-core machines; generous for CI


def test_a_scenario_event_keeps_its_own_timestamp() -> None:
    # `timestamp` was accepted and dropped: a late delivery could not be written.
    scenario = load_scenario(
        "start = '2024-03-04T09:00:00Z'\n"
        "[[event]]\nat = '+20m'\ntimestamp = '+5m'\nuser = 'a'\nevent = 'Order Completed'\n"
    )
    [(when, message)] = scenario.events
    assert when == scenario.start + 1200
    assert message["timestamp"] == "2024-03-04T09:05:00+00:00"


HEAVY = """
[engine]
recent_max = 100

[[rule]]
name = "heavy_browser"
on = "Page Viewed"
if = "count('Page Viewed', 1d) >= 60"
quiet_hours = false
[[rule.step]]
template = "hb"
"""
PAGES = """
start = "2024-03-04T09:00:00Z"
until = "+1d"
[[event]]
user = "u"
type = "page"
repeat = 70
every = "1m"
"""
NEVER_RECHECK = """
[rfm]
recheck_hours = 0

[segment.lapsed]
if = "orders > 0 and days_since(last_order_at) > 2"

[[rule]]
name = "lapsed_winback"
enter_segment = "lapsed"
quiet_hours = false
[[rule.step]]
template = "winback"
"""
ORDER = """
start = "2024-03-04T09:00:00Z"
until = "+5d"
[[event]]
user = "u"
event = "Order Completed"
properties = { order_id = "o1", revenue = 50 }
"""


@pytest.mark.parametrize(
    ("config", "scenario", "sends"), [(HEAVY, PAGES, 1), (NEVER_RECHECK, ORDER, 0)]
)
def test_simulate_with_a_config_keeps_the_engines_limits_and_recheck(
    tmp_path: Path, capsys: pytest.CaptureFixture, config: str, scenario: str, sends: int
) -> None:
    # The simulator kept 50 events (the config said 100) and re-checked segments
    # every 24 h (the config said never): it decided otherwise than the engine.
    from engine.simulate import main

    (tmp_path / "config.toml").write_text(config)
    (tmp_path / "scenario.toml").write_text(scenario)
    argv = [str(tmp_path / "scenario.toml"), "--config", str(tmp_path / "config.toml"), "--json"]
    assert main(argv) == 0
    assert len(capsys.readouterr().out.splitlines()) == sends


def test_a_production_config_is_linted_and_simulated_without_its_server_checks(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # Both loaded the whole config: one for 0.0.0.0 whose keys come from secrets CI
    # does not have was refused ("refusing to listen ... development keys").
    from engine.rules.lint import main as lint_main
    from engine.simulate import main

    (tmp_path / "config.toml").write_text('[server]\nhost = "0.0.0.0"\n' + HEAVY)
    (tmp_path / "scenario.toml").write_text(PAGES)
    assert lint_main([str(tmp_path / "config.toml")]) == 0
    argv = [str(tmp_path / "scenario.toml"), "--config", str(tmp_path / "config.toml"), "--json"]
    assert main(argv) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2  # lint's summary, and one send


def test_lint_of_a_config_sees_as_far_back_as_its_profiles_keep(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from engine.rules.lint import main

    (tmp_path / "config.toml").write_text(HEAVY)
    assert main([str(tmp_path / "config.toml")]) == 0
    assert "keeps only the last" not in capsys.readouterr().out


def test_lint_checks_the_engine_settings_it_reads_and_their_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # Read unchecked, a recent_max of 0 passed lint (warnings only) in a config the
    # engine refuses to start; and NUDGE_RECENT_MAX, which the engine applies, was not.
    from engine.config import file_settings
    from engine.rules.lint import main as lint_main

    (tmp_path / "bad.toml").write_text(HEAVY.replace("recent_max = 100", "recent_max = 0"))
    assert lint_main([str(tmp_path / "bad.toml")]) == 2
    assert "engine.recent_max" in capsys.readouterr().err
    (tmp_path / "config.toml").write_text(HEAVY)
    monkeypatch.setenv("NUDGE_RECENT_MAX", "7")
    monkeypatch.setenv("NUDGE_HOST", "0.0.0.0")  # the server's, not read here
    engine, _ = file_settings(tmp_path / "config.toml")
    assert engine.recent_max == 7
