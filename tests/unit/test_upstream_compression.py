"""PROMETHEUS_COMPRESSION: a Prometheus on the gateway's own network is asked for plain bytes
(gzipping a week-long answer costs it more than the bytes cost a local network), a remote one
for gzip; an Accept-Encoding in PROMETHEUS_HEADERS always wins."""

from __future__ import annotations

import httpx
import pytest
import respx

from app.gateway.settings import GatewaySettings
from app.gateway.upstream.client import UpstreamHttp, on_local_network


@pytest.mark.parametrize(("url", "local"), [
    ("http://127.0.0.1:9090", True), ("http://localhost:9090", True), ("http://[::1]:9090", True),
    ("http://10.0.3.4:9090", True), ("http://192.168.1.20", True), ("http://172.20.0.5:9090", True),
    ("http://prometheus:9090", True), ("http://prometheus.monitoring.svc:9090", True),
    ("http://prometheus.monitoring.svc.cluster.local:9090/prometheus", True), ("http://prom.local", True),
    ("https://prometheus-prod-10-prod-us-central-0.grafana.net/api/prom", False),
    ("https://mimir.example.com/prometheus", False), ("http://8.8.8.8:9090", False),
])
def test_local_network(url: str, local: bool) -> None:
    assert on_local_network(url) is local


async def _sent_encoding(settings: GatewaySettings) -> str:
    http = UpstreamHttp(settings)
    try:
        with respx.mock(assert_all_called=True) as mock:
            route = mock.get(url__startswith=settings.prometheus_url).mock(return_value=httpx.Response(200, json={}))
            await http.exchange("GET", settings.prometheus_url + "/api/v1/status/buildinfo", [], 5, None)
            return str(route.calls.last.request.headers.get("accept-encoding"))
    finally:
        await http.aclose()


@pytest.mark.parametrize(("kwargs", "sent"), [
    ({"prometheus_url": "http://127.0.0.1:9090"}, "identity"),
    ({"prometheus_url": "http://prometheus:9090"}, "identity"),
    ({"prometheus_url": "https://mimir.example.com/prometheus"}, "gzip, deflate"),
    ({"prometheus_url": "http://127.0.0.1:9090", "prometheus_compression": "gzip"}, "gzip, deflate"),
    ({"prometheus_url": "https://mimir.example.com", "prometheus_compression": "identity"}, "identity"),
    ({"prometheus_url": "http://127.0.0.1:9090", "prometheus_headers": {"accept-encoding": "br"}}, "br"),
])
async def test_what_the_upstream_is_asked(kwargs: dict[str, object], sent: str) -> None:
    assert await _sent_encoding(GatewaySettings(**kwargs)) == sent  # type: ignore[arg-type]


@pytest.mark.parametrize("params", [
    [("query", 'sum by (le) (rate(x{a="b c", d=~"e|f"}[5m])) / 2 + ü & %'), ("timeout", "900ms")],
    [("match[]", "up"), ("match[]", '{__name__=~".+"}'), ("start", "1.5"), ("", "")],
    [("query", "x" * 20000 + " + 1")],  # beyond the remembered size: quoted as it comes
])
def test_the_form_encoding_is_urlencode_byte_for_byte(params: list[tuple[str, str]]) -> None:
    from urllib.parse import urlencode

    from app.gateway.upstream.client import form

    assert form(params) == form(params) == urlencode(params)
