"""Redis layout, TTLs, one-round-trip reads and the exposition built from them."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from redis.asyncio import Redis

from app.common.redis import make_redis
from app.vrops.exposition import json_payload, render_text
from app.vrops.store import Blob, Row, VropsStore, latest_key, sample_key
from tests.support.procs import Proc, promtool_check_metrics

METRICS = ["cpu_usage_ratio", "disk_used_bytes"]


@pytest.fixture
async def redis(redis_proc: Proc) -> AsyncIterator[Redis]:
    r = make_redis(redis_proc.url, 2.0)
    await r.flushdb()
    yield r
    await r.aclose()


def groups(ts: float, clusters: int = 2) -> dict[tuple[str, str], list[Row]]:
    out: dict[tuple[str, str], list[Row]] = {}
    for c in range(clusters):
        cluster = f"c{c}"
        out[(cluster, "cpu_usage_ratio")] = [Row("vm", f"vm-{c}-{i}", i / 10, ts)
                                             for i in range(3)]
        out[(cluster, "disk_used_bytes")] = [Row("datastore", f"ds-{c}", 1073741824.0, ts)]
    return out


async def test_key_layout_and_ttls(redis: Redis) -> None:
    store = VropsStore(redis, sample_ttl=120, latest_ttl=900)
    now = 1_700_000_000.5
    await store.write_cycle("lab", now, groups(now), complete=True)
    key = sample_key("c0", "cpu_usage_ratio", now)
    assert key == "vrops:c0:cpu_usage_ratio:1700000000"
    h = await redis.hgetall(key)
    assert h[b"lab/vm/vm-0-1"] == b"0.1"
    assert 0 < await redis.ttl(key) <= 120
    assert 800 < await redis.ttl(latest_key("lab")) <= 900
    assert sorted(await redis.hkeys(latest_key("lab"))) == [
        b"cpu_usage_ratio|c0", b"cpu_usage_ratio|c1", b"disk_used_bytes|c0",
        b"disk_used_bytes|c1"]
    assert sample_key("a:b%c", "m", 1) == "vrops:a%3Ab%25c:m:1"


async def test_latest_read_is_one_round_trip(redis: Redis) -> None:
    store = VropsStore(redis)
    now = time.time()
    await store.write_cycle("lab", now, groups(now), complete=True)
    await store.write_cycle("prod", now, groups(now, 1), complete=True)
    before = (await redis.info("stats"))["total_commands_processed"]
    snap = await store.read_latest(["lab", "prod"], None, METRICS)
    after = (await redis.info("stats"))["total_commands_processed"]
    # INFO itself counts once; the read is HGETALL status + one HGETALL per target.
    assert after - before == 1 + 3
    assert len(snap.blobs["lab"]) == 4 and len(snap.blobs["prod"]) == 2
    rows = list(snap.blobs["lab"][("c1", "cpu_usage_ratio")].iter_rows())
    assert rows[2] == ("vm", "vm-1-2", 0.2)
    # Clusters named: HMGET of exactly those fields.
    snap = await store.read_latest(["lab"], ["c1"], ["disk_used_bytes"])
    assert list(snap.blobs["lab"]) == [("c1", "disk_used_bytes")]


async def test_complete_cycle_replaces_partial_merges(redis: Redis) -> None:
    store = VropsStore(redis)
    now = time.time()
    await store.write_cycle("lab", now, groups(now, 3), complete=True)
    await store.write_cycle("lab", now + 1, groups(now + 1, 1), complete=False)
    assert len(await redis.hkeys(latest_key("lab"))) == 6
    await store.write_cycle("lab", now + 2, groups(now + 2, 1), complete=True)
    assert len(await redis.hkeys(latest_key("lab"))) == 2


async def test_stale_blobs_withheld_and_reported(redis: Redis) -> None:
    store = VropsStore(redis)
    now = time.time()
    old = groups(now - 1000, 1)
    fresh = {("c9", "cpu_usage_ratio"): [Row("vm", "vm-new", 0.5, now)]}
    await store.write_cycle("lab", now, {**old, **fresh}, complete=True)
    snap = await store.read_latest(["lab"], None, METRICS)
    body, _ = render_text(snap, ["lab"], now + 1, 300.0, None)
    text = body.decode()
    assert 'vrops_cpu_usage_ratio{target="lab",vccluster="c9",object_kind="vm",object="vm-new"}' \
        in text
    assert 'vccluster="c0",object_kind' not in text  # stale values not served as current
    assert ('vrops_sample_stale{metric="vrops_cpu_usage_ratio",target="lab",vccluster="c0"} 1.0'
            in text)
    age_line = next(line for line in text.splitlines() if line.startswith(
        'vrops_sample_age_seconds{metric="vrops_cpu_usage_ratio",target="lab",vccluster="c0"}'))
    assert float(age_line.rsplit(" ", 1)[1]) == pytest.approx(1001, abs=0.01)
    payload = json_payload(snap, ["lab"], now + 1, 300.0)
    assert [s["object"] for s in payload["samples"]] == ["vm-new"]
    assert {(s["vccluster"], s["metric"]) for s in payload["stale"]} == {
        ("c0", "vrops_cpu_usage_ratio"), ("c0", "vrops_disk_used_bytes")}
    assert promtool_check_metrics(body).returncode == 0


async def test_awkward_names_escape_and_pass_promtool(redis: Redis) -> None:
    store = VropsStore(redis)
    now = time.time()
    weird = 'vm "quoted" \\ back\nslash'
    await store.write_cycle("lab", now, {('clu"ster\\x', "cpu_usage_ratio"): [
        Row("vm", weird, 0.25, now), Row("vm", "plain", float("nan"), now)]}, complete=True)
    snap = await store.read_latest(["lab"], None, METRICS)
    body, _ = render_text(snap, ["lab"], now, 300.0, None)
    res = promtool_check_metrics(body)
    assert res.returncode == 0, res.stdout + res.stderr
    assert [r[1] for r in snap.blobs["lab"][('clu"ster\\x', "cpu_usage_ratio")].iter_rows()
            ] == [weird, "plain"]
    # Object filter matches the unescaped name.
    body, _ = render_text(snap, ["lab"], now, 300.0, None, objects=[weird])
    assert body.count(b"vrops_cpu_usage_ratio{") == 1


async def test_openmetrics_negotiation(redis: Redis) -> None:
    store = VropsStore(redis)
    now = time.time()
    await store.write_cycle("lab", now, groups(now), complete=True)
    snap = await store.read_latest(["lab"], None, METRICS)
    body, ctype = render_text(snap, ["lab"], now, 300.0,
                              "application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n") and body.count(b"# EOF") == 1
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}  # type: ignore[no-untyped-call]
    assert len(fams["vrops_cpu_usage_ratio"].samples) == 6


def test_blob_roundtrip() -> None:
    from app.vrops.store import encode_blob
    raw = encode_blob([Row("vm", "a", 1.5, 10.0), Row("host", "b", 2.0, 12.0)], 20.0)
    b = Blob.parse(raw)
    assert (b.sample_ts, b.collected_at, b.count) == (12.0, 20.0, 2)
    assert list(b.iter_rows()) == [("vm", "a", 1.5), ("host", "b", 2.0)]

