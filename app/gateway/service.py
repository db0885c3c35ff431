"""The figure service: catalog + upstream client + cache + engine, one per router.

Routers ask it for rendered answers by category; it owns the lifetimes of the
pooled HTTP client and the background fetches, and the memo of rendered bodies.
It starts in the router's lifespan, or lazily on first use where no lifespan ran
(``TestClient(app)`` without ``with``; each such request may run in an event loop
of its own, so a client made in another loop is replaced, never reused).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from app.common import tracing
from app.common.tenancy import UNCONFINED, Tenant
from app.gateway import metrics as gm
from app.gateway.caching.figures import QueryCache
from app.gateway.caching.memo import ResponseMemo
from app.gateway.caching.shared import SharedTier
from app.gateway.caching.shared_ranges import SharedExtentStore, SharedFlights
from app.gateway.caching.stores import MemoryExtentStore, TieredExtentStore
from app.gateway.catalog.loader import load_catalog
from app.gateway.catalog.model import Catalog
from app.gateway.engines.figures import Engine, Filters
from app.gateway.engines.ranges import RangeCache
from app.gateway.engines.readiness import ReadinessProbe
from app.gateway.engines.scheduler import Scheduler
from app.gateway.render import json as json_render
from app.gateway.result import QueryResult, State
from app.gateway.settings import GatewaySettings
from app.gateway.upstream.client import PrometheusClient

CATALOG_SCOPES = 64  # tenants whose unfiltered figures the catalog class holds at once
# The memo key of /summary's body (under the tenant's id): it takes no filters and one kind.
SUMMARY_MEMO_KEY = ("summary",)


@dataclass(frozen=True, slots=True)
class Rendered:
    body: bytes
    media_type: str


class GatewayService:
    def __init__(self, settings: GatewaySettings, catalog: Catalog | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        # Validated now, so a broken catalog stops the start with its message.
        self.catalog = catalog or load_catalog(settings.catalog_path)
        self._transport = transport
        self._client: PrometheusClient | None = None
        self._engine: Engine | None = None
        self._readiness: ReadinessProbe | None = None
        self._ranges: RangeCache | None = None
        self._shared: SharedTier | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # The catalog class holds one key per catalog query and access scope (tenants are
        # configured, not chosen by callers): that is its bound.
        self.cache = QueryCache(settings.cache_max_entries, settings.stale_max_age_seconds,
                                max_bytes=settings.cache_max_bytes,
                                catalog_entries=max(1, len(self.catalog.queries)) * CATALOG_SCOPES)
        self.memo = ResponseMemo(settings.response_memo_seconds, max_bytes=settings.response_memo_max_bytes)
        # Extents outlive a restart of the client (a lazy start in another event loop).
        self.range_store = MemoryExtentStore(settings.range_cache_max_bytes)
        # Who may spend the query API's share of the upstream and of the CPU next.
        self.scheduler = Scheduler(settings)

    async def start(self) -> None:
        if self._client is not None and self._loop is asyncio.get_running_loop():
            return
        await self.aclose()
        self._loop = asyncio.get_running_loop()
        self.scheduler.start()
        self._client = PrometheusClient(self.settings, transport=self._transport)
        # Redis clients belong to one event loop too: made here, with the engine.
        self._shared = SharedTier.from_settings(self.settings, self.catalog)
        self._engine = Engine(self.settings, self._client, self.cache, self._shared)
        self._readiness = ReadinessProbe(self.settings, self._client, self._engine.background)
        if self._shared is None:
            self._ranges = RangeCache(self.settings, self._client, self.range_store)
        else:  # local -> shared -> upstream, one flight per request across the fleet
            store = TieredExtentStore(self.range_store, SharedExtentStore(self._shared, "range"))
            self._ranges = RangeCache(self.settings, self._client, store, SharedFlights(self._shared, "range"))

    async def aclose(self) -> None:
        engine, ranges, client, shared, loop = self._engine, self._ranges, self._client, self._shared, self._loop
        self._client = self._engine = self._ranges = self._shared = self._readiness = None
        self._loop = None
        if loop is not None and loop is not asyncio.get_running_loop():
            return  # made in a loop that is gone: nothing of it can be awaited here
        if engine is not None:
            await engine.aclose()
        if ranges is not None:
            await ranges.aclose()
        if client is not None:
            await client.aclose()
        if shared is not None:
            await shared.aclose()

    async def drain(self) -> None:
        """Wait until the work that outlives requests is done (fetches others wait for, the
        fleet's publishes): the seam tests use instead of sleeping."""
        for part in (self._engine, self._ranges):
            if part is not None:
                await part.background.drain()

    async def ensure_started(self) -> Engine:
        """The engine, starting (or restarting in this event loop) when needed."""
        if self._engine is None or self._loop is not asyncio.get_running_loop():
            await self.start()
        assert self._engine is not None
        return self._engine

    @property
    def client(self) -> PrometheusClient:
        if self._client is None:
            raise RuntimeError("gateway not started")
        return self._client

    @property
    def ranges(self) -> RangeCache:
        """The exact range cache of the query API (app/gateway/engines/ranges.py)."""
        if self._ranges is None:
            raise RuntimeError("gateway not started")
        return self._ranges

    @property
    def started(self) -> bool:
        return self._client is not None

    async def ready(self) -> tuple[bool, str]:
        """The readiness check /ready runs: one shared, short-lived probe."""
        await self.ensure_started()
        assert self._readiness is not None
        return await self._readiness.ready()

    # -- figures ------------------------------------------------------------------------

    # `tenant`: the caller's scope (app.common.tenancy); the engine enforces it on
    # every query and keys every cached figure by it.

    async def summary(self, tenant: Tenant = UNCONFINED) -> dict[str, QueryResult]:
        engine = await self.ensure_started()
        results = await engine.run(self.catalog.summary_queries(), "summary", tenant=tenant)
        return {r.query.id: r for r in results}

    async def category(self, name: str, filters: Filters | None = None,
                       tenant: Tenant = UNCONFINED) -> list[QueryResult]:
        engine = await self.ensure_started()
        return await engine.run(self.catalog.category_queries(name), name, filters, tenant=tenant)

    async def everything(self, tenant: Tenant = UNCONFINED) -> list[QueryResult]:
        engine = await self.ensure_started()
        return await engine.run(self.catalog.all_queries(), "all", tenant=tenant)

    # -- rendered bodies ----------------------------------------------------------------

    # Memo keys lead with the caller's tenant id: one tenant's rendered body is never
    # another's.

    async def summary_answer(self, tenant: Tenant = UNCONFINED) -> Rendered:
        """/summary's body: the figures, rendered and remembered. The one way it is
        answered, by the route and by the fast path alike (routes/fastpath.py answers a
        cold /summary without FastAPI's routing, 0.1 ms of a few-millisecond request)."""
        results = await self.summary(tenant)
        with tracing.span("render", {"gateway.figures": len(results)}):
            doc = json_render.with_scope(json_render.summary(self.catalog, results, self.client.up), tenant)
            rendered = Rendered(json_render.dumps(doc), json_render.JSON_TYPE)
        return self.remember(SUMMARY_MEMO_KEY, "summary", list(results.values()), rendered, tenant)

    def recall(self, key: tuple[str, ...], tenant: Tenant = UNCONFINED) -> Rendered | None:
        hit = self.memo.get((tenant.id, *key))
        if hit is None:
            return None
        tracing.count_lookup("memo")
        return Rendered(*hit)

    async def render(self, results: Sequence[QueryResult], make: Callable[[], tuple[bytes, str]]) -> Rendered:
        """Run a renderer: on the event loop for small answers, in a worker thread for big ones
        (rendering 50k series takes half a second, which /health and every other request
        would otherwise wait for)."""
        series = sum(len(r.samples) for r in results)
        with tracing.span("render", {"gateway.figures": len(results), "gateway.series": series}):
            if series >= self.settings.offload_min_series:
                gm.offloaded("render")
                return Rendered(*await asyncio.to_thread(make))
            return Rendered(*make())

    def remember(self, key: tuple[str, ...], ttl_category: str, results: Sequence[QueryResult],
                 rendered: Rendered, tenant: Tenant = UNCONFINED) -> Rendered:
        """Keep a healthy body for reuse: never one with stale, failed or partial (warned) figures.

        Small bodies for RESPONSE_MEMO_SECONDS at most, so the ages and timestamp a
        reader sees are off by less than that; big ones (RESPONSE_MEMO_LARGE_BYTES and
        more) until their figures' TTL expiry, since rendering them again would cost
        more than the data changed (their ages and timestamp are those of the render).
        A body cut by the series cap is healthy in this sense: it says so, and stays
        cut until the TTL ends.
        """
        s = self.settings
        if s.response_memo_seconds <= 0 or not results:
            return rendered
        if not all(r.state in (State.FRESH, State.CACHED) and not r.warnings for r in results):
            return rendered
        now = time.monotonic()
        fresh_until = min(r.expires_at or now for r in results)
        until = min(now + s.response_memo_seconds, now + s.ttl_for(ttl_category), fresh_until)
        if len(rendered.body) >= s.response_memo_large_bytes:
            until = fresh_until
        self.memo.put((tenant.id, *key), rendered.body, rendered.media_type, until)
        return rendered
