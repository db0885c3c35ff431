"""The gateway against a real Prometheus scraping a synthetic backend with known rates."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.gateway.catalog.model import CATEGORIES
from app.gateway.settings import GatewaySettings
from app.main import create_app
from tests.integration.conftest import PromStack
from tests.support.procs import promtool_check_metrics, start_prometheus
from tests.support.synthetic_backend import EXPECTED_RATES, EXPECTED_TOTALS, scrape_config

pytestmark = pytest.mark.integration
TEXT_ROUTES = [*CATEGORIES, "all"]


@pytest.fixture()
def client(prom_stack: PromStack) -> Iterator[TestClient]:
    settings = GatewaySettings(prometheus_url=prom_stack.prometheus.url, cache_ttl_seconds=0.5)
    with TestClient(create_app(settings)) as c:
        yield c


def test_summary_numbers_equal_what_the_rates_imply(client: TestClient, prom_stack: PromStack) -> None:
    before = time.time()
    body = client.get("/prometheus/metrics/summary").json()
    after = time.time()
    assert body["status"] == "ok", body["errors"]
    m = body["metrics"]
    for (section, key), expected in EXPECTED_RATES.items():
        assert m[section][key] == pytest.approx(expected, rel=0.01), (section, key)
    # Counter totals: the sum over all series at the last scrape (at most ~2 s old).
    for (section, key), name in EXPECTED_TOTALS.items():
        hi = prom_stack.backend.total(name, after)
        lo = prom_stack.backend.total(name, before - 3)
        assert lo <= m[section][key] <= hi, (section, key, lo, m[section][key], hi)
    for section in m.values():
        for value in section.values():
            assert isinstance(value, float | int) and not isinstance(value, bool)
    assert body["provenance"]["http"]["error_rate"]["state"] in ("fresh", "cached")
    assert body["provenance"]["http"]["error_rate"]["unit"] == "percent"


@pytest.mark.parametrize("route", TEXT_ROUTES)
def test_every_text_route_passes_promtool(client: TestClient, route: str) -> None:
    resp = client.get(f"/prometheus/metrics/{route}")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    check = promtool_check_metrics(resp.content)
    assert check.returncode == 0, check.stdout + check.stderr
    families = {f.name: f for f in text_string_to_metric_families(resp.text)}
    assert families["gateway_upstream_up"].samples[0].value == 1.0
    # Nothing from Prometheus' own target labels leaks into derived figures.
    for fam in families.values():
        for sample in fam.samples:
            assert "job" not in sample.labels and "instance" not in sample.labels


def test_openmetrics_when_asked(client: TestClient) -> None:
    resp = client.get("/prometheus/metrics/providers",
                      headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert resp.headers["content-type"].startswith("application/openmetrics-text")
    assert resp.text.rstrip().endswith("# EOF")


def test_all_has_no_duplicate_series_or_families(client: TestClient) -> None:
    text = client.get("/prometheus/metrics/all").text
    series = [line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")]
    assert len(series) == len(set(series))
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types))
    assert "gateway_tokens_used_total" in text and "gateway_provider_availability{" in text


def test_provider_breakdown_and_filters(client: TestClient) -> None:
    doc = client.get("/prometheus/metrics/providers?format=json").json()
    avail = next(f for f in doc["figures"] if f["id"] == "provider_availability")
    by_provider = {s["labels"]["provider"]: s["value"] for s in avail["series"]}
    assert by_provider == {"openai": 1.0, "anthropic": 0.5, "google": 0.0, "mistral": 1.0}

    doc = client.get("/prometheus/metrics/providers?format=json&provider=anthropic").json()
    avail = next(f for f in doc["figures"] if f["id"] == "provider_availability")
    assert [s["labels"]["provider"] for s in avail["series"]] == ["anthropic"]
    assert next(f for f in doc["figures"] if f["id"] == "providers")["series"][0]["value"] == 1.0

    doc = client.get("/prometheus/metrics/models?format=json&model=gpt-4&model=claude-3").json()
    rps = next(f for f in doc["figures"] if f["id"] == "model_inference_requests_per_second")
    got = {s["labels"]["model"]: s["value"] for s in rps["series"]}
    assert got == pytest.approx({"gpt-4": 4.0, "claude-3": 1.0}, rel=0.01)


def test_p95_is_exported_under_its_own_name(client: TestClient) -> None:
    text = client.get("/prometheus/metrics/performance").text
    assert "gateway_http_request_duration_p95_seconds " in text
    assert "fastapi_requests_duration_seconds" not in text.replace("# HELP", "")


def test_prometheus_down_serves_stale_then_unavailable(prom_stack: PromStack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Stop a real Prometheus mid-life: last good values, marked stale, within the deadline."""
    prom = start_prometheus(tmp_path / "p", scrape_config(f"127.0.0.1:{prom_stack.backend.port}"))
    settings = GatewaySettings(prometheus_url=prom.url, cache_ttl_seconds=0.2, request_deadline_seconds=1.0,
                        breaker_failure_threshold=2, breaker_reset_seconds=30)
    try:
        with TestClient(create_app(settings)) as c:
            httpx_ok = c.get("/prometheus/metrics/summary").json()
            assert httpx_ok["status"] in ("ok", "degraded")
            good = httpx_ok["metrics"]["providers"]["total_providers"]
            prom.stop()
            time.sleep(0.3)  # let the TTL expire
            for _ in range(3):
                t = time.perf_counter()
                body = c.get("/prometheus/metrics/summary").json()
                assert time.perf_counter() - t < 1.5
                assert body["status"] == "degraded"
                p = body["provenance"]["providers"]["total_providers"]
                assert p["state"] == "stale" and p["age_seconds"] > 0
                assert p["error"]["error_type"] in ("unreachable", "circuit_open")
                assert body["metrics"]["providers"]["total_providers"] == good
            text = c.get("/prometheus/metrics/providers").text
            assert "gateway_upstream_up 0.0" in text
            assert promtool_check_metrics(text.encode()).returncode == 0
        # A fresh gateway with nothing cached: unavailable, nulls, not an empty answer.
        with TestClient(create_app(settings)) as c:
            body = c.get("/prometheus/metrics/summary").json()
            assert body["status"] == "unavailable"
            assert body["metrics"]["http"]["total_requests"] is None
            assert body["errors"] and body["errors"][0]["error_type"] == "unreachable"
            text = c.get("/prometheus/metrics/system").text
            assert "gateway_upstream_up 0.0" in text
            assert 'gateway_query_success{query="http_requests"} 0.0' in text
    finally:
        prom.stop()


def test_path_prefixed_upstream_url(prom_stack: PromStack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """PROMETHEUS_URL with a path (Thanos/Mimir style): served under --web.route-prefix."""
    from tests.support.procs import PROMETHEUS_BIN, _spawn, free_port, wait_until

    port = free_port()
    (tmp_path / "p.yml").write_text("global: {}\n")
    proc = _spawn([PROMETHEUS_BIN, f"--config.file={tmp_path / 'p.yml'}", f"--storage.tsdb.path={tmp_path / 'd'}",
                   f"--web.listen-address=127.0.0.1:{port}", "--web.route-prefix=/prom/api-root"],
                  tmp_path, "prefixed", port=port)
    try:
        base = f"http://127.0.0.1:{port}/prom/api-root"
        wait_until(lambda: httpx.get(f"{base}/-/ready", timeout=1).status_code == 200, 30, what="prefixed prom")
        with TestClient(create_app(GatewaySettings(prometheus_url=base))) as c:
            body = c.get("/prometheus/metrics/summary").json()
            assert body["status"] == "ok"  # every figure answered (no data: nothing scraped)
            assert body["upstream"]["up"] is True
    finally:
        proc.stop()
