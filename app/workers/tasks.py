"""Celery tasks: vROps inventory (slow), latest stats (fast), worker ping.

Each task runs its async collection under asyncio.run with an overall deadline
(VROPS_COLLECTION_TIMEOUT_SECONDS) inside Celery's soft/hard time limits, takes
a per-target Redis lock so cycles never overlap, writes a status record, and
records job metrics (app.vrops.jobs) in a finally block.

vROps outages are expected: the task records up=0 and finishes with status
"failure" instead of raising, and logs one line when a target starts failing and
one when it recovers (the previous status in Redis tells), not one per cycle.
"""

from __future__ import annotations

import asyncio
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
from redis.exceptions import RedisError

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


async def _run_collection(kind: str, step: CollectStep, target_name: str, settings: VropsSettings,
                          transport: httpx.AsyncBaseTransport | None, keep: tuple[str, ...] = ()) -> str:
    """One locked, time-bounded collection of `kind` for a target; its status lands in Redis."""
    target = settings.target(target_name)
    redis = make_redis(settings.redis_url, settings.vrops_worker_redis_timeout_seconds)
    store = VropsStore(redis, sample_ttl=settings.vrops_sample_ttl_seconds,
                       latest_ttl=settings.vrops_latest_ttl_seconds)
    try:
        deadline = settings.vrops_collection_timeout_seconds
        lock = await store.try_lock(kind, target.name, deadline + 5)
        if lock is None:
            return "skipped"
        prev = await store.get_status(target.name, kind)
        started = time.time()
        t0 = time.monotonic()
        status: dict[str, Any] = {"last_attempt": started, "last_success": prev.get("last_success"),
                                  **{k: prev.get(k) for k in keep}}
        try:
            async with asyncio.timeout(deadline):
                async with VropsClient(target, settings, transport=transport,
                                       token_cache=TOKEN_CACHE) as client:
                    status.update(await step(client, store, settings, started))
        except (VropsError, TimeoutError, httpx.HTTPError, ValueError) as exc:
            status.update(up=0, error=_safe_error(exc))
        finally:
            status["duration"] = round(time.monotonic() - t0, 3)
            await store.unlock(kind, target.name, lock)
        await store.set_status(target.name, kind, status)
        _log_transition(target.name, kind, prev, status)
        return "success" if status["up"] else "failure"
    finally:
        await redis.aclose()


async def run_stats(target_name: str, settings: VropsSettings,
                    transport: httpx.AsyncBaseTransport | None = None) -> str:
    return await _run_collection("stats", _stats_step, target_name, settings, transport)


async def run_inventory(target_name: str, settings: VropsSettings,
                        transport: httpx.AsyncBaseTransport | None = None) -> str:
    return await _run_collection("inventory", _inventory_step, target_name, settings, transport,
                                 keep=("objects",))


def _settings(task: Task) -> VropsSettings:
    settings: VropsSettings = task.app.conf[SETTINGS_KEY]
    return settings


@shared_task(bind=True, name="vrops.collect_inventory")  # type: ignore[untyped-decorator]
def collect_inventory_task(self: Task, target: str) -> str:
    settings = _settings(self)
    with track_job("vrops.collect_inventory", settings) as job:
        job.status = asyncio.run(run_inventory(target, settings))
    return job.status


@shared_task(bind=True, name="vrops.collect_stats")  # type: ignore[untyped-decorator]
def collect_stats_task(self: Task, target: str) -> str:
    settings = _settings(self)
    with track_job("vrops.collect_stats", settings) as job:
        job.status = asyncio.run(run_stats(target, settings))
    return job.status


@shared_task(bind=True, name="vrops.refresh_workers")  # type: ignore[untyped-decorator]
def refresh_workers_task(self: Task) -> int:
    """Count live workers (celery inspect ping) and store the figure for the API."""
    settings = _settings(self)
    with track_job("vrops.refresh_workers", settings) as job:
        replies = self.app.control.ping(timeout=1.0) or []
        count = len(replies)
        job_metrics.record_workers(_metrics_redis(settings), count)
        job.status = "success"
    return count
