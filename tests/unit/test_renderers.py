"""JSON, Prometheus text and markdown renderers, from QueryResult values (no HTTP)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_families
from prometheus_client.parser import text_string_to_metric_families

from app.common.exposition import OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE, render_families, wants_json
from app.gateway.catalog.loader import build_catalog
from app.gateway.catalog.model import CatalogQuery
from app.gateway.render import docs as docs_render
from app.gateway.render import json as json_render
from app.gateway.render import text as text_render
from app.gateway.result import Lookup, QueryResult, Sample, UpstreamFailure, overall_status

CATALOG = build_catalog({
    "prefix": "gw",
    "categories": {"providers": ["avail", "reqs", "lat"]},
    "summary": {"http": {"total_requests": "reqs",
                         "avg_latency_ms": {"query": "lat", "scale": 1000, "unit": "milliseconds"}},
                "providers": {"avg": "avail"}},
    "queries": [
        {"id": "avail", "name": "provider_availability", "expr": "max by (provider) (a)", "help": "Avail | ratio.",
         "unit": "ratio", "labels": ["provider"]},
        {"id": "reqs", "name": "requests", "type": "counter", "expr": "sum(r)", "help": "Requests.",
         "unit": "requests"},
        {"id": "lat", "name": "latency_seconds", "expr": "avg(l)", "help": "Latency.", "unit": "seconds"},
    ],
}, "test.toml")
AVAIL, REQS, LAT = (CATALOG.queries[i] for i in ("avail", "reqs", "lat"))


def fresh(q: CatalogQuery, *samples: tuple[dict[str, str], float], state: Lookup = Lookup.MISS,
          age: float = 0.5, **kw: Any) -> QueryResult:
    return QueryResult(q, state, tuple(Sample(tuple(lbl.items()), v) for lbl, v in samples),
                       fetched_at=1.7e9, age_seconds=age, **kw)


def failed(q: CatalogQuery, etype: str = "unreachable") -> QueryResult:
    return QueryResult(q, Lookup.FAILED, error=UpstreamFailure(etype, f"{etype} happened"))


def strict(doc: dict[str, Any]) -> Any:
    def refuse(const: str) -> None:
        raise AssertionError(const)
    return json.loads(json_render.dumps(doc), parse_constant=refuse)


def text_families(results: list[QueryResult], up: bool | None = True) -> dict[str, Any]:
    body, ctype = render_families(text_render.families("gw", results, up), None)
    assert ctype == TEXT_CONTENT_TYPE
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


# --- JSON ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "flag"), [(math.nan, "NaN"), (math.inf, "+Inf"), (-math.inf, "-Inf")])
def test_non_finite_becomes_null_with_a_flag(value: float, flag: str) -> None:
    r = fresh(AVAIL, ({"provider": "a"}, value), ({"provider": "b"}, 0.5))
    doc = strict(json_render.category(CATALOG, "providers", [r], {}, True))
    series = doc["figures"][0]["series"]
    assert series == [{"labels": {"provider": "a"}, "value": None, "non_finite": flag},
                      {"labels": {"provider": "b"}, "value": 0.5}]
    summary = strict(json_render.summary(CATALOG, {"avail": r, "reqs": fresh(REQS, ({}, 1.0)),
                                                   "lat": fresh(LAT, ({}, 0.25))}, True))
    assert summary["metrics"]["providers"]["avg"] is None
    assert summary["provenance"]["providers"]["avg"]["non_finite"] == flag
    assert summary["metrics"]["http"]["avg_latency_ms"] == 250.0


def test_dumps_refuses_raw_nan() -> None:
    with pytest.raises(ValueError):
        json_render.dumps({"x": math.nan})


def test_summary_sums_series_scales_and_reports_provenance() -> None:
    results = {
        "reqs": fresh(REQS, ({}, 40.0), ({}, 2.0), state=Lookup.HIT, age=3.25),
        "lat": QueryResult(LAT, Lookup.STALE, (Sample((), 0.125),), 1.7e9, 42.0,
                           error=UpstreamFailure("timeout", "no answer within 3.00s")),
        "avail": failed(AVAIL),
    }
    doc = strict(json_render.summary(CATALOG, results, False))
    assert doc["status"] == "degraded"
    assert doc["metrics"] == {"http": {"total_requests": 42.0, "avg_latency_ms": 125.0},
                              "providers": {"avg": None}}
    p = doc["provenance"]
    assert p["http"]["total_requests"] == {"state": "cached", "lookup": "hit", "age_seconds": 3.25, "query": "reqs",
                                           "unit": "requests"}
    assert p["http"]["avg_latency_ms"] == {
        "state": "stale", "lookup": "stale", "age_seconds": 42.0, "query": "lat", "unit": "milliseconds",
        "error": {"error_type": "timeout", "message": "no answer within 3.00s"}}
    assert p["providers"]["avg"]["state"] == "failed" and "age_seconds" not in p["providers"]["avg"]
    assert doc["errors"] == [
        {"query": "lat", "state": "stale", "error_type": "timeout", "message": "no answer within 3.00s"},
        {"query": "avail", "state": "failed", "error_type": "unreachable", "message": "unreachable happened"},
    ]
    assert doc["upstream"] == {"up": False}


def test_fresh_without_data_is_flagged_no_data() -> None:
    doc = strict(json_render.category(CATALOG, "providers", [fresh(AVAIL), fresh(REQS, ({}, 1.0))], {}, True))
    assert doc["figures"][0]["no_data"] is True and doc["figures"][0]["series"] == []
    assert "no_data" not in doc["figures"][1]
    assert doc["figures"][1]["name"] == "gw_requests_total" and doc["figures"][1]["type"] == "counter"


def test_warnings_are_reported() -> None:
    r = fresh(REQS, ({}, 1.0), warnings=("partial response",))
    doc = strict(json_render.category(CATALOG, "providers", [r], {"provider": ["x"]}, True))
    assert doc["figures"][0]["warnings"] == ["partial response"]
    assert doc["filters"] == {"provider": ["x"]}


@pytest.mark.parametrize(("states", "expected"), [
    ([], "ok"),
    ([Lookup.MISS, Lookup.HIT], "ok"),
    ([Lookup.MISS, Lookup.STALE], "degraded"),
    ([Lookup.MISS, Lookup.FAILED], "degraded"),
    ([Lookup.STALE, Lookup.STALE], "degraded"),
    ([Lookup.FAILED, Lookup.STALE], "degraded"),
    ([Lookup.FAILED, Lookup.FAILED], "unavailable"),
])
def test_overall_status(states: list[Lookup], expected: str) -> None:
    assert overall_status([QueryResult(REQS, s) for s in states]) == expected


def test_total_is_none_without_samples_and_a_sum_otherwise() -> None:
    assert QueryResult(REQS, Lookup.MISS).total() is None
    assert fresh(REQS, ({}, 0.1), ({}, 0.2), ({}, 0.3)).total() == 0.6


# --- Prometheus text -----------------------------------------------------------------------------------

def test_text_keeps_nan_and_inf() -> None:
    fams = text_families([fresh(AVAIL, ({"provider": "a"}, math.nan), ({"provider": "b"}, math.inf),
                                ({"provider": "c"}, -math.inf))])
    values = {s.labels["provider"]: s.value for s in fams["gw_provider_availability"].samples}
    assert math.isnan(values["a"]) and values["b"] == math.inf and values["c"] == -math.inf


def test_counter_is_exported_with_total_and_gauge_without() -> None:
    body, _ = render_families(text_render.families("gw", [fresh(REQS, ({}, 7.0)), fresh(LAT, ({}, 0.5))], True),
                              None)
    text = body.decode()
    assert "# TYPE gw_requests_total counter\ngw_requests_total 7.0\n" in text
    assert "# TYPE gw_latency_seconds gauge\ngw_latency_seconds 0.5\n" in text
    assert "# HELP gw_requests_total Requests. Unit: requests. Query id: reqs.\n" in text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["gw_requests"].type == "counter"
    assert [s.name for s in fams["gw_requests"].samples] == ["gw_requests_total"]


@pytest.mark.parametrize("value", ['say "hi"', "line1\nline2", "back\\slash", 'all"\\\n"', "ünïcödé", "{a=\"b\"}"])
def test_label_values_are_escaped_and_parse_back(value: str) -> None:
    r = fresh(AVAIL, ({"provider": value}, 1.0), ({"provider": "plain"}, 2.0))
    fams = text_families([r])
    got = {s.labels["provider"]: s.value for s in fams["gw_provider_availability"].samples}
    assert got == {value: 1.0, "plain": 2.0}
    body, _ = render_families(text_render.families("gw", [r], True), "application/openmetrics-text")
    om = {f.name: f for f in om_families(body.decode())}
    assert {s.labels["provider"] for s in om["gw_provider_availability"].samples} == {value, "plain"}


def test_success_and_age_gauges_and_upstream_up() -> None:
    results = [
        fresh(REQS, ({}, 1.0), age=0.25),
        QueryResult(LAT, Lookup.STALE, (Sample((), 0.3),), 1.7e9, 120.0, error=UpstreamFailure("timeout", "t")),
        failed(AVAIL),
        fresh(REQS, ({}, 1.0), age=0.25),  # the same query twice (shared by categories): exported once
    ]
    fams = text_families(results, up=False)
    assert fams["gw_upstream_up"].samples[0].value == 0.0
    success = [(s.labels["query"], s.value) for s in fams["gw_query_success"].samples]
    assert success == [("reqs", 1.0), ("lat", 0.0), ("avail", 0.0)]
    ages = {s.labels["query"]: s.value for s in fams["gw_query_age_seconds"].samples}
    assert ages == {"reqs": 0.25, "lat": 120.0}
    assert [s.value for s in fams["gw_requests"].samples] == [1.0]
    assert fams["gw_latency_seconds"].samples[0].value == 0.3  # the stale value is still served
    assert "gw_provider_availability" not in fams  # nothing known: no made-up series


@pytest.mark.parametrize(("up", "expected"), [(True, 1.0), (False, 0.0), (None, 0.0)])
def test_upstream_up_values(up: bool | None, expected: float) -> None:
    assert text_families([], up=up)["gw_upstream_up"].samples[0].value == expected


def test_openmetrics_when_asked() -> None:
    body, ctype = render_families(text_render.families("gw", [fresh(REQS, ({}, 3.0))], True),
                                  "application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
    assert ctype.startswith("application/openmetrics-text")
    assert OPENMETRICS_CONTENT_TYPE.startswith("application/openmetrics-text; version=1.0.0")
    text = body.decode()
    assert text.endswith("# EOF\n")
    assert "# TYPE gw_requests counter\n" in text and "gw_requests_total 3.0\n" in text
    assert {f.name for f in om_families(text)} >= {"gw_requests", "gw_upstream_up"}


@pytest.mark.parametrize(("accept", "fmt", "expected"), [
    (None, None, False),
    ("application/json", None, True),
    ("Application/JSON; charset=utf-8", None, True),
    ("text/plain, application/json", None, False),
    ("application/json", "text", False),
    (None, "json", True),
    ("text/plain", "json", True),
    ("*/*", None, False),
])
def test_wants_json(accept: str | None, fmt: str | None, expected: bool) -> None:
    assert wants_json(accept, fmt) is expected


# --- markdown --------------------------------------------------------------------------------------------

def test_docs_lists_every_query_with_unit_meaning_and_route() -> None:
    md = docs_render.markdown(CATALOG, "/m")
    assert "`test.toml`" in md
    assert "| `http.total_requests` | requests | `reqs` | x1 |" in md
    assert "| `http.avg_latency_ms` | milliseconds | `lat` | x1000 |" in md
    assert "## providers (`/m/providers`)" in md
    assert "Accepts `provider=` and `model=` filters" in md
    row = next(line for line in md.splitlines() if line.startswith("| `gw_provider_availability`"))
    assert "Avail \\| ratio." in row  # a pipe in the help text does not break the table
    assert "| gauge | ratio | provider |" in row and "`/m/providers`" in row
    reqs = next(line for line in md.splitlines() if line.startswith("| `gw_requests_total`"))
    assert "| counter | requests | — |" in reqs
    assert "`/m/providers`" in reqs and "`/m/summary`" in reqs
    assert "## system" not in md  # empty categories are not listed
