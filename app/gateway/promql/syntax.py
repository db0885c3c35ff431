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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

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


def operands(node: pp.Expr) -> list[pp.Expr] | None:
    """The direct sub-expressions of an operator (call arguments, an aggregation's expression
    and parameter, both sides, what parentheses or a sign hold); [] for a literal; None for
    anything else (selectors, subqueries: each walker reads those itself)."""
    if isinstance(node, pp.Call):
        return list(node.args)
    if isinstance(node, pp.AggregateExpr):
        return [node.expr] + ([node.param] if node.param is not None else [])
    if isinstance(node, pp.BinaryExpr):
        return [node.lhs, node.rhs]
    if isinstance(node, pp.ParenExpr | pp.UnaryExpr):
        return [node.expr]
    if isinstance(node, pp.NumberLiteral | pp.StringLiteral):
        return []
    return None


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


_LEGACY_NAME = re.compile(r"\A[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LEGACY_LABEL = re.compile(r"\A[a-zA-Z_][a-zA-Z0-9_]*\Z")


def label_name(name: str) -> str:
    """A label name as PromQL reads it: bare when legacy, else quoted (UTF-8 names)."""
    return name if _LEGACY_LABEL.match(name) else quote(name)


def _matcher(name: str, op: str, value: str) -> str:
    return f"{label_name(name)}{op}{quote(value)}"


_MATCH_OPS = {"Equal": "=", "NotEqual": "!=", "Re": "=~", "NotRe": "!~"}


def _op(m: pp.Matcher) -> str:
    return _MATCH_OPS[str(m.op).rsplit(".", 1)[-1]]


def matcher_op(m: pp.Matcher) -> str:
    """The matcher's operator as written in PromQL: =, !=, =~ or !~."""
    return _op(m)


def _number(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Inf" if v > 0 else "-Inf"
    return repr(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


def duration(d: timedelta) -> str:
    """A duration as PromQL writes it (negative offsets included, which the library refuses)."""
    if d < timedelta(0):
        return "-" + pp.display_duration(-d)
    return pp.display_duration(d)


def _labels(names: Sequence[str]) -> str:
    return f"({', '.join(label_name(n) for n in names)})"


@dataclass(frozen=True, slots=True)
class Shift:
    """An offset and/or @ to move the evaluation time of a whole expression.

    Applied to the expression's outermost time-bearing nodes (selectors and
    subqueries not inside a subquery); nodes pinned with their own @ keep it.
    """

    offset: timedelta | None = None
    at: str | None = None  # as printed: "@ 1700000000.000", "@ start()", "@ end()"

    def __bool__(self) -> bool:
        return bool(self.offset) or self.at is not None


# Functions whose value depends on the evaluation time itself (not on samples):
# an expression using them cannot be time-shifted by shifting its selectors.
_CLOCK_FUNCTIONS = frozenset({"time", "day_of_month", "day_of_week", "day_of_year", "days_in_month",
                              "hour", "minute", "month", "year"})


def reads_the_clock(node: pp.Expr) -> bool:
    """Does the expression call time() or a date function on the evaluation time?"""
    found = False

    def visit(n: pp.Expr) -> None:
        nonlocal found
        if isinstance(n, pp.Call) and n.func.name in _CLOCK_FUNCTIONS and (
                n.func.name == "time" or not n.args):
            found = True

    pp.walk(node, pre_visit=visit)
    return found


# What a selector is replaced by: printed PromQL that stands as one operand (parenthesised
# by the substitute), or None to print the selector as it is.
Substitute = Callable[[pp.VectorSelector, "timedelta | None", Shift], "str | None"]


class _Printer:
    """Prints any parsed tree back to PromQL, optionally editing it on the way.

    Edits: label matchers added to every selector (`added`; matchers on `dropped`
    labels removed first), a time `shift` of the whole expression, and `substitute`,
    which may replace a selector (given the selector, its range when it is the
    inside of a matrix selector, and the shift in force there) by another printed
    expression. The library's own printer does not escape label values; this one
    quotes every string itself, so a value can never change the shape of the query.
    """

    def __init__(self, added: Sequence[tuple[str, str, str]] = (), dropped: frozenset[str] = frozenset(),
                 shift: Shift | None = None, substitute: Substitute | None = None) -> None:
        self.added = added
        self.dropped = dropped
        self.shift = shift or Shift()
        self.substitute = substitute
        self._in_subquery = 0

    def _group(self, matchers: Sequence[pp.Matcher]) -> list[str]:
        parts = [_matcher(m.name, _op(m), m.value) for m in matchers if m.name not in self.dropped]
        return parts + [_matcher(name, op, value) for name, op, value in self.added]

    def selector(self, n: pp.VectorSelector) -> str:
        if n.matchers.or_matchers:
            if n.matchers.matchers:
                raise PromQLError("a selector with both plain and 'or' matchers")
            inner = " or ".join(",".join(self._group(g)) for g in n.matchers.or_matchers)
            return f"{n.name or ''}{{{inner}}}"
        parts = self._group(n.matchers.matchers)
        if n.name and not parts:
            return n.name
        return f"{n.name or ''}{{{','.join(parts)}}}"

    def _time(self, offset: timedelta | None, at: object) -> str:
        """The @/offset suffix of a top-level time-bearing node, shifted when asked."""
        if self._in_subquery == 0 and self.shift and at is None:
            at = self.shift.at
            if self.shift.offset:
                offset = (offset or timedelta(0)) + self.shift.offset
        out = ""
        if at is not None:
            out += f" {at}"
        if offset:
            out += f" offset {duration(offset)}"
        return out

    def _substituted(self, vs: pp.VectorSelector, rng: timedelta | None) -> str | None:
        if self.substitute is None:
            return None
        shift = self.shift if self._in_subquery == 0 else Shift()
        return self.substitute(vs, rng, shift)

    def print(self, n: pp.Expr) -> str:
        if isinstance(n, pp.VectorSelector):
            if (sub := self._substituted(n, None)) is not None:
                return sub
            return self.selector(n) + self._time(n.offset, n.at)
        if isinstance(n, pp.MatrixSelector):
            vs = n.vector_selector
            if (sub := self._substituted(vs, n.range)) is not None:
                return sub
            return f"{self.selector(vs)}[{duration(n.range)}]{self._time(vs.offset, vs.at)}"
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
            mod = ""
            if n.modifier is not None:
                kind = "by" if str(n.modifier.type).endswith("By") else "without"
                mod = f" {kind} {_labels(n.modifier.labels)} "
            args = ([self.print(n.param)] if n.param is not None else []) + [self.print(n.expr)]
            return f"{n.op}{mod}({', '.join(args)})"
        if isinstance(n, pp.BinaryExpr):
            return f"{self.print(n.lhs)} {n.op}{self._bin_modifier(n.modifier)} {self.print(n.rhs)}"
        if isinstance(n, pp.SubqueryExpr):
            step = duration(n.step) if n.step else ""
            time_suffix = self._time(n.offset, n.at)
            self._in_subquery += 1
            try:
                inner = self.print(n.expr)
            finally:
                self._in_subquery -= 1
            return f"{inner}[{duration(n.range)}:{step}]{time_suffix}"  # type: ignore[arg-type]
        raise PromQLError(f"cannot print a {type(n).__name__}")

    @staticmethod
    def _bin_modifier(m: pp.BinModifier | None) -> str:
        if m is None:
            return ""
        out = " bool" if m.return_bool else ""
        if m.matching is not None:
            kind = "on" if str(m.matching.type).endswith("Include") else "ignoring"
            out += f" {kind} {_labels(m.matching.labels)}"
        card = str(m.card).rsplit(".", 1)[-1]
        if card in ("ManyToOne", "OneToMany"):
            side = "group_left" if card == "ManyToOne" else "group_right"
            out += f" {side} {_labels(m.group_labels or [])}"
        fill = m.fill_values
        if fill.lhs is not None and fill.rhs is not None and _number(fill.lhs) == _number(fill.rhs):
            out += f" fill ({_number(fill.lhs)})"
        else:
            if fill.lhs is not None:
                out += f" fill_left ({_number(fill.lhs)})"
            if fill.rhs is not None:
                out += f" fill_right ({_number(fill.rhs)})"
        return out


def print_expr(node: pp.Expr, *, shift: Shift | None = None, substitute: Substitute | None = None,
               added: Sequence[tuple[str, str, str]] = ()) -> str:
    """Print any tree back to PromQL, with optional edits (see _Printer)."""
    return _Printer(added, frozenset(), shift, substitute).print(node)


def same_tree(a: str, b: str) -> bool:
    """Do two queries parse to the same syntax tree? (The library's debug form is complete.)"""
    return repr(parse(a)) == repr(parse(b))


def check_printable(expr: str) -> None:
    """Refuse at start-up a query this module cannot print back to the same tree."""
    try:
        printed = print_expr(parse(expr))
        same = same_tree(printed, expr)
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
    return _Printer(added, frozenset(filters)).print(parse(expr))


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
        super().__init__([(name, "=", value) for name, value in matchers])
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
    printer = _Printer([(name, "=", value) for name, value in matchers])
    out: list[str] = []
    for m in match:
        node = parse(m)
        if not isinstance(node, pp.VectorSelector) or node.offset is not None or node.at is not None:
            raise PromQLError(f"match[] {m!r} is not a series selector")
        out.append(printer.selector(node))
    return out
