"""Failure modes of the Prometheus API pass-through (respx; the happy paths run against a
real Prometheus in tests/integration/test_promapi_*.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import respx

from app.gateway.settings import GatewaySettings
from app.gateway.upstream import PrometheusClient, UpstreamError

PROM = "http://prom.test:9090/prefix"


def settings(**kw: Any) -> GatewaySettings:
    kw.setdefault("prometheus_url", PROM)
    return GatewaySettings(**kw)


@asynccontextmanager
async def prom_client(s: GatewaySettings) -> AsyncIterator[PrometheusClient]:
    c = PrometheusClient(s)
    try:
        yield c
    finally:
        await c.aclose()


# --- PrometheusClient.api ------------------------------------------------------------------------

@respx.mock
async def test_api_get_sends_params_in_url_in_order_with_repeats() -> None:
    route = respx.get(f"{PROM}/api/v1/series").respond(json={"status": "success", "data": []})
    async with prom_client(settings()) as c:
        ans = await c.api("GET", "/api/v1/series", [("match[]", "up"), ("match[]", "b{x=\"1\"}"), ("start", "1")],
                          timeout=1.0)
    assert ans.status_code == 200 and ans.doc == {"status": "success", "data": []}
    req = route.calls.last.request
    assert req.url.params.multi_items() == [("match[]", "up"), ("match[]", 'b{x="1"}'), ("start", "1")]
    assert req.content == b""


@respx.mock
async def test_api_post_sends_form_with_repeats_and_extra_headers() -> None:
    route = respx.post(f"{PROM}/api/v1/labels").respond(json={"status": "success", "data": ["a"]})
    async with prom_client(settings()) as c:
        await c.api("POST", "/api/v1/labels", [("match[]", "up"), ("match[]", "x")], timeout=1.0,
                    headers={"X-Scope-OrgID": "t1"})
    req = route.calls.last.request
    assert req.headers["content-type"] == "application/x-www-form-urlencoded"
    assert httpx.QueryParams(req.content.decode()).multi_items() == [("match[]", "up"), ("match[]", "x")]
    assert req.headers["x-scope-orgid"] == "t1"
    assert "timeout" not in req.url.params  # only the caller's params go upstream


@respx.mock
async def test_api_error_envelope_is_an_answer_and_keeps_the_breaker_closed() -> None:
    body = {"status": "error", "errorType": "bad_data", "error": "parse error"}
    respx.get(f"{PROM}/api/v1/query").respond(400, json=body)
    async with prom_client(settings(breaker_failure_threshold=1)) as c:
        ans = await c.api("GET", "/api/v1/query", [("query", "(")], timeout=1.0)
        assert ans.status_code == 400 and ans.doc == body and ans.error_type == "bad_data"
        assert c.breaker.state == "closed"


@respx.mock
async def test_api_plain_404_is_a_not_found_answer() -> None:
    respx.get(f"{PROM}/api/v1/status/flags").respond(404, text="404 page not found")
    async with prom_client(settings(breaker_failure_threshold=1)) as c:
        ans = await c.api("GET", "/api/v1/status/flags", [], timeout=1.0)
        assert ans.status_code == 404 and ans.error_type == "not_found"
        assert c.breaker.state == "closed"


@respx.mock
async def test_api_html_502_raises_and_counts_against_the_breaker() -> None:
    respx.get(f"{PROM}/api/v1/query").respond(502, text="<html>bad gateway</html>")
    async with prom_client(settings(breaker_failure_threshold=1)) as c:
        with pytest.raises(UpstreamError) as info:
            await c.api("GET", "/api/v1/query", [("query", "1")], timeout=1.0)
        assert info.value.error_type == "server_error"
        assert c.breaker.state == "open"
        with pytest.raises(UpstreamError) as again:
            await c.api("GET", "/api/v1/query", [("query", "1")], timeout=1.0)
        assert again.value.error_type == "circuit_open"


@respx.mock
async def test_api_too_large_answer_is_refused() -> None:
    respx.get(f"{PROM}/api/v1/series").respond(json={"status": "success", "data": ["x" * 4000]})
    async with prom_client(settings(prometheus_max_response_bytes=1024)) as c:
        with pytest.raises(UpstreamError) as info:
            await c.api("GET", "/api/v1/series", [], timeout=1.0)
    assert info.value.error_type == "too_large"
