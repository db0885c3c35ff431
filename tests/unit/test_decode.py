"""A query API request decoded once at the edge (app/gateway/promql/request.py).

The query is parsed once, figure names and a tenant's matchers are printed in one
pass of that tree (exactly what expanding, then enforcing, gave), the engines read
the tree instead of parsing again, and upstream gets the caller's own text where the
gateway changed nothing (an RFC 3339 time as written, not as a float).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl

import promql_parser as pp
import pytest
import respx
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.gateway.catalog.loader import build_catalog, load_catalog
from app.gateway.catalog.names import FigureNames
from app.gateway.promql import syntax
from app.gateway.promql.syntax import PromQLError, enforce, parse, rewrite
from app.gateway.routes.figures import create_gateway_router
from app.gateway.settings import GatewaySettings

PROM = "http://prom.test:9090"
NAMES = FigureNames(load_catalog())
ENV_A = (("env", "a"),)
TWO = (("env", "a"), ("team", "t1"))
CUSTOM = FigureNames(build_catalog({"queries": [
    {"id": "a", "expr": "sum by (env) (x offset 1m) + sum by (env) (y @ 100) "
                        "+ sum by (env) (max_over_time(z[5m:1m] offset 2m))",
     "help": "h", "unit": "u", "labels": ["env"]},
    {"id": "gone", "expr": 'absent(up{svc="j"})', "help": "h", "unit": "u", "labels": ["svc"]},
    {"id": "gone_env", "expr": 'absent(up{env="b"})', "help": "h", "unit": "u", "labels": ["env"]},
]}))


def _old(names: FigureNames, query: str, tenant: tuple[tuple[str, str], ...]) -> str:
    """Yesterday's two passes: figures expanded into text, that text parsed and enforced."""
    expanded = names.expand(parse(query))
    return enforce(expanded if expanded is not None else query, tenant)


ONE_PASS = [
    (NAMES, "gateway_http_server_error_ratio"),
    (NAMES, 'gateway_model_inference_error_ratio{provider="openai", model=~"gpt-.*"} * 100 > 5'),
    (NAMES, "rate(gateway_tokens_used_total[5m]) + up"),
    (NAMES, 'max_over_time(gateway_provider_availability{provider="x"}[1h] offset 1d)'),
    (NAMES, "gateway_http_server_error_ratio @ 1700000000 offset 5m"),
    (NAMES, "absent(gateway_http_server_error_ratio) or absent(up{job=\"x\"})"),
    (NAMES, "absent_over_time(gateway_http_server_error_ratio[5m])"),
    (NAMES, "-gateway_providers_healthy"),
    (CUSTOM, "gateway_a offset 1h"),
    (CUSTOM, 'gateway_a{env="b"}'),
    (CUSTOM, 'gateway_gone{svc="k"} or gateway_gone'),
    (CUSTOM, 'gateway_gone_env{env="c"}'),
    (CUSTOM, 'max_over_time(gateway_gone_env{env=~"c|d"}[10m])'),
    (CUSTOM, "sum(rate(plain[5m]))"),
]


@pytest.mark.parametrize(("names", "query"), ONE_PASS)
@pytest.mark.parametrize("tenant", [(), ENV_A, TWO])
def test_one_pass_prints_what_expanding_then_enforcing_printed(names: FigureNames, query: str,
                                                              tenant: tuple[tuple[str, str], ...]) -> None:
    tree = parse(query)
    substitute = names.substitute if names.uses(tree) else None
    assert rewrite(tree, substitute=substitute, tenant=tenant) == _old(names, query, tenant)


def test_a_tenant_still_cannot_reach_info_through_a_figure() -> None:
    names = FigureNames(build_catalog({"queries": [
        {"id": "i", "expr": "sum(info(up))", "help": "h", "unit": "u"}]}))
    with pytest.raises(PromQLError, match="info"):
        rewrite(parse("gateway_i"), substitute=names.substitute, tenant=ENV_A)


# -- through the API: one parse, the caller's own text upstream ------------------------------------

MATRIX = {"status": "success", "data": {"resultType": "matrix", "result": []}}


@pytest.fixture()
def mock() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as m:
        m.route(host="testserver").pass_through()
        yield m


def api_app(**kw: Any) -> TestClient:
    app = FastAPI()
    app.include_router(create_gateway_router(GatewaySettings(prometheus_url=PROM, **kw)))
    return TestClient(app)


@pytest.fixture()
def parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every parse of a query, wherever it happens."""
    seen: list[str] = []
    real = pp.parse

    def counting(text: str) -> pp.Expr:
        seen.append(text)
        return real(text)

    monkeypatch.setattr(pp, "parse", counting)
    monkeypatch.setattr(syntax.pp, "parse", counting)
    return seen


def test_a_range_query_is_parsed_once_and_sent_as_the_caller_wrote_it(
        mock: respx.MockRouter, parses: list[str]) -> None:
    route = mock.post(f"{PROM}/api/v1/query_range").respond(200, json=MATRIX)
    query = 'sum by (job) (rate(http_requests_total{code=~"5.."}[5m]))'
    params = {"query": query, "start": "2015-07-01T20:10:51.781+02:00", "end": "2015-07-01T19:10:51.7819Z",
              "step": "15s", "timeout": "1s"}
    with api_app() as c:
        parses.clear()
        r = c.get("/api/v1/query_range", params=params)
    assert r.status_code == 200 and r.json() == MATRIX
    assert parses.count(query) == 1 and len(parses) == 1
    sent = dict(parse_qsl(route.calls.last.request.content.decode()))
    assert {k: sent[k] for k in params} == params


def test_an_instant_query_keeps_the_callers_time_text(mock: respx.MockRouter) -> None:
    body = {"status": "success", "data": {"resultType": "vector", "result": []}}
    route = mock.post(f"{PROM}/api/v1/query").respond(200, json=body)
    with api_app() as c:
        r = c.get("/api/v1/query", params={"query": "up", "time": "2015-07-01T20:10:51.0625Z"})
    assert r.status_code == 200
    sent = dict(parse_qsl(route.calls.last.request.content.decode()))
    assert sent["time"] == "2015-07-01T20:10:51.0625Z"
    assert r.headers["x-gateway-evaluation-time"] == repr(1435781451.062)


def test_a_half_millisecond_start_is_on_prometheus_grid(mock: respx.MockRouter) -> None:
    """1.0625 is 1063 ms to Prometheus (half away from zero): the answer's first point is there."""
    doc = {"status": "success", "data": {"resultType": "matrix", "result": [
        {"metric": {}, "values": [[1.063, "1"], [2.063, "1"]]}]}}
    route = mock.post(f"{PROM}/api/v1/query_range").respond(200, content=json.dumps(doc).encode(),
                                                            headers={"content-type": "application/json"})
    with api_app() as c:
        r = c.get("/api/v1/query_range", params={"query": "vector(1)", "start": "1.0625", "end": "2.5",
                                                 "step": "1"})
        assert r.status_code == 200 and r.json() == doc
        assert r.headers["x-gateway-cache"] == "miss"
        again = c.get("/api/v1/query_range", params={"query": "vector(1)", "start": "1.0625", "end": "2.5",
                                                     "step": "1"})
    # The points were on the grid the cache expected (1063 ms, not 1062): kept, and served again.
    assert again.headers["x-gateway-cache"] == "hit" and again.content == r.content
    assert route.call_count == 1
    assert dict(parse_qsl(route.calls.last.request.content.decode()))["start"] == "1.0625"
