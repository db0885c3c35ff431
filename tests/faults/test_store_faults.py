"""Redis and vROps faults: a real redis-server (stopped, then paused) under a real gateway,
and the vROps collector in-process against tests/fakes/vrops_server.py ("down", 401 forever).

Redis: /vrops/metrics answers JSON callers 503 and Prometheus 200 with
vrops_store_up 0, /ready answers 503, all within the Redis budget + margin; one
log line per outage and one on recovery; the gateway's sockets to Redis do not pile up.
vROps: a cycle fails within its bound, with at most the configured retries,
records up=0 (so /vrops/metrics says vrops_up 0), logs once per episode and
never the password.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from pydantic import SecretStr

from app.vrops.settings import VropsSettings, VropsTarget
from app.workers import tasks
from tests.fakes.vrops_server import FakeVrops, create_app
from tests.faults.conftest import (
    MARGIN,
    Gateway,
    established,
    gateway_env,
    record,
    settle,
    start_gateway,
    stop_gateway,
)
from tests.faults.fake_upstream import FakePrometheus
from tests.support.procs import Proc, _spawn, start_redis, wait_until

pytestmark = pytest.mark.faults

REDIS_TIMEOUT = 0.5
BUDGET = 2 * REDIS_TIMEOUT  # app/vrops/router.py: two Redis timeouts per request
TARGET = "t1"
PASSWORD = "s3cret-vrops-pw"
VROPS = "/vrops/metrics"


def _restart_redis(old: Proc) -> Proc:
    proc = _spawn([str(a) for a in old.popen.args], old.workdir, "redis-restarted",  # type: ignore[union-attr]
                  port=old.port, url=old.url)

    def ping() -> bool:
        with socket.create_connection(("127.0.0.1", old.port), timeout=1.0) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    wait_until(ping, 15, what="redis restarted")
    return proc


def _redis_command(port: int, *args: str) -> bytes:
    payload = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(payload.encode())
        return s.recv(64)


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Proc]]:
    procs = [start_redis(tmp_path_factory.mktemp("redis"))]
    try:
        yield procs  # a list: a test may replace the process by a restarted one
    finally:
        for p in procs:
            p.stop()


@pytest.fixture(scope="module")
def gw(redis: list[Proc], fake: FakePrometheus, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    targets = f'[{{"name":"{TARGET}","url":"http://127.0.0.1:9","username":"admin","password":"{PASSWORD}"}}]'
    g = start_gateway(tmp_path_factory.mktemp("gw-store"), gateway_env(
        fake.url, REDIS_URL=redis[0].url, VROPS_TARGETS=targets,
        VROPS_REDIS_TIMEOUT_SECONDS=str(REDIS_TIMEOUT)))
    try:
        yield g
    finally:
        stop_gateway(g)


def _store_lines(lines: list[str]) -> list[str]:
    return [ln for ln in lines if "vROps sample store (Redis)" in ln]


def _healthy(g: Gateway) -> None:
    r = g.client.get(g.url + VROPS, params={"format": "json"})
    assert r.status_code == 200, r.text
    assert g.client.get(g.url + "/ready").status_code == 200


def _assert_store_down(g: Gateway) -> float:
    worst = 0.0
    for _ in range(2):
        r, s = g.timed_get(VROPS, params={"format": "json"})
        worst = max(worst, s)
        assert r.status_code == 503
        assert r.json() == {"status": "error", "store_up": False, "error": "sample store (Redis) unavailable"}
    t, s = g.timed_get(VROPS)
    worst = max(worst, s)
    assert t.status_code == 200 and "vrops_store_up 0.0" in t.text
    ready, s = g.timed_get("/ready")
    worst = max(worst, s)
    assert ready.status_code == 503 and ready.json()["checks"]["redis"]["ok"] is False
    assert worst < BUDGET + MARGIN, worst
    return worst


def test_redis_stopped_then_restarted(gw: Gateway, redis: list[Proc]) -> None:
    _healthy(gw)
    port = redis[0].port
    before = established(gw.pid, port)
    mark = gw.log_mark()
    redis[0].stop()
    worst = _assert_store_down(gw)
    redis.append(_restart_redis(redis[0]))
    _healthy(gw)
    lines = _store_lines(gw.log_since(mark))
    assert len(lines) == 2 and " failing: " in lines[0] and " recovered after " in lines[1], lines
    settle(lambda: established(gw.pid, port) <= max(before, 2))
    record({"suite": "redis", "fault": "redis-server stopped", "route": f"{VROPS} (json x2, text), /ready",
            "http_status": "503 json / 200 text (vrops_store_up 0) / 503 ready", "json_status": "error",
            "error_type": "store_up=false", "max_seconds": round(worst, 3), "bound_seconds": BUDGET + MARGIN,
            "log_lines": len(lines), "upstream_up": None, "connections_after": established(gw.pid, port)})


def test_redis_paused(gw: Gateway, redis: list[Proc]) -> None:
    _healthy(gw)
    port = redis[-1].port
    before = established(gw.pid, port)
    mark = gw.log_mark()
    pause_ms = 3000
    assert _redis_command(port, "CLIENT", "PAUSE", str(pause_ms), "ALL").startswith(b"+OK")
    t0 = time.monotonic()
    worst = _assert_store_down(gw)
    assert time.monotonic() - t0 < pause_ms / 1000, "the checks must have run while Redis was paused"
    wait_until(lambda: gw.client.get(gw.url + VROPS, params={"format": "json"}).status_code == 200, 10,
               what="redis unpaused")
    _healthy(gw)
    lines = _store_lines(gw.log_since(mark))
    assert len(lines) == 2 and " failing: " in lines[0] and " recovered after " in lines[1], lines
    # Timed-out connections are dropped, not kept half-read in the pool.
    settle(lambda: established(gw.pid, port) <= max(before, 2) + 1)
    record({"suite": "redis", "fault": f"redis CLIENT PAUSE {pause_ms} ms", "route": f"{VROPS} (json x2, text), /ready",
            "http_status": "503 json / 200 text (vrops_store_up 0) / 503 ready", "json_status": "error",
            "error_type": "store_up=false", "max_seconds": round(worst, 3), "bound_seconds": BUDGET + MARGIN,
            "log_lines": len(lines), "upstream_up": None, "connections_after": established(gw.pid, port)})


@pytest.mark.parametrize("mode", ["down", "unauthorized"])
def test_vrops_fault_with_collector_in_process(gw: Gateway, redis: list[Proc], mode: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    state = FakeVrops(clusters=2, objects_per_cluster=5, password=PASSWORD)
    transport = httpx.ASGITransport(app=create_app(state))
    settings = VropsSettings(
        redis_url=redis[-1].url,
        vrops_targets=[VropsTarget(name=TARGET, url="http://vrops.test", username="admin",
                                  password=SecretStr(PASSWORD))],
        vrops_max_retries=1, vrops_retry_backoff_seconds=0.01, vrops_collection_timeout_seconds=5,
    )
    tasks.TOKEN_CACHE.put(f"{TARGET}|http://vrops.test|admin", None)
    caplog.set_level(logging.DEBUG)

    def cycle() -> tuple[str, float]:
        t0 = time.perf_counter()
        out = asyncio.run(tasks.run_stats(TARGET, settings, transport=transport))
        return out, time.perf_counter() - t0

    assert cycle()[0] == "success"
    state.mode = mode
    outcomes = [cycle() for _ in range(3)]
    assert [o for o, _ in outcomes] == ["failure"] * 3
    worst = max(s for _, s in outcomes)
    assert worst < 2.0  # retries are bounded: no loop against a refusing vROps
    text = gw.client.get(gw.url + VROPS).text
    assert f'vrops_up{{target="{TARGET}"}} 0.0' in text
    per_cycle_calls = sum(state.counters.values())
    state.mode = "ok"
    assert cycle()[0] == "success"
    text = gw.client.get(gw.url + VROPS).text
    assert f'vrops_up{{target="{TARGET}"}} 1.0' in text
    episode = [r.getMessage() for r in caplog.records if r.name == "app.workers.vrops"]
    assert len([m for m in episode if "failing" in m]) == 1, episode
    assert len([m for m in episode if "recovered" in m]) == 1, episode
    assert PASSWORD not in caplog.text
    assert PASSWORD not in text
    record({"suite": "vrops", "fault": f"vROps {mode}" + (" (401 forever)" if mode == "unauthorized" else " (503)"),
            "route": "collector run_stats x3, then /vrops/metrics", "http_status": "200 (vrops_up 0)",
            "json_status": "up=0 in status", "error_type": "VropsAuthError" if mode == "unauthorized" else "VropsError",
            "max_seconds": round(worst, 3), "bound_seconds": 2.0, "log_lines": 2, "upstream_up": None,
            "connections_after": None, "vrops_requests": per_cycle_calls})
