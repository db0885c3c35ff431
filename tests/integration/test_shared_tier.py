"""The shared tier against a real Redis and a real Prometheus, several gateway "processes"
in one event loop (each its own service: client, local cache, shared-tier client).

They meet only in Redis, as separate workers and replicas do; the fleet of real
gunicorn instances is in test_shared_fleet.py. Upstream requests are counted by
Prometheus itself (prometheus_http_requests_total).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
from prometheus_client import REGISTRY

from app.common.tenancy import UNCONFINED
from app.gateway.caching.shared import catalog_fingerprint
from app.gateway.catalog.loader import load_catalog
from app.gateway.catalog.model import Catalog
from app.gateway.result import Lookup, State
from app.gateway.service import GatewayService
from app.gateway.settings import GatewaySettings
from tests.integration.conftest import PromStack
from tests.support.procs import Proc, free_port, prometheus_query_requests, start_redis

pytestmark = pytest.mark.integration

DEAD_URL = "http://127.0.0.1:1"  # nothing listens: an upstream outage


@pytest.fixture()
def redis_db(redis_proc: Proc) -> Iterator[redis_sync.Redis]:
    """The session's Redis (tests/conftest.py), emptied for this test."""
    r = redis_sync.Redis.from_url(redis_proc.url, socket_timeout=5)
    yield r
    r.close()


@pytest.fixture()
def own_redis(tmp_path: Path) -> Iterator[Proc]:
    """A Redis of this test's own, to stop, pause or fill."""
    proc = start_redis(tmp_path / "redis")
    yield proc
    proc.stop()


Make = Callable[..., GatewayService]


@pytest.fixture()
async def make(prom_stack: PromStack, redis_proc: Proc) -> AsyncIterator[Make]:
    """Gateway 'processes' sharing the test's Redis under a namespace of their own."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    made: list[GatewayService] = []

    def factory(catalog: Catalog | None = None, **kw: Any) -> GatewayService:
        kw.setdefault("prometheus_url", prom_stack.prometheus.url)
        kw.setdefault("gateway_cache_url", redis_proc.url)
        kw.setdefault("gateway_cache_prefix", prefix)
        kw.setdefault("cache_ttl_seconds", 60)
        kw.setdefault("response_memo_seconds", 0)
        svc = GatewayService(GatewaySettings(**kw), catalog)
        made.append(svc)
        return svc

    yield factory
    for svc in made:
        await svc.aclose()


def queries(prom: PromStack) -> float:
    return prometheus_query_requests(prom.prometheus.url)


async def until(check: Callable[[], object], timeout: float = 3.0) -> None:
    """Publishing runs after the answer (in the background): wait for it, bounded."""
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.02)


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def test_one_upstream_request_for_a_fleet_of_cold_processes(make: Make, prom_stack: PromStack) -> None:
    fleet = [make() for _ in range(4)]
    before = queries(prom_stack)
    waits = metric("metrics_gateway_shared_cache_lock_wait_seconds_count")
    coalesced = metric("metrics_gateway_shared_cache_events_total", {"category": "summary", "outcome": "coalesced"})
    answers = await asyncio.gather(*(svc.summary() for svc in fleet for _ in range(5)))
    assert queries(prom_stack) - before == 1  # one batch for 20 cold requests in 4 processes
    assert metric("metrics_gateway_shared_cache_lock_wait_seconds_count") - waits == 3  # the 3 followers
    assert metric("metrics_gateway_shared_cache_events_total",
                  {"category": "summary", "outcome": "coalesced"}) - coalesced == 3 * len(answers[0])
    lookups = [r.lookup for a in answers for r in a.values()]
    assert set(lookups) <= {Lookup.MISS, Lookup.COALESCED, Lookup.HIT}
    assert lookups.count(Lookup.MISS) == len(answers[0])  # one request led, for the fleet
    first = {k: r.total() for k, r in answers[0].items()}
    for a in answers[1:]:
        assert {k: r.total() for k, r in a.items()} == first
    # A process that arrives later in the same TTL step finds the figures in Redis.
    late = make()
    got = await late.summary()
    assert {r.lookup for r in got.values()} == {Lookup.HIT}
    assert queries(prom_stack) - before == 1
    assert {k: r.fetched_at for k, r in got.items()} == {k: r.fetched_at for k, r in answers[0].items()}


async def test_entries_expire_on_the_wall_clock_grid(make: Make, redis_db: redis_sync.Redis) -> None:
    svc = make(cache_ttl_seconds=7)
    await svc.summary()
    pattern = f"{svc.settings.gateway_cache_prefix}:*:fresh:*"
    await until(lambda: len(list(redis_db.scan_iter(match=pattern))) == len(svc.catalog.summary_queries()))
    fresh = list(redis_db.scan_iter(match=pattern))
    now_ms = time.time() * 1000
    for key in fresh:
        expires_ms = redis_db.pexpiretime(key)
        assert expires_ms % 7000 == 0  # on the grid, the same instant for every process
        assert 0 < expires_ms - now_ms <= 2 * 7000
        good_ttl = redis_db.pttl(key.replace(b":fresh:", b":good:"))
        assert good_ttl > 3_000_000  # last good kept STALE_MAX_AGE_SECONDS (3600 s)


async def test_a_failed_fetch_is_not_cached_and_the_next_request_retries(
        make: Make, prom_stack: PromStack) -> None:
    down = make(prometheus_url=DEAD_URL)
    failed = await down.summary()
    assert {r.lookup for r in failed.values()} == {Lookup.FAILED}
    up = make()
    before = queries(prom_stack)
    answer = await up.summary()
    assert {r.state for r in answer.values()} == {State.FRESH}
    assert queries(prom_stack) - before == 1


async def test_waiters_get_the_holders_failure_not_a_stale_lock(
        make: Make, redis_db: redis_sync.Redis, prom_stack: PromStack) -> None:
    """A holder that fails hands its failure to the processes waiting on it (they
    answer at once, not after the lease), and the lock is released for the retry."""
    # The leader's upstream accepts and never answers, so it holds the lock for its
    # whole (short) deadline and then fails.
    hang_port = free_port()
    server = await asyncio.start_server(lambda r, w: asyncio.sleep(30), "127.0.0.1", hang_port)
    try:
        leader = make(prometheus_url=f"http://127.0.0.1:{hang_port}", request_deadline_seconds=0.8,
                      gateway_cache_lock_lease_seconds=5)
        waiter = make(request_deadline_seconds=3)
        lead_task = asyncio.create_task(leader.summary())
        await asyncio.sleep(0.3)  # the leader holds the locks now
        assert any(redis_db.scan_iter(match="*:lock:*"))
        t0 = time.monotonic()
        got = await waiter.summary()
        waited = time.monotonic() - t0
        await lead_task
        assert {r.lookup for r in got.values()} == {Lookup.FAILED}
        assert waited < 1.5  # not the 5 s lease: the failure was handed over
        assert not any(redis_db.scan_iter(match="*:lock:*"))
        before = queries(prom_stack)
        retry = await waiter.summary()
        assert {r.state for r in retry.values()} == {State.FRESH}
        assert queries(prom_stack) - before == 1
    finally:
        server.close()


async def test_a_vanished_holder_blocks_others_only_for_its_lease(
        make: Make, redis_db: redis_sync.Redis, prom_stack: PromStack) -> None:
    catalog = load_catalog()
    svc = make(gateway_cache_lock_lease_seconds=0.5)
    # A holder that died right after taking the locks: nothing renews or releases them.
    service_keys = [f"{UNCONFINED.id}|{','.join(q.labels)}|{q.expr}" for q in catalog.summary_queries()]
    await svc.ensure_started()
    assert svc._shared is not None
    for key in service_keys:
        redis_db.set(svc._shared.keys.figure(key).lock, "deadbeefdeadbeef", px=500)
    before = queries(prom_stack)
    t0 = time.monotonic()
    got = await svc.summary()
    took = time.monotonic() - t0
    assert {r.state for r in got.values()} == {State.FRESH}
    assert 0.3 < took < 2.0  # waited out the lease, then fetched itself within the deadline
    assert queries(prom_stack) - before == 1
    assert metric("metrics_gateway_shared_cache_events_total", {"category": "summary", "outcome": "takeover"}) > 0


async def test_a_restarted_process_serves_last_good_with_its_true_age(make: Make) -> None:
    first = make(cache_ttl_seconds=1)
    good = await first.summary()
    fetched_at = {k: r.fetched_at for k, r in good.items()}
    await asyncio.sleep(0.3)  # published
    await first.aclose()
    await asyncio.sleep(2.0)  # past the fresh entries' expiry (at most two 1 s steps)
    # A new process (nothing in memory) during an upstream outage.
    restarted = make(prometheus_url=DEAD_URL, cache_ttl_seconds=1)
    got = await restarted.summary()
    assert {r.lookup for r in got.values()} == {Lookup.STALE}
    for key, r in got.items():
        assert r.fetched_at == fetched_at[key]
        assert r.total() == good[key].total()
        assert r.age_seconds is not None and r.age_seconds >= 2.0


async def test_a_changed_catalog_ignores_old_entries(make: Make, prom_stack: PromStack,
                                                     redis_db: redis_sync.Redis) -> None:
    catalog = load_catalog()
    await make(catalog).summary()
    await asyncio.sleep(0.3)  # published
    before = queries(prom_stack)
    assert {r.lookup for r in (await make(catalog).summary()).values()} == {Lookup.HIT}
    assert queries(prom_stack) == before
    # The same summary figures (the same cache keys) under a catalog whose hash
    # differs: a query the summary does not use was changed.
    summary_ids = {q.id for q in catalog.summary_queries()}
    qid, q = next((i, q) for i, q in catalog.queries.items() if i not in summary_ids)
    bumped = dataclasses.replace(catalog, queries={**catalog.queries,
                                                   qid: dataclasses.replace(q, expr=f"({q.expr}) * 2")})
    assert catalog_fingerprint(bumped) != catalog_fingerprint(catalog)
    got = await make(bumped).summary()
    assert Lookup.HIT not in {r.lookup for r in got.values()}
    assert queries(prom_stack) - before == 1
    await asyncio.sleep(0.3)  # published
    namespaces = {k.split(b":")[2].strip(b"{}") for k in redis_db.scan_iter(match="*:fresh:*")}
    assert {catalog_fingerprint(catalog).encode(), catalog_fingerprint(bumped).encode()} <= namespaces


# -- Redis failing: every request still answers, within its deadline --------------------------

async def _answers_within(svc: GatewayService, n: int, deadline: float) -> list[float]:
    took = []
    for _ in range(n):
        t0 = time.monotonic()
        got = await svc.summary()
        took.append(time.monotonic() - t0)
        assert {r.state for r in got.values()} <= {State.FRESH, State.CACHED}
        svc.cache.clear()  # every request a local miss: each goes to the shared tier
    assert max(took) < deadline
    return took


async def test_redis_down_then_back(make: Make, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    own = start_redis(tmp_path / "redis")
    try:
        svc = make(gateway_cache_url=own.url, gateway_cache_breaker_reset_seconds=0.5)
        await _answers_within(svc, 3, 1.0)
        assert metric("metrics_gateway_shared_cache_up") == 1
        own.stop()
        caplog.set_level(logging.WARNING, logger="gateway.shared")
        await _answers_within(svc, 20, 1.0)
        assert metric("metrics_gateway_shared_cache_up") == 0
        failing = [r for r in caplog.records if "failing" in r.getMessage()]
        assert len(failing) == 1  # one line per episode, not per request
        own = start_redis(tmp_path / "redis", port=own.port)
        await asyncio.sleep(0.6)  # the breaker's reset time: the next request probes
        await _answers_within(svc, 3, 1.0)
        assert metric("metrics_gateway_shared_cache_up") == 1
        assert [r for r in caplog.records if "recovered" in r.getMessage()]
    finally:
        own.stop()


async def test_redis_paused(make: Make, own_redis: Proc) -> None:
    svc = make(gateway_cache_url=own_redis.url, gateway_cache_timeout_seconds=0.1, request_deadline_seconds=2)
    await _answers_within(svc, 2, 1.0)
    errors = metric("metrics_gateway_shared_cache_errors_total", {"reason": "timeout"})
    with redis_sync.Redis.from_url(own_redis.url, socket_timeout=5) as r:
        r.execute_command("CLIENT", "PAUSE", 1500, "ALL")
    took = await _answers_within(svc, 5, 1.0)  # within the deadline, though Redis does not answer
    assert metric("metrics_gateway_shared_cache_errors_total", {"reason": "timeout"}) > errors
    assert max(took) < 0.6


async def test_redis_full(make: Make, own_redis: Proc) -> None:
    svc = make(gateway_cache_url=own_redis.url)
    with redis_sync.Redis.from_url(own_redis.url, socket_timeout=5) as r:
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", 1)
    oom = metric("metrics_gateway_shared_cache_errors_total", {"reason": "oom"})
    await _answers_within(svc, 5, 1.0)
    assert metric("metrics_gateway_shared_cache_errors_total", {"reason": "oom"}) > oom


async def test_answers_with_warnings_are_shared_fresh_but_never_as_last_good(redis_db: redis_sync.Redis,
                                                                             redis_proc: Proc) -> None:
    from app.common.redis import make_redis_client
    from app.gateway.caching.shared import SharedTier
    from app.gateway.result import Fetched, Sample, UpstreamFailure

    tier = SharedTier(GatewaySettings(), make_redis_client(redis_proc.url, 1.0), "w4rn")
    try:
        partial = Fetched((Sample((), 1.0),), time.time(), ("partial data",), expires_at=time.monotonic() + 5)
        claim = await tier.claim(["warned", "failed"], [True, True], 1.0)
        assert claim is not None
        await tier.publish(claim.token, {"warned": partial, "failed": UpstreamFailure("timeout", "slow")})
        k, f = tier.keys.figure("warned"), tier.keys.figure("failed")
        assert redis_db.exists(k.fresh) and not redis_db.exists(k.good)
        assert not redis_db.exists(f.fresh) and not redis_db.exists(f.good)  # a failure is never stored
        assert not redis_db.exists(k.lock) and not redis_db.exists(f.lock)  # both released
        again = await tier.claim(["warned", "failed"], [True, True], 1.0)
        assert again is not None and again.hits["warned"].warnings == ("partial data",)
        assert again.led == ["failed"]  # the next request simply asks again
    finally:
        await tier.aclose()
