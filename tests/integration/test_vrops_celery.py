"""Real Redis + real Celery worker (prefork, embedded beat) + stand-in vROps + the API.

Everything binds 127.0.0.1 on free ports; every process is stopped by its fixture.
Intervals are 1-2 s so a beat-triggered cycle happens within seconds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.procs import (
    Proc,
    promtool_check_metrics,
    start_celery_worker,
    start_redis,
    start_uvicorn,
    wait_until,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
STALE_AFTER = 4.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("vrops-stack")
    procs: list[Proc] = []
    try:
        redis = start_redis(base / "redis")
        procs.append(redis)
        common = {"PYTHONPATH": str(ROOT)}
        fake = start_uvicorn(base / "fake", "tests.fakes.vrops_server:app_from_env",
                             env={**common, "FAKE_VROPS_CLUSTERS": "3",
                                  "FAKE_VROPS_OBJECTS": "20"},
                             factory=True, health_path="/health")
        procs.append(fake)
        env = {
            **common,
            "REDIS_URL": redis.url,
            "VROPS_TARGETS": json.dumps([{"name": "lab", "url": fake.url, "username": "admin",
                                          "password": "s3cret", "verify_tls": False}]),
            "VROPS_STATS_INTERVAL_SECONDS": "1",
            "VROPS_INVENTORY_INTERVAL_SECONDS": "5",
            "VROPS_WORKER_PING_INTERVAL_SECONDS": "1",
            "VROPS_STALE_AFTER_SECONDS": str(STALE_AFTER),
            "VROPS_COLLECTION_TIMEOUT_SECONDS": "8",
            "VROPS_MAX_RETRIES": "0",
            "VROPS_CONNECT_TIMEOUT_SECONDS": "1",
            "VROPS_READ_TIMEOUT_SECONDS": "3",
            "VROPS_REDIS_TIMEOUT_SECONDS": "0.3",
            "VROPS_WORKER_REDIS_TIMEOUT_SECONDS": "2",
        }
        worker = start_celery_worker(base / "worker", env, "vrops-test")
        procs.append(worker)
        api = start_uvicorn(base / "api", "tests.support.vrops_app:make_api",
                            env=env, factory=True)
        procs.append(api)
        yield {"redis": redis, "fake": fake, "worker": worker, "api": api}
    finally:
        for p in reversed(procs):
            p.stop()


def get(stack: dict[str, Any], path: str, **params: Any) -> httpx.Response:
    return httpx.get(f"{stack['api'].url}{path}", params=params, timeout=5.0)


def control(stack: dict[str, Any], **body: Any) -> dict[str, Any]:
    r = httpx.post(f"{stack['fake'].url}/_control", json=body, timeout=5.0)
    return dict(r.json())


def metric_value(text: str, prefix: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_beat_collection_lands_in_redis_and_metrics(stack: dict[str, Any]) -> None:
    def collected() -> dict[str, Any] | None:
        data = get(stack, "/vrops/metrics", format="json").json()
        return data if len(data["samples"]) == 3 * 21 * 5 else None

    try:
        data = wait_until(collected, timeout=40, interval=0.5, what="first collection")
    except TimeoutError:
        pytest.fail(f"no collection; worker log:\n{stack['worker'].log()}")
    assert data["targets"][0]["up"] == 1
    names = {s["metric"] for s in data["samples"]}
    assert names == {"vrops_cpu_usage_ratio", "vrops_memory_usage_ratio",
                     "vrops_disk_used_bytes", "vrops_disk_capacity_bytes",
                     "vrops_health_score_ratio"}
    r = get(stack, "/vrops/metrics")
    assert r.status_code == 200
    assert 'vrops_up{target="lab"} 1.0' in r.text
    assert r.text.count("vrops_cpu_usage_ratio{") == 63
    res = promtool_check_metrics(r.content)
    assert res.returncode == 0, res.stdout + res.stderr
    filt = get(stack, "/vrops/metrics", cluster="cluster-001", metric="vrops_disk_used_bytes",
               kind="vm")
    assert filt.text.count("vrops_disk_used_bytes{") == 18  # 20 - 1 host - 1 datastore

    def jobs_seen() -> str | None:
        t = get(stack, "/vrops/jobs/metrics").text
        ok = 'vrops_jobs_total{status="success",task="vrops.collect_stats"}' in t
        workers = metric_value(t, "vrops_workers_active ")
        return t if ok and workers and workers >= 1 else None

    text = wait_until(jobs_seen, timeout=20, interval=0.5, what="job metrics")
    assert 'vrops_job_success_ratio{task="vrops.collect_stats"}' in text
    assert "vrops_jobs_queue_depth{queue=\"celery\"}" in text
    res = promtool_check_metrics(get(stack, "/vrops/jobs/metrics").content)
    assert res.returncode == 0, res.stdout + res.stderr


def test_vrops_outage_samples_age_and_up_goes_0(stack: dict[str, Any]) -> None:
    wait_until(lambda: 'vrops_up{target="lab"} 1.0' in get(stack, "/vrops/metrics").text,
               timeout=20, what="up before outage")
    for mode in ("down", "unauthorized"):
        control(stack, mode=mode)
        wait_until(lambda: 'vrops_up{target="lab"} 0.0' in get(stack, "/vrops/metrics").text,
                   timeout=15, what=f"up 0 while {mode}")
        age_prefix = ('vrops_sample_age_seconds{metric="vrops_cpu_usage_ratio",target="lab",'
                      'vccluster="cluster-000"}')
        a1 = metric_value(get(stack, "/vrops/metrics").text, age_prefix)
        time.sleep(1.5)
        a2 = metric_value(get(stack, "/vrops/metrics").text, age_prefix)
        assert a1 is not None and a2 is not None and a2 > a1  # samples visibly age

    def stale() -> str | None:
        t = get(stack, "/vrops/metrics").text
        return t if 'vrops_sample_stale{metric="vrops_cpu_usage_ratio",target="lab",' \
                    'vccluster="cluster-000"} 1.0' in t else None

    text = wait_until(stale, timeout=STALE_AFTER + 10, what="samples stale")
    assert "vrops_cpu_usage_ratio{" not in text  # stale values are not served as current
    assert metric_value(text, 'vrops_collection_last_success_timestamp_seconds{target="lab"}')
    assert promtool_check_metrics(text.encode()).returncode == 0
    stale_json = get(stack, "/vrops/metrics", format="json").json()
    assert stale_json["samples"] == [] and stale_json["stale"]
    assert stack["worker"].popen.poll() is None  # nothing crashed
    assert control(stack)["counters"].get("unauthorized", 0) > 0
    jobs = get(stack, "/vrops/jobs/metrics").text
    assert 'vrops_jobs_total{status="failure",task="vrops.collect_stats"}' in jobs

    control(stack, mode="ok")
    wait_until(lambda: 'vrops_up{target="lab"} 1.0' in get(stack, "/vrops/metrics").text,
               timeout=20, what="recovery")
    log = stack["worker"].log()
    assert "s3cret" not in log


def test_redis_outage_fast_503_and_up0_logged_once(stack: dict[str, Any]) -> None:
    stack["redis"].stop()
    t0 = time.monotonic()
    for _ in range(10):
        j = get(stack, "/vrops/metrics", format="json")
        assert j.status_code == 503 and j.json()["store_up"] is False
        t = get(stack, "/vrops/metrics")
        assert t.status_code == 200 and "vrops_store_up 0.0" in t.text
    elapsed = time.monotonic() - t0
    assert elapsed < 5.0, elapsed  # 20 requests, each bounded by the socket timeouts
    assert promtool_check_metrics(t.content).returncode == 0
    time.sleep(0.2)
    api_log = stack["api"].log_path.read_text(errors="replace")
    assert api_log.count("vROps sample store (Redis) failing") == 1, api_log[-2000:]
    assert stack["worker"].popen.poll() is None
