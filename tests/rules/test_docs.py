"""The rule guide's examples load and compile, so the guide cannot drift from the code."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from engine.rules import RuleSet
from engine.rules.compile import Scope, compile_expr

GUIDE = Path(__file__).parents[2] / "docs" / "rules.md"
BLOCKS = re.findall(r"```toml\n(.*?)```", GUIDE.read_text(), re.S)


@pytest.mark.parametrize("block", [b for b in BLOCKS if "[[rule]]" in b or "[segment." in b])
def test_rule_examples_load(block: str) -> None:
    text = (
        block
        if "[[rule.step]]" in block or "[[rule]]" not in block
        else block + '\n[[rule.step]]\ntemplate = "t"\n'
    )
    RuleSet.from_toml(text, source="docs/rules.md")


def test_condition_examples_compile() -> None:
    lines = [
        line for block in BLOCKS for line in block.splitlines() if re.match(r"(if|exit) = ", line)
    ]
    assert len(lines) >= 5
    for line in lines:
        (text,) = tomllib.loads(line).values()
        compile_expr(text, Scope(instance=True))
