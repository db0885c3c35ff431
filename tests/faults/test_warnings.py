"""Issue 12, finding 6: upstream warnings must show, and must not punish the upstream.

The probe: with answers carrying ``warnings`` (Thanos/Mimir partial responses) the
summary said ``ok``, the text routes showed nothing, and since such answers were
never cached the gateway sent ~49 upstream requests a second at 1,000 req/s (0 for
clean answers). Now a warned figure makes the status ``degraded``, text carries
``gateway_query_warnings{query} 1``, and warned answers are reused for
WARNING_TTL_SECONDS but never kept as the last good value.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.gateway.catalog.loader import load_catalog
from tests.faults.conftest import DEADLINE, MARGIN, Gateway, record, start_gateway, stop_gateway
from tests.faults.engine_fake import EngineFake, engine_env

SUMMARY = "/prometheus/metrics/summary"
SYSTEM = "/prometheus/metrics/system"
WARNING_TTL = 1.0


@pytest.fixture()
def fake() -> Iterator[EngineFake]:
    server = EngineFake().start()
    server.mode = "warnings"
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def gateway(fake: EngineFake, tmp_path: Path) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path, engine_env(fake.url, CACHE_TTL_SECONDS="60", STALE_MAX_AGE_SECONDS="3600",
                                            WARNING_TTL_SECONDS=str(WARNING_TTL),
                                            RESPONSE_MEMO_SECONDS="0.5"))
    try:
        yield gw
    finally:
        stop_gateway(gw)


def test_warnings_degrade_the_summary_and_show_in_text(gateway: Gateway) -> None:
    body = gateway.client.get(gateway.url + SUMMARY).json()
    text = gateway.client.get(gateway.url + SYSTEM).text
    assert body["status"] == "degraded"
    warned = [p for s in body["provenance"].values() for p in s.values() if p.get("warnings")]
    assert len(warned) == 23 and all(p["warnings"] == ["fake warning: partial data"] for p in warned)
    gauges = re.findall(r'^gateway_query_warnings\{query="([a-z0-9_]+)"\} (\S+)$', text, re.M)
    system = load_catalog().category_queries("system")
    assert len(gauges) == len(system) and {v for _, v in gauges} == {"1.0"}, gauges


def test_warned_answers_are_reused_briefly_under_load_and_never_as_last_good(
        gateway: Gateway, fake: EngineFake) -> None:
    before = fake.figure_requests
    count = 0
    statuses: set[tuple[int, str]] = set()
    slowest = [0.0]
    duration = 2.0
    t0 = time.perf_counter()

    async def load() -> None:
        nonlocal count
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10,
                                     limits=httpx.Limits(max_connections=32)) as client:
            async def worker() -> None:
                nonlocal count
                while time.perf_counter() - t0 < duration:
                    r = await client.get(SUMMARY)
                    slowest[0] = max(slowest[0], r.elapsed.total_seconds())
                    statuses.add((r.status_code, r.json()["status"]))
                    count += 1

            await asyncio.gather(*(worker() for _ in range(32)))

    asyncio.run(load())
    seconds = time.perf_counter() - t0
    upstream = fake.figure_requests - before
    # At most one fetch per WARNING_TTL grid step (plus the first and one of slack),
    # however many requests came: before, every request that found no fetch in flight asked again.
    assert count > 100
    assert upstream <= seconds / WARNING_TTL + 2, (upstream, count, seconds)
    assert statuses == {(200, "degraded")}

    # Never a last-good value: once the short TTL is over, an outage finds nothing stale to serve.
    fake.mode = "internal"
    time.sleep(2 * WARNING_TTL + 0.2)
    after = gateway.client.get(gateway.url + SUMMARY).json()
    assert after["status"] == "unavailable"
    assert {p["state"] for s in after["provenance"].values() for p in s.values()} == {"failed"}
    record({"suite": "engine", "fault": "answers with warnings, /summary under load", "route": SUMMARY,
            "http_status": 200, "json_status": "degraded", "error_type": None,
            "max_seconds": round(slowest[0], 3), "bound_seconds": DEADLINE + MARGIN, "log_lines": None,
            "upstream_up": 1.0,
            "connections_after": None, "requests": count, "upstream_requests": upstream,
            "seconds": round(seconds, 2)})
