"""what a query reads, from its syntax tree: the live window of a query."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from typing import Any

import promql_parser as pp

from app.gateway.promql.syntax import operands
from app.gateway.promql.timing import _go_round, ms_of


class Uncacheable(Exception):
    """The query's per-instant values depend on more than the instant (``@ start()``)."""


@dataclass(frozen=True, slots=True)
class Reach:
    """The latest sample time a query reads when evaluated at t (ms):
    ``max(t + relative, fixed)``; both None: it reads no data (``42``, ``time()``)."""

    relative: int | None = None
    fixed: int | None = None

    def union(self, other: Reach) -> Reach:
        return Reach(_max(self.relative, other.relative), _max(self.fixed, other.fixed))

    def latest(self, t: int) -> int | None:
        rel = None if self.relative is None else t + self.relative
        return _max(rel, self.fixed)

    def first_live(self, first: int, step: int, cutoff: int) -> int:
        """The first grid instant (``first + k*step``) whose latest read is after `cutoff`.

        Instants before it read only data at least a live window old. Returns an
        instant after any range when no instant is live.
        """
        if self.fixed is not None and self.fixed > cutoff:
            return first
        if self.relative is None:
            return 2**62
        # t + relative > cutoff  <=>  t > cutoff - relative
        k = (cutoff - self.relative - first) // step + 1
        return first + max(k, 0) * step


def _max(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def _offset_ms(offset: timedelta | None) -> int:
    return 0 if offset is None else _go_round(offset.total_seconds() * 1000)


def _at_ms(at: Any, preprocess_time: int | None) -> int | None:
    """The absolute evaluation time of an ``@`` modifier (None when there is none)."""
    if at is None:
        return None
    kind = str(at.type).rsplit(".", 1)[-1]
    if kind == "At":
        # The text form ("@ 1700000000.000"): reading .at panics for negative times, and
        # a negative time prints as 0, still an upper bound of what is read.
        return ms_of(float(str(at).split()[-1]))
    if preprocess_time is None:
        raise Uncacheable(f"@ {kind.lower()}() depends on the range")
    return preprocess_time


def reach(node: Any, preprocess_time: int | None = None) -> Reach:
    """What `node` reads, as a Reach. `preprocess_time` is what ``start()``/``end()``
    mean (an instant query's time); None for a range query, where they make the
    query uncacheable."""
    if isinstance(node, pp.VectorSelector):
        off = _offset_ms(node.offset)
        at = _at_ms(node.at, preprocess_time)
        return Reach(fixed=at - off) if at is not None else Reach(relative=-off)
    if isinstance(node, pp.MatrixSelector):
        return reach(node.vector_selector, preprocess_time)
    if isinstance(node, pp.SubqueryExpr):
        inner = reach(node.expr, preprocess_time)
        off = _offset_ms(node.offset)
        at = _at_ms(node.at, preprocess_time)
        # Inner evaluation times are at most (t or @) - offset.
        if at is not None:
            shifted = None if inner.relative is None else at - off + inner.relative
            return Reach(fixed=_max(inner.fixed, shifted))
        rel = None if inner.relative is None else inner.relative - off
        return Reach(relative=rel, fixed=inner.fixed)
    children = operands(node)
    if children is None:
        raise Uncacheable(f"unknown syntax node {type(node).__name__}")
    out = Reach()
    for child in children:
        out = out.union(reach(child, preprocess_time))
    return out


@lru_cache(maxsize=2048)
def range_reach(expr: str) -> Reach:
    """The Reach of a range query (raises Uncacheable; ValueError when it does not parse)."""
    return reach(pp.parse(expr))


# Every instant within the live window of now is live, whatever the query reads: some
# upstreams answer an instant near now differently depending on the range asked
# (VictoriaMetrics adjusts the last points of a range ending near or after now).
AT_LEAST_NOW = Reach(relative=0)


def instant_reach(expr: str, t: int) -> Reach:
    return reach(pp.parse(expr), preprocess_time=t)
