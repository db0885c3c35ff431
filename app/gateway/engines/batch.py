"""A batch's jobs: many figure queries as one PromQL request, and its answer back into parts."""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from app.gateway.caching.figures import CacheClass
from app.gateway.catalog.model import CatalogQuery
from app.gateway.result import Fetched, Lookup, Sample, UpstreamFailure
from app.gateway.upstream.answers import Series
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
