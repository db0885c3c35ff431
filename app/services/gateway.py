"""The gateway's service object: catalog + client + cache + aggregator, one per app.

Routers ask it for results by category; it owns the lifetimes of the pooled
HTTP client and of the background fetches.
"""

from __future__ import annotations

import httpx

from app.catalog.loader import load_catalog
from app.catalog.model import Catalog
from app.config import Settings
from app.services.aggregator import Aggregator, Filters
from app.services.cache import QueryCache
from app.services.prometheus import PrometheusClient
from app.services.result import QueryResult


class GatewayService:
    def __init__(self, settings: Settings, catalog: Catalog | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        # Validated now, so a broken catalog stops the start with its message.
        self.catalog = catalog or load_catalog(settings.catalog_path)
        self._transport = transport
        self._client: PrometheusClient | None = None
        self._aggregator: Aggregator | None = None
        self.cache = QueryCache(settings.cache_max_entries, settings.stale_max_age_seconds)

    async def start(self) -> None:
        self._client = PrometheusClient(self.settings, transport=self._transport)
        self._aggregator = Aggregator(self.settings, self._client, self.cache)

    async def aclose(self) -> None:
        if self._aggregator is not None:
            await self._aggregator.aclose()
        if self._client is not None:
            await self._client.aclose()
        self._client = self._aggregator = None

    @property
    def client(self) -> PrometheusClient:
        if self._client is None:
            raise RuntimeError("gateway not started: include its router in an app with lifespan")
        return self._client

    @property
    def aggregator(self) -> Aggregator:
        if self._aggregator is None:
            raise RuntimeError("gateway not started: include its router in an app with lifespan")
        return self._aggregator

    async def summary(self) -> dict[str, QueryResult]:
        queries = self.catalog.summary_queries()
        results = await self.aggregator.run(queries, "summary")
        return {r.query.id: r for r in results}

    async def category(self, name: str, filters: Filters | None = None) -> list[QueryResult]:
        return await self.aggregator.run(self.catalog.category_queries(name), name, filters)

    async def everything(self) -> list[QueryResult]:
        return await self.aggregator.run(self.catalog.all_queries(), "all")
