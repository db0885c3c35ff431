"""Long ranges through the gateway equal Prometheus byte for byte: split, cold, warm, next.

A real Prometheus holds the CI dataset (benchmarks/dataset.py: two days of
GatewayZ-shaped history ending now, ~300 series at 60 s). Panels as Grafana sends
them (windows aligned to the step, ending now) are asked through the gateway cold,
again, one step later and over a past window inside them, and of Prometheus
directly: the bodies must be the same bytes. The cold ask must cost one upstream
query per part (the live tail fetched with the last part); a query that cannot be
split (``@ start()``) is one upstream query.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from fastapi.testclient import TestClient

from app.gateway.engines.splitting import part_len, split
from app.gateway.settings import GatewaySettings
from app.main import create_app
from benchmarks.bench_dashboard import range_requests
from tests.support.history import HistoryPrometheus

pytestmark = pytest.mark.integration

SPLIT = 6 * 3600  # small parts, so two days make several (the default is 24 h)
PANELS = [  # (query, step s)
    ("rate(model_inference_duration_seconds_bucket[5m])", 300),
    ("sum by (provider, model) (rate(tokens_used_total[5m]))", 60),
    ("histogram_quantile(0.95, sum by (le, provider) (rate(model_inference_duration_seconds_bucket[10m])))", 600),
    ("provider_error_rate > 0.04", 120),  # gaps: points only where the gauge is high
    ("max_over_time(rate(credits_used_total[5m])[1h:5m])", 900),
    ("sum by (status_class) (rate(fastapi_requests_total[5m] offset 1h))", 300),
    ("active_api_keys", 3600),
]


@dataclass
class Stack:
    prom: HistoryPrometheus
    gateway: TestClient
    direct: httpx.Client


@pytest.fixture(scope="module")
def stack(history_prometheus: HistoryPrometheus) -> Iterator[Stack]:
    settings = GatewaySettings(prometheus_url=history_prometheus.url, request_deadline_seconds=30,
                               range_cache_split_seconds=SPLIT, range_cache_live_ttl_seconds=0,
                               prometheus_max_response_bytes=64 * 1024 * 1024)
    with (TestClient(create_app(settings)) as gateway,
          httpx.Client(base_url=history_prometheus.url, timeout=30) as direct):
        yield Stack(history_prometheus, gateway, direct)


def window(step: int, days: float = 1.9) -> tuple[int, int]:
    end = math.floor(time.time() / step) * step  # Grafana's alignment
    return end - int(days * 86400) // step * step, end


def both(stack: Stack, query: str, start: int, end: int, step: int) -> tuple[httpx.Response, bytes, float]:
    """The gateway's answer, Prometheus' body, and the upstream range queries the gateway made."""
    form = {"query": query, "start": str(start), "end": str(end), "step": str(step)}
    before = range_requests(stack.prom.url)
    got = stack.gateway.post("/api/v1/query_range", data=form)
    asked = range_requests(stack.prom.url) - before
    want = stack.direct.post("/api/v1/query_range", data=form)
    assert want.status_code == 200
    return got, want.content, asked


@pytest.mark.parametrize(("query", "step"), PANELS)
def test_long_panels_equal_prometheus_cold_again_next_and_inside(stack: Stack, query: str, step: int) -> None:
    start, end = window(step)
    got, want, asked = both(stack, query, start, end, step)
    assert got.status_code == 200 and got.headers["x-gateway-cache"] == "miss"
    assert got.content == want, f"cold {query}"
    parts = split([(start * 1000, end * 1000)], step * 1000, part_len(step * 1000, SPLIT * 1000))
    assert len(parts) > 1 and asked == len(parts), f"cold: {asked} upstream queries for {len(parts)} parts"

    # Again, and one step later: at most the freshness window (and the new edge), in one
    # query with the part it ends; none when the last instant has settled (a 1 h step).
    got, want, asked = both(stack, query, start, end, step)
    assert got.content == want and got.headers["x-gateway-cache"] in ("partial", "hit"), f"again {query}"
    assert asked == (1 if got.headers["x-gateway-cache"] == "partial" else 0)

    got, want, asked = both(stack, query, start + step, end + step, step)
    assert got.content == want and got.headers["x-gateway-cache"] == "partial", f"next {query}"
    assert asked == 1

    inner = (start + 7 * step, start + (end - start) // step // 2 * step)
    got, want, asked = both(stack, query, *inner, step)
    assert got.content == want and got.headers["x-gateway-cache"] == "hit", f"inside {query}"
    assert asked == 0


def test_a_query_that_cannot_be_split_is_one_upstream_query(stack: Stack) -> None:
    start, end = window(300)
    query = "rate(model_inference_requests_total[5m] @ end())"
    got, want, asked = both(stack, query, start, end, 300)
    assert got.content == want and asked == 1
