"""The status page when the gateway requires API tokens, in real headless Chromium.

Without a token the page shows the token form and says why nothing refreshes;
with `/status#token=...` (a fragment: never sent to the server, never logged)
it sends the token as an Authorization header and shows the figures.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_status_page import StatusDom, dump_dom
from tests.support.procs import Proc, start_prometheus, start_uvicorn, wait_until
from tests.support.synthetic_backend import SyntheticBackend, scrape_config
from tests.support.tools import needs

pytestmark = [
    pytest.mark.e2e,
    needs("chromium"),
]
TOKEN = "status-page-token-4f2a"


@pytest.fixture()
def gateway(tmp_path: Path) -> Iterator[Proc]:
    backend = SyntheticBackend()
    target = backend.start()
    backend.backfill(tmp_path / "prom" / "data", job="backend")
    prom = start_prometheus(tmp_path / "prom", scrape_config(target))
    api: Proc | None = None
    try:
        wait_until(lambda: httpx.post(f"{prom.url}/api/v1/query", data={"query": 'up{job="backend"} == 1'}
                                      ).json()["data"]["result"], 30, what="a scrape")
        api = start_uvicorn(tmp_path / "api", "app.main:app",
                            env={"PROMETHEUS_URL": prom.url, "API_TOKENS": TOKEN, "LOG_LEVEL": "WARNING"})
        yield api
    finally:
        if api is not None:
            api.stop()
        prom.stop()
        backend.stop()


def test_without_a_token_the_page_asks_for_one(gateway: Proc) -> None:
    html = dump_dom(f"{gateway.url}/status")
    form = re.search(r"<form[^>]*id=\"token-form\"[^>]*>", html)
    assert form is not None and "hidden" not in form.group(0), form
    dom = StatusDom()
    dom.feed(html)
    assert dom.elements["overall"]["data-status"] == "unreachable"
    assert "API token" in dom.elements["fetch-error"]["text"]


def test_a_token_in_the_fragment_is_sent_and_the_figures_show(gateway: Proc) -> None:
    html = dump_dom(f"{gateway.url}/status#token={TOKEN}")
    dom = StatusDom()
    dom.feed(html)
    assert dom.elements["overall"]["data-status"] == "ok", dom.elements
    assert float(dom.figures["fig-providers-total_providers"]["raw"]) == 4.0
    assert float(dom.figures["fig-business-active_trials"]["raw"]) == 2.0  # status="active" only
    form = re.search(r"<form[^>]*id=\"token-form\"[^>]*>", html)
    assert form is not None and "hidden" in form.group(0)
    # The token never reached the server in a URL: the API's log has no trace of it.
    assert TOKEN not in gateway.log()
