"""A real Prometheus scraping the synthetic backend, shared by the gateway's integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.procs import Proc, start_prometheus, wait_until
from tests.support.synthetic_backend import SyntheticBackend, scrape_config


@dataclass
class PromStack:
    prometheus: Proc
    backend: SyntheticBackend
    workdir: Path

    def query(self, expr: str) -> list[dict[str, object]]:
        body = httpx.post(f"{self.prometheus.url}/api/v1/query", data={"query": expr}, timeout=5).json()
        return body["data"]["result"]  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def prom_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PromStack]:
    workdir = tmp_path_factory.mktemp("prom-stack")
    backend = SyntheticBackend()
    target = backend.start()
    backend.backfill(workdir / "prometheus" / "data", job="backend")
    prom = start_prometheus(
        workdir / "prometheus",
        scrape_config(target),
    )
    stack = PromStack(prom, backend, workdir)
    try:
        # Two live scrapes on top of the backfilled history: rate windows are full.
        wait_until(lambda: stack.query('count_over_time(up{job="backend"}[1m]) >= 2'), 30,
                   what="two scrapes of the synthetic backend")
        yield stack
    finally:
        prom.stop()
        backend.stop()
