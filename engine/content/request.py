"""A content request's options, from a GET query or a POST body, validated (pure).

GET  ?blocks=cart,offers&format=html&deadline_ms=150&recommendations.limit=6
POST {"blocks": ["cart", "offers"], "format": "json", "deadline_ms": 150,
      "options": {"recommendations": {"limit": 6}, "offers": {"placement": "hero"}}}

Errors are ValidationErrors naming the parameter at fault. Query parameters
starting with `_` are ignored (cache busters); `exp` and `sig` belong to signing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.coerce import whole_number
from engine.content.config import FORMATS, ContentConfig
from engine.errors import ValidationError

MAX_LIMIT = 50
_SCALARS = (str, int, float, bool)


@dataclass(frozen=True)
class ContentRequest:
    """What one call asks for."""

    customer_id: str
    blocks: tuple[str, ...]
    format: str
    deadline_ms: int
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def option(self, block: str) -> Mapping[str, Any]:
        """The options given for `block` (empty if none)."""
        return self.options.get(block, _EMPTY)


_EMPTY: Mapping[str, Any] = {}


def _blocks(value: Any, config: ContentConfig, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        names = [n.strip() for n in value.split(",") if n.strip()]
    elif isinstance(value, list) and all(isinstance(n, str) for n in value):
        names = value
    else:
        raise ValidationError("blocks must be a list of block names", field=where)
    if not names:
        raise ValidationError("ask for at least one block", field=where)
    known = set(config.block_names)
    out: list[str] = []
    for i, name in enumerate(names):
        if name not in known:
            raise ValidationError(
                f"no block {name!r} (known: {', '.join(config.block_names)})",
                field=f"{where}[{i}]",
                code="unknown_block",
            )
        if name not in out:
            out.append(name)
    return tuple(out)


def _deadline(value: Any, config: ContentConfig, where: str) -> int:
    if isinstance(value, str):
        value = whole_number(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError("deadline_ms must be a whole number of milliseconds", field=where)
    if not config.reserve_ms < value <= config.max_deadline_ms:
        raise ValidationError(
            f"deadline_ms must be {config.reserve_ms + 1}-{config.max_deadline_ms}", field=where
        )
    return value


def _format(value: Any, where: str) -> str:
    if value not in FORMATS:
        raise ValidationError("format must be json or html", field=where)
    return value


def _limit(options: dict[str, dict[str, Any]]) -> None:
    for block, given in options.items():
        if "limit" not in given:
            continue
        value = given["limit"]
        if isinstance(value, str):
            value = whole_number(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIMIT:
            raise ValidationError(f"limit must be 1-{MAX_LIMIT}", field=f"{block}.limit")
        given["limit"] = value


def from_query(
    customer_id: str, pairs: list[tuple[str, str]], config: ContentConfig
) -> ContentRequest:
    """A ContentRequest from GET query parameters."""
    blocks, fmt, deadline = config.default_blocks, config.default_format, config.deadline_ms
    options: dict[str, dict[str, Any]] = {}
    known = set(config.block_names)
    for key, value in pairs:
        if key.startswith("_") or key in ("exp", "sig"):
            continue
        if key == "blocks":
            blocks = _blocks(value, config, "blocks")
        elif key == "format":
            fmt = _format(value, "format")
        elif key == "deadline_ms":
            deadline = _deadline(value, config, "deadline_ms")
        elif "." in key and key.partition(".")[0] in known:
            block, _, name = key.partition(".")
            options.setdefault(block, {})[name] = value
        else:
            raise ValidationError(f"unknown parameter {key!r}", field=key)
    _limit(options)
    return ContentRequest(customer_id, tuple(blocks), fmt, deadline, options)


def from_body(
    customer_id: str, body: Any, pairs: list[tuple[str, str]], config: ContentConfig
) -> ContentRequest:
    """A ContentRequest from a POST JSON body (the query may hold only exp, sig and _*)."""
    base = from_query(customer_id, pairs, config)
    if not isinstance(body, dict):
        raise ValidationError("the body must be a JSON object", field="body")
    blocks, fmt, deadline = base.blocks, base.format, base.deadline_ms
    options = {k: dict(v) for k, v in base.options.items()}
    known = set(config.block_names)
    for key, value in body.items():
        if key == "blocks":
            blocks = _blocks(value, config, "body.blocks")
        elif key == "format":
            fmt = _format(value, "body.format")
        elif key == "deadline_ms":
            deadline = _deadline(value, config, "body.deadline_ms")
        elif key == "options":
            if not isinstance(value, dict):
                raise ValidationError("options must be an object", field="body.options")
            for block, given in value.items():
                where = f"body.options.{block}"
                if block not in known:
                    raise ValidationError(f"no block {block!r}", field=where)
                if not isinstance(given, dict) or not all(
                    isinstance(v, _SCALARS) for v in given.values()
                ):
                    raise ValidationError(f"{where} must map names to plain values", field=where)
                options.setdefault(block, {}).update(given)
        else:
            raise ValidationError(f"unknown field {key!r}", field=f"body.{key}")
    _limit(options)
    return ContentRequest(customer_id, tuple(blocks), fmt, deadline, options)
