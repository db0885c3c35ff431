"""The figure engine: catalog queries into results, as few upstream requests as possible.

Cached figures are answered from memory; the missing ones are joined into one
PromQL request (`label_replace(q1, "gateway_query", "0", "", "") or ...`) so a
cold summary costs Prometheus one evaluation, not 23 round trips. Concurrent
requests for a figure already being fetched wait for that fetch. Everything is
bounded by the request's deadline; a figure that cannot be had fresh is served
from its last good value, marked stale.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Generic, TypeVar

from app.common.tenancy import UNCONFINED, Tenant
from app.gateway import metrics as gm
from app.gateway.cache import QueryCache
from app.gateway.catalog.model import CatalogQuery
from app.gateway.promql import apply_filters, enforce
from app.gateway.result import Fetched, Lookup, QueryResult, Sample, UpstreamFailure
from app.gateway.settings import GatewaySettings
from app.gateway.upstream import PrometheusClient, QueryAnswer, UpstreamError

log = logging.getLogger("gateway.aggregator")

BATCH_LABEL = "gateway_query"
Filters = Mapping[str, Sequence[str]]
Outcome = Fetched | UpstreamFailure
T = TypeVar("T")


class SingleFlight(Generic[T]):
    """One fetch in flight per key: later askers wait on the first one's future
    ("collapsed forwarding") instead of each asking upstream. Generic in what a
    fetch settles with: figures (the engine) and range extents (app/gateway/ranges.py)
    share the one mechanism."""

    def __init__(self) -> None:
        self._inflight: dict[str, asyncio.Future[T]] = {}

    def join(self, key: str) -> tuple[asyncio.Future[T], bool]:
        """The key's future and whether the caller leads (must fetch and settle it)."""
        fut = self._inflight.get(key)
        if fut is not None:
            return fut, False
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        return fut, True

    def settle(self, key: str, fut: asyncio.Future[T], outcome: T) -> None:
        """Settle `fut`; unregister it only if it is still the key's fetch in flight
        (a later request may have begun a new one after this one settled)."""
        if self._inflight.get(key) is fut:
            del self._inflight[key]
        if not fut.done():
            fut.set_result(outcome)


@lru_cache(maxsize=4096)
def _filtered(expr: str, filters: tuple[tuple[str, tuple[str, ...]], ...]) -> str:
    return apply_filters(expr, dict(filters)) if filters else expr


@lru_cache(maxsize=4096)
def _scoped(expr: str, filters: tuple[tuple[str, tuple[str, ...]], ...],
            matchers: tuple[tuple[str, str], ...]) -> str:
    """The final PromQL: the caller's filters, then the tenant's matchers (which only narrow)."""
    return enforce(_filtered(expr, filters), matchers)


def _project(q: CatalogQuery, answer_series: Sequence[tuple[dict[str, str], float]]) -> tuple[Sample, ...]:
    """Keep only the query's declared labels; series that then coincide are summed.

    This is what keeps job/instance (or any label the catalog did not ask for) out
    of the output, without ever producing duplicate series.
    """
    merged: dict[tuple[tuple[str, str], ...], float] = {}
    for labels, value in answer_series:
        key = tuple((name, labels.get(name, "")) for name in q.labels)
        merged[key] = merged[key] + value if key in merged else value
    return tuple(Sample(k, v) for k, v in merged.items())


@dataclass(slots=True)
class _Job:
    query: CatalogQuery
    key: str  # cache key: the kept labels and the final PromQL
    expr: str  # the final PromQL, filters applied
    future: asyncio.Future[Outcome]


class Engine:
    def __init__(self, settings: GatewaySettings, client: PrometheusClient, cache: QueryCache) -> None:
        self.settings = settings
        self.client = client
        self.cache = cache
        self.flights: SingleFlight[Outcome] = SingleFlight()
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, queries: Sequence[CatalogQuery], category: str,
                  filters: Filters | None = None, tenant: Tenant = UNCONFINED) -> list[QueryResult]:
        """Results for `queries`, in order, within the request deadline.

        `tenant`: the caller's scope; its matchers are set on every selector and its
        id leads every cache and single-flight key (its upstream headers may change
        the answer even where the PromQL is the same, as with a Mimir tenant).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_deadline_seconds
        frozen = tuple(sorted((k, tuple(v)) for k, v in (filters or {}).items()))
        exprs = [_scoped(q.expr, frozen, tenant.matchers) for q in queries]
        # The projection depends on the kept labels, so they are part of the key.
        keys = [f"{tenant.id}|{','.join(q.labels)}|{e}" for q, e in zip(queries, exprs, strict=True)]

        results: dict[int, QueryResult] = {}
        waiting: dict[int, asyncio.Future[Outcome]] = {}
        to_fetch: list[_Job] = []
        hits = 0
        coalesced: set[int] = set()
        with self.cache.frozen_time():
            for i, (q, key) in enumerate(zip(queries, keys, strict=True)):
                fetched = self.cache.fresh(key)
                if fetched is not None:
                    hits += 1
                    results[i] = self._from_fetched(q, fetched, Lookup.HIT)
                    continue
                fut, leader = self.flights.join(key)
                if leader:
                    to_fetch.append(_Job(q, key, exprs[i], fut))
                else:
                    coalesced.add(i)
                waiting[i] = fut
        if hits:
            gm.cache_outcome(category, Lookup.HIT, hits)
        if coalesced:
            gm.cache_outcome(category, Lookup.COALESCED, len(coalesced))
        if to_fetch:
            gm.cache_outcome(category, Lookup.MISS, len(to_fetch))
            # The fetch is shared with other requests: it must outlive this one.
            task = loop.create_task(self._fetch(to_fetch, category, deadline, tenant.headers()))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        if waiting:
            remaining = max(0.0, deadline - loop.time())
            await asyncio.wait(waiting.values(), timeout=remaining)
        stale = 0
        for i, fut in waiting.items():
            q = queries[i]
            if fut.done():
                outcome = fut.result()
            else:
                outcome = UpstreamFailure("timeout", "request deadline reached before Prometheus answered")
            if isinstance(outcome, Fetched):
                results[i] = self._from_fetched(q, outcome, Lookup.COALESCED if i in coalesced else Lookup.MISS)
            else:
                results[i] = self._failed(q, keys[i], outcome)
                stale += results[i].lookup is Lookup.STALE
        if stale:
            gm.cache_outcome(category, Lookup.STALE, stale)
        return [results[i] for i in range(len(queries))]

    def _from_fetched(self, q: CatalogQuery, fetched: Fetched, lookup: Lookup) -> QueryResult:
        age = max(0.0, time.time() - fetched.fetched_at)
        return QueryResult(q, lookup, fetched.samples, fetched.fetched_at, age,
                           warnings=fetched.warnings)

    def _failed(self, q: CatalogQuery, key: str, failure: UpstreamFailure) -> QueryResult:
        good = self.cache.last_good(key)
        if good is None:
            return QueryResult(q, Lookup.FAILED, error=failure)
        age = max(0.0, time.time() - good.fetched_at)
        return QueryResult(q, Lookup.STALE, good.samples, good.fetched_at, age, error=failure)

    async def _fetch(self, jobs: list[_Job], category: str, deadline: float,
                     headers: Mapping[str, str] | None = None) -> None:
        """Fetch `jobs` in as few requests as possible and settle their futures."""
        try:
            batchable = [j for j in jobs if j.query.batchable]
            solo = [j for j in jobs if not j.query.batchable]
            size = self.settings.batch_max_queries
            groups = [batchable[i:i + size] for i in range(0, len(batchable), size)]
            groups += [[j] for j in solo]
            await asyncio.gather(*(self._fetch_group(g, category, deadline, headers) for g in groups))
        finally:
            for j in jobs:  # never leave a waiter hanging, whatever happened above
                self.flights.settle(j.key, j.future, UpstreamFailure("internal", "fetch ended without an answer"))

    async def _fetch_group(self, jobs: list[_Job], category: str, deadline: float,
                           headers: Mapping[str, str] | None = None) -> None:
        loop = asyncio.get_running_loop()
        if len(jobs) == 1:
            expr = jobs[0].expr
        else:
            expr = " or ".join(
                f'label_replace({j.expr}, "{BATCH_LABEL}", "{n}", "", "")' for n, j in enumerate(jobs)
            )
        try:
            answer = await self.client.query(expr, timeout=deadline - loop.time(), category=category,
                                             headers=headers)
        except UpstreamError as exc:
            if len(jobs) > 1 and exc.error_type in ("bad_data", "execution"):
                # One query is at fault: evaluate each alone so the others still answer.
                await asyncio.gather(*(self._fetch_group([j], category, deadline, headers) for j in jobs))
                return
            failure = UpstreamFailure(exc.error_type, exc.message)
            for j in jobs:
                self.flights.settle(j.key, j.future, failure)
            return
        self._settle(jobs, answer, category)

    def _settle(self, jobs: list[_Job], answer: QueryAnswer, category: str) -> None:
        now = time.time()
        per_job: list[list[tuple[dict[str, str], float]]] = [[] for _ in jobs]
        for s in answer.series:
            if len(jobs) == 1:
                per_job[0].append((s.labels, s.value))
                continue
            idx = s.labels.pop(BATCH_LABEL, None)
            if idx is not None and idx.isdigit() and int(idx) < len(jobs):
                per_job[int(idx)].append((s.labels, s.value))
        expires_at = self.cache.expiry(self.settings.ttl_for(category))
        for j, series in zip(jobs, per_job, strict=True):
            fetched = Fetched(_project(j.query, series), now, answer.warnings)
            self.cache.store(j.key, fetched, expires_at)
            self.flights.settle(j.key, j.future, fetched)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
