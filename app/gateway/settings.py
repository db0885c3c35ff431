"""Every knob of the figure gateway and its upstream, read from the environment (pydantic-settings).

Read once by the app factory (``app.settings.AppSettings``) and passed down; kept in
one place so the README table and the code cannot disagree about names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewaySettings(BaseSettings):
    """Gateway settings; each field is an environment variable of the same name."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    # Upstream Prometheus (or Thanos / Mimir / VictoriaMetrics / Grafana Cloud).
    # repr=False: a URL may carry user:password, headers may carry tokens.
    prometheus_url: str = Field(default="http://prometheus:9090", repr=False)
    prometheus_bearer_token: SecretStr | None = None
    prometheus_bearer_token_file: Path | None = None
    prometheus_username: str | None = None
    prometheus_password: SecretStr | None = None
    prometheus_headers: dict[str, str] = Field(default_factory=dict, repr=False)
    prometheus_verify_tls: bool = True
    prometheus_ca_file: Path | None = None
    prometheus_max_connections: int = Field(default=50, ge=1, le=1000)
    prometheus_max_response_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    # What the upstream is asked to compress (Accept-Encoding): "auto" asks a Prometheus on this
    # host or its own network (loopback, private addresses, cluster-local names) for plain bytes,
    # since gzipping a week-long answer costs Prometheus more than the bytes cost such a network;
    # anything else, gzip. An Accept-Encoding in PROMETHEUS_HEADERS always wins.
    prometheus_compression: Literal["auto", "gzip", "identity"] = "auto"

    # Time budget: one deadline per request; the remainder is sent as `timeout`.
    request_deadline_seconds: float = Field(default=3.0, gt=0, le=60)
    connect_timeout_seconds: float = Field(default=1.0, gt=0, le=30)

    # Caching: per-category TTL, last-good retention for stale answers.
    cache_ttl_seconds: float = Field(default=15.0, ge=0)
    cache_ttl_overrides: dict[str, float] = Field(default_factory=dict)
    # Two cache classes: the catalog's unfiltered figures (one entry per query, never
    # evicted by anything else) and filtered variants (an LRU bounded by entries and
    # by what CACHE_MAX_BYTES leaves after the catalog's figures).
    cache_max_entries: int = Field(default=4096, ge=16)
    cache_max_bytes: int = Field(default=128 * 1024 * 1024, ge=64 * 1024)
    stale_max_age_seconds: float = Field(default=3600.0, ge=0)
    # Answers carrying warnings (partial responses) are reused this long, never kept as last good.
    warning_ttl_seconds: float = Field(default=5.0, ge=0)
    # Upstream fetches for filtered variants (provider= / model=): a token bucket; past it, 429.
    filtered_fetches_per_second: float = Field(default=10.0, gt=0)
    filtered_fetch_burst: int = Field(default=20, ge=1)
    response_memo_seconds: float = Field(default=0.5, ge=0, le=5)
    # Healthy rendered bodies at least this large are reused until their figures' TTL expiry.
    response_memo_large_bytes: int = Field(default=256 * 1024, ge=0)
    response_memo_max_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    batch_max_queries: int = Field(default=64, ge=1, le=500)

    # The exact range cache of the query API (app/gateway/engines/ranges.py). Evaluation steps
    # whose data may still change (the freshness window RANGE_CACHE_LIVE_WINDOW_SECONDS,
    # judged on the times a query reads; 10 min like Mimir's max_cache_freshness, since
    # remote-write pipelines deliver minutes late) are refetched, kept
    # RANGE_CACHE_LIVE_TTL_SECONDS at most; older steps are kept RANGE_CACHE_TTL_SECONDS,
    # within RANGE_CACHE_MAX_BYTES, except that steps settled within the last
    # RANGE_CACHE_RECHECK_HORIZON_SECONDS are refetched every RANGE_CACHE_RECHECK_SECONDS
    # (a sample later than the window corrects the cache within that bound). Long ranges
    # are cut near RANGE_CACHE_SPLIT_SECONDS (step-aligned) and the parts run concurrently.
    range_cache_live_window_seconds: float = Field(default=600.0, ge=0, le=86400)
    range_cache_recheck_seconds: float = Field(default=120.0, gt=0, le=86400)
    range_cache_recheck_horizon_seconds: float = Field(default=3600.0, ge=0, le=7 * 86400)
    range_cache_split_seconds: float = Field(default=86400.0, ge=1, le=30 * 86400)
    range_cache_live_ttl_seconds: float = Field(default=5.0, ge=0, le=300)
    range_cache_ttl_seconds: float = Field(default=6 * 3600.0, ge=0)
    range_cache_max_bytes: int = Field(default=64 * 1024 * 1024, ge=0)

    # Big answers: a series cap per figure (the largest values kept, the cut marked),
    # and the sizes above which parsing, projection and rendering leave the event loop.
    max_series_per_figure: int = Field(default=10_000, ge=1)
    offload_min_bytes: int = Field(default=256 * 1024, ge=0)
    offload_min_series: int = Field(default=2_000, ge=0)

    # Readiness: one probe shared by every /ready caller, reused this long.
    ready_cache_seconds: float = Field(default=2.0, ge=0, le=60)

    # Circuit breaker.
    breaker_failure_threshold: int = Field(default=5, ge=1)
    breaker_reset_seconds: float = Field(default=10.0, gt=0)

    # Shared tier (app/gateway/caching/shared.py): one cache, one fetch in flight and one set of
    # last good values for every worker and replica. GATEWAY_CACHE_URL is a Redis URL
    # (redis://, rediss://, unix://, redis+sentinel://, redis+cluster://); unset, it
    # falls back to REDIS_URL when that is set (app/settings.py); "off" or "" disables it.
    gateway_cache_url: str | None = Field(default=None, repr=False)
    gateway_cache_prefix: str = Field(default="mg", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    # Every Redis command is bounded by this (and by the request deadline).
    gateway_cache_timeout_seconds: float = Field(default=0.25, gt=0, le=5)
    # A fleet-wide fetch lock lives this long unless its holder renews it (a third of
    # it, while its fetch runs): a dead or hung leader blocks the others at most this long.
    gateway_cache_lock_lease_seconds: float = Field(default=0.5, ge=0.05, le=30)
    gateway_cache_max_entry_bytes: int = Field(default=1024 * 1024, ge=256)
    gateway_cache_compress_min_bytes: int = Field(default=1024, ge=0)
    gateway_cache_max_connections: int = Field(default=32, ge=1, le=1024)
    gateway_cache_breaker_threshold: int = Field(default=3, ge=1)
    gateway_cache_breaker_reset_seconds: float = Field(default=5.0, gt=0)

    # Clients of the query API (issue 20; app/gateway/engines/limits.py, scheduler.py): the
    # defaults of every client's limits (a token's "limits" in API_TOKENS override them;
    # 0 or empty: no limit), the API's share of the upstream (the rest of
    # PROMETHEUS_MAX_CONNECTIONS is the figures'), and the slow-query log threshold.
    client_max_concurrent_queries: int = Field(default=4, ge=1)
    client_max_queued_queries: int = Field(default=100, ge=0)  # Mimir: 100 per tenant
    client_max_range_seconds: float = Field(default=0.0, ge=0)
    client_max_lookback_seconds: float = Field(default=0.0, ge=0)
    client_max_points_per_series: int = Field(default=11000, ge=1)
    client_max_series: int = Field(default=0, ge=0)
    client_max_response_bytes: int = Field(default=0, ge=0)
    client_max_query_length: int = Field(default=0, ge=0)
    client_blocked_queries: list[str] = Field(default_factory=list)
    api_max_concurrent_queries: int = Field(default=8, ge=1)
    api_max_waiting_queries: int = Field(default=256, ge=1)
    figure_reserved_connections: int = Field(default=8, ge=1)
    # Heavy CPU work on big API answers (decoding, assembling), at once, across all clients.
    api_heavy_workers: int = Field(default=1, ge=1, le=16)
    # The interpreter's thread switch interval while heavy work runs in threads: the event
    # loop waits at most this long for the interpreter each time it wakes (0: Python's 5 ms).
    api_heavy_switch_interval_seconds: float = Field(default=0.001, ge=0, le=0.1)
    slow_query_seconds: float = Field(default=2.0, ge=0)

    # Catalog: the packaged default, or a TOML file of the user's.
    catalog_path: Path | None = None

    # Filters.
    filter_max_values: int = Field(default=10, ge=1, le=100)
    filter_max_value_length: int = Field(default=128, ge=1, le=1024)

    @field_validator("prometheus_url")
    @classmethod
    def _strip_slash(cls, v: str) -> str:
        v = v.strip()
        if not v.startswith(("http://", "https://")):
            raise ValueError("PROMETHEUS_URL must start with http:// or https://")
        return v.rstrip("/")

    @property
    def api_upstream_slots(self) -> int:
        """How many query API requests may be upstream at once: API_MAX_CONCURRENT_QUERIES, but
        never into the FIGURE_RESERVED_CONNECTIONS of the pool (at most half of it is reserved)."""
        reserved = min(self.figure_reserved_connections, self.prometheus_max_connections // 2)
        return max(1, min(self.api_max_concurrent_queries, self.prometheus_max_connections - reserved))

    @property
    def shared_cache_url(self) -> str | None:
        """The shared tier's Redis URL, or None when it is off."""
        url = (self.gateway_cache_url or "").strip()
        return None if url.lower() in ("", "off", "none", "false", "0") else url

    def ttl_for(self, category: str) -> float:
        return self.cache_ttl_overrides.get(category, self.cache_ttl_seconds)
