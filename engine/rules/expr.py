"""The condition language: a tokenizer and a recursive-descent parser (never eval).

Grammar, loosest binding first::

    expr     := and ("or" and)*
    and      := not ("and" not)*
    not      := "not" not | compare
    compare  := sum [("==" | "!=" | "<" | "<=" | ">" | ">=" | "in" | "not in") sum]
    sum      := product (("+" | "-") product)*
    product  := unary (("*" | "/" | "%") unary)*
    unary    := "-" unary | postfix
    postfix  := atom ("." NAME | "[" expr "]")*
    atom     := NUMBER | DURATION | STRING | true | false | null
              | NAME "(" [arg ("," arg)*] ")" | NAME | "(" expr ")" | "[" [expr ("," expr)*] "]"
    arg      := [NAME "="] expr

A DURATION such as `15m` or `1d12h` is a number of seconds. The parser only
builds `Node`s; `engine.rules.compile` turns them into closures.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from engine.rules.durations import parse_duration

MAX_LENGTH = 4000
MAX_DEPTH = 60
_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<dur>(?:\d+(?:\.\d+)?[smhdw])+(?![A-Za-z0-9_]))
  | (?P<num>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?![A-Za-z_]))
  | (?P<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>==|!=|<=|>=|[<>()\[\],.+\-*/%=])
    """,
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "not", "in", "true", "false", "null", "none"}
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", '"': '"', "'": "'"}
COMPARE_OPS = ("==", "!=", "<", "<=", ">", ">=", "in", "not in")


class ExprError(ValueError):
    """A syntax error at `offset` (0-based) in the expression text."""

    def __init__(self, message: str, offset: int):
        super().__init__(message)
        self.message = message
        self.offset = offset


@dataclass(eq=False)
class Node:
    """One node of a parsed expression; `text` is its exact source."""

    kind: str  # const, name, attr, index, call, not, neg, arith, compare, and, or, list
    value: Any = None
    args: list[Node] = field(default_factory=list)
    kwargs: dict[str, Node] = field(default_factory=dict)
    start: int = 0
    end: int = 0
    text: str = ""
    kw_at: dict[str, int] = field(default_factory=dict)  # offsets of named arguments
    fn: Any = None  # the compiled closure, set by engine.rules.compile
    in_attr: bool = False  # the target of a `.field` access
    folded: bool = False  # the compiler found it constant: `fn` returns `constant`
    constant: Any = None

    def __repr__(self) -> str:
        return f"Node({self.kind}, {self.text!r})"

    def walk(self):
        """This node and every node below it, parents first."""
        yield self
        for child in self.args:
            yield from child.walk()
        for child in self.kwargs.values():
            yield from child.walk()


@dataclass(slots=True)
class _Token:
    kind: str
    text: str
    start: int
    end: int


def tokenize(text: str) -> list[_Token]:
    """Tokens of `text`; raises ExprError at the first character that fits none."""
    tokens = []
    at = 0
    while at < len(text):
        match = _TOKEN.match(text, at)
        if match is None:
            char = text[at]
            hint = " (strings need matching quotes)" if char in "\"'" else ""
            raise ExprError(f"unexpected character {char!r}{hint}", at)
        kind = match.lastgroup or ""
        if kind != "ws":
            word = match.group()
            if kind == "name" and word.lower() in _KEYWORDS:
                kind = "kw"
                word = word.lower()
            tokens.append(_Token(kind, word, at, match.end()))
        at = match.end()
    end = len(text.rstrip())  # "found end of expression" points just after the last character
    tokens.append(_Token("end", "", end, end))
    return tokens


def _unquote(raw: str, start: int) -> str:
    out = []
    i = 1
    while i < len(raw) - 1:
        ch = raw[i]
        if ch == "\\":
            nxt = raw[i + 1]
            if nxt not in _ESCAPES:
                raise ExprError(f"unknown escape \\{nxt} in string", start + i)
            out.append(_ESCAPES[nxt])
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = tokenize(text)
        self.at = 0
        self.depth = 0

    def peek(self) -> _Token:
        return self.tokens[self.at]

    def take(self) -> _Token:
        token = self.tokens[self.at]
        self.at += 1
        return token

    def accept(self, kind: str, text: str) -> _Token | None:
        token = self.tokens[self.at]
        if token.kind == kind and token.text == text:
            self.at += 1
            return token
        return None

    def expect(self, kind: str, text: str, what: str) -> _Token:
        token = self.accept(kind, text)
        if token is None:
            raise self.error(f"expected {what}")
        return token

    def error(self, message: str) -> ExprError:
        token = self.peek()
        seen = "end of expression" if token.kind == "end" else repr(token.text)
        return ExprError(f"{message}, found {seen}", token.start)

    def node(self, kind: str, start: int, **fields: Any) -> Node:
        end = self.tokens[self.at - 1].end
        return Node(kind, start=start, end=end, text=self.text[start:end], **fields)

    # -- grammar ---------------------------------------------------------------
    def parse(self) -> Node:
        if not self.text.strip():
            raise ExprError("empty expression", 0)
        node = self.expr()
        if self.peek().kind != "end":
            raise self.error("expected an operator or the end")
        return node

    def expr(self) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExprError("expression nests too deeply", self.peek().start)
        start = self.peek().start
        parts = [self.and_()]
        while self.accept("kw", "or"):
            parts.append(self.and_())
        self.depth -= 1
        return parts[0] if len(parts) == 1 else self.node("or", start, args=parts)

    def and_(self) -> Node:
        start = self.peek().start
        parts = [self.not_()]
        while self.accept("kw", "and"):
            parts.append(self.not_())
        return parts[0] if len(parts) == 1 else self.node("and", start, args=parts)

    def not_(self) -> Node:
        start = self.peek().start
        if self.accept("kw", "not"):
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise ExprError("expression nests too deeply", start)
            inner = self.not_()
            self.depth -= 1
            return self.node("not", start, args=[inner])
        return self.compare()

    def compare(self) -> Node:
        start = self.peek().start
        left = self.sum_()
        op = self._compare_op()
        if op is None:
            return left
        right = self.sum_()
        if self._compare_op(peek=True):
            raise self.error("comparisons cannot be chained; join them with 'and'")
        return self.node("compare", start, value=op, args=[left, right])

    def _compare_op(self, *, peek: bool = False) -> str | None:
        token = self.peek()
        if token.kind == "op" and token.text in ("==", "!=", "<", "<=", ">", ">="):
            op = token.text
            width = 1
        elif token.kind == "kw" and token.text == "in":
            op, width = "in", 1
        elif token.kind == "kw" and token.text == "not" and self.tokens[self.at + 1].text == "in":
            op, width = "not in", 2
        elif token.kind == "op" and token.text == "=":
            raise self.error("use '==' to compare")
        else:
            return None
        if not peek:
            self.at += width
        return op

    def sum_(self) -> Node:
        start = self.peek().start
        node = self.product()
        while (token := self.peek()).kind == "op" and token.text in "+-":
            self.take()
            node = self.node("arith", start, value=token.text, args=[node, self.product()])
        return node

    def product(self) -> Node:
        start = self.peek().start
        node = self.unary()
        while (token := self.peek()).kind == "op" and token.text in ("*", "/", "%"):
            self.take()
            node = self.node("arith", start, value=token.text, args=[node, self.unary()])
        return node

    def unary(self) -> Node:
        start = self.peek().start
        if self.accept("op", "-"):
            return self.node("neg", start, args=[self.unary()])
        return self.postfix()

    def postfix(self) -> Node:
        start = self.peek().start
        node = self.atom()
        while True:
            if self.accept("op", "."):
                token = self.take()
                if token.kind not in ("name", "kw"):
                    self.at -= 1
                    raise self.error("expected a field name after '.'")
                node = self.node("attr", start, value=token.text, args=[node])
            elif self.accept("op", "["):
                index = self.expr()
                self.expect("op", "]", "']'")
                node = self.node("index", start, args=[node, index])
            else:
                return node

    def atom(self) -> Node:
        token = self.take()
        start = token.start
        if token.kind == "num":
            number = float(token.text)
            value: Any = (
                int(number)
                if number.is_integer() and "." not in token.text and "e" not in token.text.lower()
                else number
            )
            return self.node("const", start, value=value)
        if token.kind == "dur":
            return self.node("const", start, value=parse_duration(token.text))
        if token.kind == "str":
            return self.node("const", start, value=_unquote(token.text, start))
        if token.kind == "kw" and token.text in ("true", "false", "null", "none"):
            value = {"true": True, "false": False}.get(token.text)
            return self.node("const", start, value=value)
        if token.kind == "name":
            if self.accept("op", "("):
                return self.call(token, start)
            return self.node("name", start, value=token.text)
        if token.kind == "op" and token.text == "(":
            inner = self.expr()
            self.expect("op", ")", "')'")
            inner.start, inner.end = start, self.tokens[self.at - 1].end
            inner.text = self.text[start : inner.end]
            return inner
        if token.kind == "op" and token.text == "[":
            items = []
            if not self.accept("op", "]"):
                items.append(self.expr())
                while self.accept("op", ","):
                    if self.peek().text == "]":
                        break
                    items.append(self.expr())
                self.expect("op", "]", "',' or ']'")
            return self.node("list", start, args=items)
        self.at -= 1
        raise self.error("expected a value, a name or '('")

    def call(self, name: _Token, start: int) -> Node:
        args: list[Node] = []
        kwargs: dict[str, Node] = {}
        kw_at: dict[str, int] = {}
        if not self.accept("op", ")"):
            while True:
                token = self.peek()
                if token.kind == "name" and self.tokens[self.at + 1].text == "=":
                    self.at += 2
                    if token.text in kwargs:
                        raise ExprError(f"argument {token.text!r} given twice", token.start)
                    kw_at[token.text] = token.start
                    kwargs[token.text] = self.expr()
                else:
                    if kwargs:
                        raise self.error("positional arguments must come before named ones")
                    args.append(self.expr())
                if self.accept("op", ")"):
                    break
                self.expect("op", ",", "',' or ')'")
        return self.node("call", start, value=name.text, args=args, kwargs=kwargs, kw_at=kw_at)


def parse(text: str) -> Node:
    """Parse one expression; raises ExprError (with an offset) on bad syntax."""
    if len(text) > MAX_LENGTH:
        raise ExprError(f"expression is longer than {MAX_LENGTH} characters", MAX_LENGTH)
    return _Parser(text).parse()
