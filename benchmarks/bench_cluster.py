"""Cluster benchmark: the shared tier on a real 3-master Redis Cluster under a fleet,
against the same fleet on one Redis, in one run; then a master killed mid-run.

Against a real Prometheus holding a week of GatewayZ-shaped history (benchmarks/dataset.py:
580 series at 60 s) and scraping the integration tests' synthetic backend every second
(the widgets' live figures); everything on loopback:

- a fleet of 2 gateway instances x 2 workers (gunicorn -c gunicorn.conf.py), shared tier
  on (a) one Redis, (b) a Redis Cluster of 3 masters + 3 replicas (redis-cli --cluster create);
- load: `viewers` threads, each opening a dashboard of week-long range panels (step 10 min,
  some viewers on past weeks) plus the widgets' figures (/prometheus/metrics/summary), again
  and again, spread over both instances;
- measured per run: keys and bytes per master, upstream requests per figure per TTL window
  (Prometheus' own prometheus_http_requests_total{handler="/api/v1/query"}, divided by what
  one cold /summary costs), upstream range queries, request latency;
- then, on the cluster, the master holding the most keys is SIGKILLed at a third of a run:
  failed requests (non-200, errors), answers that differ from Prometheus' own answer for the
  same request (every range answer of that run is checked), the slowest answer, the failover
  (its replica promoted, the gateways' metrics_gateway_shared_cache_topology_changes_total).

Usage:
    .venv/bin/python benchmarks/bench_cluster.py                  # ~4 minutes, 30 s runs
    .venv/bin/python benchmarks/bench_cluster.py --seconds 15 --days 2 --series 300
Needs prometheus, promtool, redis-server and redis-cli (Debian packages) on PATH.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.dataset import ensure  # noqa: E402
from tests.support.history import start_prometheus_on  # noqa: E402
from tests.support.procs import (  # noqa: E402
    Proc,
    prometheus_query_requests,
    prometheus_range_requests,
    start_gunicorn,
    start_redis,
    wait_until,
)
from tests.support.redis_cluster import RedisClusterProcs, start_redis_cluster  # noqa: E402
from tests.support.synthetic_backend import SyntheticBackend, scrape_config  # noqa: E402

SUMMARY = "/prometheus/metrics/summary"
# The dashboard as viewers have it open: last 7 days (Grafana's step on a ~1000 px panel:
# 10 min), last 2 days, last day, last 6 hours; viewer n has view n % 4.
VIEWS = [(7 * 86400, 600), (2 * 86400, 300), (86400, 120), (6 * 3600, 30)]
PANELS = [
    "sum by (provider, model) (rate(model_inference_requests_total[30m]))",
    "rate(model_inference_requests_total[30m])",
    "histogram_quantile(0.95, sum by (le, provider, model) (rate(model_inference_duration_seconds_bucket[30m])))",
    "sum by (provider) (rate(credits_used_total[30m])) * 3600",
    "sum by (provider) (rate(gatewayz_api_cost_usd_total[30m])) * 3600",
    "sum by (provider, model) (rate(tokens_used_total[30m]))",
    "avg by (provider) (provider_error_rate)",
    "histogram_quantile(0.95, sum by (le) (rate(fastapi_requests_duration_seconds_bucket[30m])))",
]


def gateway_counter(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))] if s else 0.0


@dataclass
class Load:
    """Viewers opening the dashboard (range panels + widgets) over the fleet's instances."""

    urls: list[str]
    prom: str
    days: int
    check: bool = False  # compare every range answer with Prometheus' own
    requests: int = 0
    failed: int = 0
    differ: int = 0
    panels: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def form(self, expr: str, view: int) -> dict[str, str]:
        """The panel's request: aligned to its step as Grafana aligns it, ending at least
        30 s ago (settled: Prometheus' own answer to it does not change)."""
        span, step = VIEWS[view % len(VIEWS)]
        span = min(span, self.days * 86400 - 3600)
        end = (int(time.time()) - 30) // step * step
        return {"query": expr, "start": str(end - span // step * step), "end": str(end), "step": str(step)}

    def viewer(self, n: int) -> None:
        ask = itertools.count(n)
        with httpx.Client(timeout=30) as http:
            while not self.stop.is_set():
                i = next(ask)
                url = self.urls[i % len(self.urls)]
                for j, expr in enumerate([None, *PANELS]):
                    if self.stop.is_set():
                        return
                    t = time.perf_counter()
                    try:
                        if expr is None:
                            got = http.get(url + SUMMARY)
                            ok = got.status_code == 200 and got.json()["status"] in ("ok", "degraded")
                            form = None
                        else:
                            form = self.form(expr, n)
                            got = http.post(url + "/api/v1/query_range", data=form)
                            ok = got.status_code == 200
                        said = f"{got.status_code} {got.text[:160]}"
                    except httpx.HTTPError as exc:
                        ok, said, form = False, repr(exc), None
                    took = time.perf_counter() - t
                    same = True
                    if ok and form is not None and self.check:
                        direct = http.post(f"{self.prom}/api/v1/query_range", data=form)
                        same = direct.content == got.content
                    with self.lock:
                        self.requests += 1
                        self.panels += expr is not None
                        self.latencies.append(took * 1000)
                        self.failed += not ok
                        self.differ += not same
                        if (not ok or not same) and len(self.errors) < 5:
                            self.errors.append(f"{url} panel {j}: {said if not ok else 'differs from Prometheus'}")

    def run(self, viewers: int, seconds: float, during: Callable[[], None] | None = None) -> None:
        threads = [threading.Thread(target=self.viewer, args=(n,), daemon=True) for n in range(viewers)]
        for t in threads:
            t.start()
        started = time.monotonic()
        if during is not None:
            during()
        time.sleep(max(0.0, seconds - (time.monotonic() - started)))
        self.stop.set()
        for t in threads:
            t.join(60)


@dataclass
class Bench:
    work: Path
    prom: Proc
    seconds: float
    viewers: int
    ttl: float
    days: int
    started: list[Proc] = field(default_factory=list)

    def fleet(self, cache_url: str) -> list[Proc]:
        return self.fleet_of(cache_url, workers=2, instances=2)

    def fleet_of(self, cache_url: str, *, workers: int, instances: int) -> list[Proc]:
        env = {"PROMETHEUS_URL": self.prom.url, "VROPS_TARGETS": "[]", "LOG_LEVEL": "WARNING",
               "GATEWAY_CACHE_URL": cache_url, "GATEWAY_CACHE_PREFIX": f"c{uuid.uuid4().hex[:8]}",
               "CACHE_TTL_SECONDS": str(self.ttl), "REQUEST_DEADLINE_SECONDS": "10",
               "GATEWAY_CACHE_BREAKER_RESET_SECONDS": "1"}
        procs = [start_gunicorn(self.work / f"g{uuid.uuid4().hex[:6]}", "app.main:app", env, workers=workers)
                 for _ in range(instances)]
        self.started += procs
        return procs

    def stop(self, procs: list[Proc]) -> None:
        for p in procs:
            p.stop()
            self.started.remove(p)


def summary_cost(b: Bench) -> float:
    """Upstream instant queries one cold /summary costs (one process, no shared tier)."""
    (one,) = [start_gunicorn(b.work / "cost", "app.main:app",
                             {"PROMETHEUS_URL": b.prom.url, "VROPS_TARGETS": "[]", "GATEWAY_CACHE_URL": "off",
                              "CACHE_TTL_SECONDS": "3600"}, workers=1)]
    try:
        before = prometheus_query_requests(b.prom.url)
        httpx.get(one.url + SUMMARY, timeout=30).raise_for_status()
        return prometheus_query_requests(b.prom.url) - before
    finally:
        one.stop()


def phase_sizing(b: Bench, redis_url: str) -> dict[str, Any]:
    """Bytes Redis holds (MEMORY USAGE of the tier's keys) for one cached week-long panel and
    for the whole figure set (every category), on an empty Redis, one gateway process."""
    import redis as redis_sync

    def used(r: redis_sync.Redis) -> int:
        return sum(int(r.memory_usage(k) or 0) for k in r.scan_iter(count=1000))

    out: dict[str, Any] = {}
    (one,) = b.fleet_of(redis_url, workers=1, instances=1)
    try:
        with redis_sync.Redis.from_url(redis_url) as r, httpx.Client(timeout=60) as http:
            r.flushall()
            form = Load([], b.prom.url, b.days).form(PANELS[1], 0)
            body = http.post(one.url + "/api/v1/query_range", data=form)
            body.raise_for_status()
            time.sleep(0.5)
            doc = body.json()["data"]["result"]
            out["panel_series"], out["panel_points"] = len(doc), sum(len(s["values"]) for s in doc)
            out["panel_answer"], out["panel_redis"], out["panel_keys"] = len(body.content), used(r), r.dbsize()
            r.flushall()
            http.get(one.url + "/prometheus/metrics/all").raise_for_status()
            time.sleep(0.5)
            out["figures_redis"], out["figures_keys"] = used(r), r.dbsize()
            r.flushall()
    finally:
        b.stop([one])
    print(f"  sizing: {out}", flush=True)
    return out


def phase(b: Bench, name: str, cache_url: str, keys: Callable[[], tuple[dict[Any, int], dict[Any, int]]],
          cost: float) -> dict[str, Any]:
    """The load on a fleet with the shared tier at `cache_url`."""
    procs = b.fleet(cache_url)
    try:
        load = Load([p.url for p in procs], b.prom.url, b.days)
        load.run(b.viewers, 3)  # warm: every panel fetched once
        time.sleep(b.ttl - time.time() % b.ttl + 0.05)  # start on a TTL window boundary
        load = Load([p.url for p in procs], b.prom.url, b.days)
        q0, r0, t0 = prometheus_query_requests(b.prom.url), prometheus_range_requests(b.prom.url), time.time()
        load.run(b.viewers, b.seconds)
        t1 = time.time()
        fetches, ranges = prometheus_query_requests(b.prom.url) - q0, prometheus_range_requests(b.prom.url) - r0
        windows = math.floor(t1 / b.ttl) - math.floor(t0 / b.ttl) + 1
        per_master, bytes_per_master = keys()
        row = {"name": name, "load": load, "fetches": fetches, "windows": windows,
               "per_figure": fetches / windows / cost, "ranges": ranges,
               "keys": per_master, "bytes": bytes_per_master}
        print(f"  {name}: {load.requests} requests ({load.failed} failed), {fetches:.0f} upstream queries in "
              f"{windows} windows ({row['per_figure']:.2f} per figure per window), {ranges:.0f} range queries, "
              f"keys per master {per_master}", flush=True)
        return row
    finally:
        b.stop(procs)


def phase_kill(b: Bench, cluster: RedisClusterProcs) -> dict[str, Any]:
    """A master SIGKILLed at a third of a run; every range answer checked against Prometheus."""
    procs = b.fleet(cluster.url)
    try:
        warm = Load([p.url for p in procs], b.prom.url, b.days)
        warm.run(b.viewers, 3)
        load = Load([p.url for p in procs], b.prom.url, b.days, check=True)
        keys = cluster.keys_per_master()
        victim = max(cluster.masters(), key=lambda m: keys[m.port])
        out: dict[str, Any] = {"victim_share": keys[victim.port] / max(1, sum(keys.values()))}

        def kill() -> None:
            time.sleep(b.seconds / 3)
            replica = cluster.replica_of(victim)
            os.killpg(cluster.proc(victim.port).popen.pid, signal.SIGKILL)  # a node this benchmark started
            killed = time.monotonic()
            cluster.wait_promoted(replica, timeout=b.seconds)
            out["failover_s"] = time.monotonic() - killed
            out["promoted"] = replica.port in {m.port for m in cluster.masters()}

        load.run(b.viewers, b.seconds, during=kill)
        out["load"] = load
        out["topology_changes"] = [gateway_counter(p.url, "metrics_gateway_shared_cache_topology_changes_total")
                                   for p in procs]
        logs = [p.log() for p in procs]
        out["failing_lines"] = sum(log.count("shared cache tier (Redis) failing") for log in logs)
        out["recovered_lines"] = sum(log.count("shared cache tier (Redis) recovered") for log in logs)
        for log in logs:
            for line in log.splitlines():
                if "gateway.shared" in line:
                    print("   ", line[:240], flush=True)
        print(f"  kill: {load.requests} requests, {load.failed} failed, {load.differ} differ, failover "
              f"{out.get('failover_s', float('nan')):.1f} s, topology changes {out['topology_changes']}", flush=True)
        return out
    finally:
        b.stop(procs)


def report(args: argparse.Namespace, took: float, cost: float, panel_bytes: int, sizing: dict[str, Any],
           runs: tuple[dict[str, Any], dict[str, Any]], kill: dict[str, Any]) -> str:
    """The run's figures as the tables of docs/benchmarks.md."""
    single, on_cluster = runs
    lines = [
        f"Run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {args.viewers} viewers, {args.seconds:g} s "
        f"per run, figure TTL {args.ttl:g} s, {args.days} days of history, took {took:.0f} s. "
        f"One cold /summary costs {cost:.0f} upstream queries; one week-long panel answer is {panel_bytes} bytes.",
        "",
        "| fleet (2 gunicorn instances x 2 workers) | requests | failed | p50 / p99 | upstream queries "
        "| TTL windows | per figure per TTL window | range queries upstream | keys per master | bytes per master "
        "| largest master's share (keys / bytes) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for row in (single, on_cluster):
        ld, keys, data = row["load"], row["keys"], row["bytes"]
        share_k = max(keys.values()) / max(1, sum(keys.values()))
        share_b = max(data.values()) / max(1, sum(data.values()))
        lines.append(
            f"| {row['name']} | {ld.requests} | {ld.failed} | {_pct(ld.latencies, .5):.0f} / "
            f"{_pct(ld.latencies, .99):.0f} ms | {row['fetches']:.0f} | {row['windows']} | **{row['per_figure']:.2f}** "
            f"| {row['ranges']:.0f} | {' / '.join(str(v) for v in keys.values())} "
            f"| {' / '.join(f'{v / 1e6:.1f} MB' for v in data.values())} | **{share_k:.0%} / {share_b:.0%}** |")
    sz = sizing
    per_point = sz["panel_redis"] / max(1, sz["panel_points"])
    lines += [
        "",
        "| sizing (MEMORY USAGE of the tier's keys, one process, empty Redis) | measured |",
        "|---|---|",
        f"| one cached 7-day panel (step 10 min): {sz['panel_series']} series, {sz['panel_points']} points, "
        f"answer {sz['panel_answer']} bytes | **{sz['panel_redis'] / 1e3:.0f} kB** in {sz['panel_keys']} keys "
        f"({per_point:.0f} bytes per point; 100 series: {per_point * 100 * 1009 / 1e6:.1f} MB) |",
        f"| the whole figure set (GET /prometheus/metrics/all) | **{sz['figures_redis'] / 1e3:.0f} kB** in "
        f"{sz['figures_keys']} keys |",
    ]
    ld = kill["load"]
    lines += [
        "",
        "| Redis Cluster master (the one holding the most keys) SIGKILLed at 1/3 of a run | result |",
        "|---|---|",
        f"| keys on the killed master | {kill['victim_share']:.0%} |",
        f"| requests (range panels + widgets) | {ld.requests} ({ld.panels} range panels) |",
        f"| failed (non-200, errors) | **{ld.failed}** |",
        f"| range answers different from Prometheus' own for the same request (all checked) | **{ld.differ}** |",
        f"| slowest answer / p99 / p50 | {max(ld.latencies, default=0):.0f} / {_pct(ld.latencies, .99):.0f} / "
        f"{_pct(ld.latencies, .5):.0f} ms |",
        f"| failover: replica promoted, after | {'yes' if kill.get('promoted') else 'NO'}, "
        f"{kill.get('failover_s', float('nan')):.1f} s (cluster-node-timeout 1 s) |",
        f"| slot-map changes followed, per instance (metrics_gateway_shared_cache_topology_changes_total) | "
        f"{' / '.join(f'{v:.0f}' for v in kill['topology_changes'])} |",
        f"| log lines: episodes started / ended (4 workers) | {kill['failing_lines']} / {kill['recovered_lines']} |",
    ]
    if ld.errors:
        lines += ["", "Errors: " + "; ".join(ld.errors)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30, help="length of each load run (default 30)")
    ap.add_argument("--viewers", type=int, default=6, help="concurrent viewers (default 6)")
    ap.add_argument("--ttl", type=float, default=5.0, help="figure cache TTL (default 5 s)")
    ap.add_argument("--days", type=int, default=7, help="days of history (default 7)")
    ap.add_argument("--series", type=int, default=580, help="series of history (default 580)")
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    for tool in ("prometheus", "promtool", "redis-server", "redis-cli"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed (Debian package)")

    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    started = time.time()
    step: Callable[[str], None] = lambda s: print(f"[{time.time() - started:5.0f}s] {s}", flush=True)  # noqa: E731
    backend = SyntheticBackend()
    target = backend.start()
    redis: Proc | None = None
    cluster: RedisClusterProcs | None = None
    prom: Proc | None = None
    b: Bench | None = None
    try:
        step(f"{args.days} days x {args.series} series of history (benchmarks/dataset.py, cached between runs)")
        ds = ensure(args.days, args.series)
        prom = start_prometheus_on(ds, work / "prom", timeout=120, config=(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n" + scrape_config(target)))
        wait_until(lambda: httpx.post(f"{prom.url}/api/v1/query",
                                      data={"query": 'count_over_time(up{job="backend"}[1m]) >= 2'}
                                      ).json()["data"]["result"], 60, what="scrapes")
        redis = start_redis(work / "redis")
        step("starting a Redis Cluster (3 masters + 3 replicas)")
        cluster = start_redis_cluster(work / "cluster")
        b = Bench(work, prom, args.seconds, args.viewers, args.ttl, args.days)
        cost = summary_cost(b)
        panel = Load([], prom.url, args.days).form(PANELS[0], 0)
        panel_bytes = len(httpx.post(f"{prom.url}/api/v1/query_range", data=panel, timeout=30).content)
        step(f"one cold /summary costs {cost:.0f} upstream queries; one week-long panel answer {panel_bytes} bytes")

        def one_keys(r: Proc = redis) -> tuple[dict[Any, int], dict[Any, int]]:
            import redis as redis_sync
            with redis_sync.Redis.from_url(r.url) as c:
                return {"one": int(c.dbsize())}, {"one": int(c.info("memory")["used_memory_dataset"])}

        step("0. sizing: one cached week-long panel, the figure set")
        sizing = phase_sizing(b, redis.url)
        step("1. fleet on one Redis")
        single = phase(b, "2 instances x 2 workers, one Redis", redis.url, one_keys, cost)
        step("2. fleet on a 3-master Redis Cluster")
        on_cluster = phase(b, "2 instances x 2 workers, Redis Cluster (3 masters)", cluster.url,
                           lambda: (cluster.keys_per_master(), cluster.bytes_per_master()), cost)  # type: ignore[union-attr]
        step("3. a master killed mid-run")
        kill = phase_kill(b, cluster)
    finally:
        for p in list(b.started if b else []):
            p.stop()
        if cluster is not None:
            cluster.stop()
        if redis is not None:
            redis.stop()
        if prom is not None:
            prom.stop()
        backend.stop()
        shutil.rmtree(work, ignore_errors=True)

    text = report(args, time.time() - started, cost, panel_bytes, sizing, (single, on_cluster), kill)
    print("\n" + text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    bad = kill["load"].failed or kill["load"].differ or single["load"].failed or on_cluster["load"].failed
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
