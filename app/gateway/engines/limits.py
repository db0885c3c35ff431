"""A client's limits, checked before any upstream work where the request shows them, and on
the answer where only the answer can (series, bytes).

Every refusal is a :class:`LimitExceeded` carrying Prometheus' errorType, the HTTP status
and a message that says, in a Grafana panel's words, which limit of which client was hit
and what to change: ``bad_data`` (400) for what the request asks (range, resolution,
lookback, length, a blocked pattern), ``execution`` (422) for what the answer holds. The
HTTP edge turns it into Prometheus' error envelope.
"""

from __future__ import annotations

import re
from datetime import timedelta
from functools import lru_cache
from typing import Any

import promql_parser as pp

from app.gateway import metrics as gm
from app.gateway.engines.scheduler import Ticket
from app.gateway.promql.syntax import operands

# Prometheus' default lookback for an instant vector selector (--query.lookback-delta).
LOOKBACK_DELTA = 300.0


class LimitExceeded(Exception):
    """A request or answer over one of its client's limits."""

    def __init__(self, reason: str, error_type: str, status: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.error_type = error_type
        self.status = status
        self.message = message


def human(seconds: float) -> str:
    """A duration the way Grafana writes time ranges ("7d", "1h30m", "45s")."""
    if seconds <= 0:
        return "0s"
    out = []
    rest = round(seconds)
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            out.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(out) or f"{seconds:g}s"


def _refuse(ticket: Ticket, reason: str, message: str, *, answer: bool = False) -> LimitExceeded:
    gm.client_rejected(ticket.label, reason)
    return LimitExceeded(reason, "execution" if answer else "bad_data", 422 if answer else 400,
                         f"{message} (limit of client {ticket.label!r} at the metrics gateway)")


def _seconds(d: timedelta | None) -> float:
    return 0.0 if d is None else d.total_seconds()


def _at(at: Any) -> float | None:
    """The time of an ``@ <time>`` modifier; None for none, or for ``@ start()``/``@ end()``
    (which read inside the request's own range)."""
    if at is None or str(at.type).rsplit(".", 1)[-1] != "At":
        return None
    return float(str(at).split()[-1])


def _reach_back(node: Any) -> tuple[float, float | None]:
    """(seconds before the evaluation time the query reads, earliest fixed time it reads)."""
    if isinstance(node, pp.VectorSelector | pp.MatrixSelector):
        vs = node.vector_selector if isinstance(node, pp.MatrixSelector) else node
        window = _seconds(node.range) if isinstance(node, pp.MatrixSelector) else LOOKBACK_DELTA
        back = window + _seconds(vs.offset)
        at = _at(vs.at)
        return (0.0, at - back) if at is not None else (back, None)
    if isinstance(node, pp.SubqueryExpr):
        inner, fixed = _reach_back(node.expr)
        back = inner + _seconds(node.range) + _seconds(node.offset)
        at = _at(node.at)
        if at is not None:
            return 0.0, min(at - back, fixed) if fixed is not None else at - back
        return back, fixed
    back, fixed = 0.0, None
    for child in operands(node) or []:
        b, f = _reach_back(child)
        back = max(back, b)
        fixed = f if fixed is None else (fixed if f is None else min(fixed, f))
    return back, fixed


@lru_cache(maxsize=1024)
def reach_back(expr: str) -> tuple[float, float | None] | None:
    """What `expr` reads before its evaluation times; None when it does not parse (the
    upstream then answers with its own parse error)."""
    try:
        return _reach_back(pp.parse(expr))
    except (ValueError, RuntimeError, TypeError, AttributeError):
        return None


@lru_cache(maxsize=256)
def _pattern(text: str) -> re.Pattern[str]:
    return re.compile(text)


def check_expression(ticket: Ticket, expr: str) -> None:
    """Length and blocked patterns: the query text alone."""
    limits = ticket.limits
    if limits.max_query_length is not None and len(expr) > limits.max_query_length:
        raise _refuse(ticket, "length", f"the query is {len(expr)} characters long; at most "
                      f"{limits.max_query_length} are accepted")
    for pattern in limits.blocked_queries or ():
        if _pattern(pattern).search(expr):
            raise _refuse(ticket, "blocked", f"this query matches the blocked pattern {pattern!r}; "
                          "ask the gateway's operators about it")


def check_lookback(ticket: Ticket, expr: str, earliest_eval: float, now: float) -> None:
    """How far before now the query reads (range start, selector windows, offsets, @)."""
    limit = ticket.limits.max_lookback_seconds
    reach = reach_back(expr) if limit is not None else None
    if limit is None or reach is None:
        return
    back, fixed = reach
    earliest = earliest_eval - back if fixed is None else min(earliest_eval - back, fixed)
    if now - earliest > limit + 1e-3:
        raise _refuse(ticket, "lookback", f"the query reads data from {human(now - earliest)} ago; data older "
                      f"than {human(limit)} is not served: choose a more recent time range, or shorter "
                      "[ranges] and offsets")


def check_range(ticket: Ticket, expr: str, start: float, end: float, step: float, now: float) -> None:
    """Everything a range query shows before it is sent: text, range, resolution, lookback."""
    limits = ticket.limits
    check_expression(ticket, expr)
    if limits.max_range_seconds is not None and end - start > limits.max_range_seconds + 1e-3:
        raise _refuse(ticket, "range", f"the time range is {human(end - start)}; at most "
                      f"{human(limits.max_range_seconds)} is served: choose a shorter time range")
    points = int((end - start) // step) + 1 if step > 0 else 0
    if limits.max_points_per_series is not None and points > limits.max_points_per_series:
        raise _refuse(ticket, "points", f"the query asks for {points} points per series; at most "
                      f"{limits.max_points_per_series} are served: increase the step (Min interval) "
                      "or shorten the time range")
    check_lookback(ticket, expr, start, now)


def check_instant(ticket: Ticket, expr: str, at: float, now: float) -> None:
    check_expression(ticket, expr)
    check_lookback(ticket, expr, at, now)


def too_large(ticket: Ticket, message: str) -> str:
    """An upstream answer cut at the size cap (the client's, or PROMETHEUS_MAX_RESPONSE_BYTES),
    counted against the client, in its words."""
    gm.client_rejected(ticket.label, "bytes")
    return (f"{message}: add label filters, aggregate (sum by ...) or increase the step "
            f"(limit of client {ticket.label!r} at the metrics gateway)")


def series_in(body: bytes) -> int:
    """Series in a query answer, counted in its bytes (no decoding): every series object of
    a vector or matrix starts with ``{"metric":``, which cannot occur inside a JSON string."""
    return body.count(b'{"metric":')


def check_answer(ticket: Ticket, body: bytes) -> int | None:
    """The answer's series and bytes against the client's limits; the series count, or None
    when no limit needs it (counting costs ~1.5 ms per 5 MB, as much as serving a remembered
    week-long answer: the slow-query log counts them itself, only for the lines it writes)."""
    limits = ticket.limits
    if limits.max_response_bytes is not None and len(body) > limits.max_response_bytes:
        raise _refuse(ticket, "bytes", f"the answer has {len(body)} bytes; at most {limits.max_response_bytes} "
                      "are served: add label filters, aggregate (sum by ...) or increase the step", answer=True)
    if limits.max_series is None:
        return None
    series = series_in(body)
    if series > limits.max_series:
        raise _refuse(ticket, "series", f"the answer has {series} series; at most {limits.max_series} are "
                      "served: add label filters or aggregate (sum by ...)", answer=True)
    return series
