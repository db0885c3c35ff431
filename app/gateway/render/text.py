"""Prometheus text for catalog results: each figure under its own gateway family.

Derived values never reuse a source metric's name (a p95 is
`gateway_..._p95_seconds`, not the histogram's name); only the labels a query
declares are exported; and the answer is never empty: `<prefix>_upstream_up`
and per-query success, age, warnings and truncation gauges say what could not be
had, or not in full; `<prefix>_query_has_data` says which figures matched no series
(a figure without data exports no family of its own, so without this gauge it would
just vanish).
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from app.gateway.result import QueryResult, State


def families(prefix: str, results: Sequence[QueryResult], upstream_up: bool | None) -> list[Metric]:
    out: list[Metric] = []
    seen: set[str] = set()
    success = GaugeMetricFamily(
        f"{prefix}_query_success",
        "1 when the figure's value came from Prometheus (fresh or cached), 0 when stale or failed.",
        labels=["query"],
    )
    age = GaugeMetricFamily(
        f"{prefix}_query_age_seconds",
        "Age of the data behind each figure (large when a stale last-good value is served).",
        labels=["query"],
    )
    has_data = GaugeMetricFamily(
        f"{prefix}_query_has_data",
        "1 when the figure has at least one series, 0 when it has none (no data upstream when "
        "query_success is 1; failed with nothing stale to serve when it is 0).",
        labels=["query"],
    )
    warned = GaugeMetricFamily(
        f"{prefix}_query_warnings",
        "1 when the upstream's answer for the figure carried warnings (a partial response), else 0.",
        labels=["query"],
    )
    truncated = GaugeMetricFamily(
        f"{prefix}_query_truncated",
        "1 when the figure had more series than the gateway's cap (MAX_SERIES_PER_FIGURE) and only "
        "the largest values are exported, else 0.",
        labels=["query"],
    )
    for r in results:
        q = r.query
        if q.id in seen:  # a query shared by two categories is exported once
            continue
        seen.add(q.id)
        ok = r.state in (State.FRESH, State.CACHED)
        success.add_metric([q.id], 1.0 if ok else 0.0)
        has_data.add_metric([q.id], 1.0 if r.samples else 0.0)
        warned.add_metric([q.id], 1.0 if r.warnings else 0.0)
        truncated.add_metric([q.id], 1.0 if r.truncated else 0.0)
        if r.age_seconds is not None:
            age.add_metric([q.id], r.age_seconds)
        if not r.samples:
            continue
        help_text = f"{q.help} Unit: {q.unit}. Query id: {q.id}."
        fam: Metric
        if q.kind == "counter":
            fam = CounterMetricFamily(q.family(prefix), help_text, labels=list(q.labels))
        else:
            fam = GaugeMetricFamily(q.family(prefix), help_text, labels=list(q.labels))
        for s in r.samples:
            fam.add_metric([v for _, v in s.labels], s.value)
        out.append(fam)
    up = GaugeMetricFamily(
        f"{prefix}_upstream_up",
        "1 when the gateway's last request to upstream Prometheus succeeded, else 0.",
        value=1.0 if upstream_up else 0.0,
    )
    return [up, success, has_data, age, warned, truncated, *out]
