"""The one-command stack, started the way the README does (./scripts/run-stack).

Real Redis, Prometheus, demo backend, API, Celery worker and beat (and the
stand-in vROps when present), on free loopback ports with their own state
directory. Checks /ready, live non-null summary figures, every configured
Prometheus target up; then SIGTERM and no process of the stack left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.procs import wait_until

ROOT = Path(__file__).resolve().parents[2]
RUN_STACK = ROOT / "scripts" / "run-stack"
SUMMARY_KEYS = {
    "http": ["total_requests", "request_rate_per_minute", "error_rate", "avg_latency_ms",
             "in_progress"],
    "models": ["total_inference_requests", "tokens_used_total", "credits_used_total",
               "avg_inference_latency_ms"],
    "providers": ["total_providers", "healthy_providers", "degraded_providers",
                  "unavailable_providers", "avg_error_rate", "avg_response_time_ms"],
    "database": ["total_queries", "avg_query_latency_ms", "cache_hit_rate"],
    "business": ["active_api_keys", "active_subscriptions", "active_trials",
                 "total_tokens_used", "total_credits_used"],
}


@dataclass
class RunningStack:
    popen: subprocess.Popen[bytes]
    info: dict[str, Any]
    state_dir: Path
    log_path: Path

    @property
    def urls(self) -> dict[str, str]:
        return dict(self.info["urls"])

    def log(self) -> str:
        out = self.log_path.read_text(errors="replace")[-3000:]
        for child in sorted((self.state_dir / "logs").glob("*.log")):
            out += f"\n--- {child.name}\n" + child.read_text(errors="replace")[-1500:]
        return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return any(_alive(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit()
               and _pgid(int(p.name)) == pgid)


def _pgid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


@contextlib.contextmanager
def running_stack(tmp_path: Path, *extra: str, startup_timeout: float = 90.0
                  ) -> Iterator[RunningStack]:
    """./scripts/run-stack on free ports; yields once stack.json exists; SIGTERM on exit."""
    state = tmp_path / "stack"
    log_path = tmp_path / "run-stack.log"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(
            [str(RUN_STACK), "--free-ports", "--scrape-interval", "2s", "--state-dir", str(state),
             "--startup-timeout", "60", *extra],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    stack_json = state / "stack.json"
    stack: RunningStack | None = None
    try:
        def started() -> dict[str, Any] | None:
            if popen.poll() is not None:
                raise RuntimeError(f"run-stack exited with {popen.returncode}")
            return json.loads(stack_json.read_text()) if stack_json.exists() else None

        try:
            info = wait_until(started, timeout=startup_timeout, interval=0.5,
                              what="run-stack to report its URLs")
        except (TimeoutError, RuntimeError) as exc:
            raise AssertionError(f"{exc}\n{log_path.read_text(errors='replace')[-4000:]}") from exc
        stack = RunningStack(popen, info, state, log_path)
        yield stack
    finally:
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(popen.pid, signal.SIGKILL)
                popen.wait(5)
        if stack is not None:  # last resort: never leave a child running
            for pid in stack.info.get("children", {}).values():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(pid), signal.SIGKILL)


def summary_complete(url: str) -> dict[str, Any] | None:
    body = httpx.get(url, timeout=10).json()
    metrics = body.get("metrics", {})
    for section, keys in SUMMARY_KEYS.items():
        for key in keys:
            value = metrics.get(section, {}).get(key)
            if not isinstance(value, int | float) or isinstance(value, bool):
                return None
    return dict(body)


@pytest.mark.integration
def test_stack_starts_serves_live_figures_and_stops_cleanly(tmp_path: Path) -> None:
    with running_stack(tmp_path) as stack:
        urls = stack.urls
        try:
            ready = wait_until(lambda: (r := httpx.get(urls["ready"], timeout=5)).status_code
                               == 200 and r, timeout=30, what="/ready 200")
            assert ready.json()["status"] == "ready"
            assert httpx.get(f"{urls['api']}/health", timeout=5).json() == {"status": "ok"}

            first = wait_until(lambda: summary_complete(urls["summary"]), timeout=60,
                               interval=1.0, what="every summary figure non-null")
            assert first["status"] in ("ok", "degraded")
            total = first["metrics"]["http"]["total_requests"]
            wait_until(lambda: summary_complete(urls["summary"]) and
                       httpx.get(urls["summary"], timeout=10).json()["metrics"]["http"]
                       ["total_requests"] > total,
                       timeout=60, interval=2.0, what="summary figures to move (live data)")

            rendered = yaml.safe_load(
                (stack.state_dir / "prometheus" / "prometheus.yml").read_text())
            expected = {(j["job_name"], t) for j in rendered["scrape_configs"]
                        for s in j["static_configs"] for t in s["targets"]}

            def all_up() -> bool:
                data = httpx.get(f"{urls['prometheus']}/api/v1/targets", timeout=5).json()
                active = {(t["labels"]["job"], t["labels"]["instance"]): t["health"]
                          for t in data["data"]["activeTargets"]}
                return set(active) == expected and all(h == "up" for h in active.values())

            wait_until(all_up, timeout=45, interval=1.0, what="every configured target up")

            page = httpx.get(urls["status_page"], timeout=5)
            assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        except (AssertionError, TimeoutError) as exc:
            raise AssertionError(f"{exc}\n{stack.log()}") from exc

        children = {name: int(pid) for name, pid in stack.info["children"].items()}
        assert {"redis", "prometheus", "api", "demo-backend"} <= set(children)
        if (ROOT / "app" / "workers" / "celery_app.py").exists():
            assert {"worker", "beat"} <= set(children)
        stack.popen.send_signal(signal.SIGTERM)
        assert stack.popen.wait(40) == 0, stack.log()

    leftovers = {name for name, pid in children.items() if _alive(pid) or _group_alive(pid)}
    assert not leftovers, f"still running after SIGTERM: {leftovers}"
    assert not (stack.state_dir / "stack.json").exists()
