"""Find the line of a table or key in TOML text (tomllib keeps no positions).

Paths use tomllib's shape: ("rule", 2, "step", 0, "template") is the
`template` key of the first `[[rule.step]]` of the third `[[rule]]`. A path
that cannot be found exactly falls back to its longest known prefix, so an
error always points at least at its table.

>>> loc = Locator('[rules]\\ncaps = ["2/1d"]\\n[[rule]]\\nname = "a"\\n', "c.toml")
>>> loc.line(("rule", 0, "name")), loc.line(("rules", "caps"))
(4, 2)
"""

from __future__ import annotations

import re

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(?:#.*)?$")
_KEY = re.compile(
    r"""^\s*((?:[A-Za-z0-9_\-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_\-]+|"[^"]*"|'[^']*'))*)\s*="""
)
_INLINE_KEY = re.compile(r"""[{,]\s*([A-Za-z0-9_\-]+|"[^"]*")\s*=""")


def _split_key(text: str) -> tuple[str, ...]:
    parts = re.findall(r"""[A-Za-z0-9_\-]+|"[^"]*"|'[^']*'""", text)
    return tuple(p[1:-1] if p[0] in "\"'" else p for p in parts)


class Locator:
    """Line numbers (1-based) of the tables and keys of one TOML document."""

    def __init__(self, text: str, source: str):
        self.source = source
        self.text = text
        self._lines: dict[tuple, int] = {}
        self._scan(text)

    def line(self, path: tuple) -> int | None:
        """The line of `path`, else of its longest prefix that has one."""
        for end in range(len(path), 0, -1):
            found = self._lines.get(tuple(path[:end]))
            if found is not None:
                return found
        return None

    def exact(self, path: tuple) -> int | None:
        """The line of exactly `path` (no fallback to a prefix)."""
        return self._lines.get(tuple(path))

    def where(self, path: tuple) -> str:
        """`source:line` for `path` (just the source when nothing matches)."""
        line = self.line(path)
        return f"{self.source}:{line}" if line else self.source

    def _scan(self, text: str) -> None:
        arrays: dict[tuple, int] = {}
        current: tuple = ()
        in_string: str | None = None
        array_key: tuple | None = None  # a multi-line array value being read
        depth = 0
        element = -1
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw
            if in_string is not None:
                if line.count(in_string) % 2 == 1:
                    in_string = None
                continue
            if array_key is not None:
                stripped = line.strip()
                if depth == 1 and stripped.startswith("{"):
                    element += 1
                    self._lines.setdefault((*array_key, element), number)
                    for inner in _INLINE_KEY.findall(stripped):
                        self._lines.setdefault((*array_key, element, inner.strip('"')), number)
                depth += _brackets(line)
                if depth <= 0:
                    array_key = None
                continue
            header = _HEADER.match(line)
            if header and not _KEY.match(line):
                parts = _split_key(header.group(2))
                path: tuple = ()
                for i, part in enumerate(parts):
                    path = (*path, part)
                    if path in arrays and i < len(parts) - 1:
                        path = (*path, arrays[path] - 1)
                if header.group(1) == "[[":
                    arrays[path] = arrays.get(path, 0) + 1
                    path = (*path, arrays[path] - 1)
                self._lines.setdefault(path, number)
                current = path
                continue
            key = _KEY.match(line)
            if not key:
                continue
            path = (*current, *_split_key(key.group(1)))
            self._lines.setdefault(path, number)
            value = line[key.end() :]
            for quote in ('"""', "'''"):
                if value.count(quote) % 2 == 1:
                    in_string = quote
            if value.lstrip().startswith("{"):
                for inner in _INLINE_KEY.findall(value):
                    self._lines.setdefault((*path, inner.strip('"')), number)
            elif value.lstrip().startswith("["):
                opened = _brackets(value)
                element = -1
                if opened > 0:
                    array_key, depth = path, opened
                # elements of a one-line array of inline tables
                for i, chunk in enumerate(re.findall(r"\{[^{}]*\}", value)):
                    self._lines.setdefault((*path, i), number)
                    for inner in _INLINE_KEY.findall(chunk):
                        self._lines.setdefault((*path, i, inner.strip('"')), number)
            if (
                in_string is not None
                and value.strip().endswith(in_string)
                and value.count(in_string) == 1
            ):
                # the string opens here and its text starts on the next line
                self._lines.setdefault((*path, "@text"), number + 1)


def _brackets(text: str) -> int:
    """Net count of opening brackets and braces outside strings."""
    depth = 0
    quote = None
    for ch in text:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            break
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
    return depth
