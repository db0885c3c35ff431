"""No silent nulls: a figure whose query matched no series is listed, in JSON and in text.

"No data" is not an error (the summary's status stays ok) but it must never look
like a number that happens to be missing: the summary and category JSON list such
figures under a top-level `no_data`, the text routes export
`<prefix>_query_has_data{query} 0|1`.
"""

from __future__ import annotations

from typing import Any

import pytest
import respx
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.common.exposition import render_families
from app.gateway.catalog.loader import build_catalog
from app.gateway.catalog.model import CatalogQuery
from app.gateway.render import json as json_render
from app.gateway.render import text as text_render
from app.gateway.result import Lookup, QueryResult, Sample, UpstreamFailure
from app.gateway.settings import GatewaySettings
from app.main import create_app
from tests.unit.test_gateway_routes import BASE, PROM, QUERY_URL, FakeProm

CATALOG = build_catalog({
    "prefix": "gw",
    "categories": {"providers": ["avail", "resp", "reqs"]},
    "summary": {"providers": {"total": "avail", "avg_response_time_ms": {"query": "resp", "scale": 1000}},
                "http": {"total_requests": "reqs", "again": "resp"}},
    "queries": [
        {"id": "avail", "expr": "count(provider_availability)", "help": "h", "unit": "providers"},
        {"id": "resp", "expr": "avg(x)", "help": "h", "unit": "seconds"},
        {"id": "reqs", "type": "counter", "expr": "sum(r_total)", "help": "h", "unit": "requests"},
    ],
}, "t.toml")
AVAIL, RESP, REQS = (CATALOG.queries[i] for i in ("avail", "resp", "reqs"))


def result(q: CatalogQuery, *values: float, lookup: Lookup = Lookup.MISS, **kw: Any) -> QueryResult:
    return QueryResult(q, lookup, tuple(Sample((), v) for v in values), 1.7e9, 0.1, **kw)


def test_summary_lists_figures_without_data_and_stays_ok() -> None:
    doc = json_render.summary(CATALOG, {"avail": result(AVAIL, 4.0), "resp": result(RESP),
                                        "reqs": result(REQS, 9.0)}, True)
    assert doc["status"] == "ok"  # no data is not degraded
    assert doc["no_data"] == ["resp"]  # once, although two keys read it
    assert doc["metrics"]["providers"]["avg_response_time_ms"] is None
    assert doc["provenance"]["providers"]["avg_response_time_ms"]["no_data"] is True
    assert "no_data" not in doc["provenance"]["providers"]["total"]


def test_a_failed_figure_is_an_error_not_no_data_and_stale_empty_is_no_data() -> None:
    failed = QueryResult(AVAIL, Lookup.FAILED, error=UpstreamFailure("timeout", "t"))
    stale_empty = QueryResult(RESP, Lookup.STALE, (), 1.7e9, 60.0, error=UpstreamFailure("timeout", "t"))
    doc = json_render.summary(CATALOG, {"avail": failed, "resp": stale_empty,
                                        "reqs": result(REQS, lookup=Lookup.HIT)}, False)
    assert doc["status"] == "degraded"
    assert doc["no_data"] == ["resp", "reqs"]
    assert [e["query"] for e in doc["errors"]] == ["avail", "resp"]


def test_category_json_lists_figures_without_data() -> None:
    doc = json_render.category(CATALOG, "providers", [result(AVAIL), result(RESP, 0.5), result(REQS)], {}, True)
    assert doc["status"] == "ok"
    assert doc["no_data"] == ["avail", "reqs"]
    assert [f.get("no_data", False) for f in doc["figures"]] == [True, False, True]


def test_text_says_which_figures_have_data() -> None:
    failed = QueryResult(REQS, Lookup.FAILED, error=UpstreamFailure("unreachable", "u"))
    body, _ = render_families(text_render.families("gw", [result(AVAIL), result(RESP, 0.5), failed], True), None)
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    has = {s.labels["query"]: s.value for s in fams["gw_query_has_data"].samples}
    assert has == {"avail": 0.0, "resp": 1.0, "reqs": 0.0}
    ok = {s.labels["query"]: s.value for s in fams["gw_query_success"].samples}
    assert ok == {"avail": 1.0, "resp": 1.0, "reqs": 0.0}  # success 1 and has_data 0: no data upstream
    assert "gw_avail" not in fams and "gw_resp" in fams


# --- through the routes (respx stands in for Prometheus) ----------------------------------------------

EMPTY = frozenset({"provider_response_time_avg_seconds", "active_trials", "provider_availability"})


@pytest.fixture()
def client() -> Any:
    with respx.mock(assert_all_called=False) as mock:
        mock.post(QUERY_URL).mock(side_effect=FakeProm(missing=EMPTY))
        with TestClient(create_app(GatewaySettings(prometheus_url=PROM))) as c:
            yield c


def test_routes_list_no_data(client: TestClient) -> None:
    summary = client.get(f"{BASE}/summary").json()
    assert summary["status"] == "ok"
    assert set(summary["no_data"]) == {"provider_response_time_avg_seconds", "active_trials"}
    providers = client.get(f"{BASE}/providers?format=json").json()
    assert set(providers["no_data"]) == {"provider_response_time_avg_seconds", "provider_availability"}
    text = client.get(f"{BASE}/providers").text
    assert 'gateway_query_has_data{query="provider_availability"} 0.0' in text
    assert 'gateway_query_has_data{query="providers"} 1.0' in text
    assert 'gateway_query_success{query="provider_availability"} 1.0' in text
