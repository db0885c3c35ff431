"""PromQL as a syntax tree (promql-parser): value types, label filters, safe printing.

User input never reaches a query string: a filter value becomes a Matcher object
set on every selector of the parsed tree. The library's own printer does not
escape label values, so the tree is printed here, and the catalog is checked at
start-up to print back to the same tree.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence

import promql_parser as pp

# A "plain" label value: what provider and model names look like in practice.
PLAIN_LABEL_VALUE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.:/@+-]*\Z")  # \Z: no trailing newline


class PromQLError(ValueError):
    """A query that does not parse or cannot be edited safely."""


def parse(expr: str) -> pp.Expr:
    try:
        return pp.parse(expr)
    except (ValueError, RuntimeError) as exc:
        raise PromQLError(str(exc)) from exc


def value_type(node: pp.Expr) -> str:
    """'vector', 'scalar', 'matrix' or 'string': whether a query may join a batch."""
    if isinstance(node, pp.NumberLiteral):
        return "scalar"
    if isinstance(node, pp.StringLiteral):
        return "string"
    if isinstance(node, pp.VectorSelector | pp.AggregateExpr):
        return "vector"
    if isinstance(node, pp.MatrixSelector | pp.SubqueryExpr):
        return "matrix"
    if isinstance(node, pp.Call):
        return str(node.func.return_type).rsplit(".", 1)[-1].lower()
    if isinstance(node, pp.ParenExpr | pp.UnaryExpr):
        return value_type(node.expr)
    if isinstance(node, pp.BinaryExpr):
        sides = {value_type(node.lhs), value_type(node.rhs)}
        return "vector" if "vector" in sides else "scalar"
    return "unknown"


def selectors(node: pp.Expr) -> list[pp.VectorSelector]:
    found: list[pp.VectorSelector] = []

    def visit(n: pp.Expr) -> None:
        if isinstance(n, pp.VectorSelector):
            found.append(n)

    pp.walk(node, pre_visit=visit)
    return found


def metric_names(expr: str) -> set[str]:
    """Metric names a query reads (for docs and for dashboard checks)."""
    names: set[str] = set()
    for sel in selectors(parse(expr)):
        if sel.name:
            names.add(sel.name)
    return names


def quote(value: str) -> str:
    """A PromQL double-quoted string: JSON's escaping is a subset of Go's that PromQL reads."""
    return json.dumps(value, ensure_ascii=False)


def _matcher(name: str, op: str, value: str) -> str:
    return f"{name}{op}{quote(value)}"


_MATCH_OPS = {"Equal": "=", "NotEqual": "!=", "Re": "=~", "NotRe": "!~"}


def _op(m: pp.Matcher) -> str:
    return _MATCH_OPS[str(m.op).rsplit(".", 1)[-1]]


def _number(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Inf" if v > 0 else "-Inf"
    return repr(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


def _suffix(offset: object, at: object) -> str:
    out = ""
    if at is not None:
        out += f" {at}"
    if offset is not None:
        out += f" offset {pp.display_duration(offset)}"  # type: ignore[arg-type]
    return out


class _Printer:
    """Prints a parsed tree back to PromQL, adding label matchers to every selector.

    The library's own printer does not escape label values; this one quotes every
    string itself, so a value can never change the shape of the query.
    """

    def __init__(self, added: Sequence[tuple[str, str, str]], dropped: set[str]) -> None:
        self.added = added
        self.dropped = dropped

    def selector(self, n: pp.VectorSelector) -> str:
        parts = [_matcher(m.name, _op(m), m.value) for m in n.matchers.matchers
                 if m.name not in self.dropped]
        parts += [_matcher(name, op, value) for name, op, value in self.added]
        if n.matchers.or_matchers:
            raise PromQLError("'or' inside a selector is not supported")
        if n.name and not parts:
            return n.name
        return f"{n.name or ''}{{{','.join(parts)}}}"

    def print(self, n: pp.Expr) -> str:
        if isinstance(n, pp.VectorSelector):
            return self.selector(n) + _suffix(n.offset, n.at)
        if isinstance(n, pp.MatrixSelector):
            vs = n.vector_selector
            rng = pp.display_duration(n.range)
            return f"{self.selector(vs)}[{rng}]{_suffix(vs.offset, vs.at)}"
        if isinstance(n, pp.NumberLiteral):
            return _number(n.val)
        if isinstance(n, pp.StringLiteral):
            return quote(n.val)
        if isinstance(n, pp.ParenExpr):
            return f"({self.print(n.expr)})"
        if isinstance(n, pp.UnaryExpr):
            return f"-{self.print(n.expr)}"
        if isinstance(n, pp.Call):
            return f"{n.func.name}({', '.join(self.print(a) for a in n.args)})"
        if isinstance(n, pp.AggregateExpr):
            mod = f" {n.modifier} " if n.modifier is not None else ""
            args = ([self.print(n.param)] if n.param is not None else []) + [self.print(n.expr)]
            return f"{n.op}{mod}({', '.join(args)})"
        if isinstance(n, pp.BinaryExpr):
            mod = str(n.modifier) if n.modifier is not None else ""
            mod = f" {mod}" if mod else ""
            return f"{self.print(n.lhs)} {n.op}{mod} {self.print(n.rhs)}"
        if isinstance(n, pp.SubqueryExpr):
            step = pp.display_duration(n.step) if n.step else ""
            rng = pp.display_duration(n.range)  # type: ignore[arg-type]
            return f"{self.print(n.expr)}[{rng}:{step}]{_suffix(n.offset, n.at)}"
        raise PromQLError(f"cannot print a {type(n).__name__}")


def print_expr(node: pp.Expr) -> str:
    return _Printer((), set()).print(node)


def check_printable(expr: str) -> None:
    """Refuse at start-up a query this module cannot print back to the same tree."""
    try:
        printed = print_expr(parse(expr))
        same = str(parse(printed)) == str(parse(expr))
    except (ValueError, RuntimeError, OverflowError) as exc:
        raise PromQLError(f"cannot print the query back: {exc}") from exc
    if not same:
        raise PromQLError(f"query does not print back to itself: {printed}")


def apply_filters(expr: str, filters: Mapping[str, Sequence[str]]) -> str:
    """Set `label="value"` (or a regex of alternatives) on every selector of expr.

    An existing matcher on the same label is replaced, as prom-label-proxy does,
    so a filter can only narrow what the catalog query already reads. Values are
    set as matchers on the syntax tree and quoted by the printer.
    """
    if not filters:
        return expr
    added: list[tuple[str, str, str]] = []
    for label, values in sorted(filters.items()):
        for v in values:
            if not PLAIN_LABEL_VALUE.match(v):
                raise PromQLError(f"{label} value {v!r} is not a plain label value")
        if len(values) == 1:
            added.append((label, "=", values[0]))
        else:
            added.append((label, "=~", "|".join(re.escape(v) for v in values)))
    return _Printer(added, set(filters)).print(parse(expr))
