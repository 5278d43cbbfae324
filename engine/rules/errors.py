"""The rule loader's error: a ConfigError that points at `source:line`."""

from __future__ import annotations

from engine.errors import ConfigError


class RuleError(ConfigError):
    """A rule file that cannot be loaded; the message starts with `source:line`."""

    code = "rule_error"

    def __init__(
        self, message: str, *, source: str, line: int | None = None, field: str | None = None
    ):
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {message}", field=field)
        self.source = source
        self.line = line
        self.detail = message
