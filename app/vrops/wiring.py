"""App lifespan hooks: create/close the redis.asyncio clients the vROps routes use.

app.state after startup:
- vrops_settings: VropsSettings (kept if a test set it before startup)
- vrops_redis: redis.asyncio client for REDIS_URL (short socket timeouts, no retries)
- vrops_broker_redis: client for CELERY_BROKER_URL (same object when the URLs match)
- vrops_episode / vrops_jobs_episode: FailureEpisode, one log line per Redis outage
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from app.services.episodes import FailureEpisode
from app.vrops.settings import VropsSettings, get_vrops_settings

log = logging.getLogger("app.vrops")


def make_redis(url: str, timeout: float) -> Redis:
    """A client that fails fast: bounded connect/read time and no hidden retry loop."""
    return Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
        max_connections=64,
    )


async def startup(app: FastAPI) -> None:
    settings: VropsSettings = getattr(app.state, "vrops_settings", None) or get_vrops_settings()
    app.state.vrops_settings = settings
    timeout = settings.vrops_redis_timeout_seconds
    app.state.vrops_redis = make_redis(settings.redis_url, timeout)
    if settings.broker_url == settings.redis_url:
        app.state.vrops_broker_redis = app.state.vrops_redis
    else:
        app.state.vrops_broker_redis = make_redis(settings.broker_url, timeout)
    app.state.vrops_episode = FailureEpisode("vROps sample store (Redis)", log)
    app.state.vrops_jobs_episode = FailureEpisode("vROps job metrics store (Redis)", log)


async def shutdown(app: FastAPI) -> None:
    redis = getattr(app.state, "vrops_redis", None)
    broker = getattr(app.state, "vrops_broker_redis", None)
    if broker is not None and broker is not redis:
        await broker.aclose()
    if redis is not None:
        await redis.aclose()
    app.state.vrops_redis = None
    app.state.vrops_broker_redis = None
