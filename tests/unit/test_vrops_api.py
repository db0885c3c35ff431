"""GET /vrops/metrics and /vrops/jobs/metrics in-process, against a real redis-server."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI

from app.common.redis import make_redis
from app.vrops import jobs as job_metrics
from app.vrops.router import create_vrops_router
from app.vrops.settings import VropsSettings
from app.vrops.store import Row, VropsStore
from tests.support.procs import Proc, free_port, promtool_check_metrics


def make_app(settings: VropsSettings) -> FastAPI:
    app = FastAPI()
    app.include_router(create_vrops_router(settings))
    return app


@asynccontextmanager
async def api(settings: VropsSettings) -> AsyncIterator[httpx.AsyncClient]:
    app = make_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c


def settings_for(url: str, **kw: object) -> VropsSettings:
    return VropsSettings.model_validate({
        "redis_url": url,
        "vrops_targets": [
            {"name": "lab", "url": "http://v", "username": "u", "password": "p"},
            {"name": "prod", "url": "http://w", "username": "u", "password": "p"}],
        **kw})


async def seed(url: str) -> None:
    s = settings_for(url)
    r = make_redis(url, 2.0)
    store = VropsStore(r)
    now = time.time()
    await store.write_cycle("lab", now, {
        ("c1", "cpu_usage_ratio"): [Row("vm", "vm-a", 0.5, now), Row("host", "esx-1", 0.25, now)],
        ("c2", "cpu_usage_ratio"): [Row("vm", "vm-b", 0.75, now)],
        ("c1", "health_score_ratio"): [Row("vm", "vm-a", 1.0, now)],
    }, complete=True)
    await store.set_status("lab", "stats", {"up": 1, "last_attempt": now, "last_success": now,
                                            "duration": 1.5, "samples": 4})
    await store.set_status("prod", "stats", {"up": 0, "last_attempt": now, "last_success": None,
                                             "error": "vROps prod: HTTP 503"})
    await r.aclose()
    assert s.vrops_targets


async def test_text_filters_and_freshness(redis_proc: Proc) -> None:
    await seed(redis_proc.url)
    async with api(settings_for(redis_proc.url)) as c:
        r = await c.get("/vrops/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        body = r.text
        assert 'vrops_up{target="lab"} 1.0' in body and 'vrops_up{target="prod"} 0.0' in body
        assert 'vrops_collection_last_success_timestamp_seconds{target="lab"}' in body
        assert 'vrops_collection_duration_seconds{target="lab"} 1.5' in body
        assert body.count("vrops_cpu_usage_ratio{") == 3
        assert 'type=' not in body and ' cluster=' not in body and '{cluster=' not in body
        assert promtool_check_metrics(r.content).returncode == 0

        r = await c.get("/vrops/metrics", params={"cluster": "c1", "metric": "cpu_usage_ratio"})
        assert r.text.count("vrops_cpu_usage_ratio{") == 2
        assert "vrops_health_score_ratio{" not in r.text
        r = await c.get("/vrops/metrics", params={"object": "vm-a"})
        assert r.text.count('object="vm-a"') == 2 and 'object="vm-b"' not in r.text
        r = await c.get("/vrops/metrics", params={"kind": "host"})
        assert r.text.count("vrops_cpu_usage_ratio{") == 1


async def test_json_for_grafana(redis_proc: Proc) -> None:
    await seed(redis_proc.url)
    async with api(settings_for(redis_proc.url)) as c:
        r = await c.get("/vrops/metrics", params={"format": "json", "cluster": "c2"})
        assert r.status_code == 200
        data = r.json()
        assert data["samples"] == [{
            "target": "lab", "vccluster": "c2", "object_kind": "vm", "object": "vm-b",
            "metric": "vrops_cpu_usage_ratio", "value": 0.75,
            "timestamp": data["samples"][0]["timestamp"],
            "age_seconds": data["samples"][0]["age_seconds"]}]
        assert {t["target"]: t["up"] for t in data["targets"]} == {"lab": 1, "prod": 0}
        r2 = await c.get("/vrops/metrics", headers={"accept": "application/json"})
        assert len(r2.json()["samples"]) == 4


@pytest.mark.parametrize("params", [
    {"metric": "vrops_bogus"}, {"kind": "spaceship"}, {"target": "nope"},
    {"cluster": "x" * 300}, {"object": "bad\x01"}, {"format": "xml"},
    {"cluster": [f"c{i}" for i in range(51)]},
])
async def test_bad_input_is_422(redis_proc: Proc, params: dict[str, object]) -> None:
    async with api(settings_for(redis_proc.url)) as c:
        r = await c.get("/vrops/metrics", params=params)  # type: ignore[arg-type]
        assert r.status_code == 422


@pytest.mark.integration  # promtool
async def test_redis_down_fast_503_json_up0_text_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="app.vrops")
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens here
    async with api(settings_for(url, vrops_redis_timeout_seconds=0.3)) as c:
        t0 = time.monotonic()
        for _ in range(5):
            r = await c.get("/vrops/metrics", params={"format": "json"})
            assert r.status_code == 503 and r.json()["store_up"] is False
            t = await c.get("/vrops/metrics")
            assert t.status_code == 200 and "vrops_store_up 0.0" in t.text
            assert promtool_check_metrics(t.content).returncode == 0
        assert time.monotonic() - t0 < 3.0
        j = await c.get("/vrops/jobs/metrics")
        assert "vrops_store_up 0.0" in j.text
    lines = [r for r in caplog.records if "sample store" in r.getMessage()]
    assert len(lines) == 1 and "failing" in lines[0].getMessage()


async def test_job_metrics_endpoint(redis_proc: Proc) -> None:
    import redis as sync_redis
    r = sync_redis.Redis.from_url(redis_proc.url)
    now = time.time()
    # 3 successes, 1 failure inside the window; 5 failures that fell out of it.
    for i in range(5):
        job_metrics.record_job(r, "vrops.collect_stats", "failure", 0.2, f"old{i}",
                               window=300, now=now - 400)
    for i in range(3):
        job_metrics.record_job(r, "vrops.collect_stats", "success", 1.2, f"ok{i}",
                               window=300, now=now)
    job_metrics.record_job(r, "vrops.collect_stats", "failure", 40.0, "bad", window=300, now=now)
    job_metrics.record_workers(r, 2, now)
    r.rpush("celery", b"m1", b"m2")
    r.rpush("celery\x06\x163", b"m3")
    r.rpush("celery\x06\x169", b"m4")
    r.close()
    async with api(settings_for(redis_proc.url)) as c:
        resp = await c.get("/vrops/jobs/metrics")
    text = resp.text
    assert resp.status_code == 200, text
    assert 'vrops_jobs_total{status="failure",task="vrops.collect_stats"} 6.0' in text
    assert 'vrops_jobs_total{status="success",task="vrops.collect_stats"} 3.0' in text
    assert 'vrops_job_success_ratio{task="vrops.collect_stats"} 0.75' in text
    assert 'vrops_job_duration_seconds_bucket{le="2.5",task="vrops.collect_stats"} 8.0' in text
    assert 'vrops_job_duration_seconds_count{task="vrops.collect_stats"} 9.0' in text
    assert 'vrops_jobs_queue_depth{queue="celery"} 4.0' in text
    assert "vrops_workers_active 2.0" in text
    assert promtool_check_metrics(resp.content).returncode == 0
