#!/usr/bin/env python3
"""A demo GatewayZ-style backend: live, changing metrics under the backend contract names.

It stands in for the real AI-inference backend in the one-command stack and in
tests: a small process that serves `/metrics` (and `/health`) on loopback with
the families the GatewayZ backend defines (src/services/metrics/prometheus_metrics.py:
fastapi_*, model_inference_*, tokens_used_total, credits_used_total, provider_*,
database_*, cache_*, active_api_keys, subscription_count, trial_active,
time_to_first_chunk_seconds, backend_ttfb_seconds, streaming_duration_seconds,
circuit_breaker_current_state, gatewayz_api_cost_usd_total,
stream_chunks_dropped_total, redis_up, queue_size, gatewayz_event_loop_lag_seconds),
and a background loop that keeps generating traffic.

The metric definitions use prometheus_client directly, on a private registry,
with the backend's names, types, labels and bucket bounds (token_type
input/output, status_class 2xx/4xx/5xx/other, provider_response_time_seconds a
histogram, business gauges with one series per status): this process *is* the
contract, independent of how the gateway instruments itself.

Every provider state is always present (healthy, degraded, unavailable) and
some requests always fail, so every summary figure has data.

Usage:
    python scripts/demo_backend.py --port 9464 [--token-file PATH] [--interval 0.5]
"""

from __future__ import annotations

import argparse
import hmac
import random
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Summary,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder

APP_NAME = "gatewayz"

PROVIDERS: dict[str, list[str]] = {
    "openai": ["gpt-4o", "gpt-4o-mini"],
    "anthropic": ["claude-3-5-sonnet", "claude-3-haiku"],
    "google": ["gemini-1.5-pro"],
    "mistral": ["mistral-large"],
    "groq": ["llama-3.1-70b"],
}
ROUTES: list[tuple[str, str]] = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("GET", "/user/balance"),
]
TABLES = ["users", "api_keys", "usage_records", "credit_transactions"]
CACHES = ["models", "api_keys", "rate_limits"]
STREAM_ENDPOINT = "/v1/chat/completions"
QUEUES = ["high", "normal", "low"]
# The backend's bucket bounds.
HTTP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
INFERENCE_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0)
PROVIDER_RESPONSE_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0)
TTFB_BUCKETS = (0.1, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 5.0, 10.0)
TTFC_BUCKETS = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 10.0, 15.0)
BREAKER_STATES = ("closed", "open", "half_open")


def status_class(code: str) -> str:
    """The backend's status_class: 2xx, 4xx, 5xx, or "other" (1xx and 3xx)."""
    return f"{code[0]}xx" if code[0] in "245" else "other"


class Backend:
    """The contract's families on one registry, and one step of simulated traffic."""

    def __init__(self, seed: int | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.rng = random.Random(seed)
        r = self.registry
        self.requests = Counter(
            "fastapi_requests", "Total HTTP requests.",
            ["app_name", "method", "path", "status_code", "status_class"], registry=r)
        self.duration = Histogram(
            "fastapi_requests_duration_seconds", "HTTP request duration.",
            ["app_name", "method", "path"], registry=r, buckets=HTTP_BUCKETS)
        self.in_progress = Gauge(
            "fastapi_requests_in_progress", "HTTP requests in progress.",
            ["app_name", "method", "path"], registry=r)
        self.exceptions = Counter(
            "fastapi_exceptions", "Unhandled exceptions.", ["app_name", "exception_type"],
            registry=r)
        self.inference = Counter(
            "model_inference_requests", "Model inference requests.",
            ["provider", "model", "status"], registry=r)
        self.inference_duration = Histogram(
            "model_inference_duration_seconds", "Model inference duration.",
            ["provider", "model"], registry=r, buckets=INFERENCE_BUCKETS)
        self.tokens = Counter(
            "tokens_used", "Tokens used.", ["provider", "model", "token_type"], registry=r)
        self.credits = Counter("credits_used", "Credits used.", ["provider", "model"], registry=r)
        self.availability = Gauge(
            "provider_availability", "Provider availability 0..1.", ["provider"], registry=r)
        self.error_rate = Gauge(
            "provider_error_rate", "Provider error ratio 0..1.", ["provider"], registry=r)
        self.response_time = Histogram(
            "provider_response_time_seconds", "Provider response time.", ["provider"],
            registry=r, buckets=PROVIDER_RESPONSE_BUCKETS)
        self.db_queries = Counter(
            "database_queries", "Database queries.", ["table", "operation"], registry=r)
        self.db_duration = Summary(
            "database_query_duration_seconds", "Database query duration.", ["table"],
            registry=r)
        self.cache_hits = Counter("cache_hits", "Cache hits.", ["cache_name"], registry=r)
        self.cache_misses = Counter("cache_misses", "Cache misses.", ["cache_name"], registry=r)
        self.api_keys = Gauge("active_api_keys", "Active API keys.", ["status"], registry=r)
        self.subscriptions = Gauge(
            "subscription_count", "Subscriptions.", ["plan_type", "billing_cycle"], registry=r)
        self.trials = Gauge("trial_active", "Active trials count", ["status"], registry=r)
        self.ttfc = Histogram(
            "time_to_first_chunk_seconds", "Time to first streamed chunk.", ["provider", "model"],
            registry=r, buckets=TTFC_BUCKETS)
        self.ttfb = Histogram(
            "backend_ttfb_seconds", "Time to the provider's first byte.",
            ["provider", "model", "endpoint"], registry=r, buckets=TTFB_BUCKETS)
        self.streaming = Histogram(
            "streaming_duration_seconds", "Duration of a streamed response.",
            ["provider", "model", "endpoint"], registry=r, buckets=TTFB_BUCKETS)
        self.breaker = Gauge(
            "circuit_breaker_current_state",
            "Current circuit breaker state (1=active state, 0=inactive state)",
            ["provider", "state"], registry=r)
        self.cost = Counter(
            "gatewayz_api_cost_usd", "Upstream API cost in USD.", ["provider", "model"], registry=r)
        self.chunks_dropped = Counter(
            "stream_chunks_dropped", "Streamed chunks dropped by normalization.",
            ["provider", "model"], registry=r)
        self.redis_up = Gauge("redis_up", "Redis status (1=UP, 0=DOWN)", registry=r)
        self.queue_size = Gauge("queue_size", "Queue size for prioritization", ["queue_name"],
                                registry=r)
        self.loop_lag = Gauge("gatewayz_event_loop_lag_seconds", "Event loop lag.", registry=r)
        self._keys = 120.0
        self._tick = 0

    def step(self) -> None:
        """One round of traffic: a few requests, inferences, queries; gauges drift."""
        rng = self.rng
        self._tick += 1
        for method, path in ROUTES:
            n = rng.randint(1, 6)
            for _ in range(n):
                roll = rng.random()
                status = "200" if roll > 0.08 else ("429" if roll > 0.04 else "500")
                self.requests.labels(APP_NAME, method, path, status, status_class(status)).inc()
                self.duration.labels(APP_NAME, method, path).observe(rng.lognormvariate(-2.5, 0.8))
            self.in_progress.labels(APP_NAME, method, path).set(rng.randint(0, 4))
        # at least one 5xx every step keeps the error ratio defined and non-trivial
        self.requests.labels(APP_NAME, "POST", "/v1/chat/completions", "502", "5xx").inc()
        if rng.random() < 0.3:
            self.exceptions.labels(APP_NAME, rng.choice(["TimeoutError", "ValueError"])).inc()

        for i, (provider, models) in enumerate(PROVIDERS.items()):
            # openai/anthropic/google healthy, mistral degraded, groq flapping down
            if i < 3:
                avail = 1.0
            elif i == 3:
                avail = round(rng.uniform(0.5, 0.95), 2)
            else:
                avail = 0.0 if (self._tick // 40) % 2 == 0 else 1.0
            self.availability.labels(provider).set(avail)
            self.error_rate.labels(provider).set(round(rng.uniform(0.0, 0.08) + (1 - avail) / 2, 4))
            for _ in range(rng.randint(1, 3)):
                self.response_time.labels(provider).observe(round(rng.uniform(0.2, 1.5), 3))
            # the breaker follows availability: open while the provider is down
            current = "open" if avail == 0.0 else ("half_open" if avail < 0.6 else "closed")
            for state in BREAKER_STATES:
                self.breaker.labels(provider, state).set(1 if state == current else 0)
            for model in models:
                for _ in range(rng.randint(0, 3)):
                    ok = rng.random() > 0.05
                    self.inference.labels(provider, model, "success" if ok else "error").inc()
                    self.inference_duration.labels(provider, model).observe(rng.uniform(0.2, 4.0))
                    input_tokens = rng.randint(50, 2000)
                    output_tokens = rng.randint(10, 800)
                    self.tokens.labels(provider, model, "input").inc(input_tokens)
                    self.tokens.labels(provider, model, "output").inc(output_tokens)
                    self.credits.labels(provider, model).inc((input_tokens + 3 * output_tokens) / 100000)
                    self.cost.labels(provider, model).inc((input_tokens + 4 * output_tokens) / 1e6)
                    ttfb = rng.uniform(0.1, 2.5)
                    self.ttfb.labels(provider, model, STREAM_ENDPOINT).observe(ttfb)
                    self.ttfc.labels(provider, model).observe(ttfb + rng.uniform(0.02, 0.5))
                    self.streaming.labels(provider, model, STREAM_ENDPOINT).observe(ttfb + rng.uniform(0.5, 6))
                    if rng.random() < 0.1:
                        self.chunks_dropped.labels(provider, model).inc()

        for table in TABLES:
            for op in ("select", "insert", "update"):
                for _ in range(rng.randint(0, 3)):
                    self.db_queries.labels(table, op).inc()
                    self.db_duration.labels(table).observe(rng.uniform(0.001, 0.05))
        for cache in CACHES:
            self.cache_hits.labels(cache).inc(rng.randint(3, 12))
            self.cache_misses.labels(cache).inc(rng.randint(0, 3))

        self._keys = max(50.0, self._keys + rng.uniform(-1.0, 1.5))
        self.api_keys.labels("active").set(round(self._keys))
        self.api_keys.labels("inactive").set(7)
        for plan, cycle, base in (("pro", "monthly", 40), ("pro", "yearly", 15),
                                  ("team", "monthly", 8)):
            self.subscriptions.labels(plan, cycle).set(base + (self._tick // 20) % 5)
        self.trials.labels("active").set(10 + rng.randint(0, 3))
        self.trials.labels("expired").set(4)
        self.redis_up.set(1)
        for i, queue in enumerate(QUEUES):
            self.queue_size.labels(queue).set(rng.randint(0, 5 * (i + 1)))
        self.loop_lag.set(round(rng.uniform(0.0005, 0.02), 4))


def make_handler(backend: Backend, token: str | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/health":
                self._send(200, b'{"status":"ok"}', "application/json")
                return
            if path != "/metrics":
                self._send(404, b"not found\n", "text/plain")
                return
            if token is not None:
                got = self.headers.get("Authorization", "")
                if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
                    self._send(401, b"unauthorized\n", "text/plain")
                    return
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._send(200, encoder(backend.registry), content_type)

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9464)
    parser.add_argument("--interval", type=float, default=0.5,
                        help="seconds between traffic steps")
    parser.add_argument("--token-file", type=Path, default=None,
                        help="require `Authorization: Bearer <token>` read from this file")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)

    disable_created_metrics()  # type: ignore[no-untyped-call]
    token = args.token_file.read_text().strip() if args.token_file else None
    backend = Backend(seed=args.seed)
    backend.step()
    server = ThreadingHTTPServer((args.host, args.port), make_handler(backend, token))
    server.daemon_threads = True
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              daemon=True)
    thread.start()
    print(f"demo backend serving http://{args.host}:{args.port}/metrics", flush=True)
    while not stop.wait(args.interval):
        backend.step()
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
