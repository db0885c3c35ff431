"""Fixtures of the fault suite: fake upstream, real gateway processes, measurement helpers.

Set ``FAULTS_REPORT=/path/report.json`` to get every measured fault (what was
injected, the answer, its latency, the metric and log evidence) as JSON;
``scripts/reliability.py`` turns that into docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.faults.fake_upstream import FakePrometheus
from tests.support.procs import Proc, start_uvicorn, wait_until

DEADLINE = 1.0
MARGIN = 0.5
_REPORT: list[dict[str, Any]] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/faults/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.faults)


@pytest.fixture(scope="session", autouse=True)
def report() -> Iterator[list[dict[str, Any]]]:
    yield _REPORT
    path = os.environ.get("FAULTS_REPORT")
    if path:
        Path(path).write_text(json.dumps(_REPORT, indent=2) + "\n")


def record(entry: dict[str, Any]) -> None:
    _REPORT.append(entry)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakePrometheus]:
    server = FakePrometheus().start()
    try:
        yield server
    finally:
        server.stop()


def gateway_env(prometheus_url: str, **extra: str) -> dict[str, str]:
    env = {
        "PROMETHEUS_URL": prometheus_url,
        "REQUEST_DEADLINE_SECONDS": str(DEADLINE),
        "CONNECT_TIMEOUT_SECONDS": "0.5",
        "CACHE_TTL_SECONDS": "0",
        "STALE_MAX_AGE_SECONDS": "0",
        "RESPONSE_MEMO_SECONDS": "0",
        "BREAKER_FAILURE_THRESHOLD": "1000",
        "PROMETHEUS_MAX_RESPONSE_BYTES": str(1024 * 1024),
        "LOG_LEVEL": "WARNING",
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "READY_TIMEOUT_SECONDS": "1",
    }
    env.update(extra)
    return env


@dataclass
class Gateway:
    proc: Proc
    client: httpx.Client

    @property
    def url(self) -> str:
        return self.proc.url

    @property
    def pid(self) -> int:
        return self.proc.popen.pid

    def log_mark(self) -> int:
        return self.proc.log_path.stat().st_size

    def log_since(self, mark: int) -> list[str]:
        with open(self.proc.log_path, "rb") as f:
            f.seek(mark)
            return f.read().decode(errors="replace").splitlines()

    def timed_get(self, path: str, **kw: Any) -> tuple[httpx.Response, float]:
        t0 = time.perf_counter()
        r = self.client.get(self.url + path, **kw)
        return r, time.perf_counter() - t0

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = self.client.get(self.url + "/metrics").text
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out


def metric(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def start_gateway(workdir: Path, env: dict[str, str]) -> Gateway:
    proc = start_uvicorn(workdir, "app.main:app", env=env)
    return Gateway(proc, httpx.Client(timeout=10))


def stop_gateway(gw: Gateway) -> None:
    gw.client.close()
    gw.proc.stop()


def established(pid: int, remote_port: int) -> int:
    """ESTABLISHED TCP connections owned by `pid` to 127.0.0.1:`remote_port` (from /proc)."""
    inodes: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        remote, state, inode = cols[2], cols[3], cols[9]
        if state == "01" and inode in inodes and int(remote.split(":")[1], 16) == remote_port:
            count += 1
    return count


def settle(check: Any, timeout: float = 5.0) -> None:
    wait_until(check, timeout, 0.05, what="connections to settle")
