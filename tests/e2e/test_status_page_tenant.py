"""The status page with tokens confined to tenants, in real headless Chromium.

One gateway in front of a Prometheus holding two tenants (env="a", env="b"): the
page opened with tenant a's token shows tenant a's figures and says which tenant it
is; with b's token, b's. The figures equal the gateway's own summary for that token.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_status_page import StatusDom, dump_dom
from tests.support import tenant_data as td
from tests.support.procs import Proc, start_prometheus, start_uvicorn
from tests.support.tools import needs

pytestmark = [
    pytest.mark.e2e,
    needs("chromium"),
]
TA, TB = "status-tenant-a-91ab", "status-tenant-b-27cd"


@pytest.fixture()
def gateway(tmp_path: Path) -> Iterator[Proc]:
    now = time.time()
    td.backfill(tmp_path / "prom" / "data", ("a", "b"), now - 1200, now + 600)
    prom = start_prometheus(tmp_path / "prom")
    api: Proc | None = None
    try:
        api = start_uvicorn(tmp_path / "api", "app.main:app", env={
            "PROMETHEUS_URL": prom.url, "LOG_LEVEL": "WARNING",
            "API_TOKENS": json.dumps({TA: {"env": "a"}, TB: {"env": "b"}})})
        yield api
    finally:
        if api is not None:
            api.stop()
        prom.stop()


@pytest.mark.parametrize(("token", "env", "providers"), [(TA, "a", 4.0), (TB, "b", 5.0)])
def test_a_confined_token_shows_its_tenants_figures(gateway: Proc, token: str, env: str, providers: float) -> None:
    html = dump_dom(f"{gateway.url}/status?refresh=60#token={token}")
    summary = httpx.get(f"{gateway.url}/prometheus/metrics/summary",
                        headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
    dom = StatusDom()
    dom.feed(html)
    assert dom.elements["overall"]["data-status"] == "ok", dom.elements
    assert float(dom.figures["fig-providers-total_providers"]["raw"]) == providers
    assert summary["metrics"]["providers"]["total_providers"] == providers
    # Gauges only: they do not move between the page's fetch and ours.
    for section, key in (("business", "active_api_keys"), ("business", "active_trials"),
                         ("providers", "healthy_providers"), ("http", "in_progress")):
        assert float(dom.figures[f"fig-{section}-{key}"]["raw"]) == summary["metrics"][section][key], key
    scope = re.search(r'<span id="scope"[^>]*>([^<]*)</span>', html)
    assert scope is not None and "hidden" not in scope.group(0)
    assert scope.group(1) == f'Tenant: env="{env}"'
