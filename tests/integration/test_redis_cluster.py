"""The shared tier on a real Redis Cluster (3 masters + 3 replicas, redis-cli --cluster
create) and a real Sentinel group (3 sentinels): keys spread over every master, and
the tier keeps answering through redirects (ASK, MOVED), a slot migration, a master
killed and replaced by its replica, and a Sentinel failover: answers within the
deadline (from upstream where the tier cannot answer), equal to Prometheus' own,
never another flight's or another key's, one log line per episode.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.crc import key_slot

from app.common.redis import make_redis_client
from app.gateway.caching.shared import SharedTier
from app.gateway.caching.shared_ranges import SharedExtentStore, SharedFlights
from app.gateway.result import Fetched, Sample
from app.gateway.settings import GatewaySettings
from tests.support.demo_data import generate, start_prometheus_with_history
from tests.support.procs import Proc, start_uvicorn, wait_until
from tests.support.redis_cluster import RedisClusterProcs, start_redis_cluster, start_sentinel_group
from tests.support.tools import needs

pytestmark = [pytest.mark.integration, needs("redis-server", "redis-cli")]

SETTINGS = GatewaySettings(gateway_cache_lock_lease_seconds=0.3, gateway_cache_timeout_seconds=0.5,
                           gateway_cache_breaker_reset_seconds=0.2)


def answer(value: float) -> Fetched:
    return Fetched((Sample((("provider", "openai"),), value),), time.time(), expires_at=time.monotonic() + 60)


def tier_on(url: str, catalog_hash: str) -> SharedTier:
    tier = SharedTier(SETTINGS, make_redis_client(url, SETTINGS.gateway_cache_timeout_seconds, retries=1),
                      catalog_hash)
    tier.topology.interval = 0.0  # look at the slot map after every command
    return tier


def figure_keys(tenant: str, n: int) -> list[str]:
    return [f"{tenant}|provider|sum(x{i})" for i in range(n)]


async def fill(tier: SharedTier, tenants: int, figures: int, extents: int, extent_bytes: int) -> None:
    """Figure batches (one claim and one publish per tenant) and range extents."""
    for t in range(tenants):
        keys = figure_keys(f"tenant{t}", figures)
        claim = await tier.claim(keys, [False] * len(keys), 2.0)
        assert claim is not None and sorted(claim.led) == sorted(keys)  # one script call per batch
        await tier.publish(claim.token, {k: answer(i) for i, k in enumerate(keys)})
    store = SharedExtentStore(tier)
    blob = bytes(range(256)) * (extent_bytes // 256)
    for start in range(0, extents, 50):
        await store.put_many([(f"range:q{i // 10}:b{i}", blob + i.to_bytes(4, "big"), 60.0)
                              for i in range(start, min(extents, start + 50))])


async def test_keys_spread_over_every_master(redis_cluster: RedisClusterProcs) -> None:
    """A figure batch keeps its tenant's keys in one slot; range extents spread by key.
    Measured: keys and bytes per master, none above half."""
    redis_cluster.flush()
    tier = tier_on(redis_cluster.url, "spread")
    try:
        await fill(tier, tenants=3, figures=20, extents=600, extent_bytes=16 * 1024)
        for t in range(3):
            slots = {key_slot(tier.keys.figure(k).fresh.encode()) for k in figure_keys(f"tenant{t}", 20)}
            assert len(slots) == 1, "a tenant's figures share one slot (one script call per batch)"
        flights = SharedFlights(tier)
        for i in range(60):  # remembered answers' flights: claimed, answered, released
            got = await flights.claim(f"range:ans:{i}", 1.0)
            assert got is not None and got.body is None and got.holder is None
    finally:
        await tier.aclose()
    keys = redis_cluster.keys_per_master()
    data = redis_cluster.bytes_per_master()
    total, total_bytes = sum(keys.values()), sum(data.values())
    print(f"\nkeys per master {keys} (total {total}); bytes per master {data}")
    assert len(keys) == 3 and total >= 3 * 20 * 2 + 600 + 60
    # Whatever masters the 3 tenants' figure sets land on, no master holds half.
    assert max(keys.values()) <= 0.5 * total, keys
    assert min(keys.values()) >= 0.2 * total, keys
    assert max(data.values()) <= 0.5 * total_bytes, data
    # The extents alone: a third each, give or take the hash's noise.
    ranges = [redis_cluster.master_of_slot(key_slot(tier.keys.of(f"range:q{i // 10}:b{i}").fresh.encode())).port
              for i in range(600)]
    assert max(ranges.count(p) for p in keys) <= 0.4 * len(ranges)


async def test_slot_migration_ask_then_moved(redis_cluster: RedisClusterProcs,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """A slot migrating under the tier: a key already moved is read through ASK, a script
    whose keys are not all on one side (its lock and last-good keys do not exist) is
    refused (TRYAGAIN) and the caller answers without the tier, within its timeout; once
    the slot is moved, MOVED is followed. Every answer is the key's own; one episode."""
    tier = tier_on(redis_cluster.url, "migrate")
    store, flights = SharedExtentStore(tier), SharedFlights(tier)
    caplog.set_level(logging.WARNING, logger="gateway.shared")
    try:
        values = {f"range:m{i}": f"extent {i}".encode() * 100 for i in range(40)}
        await store.put_many([(k, v, 60.0) for k, v in values.items()])
        target = "range:m7"
        slot = key_slot(tier.keys.of(target).fresh.encode())
        src = redis_cluster.master_of_slot(slot)
        dst = next(m for m in redis_cluster.masters() if m.id != src.id)
        assert (await store.get_many([target])) == [values[target]]  # the map is known: no redirect
        claimed = await flights.claim(target, 1.0)
        assert claimed is not None and claimed.body == values[target]

        redis_cluster.migrate_slot(slot, dst, finish=False)  # IMPORTING/MIGRATING, every key moved
        assert (await store.get_many([target])) == [values[target]]  # ASK: asked of the importing node
        started = time.monotonic()
        got = await flights.claim(target, 1.0)
        assert time.monotonic() - started < 1.5
        assert got is None or got.body == values[target]

        redis_cluster.finish_migration(slot, dst)
        assert redis_cluster.master_of_slot(slot).id == dst.id
        for _ in range(3):  # MOVED, then the patched map
            assert (await store.get_many(list(values))) == list(values.values())
        got = await flights.claim(target, 1.0)
        assert got is not None and got.body == values[target]
        # Back where it was, for the tests that follow.
        redis_cluster.migrate_slot(slot, src)
        for _ in range(3):
            assert (await store.get_many(list(values))) == list(values.values())
            await asyncio.sleep(0.15)  # successes for a breaker period: the episode ends
        assert tier.topology.changes >= 2
    finally:
        await tier.aclose()
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.shared"]
    # Both moves, and the TRYAGAIN: one episode (its closing line names the change), or
    # one line for the moves when no command failed.
    assert sum("slot map changed" in m for m in lines) == 1, lines
    assert len(lines) <= 2 and not any("failing" in m for m in lines[1:]), lines


# -- a master killed under a fleet of two gateways --------------------------------------------

DEADLINE = 5.0
QUERY = "sum by (mode) (rate(demo_cpu_usage_seconds_total[5m]))"


def window(end: int, i: int) -> dict[str, str]:
    """Settled 20 min windows at a 15 s step, the i-th ending i seconds before `end`: answers
    that never change, each its own cache key (nothing in any process's local tier)."""
    end -= i % 2400
    return {"query": QUERY, "start": str(end - 1200), "end": str(end), "step": "15"}


@pytest.fixture()
def own_cluster(tmp_path: Path) -> Iterator[RedisClusterProcs]:
    """A cluster of this test's own: its masters get killed."""
    cluster = start_redis_cluster(tmp_path / "cluster")
    yield cluster
    cluster.stop()


def test_master_killed_answers_keep_coming(own_cluster: RedisClusterProcs, tmp_path: Path) -> None:
    """SIGKILL of the master holding the most keys while two gateways answer range queries
    and figures: every answer 200 within the deadline, every range answer equal to
    Prometheus' own, the replica takes over, each gateway logs the episode once."""
    procs: list[Proc] = []
    try:
        prom = start_prometheus_with_history(tmp_path / "prometheus", generate(time.time() - 20, hours=2))
        procs.append(prom)
        env = {"PROMETHEUS_URL": prom.url, "GATEWAY_CACHE_URL": own_cluster.url,
               "GATEWAY_CACHE_PREFIX": f"kc{uuid.uuid4().hex[:6]}", "REQUEST_DEADLINE_SECONDS": str(DEADLINE),
               "RESPONSE_MEMO_SECONDS": "0", "VROPS_TARGETS": "[]", "LOG_LEVEL": "WARNING",
               "GATEWAY_CACHE_BREAKER_RESET_SECONDS": "1"}
        for i in range(2):
            procs.append(start_uvicorn(tmp_path / f"gw{i}", "app.main:app", env))
        gateways = procs[1:]
        end = int(time.time()) // 60 * 60 - 120
        first = httpx.post(f"{prom.url}/api/v1/query_range", data=window(end, 2399), timeout=10).json()
        assert first["data"]["result"], "the windows must hold data"
        victim = max(own_cluster.masters(), key=lambda m: own_cluster.keys_per_master()[m.port])
        failures: list[str] = []
        slowest = [0.0]
        asked = itertools.count()
        stop = threading.Event()

        def client() -> None:
            # Each window asked once of each gateway: the first fetches it for the fleet,
            # the second reads it from the cluster (or waits on the first's flight).
            with httpx.Client(timeout=DEADLINE * 2) as http:
                while not stop.is_set():
                    i = next(asked)
                    gw = gateways[i % 2].url
                    started = time.monotonic()
                    try:
                        if i % 5 == 0:
                            got = http.get(f"{gw}/prometheus/metrics/summary")
                            ok = got.status_code == 200
                        else:
                            form = window(end, i // 2)
                            got = http.post(f"{gw}/api/v1/query_range", data=form)
                            direct = http.post(f"{prom.url}/api/v1/query_range", data=form)
                            ok = got.status_code == 200 and got.content == direct.content
                        said = f"{got.status_code} {got.text[:200]}"
                    except httpx.HTTPError as exc:
                        ok, said = False, repr(exc)
                    took = time.monotonic() - started
                    slowest[0] = max(slowest[0], took)
                    if not ok or took > DEADLINE:
                        failures.append(f"{gw} #{i} {took:.2f}s {said}")

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            replica = own_cluster.kill_master(victim)
            own_cluster.wait_promoted(replica)
            # And on, on the new map, until each gateway's episode has ended (after 1 s of
            # successes on the new map).
            wait_until(lambda: all("recovered" in g.log() for g in gateways), 20, interval=0.2,
                       what="each gateway's episode ended")
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert not failures, failures[:5]
        print(f"\n{next(asked)} requests, slowest {slowest[0]:.3f}s")
        assert slowest[0] < DEADLINE
        assert len(own_cluster.masters()) == 3 and replica.port in {m.port for m in own_cluster.masters()}
        logs = [g.log() for g in gateways]
        for g in gateways:
            changes = [line for line in httpx.get(f"{g.url}/metrics", timeout=5).text.splitlines()
                       if line.startswith("metrics_gateway_shared_cache_topology_changes_total ")]
            assert changes and float(changes[0].split()[1]) >= 1, changes  # each followed the failover
        # One episode per process: it started when a command met the dead master, and it
        # ended, naming the new slot map, once the new map served a breaker period
        # without failure.
        for log in logs:
            assert log.count("shared cache tier (Redis) failing") == 1, log
            assert log.count("shared cache tier (Redis) recovered") == 1, log
            assert log.count("slot map changed") == 1, log
            assert "recovered" in next(line for line in log.splitlines() if "slot map changed" in line)
    finally:
        for p in reversed(procs):
            p.stop()


# -- Sentinel: a real failover ----------------------------------------------------------------

async def test_sentinel_failover(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """SENTINEL FAILOVER under a tier in use: every call returns within its timeout with
    the right entry or nothing (then the caller asks upstream); afterwards the entries
    written before are read from the promoted replica and new ones are written to it."""
    group = start_sentinel_group(tmp_path)
    caplog.set_level(logging.WARNING, logger="gateway.shared")
    tier = tier_on(group.url(), "sentinel")
    store = SharedExtentStore(tier)
    try:
        values = {f"range:s{i}": f"extent {i}".encode() * 50 for i in range(30)}
        await store.put_many([(k, v, 60.0) for k, v in values.items()])
        keys = figure_keys("tenant0", 10)
        claim = await tier.claim(keys, [False] * 10, 1.0)
        assert claim is not None
        await tier.publish(claim.token, {k: answer(i) for i, k in enumerate(keys)})
        await asyncio.sleep(0.2)  # replicated (asynchronously) to the replica
        old = group.master_port()
        done = asyncio.get_running_loop().run_in_executor(None, group.failover)
        calls = 0
        while not done.done() or calls < 20:
            calls += 1
            started = time.monotonic()
            got = await store.get_many(list(values))
            assert time.monotonic() - started < 2 * SETTINGS.gateway_cache_timeout_seconds + 0.2
            assert all(g is None or g == values[k] for g, k in zip(got, values, strict=True))
            await asyncio.sleep(0.02)
        new = await done
        assert new != old and group.master_port() == new
        got = await store.get_many(list(values))
        assert got == list(values.values())  # on the promoted replica
        again = await tier.claim(keys, [False] * 10, 1.0)
        assert again is not None and set(again.hits) == set(keys)
        assert [again.hits[k].samples[0].value for k in keys] == [float(i) for i in range(10)]
        await store.put_many([("range:after", b"written after", 60.0)])
        assert (await store.get_many(["range:after"])) == [b"written after"]
    finally:
        await tier.aclose()
        group.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.shared"]
    assert len(lines) <= 2, lines  # at most one failing / recovered pair
