"""The one Redis client factory: every feature's Redis client is made here.

Clients fail fast: bounded connect and read time and no hidden retry loop, so a
Redis outage costs a request a bounded latency, never a stall; what to do about
the failure (serve stale, 503, skip a cycle) is the caller's designed answer.

URLs: ``redis://``, ``rediss://`` and ``unix://`` as redis-py reads them, plus two
forms redis-py has no URL for, so one setting can name any deployment:

- ``redis+sentinel://[[user]:password@]host:port[,host:port...]/<master name>[/<db>]``:
  the master of a Sentinel-managed group (found through the sentinels, followed
  across fail-overs); the password is the data nodes' (sentinels are asked without one);
- ``redis+cluster://[[user]:password@]host:port[,...]`` (``rediss+cluster://`` for TLS):
  a Redis Cluster (only through ``make_redis_client``; the vROps store needs one node).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from redis import Redis as SyncRedis
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry as SyncRetry

AsyncRedis = Redis | RedisCluster
SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


def _retry(retries: int) -> Retry:
    # Connection errors only: a timeout is never retried (it would double the wait).
    return Retry(NoBackoff(), retries, supported_errors=(RedisConnectionError,))


def _fail_fast(timeout: float, retries: int = 0) -> dict[str, Any]:
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": _retry(retries),
        "retry_on_timeout": False,
    }


def _hosts(netloc: str) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    """user, password and host:port pairs of a (possibly multi-host) netloc."""
    user = password = None
    if "@" in netloc:
        cred, netloc = netloc.rsplit("@", 1)
        if ":" in cred:
            u, p = cred.split(":", 1)
            user, password = unquote(u) or None, unquote(p)
        else:
            password = unquote(cred)
    pairs: list[tuple[str, int]] = []
    for part in netloc.split(","):
        host, _, port = part.strip().rpartition(":")
        if not host:
            host, port = port, "26379"
        pairs.append((host.strip("[]"), int(port)))
    return user, password, pairs


def make_redis(url: str, timeout: float, *, max_connections: int = 64, retries: int = 0) -> Redis:
    """An asyncio client for `url` with `timeout` seconds for connect and every command.

    A ``redis+sentinel://`` URL gives a client of the Sentinel group's current master.
    `retries`: immediate retries after a connection error (a pooled connection that a
    restarted Redis closed fails once, then a new one is made); never after a timeout.
    """
    if url.startswith(SENTINEL_SCHEME + "://"):
        parts = urlsplit(url)
        user, password, hosts = _hosts(parts.netloc)
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError("a redis+sentinel:// URL names the master: redis+sentinel://host:port/<name>")
        db = int(path[1]) if len(path) > 1 else 0
        sentinel = Sentinel(hosts, sentinel_kwargs=_fail_fast(timeout), **_fail_fast(timeout))
        client: Redis = sentinel.master_for(
            path[0], redis_class=Redis, username=user, password=password, db=db,
            health_check_interval=0, max_connections=max_connections, **_fail_fast(timeout, retries),
        )
        return client
    if url.startswith(tuple(s + "://" for s in CLUSTER_SCHEMES)):
        raise ValueError("a Redis Cluster URL needs make_redis_client()")
    return Redis.from_url(url, health_check_interval=0, max_connections=max_connections,
                          **_fail_fast(timeout, retries))


def make_redis_client(url: str, timeout: float, *, max_connections: int = 64, retries: int = 0) -> AsyncRedis:
    """Like `make_redis`, and a ``RedisCluster`` for ``redis+cluster://`` URLs.

    For callers that only use single-key commands, pipelines and scripts whose keys
    share a hash slot (the gateway's shared tier), which work the same on both.
    """
    scheme = url.split("://", 1)[0]
    if scheme not in CLUSTER_SCHEMES:
        return make_redis(url, timeout, max_connections=max_connections, retries=retries)
    parts = urlsplit(url)
    user, password, hosts = _hosts(parts.netloc)
    return RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in hosts], username=user, password=password,
        ssl=scheme == "rediss+cluster", max_connections=max_connections,
        socket_timeout=timeout, socket_connect_timeout=timeout, retry=_retry(retries),
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
