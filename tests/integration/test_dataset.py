"""The generated GatewayZ-shaped history (benchmarks/dataset.py) in a real Prometheus.

Built small here (6 h, ~150 series) in a private cache root: the series the
metadata announces are the series Prometheus holds, the history ends at the
build's "now" (so panels ending now have data), and a second ensure() reuses the
cached build unless it is older than `max_age`.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from benchmarks.dataset import ensure
from tests.support.history import start_prometheus_on

pytestmark = pytest.mark.integration


def test_dataset_is_built_cached_and_served(tmp_path: Path) -> None:
    root = tmp_path / "datasets"
    ds = ensure(0.25, 150, root=root)
    meta = ds.path / "meta.json"
    built = meta.stat().st_mtime_ns
    assert ds.path.parent == root and 120 <= ds.series <= 180
    assert ds.end - ds.start == 6 * 3600 - ds.step
    assert ensure(0.25, 150, root=root, max_age=None).path == ds.path
    assert meta.stat().st_mtime_ns == built  # reused, not rebuilt

    prom = start_prometheus_on(ds, tmp_path / "prom")
    try:
        def value(expr: str) -> float:
            body = httpx.post(f"{prom.url}/api/v1/query", data={"query": expr, "time": str(ds.end)}, timeout=10)
            return float(body.json()["data"]["result"][0]["value"][1])

        assert value('count({__name__=~".+"})') == ds.series
        assert value("max(timestamp(redis_up))") == ds.end
        assert value("count(count_over_time(provider_availability[7h]))") == value("count(provider_availability)")
        assert value("min(count_over_time(redis_up[7h]))") == 6 * 3600 // ds.step
        # Counters only go up: a week-long panel's rate is never negative.
        assert value("min(resets(model_inference_requests_total[7h]))") == 0
    finally:
        prom.stop()

    rebuilt = ensure(0.25, 150, root=root, max_age=0)
    assert rebuilt.path == ds.path and meta.stat().st_mtime_ns != built
