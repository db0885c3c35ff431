"""The gateway in front of a real VictoriaMetrics answers as VictoriaMetrics does.

VictoriaMetrics speaks the Prometheus query API with its own MetricsQL semantics
(extensions, other extrapolation, its own series order), so the comparison is
gateway vs VictoriaMetrics directly for the same request, never against
Prometheus. It holds the same generated demo_* history as the Prometheus test
(imported through /api/v1/import/prometheus). The queries are the compliance
list's queries VictoriaMetrics accepts; each is asked cold and warm through the
gateway, and in shifted windows, so answers are assembled from cached extents.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.gateway.settings import GatewaySettings
from app.main import create_app
from tests.integration.test_range_cache_compliance import CACHED, _diff, _num, canonical
from tests.support.demo_data import (
    compliance_queries,
    generate,
    grafana_align,
    start_victoriametrics,
)
from tests.support.procs import Proc
from tests.support.tools import needs

pytestmark = [
    pytest.mark.integration,
    needs("victoria-metrics"),
]

SAMPLE_EVERY = 10
# VictoriaMetrics' counter functions read the sample before their window, widen windows
# shorter than its estimate of the scrape interval, and correct counter resets over the
# whole range a query reads: their values depend on the range asked (in the last digits,
# or at instants next to a sample), which the probes below catch only at some phases.
RANGE_DEPENDENT = re.compile(r"\b(rate|increase|irate|delta|idelta)\(")


@dataclass
class VmStack:
    vm: Proc
    gateway: TestClient
    direct: httpx.Client


@pytest.fixture(scope="module")
def vm_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmStack]:
    workdir: Path = tmp_path_factory.mktemp("victoriametrics")
    vm = start_victoriametrics(workdir, generate(time.time() - 20))
    settings = GatewaySettings(prometheus_url=vm.url, request_deadline_seconds=20)
    try:
        with TestClient(create_app(settings)) as gateway, httpx.Client(base_url=vm.url, timeout=20) as direct:
            yield VmStack(vm, gateway, direct)
    finally:
        vm.stop()


def ask(stack: VmStack, form: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any], str]:
    got = stack.gateway.post("/api/v1/query_range", data=form)
    want = stack.direct.post("/api/v1/query_range", data=form)
    return canonical(got, sort=True), canonical(want, sort=True), got.headers.get("x-gateway-cache", "")


def _points(resp: httpx.Response, lo: float, hi: float) -> dict[tuple[Any, ...], list[Any]]:
    """Per series, the points at instants in [lo, hi)."""
    out = {tuple(sorted(s["metric"].items())): [p for p in s["values"] if lo <= p[0] < hi]
           for s in resp.json()["data"]["result"]}
    return {k: v for k, v in out.items() if v}


def supported(stack: VmStack) -> tuple[list[str], list[str]]:
    """The compliance queries VictoriaMetrics evaluates per instant (and the others).

    The cache rests on each instant's value not depending on the range asked;
    VictoriaMetrics keeps to that for most queries, not all: it aggregates floats
    in parallel (stddev, stdvar differ in the last digits between two identical
    requests) and corrects counter resets over the whole range it reads (rate,
    increase, irate over a reset differ in the last digits between two windows).
    No cache can equal an answer the upstream itself does not repeat, so a query
    is compared only when VictoriaMetrics answers it, answers it twice the same,
    and answers the common instants (older than the live window) of windows a
    quarter of an hour earlier, a minute later and of a short recent one the same.
    """
    end = time.time()
    kept, left = [], []
    for item in compliance_queries():
        q = item["query"]
        if item["should_fail"] or RANGE_DEPENDENT.search(q):
            left.append(q)
            continue
        window = {"query": q, "start": _num(end - 3600), "end": _num(end), "step": "15"}
        first = stack.direct.post("/api/v1/query_range", data=window)
        if first.status_code != 200:
            left.append(q)
            continue
        again = stack.direct.post("/api/v1/query_range", data=window)
        same = canonical(first, sort=True) == canonical(again, sort=True)
        # Earlier, later, and a short recent window (what the cache fetches for an edge).
        for lo, hi in ((end - 4500, end - 900), (end - 3540, end + 60), (end - 300, end - 60)):
            if not same:
                break
            other = stack.direct.post("/api/v1/query_range", data={
                **window, "start": _num(lo), "end": _num(hi)})
            common = (max(lo, end - 3600) - 0.001, min(hi, end - 60))
            same = other.status_code == 200 and _points(first, *common) == _points(other, *common)
        (kept if same else left).append(q)
    return kept, left


def test_gateway_equals_victoriametrics_cold_warm_and_shifted(vm_stack: VmStack) -> None:
    queries, left = supported(vm_stack)
    print(f"VictoriaMetrics: {len(queries)} queries compared, {len(left)} left out: {left}")
    assert len(queries) > 380, f"only {len(queries)} queries compared; left out: {left}"
    problems: list[str] = []
    cached = 0
    for i, q in enumerate(queries):
        end = round(time.time(), 3)
        shapes = [(end - 3600, end, 15.0)]
        if i % SAMPLE_EVERY == 0:
            shapes += [(end - 3600 + 60, end + 60, 15.0), (end - 3600 - 900, end - 900, 15.0),
                       (grafana_align(end - 3 * 3600, 60, 0), grafana_align(end, 60, 0), 60.0),
                       (grafana_align(end - 7 * 86400, 86400, 19800), grafana_align(end, 86400, 19800),
                        86400.0)]
        for n, (start, stop, step) in enumerate(shapes):
            form = {"query": q, "start": _num(start), "end": _num(stop), "step": _num(step)}
            for attempt in ("first", "again"):
                got, want, lookup = ask(vm_stack, form)
                if got != want:
                    problems.append(f"shape {n} {attempt} {form} ({lookup}): {_diff(got, want)}")
                cached += lookup in CACHED
    assert not problems, f"{len(problems)} differences:\n" + "\n".join(problems[:20])
    # The cache did serve from extents (VictoriaMetrics' own answers are on the grid).
    assert cached > len(queries)
