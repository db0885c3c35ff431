#!/usr/bin/env python3
"""Soak: a real uvicorn gateway + real Prometheus + the synthetic backend, at a fixed rate.

Drives ``/prometheus/metrics/summary`` (JSON) and ``/prometheus/metrics/system``
(Prometheus text) at a fixed request rate (open loop: requests are started on a
schedule, not after the previous one finished) for ``--duration`` seconds:

- first third: Prometheus up;
- second third: Prometheus stopped (SIGTERM; the port refuses connections);
- last third: Prometheus restarted on the same port and data directory.

Reports p50/p99 latency, throughput, errors (non-2xx and transport errors),
upstream fetches per TTL window (Prometheus' own
``prometheus_http_requests_total{handler="/api/v1/query"}`` delta over the
phases it was up, and the gateway's ``metrics_gateway_upstream_requests_total``),
and the gateway's resident memory (VmRSS) after warm-up and at the end.

Usage: python scripts/soak.py [--duration 600] [--rate 40] [--ttl 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.procs import (  # noqa: E402
    Proc,
    _spawn,
    prometheus_query_requests,
    start_prometheus,
    start_uvicorn,
    wait_until,
)
from tests.support.synthetic_backend import SyntheticBackend, scrape_config  # noqa: E402

ROUTES = ("/prometheus/metrics/summary", "/prometheus/metrics/system")


@dataclass
class PhaseStats:
    name: str
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    transport_errors: int = 0
    degraded: int = 0

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        n = len(lat)
        ok = sum(v for k, v in self.statuses.items() if k.startswith("2"))
        non2xx = sum(v for k, v in self.statuses.items() if not k.startswith("2"))
        return {
            "phase": self.name,
            "seconds": round(self.seconds, 1),
            "requests": n + self.transport_errors,
            "ok_2xx": ok,
            "non_2xx": non2xx,
            "transport_errors": self.transport_errors,
            "errors": non2xx + self.transport_errors,
            "degraded_answers": self.degraded,
            "throughput_rps": round(n / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": round(_pct(lat, 0.50) * 1000, 2) if n else None,
            "p99_ms": round(_pct(lat, 0.99) * 1000, 2) if n else None,
            "max_ms": round(lat[-1] * 1000, 2) if n else None,
        }


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def gateway_counter(gateway_url: str, name: str) -> float:
    text = httpx.get(f"{gateway_url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


async def drive(client: httpx.AsyncClient, base: str, rate: float, seconds: float,
                stats: PhaseStats) -> None:
    """Open-loop load: one request every 1/rate s, alternating routes, for `seconds`."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    interval = 1.0 / rate
    tasks: set[asyncio.Task[None]] = set()

    async def one(path: str) -> None:
        t0 = time.perf_counter()
        try:
            r = await client.get(base + path)
        except httpx.HTTPError:
            stats.transport_errors += 1
            return
        stats.latencies.append(time.perf_counter() - t0)
        key = str(r.status_code)
        stats.statuses[key] = stats.statuses.get(key, 0) + 1
        if path.endswith("/summary") and r.status_code == 200:
            try:
                if r.json().get("status") != "ok":
                    stats.degraded += 1
            except ValueError:
                stats.transport_errors += 1
        elif r.status_code == 200 and b"gateway_upstream_up 0.0" in r.content:
            stats.degraded += 1

    i = 0
    while True:
        due = start + i * interval
        if due - start >= seconds:
            break
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = loop.create_task(one(ROUTES[i % len(ROUTES)]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    stats.seconds = loop.time() - start


def restart_prometheus(old: Proc) -> Proc:
    cmd = [str(a) for a in old.popen.args]  # type: ignore[union-attr]
    proc = _spawn(cmd, old.workdir, "prometheus-restarted", port=old.port, url=old.url)
    wait_until(lambda: httpx.get(f"{proc.url}/-/ready", timeout=1.0).status_code == 200, 60,
               what="prometheus ready after restart")
    return proc


async def soak(duration: float, rate: float, ttl: float, work: Path, log: Any) -> dict[str, Any]:
    backend = SyntheticBackend()
    target = backend.start()
    backend.backfill(work / "prom" / "data", job="backend")
    prom = start_prometheus(work / "prom", scrape_config(target))
    procs: list[Proc] = [prom]
    try:
        wait_until(lambda: httpx.post(f"{prom.url}/api/v1/query",
                                      data={"query": 'count_over_time(up{job="backend"}[1m]) >= 2'},
                                      timeout=2).json()["data"]["result"], 30, what="scrapes")
        gw = start_uvicorn(work / "gateway", "app.main:app", env={
            "PROMETHEUS_URL": prom.url, "CACHE_TTL_SECONDS": str(ttl), "LOG_LEVEL": "WARNING",
            "REQUEST_DEADLINE_SECONDS": "2", "BREAKER_RESET_SECONDS": "5",
            "REDIS_URL": "redis://127.0.0.1:1/0",
        })
        procs.append(gw)
        third = duration / 3
        results: dict[str, Any] = {"duration_s": duration, "rate_rps": rate, "ttl_s": ttl,
                                   "routes": list(ROUTES)}
        async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=200)) as client:
            warm = PhaseStats("warmup")
            await drive(client, gw.url, rate, min(10.0, third / 4), warm)
            rss_start = rss_kib(gw.popen.pid)
            own0 = gateway_counter(gw.url, "metrics_gateway_upstream_requests_total")
            prom0 = prometheus_query_requests(prom.url)
            log(f"warm-up done: rss {rss_start} KiB; phase 1 (Prometheus up) {third:.0f}s")

            p1 = PhaseStats("1 Prometheus up")
            await drive(client, gw.url, rate, third, p1)
            prom1 = prometheus_query_requests(prom.url)
            own1 = gateway_counter(gw.url, "metrics_gateway_upstream_requests_total")
            prom.stop()
            log(f"phase 1 done: {p1.summary()}; phase 2 (Prometheus stopped)")

            p2 = PhaseStats("2 Prometheus stopped")
            await drive(client, gw.url, rate, third, p2)
            own2 = gateway_counter(gw.url, "metrics_gateway_upstream_requests_total")
            log(f"phase 2 done: {p2.summary()}; restarting Prometheus")

            t_restart = time.monotonic()
            prom = restart_prometheus(prom)
            procs.append(prom)
            restart_s = time.monotonic() - t_restart
            prom3_0 = prometheus_query_requests(prom.url)
            own3_0 = gateway_counter(gw.url, "metrics_gateway_upstream_requests_total")
            p3 = PhaseStats("3 Prometheus restarted")
            await drive(client, gw.url, rate, third, p3)
            prom3 = prometheus_query_requests(prom.url)
            own3 = gateway_counter(gw.url, "metrics_gateway_upstream_requests_total")
            rss_end = rss_kib(gw.popen.pid)
            log(f"phase 3 done: {p3.summary()}")
            recovered = (await client.get(gw.url + ROUTES[0])).json().get("status")

        phases = [p1, p2, p3]
        all_lat = sorted(x for p in phases for x in p.latencies)
        total = PhaseStats("total", sum(p.seconds for p in phases), all_lat)
        for p in phases:
            for k, v in p.statuses.items():
                total.statuses[k] = total.statuses.get(k, 0) + v
            total.transport_errors += p.transport_errors
            total.degraded += p.degraded
        up_seconds = p1.seconds + p3.seconds
        windows = up_seconds / ttl
        prom_fetches = (prom1 - prom0) + (prom3 - prom3_0)
        own_up = (own1 - own0) + (own3 - own3_0)
        log_text = gw.log_path.read_text(errors="replace")
        results.update({
            "phases": [p.summary() for p in phases],
            "total": total.summary(),
            "prometheus_restart_seconds": round(restart_s, 1),
            "status_after_recovery": recovered,
            "upstream": {
                "ttl_windows_while_up": round(windows, 1),
                "prometheus_query_requests_while_up": prom_fetches,
                "gateway_upstream_requests_while_up": own_up,
                "gateway_upstream_requests_while_down": own2 - own1,
                "fetches_per_ttl_window": round(prom_fetches / windows, 2) if windows else None,
                "fetches_per_route_per_ttl_window": round(prom_fetches / windows / len(ROUTES), 2)
                if windows else None,
                "phase1_prometheus_query_requests": prom1 - prom0,
                "phase1_ttl_windows": round(p1.seconds / ttl, 1),
                "phase3_prometheus_query_requests": prom3 - prom3_0,
                "phase3_ttl_windows": round(p3.seconds / ttl, 1),
            },
            "rss_kib_start": rss_start,
            "rss_kib_end": rss_end,
            "rss_growth_pct": round(100.0 * (rss_end - rss_start) / rss_start, 2),
            "gateway_log_warning_lines": sum(1 for ln in log_text.splitlines() if " WARNING " in ln),
            "gateway_log_tail": log_text.splitlines()[-6:],
        })
        return results
    finally:
        for proc in reversed(procs):
            proc.stop()
        backend.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds, split in three phases")
    ap.add_argument("--rate", type=float, default=40.0, help="requests per second (both routes)")
    ap.add_argument("--ttl", type=float, default=5.0, help="gateway CACHE_TTL_SECONDS")
    ap.add_argument("--json", type=Path, help="write the result here")
    args = ap.parse_args()

    def log(msg: str) -> None:
        print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    result = asyncio.run(soak(args.duration, args.rate, args.ttl, work, log))
    result["workdir"] = str(work)
    result["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    total = result["total"]
    ok = total["errors"] == 0 and result["rss_growth_pct"] < 10
    print(f"soak: {total['requests']} requests, p99 {total['p99_ms']} ms, errors {total['errors']}, "
          f"rss {result['rss_growth_pct']}% -> {'PASS' if ok else 'FAIL'}", file=sys.stderr)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
