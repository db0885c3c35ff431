"""Tenants against real Prometheus servers: through the gateway as tenant a equals Prometheus
over tenant a's data alone, on the figure routes and the query API, whatever the query shape.

Three real Prometheus servers:
- `shared`: backfilled blocks of both tenants (env="a" and env="b", see tests/support/tenant_data.py);
- `alone`: the same blocks of tenant a only — the reference "Prometheus over tenant a's data alone";
- `scraped`: live scrapes of two targets labelled env="a" / env="b" (metadata exists only from
  scrapes), with alerting rules (rules and alerts are filtered by label).

The query list of prometheus/compliance (tests/data/promql-compliance) runs through the API.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.gateway.catalog.loader import load_catalog
from app.gateway.catalog.model import CATEGORIES
from app.gateway.catalog.names import FigureNames
from app.gateway.settings import GatewaySettings
from app.main import create_app
from app.security import SecuritySettings
from app.settings import AppSettings
from tests.support import tenant_data as td
from tests.support.demo_data import compliance_queries
from tests.support.procs import Proc, start_prometheus, wait_until

pytestmark = pytest.mark.integration

TA, TB, TOPS = "tok-tenant-a-1f2e3d", "tok-tenant-b-4c5b6a", "tok-ops-7d8e9f"
TOKENS = json.dumps({TA: {"env": "a"}, TB: {"env": "b"}, TOPS: {}})
A = {"Authorization": f"Bearer {TA}"}
B = {"Authorization": f"Bearer {TB}"}
OPS = {"Authorization": f"Bearer {TOPS}"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
COMPLIANCE = compliance_queries()
FIGURE_NAMES = set(FigureNames(load_catalog()).names())
RULES = """groups:
  - name: tenants
    interval: 1s
    rules:
      - alert: ProviderDown
        expr: provider_availability == 0
      - alert: TenantAProviderDown
        expr: provider_availability{env="a"} == 0
        labels: {env: a}
      - alert: TenantBKeys
        expr: redis_db_keys > 0
        labels: {env: b}
"""


@dataclass
class Stack:
    shared: Proc
    alone: Proc
    scraped: Proc
    now: float  # when the blocks were written; they hold data from now-40m to now+10m

    def at(self) -> float:
        """A fixed evaluation time inside the history, on the sample grid."""
        return math.floor((self.now - 300) / td.STEP) * td.STEP


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("tenants")
    now = time.time()
    start, end = now - 2400, now + 600
    td.backfill(root / "shared" / "data", ("a", "b"), start, end)
    td.backfill(root / "alone" / "data", ("a",), start, end)
    targets = {"a": td.StaticTarget(td.exposition("a")), "b": td.StaticTarget(td.exposition("b"))}
    procs: list[Proc] = []
    try:
        procs.append(start_prometheus(root / "shared"))
        procs.append(start_prometheus(root / "alone"))
        (root / "scraped").mkdir()
        (root / "scraped" / "rules.yml").write_text(RULES)
        procs.append(start_prometheus(root / "scraped", td.tenant_scrape_config(
            {env: t.target for env, t in targets.items()}), extra_config="rule_files:\n  - rules.yml\n"))
        shared, alone, scraped = procs
        wait_until(lambda: _query(scraped.url, 'count(up{job="backend"} == 1) == 2'), 30,
                   what="both tenants' targets scraped")
        wait_until(lambda: len(httpx.get(f"{scraped.url}/api/v1/alerts", timeout=5).json()["data"]["alerts"]) >= 3,
                   30, what="the rules' alerts")
        yield Stack(shared, alone, scraped, now)
    finally:
        for p in procs:
            p.stop()
        for t in targets.values():
            t.stop()


def _query(url: str, expr: str) -> list[Any]:
    body = httpx.post(f"{url}/api/v1/query", data={"query": expr}, timeout=5).json()
    return body["data"]["result"]  # type: ignore[no-any-return]


def gateway(prom: Proc, tokens: str | None = TOKENS) -> TestClient:
    settings = AppSettings(
        gateway=GatewaySettings(prometheus_url=prom.url, cache_ttl_seconds=30, request_deadline_seconds=10),
        security=SecuritySettings(api_tokens=tokens) if tokens else SecuritySettings())
    return TestClient(create_app(settings))


@pytest.fixture(scope="module")
def via_shared(stack: Stack) -> Iterator[TestClient]:
    """The gateway under test: tenant tokens, in front of the shared Prometheus."""
    with gateway(stack.shared) as c:
        yield c


@pytest.fixture(scope="module")
def via_alone(stack: Stack) -> Iterator[TestClient]:
    """The reference: an unconfined gateway in front of tenant a's data alone."""
    with gateway(stack.alone, None) as c:
        yield c


def same(a: Any, b: Any, rel: float = 1e-9) -> bool:
    """Equal structures, numbers to `rel`: two servers asked a few milliseconds apart extrapolate
    the same rate windows over intervals that differ in the last bits."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k], rel) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y, rel) for x, y in zip(a, b, strict=True))
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return a == b or math.isclose(a, b, rel_tol=rel) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, str) and isinstance(b, str) and a != b:
        try:
            return same(float(a), float(b), rel)
        except ValueError:
            return False
    return bool(a == b)


def off_grid_edge() -> None:
    """Wait while the next sample of the grid is under 2 s away, so two gateways asked one
    after the other at "now" read the same latest samples."""
    left = td.STEP - time.time() % td.STEP
    if left < 2:
        time.sleep(left + 0.1)


# --- figure routes -------------------------------------------------------------------------------------------

def _figures(doc: dict[str, Any]) -> dict[str, list[tuple[tuple[tuple[str, str], ...], Any]]]:
    return {f["id"]: sorted((tuple(sorted(s["labels"].items())), s["value"]) for s in f["series"])
            for f in doc["figures"]}


def test_summary_as_tenant_a_equals_prometheus_over_a_alone(via_shared: TestClient, via_alone: TestClient) -> None:
    off_grid_edge()
    mine = via_shared.get("/prometheus/metrics/summary", headers=A).json()
    reference = via_alone.get("/prometheus/metrics/summary").json()
    everyone = via_shared.get("/prometheus/metrics/summary", headers=OPS).json()
    assert mine["status"] == reference["status"] == "ok", (mine["errors"], reference["errors"])
    assert same(mine["metrics"], reference["metrics"]), (mine["metrics"], reference["metrics"])
    assert mine["scope"] == {"labels": {"env": "a"}}
    # The shared server does hold more than tenant a: the equality above is not by accident.
    assert not same(everyone["metrics"], reference["metrics"])
    assert everyone["metrics"]["providers"]["total_providers"] == 9  # 4 of a's, 5 of b's
    assert mine["metrics"]["providers"]["total_providers"] == 4


@pytest.mark.parametrize("route", [*CATEGORIES, "models?model=gpt-4", "providers?provider=openai&provider=deepinfra"])
def test_categories_as_tenant_a_equal_prometheus_over_a_alone(via_shared: TestClient, via_alone: TestClient,
                                                              route: str) -> None:
    sep = "&" if "?" in route else "?"
    off_grid_edge()
    mine = via_shared.get(f"/prometheus/metrics/{route}{sep}format=json", headers=A).json()
    reference = via_alone.get(f"/prometheus/metrics/{route}{sep}format=json").json()
    assert same(_figures(mine), _figures(reference)), (_figures(mine), _figures(reference))
    assert not any("deepinfra" in json.dumps(s) for s in _figures(mine).values())


def test_text_exposition_as_tenant_a_equals_reference(via_shared: TestClient, via_alone: TestClient) -> None:
    off_grid_edge()
    mine = via_shared.get("/prometheus/metrics/all", headers=A).text
    reference = via_alone.get("/prometheus/metrics/all").text

    def values(text: str) -> dict[str, str]:
        # Ages differ between two gateways; every figure's value must not.
        return dict(line.rsplit(" ", 1) for line in text.splitlines()
                    if line and not line.startswith("#") and "_age_seconds" not in line)

    assert same(values(mine), values(reference))


def test_the_other_tenant_right_after_gets_its_own_figures(via_shared: TestClient) -> None:
    """Everything of a's is cached and memoised; b, asking the same URLs at once, gets b's."""
    for route in ("summary", "providers?format=json", "all"):
        a1 = via_shared.get(f"/prometheus/metrics/{route}", headers=A)
        b1 = via_shared.get(f"/prometheus/metrics/{route}", headers=B)
        a2 = via_shared.get(f"/prometheus/metrics/{route}", headers=A)
        assert b1.status_code == a1.status_code == 200
        assert b1.content != a1.content
        if route == "summary":
            assert [r.json()["metrics"]["providers"]["total_providers"] for r in (a1, b1, a2)] == [4, 5, 4]
        else:
            assert "deepinfra" in b1.text and "deepinfra" not in a1.text + a2.text


# --- the query API: the compliance query list -------------------------------------------------------------------

def _canonical(doc: dict[str, Any]) -> Any:
    """An API answer for comparison: status and errorType, or the result with series sorted
    (two servers may list the series of an unordered result differently)."""
    if doc.get("status") != "success":
        return ("error", doc.get("errorType"))
    data = doc["data"]
    result = data["result"]
    if isinstance(result, list) and result and isinstance(result[0], dict):
        result = sorted(result, key=lambda r: json.dumps(r.get("metric"), sort_keys=True))
    return (data["resultType"], result)


@pytest.fixture(scope="module")
def alone_api(stack: Stack) -> Iterator[httpx.Client]:
    """Prometheus over tenant a's data alone, asked directly."""
    with httpx.Client(base_url=f"{stack.alone.url}/api/v1", timeout=10) as c:
        yield c


def test_compliance_queries_as_tenant_a_equal_prometheus_over_a_alone(
        via_shared: TestClient, alone_api: httpx.Client, stack: Stack) -> None:
    t = stack.at()
    mismatches = []
    for n, case in enumerate(COMPLIANCE):
        q = case["query"]
        mine = via_shared.post("/api/v1/query", data={"query": q, "time": str(t)}, headers=A)
        ref = alone_api.post("/query", data={"query": q, "time": str(t)})
        if mine.status_code != ref.status_code or not same(_canonical(mine.json()), _canonical(ref.json())):
            mismatches.append((q, mine.status_code, mine.text[:300], ref.status_code, ref.text[:300]))
        if n % 4 == 0:  # a deterministic quarter as range queries too
            params = {"query": q, "start": str(t - 600), "end": str(t), "step": "60"}
            mine = via_shared.get("/api/v1/query_range", params=params, headers=A)
            ref = alone_api.get("/query_range", params=params)
            if mine.status_code != ref.status_code or not same(_canonical(mine.json()), _canonical(ref.json())):
                mismatches.append(("range " + q, mine.status_code, mine.text[:300], ref.status_code, ref.text[:300]))
    assert not mismatches, mismatches[:5]
    # The shared server answers the same list differently for everyone: b's data is there.
    differs = sum(
        not same(_canonical(via_shared.post("/api/v1/query", data={"query": c["query"], "time": str(t)},
                                            headers=OPS).json()),
                 _canonical(alone_api.post("/query", data={"query": c["query"], "time": str(t)}).json()))
        for c in COMPLIANCE[9:60])
    assert differs > 25


# --- bypass attempts: tenant a's data only, or a 4xx ------------------------------------------------------------

BYPASS_QUERIES = [
    '{__name__=~".+"}',
    '{__name__=~"demo_.+", env=~"a|b"}',
    'demo_num_cpus{env=~"a|b"}',
    'demo_num_cpus{env=~".*"}',
    'demo_num_cpus{env!="a"}',
    'demo_num_cpus{env="b"}',
    '{env=~".*"}',
    '{env!="a"}',
    '{env="b"}',
    'demo_num_cpus{env="b"} or vector(1)',
    "sum(demo_num_cpus) or vector(1)",
    'label_replace(demo_num_cpus, "env", "b", "", "")',
    'count by (env) ({__name__=~".+"})',
    'max_over_time(demo_num_cpus{env=~"b"}[10m:1m])',
    "sum(rate(demo_cpu_usage_seconds_total[5m:30s]))",
    "demo_num_cpus offset 5m",
    "demo_num_cpus @ {t} offset 1m",
    "sum(demo_num_cpus @ start())",
    'absent(demo_num_cpus{env="b"})',
    'absent(redis_up)',
    "redis_up",
    'provider_availability{provider="deepinfra"}',
    'count(provider_availability)',
    'sum by (__name__) ({__name__=~"redis.*|demo_num_cpus"})',
]


# Queries whose own text writes env="b" on their output (tenant a's data relabelled, absent()
# reporting the caller's own matcher): the equality with a alone is what counts there.
WRITES_ENV = {'label_replace(demo_num_cpus, "env", "b", "", "")', 'absent(demo_num_cpus{env="b"})'}


def _only_tenant_a(doc: dict[str, Any]) -> bool:
    def ok(metric: dict[str, str]) -> bool:
        return metric.get("env", "a") == "a" and metric.get("provider") != "deepinfra" and \
            not metric.get("__name__", "").startswith("redis")
    result = doc["data"]["result"] if doc.get("status") == "success" else []
    return not isinstance(result, list) or all(ok(r.get("metric", {})) for r in result if isinstance(r, dict))


@pytest.mark.parametrize("template", BYPASS_QUERIES)
def test_bypass_queries_get_tenant_a_data_only(via_shared: TestClient, alone_api: httpx.Client, stack: Stack,
                                               template: str) -> None:
    t = stack.at()
    q = template.replace("{t}", str(t))
    for prefix in ("/api/v1", "/prometheus/api/v1"):
        mine = via_shared.post(f"{prefix}/query", data={"query": q, "time": str(t)}, headers=A)
        ref = alone_api.post("/query", data={"query": q, "time": str(t)})
        assert mine.status_code == ref.status_code, (mine.text, ref.text)
        assert same(_canonical(mine.json()), _canonical(ref.json())), (mine.text, ref.text)
        if template not in WRITES_ENV:
            assert _only_tenant_a(mine.json())
        params = {"query": q, "start": str(t - 900), "end": str(t), "step": "30"}
        mine = via_shared.get(f"{prefix}/query_range", params=params, headers=A)
        ref = alone_api.get("/query_range", params=params)
        assert mine.status_code == ref.status_code and same(_canonical(mine.json()), _canonical(ref.json()))


def test_same_parameter_in_url_and_body(via_shared: TestClient, stack: Stack) -> None:
    t = str(stack.at())
    # Different copies: refused, whichever one the upstream would have read.
    for url_q, body_q in (('{env="b"}', "demo_num_cpus"), ("demo_num_cpus", '{env="b"}')):
        r = via_shared.post(f"/api/v1/query?query={httpx.QueryParams({'q': url_q})['q']}",
                            content=str(httpx.QueryParams({"query": body_q, "time": t})).encode(),
                            headers={**A, **FORM})
        assert r.status_code == 400 and r.json()["errorType"] == "bad_data"
    r = via_shared.post("/api/v1/series?" + str(httpx.QueryParams({"match[]": '{env="b"}'})),
                        content=str(httpx.QueryParams({"match[]": "demo_num_cpus"})).encode(), headers={**A, **FORM})
    assert r.status_code == 400
    # The same copy twice: one enforced query.
    same_q = str(httpx.QueryParams({"query": '{__name__="demo_num_cpus"}', "time": t}))
    r = via_shared.post(f"/api/v1/query?{same_q}", content=same_q.encode(), headers={**A, **FORM})
    assert r.status_code == 200 and r.json()["data"]["result"]
    assert {s["metric"]["env"] for s in r.json()["data"]["result"]} == {"a"}


def _api(client: TestClient | httpx.Client, path: str, params: list[tuple[str, str]],
         headers: dict[str, str] | None = None, prefix: str = "/api/v1") -> httpx.Response:
    if isinstance(client, TestClient):
        return client.get(f"{prefix}{path}", params=params, headers=headers)
    return client.get(path, params=params)


LABEL_CASES: list[tuple[str, list[tuple[str, str]]]] = [
    ("/labels", []),
    ("/labels", [("match[]", '{__name__=~".+"}')]),
    ("/labels", [("match[]", "redis_db_keys")]),
    ("/labels", [("match[]", '{env="b"}'), ("match[]", "demo_num_cpus")]),
    ("/label/env/values", []),
    ("/label/env/values", [("match[]", '{env=~"a|b"}')]),
    ("/label/provider/values", []),
    ("/label/db/values", []),
    ("/label/instance/values", [("match[]", '{__name__=~".+"}')]),
    ("/series", [("match[]", '{__name__=~".+"}')]),
    ("/series", [("match[]", '{env=~".+"}'), ("match[]", "redis_up")]),
    ("/series", [("match[]", 'provider_availability{env!="a"}')]),
    ("/series", []),
    ("/series", [("match[]", "")]),
    ("/labels", [("match[]", "")]),
    ("/labels", [("match[]", "rate(demo_num_cpus[5m])")]),
]


@pytest.mark.parametrize(("path", "params"), LABEL_CASES)
def test_label_and_series_lookups_as_tenant_a_equal_a_alone(via_shared: TestClient, alone_api: httpx.Client,
                                                            stack: Stack, path: str,
                                                            params: list[tuple[str, str]]) -> None:
    window = [("start", str(stack.now - 2000)), ("end", str(stack.now))]
    mine = _api(via_shared, path, params + window, A)
    ref = _api(alone_api, path, params + window)
    assert mine.status_code == ref.status_code, (mine.text, ref.text)
    if ref.status_code != 200:
        assert mine.json()["errorType"] == ref.json()["errorType"]
        return
    got, want = mine.json()["data"], ref.json()["data"]
    if path == "/series":
        got, want = sorted(map(json.dumps, got)), sorted(map(json.dumps, want))
    assert got == want
    text = mine.text
    assert '"b"' not in text and "deepinfra" not in text and "redis" not in text and "db0" not in text


def test_metric_names_as_tenant_a_equal_a_alone_with_figures(via_shared: TestClient, via_alone: TestClient) -> None:
    for params in ([], [("match[]", '{__name__=~".+"}')], [("match[]", '{env="b"}')]):
        mine = via_shared.get("/api/v1/label/__name__/values", params=params, headers=A)
        ref = via_alone.get("/api/v1/label/__name__/values", params=params)
        assert mine.status_code == ref.status_code == 200
        assert mine.json()["data"] == ref.json()["data"]
        assert not any(n.startswith("redis") for n in mine.json()["data"])
    everyone = via_shared.get("/api/v1/label/__name__/values", headers=OPS).json()["data"]
    assert "redis_up" in everyone


def test_figure_names_as_tenant_a_read_tenant_a(via_shared: TestClient, via_alone: TestClient, stack: Stack) -> None:
    """A figure used as a metric name expands to its PromQL, which then gets the tenant's matchers."""
    t = str(stack.at())
    for q in ("gateway_providers", "gateway_provider_availability", "sum(gateway_tokens_used_total)"):
        mine = via_shared.post("/api/v1/query", data={"query": q, "time": t}, headers=A)
        ref = via_alone.post("/api/v1/query", data={"query": q, "time": t})
        assert mine.status_code == ref.status_code == 200, (mine.text, ref.text)
        assert same(_canonical(mine.json()), _canonical(ref.json()))
    providers = via_shared.post("/api/v1/query", data={"query": "gateway_providers", "time": t}, headers=A).json()
    assert float(providers["data"]["result"][0]["value"][1]) == 4


def test_cached_answers_are_not_served_to_the_other_tenant(via_shared: TestClient, stack: Stack) -> None:
    t = str(stack.at())
    for path, params in (("/query", {"query": "demo_num_cpus", "time": t}),
                         ("/query_range", {"query": "sum by (env) (demo_num_cpus)", "start": str(float(t) - 300),
                                           "end": t, "step": "15"}),
                         ("/label/env/values", {}), ("/series", {"match[]": "demo_num_cpus"})):
        a1 = via_shared.get(f"/api/v1{path}", params=params, headers=A)
        b1 = via_shared.get(f"/api/v1{path}", params=params, headers=B)
        a2 = via_shared.get(f"/api/v1{path}", params=params, headers=A)
        assert a1.status_code == b1.status_code == a2.status_code == 200
        assert a1.json()["data"] == a2.json()["data"] != b1.json()["data"], path
        assert '"b"' not in a1.text + a2.text and '"a"' not in b1.text


# --- metadata, rules and alerts (the scraped server) -------------------------------------------------------------

@pytest.fixture(scope="module")
def via_scraped(stack: Stack) -> Iterator[TestClient]:
    with gateway(stack.scraped) as c:
        yield c


def test_metadata_as_tenant_a_is_tenant_as_targets_metadata(via_scraped: TestClient, stack: Stack) -> None:
    """Prometheus' metadata has no matchers; tenant a gets the families of its own targets,
    which Prometheus itself reports through targets/metadata for the env="a" targets."""
    own = httpx.get(f"{stack.scraped.url}/api/v1/targets/metadata",
                    params={"match_target": '{env="a"}'}, timeout=5).json()["data"]
    want: dict[str, list[dict[str, str]]] = {}
    for m in own:
        entry = {"type": m["type"], "help": m["help"], "unit": m["unit"]}
        if entry not in want.setdefault(m["metric"], []):
            want[m["metric"]].append(entry)
    mine = via_scraped.get("/api/v1/metadata", headers=A).json()["data"]
    assert {k: v for k, v in mine.items() if k not in FIGURE_NAMES} == want
    everyone = via_scraped.get("/api/v1/metadata", headers=OPS).json()["data"]
    assert "redis_db_keys" in everyone and "redis_db_keys" not in mine
    assert via_scraped.get("/api/v1/metadata", params={"metric": "redis_up"}, headers=A).json()["data"] == {}
    assert via_scraped.get("/api/v1/metadata", params={"metric": "redis_up"}, headers=B).json()["data"]
    # The limit counts the tenant's own names.
    limited = via_scraped.get("/api/v1/metadata", params={"limit": "3"}, headers=A).json()["data"]
    assert len(limited) == 3 and not any(k.startswith("redis") for k in limited)


def test_rules_and_alerts_are_filtered_by_label(via_scraped: TestClient) -> None:
    alerts = via_scraped.get("/api/v1/alerts", headers=A).json()["data"]["alerts"]
    assert alerts and all(a["labels"]["env"] == "a" for a in alerts)
    assert {a["labels"]["alertname"] for a in alerts} == {"ProviderDown", "TenantAProviderDown"}
    everyone = via_scraped.get("/api/v1/alerts", headers=OPS).json()["data"]["alerts"]
    assert {a["labels"]["env"] for a in everyone} == {"a", "b"}
    groups = via_scraped.get("/api/v1/rules", headers=A).json()["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert [r["name"] for r in rules] == ["TenantAProviderDown"]
    assert all(a["labels"]["env"] == "a" for r in rules for a in r.get("alerts", []))


def test_scraped_labels_as_tenant_a(via_scraped: TestClient) -> None:
    """Live series (up, scrape_* and the targets' own) carry the target's env too."""
    names = via_scraped.get("/api/v1/label/__name__/values", headers=A).json()["data"]
    assert "up" in names and "redis_up" not in names
    up = via_scraped.post("/api/v1/query", data={"query": "up"}, headers=A).json()["data"]["result"]
    assert [s["metric"]["env"] for s in up] == ["a"]
    assert via_scraped.get("/api/v1/label/env/values", headers=A).json()["data"] == ["a"]
