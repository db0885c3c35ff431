"""HTTP metrics by route template, as a pure ASGI middleware.

Metric names and labels follow the GatewayZ backend contract (the default query
catalog reads them), so the gateway's own dashboards work on the gateway too:

- ``fastapi_requests_total{app_name,method,path,status_code}``
- ``fastapi_requests_duration_seconds{app_name,method,path}`` (histogram)
- ``fastapi_requests_in_progress{app_name,method,path}`` (gauge, ``livesum``)
- ``fastapi_exceptions_total{app_name,exception_type}``

``path`` is the route template (``/prometheus/metrics/{category}``), never the raw
path, so cardinality is bounded by the number of routes: requests no route
matches share the single value ``<unmatched>``, and methods outside the standard
set share ``OTHER``. ``/metrics`` and the health routes are not counted.

Pure ASGI rather than ``BaseHTTPMiddleware``: no extra task, no body buffering,
streaming responses pass through untouched.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from cachetools import LRUCache
from prometheus_client import Counter, Gauge, Histogram
from starlette.routing import BaseRoute, Host, Match, Mount, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.common import tracing
from app.common.paths import route_path
from app.monitoring.registry import multiprocess_values_active

UNMATCHED = "<unmatched>"
OTHER_METHOD = "OTHER"
DEFAULT_EXCLUDED_PATHS: frozenset[str] = frozenset({"/metrics", "/health", "/ready"})
_KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
_TEMPLATE_CACHE_SIZE = 2048

HTTP_REQUESTS = Counter(
    "fastapi_requests_total",
    "HTTP requests answered, by route template and status code.",
    ["app_name", "method", "path", "status_code"],
)
HTTP_DURATION = Histogram(
    "fastapi_requests_duration_seconds",
    "Time from request start to the end of the response, by route template.",
    ["app_name", "method", "path"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
HTTP_IN_PROGRESS = Gauge(
    "fastapi_requests_in_progress",
    "HTTP requests being handled now, by route template (summed over live workers).",
    ["app_name", "method", "path"],
    multiprocess_mode="livesum",
)
HTTP_EXCEPTIONS = Counter(
    "fastapi_exceptions_total",
    "Exceptions that escaped the application (answered 500), by exception class name.",
    ["app_name", "exception_type"],
)


def _template_of(route: object) -> str | None:
    # path_format drops convertors ("/items/{item_id}" for "/items/{item_id:int}"),
    # the same form FastAPI reports as the OpenTelemetry http.route.
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    return template if isinstance(template, str) else None


def _included_contexts(route: BaseRoute) -> list[Any] | None:
    """Routes of a router included by FastAPI without copying (newer FastAPI).

    Newer FastAPI keeps ``include_router`` routers as one route object that
    matches for all of them; its ``effective_route_contexts()`` lists each route
    with the full (prefixed) template and its own ``matches``. Older FastAPI
    copies the routes into the app, so this returns None there.
    """
    contexts = getattr(route, "effective_route_contexts", None)
    if contexts is None or not callable(contexts):
        return None
    return list(contexts())


def resolve_template(routes: Sequence[BaseRoute], scope: Scope) -> str | None:
    """The template of the route Starlette would dispatch ``scope`` to, or None.

    Mirrors ``Router.app``: the first FULL match wins, else the first PARTIAL one
    (a method mismatch, answered 405). Mounts, hosts and FastAPI included routers
    are descended into and their prefix joined to the inner template.
    """
    return _resolve(routes, scope)[1]


def _resolve(routes: Iterable[Any], scope: Scope) -> tuple[Match, str | None]:
    partial: str | None = None
    for route in routes:
        match, template = _match_one(route, scope)
        if match is Match.FULL:
            return match, template
        if match is Match.PARTIAL and partial is None:
            partial = template
    return (Match.NONE, None) if partial is None else (Match.PARTIAL, partial)


def _match_one(route: Any, scope: Scope) -> tuple[Match, str | None]:
    contexts = _included_contexts(route)
    if contexts is not None:
        if route.matches(scope)[0] is Match.NONE:
            return Match.NONE, None
        return _resolve(contexts, scope)
    inner_route = getattr(route, "starlette_route", None)
    if isinstance(inner_route, BaseRoute):  # one route of an included router, not an APIRoute
        return _match_one(inner_route, scope)
    match, child_scope = route.matches(scope)
    if match is Match.NONE:
        return match, None
    if isinstance(route, Mount | Host):
        inner_routes = route.routes
        if not inner_routes:  # a mounted ASGI app (static files, a sub-app without routes)
            return match, _template_of(route) if isinstance(route, Mount) else None
        inner_match, inner = _resolve(inner_routes, {**scope, **child_scope})
        if inner is None:
            return match, None
        prefix = route.path if isinstance(route, Mount) else ""
        return (match if inner_match is Match.FULL else inner_match), prefix + inner
    return match, _template_of(route)


def _has_host_routes(routes: Iterable[BaseRoute]) -> bool:
    return any(isinstance(r, Host) for r in routes)


class RouteTemplates:
    """Route templates by (method, root_path, path), for metrics labels and span names."""

    def __init__(self, router: Router) -> None:
        self.router = router
        # (method, root_path, route path) -> template; bounded, so raw paths
        # cannot grow it without limit. Cleared when the route list changes.
        self._cache: LRUCache[tuple[str, str, str], str] = LRUCache(_TEMPLATE_CACHE_SIZE)
        self._cache_routes = -1
        self._cacheable = True

    def of(self, scope: Scope, path: str, method: str) -> str:
        """The route template of `path` (the router-relative path of `scope`), cached."""
        routes = self.router.routes
        if len(routes) != self._cache_routes:
            self._cache.clear()
            self._cache_routes = len(routes)
            # Host routes match on the Host header, which the key leaves out.
            self._cacheable = not _has_host_routes(routes)
        key = (method, scope.get("root_path", ""), path)
        if self._cacheable:
            cached = self._cache.get(key)
            if cached is not None:
                return cached
        # A shallow copy: some routers note state in the scope while matching.
        template = resolve_template(routes, dict(scope)) or UNMATCHED
        if self._cacheable:
            self._cache[key] = template
        return template

    def span_details(self, scope: Scope) -> tuple[str, dict[str, Any]]:
        """The server span's name (``GET /prometheus/metrics/{category}``) and ``http.route``."""
        method: str = scope.get("method", "")
        if scope["type"] != "http":
            return route_path(scope), {}
        template = self.of(scope, route_path(scope), method)
        name = f"{method if method in _KNOWN_METHODS else 'HTTP'} {template}"
        return name, {"http.route": template}


class PrometheusMiddleware:
    """Counts and times every HTTP request by route template."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        router: Router,
        app_name: str,
        excluded_paths: Iterable[str] = DEFAULT_EXCLUDED_PATHS,
    ) -> None:
        self.app = app
        self.templates = RouteTemplates(router)
        self.app_name = app_name
        self.excluded_paths = frozenset(excluded_paths)
        # Metric children per label set: `.labels()` costs a lock and validation
        # on every call. Bounded: templates come from the route table (or the one
        # UNMATCHED value), methods and status codes from small fixed sets.
        # (Labels are never removed from these metrics, so children stay valid.)
        self._timers: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._counters: dict[tuple[str, str, str], Any] = {}
        # Exemplars (the trace of a request, on its latency bucket) need in-process values:
        # prometheus_client's multiprocess files have no place for them and drop them.
        self._exemplars = tracing.enabled() and not multiprocess_values_active()

    def template_for(self, scope: Scope, path: str, method: str) -> str:
        return self.templates.of(scope, path, method)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        if path in self.excluded_paths:
            await self.app(scope, receive, send)
            return

        raw_method: str = scope["method"]
        method = raw_method if raw_method in _KNOWN_METHODS else OTHER_METHOD
        template = self.template_for(scope, path, raw_method)
        app_name = self.app_name
        status_code = 500  # if the app fails before starting a response

        async def send_wrapper(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        timers = self._timers.get((method, template))
        if timers is None:
            timers = (
                HTTP_IN_PROGRESS.labels(app_name, method, template),
                HTTP_DURATION.labels(app_name, method, template),
            )
            self._timers[(method, template)] = timers
        in_progress, duration = timers
        in_progress.inc()
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            HTTP_EXCEPTIONS.labels(app_name, type(exc).__name__).inc()
            raise
        finally:
            elapsed = time.perf_counter() - start
            in_progress.dec()
            duration.observe(elapsed, tracing.exemplar() if self._exemplars else None)
            key = (method, template, str(status_code))
            counter = self._counters.get(key)
            if counter is None:
                counter = HTTP_REQUESTS.labels(app_name, *key)
                self._counters[key] = counter
            counter.inc()
