"""Worker recycling under the shipped gunicorn config: exact totals, no pile-up of files.

gunicorn with GUNICORN_MAX_REQUESTS=10 and 2 workers serves 150 requests, so a
dozen workers come and go; child_exit folds each dead worker's metric files into
the archive (app/monitoring/registry.py). /metrics still counts every request
exactly, and the directory holds only the live workers' files plus the archive.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gunicorn import start_gunicorn, worker_pids
from tests.support.procs import Proc, wait_until

pytestmark = pytest.mark.integration

REQUESTS = 150


@pytest.fixture
def recycling(tmp_path: Path) -> Iterator[tuple[Proc, Path]]:
    prom_dir = tmp_path / "prom"
    proc = start_gunicorn(tmp_path, "tests.integration.mp_app:app", workers=2,
                          env={"PROMETHEUS_MULTIPROC_DIR": str(prom_dir), "GUNICORN_MAX_REQUESTS": "10",
                               "LOG_LEVEL": "WARNING"})
    yield proc, prom_dir
    proc.stop()


def _get(url: str) -> httpx.Response:
    """One request on a new connection; a worker being replaced may refuse it once or twice."""
    def attempt() -> httpx.Response | None:
        try:
            r = httpx.get(url, timeout=5.0)
        except httpx.TransportError:
            return None
        return r if r.status_code == 200 else None

    result = wait_until(attempt, 20, interval=0.05, what=url)
    assert isinstance(result, httpx.Response)
    return result


def _value(body: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_recycled_workers_totals_exact_and_files_compacted(recycling: tuple[Proc, Path]) -> None:
    proc, prom_dir = recycling
    pids = {int(_get(f"{proc.url}/ping").json()["pid"]) for _ in range(REQUESTS)}
    assert len(pids) >= 8, f"only {len(pids)} workers served: not recycling"
    body = _get(f"{proc.url}/metrics").text
    assert _value(body, "fastapi_requests_total", path="/ping") == REQUESTS
    compacted = _value(body, "metrics_gateway_multiproc_compacted_workers")
    assert compacted >= len(pids) - 2
    # Scrapes answered by other (new) workers agree.
    for _ in range(4):
        assert _value(_get(f"{proc.url}/metrics").text, "fastapi_requests_total", path="/ping") == REQUESTS
    live = worker_pids(proc.popen.pid)
    wait_until(lambda: len(worker_pids(proc.popen.pid)) == 2, 20, what="2 workers")
    live = worker_pids(proc.popen.pid)
    files = sorted(f for f in os.listdir(prom_dir) if f.endswith(".db"))
    owners = {f[:-3].rsplit("_", 1)[1] for f in files}
    # Only live workers' files (a worker that just exited may be mid-compaction).
    assert len(owners - {str(p) for p in live}) <= 1, (files, live)
    assert (prom_dir / "archive.current").is_symlink()
