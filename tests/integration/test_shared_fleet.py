"""A fleet of real gunicorn instances (uvicorn workers) sharing one real Redis, in front
of a real Prometheus: one upstream request for the whole fleet, a dead or hung
leader blocks the others for one lease at most, and a replica started during an
upstream outage serves the last good values with their true age.

Upstream requests are counted by Prometheus itself. Everything binds to 127.0.0.1;
every process started here is stopped here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_sync

from tests.integration.conftest import PromStack
from tests.support.procs import Proc, child_pids, free_port, prometheus_query_requests, start_gunicorn, wait_until
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

APP = "app.main:app"
SUMMARY = "/prometheus/metrics/summary"


def env_for(upstream: str, redis_url: str, prefix: str, **extra: str) -> dict[str, str]:
    return {"PROMETHEUS_URL": upstream, "GATEWAY_CACHE_URL": redis_url, "GATEWAY_CACHE_PREFIX": prefix,
            "CACHE_TTL_SECONDS": "60", "RESPONSE_MEMO_SECONDS": "0", "VROPS_TARGETS": "[]",
            "LOG_LEVEL": "WARNING", **extra}


@pytest.fixture()
def started(tmp_path: Path) -> Iterator[list[Proc]]:
    """Processes a test starts; all stopped at its end."""
    procs: list[Proc] = []
    yield procs
    for p in procs:
        p.stop()


def start_all(tmp_path: Path, started: list[Proc], envs: list[dict[str, str]], workers: int) -> list[Proc]:
    """Start several instances at once (each boots in seconds on a busy machine)."""
    with ThreadPoolExecutor(len(envs)) as pool:
        futures = [pool.submit(start_gunicorn, tmp_path / f"gw{i}", APP, env, workers=workers)
                   for i, env in enumerate(envs)]
        errors = []
        for f in futures:
            try:
                started.append(f.result())
            except Exception as exc:  # stop the others, then fail
                errors.append(exc)
    if errors:
        raise errors[0]
    return started[-len(envs):]


async def burst(urls: list[str], n: int) -> list[httpx.Response]:
    """`n` concurrent requests spread over `urls`, each on a new connection (so the
    kernel spreads them over each instance's workers too)."""
    async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        return list(await asyncio.gather(*(client.get(urls[i % len(urls)] + SUMMARY) for i in range(n))))


def test_one_upstream_request_for_the_whole_fleet(prom_stack: PromStack, redis_proc: Proc, tmp_path: Path,
                                                  started: list[Proc]) -> None:
    prefix = f"f{uuid.uuid4().hex[:8]}"
    fleet = start_all(tmp_path, started, [env_for(prom_stack.prometheus.url, redis_proc.url, prefix)] * 3,
                      workers=2)
    urls = [p.url for p in fleet]
    before = prometheus_query_requests(prom_stack.prometheus.url)
    answers = asyncio.run(burst(urls, 60))
    after = prometheus_query_requests(prom_stack.prometheus.url)
    assert [r.status_code for r in answers] == [200] * 60
    docs = [r.json() for r in answers]
    assert {d["status"] for d in docs} == {"ok"}
    assert after - before == 1  # 60 cold requests, 3 instances x 2 workers: one batch upstream
    assert all(d["metrics"] == docs[0]["metrics"] for d in docs)
    # Every instance served some of them (so three separate processes at least took part).
    for url in urls:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        served = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith("fastapi_requests_total{") and f'path="{SUMMARY}"' in line)
        assert served >= 1, url


def hanging_upstream() -> tuple[int, threading.Event]:
    """A port that accepts connections and never answers (a Prometheus that hangs)."""
    port = free_port()
    stop = threading.Event()
    srv = socket.create_server(("127.0.0.1", port))
    srv.settimeout(0.2)

    def serve() -> None:
        conns = []
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except TimeoutError:
                continue
        for c in conns:
            c.close()
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    return port, stop


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL], ids=["hung", "killed"])
def test_a_hung_or_killed_leader_blocks_the_others_for_one_lease(
        prom_stack: PromStack, redis_proc: Proc, tmp_path: Path, started: list[Proc], sig: int) -> None:
    prefix = f"l{uuid.uuid4().hex[:8]}"
    hang_port, stop_hanging = hanging_upstream()
    leader_env = env_for(f"http://127.0.0.1:{hang_port}", redis_proc.url, prefix,
                         REQUEST_DEADLINE_SECONDS="20", GATEWAY_CACHE_LOCK_LEASE_SECONDS="0.5")
    other_env = env_for(prom_stack.prometheus.url, redis_proc.url, prefix,
                        REQUEST_DEADLINE_SECONDS="3", GATEWAY_CACHE_LOCK_LEASE_SECONDS="0.5")
    leader, other = start_all(tmp_path, started, [leader_env, other_env], workers=1)
    (victim,) = child_pids(leader.popen.pid)
    r = redis_sync.Redis.from_url(redis_proc.url, socket_timeout=5)
    try:
        # The leader takes the fleet's locks and then waits on an upstream that never answers.
        def lead() -> None:
            with contextlib.suppress(httpx.HTTPError):  # its worker is about to be stopped or killed
                httpx.get(leader.url + SUMMARY, timeout=30)

        threading.Thread(target=lead, daemon=True).start()
        wait_until(lambda: list(r.scan_iter(match=f"{prefix}:*:lock:*")), 10, interval=0.02, what="leader's locks")
        os.kill(victim, sig)  # hung (no more lease renewals) or dead
        before = prometheus_query_requests(prom_stack.prometheus.url)
        t0 = time.monotonic()
        resp = httpx.get(other.url + SUMMARY, timeout=10)
        took = time.monotonic() - t0
        doc: dict[str, Any] = resp.json()
        assert resp.status_code == 200 and doc["status"] == "ok", doc.get("errors")
        assert took < 2.0  # one lease (0.5 s) and a fetch, well inside the 3 s deadline
        assert prometheus_query_requests(prom_stack.prometheus.url) - before == 1
    finally:
        if sig == signal.SIGSTOP:
            os.kill(victim, signal.SIGCONT)
        stop_hanging.set()
        r.close()


def test_a_replica_started_during_an_outage_serves_last_good_with_true_age(
        prom_stack: PromStack, redis_proc: Proc, tmp_path: Path, started: list[Proc]) -> None:
    prefix = f"r{uuid.uuid4().hex[:8]}"
    host, port = "127.0.0.1", prom_stack.prometheus.port
    proxy = TcpProxy(host, port).start()
    try:
        env = env_for(proxy.url, redis_proc.url, prefix, CACHE_TTL_SECONDS="1")
        (first,) = start_all(tmp_path, started, [env], workers=2)
        fetched_before = time.time()
        good = httpx.get(first.url + SUMMARY, timeout=10).json()
        assert good["status"] == "ok"
        time.sleep(0.3)  # published to Redis (after the answer)
        first.stop()  # the replica goes away...
        proxy.down()  # ...and Prometheus becomes unreachable
        time.sleep(2.5)  # past every fresh entry's expiry (TTL 1 s on the grid)
        (second,) = start_all(tmp_path, started, [env], workers=2)
        resp = httpx.get(second.url + SUMMARY, timeout=10)
        waited = time.time() - fetched_before
        doc = resp.json()
        assert resp.status_code == 200 and doc["status"] == "degraded"
        assert doc["metrics"] == good["metrics"]  # the last good values...
        for section in doc["provenance"].values():
            for p in section.values():
                assert p["state"] == "stale"
                assert 2.5 <= p["age_seconds"] <= waited + 0.5  # ...with the age they really have
    finally:
        proxy.stop()
