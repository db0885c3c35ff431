"""Multiprocess scrape: merge of several workers' files, damaged files skipped, via /metrics."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.parser import text_string_to_metric_families

from app.monitoring import install_monitoring
from app.monitoring.registry import (
    SafeMultiProcessCollector,
    multiprocess_dir,
    render,
    scrape_registry,
)
from tests.support.tools import needs

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
HELP = "HTTP requests answered, by route template and status code."
LABELS = ["app_name", "method", "path", "status_code"]


def open_db(path: Path) -> Any:
    return MmapedDict(str(path))  # type: ignore[no-untyped-call]


def write_worker_files(directory: Path, pid: int, requests: float, in_progress: float) -> None:
    """What one worker leaves in PROMETHEUS_MULTIPROC_DIR (as prometheus_client writes it)."""
    counter = open_db(directory / f"counter_{pid}.db")
    counter.write_value(
        mmap_key("fastapi_requests", "fastapi_requests_total", LABELS,
                 ["mp", "GET", "/ping", "200"], HELP),
        requests, 0.0,
    )
    counter.close()
    gauge = open_db(directory / f"gauge_livesum_{pid}.db")
    gauge.write_value(
        mmap_key("fastapi_requests_in_progress", "fastapi_requests_in_progress",
                 ["app_name", "method", "path"], ["mp", "GET", "/ping"], "in progress"),
        in_progress, 0.0,
    )
    gauge.close()
    hist = open_db(directory / f"histogram_{pid}.db")
    labels = ["app_name", "method", "path"]
    for le, n in (("0.1", requests), ("+Inf", 0.0)):
        hist.write_value(
            mmap_key("fastapi_requests_duration_seconds", "fastapi_requests_duration_seconds_bucket",
                     [*labels, "le"], ["mp", "GET", "/ping", le], "duration"),
            n, 0.0,
        )
    hist.write_value(
        mmap_key("fastapi_requests_duration_seconds", "fastapi_requests_duration_seconds_sum",
                 labels, ["mp", "GET", "/ping"], "duration"),
        requests * 0.01, 0.0,
    )
    hist.close()


def sample(body: str, name: str, labels: dict[str, str]) -> float | None:
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


@pytest.fixture
def mp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "prom"
    directory.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    return directory


def test_single_process_uses_default_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert multiprocess_dir() is None
    assert scrape_registry() is REGISTRY


def test_merges_every_worker(mp_dir: Path) -> None:
    for pid, n in ((101, 3), (102, 4), (103, 5)):
        write_worker_files(mp_dir, pid, n, 1)
    body = render(None, None).body.decode()
    ping = {"app_name": "mp", "method": "GET", "path": "/ping"}
    assert sample(body, "fastapi_requests_total", {**ping, "status_code": "200"}) == 12
    assert sample(body, "fastapi_requests_in_progress", ping) == 3  # livesum
    assert sample(body, "fastapi_requests_duration_seconds_count", ping) == 12
    assert sample(body, "metrics_gateway_multiproc_files", {}) == 9
    assert sample(body, "metrics_gateway_multiproc_skipped_files", {}) == 0
    assert "pid=" not in body


def test_empty_file_from_killed_worker_is_skipped(mp_dir: Path) -> None:
    write_worker_files(mp_dir, 101, 3, 0)
    (mp_dir / "counter_999.db").write_bytes(b"")  # created, never sized: worker killed
    body = render(None, None).body.decode()
    assert sample(body, "fastapi_requests_total", {"path": "/ping"}) == 3
    assert sample(body, "metrics_gateway_multiproc_skipped_files", {}) == 1


def test_corrupt_file_is_skipped_and_others_still_merge(mp_dir: Path) -> None:
    write_worker_files(mp_dir, 101, 3, 0)
    write_worker_files(mp_dir, 102, 2, 0)
    bad = mp_dir / "counter_102.db"
    data = bytearray(bad.read_bytes())
    data[0:4] = (10**6).to_bytes(4, "little")  # "used" claims far more than the file holds
    bad.write_bytes(bytes(data[:64]))
    collector = SafeMultiProcessCollector(None, str(mp_dir))
    merged = {m.name: m for m in collector.collect()}
    total = sum(s.value for s in merged["fastapi_requests"].samples)
    assert total == 3
    assert collector.stats.skipped == 1


def test_metrics_endpoint_serves_merge_in_multiprocess_mode(mp_dir: Path) -> None:
    for pid, n in ((201, 10), (202, 7)):
        write_worker_files(mp_dir, pid, n, 0)
    (mp_dir / "histogram_203.db").write_bytes(b"")
    app = FastAPI()
    install_monitoring(app)

    async def scrape() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.get("/metrics")

    import asyncio

    r = asyncio.run(scrape())
    assert r.status_code == 200
    assert sample(r.text, "fastapi_requests_total", {"path": "/ping"}) == 17


@pytest.mark.integration
@needs("promtool")
def test_promtool_accepts_merged_output(mp_dir: Path) -> None:
    for pid, n in ((301, 1), (302, 2), (303, 3), (304, 4)):
        write_worker_files(mp_dir, pid, n, 1)
    body = render(None, None).body
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True,
                            timeout=30, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_openmetrics_merged_output(mp_dir: Path) -> None:
    write_worker_files(mp_dir, 401, 2, 0)
    rendered = render("application/openmetrics-text; version=1.0.0", "gzip")
    assert rendered.gzipped
    assert rendered.content_type.startswith("application/openmetrics-text")
