"""Start and stop real servers (Prometheus, Redis, uvicorn apps) on loopback for tests.

Every helper binds to 127.0.0.1 on a free port, waits a bounded time for the
process to answer, and returns a handle whose stop() ends the process it started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from tests.support.tools import path_of

PROMETHEUS_BIN = path_of("prometheus")
# A build whose `tracing:` exports spans (scripts/setup-tracing-prometheus), or TEST_PROMETHEUS_BIN.
TRACING_PROMETHEUS_BIN = str(Path(__file__).resolve().parents[2] / ".tools/prometheus-tracing/usr/bin/prometheus")
PROMTOOL_BIN = path_of("promtool")
REDIS_BIN = path_of("redis-server")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check, timeout: float = 20.0, interval: float = 0.1, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll check() until it returns a truthy value; bounded by timeout."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}: {last_exc!r}")


def wait_http(url: str, timeout: float = 20.0) -> None:
    wait_until(lambda: httpx.get(url, timeout=1.0).status_code < 500, timeout, what=url)


@dataclass
class Proc:
    """A process this test session started, with the address it serves."""

    popen: subprocess.Popen[bytes]
    url: str
    port: int
    workdir: Path
    log_path: Path
    extra: dict[str, object] = field(default_factory=dict)

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


def _spawn(cmd: list[str], workdir: Path, name: str, env: dict[str, str] | None = None,
           port: int = 0, url: str = "") -> Proc:
    if "/" not in cmd[0] or not Path(cmd[0]).exists():
        from tests.support.tools import PACKAGES, require

        if Path(cmd[0]).name in PACKAGES:
            cmd = [require(Path(cmd[0]).name), *cmd[1:]]
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    log = open(log_path, "wb")
    popen = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
        env={**os.environ, **(env or {})}, start_new_session=True,
    )
    return Proc(popen=popen, url=url, port=port, workdir=workdir, log_path=log_path)


def start_prometheus(workdir: Path, scrape_configs_yaml: str = "", *,
                     scrape_interval: str = "1s", extra_config: str = "",
                     timeout: float = 30.0, extra_args: tuple[str, ...] = (),
                     binary: str = PROMETHEUS_BIN) -> Proc:
    """A real Prometheus on loopback with the given scrape_configs block (YAML list)."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "prometheus.yml"
    cfg.write_text(
        f"global:\n  scrape_interval: {scrape_interval}\n  evaluation_interval: {scrape_interval}\n"
        f"{extra_config}"
        + (f"scrape_configs:\n{scrape_configs_yaml}" if scrape_configs_yaml else "")
    )
    url = f"http://127.0.0.1:{port}"
    proc = _spawn(
        [binary, f"--config.file={cfg}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle",
         "--storage.tsdb.retention.time=1h", "--log.level=warn", *extra_args],
        workdir, "prometheus", port=port, url=url,
    )
    return prometheus_ready(proc, timeout)


def prometheus_ready(proc: Proc, timeout: float) -> Proc:
    """Wait (bounded) until a Prometheus we started answers /-/ready; stop it if it never does."""
    try:
        wait_until(lambda: httpx.get(f"{proc.url}/-/ready", timeout=1.0).status_code == 200,
                   timeout, what="prometheus ready")
    except TimeoutError:
        proc.stop()
        raise RuntimeError(f"prometheus did not start:\n{proc.log()}") from None
    return proc


def serve_exposition(body: Callable[[], bytes], content_type: str) -> tuple[ThreadingHTTPServer, int]:
    """A tiny exporter on a free loopback port: every GET answers `body()` (call .shutdown())."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = body()
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            return

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, port


def start_redis(workdir: Path, timeout: float = 15.0, *, port: int | None = None,
                extra_args: tuple[str, ...] = ()) -> Proc:
    """redis-server on loopback (`port`: a given one, e.g. to restart on the same address)."""
    port = port or free_port()
    url = f"redis://127.0.0.1:{port}/0"
    proc = _spawn(
        [REDIS_BIN, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir), *extra_args],
        workdir, "redis", port=port, url=url,
    )

    def ping() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    try:
        wait_until(ping, timeout, what="redis ready")
    except TimeoutError:
        proc.stop()
        raise RuntimeError(f"redis did not start:\n{proc.log()}") from None
    return proc


def start_celery_worker(workdir: Path, env: dict[str, str], name: str) -> Proc:
    """A real Celery prefork worker (2 children) with beat embedded, as the stack runs it."""
    workdir.mkdir(parents=True, exist_ok=True)
    return _spawn(
        [sys.executable, "-m", "celery", "-A", "app.workers.celery_app", "worker",
         "--pool=prefork", "-c", "2", "-B", "--loglevel=INFO",
         "-s", str(workdir / "beat-schedule"), "-n", f"{name}-{os.getpid()}@%h"],
        workdir, "celery", env=env)


def start_uvicorn(workdir: Path, app: str, env: dict[str, str] | None = None, *,
                  factory: bool = False, health_path: str = "/health",
                  timeout: float = 30.0) -> Proc:
    """`python -m uvicorn app` on a free loopback port; app is 'module:attr'."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning"]
    if factory:
        cmd.append("--factory")
    proc = _spawn(cmd, workdir, f"uvicorn-{port}", env=env, port=port, url=url)
    try:
        wait_http(f"{url}{health_path}", timeout)
    except TimeoutError:
        proc.stop()
        raise RuntimeError(f"{app} did not start:\n{proc.log()}") from None
    return proc


def tracing_prometheus() -> str | None:
    """A Prometheus binary that exports spans: TEST_PROMETHEUS_BIN, the one
    scripts/setup-tracing-prometheus fetched, or the system one if it can; else None."""
    for candidate in (os.environ.get("TEST_PROMETHEUS_BIN"), TRACING_PROMETHEUS_BIN, PROMETHEUS_BIN):
        if candidate and prometheus_can_trace(candidate):
            return candidate
    return None


def prometheus_can_trace(binary: str = PROMETHEUS_BIN) -> bool:
    """True when the Prometheus binary holds the OpenTelemetry SDK, i.e. its ``tracing:``
    config exports spans. Debian's package (2.42+ds) is built without it: that config is
    accepted and nothing is ever exported."""
    import mmap
    try:
        with open(binary, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return m.find(b"go.opentelemetry.io/otel/sdk/trace") >= 0
    except (OSError, ValueError):
        return False


def promtool_check_metrics(body: bytes) -> subprocess.CompletedProcess[bytes]:
    """Run the real `promtool check metrics` on an exposition body."""
    return subprocess.run([PROMTOOL_BIN, "check", "metrics"], input=body,
                          capture_output=True, timeout=30, check=False)


def prometheus_query_requests(prom_url: str) -> float:
    """Instant-query requests a Prometheus has received, from its own /metrics."""
    text = httpx.get(f"{prom_url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("prometheus_http_requests_total{") and 'handler="/api/v1/query"' in line)


def prometheus_range_requests(prom_url: str) -> float:
    """Range-query requests a Prometheus has received, from its own /metrics."""
    text = httpx.get(f"{prom_url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("prometheus_http_requests_total{") and 'handler="/api/v1/query_range"' in line)


def start_gunicorn(workdir: Path, app: str, env: dict[str, str] | None = None, *, workers: int = 2,
                   port: int | None = None, health_path: str = "/health", timeout: float = 60.0) -> Proc:
    """The API as deployed: gunicorn -c gunicorn.conf.py with `workers` uvicorn workers on loopback.

    Its own PROMETHEUS_MULTIPROC_DIR under `workdir`; every worker must answer before it returns.
    """
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    root = Path(__file__).resolve().parents[2]
    prom_dir = workdir / f"prom-{port}"
    prom_dir.mkdir(parents=True, exist_ok=True)
    full_env = {"PROMETHEUS_MULTIPROC_DIR": str(prom_dir),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
                **(env or {})}
    cmd = [sys.executable, "-m", "gunicorn", "-c", str(root / "gunicorn.conf.py"), "--chdir", str(root),
           "--workers", str(workers), "--bind", f"127.0.0.1:{port}", "--graceful-timeout", "3",
           "--log-level", "warning", app]
    proc = _spawn(cmd, workdir, f"gunicorn-{port}", env=full_env, port=port, url=url)
    proc.extra["workers"] = workers
    try:
        wait_http(f"{url}{health_path}", timeout)
        wait_until(lambda: len(child_pids(proc.popen.pid)) == workers, timeout, what=f"{workers} workers")
    except TimeoutError:
        proc.stop()
        raise RuntimeError(f"gunicorn {app} did not start:\n{proc.log()}") from None
    return proc


def child_pids(pid: int) -> set[int]:
    """Direct children of a process (a gunicorn master's workers), from /proc."""
    pids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            pids.update(int(p) for p in (task / "children").read_text().split())
        except OSError:
            continue
    return pids
