"""PrometheusClient.api_get: the data of a success envelope, an UpstreamError for anything else."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import respx

from app.gateway.settings import GatewaySettings
from app.gateway.upstream.answers import UpstreamError
from app.gateway.upstream.client import PrometheusClient

PROM = "http://prom.api:9090/prefix"


async def get(response: Any, **settings: Any) -> Any:
    client = PrometheusClient(GatewaySettings(prometheus_url=PROM, prometheus_bearer_token="tok", **settings))
    try:
        with respx.mock() as mock:
            route = mock.get(f"{PROM}/api/v1/series")
            if isinstance(response, httpx.Response):
                route.mock(return_value=response)
            else:
                route.mock(side_effect=response)
            data = await client.api_get("/api/v1/series", [("match[]", "a"), ("match[]", "b")], timeout=1)
            request = route.calls[0].request
            assert request.url.params.get_list("match[]") == ["a", "b"]  # repeated parameters kept
            assert request.headers["authorization"] == "Bearer tok"
            return data
    finally:
        await client.aclose()


async def test_success_returns_data_under_the_path_prefix() -> None:
    data = await get(httpx.Response(200, json={"status": "success", "data": [{"__name__": "a"}]}))
    assert data == [{"__name__": "a"}]


@pytest.mark.parametrize(("response", "etype"), [
    (httpx.Response(400, json={"status": "error", "errorType": "bad_data", "error": "bad match[]"}), "bad_data"),
    (httpx.Response(503, text="<html>down</html>"), "bad_response"),
    (httpx.Response(502, json=["not", "an", "envelope"]), "server_error"),
    (httpx.ConnectError("refused"), "unreachable"),
    (httpx.ReadTimeout("slow"), "timeout"),
    (httpx.ReadError("reset"), "transport"),
])
async def test_failures_are_upstream_errors(response: Any, etype: str) -> None:
    with pytest.raises(UpstreamError) as info:
        await get(response)
    assert info.value.error_type == etype


async def test_answer_larger_than_the_limit_is_refused() -> None:
    big = {"status": "success", "data": ["x" * 100] * 50}
    with pytest.raises(UpstreamError) as info:
        await get(httpx.Response(200, json=big), prometheus_max_response_bytes=1024)
    assert info.value.error_type == "too_large"
