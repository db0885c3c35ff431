"""The /prometheus/metrics routes end to end in-process, with respx standing in for Prometheus."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import promql_parser as pp
import pytest
import respx
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.gateway.catalog.loader import load_catalog
from app.gateway.catalog.model import CATEGORIES
from app.gateway.promql.syntax import selectors
from app.gateway.settings import GatewaySettings
from app.main import create_app

PROM = "http://prom.test:9090"
QUERY_URL = f"{PROM}/api/v1/query"
BASE = "/prometheus/metrics"
CATALOG = load_catalog()
EXPR_TO_ID = {q.expr: q.id for q in CATALOG.queries.values()}
# A distinct, known value per query: its position in the catalog, plus one.
VALUE = {qid: float(i + 1) for i, qid in enumerate(CATALOG.queries)}
LABELS = {"provider": "openai", "model": "gpt-4", "token_type": "input", "plan_type": "pro", "queue_name": "high",
          "billing_cycle": "monthly", "status_class": "2xx", "job": "backend", "instance": "10.0.0.1:8000"}
BATCH_PART = re.compile(r'label_replace\((.*?), "gateway_query", "(\d+)", "", ""\)')
SUMMARY = {
    "http": ["total_requests", "request_rate_per_minute", "error_rate", "avg_latency_ms", "in_progress"],
    "models": ["total_inference_requests", "tokens_used_total", "credits_used_total", "avg_inference_latency_ms"],
    "providers": ["total_providers", "healthy_providers", "degraded_providers", "unavailable_providers",
                  "avg_error_rate", "avg_response_time_ms"],
    "database": ["total_queries", "avg_query_latency_ms", "cache_hit_rate"],
    "business": ["active_api_keys", "active_subscriptions", "active_trials", "total_tokens_used",
                 "total_credits_used"],
}


def sent_query(request: httpx.Request) -> str:
    return dict(httpx.QueryParams(request.content.decode()))["query"]


def split(expr: str) -> list[tuple[str, str | None]]:
    """(catalog expr, batch index) for a single or batched query."""
    parts = BATCH_PART.findall(expr)
    return [(inner, idx) for inner, idx in parts] if parts else [(expr, None)]


def unfilter(expr: str) -> str:
    """The catalog expr a filtered expr came from (drops provider=/model= matchers)."""
    expr = re.sub(r',?(provider|model)=~?"[^"]*"', "", expr)
    return expr.replace("{,", "{").replace("{}", "")


class FakeProm:
    """Evaluates the default catalog's exprs (plain or batched) to VALUE, with labels."""

    def __init__(self, missing: frozenset[str] = frozenset(), bad: frozenset[str] = frozenset(),
                 value: Callable[[str], str] | None = None) -> None:
        self.missing = missing
        self.bad = bad
        self.value = value or (lambda qid: repr(VALUE[qid]))
        self.queries: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        expr = sent_query(request)
        self.queries.append(expr)
        result = []
        for inner, idx in split(expr):
            qid = EXPR_TO_ID[unfilter(inner)]
            if qid in self.bad:
                return httpx.Response(400, json={"status": "error", "errorType": "bad_data",
                                                 "error": f"cannot evaluate {qid}"})
            if qid in self.missing:
                continue
            metric = dict(LABELS)
            if idx is not None:
                metric["gateway_query"] = idx
            result.append({"metric": metric, "value": [1.7e9, self.value(qid)]})
        return httpx.Response(200, json={"status": "success", "data": {"resultType": "vector", "result": result}})


def settings(**kw: Any) -> GatewaySettings:
    kw.setdefault("prometheus_url", PROM)
    return GatewaySettings(**kw)


@pytest.fixture()
def mock() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as m:
        yield m


def app_client(**kw: Any) -> TestClient:
    return TestClient(create_app(settings(**kw)))


def strict_json(text: str) -> Any:
    """Parse JSON refusing the NaN/Infinity extensions Python's json would accept."""
    def refuse(const: str) -> None:
        raise AssertionError(f"non-standard JSON constant {const}")
    return json.loads(text, parse_constant=refuse)


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


# --- /summary ----------------------------------------------------------------------------------------

def test_summary_shape_numbers_and_provenance(mock: respx.MockRouter) -> None:
    fake = FakeProm()
    route = mock.post(QUERY_URL).mock(side_effect=fake)
    with app_client() as c:
        resp = c.get(f"{BASE}/summary")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert set(body) == {"timestamp", "status", "metrics", "provenance", "errors", "no_data", "upstream"}
    assert body["no_data"] == []
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", body["timestamp"])
    assert body["status"] == "ok" and body["errors"] == [] and body["upstream"] == {"up": True}
    assert {s: list(keys) for s, keys in body["metrics"].items()} == SUMMARY
    assert route.call_count == 1  # the whole summary is one batched evaluation
    for fig in CATALOG.summary:
        value = body["metrics"][fig.section][fig.key]
        assert value == pytest.approx(VALUE[fig.query_id] * fig.scale), (fig.section, fig.key)
        prov = body["provenance"][fig.section][fig.key]
        assert prov["state"] == "fresh"
        assert prov["query"] == fig.query_id
        assert prov["unit"] == (fig.unit or CATALOG.queries[fig.query_id].unit)
        assert 0 <= prov["age_seconds"] < 2
        assert "error" not in prov
    assert body["provenance"]["http"]["error_rate"]["unit"] == "percent"


def test_summary_missing_figures_are_null_not_zero(mock: respx.MockRouter) -> None:
    mock.post(QUERY_URL).mock(side_effect=FakeProm(missing=frozenset({"active_trials", "cache_hit_ratio"})))
    with app_client() as c:
        body = c.get(f"{BASE}/summary").json()
    assert body["status"] == "ok"
    assert body["metrics"]["business"]["active_trials"] is None
    assert body["metrics"]["database"]["cache_hit_rate"] is None
    assert body["provenance"]["business"]["active_trials"]["no_data"] is True
    assert body["metrics"]["business"]["active_api_keys"] == VALUE["active_api_keys"]


def test_summary_non_finite_becomes_null_with_flag(mock: respx.MockRouter) -> None:
    odd = {"http_server_error_ratio": "NaN", "cache_hit_ratio": "+Inf"}
    mock.post(QUERY_URL).mock(side_effect=FakeProm(value=lambda qid: odd.get(qid, "1")))
    with app_client() as c:
        resp = c.get(f"{BASE}/summary")
    body = strict_json(resp.text)
    assert body["metrics"]["http"]["error_rate"] is None
    assert body["provenance"]["http"]["error_rate"]["non_finite"] == "NaN"
    assert body["provenance"]["database"]["cache_hit_rate"]["non_finite"] == "+Inf"


def test_summary_degraded_when_one_query_fails(mock: respx.MockRouter) -> None:
    fake = FakeProm(bad=frozenset({"providers_degraded"}))
    mock.post(QUERY_URL).mock(side_effect=fake)
    with app_client() as c:
        resp = c.get(f"{BASE}/summary")
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "degraded"
    assert body["metrics"]["providers"]["degraded_providers"] is None
    assert body["metrics"]["providers"]["healthy_providers"] == VALUE["providers_healthy"]
    assert body["errors"] == [{"query": "providers_degraded", "state": "failed", "error_type": "bad_data",
                               "message": "cannot evaluate providers_degraded"}]
    assert body["provenance"]["providers"]["degraded_providers"]["error"]["error_type"] == "bad_data"
    assert body["upstream"]["up"] is True  # a query error says nothing about the upstream's health


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


FAILURES: dict[str, tuple[Any, set[str]]] = {
    "500 html": (httpx.Response(500, html="<html><body><h1>500</h1></body></html>"), {"bad_response"}),
    "503 json": (httpx.Response(503, json={"status": "error", "errorType": "unavailable", "error": "x"}),
                 {"unavailable"}),
    "truncated": (httpx.Response(200, text='{"status":"success","data":{"resu'), {"bad_response"}),
    "refused": (httpx.ConnectError("Connection refused"), {"unreachable"}),
    "read error": (httpx.ReadError("reset by peer"), {"transport"}),
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_upstream_failure_is_never_a_5xx(mock: respx.MockRouter, failure: str) -> None:
    effect, types = FAILURES[failure]
    if isinstance(effect, Exception):
        mock.post(QUERY_URL).mock(side_effect=effect)
    else:
        mock.post(QUERY_URL).mock(return_value=effect)
    with app_client(breaker_failure_threshold=100) as c:
        resp = c.get(f"{BASE}/summary")
        assert resp.status_code == 200
        body = resp.json()
        assert body["status"] == "unavailable"
        assert body["upstream"]["up"] is False
        assert all(v is None for section in body["metrics"].values() for v in section.values())
        assert {e["error_type"] for e in body["errors"]} == types
        assert len(body["errors"]) == len(CATALOG.summary_queries())
        for category in [*CATEGORIES, "all"]:
            text = c.get(f"{BASE}/{category}")
            assert text.status_code == 200
            fams = families(text.text)
            assert fams["gateway_upstream_up"].samples[0].value == 0.0
            success = {s.labels["query"]: s.value for s in fams["gateway_query_success"].samples}
            expected = CATALOG.categories[category] if category != "all" else [
                q.id for q in CATALOG.all_queries()]
            assert success == dict.fromkeys(expected, 0.0)
            doc = c.get(f"{BASE}/{category}?format=json")
            assert doc.status_code == 200 and doc.json()["status"] == "unavailable"


def test_garbage_success_envelope_is_not_a_5xx(mock: respx.MockRouter) -> None:
    mock.post(QUERY_URL).respond(json={"status": "success", "data": {"resultType": "vector", "result": [1, 2]}})
    with app_client() as c:
        resp = c.get(f"{BASE}/summary")
        assert resp.status_code == 200
        assert resp.json()["status"] == "unavailable"
        assert c.get(f"{BASE}/system").status_code == 200


def test_refused_real_connection_is_unavailable_within_the_deadline() -> None:
    s = GatewaySettings(prometheus_url=f"http://127.0.0.1:{free_port()}", request_deadline_seconds=1.0)
    with TestClient(create_app(s)) as c:
        t = time.perf_counter()
        body = c.get(f"{BASE}/summary").json()
        assert time.perf_counter() - t < 1.0 + 0.5
    assert body["status"] == "unavailable"
    assert {e["error_type"] for e in body["errors"]} == {"unreachable"}


def test_hanging_upstream_answers_within_the_deadline(mock: respx.MockRouter) -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        raise AssertionError("unreachable")

    mock.post(QUERY_URL).mock(side_effect=hang)
    with app_client(request_deadline_seconds=0.3) as c:
        for path in ("summary", "providers", "system?format=json"):
            t = time.perf_counter()
            resp = c.get(f"{BASE}/{path}")
            assert time.perf_counter() - t < 0.3 + 0.5, path
            assert resp.status_code == 200
        body = c.get(f"{BASE}/summary").json()
    assert body["status"] == "unavailable"
    assert {e["error_type"] for e in body["errors"]} == {"timeout"}


def test_stale_value_served_after_upstream_dies(mock: respx.MockRouter) -> None:
    route = mock.post(QUERY_URL).mock(side_effect=FakeProm())
    with app_client(cache_ttl_seconds=0, breaker_failure_threshold=100) as c:
        good = c.get(f"{BASE}/summary").json()
        time.sleep(0.1)
        route.mock(return_value=httpx.Response(502, html="<html>bad gateway</html>"))
        body = c.get(f"{BASE}/summary").json()
        text = c.get(f"{BASE}/providers").text
    assert body["status"] == "degraded"
    assert body["metrics"] == good["metrics"]
    prov = body["provenance"]["providers"]["total_providers"]
    assert prov["state"] == "stale" and prov["age_seconds"] >= 0.1
    assert prov["error"]["error_type"] == "bad_response"
    fams = families(text)
    assert fams["gateway_upstream_up"].samples[0].value == 0.0
    assert {s.labels["query"]: s.value for s in fams["gateway_query_success"].samples}["providers"] == 0.0
    # The stale value itself is still exported, with its age.
    assert fams["gateway_providers"].samples[0].value == VALUE["providers"]
    ages = {s.labels["query"]: s.value for s in fams["gateway_query_age_seconds"].samples}
    assert ages["providers"] >= 0.1


def test_circuit_breaker_answers_at_once(mock: respx.MockRouter) -> None:
    route = mock.post(QUERY_URL).mock(side_effect=httpx.ConnectError("refused"))
    with app_client(breaker_failure_threshold=2, breaker_reset_seconds=60) as c:
        c.get(f"{BASE}/summary")
        c.get(f"{BASE}/summary")
        calls = route.call_count
        assert calls == 2
        t = time.perf_counter()
        body = c.get(f"{BASE}/summary").json()
        assert time.perf_counter() - t < 0.5
        assert route.call_count == calls
    assert {e["error_type"] for e in body["errors"]} == {"circuit_open"}
    assert body["status"] == "unavailable"


# --- category routes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("category", [*CATEGORIES, "all"])
def test_category_text_is_valid_exposition(mock: respx.MockRouter, category: str) -> None:
    mock.post(QUERY_URL).mock(side_effect=FakeProm())
    with app_client() as c:
        resp = c.get(f"{BASE}/{category}")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    fams = families(resp.text)
    ids = CATALOG.categories[category] if category != "all" else [q.id for q in CATALOG.all_queries()]
    assert fams["gateway_upstream_up"].samples[0].value == 1.0
    success = {s.labels["query"]: s.value for s in fams["gateway_query_success"].samples}
    assert success == dict.fromkeys(ids, 1.0)
    for qid in ids:
        q = CATALOG.queries[qid]
        fam = fams[q.family("gateway")]
        assert fam.type == q.kind
        assert f"Query id: {qid}." in fam.documentation
        name = q.family("gateway") + ("_total" if q.kind == "counter" else "")
        assert f"# HELP {name} " in resp.text
        assert f"# TYPE {name} {q.kind}\n" in resp.text
        samples = [s for s in fam.samples if s.name == name]
        assert len(samples) == 1
        assert samples[0].value == VALUE[qid]
        assert set(samples[0].labels) == set(q.labels)
        for label in q.labels:
            assert samples[0].labels[label] == LABELS[label]
    for fam in fams.values():
        for s in fam.samples:
            assert "job" not in s.labels and "instance" not in s.labels and "gateway_query" not in s.labels


def test_counters_are_exported_with_total(mock: respx.MockRouter) -> None:
    mock.post(QUERY_URL).mock(side_effect=FakeProm())
    with app_client() as c:
        text = c.get(f"{BASE}/models").text
    assert f"gateway_tokens_used_total {VALUE['tokens_used']}" in text
    assert "# TYPE gateway_tokens_used_total counter" in text
    assert "gateway_tokens_used " not in text


@pytest.mark.parametrize("how", ["format", "accept"])
def test_category_json(mock: respx.MockRouter, how: str) -> None:
    mock.post(QUERY_URL).mock(side_effect=FakeProm())
    with app_client() as c:
        if how == "format":
            resp = c.get(f"{BASE}/providers?format=json")
        else:
            resp = c.get(f"{BASE}/providers", headers={"Accept": "application/json, text/plain;q=0.5"})
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    doc = resp.json()
    assert doc["category"] == "providers" and doc["status"] == "ok"
    assert doc["filters"] == {} and doc["errors"] == [] and doc["upstream"] == {"up": True}
    assert [f["id"] for f in doc["figures"]] == list(CATALOG.categories["providers"])
    avail = next(f for f in doc["figures"] if f["id"] == "provider_availability")
    assert avail["name"] == "gateway_provider_availability" and avail["type"] == "gauge"
    assert avail["labels"] == ["provider"] and avail["state"] == "fresh"
    assert avail["series"] == [{"labels": {"provider": "openai"}, "value": VALUE["provider_availability"]}]


def test_format_text_wins_over_accept_json(mock: respx.MockRouter) -> None:
    mock.post(QUERY_URL).mock(side_effect=FakeProm())
    with app_client() as c:
        resp = c.get(f"{BASE}/system?format=text", headers={"Accept": "application/json"})
    assert resp.headers["content-type"].startswith("text/plain")


def test_openmetrics_via_accept(mock: respx.MockRouter) -> None:
    mock.post(QUERY_URL).mock(side_effect=FakeProm())
    with app_client() as c:
        resp = c.get(f"{BASE}/models", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert resp.headers["content-type"].startswith("application/openmetrics-text")
    assert resp.text.endswith("# EOF\n")
    assert f"gateway_tokens_used_total {VALUE['tokens_used']}" in resp.text
    assert "# TYPE gateway_tokens_used counter" in resp.text


def test_unknown_category_is_404(mock: respx.MockRouter) -> None:
    route = mock.post(QUERY_URL).mock(side_effect=FakeProm())
    with app_client() as c:
        resp = c.get(f"{BASE}/nonsense")
    assert resp.status_code == 404
    assert "unknown category 'nonsense'" in resp.json()["detail"]
    assert route.call_count == 0


# --- filters -----------------------------------------------------------------------------------------

def test_provider_filter_reaches_every_selector(mock: respx.MockRouter) -> None:
    fake = FakeProm()
    mock.post(QUERY_URL).mock(side_effect=fake)
    with app_client() as c:
        doc = c.get(f"{BASE}/providers?format=json&provider=openai&provider=openai").json()
        models = c.get(f"{BASE}/models?format=json&provider=openai&provider=anthropic&model=gpt-4").json()
    assert doc["filters"] == {"provider": ["openai"]} and doc["status"] == "ok"
    assert models["filters"] == {"provider": ["openai", "anthropic"], "model": ["gpt-4"]}
    assert models["status"] == "ok"
    assert len(fake.queries) == 2
    wanted = [{"provider": ("Equal", "openai")},
              {"provider": ("Re", "openai|anthropic"), "model": ("Equal", "gpt-4")}]
    for expr, want, category in zip(fake.queries, wanted, ("providers", "models"), strict=True):
        parts = split(expr)
        assert sorted(EXPR_TO_ID[unfilter(inner)] for inner, _ in parts) == sorted(CATALOG.categories[category])
        for inner, _ in parts:
            sels = selectors(pp.parse(inner))
            assert sels
            for sel in sels:
                got = {m.name: (str(m.op).rsplit(".", 1)[-1], m.value) for m in sel.matchers.matchers}
                assert {k: got.get(k) for k in want} == want, inner


def test_filter_on_a_category_that_takes_none_is_422(mock: respx.MockRouter) -> None:
    route = mock.post(QUERY_URL).mock(side_effect=FakeProm())
    with app_client() as c:
        for category in ("system", "business", "performance"):
            resp = c.get(f"{BASE}/{category}?provider=openai")
            assert resp.status_code == 422
            assert resp.json()["detail"][0]["msg"] == "provider= filters apply to providers and models only"
            assert resp.json()["detail"][0]["loc"] == ["query", "provider"]
    assert route.call_count == 0


@pytest.mark.parametrize("value", ['openai"}', 'x"} or vector(1) or up{a="', "a\\b", "a b", "", "-x", "a\nb"])
def test_bad_filter_value_is_422_with_a_message(mock: respx.MockRouter, value: str) -> None:
    route = mock.post(QUERY_URL).mock(side_effect=FakeProm())
    with app_client() as c:
        resp = c.get(f"{BASE}/providers", params={"provider": value})
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["msg"] == (f"provider={value!r} is not a plain label value "
                                     "(letters, digits and _ . : / @ + -, starting with a letter or digit)")
    assert route.call_count == 0


def test_trailing_newline_filter_value_is_422(mock: respx.MockRouter) -> None:
    route = mock.post(QUERY_URL).mock(side_effect=FakeProm())
    with app_client() as c:
        resp = c.get(f"{BASE}/providers", params={"provider": "openai\n"})
    assert resp.status_code == 422
    assert route.call_count == 0


def test_too_many_or_too_long_values_are_422(mock: respx.MockRouter) -> None:
    route = mock.post(QUERY_URL).mock(side_effect=FakeProm())
    with app_client(filter_max_values=3, filter_max_value_length=16) as c:
        resp = c.get(f"{BASE}/models", params={"model": ["a", "b", "c", "d"]})
        assert resp.status_code == 422 and resp.json()["detail"][0]["msg"] == "at most 3 model values"
        resp = c.get(f"{BASE}/models", params={"model": "m" * 17})
        assert resp.status_code == 422
        assert resp.json()["detail"][0]["msg"] == "model value longer than 16 characters"
        assert c.get(f"{BASE}/models", params={"model": ["a", "b", "c"]}).status_code == 200
        assert c.get(f"{BASE}/models", params={"model": "m" * 16}).status_code == 200
    assert route.call_count == 2


# --- docs ----------------------------------------------------------------------------------------------

def test_docs_markdown_lists_every_query_and_route(mock: respx.MockRouter) -> None:
    route = mock.post(QUERY_URL).mock(side_effect=FakeProm())
    with app_client() as c:
        resp = c.get(f"{BASE}/docs")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/markdown")
    doc = resp.text
    assert route.call_count == 0
    rows = {line.split("|")[1].strip(" `"): line for line in doc.splitlines() if line.startswith("| `gateway_")}
    for category, ids in CATALOG.categories.items():
        assert f"## {category} (`{BASE}/{category}`)" in doc
        for qid in ids:
            q = CATALOG.queries[qid]
            name = q.family("gateway") + ("_total" if q.kind == "counter" else "")
            assert name in rows, qid
            assert f"`{BASE}/{category}`" in rows[name]
            assert q.unit in rows[name] and q.help.replace("|", "\\|") in rows[name]
    for fig in CATALOG.summary:
        assert f"| `{fig.section}.{fig.key}` |" in doc
        assert f"`{fig.query_id}`" in doc
    for q in CATALOG.queries.values():
        assert q.id in doc


def test_no_nan_ever_reaches_json(mock: respx.MockRouter) -> None:
    mock.post(QUERY_URL).mock(side_effect=FakeProm(value=lambda qid: "NaN"))
    with app_client() as c:
        resp = c.get(f"{BASE}/all?format=json")
        summary = strict_json(c.get(f"{BASE}/summary").text)
    assert resp.status_code == 200
    doc = strict_json(resp.text)
    assert len(doc["figures"]) == len(CATALOG.all_queries())
    for fig in doc["figures"]:
        assert fig["series"]
        for s in fig["series"]:
            assert s["value"] is None and s["non_finite"] == "NaN"
    assert all(v is None for section in summary["metrics"].values() for v in section.values())
    assert summary["provenance"]["http"]["total_requests"]["non_finite"] == "NaN"
