"""Compiled rules, segments and global settings: plain frozen data."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.rules.compile import Expr
from engine.rules.durations import Cap

EVENT, ENTER, LEAVE, INACTIVE = "event", "enter", "leave", "inactive"
SKIP, DEFER = "skip", "defer"


@dataclass(frozen=True)
class Settings:
    """The `[rules]` table: defaults and limits that span every rule."""

    suppression: float = 0.0  # seconds a higher-priority send silences lower-priority rules
    caps: tuple[Cap, ...] = ()  # across all rules
    on_cap: str = SKIP
    quiet_hours: tuple[int, int] | None = None  # local minutes of day (start, end)
    timezone: str = "UTC"
    expires: float | None = None
    reentry: float = 3600.0
    dir: str | None = None
    files: tuple[str, ...] = ()
    where: dict[str, str] = field(default_factory=dict, compare=False)  # key -> source:line


@dataclass(frozen=True, eq=False)
class Segment:
    """A named audience, recomputed on each of the customer's events."""

    name: str
    cond: Expr
    description: str = ""
    where: str = ""


@dataclass(frozen=True, eq=False)
class Step:
    """One email of a flow: wait after the previous step (or the entry), then send."""

    index: int
    wait: float
    template: str

    def __repr__(self) -> str:
        return f"Step({self.index + 1}, wait={self.wait:g}, template={self.template!r})"

    cond: Expr | None = None
    payload: tuple[tuple[str, Expr], ...] = ()
    blocks: tuple[str, ...] | None = None  # None: the rule's blocks
    esp: str | None = None
    where: str = ""


@dataclass(frozen=True, eq=False)
class Cancel:
    """An event that ends running instances of the rule (when `cond` holds)."""

    events: tuple[str, ...]
    cond: Expr | None = None
    where: str = ""


@dataclass(frozen=True, eq=False)
class Rule:
    """A compiled trigger rule."""

    name: str
    kind: str  # event | enter | leave | inactive
    steps: tuple[Step, ...]
    order: int = 0  # position in the files, for stable ties
    priority: int = 0
    description: str = ""
    on: tuple[str, ...] = ()  # entry events (kind == event)
    segment: str | None = None  # kind == enter / leave
    idle: float | None = None  # kind == inactive: seconds without activity
    activity: tuple[str, ...] | None = None  # events that count as activity (None: any)
    cond: Expr | None = None
    key: Expr | None = None
    restart_on: tuple[str, ...] = ()
    cancels: tuple[Cancel, ...] = ()
    exit: Expr | None = None
    reentry: float = 3600.0  # math.inf: once per key, ever
    expires: float | None = None
    caps: tuple[Cap, ...] = ()
    on_cap: str = SKIP
    quiet: tuple[int, int] | None = None
    suppressible: bool = True
    esp: str = "default"
    experiment: str = ""
    holdout: float = 0.0  # percent
    variants: tuple[tuple[str, float], ...] = ()
    payload: tuple[tuple[str, Expr], ...] = ()
    blocks: tuple[str, ...] = ()
    max_instances: int = 20
    keep: frozenset[str] | None = frozenset()  # trigger properties kept (None: all)
    where: str = ""
    source: str = ""

    def __repr__(self) -> str:
        return (
            f"Rule({self.name!r}, {self.kind}, priority={self.priority}, steps={len(self.steps)})"
        )

    def describe_entry(self) -> str:
        """How the rule is entered, in words."""
        from engine.rules.durations import format_duration

        if self.kind == EVENT:
            text = "on " + " or ".join(self.on)
        elif self.kind == ENTER:
            text = f"on entering segment {self.segment}"
        elif self.kind == LEAVE:
            text = f"on leaving segment {self.segment}"
        else:
            text = f"after {format_duration(self.idle or 0)} without activity"
        return text + (f" if {' '.join(self.cond.text.split())}" if self.cond is not None else "")

    def expressions(self):
        """(label, Expr) for every expression of the rule."""
        if self.cond is not None:
            yield "if", self.cond
        if self.key is not None:
            yield "key", self.key
        for i, cancel in enumerate(self.cancels):
            if cancel.cond is not None:
                yield f"cancel_on[{i}].if", cancel.cond
        if self.exit is not None:
            yield "exit", self.exit
        for name, expr in self.payload:
            yield f"payload.{name}", expr
        for step in self.steps:
            if step.cond is not None:
                yield f"step[{step.index}].if", step.cond
            for name, expr in step.payload:
                yield f"step[{step.index}].payload.{name}", expr
