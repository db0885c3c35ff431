"""The Celery app factory: Redis broker and beat schedule from VropsSettings.

Run (one command, beat embedded):
    python -m celery -A app.workers.celery_app worker --pool=prefork -c 2 -B
or beat separately: `python -m celery -A app.workers.celery_app beat`.

Nothing is built at import: `make_celery(settings)` builds an app (tests build
their own), and the module attribute `app` that `celery -A` looks up is built
on first access from the environment, read once.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from celery import Celery

from app.vrops.settings import VropsSettings, get_vrops_settings


def beat_schedule(settings: VropsSettings) -> dict[str, dict[str, Any]]:
    """Per target: inventory on the slow cycle, stats on the fast one; plus the worker ping.

    `expires` = one interval, so a backlog (workers down) is dropped, not replayed.
    """
    sched: dict[str, dict[str, Any]] = {}
    inv = settings.vrops_inventory_interval_seconds
    stats = settings.vrops_stats_interval_seconds
    ping = settings.vrops_worker_ping_interval_seconds
    for t in settings.vrops_targets:
        sched[f"vrops-inventory-{t.name}"] = {
            "task": "vrops.collect_inventory", "schedule": timedelta(seconds=inv),
            "args": (t.name,), "options": {"expires": inv},
        }
        sched[f"vrops-stats-{t.name}"] = {
            "task": "vrops.collect_stats", "schedule": timedelta(seconds=stats),
            "args": (t.name,), "options": {"expires": stats},
        }
    sched["vrops-workers"] = {
        "task": "vrops.refresh_workers", "schedule": timedelta(seconds=ping),
        "options": {"expires": ping},
    }
    return sched


SETTINGS_KEY = "gateway_vrops_settings"


def task_limits(settings: VropsSettings) -> dict[str, dict[str, float]]:
    """Soft/hard time limits per task: the collection deadline plus room to record the outcome."""
    soft = settings.vrops_collection_timeout_seconds + 15
    collect = {"soft_time_limit": soft, "time_limit": soft + 15}
    return {"vrops.collect_inventory": collect, "vrops.collect_stats": collect,
            "vrops.refresh_workers": {"soft_time_limit": 30, "time_limit": 45}}


def visibility_timeout(settings: VropsSettings) -> int:
    """Seconds an unacknowledged job stays invisible before the broker hands it out again.

    Longer than any collection can run (hard time limit + 30 s), so a running job
    is never handed out twice; short enough that a job whose whole worker host
    died comes back within minutes (``expires`` then drops it if its cycle passed).
    """
    hard = task_limits(settings)["vrops.collect_stats"]["time_limit"]
    return int(hard) + 30


def make_celery(settings: VropsSettings) -> Celery:
    """The Celery app. Jobs are acknowledged *after* they ran (late acks) and handed
    back to the queue when the child running them dies (reject on worker lost):
    a SIGKILLed or OOM-killed child does not lose its job. A job that kills its
    worker every time comes back until its ``expires`` (one interval) drops it."""
    app = Celery("vrops", broker=settings.broker_url, include=["app.workers.tasks"])
    timeout = settings.vrops_worker_redis_timeout_seconds
    app.conf.update(
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "visibility_timeout": visibility_timeout(settings),
        },
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        result_backend=None,
        task_default_queue=settings.vrops_queues[0] if settings.vrops_queues else "celery",
        worker_prefetch_multiplier=1,
        timezone="UTC",
        beat_schedule=beat_schedule(settings),
        task_annotations=task_limits(settings),
    )
    app.conf[SETTINGS_KEY] = settings  # tasks read their settings from their app
    return app


_app: Celery | None = None


def __getattr__(name: str) -> Celery:
    """`celery -A app.workers.celery_app` finds `app` (or `celery_app`), built once on first use."""
    global _app
    if name in ("app", "celery_app"):
        if _app is None:
            _app = make_celery(get_vrops_settings())
        return _app
    raise AttributeError(name)
