"""The one result type every renderer works from.

A figure is only trustworthy when its reader can tell fresh data from a cached
copy, a stale last-good value, or a failure; so each result carries its
provenance, and JSON, text exposition and the status page all read it from here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from app.gateway.catalog.model import CatalogQuery

Labels = tuple[tuple[str, str], ...]


class Lookup(StrEnum):
    """How an answer was had: the one lookup-status vocabulary (after Trickster's).

    It labels the cache metrics (``..._cache_events_total{outcome}``), the JSON
    provenance (``lookup``) and the ``X-Gateway-Cache`` header of the query API.
    """

    HIT = "hit"  # served from a cache tier, fresh
    MISS = "miss"  # fetched from upstream for this request
    COALESCED = "coalesced"  # waited on a fetch another request had started
    PARTIAL = "partial"  # part cached, the missing part fetched (range extents)
    STALE = "stale"  # upstream failed; last good value served, with its age
    FAILED = "failed"  # upstream failed and nothing good is known

    @property
    def state(self) -> State:
        """The coarse provenance a reader acts on (derived, not a second vocabulary)."""
        return _STATE_OF[self]


class State(StrEnum):
    """Provenance of a figure's data, derived from its Lookup."""

    FRESH = "fresh"  # fetched from Prometheus for this request (miss, coalesced, partial)
    CACHED = "cached"  # served from the TTL cache (hit)
    STALE = "stale"
    FAILED = "failed"


_STATE_OF = {Lookup.HIT: State.CACHED, Lookup.MISS: State.FRESH, Lookup.COALESCED: State.FRESH,
             Lookup.PARTIAL: State.FRESH, Lookup.STALE: State.STALE, Lookup.FAILED: State.FAILED}


@dataclass(frozen=True, slots=True)
class Sample:
    labels: Labels
    value: float


@dataclass(frozen=True, slots=True)
class Fetched:
    """What one successful upstream evaluation of a query produced."""

    samples: tuple[Sample, ...]
    fetched_at: float  # unix time the data was read from Prometheus
    warnings: tuple[str, ...] = ()
    dropped: int = 0  # series cut by MAX_SERIES_PER_FIGURE (the largest values are kept)
    expires_at: float = 0.0  # time.monotonic() at which it stops being fresh (this process only)


@dataclass(frozen=True, slots=True)
class UpstreamFailure:
    """Why an upstream evaluation did not produce data (Prometheus errorType or transport)."""

    error_type: str
    message: str


@dataclass(frozen=True, slots=True)
class QueryResult:
    query: CatalogQuery
    lookup: Lookup
    samples: tuple[Sample, ...] = ()
    fetched_at: float | None = None
    age_seconds: float | None = None
    error: UpstreamFailure | None = None
    warnings: tuple[str, ...] = field(default=())
    dropped: int = 0  # series cut by the per-figure cap: the figure is incomplete, and says so
    expires_at: float | None = None  # time.monotonic() at which its data stops being fresh

    @property
    def state(self) -> State:
        return self.lookup.state

    @property
    def truncated(self) -> bool:
        return self.dropped > 0

    def total(self) -> float | None:
        """The sum over all series, or None when there is no data.

        Summing is the contract: gauges with several label sets are totals, never
        the first series only.
        """
        if not self.samples:
            return None
        return math.fsum(s.value for s in self.samples)


def overall_status(results: list[QueryResult]) -> str:
    """ok: every figure answered by Prometheus, complete; degraded: some stale or failed,
    or incomplete (the upstream warned of a partial answer, or the series cap cut it);
    unavailable: nothing could be had, not even a stale value."""
    if not results:
        return "ok"
    if all(r.state is State.FAILED for r in results):
        return "unavailable"
    if any(r.state in (State.STALE, State.FAILED) or r.warnings or r.dropped for r in results):
        return "degraded"
    return "ok"


class ApiResult:
    """An answer for the query API: the envelope to send and how it was had.

    `raw` is the body to send as is when there is one (upstream's own bytes, or a
    remembered answer); `doc` is then decoded only if someone asks for it.
    """

    __slots__ = ("_doc", "evaluated_at", "lookup", "raw", "status_code")

    def __init__(self, status_code: int, doc: dict[str, Any] | None, lookup: Lookup,
                 evaluated_at: float | None = None, raw: bytes | None = None) -> None:
        if doc is None and raw is None:
            raise ValueError("an ApiResult needs a doc or a raw body")
        self.status_code = status_code
        self._doc = doc
        self.lookup = lookup  # hit / partial / miss / coalesced: the X-Gateway-Cache header
        self.evaluated_at = evaluated_at  # an instant query's evaluation time (unix s)
        self.raw = raw

    @property
    def doc(self) -> dict[str, Any]:
        """The envelope (status, data, warnings, infos, errorType, error)."""
        if self._doc is None:
            assert self.raw is not None
            self._doc = json.loads(self.raw)
        return self._doc
