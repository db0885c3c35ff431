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


def make_celery(settings: VropsSettings) -> Celery:
    app = Celery("vrops", broker=settings.broker_url, include=["app.workers.tasks"])
    timeout = settings.vrops_worker_redis_timeout_seconds
    app.conf.update(
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "visibility_timeout": int(settings.vrops_collection_timeout_seconds * 4) + 60,
        },
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
