"""Tiny placeholder templates for URLs, headers, bodies and HTML (pure).

`{name}` or `{a.b.c}` looks a value up in a context of nested dicts; `{price|money}`
applies a filter; `{{` and `}}` are literal braces. Nothing else is evaluated, so a
template cannot reach attributes or call code (unlike str.format). Each use site
says how a value is encoded: URL-quoted, header-cleaned, JSON, or HTML-escaped.

>>> Template("<b>{name}</b>").render({"name": "<i>"}, html_value)
'<b>&lt;i&gt;</b>'
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

from engine.coerce import whole_number

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
FILTERS = ("url", "money")
_SAFE_SCHEMES = ("http://", "https://", "mailto:")
_URL_SAFE = re.compile(r"[A-Za-z0-9_.~-]*\Z")


class TemplateError(ValueError):
    """A template that cannot be parsed; the message says where."""


class Markup(str):
    """HTML this module produced (already escaped): inserted as is by `html_value`."""

    __slots__ = ()


class Template:
    """A parsed template: literal text and (path, filter) holes."""

    __slots__ = ("_format", "_holes", "_literal", "_one", "fields", "parts", "text")

    def __init__(self, text: str):
        self.text = text
        parts: list[str | tuple[tuple[str, ...], str]] = []
        names: set[str] = set()
        at = 0
        for match in _PLACEHOLDER.finditer(text):
            token = match.group(0)
            if token in ("{", "}"):
                raise TemplateError(
                    f"unmatched {token!r} at offset {match.start()} (write {token * 2} for a brace)"
                )
            parts.append(text[at : match.start()])
            at = match.end()
            if token in ("{{", "}}"):
                parts.append(token[0])
                continue
            path, _, filt = match.group(1).strip().partition("|")
            path, filt = path.strip(), filt.strip()
            if not _PATH.match(path):
                raise TemplateError(f"bad placeholder {token!r} (use {{name}} or {{a.b}})")
            if filt and filt not in FILTERS:
                raise TemplateError(f"unknown filter {filt!r} in {token!r} (known: url, money)")
            names.add(path)
            parts.append((tuple(path.split(".")), filt))
        parts.append(text[at:])
        self.parts = [p for p in parts if p != ""]
        self.fields = frozenset(names)
        # Compiled for speed: literal text as a format string with one {} per hole; the
        # values passed to format() are already encoded strings, never templates.
        self._format = "".join(
            p.replace("{", "{{").replace("}", "}}") if isinstance(p, str) else "{}"
            for p in self.parts
        )
        self._holes = [p for p in self.parts if not isinstance(p, str)]
        # Most templates have one hole or none ("<p>{title}</p>", a URL with the
        # customer id, a fixed fallback): literal text around it, joined directly.
        self._literal = "".join(self.parts) if not self._holes else None
        self._one: tuple[str, tuple[str, ...], str, str] | None = None
        if len(self._holes) == 1:
            at = next(i for i, p in enumerate(self.parts) if not isinstance(p, str))
            path, filt = self._holes[0]
            before, after = "".join(self.parts[:at]), "".join(self.parts[at + 1 :])
            self._one = (before, path, filt, after)

    def render(self, context: Mapping[str, Any], encode: Callable[[Any, str], str]) -> str:
        """The text with each hole replaced by `encode(value, filter)`."""
        if self._one is not None:
            before, path, filt, after = self._one
            return before + encode(lookup(context, path), filt) + after
        if self._literal is not None:
            return self._literal
        return self._format.format(*[encode(lookup(context, p), f) for p, f in self._holes])

    @property
    def single(self) -> tuple[tuple[str, ...], str] | None:
        """The one hole, if the template is exactly one placeholder and nothing else."""
        if len(self.parts) == 1 and not isinstance(self.parts[0], str):
            return self.parts[0]
        return None


def lookup(context: Any, path: tuple[str, ...] | str) -> Any:
    """The value at a dotted path in nested dicts (list items by index), or None."""
    if isinstance(path, str):
        path = tuple(path.split(".")) if path else ()
    value = context
    for key in path:
        if type(value) is dict or isinstance(value, Mapping):
            value = value.get(key)
        elif type(value) is list and (at := whole_number(key)) is not None and at < len(value):
            value = value[at]
        else:
            return None
    return value


def _text(value: Any, filt: str) -> str:
    if type(value) is str and not filt:
        return value
    if value is None:
        return ""
    if filt == "money":
        try:
            return f"{float(value):.2f}"
        except (TypeError, ValueError):
            return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def safe_url(value: Any) -> str:
    """`value` if it is an http(s)/mailto or site-relative URL, else "" (no javascript:)."""
    if not isinstance(value, str):
        return ""
    stripped = value.strip()
    # Lower-cased only when it is not already a lower-case scheme: most URLs are.
    if stripped.startswith(_SAFE_SCHEMES) or stripped.lower().startswith(_SAFE_SCHEMES):
        return stripped
    if stripped.startswith("/") and not stripped.startswith("//"):
        return stripped
    return ""


def html_value(value: Any, filt: str) -> str:
    """HTML-escape a value for text or a quoted attribute; `|url` also drops unsafe schemes."""
    if type(value) is str and not filt:  # most values: the text is the value itself
        text = value
    elif isinstance(value, Markup):
        return value
    else:
        text = safe_url(value) if filt == "url" else _text(value, filt)
    # What html.escape replaces; five `in` tests cost about half a regex search.
    if "&" in text or "<" in text or ">" in text or '"' in text or "'" in text:
        return html.escape(text, quote=True)
    return text  # most values: nothing to escape


def url_value(value: Any, filt: str) -> str:
    """Percent-encode a value for any part of a URL (`/`, `?`, `&` included)."""
    text = _text(value, filt)
    if text in (".", ".."):  # a path segment servers would resolve, not a value
        return text.replace(".", "%2E")
    if _URL_SAFE.match(text):
        return text
    return quote(text, safe="")


def header_value(value: Any, filt: str) -> str:
    """A value fit for an HTTP header: control characters removed."""
    return "".join(ch for ch in _text(value, filt) if ch >= " " and ch != "\x7f")


def body_fields(body: Any) -> frozenset[str]:
    """Fields named by the string leaves of a JSON body template."""
    names: set[str] = set()
    stack = [body]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            names |= Template(item).fields
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return frozenset(names)


def compile_body(body: Any) -> Any:
    """A JSON body template with its string leaves parsed once, for `render_body`."""
    if isinstance(body, str):
        return Template(body)
    if isinstance(body, dict):
        return {key: compile_body(value) for key, value in body.items()}
    if isinstance(body, list):
        return [compile_body(value) for value in body]
    return body


def render_body(body: Any, context: Mapping[str, Any]) -> Any:
    """A JSON body template (as written, or from `compile_body`) filled in: a lone
    `"{field}"` keeps the value's JSON type."""
    if isinstance(body, (str, Template)):
        template = Template(body) if isinstance(body, str) else body
        hole = template.single
        if hole is not None and not hole[1]:
            return lookup(context, hole[0])
        return template.render(context, _text)
    if isinstance(body, dict):
        return {key: render_body(value, context) for key, value in body.items()}
    if isinstance(body, list):
        return [render_body(value, context) for value in body]
    return body
