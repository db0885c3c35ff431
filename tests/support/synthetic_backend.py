"""A synthetic GatewayZ-style backend: contract metrics with known rates and gauges.

Counters grow linearly (value = base + rate * (t - t0)), so whatever Prometheus
scrapes, rate() over any window equals the declared rate; gauges are constants.
`history()` writes the same functions as OpenMetrics for `promtool tsdb
create-blocks-from openmetrics`, so a 5-minute rate window is full from the
first query instead of filling for 5 minutes.
"""

from __future__ import annotations

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


APP = {"app_name": "backend"}
BUCKETS = (("0.01", 1.0), ("0.05", 5.0), ("0.1", 9.0), ("0.5", 10.0), ("+Inf", 10.0))

SERIES: list[S] = [
    # HTTP: 10 req/s, 1 of them 5xx; mean latency 0.5/10 = 50 ms.
    _c("fastapi_requests", "fastapi_requests_total", 9.0, 1000, **APP, method="GET", path="/v1/chat",
       status_code="200"),
    _c("fastapi_requests", "fastapi_requests_total", 1.0, 50, **APP, method="POST", path="/v1/chat", status_code="500"),
    *[_c("fastapi_requests_duration_seconds", "fastapi_requests_duration_seconds_bucket", r, 0, **APP, method="GET",
         path="/v1/chat", le=le) for le, r in BUCKETS],
    _c("fastapi_requests_duration_seconds", "fastapi_requests_duration_seconds_sum", 0.5, 0, **APP, method="GET",
       path="/v1/chat"),
    _c("fastapi_requests_duration_seconds", "fastapi_requests_duration_seconds_count", 10.0, 0, **APP,
       method="GET", path="/v1/chat"),
    _g("fastapi_requests_in_progress", 2, **APP, method="GET", path="/v1/chat"),
    _g("fastapi_requests_in_progress", 3, **APP, method="POST", path="/v1/chat"),
    _g("fastapi_requests_in_progress", 4, **APP, method="GET", path="/v1/models"),
    _c("fastapi_exceptions", "fastapi_exceptions_total", 0.5, 0, **APP, exception_type="ValueError"),
    # Models: 5 inference/s (1 error), mean latency 1.0/5 = 200 ms.
    _c("model_inference_requests", "model_inference_requests_total", 4.0, 10, provider="openai", model="gpt-4",
       status="success"),
    _c("model_inference_requests", "model_inference_requests_total", 1.0, 10, provider="anthropic",
       model="claude-3", status="error"),
    *[_c("model_inference_duration_seconds", "model_inference_duration_seconds_bucket", r / 2, 0, provider="openai",
         model="gpt-4", le=le) for le, r in BUCKETS],
    _c("model_inference_duration_seconds", "model_inference_duration_seconds_sum", 1.0, 0, provider="openai",
       model="gpt-4"),
    _c("model_inference_duration_seconds", "model_inference_duration_seconds_count", 5.0, 0, provider="openai",
       model="gpt-4"),
    _c("tokens_used", "tokens_used_total", 100.0, 5000, provider="openai", model="gpt-4", token_type="prompt"),
    _c("tokens_used", "tokens_used_total", 50.0, 2500, provider="openai", model="gpt-4", token_type="completion"),
    _c("credits_used", "credits_used_total", 2.0, 300, provider="openai", model="gpt-4"),
    _c("credits_used", "credits_used_total", 1.0, 200, provider="anthropic", model="claude-3"),
    # Providers: 4, two healthy, one degraded, one unavailable.
    _g("provider_availability", 1, provider="openai"),
    _g("provider_availability", 0.5, provider="anthropic"),
    _g("provider_availability", 0, provider="google"),
    _g("provider_availability", 1, provider="mistral"),
    _g("provider_error_rate", 0.1, provider="openai"),
    _g("provider_error_rate", 0.2, provider="anthropic"),
    _g("provider_error_rate", 0.3, provider="google"),
    _g("provider_error_rate", 0.0, provider="mistral"),
    _g("provider_response_time_seconds", 0.2, provider="openai"),
    _g("provider_response_time_seconds", 0.4, provider="anthropic"),
    _g("provider_response_time_seconds", 0.6, provider="google"),
    _g("provider_response_time_seconds", 0.8, provider="mistral"),
    # Database: summary only (_sum/_count); mean 0.02/2 = 10 ms; cache 3 hits : 1 miss.
    _c("database_queries", "database_queries_total", 1.5, 500, table="users", operation="select"),
    _c("database_queries", "database_queries_total", 0.5, 100, table="api_keys", operation="update"),
    _c("database_query_duration_seconds", "database_query_duration_seconds_sum", 0.02, 0, table="users"),
    _c("database_query_duration_seconds", "database_query_duration_seconds_count", 2.0, 0, table="users"),
    _c("cache_hits", "cache_hits_total", 3.0, 0, cache_name="models"),
    _c("cache_misses", "cache_misses_total", 1.0, 0, cache_name="models"),
    # Business gauges, several label sets each (summed by the contract).
    _g("active_api_keys", 10, status="active"),
    _g("active_api_keys", 5, status="rotating"),
    _g("subscription_count", 7, plan_type="pro", billing_cycle="monthly"),
    _g("subscription_count", 8, plan_type="pro", billing_cycle="yearly"),
    _g("subscription_count", 9, plan_type="team", billing_cycle="monthly"),
    _g("trial_active", 2, status="active"),
    _g("trial_active", 3, status="extended"),
]

TYPES = {
    "fastapi_requests": "counter", "fastapi_requests_duration_seconds": "histogram",
    "fastapi_requests_in_progress": "gauge", "fastapi_exceptions": "counter",
    "model_inference_requests": "counter", "model_inference_duration_seconds": "histogram",
    "tokens_used": "counter", "credits_used": "counter", "provider_availability": "gauge",
    "provider_error_rate": "gauge", "provider_response_time_seconds": "gauge",
    "database_queries": "counter", "database_query_duration_seconds": "summary",
    "cache_hits": "counter", "cache_misses": "counter", "active_api_keys": "gauge",
    "subscription_count": "gauge", "trial_active": "gauge",
}

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
    ("providers", "avg_response_time_ms"): 500.0,
    ("database", "avg_query_latency_ms"): 10.0,
    ("database", "cache_hit_rate"): 0.75,
    ("business", "active_api_keys"): 15.0,
    ("business", "active_subscriptions"): 24.0,
    ("business", "active_trials"): 5.0,
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


def _labels(s: S, extra: tuple[tuple[str, str], ...] = ()) -> str:
    pairs = s.labels + extra
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}"


@dataclass
class SyntheticBackend:
    t0: float = field(default_factory=time.time)
    port: int = 0
    _server: ThreadingHTTPServer | None = None

    def value(self, s: S, t: float) -> float:
        return s.value + s.rate * (t - self.t0) if s.rate else s.value

    def total(self, name: str, t: float) -> float:
        return sum(self.value(s, t) for s in SERIES if s.name == name)

    def exposition(self, t: float, openmetrics: bool = False, with_ts: bool = False) -> str:
        lines: list[str] = []
        done: set[str] = set()
        for fam in TYPES:
            if fam in done:
                continue
            done.add(fam)
            lines.append(f"# HELP {fam} synthetic {fam}")
            lines.append(f"# TYPE {fam} {TYPES[fam]}")
            for s in SERIES:
                if s.family == fam:
                    ts = f" {t:.3f}" if with_ts else ""
                    lines.append(f"{s.name}{_labels(s)} {self.value(s, t)}{ts}")
        return "\n".join(lines) + "\n"

    def history(self, start: float, end: float, step: float, extra: tuple[tuple[str, str], ...] = ()) -> str:
        """OpenMetrics with timestamps, one family block holding every sample in time order."""
        lines: list[str] = []
        times = [start + i * step for i in range(int((end - start) // step) + 1)]
        for fam, ftype in TYPES.items():
            lines.append(f"# HELP {fam} synthetic {fam}")
            lines.append(f"# TYPE {fam} {ftype}")
            for t in times:
                for s in SERIES:
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
