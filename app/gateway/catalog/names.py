"""Catalog figures as metric names: `gateway_provider_availability{provider="openai"}` in PromQL.

Every catalog figure is also a name a query through the gateway's Prometheus API
may use, so a Grafana user picks vetted figures from autocomplete instead of
writing their PromQL. The name is the family name `/docs` lists: `<prefix>_<name>`,
with `_total` for counters (the name a scrape of the gateway's exposition stores,
so a panel written against a scrape works unchanged here). The bare name of a
counter does not expand: one name per figure, the one a scrape would have.

Expansion works on the syntax tree (app/gateway/promql/syntax.py): a selector naming a
figure is printed as the figure's expression, with the selector's matchers set on
every selector of that expression. Rules, each exact or refused, never guessed:

* matchers may use only the figure's declared labels (its `by` labels); a label
  the figure computes itself (label_replace / label_join) cannot be pushed into
  its selectors and is refused; any other label is refused (400 bad_data);
* `offset` / `@` move the whole figure in time (set on its outermost selectors
  and subqueries); a figure reading the clock (time(), hour(), ...) refuses them;
* a range selector `gateway_x[5m]` is the figure as a subquery `(expr)[5m:]`:
  the figure sampled at the default evaluation interval, as a recording rule of
  it would be, so `rate(gateway_http_requests_total[5m])` works;
* the figure's own expression is not expanded again (one level, no recursion).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import promql_parser as pp

from app.gateway.catalog.model import Catalog, CatalogQuery
from app.gateway.promql.syntax import (
    PromQLError,
    Shift,
    duration,
    matcher_op,
    parse,
    print_expr,
    reads_the_clock,
)

_WRITES_LABEL = frozenset({"label_replace", "label_join"})


class FigureNameError(PromQLError):
    """A figure name used in a way that cannot be expanded exactly (a 400 bad_data)."""


@dataclass(frozen=True, slots=True)
class Figure:
    """One catalog figure seen as a metric: its name, tree and what may filter it."""

    name: str
    query: CatalogQuery
    tree: pp.Expr
    pushable: frozenset[str]  # declared labels present on the figure's input series
    computed: frozenset[str]  # declared labels the figure computes itself
    clock: bool  # reads the evaluation time itself: no offset / @

    @property
    def metric_type(self) -> str:
        return "counter" if self.query.kind == "counter" else "gauge"


def _computed_labels(tree: pp.Expr) -> set[str]:
    """Labels written by label_replace / label_join anywhere in the expression."""
    out: set[str] = set()

    def visit(n: pp.Expr) -> None:
        if isinstance(n, pp.Call) and n.func.name in _WRITES_LABEL and len(n.args) > 1:
            dst = n.args[1]
            if isinstance(dst, pp.StringLiteral):
                out.add(dst.val)

    pp.walk(tree, pre_visit=visit)
    return out


def figure_name(catalog: Catalog, q: CatalogQuery) -> str:
    """The metric name of a figure: the family name /docs lists (`_total` for counters)."""
    return q.family(catalog.prefix) + ("_total" if q.kind == "counter" else "")


def _matches_empty(m: pp.Matcher) -> bool:
    """Does the matcher accept an absent label (the empty string)? (Go RE2 is anchored.)"""
    op = matcher_op(m)
    if op in ("=", "!="):
        return (m.value == "") == (op == "=")
    try:
        hit = re.fullmatch(m.value, "") is not None
    except re.error:
        return True  # unknown to Python's engine: keep the name (upstream judges the regex)
    return hit == (op == "=~")


def _accepts(m: pp.Matcher, value: str) -> bool:
    op = matcher_op(m)
    if op == "=":
        return m.value == value
    if op == "!=":
        return m.value != value
    try:
        hit = re.fullmatch(m.value, value) is not None
    except re.error:
        return True
    return hit == (op == "=~")


class FigureNames:
    """The catalog's figures by metric name; built once per catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.figures: dict[str, Figure] = {}
        for q in catalog.queries.values():
            tree = parse(q.expr)
            computed = _computed_labels(tree) & set(q.labels)
            self.figures[figure_name(catalog, q)] = Figure(
                name=figure_name(catalog, q), query=q, tree=tree,
                pushable=frozenset(q.labels) - computed, computed=frozenset(computed),
                clock=reads_the_clock(tree),
            )

    # -- listing ------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self.figures)

    def names_matching(self, selectors: Sequence[str]) -> list[str]:
        """Figure names a `match[]` set may select (for label/__name__/values).

        A figure's series have its declared labels (values unknown without a
        query: kept) and no other label: a matcher on any other label keeps the
        figure only when it accepts the empty string, as it would for a metric.
        """
        if not selectors:
            return self.names()
        keep: set[str] = set()
        for text in selectors:
            node = parse(text)
            if not isinstance(node, pp.VectorSelector):
                raise PromQLError(f"match[] {text!r} is not a series selector")
            groups = node.matchers.or_matchers or [node.matchers.matchers]
            for name, fig in self.figures.items():
                if node.name is not None and node.name != name:
                    continue
                for group in groups:
                    if all(_accepts(m, name) if m.name == "__name__"
                           else (m.name in fig.query.labels or _matches_empty(m)) for m in group):
                        keep.add(name)
                        break
        return sorted(keep)

    def metadata(self, metric: str | None = None) -> dict[str, list[dict[str, str]]]:
        """Prometheus' /api/v1/metadata shape: name -> [{type, help, unit}]."""
        return {name: [{"type": fig.metric_type, "help": fig.query.help, "unit": fig.query.unit}]
                for name, fig in sorted(self.figures.items()) if metric is None or metric == name}

    def __contains__(self, name: object) -> bool:
        return name in self.figures

    # -- expansion ----------------------------------------------------------------------

    def _name_of(self, vs: pp.VectorSelector) -> str | None:
        if vs.name:
            return str(vs.name)
        for m in vs.matchers.matchers:
            if m.name == "__name__" and matcher_op(m) == "=":
                return str(m.value)
        return None

    def _matchers(self, fig: Figure, vs: pp.VectorSelector) -> list[tuple[str, str, str]]:
        if vs.matchers.or_matchers:
            raise FigureNameError(f"'or' between matchers is not supported on the figure {fig.name}")
        added: list[tuple[str, str, str]] = []
        for m in vs.matchers.matchers:
            op = matcher_op(m)
            if m.name == "__name__":
                if op == "=" and m.value == fig.name:
                    continue
                raise FigureNameError(f"a second __name__ matcher on the figure {fig.name}")
            if m.name in fig.computed:
                raise FigureNameError(
                    f"label {m.name!r} of the figure {fig.name} is computed inside the figure "
                    "(label_replace/label_join), so it cannot be matched on the figure's input")
            if m.name not in fig.pushable:
                labels = ", ".join(sorted(fig.query.labels)) or "none"
                raise FigureNameError(f"the figure {fig.name} has no label {m.name!r} (its labels: {labels})")
            added.append((m.name, op, m.value))
        return added

    def _substitute(self, vs: pp.VectorSelector, rng: timedelta | None, outer: Shift) -> str | None:
        name = self._name_of(vs)
        fig = self.figures.get(name) if name is not None else None
        if fig is None:
            return None
        added = self._matchers(fig, vs)
        # The selector's own offset/@, combined with any shift already in force above it.
        offset: timedelta | None = vs.offset
        at: str | None = str(vs.at) if vs.at is not None else None
        if at is None:
            at = outer.at
            if outer.offset:
                offset = (offset or timedelta(0)) + outer.offset
        shift = Shift(offset=offset or None, at=at)
        if rng is not None:
            # A range over a figure: the figure as a subquery, moved in time as a whole.
            inner = print_expr(fig.tree, added=added)
            suffix = (f" {at}" if at is not None else "") + (f" offset {duration(offset)}" if offset else "")
            return f"({inner})[{duration(rng)}:]{suffix}"
        if shift and fig.clock:
            raise FigureNameError(f"the figure {fig.name} reads the evaluation time (time() or a date function); "
                             "offset and @ cannot move it")
        return f"({print_expr(fig.tree, added=added, shift=shift)})"

    def uses(self, tree: pp.Expr) -> bool:
        """Does the query name any figure?"""
        found = False

        def visit(n: pp.Expr) -> None:
            nonlocal found
            if isinstance(n, pp.VectorSelector) and self._name_of(n) in self.figures:
                found = True

        pp.walk(tree, pre_visit=visit)
        return found

    def expand(self, tree: pp.Expr) -> str | None:
        """The query with every figure name replaced by its expression, or None when it names none.

        Raises FigureNameError (a PromQLError) for a use that cannot be expanded exactly.
        """
        if not self.uses(tree):
            return None
        return print_expr(tree, substitute=self._substitute)


def merge_metadata(upstream: dict[str, Any], ours: dict[str, list[dict[str, str]]],
                   limit: int | None) -> dict[str, Any]:
    """Upstream's metadata with the figures' (a figure's own entry wins its name), sorted.

    With a limit, the figures come first: they are the vetted names.
    """
    merged: dict[str, Any] = dict(ours)
    for name, entries in upstream.items():
        merged.setdefault(name, entries)
    names: Iterable[str] = sorted(merged)
    if limit is not None and limit >= 0 and len(merged) > limit:
        names = (sorted(ours) + sorted(n for n in merged if n not in ours))[:limit]
        names = sorted(names)
    return {n: merged[n] for n in names}
