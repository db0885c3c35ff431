"""The status page's trend lines, rendered by real headless Chromium.

A real Prometheus scrapes the synthetic backend on top of an hour of backfilled
history; the gateway runs as a real server (uvicorn). Chromium loads /status and
runs status.js, which asks the gateway's /api/v1/query_range for each summary
figure by its metric name (through the range cache). Every figure must get a
sparkline, and each sparkline must hold the points the API gives for the very
window it drew (its data-* attributes), the same the gateway serves to anyone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_status_page import dump_dom
from tests.support.procs import Proc, start_prometheus, start_uvicorn, wait_until
from tests.support.synthetic_backend import SyntheticBackend, scrape_config
from tests.support.tools import needs

pytestmark = [
    pytest.mark.e2e,
    needs("chromium"),
]


class Sparks(HTMLParser):
    """Every <svg class="spark"> (its attributes) and the figure box it sits in."""

    def __init__(self) -> None:
        super().__init__()
        self.sparks: dict[str, dict[str, str]] = {}
        self.figures: list[str] = []
        self._figure = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if a.get("id", "").startswith("fig-"):
            self._figure = a["id"]
            self.figures.append(self._figure)
        elif tag == "svg" and "spark" in a.get("class", "").split():
            self.sparks[self._figure] = a
        elif tag == "polyline" and self._figure in self.sparks:
            self.sparks[self._figure]["polyline"] = a.get("points", "")


@pytest.fixture()
def gateway(tmp_path: Path) -> Iterator[str]:
    backend = SyntheticBackend()
    target = backend.start()
    backend.backfill(tmp_path / "prometheus" / "data", job="backend", seconds=3600, step=15)
    prom = start_prometheus(tmp_path / "prometheus", scrape_config(target))
    app: Proc | None = None
    try:
        wait_until(lambda: httpx.post(f"{prom.url}/api/v1/query", data={"query": "up"}, timeout=2)
                   .json()["data"]["result"], 30, what="a scrape of the backend")
        app = start_uvicorn(tmp_path / "app", "app.main:create_app", factory=True,
                            env={"PROMETHEUS_URL": prom.url, "API_TOKENS": ""})
        yield app.url
    finally:
        if app is not None:
            app.stop()
        prom.stop()
        backend.stop()


def test_every_figure_has_a_sparkline_with_the_points_of_the_api(gateway: str) -> None:
    summary = httpx.get(f"{gateway}/prometheus/metrics/summary", timeout=10).json()
    html = dump_dom(f"{gateway}/status?refresh=60", budget_ms=15000)
    dom = Sparks()
    dom.feed(html)
    assert dom.figures, html[:2000]
    expected_figures = {f"fig-{section}-{key}": p["figure"]
                        for section, keys in summary["provenance"].items() for key, p in keys.items()}
    assert set(dom.figures) == set(expected_figures)
    missing = [f for f in dom.figures if f not in dom.sparks]
    assert not missing, f"no sparkline for {missing}"
    drawn = 0
    for fig_id, spark in dom.sparks.items():
        assert spark["data-figure"] == expected_figures[fig_id]
        start, end, step = spark["data-start"], spark["data-end"], spark["data-step"]
        assert float(end) - float(start) == 3600 and step == "60"
        assert float(end) <= time.time() and float(end) % 60 == 0  # a fixed minute grid
        api = httpx.post(f"{gateway}/api/v1/query_range", timeout=10, data={
            "query": f"sum({spark['data-figure']})", "start": start, "end": end, "step": step}).json()
        assert api["status"] == "success"
        values = api["data"]["result"][0]["values"] if api["data"]["result"] else []
        finite = [v for v in values if v[1] not in ("NaN", "+Inf", "-Inf")]
        assert int(spark["data-points"]) == len(finite), (fig_id, spark, len(finite))
        if finite:
            drawn += 1
            assert float(spark["data-last"]) == pytest.approx(float(finite[-1][1]))
            assert len(spark["polyline"].split()) == len(finite)
    # An hour of history: the backend's figures have trends (some may have none, e.g. 0/0).
    assert drawn >= len(dom.sparks) // 2, {k: v.get("data-points") for k, v in dom.sparks.items()}
