"""Find the rule documents of a config: the file itself plus `[rules] dir` and `files`."""

from __future__ import annotations

import tomllib
from pathlib import Path

from engine.rules.errors import RuleError
from engine.rules.ruleset import RuleSet

STARTER = Path(__file__).with_name("starter.toml")


def rule_sources(config_path: str | Path) -> list[tuple[str, str]]:
    """(text, source) of the config and every rule file it names, in a stable order.

    `dir` (all *.toml in it, sorted by name) and `files` are relative to the
    config file's folder.
    """
    path = Path(config_path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RuleError(f"cannot read rules: {exc.strerror}", source=str(path)) from None
    sources = [(text, str(path))]
    try:
        table = tomllib.loads(text).get("rules", {})
    except tomllib.TOMLDecodeError:
        return sources  # from_sources reports it with a line number
    if not isinstance(table, dict):
        return sources
    base = path.parent
    extra: list[Path] = []
    folder = table.get("dir")
    if isinstance(folder, str):
        where = base / folder
        if not where.is_dir():
            raise RuleError(
                f"rules.dir {folder!r} is not a folder", source=str(path), field="rules.dir"
            )
        extra += sorted(where.glob("*.toml"))
    for name in table.get("files", []) if isinstance(table.get("files"), list) else []:
        extra.append(base / name)
    for file in extra:
        if file.resolve() == path.resolve():
            continue
        try:
            sources.append((file.read_text(encoding="utf-8"), str(file)))
        except OSError as exc:
            raise RuleError(f"cannot read rule file: {exc.strerror}", source=str(file)) from None
    return sources


def read_rules(config_path: str | Path) -> RuleSet:
    """The RuleSet of a config file and its rule files."""
    return RuleSet.from_sources(rule_sources(config_path))
