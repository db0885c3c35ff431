"""vROps stat keys -> Prometheus metric names in base units.

vROps reports percent (0..100), KB, GB and MHz; Prometheus wants ratios 0..1,
bytes and hertz. vROps' "GB"/"KB" are binary (GiB/KiB) like vCenter's, so the
factors are powers of 1024.
"""

from __future__ import annotations

from dataclasses import dataclass

KIB = 1024.0
GIB = 1024.0**3


def percent_to_ratio(v: float) -> float:
    return v / 100.0


def kb_to_bytes(v: float) -> float:
    return v * KIB


def gb_to_bytes(v: float) -> float:
    return v * GIB


def mhz_to_hertz(v: float) -> float:
    return v * 1e6


@dataclass(frozen=True)
class StatSpec:
    stat_key: str
    metric: str  # full Prometheus name, e.g. vrops_cpu_usage_ratio
    help: str
    factor: float

    @property
    def short(self) -> str:
        """Name without the vrops_ prefix, used in Redis keys and query parameters."""
        return self.metric.removeprefix("vrops_")

    def convert(self, value: float) -> float:
        return value * self.factor


STAT_SPECS: dict[str, StatSpec] = {
    s.stat_key: s
    for s in (
        StatSpec("cpu|usage_average", "vrops_cpu_usage_ratio",
                 "CPU usage as a ratio 0..1 (vROps cpu|usage_average).", 0.01),
        StatSpec("mem|usage_average", "vrops_memory_usage_ratio",
                 "Memory usage as a ratio 0..1 (vROps mem|usage_average).", 0.01),
        StatSpec("diskspace|used", "vrops_disk_used_bytes",
                 "Disk space used in bytes (vROps diskspace|used, GB).", GIB),
        StatSpec("diskspace|total_capacity", "vrops_disk_capacity_bytes",
                 "Disk capacity in bytes (vROps diskspace|total_capacity, GB).", GIB),
        StatSpec("badge|health", "vrops_health_score_ratio",
                 "vROps health badge as a ratio 0..1 (badge|health, 0..100).", 0.01),
        StatSpec("cpu|demandmhz", "vrops_cpu_demand_hertz",
                 "CPU demand in hertz (vROps cpu|demandmhz).", 1e6),
        StatSpec("mem|consumed_average", "vrops_memory_consumed_bytes",
                 "Memory consumed in bytes (vROps mem|consumed_average, KB).", KIB),
    )
}

# vROps resourceKindKey -> value of the object_kind label.
OBJECT_KINDS: dict[str, str] = {
    "ClusterComputeResource": "cluster",
    "HostSystem": "host",
    "VirtualMachine": "vm",
    "Datastore": "datastore",
}


def object_kind(resource_kind: str) -> str:
    return OBJECT_KINDS.get(resource_kind, resource_kind.lower())


def spec_for(stat_key: str) -> StatSpec | None:
    return STAT_SPECS.get(stat_key)


def metric_by_name(name: str) -> StatSpec | None:
    """Look a metric up by full (vrops_cpu_usage_ratio) or short (cpu_usage_ratio) name."""
    full = name if name.startswith("vrops_") else f"vrops_{name}"
    for s in STAT_SPECS.values():
        if s.metric == full:
            return s
    return None
