"""Loading rule TOML: validation with source:line errors, other sections ignored."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from engine.errors import ConfigError
from engine.rules import RuleError, RuleSet, read_rules, rule_sources
from engine.rules.files import STARTER

MINIMAL = """
[[rule]]
name = "r"
on = "Product Added"

[[rule.step]]
template = "t"
"""


def load(text: str) -> RuleSet:
    return RuleSet.from_toml(text, source="rules.toml")


def error(text: str) -> RuleError:
    with pytest.raises(RuleError) as caught:
        load(text)
    return caught.value


def test_starter_set_loads() -> None:
    ruleset = read_rules(STARTER)
    assert [r.name for r in ruleset.rules] == [
        "cart_abandonment",
        "vip_welcome",
        "browse_abandonment",
        "post_purchase_cross_sell",
        "re_engagement",
    ]
    cart = ruleset.by_name["cart_abandonment"]
    assert [s.wait for s in cart.steps] == [900.0, 86400.0]
    assert cart.variants == (("classic", 50.0), ("urgency", 50.0))
    assert ruleset.settings.quiet_hours == (21 * 60, 8 * 60)
    assert ruleset.by_name["vip_welcome"].reentry == math.inf
    # only the properties later steps read are kept from the trigger event
    assert ruleset.by_name["browse_abandonment"].keep == {"name", "image_url", "price"}


def test_other_config_sections_are_ignored() -> None:
    text = '[server]\nport = 8000\n[engine]\nshards = 2\n[auth]\nwrite_keys = ["k"]\n' + MINIMAL
    assert [r.name for r in load(text).rules] == ["r"]


def test_a_config_without_rules_is_an_empty_ruleset() -> None:
    ruleset = load("[server]\nport = 1\n")
    assert ruleset.rules == () and ruleset.segments == ()


def test_rule_error_is_a_config_error() -> None:
    assert issubclass(RuleError, ConfigError)


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("[rules]\nsuppression = 12\ncaps = ['lots']\n", 3, "caps: 'lots' is not a cap"),
        ("[rules]\nquiet_hours = '25:00-08:00'\n", 2, "'25:00' is not a time of day"),
        ("[rules]\ntimezone = 'Mars/Olympus'\n", 2, "unknown time zone"),
        (
            "[rules]\nsupression = '1h'\n",
            2,
            "unknown key 'supression' in [rules]; did you mean 'suppression'?",
        ),
        ("[[rule]]\nname = 'a'\n[[rule.step]]\ntemplate = 't'\n", 1, "needs exactly one entry"),
        (
            MINIMAL + "\n[[rule]]\nname = 'b'\non = 'X'\n",
            9,
            "rule 'b' needs at least one [[rule.step]]",
        ),
        (MINIMAL.replace('template = "t"', 'wait = "15 minutes"'), 6, "needs a template"),
        (
            MINIMAL.replace('template = "t"', 'template = "t"\nwait = "15 minutes"'),
            8,
            "wait: '15 minutes' is not a duration",
        ),
        (
            MINIMAL.replace('on = "Product Added"', 'on = "Product Added"\nif = "len(cart) >"'),
            5,
            "rule 'r' if: expected a value, a name or '(', found end of expression (column 12",
        ),
        (
            MINIMAL.replace(
                'on = "Product Added"', 'on = "Product Added"\nkey = "event.id"\niff = "1"'
            ),
            6,
            "unknown key 'iff' in a [[rule]]; did you mean 'if'?",
        ),
        (
            MINIMAL.replace('on = "Product Added"', 'enter_segment = "vip"'),
            4,
            "unknown segment 'vip'",
        ),
        (MINIMAL.replace('template = "t"', 'template = "t-{variant}"'), 7, "uses {variant}"),
        (
            MINIMAL.replace('name = "r"', 'name = "r"\nvariants = { a = 0 }'),
            4,
            "variant 'a' needs a positive weight",
        ),
        (MINIMAL.replace('name = "r"', 'name = "r"\nholdout = 120'), 4, "holdout is a percentage"),
        (
            MINIMAL.replace('name = "r"', 'name = "r"\non_cap = "wait"'),
            4,
            "on_cap must be 'skip' or 'defer'",
        ),
        (MINIMAL.replace('name = "r"', 'name = "r"\nreentry = "sometimes"'), 4, "reentry must be"),
        (MINIMAL + MINIMAL, 10, "rule 'r' is defined twice (also at rules.toml:2)"),
        ("[segment.vip]\nif = 'revenue >> 3'\n", 2, "segment 'vip' if: expected a value"),
        ("[segment.vip]\nwhen = 'revenue > 3'\n", 2, "unknown key 'when'"),
        ("[segment.vip]\nif = 'event.price > 3'\n", 2, "'event' is not available here"),
        (
            "[[rule]]\nname = 'r'\non = 'X'\ncancel_on = [{ event = 'Y', iff = 'true' }]\n"
            "[[rule.step]]\ntemplate = 't'\n",
            4,
            "unknown key 'iff' in a cancel_on entry",
        ),
        (
            "[[rule]]\nname = 'r'\ninactive_for = '30d'\nif = 'event.x'\n"
            "[[rule.step]]\ntemplate = 't'\n",
            4,
            "'event' is not available",
        ),
        (
            "[[rule]]\nname = 'r'\non = 'X'\nactivity = ['Y']\n[[rule.step]]\ntemplate = 't'\n",
            4,
            "activity only applies with inactive_for",
        ),
        (
            "[[rule]]\nname = 'r'\non = 'X'\nif = 'key == 1'\n[[rule.step]]\ntemplate = 't'\n",
            4,
            "'key' is only available once a rule has been entered",
        ),
        ("[rules]\ncaps = 3\n[[rule\n", 3, "invalid TOML"),
    ],
)
def test_errors_point_at_the_line(text: str, line: int, message: str) -> None:
    exc = error(text)
    assert exc.line == line, str(exc)
    assert message in exc.detail, str(exc)
    assert str(exc).startswith(f"rules.toml:{line}: ")


def test_error_inside_a_multiline_condition_names_its_own_line() -> None:
    text = MINIMAL.replace(
        'on = "Product Added"', 'on = "Product Added"\nif = """\nrevenue > 3\nand orders >\n"""'
    )
    exc = error(text)
    assert exc.line == 7  # the `and orders >` line, not the `if` key
    assert "column 13 of 'and orders >'" in exc.detail


def test_error_in_a_step_of_a_second_rule() -> None:
    text = (
        MINIMAL
        + '\n[[rule]]\nname = "b"\non = "X"\n\n[[rule.step]]\ntemplate = "t"\n\n[[rule.step]]\n'
        'template = "u"\nif = "orders >"\n'
    )
    exc = error(text)
    assert exc.line == 18
    assert "rule 'b' step 2 if" in exc.detail


def test_sources_are_combined_and_errors_name_their_file() -> None:
    settings = ("[rules]\nsuppression = '1h'\n", "config.toml")
    extra = (MINIMAL, "rules/extra.toml")
    ruleset = RuleSet.from_sources([settings, extra])
    assert ruleset.settings.suppression == 3600.0 and [r.name for r in ruleset.rules] == ["r"]
    assert ruleset.rules[0].where == "rules/extra.toml:2"
    with pytest.raises(
        RuleError,
        match=r"^rules/b.toml:3: rule 'r' is defined twice \(also at rules/extra.toml:2\)",
    ):
        RuleSet.from_sources([settings, extra, (MINIMAL, "rules/b.toml")])
    with pytest.raises(
        RuleError, match=r"^b.toml:2: rules.suppression is set twice \(also at config.toml:2\)"
    ):
        RuleSet.from_sources([settings, ("[rules]\nsuppression = '2h'\n", "b.toml")])


def test_disabled_rules_are_skipped() -> None:
    assert load(MINIMAL.replace('name = "r"', 'name = "r"\nenabled = false')).rules == ()


def test_rule_files_are_resolved_from_the_config(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "b.toml").write_text(MINIMAL.replace('"r"', '"b"'))
    (tmp_path / "rules" / "a.toml").write_text(MINIMAL.replace('"r"', '"a"'))
    (tmp_path / "more.toml").write_text(MINIMAL.replace('"r"', '"c"'))
    config = tmp_path / "config.toml"
    config.write_text('[server]\nport = 1\n[rules]\ndir = "rules"\nfiles = ["more.toml"]\n')
    names = [source.rsplit("/", 1)[-1] for _, source in rule_sources(config)]
    assert names == ["config.toml", "a.toml", "b.toml", "more.toml"]
    assert sorted(r.name for r in read_rules(config).rules) == ["a", "b", "c"]
    config.write_text('[rules]\ndir = "nowhere"\n')
    with pytest.raises(RuleError, match=r"rules\.dir 'nowhere' is not a folder"):
        rule_sources(config)
