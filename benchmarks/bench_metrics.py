"""Benchmark the service's own /metrics: render time and middleware overhead.

    /work/venv/bin/python benchmarks/bench_metrics.py            # full run (~1 min)
    /work/venv/bin/python benchmarks/bench_metrics.py --quick    # smoke run

Measures, with a realistic population of series (every route template x a few
status codes, every gateway category, several providers x models):

1. Single-process render of GET /metrics (text 0.0.4, OpenMetrics, text+gzip).
   Target: < 10 ms.
2. Multiprocess render: the merge of 4 workers' mmap files (written by 4 real
   child processes in PROMETHEUS_MULTIPROC_DIR), and the same after 40 dead
   workers' files piled up (worker recycling). Target with 4 workers: < 100 ms.
3. Request overhead of the HTTP middleware: the same FastAPI app with and
   without install_monitoring, called in the same run, (a) directly as an ASGI
   callable and (b) through httpx.ASGITransport. Reported per request and as a
   ratio instrumented / plain.

Prints a markdown report to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ROUTES = [f"/prometheus/metrics/{{category}}/r{i}" for i in range(10)] + [
    "/api/v1/query/{name}", "/api/v1/batch", "/summary", "/status", "/catalog",
]
CATEGORIES = ["overview", "providers", "models", "database", "cache", "business",
              "latency", "errors", "tokens", "credits"]
PROVIDERS = ["openai", "anthropic", "google", "mistral", "groq", "together"]
MODELS = ["m-large", "m-small", "m-code", "m-vision"]


def populate(app_name: str = "bench") -> None:
    """Series a busy gateway process would hold (same set in every worker)."""
    from app import instrumentation as domain
    from app.gateway import metrics as gateway
    from app.monitoring.http import HTTP_DURATION, HTTP_IN_PROGRESS, HTTP_REQUESTS

    for route in ROUTES:
        for method in ("GET", "POST"):
            HTTP_IN_PROGRESS.labels(app_name, method, route).set(0)
            HTTP_DURATION.labels(app_name, method, route).observe(0.02)
            for status in ("200", "400", "404", "500", "503"):
                HTTP_REQUESTS.labels(app_name, method, route, status).inc()
    for cat in CATEGORIES:
        gateway.observe_upstream(cat, 0.05, None)
        gateway.observe_upstream(cat, 0.5, "timeout")
        for outcome in ("hit", "miss", "stale", "coalesced"):
            gateway.cache_outcome(cat, outcome)
    gateway.set_breaker_state("closed")
    for provider in PROVIDERS:
        domain.set_provider_health(provider, 1.0, 0.01, 0.3)
        for model in MODELS:
            domain.record_inference(provider, model, "success", 1.2, 100, 50, 0.1)
            domain.record_inference(provider, model, "error", 0.3)
    for table in ("users", "api_keys", "usage", "plans"):
        for op in ("select", "insert", "update"):
            domain.record_db_query(table, op, 0.004)
    for cache in ("models", "providers", "users"):
        domain.record_cache(cache, True)
        domain.record_cache(cache, False)
    domain.set_business(active_api_keys={"active": 10, "revoked": 2},
                        subscriptions={("pro", "monthly"): 5, ("team", "yearly"): 2},
                        trials={"active": 3, "expired": 7})


def timed(fn: Callable[[], object], iterations: int) -> tuple[float, float]:
    """(median, p95) wall time in milliseconds."""
    fn()  # warm up
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.95) - 1]


def bench_single(iterations: int) -> list[tuple[str, float, float, int]]:
    from app.monitoring.registry import render

    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    build_app(instrumented=True)  # as the service runs: install_monitoring applied
    populate()
    rows = []
    for label, accept, enc in (
        ("text 0.0.4", None, None),
        ("OpenMetrics", "application/openmetrics-text; version=1.0.0", None),
        ("text 0.0.4 + gzip", None, "gzip"),
    ):
        size = len(render(accept, enc).body)
        med, p95 = timed(partial(render, accept, enc), iterations)
        rows.append((label, med, p95, size))
    return rows


_CHILD = """
import sys
sys.path.insert(0, {repo!r})
from benchmarks.bench_metrics import populate
populate()
"""


def write_worker_files(directory: Path, workers: int) -> None:
    """Start `workers` real processes in multiprocess mode; each writes its files and exits."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD.format(repo=str(REPO))], env=env)
             for _ in range(workers)]
    for p in procs:
        if p.wait(timeout=120) != 0:
            raise RuntimeError("worker process failed")


def bench_multiprocess(iterations: int, dead_workers: int) -> list[tuple[str, float, float, int]]:
    from app.monitoring.registry import render

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-prom-") as tmp:
        directory = Path(tmp)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
        try:
            write_worker_files(directory, 4)
            files = len(list(directory.glob("*.db")))
            med, p95 = timed(lambda: render(None, None), iterations)
            rows.append((f"4 workers ({files} files)", med, p95,
                         len(render(None, None).body)))
            med, p95 = timed(lambda: render(None, "gzip"), iterations)
            rows.append((f"4 workers ({files} files) + gzip", med, p95,
                         len(render(None, "gzip").body)))
            write_worker_files(directory, dead_workers)
            files = len(list(directory.glob("*.db")))
            med, p95 = timed(lambda: render(None, None), max(5, iterations // 4))
            rows.append((f"4 + {dead_workers} dead workers ({files} files)", med, p95,
                         len(render(None, None).body)))
        finally:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return rows


def build_app(instrumented: bool) -> Any:
    from fastapi import FastAPI

    from app.monitoring import install_monitoring

    app = FastAPI()

    @app.get("/prometheus/metrics/{category}")
    async def category(category: str) -> dict[str, str]:
        return {"category": category}

    for i in range(20):  # a realistic number of routes ahead of the one we call
        app.add_api_route(f"/other/{i}/{{x}}", category, methods=["GET"])

    if instrumented:
        install_monitoring(app, app_name="bench-overhead")
    return app


async def _direct_calls(app: Any, n: int) -> float:
    """Seconds per request calling the ASGI app directly (no client, no sockets)."""
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    start = time.perf_counter()
    for i in range(n):
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "GET", "scheme": "http", "path": f"/prometheus/metrics/c{i % 10}",
            "raw_path": b"", "root_path": "", "query_string": b"", "headers": [],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
        }
        await app(scope, receive, send)
    return (time.perf_counter() - start) / n


async def _httpx_calls(app: Any, n: int) -> float:
    import httpx

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        start = time.perf_counter()
        for i in range(n):
            await client.get(f"/prometheus/metrics/c{i % 10}")
        return (time.perf_counter() - start) / n


def bench_overhead(n: int, rounds: int) -> list[tuple[str, float, float, float]]:
    plain, instrumented = build_app(False), build_app(True)
    rows = []
    for label, runner in (("direct ASGI call", _direct_calls), ("httpx.ASGITransport", _httpx_calls)):
        asyncio.run(runner(plain, 200))  # warm both (route caches, middleware stack)
        asyncio.run(runner(instrumented, 200))
        p_samples, i_samples = [], []
        for _ in range(rounds):  # interleaved so drift hits both equally
            p_samples.append(asyncio.run(runner(plain, n)))
            i_samples.append(asyncio.run(runner(instrumented, n)))
        p, i = statistics.median(p_samples) * 1e6, statistics.median(i_samples) * 1e6
        rows.append((label, p, i, i / p))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    args = parser.parse_args()
    iterations = 20 if args.quick else 200
    n, rounds = (300, 3) if args.quick else (3000, 7)
    dead = 8 if args.quick else 40

    single = bench_single(iterations)
    multi = bench_multiprocess(max(10, iterations // 4), dead)
    overhead = bench_overhead(n, rounds)

    from importlib.metadata import version

    print(f"Python {platform.python_version()} on {platform.machine()}, "
          f"{os.cpu_count()} CPUs; prometheus_client {version('prometheus_client')}, "
          f"fastapi {version('fastapi')}, starlette {version('starlette')}")
    print("\n| /metrics render | median ms | p95 ms | body bytes |\n|---|---:|---:|---:|")
    for label, med, p95, size in single:
        print(f"| single process, {label} | {med:.2f} | {p95:.2f} | {size} |")
    for label, med, p95, size in multi:
        print(f"| multiprocess, {label} | {med:.2f} | {p95:.2f} | {size} |")
    print("\n| middleware overhead | plain µs/req | instrumented µs/req | ratio |"
          "\n|---|---:|---:|---:|")
    for label, p, i, ratio in overhead:
        print(f"| {label} | {p:.1f} | {i:.1f} | {ratio:.2f}x (+{i - p:.1f} µs) |")


if __name__ == "__main__":
    main()
