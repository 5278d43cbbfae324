"""nudge lint: the mistakes it catches, and a clean starter set."""

from __future__ import annotations

import pytest

from engine.rules import RuleSet, lint
from engine.rules.files import STARTER
from engine.rules.lint import main


def findings(text: str, **kwargs) -> list[tuple[str, str, str]]:
    ruleset = RuleSet.from_toml(text, source="r.toml")
    return [(f.level, f.code, f.where) for f in lint(ruleset, **kwargs)]


def test_the_starter_set_is_clean() -> None:
    assert lint(RuleSet.from_toml(STARTER.read_text(), source="starter.toml")) == []


RULE = """
[[rule]]
name = "{name}"
on = "{on}"
priority = {priority}
{extra}
[[rule.step]]
template = "t"
{steps}
"""


def one(
    extra: str = "",
    *,
    on: str = "Product Viewed",
    steps: str = "",
    name: str = "r",
    priority: int = 0,
) -> str:
    return RULE.format(name=name, on=on, priority=priority, extra=extra, steps=steps)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (one(on="Prodcut Viewed"), ("warning", "unknown-event", "r.toml:2")),
        (one("if = \"count('Order Complete', 7d) > 0\""), ("warning", "unknown-event", "r.toml:6")),
        (one("if = \"event.prodcut_id == 'x'\""), ("warning", "unknown-property", "r.toml:6")),
        (one('if = "email.opnd > 0"'), ("error", "unknown-field", "r.toml:6")),
        (one('if = "revenue > 100 and revenue < 50"'), ("error", "unreachable", "r.toml:6")),
        (
            one("if = \"traits.tier == 'a' and traits.tier == 'b'\""),
            ("error", "unreachable", "r.toml:6"),
        ),
        (one('if = "1 > 2"'), ("error", "unreachable", "r.toml:6")),
        (one('exit = "true"'), ("error", "unreachable", "r.toml:6")),
        (one("if = \"count('Product Viewed', 7d) >= 60\""), ("warning", "window", "r.toml:6")),
        (one("if = \"count('Product Viewed', 90d) >= 2\""), ("warning", "window", "r.toml:6")),
        (
            one(
                'caps = ["1/1d"]\non_cap = "skip"',
                steps='[[rule.step]]\nwait = "1h"\ntemplate = "u"',
            ),
            ("error", "cap-blocks-step", "r.toml:10"),
        ),
        (
            one(
                'caps = ["1/1d"]\non_cap = "defer"',
                steps='[[rule.step]]\nwait = "1h"\ntemplate = "u"',
            ),
            ("warning", "cap-blocks-step", "r.toml:10"),
        ),
        ("[rules]\ncaps = ['0/1d']\n" + one(), ("error", "cap-blocks-step", "r.toml:4")),
        (one('variants = ["a"]\nholdout = 100'), ("warning", "holdout-all", "r.toml:2")),
        (one() + one(name="s"), ("warning", "overlap", "r.toml:11")),
    ],
)
def test_findings(text: str, expected: tuple[str, str, str]) -> None:
    assert findings(text) == [expected]


def test_a_priority_between_overlapping_rules_silences_the_warning() -> None:
    assert findings(one() + one(name="s", priority=1)) == []


def test_known_events_can_be_extended() -> None:
    assert findings(one(on="Quote Requested"), known_events={"Quote Requested"}) == []


def test_main_reports_and_exits_by_severity(tmp_path, capsys) -> None:
    good = tmp_path / "good.toml"
    good.write_text(one())
    assert main([str(good)]) == 0
    warn = tmp_path / "warn.toml"
    warn.write_text(one(on="Quote Requested"))
    assert main([str(warn)]) == 0
    assert main([str(warn), "--strict"]) == 1
    assert main([str(warn), "--strict", "--known-events", "Quote Requested"]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text(one('if = "1 > 2"'))
    assert main([str(bad)]) == 1
    broken = tmp_path / "broken.toml"
    broken.write_text(one('if = "1 >"'))
    assert main([str(broken)]) == 2
    out = capsys.readouterr()
    assert "bad.toml:6: error: rule 'r' if can never be true [unreachable]" in out.out
    assert "broken.toml:6: rule 'r' if: expected a value" in out.err


def test_steps_that_branch_on_their_own_if_do_not_use_a_cap_up() -> None:
    # One email a day, the copy chosen by each step's `if`: lint called step 2
    # "never sent" (an error, exit 1 in CI), and the simulator sends it.
    text = """
[[rule]]
name = "welcome"
on = "Signed Up"
caps = ["1/1d"]
on_cap = "skip"
quiet_hours = false
[[rule.step]]
wait = "10m"
if = "traits.plan == 'pro'"
template = "welcome-pro"
[[rule.step]]
wait = "1m"
if = "traits.plan != 'pro'"
template = "welcome-free"
"""
    assert not [f for f in findings(text) if f[1] == "cap-blocks-step"]
    unconditional = text.replace("if = \"traits.plan == 'pro'\"\n", "")
    assert [f[:2] for f in findings(unconditional) if f[1] == "cap-blocks-step"] == [
        ("error", "cap-blocks-step")
    ]


def test_field_typos_are_found_through_profile_in_rfm_and_in_segments() -> None:
    # Only email.X and consent.X written in rule conditions were checked.
    text = """
[segment.champs]
if = "rfm.segmnt == 'champions'"

[[rule]]
name = "r2"
on = "Order Completed"
if = "profile.email.opend > 0 or rfm.scor >= 4 or rfm.segment == 'champions'"
[[rule.step]]
template = "t"
"""
    ruleset = RuleSet.from_toml(text, source="r.toml")
    found = [f.message for f in lint(ruleset) if f.code == "unknown-field"]
    assert len(found) == 3
    assert any("'segmnt'" in m and "segment 'champs'" in m for m in found)
    assert any("'opend'" in m for m in found) and any("'scor'" in m for m in found)
