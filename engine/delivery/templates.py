"""Email templates: a sandboxed, autoescaping Jinja2 set with declared fallbacks (pure).

A template set is a directory holding `templates.toml` and the template files:

    [defaults]                         # fallbacks for every template
    "customer.first_name" = "there"
    "cart.items[].name" = "An item you picked"   # [] = each element of a list

    [template.cart-followup]
    subject = "{{ customer.first_name }}, still thinking it over?"
    html = "cart-followup.html"        # extends layout.html, includes partials/*.html
    text = "cart-followup.txt"
    [template.cart-followup.defaults]  # this template's own fallbacks
    coupon = "COMEBACK10"

A value that is missing or None in the context takes its declared default
before rendering. Anything else that is missing is an error, never an empty
string: the environment uses StrictUndefined, and printing a None stops the
render too. `nudge render` shows a message from a profile or a fixture.
"""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import css_inline
import jinja2
from jinja2.sandbox import SandboxedEnvironment

from engine.content.template import safe_url
from engine.errors import ConfigError, EngineError

PACKAGED = Path(__file__).resolve().parent / "templates"
MANIFEST = "templates.toml"


class TemplateError(EngineError):
    """A template that is missing, broken, or needs a value nobody declared a default for."""

    code = "template_error"
    status = 422


@dataclass(frozen=True)
class Rendered:
    """One rendered message: subject, HTML (CSS inlined) and plain text."""

    subject: str
    html: str
    text: str


@dataclass(frozen=True)
class _Spec:
    name: str
    subject: str
    html: str
    text: str
    defaults: tuple[tuple[str, Any], ...]


class _NoneValue(jinja2.UndefinedError):
    pass


def _finalize(value: Any) -> Any:
    # Jinja would print None as "None"; a missing value must have a declared default.
    if value is None:
        raise _NoneValue("a printed value is None and has no declared default")
    return value


def money(value: Any) -> str:
    """A price as 12.50; "" for anything that is not a number."""
    try:
        return f"{float(value):.2f}"
    except (TypeError, ValueError):
        return ""


class TemplateSet:
    """The templates of one directory, compiled lazily and cached."""

    def __init__(self, directory: str | Path = ""):
        self.directory = Path(directory) if directory else PACKAGED
        manifest = self.directory / MANIFEST
        try:
            data = tomllib.loads(manifest.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(
                f"no {MANIFEST} in template directory {self.directory}", field="templates_dir"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{manifest}: {exc}", field="templates_dir") from None
        except (OSError, UnicodeDecodeError) as exc:  # a directory, no permission, not UTF-8
            raise ConfigError(f"cannot read {manifest}: {exc}", field="templates_dir") from None
        self.defaults = _defaults(data.get("defaults", {}), f"{manifest} [defaults]")
        self.specs: dict[str, _Spec] = {}
        for name, table in (data.get("template") or {}).items():
            where = f"{manifest} [template.{name}]"
            if not isinstance(table, dict) or not all(
                isinstance(table.get(k), str) for k in ("subject", "html", "text")
            ):
                raise ConfigError(f"{where} needs subject, html and text", field="templates_dir")
            self.specs[name] = _Spec(
                name,
                table["subject"],
                table["html"],
                table["text"],
                _defaults(table.get("defaults", {}), f"{where}.defaults"),
            )
        self.env = _environment(self.directory, autoescape=True)
        self.text_env = _environment(self.directory, autoescape=False)
        self._subjects: dict[str, jinja2.Template] = {}

    def _subject(self, spec: _Spec) -> jinja2.Template:
        # Compiling is most of the cost of a small template: once per template set.
        compiled = self._subjects.get(spec.name)
        if compiled is None:
            compiled = self._subjects[spec.name] = self.text_env.from_string(spec.subject)
        return compiled

    def names(self) -> list[str]:
        """The template names this set declares."""
        return sorted(self.specs)

    def __contains__(self, name: str) -> bool:
        return name in self.specs

    def render(self, name: str, context: Mapping[str, Any]) -> Rendered:
        """Render template `name`: fallbacks applied, HTML autoescaped and CSS inlined."""
        spec = self.specs.get(name)
        if spec is None:
            raise TemplateError(
                f"no template {name!r} in {self.directory} (known: {', '.join(self.names())})",
                field="template",
            )
        values = apply_defaults(context, self.defaults + spec.defaults)
        try:
            subject = self._subject(spec).render(values)
            html = self.env.get_template(spec.html).render(values)
            text = self.text_env.get_template(spec.text).render(values)
        except jinja2.TemplateNotFound as exc:
            raise TemplateError(f"template {name!r}: file {exc.name} not found") from None
        except jinja2.UndefinedError as exc:
            raise TemplateError(f"template {name!r}: {exc}", field="template") from None
        except jinja2.TemplateError as exc:  # syntax errors and sandbox violations
            where = f" line {exc.lineno}" if getattr(exc, "lineno", None) else ""
            raise TemplateError(f"template {name!r}{where}: {exc}", field="template") from None
        return Rendered(" ".join(subject.split()), _inline(html), text.strip() + "\n")


class _Environment(SandboxedEnvironment):
    """Dots on a dict read its keys only: `cart.items` is the items, not dict.items."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, dict):
            if attribute in obj:
                return obj[attribute]
            return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)


def _environment(directory: Path, *, autoescape: bool) -> SandboxedEnvironment:
    env = _Environment(
        loader=jinja2.FileSystemLoader(str(directory)),
        autoescape=autoescape,
        undefined=jinja2.StrictUndefined,
        finalize=_finalize,
        trim_blocks=True,
        auto_reload=False,  # no stat() of every file and partial on every render
        lstrip_blocks=True,
    )
    env.filters["money"] = money
    env.filters["track"] = _track
    env.filters["safe_url"] = safe_url
    return env


@jinja2.pass_context
def _track(context: Any, url: Any) -> str:
    """A click-tracking link to `url` (only http(s) URLs; others become "")."""
    target = safe_url(url)
    if not target:
        return ""
    tracker = context.get("_track")
    return tracker(target) if tracker is not None else target


def _inline(html: str) -> str:
    # Email clients drop <style> blocks: move the CSS onto each element.
    return css_inline.inline(html)


def _defaults(raw: Any, where: str) -> tuple[tuple[str, Any], ...]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table of path = value", field="templates_dir")
    return tuple(raw.items())


def apply_defaults(context: Mapping[str, Any], defaults: tuple[tuple[str, Any], ...]) -> dict:
    """A copy of `context` where each declared path that is missing or None has its default.

    A path is dotted (`customer.first_name`); `items[]` means every element of a list.

    >>> apply_defaults({"cart": {"items": [{"name": None}, {"name": "Hat"}]}},
    ...                (("cart.items[].name", "An item"),))["cart"]["items"]
    [{'name': 'An item'}, {'name': 'Hat'}]
    """
    out = {k: copy.deepcopy(v) if isinstance(v, (dict, list)) else v for k, v in context.items()}
    for path, default in defaults:
        _fill(out, path.split("."), default)
    return out


def _fill(node: Any, parts: list[str], default: Any) -> None:
    head, rest = parts[0], parts[1:]
    each = head.endswith("[]")
    key = head[:-2] if each else head
    if not isinstance(node, dict):
        return
    if each:
        items = node.get(key)
        if isinstance(items, list) and rest:
            for item in items:
                _fill(item, rest, default)
        return
    if not rest:
        if node.get(key) is None:
            node[key] = copy.deepcopy(default)
        return
    if node.get(key) is None:
        node[key] = {}
    _fill(node[key], rest, default)
