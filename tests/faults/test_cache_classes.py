"""Issue 12, finding 1: filtered traffic must not wipe stale-if-error, nor amplify upstream load.

The probe: ~420 requests with distinct ``provider=`` values (no token needed) evicted
all 23 summary last-good values from the one shared LRU, so the outage that followed
answered ``unavailable`` instead of ``degraded``; and each distinct value cost one
upstream request, unthrottled. Now the catalog's unfiltered figures live in a cache
class of their own (bounded by the catalog, never evicted by filtered variants), the
filtered class is an LRU bounded in entries and bytes, and filtered fetches past
FILTERED_FETCHES_PER_SECOND are shed with 429 + Retry-After.
"""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.gateway.caching.figures import CacheClass, QueryCache, estimate_bytes
from app.gateway.caching.memo import ResponseMemo
from app.gateway.catalog.model import CatalogQuery
from app.gateway.engines.batch import _project
from app.gateway.result import Fetched, Sample
from tests.faults.conftest import DEADLINE, MARGIN, Gateway, metric, record, start_gateway, stop_gateway
from tests.faults.engine_fake import EngineFake, engine_env

SUMMARY = "/prometheus/metrics/summary"
PROVIDERS = "/prometheus/metrics/providers"
MAX_BYTES = 256 * 1024
ENTRIES = 512
ATTACK = 60  # x 10 figures of /providers: more filtered keys than ENTRIES


@pytest.fixture()
def fake() -> Iterator[EngineFake]:
    server = EngineFake().start()
    try:
        yield server
    finally:
        server.stop()


def _gateway(tmp: Path, fake: EngineFake, **env: str) -> Gateway:
    return start_gateway(tmp, engine_env(fake.url, **env))


async def _distinct_providers(url: str, count: int, concurrency: int = 16) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=10,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> httpx.Response:
            async with sem:
                return await client.get(PROVIDERS, params={"provider": f"attacker-{i}"})

        return list(await asyncio.gather(*(one(i) for i in range(count))))


def test_filtered_traffic_cannot_evict_the_summary_last_good_values(tmp_path: Path, fake: EngineFake) -> None:
    # Unthrottled here, to prove the classes alone keep the summary's last-good values;
    # the probe's 420 requests against 4096 entries, scaled down (same ratio) to stay quick;
    # a small byte bound, so filtered variants are evicted by bytes too.
    gw = _gateway(tmp_path, fake, STALE_MAX_AGE_SECONDS="3600", CACHE_TTL_SECONDS="1",
                  FILTERED_FETCHES_PER_SECOND="100000", FILTERED_FETCH_BURST="100000",
                  CACHE_MAX_ENTRIES=str(ENTRIES), CACHE_MAX_BYTES=str(MAX_BYTES))
    try:
        warm = gw.client.get(gw.url + SUMMARY).json()
        assert warm["status"] == "ok"
        t0 = time.perf_counter()
        answers = asyncio.run(_distinct_providers(gw.url, ATTACK))
        attack_seconds = time.perf_counter() - t0
        assert {r.status_code for r in answers} == {200}
        m = gw.metrics()

        fake.mode = "internal"  # the outage
        time.sleep(2.2)  # past the 1 s TTL grid step (at most two): nothing is fresh any more
        r, seconds = gw.timed_get(SUMMARY)
        body = r.json()
    finally:
        stop_gateway(gw)

    states = [p["state"] for s in body["provenance"].values() for p in s.values()]
    assert body["status"] == "degraded", body["status"]
    assert states.count("stale") == 23 and len(states) == 23, states
    assert {e["error_type"] for e in body["errors"]} == {"internal"}
    # The filtered class was held to its byte bound (it had to evict), the catalog class never.
    catalog = metric(m, "metrics_gateway_cache_bytes", **{"class": "catalog"})
    filtered = metric(m, "metrics_gateway_cache_bytes", **{"class": "filtered"})
    assert catalog > 0 and 0 < catalog + filtered <= MAX_BYTES, (catalog, filtered)
    assert metric(m, "metrics_gateway_cache_evictions_total", **{"class": "filtered"}) > 0
    assert metric(m, "metrics_gateway_cache_evictions_total", **{"class": "catalog"}) == 0
    record({"suite": "engine", "fault": f"{ATTACK} distinct provider= values, then HTTP 500 outage",
            "route": f"{PROVIDERS}?provider=x x{ATTACK}, {SUMMARY}", "http_status": 200,
            "json_status": body["status"], "error_type": "internal", "max_seconds": round(seconds, 3),
            "bound_seconds": DEADLINE + MARGIN, "log_lines": None, "upstream_up": 0.0, "connections_after": None,
            "attack_seconds": round(attack_seconds, 2)})


def test_filtered_fetches_past_their_rate_are_shed_with_429(tmp_path: Path, fake: EngineFake) -> None:
    rate = 5
    gw = _gateway(tmp_path, fake, CACHE_TTL_SECONDS="60", FILTERED_FETCHES_PER_SECOND=str(rate),
                  FILTERED_FETCH_BURST=str(rate))
    try:
        # What one filtered variant costs upstream (a batch, plus any figure that cannot batch).
        before = fake.figure_requests
        first = gw.client.get(gw.url + PROVIDERS, params={"provider": "openai"})
        assert first.status_code == 200
        per_fetch = fake.figure_requests - before
        assert per_fetch >= 1

        before = fake.figure_requests
        t0 = time.perf_counter()
        answers = asyncio.run(_distinct_providers(gw.url, 120, concurrency=8))
        elapsed = time.perf_counter() - t0
        upstream = fake.figure_requests - before

        shed = [r for r in answers if r.status_code == 429]
        served = [r for r in answers if r.status_code == 200]
        # A cached variant and the unfiltered figures are still served, without a token.
        before_cached = fake.figure_requests
        again = gw.client.get(gw.url + PROVIDERS, params={"provider": "openai"})
        cached_cost = fake.figure_requests - before_cached
        unfiltered = gw.client.get(gw.url + PROVIDERS)
        m = gw.metrics()
    finally:
        stop_gateway(gw)

    allowed_fetches = rate + rate * elapsed + 1  # the burst, the refill, one of slack
    assert upstream <= per_fetch * allowed_fetches, (upstream, per_fetch, elapsed)
    assert len(served) <= allowed_fetches and len(shed) >= 120 - allowed_fetches, (len(served), len(shed))
    for r in shed:
        assert int(r.headers["retry-after"]) >= 1
        assert "filter" in r.json()["detail"]
    assert again.status_code == 200 and cached_cost == 0
    assert unfiltered.status_code == 200
    assert metric(m, "metrics_gateway_filtered_fetches_shed_total", category="providers") == len(shed)
    record({"suite": "engine", "fault": f"120 distinct provider= values, FILTERED_FETCHES_PER_SECOND={rate}",
            "route": f"{PROVIDERS}?provider=x x120", "http_status": f"{len(served)}x200 / {len(shed)}x429",
            "json_status": None, "error_type": None,
            "max_seconds": round(max(r.elapsed.total_seconds() for r in answers), 3),
            "bound_seconds": DEADLINE + MARGIN,
            "log_lines": None, "upstream_up": 1.0, "connections_after": None, "upstream_requests": upstream})


# -- the stores, in-process ----------------------------------------------------------------


def _answer(n: int, expires_at: float, tag: str = "") -> Fetched:
    samples = tuple(Sample((("provider", f"provider-{tag}{i}"), ("model", f"model-{tag}{i}")), float(i))
                    for i in range(n))
    return Fetched(samples, time.time(), expires_at=expires_at)


def test_filtered_class_is_bounded_in_bytes_and_never_evicts_the_catalog() -> None:
    later = time.monotonic() + 60
    cache = QueryCache(max_entries=100_000, stale_max_age=3600, max_bytes=MAX_BYTES, catalog_entries=23)
    for i in range(23):
        cache.keep(f"catalog-{i}", CacheClass.CATALOG, _answer(1, later), good=True)
    catalog_bytes = cache.usage()[CacheClass.CATALOG][1]
    evicted = 0
    for i in range(2000):  # ~20 MB of filtered variants offered to a 256 KiB budget
        evicted += cache.keep(f"filtered-{i}", CacheClass.FILTERED, _answer(50, later, str(i)),
                              good=True).get(CacheClass.FILTERED, 0)
        assert cache.bytes <= MAX_BYTES
    entries, filtered_bytes = cache.usage()[CacheClass.FILTERED]
    assert evicted > 1900 and 0 < entries < 100
    assert filtered_bytes <= MAX_BYTES - catalog_bytes
    # Every catalog figure still has its fresh and last-good value; the newest filtered ones remain.
    assert all(cache.fresh(f"catalog-{i}", CacheClass.CATALOG) is not None for i in range(23))
    assert all(cache.last_good(f"catalog-{i}", CacheClass.CATALOG) is not None for i in range(23))
    assert cache.fresh("filtered-1999", CacheClass.FILTERED) is not None
    assert cache.fresh("filtered-0", CacheClass.FILTERED) is None


def test_catalog_class_is_bounded_by_the_catalog() -> None:
    later = time.monotonic() + 60
    cache = QueryCache(max_entries=16, stale_max_age=3600, catalog_entries=3)
    for i in range(5):
        cache.keep(f"catalog-{i}", CacheClass.CATALOG, _answer(1, later), good=True)
    assert cache.usage()[CacheClass.CATALOG][0] == 3


def test_size_estimate_tracks_real_memory() -> None:
    """The byte bound is only as good as the estimate: compare it with what CPython allocates."""
    q = CatalogQuery("m", "m", "x", "help", "u", labels=("provider", "model"))
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        series = [({"provider": f"provider-{i % 50}", "model": f"model-name-{i}", "instance": "backend:8000"},
                   float(i)) for i in range(5000)]
        samples, dropped = _project(q, series, cap=10_000)
        fetched = Fetched(samples, time.time())
        del series
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert dropped == 0 and len(fetched.samples) == 5000
    estimate = estimate_bytes(fetched)
    assert 0.6 < estimate / retained < 1.6, (estimate, retained)


def test_response_memo_is_bounded_in_bytes() -> None:
    memo = ResponseMemo(0.5, max_entries=1000, max_bytes=1_000_000)
    later = time.monotonic() + 60
    for i in range(50):
        memo.put((f"k{i}",), b"x" * 100_000, "text/plain", later)
        assert memo.bytes <= 1_000_000
    assert memo.get(("k49",)) is not None and memo.get(("k0",)) is None
    memo.put(("huge",), b"x" * 2_000_000, "text/plain", later)  # bigger than the whole bound: not kept
    assert memo.get(("huge",)) is None and memo.get(("k49",)) is not None
