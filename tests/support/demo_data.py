"""The PromLabs demo service's metrics as generated history, in a real Prometheus and
a real VictoriaMetrics, for the PromQL compliance query list.

The prometheus/compliance queries (tests/data/promql-compliance/) read the demo
service's series (`demo_*`, three instances scraped every 5 s). Here the same
metric names, types and labels are generated deterministically at a 15 s scrape
interval (per-instance millisecond jitter, as real scrapes have), written as
OpenMetrics, backfilled with `promtool tsdb create-blocks-from openmetrics` into
a fresh Prometheus, and imported into VictoriaMetrics through its Prometheus
text import. The demo host `demo.promlabs.com` is replaced by `localhost` in the
instance labels and, consistently, in the queries (`localize`).
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.procs import PROMETHEUS_BIN, PROMTOOL_BIN, Proc, _spawn, free_port, wait_until
from tests.support.tools import path_of

DEMO_HOST = "demo.promlabs.com"
LOCAL_HOST = "localhost"
INSTANCES = tuple(f"{LOCAL_HOST}:{port}" for port in (10000, 10001, 10002))
JITTER_MS = (123, 5456, 10789)  # each target is scraped at its own phase
SCRAPE_SECONDS = 15
GIB = 1024**3
DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "promql-compliance"
VICTORIA_BIN = path_of("victoria-metrics")

# method, path, status of the API histogram series (the demo's routes and outcomes).
API_ROUTES = (("GET", "/api/foo", "200"), ("POST", "/api/foo", "200"), ("GET", "/api/bar", "200"),
              ("GET", "/api/bar", "500"), ("GET", "/api/nonexistent", "404"))
BUCKETS = tuple(0.0001 * 4**k for k in range(9))  # 0.0001 .. 6.5536 s, then +Inf


def localize(query: str) -> str:
    return query.replace(DEMO_HOST, LOCAL_HOST)


def compliance_queries() -> list[dict[str, Any]]:
    """The 539 expanded queries of prometheus/compliance (query, should_fail), localized."""
    items = json.loads((DATA_DIR / "promql-test-queries-expanded.json").read_text())
    return [{**item, "query": localize(item["query"])} for item in items]


@dataclass
class Series:
    name: str
    labels: dict[str, str]
    points: list[tuple[int, float]] = field(default_factory=list)  # (ms, value)

    def text_labels(self) -> str:
        return ",".join(f'{k}="{v}"' for k, v in sorted(self.labels.items()))


def _fmt(v: float) -> str:
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def generate(end: float, hours: float = 3.0, seed: int = 14) -> list[Series]:
    """Deterministic demo_* history for three instances, ending at `end` (unix s)."""
    rng = random.Random(seed)
    steps = int(hours * 3600 // SCRAPE_SECONDS)
    start_ms = (int(end) - steps * SCRAPE_SECONDS) * 1000
    out: list[Series] = []
    for i, instance in enumerate(INSTANCES):
        base = {"instance": instance, "job": "demo"}
        times = [start_ms + k * SCRAPE_SECONDS * 1000 + JITTER_MS[i] for k in range(steps + 1)]
        times = [t for t in times if t <= end * 1000]
        cpus = Series("demo_num_cpus", dict(base))
        disk = Series("demo_disk_usage_bytes", dict(base))
        batch = Series("demo_batch_last_success_timestamp_seconds", dict(base))
        inter = Series("demo_intermittent_metric", dict(base))
        cpu = {m: Series("demo_cpu_usage_seconds_total", {**base, "mode": m}) for m in ("user", "system", "idle")}
        share = {"user": 0.3, "system": 0.2, "idle": 0.5}
        mem = {m: Series("demo_memory_usage_bytes", {**base, "type": m}) for m in ("used", "cached", "buffers", "free")}
        used, cached, buffers = 2.5 * GIB + i * 0.3 * GIB, 1.5 * GIB, 0.25 * GIB
        api = {route: rng.random() for route in API_ROUTES}
        buckets = {
            (route, le): Series("demo_api_request_duration_seconds_bucket",
                                {**base, "method": route[0], "path": route[1], "status": route[2], "le": le})
            for route in API_ROUTES for le in [*(_fmt(b) for b in BUCKETS), "+Inf"]}
        sums = {route: Series("demo_api_request_duration_seconds_sum",
                              {**base, "method": route[0], "path": route[1], "status": route[2]})
                for route in API_ROUTES}
        counts = {route: Series("demo_api_request_duration_seconds_count",
                                {**base, "method": route[0], "path": route[1], "status": route[2]})
                  for route in API_ROUTES}
        cpu_total = dict.fromkeys(share, 1000.0 * (i + 1))
        hist_counts = {key: 0.0 for key in buckets}
        hist_sum = dict.fromkeys(API_ROUTES, 0.0)
        hist_count = dict.fromkeys(API_ROUTES, 0.0)
        usage = 160e9 * (0.1 + 0.2 * i)
        last_success = times[0] / 1000 - 30
        reset_at = len(times) * 2 // 3 if i == 2 else -1
        for k, t in enumerate(times):
            ts = t / 1000
            cpus.points.append((t, 4))
            usage += 0.5e6 * SCRAPE_SECONDS * (0.8 + 0.4 * rng.random())
            if usage > 160e9 * 0.9:
                usage = 160e9 * 0.1
            disk.points.append((t, round(usage)))
            if k % 4 == 0 and rng.random() < 0.75:
                last_success = ts
            batch.points.append((t, round(last_success, 3)))
            if int(ts // 60) % 2 == 0:
                inter.points.append((t, 1))
            for mode, frac in share.items():
                if k == reset_at:
                    cpu_total[mode] = 0.0  # the process restarted: a counter reset
                cpu_total[mode] += 4 * SCRAPE_SECONDS * frac * (0.9 + 0.2 * rng.random())
                cpu[mode].points.append((t, round(cpu_total[mode], 6)))
            used = min(max(used + rng.gauss(0, 0.02) * GIB, 1 * GIB), 4 * GIB)
            cached = min(max(cached + rng.gauss(0, 0.01) * GIB, 0.5 * GIB), 2 * GIB)
            buffers = min(max(buffers + rng.gauss(0, 0.002) * GIB, 0.1 * GIB), 0.5 * GIB)
            values = {"used": used, "cached": cached, "buffers": buffers,
                      "free": 8 * GIB - round(used) - round(cached) - round(buffers)}
            for m, v in values.items():
                mem[m].points.append((t, round(v)))
            for route, weight in api.items():
                n = rng.randint(0, int(30 * weight) + 1)
                for _ in range(n):
                    d = rng.expovariate(1 / (0.002 + 0.05 * weight))
                    hist_sum[route] += d
                    for b in BUCKETS:
                        if d <= b:
                            hist_counts[(route, _fmt(b))] += 1
                    hist_counts[(route, "+Inf")] += 1
                hist_count[route] += n
                for le in [*(_fmt(b) for b in BUCKETS), "+Inf"]:
                    buckets[(route, le)].points.append((t, hist_counts[(route, le)]))
                sums[route].points.append((t, round(hist_sum[route], 6)))
                counts[route].points.append((t, hist_count[route]))
        out += [cpus, disk, batch, inter, *cpu.values(), *mem.values(), *buckets.values(),
                *sums.values(), *counts.values()]
    return out


def openmetrics(series: list[Series]) -> str:
    """One block per metric name (no TYPE: PromQL does not read it), samples in time order."""
    lines: list[str] = []
    by_name: dict[str, list[Series]] = {}
    for s in series:
        by_name.setdefault(s.name, []).append(s)
    for group in by_name.values():
        merged = sorted(((t, s.text_labels(), v) for s in group for t, v in s.points))
        name = group[0].name
        lines += [f"{name}{{{labels}}} {_fmt(v)} {t // 1000}.{t % 1000:03d}" for t, labels, v in merged]
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def prometheus_text(series: list[Series]) -> Iterator[str]:
    """Prometheus text exposition with millisecond timestamps (VictoriaMetrics' import)."""
    for s in series:
        head = f"{s.name}{{{s.text_labels()}}}"
        for t, v in s.points:
            yield f"{head} {_fmt(v)} {t}\n"


def start_prometheus_with_history(workdir: Path, series: list[Series], timeout: float = 60.0) -> Proc:
    """A real Prometheus serving only the backfilled history (no scrapes)."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    src = workdir / "demo.om"
    src.write_text(openmetrics(series))
    subprocess.run([PROMTOOL_BIN, "tsdb", "create-blocks-from", "openmetrics", str(src), str(data)],
                   check=True, capture_output=True, timeout=120)
    src.unlink()
    cfg = workdir / "prometheus.yml"
    cfg.write_text("global:\n  scrape_interval: 15s\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _spawn([PROMETHEUS_BIN, f"--config.file={cfg}", f"--storage.tsdb.path={data}",
                   f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=30d",
                   "--log.level=warn"], workdir, "prometheus", port=port, url=url)
    try:
        wait_until(lambda: httpx.get(f"{url}/-/ready", timeout=1.0).status_code == 200,
                   timeout, what="prometheus ready")
    except TimeoutError:
        proc.stop()
        raise RuntimeError(f"prometheus did not start:\n{proc.log()}") from None
    return proc


def start_victoriametrics(workdir: Path, series: list[Series], timeout: float = 60.0) -> Proc:
    """A real VictoriaMetrics on loopback with its own storage, holding the same history.

    Its response cache is off and its latency offset zero, so its answers depend on
    the data and the request only (the comparison is gateway vs VictoriaMetrics).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _spawn([VICTORIA_BIN, f"-httpListenAddr=127.0.0.1:{port}",
                   f"-storageDataPath={workdir / 'vm-data'}", "-retentionPeriod=100y",
                   "-search.disableCache", "-search.latencyOffset=0s", "-loggerLevel=ERROR"],
                  workdir, "victoria-metrics", port=port, url=url)
    try:
        wait_until(lambda: httpx.get(f"{url}/health", timeout=1.0).status_code == 200,
                   timeout, what="victoria-metrics ready")
        lines = list(prometheus_text(series))
        for i in range(0, len(lines), 50_000):
            resp = httpx.post(f"{url}/api/v1/import/prometheus", content="".join(lines[i:i + 50_000]),
                              timeout=60)
            resp.raise_for_status()
        httpx.get(f"{url}/internal/force_flush", timeout=30)
        expected = len(series)
        wait_until(lambda: _vm_series(url) >= expected, timeout, interval=0.5,
                   what="victoria-metrics to index the import")
    except BaseException:
        proc.stop()
        raise
    return proc


def _vm_series(url: str) -> int:
    body = httpx.get(f"{url}/api/v1/query", params={"query": 'count({__name__=~"demo_.+"})'},
                     timeout=5).json()
    result = body["data"]["result"]
    return int(float(result[0]["value"][1])) if result else 0


def grafana_align(t: float, step: float, utc_offset: float) -> float:
    """Grafana's AlignTimeRange: floor((t + off) / step) * step - off."""
    return math.floor((t + utc_offset) / step) * step - utc_offset


def now_s() -> float:
    return round(time.time(), 3)
