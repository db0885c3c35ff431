"""Clients, limits, fair scheduling and the figures' bulkhead against a real Prometheus (issue 20).

In-process apps (TestClient) for what one request shows; real uvicorn gateways for what
concurrent clients do to each other.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from app.gateway.settings import GatewaySettings
from app.main import create_app
from app.security import SecuritySettings
from app.settings import AppSettings
from tests.integration.conftest import PromStack
from tests.support.procs import Proc, start_uvicorn

pytestmark = pytest.mark.integration

# ~1-3 s of Prometheus CPU, data-independent (see test_breaker_rows.py).
SLOW = "count_over_time(vector(1)[1h:1ms]) + count_over_time(vector(2)[1h:1ms])"
MEDIUM = "count_over_time(vector(1)[15m:1ms])"  # ~0.3-0.5 s
TWO_SERIES = 'label_replace(vector(1), "a", "x", "", "") or label_replace(vector(2), "a", "y", "", "")'
TOKENS: dict[str, Any] = {
    "tok-staging": {"name": "grafana-staging", "limits": {"max_range_seconds": "1h"}},
    "tok-ops": {"name": "ops"},
    "tok-bare": {},
}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def app_with(prom: PromStack, tokens: dict[str, Any] | None = None, **gateway: Any) -> TestClient:
    settings = AppSettings(
        gateway=GatewaySettings(prometheus_url=prom.prometheus.url, **{"request_deadline_seconds": 10, **gateway}),
        security=SecuritySettings(api_tokens=json.dumps(tokens or TOKENS)))
    return TestClient(create_app(settings))


def grafana_reads(r: httpx.Response) -> str | None:
    """What Grafana's Prometheus datasource shows for an answer: the Go client it uses
    (client_golang api/v1) decodes the envelope on 2xx, 400, 422 and 503 and shows
    "<errorType>: <error>"; any other 4xx is "client error: <code>" with the body as detail."""
    if r.status_code // 100 == 2:
        return None
    if r.status_code in (400, 422, 503):
        assert r.headers["content-type"].startswith("application/json")
        doc = r.json()
        assert doc["status"] == "error" and set(doc) == {"status", "errorType", "error"}
        return f'{doc["errorType"]}: {doc["error"]}'
    return f"client error: {r.status_code}: {r.text}"


# --- limits per token, overrides, envelopes ----------------------------------------------------

def test_limits_and_overrides_per_token(prom_stack: PromStack) -> None:
    now = int(time.time()) - 60
    two_hours = {"query": "vector(1)", "start": now - 7200, "end": now, "step": 60}
    four_hours = {**two_hours, "start": now - 4 * 3600}
    with app_with(prom_stack, client_max_range_seconds=3 * 3600) as c:
        staging = c.get("/api/v1/query_range", params=two_hours, headers=bearer("tok-staging"))
        assert staging.status_code == 400
        assert grafana_reads(staging) == ("bad_data: the time range is 2h; at most 1h is served: choose a shorter "
                                          "time range (limit of client 'grafana-staging' at the metrics gateway)")
        ops = c.get("/api/v1/query_range", params=two_hours, headers=bearer("tok-ops"))
        straight = httpx.get(f"{prom_stack.prometheus.url}/api/v1/query_range", params=two_hours)
        assert ops.status_code == 200 and ops.content == straight.content
        refused = c.get("/api/v1/query_range", params=four_hours, headers=bearer("tok-bare"))
        assert refused.status_code == 400 and "(limit of client 'unnamed'" in refused.text


@pytest.mark.parametrize(("limits", "path", "params", "status", "words"), [
    ({"max_points_per_series": 100}, "/query_range", {"query": "vector(1)", "start": "0", "end": "3600", "step": "1"},
     400, "bad_data: the query asks for 3601 points per series; at most 100 are served"),
    ({"max_lookback_seconds": "1h"}, "/query", {"query": "rate(up[5m] offset 2h)"},
     400, "bad_data: the query reads data from 2h5m ago; data older than 1h is not served"),
    ({"max_query_length": 10}, "/query", {"query": "sum(rate(up[5m]))"},
     400, "bad_data: the query is 17 characters long; at most 10 are accepted"),
    ({"blocked_queries": [r"\[\d+h:1ms\]"]}, "/query", {"query": SLOW},
     400, "bad_data: this query matches the blocked pattern"),
    ({"max_series": 1}, "/query", {"query": TWO_SERIES},
     422, "execution: the answer has 2 series; at most 1 are served"),
    ({"max_response_bytes": 2048}, "/query_range", {"query": "vector(1)", "start": "0", "end": "3600", "step": "1"},
     422, "execution: answer exceeds 2048 bytes: add label filters"),
], ids=["points", "lookback", "length", "blocked", "series", "bytes"])
def test_each_limit_answers_in_prometheus_envelope(prom_stack: PromStack, limits: dict[str, Any], path: str,
                                                   params: dict[str, str], status: int, words: str) -> None:
    tokens = {"tok": {"name": "grafana", "limits": limits}, "free": {"name": "free"}}
    with app_with(prom_stack, tokens) as c:
        r = c.get(f"/api/v1{path}", params=params, headers=bearer("tok"))
        assert r.status_code == status, r.text
        shown = grafana_reads(r)
        assert shown is not None and shown.startswith(words), shown
        assert "grafana" in shown
        assert c.get(f"/api/v1{path}", params=params, headers=bearer("free")).status_code == 200
        reason = {"max_points_per_series": "points", "max_lookback_seconds": "lookback",
                  "max_query_length": "length", "blocked_queries": "blocked", "max_series": "series",
                  "max_response_bytes": "bytes"}[next(iter(limits))]
        assert f'metrics_gateway_client_rejected_total{{client="grafana",reason="{reason}"}}' in c.get(
            "/metrics").text


def test_rejected_before_any_upstream_work(prom_stack: PromStack) -> None:
    def asked() -> float:  # Prometheus' own count of range queries
        text = httpx.get(f"{prom_stack.prometheus.url}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("prometheus_http_requests_total{") and '"/api/v1/query_range"' in line)

    tokens = {"tok": {"name": "g", "limits": {"max_range_seconds": "1h"}}}
    with app_with(prom_stack, tokens) as c:
        before = asked()
        r = c.get("/api/v1/query_range", params={"query": "up", "start": "0", "end": "86400", "step": "60"},
                  headers=bearer("tok"))
        assert r.status_code == 400
        assert asked() == before


# --- statistics: Server-Timing, the slow-query log, per-client metrics ---------------------------

def test_server_timing_slow_log_and_client_metrics(prom_stack: PromStack, caplog: pytest.LogCaptureFixture) -> None:
    now = int(time.time()) - 60
    params = {"query": TWO_SERIES, "start": now - 600, "end": now, "step": 60}
    def ops_requests() -> float:
        return REGISTRY.get_sample_value("metrics_gateway_client_requests_total", {"client": "ops"}) or 0.0

    with app_with(prom_stack, slow_query_seconds=0) as c, caplog.at_level(logging.WARNING, "gateway.slow_query"):
        before = ops_requests()
        r = c.get("/api/v1/query_range", params=params, headers=bearer("tok-ops"))
        assert r.status_code == 200
        timing = dict(part.split(";dur=") for part in r.headers["server-timing"].split(", "))
        assert set(timing) == {"queue", "upstream", "assembly", "total"}
        assert float(timing["upstream"]) > 0 and float(timing["total"]) >= float(timing["upstream"])
        c.get("/api/v1/query", params={"query": "vector(1)"}, headers=bearer("tok-bare"))
        lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "gateway.slow_query"]
        line = next(x for x in lines if x["client"] == "ops")
        assert line["query"] == TWO_SERIES and line["step"] == 60 and line["range_seconds"] == 600
        assert line["series"] == 2 and line["bytes"] == len(r.content) and line["cache"] == "miss"
        assert line["upstream_seconds"] > 0 and line["duration_seconds"] >= line["upstream_seconds"]
        assert any(x["client"] == "unnamed" for x in lines)
        assert not any("tok-" in rec.getMessage() for rec in caplog.records)
        metrics = c.get("/metrics").text
        assert 'metrics_gateway_client_requests_total{client="ops"}' in metrics
        assert ops_requests() == before + 1
        assert 'metrics_gateway_client_requests_total{client="unnamed"}' in metrics
        assert 'metrics_gateway_client_upstream_seconds_total{client="ops"}' in metrics
        assert 'metrics_gateway_client_queue_wait_seconds_count{client="ops",lane="upstream"}' in metrics
        assert "tok-" not in metrics


def test_fast_queries_are_not_logged(prom_stack: PromStack, caplog: pytest.LogCaptureFixture) -> None:
    with app_with(prom_stack, slow_query_seconds=5) as c, caplog.at_level(logging.WARNING, "gateway.slow_query"):
        assert c.get("/api/v1/query", params={"query": "vector(1)"}, headers=bearer("tok-ops")).status_code == 200
    assert not [rec for rec in caplog.records if rec.name == "gateway.slow_query"]


# --- concurrency: real gateways, concurrent clients ----------------------------------------------

@pytest.fixture()
def gateway_proc(prom_stack: PromStack, tmp_path: Path) -> Iterator[Any]:
    procs: list[Proc] = []

    def start(tokens: dict[str, Any], **env: str) -> Proc:
        proc = start_uvicorn(tmp_path / f"gw{len(procs)}", "app.main:create_app", factory=True, env={
            "PROMETHEUS_URL": prom_stack.prometheus.url, "API_TOKENS": json.dumps(tokens),
            "REQUEST_DEADLINE_SECONDS": "15", "LOG_LEVEL": "WARNING", "REDIS_URL": "redis://127.0.0.1:1/0",
            "RANGE_CACHE_MAX_BYTES": "0", **env})
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


def test_concurrency_over_the_limit_is_a_429_with_retry_after(gateway_proc: Any) -> None:
    gw = gateway_proc({"tok": {"name": "one-at-a-time", "limits": {"max_concurrent_queries": 1,
                                                                   "max_queued_queries": 0}}})
    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=gw.url, timeout=20, headers=bearer("tok")) as c:
        slow = pool.submit(c.post, "/api/v1/query", data={"query": SLOW})
        time.sleep(0.3)
        r = c.get("/api/v1/query", params={"query": "vector(1)"})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["status"] == "error" and "one-at-a-time" in r.json()["error"]
        assert grafana_reads(r).startswith("client error: 429")  # type: ignore[union-attr]
        assert slow.result().status_code == 200


def test_a_flooding_client_does_not_starve_another(gateway_proc: Any) -> None:
    """One upstream slot for the API: A queues six distinct queries (identical ones would be
    coalesced into one upstream query), B one; B waits for at most the one or two of A's
    already granted, not for all six."""
    gw = gateway_proc({"a": {"name": "a"}, "b": {"name": "b"}}, API_MAX_CONCURRENT_QUERIES="1",
                      REQUEST_DEADLINE_SECONDS="60")  # no deadline in play: the order alone
    with httpx.Client(base_url=gw.url, timeout=30) as c:
        t0 = time.perf_counter()
        assert c.post("/api/v1/query", data={"query": MEDIUM}, headers=bearer("b")).status_code == 200
        alone = time.perf_counter() - t0
    done: dict[str, float] = {}

    def ask(token: str, key: str, query: str = MEDIUM) -> None:
        with httpx.Client(base_url=gw.url, timeout=90) as c:
            r = c.post("/api/v1/query", data={"query": query}, headers=bearer(token))
            assert r.status_code == 200, r.text
            done[key] = time.perf_counter()

    start = time.perf_counter()
    # A's queries are four times MEDIUM (0.25 s on a quiet machine), so most are still waiting
    # when B arrives; each is distinct, since identical ones would be coalesced upstream.
    heavy = MEDIUM.replace("[15m:", "[1h:")
    threads = [threading.Thread(target=ask, args=("a", f"a{i}", f"({heavy}) * {i + 1}")) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.1)  # A's six are queued first
    b_sent = time.perf_counter()
    ask("b", "b")
    b_took = done["b"] - b_sent
    for t in threads:
        t.join(60)
    a_done = sorted(v for k, v in done.items() if k.startswith("a"))
    assert len(a_done) == 6
    why = (b_took, alone, b_sent - start, [v - start for v in a_done])
    # Of A's queries still unanswered when B arrived (most of them: else this proves nothing),
    # B waits for the one or two already granted, never for all as first-come would serve it.
    waiting = [v for v in a_done if v > b_sent]
    assert len(waiting) >= 4, why
    assert sum(1 for v in waiting if v < done["b"]) <= 2, why
    assert b_took < (a_done[-1] - b_sent) / 2, why


def test_the_summary_keeps_its_connections_while_the_api_is_saturated(gateway_proc: Any) -> None:
    """Two upstream connections, one reserved for the figures: four slow API queries take
    the other one, and /summary stays fresh and fast (with the API holding both connections,
    its fetches wait seconds for one)."""
    gw = gateway_proc({"a": {"name": "a"}}, PROMETHEUS_MAX_CONNECTIONS="2", FIGURE_RESERVED_CONNECTIONS="1",
                      CLIENT_MAX_CONCURRENT_QUERIES="8", CLIENT_MAX_QUEUED_QUERIES="16",
                      CACHE_TTL_SECONDS="0.5", STALE_MAX_AGE_SECONDS="0", REQUEST_DEADLINE_SECONDS="20",
                      RESPONSE_MEMO_SECONDS="0")
    statuses: list[int] = []

    def flood() -> None:
        with httpx.Client(base_url=gw.url, timeout=60, headers=bearer("a")) as c:
            statuses.append(c.post("/api/v1/query", data={"query": SLOW}).status_code)

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    slowest = 0.0
    with httpx.Client(base_url=gw.url, timeout=10, headers=bearer("a")) as c:
        for _ in range(8):
            t0 = time.perf_counter()
            body = c.get("/prometheus/metrics/summary").json()
            slowest = max(slowest, time.perf_counter() - t0)
            assert body["status"] == "ok", body
            time.sleep(0.3)
    for t in threads:
        t.join(60)
    assert slowest < 1.0, slowest
    assert statuses == [200] * 4


def test_split_parts_of_a_long_range_each_ask_the_clients_scheduler(prom_stack: PromStack) -> None:
    """A range query split by interval (engines/splitting.py) sends one upstream query per
    part; each part takes its own turn in the client's upstream lane (one at a time here)."""
    def range_queries() -> float:  # Prometheus' own count
        text = httpx.get(f"{prom_stack.prometheus.url}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("prometheus_http_requests_total{") and '"/api/v1/query_range"' in line)

    def turns() -> float:
        return REGISTRY.get_sample_value("metrics_gateway_client_queue_wait_seconds_count",
                                         {"client": "parts", "lane": "upstream"}) or 0.0

    tokens = {"tok": {"name": "parts", "limits": {"max_concurrent_queries": 1}}}
    now = int(time.time()) // 60 * 60 - 600
    with app_with(prom_stack, tokens, range_cache_split_seconds=3600) as c:
        asked, took = range_queries(), turns()
        r = c.get("/api/v1/query_range", params={"query": "up", "start": now - 4 * 3600, "end": now, "step": 60},
                  headers=bearer("tok"))
        assert r.status_code == 200, r.text
        parts = range_queries() - asked
        assert parts >= 4  # four hours in one-hour parts
        assert turns() - took == parts
