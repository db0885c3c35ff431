"""Celery tasks: vROps inventory (slow), latest stats (fast), worker ping.

Each task runs its async collection under asyncio.run with an overall deadline
(VROPS_COLLECTION_TIMEOUT_SECONDS) inside Celery's soft/hard time limits, takes
a per-target Redis lock so cycles never overlap, writes a status record, and
records job metrics (app.vrops.jobs) in a finally block.

vROps outages are expected: the task records up=0 and finishes with status
"failure" instead of raising, and logs one line when a target starts failing and
one when it recovers (the previous status in Redis tells), not one per cycle.

A worker killed mid-collection (SIGKILL, OOM killer, lost host) must neither lose
the job silently nor block the next cycles:

- late acks + reject-on-worker-lost (app/workers/celery_app.py): the job goes
  back to the queue and runs again (``expires`` still drops it once its cycle has
  passed); the new delivery counts ``vrops_jobs_total{status="redelivered"}``;
- the lock has a short TTL (:func:`lock_ttl`, at most 30 s and half the task's
  interval) renewed by a heartbeat while its owner works, so a dead owner's lock
  lapses before the next cycle is due; a redelivered job waits that long for it.

The store failing (Redis down, or at maxmemory refusing writes) is caught, never
a traceback: the cycle's status says ``error: "store: ..."`` with up=0 (the
status write itself is allowed past maxmemory, see app/vrops/store.py), logged
once per episode. If even the status cannot be written, the API notices the
collection is overdue (app/vrops/exposition.py) instead of serving frozen data as up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from celery import Task, shared_task
from redis import Redis as SyncRedis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.common.episodes import FailureEpisode
from app.common.redis import make_redis, make_sync_redis
from app.vrops import jobs as job_metrics
from app.vrops.client import TokenCache, VropsClient, VropsError
from app.vrops.collector import collect_inventory, collect_stats
from app.vrops.settings import VropsSettings
from app.vrops.store import VropsStore
from app.workers.celery_app import SETTINGS_KEY

log = logging.getLogger("app.workers.vrops")

TOKEN_CACHE = TokenCache()  # per worker child: tokens survive between tasks
_sync_redis: SyncRedis | None = None
# Redis failures seen by this worker child (the cross-child record is the status in
# Redis; when Redis cannot be reached at all, each child logs its own episode).
STORE_EPISODE = FailureEpisode("vROps collections: sample store (Redis)", log)
STORE_ERRORS = (RedisError, OSError)


def _metrics_redis(settings: VropsSettings) -> SyncRedis:
    global _sync_redis
    if _sync_redis is None:
        _sync_redis = make_sync_redis(settings.redis_url, settings.vrops_worker_redis_timeout_seconds)
    return _sync_redis


@dataclass
class Job:
    status: str = "failure"


@contextmanager
def track_job(task: str, settings: VropsSettings) -> Iterator[Job]:
    job = Job()
    start = time.monotonic()
    try:
        yield job
    except BaseException:
        job.status = "failure"
        raise
    finally:
        try:
            job_metrics.record_job(
                _metrics_redis(settings), task, job.status, time.monotonic() - start,
                uuid.uuid4().hex, window=settings.vrops_job_window_seconds,
            )
        except (RedisError, OSError) as exc:
            log.debug("job metrics not recorded: %s", type(exc).__name__)


def _safe_error(exc: BaseException) -> str:
    """Errors stored/logged carry no secret: our own messages, else the type name only."""
    if isinstance(exc, VropsError):
        return str(exc)[:300]
    if isinstance(exc, TimeoutError):
        return "collection deadline exceeded"
    return type(exc).__name__


def _log_transition(target: str, what: str, prev: dict[str, Any], now: dict[str, Any]) -> None:
    was_up = bool(prev.get("up")) if prev else True
    if was_up and not now["up"]:
        log.warning("vROps %s %s failing: %s", target, what, now.get("error"))
    elif prev and not prev.get("up") and now["up"]:
        log.warning("vROps %s %s recovered", target, what)


CollectStep = Callable[[VropsClient, VropsStore, VropsSettings, float], Awaitable[dict[str, Any]]]


async def _stats_step(client: VropsClient, store: VropsStore, settings: VropsSettings,
                      started: float) -> dict[str, Any]:
    res = await collect_stats(client, store, settings, started)
    out: dict[str, Any] = {"up": 0 if res.errors else 1, "samples": res.samples,
                           "stale_samples": res.stale_samples, "objects": res.objects,
                           "error": res.errors[0][:300] if res.errors else None}
    if not res.errors:
        out["last_success"] = started
    return out


async def _inventory_step(client: VropsClient, store: VropsStore, settings: VropsSettings,
                          started: float) -> dict[str, Any]:
    n = await collect_inventory(client, store, settings)
    return {"up": 1, "objects": n, "last_success": started, "error": None}


def lock_ttl(kind: str, settings: VropsSettings) -> float:
    """Lock lifetime: short, so a dead owner's lock lapses before the next cycle is due.

    Half the task's interval, between 2 and 30 s; the owner renews it every third
    of that while it works (:func:`_heartbeat`).
    """
    interval = (settings.vrops_stats_interval_seconds if kind == "stats"
                else settings.vrops_inventory_interval_seconds)
    return max(2.0, min(30.0, interval / 2))


def _store_error(exc: BaseException) -> str:
    """The store's failure for the status record, in a few words (never the data or a secret:
    redis-py's messages quote the failed command's arguments)."""
    if isinstance(exc, OutOfMemoryError):
        return "store: OOM, writes refused (Redis at maxmemory with noeviction)"
    if isinstance(exc, (RedisConnectionError, OSError)):
        return f"store: unreachable ({type(exc).__name__})"
    if isinstance(exc, RedisTimeoutError):
        return "store: timeout"
    return f"store: {type(exc).__name__}"


async def _acquire(store: VropsStore, kind: str, target: str, ttl: float, wait: float) -> str | None:
    """The lock's owner token; waits up to `wait` s for a lapsing one (redelivered jobs)."""
    deadline = time.monotonic() + wait
    while True:
        token = await store.try_lock(kind, target, ttl)
        if token is not None or time.monotonic() >= deadline:
            return token
        await asyncio.sleep(min(0.25, ttl / 4))


async def _heartbeat(store: VropsStore, kind: str, target: str, token: str, ttl: float) -> None:
    """Renew the lock every third of its TTL while the owner works."""
    while True:
        await asyncio.sleep(ttl / 3)
        try:
            if not await store.renew_lock(kind, target, token, ttl):
                log.warning("vROps %s %s: lock lapsed during the collection (the loop was stalled "
                            "longer than %.0fs); another cycle may overlap this one", target, kind, ttl)
                return
        except STORE_ERRORS:
            continue  # the store is failing: the collection itself records that


async def _run_collection(kind: str, step: CollectStep, target_name: str, settings: VropsSettings,
                          transport: httpx.AsyncBaseTransport | None, keep: tuple[str, ...] = (),
                          redelivered: bool = False) -> str:
    """One locked, time-bounded collection of `kind` for a target; its status lands in Redis."""
    target = settings.target(target_name)
    redis = make_redis(settings.redis_url, settings.vrops_worker_redis_timeout_seconds)
    store = VropsStore(redis, sample_ttl=settings.vrops_sample_ttl_seconds,
                       latest_ttl=settings.vrops_latest_ttl_seconds)
    ttl = lock_ttl(kind, settings)
    try:
        try:
            lock = await _acquire(store, kind, target.name, ttl, ttl + 1 if redelivered else 0)
            if lock is None:
                return "skipped"
            prev = await store.get_status(target.name, kind)
        except STORE_ERRORS as exc:
            STORE_EPISODE.failure(f"{target.name} {kind}: {_store_error(exc)}")
            return "failure"
        heartbeat = asyncio.create_task(_heartbeat(store, kind, target.name, lock, ttl))
        deadline = settings.vrops_collection_timeout_seconds
        started = time.time()
        t0 = time.monotonic()
        status: dict[str, Any] = {"last_attempt": started, "last_success": prev.get("last_success"),
                                  **{k: prev.get(k) for k in keep}}
        try:
            async with asyncio.timeout(deadline):
                async with VropsClient(target, settings, transport=transport,
                                       token_cache=TOKEN_CACHE) as client:
                    status.update(await step(client, store, settings, started))
        except RedisError as exc:
            status.update(up=0, error=_store_error(exc))
        except (VropsError, TimeoutError, httpx.HTTPError, ValueError) as exc:
            status.update(up=0, error=_safe_error(exc))
        finally:
            status["duration"] = round(time.monotonic() - t0, 3)
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        try:
            await store.unlock(kind, target.name, lock)
            await store.set_status(target.name, kind, status)
        except STORE_ERRORS as exc:
            STORE_EPISODE.failure(f"{target.name} {kind}: status not written: {_store_error(exc)}")
            return "failure"
        if not str(status.get("error") or "").startswith("store:"):
            STORE_EPISODE.success()
        _log_transition(target.name, kind, prev, status)
        return "success" if status["up"] else "failure"
    finally:
        await redis.aclose()


async def run_stats(target_name: str, settings: VropsSettings,
                    transport: httpx.AsyncBaseTransport | None = None, *, redelivered: bool = False) -> str:
    return await _run_collection("stats", _stats_step, target_name, settings, transport,
                                 redelivered=redelivered)


async def run_inventory(target_name: str, settings: VropsSettings,
                        transport: httpx.AsyncBaseTransport | None = None, *, redelivered: bool = False) -> str:
    return await _run_collection("inventory", _inventory_step, target_name, settings, transport,
                                 keep=("objects",), redelivered=redelivered)


def _redelivered(task: Task, settings: VropsSettings) -> bool:
    """True when this job's earlier delivery died with its worker (or was handed back);
    counted in vrops_jobs_total{status="redelivered"}."""
    info = getattr(task.request, "delivery_info", None) or {}
    if not info.get("redelivered"):
        return False
    with contextlib.suppress(RedisError, OSError):
        job_metrics.record_redelivered(_metrics_redis(settings), str(task.name))
    log.warning("%s redelivered (its earlier delivery died with its worker or was handed back)",
                task.name)
    return True


def _settings(task: Task) -> VropsSettings:
    settings: VropsSettings = task.app.conf[SETTINGS_KEY]
    return settings


@shared_task(bind=True, name="vrops.collect_inventory")  # type: ignore[untyped-decorator]
def collect_inventory_task(self: Task, target: str) -> str:
    settings = _settings(self)
    again = _redelivered(self, settings)
    with track_job("vrops.collect_inventory", settings) as job:
        job.status = asyncio.run(run_inventory(target, settings, redelivered=again))
    return job.status


@shared_task(bind=True, name="vrops.collect_stats")  # type: ignore[untyped-decorator]
def collect_stats_task(self: Task, target: str) -> str:
    settings = _settings(self)
    again = _redelivered(self, settings)
    with track_job("vrops.collect_stats", settings) as job:
        job.status = asyncio.run(run_stats(target, settings, redelivered=again))
    return job.status


@shared_task(bind=True, name="vrops.refresh_workers")  # type: ignore[untyped-decorator]
def refresh_workers_task(self: Task) -> int:
    """Count live workers (celery inspect ping) and store the figure for the API."""
    settings = _settings(self)
    with track_job("vrops.refresh_workers", settings) as job:
        replies = self.app.control.ping(timeout=1.0) or []
        count = len(replies)
        try:
            job_metrics.record_workers(_metrics_redis(settings), count)
        except STORE_ERRORS as exc:
            # Bookkeeping, like the job metrics: the collections' status says the store failed.
            log.debug("worker count not recorded: %s", _store_error(exc))
            return count
        job.status = "success"
    return count
