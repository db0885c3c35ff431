"""One trace from the caller through the gateway into a real Prometheus (issue 23).

A real Prometheus (``tracing:`` with ``client_type: http``) and the gateway (a uvicorn
process with ``OTEL_EXPORTER_OTLP_ENDPOINT``) both export to one test OTLP receiver
(tests/support/otlp_receiver.py, decoding the real protobuf). A query sent with
Grafana's ``traceparent`` must come back as one trace: the caller's span is the parent
of the gateway's request span, whose upstream client span is the parent of
Prometheus' own HTTP span, under which Prometheus' query engine spans hang.

The gateway reaches Prometheus through a recording TCP proxy, so the ``traceparent``
that arrived at Prometheus is read off the wire. Prometheus' own spans need a build
with the OpenTelemetry SDK: Debian 12's package (2.42+ds, the system one) accepts
``tracing:`` and never exports, so these tests run the build scripts/setup fetches
(Debian 13's 2.53, scripts/setup-tracing-prometheus), or TEST_PROMETHEUS_BIN. Without
one, the test that needs Prometheus' spans fails saying so (skipped only under
ALLOW_MISSING_TOOLS=1, as for any missing tool).
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.otlp_receiver import OtlpReceiver, Span
from tests.support.procs import (
    PROMETHEUS_BIN,
    Proc,
    _spawn,
    free_port,
    prometheus_can_trace,
    start_gunicorn,
    start_prometheus,
    start_uvicorn,
    tracing_prometheus,
    wait_until,
)
from tests.support.synthetic_backend import SyntheticBackend, scrape_config
from tests.support.tcp_proxy import TcpProxy
from tests.support.tools import OPT_OUT, needs

pytestmark = [pytest.mark.integration, needs("prometheus")]

SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind


@dataclass
class Stack:
    binary: str
    receiver: OtlpReceiver
    prometheus: Proc
    proxy: TcpProxy
    gateway: Proc

    def traceparents_upstream(self) -> list[str]:
        """The traceparent headers of the requests that reached Prometheus."""
        return re.findall(r"(?im)^traceparent: *([0-9a-f-]+)\r?$", self.proxy.sent().decode("latin-1"))


def _tracing_yaml(receiver: OtlpReceiver) -> str:
    return ("tracing:\n"
            f"  endpoint: {receiver.hostport}\n"
            "  client_type: http\n"
            "  insecure: true\n"
            "  sampling_fraction: 1.0\n")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("tracing")
    binary = tracing_prometheus() or PROMETHEUS_BIN  # (without one, the test that needs it fails)
    backend = SyntheticBackend()
    with OtlpReceiver() as receiver:
        target = backend.start()
        prom: Proc | None = None
        proxy: TcpProxy | None = None
        gateway: Proc | None = None
        try:
            prom = start_prometheus(workdir / "prometheus", scrape_config(target),
                                    extra_config=_tracing_yaml(receiver), binary=binary)
            wait_until(lambda: httpx.post(f"{prom.url}/api/v1/query", data={"query": 'up{job="backend"}'},
                                          timeout=2).json()["data"]["result"], 30, what="a scrape")
            proxy = TcpProxy("127.0.0.1", prom.port, record=True).start()
            env = {"PROMETHEUS_URL": proxy.url, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                   "OTEL_SERVICE_NAME": "metrics-gateway", "OTEL_BSP_SCHEDULE_DELAY": "100",
                   "LOG_FORMAT": "json", "LOG_LEVEL": "INFO",
                   "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
            gateway = start_uvicorn(workdir / "gateway", "app.main:create_app", env, factory=True)
            yield Stack(binary, receiver, prom, proxy, gateway)
        finally:
            if gateway is not None:
                gateway.stop()
            if proxy is not None:
                proxy.stop()
            if prom is not None:
                prom.stop()
            backend.stop()


def _traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def _children(spans: list[Span], parent: Span) -> list[Span]:
    return [s for s in spans if s.parent_id == parent.span_id]


def _gateway_done(trace_id: str) -> object:
    def check(spans: list[Span]) -> bool:
        mine = [s for s in spans if s.trace_id == trace_id and s.service == "metrics-gateway"]
        return any(s.kind == SERVER for s in mine) and any(s.kind == CLIENT for s in mine)
    return check


def _range_query(stack: Stack, header: str, now: float | None = None) -> None:
    now = now or time.time()
    r = httpx.get(f"{stack.gateway.url}/api/v1/query_range", timeout=10, headers={"traceparent": header},
                  params={"query": 'sum by (job) (up{job="backend"})', "start": f"{now - 300:.3f}",
                          "end": f"{now:.3f}", "step": "15"})
    assert r.status_code == 200, r.text


def test_a_range_query_is_one_trace_from_the_caller_to_prometheus(stack: Stack) -> None:
    header, trace_id, caller_span = _traceparent()
    now = time.time()
    _range_query(stack, header, now)
    spans = stack.receiver.wait_for(_gateway_done(trace_id))
    mine = [s for s in spans if s.trace_id == trace_id and s.service == "metrics-gateway"]

    # The gateway's request span continues the caller's trace (Grafana's traceparent).
    server = [s for s in mine if s.kind == SERVER]
    assert len(server) == 1, [(s.name, s.kind) for s in mine]
    request = server[0]
    assert request.parent_id == caller_span
    assert request.name == "GET /api/v1/query_range"
    assert request.attributes["http.route"] == "/api/v1/query_range"
    assert len(str(request.attributes["gateway.query_hash"])) == 16
    assert request.attributes["gateway.cache_state"] == "miss"

    # Each piece fetched upstream (here the whole range) holds an upstream span, which
    # holds the httpx client span...
    pieces = [s for s in mine if s.name == "range piece"]
    assert pieces and all(p.parent_id == request.span_id for p in pieces)
    upstream = [s for s in mine if s.name == "upstream"]
    assert upstream and all(s.attributes["gateway.category"] == "range" for s in upstream)
    assert {u.parent_id for u in upstream} <= {p.span_id for p in pieces}
    clients = [s for s in mine if s.kind == CLIENT]
    assert clients and {c.parent_id for c in clients} <= {u.span_id for u in upstream}

    # ...whose traceparent is what reached Prometheus: same trace, the client span as parent.
    sent = {tp for tp in stack.traceparents_upstream() if tp.split("-")[1] == trace_id}
    assert sent == {f"00-{trace_id}-{c.span_id}-01" for c in clients}
    assert stack.receiver.rejected == 0

    # The same query again is answered from the range cache: no upstream span, state hit.
    _range_query(stack, f"00-{trace_id}-{caller_span}-01", now)
    again = stack.receiver.wait_for(lambda spans: sum(
        s.kind == SERVER and s.trace_id == trace_id for s in spans) == 2)
    second = [s for s in again if s.trace_id == trace_id and s.kind == SERVER and s.span_id != request.span_id]
    assert second[0].attributes["gateway.cache_state"] == "hit"
    assert not [s for s in again if s.trace_id == trace_id and s.kind == CLIENT and s.parent_id not in
                {u.span_id for u in upstream}]


def test_prometheus_query_spans_join_the_gateway_trace(stack: Stack) -> None:
    if not prometheus_can_trace(stack.binary):
        message = (f"{stack.binary} is built without the OpenTelemetry SDK (Debian 12's package): its "
                   "tracing: config exports nothing. Run scripts/setup-tracing-prometheus, or set "
                   "TEST_PROMETHEUS_BIN to a build with tracing.")
        if os.environ.get(OPT_OUT) == "1":
            pytest.skip(f"{message} Skipped because {OPT_OUT}=1.")
        pytest.fail(message, pytrace=False)
    header, trace_id, _ = _traceparent()
    _range_query(stack, header)

    def holds_both(spans: list[Span]) -> bool:
        mine = [s for s in spans if s.trace_id == trace_id]
        return _gateway_done(trace_id)(spans) and sum(s.service == "prometheus" for s in mine) >= 2  # type: ignore[operator]

    spans = stack.receiver.wait_for(holds_both)
    mine = [s for s in spans if s.trace_id == trace_id]
    clients = {s.span_id for s in mine if s.service == "metrics-gateway" and s.kind == CLIENT}
    prom_http = [s for s in mine if s.service == "prometheus" and s.parent_id in clients]
    assert prom_http, [(s.service, s.name, s.parent_id) for s in mine]
    below = [s for p in prom_http for s in _children(mine, p)]
    assert below, "Prometheus' query engine spans are missing under its HTTP span"


def test_a_figure_batch_joins_the_trace_too(stack: Stack) -> None:
    header, trace_id, caller_span = _traceparent()
    r = httpx.get(f"{stack.gateway.url}/prometheus/metrics/summary", timeout=10, headers={"traceparent": header})
    assert r.status_code == 200, r.text
    spans = stack.receiver.wait_for(_gateway_done(trace_id))
    mine = [s for s in spans if s.trace_id == trace_id]
    request = next(s for s in mine if s.service == "metrics-gateway" and s.kind == SERVER)
    assert request.parent_id == caller_span and request.name == "GET /prometheus/metrics/summary"
    assert request.attributes["gateway.cache_state"] == "miss"
    assert any(s.name == "render" and s.parent_id == request.span_id for s in mine)
    clients = {s.span_id for s in mine if s.service == "metrics-gateway" and s.kind == CLIENT}
    sent = {tp for tp in stack.traceparents_upstream() if tp.split("-")[1] == trace_id}
    assert sent == {f"00-{trace_id}-{c}-01" for c in clients}


def test_without_traceparent_the_gateway_starts_the_trace(stack: Stack) -> None:
    marker = f"vector({secrets.randbelow(10**9)})"
    r = httpx.get(f"{stack.gateway.url}/api/v1/query", params={"query": marker}, timeout=10)
    assert r.status_code == 200, r.text

    def found(spans: list[Span]) -> bool:
        return any(s.kind == SERVER and s.service == "metrics-gateway" and s.parent_id == "" and
                   s.name == "GET /api/v1/query" for s in spans)

    spans = stack.receiver.wait_for(found)
    roots = [s for s in spans if s.kind == SERVER and s.service == "metrics-gateway" and s.parent_id == ""
             and s.name == "GET /api/v1/query"]
    trace_id = roots[-1].trace_id
    stack.receiver.wait_for(_gateway_done(trace_id))
    assert any(tp.split("-")[1] == trace_id for tp in stack.traceparents_upstream())



def test_exemplars_reach_prometheus_and_name_the_trace(stack: Stack, tmp_path: Path) -> None:
    """A real Prometheus scraping the gateway's /metrics (OpenMetrics, exemplar storage on)
    stores the request-latency exemplar of a traced request with its trace_id."""
    port = free_port()
    target = stack.gateway.url.removeprefix("http://")
    (tmp_path / "p.yml").write_text(
        "global:\n  scrape_interval: 1s\n"
        f"scrape_configs:\n  - job_name: gateway\n    static_configs:\n      - targets: ['{target}']\n")
    prom = _spawn([PROMETHEUS_BIN, f"--config.file={tmp_path / 'p.yml'}", f"--storage.tsdb.path={tmp_path / 'd'}",
                   f"--web.listen-address=127.0.0.1:{port}", "--enable-feature=exemplar-storage",
                   "--log.level=warn"], tmp_path, "exemplar-prom", port=port)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{url}/-/ready", timeout=1).status_code == 200, 30, what="prometheus")
        header, trace_id, _ = _traceparent()
        r = httpx.get(f"{stack.gateway.url}/api/v1/query", params={"query": "vector(2)"}, timeout=10,
                      headers={"traceparent": header})
        assert r.status_code == 200

        def stored() -> bool:
            body = httpx.get(f"{url}/api/v1/query_exemplars", timeout=2, params={
                "query": 'fastapi_requests_duration_seconds_bucket{path="/api/v1/query"}',
                "start": f"{time.time() - 300:.0f}", "end": f"{time.time() + 5:.0f}"}).json()
            return any(e["labels"].get("trace_id") == trace_id
                       for series in body["data"] for e in series["exemplars"])

        wait_until(stored, 30, what="the request's exemplar in Prometheus")
    finally:
        prom.stop()


def test_gunicorn_workers_trace_and_leave_exemplars_out(stack: Stack, tmp_path: Path) -> None:
    """As deployed (gunicorn, 2 workers, PROMETHEUS_MULTIPROC_DIR): every worker sets up its
    own exporter after the fork and exports; the multiprocess exposition has no exemplars
    (prometheus_client's files have no place for them), and says nothing wrong about it."""
    env = {"PROMETHEUS_URL": stack.proxy.url, "OTEL_EXPORTER_OTLP_ENDPOINT": stack.receiver.endpoint,
           "OTEL_SERVICE_NAME": "gateway-gunicorn", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    gw = start_gunicorn(tmp_path, "app.main:app", env, workers=2)
    try:
        traces = set()
        for _ in range(8):
            header, trace_id, _ = _traceparent()
            r = httpx.get(f"{gw.url}/api/v1/query", params={"query": "vector(3)"}, timeout=10,
                          headers={"traceparent": header, "connection": "close"})
            assert r.status_code == 200
            traces.add(trace_id)
        spans = stack.receiver.wait_for(lambda s: traces <= {x.trace_id for x in s if x.service == "gateway-gunicorn"
                                                             and x.kind == SERVER})
        assert len({s.trace_id for s in spans if s.service == "gateway-gunicorn"}) >= len(traces)
        om = httpx.get(f"{gw.url}/metrics", timeout=5, headers={"accept": "application/openmetrics-text"}).text
        assert "fastapi_requests_duration_seconds_bucket{" in om
        assert not any(t in om for t in traces)
    finally:
        gw.stop()
