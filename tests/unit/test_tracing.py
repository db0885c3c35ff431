"""Tracing (app/common/tracing.py): off and free by default, on by the standard OTEL_* variables.

In-process tests trace into an in-memory exporter (``tracing.install``) with respx as the
upstream; the off/on switch is tested in fresh interpreters, since the first set-up of a
process decides, and against the real OTLP receiver of tests/support.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import respx
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from app.common import tracing
from app.gateway.settings import GatewaySettings
from app.main import create_app
from app.ops.logs import JsonFormatter, TraceContext, configure_logging
from app.security.settings import SecuritySettings
from app.settings import AppSettings, OpsSettings
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.procs import Proc

ROOT = Path(__file__).resolve().parents[2]
PROM = "http://prom.test:9090"
CALLER_TRACE, CALLER_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
MATRIX = {"status": "success", "data": {"resultType": "matrix", "result": [
    {"metric": {"job": "a"}, "values": [[1700000000, "1"], [1700000015, "2"]]}]}}


@pytest.fixture()
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.install(provider)
    try:
        yield memory
    finally:
        tracing.uninstall()
        provider.shutdown()


def _client(log_format: str = "text", gateway: dict[str, object] | None = None, **security: object) -> TestClient:
    settings = AppSettings(gateway=GatewaySettings(prometheus_url=PROM, **(gateway or {})),  # type: ignore[arg-type]
                           security=SecuritySettings(**security),  # type: ignore[arg-type]
                           ops=OpsSettings(log_format=log_format))  # type: ignore[arg-type]
    return TestClient(create_app(settings))


def _range(client: TestClient, **headers: str) -> httpx.Response:
    return client.get("/api/v1/query_range", headers=headers, params={
        "query": "sum(up)", "start": "1700000000", "end": "1700000015", "step": "15"})


def _by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def test_request_span_continues_the_callers_trace_and_upstream_gets_traceparent(
        exporter: InMemorySpanExporter) -> None:
    with respx.mock() as mock:
        route = mock.post(f"{PROM}/api/v1/query_range").respond(json=MATRIX)
        with _client() as client:
            assert _range(client, traceparent=TRACEPARENT).status_code == 200
    spans = exporter.get_finished_spans()
    (server,) = _by_name(spans, "GET /api/v1/query_range")
    assert format(server.context.trace_id, "032x") == CALLER_TRACE
    assert server.parent is not None and format(server.parent.span_id, "016x") == CALLER_SPAN
    attrs = dict(server.attributes or {})
    assert attrs["http.route"] == "/api/v1/query_range"
    assert attrs["gateway.query_hash"] == tracing.query_hash("sum(up)")
    assert attrs["gateway.cache_state"] == "miss" and attrs["gateway.cache.miss"] == 1
    assert attrs["gateway.range.steps_fetched"] == 2

    (piece,) = _by_name(spans, "range piece")
    assert piece.parent is not None and piece.parent.span_id == server.context.span_id
    (upstream,) = _by_name(spans, "upstream")
    assert upstream.parent is not None and upstream.parent.span_id == piece.context.span_id
    (http_client,) = [s for s in spans if s.kind is trace.SpanKind.CLIENT]
    assert http_client.parent is not None and http_client.parent.span_id == upstream.context.span_id
    sent = route.calls.last.request.headers["traceparent"]
    assert sent == f"00-{CALLER_TRACE}-{format(http_client.context.span_id, '016x')}-01"


def test_client_name_and_memo_hits_are_on_the_request_span(exporter: InMemorySpanExporter) -> None:
    tokens = '{"tok-a": {"env": "a"}}'
    with respx.mock() as mock:
        mock.post(f"{PROM}/api/v1/query_range").respond(json=MATRIX)
        with _client(api_tokens=tokens) as client:
            auth = {"authorization": "Bearer tok-a"}
            assert _range(client, **auth).status_code == 200
            assert _range(client, **auth).status_code == 200
    servers = _by_name(exporter.get_finished_spans(), "GET /api/v1/query_range")
    assert len(servers) == 2
    first, second = (dict(s.attributes or {}) for s in servers)
    assert first["gateway.client"] == second["gateway.client"] != ""
    assert first["gateway.cache_state"] == "miss" and second["gateway.cache_state"] == "hit"
    # The second request never went upstream: no upstream span in its trace.
    assert not [s for s in _by_name(exporter.get_finished_spans(), "upstream")
                if s.context.trace_id == servers[1].context.trace_id]


def _on_grid(request: httpx.Request) -> httpx.Response:
    """Prometheus' answer for any range on a 15 s grid: one series, value = timestamp."""
    form = httpx.QueryParams(request.content.decode())
    start, end, step = (float(form[k]) for k in ("start", "end", "step"))
    values, t = [], start
    while t <= end:
        values.append([t, str(int(t))])
        t += step
    return httpx.Response(200, json={"status": "success", "data": {"resultType": "matrix", "result": [
        {"metric": {"job": "a"}, "values": values}]}})


def test_a_partly_cached_range_shows_lookup_pieces_and_assembly(exporter: InMemorySpanExporter) -> None:
    with respx.mock() as mock:
        mock.post(f"{PROM}/api/v1/query_range").mock(side_effect=_on_grid)
        with _client() as client:
            assert _range(client).status_code == 200  # 1700000000 .. 1700000015
            exporter.clear()
            wider = client.get("/api/v1/query_range", params={
                "query": "sum(up)", "start": "1700000000", "end": "1700000060", "step": "15"})
            assert wider.status_code == 200
    spans = exporter.get_finished_spans()
    (server,) = [s for s in spans if s.kind is trace.SpanKind.SERVER]
    assert dict(server.attributes or {})["gateway.cache_state"] == "partial"
    assert _by_name(spans, "cache lookup")
    (piece,) = _by_name(spans, "range piece")
    attrs = dict(piece.attributes or {})
    assert (attrs["gateway.range.start"], attrs["gateway.range.end"], attrs["gateway.range.steps"]) == (
        "1700000030", "1700000060", 3)
    (upstream,) = _by_name(spans, "upstream")
    assert upstream.parent is not None and upstream.parent.span_id == piece.context.span_id
    (assembly,) = _by_name(spans, "assembly")
    assert dict(assembly.attributes or {})["gateway.bytes"] > 0
    assert all(s.context.trace_id == server.context.trace_id for s in spans)


def test_the_shared_tier_has_its_spans(exporter: InMemorySpanExporter, redis_proc: Proc) -> None:
    with respx.mock(assert_all_called=False) as mock:
        mock.post(f"{PROM}/api/v1/query").respond(json={"status": "success", "data": {
            "resultType": "vector", "result": []}})
        mock.post(f"{PROM}/api/v1/query_range").mock(side_effect=_on_grid)
        with _client(gateway={"gateway_cache_url": redis_proc.url}) as client:
            assert client.get("/prometheus/metrics/system?format=json").status_code == 200
            assert _range(client).status_code == 200
    names = [s.name for s in exporter.get_finished_spans()]
    assert names.count("shared tier claim") == 2, names  # one for the figures, one for the range


def test_figures_have_a_render_span_and_probes_no_span(exporter: InMemorySpanExporter) -> None:
    with respx.mock(assert_all_called=False) as mock:
        mock.post(f"{PROM}/api/v1/query").respond(json={"status": "success", "data": {
            "resultType": "vector", "result": []}})
        with _client() as client:
            assert client.get("/prometheus/metrics/system?format=json").status_code == 200
            assert client.get("/ready").status_code in (200, 503)
            assert client.get("/health").status_code == 200
    spans = exporter.get_finished_spans()
    (server,) = [s for s in spans if s.kind is trace.SpanKind.SERVER]
    assert server.name == "GET /prometheus/metrics/{category}"
    (render,) = _by_name(spans, "render")
    assert render.parent is not None and render.parent.span_id == server.context.span_id
    # /ready's upstream probe is quiet: every client span belongs to the figure request.
    assert all(s.context.trace_id == server.context.trace_id for s in spans)


def test_exemplars_carry_the_trace_id_in_openmetrics(exporter: InMemorySpanExporter) -> None:
    with respx.mock(assert_all_called=False) as mock:
        mock.post(f"{PROM}/api/v1/query_range").respond(json=MATRIX)
        with _client() as client:
            assert _range(client, traceparent=TRACEPARENT).status_code == 200
            om = client.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"}).text
            text = client.get("/metrics").text
    lines = [ln for ln in om.splitlines()
             if ln.startswith("fastapi_requests_duration_seconds_bucket{") and 'path="/api/v1/query_range"' in ln]
    assert any(f'# {{trace_id="{CALLER_TRACE}"}}' in ln for ln in lines), lines
    assert "trace_id" not in text  # the 0.0.4 text format has no exemplars


def test_unsampled_requests_leave_no_exemplar_and_no_span() -> None:
    memory = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.install(provider)
    try:
        with respx.mock(assert_all_called=False) as mock:
            mock.post(f"{PROM}/api/v1/query_range").respond(json=MATRIX)
            with _client() as client:
                trace_id = "5" * 32
                assert _range(client, traceparent=f"00-{trace_id}-{CALLER_SPAN}-00").status_code == 200
                om = client.get("/metrics", headers={"accept": "application/openmetrics-text"}).text
    finally:
        tracing.uninstall()
    assert memory.get_finished_spans() == ()
    assert trace_id not in om


def test_log_lines_written_inside_a_request_carry_its_trace(exporter: InMemorySpanExporter) -> None:
    configure_logging("INFO", "json")
    handler = next(h for h in logging.getLogger().handlers if getattr(h, "_gateway", False))
    assert isinstance(handler, logging.StreamHandler)
    out = io.StringIO()
    old = handler.setStream(out)
    try:
        with respx.mock() as mock:
            mock.post(f"{PROM}/api/v1/query_range").respond(503, text="overloaded")
            with _client("json") as client:
                assert _range(client, traceparent=TRACEPARENT).status_code >= 500
    finally:
        handler.setStream(old)
        configure_logging("INFO", "text")
    lines = [json.loads(ln) for ln in out.getvalue().splitlines() if ln.startswith("{")]
    episode = [d for d in lines if d["logger"] == "gateway.prometheus"]
    assert episode, lines
    (server,) = _by_name(exporter.get_finished_spans(), "GET /api/v1/query_range")
    assert episode[0]["trace_id"] == CALLER_TRACE
    assert re.fullmatch(r"[0-9a-f]{16}", episode[0]["span_id"])
    assert episode[0]["span_id"] != format(server.context.span_id, "016x")  # the span current when logged


def test_json_lines_outside_a_trace_have_no_trace_fields() -> None:
    record = logging.LogRecord("gateway.slow", logging.WARNING, __file__, 1, "slow query %s", ("x",), None)
    assert TraceContext().filter(record)
    assert "trace_id" not in json.loads(JsonFormatter().format(record))
    record.trace_id, record.span_id = "a" * 32, "b" * 16  # given with extra= by a caller
    doc = json.loads(JsonFormatter().format(record))
    assert (doc["trace_id"], doc["span_id"]) == ("a" * 32, "b" * 16)


# -- the switch, in fresh interpreters ------------------------------------------------------

PROBE = r"""
import json, sys, threading
from fastapi.testclient import TestClient
from app.common import tracing
from app.main import create_app
app = create_app()
with TestClient(app) as client:
    client.get("/prometheus/metrics/summary")
    client.get("/health")
    transport = app.state.gateway.client.http._transport
print(json.dumps({
    "enabled": tracing.enabled(),
    # (redis' own observability module loads the metrics SDK when installed: not ours)
    "sdk": any(m in sys.modules for m in ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http",
                                          "app.common.server_spans")),
    "exporter_threads": [t.name for t in threading.enumerate() if t.name.startswith("OtelBatch")],
    "middleware": [m.cls.__name__ for m in app.user_middleware],
    "instrumented": type(transport).__name__ == "AsyncOpenTelemetryTransport",
}))
sys.stdout.flush()
"""


def _probe(**env: str) -> dict[str, object]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    full.update({"PYTHONPATH": str(ROOT), "PROMETHEUS_URL": "http://127.0.0.1:9", "OTEL_BSP_SCHEDULE_DELAY": "50",
                 **env})
    full.pop("PROMETHEUS_MULTIPROC_DIR", None)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=full,
                         timeout=90, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_off_by_default_nothing_is_started_or_loaded() -> None:
    with OtlpReceiver() as receiver:
        off = _probe()
        assert receiver.requests == 0
    assert (off["enabled"], off["sdk"], off["exporter_threads"], off["instrumented"]) == (False, False, [], False)
    assert "ServerSpans" not in off["middleware"]  # type: ignore[operator]


def test_the_endpoint_variable_turns_it_on_and_spans_reach_the_receiver() -> None:
    with OtlpReceiver() as receiver:
        # (FASTAPI_OTEL_AUTO_CONFIGURE: FastAPI's native telemetry must stay off all the same)
        on = _probe(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, FASTAPI_OTEL_AUTO_CONFIGURE="true")
        spans = receiver.wait_for(lambda s: any(x.name == "GET /prometheus/metrics/summary" for x in s), 15)
    assert on["enabled"] and on["sdk"] and on["exporter_threads"] and on["instrumented"]
    assert "ServerSpans" in on["middleware"]  # type: ignore[operator]
    assert {s.service for s in spans} == {"metrics-gateway"}
    assert not [s for s in spans if s.name.startswith("GET /health")]
    assert {s.scope for s in spans} <= {"metrics-gateway", "opentelemetry.instrumentation.httpx"}, spans
    assert len([s for s in spans if s.name == "GET /prometheus/metrics/summary"]) == 1  # one server span


@pytest.mark.parametrize("env", [{"OTEL_SDK_DISABLED": "true"}, {"OTEL_TRACES_EXPORTER": "none"},
                                 {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}])
def test_standard_switches_keep_it_off(env: dict[str, str]) -> None:
    off = _probe(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9", **env)
    assert off["enabled"] is False and off["sdk"] is False and off["exporter_threads"] == []


def test_failed_exports_are_counted_and_logged_once_per_episode(caplog: pytest.LogCaptureFixture) -> None:
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
    from prometheus_client import REGISTRY

    outcomes = [SpanExportResult.FAILURE, SpanExportResult.FAILURE, SpanExportResult.SUCCESS]

    class Flaky(SpanExporter):
        def export(self, spans: object) -> SpanExportResult:
            return outcomes.pop(0)

    def count(outcome: str) -> float:
        return REGISTRY.get_sample_value("metrics_gateway_trace_spans_exported_total", {"outcome": outcome}) or 0.0

    exporter = tracing._counted(Flaky(), "http://tempo.test:4318")
    failed, exported = count("failed"), count("exported")
    with caplog.at_level(logging.WARNING, logger="gateway.tracing"):
        for _ in range(3):
            exporter.export([object(), object()])
    assert count("failed") - failed == 4 and count("exported") - exported == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.tracing"]
    assert len(lines) == 2 and "failing" in lines[0] and "recovered" in lines[1]


def test_slow_query_line_and_queue_wait_carry_the_trace(exporter: InMemorySpanExporter,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """One client limited to one upstream query at a time sends two at once: the second
    waits its turn (a `scheduler wait` span, the request span's queue wait), and each
    slow-query line (SLOW_QUERY_SECONDS=0: every request) names its own trace."""
    import asyncio

    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.2)
        return _on_grid(request)

    traces = ["a" * 32, "b" * 32]
    with respx.mock() as mock, caplog.at_level(logging.WARNING, logger="gateway.slow_query"):
        mock.post(f"{PROM}/api/v1/query_range").mock(side_effect=slow)
        app = create_app(AppSettings(gateway=GatewaySettings(
            prometheus_url=PROM, slow_query_seconds=0, client_max_concurrent_queries=1)))

        async def both() -> list[httpx.Response]:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
                return list(await asyncio.gather(*(
                    c.get("/api/v1/query_range", headers={"traceparent": f"00-{t}-{CALLER_SPAN}-01"},
                          params={"query": f"sum(up{{n=\"{i}\"}})", "start": "1700000000",
                                  "end": "1700000015", "step": "15"})
                    for i, t in enumerate(traces))))

        answers = asyncio.run(both())
    assert [r.status_code for r in answers] == [200, 200]
    spans = exporter.get_finished_spans()
    servers = {format(s.context.trace_id, "032x"): dict(s.attributes or {})
               for s in spans if s.kind is trace.SpanKind.SERVER}
    assert set(servers) == set(traces)
    waits = [s for s in _by_name(spans, "scheduler wait")]
    assert len(waits) == 1  # the one that waited its turn
    waited = format(waits[0].context.trace_id, "032x")
    assert servers[waited]["gateway.queue_wait_seconds"] > 0.1
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.slow_query"]
    assert sorted(d["trace_id"] for d in lines) == sorted(traces)
