"""One inventory refresh / one stats cycle for one target (no Celery here, so it is testable).

Inventory (slow cycle): clusters by paged GET /resources, then every host, VM
and datastore below them by POST /resources/bulk/relationships (DESCENDANT),
which also says which cluster each object hangs under. Saved in Redis.

Stats (fast cycle): latest values of every inventory object in batches of
<= 1,000 ids, converted to base units, grouped by (cluster, metric) and written
with VropsStore.write_cycle. Samples whose own vROps timestamp is already older
than the stale age are withheld (counted in `stale_samples`).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

from app.vrops.client import VropsClient
from app.vrops.settings import VropsSettings
from app.vrops.store import UNCLUSTERED, Row, VropsStore
from app.vrops.units import object_kind, spec_for

log = logging.getLogger(__name__)

CLUSTER_KIND = "ClusterComputeResource"


@dataclass
class StatsResult:
    samples: int = 0
    stale_samples: int = 0
    objects: int = 0
    keys: int = 0
    errors: list[str] = field(default_factory=list)


async def collect_inventory(
    client: VropsClient, store: VropsStore, settings: VropsSettings
) -> int:
    target = client.target.name
    clusters = await client.list_resources(CLUSTER_KIND)
    cluster_by_id = {c.identifier: c.name for c in clusters}
    items: list[list[str]] = [[c.identifier, c.kind or CLUSTER_KIND, c.name, c.name]
                              for c in clusters]
    seen = set(cluster_by_id)
    if cluster_by_id:
        related = await client.descendants(list(cluster_by_id), settings.vrops_object_kinds)
        for res, parents in related:
            if res.identifier in seen:
                continue
            seen.add(res.identifier)
            cluster = next((cluster_by_id[p] for p in parents if p in cluster_by_id), UNCLUSTERED)
            items.append([res.identifier, res.kind, res.name, cluster])
    # Two objects with one name in one cluster would be one series: disambiguate.
    count: dict[tuple[str, str, str], int] = defaultdict(int)
    for _, kind, name, cluster in items:
        count[(cluster, kind, name)] += 1
    for item in items:
        if count[(item[3], item[1], item[2])] > 1:
            item[2] = f"{item[2]} ({item[0][:8]})"
    await store.save_inventory(target, items, settings.vrops_latest_ttl_seconds)
    return len(items)


async def collect_stats(
    client: VropsClient, store: VropsStore, settings: VropsSettings, started: float | None = None
) -> StatsResult:
    target = client.target.name
    started = time.time() if started is None else started
    inventory = await store.load_inventory(target)
    if inventory is None:
        await collect_inventory(client, store, settings)
        inventory = await store.load_inventory(target) or []
    meta = {i[0]: (object_kind(i[1]), i[2], i[3]) for i in inventory}
    values, errors = await client.latest_stats(list(meta), settings.vrops_stat_keys)
    result = StatsResult(objects=len(meta), errors=errors)
    groups: dict[tuple[str, str], list[Row]] = defaultdict(list)
    stale_cut = started - settings.vrops_stale_after_seconds
    for v in values:
        m = meta.get(v.resource_id)
        spec = spec_for(v.stat_key)
        if m is None or spec is None:
            continue
        ts = v.timestamp_ms / 1000.0
        if ts < stale_cut:
            result.stale_samples += 1
            continue
        kind, name, cluster = m
        groups[(cluster, spec.short)].append(Row(kind, name, spec.convert(v.value), ts))
        result.samples += 1
    result.keys = await store.write_cycle(target, started, groups, complete=not errors)
    return result
