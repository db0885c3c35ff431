"""Base-unit conversion and metric naming."""

from __future__ import annotations

import pytest

from app.vrops.units import (
    GIB,
    STAT_SPECS,
    gb_to_bytes,
    kb_to_bytes,
    metric_by_name,
    mhz_to_hertz,
    object_kind,
    percent_to_ratio,
    spec_for,
)


def test_conversions() -> None:
    assert percent_to_ratio(12.5) == 0.125
    assert kb_to_bytes(2) == 2048
    assert gb_to_bytes(1.5) == 1.5 * 1024**3
    assert mhz_to_hertz(2400) == 2.4e9


@pytest.mark.parametrize(("key", "raw", "name", "want"), [
    ("cpu|usage_average", 50.0, "vrops_cpu_usage_ratio", 0.5),
    ("mem|usage_average", 100.0, "vrops_memory_usage_ratio", 1.0),
    ("diskspace|used", 2.0, "vrops_disk_used_bytes", 2 * GIB),
    ("diskspace|total_capacity", 500.0, "vrops_disk_capacity_bytes", 500 * GIB),
    ("badge|health", 75.0, "vrops_health_score_ratio", 0.75),
    ("mem|consumed_average", 4.0, "vrops_memory_consumed_bytes", 4096.0),
    ("cpu|demandmhz", 1.0, "vrops_cpu_demand_hertz", 1e6),
])
def test_stat_specs(key: str, raw: float, name: str, want: float) -> None:
    spec = spec_for(key)
    assert spec is not None and spec.metric == name
    assert spec.convert(raw) == pytest.approx(want)


def test_names_follow_prometheus_conventions() -> None:
    for spec in STAT_SPECS.values():
        assert spec.metric.startswith("vrops_")
        assert spec.metric.endswith(("_ratio", "_bytes", "_hertz"))
        assert metric_by_name(spec.short) is spec and metric_by_name(spec.metric) is spec
    assert metric_by_name("vrops_nope") is None


def test_object_kinds() -> None:
    assert object_kind("VirtualMachine") == "vm"
    assert object_kind("ClusterComputeResource") == "cluster"
    assert object_kind("ResourcePool") == "resourcepool"
