"""The shared tier on each kind of Redis its URL can name: a Redis Cluster (3 masters,
3 replicas) and a Sentinel-managed master (3 sentinels), all real redis-server
processes on loopback; plus the REDIS_URL fallback of the settings root. Failovers,
redirects and slot migrations: test_redis_cluster.py."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_sync
from redis.asyncio import Redis, RedisCluster

from app.common.redis import make_redis_client
from app.gateway.caching.shared import LEAD, SharedTier
from app.gateway.result import Fetched, Sample
from app.gateway.settings import GatewaySettings
from app.settings import AppSettings
from app.vrops.settings import VropsSettings
from tests.support.procs import REDIS_BIN
from tests.support.redis_cluster import RedisClusterProcs, SentinelGroup, start_sentinel_group
from tests.support.tools import needs

pytestmark = pytest.mark.integration

def answer() -> Fetched:
    """Fetched now: its fresh entry lives until the TTL grid step after *now* (a value made at
    import time would already be expired when a long suite reaches this test)."""
    return Fetched((Sample((("provider", "openai"),), 3.0),), time.time(), expires_at=time.monotonic() + 60)


async def exercise(tier: SharedTier) -> None:
    """Claim, wait, take over, publish, hit: the whole protocol against this Redis."""
    keys = ["a|x", "b|y", "c|z"]
    first = await tier.claim(keys, [True] * 3, 1.0)
    assert first is not None and sorted(first.led) == keys
    second = await tier.claim(keys, [True] * 3, 1.0)
    assert second is not None and second.awaited == dict.fromkeys(keys, first.token)
    waiter = asyncio.create_task(tier.wait(second.awaited, second.token, asyncio.get_running_loop().time() + 2))
    await asyncio.sleep(0.05)
    published = answer()
    await tier.publish(first.token, dict.fromkeys(keys, published))
    got = await waiter
    assert all(isinstance(v, Fetched) and v.samples == published.samples for v in got.values())
    third = await tier.claim(keys, [True] * 3, 1.0)
    assert third is not None and set(third.hits) == set(keys)
    # A holder that never publishes: the next claimant takes over after the lease.
    lone = ["d|w"]
    held = await tier.claim(lone, [False], 1.0)
    assert held is not None and held.led == lone
    other = await tier.claim(lone, [False], 1.0)
    assert other is not None
    outcome = await tier.wait(other.awaited, other.token, asyncio.get_running_loop().time() + 2)
    assert outcome == {"d|w": LEAD}


@needs("redis-cli")
async def test_on_a_redis_cluster(redis_cluster: RedisClusterProcs) -> None:
    """The whole protocol on 3 masters: a batch's keys share its tenant's slot (one script
    call each), wherever that slot lives."""
    client = make_redis_client(redis_cluster.url, 1.0)
    assert isinstance(client, RedisCluster)
    tier = SharedTier(GatewaySettings(gateway_cache_lock_lease_seconds=0.2), client, "cafe01")
    try:
        await exercise(tier)
    finally:
        await tier.aclose()


@pytest.fixture()
def sentinel(tmp_path: Path) -> Iterator[SentinelGroup]:
    group = start_sentinel_group(tmp_path)
    yield group
    group.stop()


async def test_through_sentinel(sentinel: SentinelGroup) -> None:
    client = make_redis_client(sentinel.url(2), 1.0)
    assert isinstance(client, Redis)
    tier = SharedTier(GatewaySettings(gateway_cache_lock_lease_seconds=0.2), client, "cafe02")
    try:
        await exercise(tier)
    finally:
        await tier.aclose()
    with redis_sync.Redis(port=sentinel.master_port(), db=2, socket_timeout=5) as r:
        assert list(r.scan_iter(match="mg:v2:cafe02:*:fresh:*"))  # written to the master, db 2


def test_redis_url_is_the_default_and_off_opts_out(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("GATEWAY_CACHE_URL", "REDIS_URL"):
        monkeypatch.delenv(var, raising=False)
    assert AppSettings().gateway.shared_cache_url is None  # neither set: per process
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6390/0")
    assert AppSettings().gateway.shared_cache_url == "redis://127.0.0.1:6390/0"
    monkeypatch.setenv("GATEWAY_CACHE_URL", "redis://127.0.0.1:6391/1")
    assert AppSettings().gateway.shared_cache_url == "redis://127.0.0.1:6391/1"
    monkeypatch.setenv("GATEWAY_CACHE_URL", "off")
    assert AppSettings().gateway.shared_cache_url is None
    given = AppSettings(gateway=GatewaySettings(), vrops=VropsSettings(redis_url="redis://127.0.0.1:6392/0"))
    monkeypatch.delenv("GATEWAY_CACHE_URL")
    assert AppSettings(gateway=GatewaySettings(), vrops=given.vrops).gateway.shared_cache_url == \
        "redis://127.0.0.1:6392/0"


def test_redis_server_supports_what_the_tier_uses() -> None:
    out = subprocess.run([REDIS_BIN, "--version"], capture_output=True, text=True, check=True).stdout
    major, minor = (int(x) for x in out.split("v=")[1].split(".")[:2])
    assert (major, minor) >= (6, 2)  # SET ... PXAT
