"""Native histograms through the range cache equal Prometheus' answers byte for byte.

A real Prometheus (``--enable-feature=native-histograms``) scrapes an exporter of
native histograms in the protobuf format every second. Range queries whose answers
carry ``histograms`` (the raw series, rate, sum) or floats computed from them are
asked through a gateway splitting ranges into parts of a few seconds: cold (one
upstream query per part, the parts assembled from their bytes), again (from the
stored extents) and inside the window, against Prometheus' own answer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from app.gateway.engines.splitting import part_len, split
from app.gateway.settings import GatewaySettings
from app.main import create_app
from benchmarks.bench_dashboard import range_requests
from tests.support.native_histograms import NativeHistogramExporter
from tests.support.procs import Proc, start_prometheus, wait_until

pytestmark = pytest.mark.integration

SPLIT = 3  # seconds per part: a 15 s window is five or six parts


@pytest.fixture(scope="module")
def native_prom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    exporter = NativeHistogramExporter()
    scrape = f"  - job_name: nh\n    static_configs:\n      - targets: ['127.0.0.1:{exporter.port}']\n"
    try:
        prom = start_prometheus(tmp_path_factory.mktemp("native"), scrape,
                                extra_args=("--enable-feature=native-histograms",))
    except BaseException:
        exporter.stop()
        raise
    try:
        wait_until(lambda: httpx.post(f"{prom.url}/api/v1/query", timeout=2, data={
            "query": "count_over_time(nh_request_seconds[1m]) >= 20"}).json()["data"]["result"],
            60, what="20 s of native histograms")
        yield prom
    finally:
        prom.stop()
        exporter.stop()


@pytest.mark.parametrize("query", [
    "nh_request_seconds",
    "rate(nh_request_seconds[5s])",
    "sum(rate(nh_request_seconds[5s]))",
    "histogram_quantile(0.9, rate(nh_request_seconds[5s]))",
    "histogram_count(rate(nh_request_seconds[5s])) or rate(nh_request_seconds[5s])",
])
def test_native_histograms_are_split_cached_and_assembled_exactly(native_prom: Proc, query: str) -> None:
    settings = GatewaySettings(prometheus_url=native_prom.url, range_cache_split_seconds=SPLIT,
                               range_cache_live_window_seconds=2, range_cache_live_ttl_seconds=0)
    end = math.floor(time.time()) - 3
    form = {"query": query, "start": str(end - 14), "end": str(end), "step": "1"}
    with TestClient(create_app(settings)) as gateway, httpx.Client(base_url=native_prom.url) as direct:
        want = direct.post("/api/v1/query_range", data=form).content
        assert b'"histograms":[' in want or "quantile" in query or "count" in query
        before = range_requests(native_prom.url)
        cold = gateway.post("/api/v1/query_range", data=form)
        parts = split([((end - 14) * 1000, end * 1000)], 1000, part_len(1000, SPLIT * 1000))
        assert range_requests(native_prom.url) - before == len(parts) >= 5  # one query per part
        assert cold.content == want
        again = gateway.post("/api/v1/query_range", data={**form, "end": str(end - 1)})
        assert again.headers["x-gateway-cache"] == "hit"
        assert again.content == direct.post("/api/v1/query_range", data={**form, "end": str(end - 1)}).content
        inner = {**form, "start": str(end - 10), "end": str(end - 4)}
        got = gateway.post("/api/v1/query_range", data=inner)
        assert got.headers["x-gateway-cache"] == "hit"
        assert got.content == direct.post("/api/v1/query_range", data=inner).content
