"""Every metric a dashboard or alert reads must exist: a renamed metric breaks this test.

Known names come from three places, never from a hand-kept list of our own names:

- the code: the default prometheus_client REGISTRY after importing the
  monitoring modules (HTTP, gateway, domain metrics), plus the families the
  vROps/worker collectors build at scrape time (found in their source by AST),
  plus the vROps sample metrics from app.vrops.units.STAT_SPECS;
- the query catalog: ``<prefix>_<name>`` for each entry of app/gateway/catalog/default.toml
  (``_total`` for counters) plus the gateway's per-query families;
- the GatewayZ backend contract (which the demo backend is also checked against).
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser as pp
import pytest
import yaml
from prometheus_client import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "grafana" / "dashboards"
ALERTS = ROOT / "prometheus" / "alerts.yml"
CATALOG = ROOT / "app" / "gateway" / "catalog" / "default.toml"

REQUIRED_DASHBOARDS = {
    "overview.json", "system.json", "providers.json", "models.json", "business.json",
    "performance.json", "vrops.json", "gateway-health.json",
}

# The GatewayZ backend's /metrics contract: name -> type.
BACKEND_CONTRACT: dict[str, str] = {
    "fastapi_requests_total": "counter",
    "fastapi_requests_duration_seconds": "histogram",
    "fastapi_requests_in_progress": "gauge",
    "fastapi_exceptions_total": "counter",
    "model_inference_requests_total": "counter",
    "model_inference_duration_seconds": "histogram",
    "tokens_used_total": "counter",
    "credits_used_total": "counter",
    "provider_availability": "gauge",
    "provider_error_rate": "gauge",
    "provider_response_time_seconds": "histogram",
    "database_queries_total": "counter",
    "database_query_duration_seconds": "summary",
    "cache_hits_total": "counter",
    "cache_misses_total": "counter",
    "active_api_keys": "gauge",
    "subscription_count": "gauge",
    "trial_active": "gauge",
    "time_to_first_chunk_seconds": "histogram",
    "backend_ttfb_seconds": "histogram",
    "streaming_duration_seconds": "histogram",
    "circuit_breaker_current_state": "gauge",
    "gatewayz_api_cost_usd_total": "counter",
    "stream_chunks_dropped_total": "counter",
    "redis_up": "gauge",
    "queue_size": "gauge",
    "gatewayz_event_loop_lag_seconds": "gauge",
}

# Series Prometheus itself attaches to every scrape.
PROMETHEUS_BUILTINS = {"up", "scrape_duration_seconds", "scrape_samples_scraped",
                       "scrape_samples_post_metric_relabeling", "scrape_series_added"}

# Per-query families the gateway's text routes emit next to the catalog figures.
GATEWAY_QUERY_FAMILIES = ("upstream_up", "query_success", "query_has_data", "query_age_seconds")

GRAFANA_MACROS = {
    "$__rate_interval": "5m", "${__rate_interval}": "5m", "$__interval": "1m",
    "${__interval}": "1m", "$__range": "1h", "${__range}": "1h",
}

MONITORING_MODULES = ("app.monitoring", "app.monitoring.http", "app.gateway.metrics",
                      "app.instrumentation")
COLLECTOR_SOURCE_DIRS = ("app/vrops", "app/workers")


def _with_suffixes(name: str, kind: str) -> set[str]:
    base = name.removesuffix("_total") if kind == "counter" else name
    if kind == "counter":
        return {base, f"{base}_total"}
    if kind == "histogram":
        return {base, f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    if kind == "summary":
        return {base, f"{base}_sum", f"{base}_count"}
    return {name}


def _registry_names() -> set[str]:
    for mod in MONITORING_MODULES:
        importlib.import_module(mod)
    for directory in COLLECTOR_SOURCE_DIRS:  # worker/vROps modules may register metrics too
        for path in sorted((ROOT / directory).glob("*.py")):
            if path.stem != "__init__":
                _try_import(f"{directory.replace('/', '.')}.{path.stem}")
    names: set[str] = set()
    for family in REGISTRY.collect():
        names |= _with_suffixes(family.name, family.type)
        names |= {s.name for s in family.samples}
    return names


def _try_import(module: str) -> None:
    try:
        importlib.import_module(module)
    except Exception:  # an unimportable optional module adds no names
        return


_FAMILY_KINDS = {"CounterMetricFamily": "counter", "GaugeMetricFamily": "gauge",
                 "HistogramMetricFamily": "histogram", "SummaryMetricFamily": "summary",
                 "InfoMetricFamily": "info", "StateSetMetricFamily": "stateset",
                 "GaugeHistogramMetricFamily": "gaugehistogram",
                 "UnknownMetricFamily": "unknown"}


def _collector_names() -> set[str]:
    """Families built by custom collectors (e.g. vROps, job metrics), read from the source."""
    names: set[str] = set()
    for directory in ("app",):
        for path in sorted((ROOT / directory).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                func = node.func
                fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                kind = _FAMILY_KINDS.get(fname)
                first = node.args[0]
                if kind and isinstance(first, ast.Constant) and isinstance(first.value, str):
                    names |= _with_suffixes(first.value, kind)
    try:
        units = importlib.import_module("app.vrops.units")
        names |= {spec.metric for spec in units.STAT_SPECS.values()}
    except ImportError:
        pass
    return names


def _catalog_names() -> set[str]:
    data = tomllib.loads(CATALOG.read_text())
    prefix = data.get("prefix", "gateway")
    names = {f"{prefix}_{f}" for f in GATEWAY_QUERY_FAMILIES}
    for q in data["queries"]:
        kind = q.get("type", "gauge")
        names |= _with_suffixes(f"{prefix}_{q['name']}", kind)
    return names


def _contract_names() -> set[str]:
    names: set[str] = set()
    for name, kind in BACKEND_CONTRACT.items():
        names |= _with_suffixes(name, kind)
    return names


@pytest.fixture(scope="module")
def known() -> dict[str, set[str]]:
    return {
        "code": _registry_names() | _collector_names(),
        "catalog": _catalog_names(),
        "contract": _contract_names(),
        "prometheus": set(PROMETHEUS_BUILTINS),
    }


def _all_known(known: dict[str, set[str]]) -> set[str]:
    return set().union(*known.values())


def _dashboards() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, json.loads(p.read_text())) for p in sorted(DASHBOARDS.glob("*.json"))]


def _panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dash.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep their panels inside


def _expand(expr: str) -> str:
    for macro, value in GRAFANA_MACROS.items():
        expr = expr.replace(macro, value)
    return expr


def metric_names(expr: str) -> set[str]:
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, pp.VectorSelector):
            if node.name:
                names.add(node.name)
            else:  # {__name__="..."} selectors
                for m in node.matchers.matchers:
                    if m.name == "__name__":
                        names.add(m.value)

    pp.walk(pp.parse(_expand(expr)), pre_visit=visit)
    return names


def _targets() -> list[tuple[str, str, str]]:
    out = []
    for fname, dash in _dashboards():
        for panel in _panels(dash):
            for target in panel.get("targets", []):
                out.append((fname, panel.get("title", "?"), target.get("expr", "")))
    return out


_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(?P<sel>.+),\s*)?(?P<label>\w+)\)\s*$")


def _variable_selectors() -> list[tuple[str, str, str]]:
    out = []
    for fname, dash in _dashboards():
        for var in dash.get("templating", {}).get("list", []):
            if var.get("type") != "query":
                continue
            q = var.get("query")
            q = q.get("query", "") if isinstance(q, dict) else str(q)
            m = _LABEL_VALUES.match(q)
            assert m, f"{fname}: variable {var['name']} query not understood: {q!r}"
            if m.group("sel"):
                out.append((fname, var["name"], m.group("sel")))
    return out


def _alert_exprs() -> list[tuple[str, str]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [(r.get("alert") or r.get("record"), r["expr"])
            for g in doc["groups"] for r in g["rules"]]


# ----------------------------------------------------------------------------- tests


def test_required_dashboards_exist() -> None:
    present = {p.name for p in DASHBOARDS.glob("*.json")}
    assert REQUIRED_DASHBOARDS <= present, REQUIRED_DASHBOARDS - present


def test_dashboards_are_well_formed() -> None:
    uids: set[str] = set()
    for fname, dash in _dashboards():
        assert dash.get("title"), fname
        assert dash.get("uid") and dash["uid"] not in uids, f"{fname}: missing/duplicate uid"
        uids.add(dash["uid"])
        variables = dash["templating"]["list"]
        ds_vars = [v for v in variables if v.get("type") == "datasource"]
        assert ds_vars and ds_vars[0]["name"] == "datasource", fname
        assert ds_vars[0]["query"] == "prometheus", fname
        ids: set[int] = set()
        for panel in _panels(dash):
            assert panel["id"] not in ids, f"{fname}: duplicate panel id {panel['id']}"
            ids.add(panel["id"])
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, (
                f"{fname}: panel {panel['title']!r} does not use the ${{datasource}} variable")
            assert panel.get("targets"), f"{fname}: panel {panel['title']!r} has no query"
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}", (fname, panel["title"])
                assert target.get("expr", "").strip(), (fname, panel["title"])
            grid = panel["gridPos"]
            assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, (fname, panel["title"])
        for var in variables:
            if var.get("type") == "query":
                assert var["datasource"]["uid"] == "${datasource}", (fname, var["name"])


@pytest.mark.parametrize(("fname", "title", "expr"), _targets())
def test_panel_queries_parse_and_use_known_metrics(
    fname: str, title: str, expr: str, known: dict[str, set[str]]
) -> None:
    names = metric_names(expr)  # raises on invalid PromQL
    assert names, f"{fname} / {title}: query reads no metric: {expr}"
    unknown = names - _all_known(known)
    assert not unknown, (
        f"{fname} / {title}: {sorted(unknown)} neither emitted by the code, served by the "
        f"catalog nor part of the backend contract")


@pytest.mark.parametrize(("fname", "var", "selector"), _variable_selectors())
def test_variable_queries_use_known_metrics(
    fname: str, var: str, selector: str, known: dict[str, set[str]]
) -> None:
    unknown = metric_names(selector) - _all_known(known)
    assert not unknown, f"{fname}: variable {var} reads unknown {sorted(unknown)}"


@pytest.mark.parametrize(("alert", "expr"), _alert_exprs())
def test_alert_rules_use_known_metrics(alert: str, expr: str, known: dict[str, set[str]]) -> None:
    unknown = metric_names(expr) - _all_known(known)
    assert not unknown, f"alert {alert} reads unknown {sorted(unknown)}"


def test_overview_covers_every_summary_figure() -> None:
    """The overview dashboard shows each /summary figure through its catalog family."""
    data = tomllib.loads(CATALOG.read_text())
    prefix = data.get("prefix", "gateway")
    by_id = {q["id"]: q for q in data["queries"]}
    overview = json.loads((DASHBOARDS / "overview.json").read_text())
    used: set[str] = set()
    for panel in _panels(overview):
        for target in panel.get("targets", []):
            used |= metric_names(target["expr"])
    missing = []
    for section, figures in data["summary"].items():
        for key, ref in figures.items():
            qid = ref if isinstance(ref, str) else ref["query"]
            q = by_id[qid]
            family = f"{prefix}_{q['name']}"
            if not (_with_suffixes(family, q.get("type", "gauge")) & used):
                missing.append(f"{section}.{key} ({family})")
    assert not missing, f"overview lacks summary figures: {missing}"


def test_catalog_reads_only_contract_metrics() -> None:
    """The default catalog queries exactly what the backend contract defines."""
    contract = _contract_names()
    data = tomllib.loads(CATALOG.read_text())
    for q in data["queries"]:
        unknown = metric_names(q["expr"]) - contract
        assert not unknown, f"catalog {q['id']} reads non-contract {sorted(unknown)}"


def test_demo_backend_serves_the_contract() -> None:
    """scripts/demo_backend.py exposes every contract family with its type."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        demo = importlib.import_module("demo_backend")
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    backend = demo.Backend(seed=1)
    backend.step()
    families = {f.name: f.type for f in backend.registry.collect()}
    for name, kind in BACKEND_CONTRACT.items():
        base = name.removesuffix("_total") if kind == "counter" else name
        assert families.get(base) == kind, f"demo backend: {name} missing or not a {kind}"
