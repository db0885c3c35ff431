"""A query API request decoded once, at the HTTP edge, into one typed value.

Why: the edge reads the parameters as Prometheus does (routes/params.py), parses the
query once, expands and confines it once, and from then on every stage (the range
cache, instants, pass-through, keys, upstream requests) reads this value instead of
re-reading strings, so no two stages can read a time, a step or the query differently
(the model is Cortex/Thanos queryrange's typed Request). What goes upstream is the
caller's own text wherever the gateway did not change it: the query unless figure
names were expanded or a tenant's matchers enforced, times and step always.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import promql_parser as pp

from app.gateway.promql.syntax import PromQLError, parse
from app.gateway.promql.timing import Duration, Time, parse_duration, parse_time

Pairs = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Query:
    """The query: the text sent upstream and the syntax tree it reads as (parsed once)."""

    text: str  # the caller's own text unless it was changed (figures expanded, tenant enforced)
    tree: pp.Expr | None  # None: the gateway cannot read it (the upstream judges it, in its words)


@dataclass(frozen=True, slots=True)
class Origin:
    """Who asks and until when: the tenant's key scope, its upstream headers, the deadline."""

    scope: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    deadline: float = 0.0  # event-loop time (loop.time()) by which to answer


@dataclass(frozen=True, slots=True)
class RangeQuery:
    """/api/v1/query_range, decoded: validated as Prometheus validates it."""

    query: Query
    start: Time
    end: Time
    step: Duration
    params: Pairs  # the other parameters, in order (timeout capped below our deadline, stats, ...)
    origin: Origin

    @property
    def first(self) -> int:
        """The first evaluation instant (ms)."""
        return self.start.ms

    @property
    def last(self) -> int:
        """The last evaluation instant (ms): start + k*step, at most end."""
        return self.first + (self.end.ms - self.first) // self.step.ms * self.step.ms

    @property
    def steps(self) -> int:
        """How many instants Prometheus evaluates."""
        return (self.last - self.first) // self.step.ms + 1

    def upstream(self) -> list[tuple[str, str]]:
        """The parameters sent upstream for the whole request."""
        return [("query", self.query.text), ("start", self.start.text), ("end", self.end.text),
                ("step", self.step.text), *self.params]

    def named(self, *names: str) -> bool:
        return any(k in names for k, _ in self.params)


@dataclass(frozen=True, slots=True)
class InstantQuery:
    """/api/v1/query, decoded; `time` None: evaluated at a now the gateway picks."""

    query: Query
    time: Time | None
    params: Pairs
    origin: Origin

    def upstream(self, time: str | None = None) -> list[tuple[str, str]]:
        """The parameters sent upstream; `time` overrides the caller's (the gateway's now)."""
        at = time if time is not None else (self.time.text if self.time is not None else None)
        return [("query", self.query.text), *([("time", at)] if at is not None else []), *self.params]

    def named(self, *names: str) -> bool:
        return any(k in names for k, _ in self.params)


def pairs(items: Sequence[tuple[str, str]]) -> Pairs:
    return tuple((k, v) for k, v in items)


def _tree(text: str) -> pp.Expr | None:
    try:
        return parse(text)
    except PromQLError:
        return None


def range_query(query: str, start: str, end: str, step: str, params: Sequence[tuple[str, str]] = (),
                origin: Origin | None = None) -> RangeQuery:
    """A RangeQuery from texts, for callers other than the HTTP edge (tests, benchmarks):
    the query as written, times and step as Prometheus reads them (raises ValueError)."""
    return RangeQuery(Query(query, _tree(query)), parse_time(start), parse_time(end), parse_duration(step),
                      pairs(params), origin or Origin())


def instant_query(query: str, time: str | None = None, params: Sequence[tuple[str, str]] = (),
                  origin: Origin | None = None) -> InstantQuery:
    """An InstantQuery from texts (see range_query)."""
    return InstantQuery(Query(query, _tree(query)), None if time is None else parse_time(time),
                        pairs(params), origin or Origin())
