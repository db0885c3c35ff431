"""The range cache across a fleet: two gateway processes sharing one real Redis in
front of one real Prometheus (demo_* history).

- the same query_range asked of one process, then the other: Prometheus answers
  one range query, and the second answer (a hit from the shared extent store) is
  the first's bytes, which are Prometheus' own;
- identical requests at once across both processes: one range query upstream;
- Redis stopped: answers still equal Prometheus', well within the deadline.

Upstream requests are counted by Prometheus itself. Everything binds to 127.0.0.1;
every process started here is stopped here.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.demo_data import generate, start_prometheus_with_history
from tests.support.procs import Proc, prometheus_query_requests, start_redis, start_uvicorn

pytestmark = pytest.mark.integration

DEADLINE = 5.0


@dataclass
class Fleet:
    prometheus: Proc
    redis: Proc
    gateways: list[Proc]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir: Path = tmp_path_factory.mktemp("range-fleet")
    procs: list[Proc] = []
    try:
        prom = start_prometheus_with_history(workdir / "prometheus", generate(time.time() - 20, hours=1))
        procs.append(prom)
        redis = start_redis(workdir / "redis")
        procs.append(redis)
        env = {"PROMETHEUS_URL": prom.url, "GATEWAY_CACHE_URL": redis.url,
               "GATEWAY_CACHE_PREFIX": f"rf{uuid.uuid4().hex[:6]}", "REQUEST_DEADLINE_SECONDS": str(DEADLINE),
               "RESPONSE_MEMO_SECONDS": "0", "VROPS_TARGETS": "[]", "LOG_LEVEL": "WARNING"}
        gateways = []
        for i in range(2):
            (workdir / f"gw{i}").mkdir()
            gateways.append(start_uvicorn(workdir / f"gw{i}", "app.main:app", env))
            procs.append(gateways[-1])
        yield Fleet(prom, redis, gateways)
    finally:
        for p in reversed(procs):
            p.stop()


def range_requests(prom_url: str) -> float:
    """Range queries Prometheus has answered, from its own /metrics."""
    text = httpx.get(f"{prom_url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("prometheus_http_requests_total{")
               and 'handler="/api/v1/query_range"' in line)


def window(minutes_back: int) -> dict[str, str]:
    """A settled 30 min window at a 15 s step, distinct per test (a fresh cache key)."""
    end = int(time.time()) // 60 * 60 - minutes_back * 60
    return {"query": "sum by (mode) (rate(demo_cpu_usage_seconds_total[5m]))",
            "start": str(end - 1800), "end": str(end), "step": "15"}


async def burst(urls: list[str], path: str, form: dict[str, str], n: int) -> list[httpx.Response]:
    """n identical requests at once, alternating between the processes."""
    async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        return list(await asyncio.gather(*(client.post(urls[i % len(urls)] + path, data=form)
                                           for i in range(n))))


def test_second_process_answers_from_the_shared_store(fleet: Fleet) -> None:
    form = window(10)
    before = range_requests(fleet.prometheus.url)
    first = httpx.post(f"{fleet.gateways[0].url}/api/v1/query_range", data=form, timeout=10)
    second = httpx.post(f"{fleet.gateways[1].url}/api/v1/query_range", data=form, timeout=10)
    assert range_requests(fleet.prometheus.url) - before == 1
    direct = httpx.post(f"{fleet.prometheus.url}/api/v1/query_range", data=form, timeout=10)
    assert first.status_code == second.status_code == 200
    assert first.headers["x-gateway-cache"] == "miss"
    assert second.headers["x-gateway-cache"] == "hit"
    assert second.content == first.content == direct.content
    assert first.json()["data"]["result"], "the window must hold data"


def test_identical_requests_at_once_across_the_fleet_cost_one_query(fleet: Fleet) -> None:
    form = window(50)
    urls = [g.url for g in fleet.gateways]
    before = range_requests(fleet.prometheus.url)
    answers = asyncio.run(burst(urls, "/api/v1/query_range", form, 12))
    assert range_requests(fleet.prometheus.url) - before == 1
    direct = httpx.post(f"{fleet.prometheus.url}/api/v1/query_range", data=form, timeout=10)
    assert {a.status_code for a in answers} == {200}
    assert {a.content for a in answers} == {direct.content}
    lookups = [a.headers["x-gateway-cache"] for a in answers]
    assert lookups.count("miss") == 1, lookups


@pytest.mark.parametrize("settled", [False, True])
def test_identical_instant_queries_at_once_across_the_fleet_cost_one_query(fleet: Fleet, settled: bool) -> None:
    """Instants in the settled past (kept like extents) and at now (no time: the leader's
    now, reported to every waiter) are both coalesced across the two processes."""
    form = {"query": f"sum by (mode) (rate(demo_cpu_usage_seconds_total[5m])) * {int(settled) + 1}"}
    if settled:
        form["time"] = str(int(time.time()) - 1200)
    urls = [g.url for g in fleet.gateways]
    before = prometheus_query_requests(fleet.prometheus.url)
    answers = asyncio.run(burst(urls, "/api/v1/query", form, 12))
    assert prometheus_query_requests(fleet.prometheus.url) - before == 1
    assert {a.status_code for a in answers} == {200}
    assert len({a.content for a in answers}) == 1
    assert len({a.headers["x-gateway-evaluation-time"] for a in answers}) == 1
    t = answers[0].headers["x-gateway-evaluation-time"]
    direct = httpx.post(f"{fleet.prometheus.url}/api/v1/query", data={**form, "time": t}, timeout=10)
    assert answers[0].content == direct.content and answers[0].json()["data"]["result"]
    lookups = [a.headers["x-gateway-cache"] for a in answers]
    assert lookups.count("miss") == 1, lookups
    # The settled instant is kept: asked again of either process, no upstream query.
    if settled:
        before = prometheus_query_requests(fleet.prometheus.url)
        again = [httpx.post(u + "/api/v1/query", data=form, timeout=10) for u in urls]
        assert prometheus_query_requests(fleet.prometheus.url) == before
        assert {a.headers["x-gateway-cache"] for a in again} == {"hit"}


def test_redis_stopped_answers_still_equal_prometheus(fleet: Fleet) -> None:
    # Last: stops the module's Redis.
    fleet.redis.stop()
    for i, minutes in enumerate((70, 70, 90)):
        form = window(minutes)
        started = time.monotonic()
        got = httpx.post(f"{fleet.gateways[i % 2].url}/api/v1/query_range", data=form, timeout=10)
        elapsed = time.monotonic() - started
        direct = httpx.post(f"{fleet.prometheus.url}/api/v1/query_range", data=form, timeout=10)
        assert got.status_code == 200, got.text
        assert got.json() == direct.json()
        assert elapsed < DEADLINE / 2, elapsed
