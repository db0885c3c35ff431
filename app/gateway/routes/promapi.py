"""The Prometheus HTTP API (`/api/v1/...`) on the gateway: its URL is a Grafana datasource URL.

Routers parse and pick: this one reads parameters exactly as Prometheus does (GET
query string or form POST, RFC3339 or unix times, float or duration steps), refuses
what Prometheus would refuse with Prometheus' envelope and status, expands catalog
figure names (app/gateway/catalog/names.py), and sends the rest to the one upstream client
(same auth, path prefix, headers, breaker and deadline as the figures). Upstream
answers, success or Prometheus error envelope, pass through byte for byte unless
this router had to merge something in (figure names in `label/__name__/values`,
figure metadata in `metadata`). What goes upstream is the caller's query string
itself unless it was changed (figure expansion), so answers stay exact.

A parameter given both in the URL and in a form body with different values is
refused (400): a proxy that checks one copy while Prometheus reads the other is
the prom-label-proxy bypass, and nothing here should ever depend on which copy wins.

Tenants (docs/tenants.md): a caller whose token is confined to label values gets
them enforced on the syntax tree of every query (after figure expansion), added to
every `match[]` (and sent as the only `match[]` when it gave none), its metadata
filtered to the metric names its series have, and its rules and alerts filtered by
label. Only the enforced copy of a parameter ever goes upstream. Its upstream headers
(X-Scope-OrgID) go with every request it causes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request, Response

from app.common import tracing
from app.common.clients import client_of
from app.gateway.catalog.names import merge_metadata
from app.gateway.engines import limits
from app.gateway.engines.limits import LimitExceeded
from app.gateway.engines.scheduler import enter, leave
from app.gateway.engines.stats import QueryNote, log_if_slow, server_timing
from app.gateway.promql.syntax import PromQLError, tenant_selector
from app.gateway.routes.apicall import ApiContext, passthrough, rebuilt, ticket_of
from app.gateway.routes.confine import Caller, caller_of, confine_alerts, confine_rules, families_of
from app.gateway.routes.envelope import JSON, ApiError, bad_data, error_response
from app.gateway.routes.openapi import DURATION, LIMIT, MATCH, STR, TIME, Param, document
from app.gateway.routes.params import _INT, Params, read_params, time_param
from app.gateway.service import GatewayService

# When the upstream has no buildinfo (404), this answer makes Grafana see a Prometheus
# (no `features` key) new enough for the label-matcher APIs it uses.
SYNTHETIC_BUILDINFO = {"version": "2.24.0", "revision": "", "branch": "", "buildUser": "",
                       "buildDate": "", "goVersion": "", "application": "metrics-gateway"}

Handler = Callable[[ApiContext, Params, Caller, Mapping[str, str]], Awaitable[Response]]


async def until_gone(request: Request, work: Awaitable[Response]) -> Response:
    """`work`, cancelled when the caller goes away (its slot or place in the queue freed
    at once, not at the deadline). The answer then goes nowhere: 499, as nginx logs it."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return Response(status_code=499)
    return task.result()


# -- query / query_range ------------------------------------------------------------------------

async def _query(api: ApiContext, p: Params, caller: Caller, _: Mapping[str, str]) -> Response:
    return await api.evaluate(api.instant_query(p, caller))


async def _query_range(api: ApiContext, p: Params, caller: Caller, _: Mapping[str, str]) -> Response:
    return await api.evaluate(api.range_query(p, caller))


# -- exemplars, series, labels --------------------------------------------------------------------

async def _exemplars(api: ApiContext, p: Params, caller: Caller, _: Mapping[str, str]) -> Response:
    start = time_param(p, "start")
    end = time_param(p, "end")
    if start is not None and end is not None and end.ns < start.ns:
        raise bad_data("end timestamp must not be before start timestamp")
    limits.check_expression(ticket_of(), p.get("query"))
    query = api.prepare(p.get("query"), caller, prefixed=False)
    items = Params(p.items).replaced("query", query.text)
    return passthrough(await api.upstream("POST", "/api/v1/query_exemplars", items, caller))


async def _series(api: ApiContext, p: Params, caller: Caller, _: Mapping[str, str]) -> Response:
    if not p.all("match[]"):
        raise bad_data("no match[] parameter provided")
    time_param(p, "start")
    time_param(p, "end")
    return passthrough(await api.upstream("POST", "/api/v1/series", api.confined_matches(p, caller).items, caller))


async def _labels(api: ApiContext, p: Params, caller: Caller, _: Mapping[str, str]) -> Response:
    time_param(p, "start")
    time_param(p, "end")
    return passthrough(await api.upstream("POST", "/api/v1/labels", api.confined_matches(p, caller).items, caller))


# -- label values, metadata: upstream's, merged with the figures -----------------------------------

async def _label_values(api: ApiContext, p: Params, caller: Caller, path: Mapping[str, str]) -> Response:
    name = path["name"]
    time_param(p, "start")
    time_param(p, "end")
    answer = await api.upstream("GET", f"/api/v1/label/{quote(name, safe='')}/values",
                                api.confined_matches(p, caller).items, caller)
    if name != "__name__" or answer.error_type is not None:
        return passthrough(answer)
    # The upstream has judged limit and match[] already (and answered): no second opinion.
    text = p.get("limit")
    limit = int(text) if _INT.match(text) else None
    try:
        ours = api.names.names_matching(p.all("match[]"))
    except PromQLError:
        ours = []  # a selector the upstream reads and we cannot: no figure claims it
    values = sorted(set(answer.doc.get("data") or []) | set(ours))
    warnings = list(answer.doc.get("warnings") or [])
    if limit is not None and 0 < limit < len(values):
        values = values[:limit]
        warnings.append("results truncated due to limit")
    doc = {**answer.doc}
    if warnings:
        doc["warnings"] = warnings
    return rebuilt(doc, values)


def _limit_param(p: Params, message: str) -> int | None:
    text = p.get("limit")
    if text == "":
        return None
    if not _INT.match(text):  # Go's strconv.Atoi: no spaces, underscores or other digits
        raise bad_data(message)
    return int(text)


async def _metadata(api: ApiContext, p: Params, caller: Caller, _: Mapping[str, str]) -> Response:
    limit = _limit_param(p, "limit must be a number")
    metric = p.get("metric") or None
    names = api.names
    if metric is not None and metric in names:
        return Response(json.dumps({"status": "success", "data": names.metadata(metric)}), media_type=JSON)
    if not caller.confined:
        answer = await api.upstream("GET", "/api/v1/metadata", p.items, caller)
        if answer.error_type is not None:
            return passthrough(answer)
        data = answer.doc.get("data") or {}
        return rebuilt(answer.doc, merge_metadata(data, names.metadata(metric), limit))
    # Prometheus' metadata has no matchers: keep the families the tenant has series
    # of, and limit only after that (so the limit counts the tenant's own names).
    visible = await api.upstream("GET", "/api/v1/label/__name__/values",
                                 [("match[]", tenant_selector(caller.matchers))], caller)
    if visible.error_type is not None:
        return passthrough(visible)
    families = families_of([str(n) for n in visible.doc.get("data") or []])
    answer = await api.upstream("GET", "/api/v1/metadata", p.without("limit"), caller)
    if answer.error_type is not None:
        return passthrough(answer)
    data = {k: v for k, v in (answer.doc.get("data") or {}).items() if k in families}
    return rebuilt(answer.doc, merge_metadata(data, names.metadata(metric), limit))


# -- status, rules, alerts ---------------------------------------------------------------------------

async def _buildinfo(api: ApiContext, p: Params, caller: Caller, _: Mapping[str, str]) -> Response:
    answer = await api.upstream("GET", "/api/v1/status/buildinfo", (), caller)
    if answer.status_code == 404:
        return Response(json.dumps({"status": "success", "data": SYNTHETIC_BUILDINFO}), media_type=JSON)
    return passthrough(answer)


def _upstream_get(path: str, confine: Callable[[Any, Sequence[tuple[str, str]]], Any] | None = None) -> Handler:
    """Upstream's own answer; a confined caller's filtered by `confine` when given."""
    async def handle(api: ApiContext, p: Params, caller: Caller, _: Mapping[str, str]) -> Response:
        answer = await api.upstream("GET", f"/api/v1{path}", p.items, caller)
        if caller.confined and confine is not None and answer.error_type is None:
            return rebuilt(answer.doc, confine(answer.doc.get("data"), caller.matchers))
        return passthrough(answer)

    return handle


# -- the route table: which paths exist, with which methods and parameters ----------------------------

@dataclass(frozen=True, slots=True)
class ApiRoute:
    path: str  # under /api/v1
    methods: tuple[str, ...]
    summary: str
    handler: Handler
    params: tuple[Param, ...] = ()
    cache_header: bool = False  # errors say X-Gateway-Cache too (the range cache's routes)


_GP = ("GET", "POST")
_RANGE = (("start", False, {**STR, "pattern": TIME}), ("end", False, {**STR, "pattern": TIME}))

ROUTES: tuple[ApiRoute, ...] = (
    ApiRoute("/query", _GP, "Instant query (Prometheus API)", _query,
             (("query", False, STR), ("time", False, {**STR, "pattern": TIME}),
              ("timeout", False, {**STR, "pattern": DURATION}), ("stats", False, STR)), cache_header=True),
    ApiRoute("/query_range", _GP, "Range query (Prometheus API)", _query_range,
             (("query", False, STR), ("start", True, {**STR, "pattern": TIME}), ("end", True, {**STR, "pattern": TIME}),
              ("step", True, {**STR, "pattern": DURATION}), ("timeout", False, {**STR, "pattern": DURATION}),
              ("stats", False, STR)), cache_header=True),
    ApiRoute("/query_exemplars", _GP, "Exemplars (Prometheus API)", _exemplars, (("query", False, STR), *_RANGE)),
    ApiRoute("/series", _GP, "Series (Prometheus API)", _series,
             (("match[]", True, MATCH), *_RANGE, ("limit", False, STR))),
    ApiRoute("/labels", _GP, "Label names (Prometheus API)", _labels,
             (("match[]", False, MATCH), *_RANGE, ("limit", False, STR))),
    ApiRoute("/label/{name}/values", ("GET",), "Label values (Prometheus API; figure names under __name__)",
             _label_values, (("match[]", False, MATCH), *_RANGE, ("limit", False, STR))),
    ApiRoute("/metadata", ("GET",), "Metric metadata (Prometheus API; figures included)", _metadata,
             (("metric", False, STR), ("limit", False, LIMIT), ("limit_per_metric", False, STR))),
    ApiRoute("/status/buildinfo", ("GET",), "Build information (upstream's, or a Prometheus-shaped stand-in)",
             _buildinfo),
    ApiRoute("/status/flags", ("GET",), "Flags (upstream's; 404 when it has none)", _upstream_get("/status/flags")),
    ApiRoute("/rules", ("GET",), "Rules (upstream's)", _upstream_get("/rules", confine_rules)),
    ApiRoute("/alerts", ("GET",), "Alerts (upstream's)", _upstream_get("/alerts", confine_alerts)),
)

_ANY_METHOD = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE")


def allowed_methods(path: str) -> tuple[str, ...] | None:
    """The methods a path under /api/v1 is served with (from ROUTES); None for a path not served."""
    parts = path.split("/")
    for route in ROUTES:
        pattern = route.path.lstrip("/").split("/")
        if len(pattern) == len(parts) and all(
                (a.startswith("{") and b != "") or a == b for a, b in zip(pattern, parts, strict=True)):
            return route.methods
    return None


def create_promapi_router(service: GatewayService) -> APIRouter:
    """The routes of ROUTES (mount under /api/v1), one per method so each has its own
    OpenAPI operation; any other path or method answers 404 or 405."""
    router = APIRouter(tags=["prometheus api"])
    api = ApiContext(service)

    def endpoint(route: ApiRoute) -> Callable[..., Awaitable[Response]]:
        async def serve(request: Request) -> Response:
            """The caller's ticket (client, limits, costs) set for all the work the request
            causes, the work cancelled when the caller goes away, refusals in Prometheus'
            envelope, and what it cost (Server-Timing, the slow-query log)."""
            ticket = service.scheduler.ticket(client_of(request))
            tracing.note({"gateway.client": ticket.label})
            note = QueryNote(request.url.path)
            started = time.perf_counter()
            token = enter(ticket)
            try:
                p = await read_params(request)
                note.query = p.get("query")
                response = await until_gone(request, route.handler(api, p, caller_of(request), request.path_params))
            except ApiError as exc:
                response = error_response(exc, route.cache_header)
            except LimitExceeded as exc:
                response = error_response(ApiError(exc.error_type, exc.message, status=exc.status),
                                          route.cache_header)
            finally:
                leave(token)
            total = time.perf_counter() - started
            tracing.note({"gateway.queue_wait_seconds": ticket.stats.queue_seconds})
            response.headers["Server-Timing"] = server_timing(ticket, total)
            note.status = response.status_code
            note.cache = response.headers.get("X-Gateway-Cache", "")
            log_if_slow(ticket, note, total, service.settings.slow_query_seconds)
            return response

        if "{name}" not in route.path:
            return serve

        async def serve_named(request: Request, name: str) -> Response:  # `name` documented as a path parameter
            return await serve(request)

        return serve_named

    for route in ROUTES:
        for method in route.methods:
            router.add_api_route(route.path, endpoint(route), methods=[method], summary=route.summary,
                                 name=f"{route.path.strip('/')}_{method.lower()}")

    @router.api_route("/{rest:path}", methods=list(_ANY_METHOD), include_in_schema=False)
    async def other(rest: str) -> Response:
        """Unknown paths: 404. Known paths with another method: 405 listing the right ones
        (Starlette's own 405 would list only the first route's method). CORS preflights
        never get here: the CORS middleware answers them."""
        allowed = allowed_methods(rest)
        if allowed is None:
            return error_response(ApiError("not_found", f"the gateway does not serve /api/v1/{rest}"))
        return Response(json.dumps({"detail": "Method Not Allowed"}), status_code=405, media_type=JSON,
                        headers={"Allow": ", ".join(allowed)})

    document(router, {r.path: r.params for r in ROUTES})
    return router
