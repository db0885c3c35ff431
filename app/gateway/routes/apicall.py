"""One Prometheus API call at the edge: the query prepared once, the budget, the upstream and the range cache."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import Response

from app.common import tracing
from app.gateway.catalog.names import FigureNames
from app.gateway.engines import limits
from app.gateway.engines.scheduler import Ticket, current, upstream_slot
from app.gateway.promql.syntax import PromQLError, enforce, enforce_match, parse
from app.gateway.result import Lookup
from app.gateway.routes.confine import Caller
from app.gateway.routes.envelope import JSON, bad_data, from_upstream, invalid_param
from app.gateway.routes.params import Params, duration_param
from app.gateway.service import GatewayService
from app.gateway.upstream.answers import ApiAnswer, UpstreamError


class ApiContext:
    """What every API handler shares: the service, the figure names, the deadline."""

    def __init__(self, service: GatewayService) -> None:
        self.service = service
        self.settings = service.settings
        self.names = FigureNames(service.catalog)

    def prepare(self, expr: str, caller: Caller, *, prefixed: bool) -> str:
        """The query to send upstream: the caller's own text unless figure names were
        expanded or a tenant's matchers enforced (parsed once here, at the edge)."""
        tracing.note({"gateway.query_hash": tracing.query_hash(expr)})  # the caller's text: one panel, one hash
        try:
            tree = parse(expr)
        except PromQLError as exc:
            if caller.confined:
                raise (invalid_param("query", str(exc)) if prefixed else bad_data(str(exc))) from None
            return expr  # Prometheus judges it, with its own words
        try:
            expanded = self.names.expand(tree)
            if expanded is not None:
                parse(expanded)  # never send what we could not read back
            out = expr if expanded is None else expanded
            # The tenant's matchers go on last, so figures' selectors get them too.
            return enforce(out, caller.matchers) if caller.confined else out
        except PromQLError as exc:
            raise (invalid_param("query", str(exc)) if prefixed else bad_data(str(exc))) from None

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

    def budget(self, p: Params) -> tuple[float, list[tuple[str, str]]]:
        """(our deadline, params with the caller's `timeout` capped below it so Prometheus reports
        its own timeout first). No `timeout` is added when the caller sent none."""
        deadline = self.settings.request_deadline_seconds
        if p.get("timeout") == "":
            return deadline, list(p.items)
        asked = duration_param(p, "timeout")
        cap = deadline * 0.9
        if asked <= cap:
            return deadline, list(p.items)
        return deadline, Params(tuple(p.items)).replaced("timeout", f"{max(1, int(cap * 1000))}ms")

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

    async def evaluate(self, path: str, params: Sequence[tuple[str, str]], caller: Caller,
                       deadline: float, **times: float | None) -> Response:
        """Evaluate query / query_range through the exact range cache (engines/ranges.py):
        the one place it plugs in. `times`: start, end, step, or time, as parsed."""
        service = self.service
        await service.ensure_started()
        p = Params(tuple(params))
        until = asyncio.get_running_loop().time() + deadline
        ticket_of().deadline = until
        rest = p.without("query", "start", "end", "step", "time")
        try:
            if path == "/api/v1/query_range":
                result = await service.ranges.query_range(
                    scope=caller.scope, expr=p.get("query"), start=times["start"] or 0.0,
                    end=times["end"] or 0.0, step=times["step"] or 0.0, params=rest,
                    deadline=until, headers=caller.headers)
            else:
                result = await service.ranges.query(scope=caller.scope, expr=p.get("query"),
                                                    time=times.get("time"), params=rest,
                                                    deadline=until, headers=caller.headers)
        except UpstreamError as exc:
            raise from_upstream(exc) from None
        body = result.raw if result.raw is not None else json.dumps(
            result.doc, ensure_ascii=False, separators=(",", ":")).encode()
        ticket = ticket_of()
        ticket.stats.bytes = len(body)
        if result.status_code == 200:
            ticket.stats.series = limits.check_answer(ticket, body)
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
