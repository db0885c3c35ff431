"""Gateway benchmark: cold and warm /summary, and upstream fetches under load.

Everything is measured side by side in one run against the same real Prometheus
(scraping the synthetic backend used by the integration tests), so the figures
are ratios that survive a noisy 2-core machine:

1. cold /summary (cache TTL 0) vs Prometheus evaluating all summary figures in
   one request (`label_replace(...) or ...`), 23 requests one after another over
   one client, 23 concurrent requests, and the replaced code's pattern (a new
   client per query, one after another);
2. warm /summary throughput at 50 connections vs a trivial endpoint (/health) of
   the same app (wrk);
3. 100 concurrent clients for 10 s: upstream requests Prometheus received
   (its own prometheus_http_requests_total) per query per TTL window.

With --week, Prometheus also holds the generated week of GatewayZ-shaped history
(benchmarks/dataset.py, rebuilt so that it ends now): the figures then read ~600 more
series, as on a production Prometheus.

Usage: .venv/bin/python benchmarks/bench_gateway.py [--rounds 40] [--week] [--cold-only] [--markdown out.md]
Needs prometheus, promtool and wrk (Debian packages) on PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.gateway.catalog.loader import load_catalog  # noqa: E402
from app.gateway.upstream.transport import LeanTransport  # noqa: E402
from benchmarks.dataset import ensure  # noqa: E402
from tests.support.history import start_prometheus_on  # noqa: E402
from tests.support.procs import (  # noqa: E402
    Proc,
    prometheus_query_requests,
    start_prometheus,
    start_uvicorn,
    wait_until,
)
from tests.support.synthetic_backend import SyntheticBackend, scrape_config  # noqa: E402


def ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


async def cold_phase(prom: str, gateway_url: str, rounds: int, legacy: bool = True) -> dict[str, float]:
    catalog = load_catalog()
    exprs = [q.expr for q in catalog.summary_queries()]
    joined = " or ".join(f'label_replace({e}, "q", "{i}", "", "")' for i, e in enumerate(exprs))
    url = f"{prom}/api/v1/query"
    times: dict[str, list[float]] = {k: [] for k in ("single", "sequential", "concurrent", "legacy", "gateway",
                                                     "single_lean", "gateway_lean")}
    # A second instrument with little cost of its own: the gateway's lean transport used
    # bare (no httpx client layers). httpx's client costs ~0.8 ms of CPU per request on
    # both sides alike, which shrinks the ratio; this pair shows it without that.
    lean = LeanTransport()
    form = urlencode([("query", joined)]).encode()

    async def bare(method: str, target: str, content: bytes = b"") -> bytes:
        headers = {"Content-Type": "application/x-www-form-urlencoded"} if content else {}
        r = await lean.handle_async_request(httpx.Request(method, target, content=content, headers=headers))
        try:
            body = b"".join([chunk async for chunk in r.aiter_raw()])
        finally:
            await r.aclose()
        assert r.status_code == 200, body[:200]
        return body

    async def timed(name: str, method: str, target: str, content: bytes = b"") -> bytes:
        t = time.perf_counter()
        body = await bare(method, target, content)
        times[name].append(time.perf_counter() - t)
        return body

    async with httpx.AsyncClient(timeout=10) as client:
        async def one(expr: str, c: httpx.AsyncClient = client) -> None:
            r = await c.post(url, data={"query": expr})
            r.raise_for_status()

        for _ in range(3):  # warm connections and Prometheus' caches alike
            await one(joined)
            (await client.get(f"{gateway_url}/prometheus/metrics/summary")).raise_for_status()
        async def gateway() -> None:
            t = time.perf_counter()
            r = await client.get(f"{gateway_url}/prometheus/metrics/summary")
            times["gateway"].append(time.perf_counter() - t)
            body = r.json()
            assert body["status"] == "ok", body["errors"]
            assert all(p["state"] == "fresh" for s in body["provenance"].values() for p in s.values())

        async def single() -> None:
            t = time.perf_counter()
            await one(joined)
            times["single"].append(time.perf_counter() - t)

        for n in range(rounds):
            # The two compared figures back to back, in alternating order, before the
            # round's bursts: both meet Prometheus in the same state (measured after the
            # 63-request bursts, the gateway's figure carried their after-effects alone).
            for step in ((single, gateway) if n % 2 == 0 else (gateway, single)):
                await step()
            for name in (("single_lean", "gateway_lean") if n % 2 == 0 else ("gateway_lean", "single_lean")):
                if name == "single_lean":
                    await timed(name, "POST", url, form)
                else:
                    await timed(name, "GET", f"{gateway_url}/prometheus/metrics/summary")

            t = time.perf_counter()
            for e in exprs:
                await one(e)
            times["sequential"].append(time.perf_counter() - t)

            t = time.perf_counter()
            await asyncio.gather(*(one(e) for e in exprs))
            times["concurrent"].append(time.perf_counter() - t)

            if legacy:
                t = time.perf_counter()
                for e in exprs:  # what the replaced code did: a new client per query
                    async with httpx.AsyncClient(timeout=10) as fresh:
                        await one(e, fresh)
                times["legacy"].append(time.perf_counter() - t)

    # Each round's two figures were measured back to back: their ratio, round by round,
    # is the steadiest figure on a noisy machine (drift hits both alike).
    await lean.aclose()
    paired = statistics.median(g / s for g, s in zip(times["gateway"], times["single"], strict=True))
    paired_lean = statistics.median(g / s for g, s in zip(times["gateway_lean"], times["single_lean"], strict=True))
    return {k: ms(v) if v else float("nan") for k, v in times.items()} | {
        "figures": float(len(exprs)), "paired": paired, "paired_lean": paired_lean}


def need_wrk() -> None:
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install -y wrk")


def wrk(url: str, connections: int, seconds: int) -> float:
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", url],
                         capture_output=True, text=True, check=True).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{url}: {errors.group(1)} non-2xx answers")
    assert match, out
    return float(match.group(1))


def warm_phase(gateway: str, seconds: int) -> dict[str, float]:
    httpx.get(f"{gateway}/prometheus/metrics/summary", timeout=5).raise_for_status()
    trivial: list[float] = []
    summary: list[float] = []
    for _ in range(2):  # interleaved, so drift hits both alike
        trivial.append(wrk(f"{gateway}/health", 50, seconds))
        summary.append(wrk(f"{gateway}/prometheus/metrics/summary", 50, seconds))
    return {"trivial_rps": statistics.mean(trivial), "summary_rps": statistics.mean(summary)}


def gateway_upstream_requests(gateway: str) -> float:
    text = httpx.get(f"{gateway}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("metrics_gateway_upstream_requests_total{"))


def coalesce_phase(prom: str, gateway: str, ttl: float, seconds: int) -> dict[str, float]:
    before, own_before = prometheus_query_requests(prom), gateway_upstream_requests(gateway)
    rps = wrk(f"{gateway}/prometheus/metrics/summary", 100, seconds)
    fetches = prometheus_query_requests(prom) - before
    own = gateway_upstream_requests(gateway) - own_before
    windows = seconds / ttl
    return {"rps": rps, "fetches": fetches, "own": own, "windows": windows,
            "fetches_per_window": fetches / windows}


def shared_phase(prom: str, gateway: str, ttl: float, seconds: int) -> dict[str, float]:
    """/summary and /system (8 shared figures) under load at the same time."""
    before = prometheus_query_requests(prom)
    procs = [subprocess.Popen(["wrk", "-t1", "-c50", f"-d{seconds}s", f"{gateway}{path}"],
                              stdout=subprocess.PIPE, text=True)
             for path in ("/prometheus/metrics/summary", "/prometheus/metrics/system")]
    for p in procs:
        p.communicate(timeout=seconds + 30)
    fetches = prometheus_query_requests(prom) - before
    return {"fetches": fetches, "per_route_window": fetches / (2 * seconds / ttl)}


def start_gateway(workdir: Path, prom: str, ttl: float) -> Proc:
    env = {"PROMETHEUS_URL": prom, "CACHE_TTL_SECONDS": str(ttl), "LOG_LEVEL": "WARNING"}
    return start_uvicorn(workdir, "app.main:app", env=env)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--seconds", type=int, default=6, help="wrk duration per warm run")
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--cold-only", action="store_true",
                    help="only the cold /summary comparison (no wrk phases, no new-client-per-query pattern)")
    ap.add_argument("--week", action="store_true",
                    help="Prometheus holds the generated week (benchmarks/dataset.py, rebuilt to end now) "
                         "besides scraping the backend: the figures read ~600 more series")
    args = ap.parse_args()
    need_wrk()

    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    backend = SyntheticBackend()
    target = backend.start()
    scrape = scrape_config(target)
    if args.week:
        ds = ensure(7, 580, max_age=120)  # ends now: its series are inside the figures' 5 m windows
        prom = start_prometheus_on(ds, work / "prom", config="global:\n  scrape_interval: 1s\n"
                                   f"scrape_configs:\n{scrape}")
        print(f"Prometheus holds the week: {ds.series} series, {ds.days:g} days, ending "
              f"{time.time() - ds.end:.0f} s ago", flush=True)
    else:
        backend.backfill(work / "prom" / "data", job="backend")
        prom = start_prometheus(work / "prom", scrape)
    procs: list[Proc] = [prom]
    try:
        wait_until(lambda: httpx.post(f"{prom.url}/api/v1/query",
                                      data={"query": 'count_over_time(up{job="backend"}[1m]) >= 2'}
                                      ).json()["data"]["result"], 30, what="scrapes")
        cold_gw = start_gateway(work / "cold", prom.url, 0)
        procs.append(cold_gw)
        cold = asyncio.run(cold_phase(prom.url, cold_gw.url, args.rounds, legacy=not args.cold_only))
        cold_gw.stop()
        if args.cold_only:
            print(f"cold /summary {cold['gateway']:.2f} ms, Prometheus' batched request {cold['single']:.2f} ms: "
                  f"ratio of medians {cold['gateway'] / cold['single']:.2f}, median of paired ratios "
                  f"{cold['paired']:.2f} (target <= 1.5; {args.rounds} rounds); with a bare client: "
                  f"{cold['gateway_lean']:.2f} ms vs {cold['single_lean']:.2f} ms, "
                  f"{cold['gateway_lean'] / cold['single_lean']:.2f} / paired {cold['paired_lean']:.2f}")
            return

        warm_gw = start_gateway(work / "warm", prom.url, 3600)
        procs.append(warm_gw)
        warm = warm_phase(warm_gw.url, args.seconds)
        warm_gw.stop()

        ttl = 2.0
        co_gw = start_gateway(work / "coalesce", prom.url, ttl)
        procs.append(co_gw)
        httpx.get(f"{co_gw.url}/prometheus/metrics/summary", timeout=5).raise_for_status()
        co = coalesce_phase(prom.url, co_gw.url, ttl, 10)
        shared = shared_phase(prom.url, co_gw.url, ttl, 10)
    finally:
        for p in procs:
            p.stop()
        backend.stop()

    lines = [
        f"Run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {args.rounds} rounds, medians.",
        "",
        "| measurement | result |",
        "|---|---|",
        f"| Prometheus: all {int(cold['figures'])} summary figures in one request | {cold['single']:.1f} ms |",
        f"| Prometheus: {int(cold['figures'])} requests one after another, one client | {cold['sequential']:.1f} ms |",
        f"| Prometheus: {int(cold['figures'])} requests concurrently, one httpx client | {cold['concurrent']:.1f} ms |",
        f"| replaced code's pattern: new client per query, one after another | {cold['legacy']:.1f} ms |",
        f"| **gateway cold /summary (TTL 0)** | **{cold['gateway']:.1f} ms** |",
        f"| ratio cold /summary / single request (target <= 1.5) | **{cold['gateway'] / cold['single']:.2f}** |",
        f"| the same, median of each round's back-to-back pair | **{cold['paired']:.2f}** |",
        f"| with a bare client (the lean transport alone): Prometheus / gateway cold /summary | "
        f"{cold['single_lean']:.1f} ms / {cold['gateway_lean']:.1f} ms |",
        f"| ratio with the bare client (median of medians / of pairs) | "
        f"{cold['gateway_lean'] / cold['single_lean']:.2f} / {cold['paired_lean']:.2f} |",
        f"| warm /summary at 50 connections (wrk) | {warm['summary_rps']:.0f} req/s |",
        f"| trivial /health of the same app at 50 connections | {warm['trivial_rps']:.0f} req/s |",
        f"| ratio warm /summary / trivial (target >= 0.8) | **{warm['summary_rps'] / warm['trivial_rps']:.2f}** |",
        f"| 100 clients x 10 s on /summary, TTL {ttl:g} s: requests served | {co['rps'] * 10:.0f} |",
        f"| upstream requests Prometheus received (its own counter) | {co['fetches']:.0f} |",
        f"| upstream requests the gateway counted (metrics_gateway_upstream_requests_total) | {co['own']:.0f} |",
        f"| upstream requests per query per TTL window (target ~1) | **{co['fetches_per_window']:.2f}** |",
        f"| /summary and /system together (8 shared figures), 2 x 50 clients x 10 s: upstream requests "
        f"| {shared['fetches']:.0f} |",
        f"| upstream requests per route per TTL window | **{shared['per_route_window']:.2f}** |",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
