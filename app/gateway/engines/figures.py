"""The figure engine: catalog queries into results, as few upstream requests as possible.

Cached figures are answered from memory; the missing ones are joined into one
PromQL request (`label_replace(q1, "gateway_query", "0", "", "") or ...`) so a
cold summary costs Prometheus one evaluation, not 23 round trips. Concurrent
requests for a figure already being fetched wait for that fetch. Everything is
bounded by the request's deadline; a figure that cannot be had fresh is served
from its last good value, marked stale.

Policy lives here too: which cache class a key belongs to (the catalog's
unfiltered figures, or caller-chosen filtered variants), how fast filtered
variants may be fetched (a token bucket; past it the request is shed with 429, so
distinct filter values cannot multiply upstream load), what is kept as last good
(never an answer that carried warnings; those are reused for WARNING_TTL_SECONDS
only), the series cap per figure, and readiness (one probe shared by every
caller, reused for READY_CACHE_SECONDS, through the breaker). Big answers are
split and projected in a worker thread, so the event loop keeps serving.

With a shared tier (app/gateway/caching/shared.py) a figure is looked up local tier ->
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from app.common import tracing
from app.common.tenancy import UNCONFINED, Tenant
from app.gateway import metrics as gm
from app.gateway.caching.figures import CacheClass, QueryCache
from app.gateway.caching.flight import Background, SingleFlight
from app.gateway.caching.shared import ALONE, LEAD, SharedTier
from app.gateway.catalog.model import CatalogQuery
from app.gateway.engines.batch import Batches, Settled, _Job
from app.gateway.promql.syntax import apply_filters, enforce
from app.gateway.result import Fetched, Lookup, QueryResult, UpstreamFailure
from app.gateway.settings import GatewaySettings
from app.gateway.upstream.client import PrometheusClient

log = logging.getLogger("gateway.aggregator")

Filters = Mapping[str, Sequence[str]]

class Shed(Exception):
    """A request for filtered variants refused: the rate of filtered fetches is spent.

    Answering it without caching would still cost an upstream request per distinct
    filter value, which is the amplification the limit exists to stop; so the
    caller is told when to come back (HTTP 429, Retry-After).
    """

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"filtered fetches over their rate; retry in {retry_after:.1f}s")
        self.retry_after = retry_after


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self) -> bool:
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def retry_after(self) -> float:
        """Seconds until the next token."""
        self._refill()
        return max(0.0, (1.0 - self._tokens) / self.rate)



@lru_cache(maxsize=4096)
def _filtered(expr: str, filters: tuple[tuple[str, tuple[str, ...]], ...]) -> str:
    return apply_filters(expr, dict(filters)) if filters else expr


@lru_cache(maxsize=4096)
def _scoped(expr: str, filters: tuple[tuple[str, tuple[str, ...]], ...],
            matchers: tuple[tuple[str, str], ...]) -> str:
    """The final PromQL: the caller's filters, then the tenant's matchers (which only narrow)."""
    return enforce(_filtered(expr, filters), matchers)



# A request whose joined fetch timed out asks again only with at least this share of its
# deadline left (less could not get an answer anyway).
RETRY_MIN_FRACTION = 0.1


@dataclass(frozen=True, slots=True)
class _Claim:
    """One request's figures: what they are and their keys, by index."""

    queries: Sequence[CatalogQuery]
    keys: list[str]
    classes: list[CacheClass]
    exprs: list[str]


def _timed_out(fut: asyncio.Future[Settled]) -> bool:
    if not fut.done():
        return False
    outcome = fut.result()[0]
    return isinstance(outcome, UpstreamFailure) and outcome.error_type == "timeout"


class Engine:
    def __init__(self, settings: GatewaySettings, client: PrometheusClient, cache: QueryCache,
                 shared: SharedTier | None = None) -> None:
        self.settings = settings
        self.client = client
        self.cache = cache
        self.shared = shared
        self.flights: SingleFlight[Settled] = SingleFlight()
        self.batches = Batches(settings, client, cache, self.flights, on_grid=shared is not None)
        self.fleet = FleetFetch(shared, cache, self.flights, self.batches) if shared is not None else None
        self.filtered_fetches = TokenBucket(settings.filtered_fetches_per_second, settings.filtered_fetch_burst)
        # Work shared with other requests: it must outlive the request that started it.
        self.background = Background()

    async def run(self, queries: Sequence[CatalogQuery], category: str,
                  filters: Filters | None = None, tenant: Tenant = UNCONFINED) -> list[QueryResult]:
        """Results for `queries`, in order, within the request deadline.

        `tenant`: the caller's scope; its matchers are set on every selector and its
        id leads every cache and single-flight key (its upstream headers may change
        the answer even where the PromQL is the same, as with a Mimir tenant).
        Raises Shed when filtered variants would need an upstream fetch and the
        filtered-fetch rate is spent (cached or in-flight variants are still served).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_deadline_seconds
        frozen = tuple(sorted((k, tuple(v)) for k, v in (filters or {}).items()))
        exprs = [_scoped(q.expr, frozen, tenant.matchers) for q in queries]
        # The projection depends on the kept labels, so they are part of the key.
        keys = [f"{tenant.id}|{','.join(q.labels)}|{e}" for q, e in zip(queries, exprs, strict=True)]
        # A key is the catalog's own when no caller filter changed its expression (a
        # tenant's scope is configuration, not caller input: its figures are the catalog's).
        classes = [CacheClass.FILTERED if frozen else CacheClass.CATALOG for _ in queries]

        now = time.monotonic()  # one instant for the whole request: never half a batch expired
        cached = [self.cache.fresh(k, c, now) for k, c in zip(keys, classes, strict=True)]
        if any(f is None and c is CacheClass.FILTERED and k not in self.flights
               for f, c, k in zip(cached, classes, keys, strict=True)):
            if not self.filtered_fetches.take():
                gm.shed(category)
                raise Shed(self.filtered_fetches.retry_after())

        results: dict[int, QueryResult] = {}
        for i, (q, fetched) in enumerate(zip(queries, cached, strict=True)):
            if fetched is not None:
                results[i] = self._from_fetched(q, fetched, Lookup.HIT)
        claim = _Claim(queries, keys, classes, exprs)
        waiting, coalesced = self._lead_or_join(claim, [i for i in range(len(queries)) if i not in results],
                                                category, deadline, tenant)
        if waiting:
            await asyncio.wait(waiting.values(), timeout=max(0.0, deadline - loop.time()))
            # A request that joined another's fetch inherits that request's deadline: when the
            # fetch ran out of *its* time while this request has time of its own left, this
            # one asks again (once) instead of failing at once with the other's timeout.
            again = [i for i in coalesced if _timed_out(waiting[i])]
            if again and deadline - loop.time() > RETRY_MIN_FRACTION * self.settings.request_deadline_seconds:
                more, joined = self._lead_or_join(claim, again, category, deadline, tenant)
                waiting.update(more)
                coalesced = (coalesced - set(again)) | joined
                await asyncio.wait(more.values(), timeout=max(0.0, deadline - loop.time()))
        for i, fut in waiting.items():
            q = queries[i]
            if fut.done():
                outcome, how = fut.result()
            else:
                outcome = UpstreamFailure("timeout", "request deadline reached before the answer was ready")
                how = Lookup.MISS
            if isinstance(outcome, Fetched):
                # A request that waited on another one's fetch coalesced, unless that
                # fetch was itself answered from the shared tier (then it is a hit).
                lookup = Lookup.COALESCED if i in coalesced and how is not Lookup.HIT else how
                results[i] = self._from_fetched(q, outcome, lookup)
            else:
                results[i] = self._failed(q, keys[i], classes[i], outcome)
        ordered = [results[i] for i in range(len(queries))]
        counts: dict[Lookup, int] = {}
        for r in ordered:  # one event per figure looked up, by how it was had in the end
            counts[r.lookup] = counts.get(r.lookup, 0) + 1
        for lookup, n in counts.items():
            gm.cache_outcome(category, lookup, n)
        return ordered

    def _lead_or_join(self, claim: _Claim, indices: list[int], category: str, deadline: float,
                      tenant: Tenant) -> tuple[dict[int, asyncio.Future[Settled]], set[int]]:
        """Each figure's future: a fetch this request leads (spawned here, in one batch), or
        one in flight for another request (the second value: those joined)."""
        waiting: dict[int, asyncio.Future[Settled]] = {}
        to_fetch: list[_Job] = []
        joined: set[int] = set()
        for i in indices:
            fut, leader = self.flights.join(claim.keys[i])
            if leader:
                to_fetch.append(_Job(claim.queries[i], claim.keys[i], claim.classes[i], claim.exprs[i], fut))
            else:
                joined.add(i)
            waiting[i] = fut
        if to_fetch:
            self.background.spawn(self._fetch(to_fetch, category, deadline, tenant.headers()))
        return waiting, joined

    def _from_fetched(self, q: CatalogQuery, fetched: Fetched, lookup: Lookup) -> QueryResult:
        age = max(0.0, time.time() - fetched.fetched_at)
        return QueryResult(q, lookup, fetched.samples, fetched.fetched_at, age,
                           warnings=fetched.warnings, dropped=fetched.dropped, expires_at=fetched.expires_at)

    def _failed(self, q: CatalogQuery, key: str, cls: CacheClass, failure: UpstreamFailure) -> QueryResult:
        good = self.cache.last_good(key, cls)
        if good is None:
            return QueryResult(q, Lookup.FAILED, error=failure)
        age = max(0.0, time.time() - good.fetched_at)
        return QueryResult(q, Lookup.STALE, good.samples, good.fetched_at, age, error=failure,
                           dropped=good.dropped)

    async def _fetch(self, jobs: list[_Job], category: str, deadline: float,
                     headers: Mapping[str, str] | None = None) -> None:
        """Have `jobs` answered (shared tier first, when there is one) and settle their futures.

        `headers`: the tenant's upstream headers (its keys already lead with its id)."""
        try:
            if self.fleet is None:
                await self.batches.fetch(jobs, category, deadline, headers)
            elif not self.fleet.shared.available:
                gm.shared_event(category, "bypass", len(jobs))
                await self.batches.fetch(jobs, category, deadline, headers)
            else:
                await self.fleet.fetch(jobs, category, deadline, headers)
        finally:
            for j in jobs:  # never leave a waiter hanging, whatever happened above
                self.flights.settle(j.key, j.future,
                                    (UpstreamFailure("internal", "fetch ended without an answer"), Lookup.MISS))

    async def aclose(self) -> None:
        await self.background.aclose()


class FleetFetch:
    """A process's local misses through the shared tier (see the module docstring)."""

    def __init__(self, shared: SharedTier, cache: QueryCache, flights: SingleFlight[Settled],
                 batches: Batches) -> None:
        self.shared = shared
        self.cache = cache
        self.flights = flights
        self.batches = batches

    def _keep(self, job: _Job, fetched: Fetched, lookup: Lookup) -> None:
        """An answer the shared tier had: into the local tier, then to the waiters."""
        self.cache.keep(job.key, job.cls, fetched, good=not fetched.warnings)
        self.flights.settle(job.key, job.future, (fetched, lookup))

    async def fetch(self, jobs: list[_Job], category: str, deadline: float,
                    headers: Mapping[str, str] | None = None) -> None:
        """Local misses through the shared tier: answered there, fetched here for the
        whole fleet (holding the lock, then published), or awaited from the process
        that fetches them; alone (as without the tier) when the tier fails."""
        loop, shared = asyncio.get_running_loop(), self.shared
        by_key = {j.key: j for j in jobs}
        with tracing.span("shared tier claim", {"gateway.keys": len(by_key)}):
            claim = await shared.claim(list(by_key), [self.cache.last_good(j.key, j.cls) is None for j in jobs],
                                       deadline - loop.time())
        if claim is None:
            gm.shared_event(category, "error", len(jobs))
            await self.batches.fetch(jobs, category, deadline, headers)
            return
        for key, good in claim.good.items():  # last good values only (a restarted process)
            self.cache.keep(key, by_key[key].cls, good, good=True)
        for key, fetched in claim.hits.items():
            self._keep(by_key[key], fetched, Lookup.HIT)
        gm.shared_event(category, "stale", len(claim.good))
        gm.shared_event(category, "hit", len(claim.hits))
        gm.shared_event(category, "miss", len(claim.led))

        async def lead(keys: list[str]) -> None:
            if not keys:
                return
            async with shared.holding(keys, claim.token):
                outcomes = await self.batches.fetch([by_key[k] for k in keys], category, deadline, headers)
            await asyncio.sleep(0)  # the requests just answered go first; then the fleet's waiters
            await shared.publish(claim.token, outcomes)

        async def follow() -> None:
            if not claim.awaited:
                return
            with tracing.span("shared tier wait", {"gateway.keys": len(claim.awaited)}):
                got = await shared.wait(claim.awaited, claim.token, deadline)
            takeover, alone = [], []
            for key, outcome in got.items():
                job = by_key[key]
                if outcome is LEAD:
                    takeover.append(key)
                elif outcome is ALONE:
                    alone.append(job)
                elif isinstance(outcome, Fetched):
                    self._keep(job, outcome, Lookup.COALESCED)
                elif isinstance(outcome, UpstreamFailure):
                    self.flights.settle(key, job.future, (outcome, Lookup.COALESCED))
            gm.shared_event(category, "coalesced", len(got) - len(takeover) - len(alone))
            gm.shared_event(category, "takeover", len(takeover))
            gm.shared_event(category, "error", len(alone))
            await asyncio.gather(lead(takeover), self.batches.fetch(alone, category, deadline, headers))

        await asyncio.gather(lead(claim.led), follow())
