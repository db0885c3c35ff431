"""The one Redis client factory: every feature's Redis client is made here.

Clients fail fast: bounded connect and read time and no hidden retry loop, so a
Redis outage costs a request a bounded latency, never a stall; what to do about
the failure (serve stale, 503, skip a cycle) is the caller's designed answer.
"""

from __future__ import annotations

from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.retry import Retry as SyncRetry


def make_redis(url: str, timeout: float, *, max_connections: int = 64) -> Redis:
    """An asyncio client for `url` with `timeout` seconds for connect and every command."""
    return Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
        max_connections=max_connections,
    )


def make_sync_redis(url: str, timeout: float) -> SyncRedis:
    """A blocking client (Celery workers, scripts) with the same fail-fast rules."""
    return SyncRedis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=SyncRetry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
    )
