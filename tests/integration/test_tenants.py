"""Tenants against real Prometheus servers: through the gateway as tenant a equals Prometheus
over tenant a's data alone, on the figure routes and the query API, whatever the query shape.

Three real Prometheus servers:
- `shared`: backfilled blocks of both tenants (env="a" and env="b", see tests/support/tenant_data.py);
- `alone`: the same blocks of tenant a only — the reference "Prometheus over tenant a's data alone";
- `scraped`: live scrapes of two targets labelled env="a" / env="b" (metadata exists only from scrapes).
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

from app.gateway.catalog.model import CATEGORIES
from app.gateway.settings import GatewaySettings
from app.main import create_app
from app.security import SecuritySettings
from app.settings import AppSettings
from tests.support import tenant_data as td
from tests.support.procs import Proc, start_prometheus, wait_until

pytestmark = pytest.mark.integration

TA, TB, TOPS = "tok-tenant-a-1f2e3d", "tok-tenant-b-4c5b6a", "tok-ops-7d8e9f"
TOKENS = json.dumps({TA: {"env": "a"}, TB: {"env": "b"}, TOPS: {}})
A = {"Authorization": f"Bearer {TA}"}
B = {"Authorization": f"Bearer {TB}"}
OPS = {"Authorization": f"Bearer {TOPS}"}


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
        procs.append(start_prometheus(root / "scraped", td.tenant_scrape_config(
            {env: t.target for env, t in targets.items()})))
        shared, alone, scraped = procs
        wait_until(lambda: _query(scraped.url, 'count(up{job="backend"} == 1) == 2'), 30,
                   what="both tenants' targets scraped")
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
