"""Inventory + stats cycles against the stand-in (in-process ASGI) and a real redis-server."""

from __future__ import annotations

import logging

import httpx
import pytest

from app.common.redis import make_redis
from app.vrops.settings import VropsSettings
from app.vrops.store import VropsStore, latest_key
from app.workers import tasks
from tests.fakes.vrops_server import FakeVrops, create_app
from tests.support.procs import Proc


@pytest.fixture(autouse=True)
def fresh_tokens() -> None:
    tasks.TOKEN_CACHE._tokens.clear()


def settings(url: str, **kw: object) -> VropsSettings:
    return VropsSettings.model_validate({
        "redis_url": url, "vrops_retry_backoff_seconds": 0.01, "vrops_max_retries": 1,
        "vrops_targets": [{"name": "lab", "url": "http://fake", "username": "admin",
                           "password": "s3cret"}], **kw})


async def test_inventory_maps_objects_to_clusters(redis_proc: Proc) -> None:
    fake = FakeVrops(clusters=3, objects_per_cluster=60)
    transport = httpx.ASGITransport(app=create_app(fake))
    s = settings(redis_proc.url, vrops_page_size=50)
    assert await tasks.run_inventory("lab", s, transport) == "success"
    r = make_redis(redis_proc.url, 2)
    store = VropsStore(r)
    inv = await store.load_inventory("lab") or []
    assert len(inv) == 3 + 3 * 60
    by_name = {i[2]: i for i in inv}
    assert by_name["vm-001-0010"][1:] == ["VirtualMachine", "vm-001-0010", "cluster-001"]
    assert by_name["cluster-002"][3] == "cluster-002"
    assert fake.counters["relationships"] >= 4  # 180 objects in pages of 50
    st = await store.get_status("lab", "inventory")
    assert st["up"] == 1 and st["objects"] == 183
    await r.aclose()


async def test_stats_cycle_writes_latest_and_status(redis_proc: Proc) -> None:
    fake = FakeVrops(clusters=2, objects_per_cluster=10)
    transport = httpx.ASGITransport(app=create_app(fake))
    s = settings(redis_proc.url)
    assert await tasks.run_stats("lab", s, transport) == "success"
    r = make_redis(redis_proc.url, 2)
    store = VropsStore(r)
    st = await store.get_status("lab", "stats")
    assert st["up"] == 1 and st["samples"] == 22 * 5 and st["last_success"]
    snap = await store.read_latest(["lab"], ["cluster-000"], ["cpu_usage_ratio"])
    rows = list(snap.blobs["lab"][("cluster-000", "cpu_usage_ratio")].iter_rows())
    assert len(rows) == 11 and all(0 <= v <= 1 for _, _, v in rows)
    assert fake.counters["acquire"] == 1
    # Next cycle reuses the cached token.
    assert await tasks.run_stats("lab", s, transport) == "success"
    assert fake.counters["acquire"] == 1
    # Tokens expired server-side: 401 apiErrorCode 1512 -> renew and retry once.
    fake.tokens.clear()
    assert await tasks.run_stats("lab", s, transport) == "success"
    assert fake.counters["acquire"] == 2
    await r.aclose()


@pytest.mark.parametrize("mode", ["down", "unauthorized"])
async def test_vrops_outage_marks_down_keeps_last_success_logs_once(
        redis_proc: Proc, mode: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="app.workers.vrops")
    fake = FakeVrops(clusters=1, objects_per_cluster=5)
    transport = httpx.ASGITransport(app=create_app(fake))
    s = settings(redis_proc.url)
    assert await tasks.run_stats("lab", s, transport) == "success"
    r = make_redis(redis_proc.url, 2)
    store = VropsStore(r)
    good = (await store.get_status("lab", "stats"))["last_success"]
    fake.mode = mode
    for _ in range(3):
        assert await tasks.run_stats("lab", s, transport) == "failure"
    st = await store.get_status("lab", "stats")
    assert st["up"] == 0 and st["last_success"] == good and st["error"]
    assert "s3cret" not in st["error"]
    # Old values are kept (and will go stale), not deleted.
    assert await r.hlen(latest_key("lab")) == 5
    fake.mode = "ok"
    assert await tasks.run_stats("lab", s, transport) == "success"
    msgs = [rec.getMessage() for rec in caplog.records]
    assert sum("failing" in m for m in msgs) == 1
    assert sum("recovered" in m for m in msgs) == 1
    assert not any("s3cret" in m for m in msgs)
    await r.aclose()


async def test_samples_already_stale_in_vrops_are_withheld(redis_proc: Proc) -> None:
    fake = FakeVrops(clusters=1, objects_per_cluster=5, sample_lag_seconds=5000)
    transport = httpx.ASGITransport(app=create_app(fake))
    s = settings(redis_proc.url, vrops_stale_after_seconds=600)
    assert await tasks.run_stats("lab", s, transport) == "success"
    r = make_redis(redis_proc.url, 2)
    st = await VropsStore(r).get_status("lab", "stats")
    assert st["samples"] == 0 and st["stale_samples"] == 6 * 5
    await r.aclose()


async def test_overlapping_cycles_are_skipped(redis_proc: Proc) -> None:
    s = settings(redis_proc.url)
    r = make_redis(redis_proc.url, 2)
    store = VropsStore(r)
    token = await store.try_lock("stats", "lab", 30)
    assert token is not None
    assert await tasks.run_stats("lab", s) == "skipped"
    await store.unlock("stats", "lab", token)
    assert await r.exists("vrops:lock:stats:lab") == 0
    await r.aclose()
