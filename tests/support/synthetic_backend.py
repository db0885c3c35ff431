"""A synthetic GatewayZ-style backend: contract metrics with known rates and gauges.

Counters grow linearly (value = base + rate * (t - t0)), so whatever Prometheus
scrapes, rate() over any window equals the declared rate; gauges are constants.
`history()` writes the same functions as OpenMetrics for `promtool tsdb
create-blocks-from openmetrics`, so a 5-minute rate window is full from the
first query instead of filling for 5 minutes.
"""

from __future__ import annotations

import math
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.support.procs import PROMTOOL_BIN, free_port


@dataclass(frozen=True)
class S:
    """One series: metric name, type of its family, labels, and rate or constant."""

    family: str
    name: str
    labels: tuple[tuple[str, str], ...]
    rate: float = 0.0  # per second, for counters
    value: float = 0.0  # base value (or constant, for gauges)


def _c(family: str, name: str, rate: float, base: float = 100.0, **labels: str) -> S:
    return S(family, name, tuple(labels.items()), rate=rate, value=base)


def _g(family: str, value: float, **labels: str) -> S:
    return S(family, family, tuple(labels.items()), value=value)


def _h(family: str, buckets: tuple[float, ...], cumulative: tuple[float, ...], sum_rate: float,
       **labels: str) -> list[S]:
    """A classic histogram's series: cumulative bucket rates (one per bound, then +Inf), _sum, _count.

    `cumulative` has one rate per bound in `buckets` plus one for +Inf (the _count rate);
    the bounds are the backend's own, written as prometheus_client writes them.
    """
    assert len(cumulative) == len(buckets) + 1 and list(cumulative) == sorted(cumulative), family
    bounds = [*(repr(float(b)) for b in buckets), "+Inf"]
    out = [_c(family, f"{family}_bucket", r, 0, **labels, le=le) for le, r in zip(bounds, cumulative, strict=True)]
    out.append(_c(family, f"{family}_sum", sum_rate, 0, **labels))
    out.append(_c(family, f"{family}_count", cumulative[-1], 0, **labels))
    return out


# The real backend's bucket bounds (src/services/metrics/prometheus_metrics.py).
HTTP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
INFERENCE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 25, 60)
PROVIDER_RESPONSE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10)
TTFB_BUCKETS = (0.1, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 5.0, 10.0)  # backend_ttfb and streaming_duration
TTFC_BUCKETS = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 10.0, 15.0)

APP = {"app_name": "backend"}
CHAT = {"provider": "openai", "model": "gpt-4"}
CLAUDE = {"provider": "anthropic", "model": "claude-3"}
STREAM = "/v1/chat/completions"

SERIES: list[S] = [
    # HTTP: 10 req/s, 1 of them 5xx; mean latency 0.5/10 = 50 ms.
    _c("fastapi_requests", "fastapi_requests_total", 9.0, 1000, **APP, method="GET", path="/v1/chat",
       status_code="200", status_class="2xx"),
    _c("fastapi_requests", "fastapi_requests_total", 1.0, 50, **APP, method="POST", path="/v1/chat",
       status_code="500", status_class="5xx"),
    *_h("fastapi_requests_duration_seconds", HTTP_BUCKETS, (1, 3, 6, 9, 9.5, 10, 10, 10, 10, 10), 0.5,
        **APP, method="GET", path="/v1/chat"),
    _g("fastapi_requests_in_progress", 2, **APP, method="GET", path="/v1/chat"),
    _g("fastapi_requests_in_progress", 3, **APP, method="POST", path="/v1/chat"),
    _g("fastapi_requests_in_progress", 4, **APP, method="GET", path="/v1/models"),
    _c("fastapi_exceptions", "fastapi_exceptions_total", 0.5, 0, **APP, exception_type="ValueError"),
    # Models: 5 inference/s (1 error), mean latency 1.0/5 = 200 ms.
    _c("model_inference_requests", "model_inference_requests_total", 4.0, 10, **CHAT, status="success"),
    _c("model_inference_requests", "model_inference_requests_total", 1.0, 10, **CLAUDE, status="error"),
    *_h("model_inference_duration_seconds", INFERENCE_BUCKETS, (2, 4.5, 5, 5, 5, 5, 5, 5, 5), 1.0, **CHAT),
    _c("tokens_used", "tokens_used_total", 100.0, 5000, **CHAT, token_type="input"),
    _c("tokens_used", "tokens_used_total", 50.0, 2500, **CHAT, token_type="output"),
    _c("credits_used", "credits_used_total", 2.0, 300, **CHAT),
    _c("credits_used", "credits_used_total", 1.0, 200, **CLAUDE),
    # Providers: 4, two healthy, one degraded, one unavailable.
    _g("provider_availability", 1, provider="openai"),
    _g("provider_availability", 0.5, provider="anthropic"),
    _g("provider_availability", 0, provider="google"),
    _g("provider_availability", 1, provider="mistral"),
    _g("provider_error_rate", 0.1, provider="openai"),
    _g("provider_error_rate", 0.2, provider="anthropic"),
    _g("provider_error_rate", 0.3, provider="google"),
    _g("provider_error_rate", 0.0, provider="mistral"),
    # Response time: a histogram. Per-provider means 0.2, 0.4, 0.6, 0.8 s (the mean of
    # the means, 0.5 s, differs from the pooled mean 1.8/4.5 = 0.4 s on purpose).
    *_h("provider_response_time_seconds", PROVIDER_RESPONSE_BUCKETS, (0.5, 2, 2, 2, 2, 2, 2), 0.4,
        provider="openai"),
    *_h("provider_response_time_seconds", PROVIDER_RESPONSE_BUCKETS, (0, 1, 1, 1, 1, 1, 1), 0.4,
        provider="anthropic"),
    *_h("provider_response_time_seconds", PROVIDER_RESPONSE_BUCKETS, (0, 0.5, 1, 1, 1, 1, 1), 0.6,
        provider="google"),
    *_h("provider_response_time_seconds", PROVIDER_RESPONSE_BUCKETS, (0, 0.1, 0.5, 0.5, 0.5, 0.5, 0.5), 0.4,
        provider="mistral"),
    # Database: summary only (_sum/_count); mean 0.02/2 = 10 ms; cache 3 hits : 1 miss.
    _c("database_queries", "database_queries_total", 1.5, 500, table="users", operation="select"),
    _c("database_queries", "database_queries_total", 0.5, 100, table="api_keys", operation="update"),
    _c("database_query_duration_seconds", "database_query_duration_seconds_sum", 0.02, 0, table="users"),
    _c("database_query_duration_seconds", "database_query_duration_seconds_count", 2.0, 0, table="users"),
    _c("cache_hits", "cache_hits_total", 3.0, 0, cache_name="models"),
    _c("cache_misses", "cache_misses_total", 1.0, 0, cache_name="models"),
    # Business gauges: one series per status; only status="active" counts as active.
    _g("active_api_keys", 10, status="active"),
    _g("active_api_keys", 5, status="inactive"),
    _g("subscription_count", 7, plan_type="pro", billing_cycle="monthly"),
    _g("subscription_count", 8, plan_type="pro", billing_cycle="yearly"),
    _g("subscription_count", 9, plan_type="team", billing_cycle="monthly"),
    _g("trial_active", 2, status="active"),
    _g("trial_active", 3, status="expired"),
    # Streaming and timing (labels and buckets as the backend defines them).
    *_h("time_to_first_chunk_seconds", TTFC_BUCKETS, (0, 1, 2, 3, 3.6, 4, 4, 4, 4, 4, 4, 4), 2.4, **CHAT),
    *_h("time_to_first_chunk_seconds", TTFC_BUCKETS, (0, 0, 0, 1, 1.5, 1.8, 2, 2, 2, 2, 2, 2), 2.6, **CLAUDE),
    *_h("backend_ttfb_seconds", TTFB_BUCKETS, (1, 2, 3, 3.5, 4, 4, 4, 4, 4, 4), 2.0, **CHAT, endpoint=STREAM),
    *_h("backend_ttfb_seconds", TTFB_BUCKETS, (0, 0, 1, 1.5, 2, 2, 2, 2, 2, 2), 2.2, **CLAUDE, endpoint=STREAM),
    *_h("streaming_duration_seconds", TTFB_BUCKETS, (0, 0, 0.5, 1, 2, 3, 3.5, 3.8, 4, 4), 8.0, **CHAT,
        endpoint=STREAM),
    *_h("streaming_duration_seconds", TTFB_BUCKETS, (0, 0, 0, 0, 0.5, 1, 1.5, 1.8, 2, 2), 6.0, **CLAUDE,
        endpoint=STREAM),
    # Circuit breakers: one 0/1 series per provider and state; anthropic is open.
    *[_g("circuit_breaker_current_state", 1.0 if state == current else 0.0, provider=p, state=state)
      for p, current in (("openai", "closed"), ("anthropic", "open"), ("google", "half_open"))
      for state in ("closed", "open", "half_open")],
    # Cost: 0.002 USD/s (7.2 USD/h) for openai, 0.001 USD/s (3.6 USD/h) for anthropic.
    _c("gatewayz_api_cost_usd", "gatewayz_api_cost_usd_total", 0.002, 10, **CHAT),
    _c("gatewayz_api_cost_usd", "gatewayz_api_cost_usd_total", 0.001, 5, **CLAUDE),
    _c("stream_chunks_dropped", "stream_chunks_dropped_total", 0.5, 0, **CHAT),
    _c("stream_chunks_dropped", "stream_chunks_dropped_total", 0.0, 0, **CLAUDE),
    _g("redis_up", 1),
    _g("queue_size", 3, queue_name="high"),
    _g("queue_size", 7, queue_name="normal"),
    _g("gatewayz_event_loop_lag_seconds", 0.004),
]

TYPES = {
    "fastapi_requests": "counter", "fastapi_requests_duration_seconds": "histogram",
    "fastapi_requests_in_progress": "gauge", "fastapi_exceptions": "counter",
    "model_inference_requests": "counter", "model_inference_duration_seconds": "histogram",
    "tokens_used": "counter", "credits_used": "counter", "provider_availability": "gauge",
    "provider_error_rate": "gauge", "provider_response_time_seconds": "histogram",
    "database_queries": "counter", "database_query_duration_seconds": "summary",
    "cache_hits": "counter", "cache_misses": "counter", "active_api_keys": "gauge",
    "subscription_count": "gauge", "trial_active": "gauge",
    "time_to_first_chunk_seconds": "histogram", "backend_ttfb_seconds": "histogram",
    "streaming_duration_seconds": "histogram", "circuit_breaker_current_state": "gauge",
    "gatewayz_api_cost_usd": "counter", "stream_chunks_dropped": "counter", "redis_up": "gauge",
    "queue_size": "gauge", "gatewayz_event_loop_lag_seconds": "gauge",
}

PROVIDER_FAMILIES = ("provider_availability", "provider_error_rate", "provider_response_time_seconds")

# Older backends export provider_response_time_seconds as a gauge (same means per provider).
LEGACY_GAUGE_SERIES: list[S] = [s for s in SERIES if s.family != "provider_response_time_seconds"] + [
    _g("provider_response_time_seconds", v, provider=p)
    for p, v in (("openai", 0.2), ("anthropic", 0.4), ("google", 0.6), ("mistral", 0.8))
]
LEGACY_GAUGE_TYPES = {**TYPES, "provider_response_time_seconds": "gauge"}

# What the real backend at HEAD exposes for the provider families: HELP and TYPE, no series
# (nothing records them). Every other family as above.
NO_PROVIDER_SERIES: list[S] = [s for s in SERIES if s.family not in PROVIDER_FAMILIES]

# What the summary must report, from the declarations above (rates are exact).
EXPECTED_RATES = {
    ("http", "request_rate_per_minute"): 600.0,
    ("http", "error_rate"): 10.0,
    ("http", "avg_latency_ms"): 50.0,
    ("http", "in_progress"): 9.0,
    ("models", "avg_inference_latency_ms"): 200.0,
    ("providers", "total_providers"): 4.0,
    ("providers", "healthy_providers"): 2.0,
    ("providers", "degraded_providers"): 1.0,
    ("providers", "unavailable_providers"): 1.0,
    ("providers", "avg_error_rate"): 0.15,
    ("providers", "avg_response_time_ms"): 500.0,  # mean of the providers' means
    ("database", "avg_query_latency_ms"): 10.0,
    ("database", "cache_hit_rate"): 0.75,
    ("business", "active_api_keys"): 10.0,  # status="active" only
    ("business", "active_subscriptions"): 24.0,
    ("business", "active_trials"): 2.0,  # status="active" only
}
# Counter totals: sum of these counters' values at the time of the last scrape.
EXPECTED_TOTALS = {
    ("http", "total_requests"): "fastapi_requests_total",
    ("models", "total_inference_requests"): "model_inference_requests_total",
    ("models", "tokens_used_total"): "tokens_used_total",
    ("models", "credits_used_total"): "credits_used_total",
    ("database", "total_queries"): "database_queries_total",
    ("business", "total_tokens_used"): "tokens_used_total",
    ("business", "total_credits_used"): "credits_used_total",
}


def declared_rate(name: str, by: tuple[str, ...] = (), series: list[S] | None = None,
                  **match: str) -> dict[tuple[str, ...], float]:
    """sum by (`by`) of the declared per-second rates of the series named `name` matching `match`."""
    out: dict[tuple[str, ...], float] = {}
    for s in series if series is not None else SERIES:
        labels = dict(s.labels)
        if s.name != name or any(labels.get(k) != v for k, v in match.items()):
            continue
        key = tuple(labels.get(k, "") for k in by)
        out[key] = out.get(key, 0.0) + s.rate
    return out


def declared_quantile(q: float, family: str, by: tuple[str, ...] = ()) -> dict[tuple[str, ...], float]:
    """histogram_quantile(q, sum by (le, `by`) (rate(family_bucket[...]))) from the declared rates.

    The same linear interpolation inside the bucket Prometheus does, so a test can
    compare the gateway's figure with what the declarations imply.
    """
    groups: dict[tuple[str, ...], dict[float, float]] = {}
    for s in SERIES:
        if s.name != f"{family}_bucket":
            continue
        labels = dict(s.labels)
        key = tuple(labels.get(k, "") for k in by)
        le = float(labels["le"])
        groups.setdefault(key, {})
        groups[key][le] = groups[key].get(le, 0.0) + s.rate
    out: dict[tuple[str, ...], float] = {}
    for key, cum in groups.items():
        bounds = sorted(cum)
        total = cum[math.inf]
        rank = q * total
        lower, below = 0.0, 0.0
        for b in bounds:
            if cum[b] >= rank:  # the first bucket holding the rank, as Prometheus searches
                out[key] = lower if math.isinf(b) else lower + (b - lower) * (rank - below) / (cum[b] - below)
                break
            lower, below = b, cum[b]
    return out


def _labels(s: S, extra: tuple[tuple[str, str], ...] = ()) -> str:
    pairs = s.labels + extra
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}"


@dataclass
class SyntheticBackend:
    """Serves `series` (default: every family the real backend defines, with data) on loopback.

    A family in `types` without series is exposed as the real backend exposes a labelled
    family nothing has recorded: HELP and TYPE lines only.
    """

    t0: float = field(default_factory=time.time)
    port: int = 0
    series: list[S] = field(default_factory=lambda: list(SERIES))
    types: dict[str, str] = field(default_factory=lambda: dict(TYPES))
    _server: ThreadingHTTPServer | None = None

    def value(self, s: S, t: float) -> float:
        return s.value + s.rate * (t - self.t0) if s.rate else s.value

    def total(self, name: str, t: float) -> float:
        return sum(self.value(s, t) for s in self.series if s.name == name)

    def exposition(self, t: float, openmetrics: bool = False, with_ts: bool = False) -> str:
        lines: list[str] = []
        done: set[str] = set()
        for fam in self.types:
            if fam in done:
                continue
            done.add(fam)
            lines.append(f"# HELP {fam} synthetic {fam}")
            lines.append(f"# TYPE {fam} {self.types[fam]}")
            for s in self.series:
                if s.family == fam:
                    ts = f" {t:.3f}" if with_ts else ""
                    lines.append(f"{s.name}{_labels(s)} {self.value(s, t)}{ts}")
        return "\n".join(lines) + "\n"

    def history(self, start: float, end: float, step: float, extra: tuple[tuple[str, str], ...] = ()) -> str:
        """OpenMetrics with timestamps, one family block holding every sample in time order."""
        lines: list[str] = []
        times = [start + i * step for i in range(int((end - start) // step) + 1)]
        for fam, ftype in self.types.items():
            lines.append(f"# HELP {fam} synthetic {fam}")
            lines.append(f"# TYPE {fam} {ftype}")
            for t in times:
                for s in self.series:
                    if s.family == fam:
                        lines.append(f"{s.name}{_labels(s, extra)} {self.value(s, t)} {t:.3f}")
        lines.append("# EOF")
        return "\n".join(lines) + "\n"

    def backfill(self, tsdb_dir: Path, job: str, seconds: float = 420, step: float = 1.0) -> None:
        """Write `seconds` of history ending now into a TSDB directory.

        The series carry the job and instance labels the live scrape will add, so
        history and live samples are one series. Call after start().
        """
        end = time.time() - 1
        self.t0 = min(self.t0, end - seconds)
        tsdb_dir.mkdir(parents=True, exist_ok=True)
        src = tsdb_dir.parent / "history.om"
        extra = (("instance", f"127.0.0.1:{self.port}"), ("job", job))
        src.write_text(self.history(end - seconds, end, step, extra))
        tsdb_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([PROMTOOL_BIN, "tsdb", "create-blocks-from", "openmetrics", str(src), str(tsdb_dir)],
                       check=True, capture_output=True, timeout=120)

    def start(self) -> str:
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = backend.exposition(time.time()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.port = free_port()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def scrape_config(target: str, job: str = "backend") -> str:
    """The scrape_configs entry (YAML) for a synthetic backend at `target`."""
    return f"  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
