"""Late samples: an exporter stamps its samples minutes in the past, as a remote-write
pipeline delivers them; the gateway's answers must still equal Prometheus'.

A real Prometheus scrapes a tiny exporter every second; each scrape carries a
counter sample with an explicit timestamp LAG seconds in the past. A range panel
ending now is asked through the gateway, then again once newer (late) samples have
arrived, and compared with Prometheus' answer to the same request:

- within the freshness window (default 10 min > LAG): equal at once; the old 60 s
  window is shown to be wrong here (cached instants miss the late samples);
- later than the window: equal again within the stated bound (the re-check of
  recently settled extents, RANGE_CACHE_RECHECK_SECONDS).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.gateway.settings import GatewaySettings
from app.main import create_app
from tests.support.procs import Proc, serve_exposition, start_prometheus, wait_until

pytestmark = pytest.mark.integration

LAG = 90  # seconds: later than the old 60 s live window, within the 10 min default
STEP = 5


class LateExporter:
    """Serves `late_total` with an explicit timestamp LAG seconds ago, +1 per scrape."""

    def __init__(self) -> None:
        self.count = 0
        self.server, self.port = serve_exposition(self.exposition, "text/plain; version=0.0.4")

    def exposition(self) -> bytes:
        self.count += 1
        stamp = int((time.time() - LAG) * 1000)
        return f"# TYPE late_total counter\nlate_total {self.count} {stamp}\n".encode()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def late_prom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    exporter = LateExporter()
    workdir: Path = tmp_path_factory.mktemp("late")
    scrape = (f"  - job_name: late\n    honor_timestamps: true\n"
              f"    static_configs:\n      - targets: ['127.0.0.1:{exporter.port}']\n")
    try:
        prom = start_prometheus(workdir, scrape)
    except BaseException:
        exporter.stop()
        raise
    try:
        url = prom.url
        wait_until(lambda: httpx.post(f"{url}/api/v1/query", data={"query": "count_over_time(late_total[5m]) > 5"},
                                      timeout=2).json()["data"]["result"], 40, what="late samples stored")
        yield prom
    finally:
        prom.stop()
        exporter.stop()


def gateway(prom: Proc, **overrides: float) -> TestClient:
    settings = GatewaySettings(prometheus_url=prom.url, request_deadline_seconds=20,
                               range_cache_live_ttl_seconds=0, **overrides)  # type: ignore[arg-type]
    return TestClient(create_app(settings))


def panel(client: httpx.Client | TestClient, start: int, end: int) -> bytes:
    resp = client.post("/api/v1/query_range", data={"query": "late_total", "start": str(start),
                                                     "end": str(end), "step": str(STEP)})
    assert resp.status_code == 200, resp.text[:300]
    return resp.content


def window() -> tuple[int, int]:
    end = math.floor(time.time() / STEP) * STEP
    return end - 600, end


def test_samples_later_than_the_old_live_window_are_exact_within_the_default_freshness(late_prom: Proc) -> None:
    with (gateway(late_prom) as fresh, gateway(late_prom, range_cache_live_window_seconds=60) as old,
          httpx.Client(base_url=late_prom.url, timeout=20) as direct):
        start, end = window()
        assert panel(fresh, start, end) == panel(direct, start, end)
        panel(old, start, end)
        time.sleep(STEP + 3)  # newer late samples arrive, for instants the old window had settled
        assert panel(fresh, start, end) == panel(direct, start, end)
        assert panel(old, start, end) != panel(direct, start, end)  # what the 10 min default fixes


def test_samples_later_than_the_window_correct_the_cache_within_the_recheck_bound(late_prom: Proc) -> None:
    recheck = 3.0
    with (gateway(late_prom, range_cache_live_window_seconds=30, range_cache_recheck_seconds=recheck) as checked,
          gateway(late_prom, range_cache_live_window_seconds=30, range_cache_recheck_seconds=3600) as unchecked,
          httpx.Client(base_url=late_prom.url, timeout=20) as direct):
        start, end = window()
        settled_end = end - 40  # every instant older than the 30 s window: the whole answer kept
        for gw in (checked, unchecked):
            panel(gw, start, end)
            panel(gw, start, settled_end)
        time.sleep(recheck + 2)
        for s, e in ((start, end), (start, settled_end)):
            want = panel(direct, s, e)
            assert panel(checked, s, e) == want  # re-fetched: the late samples are there
            assert panel(unchecked, s, e) != want  # kept as first fetched: wrong
