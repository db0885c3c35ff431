"""Start the shipped server (gunicorn -c gunicorn.conf.py) on loopback for tests.

The server runs with the repository's own ``gunicorn.conf.py``, so a test sees the
worker class, limits and multiprocess hooks production gets. ``nofile`` sets the
server's RLIMIT_NOFILE (soft and hard) before it starts, to reproduce fd exhaustion
without touching the test process's own limit.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.support.procs import Proc, free_port, wait_until

REPO = Path(__file__).resolve().parents[2]


def worker_pids(master: int) -> set[int]:
    """Children of the gunicorn master (its workers), from /proc."""
    pids: set[int] = set()
    for task in Path(f"/proc/{master}/task").iterdir():
        try:
            pids.update(int(p) for p in (task / "children").read_text().split())
        except OSError:
            continue
    return pids


def start_gunicorn(workdir: Path, app: str = "app.main:app", *, workers: int = 1,
                   env: dict[str, str] | None = None, args: list[str] | None = None,
                   nofile: int | None = None, health_path: str = "/health",
                   timeout: float = 60.0) -> Proc:
    """`gunicorn -c gunicorn.conf.py app` on a free loopback port; waits for every worker."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / "gunicorn.log"
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "WEB_CONCURRENCY": str(workers),
                **(env or {})}
    full_env.pop("GUNICORN_CMD_ARGS", None)
    if "PROMETHEUS_MULTIPROC_DIR" not in (env or {}):
        full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    cmd = [sys.executable, "-m", "gunicorn", "-c", str(REPO / "gunicorn.conf.py"),
           "--chdir", str(REPO), "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
           "--graceful-timeout", "3", *(args or []), app]

    def limit_fds() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    kwargs: dict[str, Any] = {"preexec_fn": limit_fds} if nofile is not None else {}
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                                 env=full_env, start_new_session=True, **kwargs)
    proc = Proc(popen=popen, url=f"http://127.0.0.1:{port}", port=port, workdir=workdir,
                log_path=log_path)
    try:
        wait_until(lambda: httpx.get(proc.url + health_path, timeout=1.0).status_code == 200,
                   timeout, interval=0.2, what="gunicorn health")
        wait_until(lambda: len(worker_pids(popen.pid)) == workers, timeout, what=f"{workers} workers")
    except Exception:
        proc.stop()
        raise RuntimeError(f"gunicorn did not start:\n{proc.log()}") from None
    return proc
