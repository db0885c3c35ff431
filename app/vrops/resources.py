"""The vROps feature's resources: what its lifespan opens and its routes use.

One typed object per app (``VropsResources``), made by ``open_resources`` in the
app's lifespan and handed to routes through ``Depends(vrops_resources)``:
settings, the Redis client for ``REDIS_URL`` (short socket timeouts, no retries),
the broker client for ``CELERY_BROKER_URL`` (the same object when the URLs match)
and one failure episode per store, so a Redis outage is logged once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import Request
from redis.asyncio import Redis

from app.common.episodes import FailureEpisode
from app.common.redis import make_redis
from app.vrops.settings import VropsSettings

log = logging.getLogger("app.vrops")


@dataclass
class VropsResources:
    settings: VropsSettings
    redis: Redis
    broker_redis: Redis
    episode: FailureEpisode
    jobs_episode: FailureEpisode

    async def ping(self) -> tuple[bool, str]:
        """Readiness check: Redis answers a PING."""
        pong = await self.redis.ping()
        return bool(pong), "PONG" if pong else f"unexpected answer {pong!r}"

    async def aclose(self) -> None:
        if self.broker_redis is not self.redis:
            await self.broker_redis.aclose()
        await self.redis.aclose()


def open_resources(settings: VropsSettings) -> VropsResources:
    timeout = settings.vrops_redis_timeout_seconds
    redis = make_redis(settings.redis_url, timeout)
    broker = redis if settings.broker_url == settings.redis_url else make_redis(settings.broker_url, timeout)
    return VropsResources(
        settings=settings, redis=redis, broker_redis=broker,
        episode=FailureEpisode("vROps sample store (Redis)", log),
        jobs_episode=FailureEpisode("vROps job metrics store (Redis)", log),
    )


async def vrops_resources(request: Request) -> VropsResources:
    """FastAPI dependency: the resources the app's lifespan opened (async: a plain-def
    dependency costs a thread-pool round trip per request)."""
    res: VropsResources | None = getattr(request.app.state, "vrops", None)
    if res is None:
        raise RuntimeError("vROps resources not opened: serve the router from app.main.create_app "
                           "or open_resources() in your lifespan")
    return res
