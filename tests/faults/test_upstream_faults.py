"""Upstream Prometheus faults against a real gateway process (uvicorn), deadline 1 s.

For each fault: the documented answer (HTTP 200, JSON status and error_type,
text exposition saying the figures failed), the latency bound (deadline +
0.5 s), exactly one log line per failure episode (plus one on recovery; none
for query errors, which say nothing about the upstream's health), the metrics
(metrics_gateway_upstream_errors_total{error_type}, metrics_gateway_upstream_up,
circuit breaker state) and no leaked connection (the gateway's ESTABLISHED
sockets to the fake, and the fake's own open-connection counter).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.faults.conftest import (
    DEADLINE,
    MARGIN,
    Gateway,
    established,
    gateway_env,
    metric,
    record,
    settle,
    start_gateway,
    stop_gateway,
)
from tests.faults.fake_upstream import FakePrometheus, closed_port

pytestmark = pytest.mark.faults

SUMMARY = "/prometheus/metrics/summary"
TEXT = "/prometheus/metrics/system"
ERR = "metrics_gateway_upstream_errors_total"
POOL = 8


@pytest.fixture(scope="module")
def gateway(fake: FakePrometheus, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("gw-faults"),
                       gateway_env(fake.url, PROMETHEUS_MAX_CONNECTIONS=str(POOL)))
    try:
        yield gw
    finally:
        stop_gateway(gw)


@dataclass(frozen=True)
class Fault:
    mode: str
    attrs: tuple[tuple[str, Any], ...]
    error_type: str | None  # None: the answer is a success
    episode: bool  # does it count against the upstream's health (log line, up=0)?
    min_seconds: float = 0.0


FAULTS = [
    Fault("hang", (), "timeout", True, DEADLINE - 0.1),
    Fault("slow", (("delay", DEADLINE + 0.3),), "timeout", True, DEADLINE - 0.1),
    Fault("slow", (("delay", DEADLINE - 0.4),), None, False, DEADLINE - 0.45),
    Fault("bad_data", (), "bad_data", False),
    Fault("execution", (), "execution", False),
    Fault("timeout", (), "timeout", True),
    Fault("internal", (), "internal", True),
    Fault("html", (), "bad_response", True),
    Fault("truncated", (), "transport", True),
    Fault("huge", (), "too_large", False),
]


def _ok(gw: Gateway) -> None:
    r = gw.client.get(gw.url + SUMMARY)
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text[:500]


def _refuse(const: str) -> None:
    raise AssertionError(f"non-standard JSON constant {const}")


def _fault_id(f: Fault) -> str:
    return f.mode + "".join(f"-{k}{v:g}" for k, v in f.attrs)


@pytest.mark.parametrize("fault", FAULTS, ids=_fault_id)
def test_upstream_fault(gateway: Gateway, fake: FakePrometheus, fault: Fault) -> None:
    gw = gateway
    fake.mode = "ok"
    _ok(gw)
    time.sleep(0.1)
    conns_before = established(gw.pid, fake.port)
    fake_before = fake.open_connections
    m0 = gw.metrics()
    mark = gw.log_mark()

    latencies = []
    with fake.in_mode(fault.mode, **dict(fault.attrs)):
        for _ in range(2):
            r, seconds = gw.timed_get(SUMMARY)
            latencies.append(seconds)
            assert r.status_code == 200
            body = r.json()
            if fault.error_type is None:
                assert body["status"] == "ok" and body["errors"] == []
            else:
                assert body["status"] == "unavailable"
                assert {e["error_type"] for e in body["errors"]} == {fault.error_type}
                assert all(e["message"] for e in body["errors"])
        text, tseconds = gw.timed_get(TEXT)
        latencies.append(tseconds)
        assert text.status_code == 200
        assert text.headers["content-type"].startswith("text/plain")
        if fault.error_type is not None:
            assert "gateway_query_success{" in text.text
            assert ' 1.0' not in "\n".join(ln for ln in text.text.splitlines()
                                          if ln.startswith("gateway_query_success{"))
        time.sleep(0.05 if fault.mode != "hang" else 0.2)
        m1 = gw.metrics()

    bound = DEADLINE + MARGIN
    assert max(latencies) < bound, latencies
    assert min(latencies) >= fault.min_seconds, latencies

    if fault.error_type is not None:
        delta = metric(m1, ERR, category="summary", error_type=fault.error_type) - \
            metric(m0, ERR, category="summary", error_type=fault.error_type)
        tdelta = metric(m1, ERR, category="system", error_type=fault.error_type) - \
            metric(m0, ERR, category="system", error_type=fault.error_type)
        if fault.error_type in ("bad_data", "execution"):
            # A rejected batch is retried query by query (to find the culprit): 1 + n each.
            assert delta > 2 and delta % 2 == 0 and tdelta >= 1, (fault, delta, tdelta)
        else:
            assert delta == 2 and tdelta == 1, (fault, delta, tdelta)
    if fault.episode:
        assert metric(m1, "metrics_gateway_upstream_up") == 0.0
    # The answer's own view of the upstream: down only for faults of the upstream itself.
    assert body["upstream"]["up"] is (not fault.episode)
    assert metric(m1, "metrics_gateway_circuit_breaker_state", state="closed") == 1.0

    _ok(gw)  # recovery
    lines = [ln for ln in gw.log_since(mark) if "upstream Prometheus" in ln]
    failing = [ln for ln in lines if " failing: " in ln]
    recovered = [ln for ln in lines if " recovered after " in ln]
    if fault.episode:
        assert len(failing) == 1 and len(recovered) == 1, lines
        assert "3 failures absorbed" in recovered[0]
    else:
        assert lines == []
    assert metric(gw.metrics(), "metrics_gateway_upstream_up") == 1.0

    # No leaked connection: the gateway holds no more sockets to the fake than before,
    # and the fake sees no more open connections than before.
    # Query errors fan out (one request per query), which may leave idle keep-alive
    # connections in the pool: bounded by PROMETHEUS_MAX_CONNECTIONS, reused next time.
    allowed = POOL if fault.error_type in ("bad_data", "execution") else max(conns_before, 1)
    settle(lambda: established(gw.pid, fake.port) <= allowed)
    settle(lambda: fake.open_connections <= max(fake_before, allowed))
    record({"suite": "upstream", "fault": _fault_id(fault), "route": f"{SUMMARY} x2, {TEXT}",
            "http_status": 200, "json_status": "ok" if fault.error_type is None else "unavailable",
            "error_type": fault.error_type, "max_seconds": round(max(latencies), 3),
            "bound_seconds": bound, "log_lines": len(failing) + len(recovered),
            "upstream_up": metric(m1, "metrics_gateway_upstream_up"),
            "connections_after": established(gw.pid, fake.port)})


def test_non_finite_values_are_null_in_json_and_kept_in_text(gateway: Gateway, fake: FakePrometheus) -> None:
    with fake.in_mode("nan"):
        r, seconds = gateway.timed_get(SUMMARY)
        text, _ = gateway.timed_get(TEXT)
    body = json.loads(r.text, parse_constant=_refuse)  # standard JSON: no bare NaN/Infinity
    flags = {p.get("non_finite") for s in body["provenance"].values() for p in s.values()}
    assert {"NaN", "+Inf", "-Inf"} & flags
    values = [ln.rsplit(" ", 1)[1] for ln in text.text.splitlines()
              if ln and not ln.startswith("#") and not ln.startswith("gateway_query_")]
    assert {"NaN", "+Inf", "-Inf"} & set(values), text.text[:800]
    record({"suite": "upstream", "fault": "nan/inf values", "route": f"{SUMMARY}, {TEXT}",
            "http_status": 200, "json_status": body["status"], "error_type": None,
            "max_seconds": round(seconds, 3), "bound_seconds": DEADLINE + MARGIN, "log_lines": 0,
            "upstream_up": 1.0, "connections_after": established(gateway.pid, fake.port)})


def test_warnings_are_passed_through(gateway: Gateway, fake: FakePrometheus) -> None:
    with fake.in_mode("warnings"):
        r, seconds = gateway.timed_get(SUMMARY)
    body = r.json()
    warnings = {w for s in body["provenance"].values() for p in s.values() for w in p.get("warnings", [])}
    assert warnings == {"fake warning: partial data", "info: fake info: maybe a counter"}
    record({"suite": "upstream", "fault": "warnings + infos", "route": SUMMARY, "http_status": 200,
            "json_status": body["status"], "error_type": None, "max_seconds": round(seconds, 3),
            "bound_seconds": DEADLINE + MARGIN, "log_lines": 0, "upstream_up": 1.0,
            "connections_after": established(gateway.pid, fake.port)})


def test_refused_connection(tmp_path: Path) -> None:
    port = closed_port()
    gw = start_gateway(tmp_path, gateway_env(f"http://127.0.0.1:{port}"))
    try:
        mark = gw.log_mark()
        latencies = []
        for _ in range(3):
            r, seconds = gw.timed_get(SUMMARY)
            latencies.append(seconds)
            body = r.json()
            assert r.status_code == 200 and body["status"] == "unavailable"
            assert {e["error_type"] for e in body["errors"]} == {"unreachable"}
        m = gw.metrics()
        ready, ready_s = gw.timed_get("/ready")
        assert ready.status_code == 503 and ready.json()["checks"]["prometheus"]["ok"] is False
        assert ready_s < 1.0 + MARGIN
        assert max(latencies) < 0.5  # refused is immediate, no waiting for the deadline
        assert metric(m, ERR, category="summary", error_type="unreachable") == 3
        assert metric(m, "metrics_gateway_upstream_up") == 0
        lines = [ln for ln in gw.log_since(mark) if "upstream Prometheus" in ln]
        assert len(lines) == 1 and " failing: unreachable" in lines[0], lines
        assert established(gw.pid, port) == 0
        record({"suite": "upstream", "fault": "refuse (closed port)", "route": f"{SUMMARY} x3, /ready",
                "http_status": "200 (/ready 503)", "json_status": "unavailable", "error_type": "unreachable",
                "max_seconds": round(max([*latencies, ready_s]), 3), "bound_seconds": DEADLINE + MARGIN,
                "log_lines": len(lines), "upstream_up": 0.0, "connections_after": 0})
    finally:
        stop_gateway(gw)


def test_circuit_breaker_opens_answers_fast_and_recovers(fake: FakePrometheus, tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, gateway_env(fake.url, BREAKER_FAILURE_THRESHOLD="2",
                                             BREAKER_RESET_SECONDS="1"))
    try:
        fake.mode = "ok"
        _ok(gw)
        mark = gw.log_mark()
        with fake.in_mode("hang"):
            for _ in range(2):
                gw.timed_get(SUMMARY)
            time.sleep(0.2)
            before = fake.requests
            r, seconds = gw.timed_get(SUMMARY)
            assert fake.requests == before  # not even a connection attempt
            assert {e["error_type"] for e in r.json()["errors"]} == {"circuit_open"}
            assert seconds < 0.3
            m = gw.metrics()
            assert metric(m, "metrics_gateway_circuit_breaker_state", state="open") == 1
        time.sleep(1.1)
        _ok(gw)  # the half-open probe succeeds
        m = gw.metrics()
        assert metric(m, "metrics_gateway_circuit_breaker_state", state="closed") == 1
        lines = [ln for ln in gw.log_since(mark) if "upstream Prometheus" in ln]
        assert len(lines) == 2, lines  # one failing, one recovered
        settle(lambda: established(gw.pid, fake.port) <= 1)
        record({"suite": "upstream", "fault": "circuit breaker open (threshold 2)", "route": SUMMARY,
                "http_status": 200, "json_status": "unavailable", "error_type": "circuit_open",
                "max_seconds": round(seconds, 3), "bound_seconds": 0.3, "log_lines": len(lines),
                "upstream_up": 0.0, "connections_after": established(gw.pid, fake.port)})
    finally:
        stop_gateway(gw)


def test_query_errors_leave_the_upstream_up_metric_at_1(gateway: Gateway, fake: FakePrometheus) -> None:
    fake.mode = "ok"
    _ok(gateway)
    with fake.in_mode("bad_data"):
        body = gateway.client.get(gateway.url + SUMMARY).json()
    assert body["upstream"]["up"] is True
    assert metric(gateway.metrics(), "metrics_gateway_upstream_up") == 1.0
