"""One Prometheus API call at the edge: decoded once into a typed request (promql/request.py),
the budget, the upstream and the range cache."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import Response

from app.common import tracing
from app.gateway.catalog.names import FigureNames
from app.gateway.engines import limits
from app.gateway.engines.scheduler import Ticket, current, upstream_slot
from app.gateway.promql.request import InstantQuery, Origin, Pairs, Query, RangeQuery, pairs
from app.gateway.promql.syntax import PromQLError, enforce_match, parse, rewrite
from app.gateway.result import Lookup
from app.gateway.routes.confine import Caller
from app.gateway.routes.envelope import JSON, bad_data, from_upstream, invalid_param
from app.gateway.routes.params import Params, duration_param, required_time, time_param
from app.gateway.service import GatewayService
from app.gateway.upstream.answers import ApiAnswer, UpstreamError

# Prometheus refuses ranges with more points than this per series.
MAX_POINTS = 11000


class ApiContext:
    """What every API handler shares: the service, the figure names, the deadline."""

    def __init__(self, service: GatewayService) -> None:
        self.service = service
        self.settings = service.settings
        self.names = FigureNames(service.catalog)

    def prepare(self, expr: str, caller: Caller, *, prefixed: bool) -> Query:
        """The query, parsed once: sent as the caller wrote it unless figure names were
        expanded or a tenant's matchers enforced, both printed in one pass of its tree."""
        tracing.note({"gateway.query_hash": tracing.query_hash(expr)})  # the caller's text: one panel, one hash
        try:
            tree = parse(expr)
        except PromQLError as exc:
            if caller.confined:
                raise (invalid_param("query", str(exc)) if prefixed else bad_data(str(exc))) from None
            return Query(expr, None)  # Prometheus judges it, with its own words
        try:
            substitute = self.names.substitute if self.names.uses(tree) else None
            if substitute is None and not caller.confined:
                return Query(expr, tree)
            # The tenant's matchers reach the figures' selectors too.
            text = rewrite(tree, substitute=substitute, tenant=caller.matchers if caller.confined else ())
            # Never send what we could not read back; the engines read this tree.
            return Query(text, parse(text))
        except PromQLError as exc:
            raise (invalid_param("query", str(exc)) if prefixed else bad_data(str(exc))) from None

    def range_query(self, p: Params, caller: Caller) -> RangeQuery:
        """/api/v1/query_range decoded, refused as Prometheus refuses it (in its order)."""
        start = required_time(p, "start")
        end = required_time(p, "end")
        if end.ns < start.ns:
            raise invalid_param("end", "end timestamp must not be before start time")
        step = duration_param(p, "step")
        if step.ns <= 0:
            raise invalid_param("step", "zero or negative query resolution step widths are not accepted. "
                                        "Try a positive integer")
        if (end.ns - start.ns) // step.ns > MAX_POINTS:  # Go: end.Sub(start) / step
            raise bad_data("exceeded maximum resolution of 11,000 points per timeseries. "
                           "Try decreasing the query resolution (?step=XX)")
        # The client's limits (engines/limits.py), on what it wrote, before any work.
        ticket = ticket_of()
        ticket.stats.start, ticket.stats.end, ticket.stats.step = start.seconds, end.seconds, step.seconds
        limits.check_range(ticket, p.get("query"), start.seconds, end.seconds, step.seconds, time.time())
        origin, rest = self.budget(p, caller)
        query = self.prepare(p.get("query"), caller, prefixed=False)
        return RangeQuery(query, start, end, step, rest, origin)

    def instant_query(self, p: Params, caller: Caller) -> InstantQuery:
        """/api/v1/query decoded."""
        at = time_param(p, "time")
        now = time.time()
        ticket = ticket_of()
        ticket.stats.time = None if at is None else at.seconds
        limits.check_instant(ticket, p.get("query"), now if at is None else at.seconds, now)
        origin, rest = self.budget(p, caller)
        query = self.prepare(p.get("query"), caller, prefixed=True)
        return InstantQuery(query, at, rest, origin)

    @staticmethod
    def confined_matches(p: Params, caller: Caller) -> Params:
        """The params with every `match[]` carrying the tenant's matchers (the tenant's
        selector alone when none was given). Unconfined callers' params are untouched."""
        if not caller.confined:
            return p
        try:
            matches = enforce_match(p.all("match[]"), caller.matchers)
        except PromQLError as exc:
            raise invalid_param("match[]", str(exc)) from None
        return Params((*p.without("match[]"), *(("match[]", m) for m in matches)))

    def budget(self, p: Params, caller: Caller) -> tuple[Origin, Pairs]:
        """Who asks and our deadline, and the parameters other than the query and its times,
        the caller's `timeout` capped below our deadline so Prometheus reports its own
        timeout first (none is added when the caller sent none)."""
        deadline = self.settings.request_deadline_seconds
        origin = Origin(caller.scope, caller.headers, asyncio.get_running_loop().time() + deadline)
        if p.get("timeout") != "":
            cap = deadline * 0.9
            if duration_param(p, "timeout").seconds > cap:
                p = Params(tuple(p.replaced("timeout", f"{max(1, int(cap * 1000))}ms")))
        return origin, pairs(p.without("query", "start", "end", "step", "time"))

    async def upstream(self, method: str, path: str, params: Sequence[tuple[str, str]], caller: Caller,
                       timeout: float | None = None) -> ApiAnswer:
        await self.service.ensure_started()
        loop = asyncio.get_running_loop()
        until = loop.time() + (timeout or self.settings.request_deadline_seconds)
        try:
            async with upstream_slot("api", until) as ticket:
                return await self.service.client.api(
                    method, path, params, timeout=until - loop.time(), headers=caller.headers,
                    max_bytes=ticket.limits.max_response_bytes if ticket else None)
        except UpstreamError as exc:
            raise from_upstream(exc) from None

    async def evaluate(self, request: RangeQuery | InstantQuery) -> Response:
        """Evaluate query / query_range through the exact range cache (engines/ranges.py):
        the one place it plugs in."""
        service = self.service
        await service.ensure_started()
        ticket_of().deadline = request.origin.deadline
        try:
            if isinstance(request, RangeQuery):
                result = await service.ranges.query_range(request)
            else:
                result = await service.ranges.query(request)
        except UpstreamError as exc:
            raise from_upstream(exc) from None
        body = result.raw if result.raw is not None else json.dumps(
            result.doc, ensure_ascii=False, separators=(",", ":")).encode()
        ticket = ticket_of()
        ticket.stats.bytes = len(body)
        if result.status_code == 200:
            ticket.stats.series = limits.check_answer(ticket, body)
            ticket.stats.answer = body
        out = {"X-Gateway-Cache": str(result.lookup)}
        if result.evaluated_at is not None:
            # The instant an instant query was evaluated at (the gateway's "now" when the
            # client sent no time): reported even when no sample carries it.
            out["X-Gateway-Evaluation-Time"] = repr(result.evaluated_at)
        return Response(body, status_code=result.status_code, media_type=JSON, headers=out)


def ticket_of() -> Ticket:
    """The request's ticket (client, limits, costs), set by the edge for all the work it causes."""
    ticket = current()
    assert ticket is not None, "API work outside the edge's guard"
    return ticket


def passthrough(answer: ApiAnswer, lookup: Lookup | None = None) -> Response:
    headers = {"X-Gateway-Cache": str(lookup)} if lookup is not None else None
    return Response(answer.raw, status_code=answer.status_code, media_type=JSON, headers=headers)


def rebuilt(doc: Mapping[str, Any], data: Any) -> Response:
    """Upstream's success envelope (warnings, infos kept) with new data."""
    out = {"status": "success", "data": data,
           **{k: v for k, v in doc.items() if k not in ("status", "data")}}
    return Response(json.dumps(out, ensure_ascii=False, separators=(",", ":")), media_type=JSON)
