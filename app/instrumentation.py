"""The backend metric contract: inference, providers, database, cache, business.

These are the metric names, types and labels a GatewayZ-style backend exposes
and the gateway's default catalog queries. Defining them here gives the
contract one owner and a small typed API, so callers never touch metric
objects and label names cannot drift.

All metrics live at module level on the default registry: a module runs once
per process however often it is imported, so a second import, or a test that
builds two apps, reuses them instead of registering duplicates.

Gauges choose their multiprocess mode deliberately. Every one here describes
state shared by all workers (a provider's health, a count read from the
database), which any worker may refresh, so ``mostrecent`` is used: the merged
value is the last one written by any worker. ``sum`` would multiply it by the
number of workers, ``liveall`` would add a ``pid`` label.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Literal

from prometheus_client import Counter, Gauge, Histogram, Summary

InferenceStatus = Literal["success", "error"]
TokenType = Literal["prompt", "completion"]

MODEL_INFERENCE_REQUESTS = Counter(
    "model_inference_requests_total",
    "Model inference requests, by provider, model and status (success/error).",
    ["provider", "model", "status"],
)
MODEL_INFERENCE_DURATION = Histogram(
    "model_inference_duration_seconds",
    "Time of one model inference request, by provider and model.",
    ["provider", "model"],
    buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0),
)
TOKENS_USED = Counter(
    "tokens_used_total",
    "Tokens consumed, by provider, model and token_type (prompt/completion).",
    ["provider", "model", "token_type"],
)
CREDITS_USED = Counter(
    "credits_used_total",
    "Credits charged for inference, by provider and model.",
    ["provider", "model"],
)
PROVIDER_AVAILABILITY = Gauge(
    "provider_availability",
    "Provider availability from the latest health check, 0 (down) to 1 (up).",
    ["provider"],
    multiprocess_mode="mostrecent",
)
PROVIDER_ERROR_RATE = Gauge(
    "provider_error_rate",
    "Provider error ratio (0 to 1) over the health checker's window.",
    ["provider"],
    multiprocess_mode="mostrecent",
)
PROVIDER_RESPONSE_TIME = Gauge(
    "provider_response_time_seconds",
    "Provider response time measured by the latest health check.",
    ["provider"],
    multiprocess_mode="mostrecent",
)
DATABASE_QUERIES = Counter(
    "database_queries_total",
    "Database queries, by table and operation.",
    ["table", "operation"],
)
DATABASE_QUERY_DURATION = Summary(
    "database_query_duration_seconds",
    "Database query time by table (a summary: _sum and _count only, no quantiles).",
    ["table"],
)
CACHE_HITS = Counter("cache_hits_total", "Cache hits, by cache name.", ["cache_name"])
CACHE_MISSES = Counter("cache_misses_total", "Cache misses, by cache name.", ["cache_name"])
ACTIVE_API_KEYS = Gauge(
    "active_api_keys",
    "API keys, by status (as last counted).",
    ["status"],
    multiprocess_mode="mostrecent",
)
SUBSCRIPTION_COUNT = Gauge(
    "subscription_count",
    "Subscriptions, by plan type and billing cycle (as last counted).",
    ["plan_type", "billing_cycle"],
    multiprocess_mode="mostrecent",
)
TRIAL_ACTIVE = Gauge(
    "trial_active",
    "Trials, by status (as last counted).",
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
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    credits: float = 0.0,
) -> None:
    """One finished inference request: count, latency, tokens and credits."""
    MODEL_INFERENCE_REQUESTS.labels(provider, model, status).inc()
    MODEL_INFERENCE_DURATION.labels(provider, model).observe(_non_negative(seconds))
    TOKENS_USED.labels(provider, model, "prompt").inc(_non_negative(prompt_tokens))
    TOKENS_USED.labels(provider, model, "completion").inc(_non_negative(completion_tokens))
    CREDITS_USED.labels(provider, model).inc(_non_negative(credits))


def set_provider_health(
    provider: str, availability: float, error_rate: float, response_seconds: float
) -> None:
    """The latest health check of one provider; ratios are clamped to [0, 1]."""
    PROVIDER_AVAILABILITY.labels(provider).set(_ratio(availability))
    PROVIDER_ERROR_RATE.labels(provider).set(_ratio(error_rate))
    PROVIDER_RESPONSE_TIME.labels(provider).set(_non_negative(response_seconds))


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

    ``active_api_keys`` and ``trials`` map status -> count; ``subscriptions`` maps
    (plan_type, billing_cycle) -> count. A label set given before but missing now
    is set to 0, so a vanished status does not keep its last count.
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
