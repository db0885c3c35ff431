"""/metrics under gunicorn with 3 uvicorn workers: exact merged counts, a killed worker,
and a real Prometheus scraping it.

Everything binds to 127.0.0.1 on free ports, every wait is bounded, and every process
started here is stopped by a fixture finalizer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.procs import Proc, free_port, start_prometheus, wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
WORKERS = 3
TOKEN = "integration-metrics-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def worker_pids(master: int) -> set[int]:
    """Children of the gunicorn master (its workers), from /proc."""
    pids: set[int] = set()
    task_dir = Path(f"/proc/{master}/task")
    for task in task_dir.iterdir():
        try:
            text = (task / "children").read_text()
        except OSError:
            continue
        pids.update(int(p) for p in text.split())
    return pids


@pytest.fixture(scope="module")
def gunicorn_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    workdir = tmp_path_factory.mktemp("gunicorn")
    prom_dir = workdir / "prom"
    prom_dir.mkdir()
    # Left over from an earlier run: on_starting must wipe it, or /ping starts at 1000.
    (prom_dir / "counter_1.db").write_bytes(b"stale" * 100)
    port = free_port()
    log_path = workdir / "gunicorn.log"
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(prom_dir),
        "METRICS_TOKEN": TOKEN,
        "PYTHONPATH": str(REPO),
    }
    env.pop("GUNICORN_CMD_ARGS", None)
    cmd = [
        sys.executable, "-m", "gunicorn",
        "-c", str(REPO / "gunicorn.conf.py"),
        "--chdir", str(REPO),
        "--workers", str(WORKERS),
        "--bind", f"127.0.0.1:{port}",
        "--graceful-timeout", "5",
        "--log-level", "info",
        "tests.integration.mp_app:app",
    ]
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                                 env=env, start_new_session=True)
    proc = Proc(popen=popen, url=f"http://127.0.0.1:{port}", port=port, workdir=workdir,
                log_path=log_path, extra={"prom_dir": prom_dir})
    try:
        wait_until(lambda: httpx.get(f"{proc.url}/health", timeout=1.0).status_code == 200,
                   60, what="gunicorn /health")
        wait_until(lambda: len(worker_pids(popen.pid)) == WORKERS, 60, what="3 workers")
        # Every worker has booted when each answers; give stragglers a moment.
        wait_until(lambda: len(set(ping_pids(12, proc.url))) >= 2, 30, interval=0.5,
                   what="2+ workers serving")
    except Exception:
        proc.stop()
        raise RuntimeError(f"gunicorn did not start:\n{proc.log()}") from None
    yield proc
    proc.stop()


def ping_pids(n: int, url: str) -> list[int]:
    pids = []
    for _ in range(n):
        # A new connection per request, so the kernel spreads them over the workers.
        r = httpx.get(f"{url}/ping", timeout=5.0)
        assert r.status_code == 200
        pids.append(int(r.json()["pid"]))
    return pids


def scrape(url: str) -> str:
    r = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10.0)
    assert r.status_code == 200, r.text
    return r.text


def ping_total(body: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name == "fastapi_requests_total" and s.labels.get("path") == "/ping":
                total += s.value
    return total


def sample(body: str, name: str) -> float | None:
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name == name:
                return s.value
    return None


def test_merged_counts_exact_whichever_worker_answers(gunicorn_server: Proc) -> None:
    url = gunicorn_server.url
    assert httpx.get(f"{url}/metrics", timeout=5).status_code == 401  # token enforced
    before = ping_total(scrape(url))
    assert before < 1000  # the stale file was wiped by on_starting
    n = 60
    pids = ping_pids(n, url)
    assert len(set(pids)) >= 2, f"requests all went to one worker: {set(pids)}"
    # Scrapes land on different workers; each must report the merged total.
    for _ in range(8):
        body = scrape(url)
        assert ping_total(body) - before == n
        assert sample(body, "metrics_gateway_multiproc_skipped_files") == 0
    inprog = [
        s.value
        for f in text_string_to_metric_families(body)
        for s in f.samples
        if s.name == "fastapi_requests_in_progress" and s.labels.get("path") == "/ping"
    ]
    assert inprog == [0.0]
    assert "pid=" not in body


def test_killed_worker_counts_neither_lost_nor_doubled(gunicorn_server: Proc) -> None:
    url, master = gunicorn_server.url, gunicorn_server.popen.pid
    before = ping_total(scrape(url))
    n = 30
    served_by = ping_pids(n, url)
    after_first = ping_total(scrape(url))
    assert after_first - before == n
    # Kill a worker that served some of those requests; its files stay, so its
    # counts must survive; the replacement worker starts a new file.
    old = worker_pids(master)
    victim = next(pid for pid in served_by if pid in old)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in worker_pids(master) and len(worker_pids(master)) == WORKERS,
               60, what="gunicorn to replace the killed worker")
    time.sleep(1.0)  # let the replacement boot
    m = 20
    ping_pids(m, url)
    for _ in range(8):
        assert ping_total(scrape(url)) - before == n + m
    prom_dir = gunicorn_server.extra["prom_dir"]
    assert isinstance(prom_dir, Path)
    # child_exit -> compact_dead_worker folded its files into the archive (counts kept,
    # checked above) and removed them.
    assert not (prom_dir / f"gauge_livesum_{victim}.db").exists()
    assert not (prom_dir / f"counter_{victim}.db").exists()
    assert (prom_dir / "archive.current").is_symlink()


def test_real_prometheus_scrapes_it(gunicorn_server: Proc,
                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    workdir = tmp_path_factory.mktemp("prometheus")
    token_file = workdir / "token"
    token_file.write_text(TOKEN)
    scrape_configs = (
        "  - job_name: gateway\n"
        "    scrape_interval: 1s\n"
        "    scrape_timeout: 1s\n"
        "    authorization:\n"
        "      type: Bearer\n"
        f"      credentials_file: {token_file}\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{gunicorn_server.port}']\n"
    )
    prom = start_prometheus(workdir, scrape_configs)
    try:
        def target_up() -> dict[str, object] | None:
            data = httpx.get(f"{prom.url}/api/v1/targets", timeout=2).json()["data"]
            for t in data["activeTargets"]:
                if t["labels"].get("job") == "gateway" and t["health"] == "up":
                    return dict(t)
            return None

        target = wait_until(target_up, 30, interval=0.5, what="target up")
        assert target["lastError"] == ""

        def up_value() -> float | None:
            r = httpx.get(f"{prom.url}/api/v1/query", params={"query": 'up{job="gateway"}'},
                          timeout=2).json()
            result = r["data"]["result"]
            return float(result[0]["value"][1]) if result else None

        assert wait_until(lambda: up_value() == 1.0, 20, interval=0.5, what="up == 1")

        # The merged counter reaches Prometheus with the exact total.
        expected = ping_total(scrape(gunicorn_server.url))

        def prom_total() -> bool:
            q = 'sum(fastapi_requests_total{job="gateway",path="/ping"})'
            r = httpx.get(f"{prom.url}/api/v1/query", params={"query": q}, timeout=2).json()
            result = r["data"]["result"]
            return bool(result) and float(result[0]["value"][1]) == expected

        wait_until(prom_total, 20, interval=0.5, what="prometheus sees the merged total")
        # Several more scrapes (served by various workers) stay healthy.
        time.sleep(3)
        target = wait_until(target_up, 10, interval=0.5, what="target still up")
        assert target["lastError"] == ""
    finally:
        prom.stop()
