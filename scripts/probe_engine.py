#!/usr/bin/env python3
"""Reproduce the engine probes of issue 12 against a real gateway process and print the figures.

    PYTHONPATH=$PWD .venv/bin/python scripts/probe_engine.py              # all probes
    PYTHONPATH=$PWD .venv/bin/python scripts/probe_engine.py eviction big  # some of them
    ... --app-path /tmp/base   # run the gateway from another checkout (the code before a change)

Each probe starts its own uvicorn gateway (``app.main:app``) on 127.0.0.1 in front of
``tests/faults/engine_fake.py`` (a fake Prometheus on 127.0.0.1) and prints one JSON
object of figures; docs/reliability.md quotes them, before and after.

- ``eviction``: warm /summary, then 420 /providers requests with distinct ``provider=``
  values (no token), then an outage (HTTP 500): what /summary says, how many
  upstream requests the 420 cost;
- ``big``: a figure answering 50k series: /health latency while a cold /models text
  request runs, cached /models text latency, gateway RSS; 300k series: cold /summary time
  and status against its deadline;
- ``warnings``: answers carrying warnings, /summary under load: status, requests/s and
  upstream requests/s;
- ``ready``: 200 concurrent /ready against a probe that takes 1 s: upstream probes,
  /summary latency and status meanwhile, breaker state after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.faults.engine_fake import EngineFake  # noqa: E402
from tests.support.procs import Proc, start_uvicorn  # noqa: E402

SUMMARY = "/prometheus/metrics/summary"
BIG_FIGURE = "sum by (provider, model) (rate(model_inference_requests_total[5m]))"
APP_PATH: str | None = None


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)


@contextmanager
def gateway(fake: EngineFake, **env: str) -> Iterator[Proc]:
    base = {"PROMETHEUS_URL": fake.url, "LOG_LEVEL": "WARNING", "REDIS_URL": "redis://127.0.0.1:1/0",
            "READY_TIMEOUT_SECONDS": "5"}
    if APP_PATH:
        base["PYTHONPATH"] = APP_PATH
    with tempfile.TemporaryDirectory(prefix="probe-") as tmp:
        proc = start_uvicorn(Path(tmp), "app.main:app", env={**base, **env})
        try:
            yield proc
        finally:
            proc.stop()


@contextmanager
def fake_upstream() -> Iterator[EngineFake]:
    fake = EngineFake().start()
    try:
        yield fake
    finally:
        fake.stop()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def stale_failed(body: dict[str, Any]) -> dict[str, int]:
    states = [p["state"] for s in body["provenance"].values() for p in s.values()]
    return {s: states.count(s) for s in sorted(set(states))}


def metric_value(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- probes ----------------------------------------------------------------------------


def probe_eviction() -> dict[str, Any]:
    # TTL 1 s: by the time the outage starts, no figure is fresh; only last-good values can answer.
    with fake_upstream() as fake, gateway(fake, STALE_MAX_AGE_SECONDS="3600", CACHE_TTL_SECONDS="1") as gw:
        c = httpx.Client(base_url=gw.url, timeout=10)
        first = c.get(SUMMARY).json()
        before = fake.figure_requests
        statuses: dict[int, int] = {}
        t0 = time.perf_counter()

        async def attack() -> None:
            async with httpx.AsyncClient(base_url=gw.url, timeout=10,
                                         limits=httpx.Limits(max_connections=16)) as ac:
                sem = asyncio.Semaphore(16)

                async def one(i: int) -> None:
                    async with sem:
                        r = await ac.get("/prometheus/metrics/providers", params={"provider": f"p{i}"})
                        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

                await asyncio.gather(*(one(i) for i in range(420)))

        asyncio.run(attack())
        seconds = time.perf_counter() - t0
        attack_upstream = fake.figure_requests - before
        fake.mode = "internal"
        time.sleep(2.2)  # past the TTL grid step (at most two)
        after = c.get(SUMMARY).json()
        return {"probe": "eviction", "summary_before": first["status"], "attack_requests": 420,
                "attack_seconds": round(seconds, 2), "attack_statuses": statuses,
                "attack_upstream_requests": attack_upstream,
                "outage_summary_status": after["status"], "outage_states": stale_failed(after)}


def probe_big() -> dict[str, Any]:
    out: dict[str, Any] = {"probe": "big"}
    limit = str(96 * 1024 * 1024)
    # TTL 60 s: the cached requests below stay within one TTL window.
    with fake_upstream() as fake, gateway(fake, PROMETHEUS_MAX_RESPONSE_BYTES=limit, CACHE_TTL_SECONDS="60") as gw:
        c = httpx.Client(base_url=gw.url, timeout=30)
        c.get(SUMMARY)
        rss0 = rss_kib(gw.popen.pid)
        fake.big_series = 50_000
        fake.big_expr = BIG_FIGURE
        fake.big_items("0")  # build the big body before timing anything
        health: list[float] = []
        done = threading.Event()

        def poll() -> None:
            with httpx.Client(base_url=gw.url, timeout=30) as hc:
                while not done.is_set():
                    t = time.perf_counter()
                    hc.get("/health")
                    health.append(time.perf_counter() - t)
                    time.sleep(0.01)

        poller = threading.Thread(target=poll)
        poller.start()
        t0 = time.perf_counter()
        cold = c.get("/prometheus/metrics/models")
        cold_s = time.perf_counter() - t0
        time.sleep(0.6)  # past RESPONSE_MEMO_SECONDS, within the TTL
        cached = []
        for _ in range(5):
            t = time.perf_counter()
            r = c.get("/prometheus/metrics/models")
            cached.append(time.perf_counter() - t)
            time.sleep(0.6)
        done.set()
        poller.join()
        out.update({"series": 50_000, "cold_models_text_seconds": round(cold_s, 3),
                    "models_text_bytes": len(cold.content),
                    "truncated_gauge": 'gateway_query_truncated{query="model_inference_requests_per_second"} 1.0'
                                       in r.text,
                    "health_during_ms": {"p50": pct(health, 0.5), "p99": pct(health, 0.99),
                                         "max": pct(health, 1.0), "n": len(health)},
                    "cached_models_text_ms": [round(s * 1000, 1) for s in cached],
                    "rss_kib": [rss0, rss_kib(gw.popen.pid)]})
    with fake_upstream() as fake, gateway(fake, PROMETHEUS_MAX_RESPONSE_BYTES=limit) as gw:
        c = httpx.Client(base_url=gw.url, timeout=60)
        fake.big_series = 300_000
        fake.big_items("0")
        t0 = time.perf_counter()
        r = c.get(SUMMARY)
        out["cold_summary_300k"] = {"seconds": round(time.perf_counter() - t0, 3), "deadline": 3.0,
                                    "status": r.json()["status"], "states": stale_failed(r.json())}
    return out


def probe_warnings() -> dict[str, Any]:
    with fake_upstream() as fake, gateway(fake) as gw:
        fake.mode = "warnings"
        c = httpx.Client(base_url=gw.url, timeout=10)
        body = c.get(SUMMARY).json()
        text = c.get("/prometheus/metrics/system").text
        before = fake.figure_requests
        count = 0
        t0 = time.perf_counter()
        duration = 6.0  # longer than one WARNING_TTL_SECONDS step (5 s)

        async def load() -> None:
            nonlocal count
            async with httpx.AsyncClient(base_url=gw.url, timeout=10,
                                         limits=httpx.Limits(max_connections=32)) as ac:
                async def worker() -> None:
                    nonlocal count
                    while time.perf_counter() - t0 < duration:
                        await ac.get(SUMMARY)
                        count += 1

                await asyncio.gather(*(worker() for _ in range(32)))

        asyncio.run(load())
        seconds = time.perf_counter() - t0
        upstream = fake.figure_requests - before
        return {"probe": "warnings", "summary_status": body["status"],
                "text_warnings_gauge": "_query_warnings{" in text,
                "requests_per_second": round(count / seconds), "upstream_requests": upstream,
                "upstream_per_second": round(upstream / seconds, 1), "seconds": round(seconds, 2)}


def probe_ready() -> dict[str, Any]:
    with fake_upstream() as fake, gateway(fake, CACHE_TTL_SECONDS="1", RESPONSE_MEMO_SECONDS="0") as gw:
        c = httpx.Client(base_url=gw.url, timeout=10)
        c.get(SUMMARY)

        def summary_for(seconds: float) -> tuple[list[float], dict[str, int]]:
            lat: list[float] = []
            status: dict[str, int] = {}
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                t = time.perf_counter()
                s = c.get(SUMMARY).json()["status"]
                lat.append(time.perf_counter() - t)
                status[s] = status.get(s, 0) + 1
                time.sleep(0.02)
            return lat, status

        base_lat, base_status = summary_for(2.0)
        fake.ready_delay = 1.0
        probes0 = fake.ready_probes
        ready_codes: dict[str, int] = {}  # the prometheus check's outcome (redis is not running)
        stop = threading.Event()

        def storm() -> None:
            async def run() -> None:
                async with httpx.AsyncClient(base_url=gw.url, timeout=10,
                                             limits=httpx.Limits(max_connections=200)) as ac:
                    async def caller() -> None:
                        while not stop.is_set():
                            check = (await ac.get("/ready")).json()["checks"]["prometheus"]
                            k = "ok" if check["ok"] else check["detail"]
                            ready_codes[k] = ready_codes.get(k, 0) + 1

                    await asyncio.gather(*(caller() for _ in range(200)))

            asyncio.run(run())

        t = threading.Thread(target=storm)
        t.start()
        time.sleep(0.3)
        storm_lat, storm_status = summary_for(3.0)
        stop.set()
        t.join()
        metrics = c.get("/metrics").text
        return {"probe": "ready", "summary_alone_ms": {"p50": pct(base_lat, 0.5), "p99": pct(base_lat, 0.99)},
                "summary_alone_status": base_status,
                "summary_during_storm_ms": {"p50": pct(storm_lat, 0.5), "p99": pct(storm_lat, 0.99)},
                "summary_during_storm_status": storm_status, "ready_prometheus_check": ready_codes,
                "upstream_ready_probes": fake.ready_probes - probes0,
                "breaker_open_after": metric_value(metrics, 'metrics_gateway_circuit_breaker_state{state="open"}')}


PROBES = {"eviction": probe_eviction, "big": probe_big, "warnings": probe_warnings, "ready": probe_ready}


def main() -> None:
    global APP_PATH
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("probes", nargs="*", help=f"any of {', '.join(PROBES)} (default: all)")
    ap.add_argument("--app-path", help="PYTHONPATH of the gateway process (another checkout)")
    args = ap.parse_args()
    APP_PATH = args.app_path or os.environ.get("PYTHONPATH")
    unknown = set(args.probes) - set(PROBES)
    if unknown:
        ap.error(f"unknown probe(s) {sorted(unknown)}; choose from {list(PROBES)}")
    for name in args.probes or list(PROBES):
        print(json.dumps(PROBES[name]()), flush=True)
    print(f"# load average {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)", file=sys.stderr)


if __name__ == "__main__":
    main()
