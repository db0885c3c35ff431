"""Dashboard benchmark: 20 range panels opened by 25 viewers at once, through the range cache.

A real Prometheus holds three hours of the demo_* history of the PromQL
compliance tests (tests/support/demo_data.py); the gateway runs as a real server
(uvicorn, one process) in front of it. A Grafana dashboard of 20 range panels
(1 h, step 15 s, windows aligned to the step as Grafana aligns them) is opened
by 25 viewers at the same instant (500 requests at once), then refreshed by all
of them 15 s later. Measured in one run, side by side:

1. upstream range queries for the opening (Prometheus' own
   prometheus_http_requests_total{handler="/api/v1/query_range"}: ~20, not 500),
   and the latency per panel (p50 / p99 over its 25 viewers);
2. the refresh 15 s later: upstream range queries, and the evaluation steps
   fetched upstream as a fraction of the full windows asked (the gateway's
   metrics_gateway_range_cache_steps_total{source});
3. one cached panel vs Prometheus evaluating it, one request at a time.

Baselines in the same run: the same burst of GET /health on the same server (the
floor of this client and server on this machine), and the same 500 panel requests
sent to Prometheus directly.

Usage: .venv/bin/python benchmarks/bench_dashboard.py [--viewers 25] [--rounds 50] [--markdown out.md]
Needs prometheus and promtool (Debian packages) on PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.demo_data import generate, start_prometheus_with_history  # noqa: E402
from tests.support.procs import prometheus_range_requests, start_uvicorn  # noqa: E402

STEP = 15
WINDOW = 3600
PANELS = [
    "rate(demo_cpu_usage_seconds_total[5m])",
    "sum by (mode) (rate(demo_cpu_usage_seconds_total[5m]))",
    "sum by (instance) (rate(demo_cpu_usage_seconds_total{mode!=\"idle\"}[1m]))",
    "1 - avg by (instance) (rate(demo_cpu_usage_seconds_total{mode=\"idle\"}[5m])) / 4",
    "demo_memory_usage_bytes",
    "sum by (type) (demo_memory_usage_bytes)",
    "demo_memory_usage_bytes{type=\"free\"} / on(instance) group_left sum by (instance) (demo_memory_usage_bytes)",
    "avg_over_time(demo_memory_usage_bytes[5m])",
    "max_over_time(demo_memory_usage_bytes[15m])",
    "deriv(demo_disk_usage_bytes[5m])",
    "predict_linear(demo_disk_usage_bytes[15m], 3600)",
    "time() - demo_batch_last_success_timestamp_seconds",
    "changes(demo_batch_last_success_timestamp_seconds[15m])",
    "histogram_quantile(0.5, sum by (le) (rate(demo_api_request_duration_seconds_bucket[5m])))",
    "histogram_quantile(0.9, sum by (le, path) (rate(demo_api_request_duration_seconds_bucket[5m])))",
    "histogram_quantile(0.99, sum by (le, method) (rate(demo_api_request_duration_seconds_bucket[5m])))",
    "sum by (status) (rate(demo_api_request_duration_seconds_count[5m]))",
    "sum(rate(demo_api_request_duration_seconds_sum[5m])) / sum(rate(demo_api_request_duration_seconds_count[5m]))",
    "sum by (path) (increase(demo_api_request_duration_seconds_count[1h]))",
    "count(demo_intermittent_metric) or vector(0)",
]


def range_requests(prom: str) -> float:
    """Range queries Prometheus has received, from its own /metrics."""
    return prometheus_range_requests(prom)


def gateway_steps(gateway: str) -> dict[str, float]:
    text = httpx.get(f"{gateway}/metrics", timeout=5).text
    out = {"cache": 0.0, "upstream": 0.0}
    for line in text.splitlines():
        if line.startswith("metrics_gateway_range_cache_steps_total{"):
            source = line.split('source="', 1)[1].split('"', 1)[0]
            out[source] = out.get(source, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def window(now: float) -> tuple[str, str]:
    end = math.floor(now / STEP) * STEP  # Grafana's alignment (UTC offset 0)
    return str(end - WINDOW), str(end)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def open_dashboard(gateway: str, viewers: int, now: float) -> tuple[dict[int, list[float]], list[str]]:
    """Every viewer asks every panel at once; latency per panel, and the X-Gateway-Cache seen."""
    start, end = window(now)
    latencies: dict[int, list[float]] = {i: [] for i in range(len(PANELS))}
    lookups: list[str] = []
    limits = httpx.Limits(max_connections=viewers * len(PANELS))
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        async def panel(i: int) -> None:
            t0 = time.perf_counter()
            resp = await client.post(f"{gateway}/api/v1/query_range", data={
                "query": PANELS[i], "start": start, "end": end, "step": str(STEP)})
            latencies[i].append(time.perf_counter() - t0)
            assert resp.status_code == 200 and resp.json()["status"] == "success", resp.text[:300]
            lookups.append(resp.headers.get("x-gateway-cache", "?"))

        await asyncio.gather(*(panel(i) for _ in range(viewers) for i in range(len(PANELS))))
    return latencies, lookups


async def health_burst(gateway: str, n: int) -> list[float]:
    """The floor: n concurrent GET /health on the same server and client (no query work)."""
    latencies: list[float] = []
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=n)) as client:
        async def one() -> None:
            t0 = time.perf_counter()
            await client.get(f"{gateway}/health")
            latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(one() for _ in range(n)))
    return latencies


async def single_panel(url: str, query: str, rounds: int, now: float) -> list[float]:
    start, end = window(now)
    times = []
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(rounds):
            t0 = time.perf_counter()
            resp = await client.post(f"{url}/api/v1/query_range", data={
                "query": query, "start": start, "end": end, "step": str(STEP)})
            times.append(time.perf_counter() - t0)
            assert resp.status_code == 200
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--viewers", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    lines: list[str] = []

    def say(text: str) -> None:
        print(text)
        lines.append(text)

    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        work = Path(tmp)
        prom = start_prometheus_with_history(work / "prometheus", generate(time.time() - 20))
        app = start_uvicorn(work / "app", "app.main:create_app", factory=True,
                            env={"PROMETHEUS_URL": prom.url, "API_TOKENS": "",
                                 "REQUEST_DEADLINE_SECONDS": "30"})
        try:
            n = args.viewers * len(PANELS)
            say(f"## Dashboard: {len(PANELS)} range panels (1 h, step {STEP} s) x {args.viewers} viewers\n")
            before, steps0 = range_requests(prom.url), gateway_steps(app.url)
            opened = time.time()
            lat, lookups = asyncio.run(open_dashboard(app.url, args.viewers, opened))
            upstream_open = range_requests(prom.url) - before
            all_lat = [x for v in lat.values() for x in v]
            per_p50 = [pct(v, 0.5) for v in lat.values()]
            per_p99 = [pct(v, 0.99) for v in lat.values()]
            say(f"- opening: {n} requests, **{upstream_open:.0f} upstream range queries** "
                f"(Prometheus' prometheus_http_requests_total); lookups: "
                + ", ".join(f"{k} {lookups.count(k)}" for k in sorted(set(lookups))))
            say(f"- latency per panel over its {args.viewers} viewers: p50 median {statistics.median(per_p50):.0f} ms "
                f"(panels {min(per_p50):.0f}-{max(per_p50):.0f} ms), p99 median {statistics.median(per_p99):.0f} ms "
                f"(worst panel {max(per_p99):.0f} ms); all {n}: p50 {pct(all_lat, 0.5):.0f} ms, "
                f"p99 {pct(all_lat, 0.99):.0f} ms")
            say("\n| panel | p50 ms | p99 ms |\n|---|---:|---:|")
            for i, q in enumerate(PANELS):
                say(f"| `{q[:70]}` | {per_p50[i]:.0f} | {per_p99[i]:.0f} |")

            time.sleep(max(0.0, opened + STEP - time.time()))
            before, steps1 = range_requests(prom.url), gateway_steps(app.url)
            lat2, lookups2 = asyncio.run(open_dashboard(app.url, args.viewers, time.time()))
            upstream_refresh = range_requests(prom.url) - before
            steps2 = gateway_steps(app.url)
            fetched = steps2["upstream"] - steps1["upstream"]
            full = (WINDOW // STEP + 1) * len(PANELS)
            all2 = [x for v in lat2.values() for x in v]
            say(f"\n- refresh {STEP} s later: {n} requests, **{upstream_refresh:.0f} upstream range queries**, "
                f"fetching {fetched:.0f} evaluation steps of the {full} in the {len(PANELS)} distinct windows "
                f"(**{fetched / full:.1%}**: the new edge and the live window); lookups: "
                + ", ".join(f"{k} {lookups2.count(k)}" for k in sorted(set(lookups2)))
                + f"; p50 {pct(all2, 0.5):.0f} ms, p99 {pct(all2, 0.99):.0f} ms")
            first_fetch = steps1["upstream"] - steps0["upstream"]
            say(f"- for comparison the opening fetched {first_fetch:.0f} steps ({first_fetch / full:.0%})")

            floor = asyncio.run(health_burst(app.url, n))
            say(f"\n- the floor on this machine (same client, same server): {n} concurrent GET /health: "
                f"p50 {pct(floor, 0.5):.0f} ms, p99 {pct(floor, 0.99):.0f} ms")
            before = range_requests(prom.url)
            direct, _ = asyncio.run(open_dashboard(prom.url, args.viewers, opened))
            all_direct = [x for v in direct.values() for x in v]
            say(f"- the same {n} requests sent to Prometheus directly: "
                f"{range_requests(prom.url) - before:.0f} evaluations, p50 {pct(all_direct, 0.5):.0f} ms, "
                f"p99 {pct(all_direct, 0.99):.0f} ms")

            # A panel whose window is older than the live window: answered from extents.
            query = PANELS[1]
            past = time.time() - 600
            asyncio.run(single_panel(app.url, query, 1, past))
            cached = asyncio.run(single_panel(app.url, query, args.rounds, past))
            evaluated = asyncio.run(single_panel(prom.url, query, args.rounds, past))
            say(f"\n- one cached panel (`{query}`, 1 h ending 10 min ago), {args.rounds} requests one at a "
                f"time: gateway median **{statistics.median(cached) * 1000:.2f} ms** vs Prometheus evaluating it "
                f"**{statistics.median(evaluated) * 1000:.2f} ms** "
                f"(x{statistics.median(evaluated) / statistics.median(cached):.1f})")
        finally:
            app.stop()
            prom.stop()
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
