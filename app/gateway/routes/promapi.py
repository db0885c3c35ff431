"""The Prometheus HTTP API (`/api/v1/...`) on the gateway: its URL is a Grafana datasource URL.

Routers parse and pick: this one reads parameters exactly as Prometheus does (GET
query string or form POST, RFC3339 or unix times, float or duration steps), refuses
what Prometheus would refuse with Prometheus' envelope and status, expands catalog
figure names (app/gateway/names.py), and sends the rest to the one upstream client
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
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request, Response

from app.gateway.catalog.names import FigureNames, merge_metadata
from app.gateway.promql.syntax import PromQLError, enforce, enforce_match, parse, tenant_selector
from app.gateway.result import Lookup
from app.gateway.routes.confine import Caller, caller_of, confine_alerts, confine_rules, families_of
from app.gateway.routes.envelope import JSON, ApiError, bad_data, error_response, from_upstream, invalid_param
from app.gateway.routes.openapi import document
from app.gateway.routes.params import _INT, Params, _ns, duration_param, read_params, required_time, time_param
from app.gateway.service import GatewayService
from app.gateway.upstream.answers import ApiAnswer, UpstreamError

# Prometheus refuses ranges with more points than this per series.
MAX_POINTS = 11000

# When the upstream has no buildinfo (404), this answer makes Grafana see a Prometheus
# (no `features` key) new enough for the label-matcher APIs it uses.
SYNTHETIC_BUILDINFO = {"version": "2.24.0", "revision": "", "branch": "", "buildUser": "",
                       "buildDate": "", "goVersion": "", "application": "metrics-gateway"}



# --- parameters ------------------------------------------------------------------------------



# --- the caller's scope (tenants, issue 15) ---------------------------------------------------


Handler = Callable[[Params, Caller], Awaitable[Response]]

_ANY_METHOD = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE")
_GET_AND_POST = frozenset({"query", "query_range", "query_exemplars", "series", "labels"})
_GET_ONLY = frozenset({"metadata", "status/buildinfo", "status/flags", "rules", "alerts"})
_LABEL_VALUES = re.compile(r"\Alabel/[^/]+/values\Z")


def allowed_methods(path: str) -> tuple[str, ...] | None:
    """The methods a path under /api/v1 is served with; None for a path not served."""
    if path in _GET_AND_POST:
        return ("GET", "POST")
    if path in _GET_ONLY or _LABEL_VALUES.match(path):
        return ("GET",)
    return None


# --- the router ----------------------------------------------------------------------------------

def create_promapi_router(service: GatewayService) -> APIRouter:
    """`/query`, `/query_range`, `/series`, `/labels`, `/label/{name}/values`, `/metadata`,
    `/query_exemplars`, `/status/buildinfo`, `/status/flags`, `/rules`, `/alerts` (mount under /api/v1)."""
    router = APIRouter(tags=["prometheus api"])
    names = FigureNames(service.catalog)
    settings = service.settings

    def prepare(expr: str, caller: Caller, *, prefixed: bool) -> str:
        """The query to send upstream: the caller's own text unless figure names were expanded."""
        try:
            tree = parse(expr)
        except PromQLError as exc:
            if caller.confined:
                raise (invalid_param("query", str(exc)) if prefixed else bad_data(str(exc))) from None
            return expr  # Prometheus judges it, with its own words
        try:
            expanded = names.expand(tree)
            if expanded is not None:
                parse(expanded)  # never send what we could not read back
            out = expr if expanded is None else expanded
            # The tenant's matchers go on last, so figures' selectors get them too.
            return enforce(out, caller.matchers) if caller.confined else out
        except PromQLError as exc:
            raise (invalid_param("query", str(exc)) if prefixed else bad_data(str(exc))) from None

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

    def budget(p: Params) -> tuple[float, list[tuple[str, str]]]:
        """(our deadline, params with the caller's `timeout` capped below it so Prometheus reports
        its own timeout first). No `timeout` is added when the caller sent none."""
        deadline = settings.request_deadline_seconds
        if p.get("timeout") == "":
            return deadline, list(p.items)
        asked = duration_param(p, "timeout")
        cap = deadline * 0.9
        if asked <= cap:
            return deadline, list(p.items)
        return deadline, Params(tuple(p.items)).replaced("timeout", f"{max(1, int(cap * 1000))}ms")

    async def upstream(method: str, path: str, params: Sequence[tuple[str, str]], caller: Caller,
                       timeout: float | None = None) -> ApiAnswer:
        await service.ensure_started()
        try:
            return await service.client.api(method, path, params,
                                            timeout=timeout or settings.request_deadline_seconds,
                                            headers=caller.headers)
        except UpstreamError as exc:
            raise from_upstream(exc) from None

    async def evaluate(path: str, params: Sequence[tuple[str, str]], caller: Caller,
                       deadline: float, **times: float | None) -> Response:
        """Evaluate query / query_range through the exact range cache (app/gateway/ranges.py):
        the one place it plugs in. `times`: start, end, step, or time, as parsed."""
        await service.ensure_started()
        p = Params(tuple(params))
        until = asyncio.get_running_loop().time() + deadline
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
        out = {"X-Gateway-Cache": str(result.lookup)}
        if result.evaluated_at is not None:
            # The instant an instant query was evaluated at (the gateway's "now" when the
            # client sent no time): reported even when no sample carries it.
            out["X-Gateway-Evaluation-Time"] = repr(result.evaluated_at)
        return Response(body, status_code=result.status_code, media_type=JSON, headers=out)

    def passthrough(answer: ApiAnswer, lookup: Lookup | None = None) -> Response:
        headers = {"X-Gateway-Cache": str(lookup)} if lookup is not None else None
        return Response(answer.raw, status_code=answer.status_code, media_type=JSON, headers=headers)

    def rebuilt(doc: Mapping[str, Any], data: Any) -> Response:
        """Upstream's success envelope (warnings, infos kept) with new data."""
        out = {"status": "success", "data": data,
               **{k: v for k, v in doc.items() if k not in ("status", "data")}}
        return Response(json.dumps(out, ensure_ascii=False, separators=(",", ":")), media_type=JSON)

    async def guarded(request: Request, handler: Handler, cache_header: bool = False) -> Response:
        try:
            p = await read_params(request)
            return await handler(p, caller_of(request))
        except ApiError as exc:
            return error_response(exc, cache_header)

    # -- query / query_range ----------------------------------------------------------------

    async def _query(p: Params, caller: Caller) -> Response:
        at = time_param(p, "time", None)
        deadline, items = budget(p)
        expr = prepare(p.get("query"), caller, prefixed=True)
        items = Params(tuple(items)).replaced("query", expr)
        return await evaluate("/api/v1/query", items, caller, deadline, time=at)

    async def _query_range(p: Params, caller: Caller) -> Response:
        start = required_time(p, "start")
        end = required_time(p, "end")
        if end < start:
            raise invalid_param("end", "end timestamp must not be before start time")
        step = duration_param(p, "step")
        if step <= 0:
            raise invalid_param("step", "zero or negative query resolution step widths are not accepted. "
                                        "Try a positive integer")
        if (_ns(end) - _ns(start)) // max(1, int(step * 1e9)) > MAX_POINTS:
            raise bad_data("exceeded maximum resolution of 11,000 points per timeseries. "
                           "Try decreasing the query resolution (?step=XX)")
        deadline, items = budget(p)
        expr = prepare(p.get("query"), caller, prefixed=False)
        items = Params(tuple(items)).replaced("query", expr)
        return await evaluate("/api/v1/query_range", items, caller, deadline,
                              start=start, end=end, step=step)

    def get_and_post(path: str, handler: Handler, summary: str, cache_header: bool = False) -> None:
        """One route per method, so each has its own OpenAPI operation."""
        async def endpoint(request: Request) -> Response:
            return await guarded(request, handler, cache_header)

        for method in ("GET", "POST"):
            router.add_api_route(path, endpoint, methods=[method], summary=summary,
                                 name=f"{path.strip('/')}_{method.lower()}")

    get_and_post("/query", _query, "Instant query (Prometheus API)", cache_header=True)
    get_and_post("/query_range", _query_range, "Range query (Prometheus API)", cache_header=True)

    # -- exemplars, series, labels ------------------------------------------------------------

    def time_range(p: Params) -> None:
        start = time_param(p, "start", None)
        end = time_param(p, "end", None)
        if start is not None and end is not None and end < start:
            raise bad_data("end timestamp must not be before start timestamp")

    async def _exemplars(p: Params, caller: Caller) -> Response:
        time_range(p)
        expr = prepare(p.get("query"), caller, prefixed=False)
        items = Params(p.items).replaced("query", expr)
        return passthrough(await upstream("POST", "/api/v1/query_exemplars", items, caller))

    async def _series(p: Params, caller: Caller) -> Response:
        if not p.all("match[]"):
            raise bad_data("no match[] parameter provided")
        time_param(p, "start", None)
        time_param(p, "end", None)
        return passthrough(await upstream("POST", "/api/v1/series", confined_matches(p, caller).items, caller))

    async def _labels(p: Params, caller: Caller) -> Response:
        time_param(p, "start", None)
        time_param(p, "end", None)
        return passthrough(await upstream("POST", "/api/v1/labels", confined_matches(p, caller).items, caller))

    get_and_post("/query_exemplars", _exemplars, "Exemplars (Prometheus API)")
    get_and_post("/series", _series, "Series (Prometheus API)")
    get_and_post("/labels", _labels, "Label names (Prometheus API)")

    # -- label values, metadata: upstream's, merged with the figures ---------------------------

    def limit_param(p: Params, message: str) -> int | None:
        text = p.get("limit")
        if text == "":
            return None
        if not _INT.match(text):  # Go's strconv.Atoi: no spaces, underscores or other digits
            raise bad_data(message)
        return int(text)

    @router.get("/label/{name}/values", summary="Label values (Prometheus API; figure names under __name__)")
    async def label_values(request: Request, name: str) -> Response:
        async def handle(p: Params, caller: Caller) -> Response:
            time_param(p, "start", None)
            time_param(p, "end", None)
            answer = await upstream("GET", f"/api/v1/label/{quote(name, safe='')}/values",
                                    confined_matches(p, caller).items, caller)
            if name != "__name__" or answer.error_type is not None:
                return passthrough(answer)
            # The upstream has judged limit and match[] already (and answered): no second opinion.
            text = p.get("limit")
            limit = int(text) if _INT.match(text) else None
            try:
                ours = names.names_matching(p.all("match[]"))
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

        return await guarded(request, handle)

    @router.get("/metadata", summary="Metric metadata (Prometheus API; figures included)")
    async def metadata(request: Request) -> Response:
        async def handle(p: Params, caller: Caller) -> Response:
            limit = limit_param(p, "limit must be a number")
            metric = p.get("metric") or None
            if metric is not None and metric in names:
                return Response(json.dumps({"status": "success", "data": names.metadata(metric)}),
                                media_type=JSON)
            if not caller.confined:
                answer = await upstream("GET", "/api/v1/metadata", p.items, caller)
                if answer.error_type is not None:
                    return passthrough(answer)
                data = answer.doc.get("data") or {}
                return rebuilt(answer.doc, merge_metadata(data, names.metadata(metric), limit))
            # Prometheus' metadata has no matchers: keep the families the tenant has series
            # of, and limit only after that (so the limit counts the tenant's own names).
            visible = await upstream("GET", "/api/v1/label/__name__/values",
                                     [("match[]", tenant_selector(caller.matchers))], caller)
            if visible.error_type is not None:
                return passthrough(visible)
            families = families_of([str(n) for n in visible.doc.get("data") or []])
            answer = await upstream("GET", "/api/v1/metadata", p.without("limit"), caller)
            if answer.error_type is not None:
                return passthrough(answer)
            data = {k: v for k, v in (answer.doc.get("data") or {}).items() if k in families}
            return rebuilt(answer.doc, merge_metadata(data, names.metadata(metric), limit))

        return await guarded(request, handle)

    # -- status, rules, alerts ------------------------------------------------------------------

    @router.get("/status/buildinfo", summary="Build information (upstream's, or a Prometheus-shaped stand-in)")
    async def buildinfo(request: Request) -> Response:
        async def handle(p: Params, caller: Caller) -> Response:
            answer = await upstream("GET", "/api/v1/status/buildinfo", (), caller)
            if answer.status_code == 404:
                return Response(json.dumps({"status": "success", "data": SYNTHETIC_BUILDINFO}), media_type=JSON)
            return passthrough(answer)

        return await guarded(request, handle)

    confiners: dict[str, Callable[[Any, Sequence[tuple[str, str]]], Any]] = {
        "/rules": confine_rules, "/alerts": confine_alerts}

    def passthrough_get(path: str) -> Callable[[Request], Awaitable[Response]]:
        async def handle_request(request: Request) -> Response:
            async def handle(p: Params, caller: Caller) -> Response:
                answer = await upstream("GET", f"/api/v1{path}", p.items, caller)
                confine = confiners.get(path)
                if caller.confined and confine is not None and answer.error_type is None:
                    return rebuilt(answer.doc, confine(answer.doc.get("data"), caller.matchers))
                return passthrough(answer)

            return await guarded(request, handle)

        return handle_request

    for path, summary in (("/status/flags", "Flags (upstream's; 404 when it has none)"),
                          ("/rules", "Rules (upstream's)"), ("/alerts", "Alerts (upstream's)")):
        router.add_api_route(path, passthrough_get(path), methods=["GET"], summary=summary)

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

    document(router)
    return router


# --- OpenAPI: the parameters as Prometheus reads them ---------------------------------------------


