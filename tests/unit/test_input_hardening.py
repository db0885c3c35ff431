"""Hostile input and hostile upstream answers, in-process.

Input: every query parameter is validated (422 JSON naming the problem), filter
counts and lengths are capped, unknown categories are 404, odd Accept headers,
methods and encodings never produce a 5xx.
Upstream: the size cap, NaN/Inf (null + non_finite in JSON, kept in text),
warnings/infos passed through, and answers with warnings reused only briefly, each
proved against respx AND against a real HTTP server (tests/faults/fake_upstream.py).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import respx
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.gateway.settings import GatewaySettings
from app.main import create_app
from tests.faults.fake_upstream import BATCH, FakePrometheus

PROM = "http://prom.test:9090"
UPSTREAM = "http://prom-up.test:9090"
BASE = "/prometheus/metrics"


def _refuse(const: str) -> None:
    raise AssertionError(f"non-standard JSON constant {const}")


def strict_json(text: str) -> Any:
    return json.loads(text, parse_constant=_refuse)


def _vector(query: str, values: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    parts = BATCH.findall(query) or [None]
    result = [{"metric": {"gateway_query": p} if p is not None else {}, "value": [1.7e9, values[i % len(values)]]}
              for i, p in enumerate(parts)]
    return {"status": "success", "data": {"resultType": "vector", "result": result}, **(extra or {})}


# --- input ----------------------------------------------------------------------------------------

@pytest.fixture()
def client() -> Iterator[TestClient]:
    with respx.mock(assert_all_called=False) as mock:
        mock.post(f"{PROM}/api/v1/query").mock(side_effect=lambda r: httpx.Response(
            200, json=_vector(dict(httpx.QueryParams(r.content.decode()))["query"], ["1"])))
        with TestClient(create_app(GatewaySettings(prometheus_url=PROM, response_memo_seconds=0))) as c:
            yield c


def _422(r: httpx.Response, *words: str) -> None:
    assert r.status_code == 422, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    text = r.text.lower()
    for w in words:
        assert w.lower() in text, (w, r.text)


def test_filter_value_count_limit(client: TestClient) -> None:
    ok = client.get(f"{BASE}/providers", params=[("provider", f"p{i}") for i in range(10)])
    assert ok.status_code == 200
    _422(client.get(f"{BASE}/providers", params=[("provider", f"p{i}") for i in range(11)]), "at most 10")
    _422(client.get(f"{BASE}/models", params=[("model", f"m{i}") for i in range(11)]), "at most 10 model")


def test_filter_value_length_limit(client: TestClient) -> None:
    assert client.get(f"{BASE}/providers", params={"provider": "a" * 128}).status_code == 200
    _422(client.get(f"{BASE}/providers", params={"provider": "a" * 129}), "longer than 128")


@pytest.mark.parametrize("value", ['a"}) or vector(1) #', "a\\", "x=~.*", "", " leading", "ü", "a\nb", "a\tb"])
def test_filter_injection_attempts_are_422(client: TestClient, value: str) -> None:
    r = client.get(f"{BASE}/providers", params={"provider": value})
    _422(r, "provider")


def test_filters_on_a_category_without_them_are_422(client: TestClient) -> None:
    _422(client.get(f"{BASE}/system", params={"provider": "openai"}), "providers and models only")


@pytest.mark.parametrize("path", ["nope", "SUMMARY", "summary.json", "a%2Fb", "..", "%00"])
def test_unknown_category_is_404_json(client: TestClient, path: str) -> None:
    r = client.get(f"{BASE}/{path}")
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/json")


@pytest.mark.parametrize("route", ["/system", "/all", "/providers"])
@pytest.mark.parametrize("fmt", ["xml", "JSON", "", "prometheus", "json ", "text\n"])
def test_unknown_format_is_422(client: TestClient, route: str, fmt: str) -> None:
    r = client.get(BASE + route, params={"format": fmt})
    _422(r, "format")


@pytest.mark.parametrize("params", [{"format": "xml"}, {"kind": "bogus"}, {"metric": "bogus"},
                                    {"target": "nope"}, {"cluster": "a\x01b"}, {"object": "x" * 257}])
def test_vrops_parameters_are_validated(client: TestClient, params: dict[str, str]) -> None:
    r = client.get("/vrops/metrics", params=params)
    assert r.status_code == 422, r.text


def test_vrops_value_count_limit(client: TestClient) -> None:
    _422(client.get("/vrops/metrics", params=[("cluster", f"c{i}") for i in range(51)]), "at most 50")


ODD_ACCEPT = [
    "", "*/*", "garbage", "application/openmetrics-text; version=abc", "application/json;q=0", "text/plain;q=x",
    ",,,;;;", "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8", "text/plain; version=1..0",
    "text/plain;version=1.x", "application/openmetrics-text; version=1.0.0, text/plain; version=abc",
    "application/openmetrics-text; version=" + "9" * 5000, "\xff\xfe",
]


@pytest.mark.parametrize("accept", ODD_ACCEPT)
def test_odd_accept_headers_never_5xx(client: TestClient, accept: str) -> None:
    raw = accept.encode("latin-1")
    for route in (f"{BASE}/system", f"{BASE}/all", f"{BASE}/summary", f"{BASE}/providers", "/metrics",
                  "/vrops/metrics", "/vrops/jobs/metrics"):
        r = client.get(route, headers={"Accept": raw})
        assert r.status_code < 500 or (route.startswith("/vrops") and r.status_code == 503), \
            (route, accept, r.status_code, r.text[:200])


def test_render_families_survives_a_bad_version_parameter() -> None:
    from prometheus_client.core import GaugeMetricFamily

    from app.common.exposition import TEXT_CONTENT_TYPE, render_families

    fam = GaugeMetricFamily("x_ratio", "help", value=0.5)
    body, ctype = render_families([fam], "application/openmetrics-text; version=abc")
    # prometheus_client's own choose_encoder raises on this header; we fall back to 0.0.4 text.
    assert ctype == TEXT_CONTENT_TYPE
    assert b"x_ratio 0.5" in body and b"# EOF" not in body


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_other_methods_are_405(client: TestClient, method: str) -> None:
    assert client.request(method, f"{BASE}/summary").status_code == 405


def test_undecodable_query_string_is_not_5xx(client: TestClient) -> None:
    for qs in ("provider=%ff%fe", "provider=%", "format=%00", "%%%=1", "provider=a&provider=%ZZ"):
        r = client.get(f"{BASE}/providers?{qs}")
        assert r.status_code in (200, 400, 422), (qs, r.status_code, r.text[:200])


def test_many_unknown_parameters_are_ignored_within_the_limit(client: TestClient) -> None:
    r = client.get(f"{BASE}/system?" + "&".join(f"x{i}=1" for i in range(300)))
    assert r.status_code == 200
    assert client.get(f"{BASE}/system?" + "&".join(f"x{i}=1" for i in range(1000))).status_code == 414


# --- upstream: the same properties against respx and a real server ---------------------------------

@dataclass
class Upstream:
    url: str
    set_mode: Callable[[str], None]
    requests: Callable[[], int]


@pytest.fixture(params=["respx", "server"])
def upstream(request: pytest.FixtureRequest) -> Iterator[Upstream]:
    if request.param == "server":
        fake = FakePrometheus().start()
        fake.huge_bytes = 256 * 1024
        try:
            yield Upstream(fake.url, lambda m: setattr(fake, "mode", m), lambda: fake.requests)
        finally:
            fake.stop()
        return
    mode_now = ["ok"]
    count = [0]

    def answer(r: httpx.Request) -> httpx.Response:
        count[0] += 1
        q = dict(httpx.QueryParams(r.content.decode()))["query"]
        mode = mode_now[0]
        if mode == "huge":
            return httpx.Response(200, content=b" " * (256 * 1024), headers={"Content-Type": "application/json"})
        if mode == "nan":
            return httpx.Response(200, json=_vector(q, ["NaN", "+Inf", "-Inf"]))
        if mode == "warnings":
            return httpx.Response(200, json=_vector(q, ["1"], {"warnings": ["fake warning: partial data"],
                                                              "infos": ["fake info: maybe a counter"]}))
        return httpx.Response(200, json=_vector(q, ["1"]))

    with respx.mock(assert_all_called=False) as mock:
        mock.post(f"{UPSTREAM}/api/v1/query").mock(side_effect=answer)
        yield Upstream(UPSTREAM, lambda m: mode_now.__setitem__(0, m), lambda: count[0])


def _app(up: Upstream, **kw: Any) -> TestClient:
    kw.setdefault("response_memo_seconds", 0)
    kw.setdefault("prometheus_max_response_bytes", 64 * 1024)
    return TestClient(create_app(GatewaySettings(prometheus_url=up.url, **kw)))


def test_size_cap(upstream: Upstream) -> None:
    upstream.set_mode("huge")
    with _app(upstream, cache_ttl_seconds=0) as c:
        body = strict_json(c.get(f"{BASE}/summary").text)
    assert body["status"] == "unavailable"
    assert {e["error_type"] for e in body["errors"]} == {"too_large"}
    assert body["upstream"]["up"] is True  # a too-large answer is the query's fault, not the upstream's


def test_non_finite_null_in_json_kept_in_text(upstream: Upstream) -> None:
    upstream.set_mode("nan")
    with _app(upstream, cache_ttl_seconds=0) as c:
        summary = c.get(f"{BASE}/summary")
        cat = c.get(f"{BASE}/system", params={"format": "json"})
        text = c.get(f"{BASE}/system")
    body = strict_json(summary.text)
    flags = [p.get("non_finite") for s in body["provenance"].values() for p in s.values()]
    nulls = [v for s in body["metrics"].values() for v in s.values() if v is None]
    assert {"NaN", "+Inf", "-Inf"} & set(flags) and len(nulls) >= len([f for f in flags if f])
    series = [s for f in strict_json(cat.text)["figures"] for s in f["series"]]
    assert series and all(s["value"] is None and s["non_finite"] in ("NaN", "+Inf", "-Inf") for s in series)
    values = [s.value for fam in text_string_to_metric_families(text.text) for s in fam.samples
              if not s.name.startswith("gateway_query_") and s.name != "gateway_upstream_up"]
    assert values and any(math.isnan(v) for v in values) and any(math.isinf(v) for v in values)


def test_warnings_passed_through_and_reused_briefly(upstream: Upstream) -> None:
    with _app(upstream, cache_ttl_seconds=60, warning_ttl_seconds=5) as c:
        upstream.set_mode("warnings")
        n0 = upstream.requests()
        first = strict_json(c.get(f"{BASE}/summary").text)
        second = strict_json(c.get(f"{BASE}/summary").text)
        with_warnings = upstream.requests() - n0
        text = c.get(f"{BASE}/system").text
        upstream.set_mode("ok")
        n1 = upstream.requests()
        c.get(f"{BASE}/business")
        c.get(f"{BASE}/business")
        healthy = upstream.requests() - n1
    for body in (first, second):
        warnings = {w for s in body["provenance"].values() for p in s.values() for w in p.get("warnings", [])}
        assert warnings == {"fake warning: partial data", "info: fake info: maybe a counter"}
        assert body["status"] == "degraded"  # a partial answer is not "ok"
    assert {p["state"] for s in first["provenance"].values() for p in s.values()} == {"fresh"}
    assert {p["state"] for s in second["provenance"].values() for p in s.values()} == {"cached"}
    assert with_warnings == 1  # the second /summary was served from the short warnings TTL
    assert healthy == 1  # as a clean answer is, for its full TTL
    assert re.search(r"gateway_query_success\{", text)
    assert re.search(r'gateway_query_warnings\{query="[a-z_0-9]+"\} 1\.0', text)
