"""metrics_gateway_cache_events_total counts each figure looked up once, by how it was
had in the end (the Lookup vocabulary): never a miss and then a hit for the same one."""

from __future__ import annotations

import respx
from prometheus_client import REGISTRY

from app.gateway.caching.figures import QueryCache
from app.gateway.engines.figures import Engine
from app.gateway.upstream.client import PrometheusClient
from tests.unit.test_aggregator import ABC, QUERY_URL, fake_prometheus, settings

CATEGORY = "events-test"


def events() -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in REGISTRY.collect():
        if metric.name == "metrics_gateway_cache_events":
            for s in metric.samples:
                if s.name.endswith("_total") and s.labels["category"] == CATEGORY:
                    out[s.labels["outcome"]] = s.value
    return out


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


@respx.mock
async def test_one_event_per_figure_per_request() -> None:
    respx.post(QUERY_URL).mock(side_effect=fake_prometheus)
    s = settings(cache_ttl_seconds=60)
    client = PrometheusClient(s)
    engine = Engine(s, client, QueryCache(s.cache_max_entries, s.stale_max_age_seconds))
    try:
        before = events()
        await engine.run(ABC, CATEGORY)  # cold: three misses
        assert delta(before, events()) == {"miss": 3.0}
        before = events()
        await engine.run(ABC, CATEGORY)  # warm: three hits
        assert delta(before, events()) == {"hit": 3.0}
    finally:
        await engine.aclose()
        await client.aclose()
