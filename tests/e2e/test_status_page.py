"""The status page rendered by real headless Chromium against the running stack.

The stack (real Prometheus scraping the demo backend, the API) is started the
README way; Chromium loads /status, runs its JS, and the dumped DOM must show
every summary figure with the number the JSON endpoint gives at the same time
(within a tolerance for the live counters), the overall badge, per-figure
states and the time of the last update. Skips only when no chromium binary.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_stack_smoke import SUMMARY_KEYS, running_stack, summary_complete
from tests.support.procs import wait_until
from tests.support.tools import needs

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             "/usr/bin/chromium") if p and Path(p).exists()), None)

pytestmark = [
    pytest.mark.e2e,
    needs("chromium"),
]

DASH = "\u2014"


class StatusDom(HTMLParser):
    """Figures (id fig-<section>-<key>: state, data-raw, text) and a few header elements."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: dict[str, dict[str, str]] = {}
        self.elements: dict[str, dict[str, str]] = {}
        self._figure: str | None = None
        self._capture: tuple[str, str] | None = None  # (kind, key)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        ident = a.get("id", "")
        classes = a.get("class", "").split()
        if ident.startswith("fig-"):
            self._figure = ident
            self.figures[ident] = {"state": a.get("data-state", ""), "raw": "", "text": ""}
        elif "value" in classes and self._figure:
            self.figures[self._figure]["raw"] = a.get("data-raw", "")
            self._capture = ("figure", self._figure)
        elif ident in ("overall", "last-update", "data-timestamp", "fetch-error"):
            self.elements[ident] = {**a, "text": ""}
            self._capture = ("element", ident)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("span", "time", "p"):
            self._capture = None

    def handle_data(self, data: str) -> None:
        if self._capture is None:
            return
        kind, key = self._capture
        target = self.figures[key] if kind == "figure" else self.elements[key]
        target["text"] += data


def dump_dom(url: str, budget_ms: int = 8000) -> str:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        result = subprocess.run(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
             f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
            capture_output=True, timeout=90, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    return result.stdout.decode()


def _close(shown: float, a: float, b: float) -> bool:
    lo, hi = min(a, b), max(a, b)
    slack = max(abs(hi) * 0.05, 1e-6)
    return lo - slack <= shown <= hi + slack


def test_status_page_shows_live_summary_figures(tmp_path: Path) -> None:
    with running_stack(tmp_path, "--no-workers", "--no-vrops") as stack:
        urls = stack.urls
        wait_until(lambda: summary_complete(urls["summary"]), timeout=60, interval=1.0,
                   what="summary figures")
        before: dict[str, Any] = httpx.get(urls["summary"], timeout=10).json()
        html = dump_dom(f"{urls['status_page']}?refresh=60")
        after: dict[str, Any] = httpx.get(urls["summary"], timeout=10).json()

    dom = StatusDom()
    dom.feed(html)
    assert "N/A" not in html
    assert dom.elements["overall"]["data-status"] in (before["status"], after["status"]), html
    assert dom.elements["last-update"]["text"].strip() not in ("", DASH)
    assert dom.elements["last-update"]["datetime"]
    assert dom.elements["fetch-error"].get("hidden") is not None  # no fetch error shown

    for section, keys in SUMMARY_KEYS.items():
        for key in keys:
            fig = dom.figures.get(f"fig-{section}-{key}")
            assert fig is not None, f"no widget for {section}.{key}"
            expected = (before["metrics"][section][key], after["metrics"][section][key])
            text = fig["text"].strip()
            if expected[0] is None and expected[1] is None:
                assert text == DASH and fig["raw"] == ""
                continue
            assert fig["raw"], f"{section}.{key}: no value rendered ({fig})"
            shown = float(fig["raw"])
            assert math.isfinite(shown)
            assert _close(shown, *(float(v) for v in expected if v is not None)), (
                f"{section}.{key}: page shows {shown}, summary said {expected}")
            assert text and text != DASH and any(c.isdigit() for c in text), (section, key, text)
            assert fig["state"] in ("fresh", "cached", "stale"), (section, key, fig["state"])
