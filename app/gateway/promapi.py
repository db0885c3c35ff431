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
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, quote

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute

from app.common.clients import client_of
from app.common.tenancy import tenant_of
from app.gateway import metrics as gm
from app.gateway.engines import limits
from app.gateway.engines.limits import LimitExceeded
from app.gateway.engines.scheduler import Rejected, Ticket, current, enter, leave, upstream_slot
from app.gateway.engines.stats import QueryNote, log_if_slow, server_timing
from app.gateway.names import FigureNames, merge_metadata
from app.gateway.promql import PromQLError, enforce, enforce_match, parse, tenant_selector
from app.gateway.result import Lookup
from app.gateway.service import GatewayService
from app.gateway.upstream import ApiAnswer, UpstreamError

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"

# Prometheus' errorType -> HTTP status (web/api/v1 respondError), for the errors
# this router makes itself; upstream error envelopes keep the upstream's status.
ERROR_STATUS: dict[str, int] = {
    "bad_data": 400,
    "execution": 422,
    "canceled": 503,
    "timeout": 503,
    "internal": 500,
    "unavailable": 503,
    "not_found": 404,
    "not_acceptable": 406,
}

# Our upstream failure vocabulary -> Prometheus errorType.
_UPSTREAM_ERROR_TYPE = {"timeout": "timeout", "too_large": "execution"}

# Prometheus refuses ranges with more points than this per series.
MAX_POINTS = 11000

# When the upstream has no buildinfo (404), this answer makes Grafana see a Prometheus
# (no `features` key) new enough for the label-matcher APIs it uses.
SYNTHETIC_BUILDINFO = {"version": "2.24.0", "revision": "", "branch": "", "buildUser": "",
                       "buildDate": "", "goVersion": "", "application": "metrics-gateway"}


class ApiError(Exception):
    """An answer in Prometheus' error envelope."""

    def __init__(self, error_type: str, message: str, headers: Mapping[str, str] | None = None, *,
                 upstream: bool = False, status: int | None = None) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message
        self.headers = dict(headers or {})
        self.upstream = upstream  # the upstream failed (not the request)
        self.status = status or ERROR_STATUS.get(error_type, 500)


def bad_data(message: str) -> ApiError:
    return ApiError("bad_data", message)


def invalid_param(name: str, message: str) -> ApiError:
    return ApiError("bad_data", f'invalid parameter "{name}": {message}')


def error_response(exc: ApiError, cache_header: bool = False) -> Response:
    """Prometheus' error envelope; on the query routes an upstream failure says `X-Gateway-Cache: failed`."""
    body = json.dumps({"status": "error", "errorType": exc.error_type, "error": exc.message})
    headers = dict(exc.headers)
    if cache_header and exc.upstream:
        headers["X-Gateway-Cache"] = str(Lookup.FAILED)
    return Response(body, status_code=exc.status, media_type=JSON, headers=headers)


def from_upstream(exc: UpstreamError) -> ApiError:
    """A transport-level upstream failure as Prometheus' envelope: never a 500 of ours.
    No turn for the request (its client's queue full, or its deadline passed waiting): 429."""
    if isinstance(exc, Rejected):
        return ApiError("unavailable", f"too many queries: {exc.message}",
                        {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}, status=429)
    if exc.error_type == "too_large" and (ticket := current()) is not None:
        gm.client_rejected(ticket.label, "bytes")
        return ApiError("execution", f"{exc.message}: add label filters, aggregate (sum by ...) or increase "
                        f"the step (limit of client {ticket.label!r} at the metrics gateway)")
    if exc.error_type == "circuit_open":
        return ApiError("unavailable", f"upstream Prometheus: {exc.message}",
                        {"Retry-After": "1"}, upstream=True)
    etype = _UPSTREAM_ERROR_TYPE.get(exc.error_type, "unavailable")
    return ApiError(etype, f"upstream Prometheus: {exc.error_type}: {exc.message}", upstream=True)


# --- parameters ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Params:
    """The request's parameters in order, URL and form body merged (body first, as Go's r.Form)."""

    items: tuple[tuple[str, str], ...]

    def get(self, name: str) -> str:
        """The first value, or "" (Go's FormValue)."""
        for k, v in self.items:
            if k == name:
                return v
        return ""

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.items if k == name]

    def without(self, *names: str) -> list[tuple[str, str]]:
        return [(k, v) for k, v in self.items if k not in names]

    def replaced(self, name: str, value: str) -> list[tuple[str, str]]:
        """The items with the first `name` set to value (appended when absent), later copies dropped."""
        out: list[tuple[str, str]] = []
        done = False
        for k, v in self.items:
            if k == name:
                if not done:
                    out.append((k, value))
                    done = True
                continue
            out.append((k, v))
        if not done:
            out.append((name, value))
        return out


def _decode_pairs(raw: bytes | str, where: str) -> list[tuple[str, str]]:
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return parse_qsl(text, keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad_data(f"error parsing form values: {where}: {exc}") from None


async def read_params(request: Request) -> Params:
    url = _decode_pairs(request.url.query, "query string")
    body: list[tuple[str, str]] = []
    if request.method == "POST":
        raw = await request.body()
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype == FORM:
            body = _decode_pairs(raw, "body")
        elif raw.strip():
            raise bad_data(f"unsupported Content-Type {ctype or '(none)'!r} for a POST with a body; "
                           f"send parameters as {FORM}")
    if body:
        in_body: dict[str, list[str]] = {}
        for k, v in body:
            in_body.setdefault(k, []).append(v)
        in_url: dict[str, list[str]] = {}
        for k, v in url:
            in_url.setdefault(k, []).append(v)
        for k in in_body.keys() & in_url.keys():
            if in_body[k] != in_url[k]:
                raise bad_data(f'parameter "{k}" is given in both the URL and the body with different values')
        return Params(tuple(body) + tuple((k, v) for k, v in url if k not in in_body))
    return Params(tuple(url))


# Go's strconv.ParseFloat syntax (decimal; no spaces or underscores, unlike Python's float()).
_FLOAT = re.compile(r"\A[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf(?:inity)?|nan)\Z",
                    re.IGNORECASE | re.ASCII)
_INT = re.compile(r"\A[+-]?[0-9]+\Z")
_RFC3339 = re.compile(r"\A\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})\Z", re.ASCII)
_DURATION = re.compile(r"\A(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?\Z",
                       re.ASCII)
_UNIT_SECONDS = (365 * 86400, 7 * 86400, 86400, 3600, 60, 1, 0.001)
_MIN_TIME_FORMATTED = "-292273086-05-16T16:47:06Z"
_MAX_TIME_FORMATTED = "292277025-08-18T07:12:54.999999999Z"


def parse_time(text: str) -> float:
    """Seconds since the epoch, as Prometheus' parseTime reads them (raises ValueError)."""
    if _FLOAT.match(text):
        t = float(text)
        if not math.isfinite(t):
            raise ValueError(text)
        whole = math.trunc(t)
        return whole + round((t - whole) * 1000) / 1000
    if _RFC3339.match(text):
        frac = ""
        if "." in text:
            head, rest = text.split(".", 1)
            digits = re.match(r"\d+", rest)
            assert digits is not None
            frac = digits.group(0)
            text = head + rest[len(frac):]
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return dt.timestamp() + (float("0." + frac) if frac else 0.0)
    if text == _MIN_TIME_FORMATTED:
        return -9.2e15
    if text == _MAX_TIME_FORMATTED:
        return 9.2e15
    raise ValueError(text)


def parse_duration(text: str) -> float:
    """Seconds, as Prometheus' parseDuration reads them: a float, or 1h30m-style (raises ValueError)."""
    if _FLOAT.match(text):
        d = float(text)
        if not math.isfinite(d) or abs(d) * 1e9 > 2**63 - 1:
            raise ValueError(f"cannot parse {text!r} to a valid duration. It overflows int64")
        return d
    m = _DURATION.match(text)
    if m and text:
        return sum(int(g) * unit for g, unit in zip(m.groups(), _UNIT_SECONDS, strict=True) if g)
    raise ValueError(f"cannot parse {text!r} to a valid duration")


def _go_quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def time_param(p: Params, name: str, default: float | None) -> float | None:
    text = p.get(name)
    if text == "":
        return default
    try:
        return parse_time(text)
    except ValueError:
        raise invalid_param(name, f"Invalid time value for '{name}': cannot parse {_go_quote(text)} "
                                  "to a valid timestamp") from None


def required_time(p: Params, name: str) -> float:
    text = p.get(name)
    try:
        return parse_time(text)
    except ValueError:
        raise invalid_param(name, f"cannot parse {_go_quote(text)} to a valid timestamp") from None


def duration_param(p: Params, name: str) -> float:
    text = p.get(name)
    try:
        return parse_duration(text)
    except ValueError as exc:
        msg = str(exc).replace(repr(text), _go_quote(text))
        raise invalid_param(name, msg) from None


def _ns(t: float) -> int:
    return round(t * 1e9)


# --- the caller's scope (tenants, issue 15) ---------------------------------------------------

@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks: the tenant's scope id (cache scope), its upstream headers and label matchers."""

    scope: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    confined: bool = False
    matchers: tuple[tuple[str, str], ...] = ()


def caller_of(request: Request) -> Caller:
    """The caller's tenant, as the security middleware resolved its token (app.common.tenancy)."""
    tenant = tenant_of(request)
    return Caller(tenant.id, tenant.headers() or {}, tenant.confined, tenant.matchers)


# Suffixes under which a metric family's series are named (histograms, summaries,
# counters in OpenMetrics, info metrics): metadata is kept per family name.
_SERIES_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created", "_info", "_gcount", "_gsum")


def families_of(metric_names: Sequence[str]) -> set[str]:
    """Every family name a series name may belong to (the name itself, and without a suffix)."""
    out: set[str] = set()
    for name in metric_names:
        out.add(name)
        for suffix in _SERIES_SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                out.add(name[: -len(suffix)])
    return out


def _carries(labels: Any, matchers: Sequence[tuple[str, str]]) -> bool:
    return isinstance(labels, Mapping) and all(labels.get(k) == v for k, v in matchers)


def confine_alerts(data: Any, matchers: Sequence[tuple[str, str]]) -> Any:
    """/api/v1/alerts data with only the alerts whose labels carry the tenant's."""
    if not isinstance(data, Mapping):
        return data
    alerts = [a for a in data.get("alerts") or [] if isinstance(a, Mapping) and _carries(a.get("labels"), matchers)]
    return {**data, "alerts": alerts}


def confine_rules(data: Any, matchers: Sequence[tuple[str, str]]) -> Any:
    """/api/v1/rules data with only the rules whose own labels carry the tenant's (as
    prom-label-proxy does: a rule's query may name any tenant), their alerts filtered too;
    groups left without rules are dropped."""
    if not isinstance(data, Mapping):
        return data
    groups = []
    for group in data.get("groups") or []:
        if not isinstance(group, Mapping):
            continue
        rules = []
        for rule in group.get("rules") or []:
            if isinstance(rule, Mapping) and _carries(rule.get("labels"), matchers):
                if "alerts" in rule:
                    rule = {**rule, "alerts": [a for a in rule.get("alerts") or []
                                               if isinstance(a, Mapping) and _carries(a.get("labels"), matchers)]}
                rules.append(rule)
        if rules:
            groups.append({**group, "rules": rules})
    return {**data, "groups": groups}


Handler = Callable[[Params, Caller], Awaitable[Response]]


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
        loop = asyncio.get_running_loop()
        until = loop.time() + (timeout or settings.request_deadline_seconds)
        try:
            async with upstream_slot("api", until) as ticket:
                return await service.client.api(method, path, params, timeout=until - loop.time(),
                                                headers=caller.headers,
                                                max_bytes=ticket.limits.max_response_bytes if ticket else None)
        except UpstreamError as exc:
            raise from_upstream(exc) from None

    async def evaluate(path: str, params: Sequence[tuple[str, str]], caller: Caller,
                       deadline: float, **times: float | None) -> Response:
        """Evaluate query / query_range through the exact range cache (app/gateway/ranges.py):
        the one place it plugs in. `times`: start, end, step, or time, as parsed."""
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

    def passthrough(answer: ApiAnswer, lookup: Lookup | None = None) -> Response:
        headers = {"X-Gateway-Cache": str(lookup)} if lookup is not None else None
        return Response(answer.raw, status_code=answer.status_code, media_type=JSON, headers=headers)

    def rebuilt(doc: Mapping[str, Any], data: Any) -> Response:
        """Upstream's success envelope (warnings, infos kept) with new data."""
        out = {"status": "success", "data": data,
               **{k: v for k, v in doc.items() if k not in ("status", "data")}}
        return Response(json.dumps(out, ensure_ascii=False, separators=(",", ":")), media_type=JSON)

    async def guarded(request: Request, handler: Handler, cache_header: bool = False) -> Response:
        """Every API route: the caller's ticket (client, limits, costs) set for all the work the
        request causes, the work cancelled when the caller goes away, refusals in Prometheus'
        envelope, and what it cost (Server-Timing, slow-query log)."""
        ticket = service.scheduler.ticket(client_of(request))
        note = QueryNote(request.url.path)
        gm.client_request(ticket.label)
        started = time.perf_counter()
        token = enter(ticket)
        try:
            p = await read_params(request)
            note.query = p.get("query")
            response = await until_gone(request, handler(p, caller_of(request)))
        except ApiError as exc:
            response = error_response(exc, cache_header)
        except LimitExceeded as exc:
            response = error_response(ApiError(exc.error_type, exc.message, status=exc.status), cache_header)
        finally:
            leave(token)
        total = time.perf_counter() - started
        response.headers["Server-Timing"] = server_timing(ticket, total)
        note.status = response.status_code
        note.cache = response.headers.get("X-Gateway-Cache", "")
        log_if_slow(ticket, note, total, settings.slow_query_seconds)
        return response

    def ticket_of() -> Ticket:
        ticket = current()
        assert ticket is not None, "API work outside guarded()"
        return ticket

    # -- query / query_range ----------------------------------------------------------------

    async def _query(p: Params, caller: Caller) -> Response:
        at = time_param(p, "time", None)
        now = time.time()
        ticket = ticket_of()
        ticket.stats.time = at
        limits.check_instant(ticket, p.get("query"), now if at is None else at, now)
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
        ticket = ticket_of()
        ticket.stats.start, ticket.stats.end, ticket.stats.step = start, end, step
        limits.check_range(ticket, p.get("query"), start, end, step, time.time())
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
        limits.check_expression(ticket_of(), p.get("query"))
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

# An empty value is an absent one (Go's FormValue), so the patterns accept "".
_TIME = (r"^(|[+-]?(([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[iI][nN][fF]|[nN][aA][nN])"
         r"|[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2}))$")
_DURATION_PATTERN = (r"^(|[+-]?(([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?)"
                     r"|([0-9]+y)?([0-9]+w)?([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?)$")
_STR = {"type": "string"}
# A form field given once is a string, several times an array: the wire cannot tell them apart.
_MATCH: dict[str, Any] = {"anyOf": [_STR, {"type": "array", "items": _STR}]}
_PARAMS: dict[str, list[tuple[str, bool, dict[str, Any]]]] = {
    "query": [("query", False, _STR), ("time", False, {**_STR, "pattern": _TIME}),
              ("timeout", False, {**_STR, "pattern": _DURATION_PATTERN}), ("stats", False, _STR)],
    "query_range": [("query", False, _STR), ("start", True, {**_STR, "pattern": _TIME}),
                    ("end", True, {**_STR, "pattern": _TIME}), ("step", True, {**_STR, "pattern": _DURATION_PATTERN}),
                    ("timeout", False, {**_STR, "pattern": _DURATION_PATTERN}), ("stats", False, _STR)],
    "query_exemplars": [("query", False, _STR), ("start", False, {**_STR, "pattern": _TIME}),
                        ("end", False, {**_STR, "pattern": _TIME})],
    "series": [("match[]", True, _MATCH),
               ("start", False, {**_STR, "pattern": _TIME}), ("end", False, {**_STR, "pattern": _TIME}),
               ("limit", False, _STR)],
    "labels": [("match[]", False, _MATCH), ("start", False, {**_STR, "pattern": _TIME}),
               ("end", False, {**_STR, "pattern": _TIME}), ("limit", False, _STR)],
    "label/{name}/values": [("match[]", False, _MATCH),
                            ("start", False, {**_STR, "pattern": _TIME}), ("end", False, {**_STR, "pattern": _TIME}),
                            ("limit", False, _STR)],
    "metadata": [("metric", False, _STR), ("limit", False, {"type": "string", "pattern": r"^([+-]?[0-9]+)?$"}),
                 ("limit_per_metric", False, _STR)],
}
_ENVELOPE = {"type": "object", "required": ["status"], "properties": {
    "status": {"type": "string", "enum": ["success", "error"]}, "data": {},
    "errorType": {"type": "string"}, "error": {"type": "string"},
    "warnings": {"type": "array", "items": {"type": "string"}},
    "infos": {"type": "array", "items": {"type": "string"}}}}
_ERROR = {"description": "Prometheus' error envelope", "content": {JSON: {"schema": _ENVELOPE}}}
API_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus' success envelope (the upstream's, passed through)",
          "content": {JSON: {"schema": _ENVELOPE}}},
    400: _ERROR, 404: _ERROR, 422: _ERROR, 500: _ERROR, 503: _ERROR,
}


def document(router: APIRouter) -> None:
    """Describe each API route's parameters (query string for GET, form body for POST) and
    its answers in OpenAPI, so /docs shows them and schema-driven clients can call them."""
    for route in router.routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        params = _PARAMS.get(route.path_format.lstrip("/"), [])
        route.responses = {**API_RESPONSES, **route.responses}
        if "POST" in (route.methods or set()):
            props = {name: schema for name, _, schema in params}
            required = [name for name, req, _ in params if req]
            body: dict[str, Any] = {"type": "object", "properties": props}
            if required:
                body["required"] = required
            route.openapi_extra = {"requestBody": {"required": bool(required), "content": {FORM: {
                "schema": body, "encoding": {n: {"style": "form", "explode": True}
                                             for n, _, sc in params if sc is _MATCH}}}}}
        elif params:
            route.openapi_extra = {"parameters": [
                {"name": name, "in": "query", "required": req, "schema": schema,
                 **({"style": "form", "explode": True} if schema is _MATCH else {})}
                for name, req, schema in params]}
