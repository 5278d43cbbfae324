"""A decided email: what the dispatcher renders and hands to an ESP."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from typing import Any


def send_id(rule: str, step: int, customer: str, instance: str) -> str:
    """Deterministic id of one step of one trigger instance (the ESP idempotency key).

    >>> send_id("cart", 1, "ann", "@1700000000.0") == send_id("cart", 1, "ann", "@1700000000.0")
    True
    """
    raw = "\x1f".join((rule, str(step), customer, instance)).encode()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


@dataclass(frozen=True)
class Send:
    """One email decided by a rule; `deliver` is False for a holdout's record."""

    send_id: str
    rule: str
    step: int  # 1-based position in the rule's flow
    variant: str | None  # None, a variant name, or "holdout"
    customer: str
    at: float  # epoch seconds the send is due
    template: str
    esp: str = "default"
    payload: dict[str, Any] = field(default_factory=dict)
    deliver: bool = True
    instance: str = ""  # the trigger instance: "key@start"

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the outbox, JSON and the simulator (the payload copied, as asdict)."""
        return {
            "send_id": self.send_id,
            "rule": self.rule,
            "step": self.step,
            "variant": self.variant,
            "customer": self.customer,
            "at": self.at,
            "template": self.template,
            "esp": self.esp,
            "payload": _copy(self.payload),
            "deliver": self.deliver,
            "instance": self.instance,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Send:
        """Rebuild a Send from `to_dict` output."""
        return cls(**data)


def _copy(value: Any) -> Any:
    """A deep copy of plain JSON-like data (what dataclasses.asdict does, minus its overhead)."""
    cls = value.__class__
    if cls is dict:
        return {k: _copy(v) for k, v in value.items()}
    if cls is list:
        return [_copy(v) for v in value]
    if cls is str or cls is int or cls is float or cls is bool or value is None:
        return value
    return copy.deepcopy(value)
