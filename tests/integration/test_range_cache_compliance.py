"""The PromQL compliance query list through the gateway equals Prometheus, cold and warm.

A real Prometheus holds three hours of generated demo_* history (the metric
names, types and labels the prometheus/compliance queries read; see
tests/support/demo_data.py). Every one of the 539 expanded queries is asked as
a range query through the gateway's /api/v1/query_range twice (cold: fetched;
warm: assembled from the range cache's extents plus the live window) and of
Prometheus directly, and the answers must be the same: status, resultType and
result after sorting as Prometheus sorts a matrix, or the same errorType and
HTTP status. A deterministic sample of the queries is then asked in the other
request shapes Grafana sends: windows shifted by whole steps (new edges only,
one in the future), Grafana-aligned windows at UTC offsets 0, +05:30 and -05:00,
and a 1 d step.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.gateway.caching.extents import label_key
from app.gateway.settings import GatewaySettings
from app.main import create_app
from tests.support.demo_data import (
    compliance_queries,
    generate,
    grafana_align,
    start_prometheus_with_history,
)
from tests.support.procs import Proc

pytestmark = pytest.mark.integration

SAMPLE_EVERY = 9  # the other shapes run every 9th query (and every should_fail query)
CACHED = {"hit", "partial"}


@dataclass
class Stack:
    prometheus: Proc
    gateway: TestClient
    prom: httpx.Client


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir: Path = tmp_path_factory.mktemp("compliance")
    series = generate(time.time() - 20)
    prom = start_prometheus_with_history(workdir / "prometheus", series)
    # Live instants are not kept at all here (RANGE_CACHE_LIVE_TTL_SECONDS=0), so a warm ask
    # of a window ending now is assembled from stored extents plus a fresh live edge,
    # never the remembered body of the cold ask.
    settings = GatewaySettings(prometheus_url=prom.url, request_deadline_seconds=20,
                               range_cache_live_ttl_seconds=0)
    try:
        with TestClient(create_app(settings)) as gateway, httpx.Client(base_url=prom.url, timeout=20) as direct:
            yield Stack(prom, gateway, direct)
    finally:
        prom.stop()


def canonical(resp: httpx.Response, sort: bool = False) -> dict[str, Any]:
    """What must be equal: the envelope and the result. Prometheus sorts a matrix by
    labels itself, so against Prometheus the order is compared as sent (`sort` sorts
    both sides for an upstream that does not)."""
    doc = resp.json()
    if doc.get("status") != "success":
        return {"code": resp.status_code, "status": doc.get("status"), "errorType": doc.get("errorType")}
    data = doc["data"]
    result = data["result"]
    if sort and data["resultType"] == "matrix":
        result = sorted(result, key=lambda s: label_key(s["metric"]))
    return {"code": resp.status_code, "status": "success", "resultType": data["resultType"],
            "result": result, "warnings": doc.get("warnings"), "infos": doc.get("infos")}


def compare(stack: Stack, query: str, start: float, end: float, step: float,
            warm: bool = True) -> list[str]:
    """Ask the gateway (cold, then warm) and Prometheus; the differences found, if any."""
    form = {"query": query, "start": _num(start), "end": _num(end), "step": _num(step)}
    cold = stack.gateway.post("/api/v1/query_range", data=form)
    expected = canonical(stack.prom.post("/api/v1/query_range", data=form))
    problems: list[str] = []
    if canonical(cold) != expected:
        problems.append(f"cold {form}: {_diff(canonical(cold), expected)}")
    if warm:
        again = stack.gateway.post("/api/v1/query_range", data=form)
        if canonical(again) != expected:
            problems.append(f"warm {form} ({again.headers.get('x-gateway-cache')}): "
                            f"{_diff(canonical(again), expected)}")
        elif expected["status"] == "success" and again.headers.get("x-gateway-cache") not in CACHED:
            problems.append(f"warm {form}: not served from the cache "
                            f"({again.headers.get('x-gateway-cache')})")
    return problems


def _num(v: float) -> str:
    text = repr(round(v, 3))
    return text[:-2] if text.endswith(".0") else text


def _diff(got: dict[str, Any], want: dict[str, Any]) -> str:
    if got.get("status") != want.get("status") or got.get("code") != want.get("code"):
        return f"got {got} want {want}"
    if got.get("result") != want.get("result"):
        gl, wl = got.get("result") or [], want.get("result") or []
        if len(gl) != len(wl):
            return f"{len(gl)} series, want {len(wl)}"
        for g, w in zip(gl, wl, strict=True):
            if g != w:
                return f"first differing series: got {str(g)[:400]} want {str(w)[:400]}"
    return f"got {str(got)[:300]} want {str(want)[:300]}"


def test_every_compliance_query_cold_and_warm_equals_prometheus(stack: Stack) -> None:
    queries = compliance_queries()
    assert len(queries) == 539
    problems: list[str] = []
    for item in queries:
        end = round(time.time(), 3)  # a window ending now, as a dashboard asks
        problems += compare(stack, item["query"], end - 3600, end, 15)
    assert not problems, f"{len(problems)} differences:\n" + "\n".join(problems[:20])


def sample() -> list[dict[str, Any]]:
    return [q for i, q in enumerate(compliance_queries()) if i % SAMPLE_EVERY == 0 or q["should_fail"]]


def test_shifted_windows_fetch_new_edges_and_equal_prometheus(stack: Stack) -> None:
    problems: list[str] = []
    end = round(time.time(), 3)
    for item in sample():
        q = item["query"]
        problems += compare(stack, q, end - 3600, end, 15)
        # Whole steps later (the next refresh: the new edge reads the future) and earlier
        # (a left edge before anything cached): the same grid, assembled from extents.
        problems += compare(stack, q, end - 3600 + 60, end + 60, 15)
        problems += compare(stack, q, end - 3600 - 900, end - 900, 15)
        # A window inside what is cached, and one straddling it.
        problems += compare(stack, q, end - 2400, end - 1200, 15, warm=False)
        problems += compare(stack, q, end - 5400, end - 1800, 15, warm=False)
    assert not problems, f"{len(problems)} differences:\n" + "\n".join(problems[:20])


@pytest.mark.parametrize("utc_offset", [0, 19800, -18000])
def test_grafana_aligned_windows_at_utc_offsets_and_a_day_step(stack: Stack, utc_offset: int) -> None:
    problems: list[str] = []
    now = time.time()
    shapes = [(60, 3 * 3600), (3600, 6 * 3600), (86400, 7 * 86400)]
    for item in sample():
        for step, span in shapes:
            start = grafana_align(now - span, step, utc_offset)
            end = grafana_align(now, step, utc_offset)
            problems += compare(stack, item["query"], start, end, step)
    assert not problems, f"{len(problems)} differences:\n" + "\n".join(problems[:20])


def test_the_warm_pass_asks_prometheus_only_for_the_live_window(stack: Stack) -> None:
    """Warm answers are assembled, not refetched: Prometheus sees the live edge only."""
    end = round(time.time(), 3)
    form = {"query": "rate(demo_cpu_usage_seconds_total[5m])", "start": _num(end - 3600),
            "end": _num(end), "step": "15"}
    before = _range_requests(stack)
    first = stack.gateway.post("/api/v1/query_range", data=form)
    assert first.headers["x-gateway-cache"] == "miss"
    again = stack.gateway.post("/api/v1/query_range", data=form)
    assert again.headers["x-gateway-cache"] == "partial"
    assert canonical(again) == canonical(stack.prom.post("/api/v1/query_range", data=form))
    # The gateway asked twice (the whole window, then the live edge), plus our direct ask.
    assert _range_requests(stack) - before == 3
    # Older than the live window: no upstream request at all.
    old = {**form, "start": _num(end - 3000), "end": _num(end - 600)}
    before = _range_requests(stack)
    hit = stack.gateway.post("/api/v1/query_range", data=old)
    assert hit.headers["x-gateway-cache"] == "hit"
    assert canonical(hit) == canonical(stack.prom.post("/api/v1/query_range", data=old))
    assert _range_requests(stack) == before + 1  # our own direct ask only


def _range_requests(stack: Stack) -> float:
    text = stack.prom.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("prometheus_http_requests_total{")
               and 'handler="/api/v1/query_range"' in line)


def test_instant_query_at_now_is_evaluated_at_a_reported_time_and_reused(stack: Stack) -> None:
    """Without `time` the gateway picks now, sends it upstream and reports it; the answer
    is Prometheus' own for that time, and is reused within the figure TTL."""
    query = "sum(demo_num_cpus) + time() * 0"
    first = stack.gateway.post("/api/v1/query", data={"query": query})
    assert first.headers["x-gateway-cache"] == "miss"
    at = first.headers["x-gateway-evaluation-time"]
    assert first.json()["data"]["result"][0]["value"][0] == pytest.approx(float(at))
    direct = stack.prom.post("/api/v1/query", data={"query": query, "time": at})
    assert canonical(first) == canonical(direct)
    again = stack.gateway.post("/api/v1/query", data={"query": query})
    assert again.headers["x-gateway-cache"] == "hit"
    assert again.headers["x-gateway-evaluation-time"] == at and again.json() == first.json()
    # An empty answer carries no sample time: the header still reports it.
    empty = stack.gateway.post("/api/v1/query", data={"query": "nonexistent_metric_name"})
    assert empty.json()["data"]["result"] == [] and float(empty.headers["x-gateway-evaluation-time"]) > 0
