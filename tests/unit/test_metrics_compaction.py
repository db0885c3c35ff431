"""Dead workers' multiprocess files folded into one archive (app/monitoring/registry.py).

The files are written by prometheus_client itself (its multiprocess value class,
with the process id under the test's control, so hundreds of "workers" come and
go in one test process). Expected values come from prometheus_client's own
MultiProcessCollector over an untouched copy of the directory: compaction must
change nothing a scrape reports, except the series of dead processes that
describe only living ones (``live*`` and ``all`` gauges).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import Counter, Gauge, Histogram, values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from app.monitoring.registry import (
    ARCHIVE_LINK,
    SafeMultiProcessCollector,
    compact_dead_worker,
    current_archive,
    render,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Workers:
    """Metrics as a gunicorn worker defines them, written for whichever pid is 'current'."""

    FIRST = 999  # the process that defined the metrics (unlabelled ones get a file at once)

    def __init__(self, directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pid = self.FIRST
        self.clock = 1_700_000_000.0
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
        monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue(lambda: self.pid))
        monkeypatch.setattr("prometheus_client.metrics.time", SimpleNamespace(time=lambda: self.clock))
        self.requests = Counter("fastapi_requests", "Requests.", ["method", "path", "status_code"],
                                registry=None)
        self.duration = Histogram("fastapi_requests_duration_seconds", "Duration.", ["path"],
                                  buckets=(0.25, 0.5, 1.0), registry=None)
        self.in_progress = Gauge("fastapi_requests_in_progress", "In progress.", ["path"],
                                 multiprocess_mode="livesum", registry=None)
        self.up = Gauge("metrics_gateway_upstream_up", "Up.", multiprocess_mode="mostrecent", registry=None)
        self.last_ok = Gauge("metrics_gateway_upstream_last_success_timestamp_seconds", "Last.",
                             multiprocess_mode="max", registry=None)
        self.low = Gauge("test_lowest_seconds", "Min.", multiprocess_mode="min", registry=None)
        self.total = Gauge("test_cache_entries", "Sum.", multiprocess_mode="sum", registry=None)
        self.per_pid = Gauge("test_per_process", "All.", registry=None)  # mode "all"
        self.live_all = Gauge("test_live_per_process", "Liveall.", multiprocess_mode="liveall", registry=None)

    def work(self, pid: int, n: int) -> None:
        """Worker `pid` serves `n` requests (exact binary values, so sums are exact)."""
        self.pid = pid
        self.clock += 1.0
        for i in range(n):
            path = f"/p{i % 5}"
            self.requests.labels("GET", path, "200" if i % 4 else "503").inc()
            self.duration.labels(path).observe((i % 4) * 0.25)
        self.in_progress.labels("/p0").set(pid % 3)
        self.up.set(pid % 2)
        self.last_ok.set(self.clock)
        self.low.set(1000 - pid % 97)
        self.total.set(pid % 11)
        self.per_pid.set(pid)
        self.live_all.set(pid)


@pytest.fixture
def mp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Workers]]:
    # tmpfs when there is one, like a production PROMETHEUS_MULTIPROC_DIR (/run, emptyDir
    # medium Memory): directory operations on a journaled disk cost ~5x more.
    shm = Path("/dev/shm")
    base = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path
    directory = base / "prom"
    directory.mkdir()
    try:
        yield directory, Workers(directory, monkeypatch)
    finally:
        if base != tmp_path:
            shutil.rmtree(base, ignore_errors=True)


def samples(collect: Callable[[], object]) -> Samples:
    out: Samples = {}
    for family in collect():  # type: ignore[attr-defined]
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def stock_expectation(reference: Path, dead: list[int]) -> Samples:
    """prometheus_client's own merge of the uncompacted files, minus dead pids' all-gauges."""
    for pid in dead:
        mark_process_dead(pid, str(reference))
    expected = samples(lambda: MultiProcessCollector(None, str(reference)).collect())
    dead_pids = {str(p) for p in dead}
    return {k: v for k, v in expected.items() if dict(k[1]).get("pid") not in dead_pids}


def test_compaction_keeps_every_total_exact(mp: tuple[Path, Workers], tmp_path: Path) -> None:
    directory, workers = mp
    dead = [Workers.FIRST, *range(1000, 1060)]
    for pid in dead[1:]:
        workers.work(pid, n=7 + pid % 13)
    workers.work(2001, n=5)  # two workers still alive
    workers.work(2002, n=3)
    reference = tmp_path / "reference"
    shutil.copytree(directory, reference)

    for pid in dead:
        assert compact_dead_worker(str(directory), pid) >= 2
    got = samples(SafeMultiProcessCollector(None, str(directory)).collect)
    expected = stock_expectation(reference, dead)
    assert got == expected
    # The totals themselves, independently of prometheus_client's merge:
    served = sum(7 + pid % 13 for pid in dead[1:]) + 5 + 3
    requests = sum(v for (name, _), v in got.items() if name == "fastapi_requests_total")
    assert requests == served
    assert sum(v for (name, labels), v in got.items()
               if name == "fastapi_requests_duration_seconds_count") == served
    assert got[("metrics_gateway_upstream_up", ())] == 2002 % 2  # the most recent set
    # (the defining process set nothing: its 0 counts, as it would with its file kept)
    assert got[("test_lowest_seconds", ())] == min([0, *(1000 - p % 97 for p in [*dead[1:], 2001, 2002])])
    assert got[("test_cache_entries", ())] == sum(p % 11 for p in [*dead[1:], 2001, 2002])
    assert {dict(labels)["pid"] for (name, labels) in got if name == "test_per_process"} == {"2001", "2002"}
    # Nothing of the dead workers is left but the archive.
    left = sorted(os.path.basename(f) for f in glob.glob(str(directory / "*.db")))
    assert all(f.endswith(("_2001.db", "_2002.db")) for f in left), left
    archive = current_archive(str(directory))
    assert archive.compacted == len(dead)
    assert sorted(os.path.basename(p) for p in glob.glob(str(directory / "archive.*"))) == [
        f"archive.{archive.generation}", "archive.current", "archive.lock"]  # one generation left


def test_a_scrape_between_the_two_steps_of_a_compaction_counts_nothing_twice(
        mp: tuple[Path, Workers]) -> None:
    """The generation that already holds a pid's values says so: its files, still there
    for a moment, are skipped."""
    directory, workers = mp
    workers.work(3001, n=10)
    workers.work(3002, n=20)
    compact_dead_worker(str(directory), Workers.FIRST)
    before = samples(SafeMultiProcessCollector(None, str(directory)).collect)
    reference = directory.parent / "keep"
    shutil.copytree(directory, reference)
    compact_dead_worker(str(directory), 3001)
    # Put the dead worker's file back and point the archive at a generation that
    # lists it as skipped, as between step 1 and step 2.
    shutil.copy(reference / "counter_3001.db", directory / "counter_3001.db")
    archive = current_archive(str(directory))
    assert archive.directory is not None
    manifest = Path(archive.directory) / "manifest.json"
    doc = json.loads(manifest.read_text())
    st = (directory / "counter_3001.db").stat()
    doc["skip"] = {"counter_3001.db": [st.st_ino, st.st_ctime_ns]}
    manifest.write_text(json.dumps(doc))
    during = samples(SafeMultiProcessCollector(None, str(directory)).collect)
    assert sum(v for (n, _), v in during.items() if n == "fastapi_requests_total") == 30
    assert sum(v for (n, _), v in before.items() if n == "fastapi_requests_total") == 30
    # A new worker that got the same pid writes a new file: that one is not skipped.
    (directory / "counter_3001.db").unlink()
    workers.work(3001, n=4)
    after = samples(SafeMultiProcessCollector(None, str(directory)).collect)
    assert sum(v for (n, _), v in after.items() if n == "fastapi_requests_total") == 34


def test_a_scrape_retries_when_the_archive_moves_under_it(mp: tuple[Path, Workers],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    directory, workers = mp
    compact_dead_worker(str(directory), Workers.FIRST)
    workers.work(4001, n=6)
    workers.work(4002, n=4)
    collector = SafeMultiProcessCollector(None, str(directory))
    original = collector._merge_once
    calls = []

    def merge_while_compacting(path: str, archive):  # type: ignore[no-untyped-def]
        merged = original(path, archive)
        if not calls:  # the first read races a compaction that lands right after it
            compact_dead_worker(str(directory), 4001)
        calls.append(archive.directory)
        return merged

    monkeypatch.setattr(collector, "_merge_once", merge_while_compacting)
    got = samples(collector.collect)
    assert len(calls) == 2 and calls[0] != calls[1]
    assert sum(v for (n, _), v in got.items() if n == "fastapi_requests_total") == 10


def _render_seconds(repeat: int = 7) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        render(None, None)
        times.append(time.perf_counter() - t0)
    return sorted(times)[repeat // 2]


def test_merge_time_is_flat_in_the_number_of_dead_workers(mp: tuple[Path, Workers], tmp_path: Path) -> None:
    """1,000 recycled workers, compacted: a scrape costs about what it costs with none."""
    directory, workers = mp
    workers.work(9001, n=40)
    workers.work(9002, n=40)
    compact_dead_worker(str(directory), Workers.FIRST)
    baseline = _render_seconds()
    for pid in range(10_000, 11_000):
        workers.work(pid, n=20)
        compact_dead_worker(str(directory), pid)
    workers.work(9001, n=1)  # the live workers keep serving
    after = _render_seconds()
    assert os.path.islink(directory / ARCHIVE_LINK)
    left = [os.path.basename(f) for f in glob.glob(str(directory / "*.db"))]
    assert all(f.endswith(("_9001.db", "_9002.db")) for f in left), left
    # Flat: within 50% (+2 ms for a shared, noisy CPU); uncompacted it is ~10x (see docs/reliability.md).
    assert after < baseline * 1.5 + 0.002, (baseline, after)
