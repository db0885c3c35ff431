"""The circuit breaker alone (fake clock) and inside the Prometheus client (respx)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
import respx
from prometheus_client import REGISTRY

from app.gateway.settings import GatewaySettings
from app.gateway.upstream.answers import UpstreamError
from app.gateway.upstream.breaker import CircuitBreaker
from app.gateway.upstream.client import PrometheusClient

PROM = "http://prom.test:9090"
QUERY_URL = f"{PROM}/api/v1/query"
OK = {"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1, "1"]}]}}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def gauge(state: str) -> float | None:
    return REGISTRY.get_sample_value("metrics_gateway_circuit_breaker_state", {"state": state})


# --- the state machine -----------------------------------------------------------------------------

def test_opens_after_threshold_consecutive_failures() -> None:
    b = CircuitBreaker(3, 10, clock=Clock())
    for _ in range(2):
        b.failure()
        assert b.state == "closed" and b.allow()
    b.failure()
    assert b.state == "open"
    assert not b.allow()
    assert gauge("open") == 1.0 and gauge("closed") == 0.0


def test_success_resets_the_failure_count() -> None:
    b = CircuitBreaker(3, 10, clock=Clock())
    b.failure()
    b.failure()
    b.success()
    b.failure()
    b.failure()
    assert b.state == "closed"
    b.failure()
    assert b.state == "open"


def test_half_open_lets_exactly_one_probe_through_after_reset() -> None:
    clock = Clock()
    b = CircuitBreaker(1, 10, clock=clock)
    b.failure()
    assert b.retry_after() == 10
    clock.t += 9.9
    assert not b.allow()
    assert b.retry_after() == pytest.approx(0.1)
    clock.t += 0.1
    assert b.allow()
    assert b.state == "half_open" and gauge("half_open") == 1.0
    assert [b.allow() for _ in range(5)] == [False] * 5


def test_probe_success_closes() -> None:
    clock = Clock()
    b = CircuitBreaker(2, 5, clock=clock)
    b.failure()
    b.failure()
    clock.t += 5
    assert b.allow()
    b.success()
    assert b.state == "closed" and gauge("closed") == 1.0
    assert all(b.allow() for _ in range(5))
    b.failure()  # counting starts again from zero
    assert b.state == "closed"


def test_probe_failure_reopens_for_a_full_period() -> None:
    clock = Clock()
    b = CircuitBreaker(2, 5, clock=clock)
    b.failure()
    b.failure()
    clock.t += 7
    assert b.allow()
    b.failure()  # one failure in half-open is enough
    assert b.state == "open"
    assert b.retry_after() == 5
    clock.t += 4.9
    assert not b.allow()
    clock.t += 0.1
    assert b.allow()


# --- inside the client -----------------------------------------------------------------------------

def client(clock: Clock, threshold: int = 3, reset: float = 10) -> PrometheusClient:
    s = GatewaySettings(prometheus_url=PROM, breaker_failure_threshold=threshold, breaker_reset_seconds=reset)
    return PrometheusClient(s, breaker=CircuitBreaker(threshold, reset, clock=clock))


async def fail_n(c: PrometheusClient, n: int) -> list[str]:
    types = []
    for _ in range(n):
        with pytest.raises(UpstreamError) as info:
            await c.query("up", timeout=1, category="t")
        types.append(info.value.error_type)
    return types


@respx.mock
async def test_open_circuit_answers_at_once_without_http() -> None:
    route = respx.post(QUERY_URL).respond(503, html="<html>Service Unavailable</html>")
    clock = Clock()
    c = client(clock, threshold=3)
    try:
        assert await fail_n(c, 3) == ["bad_response"] * 3
        assert c.breaker.state == "open"
        calls = route.call_count
        assert calls == 3
        t = time.perf_counter()
        types = await fail_n(c, 20)
        assert time.perf_counter() - t < 0.5
        assert types == ["circuit_open"] * 20
        assert route.call_count == calls
    finally:
        await c.aclose()


@respx.mock
async def test_circuit_open_message_says_when_the_next_probe_is() -> None:
    respx.post(QUERY_URL).mock(side_effect=httpx.ConnectError("refused"))
    clock = Clock()
    c = client(clock, threshold=1, reset=10)
    try:
        await fail_n(c, 1)
        clock.t += 4
        with pytest.raises(UpstreamError) as info:
            await c.query("up", timeout=1, category="t")
        assert info.value.error_type == "circuit_open"
        assert "6.0s" in info.value.message
    finally:
        await c.aclose()


@respx.mock
async def test_half_open_sends_one_probe_among_concurrent_requests_and_success_closes() -> None:
    route = respx.post(QUERY_URL)
    route.mock(side_effect=httpx.ConnectError("refused"))
    clock = Clock()
    c = client(clock, threshold=2, reset=10)
    try:
        await fail_n(c, 2)
        assert c.breaker.state == "open" and route.call_count == 2

        async def slow_ok(request: httpx.Request) -> httpx.Response:
            await asyncio.sleep(0.1)
            return httpx.Response(200, json=OK)

        route.mock(side_effect=slow_ok)
        clock.t += 10
        outcomes: list[Any] = await asyncio.gather(
            *(c.query("up", timeout=1, category="t") for _ in range(8)), return_exceptions=True)
        assert route.call_count == 3  # exactly one probe
        ok = [o for o in outcomes if not isinstance(o, BaseException)]
        refused = [o for o in outcomes if isinstance(o, UpstreamError)]
        assert len(ok) == 1 and len(refused) == 7
        assert {e.error_type for e in refused} == {"circuit_open"}
        assert c.breaker.state == "closed" and c.up is True
        await asyncio.gather(*(c.query("up", timeout=1, category="t") for _ in range(4)))
        assert route.call_count == 7
    finally:
        await c.aclose()


@respx.mock
async def test_failed_probe_reopens() -> None:
    route = respx.post(QUERY_URL).respond(500, text="oops")
    clock = Clock()
    c = client(clock, threshold=2, reset=10)
    try:
        await fail_n(c, 2)
        clock.t += 10
        assert await fail_n(c, 1) == ["bad_response"]  # the probe
        assert route.call_count == 3
        assert c.breaker.state == "open"
        assert await fail_n(c, 3) == ["circuit_open"] * 3
        assert route.call_count == 3
    finally:
        await c.aclose()


@respx.mock
@pytest.mark.parametrize("error_type", ["bad_data", "execution"])
async def test_query_errors_do_not_count_as_failures(error_type: str) -> None:
    route = respx.post(QUERY_URL).respond(
        400 if error_type == "bad_data" else 422,
        json={"status": "error", "errorType": error_type, "error": "your query"})
    clock = Clock()
    c = client(clock, threshold=2)
    try:
        assert await fail_n(c, 6) == [error_type] * 6
        assert c.breaker.state == "closed"
        assert route.call_count == 6
    finally:
        await c.aclose()


@respx.mock
async def test_query_error_between_failures_resets_the_count() -> None:
    route = respx.post(QUERY_URL).mock(side_effect=[
        httpx.Response(500, text="x"),
        httpx.Response(400, json={"status": "error", "errorType": "bad_data", "error": "e"}),
        httpx.Response(500, text="x"),
        httpx.Response(500, text="x"),
    ])
    c = client(Clock(), threshold=2)
    try:
        await fail_n(c, 3)
        assert c.breaker.state == "closed"
        await fail_n(c, 1)
        assert c.breaker.state == "open"
        assert route.call_count == 4
    finally:
        await c.aclose()


@respx.mock
async def test_garbage_probe_does_not_wedge_the_breaker() -> None:
    route = respx.post(QUERY_URL)
    route.respond(500, text="down")
    clock = Clock()
    c = client(clock, threshold=1, reset=10)
    try:
        await fail_n(c, 1)
        clock.t += 10
        route.respond(json={"status": "success", "data": {"resultType": "vector", "result": [1]}})
        with pytest.raises(Exception):  # noqa: B017 - whatever it raises, the breaker must move on
            await c.query("up", timeout=1, category="t")
        route.respond(json=OK)
        clock.t += 60
        answer = await c.query("up", timeout=1, category="t")
        assert answer.series[0].value == 1.0
    finally:
        await c.aclose()
