"""Real Prometheus API clients pointed at the gateway see what they see pointed at Prometheus.

The gateway runs as a real server (uvicorn, `app.main:create_app`) in front of the
session's real Prometheus; `promtool query ...` (the Debian prometheus package) and
the PyPI `prometheus-api-client` are run against both, and their outputs compared.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from prometheus_api_client import PrometheusApiClientException, PrometheusConnect

from app.gateway.catalog.loader import load_catalog
from app.gateway.catalog.names import FigureNames
from tests.integration.conftest import PromStack
from tests.support.procs import PROMTOOL_BIN, Proc, start_uvicorn

pytestmark = pytest.mark.integration
TOKEN = "client-test-token"


def gateway(prom_stack: PromStack, name: str, **env: str) -> Iterator[Proc]:
    proc = start_uvicorn(prom_stack.workdir / name, "app.main:create_app", factory=True,
                         env={"PROMETHEUS_URL": prom_stack.prometheus.url, "REQUEST_DEADLINE_SECONDS": "10",
                              **env})
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def open_gw(prom_stack: PromStack) -> Iterator[Proc]:
    yield from gateway(prom_stack, "gw-open")


@pytest.fixture(scope="module")
def token_gw(prom_stack: PromStack) -> Iterator[Proc]:
    yield from gateway(prom_stack, "gw-token", API_TOKENS=TOKEN)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL_BIN, "query", *args], capture_output=True, text=True, timeout=30, check=False)


def same_promtool(gw_url: str, prom_url: str, command: str, *args: str, server_last: bool = False) -> str:
    """Run `promtool query <command>` against both; same exit status, same output."""
    def run(url: str) -> subprocess.CompletedProcess[str]:
        return promtool(command, *args, url) if server_last else promtool(command, url, *args)

    g, p = run(gw_url), run(prom_url)
    assert g.returncode == p.returncode, (g.stderr, p.stderr)
    assert g.stdout == p.stdout
    return g.stdout


def past(seconds: float = 20) -> int:
    return int(time.time() - seconds)


# --- promtool ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["", "/prometheus"])
@pytest.mark.parametrize("expr", [
    "sum by (provider) (rate(model_inference_requests_total[5m]))", "provider_availability",
    'histogram_quantile(0.5, sum by (le) (rate(fastapi_requests_duration_seconds_bucket[5m])))', "1+1",
])
def test_promtool_instant(open_gw: Proc, prom_stack: PromStack, base: str, expr: str) -> None:
    out = same_promtool(open_gw.url + base, prom_stack.prometheus.url, "instant", expr, f"--time={past()}")
    assert out.strip()


def test_promtool_instant_json_output(open_gw: Proc, prom_stack: PromStack) -> None:
    same_promtool(open_gw.url, prom_stack.prometheus.url, "instant", "-o", "json", "sum(tokens_used_total)",
                  f"--time={past()}")


def test_promtool_range(open_gw: Proc, prom_stack: PromStack) -> None:
    out = same_promtool(open_gw.url, prom_stack.prometheus.url, "range",
                        "sum by (token_type) (rate(tokens_used_total[1m]))",
                        f"--start={past(300)}", f"--end={past()}", "--step=15s")
    assert "token_type" in out


def test_promtool_series(open_gw: Proc, prom_stack: PromStack) -> None:
    out = same_promtool(open_gw.url, prom_stack.prometheus.url, "series",
                        "--match=provider_availability", '--match=credits_used_total{provider="openai"}',
                        f"--start={past(120)}", f"--end={past()}", server_last=True)
    assert out.count("\n") == 5


def test_promtool_label_values(open_gw: Proc, prom_stack: PromStack) -> None:
    out = same_promtool(open_gw.url, prom_stack.prometheus.url, "labels", "model")
    assert "gpt-4" in out


def test_promtool_metric_names_include_the_figures(open_gw: Proc, prom_stack: PromStack) -> None:
    g = promtool("labels", open_gw.url, "__name__")
    p = promtool("labels", prom_stack.prometheus.url, "__name__")
    assert g.returncode == p.returncode == 0
    names = FigureNames(load_catalog()).names()
    assert g.stdout.split() == sorted(set(p.stdout.split()) | set(names))


def test_promtool_figure_by_name(open_gw: Proc, prom_stack: PromStack) -> None:
    t = f"--time={past()}"
    g = promtool("instant", open_gw.url, 'gateway_provider_error_ratio{provider=~"openai|google"}', t)
    p = promtool("instant", prom_stack.prometheus.url,
                 'max by (provider) (provider_error_rate{provider=~"openai|google"})', t)
    assert g.returncode == p.returncode == 0
    assert g.stdout == p.stdout and "google" in g.stdout


def test_promtool_bad_query_fails_the_same_way(open_gw: Proc, prom_stack: PromStack) -> None:
    g = promtool("instant", open_gw.url, "sum(rate(x[5m])")
    p = promtool("instant", prom_stack.prometheus.url, "sum(rate(x[5m])")
    assert g.returncode == p.returncode != 0
    assert g.stderr == p.stderr and "bad_data" in g.stderr


# --- prometheus-api-client (PyPI) ----------------------------------------------------------------

@pytest.fixture(scope="module")
def clients(token_gw: Proc, prom_stack: PromStack) -> tuple[PrometheusConnect, PrometheusConnect]:
    gw = PrometheusConnect(url=token_gw.url, headers={"Authorization": f"Bearer {TOKEN}"}, disable_ssl=True)
    prom = PrometheusConnect(url=prom_stack.prometheus.url, disable_ssl=True)
    return gw, prom


def test_client_connects_with_a_token_and_not_without(clients: tuple[PrometheusConnect, PrometheusConnect],
                                                      token_gw: Proc) -> None:
    gw, _ = clients
    assert gw.custom_query("1+1", params={"time": "4"}) == [4, "2"]
    anonymous = PrometheusConnect(url=token_gw.url, disable_ssl=True)
    with pytest.raises(PrometheusApiClientException):
        anonymous.custom_query("1")


def test_client_custom_query(clients: tuple[PrometheusConnect, PrometheusConnect]) -> None:
    gw, prom = clients
    params = {"time": str(past())}
    for q in ["sum(rate(fastapi_requests_total[5m]))", 'credits_used_total{model="gpt-4"}', "provider_availability"]:
        assert gw.custom_query(q, params=params) == prom.custom_query(q, params=params)


def test_client_range_query(clients: tuple[PrometheusConnect, PrometheusConnect]) -> None:
    gw, prom = clients
    start, end = datetime.fromtimestamp(past(300), UTC), datetime.fromtimestamp(past(), UTC)
    q = "sum by (provider) (rate(model_inference_requests_total[1m]))"
    got = gw.custom_query_range(q, start_time=start, end_time=end, step="15")
    assert got == prom.custom_query_range(q, start_time=start, end_time=end, step="15")
    assert len(got) == 2


def test_client_labels_series_and_metadata(clients: tuple[PrometheusConnect, PrometheusConnect]) -> None:
    gw, prom = clients
    assert gw.get_label_names() == prom.get_label_names()
    assert gw.get_label_values("provider") == prom.get_label_values("provider")
    start, end = datetime.fromtimestamp(past(120), UTC), datetime.fromtimestamp(past(), UTC)
    params = {"match[]": "subscription_count"}
    assert gw.get_series(start, end, params=params) == prom.get_series(start, end, params=params)
    names = FigureNames(load_catalog()).names()
    assert gw.all_metrics() == sorted(set(prom.all_metrics()) | set(names))
    meta = gw.get_metric_metadata("gateway_provider_availability")
    assert meta and meta[0]["type"] == "gauge" and meta[0]["metric_name"] == "gateway_provider_availability"
    assert gw.get_metric_metadata("provider_availability") == prom.get_metric_metadata("provider_availability")


def test_client_figure_by_name(clients: tuple[PrometheusConnect, PrometheusConnect]) -> None:
    gw, prom = clients
    params = {"time": str(past())}
    got = gw.custom_query("gateway_subscriptions_by_plan", params=params)
    assert got == prom.custom_query("sum by (plan_type, billing_cycle) (subscription_count)", params=params)
    assert {r["metric"]["plan_type"] for r in got} == {"pro", "team"}
