#!/usr/bin/env python3
"""The whole stack, one command, on loopback: Redis, Prometheus, the demo backend,
the gateway API, a Celery worker and beat, and (when available) a stand-in vROps.

The API runs as deployed: gunicorn with uvicorn workers (--api-workers, default 2)
sharing one figure cache, one fetch in flight per figure and the last good values
through the stack's Redis (GATEWAY_CACHE_URL, db 1).

    python scripts/run_stack.py                # or ./scripts/run-stack
    python scripts/run_stack.py --free-ports --scrape-interval 2s --state-dir /tmp/s

Everything binds to 127.0.0.1. Prometheus and Redis are the system packages
(`prometheus`, `redis-server`); their data, the logs, the rendered Prometheus
config and generated secrets live under the state directory (default `.stack/`,
gitignored). The Prometheus configuration is *rendered* from
prometheus/prom.yml — the file docker-compose uses — by rewriting, on the parsed
YAML, the compose service targets to loopback ports, the rule file to its path
and the credential files to generated ones; so the local stack scrapes the same
jobs as the deployed one.

Start-up waits are bounded (--startup-timeout). When everything answers, the
URLs are printed and `<state>/stack.json` lists them with the process ids. Ctrl-C
or SIGTERM stops every process this script started (SIGTERM to each process
group, SIGKILL after a grace period); so does any of them exiting on its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROM_CONFIG = ROOT / "prometheus" / "prom.yml"
FAKE_VROPS = ROOT / "tests" / "fakes" / "vrops_server.py"
BACKEND_TOKEN_PATH = "/run/secrets/backend_metrics_token"
LOOPBACK = "127.0.0.1"

# compose service name:port in prom.yml -> the local component serving it
SERVICE_TARGETS = {"api:8000": "api", "backend:8000": "backend"}


def log(msg: str) -> None:
    print(f"[run-stack] {msg}", flush=True)


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def pick_port(name: str, wanted: int, taken: set[int]) -> int:
    """The wanted port when free; otherwise (or when 0) a free one."""
    if wanted and wanted not in taken and port_free(wanted):
        port = wanted
    else:
        port = free_port()
        while port in taken:
            port = free_port()
        if wanted:
            log(f"port {wanted} for {name} is busy; using {port}")
    taken.add(port)
    return port


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= int(resp.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def redis_ping(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1.0) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def parse_duration(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for suffix in ("ms", "s", "m", "h"):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    raise ValueError(f"not a duration: {text!r}")


def render_prometheus_config(
    source: Path,
    targets: dict[str, str],
    rules_dir: Path,
    credential_files: dict[str, Path],
    scrape_interval: str | None = None,
) -> dict[str, Any]:
    """prom.yml with compose targets, rule files and credential paths made local.

    `targets` maps a compose `host:port` to a loopback `127.0.0.1:port`; an unknown
    target is an error (a job the stack cannot serve would be silently down).
    `scrape_interval` overrides the global and every job's interval (a fast local
    feedback loop); scrape timeouts are capped at the interval.
    """
    config: dict[str, Any] = yaml.safe_load(source.read_text())
    config["rule_files"] = [str((rules_dir / f).resolve()) for f in config.get("rule_files", [])]
    glob = config.setdefault("global", {})
    if scrape_interval:
        glob["scrape_interval"] = scrape_interval
        glob["evaluation_interval"] = scrape_interval
        glob["scrape_timeout"] = scrape_interval
    for job in config.get("scrape_configs", []):
        if scrape_interval:
            job.pop("scrape_interval", None)
            job.pop("scrape_timeout", None)
        for static in job.get("static_configs", []):
            local = []
            for t in static.get("targets", []):
                if t not in targets:
                    raise ValueError(f"job {job['job_name']}: no local service for target {t}")
                local.append(targets[t])
            static["targets"] = local
        _rewrite_credentials(job, credential_files)
    return config


def _rewrite_credentials(node: Any, files: dict[str, Path]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("credentials_file", "bearer_token_file", "password_file") and \
                    isinstance(value, str):
                if value not in files:
                    raise ValueError(f"no local secret for {value}")
                node[key] = str(files[value])
            else:
                _rewrite_credentials(value, files)
    elif isinstance(node, list):
        for item in node:
            _rewrite_credentials(item, files)


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    required: bool = True

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


@dataclass
class Stack:
    state: Path
    children: list[Child] = field(default_factory=list)
    _logs: list[TextIO] = field(default_factory=list)

    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None,
              required: bool = True) -> Child:
        logs = self.state / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{name}.log"
        fh = open(log_path, "w")  # closed in stop()
        self._logs.append(fh)
        popen = subprocess.Popen(
            cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env if env is not None else dict(os.environ), start_new_session=True,
        )
        child = Child(name, popen, log_path, required)
        self.children.append(child)
        log(f"started {name} (pid {popen.pid}), log {log_path}")
        return child

    def wait_for(self, child: Child, check: Callable[[], bool], timeout: float,
                 what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited with {child.popen.returncode} while "
                                   f"waiting for {what}:\n{child.tail()}")
            if check():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}:\n{child.tail()}")

    def stop(self, grace: float = 10.0) -> None:
        for child in reversed(self.children):
            if child.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in reversed(self.children):
            remaining = max(0.1, deadline - time.monotonic())
            try:
                child.popen.wait(remaining)
            except subprocess.TimeoutExpired:
                log(f"{child.name} did not stop in {grace:g}s; killing")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.popen.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.popen.wait(5)
            # anything left in the group (e.g. prefork children) goes too
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.popen.pid, signal.SIGKILL)
        for fh in self._logs:
            fh.close()
        self._logs.clear()


class Stopping(Exception):
    """Raised inside the main thread when SIGINT/SIGTERM arrives."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise Stopping(signal.Signals(signum).name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description="Run the whole metrics-gateway stack on loopback.")
    p.add_argument("--state-dir", type=Path, default=Path(env("STACK_DIR", str(ROOT / ".stack"))))
    p.add_argument("--api-port", type=int, default=int(env("STACK_API_PORT", "8000")))
    p.add_argument("--prometheus-port", type=int,
                   default=int(env("STACK_PROMETHEUS_PORT", "9090")))
    p.add_argument("--redis-port", type=int, default=int(env("STACK_REDIS_PORT", "6379")))
    p.add_argument("--backend-port", type=int, default=int(env("STACK_BACKEND_PORT", "9464")))
    p.add_argument("--vrops-port", type=int, default=int(env("STACK_VROPS_PORT", "9443")))
    p.add_argument("--free-ports", action="store_true",
                   default=env("STACK_FREE_PORTS", "") == "1",
                   help="pick free ports for everything instead of the defaults")
    p.add_argument("--scrape-interval", default=env("STACK_SCRAPE_INTERVAL") or None,
                   help="override every scrape interval (e.g. 2s); default: prom.yml's")
    p.add_argument("--api-workers", type=int, default=int(env("STACK_API_WORKERS", "2")),
                   help="gunicorn workers for the API (they share the Redis cache tier)")
    p.add_argument("--no-workers", action="store_true", help="do not start Celery worker/beat")
    p.add_argument("--no-vrops", action="store_true", help="do not start the stand-in vROps")
    p.add_argument("--startup-timeout", type=float,
                   default=float(env("STACK_STARTUP_TIMEOUT", "60")))
    p.add_argument("--prometheus-bin", default=shutil.which("prometheus") or "/usr/bin/prometheus")
    p.add_argument("--redis-bin", default=shutil.which("redis-server") or "/usr/bin/redis-server")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for binary in (args.prometheus_bin, args.redis_bin):
        if not Path(binary).exists():
            log(f"missing {binary}: install the Debian packages `prometheus` and "
                "`redis-server` (./scripts/run-stack does it when run as root)")
            return 2

    state: Path = args.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    taken: set[int] = set()

    def port(name: str, wanted: int) -> int:
        return pick_port(name, 0 if args.free_ports else wanted, taken)

    ports = {
        "api": port("api", args.api_port),
        "prometheus": port("prometheus", args.prometheus_port),
        "redis": port("redis", args.redis_port),
        "backend": port("backend", args.backend_port),
    }
    with_vrops = not args.no_vrops and FAKE_VROPS.exists()
    if with_vrops:
        ports["vrops"] = port("vrops", args.vrops_port)
    with_workers = not args.no_workers and (ROOT / "app" / "workers" / "celery_app.py").exists()

    secrets_dir = state / "secrets"
    secrets_dir.mkdir(exist_ok=True, mode=0o700)
    token_file = secrets_dir / "backend_metrics_token"
    if not token_file.exists():
        token_file.write_text(secrets.token_urlsafe(24) + "\n")
    token_file.chmod(0o600)

    prom_dir = state / "prometheus"
    prom_dir.mkdir(exist_ok=True)
    rendered = render_prometheus_config(
        PROM_CONFIG,
        {svc: f"{LOOPBACK}:{ports[comp]}" for svc, comp in SERVICE_TARGETS.items()},
        PROM_CONFIG.parent,
        {BACKEND_TOKEN_PATH: token_file},
        args.scrape_interval,
    )
    prom_cfg = prom_dir / "prometheus.yml"
    prom_cfg.write_text(yaml.safe_dump(rendered, sort_keys=False))

    redis_url = f"redis://{LOOPBACK}:{ports['redis']}/0"
    app_env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    app_env.update({
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PROMETHEUS_URL": f"http://{LOOPBACK}:{ports['prometheus']}",
        "REDIS_URL": redis_url,
        "CELERY_BROKER_URL": redis_url,
        "GATEWAY_CACHE_URL": app_env.get("GATEWAY_CACHE_URL", f"redis://{LOOPBACK}:{ports['redis']}/1"),
        "VROPS_STATS_INTERVAL_SECONDS": app_env.get("VROPS_STATS_INTERVAL_SECONDS", "15"),
        "VROPS_INVENTORY_INTERVAL_SECONDS": app_env.get("VROPS_INVENTORY_INTERVAL_SECONDS", "60"),
        "VROPS_WORKER_PING_INTERVAL_SECONDS": app_env.get(
            "VROPS_WORKER_PING_INTERVAL_SECONDS", "5"),
    })
    if with_vrops:
        pw = secrets_dir / "vrops_password"
        pw.write_text("s3cret\n")  # the stand-in's fixed credentials
        pw.chmod(0o600)
        app_env["VROPS_TARGETS"] = json.dumps([{
            "name": "lab", "url": f"http://{LOOPBACK}:{ports['vrops']}", "username": "admin",
            "password_file": str(pw), "verify_tls": False}])
    else:
        app_env.setdefault("VROPS_TARGETS", "[]")

    stack = Stack(state)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    stack_json = state / "stack.json"
    stack_json.unlink(missing_ok=True)
    timeout = args.startup_timeout
    py = sys.executable
    code = 1
    try:
        redis = stack.spawn("redis", [
            args.redis_bin, "--port", str(ports["redis"]), "--bind", LOOPBACK, "--save", "",
            "--appendonly", "no", "--dir", str(state), "--loglevel", "warning"])
        stack.wait_for(redis, lambda: redis_ping(ports["redis"]), timeout, "redis PING")

        backend = stack.spawn("demo-backend", [
            py, str(ROOT / "scripts" / "demo_backend.py"), "--host", LOOPBACK,
            "--port", str(ports["backend"]), "--token-file", str(token_file)], env=app_env)
        stack.wait_for(backend, lambda: http_ok(f"http://{LOOPBACK}:{ports['backend']}/health"),
                       timeout, "demo backend /health")

        if with_vrops:
            vrops = stack.spawn("vrops-standin", [
                py, "-m", "uvicorn", "tests.fakes.vrops_server:app_from_env", "--factory",
                "--host", LOOPBACK, "--port", str(ports["vrops"]), "--log-level", "warning"],
                env=app_env, required=False)
            stack.wait_for(vrops, lambda: http_ok(f"http://{LOOPBACK}:{ports['vrops']}/_control"),
                           timeout, "stand-in vROps")

        prom = stack.spawn("prometheus", [
            args.prometheus_bin, f"--config.file={prom_cfg}",
            f"--storage.tsdb.path={prom_dir / 'data'}",
            f"--web.listen-address={LOOPBACK}:{ports['prometheus']}",
            "--storage.tsdb.retention.time=1d", "--log.level=warn"])
        stack.wait_for(prom, lambda: http_ok(f"http://{LOOPBACK}:{ports['prometheus']}/-/ready"),
                       timeout, "prometheus /-/ready")

        api = stack.spawn("api", [
            py, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), "--chdir", str(ROOT),
            "--bind", f"{LOOPBACK}:{ports['api']}", "--workers", str(max(1, args.api_workers)),
            "--log-level", "warning", "app.main:app"], env=app_env)
        api_url = f"http://{LOOPBACK}:{ports['api']}"
        stack.wait_for(api, lambda: http_ok(f"{api_url}/health"), timeout, "api /health")

        if with_workers:
            stack.spawn("worker", [
                py, "-m", "celery", "-A", "app.workers.celery_app", "worker", "--pool=prefork",
                "--concurrency=1", "--loglevel=INFO", "--hostname", "stack-worker@%h"],
                env=app_env)
            stack.spawn("beat", [
                py, "-m", "celery", "-A", "app.workers.celery_app", "beat", "--loglevel=INFO",
                "--schedule", str(state / "celerybeat-schedule")], env=app_env)

        deadline = time.monotonic() + timeout
        ready = False
        while time.monotonic() < deadline and not ready:
            ready = http_ok(f"{api_url}/ready", timeout=3.0)
            if not ready:
                time.sleep(0.5)
        if not ready:
            log(f"warning: {api_url}/ready did not answer 200 within {timeout:g}s")

        urls = {
            "status_page": f"{api_url}/status",
            "summary": f"{api_url}/prometheus/metrics/summary",
            "all": f"{api_url}/prometheus/metrics/all",
            "docs": f"{api_url}/prometheus/metrics/docs",
            "api": api_url,
            "metrics": f"{api_url}/metrics",
            "ready": f"{api_url}/ready",
            "prometheus": f"http://{LOOPBACK}:{ports['prometheus']}",
            "backend_metrics": f"http://{LOOPBACK}:{ports['backend']}/metrics",
            "redis": redis_url,
        }
        if with_vrops:
            urls["vrops_standin"] = f"http://{LOOPBACK}:{ports['vrops']}"
        stack_json.write_text(json.dumps({
            "pid": os.getpid(), "ready": ready, "urls": urls, "ports": ports,
            "children": {c.name: c.popen.pid for c in stack.children},
            "state_dir": str(state)}, indent=2))
        width = max(len(k) for k in urls)
        print("\nThe stack is up. Ctrl-C stops everything.\n", flush=True)
        for k, v in urls.items():
            print(f"  {k.replace('_', ' '):<{width}}  {v}", flush=True)
        print(f"\n  logs in {state / 'logs'}\n", flush=True)

        while True:
            for child in stack.children:
                if child.required and not child.alive():
                    raise RuntimeError(f"{child.name} exited with {child.popen.returncode}:\n"
                                       f"{child.tail()}")
            time.sleep(0.5)
    except Stopping as sig:
        log(f"{sig}: stopping")
        code = 0
    except (RuntimeError, ValueError, OSError) as exc:
        log(f"error: {exc}")
        code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stack.stop()
        stack_json.unlink(missing_ok=True)
        log("stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
