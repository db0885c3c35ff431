"""/metrics merge time against the number of dead (recycled) workers, with and without compaction.

    PYTHONPATH=. python benchmarks/bench_recycling.py [--dead 1000] [--dir /dev/shm]

Worker files are written by prometheus_client itself (its multiprocess value class
with the pid under our control): each "worker" serves 20 requests over 5 routes
(counter, histogram, in-progress gauge, upstream gauges, as the gateway defines
them). Prints the median render time (app.monitoring.registry.render, what
GET /metrics runs) for 0 dead workers, N dead workers' files left in place
(prometheus_client's behaviour), and N compacted by compact_dead_worker.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dead", type=int, default=1000)
    ap.add_argument("--dir", default="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(dir=args.dir))
    directory = base / "prom"
    directory.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    from prometheus_client import Counter, Gauge, Histogram, values

    from app.monitoring.registry import compact_dead_worker, render

    pid = [1]
    values.ValueClass = values.MultiProcessValue(lambda: pid[0])
    requests = Counter("fastapi_requests", "Requests.", ["method", "path", "status_code"], registry=None)
    duration = Histogram("fastapi_requests_duration_seconds", "Duration.", ["method", "path"], registry=None)
    in_progress = Gauge("fastapi_requests_in_progress", "In progress.", ["method", "path"],
                        multiprocess_mode="livesum", registry=None)
    up = Gauge("metrics_gateway_upstream_up", "Up.", multiprocess_mode="mostrecent", registry=None)
    last = Gauge("metrics_gateway_upstream_last_success_timestamp_seconds", "Last.",
                 multiprocess_mode="max", registry=None)

    def work(p: int) -> None:
        pid[0] = p
        for i in range(20):
            path = f"/prometheus/metrics/r{i % 5}"
            requests.labels("GET", path, "200").inc()
            duration.labels("GET", path).observe(0.01 * (i % 7))
            in_progress.labels("GET", path).set(0)
        up.set(1)
        last.set(time.time())

    def timed(repeat: int = 9) -> float:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            render(None, None)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1000

    try:
        work(2)
        work(3)  # two live workers
        compact_dead_worker(str(directory), 1)  # the defining process
        zero = timed()
        for p in range(10_000, 10_000 + args.dead):
            work(p)
        piled = timed()
        t0 = time.perf_counter()
        for p in range(10_000, 10_000 + args.dead):
            compact_dead_worker(str(directory), p)
        per_compaction = (time.perf_counter() - t0) / args.dead * 1000
        compacted = timed()
        print(f"merge (render) median ms: 0 dead {zero:.2f} | {args.dead} dead, files kept {piled:.2f} "
              f"| {args.dead} dead, compacted {compacted:.2f}; compaction {per_compaction:.2f} ms per "
              f"dead worker ({args.dir or 'default tmp'})")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
