"""JSON renderers: the summary contract for widgets, and category figures for Grafana.

A figure whose query matched no series is not an error, but it must never pass
for a number: both documents list such figures at the top level (`no_data`),
next to `errors`, and flag them in their per-figure provenance.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from app.common.tenancy import Tenant
from app.gateway.catalog.model import Catalog
from app.gateway.catalog.names import figure_name
from app.gateway.result import QueryResult, State, overall_status

JSON_TYPE = "application/json"


def with_scope(doc: dict[str, Any], tenant: Tenant) -> dict[str, Any]:
    """Tell a confined caller which labels its figures are confined to (an added key:
    the summary contract allows more keys). Upstream headers are not shown."""
    if tenant.confined:
        doc["scope"] = {"labels": tenant.labels()}
    return doc


def _number(v: float | None) -> tuple[float | None, str | None]:
    """JSON has no NaN or Inf: such a value becomes null plus a flag naming it."""
    if v is None:
        return None, None
    if math.isnan(v):
        return None, "NaN"
    if math.isinf(v):
        return None, "+Inf" if v > 0 else "-Inf"
    return v, None


def lacks_data(r: QueryResult) -> bool:
    """Prometheus answered (now, or in the last good answer served stale) with no series.

    A failed figure is not "no data": nothing is known about it, and it is listed
    under `errors` instead.
    """
    return r.state is not State.FAILED and not r.samples


def no_data(results: Iterable[QueryResult]) -> list[str]:
    """Ids of the figures without data, once each, in the order given."""
    return list(dict.fromkeys(r.query.id for r in results if lacks_data(r)))


def provenance(r: QueryResult) -> dict[str, Any]:
    out: dict[str, Any] = {"state": r.state.value, "lookup": r.lookup.value}
    if r.age_seconds is not None:
        out["age_seconds"] = round(r.age_seconds, 3)
    if r.error is not None:
        out["error"] = {"error_type": r.error.error_type, "message": r.error.message}
    if r.warnings:
        out["warnings"] = list(r.warnings)
    if r.truncated:  # the series cap cut this figure: say how much, never cut silently
        out["truncated"] = True
        out["series_dropped"] = r.dropped
        out["series_kept"] = len(r.samples)
    if lacks_data(r):
        out["no_data"] = True
    return out


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _errors(results: list[QueryResult]) -> list[dict[str, Any]]:
    return [
        {"query": r.query.id, "state": r.state.value, "error_type": r.error.error_type,
         "message": r.error.message}
        for r in results if r.error is not None
    ]


def dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def summary(catalog: Catalog, results: dict[str, QueryResult], upstream_up: bool | None) -> dict[str, Any]:
    """The widget contract: sections of numbers (null when missing) plus provenance."""
    metrics: dict[str, dict[str, float | None]] = {}
    prov: dict[str, dict[str, Any]] = {}
    for fig in catalog.summary:
        r = results[fig.query_id]
        total = r.total()
        value, flag = _number(None if total is None else total * fig.scale)
        metrics.setdefault(fig.section, {})[fig.key] = value
        p = provenance(r)
        p["query"] = fig.query_id
        # Its metric name in the query API (/api/v1): the status page's trend lines ask for it.
        p["figure"] = figure_name(catalog, r.query)
        p["unit"] = fig.unit or r.query.unit
        if flag:
            p["non_finite"] = flag
        prov.setdefault(fig.section, {})[fig.key] = p
    listed = list(results.values())
    return {
        "timestamp": _now(),
        "status": overall_status(listed),  # no data is not degraded: it is listed below
        "metrics": metrics,
        "provenance": prov,
        "errors": _errors(listed),
        "no_data": no_data(results[f.query_id] for f in catalog.summary),
        "upstream": {"up": upstream_up},
    }


def category(catalog: Catalog, name: str, results: list[QueryResult],
             filters: dict[str, list[str]], upstream_up: bool | None) -> dict[str, Any]:
    figures = []
    for r in results:
        series = []
        for s in r.samples:
            value, flag = _number(s.value)
            item: dict[str, Any] = {"labels": dict(s.labels), "value": value}
            if flag:
                item["non_finite"] = flag
            series.append(item)
        figures.append({
            "id": r.query.id,
            "name": r.query.family(catalog.prefix) + ("_total" if r.query.kind == "counter" else ""),
            "type": r.query.kind,
            "unit": r.query.unit,
            "help": r.query.help,
            "labels": list(r.query.labels),
            **provenance(r),
            "series": series,
        })
    return {
        "timestamp": _now(),
        "category": name,
        "status": overall_status(results),
        "filters": filters,
        "upstream": {"up": upstream_up},
        "errors": _errors(results),
        "no_data": no_data(results),
        "figures": figures,
    }
