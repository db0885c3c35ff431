"""The Celery app: Redis broker and beat schedule from VropsSettings.

Run (one command, beat embedded):
    python -m celery -A app.workers.celery_app worker --pool=prefork -c 2 -B
or beat separately: `python -m celery -A app.workers.celery_app beat`.
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
    )
    return app


celery_app = make_celery(get_vrops_settings())
app = celery_app  # `celery -A app.workers.celery_app` finds `app`
