"""A Redis Cluster's partial failures as the shared tier sees them: a slot-map change
logged once per episode, a failure episode that a healthy master's answers do not end
early, and a breaker whose lost half-open probe does not keep it shut."""

from __future__ import annotations

import logging

import pytest
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode

from app.common.episodes import FailureEpisode
from app.common.redis_topology import SLOTS, TopologyWatch
from app.gateway.upstream.breaker import CircuitBreaker

log = logging.getLogger("test.cluster")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def cluster_with(masters: list[int]) -> RedisCluster:
    """A client (never connected) whose slot map gives each master an equal share."""
    client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", p) for p in masters])
    assign(client, masters)
    return client


def assign(client: RedisCluster, masters: list[int]) -> None:
    nodes = [ClusterNode("127.0.0.1", p) for p in masters]
    client.nodes_manager.slots_cache = {s: [nodes[s * len(nodes) // SLOTS]] for s in range(SLOTS)}


def test_slot_map_changes_are_logged_once_per_episode(caplog: pytest.LogCaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr("app.common.redis_topology.time.monotonic", clock)
    client = cluster_with([7001, 7002, 7003])
    changes: list[int] = []
    watch = TopologyWatch(client, "tier", log, on_change=lambda: changes.append(1), interval=1.0, quiet=30.0)
    caplog.set_level(logging.WARNING, logger="test.cluster")
    watch.check()  # the first map: nothing to compare
    assign(client, [7001, 7002, 7004])  # 7003 failed over to 7004
    watch.check()
    clock.now += 0.5
    assert not caplog.records  # rate-limited: not looked at yet
    clock.now += 0.6
    watch.check()
    assert len(caplog.records) == 1 and "5461 slots" in caplog.records[0].getMessage()
    assert "7003" in caplog.records[0].getMessage() and "7004" in caplog.records[0].getMessage()
    assign(client, [7001, 7005, 7004])  # another change within the quiet period: counted only
    clock.now += 1.1
    watch.check()
    assert len(caplog.records) == 1 and len(changes) == 2 == watch.changes


def test_a_change_during_a_failure_episode_goes_to_its_closing_line(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr("app.common.redis_topology.time.monotonic", clock)
    client = cluster_with([7001, 7002, 7003])
    failing = [True]
    watch = TopologyWatch(client, "tier", log, interval=0.0, quiet_while=lambda: failing[0])
    watch.check()
    assign(client, [7001, 7002, 7004])
    watch.check()
    assert "slot map changed" in watch.note


def test_not_a_cluster_is_not_watched() -> None:
    watch = TopologyWatch(Redis(), "tier", log)
    watch.check()
    assert watch.changes == 0


def test_an_episode_with_settling_ends_after_successes_without_failure(caplog: pytest.LogCaptureFixture,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr("app.common.episodes.time.monotonic", clock)
    caplog.set_level(logging.WARNING, logger="test.cluster")
    ep = FailureEpisode("tier", log, settle_seconds=1.0)
    assert ep.failure("connection refused")
    for _ in range(5):  # a healthy master answers, the failed one still fails
        clock.now += 0.3
        assert not ep.success()
        assert not ep.failure("connection refused")
    clock.now += 0.3
    assert not ep.success()  # the first success of a quiet period
    clock.now += 1.0
    assert ep.success("cluster slot map changed")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[1].endswith("; cluster slot map changed")
    plain = FailureEpisode("one redis", log)
    plain.failure("down")
    assert plain.success()  # without settling: the first success ends it, as before


def test_a_lost_half_open_probe_is_written_off_after_a_reset_period() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 1.0, clock=clock, on_change=lambda s: None)
    breaker.failure()
    assert not breaker.allow()
    clock.now += 1.0
    assert breaker.allow()  # the probe; its caller never reports (cancelled)
    assert not breaker.allow()
    clock.now += 0.5
    assert not breaker.allow()
    clock.now += 0.5
    assert breaker.allow()  # written off: another probe
    breaker.success()
    assert breaker.state == "closed" and breaker.allow()
