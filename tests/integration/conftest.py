"""Real Prometheus servers scraping synthetic backends, shared by the gateway's integration tests.

`prom_stack`: the backend with every family the real GatewayZ backend defines, with
data and 7 minutes of backfilled history. `legacy_gauge_stack`: an older backend that
exports provider_response_time_seconds as a gauge. `no_provider_stack`: the real
backend as it is at HEAD, where nothing records the provider families (HELP and TYPE
lines, no series).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.procs import Proc, start_prometheus, wait_until
from tests.support.redis_cluster import RedisClusterProcs, start_redis_cluster
from tests.support.synthetic_backend import (
    LEGACY_GAUGE_SERIES,
    LEGACY_GAUGE_TYPES,
    NO_PROVIDER_SERIES,
    SyntheticBackend,
    scrape_config,
)


@dataclass
class PromStack:
    prometheus: Proc
    backend: SyntheticBackend
    workdir: Path

    def query(self, expr: str) -> list[dict[str, object]]:
        body = httpx.post(f"{self.prometheus.url}/api/v1/query", data={"query": expr}, timeout=5).json()
        return body["data"]["result"]  # type: ignore[no-any-return]


@contextmanager
def synthetic_stack(workdir: Path, backend: SyntheticBackend, *, backfill: bool = True) -> Iterator[PromStack]:
    """A Prometheus scraping `backend` every second; with `backfill`, rate windows are full at once."""
    target = backend.start()
    try:
        if backfill:
            backend.backfill(workdir / "prometheus" / "data", job="backend")
        prom = start_prometheus(workdir / "prometheus", scrape_config(target))
    except BaseException:
        backend.stop()
        raise
    stack = PromStack(prom, backend, workdir)
    try:
        # Two live scrapes: rate() has two samples, and the target's metadata is known.
        wait_until(lambda: stack.query('count_over_time(up{job="backend"}[1m]) >= 2'), 30,
                   what="two scrapes of the synthetic backend")
        yield stack
    finally:
        prom.stop()
        backend.stop()


@pytest.fixture(scope="session")
def prom_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PromStack]:
    with synthetic_stack(tmp_path_factory.mktemp("prom-stack"), SyntheticBackend()) as stack:
        yield stack


@pytest.fixture(scope="session")
def legacy_gauge_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PromStack]:
    backend = SyntheticBackend(series=list(LEGACY_GAUGE_SERIES), types=dict(LEGACY_GAUGE_TYPES))
    with synthetic_stack(tmp_path_factory.mktemp("legacy-stack"), backend, backfill=False) as stack:
        yield stack


@pytest.fixture(scope="session")
def no_provider_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PromStack]:
    backend = SyntheticBackend(series=list(NO_PROVIDER_SERIES))
    with synthetic_stack(tmp_path_factory.mktemp("no-provider-stack"), backend, backfill=False) as stack:
        yield stack


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcs]:
    """A real 3-master + 3-replica Redis Cluster on loopback, shared by the tests that do not
    kill its nodes (slot migrations keep it whole: they only move slots between masters)."""
    cluster = start_redis_cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()
