"""Platform webhooks: verify a platform's signature and map its payload to Segment messages.

Pure: bytes and dicts in, Segment messages out; the HTTP shell (engine.inbound.http)
normalizes them (engine.events) and appends them to the store like any ingest.

A source is one `[webhooks.NAME]` table of config.toml: its secret, and a mapping (a
shipped one, "shopify" or "woocommerce", a TOML file, or tables inline) from each topic
to the events it emits. Worked example, Shopify's orders/create mapped with
`user_id = ["customer.id"]`, `properties = { revenue = "total_price:number" }`:

    {"id": 1, "customer": {"id": 7}, "total_price": "19.90"}
    -> {"type": "track", "event": "Order Completed", "userId": 7,
        "properties": {"revenue": 19.9}, ...}
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.coerce import whole_number
from engine.errors import AuthError, ConfigError, ValidationError
from engine.events import parse_time

MAPPINGS_DIR = Path(__file__).resolve().parent / "mappings"
# scheme -> the header carrying base64(HMAC-SHA256(secret, raw body)), as each platform documents.
SCHEMES = {
    "shopify": "X-Shopify-Hmac-Sha256",
    "woocommerce": "X-WC-Webhook-Signature",
}
# Saving a webhook in WooCommerce posts this, unsigned, and keeps the hook only on a 200.
_WOO_PING = re.compile(rb"^webhook_id=[0-9]{1,20}$")
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")
_MAPPING_KEYS = frozenset({"signature", "topic_header", "delivery_header", "topic"})
_EMIT_KEYS = frozenset(
    {
        "event",
        "each",
        "when",
        "user_id",
        "anonymous_id",
        "timestamp",
        "message_id",
        "properties",
        "traits",
        "products",
        "product",
    }
)


@dataclass(frozen=True)
class Emit:
    """One Segment track message a topic produces (one per element of `each`, if set)."""

    event: str
    each: str = ""
    when: tuple[tuple[str, tuple[str, ...]], ...] = ()
    user_id: tuple[str, ...] = ()
    anonymous_id: tuple[str, ...] = ()
    timestamp: str = ""
    message_id: str = ""  # a template: "shop-order-{id}"
    properties: tuple[tuple[str, str], ...] = ()
    traits: tuple[tuple[str, str], ...] = ()
    products: str = ""
    product: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class WebhookSource:
    """A platform posting to /webhooks/{name}."""

    name: str
    secret: str
    signature: str
    topic_header: str
    delivery_header: str = ""
    topics: tuple[tuple[str, tuple[Emit, ...]], ...] = ()

    def emits(self, topic: str) -> tuple[Emit, ...] | None:
        """What `topic` maps to, or None when it is not mapped."""
        for name, emits in self.topics:
            if name == topic:
                return emits
        return None


# --- configuration ------------------------------------------------------------------------


def webhooks_from_mapping(
    table: Any, env: Mapping[str, str] | None = None
) -> tuple[WebhookSource, ...]:
    """Sources from the `[webhooks]` table; errors name the key path (webhooks.shop.secret).

    The secret may come from NUDGE_WEBHOOKS_<NAME>_SECRET instead of the file.
    """
    env = env or {}
    if table is None:
        return ()
    if not isinstance(table, dict):
        raise ConfigError("[webhooks] must be a table", field="webhooks")
    sources = []
    for name, given in table.items():
        path = f"webhooks.{name}"
        if not _NAME.match(name):
            raise ConfigError(
                f"{path}: a source name is lower-case letters, digits, - and _", field=path
            )
        if not isinstance(given, dict):
            raise ConfigError(f"[{path}] must be a table", field=path)
        unknown = set(given) - _MAPPING_KEYS - {"secret", "mapping"}
        if unknown:
            key = sorted(unknown)[0]
            raise ConfigError(f"unknown setting {path}.{key}", field=f"{path}.{key}")
        data = _mapping_file(given.get("mapping", ""), f"{path}.mapping")
        data.update({k: v for k, v in given.items() if k in _MAPPING_KEYS})
        secret = env.get(f"NUDGE_WEBHOOKS_{name.upper().replace('-', '_')}_SECRET")
        secret = secret if secret is not None else given.get("secret", "")
        if not isinstance(secret, str) or not secret:
            raise ConfigError(f"{path}.secret must be a non-empty string", field=f"{path}.secret")
        sources.append(_source(name, secret, data, path))
    return tuple(sources)


def _mapping_file(mapping: Any, path: str) -> dict:
    if not isinstance(mapping, str):
        raise ConfigError(f"{path} must be a string", field=path)
    if not mapping:
        return {}
    file = MAPPINGS_DIR / f"{mapping}.toml" if _NAME.match(mapping) else Path(mapping)
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        shipped = ", ".join(sorted(p.stem for p in MAPPINGS_DIR.glob("*.toml")))
        raise ConfigError(
            f"{path}: no mapping {mapping!r} (shipped: {shipped}; or a .toml path)", field=path
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {file}: {exc}", field=path) from None


def _source(name: str, secret: str, data: dict, path: str) -> WebhookSource:
    scheme = data.get("signature")
    if scheme not in SCHEMES:
        raise ConfigError(
            f"{path}.signature must be one of {', '.join(SCHEMES)}", field=f"{path}.signature"
        )
    topic_header = _string(data.get("topic_header"), f"{path}.topic_header", required=True)
    delivery_header = _string(data.get("delivery_header", ""), f"{path}.delivery_header")
    topics = data.get("topic")
    if not isinstance(topics, dict) or not topics:
        raise ConfigError(f"{path}.topic must map topics to events", field=f"{path}.topic")
    parsed = []
    for topic, emits in topics.items():
        tpath = f'{path}.topic."{topic}"'
        if isinstance(emits, dict):
            emits = [emits]
        if not isinstance(emits, list) or not emits:
            raise ConfigError(f"{tpath} must be a table or an array of tables", field=tpath)
        parsed.append((topic, tuple(_emit(e, f"{tpath}[{i}]") for i, e in enumerate(emits))))
    return WebhookSource(name, secret, scheme, topic_header, delivery_header, tuple(parsed))


def _emit(data: Any, path: str) -> Emit:
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a table", field=path)
    unknown = set(data) - _EMIT_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"unknown setting {path}.{key}", field=f"{path}.{key}")
    event = _string(data.get("event"), f"{path}.event", required=True)
    when = data.get("when", {})
    if not isinstance(when, dict) or not all(
        isinstance(v, list) and all(isinstance(x, str) for x in v) for v in when.values()
    ):
        raise ConfigError(f"{path}.when must map paths to lists of strings", field=f"{path}.when")
    if not (data.get("user_id") or data.get("anonymous_id")):
        raise ConfigError(f"{path} needs user_id or anonymous_id paths", field=f"{path}.user_id")
    return Emit(
        event=event,
        each=_string(data.get("each", ""), f"{path}.each"),
        when=tuple((k, tuple(v)) for k, v in when.items()),
        user_id=_paths(data.get("user_id", []), f"{path}.user_id"),
        anonymous_id=_paths(data.get("anonymous_id", []), f"{path}.anonymous_id"),
        timestamp=_string(data.get("timestamp", ""), f"{path}.timestamp"),
        message_id=_string(data.get("message_id", ""), f"{path}.message_id"),
        properties=_table(data.get("properties", {}), f"{path}.properties"),
        traits=_table(data.get("traits", {}), f"{path}.traits"),
        products=_string(data.get("products", ""), f"{path}.products"),
        product=_table(data.get("product", {}), f"{path}.product"),
    )


def _string(value: Any, path: str, *, required: bool = False) -> str:
    if not isinstance(value, str) or (required and not value):
        raise ConfigError(f"{path} must be a {'non-empty ' if required else ''}string", field=path)
    return value


def _paths(value: Any, path: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{path} must be a path or a list of paths", field=path)
    return tuple(value)


def _table(value: Any, path: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(f"{path} must map names to paths", field=path)
    return tuple(value.items())


# --- signatures ---------------------------------------------------------------------------


def sign(secret: str, body: bytes) -> str:
    """base64(HMAC-SHA256(secret, body)): what Shopify and WooCommerce send."""
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def verify_signature(source: WebhookSource, headers: Mapping[str, str], body: bytes) -> None:
    """Raise AuthError unless the platform's signature header matches the raw body."""
    header = SCHEMES[source.signature]
    given = headers.get(header) or headers.get(header.lower())
    if not given:
        raise AuthError(f"missing {header} header", field=header)
    if not hmac.compare_digest(given.strip().encode(), sign(source.secret, body).encode()):
        raise AuthError(f"{header} does not match the body", field=header)


def is_ping(source: WebhookSource, headers: Mapping[str, str], body: bytes) -> bool:
    """True for WooCommerce's unsigned test ping (body `webhook_id=N`), which stores nothing."""
    header = SCHEMES[source.signature]
    signed = headers.get(header) or headers.get(header.lower())
    return source.signature == "woocommerce" and not signed and bool(_WOO_PING.match(body))


# --- mapping ------------------------------------------------------------------------------


def resolve(data: Any, path: str) -> Any:
    """The value at a dotted path ("line_items.0.price"), or None; "'x'" is the literal x."""
    if len(path) >= 2 and path[0] == path[-1] == "'":
        return path[1:-1]
    value = data
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and (at := whole_number(part)) is not None and at < len(value):
            value = value[at]
        else:
            return None
        if value is None:
            return None
    return value


def _value(root: Any, item: Any, spec: str, field: str) -> Any:
    path, _, conversion = spec.partition(":")
    if path.startswith("item.") and item is not None:
        value = resolve(item, path[5:])
    else:
        value = resolve(root, path)
    if value is None or conversion == "":
        return value
    if conversion == "number":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValidationError(
                f"{path} must be a number, got {str(value)[:40]!r}", field=field
            ) from None
    if conversion == "string":
        return str(value)
    raise ValidationError(f"unknown conversion :{conversion}", field=field)


def _identifier(root: Any, item: Any, paths: tuple[str, ...]) -> Any:
    for spec in paths:
        value = _value(root, item, spec, spec)
        # Platforms say "no customer" with 0 (WooCommerce guests) or an empty string.
        if value in (None, "", 0, "0"):
            continue
        if isinstance(value, (dict, list, bool)):
            # Malformed, not absent: falling back to the next path would quietly file
            # the customer's events under another id (an order under its cart token).
            field = spec.partition(":")[0]
            raise ValidationError(f"{field} must be a string or a number", field=field)
        return value
    return None


def _fill(root: Any, item: Any, pairs: tuple[tuple[str, str], ...]) -> dict:
    out = {}
    for name, spec in pairs:
        value = _value(root, item, spec, spec.partition(":")[0])
        if value is not None:
            out[name] = value
    return out


def _message_id(template: str, root: Any, item: Any, fallback: str, index: int | None) -> str:
    if not template:
        return fallback

    def sub(match: re.Match) -> str:
        value = _value(root, item, match.group(1), match.group(1))
        if value is None:
            if index is not None and match.group(1).startswith("item."):
                # A value one line lacks (a Shopify custom line has no variant_id): its
                # place in the list stands in, so the id stays the same across the
                # platform's deliveries of this object (and refusing the whole webhook
                # would lose its other events). The object's own id stays required.
                return f"#{index}"
            raise ValidationError(f"{match.group(1)} is missing", field=match.group(1))
        return str(value)

    return _PLACEHOLDER.sub(sub, template)


def map_payload(source: WebhookSource, topic: str, payload: Any, *, delivery_id: str) -> list[dict]:
    """The Segment messages a payload of `topic` maps to ([] when its conditions say none).

    Raises ValidationError naming the payload field at fault; `delivery_id` seeds the
    messageId of mappings that declare none, so a redelivery is deduplicated.
    """
    if not isinstance(payload, dict):
        raise ValidationError("the webhook body must be a JSON object", field="body")
    emits = source.emits(topic)
    if emits is None:
        return []
    messages = []
    for number, emit in enumerate(emits):
        if not all(str(resolve(payload, p)) in allowed for p, allowed in emit.when):
            continue
        if emit.each:
            items = resolve(payload, emit.each)
            if not isinstance(items, list):
                raise ValidationError(f"{emit.each} must be an array", field=emit.each)
            elements = [(i, item) for i, item in enumerate(items)]
        else:
            elements = [(None, None)]
        for index, item in elements:
            if emit.each and not isinstance(item, dict):
                raise ValidationError(
                    "each element must be an object", field=f"{emit.each}.{index}"
                )
            suffix = f"-{number}" + ("" if index is None else f"-{index}")
            message = _message(source, emit, payload, item, delivery_id + suffix, index)
            message["context"]["webhook"] = {"source": source.name, "topic": topic}
            messages.append(message)
    return messages


def _message(
    source: WebhookSource, emit: Emit, root: dict, item: Any, fallback: str, index: int | None
) -> dict:
    user_id = _identifier(root, item, emit.user_id)
    anonymous_id = _identifier(root, item, emit.anonymous_id)
    if user_id is None and anonymous_id is None:
        field = (emit.user_id + emit.anonymous_id)[0].partition(":")[0]
        raise ValidationError(
            f"no customer id: none of {', '.join(emit.user_id + emit.anonymous_id)} is present",
            field=field,
        )
    properties = _fill(root, item, emit.properties)
    if emit.products:
        lines = resolve(root, emit.products)
        if lines is not None and not isinstance(lines, list):
            raise ValidationError(f"{emit.products} must be an array", field=emit.products)
        products = []
        for i, line in enumerate(lines or []):
            if not isinstance(line, dict):
                raise ValidationError("each line must be an object", field=f"{emit.products}.{i}")
            products.append(_fill(line, None, emit.product))
        properties["products"] = products
    message: dict[str, Any] = {
        "type": "track",
        "event": emit.event,
        "messageId": f"{source.name}:" + _message_id(emit.message_id, root, item, fallback, index),
        "properties": properties,
        "context": {},
    }
    if user_id is not None:
        message["userId"] = user_id
    if anonymous_id is not None:
        message["anonymousId"] = anonymous_id
    traits = _fill(root, item, emit.traits)
    if traits:
        message["context"]["traits"] = traits
    if emit.timestamp and (stamp := resolve(root, emit.timestamp)) is not None:
        parse_time(stamp, emit.timestamp)  # a bad time names the payload's field
        message["timestamp"] = stamp
    return message
