"""`metrics-gateway doctor` against real Prometheus servers scraping the synthetic backends.

With every family the real backend defines, every default figure is healthy (exit 0).
Against the real backend as it is at HEAD (the provider families declared, never
recorded), the doctor names each provider figure and says why (exit 1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.gateway.catalog.loader import load_catalog
from tests.integration.conftest import PromStack

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CATALOG = load_catalog()
PROVIDER_FIGURES = {"providers", "providers_healthy", "providers_degraded", "providers_unavailable",
                    "provider_error_ratio_avg", "provider_response_time_avg_seconds", "provider_availability",
                    "provider_error_ratio", "provider_response_time_seconds"}


def doctor(stack: PromStack, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m app doctor` as an operator runs it, PROMETHEUS_URL from the environment."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PROMETHEUS_URL": stack.prometheus.url}
    env.pop("CATALOG_PATH", None)
    return subprocess.run([sys.executable, "-m", "app", "doctor", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT, check=False)


def as_json(stack: PromStack) -> tuple[int, dict[str, Any]]:
    done = doctor(stack, "--json")
    return done.returncode, json.loads(done.stdout)


def test_every_default_figure_is_healthy_against_the_full_backend(prom_stack: PromStack) -> None:
    code, report = as_json(prom_stack)
    assert code == 0, report
    assert report["exit_code"] == 0 and report["error"] is None
    assert [f["id"] for f in report["figures"]] == list(CATALOG.queries)
    for f in report["figures"]:
        assert f["status"] == "ok", f
        assert f["parses"] and f["families_exist"] and f["types_fit"], f
        assert f["series_now"] and f["series_now"] > 0, f
    reads = {r["name"]: r for f in report["figures"] for r in f["reads"]}
    assert reads["provider_response_time_seconds_sum"]["type"] == "histogram"
    assert reads["fastapi_requests_total"]["type"] == "counter"
    assert reads["database_query_duration_seconds_count"]["type"] == "summary"
    avg = next(f for f in report["figures"] if f["id"] == "provider_response_time_avg_seconds")
    assert any("fallback not used" in n for n in avg["notes"])  # the gauge branch: a histogram here


def test_the_gauge_era_backend_is_healthy_too(legacy_gauge_stack: PromStack) -> None:
    code, report = as_json(legacy_gauge_stack)
    by_id = {f["id"]: f for f in report["figures"]}
    for qid in ("provider_response_time_avg_seconds", "provider_response_time_seconds"):
        assert by_id[qid]["status"] == "ok", by_id[qid]
        assert by_id[qid]["series_now"] == (1 if qid.endswith("avg_seconds") else 4)
    assert code == 0, [f for f in report["figures"] if f["status"] == "broken"]


def test_without_the_provider_families_the_doctor_names_them_and_says_why(no_provider_stack: PromStack) -> None:
    code, report = as_json(no_provider_stack)
    assert code == 1 and report["exit_code"] == 1
    broken = {f["id"]: f for f in report["figures"] if f["status"] == "broken"}
    assert set(broken) == PROVIDER_FIGURES
    for f in broken.values():
        assert f["parses"] and f["families_exist"] is False and f["types_fit"] is True
        assert f["series_now"] == 0
        assert any("no series in the last 15m" in p and "a target declares it but has recorded nothing" in p
                   for p in f["problems"]), f["problems"]
    assert any("provider_response_time_seconds is a histogram" in p
               for p in broken["provider_response_time_avg_seconds"]["problems"])
    assert report["summary"] == {"ok": len(CATALOG.queries) - 9, "warn": 0, "broken": 9}

    table = doctor(no_provider_stack)
    assert table.returncode == 1
    for qid in PROVIDER_FIGURES:
        assert f"BROKEN  {qid} " in table.stdout
    assert "problem: provider_availability: no series in the last 15m" in table.stdout
