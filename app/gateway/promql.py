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


# -- tenants ------------------------------------------------------------------------------
#
# A tenant's matchers are *added* to every selector, next to the caller's own: a
# selector then reads the intersection of what the caller asked for and what the
# tenant may see. Nothing the caller writes is replaced or dropped, so no conflict
# needs an answer: `{env="b"}` from tenant a reads `{env="b",env="a"}`, which is
# empty, exactly as it is on a Prometheus that holds only tenant a's data; `{env=~".*"}`
# and `{env!="a"}` narrow the same way. (prom-label-proxy replaces a conflicting
# matcher or refuses it; either answer differs from "tenant a's data alone".)

TenantMatchers = Sequence[tuple[str, str]]
# Functions that read series the syntax tree does not name (info() reads target_info
# by the identifying labels of its argument): refused for a confined tenant.
UNENFORCEABLE_FUNCTIONS = frozenset({"info"})
_ABSENT = frozenset({"absent", "absent_over_time"})


def _absent_label(sel: pp.VectorSelector, name: str) -> str:
    """The value absent() gives label `name` for the caller's own selector (Prometheus keeps
    a label only when exactly one matcher names it and that one is an equality)."""
    named = [m for m in sel.matchers.matchers if m.name == name]
    if len(named) == 1 and _op(named[0]) == "=":
        return str(named[0].value)
    return ""


class _TenantPrinter(_Printer):
    """The printer with the tenant's equality matchers added to every selector.

    absent() builds its output labels from its selector's equality matchers, so the
    added ones would show; each tenant label of absent()'s output is set back to what
    the caller's selector alone would give (label_replace with an empty regex always
    matches; an empty replacement removes the label).
    """

    def __init__(self, matchers: TenantMatchers) -> None:
        super().__init__([(name, "=", value) for name, value in matchers], set())
        self.tenant = tuple(matchers)

    def print(self, n: pp.Expr) -> str:
        if isinstance(n, pp.Call) and n.func.name in UNENFORCEABLE_FUNCTIONS:
            raise PromQLError(f"{n.func.name}() is not available to a token confined to labels")
        text = super().print(n)
        if isinstance(n, pp.Call) and n.func.name in _ABSENT and n.args:
            arg = n.args[0]
            sel = arg.vector_selector if isinstance(arg, pp.MatrixSelector) else arg
            if isinstance(sel, pp.VectorSelector):
                for name, _value in self.tenant:
                    text = f"label_replace({text}, {quote(name)}, {quote(_absent_label(sel, name))}, \"\", \"\")"
        return text


def enforce(expr: str, matchers: TenantMatchers) -> str:
    """`expr` with the tenant's `label="value"` matchers on every selector of its syntax tree.

    Every selector is reached (inside functions, aggregations, binary operations,
    subqueries, with `@` and `offset` kept); the caller's own matchers stay, so the
    tenant's can only narrow. Expressions without a selector (`vector(1)`, `time()`)
    read no series and pass unchanged in meaning. Raises PromQLError for a query that
    does not parse or cannot be enforced (400 for the caller).
    """
    if not matchers:
        return expr
    return _TenantPrinter(matchers).print(parse(expr))


def tenant_selector(matchers: TenantMatchers) -> str:
    """`{label="value",...}`: every series the tenant may see."""
    return "{" + ",".join(_matcher(name, "=", value) for name, value in matchers) + "}"


def enforce_match(match: Sequence[str], matchers: TenantMatchers) -> list[str]:
    """`match[]` series selectors with the tenant's matchers added to each.

    No `match[]` at all means "every series" to Prometheus' label, series and
    exemplar APIs: for a confined tenant that is the tenant's selector. Each given
    selector must be a plain series selector (no offset, no `@`), as Prometheus
    requires; anything else (or an empty one) raises PromQLError.
    """
    if not matchers:
        return list(match)
    if not match:
        return [tenant_selector(matchers)]
    printer = _Printer([(name, "=", value) for name, value in matchers], set())
    out: list[str] = []
    for m in match:
        node = parse(m)
        if not isinstance(node, pp.VectorSelector) or node.offset is not None or node.at is not None:
            raise PromQLError(f"match[] {m!r} is not a series selector")
        out.append(printer.selector(node))
    return out
