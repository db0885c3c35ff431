"""Issue 12, finding 7: /ready must not be an open amplifier.

The probe: every unauthenticated /ready call queried Prometheus directly through the
shared pool, outside cache, coalescing and breaker; 200 concurrent callers against a
1 s upstream pushed /summary p50 from 2.6 ms to 2.5 s and made it degraded. Now
/ready is answered from one probe shared by every caller (single-flight), reused for
READY_CACHE_SECONDS, and sent through the circuit breaker.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

from app.gateway.caching.flight import Background
from app.gateway.engines.readiness import ReadinessProbe
from app.gateway.settings import GatewaySettings
from app.gateway.upstream.client import PrometheusClient
from tests.faults.conftest import DEADLINE, MARGIN, Gateway, record, start_gateway, stop_gateway
from tests.faults.engine_fake import EngineFake, engine_env

SUMMARY = "/prometheus/metrics/summary"
CALLERS = 200
PROBE_SECONDS = 0.6


@pytest.fixture()
def fake() -> Iterator[EngineFake]:
    server = EngineFake().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def gateway(fake: EngineFake, tmp_path: Path) -> Iterator[Gateway]:
    # A small pool and no figure cache: every /summary needs upstream connections,
    # so anything that hogs the pool shows in its latency.
    gw = start_gateway(tmp_path, engine_env(fake.url, PROMETHEUS_MAX_CONNECTIONS="8", READY_TIMEOUT_SECONDS="5",
                                            READY_CACHE_SECONDS="5"))
    try:
        yield gw
    finally:
        stop_gateway(gw)


def test_a_crowd_on_ready_costs_one_probe_and_leaves_the_summary_alone(gateway: Gateway, fake: EngineFake) -> None:
    assert gateway.client.get(gateway.url + SUMMARY).json()["status"] == "ok"
    fake.ready_delay = PROBE_SECONDS
    probes0 = fake.ready_probes
    checks: dict[str, int] = {}

    def crowd() -> None:
        async def run() -> None:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=20,
                                         limits=httpx.Limits(max_connections=CALLERS)) as client:
                async def caller() -> None:
                    check = (await client.get("/ready")).json()["checks"]["prometheus"]
                    key = "ok" if check["ok"] else str(check["detail"])
                    checks[key] = checks.get(key, 0) + 1

                await asyncio.gather(*(caller() for _ in range(CALLERS)))

        asyncio.run(run())

    thread = threading.Thread(target=crowd)
    thread.start()
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    try:
        time.sleep(0.1)
        end = time.perf_counter() + 1.5  # while the crowd waits on /ready, and a little after
        while thread.is_alive() or time.perf_counter() < end:
            r, seconds = gateway.timed_get(SUMMARY)
            latencies.append(seconds)
            statuses[r.json()["status"]] = statuses.get(r.json()["status"], 0) + 1
            time.sleep(0.02)
    finally:
        thread.join(30)
    probes = fake.ready_probes - probes0
    p50 = statistics.median(latencies)
    assert probes <= 2, f"{probes} upstream probes for {sum(checks.values())} concurrent /ready calls"
    assert checks == {"ok": CALLERS}, checks
    assert statuses == {"ok": len(latencies)}, statuses
    assert p50 < 0.1, f"/summary p50 {p50 * 1000:.0f} ms during the /ready crowd"
    record({"suite": "engine", "fault": f"{CALLERS} concurrent /ready, probe takes {PROBE_SECONDS}s",
            "route": f"/ready x{CALLERS}, {SUMMARY} x{len(latencies)}", "http_status": 200,
            "json_status": "ok", "error_type": None, "max_seconds": round(max(latencies), 3),
            "bound_seconds": DEADLINE + MARGIN, "log_lines": None, "upstream_up": 1.0, "connections_after": None,
            "upstream_probes": probes, "summary_p50_ms": round(p50 * 1000, 1)})


# -- the probe's policy, in-process (respx) ------------------------------------------------

PROM = "http://prom.test:9090"


def _engine(**kw: Any) -> ReadinessProbe:
    s = GatewaySettings(prometheus_url=PROM, **kw)
    return ReadinessProbe(s, PrometheusClient(s), Background())


@respx.mock
async def test_a_failed_probe_is_reused_and_an_open_breaker_answers_at_once() -> None:
    route = respx.post(f"{PROM}/api/v1/query").respond(503, json={"status": "error", "errorType": "unavailable",
                                                                  "error": "down"})
    engine = _engine(ready_cache_seconds=30, breaker_failure_threshold=2)
    try:
        assert await engine.ready() == (False, "unavailable")
        assert await engine.ready() == (False, "unavailable")  # reused: no second probe
        assert route.call_count == 1
        engine.expire()  # the reuse window is over
        assert await engine.ready() == (False, "unavailable")
        assert route.call_count == 2 and engine.client.breaker.state == "open"
        engine.expire()
        t0 = time.perf_counter()
        assert await engine.ready() == (False, "circuit_open")  # the breaker answers, upstream is spared
        assert route.call_count == 2 and time.perf_counter() - t0 < 0.05
    finally:
        await engine.background.aclose()
        await engine.client.aclose()


@respx.mock
async def test_concurrent_callers_share_one_probe_and_a_caller_giving_up_does_not_cancel_it() -> None:
    async def slow(_: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.2)
        return httpx.Response(200, json={"status": "success", "data": {"resultType": "vector", "result": []}})

    route = respx.post(f"{PROM}/api/v1/query").mock(side_effect=slow)
    engine = _engine()
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(engine.ready(), 0.05)  # a caller with a tight budget gives up
        answers = await asyncio.gather(*(engine.ready() for _ in range(50)))
        assert answers == [(True, "ready")] * 50
        assert route.call_count == 1
    finally:
        await engine.background.aclose()
        await engine.client.aclose()
