"""The query catalog: the default's contract, start-up validation, a user's own file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.gateway.catalog.loader import CatalogError, build_catalog, load_catalog
from app.gateway.catalog.model import CATEGORIES
from app.gateway.settings import GatewaySettings
from app.main import create_app

PROM = "http://prom.test:9090"

SUMMARY_CONTRACT = {
    "http": {"total_requests", "request_rate_per_minute", "error_rate", "avg_latency_ms", "in_progress"},
    "models": {"total_inference_requests", "tokens_used_total", "credits_used_total", "avg_inference_latency_ms"},
    "providers": {"total_providers", "healthy_providers", "degraded_providers", "unavailable_providers",
                  "avg_error_rate", "avg_response_time_ms"},
    "database": {"total_queries", "avg_query_latency_ms", "cache_hit_rate"},
    "business": {"active_api_keys", "active_subscriptions", "active_trials", "total_tokens_used",
                 "total_credits_used"},
}


def q(qid: str, expr: str = "sum(up)", **extra: Any) -> dict[str, Any]:
    return {"id": qid, "expr": expr, "help": f"help of {qid}", "unit": "things", **extra}


def test_default_catalog_loads_with_the_summary_contract() -> None:
    cat = load_catalog()
    assert cat.source == "default" and cat.prefix == "gateway"
    assert len(cat.summary) == 23
    got: dict[str, set[str]] = {}
    for fig in cat.summary:
        got.setdefault(fig.section, set()).add(fig.key)
    assert got == SUMMARY_CONTRACT
    for category in CATEGORIES:
        assert cat.categories[category], category
        for query in cat.category_queries(category):
            assert query.id in cat.queries
    scales = {(f.section, f.key): (f.scale, f.unit) for f in cat.summary}
    assert scales[("http", "request_rate_per_minute")][0] == 60
    assert scales[("http", "error_rate")] == (100, "percent")
    assert scales[("http", "avg_latency_ms")] == (1000, "milliseconds")
    assert scales[("http", "total_requests")] == (1.0, None)


def test_default_catalog_kinds_and_batchability() -> None:
    cat = load_catalog()
    assert cat.queries["http_requests"].kind == "counter"
    assert cat.queries["provider_availability"].labels == ("provider",)
    assert all(qq.batchable for qq in cat.queries.values())  # all instant vectors
    ids = [qq.id for qq in cat.all_queries()]
    assert len(ids) == len(set(ids))
    assert len(cat.summary_queries()) == len({f.query_id for f in cat.summary})


def test_non_parsing_query_in_a_file_names_the_query(tmp_path: Path) -> None:
    path = tmp_path / "cat.toml"
    path.write_text(
        '[[queries]]\nid = "fine"\nhelp = "h"\nunit = "u"\nexpr = "sum(up)"\n'
        '[[queries]]\nid = "broken_one"\nhelp = "h"\nunit = "u"\nexpr = "sum(rate(x[5m])"\n'
    )
    with pytest.raises(CatalogError, match=r"'broken_one' does not parse") as info:
        load_catalog(path)
    assert str(path) in str(info.value)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[queries]\n")
    with pytest.raises(CatalogError, match="not valid TOML"):
        load_catalog(bad)
    with pytest.raises(CatalogError, match="cannot read catalog"):
        load_catalog(tmp_path / "missing.toml")


@pytest.mark.parametrize(("data", "message"), [
    ({"queries": [q("a")], "categories": {"system": ["a", "nope"]}}, r"category 'system' names unknown query 'nope'"),
    ({"queries": [q("a")], "summary": {"http": {"total_requests": "ghost"}}},
     r"summary http.total_requests names unknown query 'ghost'"),
    ({"queries": [q("a")], "summary": {"http": {"x": {"query": "ghost", "scale": 2}}}}, r"unknown query 'ghost'"),
    ({"queries": [q("a"), q("a", name="other")]}, r"query id 'a' is defined twice"),
    ({"queries": [q("a", name="same"), q("b", name="same")]}, r"'a' and 'b' share name 'same'"),
    ({"queries": [q("a", labels=["job"])]}, r"query 'a' keeps a reserved or invalid label 'job'"),
    ({"queries": [q("a", labels=["instance"])]}, r"reserved or invalid label 'instance'"),
    ({"queries": [q("a", labels=["gateway_query"])]}, r"reserved or invalid label 'gateway_query'"),
    ({"queries": [q("a", labels=["__name__"])]}, r"reserved or invalid label '__name__'"),
    ({"queries": [q("a", expr="up[5m]")]}, r"query 'a' evaluates to a matrix"),
    ({"queries": [q("a", expr="rate(x[1m])[5m:1m]")]}, r"query 'a' evaluates to a matrix"),
    ({"queries": [q("a", expr='"text"')]}, r"query 'a' evaluates to a string"),
    ({"queries": [q("a", type="histogram")]}, r"type 'histogram'"),
    ({"queries": [q("a", name="a_total")]}, r"invalid name 'a_total'"),
    ({"queries": [q("bad-id")]}, r"missing or invalid id"),
    ({"queries": [q("a", help="  ")]}, r"query 'a' needs a non-empty 'help'"),
    ({"queries": [q("a")], "categories": {"bogus": ["a"]}}, r"unknown category 'bogus'"),
    ({"queries": []}, r"defines no queries"),
    ({"prefix": "bad-prefix", "queries": [q("a")]}, r"invalid prefix"),
])
def test_invalid_catalogs_are_rejected(data: dict[str, Any], message: str) -> None:
    with pytest.raises(CatalogError, match=message):
        build_catalog(data, "mine.toml")


def test_scalar_query_is_accepted_but_not_batchable() -> None:
    cat = build_catalog({"queries": [q("s", expr="scalar(sum(up))"), q("v")]})
    assert cat.queries["s"].batchable is False
    assert cat.queries["v"].batchable is True
    assert cat.categories == {c: () for c in CATEGORIES}


def test_query_the_printer_cannot_handle_names_the_query(monkeypatch: pytest.MonkeyPatch) -> None:
    # The printer now prints every tree the parser makes (negative offsets included),
    # so a printer failure is simulated: the catalog must still name the query.
    from app.gateway.catalog import loader
    from app.gateway.promql.syntax import PromQLError

    def refuse(expr: str) -> None:
        raise PromQLError("cannot print the query back: simulated")

    monkeypatch.setattr(loader, "check_printable", refuse)
    with pytest.raises(CatalogError, match="'neg_offset'"):
        build_catalog({"queries": [q("neg_offset", expr="sum(up offset -5m)")]})
    monkeypatch.undo()
    assert build_catalog({"queries": [q("neg_offset", expr="sum(up offset -5m)")]}).queries["neg_offset"]


def test_create_app_with_a_broken_catalog_raises_at_construction(tmp_path: Path) -> None:
    path = tmp_path / "cat.toml"
    path.write_text('[[queries]]\nid = "kaput"\nhelp = "h"\nunit = "u"\nexpr = "sum(("\n')
    with pytest.raises(CatalogError, match="'kaput'"):
        create_app(GatewaySettings(prometheus_url=PROM, catalog_path=path))


CUSTOM = """
prefix = "acme"

[categories]
system = ["widgets", "widget_rate"]

[summary.http]
total_requests = { query = "widgets", scale = 2 }

[[queries]]
id = "widgets"
type = "counter"
unit = "widgets"
help = "Widgets made."
expr = 'sum(widgets_total)'

[[queries]]
id = "widget_rate"
name = "widgets_per_second"
unit = "widgets per second"
labels = ["color"]
help = "Widget rate by color."
expr = 'sum by (color) (rate(widgets_total[5m]))'
"""


def vector(*series: tuple[dict[str, str], str]) -> dict[str, Any]:
    return {"status": "success", "data": {"resultType": "vector",
                                          "result": [{"metric": m, "value": [1.7e9, v]} for m, v in series]}}


def test_a_custom_catalog_file_is_served(tmp_path: Path) -> None:
    path = tmp_path / "acme.toml"
    path.write_text(CUSTOM)
    settings = GatewaySettings(prometheus_url=PROM, catalog_path=path)
    with respx.mock(assert_all_called=False) as mock:
        route = mock.post(f"{PROM}/api/v1/query").respond(json=vector(
            ({"gateway_query": "0"}, "21"),
            ({"gateway_query": "1", "color": "red"}, "1.5"),
            ({"gateway_query": "1", "color": "blue"}, "0.5"),
        ))
        with TestClient(create_app(settings)) as client:
            text = client.get("/prometheus/metrics/system").text
            summary = client.get("/prometheus/metrics/summary").json()
            docs = client.get("/prometheus/metrics/docs").text
    assert route.call_count >= 1
    sent = httpx.QueryParams(route.calls[0].request.content.decode())["query"]
    assert "widgets_total" in sent and "fastapi" not in sent
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["acme_widgets"].type == "counter"
    assert fams["acme_widgets"].samples[0].value == 21.0
    by_color = {s.labels["color"]: s.value for s in fams["acme_widgets_per_second"].samples}
    assert by_color == {"red": 1.5, "blue": 0.5}
    assert fams["acme_upstream_up"].samples[0].value == 1.0
    assert not any(name.startswith("gateway_") for name in fams)
    assert summary["metrics"] == {"http": {"total_requests": 42.0}}
    assert str(path) in docs and "acme_widgets_total" in docs
