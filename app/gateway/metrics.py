"""The gateway's own metrics about its upstream, cache and circuit breaker.

Defined once at module level on the default registry (a module runs once per
process however often it is imported, so two apps in one test process share
them instead of colliding). Services call the small functions below rather
than touching metric objects, so names live in one place.
"""

from __future__ import annotations

import time
from typing import Literal

from prometheus_client import Counter, Gauge, Histogram

from app.common import tracing
from app.gateway.result import Lookup

BreakerState = Literal["closed", "open", "half_open"]

UPSTREAM_DURATION = Histogram(
    "metrics_gateway_upstream_query_duration_seconds",
    "Time of one upstream Prometheus request (a batch of catalog queries), by category.",
    ["category"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
UPSTREAM_ERRORS = Counter(
    "metrics_gateway_upstream_errors_total",
    "Failed upstream requests by category and Prometheus errorType (or transport error).",
    ["category", "error_type"],
)
UPSTREAM_REQUESTS = Counter(
    "metrics_gateway_upstream_requests_total",
    "Upstream Prometheus requests sent, by category.",
    ["category"],
)
CACHE_EVENTS = Counter(
    "metrics_gateway_cache_events_total",
    "Figure lookups by outcome (the Lookup vocabulary): hit, miss, coalesced (waited on a fetch), "
    "stale (last good served).",
    ["category", "outcome"],
)
RANGE_CACHE_STEPS = Counter(
    "metrics_gateway_range_cache_steps_total",
    "Evaluation steps of query API range answers by source: cache (stored extents), upstream "
    "(fetched by the request), coalesced (fetched by another request it waited on).",
    ["source"],
)
RANGE_CACHE_BYTES = Gauge(
    "metrics_gateway_range_cache_bytes",
    "Bytes held by the in-process range extent store.",
    multiprocess_mode="livesum",
)
UPSTREAM_UP = Gauge(
    "metrics_gateway_upstream_up",
    "1 when the last upstream Prometheus request succeeded, else 0.",
    multiprocess_mode="mostrecent",
)
UPSTREAM_LAST_SUCCESS = Gauge(
    "metrics_gateway_upstream_last_success_timestamp_seconds",
    "Unix time of the last successful upstream Prometheus request.",
    multiprocess_mode="max",
)
BREAKER_STATE = Gauge(
    "metrics_gateway_circuit_breaker_state",
    "Circuit breaker state: 1 for the current state, 0 for the others.",
    ["state"],
    multiprocess_mode="mostrecent",
)
SHARED_UP = Gauge(
    "metrics_gateway_shared_cache_up",
    "1 when the last command to the shared cache tier (Redis) succeeded, else 0; "
    "absent when the shared tier is off.",
    multiprocess_mode="mostrecent",
)
SHARED_EVENTS = Counter(
    "metrics_gateway_shared_cache_events_total",
    "Lookups that reached the shared tier (local misses; category: figure category, or range "
    "for the range cache), by outcome: hit (fresh there), "
    "miss (this process fetched for the fleet), coalesced (waited on another process's fetch), "
    "takeover (a leader's lease ran out; fetched instead), stale (last good read from it), "
    "error (Redis failed; served without it), bypass (its breaker was open).",
    ["category", "outcome"],
)
SHARED_ERRORS = Counter(
    "metrics_gateway_shared_cache_errors_total",
    "Failed shared-tier (Redis) commands by reason: timeout, connection, oom, response, corrupt.",
    ["reason"],
)
SHARED_TOPOLOGY_CHANGES = Counter(
    "metrics_gateway_shared_cache_topology_changes_total",
    "Changes of the shared tier's Redis Cluster slot map this process followed (a master failed "
    "over to its replica, or slots migrated to another master).",
)
SHARED_LOCK_WAIT = Histogram(
    "metrics_gateway_shared_cache_lock_wait_seconds",
    "Time a process waited on another process's fetch (the fleet-wide single flight).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
SHARED_BREAKER_STATE = Gauge(
    "metrics_gateway_shared_cache_breaker_state",
    "Shared-tier circuit breaker state: 1 for the current state, 0 for the others.",
    ["state"],
    multiprocess_mode="mostrecent",
)

CACHE_BYTES = Gauge(
    "metrics_gateway_cache_bytes",
    "Estimated memory of the figure cache by class: catalog (unfiltered figures, never evicted by "
    "others) and filtered (provider=/model= variants, bounded by CACHE_MAX_BYTES).",
    ["class"],
    multiprocess_mode="livesum",
)
CACHE_ENTRIES = Gauge(
    "metrics_gateway_cache_entries",
    "Keys held by the figure cache, by class.",
    ["class"],
    multiprocess_mode="livesum",
)
CACHE_EVICTIONS = Counter(
    "metrics_gateway_cache_evictions_total",
    "Figure cache entries evicted to stay within their class's bounds (entries or bytes).",
    ["class"],
)
FILTERED_SHED = Counter(
    "metrics_gateway_filtered_fetches_shed_total",
    "Requests for filtered variants answered 429 because FILTERED_FETCHES_PER_SECOND was spent.",
    ["category"],
)
TRUNCATED = Counter(
    "metrics_gateway_figures_truncated_total",
    "Upstream answers whose figure had more series than MAX_SERIES_PER_FIGURE (the rest dropped, marked).",
    ["category"],
)
OFFLOADED = Counter(
    "metrics_gateway_offloaded_total",
    "Work on big answers done in a worker thread instead of the event loop, by stage "
    "(parse, project, render).",
    ["stage"],
)


def observe_upstream(category: str, seconds: float, error_type: str | None,
                     upstream_ok: bool | None = None) -> None:
    """Count one upstream request. `upstream_ok` says whether the upstream answered
    (a query error such as bad_data is an answer: the upstream is up); by default
    only a request without error counts as up."""
    UPSTREAM_REQUESTS.labels(category).inc()
    UPSTREAM_DURATION.labels(category).observe(seconds)
    if error_type is not None:
        UPSTREAM_ERRORS.labels(category, error_type).inc()
    ok = error_type is None if upstream_ok is None else upstream_ok
    UPSTREAM_UP.set(1 if ok else 0)
    if ok:
        UPSTREAM_LAST_SUCCESS.set(time.time())


def range_steps(cached: int, fetched: int, coalesced: int = 0) -> None:
    tracing.note({"gateway.range.steps_cached": cached, "gateway.range.steps_fetched": fetched,
                  "gateway.range.steps_coalesced": coalesced})
    if cached:
        RANGE_CACHE_STEPS.labels("cache").inc(cached)
    if fetched:
        RANGE_CACHE_STEPS.labels("upstream").inc(fetched)
    if coalesced:
        RANGE_CACHE_STEPS.labels("coalesced").inc(coalesced)


def range_cache_bytes(size: int) -> None:
    RANGE_CACHE_BYTES.set(size)


def cache_outcome(category: str, outcome: Lookup, count: int = 1) -> None:
    CACHE_EVENTS.labels(category, str(outcome)).inc(count)
    tracing.count_lookup(str(outcome), count)


def set_breaker_state(state: BreakerState) -> None:
    for s in ("closed", "open", "half_open"):
        BREAKER_STATE.labels(s).set(1 if s == state else 0)


def shared_event(category: str, outcome: str, count: int = 1) -> None:
    if count:
        SHARED_EVENTS.labels(category, outcome).inc(count)


def shared_error(reason: str) -> None:
    SHARED_ERRORS.labels(reason).inc()
    SHARED_UP.set(0)


def shared_ok() -> None:
    SHARED_UP.set(1)


def shared_topology_change() -> None:
    SHARED_TOPOLOGY_CHANGES.inc()


def shared_lock_wait(seconds: float) -> None:
    SHARED_LOCK_WAIT.observe(seconds)


def set_shared_breaker_state(state: BreakerState) -> None:
    for s in ("closed", "open", "half_open"):
        SHARED_BREAKER_STATE.labels(s).set(1 if s == state else 0)


def cache_usage(usage: dict[str, tuple[int, int]], evicted: dict[str, int] | None = None) -> None:
    """Publish the figure cache's (entries, bytes) per class and count evictions."""
    for cls, (entries, size) in usage.items():
        CACHE_ENTRIES.labels(cls).set(entries)
        CACHE_BYTES.labels(cls).set(size)
    for cls, n in (evicted or {}).items():
        CACHE_EVICTIONS.labels(cls).inc(n)


def shed(category: str) -> None:
    FILTERED_SHED.labels(category).inc()


def truncated(category: str, figures: int = 1) -> None:
    TRUNCATED.labels(category).inc(figures)


def offloaded(stage: Literal["parse", "project", "render"]) -> None:
    OFFLOADED.labels(stage).inc()


# --- clients of the query API (issue 20): labels only from configured client names -----------------

CLIENT_REQUESTS = Counter(
    "metrics_gateway_client_requests_total",
    "Query API requests by client (its configured name; unnamed / anonymous otherwise).",
    ["client"],
)
CLIENT_REJECTED = Counter(
    "metrics_gateway_client_rejected_total",
    "Query API requests refused before or while waiting for their turn, by client and reason "
    "(queue_full, gateway_busy, deadline, throttled; or the limit: range, points, lookback, length, blocked, "
    "series, bytes).",
    ["client", "reason"],
)
CLIENT_QUEUE_WAIT = Histogram(
    "metrics_gateway_client_queue_wait_seconds",
    "Time a query API request waited for its turn, by client and lane (upstream, heavy).",
    ["client", "lane"],
    buckets=(0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
CLIENT_UPSTREAM_SECONDS = Counter(
    "metrics_gateway_client_upstream_seconds_total",
    "Seconds of upstream requests (slot held) spent for each client.",
    ["client"],
)
CLIENT_HEAVY_SECONDS = Counter(
    "metrics_gateway_client_heavy_seconds_total",
    "Seconds of CPU-heavy work on big answers (decoding, assembling) done for each client.",
    ["client"],
)


def client_request(client: str) -> None:
    CLIENT_REQUESTS.labels(client).inc()


def client_rejected(client: str, reason: str) -> None:
    CLIENT_REJECTED.labels(client, reason).inc()


def client_queue_wait(client: str, lane: str, seconds: float) -> None:
    CLIENT_QUEUE_WAIT.labels(client, lane).observe(seconds)


def client_upstream_seconds(client: str, seconds: float) -> None:
    CLIENT_UPSTREAM_SECONDS.labels(client).inc(seconds)


def client_heavy_seconds(client: str, seconds: float) -> None:
    CLIENT_HEAVY_SECONDS.labels(client).inc(seconds)
