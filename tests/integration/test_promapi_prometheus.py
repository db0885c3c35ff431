"""The gateway's /api/v1 against a real Prometheus: same answers, same errors, plus the figures.

Every request is sent twice, once through the gateway and once straight to the
Prometheus behind it, and the two answers are compared (status, and the body
byte for byte where the gateway passes it through). Times are fixed a little in
the past, so live scrapes cannot land between the two requests.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.gateway.catalog.loader import load_catalog
from app.gateway.catalog.names import FigureNames, figure_name
from app.gateway.settings import GatewaySettings
from app.main import create_app
from tests.integration.conftest import PromStack
from tests.support.procs import PROMETHEUS_BIN, _spawn, free_port, wait_until

pytestmark = pytest.mark.integration
CATALOG = load_catalog()
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture()
def gw(prom_stack: PromStack) -> Iterator[TestClient]:
    settings = GatewaySettings(prometheus_url=prom_stack.prometheus.url, request_deadline_seconds=10)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture()
def prom(prom_stack: PromStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=prom_stack.prometheus.url, timeout=10) as c:
        yield c


def past(seconds: float = 60) -> int:
    return int(time.time() - seconds)


def same(gw_resp: httpx.Response, prom_resp: httpx.Response) -> None:
    """Same status, same JSON document (and same bytes: the gateway passes bodies through)."""
    assert gw_resp.status_code == prom_resp.status_code, (gw_resp.text, prom_resp.text)
    assert gw_resp.headers["content-type"].startswith("application/json")
    assert gw_resp.json() == prom_resp.json()
    assert gw_resp.content == prom_resp.content


def both(gw: TestClient, prom: httpx.Client, method: str, path: str,
         **kw: Any) -> tuple[httpx.Response, httpx.Response]:
    return gw.request(method, f"/api/v1{path}", **kw), prom.request(method, f"/api/v1{path}", **kw)


# --- Grafana's request shapes, one by one ------------------------------------------------------------

def test_grafana_health_check(gw: TestClient, prom: httpx.Client) -> None:
    """Grafana's "Save & test": POST form query=1+1&time=4, must be 200 with a scalar."""
    g, p = both(gw, prom, "POST", "/query", content=b"query=1%2B1&time=4", headers=FORM)
    same(g, p)
    assert g.json() == {"status": "success", "data": {"resultType": "scalar", "result": [4, "2"]}}
    assert g.headers["x-gateway-cache"] == "miss"


def test_grafana_buildinfo_is_prometheus(gw: TestClient, prom: httpx.Client) -> None:
    g, p = both(gw, prom, "GET", "/status/buildinfo")
    same(g, p)
    data = g.json()["data"]
    assert "features" not in data and data["version"].count(".") == 2  # Grafana: a Prometheus, semver


def test_grafana_flags_probe_passes_through(gw: TestClient, prom: httpx.Client) -> None:
    same(*both(gw, prom, "GET", "/status/flags"))


def test_grafana_metric_list_labels_and_metadata_at_startup(gw: TestClient, prom: httpx.Client) -> None:
    """Startup: label/__name__/values, labels (POST form with limit), metadata?limit=40000."""
    end = math.ceil(time.time() / 60) * 60
    window = {"start": str(end - 3600), "end": str(end), "limit": "40000"}
    g, p = both(gw, prom, "POST", "/labels", data=window)
    same(g, p)
    assert "provider" in g.json()["data"]

    g = gw.get("/api/v1/label/__name__/values", params=window)
    p = prom.get("/api/v1/label/__name__/values", params=window)
    assert g.status_code == p.status_code == 200
    names = FigureNames(CATALOG).names()
    assert g.json()["data"] == sorted(set(p.json()["data"]) | set(names))
    assert "gateway_http_server_error_ratio" in g.json()["data"]
    assert "gateway_http_requests_total" in g.json()["data"]  # counters by their _total name
    assert "fastapi_requests_total" in g.json()["data"]

    g = gw.get("/api/v1/metadata", params={"limit": "40000"})
    p = prom.get("/api/v1/metadata", params={"limit": "40000"})
    assert g.status_code == p.status_code == 200
    ours, theirs = g.json()["data"], p.json()["data"]
    assert theirs and all(ours[name] == entries for name, entries in theirs.items())
    for q in CATALOG.queries.values():
        entry = ours[figure_name(CATALOG, q)]
        assert entry == [{"type": "counter" if q.kind == "counter" else "gauge", "help": q.help, "unit": q.unit}]


def test_grafana_label_values_with_match_and_limit(gw: TestClient, prom: httpx.Client) -> None:
    params = {"match[]": 'provider_availability{provider!=""}', "limit": "40000",
              "start": str(past(600)), "end": str(past(0))}
    g, p = both(gw, prom, "GET", "/label/provider/values", params=params)
    same(g, p)
    assert g.json()["data"] == ["anthropic", "google", "mistral", "openai"]


def test_grafana_label_values_for_names_with_match(gw: TestClient, prom: httpx.Client) -> None:
    """__name__ values with match[]: upstream's plus the figures that selector could match."""
    params = {"match[]": '{__name__=~"(gateway_provider|provider_).*"}'}
    g = gw.get("/api/v1/label/__name__/values", params=params)
    p = prom.get("/api/v1/label/__name__/values", params=params)
    figures = [n for n in FigureNames(CATALOG).names() if n.startswith("gateway_provider")]
    assert figures and g.json()["data"] == sorted(set(p.json()["data"]) | set(figures))
    # A selector on a label no figure has: no figures.
    params = {"match[]": '{job="backend"}'}
    g = gw.get("/api/v1/label/__name__/values", params=params)
    p = prom.get("/api/v1/label/__name__/values", params=params)
    assert g.json()["data"] == p.json()["data"]


def test_grafana_series_lookup(gw: TestClient, prom: httpx.Client) -> None:
    form = {"match[]": 'model_inference_requests_total{provider="openai"}', "limit": "40000",
            "start": str(past(300)), "end": str(past(0))}
    g, p = both(gw, prom, "POST", "/series", data=form)
    same(g, p)
    assert len(g.json()["data"]) == 1
    same(*both(gw, prom, "GET", "/series", params={"match[]": '{__name__!=""}', "start": str(past(60)),
                                                     "end": str(past(30))}))


def test_grafana_exemplars_probe_with_millisecond_times(gw: TestClient, prom: httpx.Client) -> None:
    now_ms = int(time.time() * 1000)
    form = {"query": "test", "start": str(now_ms - 30 * 60 * 1000), "end": str(now_ms)}
    g, p = both(gw, prom, "POST", "/query_exemplars", data=form)
    same(g, p)
    assert g.json()["status"] == "success"


def grafana_align(t: float, step: float, offset: int) -> float:
    """Grafana's AlignTimeRange: floor((t + offset) / step) * step - offset."""
    return math.floor((t + offset) / step) * step - offset


@pytest.mark.parametrize("utc_offset", [0, 19800, -18000])
def test_grafana_query_range_post_with_aligned_times(gw: TestClient, prom: httpx.Client, utc_offset: int) -> None:
    step = 15.0
    to = time.time() - 10
    start, end = grafana_align(to - 300, step, utc_offset), grafana_align(to, step, utc_offset)
    form = {"query": 'sum by (provider) (rate(model_inference_requests_total[1m]))',
            "start": repr(start), "end": repr(end), "step": "15", "timeout": "2m"}
    g, p = both(gw, prom, "POST", "/query_range", data=form)
    same(g, p)
    result = g.json()["data"]["result"]
    assert {r["metric"]["provider"] for r in result} == {"openai", "anthropic"}
    assert g.headers["x-gateway-cache"] == "miss"


def test_grafana_instant_query_post_with_fractional_time(gw: TestClient, prom: httpx.Client) -> None:
    form = {"query": "sum(provider_availability)", "time": f"{time.time() - 15:.3f}"}
    g, p = both(gw, prom, "POST", "/query", data=form)
    same(g, p)
    assert float(g.json()["data"]["result"][0]["value"][1]) == 2.5


# --- the wire contract beyond Grafana ------------------------------------------------------------

@pytest.mark.parametrize("expr", [
    "up", 'fastapi_requests_total{status_code=~"5.."}', "sum(rate(fastapi_requests_total[5m]))",
    "histogram_quantile(0.95, sum by (le) (rate(fastapi_requests_duration_seconds_bucket[5m])))",
    'label_replace(provider_availability, "p", "$1", "provider", "(.*)")', "time()", '"a string"',
    "provider_availability[30s]", "nonexistent_metric",
])
def test_instant_queries_get_and_post_equal(gw: TestClient, prom: httpx.Client, expr: str) -> None:
    params = {"query": expr, "time": str(past())}
    same(*both(gw, prom, "GET", "/query", params=params))
    same(*both(gw, prom, "POST", "/query", data=params))


def test_rfc3339_times_and_duration_steps(gw: TestClient, prom: httpx.Client) -> None:
    end = time.strftime("%Y-%m-%dT%H:%M:%S.123Z", time.gmtime(time.time() - 20))
    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 320))
    params = {"query": "sum(rate(tokens_used_total[1m]))", "start": start, "end": end, "step": "1m"}
    same(*both(gw, prom, "GET", "/query_range", params=params))


def test_stats_when_asked(gw: TestClient, prom: httpx.Client) -> None:
    params = {"query": "sum(provider_availability)", "time": str(past()), "stats": "all"}
    g, p = both(gw, prom, "GET", "/query", params=params)
    assert g.status_code == p.status_code == 200
    assert "stats" in g.json()["data"] and set(g.json()["data"]["stats"]) == set(p.json()["data"]["stats"])


def test_rules_and_alerts_pass_through(gw: TestClient, prom: httpx.Client) -> None:
    same(*both(gw, prom, "GET", "/rules"))
    same(*both(gw, prom, "GET", "/alerts"))


def test_both_mounts_answer(gw: TestClient) -> None:
    a = gw.get("/api/v1/query", params={"query": "1", "time": "4"})
    b = gw.get("/prometheus/api/v1/query", params={"query": "1", "time": "4"})
    assert a.json() == b.json() == {"status": "success", "data": {"resultType": "scalar", "result": [4, "1"]}}


# --- errors: Prometheus' envelope and status -----------------------------------------------------------

@pytest.mark.parametrize(("path", "params"), [
    ("/query", {"query": "sum(rate(x[5m])"}),                      # parse error: Prometheus' own words
    ("/query", {"query": ""}),
    ("/query", {"query": "up", "time": "yesterday"}),
    ("/query", {"query": "up", "timeout": "soon"}),
    ("/query_range", {"query": "up", "start": "x", "end": "2", "step": "1"}),
    ("/query_range", {"query": "up", "start": "10", "end": "5", "step": "1"}),
    ("/query_range", {"query": "up", "start": "0", "end": "100", "step": "0"}),
    ("/query_range", {"query": "up", "start": "0", "end": "100", "step": "-1"}),
    ("/query_range", {"query": "up", "start": "0", "end": "100", "step": "1x"}),
    ("/query_range", {"query": "up", "start": "0", "end": "11001", "step": "1"}),
    ("/query_range", {"query": "up", "start": "0", "end": "100"}),
    ("/query_range", {"query": "sum(", "start": "0", "end": "100", "step": "10"}),
    ("/series", {}),
    ("/series", {"match[]": "up", "start": "later"}),
    ("/labels", {"end": "never"}),
    ("/query_exemplars", {"query": "up", "start": "10", "end": "5"}),
    ("/label/provider/values", {"start": "x"}),
    ("/metadata", {"limit": "many"}),
])
def test_bad_input_is_the_same_4xx_as_prometheus(gw: TestClient, prom: httpx.Client, path: str,
                                                  params: dict[str, str]) -> None:
    g, p = both(gw, prom, "GET", path, params=params)
    assert 400 <= p.status_code < 500
    assert g.status_code == p.status_code
    assert g.json() == p.json(), (g.json(), p.json())


LOCAL_CHECKS = [
    ("/query", {"query": "up", "time": "yesterday"}),
    ("/query", {"query": "up", "time": " 1"}),
    ("/query", {"query": "up", "timeout": "soon"}),
    ("/query_range", {"query": "up", "start": "x", "end": "2", "step": "1"}),
    ("/query_range", {"query": "up", "start": "1", "end": "2022-13-01T00:00:00Z", "step": "1"}),
    ("/query_range", {"query": "up", "start": "10", "end": "5", "step": "1"}),
    ("/query_range", {"query": "up", "start": "0", "end": "100", "step": "0"}),
    ("/query_range", {"query": "up", "start": "0", "end": "100", "step": "1x"}),
    ("/query_range", {"query": "up", "start": "0", "end": "11001", "step": "1"}),
    ("/query_range", {"query": "up", "start": "0", "end": "100"}),
    ("/series", {}),
    ("/series", {"match[]": "up", "start": "later"}),
    ("/labels", {"end": "never"}),
    ("/query_exemplars", {"query": "up", "start": "10", "end": "5"}),
    ("/label/provider/values", {"start": "x"}),
    ("/metadata", {"limit": "many"}),
]


@pytest.mark.parametrize(("path", "params"), LOCAL_CHECKS)
def test_bad_parameters_are_judged_by_the_gateway_itself(prom: httpx.Client, path: str,
                                                         params: dict[str, str]) -> None:
    """With its upstream down, the gateway still answers bad parameters exactly as Prometheus does."""
    dead = GatewaySettings(prometheus_url=f"http://127.0.0.1:{free_port()}", request_deadline_seconds=1)
    with TestClient(create_app(dead)) as c:
        g = c.get(f"/api/v1{path}", params=params)
    p = prom.get(f"/api/v1{path}", params=params)
    assert p.status_code == 400
    assert g.status_code == 400 and g.json() == p.json()


def test_query_execution_error_is_422_like_prometheus(gw: TestClient, prom: httpx.Client) -> None:
    params = {"query": 'label_replace(provider_availability, "provider", "", "", "")', "time": str(past())}
    g, p = both(gw, prom, "GET", "/query", params=params)
    assert p.status_code == 422
    same(g, p)


def test_parameter_in_url_and_body_with_different_values_is_refused(gw: TestClient) -> None:
    """The prom-label-proxy bypass: one copy checked, the other evaluated."""
    r = gw.post("/api/v1/query?query=provider_availability", data={"query": "up", "time": "4"})
    assert r.status_code == 400
    assert r.json()["errorType"] == "bad_data" and '"query"' in r.json()["error"]
    r = gw.post("/api/v1/series?match[]=up", data={"match[]": ["up", "provider_availability"]})
    assert r.status_code == 400
    # The same value in both places is one parameter.
    r = gw.post("/api/v1/query?query=1", data={"query": "1", "time": "4"})
    assert r.status_code == 200 and r.json()["data"]["result"] == [4, "1"]


def test_unknown_api_path_is_404_envelope(gw: TestClient) -> None:
    r = gw.get("/api/v1/status/config")
    assert r.status_code == 404 and r.json()["errorType"] == "not_found"


# --- catalog figures by name -------------------------------------------------------------------

def by_labels(data: dict[str, Any]) -> dict[str, Any]:
    result = data["result"]
    if data["resultType"] in ("vector", "matrix"):
        result = sorted(result, key=lambda s: sorted(s["metric"].items()))
    return {**data, "result": result}


def figure_cases() -> list[str]:
    return [figure_name(CATALOG, q) for q in CATALOG.queries.values()]


@pytest.mark.parametrize("name", figure_cases())
def test_every_figure_by_name_equals_prometheus_on_its_expression(gw: TestClient, prom: httpx.Client,
                                                                  name: str) -> None:
    q = next(q for q in CATALOG.queries.values() if figure_name(CATALOG, q) == name)
    t = str(past())
    g = gw.get("/api/v1/query", params={"query": name, "time": t})
    p = prom.get("/api/v1/query", params={"query": q.expr, "time": t})
    assert g.status_code == p.status_code == 200, g.text
    # In series order-insensitively: Prometheus' own order is random for some functions
    # (histogram_quantile walks a Go map), from one evaluation to the next.
    assert by_labels(g.json()["data"]) == by_labels(p.json()["data"])
    assert g.json()["data"]["result"], f"{name}: no data to compare"


def test_figure_label_matchers_filter_like_a_metric(gw: TestClient, prom: httpx.Client) -> None:
    t = str(past())
    whole = prom.get("/api/v1/query", params={"query": "max by (provider) (provider_availability)",
                                              "time": t}).json()["data"]["result"]
    for matcher, keep in [('provider="openai"', lambda v: v == "openai"),
                          ('provider!="openai"', lambda v: v != "openai"),
                          ('provider=~"o.*|g.*"', lambda v: v[0] in "og"),
                          ('provider!~"m.*"', lambda v: not v.startswith("m"))]:
        got = gw.get("/api/v1/query", params={"query": f"gateway_provider_availability{{{matcher}}}",
                                              "time": t}).json()["data"]["result"]
        want = [s for s in whole if keep(s["metric"]["provider"])]
        key = lambda s: s["metric"]["provider"]  # noqa: E731
        assert sorted(got, key=key) == sorted(want, key=key), matcher
        assert got


def test_figure_by_name_in_range_query_and_in_expressions(gw: TestClient, prom: httpx.Client) -> None:
    params = {"start": str(past(200)), "end": str(past(20)), "step": "20"}
    g = gw.get("/api/v1/query_range", params={
        **params, "query": 'gateway_model_inference_requests_per_second{model="gpt-4"} * 60'})
    p = prom.get("/api/v1/query_range", params={
        **params, "query": 'sum by (provider, model) (rate(model_inference_requests_total{model="gpt-4"}[5m])) * 60'})
    assert g.status_code == 200, g.text
    assert g.json()["data"] == p.json()["data"]
    assert float(g.json()["data"]["result"][0]["values"][-1][1]) == pytest.approx(240.0, rel=0.05)


def test_counter_figure_under_rate_is_a_subquery(gw: TestClient, prom: httpx.Client) -> None:
    """rate(gateway_http_requests_total[2m]) is the figure sampled as a subquery (as a recording rule
    would sample it); the summed counter grows 10/s in the synthetic backend."""
    t = str(past())
    r = gw.get("/api/v1/query", params={"query": "rate(gateway_http_requests_total[2m])", "time": t})
    p = prom.get("/api/v1/query", params={"query": "rate((sum(fastapi_requests_total))[2m:])", "time": t})
    assert r.status_code == 200, r.text
    assert r.json()["data"] == p.json()["data"]
    assert float(r.json()["data"]["result"][0]["value"][1]) == pytest.approx(10.0, rel=0.05)


def test_figure_with_offset_equals_the_figure_earlier(gw: TestClient) -> None:
    t = past(30)
    a = gw.get("/api/v1/query", params={"query": "gateway_tokens_used_total offset 1m", "time": str(t)}).json()
    b = gw.get("/api/v1/query", params={"query": "gateway_tokens_used_total", "time": str(t - 60)}).json()
    assert a["data"]["result"] == [{**b["data"]["result"][0], "value": [t, b["data"]["result"][0]["value"][1]]}]


@pytest.mark.parametrize("query", [
    'gateway_provider_availability{job="backend"}',                       # not a label of the figure
    'gateway_http_requests_per_second_by_status_class{status_class="5xx"}',  # computed inside the figure
])
def test_unusable_figure_matchers_are_400_bad_data(gw: TestClient, query: str) -> None:
    r = gw.get("/api/v1/query", params={"query": query})
    assert r.status_code == 400
    assert r.json()["status"] == "error" and r.json()["errorType"] == "bad_data"
    assert "gateway_" in r.json()["error"]


def test_figure_names_in_exemplar_queries_are_expanded(gw: TestClient, prom: httpx.Client) -> None:
    form = {"query": "gateway_provider_availability", "start": str(past(60)), "end": str(past())}
    g = gw.post("/api/v1/query_exemplars", data=form)
    p = prom.post("/api/v1/query_exemplars", data={**form, "query": "max by (provider) (provider_availability)"})
    same(g, p)


# --- upstream failures: designed answers, fast -----------------------------------------------------

def test_upstream_down_is_503_unavailable_fast_then_breaker(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here
    settings = GatewaySettings(prometheus_url=f"http://127.0.0.1:{port}", request_deadline_seconds=2,
                               breaker_failure_threshold=2, breaker_reset_seconds=30)
    with TestClient(create_app(settings)) as c:
        for path in ("/api/v1/query?query=up", "/api/v1/labels"):
            t = time.perf_counter()
            r = c.get(path)
            assert time.perf_counter() - t < 1.5
            assert r.status_code == 503
            assert r.json()["status"] == "error" and r.json()["errorType"] == "unavailable"
        t = time.perf_counter()
        r = c.post("/api/v1/query_range", data={"query": "up", "start": "0", "end": "60", "step": "15"})
        assert time.perf_counter() - t < 0.2  # breaker open: no connection attempt
        assert r.status_code == 503 and r.json()["errorType"] == "unavailable"
        assert r.headers["retry-after"] and r.headers["x-gateway-cache"] == "failed"
        # Bad input is still judged first, and still a 400.
        assert c.get("/api/v1/query", params={"query": "up", "time": "x"}).status_code == 400


def test_upstream_slower_than_the_deadline_is_503_timeout(tmp_path: Path) -> None:
    """A listener that accepts and never answers: the deadline, not a hang."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    try:
        settings = GatewaySettings(prometheus_url=f"http://127.0.0.1:{srv.getsockname()[1]}",
                                   request_deadline_seconds=0.5)
        with TestClient(create_app(settings)) as c:
            t = time.perf_counter()
            r = c.get("/api/v1/query", params={"query": "up"})
            assert time.perf_counter() - t < 1.5
        assert r.status_code == 503 and r.json()["errorType"] == "timeout"
    finally:
        srv.close()


def test_path_prefixed_upstream(prom_stack: PromStack, tmp_path: Path) -> None:
    """PROMETHEUS_URL with a path (Thanos/Mimir style): the API works under it too."""
    port = free_port()
    (tmp_path / "p.yml").write_text("global: {}\n")
    proc = _spawn([PROMETHEUS_BIN, f"--config.file={tmp_path / 'p.yml'}", f"--storage.tsdb.path={tmp_path / 'd'}",
                   f"--web.listen-address=127.0.0.1:{port}", "--web.route-prefix=/prom/api-root"],
                  tmp_path, "prefixed", port=port)
    try:
        base = f"http://127.0.0.1:{port}/prom/api-root"
        wait_until(lambda: httpx.get(f"{base}/-/ready", timeout=1).status_code == 200, 30, what="prefixed prom")
        with TestClient(create_app(GatewaySettings(prometheus_url=base))) as c:
            for path, params in [("/query", {"query": "1+1", "time": "4"}), ("/labels", {}),
                                 ("/status/buildinfo", {})]:
                g = c.get(f"/api/v1{path}", params=params)
                p = httpx.get(f"{base}/api/v1{path}", params=params)
                assert g.status_code == p.status_code == 200
                assert g.json() == p.json()
            assert "gateway_providers" in c.get("/api/v1/label/__name__/values").json()["data"]
    finally:
        proc.stop()
