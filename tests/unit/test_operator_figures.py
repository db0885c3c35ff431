"""The figures GatewayZ operators watch: in the category routes (not the summary), documented,
and each on a Grafana panel that computes the same thing as the catalog.

The values themselves are checked against a real Prometheus in
tests/integration/test_catalog_figures.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.gateway.catalog.loader import load_catalog
from app.gateway.promql.syntax import _Printer, parse, print_expr
from app.gateway.render import docs as docs_render
from tests.unit.test_dashboards import GRAFANA_MACROS

ROOT = Path(__file__).resolve().parents[2]
CATALOG = load_catalog()

# figure id -> (source family, categories that serve it)
OPERATOR_FIGURES: dict[str, tuple[str, set[str]]] = {
    "provider_time_to_first_chunk_p95_seconds": ("time_to_first_chunk_seconds", {"providers", "performance"}),
    "provider_ttfb_p95_seconds": ("backend_ttfb_seconds", {"providers", "performance"}),
    "provider_streaming_duration_p95_seconds": ("streaming_duration_seconds", {"performance"}),
    "providers_circuit_open": ("circuit_breaker_current_state", {"providers"}),
    "provider_circuit_breaker_open": ("circuit_breaker_current_state", {"providers"}),
    "provider_cost_usd_per_hour": ("gatewayz_api_cost_usd_total", {"providers", "business"}),
    "stream_chunks_dropped_per_second": ("stream_chunks_dropped_total", {"performance"}),
    "backend_redis_up": ("redis_up", {"system"}),
    "backend_queue_size": ("queue_size", {"system"}),
    "backend_event_loop_lag_seconds": ("gatewayz_event_loop_lag_seconds", {"system", "performance"}),
}
# Figures whose dashboard panels were corrected with them.
CORRECTED = ("provider_response_time_seconds", "active_api_keys", "active_trials")


def _normal(expr: str) -> str:
    """A panel's PromQL as the catalog would write it: macros at the catalog's window, and the
    dashboard's own variable filters (provider=~"$provider", job=~"$job") dropped."""
    for macro, value in GRAFANA_MACROS.items():
        expr = expr.replace(macro, "5m" if "rate_interval" in macro else value)
    tree = parse(expr)
    if str(getattr(tree, "op", "")) == "or" and print_expr(tree.rhs) == "vector(0)":  # a stat's default
        tree = tree.lhs
    return _Printer((), {"provider", "job"}).print(tree)


def _panel_exprs() -> list[tuple[str, str, str]]:
    out = []
    for path in sorted((ROOT / "grafana" / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for t in panel.get("targets", []):
                out.append((path.name, panel["title"], t["expr"]))
    return out


@pytest.mark.parametrize("qid", list(OPERATOR_FIGURES))
def test_served_by_category_routes_not_the_summary(qid: str) -> None:
    q = CATALOG.queries[qid]
    family, categories = OPERATOR_FIGURES[qid]
    assert family in q.expr
    assert q.unit.strip() and len(q.help) > 30
    served = {c for c, ids in CATALOG.categories.items() if qid in ids}
    assert served == categories
    assert qid not in {f.query_id for f in CATALOG.summary}


def test_summary_keys_are_unchanged() -> None:
    assert len(CATALOG.summary) == 23
    assert "providers_circuit_open" not in {f.key for f in CATALOG.summary}


@pytest.mark.parametrize("qid", [*OPERATOR_FIGURES, *CORRECTED])
def test_documented_in_docs(qid: str) -> None:
    md = docs_render.markdown(CATALOG)
    q = CATALOG.queries[qid]
    row = next(line for line in md.splitlines() if line.startswith(f"| `{q.family(CATALOG.prefix)}` |"))
    assert q.unit in row and q.expr.replace("|", "\\|") in row


@pytest.mark.parametrize("qid", [*OPERATOR_FIGURES, *CORRECTED])
def test_a_dashboard_panel_computes_the_same_figure(qid: str) -> None:
    expected = print_expr(parse(CATALOG.queries[qid].expr))
    matches = [(f, t) for f, t, e in _panel_exprs() if _normal(e) == expected]
    assert matches, f"no Grafana panel computes {qid}: {expected}"


def test_no_panel_reads_the_old_shapes() -> None:
    for fname, title, expr in _panel_exprs():
        tree = _normal(expr)
        assert tree != "max by (provider) (provider_response_time_seconds)", (fname, title)
        assert "sum(trial_active)" not in tree and "sum(active_api_keys)" not in tree, (fname, title)
