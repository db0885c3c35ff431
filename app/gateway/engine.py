"""The figure engine: catalog queries into results, as few upstream requests as possible.

Cached figures are answered from memory; the missing ones are joined into one
PromQL request (`label_replace(q1, "gateway_query", "0", "", "") or ...`) so a
cold summary costs Prometheus one evaluation, not 23 round trips. Concurrent
requests for a figure already being fetched wait for that fetch. Everything is
bounded by the request's deadline; a figure that cannot be had fresh is served
from its last good value, marked stale.

With a shared tier (app/gateway/shared.py) a figure is looked up local tier ->
shared tier -> fleet-wide single flight -> upstream: a process's local misses
go to Redis in one round trip, which answers them, hands this process the fetch
(a lock), or names the process already fetching, whose outcome is then awaited.
Whatever the shared tier does, the request keeps its deadline: when it fails,
the engine works as a lone process does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from app.gateway import metrics as gm
from app.gateway.cache import QueryCache
from app.gateway.catalog.model import CatalogQuery
from app.gateway.promql import apply_filters
from app.gateway.result import Fetched, Lookup, QueryResult, Sample, UpstreamFailure
from app.gateway.settings import GatewaySettings
from app.gateway.shared import ALONE, LEAD, SharedTier, grid_expiry
from app.gateway.upstream import PrometheusClient, QueryAnswer, UpstreamError

log = logging.getLogger("gateway.aggregator")

BATCH_LABEL = "gateway_query"
Filters = Mapping[str, Sequence[str]]
Outcome = Fetched | UpstreamFailure
Settled = tuple[Outcome, Lookup]  # and how the leader had it: miss, hit (shared tier), coalesced


class SingleFlight:
    """One fetch in flight per key: later askers wait on the first one's future
    ("collapsed forwarding") instead of each asking upstream."""

    def __init__(self) -> None:
        self._inflight: dict[str, asyncio.Future[Settled]] = {}

    def join(self, key: str) -> tuple[asyncio.Future[Settled], bool]:
        """The key's future and whether the caller leads (must fetch and settle it)."""
        fut = self._inflight.get(key)
        if fut is not None:
            return fut, False
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        return fut, True

    def settle(self, key: str, fut: asyncio.Future[Settled], outcome: Outcome,
               lookup: Lookup = Lookup.MISS) -> None:
        """Settle `fut`; unregister it only if it is still the key's fetch in flight
        (a later request may have begun a new one after this one settled)."""
        if self._inflight.get(key) is fut:
            del self._inflight[key]
        if not fut.done():
            fut.set_result((outcome, lookup))


@lru_cache(maxsize=4096)
def _filtered(expr: str, filters: tuple[tuple[str, tuple[str, ...]], ...]) -> str:
    return apply_filters(expr, dict(filters)) if filters else expr


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
    future: asyncio.Future[Settled]


def _local_expiry(wall: float) -> float:
    """A wall-clock expiry as the local tier's monotonic one."""
    return time.monotonic() + (wall - time.time())


class Engine:
    def __init__(self, settings: GatewaySettings, client: PrometheusClient, cache: QueryCache,
                 shared: SharedTier | None = None) -> None:
        self.settings = settings
        self.client = client
        self.cache = cache
        self.shared = shared
        self.flights = SingleFlight()
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, queries: Sequence[CatalogQuery], category: str,
                  filters: Filters | None = None) -> list[QueryResult]:
        """Results for `queries`, in order, within the request deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_deadline_seconds
        frozen = tuple(sorted((k, tuple(v)) for k, v in (filters or {}).items()))
        exprs = [_filtered(q.expr, frozen) for q in queries]
        # The projection depends on the kept labels, so they are part of the key.
        keys = [f"{','.join(q.labels)}|{e}" for q, e in zip(queries, exprs, strict=True)]

        results: dict[int, QueryResult] = {}
        waiting: dict[int, asyncio.Future[Settled]] = {}
        to_fetch: list[_Job] = []
        coalesced: set[int] = set()
        with self.cache.frozen_time():
            for i, (q, key) in enumerate(zip(queries, keys, strict=True)):
                fetched = self.cache.fresh(key)
                if fetched is not None:
                    results[i] = self._from_fetched(q, fetched, Lookup.HIT)
                    continue
                fut, leader = self.flights.join(key)
                if leader:
                    to_fetch.append(_Job(q, key, exprs[i], fut))
                else:
                    coalesced.add(i)
                waiting[i] = fut
        if to_fetch:
            # The fetch is shared with other requests: it must outlive this one.
            task = loop.create_task(self._fetch(to_fetch, category, deadline))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        if waiting:
            remaining = max(0.0, deadline - loop.time())
            await asyncio.wait(waiting.values(), timeout=remaining)
        for i, fut in waiting.items():
            q = queries[i]
            if fut.done():
                outcome, how = fut.result()
            else:
                outcome, how = UpstreamFailure("timeout", "request deadline reached before Prometheus answered"), \
                    Lookup.MISS
            if isinstance(outcome, Fetched):
                # A request that waited on another one's fetch coalesced, unless that
                # fetch was itself answered from the shared tier (then it is a hit).
                lookup = Lookup.COALESCED if i in coalesced and how is not Lookup.HIT else how
                results[i] = self._from_fetched(q, outcome, lookup)
            else:
                results[i] = self._failed(q, keys[i], outcome)
        ordered = [results[i] for i in range(len(queries))]
        counts: dict[Lookup, int] = {}
        for r in ordered:
            counts[r.lookup] = counts.get(r.lookup, 0) + 1
        for lookup, n in counts.items():
            gm.cache_outcome(category, lookup, n)
        return ordered

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

    async def _fetch(self, jobs: list[_Job], category: str, deadline: float) -> None:
        """Have `jobs` answered (shared tier first, when there is one) and settle their futures."""
        try:
            shared = self.shared
            if shared is None:
                await self._fetch_upstream(jobs, category, deadline)
            elif not shared.available:
                gm.shared_event(category, "bypass", len(jobs))
                await self._fetch_upstream(jobs, category, deadline)
            else:
                await self._fetch_shared(shared, jobs, category, deadline)
        finally:
            for j in jobs:  # never leave a waiter hanging, whatever happened above
                self.flights.settle(j.key, j.future, UpstreamFailure("internal", "fetch ended without an answer"))

    async def _fetch_shared(self, shared: SharedTier, jobs: list[_Job], category: str, deadline: float) -> None:
        """Local misses through the shared tier: answered there, fetched here for the
        whole fleet (holding the lock, then published), or awaited from the process
        that fetches them; alone (as without the tier) when the tier fails."""
        loop = asyncio.get_running_loop()
        by_key = {j.key: j for j in jobs}
        claim = await shared.claim(list(by_key), [self.cache.last_good(k) is None for k in by_key],
                                   deadline - loop.time())
        if claim is None:
            gm.shared_event(category, "error", len(jobs))
            await self._fetch_upstream(jobs, category, deadline)
            return
        for key, good in claim.good.items():
            self.cache.store(key, good, 0.0)  # a last good value only (a restarted process)
        gm.shared_event(category, "stale", len(claim.good))
        for key, (fetched, expires_at) in claim.hits.items():
            self.cache.store(key, fetched, _local_expiry(expires_at))
            self.flights.settle(key, by_key[key].future, fetched, Lookup.HIT)
        gm.shared_event(category, "hit", len(claim.hits))
        gm.shared_event(category, "miss", len(claim.led))
        ttl = self.settings.ttl_for(category)

        async def lead(keys: list[str]) -> None:
            if not keys:
                return
            async with shared.holding(keys, claim.token):
                outcomes = await self._fetch_upstream([by_key[k] for k in keys], category, deadline)
            await asyncio.sleep(0)  # the requests just answered go first; then the fleet's waiters
            await shared.publish(claim.token, outcomes, ttl)

        async def follow() -> None:
            if not claim.awaited:
                return
            got = await shared.wait(claim.awaited, claim.token, deadline)
            takeover, alone = [], []
            for key, outcome in got.items():
                job = by_key[key]
                if outcome is LEAD:
                    takeover.append(key)
                elif outcome is ALONE:
                    alone.append(job)
                elif isinstance(outcome, UpstreamFailure):
                    self.flights.settle(key, job.future, outcome, Lookup.COALESCED)
                elif isinstance(outcome, tuple):
                    fetched, expires_at = outcome
                    self.cache.store(key, fetched, _local_expiry(expires_at))
                    self.flights.settle(key, job.future, fetched, Lookup.COALESCED)
            gm.shared_event(category, "coalesced", len(got) - len(takeover) - len(alone))
            gm.shared_event(category, "takeover", len(takeover))
            gm.shared_event(category, "error", len(alone))
            await asyncio.gather(lead(takeover), self._fetch_upstream(alone, category, deadline))

        await asyncio.gather(lead(claim.led), follow())

    async def _fetch_upstream(self, jobs: list[_Job], category: str, deadline: float) -> dict[str, Outcome]:
        """Fetch `jobs` in as few requests as possible; settle their futures and
        return each key's outcome."""
        if not jobs:
            return {}
        batchable = [j for j in jobs if j.query.batchable]
        solo = [j for j in jobs if not j.query.batchable]
        size = self.settings.batch_max_queries
        groups = [batchable[i:i + size] for i in range(0, len(batchable), size)]
        groups += [[j] for j in solo]
        outcomes: dict[str, Outcome] = {}
        for part in await asyncio.gather(*(self._fetch_group(g, category, deadline) for g in groups)):
            outcomes.update(part)
        return outcomes

    async def _fetch_group(self, jobs: list[_Job], category: str, deadline: float) -> dict[str, Outcome]:
        loop = asyncio.get_running_loop()
        if len(jobs) == 1:
            expr = jobs[0].expr
        else:
            expr = " or ".join(
                f'label_replace({j.expr}, "{BATCH_LABEL}", "{n}", "", "")' for n, j in enumerate(jobs)
            )
        try:
            answer = await self.client.query(expr, timeout=deadline - loop.time(), category=category)
        except UpstreamError as exc:
            if len(jobs) > 1 and exc.error_type in ("bad_data", "execution"):
                # One query is at fault: evaluate each alone so the others still answer.
                outcomes: dict[str, Outcome] = {}
                for part in await asyncio.gather(*(self._fetch_group([j], category, deadline) for j in jobs)):
                    outcomes.update(part)
                return outcomes
            failure = UpstreamFailure(exc.error_type, exc.message)
            for j in jobs:
                self.flights.settle(j.key, j.future, failure)
            return dict.fromkeys((j.key for j in jobs), failure)
        return self._settle(jobs, answer, category)

    def _settle(self, jobs: list[_Job], answer: QueryAnswer, category: str) -> dict[str, Outcome]:
        now = time.time()
        per_job: list[list[tuple[dict[str, str], float]]] = [[] for _ in jobs]
        for s in answer.series:
            if len(jobs) == 1:
                per_job[0].append((s.labels, s.value))
                continue
            idx = s.labels.pop(BATCH_LABEL, None)
            if idx is not None and idx.isdigit() and int(idx) < len(jobs):
                per_job[int(idx)].append((s.labels, s.value))
        ttl = self.settings.ttl_for(category)
        # With a shared tier every process expires on the wall-clock grid, in step.
        expires_at = self.cache.expiry(ttl) if self.shared is None else _local_expiry(grid_expiry(ttl, now))
        outcomes: dict[str, Outcome] = {}
        for j, series in zip(jobs, per_job, strict=True):
            fetched = Fetched(_project(j.query, series), now, answer.warnings)
            self.cache.store(j.key, fetched, expires_at)
            self.flights.settle(j.key, j.future, fetched)
            outcomes[j.key] = fetched
        return outcomes

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
