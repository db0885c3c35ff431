"""vROps benchmark: 50 clusters x 500 objects x 5 metrics.

1. One collection cycle (inventory + latest stats, and stats alone) from the
   stand-in vROps (a real uvicorn process) into a real redis-server: target < 10 s.
2. GET /vrops/metrics of all 125k samples from Redis through a real uvicorn API:
   target < 100 ms. The text passes `promtool check metrics`.

Run:  /work/venv/bin/python benchmarks/bench_vrops.py [--clusters 50 --objects 500 --requests 30]
Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prometheus_client.core import GaugeMetricFamily  # noqa: E402

from app.common.exposition import render_families  # noqa: E402
from app.common.redis import make_redis  # noqa: E402
from app.vrops.exposition import render_text  # noqa: E402
from app.vrops.settings import VropsSettings  # noqa: E402
from app.vrops.store import VropsStore  # noqa: E402
from app.workers.tasks import run_inventory, run_stats  # noqa: E402
from tests.support.procs import (  # noqa: E402
    Proc,
    promtool_check_metrics,
    start_redis,
    start_uvicorn,
)

METRICS = ["cpu_usage_ratio", "memory_usage_ratio", "disk_used_bytes", "disk_capacity_bytes",
           "health_score_ratio"]


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


async def collect(settings: VropsSettings) -> tuple[float, float, dict[str, object]]:
    t0 = time.perf_counter()
    assert await run_inventory("bench", settings) == "success"
    t1 = time.perf_counter()
    assert await run_stats("bench", settings) == "success"
    t2 = time.perf_counter()
    r = make_redis(settings.redis_url, 10)
    status = await VropsStore(r).get_status("bench", "stats")
    await r.aclose()
    return t1 - t0, t2 - t1, status


async def inprocess_read_render(url: str, n: int) -> tuple[list[float], list[float], int]:
    r = make_redis(url, 5)
    store = VropsStore(r)
    reads, renders = [], []
    size = 0
    for _ in range(n):
        t0 = time.perf_counter()
        snap = await store.read_latest(["bench"], None, METRICS)
        t1 = time.perf_counter()
        body, _ = render_text(snap, ["bench"], time.time(), 900, None)
        t2 = time.perf_counter()
        reads.append(t1 - t0)
        renders.append(t2 - t1)
        size = len(body)
    # For comparison: the same samples through prometheus_client families.
    fams = []
    for (cluster, metric), blob in snap.blobs["bench"].items():
        g = GaugeMetricFamily(f"vrops_{metric}", "x",
                              labels=["target", "vccluster", "object_kind", "object"])
        for kind, obj, v in blob.iter_rows():
            g.add_metric(["bench", cluster, kind, obj], v)
        fams.append(g)
    t0 = time.perf_counter()
    render_families(fams, None)
    print(f"  (reference: prometheus_client render_families of the same samples: "
          f"{(time.perf_counter() - t0) * 1000:.0f} ms, families built beforehand)")
    await r.aclose()
    return reads, renders, size


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clusters", type=int, default=50)
    ap.add_argument("--objects", type=int, default=500)
    ap.add_argument("--requests", type=int, default=30)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-vrops-"))
    procs: list[Proc] = []
    ok = True
    try:
        redis = start_redis(work / "redis")
        procs.append(redis)
        env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'benchmarks'}",
               "FAKE_VROPS_CLUSTERS": str(args.clusters), "FAKE_VROPS_OBJECTS": str(args.objects)}
        fake = start_uvicorn(work / "fake", "tests.fakes.vrops_server:app_from_env", env=env,
                             factory=True)
        procs.append(fake)
        targets = [{"name": "bench", "url": fake.url, "username": "admin",
                    "password": "s3cret"}]
        settings = VropsSettings.model_validate({
            "redis_url": redis.url, "vrops_targets": targets,
            "vrops_stat_keys": ["cpu|usage_average", "mem|usage_average", "diskspace|used",
                                "diskspace|total_capacity", "badge|health"]})
        n_samples = args.clusters * (args.objects + 1) * 5
        print(f"inventory: {args.clusters} clusters x {args.objects} objects (+ the clusters),"
              f" 5 metrics = {n_samples} samples")

        inv_s, stats_s, status = asyncio.run(collect(settings))
        print(f"collection: inventory {inv_s:.2f} s, stats cycle {stats_s:.2f} s, "
              f"cold total {inv_s + stats_s:.2f} s; samples written {status['samples']}")
        ok &= inv_s + stats_s < 10.0 and status["samples"] == n_samples

        reads, renders, size = asyncio.run(inprocess_read_render(redis.url, 10))
        print(f"in-process: Redis read (1 round trip) median {statistics.median(reads)*1000:.1f}"
              f" ms, render median {statistics.median(renders)*1000:.1f} ms, {size/1e6:.1f} MB")

        api_env = {"PYTHONPATH": env["PYTHONPATH"], "REDIS_URL": redis.url,
                   "VROPS_TARGETS": json.dumps(targets)}
        api = start_uvicorn(work / "api", "tests.support.vrops_app:make_api", env=api_env, factory=True)
        procs.append(api)
        with httpx.Client(base_url=api.url, timeout=10) as c:
            for _ in range(3):
                c.get("/vrops/metrics")
            lat: list[float] = []
            body = b""
            for _ in range(args.requests):
                t0 = time.perf_counter()
                resp = c.get("/vrops/metrics")
                body = resp.content
                lat.append(time.perf_counter() - t0)
                assert resp.status_code == 200
            count = body.count(b"\nvrops_cpu_usage_ratio{") + body.count(
                b"\nvrops_memory_usage_ratio{") + body.count(b"\nvrops_disk_used_bytes{") + \
                body.count(b"\nvrops_disk_capacity_bytes{") + body.count(
                    b"\nvrops_health_score_ratio{")
            t0 = time.perf_counter()
            one = c.get("/vrops/metrics", params={"cluster": "cluster-007"})
            one_ms = (time.perf_counter() - t0) * 1000
            t0 = time.perf_counter()
            js = c.get("/vrops/metrics", params={"cluster": "cluster-007", "format": "json"})
            js_ms = (time.perf_counter() - t0) * 1000
            t0 = time.perf_counter()
            alljs = c.get("/vrops/metrics", params={"format": "json"})
            alljs_ms = (time.perf_counter() - t0) * 1000
        print(f"HTTP GET /vrops/metrics (all {count} samples, {len(body)/1e6:.1f} MB, "
              f"{args.requests} requests): p50 {pct(lat, 50)*1000:.1f} ms, "
              f"p95 {pct(lat, 95)*1000:.1f} ms, max {max(lat)*1000:.1f} ms")
        print(f"HTTP one cluster text: {one_ms:.1f} ms ({len(one.content)/1e3:.0f} kB); "
              f"one cluster JSON: {js_ms:.1f} ms ({len(js.json()['samples'])} samples); "
              f"all samples JSON: {alljs_ms:.0f} ms ({len(alljs.content)/1e6:.1f} MB)")
        ok &= count == n_samples and pct(lat, 50) < 0.100
        res = promtool_check_metrics(body)
        print(f"promtool check metrics: exit {res.returncode} "
              f"{(res.stdout + res.stderr).decode()[:300].strip()}")
        ok &= res.returncode == 0
    finally:
        for p in reversed(procs):
            p.stop()
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
