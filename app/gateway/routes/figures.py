"""Routes under /prometheus/metrics: parse and validate input, pick a renderer.

No PromQL here: the catalog holds the queries and the services run them.
`create_gateway_router()` is the documented way to serve these routes from
another FastAPI app (it brings its own lifespan).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Literal

import httpx
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from starlette.requests import HTTPConnection

from app.common.exposition import render_families
from app.common.http_errors import invalid_query
from app.common.readiness import readiness_of
from app.common.tenancy import Tenant, tenant_of
from app.gateway.catalog.model import CATEGORIES, Catalog
from app.gateway.engines.figures import Shed
from app.gateway.promql.syntax import PLAIN_LABEL_VALUE
from app.gateway.render import docs as docs_render
from app.gateway.render import json as json_render
from app.gateway.render import text as text_render
from app.gateway.render.json import JSON_TYPE
from app.gateway.result import QueryResult
from app.gateway.routes.fastpath import kind_of, memo_key, missed
from app.gateway.routes.promapi import create_promapi_router
from app.gateway.service import GatewayService, Rendered
from app.gateway.settings import GatewaySettings

FILTERABLE = ("providers", "models")


class MarkdownResponse(Response):
    media_type = "text/markdown"  # starlette adds the charset


_TEXT = {"schema": {"type": "string"}}
_OBJECT = {"schema": {"type": "object"}}
_DETAIL = {"application/json": {"schema": {"type": "object", "properties": {"detail": {}}}}}
EXPOSITION_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"description": "Prometheus text (0.0.4), OpenMetrics when the Accept header asks, or JSON "
                         "with ?format=json / Accept: application/json",
          "content": {"text/plain": _TEXT, "application/openmetrics-text": _TEXT, JSON_TYPE: _OBJECT}},
    404: {"description": "Unknown category", "content": _DETAIL},
}
SHED_RESPONSES: dict[int | str, dict[str, object]] = {
    429: {"description": "Filtered variants (provider= / model=) not in cache while their upstream fetch "
                         "rate (FILTERED_FETCHES_PER_SECOND) is spent; retry after Retry-After seconds",
          "headers": {"Retry-After": {"schema": {"type": "integer"}}}, "content": _DETAIL},
}

Fmt = Annotated[Literal["json", "text"] | None,
                Query(description="`json` for JSON, `text` for Prometheus exposition")]
FilterValues = Annotated[list[str] | None, Query(description="exact label value; repeatable")]


async def _caller(conn: HTTPConnection) -> Tenant:
    """The caller's tenant (set by the security middleware from its token; unconfined
    without one). Async on purpose: FastAPI runs a plain-def dependency in its thread pool,
    a thread round trip on every cold figure request for a dictionary lookup."""
    return tenant_of(conn)


Caller = Annotated[Tenant, Depends(_caller)]


def _filters(settings: GatewaySettings, category: str, **given: list[str] | None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for label, values in given.items():
        if not values:
            continue
        if category not in FILTERABLE:
            raise invalid_query(label, f"{label}= filters apply to {' and '.join(FILTERABLE)} only")
        if len(values) > settings.filter_max_values:
            raise invalid_query(label, f"at most {settings.filter_max_values} {label} values")
        for v in values:
            if len(v) > settings.filter_max_value_length:
                raise invalid_query(label, f"{label} value longer than {settings.filter_max_value_length} characters")
            if not PLAIN_LABEL_VALUE.match(v):
                raise invalid_query(label, f"{label}={v!r} is not a plain label value "
                                      "(letters, digits and _ . : / @ + -, starting with a letter or digit)")
        out[label] = list(dict.fromkeys(values))
    return out


def create_gateway_router(settings: GatewaySettings | None = None, catalog: Catalog | None = None,
                          transport: httpx.AsyncBaseTransport | None = None,
                          prefix: str = "/prometheus/metrics",
                          api_prefixes: tuple[str, ...] = ("/api/v1", "/prometheus/api/v1")) -> APIRouter:
    """The /prometheus/metrics routes and the Prometheus API, with their own lifespan.

    One router, one GatewayService (one upstream client, one engine): the figure
    routes under `prefix`, the Prometheus HTTP API (app/gateway/routes/promapi.py) under
    each of `api_prefixes` (an empty tuple serves no API). Without a lifespan
    (``TestClient(app)`` without ``with``) the service starts on first use.
    """
    settings = settings or GatewaySettings()
    service = GatewayService(settings, catalog, transport)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        app.state.gateway = service
        readiness_of(app.state).register("prometheus", service.ready)
        try:
            yield
        finally:
            readiness_of(app.state).unregister("prometheus")
            await service.aclose()

    outer = APIRouter(lifespan=lifespan)
    router = APIRouter(prefix=prefix, tags=["gateway"])
    cat = service.catalog

    def answer(r: Rendered) -> Response:
        return Response(r.body, media_type=r.media_type)

    def recall(request: Request, key: tuple[str, ...], tenant: Tenant) -> Response | None:
        """The memoized body, unless the fast path has just missed it (one lookup per miss)."""
        if missed(request.scope, tenant.id, key):
            return None
        hit = service.recall(key, tenant)
        return answer(hit) if hit is not None else None

    async def respond(results: list[QueryResult], name: str, kind: str, request: Request,
                      filters: dict[str, list[str]], key: tuple[str, ...], tenant: Tenant) -> Response:
        up = service.client.up
        accept = request.headers.get("accept")

        def as_json() -> tuple[bytes, str]:
            doc = json_render.with_scope(json_render.category(cat, name, results, filters, up), tenant)
            return json_render.dumps(doc), JSON_TYPE

        def as_text() -> tuple[bytes, str]:
            return render_families(text_render.families(cat.prefix, results, up), accept)

        rendered = await service.render(results, as_json if kind == "json" else as_text)
        return answer(service.remember(key, name, results, rendered, tenant))

    @router.get("/summary", summary="Summary figures for widgets (JSON)",
                responses={200: {"description": "The summary contract", "content": {JSON_TYPE: _OBJECT}}})
    async def summary(request: Request, tenant: Caller) -> Response:
        key = memo_key("summary", None)
        if (hit := recall(request, key, tenant)) is not None:
            return hit
        return answer(await service.summary_answer(tenant))

    @router.get("/docs", summary="Markdown documentation of every figure, from the catalog",
                response_class=MarkdownResponse)
    async def docs(tenant: Caller) -> MarkdownResponse:
        return MarkdownResponse(docs_render.markdown(cat, prefix, tenant.matchers))

    @router.get("/all", summary="Every category in one exposition", responses=EXPOSITION_RESPONSES)
    async def everything(request: Request, tenant: Caller, format: Fmt = None) -> Response:
        kind = kind_of(request.headers.get("accept"), format)
        key = memo_key("all", kind)
        if (hit := recall(request, key, tenant)) is not None:
            return hit
        return await respond(await service.everything(tenant), "all", kind, request, {}, key, tenant)

    @router.get("/{category}", summary="One category as Prometheus text or JSON",
                responses={**EXPOSITION_RESPONSES, **SHED_RESPONSES})
    async def category(request: Request, category: str, tenant: Caller, format: Fmt = None,
                       provider: FilterValues = None, model: FilterValues = None) -> Response:
        if category not in CATEGORIES:
            raise HTTPException(404, f"unknown category {category!r}; one of: "
                                     f"summary, {', '.join(CATEGORIES)}, all, docs")
        filters = _filters(settings, category, provider=provider, model=model)
        kind = kind_of(request.headers.get("accept"), format)
        key = memo_key(category, kind, filters)
        if (hit := recall(request, key, tenant)) is not None:
            return hit
        try:
            results = await service.category(category, filters, tenant)
        except Shed as shed:
            raise HTTPException(429, f"too many distinct filter values: {shed}",
                                headers={"Retry-After": str(max(1, math.ceil(shed.retry_after)))}) from None
        return await respond(results, category, kind, request, filters, key, tenant)

    outer.include_router(router)
    if api_prefixes:
        api = create_promapi_router(service)
        for api_prefix in api_prefixes:
            outer.include_router(api, prefix=api_prefix)
    return outer
