"""The catalog's figures against a real Prometheus scraping backends with the real names, types and labels.

Each figure must equal both what the synthetic backend's declarations imply (rates
are exact, histogram quantiles interpolate the declared bucket rates) and what
Prometheus itself answers for the same expression.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.gateway.catalog.loader import load_catalog
from app.gateway.settings import GatewaySettings
from app.main import create_app
from tests.integration.conftest import PromStack
from tests.support.procs import promtool_check_metrics
from tests.support.synthetic_backend import SERIES, declared_quantile, declared_rate

pytestmark = pytest.mark.integration
CATALOG = load_catalog()
BASE = "/prometheus/metrics"
Series = dict[tuple[tuple[str, str], ...], float]


def gateway(stack: PromStack) -> TestClient:
    return TestClient(create_app(GatewaySettings(prometheus_url=stack.prometheus.url, cache_ttl_seconds=0.5)))


@pytest.fixture(scope="module")
def client(prom_stack: PromStack) -> Iterator[TestClient]:
    with gateway(prom_stack) as c:
        yield c


def figure(client: TestClient, category: str, qid: str) -> Series:
    doc = client.get(f"{BASE}/{category}?format=json").json()
    fig = next(f for f in doc["figures"] if f["id"] == qid)
    assert fig["state"] in ("fresh", "cached"), fig
    return {tuple(sorted(s["labels"].items())): s["value"] for s in fig["series"]}


def prometheus(stack: PromStack, qid: str) -> Series:
    q = CATALOG.queries[qid]
    out: Series = {}
    for s in stack.query(q.expr):
        metric: dict[str, str] = s["metric"]  # type: ignore[assignment]
        value: list[Any] = s["value"]  # type: ignore[assignment]
        out[tuple(sorted((k, v) for k, v in metric.items() if k in q.labels))] = float(value[1])
    return out


def by(label: str, values: dict[tuple[str, ...], float]) -> Series:
    return {((label, k[0]),): v for k, v in values.items()}


def gauges(name: str, label: str) -> Series:
    return {((label, dict(s.labels)[label]),): s.value for s in SERIES if s.name == name}


EXPECTED: dict[str, tuple[str, Series]] = {
    "provider_time_to_first_chunk_p95_seconds":
        ("providers", by("provider", declared_quantile(0.95, "time_to_first_chunk_seconds", ("provider",)))),
    "provider_ttfb_p95_seconds":
        ("providers", by("provider", declared_quantile(0.95, "backend_ttfb_seconds", ("provider",)))),
    "provider_streaming_duration_p95_seconds":
        ("performance", by("provider", declared_quantile(0.95, "streaming_duration_seconds", ("provider",)))),
    "providers_circuit_open": ("providers", {(): 1.0}),  # anthropic
    "provider_circuit_breaker_open":
        ("providers", {(("provider", "openai"),): 0.0, (("provider", "anthropic"),): 1.0,
                       (("provider", "google"),): 0.0}),
    "provider_cost_usd_per_hour":
        ("business", {k: v * 3600 for k, v in
                      by("provider", declared_rate("gatewayz_api_cost_usd_total", ("provider",))).items()}),
    "stream_chunks_dropped_per_second":
        ("performance", by("provider", declared_rate("stream_chunks_dropped_total", ("provider",)))),
    "backend_redis_up": ("system", {(): 1.0}),
    "backend_queue_size": ("system", gauges("queue_size", "queue_name")),
    "backend_event_loop_lag_seconds": ("system", {(): 0.004}),
    "provider_response_time_seconds":
        ("providers", {(("provider", p),): v for p, v in
                       (("openai", 0.2), ("anthropic", 0.4), ("google", 0.6), ("mistral", 0.8))}),
}


@pytest.mark.parametrize("qid", list(EXPECTED))
def test_figure_equals_declarations_and_prometheus(client: TestClient, prom_stack: PromStack, qid: str) -> None:
    category, expected = EXPECTED[qid]
    got = figure(client, category, qid)
    assert set(got) == set(expected), (qid, got)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-3, abs=1e-9), (qid, key, got[key], value)
    own = prometheus(prom_stack, qid)
    assert set(own) == set(got)
    for key, value in own.items():
        assert got[key] == pytest.approx(value, rel=1e-3, abs=1e-9), (qid, key)


def test_operator_figures_in_text_with_unit_and_help(client: TestClient) -> None:
    resp = client.get(f"{BASE}/providers")
    assert promtool_check_metrics(resp.content).returncode == 0
    fams = {f.name: f for f in text_string_to_metric_families(resp.text)}
    fam = fams["gateway_provider_cost_usd_per_hour"]
    assert "Unit: USD per hour." in fam.documentation
    assert {s.labels["provider"] for s in fam.samples} == {"openai", "anthropic"}


def test_mean_of_provider_means_not_the_pooled_mean(client: TestClient, prom_stack: PromStack) -> None:
    summary = client.get(f"{BASE}/summary").json()
    avg = summary["metrics"]["providers"]["avg_response_time_ms"]
    assert avg == pytest.approx(500.0, rel=1e-3)
    pooled = prom_stack.query("sum(rate(provider_response_time_seconds_sum[5m])) / "
                              "sum(rate(provider_response_time_seconds_count[5m]))")
    assert float(pooled[0]["value"][1]) * 1000 == pytest.approx(400.0, rel=1e-3)  # type: ignore[index]
    assert summary["no_data"] == []


def test_a_backend_exporting_the_gauge_gives_the_same_figures(legacy_gauge_stack: PromStack) -> None:
    """Older backends export provider_response_time_seconds as a gauge: same catalog, no configuration."""
    with gateway(legacy_gauge_stack) as c:
        summary = c.get(f"{BASE}/summary").json()
        per_provider = figure(c, "providers", "provider_response_time_seconds")
    assert summary["metrics"]["providers"]["avg_response_time_ms"] == pytest.approx(500.0)
    assert "provider_response_time_avg_seconds" not in summary["no_data"]
    assert per_provider == pytest.approx(EXPECTED["provider_response_time_seconds"][1])


PROVIDER_FIGURES = {"providers", "providers_healthy", "providers_degraded", "providers_unavailable",
                    "provider_error_ratio_avg", "provider_response_time_avg_seconds"}


def test_figures_without_series_are_listed_not_hidden(no_provider_stack: PromStack) -> None:
    """The real backend records no provider families: the figures say so, and nothing else changes."""
    with gateway(no_provider_stack) as c:
        summary = c.get(f"{BASE}/summary").json()
        providers = c.get(f"{BASE}/providers?format=json").json()
        text = c.get(f"{BASE}/providers")
    assert summary["status"] == "ok"  # no data is not degraded
    assert set(summary["no_data"]) == PROVIDER_FIGURES
    assert all(v is None for v in summary["metrics"]["providers"].values())
    assert summary["metrics"]["http"]["in_progress"] == 9.0
    assert set(providers["no_data"]) == PROVIDER_FIGURES | {"provider_availability", "provider_error_ratio",
                                                            "provider_response_time_seconds"}
    assert promtool_check_metrics(text.content).returncode == 0
    has = {s.labels["query"]: s.value for f in text_string_to_metric_families(text.text)
           if f.name == "gateway_query_has_data" for s in f.samples}
    assert {q for q, v in has.items() if v == 0.0} == set(providers["no_data"])
    assert has["provider_cost_usd_per_hour"] == 1.0
