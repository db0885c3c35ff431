"""The status page names the figures without data, in real headless Chromium.

Against the real backend's shape at HEAD (provider families declared, never
recorded), the summary is "ok" with nulls for the provider figures; the page must
show those nulls as "no data" and list the figures by name, not just show dashes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_status_page import StatusDom, dump_dom
from tests.support.procs import Proc, start_prometheus, start_uvicorn, wait_until
from tests.support.synthetic_backend import NO_PROVIDER_SERIES, SyntheticBackend, scrape_config
from tests.support.tools import needs

pytestmark = [
    pytest.mark.e2e,
    needs("chromium"),
]
PROVIDER_KEYS = {"total_providers", "healthy_providers", "degraded_providers", "unavailable_providers",
                 "avg_error_rate", "avg_response_time_ms"}


@pytest.fixture()
def gateway(tmp_path: Path) -> Iterator[Proc]:
    backend = SyntheticBackend(series=list(NO_PROVIDER_SERIES))
    target = backend.start()
    prom = start_prometheus(tmp_path / "prom", scrape_config(target))
    api: Proc | None = None
    try:
        wait_until(lambda: httpx.post(f"{prom.url}/api/v1/query", data={"query": 'up{job="backend"} == 1'}
                                      ).json()["data"]["result"], 30, what="a scrape")
        api = start_uvicorn(tmp_path / "api", "app.main:app", env={"PROMETHEUS_URL": prom.url, "LOG_LEVEL": "WARNING"})
        yield api
    finally:
        if api is not None:
            api.stop()
        prom.stop()
        backend.stop()


def test_figures_without_data_are_listed_by_name(gateway: Proc) -> None:
    summary = httpx.get(f"{gateway.url}/prometheus/metrics/summary", timeout=10).json()
    assert summary["status"] == "ok" and summary["no_data"]
    html = dump_dom(f"{gateway.url}/status?refresh=60")
    dom = StatusDom()
    dom.feed(html)
    assert dom.elements["overall"]["data-status"] == "ok"
    box = re.search(r'<section id="no-data"[^>]*>', html)
    assert box is not None and "hidden" not in box.group(0), box
    listed = dict(re.findall(r'<li data-key="([^"]*)" data-query="([^"]*)">', html))
    assert {k.split(".", 1)[1] for k in listed if k.startswith("providers.")} == PROVIDER_KEYS
    assert set(listed.values()) >= set(summary["no_data"])
    assert "Providers · Avg response time" in html
    count = re.search(r'<span id="no-data-count">(\d+)</span>', html)
    assert count is not None and int(count.group(1)) == len(listed)
    for key in PROVIDER_KEYS:
        assert dom.figures[f"fig-providers-{key}"]["state"] == "nodata"
    assert re.search(r'<section class="card" id="section-providers" data-section="providers" '
                     r'data-state="nodata"', html)
    assert dom.figures["fig-http-in_progress"]["state"] in ("fresh", "cached")
