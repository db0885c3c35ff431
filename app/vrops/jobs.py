"""Celery job metrics, kept in Redis so they are right under prefork and many workers.

Why Redis rather than prometheus_client in the worker: a prefork worker runs
tasks in child processes that are recycled; in-process metrics would need
multiprocess mode (mmap files, cleanup, mark_process_dead) and one scrape target
per worker host. Instead every child writes a few counters to Redis after each
job (one pipeline), and the API serves them at GET /vrops/jobs/metrics - one
scrape target for the whole fleet, right with any pool or number of hosts.

Keys:
- ``vrops:jobs:count`` hash ``<task>|<status>`` -> jobs (counter vrops_jobs_total).
- ``vrops:jobs:duration:<task>`` hash: non-cumulative bucket counts by upper bound,
  plus ``sum``/``count`` (histogram vrops_job_duration_seconds).
- ``vrops:jobs:window:<task>:<success|failure>`` sorted set, member job id, score
  finish time. Trimmed to the window on every write and counted with ZCOUNT
  [now-window, +inf] on every read, so vrops_job_success_ratio is a true rolling
  window (default 300 s) shared by all children and hosts; an in-process deque
  would see only one child's jobs.
- ``vrops:jobs:workers`` hash ``count``/``updated_at``, written by the
  vrops.refresh_workers task (celery inspect ping) on the beat schedule.
Queue depth is read live from the broker: LLEN of each queue and of kombu's
priority sub-queues ``<queue>\\x06\\x16<3|6|9>`` (kombu redis transport separator
and default priority steps 0/3/6/9).
"""

from __future__ import annotations

import math
import time
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from redis import Redis as SyncRedis
from redis.asyncio import Redis

TASKS = ("vrops.collect_inventory", "vrops.collect_stats", "vrops.refresh_workers")
STATUSES = ("success", "failure", "skipped", "redelivered")
BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                              math.inf)
COUNT_KEY = "vrops:jobs:count"
WORKERS_KEY = "vrops:jobs:workers"
PRIORITY_SEP = "\x06\x16"  # kombu.transport.redis.Channel.sep
PRIORITY_STEPS = (0, 3, 6, 9)  # kombu.transport.redis.PRIORITY_STEPS


def duration_key(task: str) -> str:
    return f"vrops:jobs:duration:{task}"


def window_key(task: str, status: str) -> str:
    return f"vrops:jobs:window:{task}:{status}"


def bucket_label(b: float) -> str:
    return "+Inf" if math.isinf(b) else repr(b)


def priority_queue_keys(queue: str) -> list[str]:
    return [queue if p == 0 else f"{queue}{PRIORITY_SEP}{p}" for p in PRIORITY_STEPS]


def record_job(
    redis: SyncRedis,
    task: str,
    status: str,
    duration: float,
    job_id: str,
    *,
    window: float = 300.0,
    now: float | None = None,
) -> None:
    """One pipeline per finished job; called from the worker child after the task."""
    now = time.time() if now is None else now
    bucket = next(b for b in BUCKETS if duration <= b)
    dkey = duration_key(task)
    pipe = redis.pipeline(transaction=False)
    pipe.hincrby(COUNT_KEY, f"{task}|{status}", 1)
    pipe.hincrby(dkey, bucket_label(bucket), 1)
    pipe.hincrbyfloat(dkey, "sum", duration)
    pipe.hincrby(dkey, "count", 1)
    if status in ("success", "failure"):
        wkey = window_key(task, status)
        pipe.zadd(wkey, {job_id: now})
        pipe.zremrangebyscore(wkey, "-inf", now - window)
        pipe.expire(wkey, int(window * 2) + 1)
    pipe.execute()


def record_redelivered(redis: SyncRedis, task: str) -> None:
    """A job delivered again after its earlier delivery died with its worker (counted, no duration)."""
    redis.hincrby(COUNT_KEY, f"{task}|redelivered", 1)


def record_workers(redis: SyncRedis, count: int, now: float | None = None) -> None:
    now = time.time() if now is None else now
    redis.hset(WORKERS_KEY, mapping={"count": count, "updated_at": now})


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


async def job_families(
    redis: Redis,
    broker: Redis,
    queues: list[str],
    *,
    window: float,
    workers_max_age: float,
    now: float | None = None,
) -> list[Metric]:
    """Read everything for /vrops/jobs/metrics: one pipeline on the store, one on the broker."""
    now = time.time() if now is None else now
    pipe = redis.pipeline(transaction=False)
    pipe.hgetall(COUNT_KEY)
    pipe.hgetall(WORKERS_KEY)
    for task in TASKS:
        pipe.hgetall(duration_key(task))
        pipe.zcount(window_key(task, "success"), now - window, "+inf")
        pipe.zcount(window_key(task, "failure"), now - window, "+inf")
    res = await pipe.execute()
    bpipe = broker.pipeline(transaction=False)
    for q in queues:
        for key in priority_queue_keys(q):
            bpipe.llen(key)
    lens = await bpipe.execute()

    jobs = CounterMetricFamily("vrops_jobs", "Finished vROps jobs by task and status.",
                               labels=["task", "status"])
    for field, value in sorted((_s(k), int(v)) for k, v in (res[0] or {}).items()):
        task, _, status = field.partition("|")
        jobs.add_metric([task, status], value)

    hist = HistogramMetricFamily("vrops_job_duration_seconds",
                                 "Duration of vROps jobs by task.", labels=["task"])
    ratio = GaugeMetricFamily(
        "vrops_job_success_ratio",
        f"Successful / finished jobs over the last {int(window)} s (rolling), by task.",
        labels=["task"])
    window_jobs = GaugeMetricFamily(
        "vrops_job_window_jobs", f"Jobs finished in the last {int(window)} s, by task and status.",
        labels=["task", "status"])
    for i, task in enumerate(TASKS):
        raw = {_s(k): _s(v) for k, v in (res[2 + 3 * i] or {}).items()}
        ok, failed = int(res[3 + 3 * i]), int(res[4 + 3 * i])
        window_jobs.add_metric([task, "success"], ok)
        window_jobs.add_metric([task, "failure"], failed)
        if ok + failed:
            ratio.add_metric([task], ok / (ok + failed))
        if raw:
            cum = 0
            buckets: list[tuple[str, float]] = []
            for b in BUCKETS:
                cum += int(raw.get(bucket_label(b), 0))
                buckets.append((bucket_label(b), cum))
            hist.add_metric([task], buckets, sum_value=float(raw.get("sum", 0.0)))

    depth = GaugeMetricFamily(
        "vrops_jobs_queue_depth",
        "Messages waiting in the Celery broker queue (all priority sub-queues summed).",
        labels=["queue"])
    n = len(PRIORITY_STEPS)
    for i, q in enumerate(queues):
        depth.add_metric([q], sum(int(x) for x in lens[i * n:(i + 1) * n]))

    workers = GaugeMetricFamily(
        "vrops_workers_active",
        "Celery workers that answered the last inspect ping (0 when the check itself is stale).")
    checked = GaugeMetricFamily(
        "vrops_workers_last_check_timestamp_seconds", "Unix time of the last worker ping check.")
    wraw = {_s(k): _s(v) for k, v in (res[1] or {}).items()}
    updated = float(wraw.get("updated_at", 0) or 0)
    count = int(wraw.get("count", 0) or 0) if now - updated <= workers_max_age else 0
    workers.add_metric([], count)
    if updated:
        checked.add_metric([], updated)
    store_up = GaugeMetricFamily("vrops_store_up", "1 when the Redis store answered.")
    store_up.add_metric([], 1)
    return [store_up, jobs, hist, ratio, window_jobs, depth, workers, checked]
