"""The range cache over the shared tier with a real Redis: two caches stand for two
processes of a fleet (each its own local store and single flight, one Redis).

Tenants never share extents, a leader that dies blocks the others for one lease at
most, and a failed fetch reaches its waiters only (the next request asks again).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence

import pytest

from app.common.redis import make_redis_client
from app.gateway.caching.shared import SharedTier
from app.gateway.caching.shared_ranges import SharedExtentStore, SharedFlights
from app.gateway.caching.stores import MemoryExtentStore, TieredExtentStore
from app.gateway.engines.ranges import RangeCache, _key, _params_key
from app.gateway.result import Lookup
from app.gateway.settings import GatewaySettings
from app.gateway.upstream.answers import UpstreamError
from tests.support.procs import Proc
from tests.unit.test_ranges import FakeAnswer, GridUpstream

pytestmark = pytest.mark.integration

LEASE = 0.3
END = float(int(time.time()) // 60 * 60 - 3600)  # settled: an hour back
START = END - 1800


class Failing(GridUpstream):
    async def api(self, method: str, path: str, params: Sequence[tuple[str, str]], *,
                  timeout: float, category: str = "api",
                  headers: Mapping[str, str] | None = None) -> FakeAnswer:
        self.calls.append(dict(params))
        await asyncio.sleep(self.delay)
        raise UpstreamError("unavailable", "upstream down")


@pytest.fixture()
async def tier(redis_proc: Proc) -> AsyncIterator[SharedTier]:
    settings = GatewaySettings(gateway_cache_lock_lease_seconds=LEASE)
    t = SharedTier(settings, make_redis_client(redis_proc.url, 1.0), "r4ng")
    yield t
    await t.aclose()


def process(tier: SharedTier, upstream: GridUpstream | None = None) -> tuple[RangeCache, GridUpstream]:
    """One gateway process: its own local store and flights, the shared Redis."""
    upstream = upstream or GridUpstream()
    store = TieredExtentStore(MemoryExtentStore(10_000_000), SharedExtentStore(tier))
    return RangeCache(tier.settings, upstream, store, SharedFlights(tier)), upstream


async def ask(cache: RangeCache, scope: str = "") -> tuple[bytes | None, Lookup]:
    deadline = asyncio.get_running_loop().time() + 3
    r = await cache.query_range(scope=scope, expr="x", start=START, end=END, step=15, params=[],
                                deadline=deadline)
    return r.raw, r.lookup


async def test_a_second_process_hits_and_tenants_never_share(tier: SharedTier) -> None:
    one, up1 = process(tier)
    two, up2 = process(tier)
    body_a, lookup = await ask(one, "tenant-a")
    assert lookup is Lookup.MISS and len(up1.calls) == 1
    again, lookup = await ask(two, "tenant-a")
    assert (again, lookup) == (body_a, Lookup.HIT) and up2.calls == []
    _, lookup = await ask(two, "tenant-b")  # the same query, another tenant: its own fetch
    assert lookup is Lookup.MISS and len(up2.calls) == 1
    keys = await tier.client.keys(f"{tier.keys.namespace}:*")
    assert len(keys) >= 2


async def test_a_dead_leader_blocks_the_fleet_for_one_lease_at_most(tier: SharedTier) -> None:
    # A process claimed the request, then died without publishing (its lock expires).
    memo = f"{_key('range', '', 'x', 15_000, int(START * 1000) % 15_000, _params_key([]))}" \
           f":ans:{int(START * 1000)}:{int(END * 1000)}"
    dead = await SharedFlights(tier).claim(memo, 1.0)
    assert dead is not None and dead.holder is None
    cache, upstream = process(tier)
    started = time.monotonic()
    _, lookup = await ask(cache)
    elapsed = time.monotonic() - started
    assert lookup is Lookup.MISS and len(upstream.calls) == 1
    assert LEASE * 0.5 < elapsed < LEASE + 1.0, elapsed


async def test_a_failed_fetch_reaches_its_waiters_only(tier: SharedTier) -> None:
    failing = Failing()
    failing.delay = 0.2
    one, _ = process(tier, failing)
    two, up2 = process(tier)
    first = asyncio.create_task(ask(one))
    await asyncio.sleep(0.05)  # `one` holds the flight; `two` waits on it
    with pytest.raises(UpstreamError):
        await ask(two)
    with pytest.raises(UpstreamError):
        await first
    assert up2.calls == []
    _, lookup = await ask(two)  # not poisoned: asked again
    assert lookup is Lookup.MISS and len(up2.calls) == 1
