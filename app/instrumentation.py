"""The backend metric contract: inference, providers, database, cache, business.

These are the metric names, types, labels and bucket bounds the GatewayZ backend
defines (src/services/metrics/prometheus_metrics.py) and the gateway's default
catalog queries. Defining them here gives the contract one owner and a small
typed API, so callers never touch metric objects and label values cannot drift:
`token_type` is "input" or "output"; `provider_response_time_seconds` is a
histogram (buckets 0.1 .. 10 s), so a mean over any window comes from its
_sum/_count; the business gauges carry one series per `status`, and only
status="active" counts as active.

All metrics live at module level on the default registry. A module normally runs
once per process, but `importlib.reload` (hot reload, a test harness) runs it
again: every metric is therefore got-or-created (`_metric`), so a second run
reuses the registered collectors instead of failing with "Duplicated timeseries"
(the real backend avoids that failure only by wiping the registry at import).

Gauges choose their multiprocess mode deliberately. Every one here describes
state shared by all workers (a provider's health, a count read from the
database), which any worker may refresh, so ``mostrecent`` is used: the merged
value is the last one written by any worker. ``sum`` would multiply it by the
number of workers, ``liveall`` would add a ``pid`` label.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Summary

InferenceStatus = Literal["success", "error"]
TokenType = Literal["input", "output"]

_M = TypeVar("_M", Counter, Gauge, Histogram, Summary)

# The backend's bucket bounds, kept so histogram_quantile reads the same buckets on both.
INFERENCE_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0)
PROVIDER_RESPONSE_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0)


def _metric(cls: type[_M], name: str, documentation: str, labelnames: Sequence[str], **kw: Any) -> _M:
    """The registered collector of that name, or a new one; a clash of kind or labels is an error.

    prometheus_client keys its registry by every name a collector exposes (for a
    counter `x_total`: `x`, `x_total`, `x_created`), so looking up the name as
    written finds a counter as well as a gauge or histogram.
    """
    existing: Any = REGISTRY._names_to_collectors.get(name)  # no public lookup by name exists
    if existing is None:
        return cls(name, documentation, labelnames, **kw)
    if type(existing) is not cls or tuple(existing._labelnames) != tuple(labelnames):
        raise ValueError(f"{name} is already registered as a different metric: {existing!r}")
    buckets = kw.get("buckets")
    if buckets is not None and [float(b) for b in buckets] != list(getattr(existing, "_upper_bounds", ()))[:-1]:
        raise ValueError(f"{name} is already registered with other buckets")
    return existing


MODEL_INFERENCE_REQUESTS = _metric(
    Counter,
    "model_inference_requests_total",
    "Model inference requests, by provider, model and status (success/error).",
    ["provider", "model", "status"],
)
MODEL_INFERENCE_DURATION = _metric(
    Histogram,
    "model_inference_duration_seconds",
    "Time of one model inference request, by provider and model.",
    ["provider", "model"],
    buckets=INFERENCE_BUCKETS,
)
TOKENS_USED = _metric(
    Counter,
    "tokens_used_total",
    "Tokens consumed, by provider, model and token_type (input/output).",
    ["provider", "model", "token_type"],
)
CREDITS_USED = _metric(
    Counter,
    "credits_used_total",
    "Credits charged for inference, by provider and model.",
    ["provider", "model"],
)
PROVIDER_AVAILABILITY = _metric(
    Gauge,
    "provider_availability",
    "Provider availability from the latest health check, 0 (down) to 1 (up).",
    ["provider"],
    multiprocess_mode="mostrecent",
)
PROVIDER_ERROR_RATE = _metric(
    Gauge,
    "provider_error_rate",
    "Provider error ratio (0 to 1) over the health checker's window.",
    ["provider"],
    multiprocess_mode="mostrecent",
)
PROVIDER_RESPONSE_TIME = _metric(
    Histogram,
    "provider_response_time_seconds",
    "Provider response time, by provider (a histogram: mean = rate of _sum / rate of _count).",
    ["provider"],
    buckets=PROVIDER_RESPONSE_BUCKETS,
)
DATABASE_QUERIES = _metric(
    Counter,
    "database_queries_total",
    "Database queries, by table and operation.",
    ["table", "operation"],
)
DATABASE_QUERY_DURATION = _metric(
    Summary,
    "database_query_duration_seconds",
    "Database query time by table (a summary: _sum and _count only, no quantiles).",
    ["table"],
)
CACHE_HITS = _metric(Counter, "cache_hits_total", "Cache hits, by cache name.", ["cache_name"])
CACHE_MISSES = _metric(Counter, "cache_misses_total", "Cache misses, by cache name.", ["cache_name"])
ACTIVE_API_KEYS = _metric(
    Gauge,
    "active_api_keys",
    "API keys by status (active, inactive, ...), as last counted; active keys are status=\"active\".",
    ["status"],
    multiprocess_mode="mostrecent",
)
SUBSCRIPTION_COUNT = _metric(
    Gauge,
    "subscription_count",
    "Subscriptions, by plan type and billing cycle (as last counted).",
    ["plan_type", "billing_cycle"],
    multiprocess_mode="mostrecent",
)
TRIAL_ACTIVE = _metric(
    Gauge,
    "trial_active",
    "Trials by status (active, expired, ...), as last counted; active trials are status=\"active\".",
    ["status"],
    multiprocess_mode="mostrecent",
)


def _ratio(value: float) -> float:
    return min(1.0, max(0.0, float(value)))


def _non_negative(value: float) -> float:
    return max(0.0, float(value))


def record_inference(
    provider: str,
    model: str,
    status: InferenceStatus,
    seconds: float,
    input_tokens: int = 0,
    output_tokens: int = 0,
    credits: float = 0.0,
) -> None:
    """One finished inference request: count, latency, tokens (input/output) and credits.

    Token and credit series are touched only for positive amounts, as the backend
    does, so a request without usage creates no zero series.
    """
    MODEL_INFERENCE_REQUESTS.labels(provider, model, status).inc()
    MODEL_INFERENCE_DURATION.labels(provider, model).observe(_non_negative(seconds))
    tokens: tuple[tuple[TokenType, float], ...] = (("input", input_tokens), ("output", output_tokens))
    for token_type, amount in tokens:
        if amount > 0:
            TOKENS_USED.labels(provider, model, token_type).inc(amount)
    if credits > 0:
        CREDITS_USED.labels(provider, model).inc(credits)


def record_provider_response(provider: str, seconds: float) -> None:
    """One provider response time (an observation of the histogram)."""
    PROVIDER_RESPONSE_TIME.labels(provider).observe(_non_negative(seconds))


def set_provider_health(
    provider: str, availability: float, error_rate: float, response_seconds: float | None = None
) -> None:
    """The latest health check of one provider; ratios are clamped to [0, 1].

    `response_seconds`, when given, is observed into the response-time histogram
    (it is not a gauge: its mean over a window is what dashboards read).
    """
    PROVIDER_AVAILABILITY.labels(provider).set(_ratio(availability))
    PROVIDER_ERROR_RATE.labels(provider).set(_ratio(error_rate))
    if response_seconds is not None:
        record_provider_response(provider, response_seconds)


def record_db_query(table: str, operation: str, seconds: float) -> None:
    """One database query (operation: select/insert/update/delete/...)."""
    DATABASE_QUERIES.labels(table, operation).inc()
    DATABASE_QUERY_DURATION.labels(table).observe(_non_negative(seconds))


def record_cache(cache_name: str, hit: bool) -> None:
    """One cache lookup."""
    (CACHE_HITS if hit else CACHE_MISSES).labels(cache_name).inc()


# Label sets this process has set, so a status that disappears from the next
# count is set to 0 (label removal is not supported in multiprocess mode).
_business_lock = threading.Lock()
_seen_api_key_status: set[str] = set()
_seen_subscriptions: set[tuple[str, str]] = set()
_seen_trial_status: set[str] = set()


def set_business(
    *,
    active_api_keys: Mapping[str, int] | None = None,
    subscriptions: Mapping[tuple[str, str], int] | None = None,
    trials: Mapping[str, int] | None = None,
) -> None:
    """Replace the business counts that are given (others are left as they are).

    ``active_api_keys`` and ``trials`` map status -> count (give every status, e.g.
    ``{"active": 120, "inactive": 7}``: readers count only ``status="active"``);
    ``subscriptions`` maps (plan_type, billing_cycle) -> count. A label set given
    before but missing now is set to 0, so a vanished status does not keep its last count.
    """
    with _business_lock:
        if active_api_keys is not None:
            for status in _seen_api_key_status - set(active_api_keys):
                ACTIVE_API_KEYS.labels(status).set(0)
            for status, count in active_api_keys.items():
                ACTIVE_API_KEYS.labels(status).set(_non_negative(count))
            _seen_api_key_status.update(active_api_keys)
        if subscriptions is not None:
            for plan, cycle in _seen_subscriptions - set(subscriptions):
                SUBSCRIPTION_COUNT.labels(plan, cycle).set(0)
            for (plan, cycle), count in subscriptions.items():
                SUBSCRIPTION_COUNT.labels(plan, cycle).set(_non_negative(count))
            _seen_subscriptions.update(subscriptions)
        if trials is not None:
            for status in _seen_trial_status - set(trials):
                TRIAL_ACTIVE.labels(status).set(0)
            for status, count in trials.items():
                TRIAL_ACTIVE.labels(status).set(_non_negative(count))
            _seen_trial_status.update(trials)
