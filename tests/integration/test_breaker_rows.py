"""What the upstream breaker counts, one test per row of docs/reliability.md ("What the breaker
counts"), against a real Prometheus.

Each gateway here opens its breaker on the first counted failure (threshold 1), so a
row that must not count is checked by the next request still reaching Prometheus, and a
row that must count by the next request being refused at once (`circuit_open`) even
though Prometheus is healthy by then. Rows that need an upstream which is not a
Prometheus (an HTML page, a proxy's 502, a refused credential) put a small HTTP stand-in
on loopback where such a proxy would sit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.gateway.settings import GatewaySettings
from app.main import create_app
from tests.integration.conftest import PromStack
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

# Prometheus checks its context between the two operands: with a small `timeout`, it
# answers 503 errorType=timeout; without one it evaluates for ~2-3 s.
SLOW = "count_over_time(vector(1)[1h:1ms]) + count_over_time(vector(2)[1h:1ms])"


def gateway(url: str, **kw: Any) -> TestClient:
    settings = GatewaySettings(prometheus_url=url, breaker_failure_threshold=1,
                               breaker_reset_seconds=60, **{"request_deadline_seconds": 10, **kw})
    return TestClient(create_app(settings))


def still_closed(c: TestClient) -> None:
    r = c.get("/api/v1/query", params={"query": "vector(1)"})
    assert r.status_code == 200, r.text


def opened(c: TestClient) -> None:
    r = c.get("/api/v1/query", params={"query": "vector(2)"})
    assert r.status_code == 503 and "failing; next probe" in r.json()["error"], r.text


def wait_for_probe(c: TestClient) -> None:
    """The probe a timed-out client query starts (vector(1), category probe) has run."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        text = c.get("/metrics").text
        if 'metrics_gateway_upstream_requests_total{category="probe"}' in text:
            return
        time.sleep(0.05)
    raise AssertionError("no probe was sent")


@pytest.fixture()
def gw(prom_stack: PromStack) -> Iterator[TestClient]:
    with gateway(prom_stack.prometheus.url) as c:
        yield c


# --- the client's query caused it: passed on as Prometheus gave it, never counted ------------------

def test_204_stays_a_204_and_does_not_count(gw: TestClient, prom_stack: PromStack) -> None:
    straight = httpx.get(f"{prom_stack.prometheus.url}/api/v1/query_exemplars", params={"query": "1"})
    assert straight.status_code == 204
    for _ in range(3):
        r = gw.get("/api/v1/query_exemplars", params={"query": "1"})
        assert r.status_code == 204 and r.content == b""
    still_closed(gw)


def test_bad_data_400_passes_and_does_not_count(gw: TestClient) -> None:
    r = gw.get("/api/v1/query", params={"query": "sum("})
    assert r.status_code == 400 and r.json()["errorType"] == "bad_data"
    still_closed(gw)


def test_execution_422_passes_and_does_not_count(gw: TestClient, prom_stack: PromStack) -> None:
    q = 'count_values("a b", vector(1))'
    straight = httpx.post(f"{prom_stack.prometheus.url}/api/v1/query", data={"query": q, "time": "100"})
    r = gw.post("/api/v1/query", data={"query": q, "time": "100"})
    assert r.status_code == straight.status_code == 422 and r.content == straight.content
    still_closed(gw)


def test_prometheus_timeout_for_a_client_timeout_passes_and_does_not_count(gw: TestClient) -> None:
    r = gw.post("/api/v1/query", data={"query": SLOW, "timeout": "100ms"})
    assert r.status_code == 503, r.text
    assert r.json() == {"status": "error", "errorType": "timeout",
                        "error": "query timed out in expression evaluation"}
    still_closed(gw)


def test_client_query_past_the_gateway_deadline_does_not_count(prom_stack: PromStack) -> None:
    with gateway(prom_stack.prometheus.url, request_deadline_seconds=0.5) as c:
        r = c.post("/api/v1/query", data={"query": SLOW})
        assert r.status_code == 503 and r.json()["errorType"] == "timeout", r.text
        wait_for_probe(c)  # the probe found Prometheus healthy
        still_closed(c)


def test_answer_over_the_size_cap_does_not_count(prom_stack: PromStack) -> None:
    with gateway(prom_stack.prometheus.url, prometheus_max_response_bytes=2048) as c:
        r = c.get("/api/v1/query_range", params={"query": "vector(1)", "start": "0", "end": "3600", "step": "1"})
        assert r.status_code == 422 and r.json()["errorType"] == "execution"
        assert "exceeds 2048 bytes" in r.json()["error"]
        still_closed(c)


def test_twelve_exemplar_queries_leave_the_summary_fresh(prom_stack: PromStack) -> None:
    """The issue's measurement: twelve 204s once opened the breaker for every dashboard."""
    settings = GatewaySettings(prometheus_url=prom_stack.prometheus.url, request_deadline_seconds=10)
    with TestClient(create_app(settings)) as c:
        for _ in range(12):
            assert c.get("/api/v1/query_exemplars", params={"query": "1"}).status_code == 204
        body = c.get("/prometheus/metrics/summary").json()
        assert body["status"] != "unavailable", body


# --- the upstream failed: counted ----------------------------------------------------------------

def test_transport_failure_counts(prom_stack: PromStack) -> None:
    proxy = TcpProxy("127.0.0.1", prom_stack.prometheus.port).start()
    try:
        with gateway(proxy.url) as c:
            still_closed(c)
            proxy.down()
            r = c.get("/api/v1/query", params={"query": "vector(3)"})
            assert r.status_code == 503 and r.json()["errorType"] == "unavailable"
            assert "unreachable" in r.json()["error"]
            proxy.up()
            opened(c)  # Prometheus is reachable again, the breaker waits for its reset
    finally:
        proxy.stop()


def test_figure_query_past_the_deadline_counts(prom_stack: PromStack) -> None:
    """A catalog figure is the gateway's own query: its timeout is the upstream's slowness.
    Prometheus is held still (SIGSTOP) for the figures' request, then resumed."""
    import os
    import signal
    with gateway(prom_stack.prometheus.url, request_deadline_seconds=0.5, cache_ttl_seconds=0,
                 stale_max_age_seconds=0) as c:
        still_closed(c)
        os.kill(prom_stack.prometheus.popen.pid, signal.SIGSTOP)
        try:
            body = c.get("/prometheus/metrics/summary").json()
        finally:
            os.kill(prom_stack.prometheus.popen.pid, signal.SIGCONT)
        assert body["status"] == "unavailable", body
        opened(c)


class _StandIn:
    """A loopback HTTP server answering every request with one fixed response."""

    def __init__(self, status: int, body: bytes, ctype: str) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                self.send_response(outer.status)
                self.send_header("Content-Type", outer.ctype)
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.status, self.body, self.ctype = status, body, ctype
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _StandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize(("status", "body", "ctype", "answer"), [
    (200, b"<html>login</html>", "text/html", "bad_response"),           # not the API
    (502, b"<html>502 Bad Gateway</html>", "text/html", "bad_response"),  # a proxy's 5xx
    (503, b'{"status":"error","errorType":"unavailable","error":"TSDB not ready"}', "application/json",
     "unavailable"),                                                      # Prometheus' own 5xx
    (401, b"Unauthorized", "text/plain", "bad_response"),                 # our credentials refused
], ids=["html-200", "proxy-502", "prometheus-503", "credentials-401"])
def test_upstream_failures_count(prom_stack: PromStack, status: int, body: bytes, ctype: str,
                                 answer: str) -> None:
    with _StandIn(status, body, ctype) as stand_in, gateway(stand_in.url) as c:
        r = c.get("/api/v1/query", params={"query": "vector(4)"})
        assert r.status_code == 503, r.text
        assert answer in r.text
        # The stand-in now answers as Prometheus would: the breaker still refuses.
        stand_in.status, stand_in.ctype = 200, "application/json"
        stand_in.body = httpx.get(f"{prom_stack.prometheus.url}/api/v1/query", params={"query": "1"}).content
        opened(c)
