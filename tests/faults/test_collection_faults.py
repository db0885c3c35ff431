"""Collections that die: a worker child SIGKILLed mid-collection, the store at maxmemory,
collections that stopped while the API keeps serving their last samples.

Real processes: a store Redis and a separate broker Redis (so the store can be filled
up while jobs still flow, as with a broker of its own), a Celery worker (prefork, 2
children, embedded beat), the stand-in vROps (tests/fakes/vrops_server.py) and the
API. Everything on 127.0.0.1, every wait bounded, every process stopped by its fixture.

Designed answers (app/workers/*, app/vrops/store.py, app/vrops/exposition.py):
late acks + reject-on-worker-lost (the job comes back, and is counted), a lock with a
short TTL renewed by its owner's heartbeat (a dead owner's lock lapses in seconds),
store errors caught and written to the status with an allow-oom script (up=0, the
reason, one log line per episode), and frozen samples flagged as soon as collections
are overdue.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_lib
from celery import Celery
from fastapi import FastAPI
from fastapi.testclient import TestClient
from redis.exceptions import OutOfMemoryError

from app.common.redis import make_redis
from app.vrops.exposition import overdue_after
from app.vrops.router import create_vrops_router
from app.vrops.settings import VropsSettings, VropsTarget
from app.vrops.store import Row, VropsStore, lock_key
from app.workers.tasks import lock_ttl
from tests.support.procs import Proc, start_celery_worker, start_redis, start_uvicorn, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
INTERVAL = 4.0
TIMEOUT = 5.0
STATS_TASK = "vrops.collect_stats"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("collection-faults")
    procs: list[Proc] = []
    try:
        store = start_redis(base / "store")
        procs.append(store)
        broker = start_redis(base / "broker")
        procs.append(broker)
        common = {"PYTHONPATH": str(ROOT)}
        fake = start_uvicorn(base / "fake", "tests.fakes.vrops_server:app_from_env",
                             env={**common, "FAKE_VROPS_CLUSTERS": "2", "FAKE_VROPS_OBJECTS": "10"},
                             factory=True, health_path="/health")
        procs.append(fake)
        env = {
            **common,
            "REDIS_URL": store.url,
            "CELERY_BROKER_URL": broker.url,
            "VROPS_TARGETS": json.dumps([{"name": "lab", "url": fake.url, "username": "admin",
                                          "password": "s3cret", "verify_tls": False}]),
            "VROPS_STATS_INTERVAL_SECONDS": str(INTERVAL),
            "VROPS_INVENTORY_INTERVAL_SECONDS": "600",
            "VROPS_WORKER_PING_INTERVAL_SECONDS": "2",
            "VROPS_STALE_AFTER_SECONDS": "600",  # only overdue detection may flag samples here
            "VROPS_COLLECTION_TIMEOUT_SECONDS": str(TIMEOUT),
            "VROPS_MAX_RETRIES": "0",
            "VROPS_CONNECT_TIMEOUT_SECONDS": "1",
            "VROPS_READ_TIMEOUT_SECONDS": "4",
            "VROPS_REDIS_TIMEOUT_SECONDS": "0.5",
            "VROPS_WORKER_REDIS_TIMEOUT_SECONDS": "2",
        }
        worker = start_celery_worker(base / "worker", env, "collection-faults")
        procs.append(worker)
        api = start_uvicorn(base / "api", "tests.support.vrops_app:make_api", env=env, factory=True)
        procs.append(api)
        yield {"store": store, "broker": broker, "fake": fake, "worker": worker, "api": api}
    finally:
        for p in reversed(procs):
            p.stop()


def status(stack: dict[str, Any]) -> dict[str, Any]:
    data = httpx.get(f"{stack['api'].url}/vrops/metrics", params={"format": "json"}, timeout=5).json()
    return dict(data["targets"][0])


def control(stack: dict[str, Any], **body: Any) -> None:
    httpx.post(f"{stack['fake'].url}/_control", json=body, timeout=5).raise_for_status()


def jobs_total(stack: dict[str, Any], status_label: str) -> float:
    text = httpx.get(f"{stack['api'].url}/vrops/jobs/metrics", timeout=5).text
    prefix = f'vrops_jobs_total{{status="{status_label}",task="{STATS_TASK}"}} '
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(prefix))


def log_since(proc: Proc, mark: int) -> list[str]:
    with open(proc.log_path, "rb") as f:
        f.seek(mark)
        return f.read().decode(errors="replace").splitlines()


def recent_success(stack: dict[str, Any], after: float) -> dict[str, Any] | None:
    st = status(stack)
    return st if st["up"] == 1 and (st["last_success_timestamp"] or 0) > after else None


def test_sigkill_mid_collection_job_comes_back_and_the_lock_lapses(stack: dict[str, Any]) -> None:
    wait_until(lambda: recent_success(stack, 0), 40, interval=0.5, what="a first collection")
    control(stack, delay_seconds=4.0)  # every vROps call now takes 4 s (the deadline is 5 s)
    inspector = Celery(broker=stack["broker"].url).control.inspect(timeout=0.5)

    def busy_child() -> int | None:
        for tasks in (inspector.active() or {}).values():
            for t in tasks:
                if t["name"] == STATS_TASK:
                    return int(t["worker_pid"])
        return None

    try:
        pid = wait_until(busy_child, 30, interval=0.2, what="a collection in progress")
        time.sleep(0.3)  # well inside its 4 s vROps call
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)
    finally:
        control(stack, delay_seconds=0)
    # The next successful collection comes within the short lock TTL plus one
    # interval, not after the old lock's deadline + 5 s (TIMEOUT + 5 = 10 s).
    t0 = time.monotonic()
    wait_until(lambda: recent_success(stack, killed_at), 30, interval=0.2, what="a collection after the kill")
    recovered_in = time.monotonic() - t0
    assert recovered_in < lock_ttl("stats", VropsSettings(vrops_stats_interval_seconds=INTERVAL)) + INTERVAL, \
        recovered_in
    # The killed job was not lost silently: it came back and was counted.
    wait_until(lambda: jobs_total(stack, "redelivered") >= 1, 10, interval=0.3, what="redelivered counted")
    assert stack["worker"].popen.poll() is None


def test_store_at_maxmemory_status_says_so_logged_once(stack: dict[str, Any]) -> None:
    wait_until(lambda: recent_success(stack, time.time() - 2 * INTERVAL), 40, interval=0.5, what="collecting")
    worker = stack["worker"]
    mark = worker.log_path.stat().st_size
    r = redis_lib.Redis.from_url(stack["store"].url)
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", 1)  # every write refused with OOM from now on
    try:
        def store_failure() -> dict[str, Any] | None:
            st = status(stack)
            return st if st["up"] == 0 and "OOM" in str(st["error"]) else None

        st = wait_until(store_failure, 3 * INTERVAL + TIMEOUT, interval=0.3, what="status says the store failed")
        assert st["error"] == "store: OOM, writes refused (Redis at maxmemory with noeviction)"
        text = httpx.get(f"{stack['api'].url}/vrops/metrics", timeout=5).text
        assert 'vrops_up{target="lab"} 0.0' in text
        time.sleep(2 * INTERVAL + 0.5)  # two more failing cycles: still one line
        lines = log_since(worker, mark)
        failing = [ln for ln in lines if "failing" in ln and "store" in ln]
        assert len(failing) == 1, "\n".join(lines[-60:])
        assert not [ln for ln in lines if "Traceback" in ln], "\n".join(lines[-60:])
    finally:
        r.config_set("maxmemory", 0)
    wait_until(lambda: recent_success(stack, time.time() - 1), 3 * INTERVAL + TIMEOUT, interval=0.3,
               what="recovery")
    lines = log_since(worker, mark)
    assert len([ln for ln in lines if "recovered" in ln and "stats" in ln]) == 1, "\n".join(lines[-60:])


# -- collections overdue: the API's own verdict, whatever happened to the workers ---------------

def _api(redis_url: str) -> TestClient:
    settings = VropsSettings(
        redis_url=redis_url,
        vrops_targets=[VropsTarget(name="lab", url="http://vrops.invalid", username="u", password="p")],
        vrops_stats_interval_seconds=1, vrops_collection_timeout_seconds=3, vrops_stale_after_seconds=900)
    app = FastAPI()
    app.include_router(create_vrops_router(settings))
    return TestClient(app)


@pytest.mark.parametrize("age", [2.0, 20.0])
def test_frozen_samples_are_flagged_once_collections_are_overdue(tmp_path: Path, age: float) -> None:
    """Last success `age` s ago (interval 1 s, timeout 3 s: overdue after 4 s). The
    status record still says up=1 with no error: the collections stopped before they
    could say otherwise (worker gone, broker down, status unwritable)."""
    proc = start_redis(tmp_path / "redis")
    try:
        then = time.time() - age

        async def seed() -> None:
            r = make_redis(proc.url, 2.0)
            store = VropsStore(r)
            await store.write_cycle("lab", then, {("c1", "cpu_usage_ratio"): [Row("vm", "vm-1", 0.5, then)]},
                                    complete=True)
            await store.set_status("lab", "stats", {"up": 1, "last_attempt": then, "last_success": then,
                                                    "error": None, "duration": 0.1})
            await r.aclose()

        asyncio.run(seed())
        overdue = age > overdue_after(1, 3)
        with _api(proc.url) as client:
            text = client.get("/vrops/metrics").text
            data = client.get("/vrops/metrics", params={"format": "json"}).json()
        target = data["targets"][0]
        if overdue:
            assert 'vrops_up{target="lab"} 0.0' in text
            assert 'vrops_collection_overdue{target="lab"} 1.0' in text
            assert 'vrops_sample_stale{metric="vrops_cpu_usage_ratio",target="lab",vccluster="c1"} 1.0' in text
            assert "vrops_cpu_usage_ratio{" not in text
            assert target["up"] == 0 and target["overdue"] is True
            assert target["error"].startswith("collection overdue: last success")
            assert data["samples"] == [] and data["stale"][0]["reason"] == "overdue"
        else:
            assert 'vrops_up{target="lab"} 1.0' in text
            assert 'vrops_collection_overdue{target="lab"} 0.0' in text
            assert "vrops_cpu_usage_ratio{" in text
            assert target["up"] == 1 and target["error"] is None and len(data["samples"]) == 1
    finally:
        proc.stop()


def test_lock_owner_token_short_ttl_and_bookkeeping_past_maxmemory(tmp_path: Path) -> None:
    proc = start_redis(tmp_path / "redis")

    async def scenario() -> None:
        r = make_redis(proc.url, 2.0)
        store = VropsStore(r)
        try:
            owner = await store.try_lock("stats", "lab", 0.6)
            assert owner is not None
            assert await store.try_lock("stats", "lab", 0.6) is None  # held
            assert await store.renew_lock("stats", "lab", "not-the-owner", 5) is False
            await store.unlock("stats", "lab", "not-the-owner")
            assert await r.exists(lock_key("stats", "lab")) == 1  # only the owner releases
            assert await store.renew_lock("stats", "lab", owner, 0.6) is True
            await asyncio.sleep(0.8)  # the owner died: no more renewals
            assert await store.renew_lock("stats", "lab", owner, 0.6) is False
            successor = await store.try_lock("stats", "lab", 5)
            assert successor is not None
            await store.unlock("stats", "lab", successor)

            await r.config_set("maxmemory-policy", "noeviction")
            await r.config_set("maxmemory", 1)
            try:
                now = time.time()
                try:
                    await store.write_cycle("lab", now, {("c", "cpu_usage_ratio"): [Row("vm", "a", 1.0, now)]},
                                            complete=True)
                    raise AssertionError("the write should have been refused")
                except OutOfMemoryError:
                    pass
                # The bookkeeping still lands: status record and lock.
                await store.set_status("lab", "stats", {"up": 0, "error": "store: OOM"})
                assert (await store.get_status("lab", "stats"))["error"] == "store: OOM"
                token = await store.try_lock("stats", "lab", 5)
                assert token is not None and await store.renew_lock("stats", "lab", token, 5)
                await store.unlock("stats", "lab", token)
            finally:
                await r.config_set("maxmemory", 0)
        finally:
            await r.aclose()

    try:
        asyncio.run(scenario())
    finally:
        proc.stop()
