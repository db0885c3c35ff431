"""A batch's jobs: many figure queries as one PromQL request, and its answer back into parts
(`Batches`: the figures' upstream fetch)."""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from app.gateway import metrics as gm
from app.gateway.caching.clock import grid_expiry, to_monotonic
from app.gateway.caching.figures import CacheClass, QueryCache
from app.gateway.caching.flight import SingleFlight
from app.gateway.catalog.model import CatalogQuery
from app.gateway.result import Fetched, Lookup, Sample, UpstreamFailure
from app.gateway.settings import GatewaySettings
from app.gateway.upstream.answers import QueryAnswer, Series, UpstreamError
from app.gateway.upstream.client import PrometheusClient
from app.gateway.upstream.jsonsteps import paused_gc

BATCH_LABEL = "gateway_query"


Outcome = Fetched | UpstreamFailure


Settled = tuple[Outcome, Lookup]  # and how the leader had it: miss, hit (shared tier), coalesced


SeriesList = list[tuple[dict[str, str], float]]


def _rank(s: Sample) -> float:
    return -math.inf if math.isnan(s.value) else s.value


def _project(q: CatalogQuery, answer_series: Sequence[tuple[dict[str, str], float]],
             cap: int) -> tuple[tuple[Sample, ...], int]:
    """Keep only the query's declared labels; series that then coincide are summed.

    This is what keeps job/instance (or any label the catalog did not ask for) out
    of the output, without ever producing duplicate series. Past `cap` series the
    `cap` largest values are kept (as topk would) and the number dropped returned,
    so the cut is always reported, never silent.
    """
    merged: dict[tuple[tuple[str, str], ...], float] = {}
    for labels, value in answer_series:
        key = tuple((name, labels.get(name, "")) for name in q.labels)
        merged[key] = merged[key] + value if key in merged else value
    samples = [Sample(k, v) for k, v in merged.items()]
    merged.clear()  # only references: the keys live on in the samples
    if len(samples) <= cap:
        return tuple(samples), 0
    kept = tuple(heapq.nlargest(cap, samples, key=_rank))
    dropped = len(samples) - cap
    _drain(samples)
    return kept, dropped


def _drain(items: list[Any]) -> None:
    """Free a big list one element at a time: dropped at once, its elements would be
    freed in one uninterruptible cascade, holding the GIL (and the event loop) meanwhile."""
    while items:
        items.pop()


def _split(jobs: Sequence[_Job], series: list[Series]) -> list[SeriesList]:
    """The answer's series per job (a batch tags each with its part's index); `series` is emptied."""
    per_job: list[SeriesList] = [[] for _ in jobs]
    series.reverse()
    while series:
        s = series.pop()
        if len(jobs) == 1:
            per_job[0].append((s.labels, s.value))
            continue
        idx = s.labels.pop(BATCH_LABEL, None)
        if idx is not None and idx.isdigit() and int(idx) < len(jobs):
            per_job[int(idx)].append((s.labels, s.value))
    return per_job


def _split_and_project(jobs: Sequence[_Job], series: list[Series], cap: int) -> list[tuple[tuple[Sample, ...], int]]:
    """Each job's samples and dropped count. Consumes `series` and frees what it leaves behind
    as it goes, so that nothing big is left for the event loop to free."""
    out = []
    for j, part in zip(jobs, _split(jobs, series), strict=True):
        out.append(_project(j.query, part, cap))
        _drain(part)
    return out


def _split_and_project_big(jobs: Sequence[_Job], series: list[Series],
                           cap: int) -> list[tuple[tuple[Sample, ...], int]]:
    with paused_gc():
        return _split_and_project(jobs, series, cap)


@dataclass(slots=True)
class _Job:
    query: CatalogQuery
    key: str  # cache key: the kept labels and the final PromQL
    cls: CacheClass  # catalog (unfiltered) or filtered
    expr: str  # the final PromQL, filters applied
    future: asyncio.Future[Settled]


class Batches:
    """Figure jobs fetched from the upstream in as few requests as possible.

    Batchable jobs are joined into one PromQL request per BATCH_MAX_QUERIES (split
    back by BATCH_LABEL), a batch that fails for a query-specific reason is retried
    query by query, answers are projected (in a worker thread when big), kept in the
    local tier and handed to the jobs' waiters.
    """

    def __init__(self, settings: GatewaySettings, client: PrometheusClient, cache: QueryCache,
                 flights: SingleFlight[Settled], on_grid: bool) -> None:
        self.settings = settings
        self.client = client
        self.cache = cache
        self.flights = flights
        self.on_grid = on_grid  # expire on the fleet's wall-clock grid (a shared tier is on)

    async def fetch(self, jobs: list[_Job], category: str, deadline: float,
                    headers: Mapping[str, str] | None = None) -> dict[str, Outcome]:
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
        for part in await asyncio.gather(*(self._group(g, category, deadline, headers) for g in groups)):
            outcomes.update(part)
        return outcomes

    async def _group(self, jobs: list[_Job], category: str, deadline: float,
                     headers: Mapping[str, str] | None = None) -> dict[str, Outcome]:
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
                outcomes: dict[str, Outcome] = {}
                for part in await asyncio.gather(*(self._group([j], category, deadline, headers)
                                                   for j in jobs)):
                    outcomes.update(part)
                return outcomes
            failure = UpstreamFailure(exc.error_type, exc.message)
            for j in jobs:
                self.flights.settle(j.key, j.future, (failure, Lookup.MISS))
            return dict.fromkeys((j.key for j in jobs), failure)
        return await self._settle(jobs, answer, category)

    def _expiry(self, ttl: float, now: float) -> float:
        """The local expiry of answers fetched `now` (unix time): with a shared tier on
        the wall-clock grid, so every process of the fleet expires them in step."""
        if not self.on_grid:
            return self.cache.expiry(ttl)
        return to_monotonic(grid_expiry(ttl, now))

    async def _settle(self, jobs: list[_Job], answer: QueryAnswer, category: str) -> dict[str, Outcome]:
        now = time.time()
        cap = self.settings.max_series_per_figure
        if len(answer.series) >= self.settings.offload_min_series:
            gm.offloaded("project")
            projected = await asyncio.to_thread(_split_and_project_big, jobs, answer.series, cap)
        else:
            projected = _split_and_project(jobs, answer.series, cap)
        ttl = self.settings.ttl_for(category)
        expires_at = self._expiry(ttl, now)
        good = not answer.warnings
        if not good:
            # A partial answer is worth reusing briefly (asking again at once would mostly
            # get the same partial answer, and load the upstream that is already struggling),
            # but never as the last good value.
            expires_at = min(expires_at, self._expiry(min(ttl, self.settings.warning_ttl_seconds), now))
        truncated = 0
        evicted: dict[str, int] = {}
        outcomes: dict[str, Outcome] = {}
        for j, (samples, dropped) in zip(jobs, projected, strict=True):
            fetched = Fetched(samples, now, answer.warnings, dropped, expires_at)
            truncated += dropped > 0
            for cls, n in self.cache.keep(j.key, j.cls, fetched, good=good).items():
                evicted[cls] = evicted.get(cls, 0) + n
            self.flights.settle(j.key, j.future, (fetched, Lookup.MISS))
            outcomes[j.key] = fetched
        if truncated:
            gm.truncated(category, truncated)
        gm.cache_usage({str(c): u for c, u in self.cache.usage().items()}, evicted)
        return outcomes
