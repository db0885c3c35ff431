"""Failure modes of the Prometheus API pass-through (respx; the happy paths run against a
real Prometheus in tests/integration/test_promapi_*.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import respx
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.gateway.promql.timing import parse_duration, parse_time
from app.gateway.routes.figures import create_gateway_router
from app.gateway.settings import GatewaySettings
from app.gateway.upstream.answers import UpstreamError
from app.gateway.upstream.client import PrometheusClient

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
        assert info.value.error_type == "bad_response"
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


# --- the /api/v1 router: failure modes and the parts a real Prometheus cannot provoke --------------

def api_app(**kw: Any) -> TestClient:
    app = FastAPI()
    app.include_router(create_gateway_router(settings(**kw)))
    return TestClient(app)


@pytest.fixture()
def mock() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as m:
        m.route(host="testserver").pass_through()
        yield m


SCALAR = {"status": "success", "data": {"resultType": "scalar", "result": [4, "2"]}}


def test_warnings_and_infos_pass_through_byte_for_byte(mock: respx.MockRouter) -> None:
    body = json.dumps({**SCALAR, "warnings": ["w1"], "infos": ["i1"]}, separators=(", ", ": ")).encode()
    mock.post(f"{PROM}/api/v1/query").respond(200, content=body, headers={"content-type": "application/json"})
    with api_app() as c:
        r = c.post("/api/v1/query", data={"query": "1+1", "time": "4"})
    assert r.status_code == 200 and r.content == body
    assert r.headers["x-gateway-cache"] == "miss"


def test_warnings_and_infos_survive_a_merge(mock: respx.MockRouter) -> None:
    mock.get(f"{PROM}/api/v1/label/__name__/values").respond(
        json={"status": "success", "data": ["up"], "warnings": ["w1"], "infos": ["i1"]})
    with api_app() as c:
        doc = c.get("/api/v1/label/__name__/values").json()
    assert doc["warnings"] == ["w1"] and doc["infos"] == ["i1"]
    assert "up" in doc["data"] and "gateway_providers" in doc["data"] and doc["data"] == sorted(doc["data"])


def test_label_values_limit_truncates_with_a_warning(mock: respx.MockRouter) -> None:
    mock.get(f"{PROM}/api/v1/label/__name__/values").respond(json={"status": "success", "data": ["a", "b"]})
    with api_app() as c:
        doc = c.get("/api/v1/label/__name__/values", params={"limit": "3"}).json()
    assert doc["data"] == ["a", "b", "gateway_active_api_keys"]
    assert doc["warnings"] == ["results truncated due to limit"]


@pytest.mark.parametrize(("status", "etype"), [(422, "execution"), (503, "timeout"), (400, "bad_data"),
                                               (500, "internal"), (503, "unavailable")])
def test_upstream_error_envelopes_keep_their_status(mock: respx.MockRouter, status: int, etype: str) -> None:
    body = {"status": "error", "errorType": etype, "error": "upstream says no"}
    mock.post(f"{PROM}/api/v1/query_range").respond(status, json=body)
    with api_app() as c:
        r = c.get("/api/v1/query_range", params={"query": "up", "start": "0", "end": "60", "step": "15"})
    assert r.status_code == status and r.json() == body


@pytest.mark.parametrize(("respond", "status", "etype"), [
    ({"status_code": 502, "text": "<html>bad gateway</html>"}, 503, "unavailable"),
    ({"status_code": 200, "text": "not json"}, 503, "unavailable"),
    ({"status_code": 200, "json": {"status": "success", "data": ["x" * 5000]}}, 422, "execution"),
])
def test_upstream_failures_are_prometheus_envelopes_never_500(mock: respx.MockRouter, respond: dict[str, Any],
                                                               status: int, etype: str) -> None:
    mock.post(f"{PROM}/api/v1/series").respond(**respond)
    with api_app(prometheus_max_response_bytes=1024) as c:
        r = c.get("/api/v1/series", params={"match[]": "up"})
    assert r.status_code == status
    assert r.json()["status"] == "error" and r.json()["errorType"] == etype


def test_buildinfo_is_synthesised_when_the_upstream_has_none(mock: respx.MockRouter) -> None:
    mock.get(f"{PROM}/api/v1/status/buildinfo").respond(404, text="404 page not found")
    mock.get(f"{PROM}/api/v1/status/flags").respond(404, text="404 page not found")
    with api_app() as c:
        doc = c.get("/api/v1/status/buildinfo").json()
        flags = c.get("/api/v1/status/flags")
    assert doc["status"] == "success" and "features" not in doc["data"]
    assert [int(x) for x in doc["data"]["version"].split(".")] >= [2, 24, 0]
    assert flags.status_code == 404  # so Grafana does not take the gateway for Thanos


def test_metadata_for_one_figure_needs_no_upstream(mock: respx.MockRouter) -> None:
    route = mock.get(f"{PROM}/api/v1/metadata").respond(json={"status": "success", "data": {}})
    with api_app() as c:
        doc = c.get("/api/v1/metadata", params={"metric": "gateway_providers"}).json()
    assert list(doc["data"]) == ["gateway_providers"] and route.call_count == 0


def test_the_callers_text_goes_upstream_unless_a_figure_was_expanded(mock: respx.MockRouter) -> None:
    route = mock.post(f"{PROM}/api/v1/query").respond(json=SCALAR)
    with api_app() as c:
        c.get("/api/v1/query", params={"query": "sum( up )  # comment", "time": "4"})
        c.get("/api/v1/query", params={"query": "gateway_providers / 2", "time": "4"})
    sent = [dict(httpx.QueryParams(call.request.content.decode())) for call in route.calls]
    assert sent[0] == {"query": "sum( up )  # comment", "time": "4"}
    assert sent[1] == {"query": "(count(provider_availability)) / 2", "time": "4"}


def test_caller_timeout_is_capped_below_the_deadline_and_never_invented(mock: respx.MockRouter) -> None:
    route = mock.post(f"{PROM}/api/v1/query").respond(json=SCALAR)
    with api_app(request_deadline_seconds=2.0) as c:
        # Three queries: an instant query at "now" is reused for the figure TTL (range cache).
        c.get("/api/v1/query", params={"query": "1", "timeout": "2m"})
        c.get("/api/v1/query", params={"query": "2", "timeout": "1s"})
        c.get("/api/v1/query", params={"query": "3"})
    sent = [dict(httpx.QueryParams(call.request.content.decode())) for call in route.calls]
    assert sent[0]["timeout"] == "1800ms" and sent[1]["timeout"] == "1s" and "timeout" not in sent[2]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"content": b"query=up", "headers": {"content-type": "application/json"}}, "Content-Type"),
    ({"content": b"query=%ff", "headers": {"content-type": "application/x-www-form-urlencoded"}}, "form"),
    ({"content": b"query=up&time=1", "headers": {"content-type": "application/x-www-form-urlencoded"},
      "params": {"time": "2"}}, 'parameter "time"'),
])
def test_unreadable_or_ambiguous_bodies_are_400(mock: respx.MockRouter, kwargs: dict[str, Any],
                                                message: str) -> None:
    route = mock.post(f"{PROM}/api/v1/query").respond(json=SCALAR)
    with api_app() as c:
        r = c.post("/api/v1/query", **kwargs)
    assert r.status_code == 400 and r.json()["errorType"] == "bad_data" and message in r.json()["error"]
    assert route.call_count == 0


def test_api_is_protected_by_api_tokens(mock: respx.MockRouter) -> None:
    from app.main import create_app
    from app.security.settings import SecuritySettings
    from app.settings import AppSettings

    mock.post(f"{PROM}/api/v1/query").respond(json=SCALAR)
    app = create_app(AppSettings(gateway=settings(), security=SecuritySettings(api_tokens=["s3cret"])))
    with TestClient(app) as c:
        for prefix in ("/api/v1", "/prometheus/api/v1"):
            assert c.get(f"{prefix}/query", params={"query": "1"}).status_code == 401
            ok = c.get(f"{prefix}/query", params={"query": "1"}, headers={"Authorization": "Bearer s3cret"})
            assert ok.status_code == 200


def test_no_api_when_no_prefixes() -> None:
    app = FastAPI()
    app.include_router(create_gateway_router(settings(), api_prefixes=()))
    with TestClient(app) as c:
        assert c.get("/api/v1/query", params={"query": "1"}).status_code == 404
        assert c.get("/api/v1/query", params={"query": "1"}).json() == {"detail": "Not Found"}


@pytest.mark.parametrize(("text", "seconds"), [
    ("1700000000", 1700000000.0), ("1700000000.1234", 1700000000.123), ("-1.5", -1.5), ("1e3", 1000.0),
    ("2015-07-01T20:10:51.781Z", 1435781451.781), ("2015-07-01T20:10:51+02:00", 1435774251.0),
    ("1700000000000", 1.7e12),
])
def test_times_read_like_prometheus(text: str, seconds: float) -> None:
    assert parse_time(text) == pytest.approx(seconds, abs=1e-6)


@pytest.mark.parametrize("text", ["", " 1", "1_000", "yesterday", "2015-07-01", "2015-07-01 20:10:51Z", "inf"])
def test_times_prometheus_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_time(text)


@pytest.mark.parametrize(("text", "seconds"), [("15", 15.0), ("0.5", 0.5), ("1m", 60.0), ("1h30m", 5400.0),
                                               ("1d", 86400.0), ("1w", 604800.0), ("250ms", 0.25)])
def test_durations_read_like_prometheus(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1x", "m", "1m1h", "1.5m", " 1"])
def test_durations_prometheus_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_wrong_method_is_405_with_every_allowed_method_and_unknown_paths_404(mock: respx.MockRouter) -> None:
    with api_app() as c:
        r = c.put("/api/v1/query")
        assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
        r = c.post("/api/v1/label/job/values")
        assert r.status_code == 405 and r.headers["allow"] == "GET"
        r = c.post("/api/v1/status/buildinfo")
        assert r.status_code == 405 and r.headers["allow"] == "GET"
        r = c.get("/api/v1/admin/tsdb/snapshot")
        assert r.status_code == 404 and r.json()["errorType"] == "not_found"


def test_the_api_is_described_in_openapi() -> None:
    app = FastAPI()
    app.include_router(create_gateway_router(settings()))
    doc = app.openapi()["paths"]
    get = doc["/api/v1/query_range"]["get"]
    assert {p["name"]: p["required"] for p in get["parameters"]} == {
        "query": False, "start": True, "end": True, "step": True, "timeout": False, "stats": False}
    post = doc["/prometheus/api/v1/series"]["post"]["requestBody"]["content"]["application/x-www-form-urlencoded"]
    assert post["schema"]["required"] == ["match[]"]
    assert "503" in get["responses"] and "400" in get["responses"]
