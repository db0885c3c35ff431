"""A real Prometheus serving generated GatewayZ-shaped history (benchmarks/dataset.py).

`history_prometheus` (session fixture): the CI size, 2 days x ~300 series at 60 s,
built in seconds and kept between runs in the dataset cache (see benchmarks/dataset.py;
``METRICS_GATEWAY_DATASETS`` overrides where). Its history ends near now, so panels
ending now have a live tail. `start_prometheus_on` serves any dataset (the week for
benchmarks) from a private copy of its blocks, with retention far beyond its span.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks.dataset import Dataset, copy_tsdb, ensure
from tests.support.procs import PROMETHEUS_BIN, Proc, _spawn, free_port, prometheus_ready

CI_DAYS = 2
CI_SERIES = 300


@dataclass
class HistoryPrometheus:
    proc: Proc
    dataset: Dataset

    @property
    def url(self) -> str:
        return self.proc.url


def start_prometheus_on(ds: Dataset, workdir: Path, *, extra_args: tuple[str, ...] = (),
                        config: str = "global:\n  scrape_interval: 15s\n", timeout: float = 60.0) -> Proc:
    """A real Prometheus on loopback over a private copy of `ds` (no scrapes unless `config` has some).

    Retention is far beyond the history (blocks older than retention are deleted at
    start), and compaction is held to 2 h blocks so the backfilled blocks stay as
    built during a measurement.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    data = copy_tsdb(ds, workdir / "data")
    cfg = workdir / "prometheus.yml"
    cfg.write_text(config)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _spawn([PROMETHEUS_BIN, f"--config.file={cfg}", f"--storage.tsdb.path={data}",
                   f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=3650d",
                   "--storage.tsdb.min-block-duration=2h", "--storage.tsdb.max-block-duration=2h",
                   "--web.enable-lifecycle", "--log.level=warn", *extra_args],
                  workdir, "prometheus", port=port, url=url)
    return prometheus_ready(proc, timeout)


@pytest.fixture(scope="session")
def history_dataset() -> Dataset:
    """The CI dataset (2 days, ~300 series), built once and kept in the dataset cache."""
    return ensure(CI_DAYS, CI_SERIES, max_age=3600)


@pytest.fixture(scope="session")
def history_prometheus(history_dataset: Dataset,
                       tmp_path_factory: pytest.TempPathFactory) -> Iterator[HistoryPrometheus]:
    """A real Prometheus holding the CI dataset; stopped at the end of the session."""
    proc = start_prometheus_on(history_dataset, tmp_path_factory.mktemp("history-prom"))
    try:
        yield HistoryPrometheus(proc, history_dataset)
    finally:
        proc.stop()
