"""Fleet benchmark: one cache for every worker and replica (the shared tier in Redis),
and the serving stack's cost, side by side in one run.

Against a real Prometheus (scraping the integration tests' synthetic backend) and a
real Redis, everything on loopback:

1. upstream requests per figure per TTL window (Prometheus' own
   prometheus_http_requests_total{handler="/api/v1/query"}) under wrk load on
   /summary: 1 process; 1 gunicorn x 4 workers; 3 instances x 2 workers (each on
   its own port, one Redis); the last two also without the shared tier;
2. p50/p99 of /summary with and without the shared tier: warm (local tier hit),
   cold (TTL 0: every request fetches), and a local miss the shared tier answers;
3. Redis killed in the middle of a load run and restarted: failed requests and
   the latency bound (every answer checked by a side client, too);
4. a replica restarted during a Prometheus outage: degraded, stale values, true age;
5. warm /summary throughput vs a bare FastAPI route (benchmarks/bare_app.py) on the
   same gunicorn configuration (target >= 0.8x).

Usage:
    .venv/bin/python benchmarks/bench_fleet.py                # ~6 minutes, 30 s load runs
    .venv/bin/python benchmarks/bench_fleet.py --seconds 10   # ~2.5 minutes
Needs prometheus, redis-server and wrk (Debian packages) on PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.procs import (  # noqa: E402
    Proc,
    prometheus_query_requests,
    start_gunicorn,
    start_prometheus,
    start_redis,
    wait_until,
)
from tests.support.synthetic_backend import SyntheticBackend, scrape_config  # noqa: E402
from tests.support.tcp_proxy import TcpProxy  # noqa: E402

SUMMARY = "/prometheus/metrics/summary"
APP = "app.main:app"


# -- load -----------------------------------------------------------------------------------

@dataclass
class WrkResult:
    requests: int = 0
    rps: float = 0.0
    non_2xx: int = 0
    socket_errors: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def wrk(url: str, connections: int, seconds: float, threads: int = 1) -> subprocess.Popen[str]:
    return subprocess.Popen(["wrk", f"-t{threads}", f"-c{connections}", f"-d{int(seconds)}s", "--latency",
                             "--timeout", "10s", url], stdout=subprocess.PIPE, text=True)


def wrk_result(proc: subprocess.Popen[str], timeout: float) -> WrkResult:
    out = proc.communicate(timeout=timeout)[0]
    r = WrkResult()
    if m := re.search(r"(\d+) requests in", out):
        r.requests = int(m.group(1))
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        r.rps = float(m.group(1))
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        r.non_2xx = int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        r.socket_errors = sum(int(x) for x in m.groups())
    if m := re.search(r"^\s+50%\s+(\S+)", out, re.M):
        r.p50_ms = _ms(m.group(1))
    if m := re.search(r"^\s+99%\s+(\S+)", out, re.M):
        r.p99_ms = _ms(m.group(1))
    if m := re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", out):
        r.max_ms = _ms(m.group(1))
    return r


def load(urls: list[str], clients: int, seconds: float) -> list[WrkResult]:
    """`clients` connections spread over `urls` (one wrk each), for `seconds`."""
    per = max(1, clients // len(urls))
    procs = [wrk(u, per, seconds) for u in urls]
    return [wrk_result(p, seconds + 60) for p in procs]


def merged(results: list[WrkResult]) -> WrkResult:
    return WrkResult(sum(r.requests for r in results), sum(r.rps for r in results),
                     sum(r.non_2xx for r in results), sum(r.socket_errors for r in results),
                     max(r.p50_ms for r in results), max(r.p99_ms for r in results),
                     max(r.max_ms for r in results))


# -- processes ------------------------------------------------------------------------------

@dataclass
class Bench:
    work: Path
    prom: Proc
    redis: Proc
    seconds: float
    clients: int
    started: list[Proc] = field(default_factory=list)

    def env(self, shared: bool, **extra: Any) -> dict[str, str]:
        env = {"PROMETHEUS_URL": self.prom.url, "VROPS_TARGETS": "[]", "LOG_LEVEL": "WARNING",
               "GATEWAY_CACHE_URL": self.redis.url if shared else "off",
               "GATEWAY_CACHE_PREFIX": f"b{uuid.uuid4().hex[:8]}"}
        env.update({k.upper(): str(v) for k, v in extra.items()})
        return env

    def fleet(self, instances: int, workers: int, env: dict[str, str], app: str = APP) -> list[Proc]:
        with ThreadPoolExecutor(instances) as pool:
            procs = list(pool.map(lambda i: start_gunicorn(self.work / f"g{uuid.uuid4().hex[:6]}", app, env,
                                                           workers=workers), range(instances)))
        self.started += procs
        return procs

    def stop(self, procs: list[Proc]) -> None:
        for p in procs:
            p.stop()
            if p in self.started:
                self.started.remove(p)


def summary_ok(url: str) -> None:
    doc = httpx.get(url + SUMMARY, timeout=10).json()
    if doc["status"] != "ok":
        raise RuntimeError(f"{url}: {doc['status']}: {doc['errors']}")


# -- 1. upstream requests per figure per TTL window -----------------------------------------------

def phase_upstream(b: Bench, ttl: float) -> list[tuple[str, WrkResult, float, int]]:
    rows = []
    configs = [("1 process (1 worker), shared tier", 1, 1, True),
               ("1 gunicorn x 4 workers, shared tier", 1, 4, True),
               ("3 instances x 2 workers, one Redis", 3, 2, True),
               ("1 gunicorn x 4 workers, no shared tier", 1, 4, False),
               ("3 instances x 2 workers, no shared tier", 3, 2, False)]
    for name, instances, workers, shared in configs:
        procs = b.fleet(instances, workers, b.env(shared, cache_ttl_seconds=ttl))
        urls = [p.url + SUMMARY for p in procs]
        for p in procs:
            summary_ok(p.url)
        # Start on a window boundary, so every run covers the same number of windows.
        time.sleep(ttl - time.time() % ttl + 0.05)
        before = prometheus_query_requests(b.prom.url)
        t0 = time.time()
        res = merged(load(urls, b.clients, b.seconds))
        t1 = time.time()
        fetches = prometheus_query_requests(b.prom.url) - before
        windows = math.floor(t1 / ttl) - math.floor(t0 / ttl) + 1  # TTL grid steps the run touched
        rows.append((name, res, fetches, windows))
        print(f"  {name}: {res.requests} requests, {fetches:.0f} upstream in {windows} windows", flush=True)
        b.stop(procs)
    return rows


# -- 2. latency with and without the shared tier ---------------------------------------------------

async def _timed(client: httpx.AsyncClient, url: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        r = await client.get(url)
        out.append((time.perf_counter() - t) * 1000)
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}")
    return out


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def phase_latency(b: Bench, n: int) -> list[tuple[str, float, float, float, float]]:
    """(case, p50 without, p99 without, p50 with, p99 with), requests alternating
    between the two instances so machine noise hits both alike."""
    cases = [("warm (local tier hit)", {"cache_ttl_seconds": 3600, "response_memo_seconds": 0}),
             ("cold (TTL 0: every request fetches)", {"cache_ttl_seconds": 0})]
    rows = []
    for name, extra in cases:
        off, on = (b.fleet(1, 1, b.env(shared, **extra))[0] for shared in (False, True))
        for p in (off, on):
            summary_ok(p.url)

        async def run(off: Proc = off, on: Proc = on) -> tuple[list[float], list[float]]:
            a: list[float] = []
            c: list[float] = []
            async with httpx.AsyncClient(timeout=10) as client:
                await _timed(client, off.url + SUMMARY, 20)
                await _timed(client, on.url + SUMMARY, 20)
                for _ in range(n // 10):
                    a += await _timed(client, off.url + SUMMARY, 10)
                    c += await _timed(client, on.url + SUMMARY, 10)
            return a, c

        without, with_ = asyncio.run(run())
        rows.append((name, _pct(without, .5), _pct(without, .99), _pct(with_, .5), _pct(with_, .99)))
        print(f"  {name}: p50/p99 {rows[-1][1]:.2f}/{rows[-1][2]:.2f} ms without, "
              f"{rows[-1][3]:.2f}/{rows[-1][4]:.2f} ms with", flush=True)
        b.stop([off, on])
    return rows


def phase_follower(b: Bench, windows: int, ttl: float = 0.5) -> tuple[float, float, float, float]:
    """A second process's first request in a TTL window, right after the first process
    fetched: without the tier it asks Prometheus, with it Redis has the figures.
    (p50 without, p99 without, p50 with, p99 with.)"""
    extra = {"cache_ttl_seconds": ttl, "response_memo_seconds": 0}
    first_off, second_off = b.fleet(2, 1, b.env(False, **extra))
    first_on, second_on = b.fleet(2, 1, b.env(True, **extra))
    without: list[float] = []
    with_: list[float] = []
    with httpx.Client(timeout=10) as client:
        for _ in range(windows):
            time.sleep(ttl - time.time() % ttl + 0.02)
            for p in (first_off, first_on):
                client.get(p.url + SUMMARY).raise_for_status()
            for p, into in ((second_off, without), (second_on, with_)):
                t = time.perf_counter()
                client.get(p.url + SUMMARY).raise_for_status()
                into.append((time.perf_counter() - t) * 1000)
    b.stop([first_off, second_off, first_on, second_on])
    return _pct(without, .5), _pct(without, .99), _pct(with_, .5), _pct(with_, .99)


# -- 3. Redis killed and restarted under load ----------------------------------------------------

@dataclass
class Watch:
    """A side client checking every answer's status and time while wrk loads."""

    urls: list[str]
    answers: int = 0
    failed: int = 0
    not_ok: int = 0
    worst_ms: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            i = 0
            while not self.stop.is_set():
                t = time.perf_counter()
                try:
                    r = client.get(self.urls[i % len(self.urls)] + SUMMARY)
                    ok = r.status_code == 200
                    status = r.json()["status"] if ok else None
                except httpx.HTTPError:
                    ok, status = False, None
                self.worst_ms = max(self.worst_ms, (time.perf_counter() - t) * 1000)
                self.answers += 1
                self.failed += not ok
                self.not_ok += ok and status != "ok"
                i += 1
                time.sleep(0.01)


def phase_redis_kill(b: Bench, ttl: float) -> dict[str, Any]:
    own = start_redis(b.work / f"redis-kill-{uuid.uuid4().hex[:6]}")
    env = b.env(True, cache_ttl_seconds=ttl)
    env["GATEWAY_CACHE_URL"] = own.url
    procs = b.fleet(2, 2, env)
    try:
        for p in procs:
            summary_ok(p.url)
        # The same load with Redis up throughout: the latency to hold.
        baseline = merged([wrk_result(r, b.seconds + 60)
                           for r in [wrk(p.url + SUMMARY, b.clients // 2, b.seconds / 2) for p in procs]])
        watch = Watch([p.url for p in procs])
        watcher = threading.Thread(target=watch.run, daemon=True)
        before = prometheus_query_requests(b.prom.url)
        runs = [wrk(p.url + SUMMARY, b.clients // 2, b.seconds) for p in procs]
        watcher.start()
        time.sleep(b.seconds / 3)
        os.kill(own.popen.pid, signal.SIGKILL)  # the Redis this phase started
        own.popen.wait(5)
        killed_at = time.monotonic()
        time.sleep(b.seconds / 3)
        own = start_redis(own.workdir, port=own.port)
        down_for = time.monotonic() - killed_at
        res = merged([wrk_result(r, b.seconds + 60) for r in runs])
        watch.stop.set()
        watcher.join(15)
        fetches = prometheus_query_requests(b.prom.url) - before
        return {"load": res, "baseline": baseline, "watch": watch, "down_for": down_for, "fetches": fetches,
                "per_window": fetches / (b.seconds / ttl)}
    finally:
        b.stop(procs)
        own.stop()


# -- 4. replica restarted during an outage ----------------------------------------------------

def phase_outage_restart(b: Bench) -> dict[str, Any]:
    proxy = TcpProxy("127.0.0.1", b.prom.port).start()
    try:
        env = b.env(True, cache_ttl_seconds=1)
        env["PROMETHEUS_URL"] = proxy.url
        (first,) = b.fleet(1, 2, env)
        t_fetch = time.time()
        good = httpx.get(first.url + SUMMARY, timeout=10).json()
        time.sleep(0.3)
        b.stop([first])
        proxy.down()
        time.sleep(3)
        (second,) = b.fleet(1, 2, env)
        doc = httpx.get(second.url + SUMMARY, timeout=10).json()
        true_age = time.time() - t_fetch
        ages = [p["age_seconds"] for s in doc["provenance"].values() for p in s.values() if "age_seconds" in p]
        states = {p["state"] for s in doc["provenance"].values() for p in s.values()}
        b.stop([second])
        return {"status": doc["status"], "states": states, "same_values": doc["metrics"] == good["metrics"],
                "age_min": min(ages), "age_max": max(ages), "true_age": true_age}
    finally:
        proxy.stop()


# -- 5. warm /summary vs a bare FastAPI route ------------------------------------------------

def phase_throughput(b: Bench, seconds: float, workers: int) -> dict[str, Any]:
    (gw,) = b.fleet(1, workers, b.env(True, cache_ttl_seconds=3600))
    (bare,) = b.fleet(1, workers, {"LOG_LEVEL": "WARNING"}, app="benchmarks.bare_app:app")
    summary_ok(gw.url)
    rps: dict[str, list[float]] = {"gw": [], "bare": [], "bare_bytes": []}
    errors = 0
    for _ in range(3):  # interleaved, so drift hits all alike; medians
        for name, url in (("bare", bare.url + "/bare"), ("gw", gw.url + SUMMARY),
                          ("bare_bytes", bare.url + "/bare_bytes")):
            r = wrk_result(wrk(url, 50, seconds, threads=1), seconds + 60)
            errors += r.non_2xx + r.socket_errors
            rps[name].append(r.rps)
    b.stop([gw, bare])
    return {k: statistics.median(v) for k, v in rps.items()} | {"errors": errors}


# -- main -----------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30, help="length of each load run (default 30)")
    ap.add_argument("--clients", type=int, default=150, help="concurrent connections (default 150)")
    ap.add_argument("--ttl", type=float, default=2.0, help="cache TTL of the load runs (default 2 s)")
    ap.add_argument("--latency-requests", type=int, default=400)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    for tool in ("wrk", "prometheus", "redis-server"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed (Debian package)")

    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    backend = SyntheticBackend()
    target = backend.start()
    backend.backfill(work / "prom" / "data", job="backend")
    prom = start_prometheus(work / "prom", scrape_config(target))
    redis = start_redis(work / "redis")
    b = Bench(work, prom, redis, args.seconds, args.clients)
    started = time.time()
    try:
        wait_until(lambda: httpx.post(f"{prom.url}/api/v1/query",
                                      data={"query": 'count_over_time(up{job="backend"}[1m]) >= 2'}
                                      ).json()["data"]["result"], 30, what="scrapes")
        step: Callable[[str], None] = lambda s: print(f"[{time.time() - started:5.0f}s] {s}", flush=True)  # noqa: E731
        step("1. upstream requests per TTL window")
        upstream = phase_upstream(b, args.ttl)
        step("2. latency with and without the shared tier")
        latency = phase_latency(b, args.latency_requests)
        latency.append(("a second process's first request in a window (Redis has it)",
                        *phase_follower(b, max(20, int(args.seconds)))))
        step("3. Redis killed and restarted under load")
        kill = phase_redis_kill(b, 1.0)
        step("4. replica restarted during a Prometheus outage")
        outage = phase_outage_restart(b)
        step("5. warm /summary vs a bare FastAPI route")
        tputs = {w: phase_throughput(b, max(5.0, args.seconds / 6), w) for w in (1, 2)}
    finally:
        for p in list(b.started):
            p.stop()
        redis.stop()
        prom.stop()
        backend.stop()
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        f"Run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {args.clients} connections (wrk), "
        f"{args.seconds:g} s per load run, TTL {args.ttl:g} s, "
        f"took {time.time() - started:.0f} s.",
        "",
        "| /summary under load | requests served | failed | upstream requests (Prometheus' counter) "
        "| TTL windows | per figure per TTL window |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, res, fetches, n_windows in upstream:
        bold = "" if "no shared" in name else "**"
        lines.append(f"| {name} | {res.requests} | {res.non_2xx + res.socket_errors} | {fetches:.0f} | {n_windows} "
                     f"| {bold}{fetches / n_windows:.2f}{bold} |")
    lines += ["", "| /summary latency, one client, alternating | p50 without | p99 without | p50 with "
              "| p99 with | added p99 |", "|---|---:|---:|---:|---:|---:|"]
    for name, p50a, p99a, p50b, p99b in latency:
        lines.append(f"| {name} | {p50a:.2f} ms | {p99a:.2f} ms | {p50b:.2f} ms | {p99b:.2f} ms "
                     f"| {p99b - p99a:+.2f} ms |")
    k, w = kill["load"], kill["watch"]
    lines += [
        "",
        "| Redis SIGKILLed at 1/3 of a load run, restarted at 2/3 (2 instances x 2 workers, TTL 1 s) | result |",
        "|---|---|",
        f"| requests served (wrk, {args.clients} connections) | {k.requests} |",
        f"| failed: non-2xx + socket errors | **{k.non_2xx + k.socket_errors}** |",
        f"| latency p50 / p99 / max | {k.p50_ms:.1f} / {k.p99_ms:.1f} / {k.max_ms:.1f} ms |",
        f"| the same load with Redis up (half as long): p50 / p99 / max | {kill['baseline'].p50_ms:.1f} / "
        f"{kill['baseline'].p99_ms:.1f} / {kill['baseline'].max_ms:.1f} ms |",
        "| request deadline (REQUEST_DEADLINE_SECONDS) | 3000 ms |",
        f"| side client: answers checked, failed, not \"ok\", slowest | {w.answers}, {w.failed}, {w.not_ok}, "
        f"{w.worst_ms:.0f} ms |",
        f"| Redis down for | {kill['down_for']:.1f} s |",
        f"| upstream requests per TTL window over the run (4 processes alone while Redis is down) "
        f"| {kill['per_window']:.2f} |",
        "",
        "| replica restarted during a Prometheus outage | result |",
        "|---|---|",
        f"| /summary status | {outage['status']} |",
        f"| figure states | {', '.join(sorted(outage['states']))} |",
        f"| values equal the last good ones | {outage['same_values']} |",
        f"| age reported (min - max) vs true age of the last fetch | {outage['age_min']:.1f} - "
        f"{outage['age_max']:.1f} s vs {outage['true_age']:.1f} s |",
        "",
        "| warm /summary vs a bare FastAPI route on the same gunicorn configuration, wrk 50 connections, "
        "median of 3 interleaved runs | 1 worker each | 2 workers each |",
        "|---|---:|---:|",
        f"| bare FastAPI route returning a dict (benchmarks/bare_app.py /bare) | {tputs[1]['bare']:.0f} req/s "
        f"| {tputs[2]['bare']:.0f} req/s |",
        f"| bare FastAPI route returning prebuilt bytes (/bare_bytes) | {tputs[1]['bare_bytes']:.0f} req/s "
        f"| {tputs[2]['bare_bytes']:.0f} req/s |",
        f"| warm /summary | {tputs[1]['gw']:.0f} req/s | {tputs[2]['gw']:.0f} req/s |",
        f"| ratio to the dict route (target >= 0.8) | **{tputs[1]['gw'] / tputs[1]['bare']:.2f}** "
        f"| **{tputs[2]['gw'] / tputs[2]['bare']:.2f}** |",
        f"| ratio to the prebuilt-bytes route | **{tputs[1]['gw'] / tputs[1]['bare_bytes']:.2f}** "
        f"| **{tputs[2]['gw'] / tputs[2]['bare_bytes']:.2f}** |",
        f"| errors | {tputs[1]['errors']} | {tputs[2]['errors']} |",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
